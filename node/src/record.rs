//! What a clinician records on a device, in one place for the CLI and the apps: a [`NewEntry`]
//! of any section, checked ([`NewEntry::check`]) before it gets an id and the device's
//! provenance, then stored by [`crate::store::DeviceStore::record`] under the write policy.

use crate::summary::{
    Alert, Allergy, CarePlan, Contact, Medication, Problem, Provenance, Report, Section, alert_kind,
};

/// An entry to record (texts are patient data: `Debug` names the section only).
#[derive(Clone, PartialEq)]
#[cfg_attr(feature = "uniffi", derive(uniffi::Enum))]
pub enum NewEntry {
    Allergy {
        substance: String,
        reaction: Option<String>,
        severity: Option<String>,
    },
    Problem {
        description: String,
    },
    Medication {
        name: String,
        dose: Option<String>,
        route: Option<String>,
        frequency: Option<String>,
    },
    /// `kind`: one of [`ALERT_KINDS`].
    Alert {
        kind: String,
        description: String,
    },
    CarePlan {
        title: String,
        description: Option<String>,
    },
    /// A next of kin, carer or other contact.
    Contact {
        name: String,
        relationship: String,
        phone: Option<String>,
    },
    /// A result or observation the crew or nurse took (a blood glucose, say).
    Result {
        title: String,
        value: Option<String>,
        unit: Option<String>,
    },
}

impl std::fmt::Debug for NewEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NewEntry::{:?}", self.section())
    }
}

/// The alert kinds a device may record.
pub const ALERT_KINDS: [&str; 6] = [
    alert_kind::RESPECT_DNACPR,
    alert_kind::SAFEGUARDING,
    alert_kind::COMMUNICATION,
    alert_kind::ACCESS,
    alert_kind::END_OF_LIFE,
    alert_kind::CLINICAL,
];

/// The allergy severities (FHIR AllergyIntolerance.reaction.severity).
pub const SEVERITIES: [&str; 3] = ["mild", "moderate", "severe"];

