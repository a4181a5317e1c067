//! A deterministic synthetic population for the demo, tests and benchmarks.
//!
//! Patients live in postcode districts of Hampshire, Dorset and the Isle of Wight, carry only NHS
//! numbers from the 999 test range (with valid check digits), and get age-appropriate problems,
//! medications, allergies and, for some frail elderly people, a ReSPECT/DNACPR alert. The same
//! seed always gives the same people. No real person appears.

use automerge::ActorId;
use care_node::nhs::NhsNumber;
use care_node::summary::{
    Alert, Allergy, CONFIRMED, Demographics, Medication, PatientSummary, Problem, Provenance, SummaryError,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const GIVEN: &[&str] = &[
    "Ada",
    "Albert",
    "Alice",
    "Arthur",
    "Beatrice",
    "Bernard",
    "Clara",
    "Colin",
    "Doris",
    "Edith",
    "Edward",
    "Elsie",
    "Frank",
    "Grace",
    "Harold",
    "Ivy",
    "Jack",
    "Joan",
    "Leonard",
    "Mabel",
    "Margaret",
    "Norman",
    "Olive",
    "Percy",
    "Rose",
    "Stanley",
    "Sylvia",
    "Thomas",
    "Violet",
    "Walter",
    "Amir",
    "Priya",
    "Chen",
    "Fatima",
    "Oluwaseun",
    "Zofia",
    "Liam",
    "Mia",
    "Noah",
    "Isla",
];
const FAMILY: &[&str] = &[
    "Abbott",
    "Barker",
    "Carter",
    "Dawson",
    "Ellis",
    "Fletcher",
    "Gibson",
    "Hughes",
    "Ingram",
    "Jennings",
    "Kaur",
    "Lambert",
    "Mason",
    "Newman",
    "Osborne",
    "Patel",
    "Quinn",
    "Reid",
    "Shaw",
    "Turner",
    "Underwood",
    "Vaughan",
    "Walsh",
    "Young",
    "Nowak",
    "Okafor",
    "Singh",
    "Wong",
];
/// Postcode districts of the Wessex region: Southampton, Portsmouth, Winchester, Bournemouth,
/// Dorchester and the Isle of Wight.
const DISTRICTS: &[&str] = &[
    "SO14", "SO15", "SO16", "SO17", "SO18", "SO19", "SO22", "SO23", "SO40", "SO50", "SO53", "PO1", "PO2",
    "PO4", "PO6", "PO9", "PO12", "BH1", "BH7", "BH8", "BH12", "BH23", "DT1", "DT2", "DT4", "PO30", "PO33",
    "PO36",
];
const PROBLEMS_OLD: &[&str] = &[
    "Heart failure",
    "Atrial fibrillation",
    "Type 2 diabetes mellitus",
    "COPD",
    "Chronic kidney disease stage 3",
    "Dementia",
    "Osteoarthritis of hip",
    "Hypertension",
];
const PROBLEMS_YOUNG: &[&str] = &["Asthma", "Epilepsy", "Depression", "Type 1 diabetes mellitus", "Migraine"];
const MEDICATIONS: &[(&str, &str)] = &[
    ("Warfarin", "as per INR clinic"),
    ("Apixaban", "5 mg twice daily"),
    ("Furosemide", "40 mg once daily"),
    ("Metformin", "500 mg twice daily"),
    ("Ramipril", "5 mg once daily"),
    ("Salbutamol inhaler", "2 puffs as needed"),
    ("Levetiracetam", "500 mg twice daily"),
    ("Sertraline", "50 mg once daily"),
    ("Insulin glargine", "20 units at night"),
];
const ALLERGENS: &[(&str, &str)] = &[
    ("Penicillin", "anaphylaxis"),
    ("Latex", "urticaria"),
    ("Codeine", "vomiting"),
    ("Peanut", "angioedema"),
    ("Trimethoprim", "rash"),
];

/// A population generator with a fixed seed.
pub struct Population {
    rng: StdRng,
    next_stem: u32,
    actor: ActorId,
}

impl Population {
    pub fn new(seed: u64, actor: ActorId) -> Self {
        Self { rng: StdRng::seed_from_u64(seed), next_stem: 999_000_001, actor }
    }

    fn next_nhs(&mut self) -> NhsNumber {
        loop {
            let stem = self.next_stem;
            self.next_stem += 1;
            if let Some(n) = NhsNumber::from_stem(stem) {
                return n;
            }
        }
    }

    fn pick<'a, T>(&mut self, list: &'a [T]) -> &'a T {
        &list[self.rng.random_range(0..list.len())]
    }

    /// The next patient's summary, created as the server would create it.
    pub fn next_patient(&mut self, now_ms: i64) -> Result<PatientSummary, SummaryError> {
        let nhs = self.next_nhs();
        let age = self.rng.random_range(1..100);
        let birth_year = 2026 - age;
        let demographics = Demographics {
            nhs_number: nhs.as_str().to_string(),
            name: format!("{} {}", self.pick(GIVEN), self.pick(FAMILY)),
            date_of_birth: format!(
                "{birth_year:04}-{:02}-{:02}",
                self.rng.random_range(1..=12),
                self.rng.random_range(1..=28)
            ),
            postcode: format!(
                "{} {}{}{}",
                self.pick(DISTRICTS),
                self.rng.random_range(1..10),
                char::from(b'A' + self.rng.random_range(0..26)),
                char::from(b'A' + self.rng.random_range(0..26))
            ),
        };
        let mut summary = PatientSummary::create(
            uuid::Uuid::from_bytes(self.rng.random()),
            &demographics,
            self.actor.clone(),
            now_ms,
        )?;
        let provenance = Provenance {
            device: "server".into(),
            device_name: "GP record (synthetic)".into(),
            role: "gp-feed".into(),
            recorded_at_ms: now_ms,
        };
        let problems = if age >= 65 { PROBLEMS_OLD } else { PROBLEMS_YOUNG };
        for _ in 0..self.rng.random_range(0..=if age >= 65 { 4 } else { 1 }) {
            let description = self.pick(problems).to_string();
            summary.add(&Problem {
                description,
                clinical_status: "active".into(),
                verification_status: CONFIRMED.into(),
                provenance: provenance.clone(),
            })?;
        }
        for _ in 0..self.rng.random_range(0..=if age >= 65 { 3 } else { 1 }) {
            let (name, dose) = *self.pick(MEDICATIONS);
            summary.add(&Medication {
                name: name.into(),
                dose: Some(dose.into()),
                status: "active".into(),
                verification_status: CONFIRMED.into(),
                provenance: provenance.clone(),
            })?;
        }
        if self.rng.random_bool(0.2) {
            let (substance, reaction) = *self.pick(ALLERGENS);
            summary.add(&Allergy {
                substance: substance.into(),
                reaction: Some(reaction.into()),
                severity: Some("severe".into()),
                verification_status: CONFIRMED.into(),
                provenance: provenance.clone(),
            })?;
        }
        if age >= 80 && self.rng.random_bool(0.3) {
            summary.add(&Alert {
                kind: "respect-dnacpr".into(),
                description: "ReSPECT form: do not attempt CPR; for ward-based care".into(),
                verification_status: CONFIRMED.into(),
                provenance: provenance.clone(),
            })?;
        }
        Ok(summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_people_with_test_range_numbers() {
        let mut a = Population::new(7, ActorId::from(&[1u8; 16][..]));
        let mut b = Population::new(7, ActorId::from(&[1u8; 16][..]));
        for _ in 0..50 {
            let pa = a.next_patient(0).unwrap();
            let pb = b.next_patient(0).unwrap();
            assert_eq!(pa.demographics().unwrap(), pb.demographics().unwrap());
            assert!(pa.nhs_number().unwrap().is_test_range());
        }
    }
}
