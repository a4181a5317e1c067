//! HL7 v2 times (TS/DTM): `YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ]`.
//!
//! A time with an offset means exactly that instant. A time without one is local time in the
//! feed's time zone (`[feeds] time_zone`, Europe/London by default): UK feeds send local time,
//! which is +0100 all summer. At the autumn change, when a local time happens twice, the earlier
//! instant is taken; at the spring change, a local time that never happened is read as if the
//! clocks had not yet changed (RFC 5545's "compatible" rule, as `jiff` implements it). A value
//! with only a date (or year, or month) stays a date: it is never shifted by a zone.

use jiff::civil::DateTime;
use jiff::tz::{Offset, TimeZone};

/// What an HL7 time says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hl7Time {
    /// A calendar date at day, month or year precision, as FHIR writes it (`2026-07-01`,
    /// `2026-07`, `2026`).
    Date(String),
    /// An instant, as RFC 3339 in UTC (`2026-07-01T10:50:00Z`, fractions kept).
    Instant(String),
}

impl Hl7Time {
    /// The value as the record stores it (RFC 3339 for an instant, a FHIR date otherwise).
    pub fn into_string(self) -> String {
        match self {
            Hl7Time::Date(s) | Hl7Time::Instant(s) => s,
        }
    }
}

/// Why an HL7 time could not be read (never echoing the value).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeError {
    #[error("not an HL7 time: expected YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ]")]
    Format,
    #[error("not a valid date or time")]
    OutOfRange,
}

/// Parses an HL7 v2 TS/DTM (its first component, for TS's old `^precision` form) read in
/// `zone` when it carries no offset. An empty value is `Ok(None)`.
pub fn parse(value: &str, zone: &TimeZone) -> Result<Option<Hl7Time>, TimeError> {
    let value = value.split('^').next().unwrap_or_default().trim();
    if value.is_empty() {
        return Ok(None);
    }
    let (rest, offset) = match value.rfind(['+', '-']) {
        Some(at) => (&value[..at], Some(&value[at..])),
        None => (value, None),
    };
    let (digits, fraction) = match rest.split_once('.') {
        Some((d, f)) => (d, Some(f)),
        None => (rest, None),
    };
    if !digits.bytes().all(|b| b.is_ascii_digit()) || ![4, 6, 8, 10, 12, 14].contains(&digits.len()) {
        return Err(TimeError::Format);
    }
    let num = |from: usize, to: usize| -> i32 { digits.get(from..to).map_or(0, |d| d.parse().unwrap_or(0)) };
    let (year, month, day) = (num(0, 4), num(4, 6), num(6, 8));
    if year < 1 {
        return Err(TimeError::OutOfRange);
    }
    if digits.len() <= 8 {
        // A date stays a date: an offset sent with it (HL7 allows one) does not move it.
        if fraction.is_some()
            || offset.is_some_and(|o| o.len() != 5 || !o[1..].bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(TimeError::Format);
        }
        // Validate what is there, then write the precision given.
        let check = |m: i32, d: i32| {
            jiff::civil::Date::new(year as i16, m as i8, d as i8).map_err(|_| TimeError::OutOfRange)
        };
        return Ok(Some(Hl7Time::Date(match digits.len() {
            4 => {
                check(1, 1)?;
                format!("{year:04}")
            }
            6 => {
                check(month, 1)?;
                format!("{year:04}-{month:02}")
            }
            _ => {
                check(month, day)?;
                format!("{year:04}-{month:02}-{day:02}")
            }
        })));
    }
    let nanos = match fraction {
        None => 0,
        Some(f)
            if (1..=4).contains(&f.len()) && f.bytes().all(|b| b.is_ascii_digit()) && digits.len() == 14 =>
        {
            f.parse::<i32>().map_err(|_| TimeError::Format)? * 10i32.pow(9 - f.len() as u32)
        }
        Some(_) => return Err(TimeError::Format),
    };
    let civil = DateTime::new(
        year as i16,
        month as i8,
        day as i8,
        num(8, 10) as i8,
        num(10, 12) as i8,
        num(12, 14) as i8,
        nanos,
    )
    .map_err(|_| TimeError::OutOfRange)?;
    let instant = match offset {
        Some(o) => {
            let (sign, hhmm) = o.split_at(1);
            if hhmm.len() != 4 || !hhmm.bytes().all(|b| b.is_ascii_digit()) {
                return Err(TimeError::Format);
            }
            let (h, m): (i32, i32) = (hhmm[..2].parse().unwrap_or(99), hhmm[2..].parse().unwrap_or(99));
            if h > 14 || m > 59 {
                return Err(TimeError::OutOfRange);
            }
            let seconds = (h * 3600 + m * 60) * if sign == "-" { -1 } else { 1 };
            let offset = Offset::from_seconds(seconds).map_err(|_| TimeError::OutOfRange)?;
            offset.to_timestamp(civil).map_err(|_| TimeError::OutOfRange)?
        }
        None => zone.to_ambiguous_zoned(civil).compatible().map_err(|_| TimeError::OutOfRange)?.timestamp(),
    };
    Ok(Some(Hl7Time::Instant(instant.to_string())))
}