/// Why an entry cannot be recorded (never quoting what was typed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEntry {
    #[error("{0} is required")]
    Missing(&'static str),
    #[error("{field} is too long (at most {max} characters)")]
    TooLong { field: &'static str, max: usize },
    #[error("{field} must be one of: {allowed}")]
    NotOneOf { field: &'static str, allowed: String },
}

/// The longest text field a device records (a summary line, not a letter).
pub const MAX_TEXT: usize = 2_000;

fn required(value: &str, field: &'static str) -> Result<(), InvalidEntry> {
    if value.trim().is_empty() {
        return Err(InvalidEntry::Missing(field));
    }
    optional(Some(value), field)
}

fn optional(value: Option<&str>, field: &'static str) -> Result<(), InvalidEntry> {
    match value {
        Some(v) if v.chars().count() > MAX_TEXT => Err(InvalidEntry::TooLong { field, max: MAX_TEXT }),
        _ => Ok(()),
    }
}

fn one_of(value: &str, field: &'static str, allowed: &[&str]) -> Result<(), InvalidEntry> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(InvalidEntry::NotOneOf { field, allowed: allowed.join(", ") })
    }
}

fn blank_to_none(value: &Option<String>) -> Option<String> {
    value.as_ref().map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
}

impl NewEntry {
    pub fn section(&self) -> Section {
        match self {
            NewEntry::Allergy { .. } => Section::Allergies,
            NewEntry::Problem { .. } => Section::Problems,
            NewEntry::Medication { .. } => Section::Medications,
            NewEntry::Alert { .. } => Section::Alerts,
            NewEntry::CarePlan { .. } => Section::CarePlans,
            NewEntry::Contact { .. } => Section::Contacts,
            NewEntry::Result { .. } => Section::Results,
        }
    }

    /// Checks the fields: required ones present, lengths bounded, coded ones from their lists.
    pub fn check(&self) -> Result<(), InvalidEntry> {
        match self {
            NewEntry::Allergy { substance, reaction, severity } => {
                required(substance, "the substance")?;
                optional(reaction.as_deref(), "the reaction")?;
                if let Some(s) = blank_to_none(severity) {
                    one_of(&s, "the severity", &SEVERITIES)?;
                }
                Ok(())
            }
            NewEntry::Problem { description } => required(description, "the description"),
            NewEntry::Medication { name, dose, route, frequency } => {
                required(name, "the medication's name")?;
                optional(dose.as_deref(), "the dose")?;
                optional(route.as_deref(), "the route")?;
                optional(frequency.as_deref(), "the frequency")
            }
            NewEntry::Alert { kind, description } => {
                one_of(kind.trim(), "the alert kind", &ALERT_KINDS)?;
                required(description, "the description")
            }
            NewEntry::CarePlan { title, description } => {
                required(title, "the title")?;
                optional(description.as_deref(), "the description")
            }
            NewEntry::Contact { name, relationship, phone } => {
                required(name, "the contact's name")?;
                required(relationship, "the relationship")?;
                optional(phone.as_deref(), "the phone number")
            }
            NewEntry::Result { title, value, unit } => {
                required(title, "the title")?;
                optional(value.as_deref(), "the value")?;
                optional(unit.as_deref(), "the unit")
            }
        }
    }

    /// Adds the checked entry to `summary` with `provenance`; returns its id.
    pub(crate) fn add_to(
        &self,
        summary: &mut crate::summary::PatientSummary,
        provenance: Provenance,
    ) -> Result<crate::summary::EntryId, crate::summary::SummaryError> {
        let text = |s: &str| s.trim().to_string();
        match self {
            NewEntry::Allergy { substance, reaction, severity } => {
                let mut a = Allergy::new(&text(substance), provenance);
                a.reaction = blank_to_none(reaction);
                a.severity = blank_to_none(severity);
                summary.add(&a)
            }
            NewEntry::Problem { description } => summary.add(&Problem::new(&text(description), provenance)),
            NewEntry::Medication { name, dose, route, frequency } => {
                let mut m = Medication::new(&text(name), provenance);
                m.dose = blank_to_none(dose);
                m.route = blank_to_none(route);
                m.frequency = blank_to_none(frequency);
                summary.add(&m)
            }
            NewEntry::Alert { kind, description } => {
                summary.add(&Alert::new(kind.trim(), &text(description), provenance))
            }
            NewEntry::CarePlan { title, description } => {
                let mut c = CarePlan::new(&text(title), provenance);
                c.description = blank_to_none(description);
                summary.add(&c)
            }
            NewEntry::Contact { name, relationship, phone } => {
                let mut c = Contact::new(&text(name), &text(relationship), provenance);
                c.phone = blank_to_none(phone);
                summary.add(&c)
            }
            NewEntry::Result { title, value, unit } => {
                let mut r = Report::new("result", &text(title), provenance);
                r.value = blank_to_none(value);
                r.unit = blank_to_none(unit);
                summary.add(&r)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_checked_without_quoting_them() {
        let ok = NewEntry::Alert { kind: "safeguarding".into(), description: "Concern raised".into() };
        assert_eq!(ok.check(), Ok(()));
        let bad_kind = NewEntry::Alert { kind: "gossip".into(), description: "x".into() };
        assert!(matches!(bad_kind.check(), Err(InvalidEntry::NotOneOf { .. })));
        let blank = NewEntry::Problem { description: "   ".into() };
        assert_eq!(blank.check(), Err(InvalidEntry::Missing("the description")));
        let severity =
            NewEntry::Allergy { substance: "Latex".into(), reaction: None, severity: Some("awful".into()) };
        assert!(!severity.check().unwrap_err().to_string().contains("awful"));
        let long =
            NewEntry::Contact { name: "x".repeat(MAX_TEXT + 1), relationship: "carer".into(), phone: None };
        assert!(matches!(long.check(), Err(InvalidEntry::TooLong { .. })));
        assert_eq!(format!("{:?}", NewEntry::Problem { description: "Secret".into() }), "NewEntry::Problems");
    }
}
