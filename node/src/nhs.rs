//! NHS numbers: ten digits with a modulus-11 check digit.
//!
//! Every NHS number that enters care-sync passes through [`NhsNumber::parse`]. The type never
//! prints its digits through `Debug`, so an NHS number cannot leak into logs by accident; use
//! [`NhsNumber::as_str`] or [`NhsNumber::formatted`] where a clinician must see it.

use std::fmt;

/// A validated NHS number, stored as its ten digits.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NhsNumber(String);

/// Why a string is not an NHS number. Carries no digits of the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NhsNumberError {
    #[error("an NHS number has exactly ten digits (spaces allowed)")]
    WrongLength,
    #[error("an NHS number contains only digits and spaces")]
    NotDigits,
    #[error("the NHS number's check digit is wrong")]
    BadCheckDigit,
}

impl NhsNumber {
    /// Parses and validates an NHS number; spaces (as in `999 000 0018`) are ignored.
    pub fn parse(input: &str) -> Result<Self, NhsNumberError> {
        let digits: String = input.chars().filter(|c| *c != ' ').collect();
        if !digits.chars().all(|c| c.is_ascii_digit()) {
            return Err(NhsNumberError::NotDigits);
        }
        if digits.len() != 10 {
            return Err(NhsNumberError::WrongLength);
        }
        let values: Vec<u32> = digits.bytes().map(|b| u32::from(b - b'0')).collect();
        if check_digit(&values[..9]) != Some(values[9]) {
            return Err(NhsNumberError::BadCheckDigit);
        }
        Ok(Self(digits))
    }

    /// Builds the valid NHS number whose first nine digits are `stem` (0..=999_999_999),
    /// or `None` when no valid number has that stem (the check digit would be 10).
    pub fn from_stem(stem: u32) -> Option<Self> {
        if stem > 999_999_999 {
            return None;
        }
        let stem = format!("{stem:09}");
        let values: Vec<u32> = stem.bytes().map(|b| u32::from(b - b'0')).collect();
        let check = check_digit(&values)?;
        Some(Self(format!("{stem}{check}")))
    }

    /// The ten digits, as stored and compared.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The display form `999 000 0018`.
    pub fn formatted(&self) -> String {
        format!("{} {} {}", &self.0[..3], &self.0[3..6], &self.0[6..])
    }

    /// True for the 999 range reserved for testing, never issued to patients.
    pub fn is_test_range(&self) -> bool {
        self.0.starts_with("999")
    }
}

/// Modulus 11 over the first nine digits, weighted 10 down to 2.
fn check_digit(first_nine: &[u32]) -> Option<u32> {
    let sum: u32 = first_nine.iter().zip((2..=10).rev()).map(|(digit, weight)| digit * weight).sum();
    match 11 - (sum % 11) {
        11 => Some(0),
        10 => None,
        check => Some(check),
    }
}

impl fmt::Debug for NhsNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NhsNumber([redacted])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_reference_valid_numbers() {
        for n in [
            "9990000018",
            "9990000026",
            "9990000034",
            "9990000069",
            "9999999484",
            "9999999468",
            "9999999999",
            "9434765919",
            "9000000009",
            "999 000 0018",
        ] {
            assert!(NhsNumber::parse(n).is_ok(), "{n} should be valid");
        }
    }

    #[test]
    fn refuses_the_reference_invalid_numbers() {
        assert_eq!(NhsNumber::parse("9990000000"), Err(NhsNumberError::BadCheckDigit));
        assert_eq!(NhsNumber::parse("9990000010"), Err(NhsNumberError::BadCheckDigit));
        assert_eq!(NhsNumber::parse("9219068409"), Err(NhsNumberError::BadCheckDigit));
        assert_eq!(NhsNumber::parse("999000001"), Err(NhsNumberError::WrongLength));
        assert_eq!(NhsNumber::parse("99900000a8"), Err(NhsNumberError::NotDigits));
    }

    #[test]
    fn stems_complete_to_valid_numbers_or_none() {
        assert_eq!(NhsNumber::from_stem(999_000_001).unwrap().as_str(), "9990000018");
        assert!(NhsNumber::from_stem(999_000_000).is_none());
        assert_eq!(NhsNumber::from_stem(999_000_001).unwrap().formatted(), "999 000 0018");
    }

    #[test]
    fn debug_never_shows_digits() {
        let n = NhsNumber::parse("9990000018").unwrap();
        let shown = format!("{n:?}");
        assert!(!shown.chars().any(|c| c.is_ascii_digit()), "{shown}");
    }
}