/// The date part of an HL7 time, never shifted by a zone (a date of birth sent with a time).
pub fn date_of(value: &str) -> Option<String> {
    let digits: String = value.trim().chars().take_while(|c| c.is_ascii_digit()).take(8).collect();
    match parse(&digits, &TimeZone::UTC) {
        Ok(Some(Hl7Time::Date(d))) => Some(d),
        _ => None,
    }
}

/// The time zone a feed's local times are in, by IANA name (e.g. `Europe/London`).
pub fn zone(name: &str) -> Result<TimeZone, String> {
    TimeZone::get(name)
        .map_err(|_| format!("unknown time zone `{name}` (use an IANA name such as Europe/London)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn london() -> TimeZone {
        zone("Europe/London").unwrap()
    }

    fn at(value: &str) -> String {
        parse(value, &london()).unwrap().unwrap().into_string()
    }

    #[test]
    fn offsets_are_honoured() {
        assert_eq!(at("20260701115000+0100"), "2026-07-01T10:50:00Z");
        assert_eq!(at("20261125143000+0000"), "2026-11-25T14:30:00Z");
        assert_eq!(at("20260701115000-0430"), "2026-07-01T16:20:00Z");
    }

    #[test]
    fn every_precision_hl7_allows() {
        assert_eq!(at("2026"), "2026");
        assert_eq!(at("202607"), "2026-07");
        assert_eq!(at("20260701"), "2026-07-01");
        assert_eq!(at("20260701+0100"), "2026-07-01", "a date with an offset stays that date");
        assert_eq!(at("2026070111"), "2026-07-01T10:00:00Z");
        assert_eq!(at("202607011150"), "2026-07-01T10:50:00Z");
        assert_eq!(at("20260701115012"), "2026-07-01T10:50:12Z");
        assert_eq!(at("20260701115012.5"), "2026-07-01T10:50:12.5Z");
        assert_eq!(at("20260701115012.1234+0100"), "2026-07-01T10:50:12.1234Z");
        assert_eq!(at("20260701115000^S"), "2026-07-01T10:50:00Z", "TS's old precision component");
    }

    #[test]
    fn local_times_follow_the_feed_zone_across_the_clock_changes() {
        // Winter: London is UTC.
        assert_eq!(at("20261125143000"), "2026-11-25T14:30:00Z");
        // 2026's spring change: 29 March, 01:00 UTC; 00:30 is GMT, 02:30 BST, 01:30 never was.
        assert_eq!(at("20260329003000"), "2026-03-29T00:30:00Z");
        assert_eq!(at("20260329023000"), "2026-03-29T01:30:00Z");
        assert_eq!(at("20260329013000"), "2026-03-29T01:30:00Z", "a gap: read as before the change");
        // 2026's autumn change: 25 October, 01:00 UTC; 01:30 local happens twice: the earlier.
        assert_eq!(at("20261025003000"), "2026-10-24T23:30:00Z");
        assert_eq!(at("20261025013000"), "2026-10-25T00:30:00Z");
        assert_eq!(at("20261025023000"), "2026-10-25T02:30:00Z");
        // Another zone when the feed is configured so.
        let utc = parse("20260701115000", &TimeZone::UTC).unwrap().unwrap().into_string();
        assert_eq!(utc, "2026-07-01T11:50:00Z");
    }

    #[test]
    fn malformed_times_are_errors_that_do_not_echo_them() {
        for bad in [
            "2026070",
            "20260701115",
            "2026-07-01",
            "20261301",
            "20260230",
            "20260701250000",
            "20260701115000+01",
            "20260701115000+2500",
            "20260701.5",
            "20260701115000.12345",
            "x2026",
        ] {
            let err = parse(bad, &london()).unwrap_err();
            assert!(!err.to_string().contains(bad), "{bad}: {err}");
        }
        assert_eq!(parse("  ", &london()), Ok(None));
        assert_eq!(date_of("193005171200"), Some("1930-05-17".into()));
        assert!(zone("Mars/Olympus").is_err());
    }
}
