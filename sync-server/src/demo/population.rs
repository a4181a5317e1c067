//! A deterministic synthetic population for the demo, tests and benchmarks.
//!
//! Patients of the Wessex region (postcode districts of Hampshire, Dorset and the Isle of Wight)
//! with only NHS numbers from the 999 test range (valid check digits), age-appropriate SNOMED
//! CT-coded conditions, medications (coded at SNOMED substance level), allergies with coded
//! reactions, ReSPECT/DNACPR decisions for some frail elderly people, next of kin, care plans and
//! recent hospital encounters. The same seed always gives the same people; no real person, GP
//! practice or address appears (practice codes start with `Z`, streets are invented).

use automerge::ActorId;
use care_node::nhs::NhsNumber;
use care_node::summary::{
    Alert, Allergy, CarePlan, Code, Contact, Demographics, Encounter, Medication, PatientSummary, Problem,
    Provenance, Section, SummaryError, alert_kind,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const GIVEN_F: &[&str] = &[
    "Ada", "Alice", "Beatrice", "Clara", "Doris", "Edith", "Elsie", "Grace", "Ivy", "Joan", "Mabel",
    "Margaret", "Olive", "Rose", "Sylvia", "Violet", "Priya", "Fatima", "Zofia", "Mia", "Isla", "Amara",
    "Chloe", "Hannah",
];
const GIVEN_M: &[&str] = &[
    "Albert",
    "Arthur",
    "Bernard",
    "Colin",
    "Edward",
    "Frank",
    "Harold",
    "Jack",
    "Leonard",
    "Norman",
    "Percy",
    "Stanley",
    "Thomas",
    "Walter",
    "Amir",
    "Chen",
    "Oluwaseun",
    "Liam",
    "Noah",
    "Tomasz",
    "Rhys",
    "Callum",
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
    "Hart",
    "Moss",
];
/// (district, town) in the Wessex region.
const DISTRICTS: &[(&str, &str)] = &[
    ("SO14", "Southampton"),
    ("SO15", "Southampton"),
    ("SO16", "Southampton"),
    ("SO17", "Southampton"),
    ("SO18", "Southampton"),
    ("SO19", "Southampton"),
    ("SO22", "Winchester"),
    ("SO23", "Winchester"),
    ("SO40", "Totton"),
    ("SO50", "Eastleigh"),
    ("SO53", "Chandler's Ford"),
    ("PO1", "Portsmouth"),
    ("PO2", "Portsmouth"),
    ("PO4", "Southsea"),
    ("PO6", "Cosham"),
    ("PO9", "Havant"),
    ("PO12", "Gosport"),
    ("BH1", "Bournemouth"),
    ("BH7", "Bournemouth"),
    ("BH8", "Bournemouth"),
    ("BH12", "Poole"),
    ("BH23", "Christchurch"),
    ("DT1", "Dorchester"),
    ("DT2", "Dorchester"),
    ("DT4", "Weymouth"),
    ("PO30", "Newport"),
    ("PO33", "Ryde"),
    ("PO36", "Sandown"),
];
const STREETS: &[&str] = &[
    "Synthetic Road",
    "Example Lane",
    "Testing Close",
    "Sample Avenue",
    "Placeholder Way",
    "Fictional Crescent",
];

/// (SNOMED code, display) of conditions of later life.
const CONDITIONS_OLD: &[(&str, &str)] = &[
    ("84114007", "Heart failure"),
    ("49436004", "Atrial fibrillation"),
    ("44054006", "Type 2 diabetes mellitus"),
    ("13645005", "Chronic obstructive lung disease"),
    ("433144002", "Chronic kidney disease stage 3"),
    ("52448006", "Dementia"),
    ("239872002", "Osteoarthritis of hip"),
    ("38341003", "Hypertensive disorder"),
];
const CONDITIONS_YOUNG: &[(&str, &str)] = &[
    ("195967001", "Asthma"),
    ("84757009", "Epilepsy"),
    ("35489007", "Depressive disorder"),
    ("46635009", "Type 1 diabetes mellitus"),
    ("37796009", "Migraine"),
];
/// (SNOMED substance code, name, dose, frequency).
const MEDICATIONS: &[(&str, &str, &str, &str)] = &[
    ("372756006", "Warfarin", "as per INR clinic", "once daily"),
    ("698090000", "Apixaban", "5 mg", "twice daily"),
    ("387475002", "Furosemide", "40 mg", "once daily"),
    ("372567009", "Metformin", "500 mg", "twice daily"),
    ("386872004", "Ramipril", "5 mg", "once daily"),
    ("372897005", "Salbutamol inhaler", "2 puffs", "when required"),
    ("387000003", "Levetiracetam", "500 mg", "twice daily"),
    ("372594008", "Sertraline", "50 mg", "once daily"),
    ("411529005", "Insulin glargine", "20 units", "at night"),
];
/// (substance code, substance, reaction code, reaction, category).
const ALLERGENS: &[(&str, &str, &str, &str, &str)] = &[
    ("764146007", "Penicillin", "39579001", "Anaphylaxis", "medication"),
    ("111088007", "Latex", "126485001", "Urticaria", "environment"),
    ("387494007", "Codeine", "422400008", "Vomiting", "medication"),
    ("762952008", "Peanut", "41291007", "Angioedema", "food"),
    ("387458008", "Aspirin", "271807003", "Skin rash", "medication"),
];
const WARDS: &[&str] = &["Ward 7", "Acute Medical Unit", "Ward F4", "Stroke Unit", "Ward C6"];
const HOSPITALS: &[&str] = &["Wessex General Hospital (synthetic)", "Solent Infirmary (synthetic)"];

/// A population generator with a fixed seed.
pub struct Population {
    rng: StdRng,
    next_stem: u32,
    actor: ActorId,
}

/// Provenance of the synthetic GP record.
fn gp(now_ms: i64, source: String) -> Provenance {
    let mut p = Provenance::new("server", "GP record (synthetic)", "gp-feed", now_ms);
    p.clock_offset_ms = Some(0);
    p.source = Some(source);
    p
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
        let age: i32 = self.rng.random_range(1..100);
        let female = self.rng.random_bool(0.5);
        let given = *self.pick(if female { GIVEN_F } else { GIVEN_M });
        let family = *self.pick(FAMILY);
        let (district, town) = *self.pick(DISTRICTS);
        let practice = self.rng.random_range(1..40);
        let street = *self.pick(STREETS);
        let demographics = Demographics {
            nhs_number: Some(nhs.as_str().to_string()),
            nhs_number_status: Some("number-present-and-verified".into()),
            name: format!("{given} {family}"),
            family: Some(family.into()),
            given: Some(given.into()),
            date_of_birth: Some(format!(
                "{:04}-{:02}-{:02}",
                2026 - age,
                self.rng.random_range(1..=12),
                self.rng.random_range(1..=28)
            )),
            sex: Some(if female { "female" } else { "male" }.into()),
            address_lines: Some(vec![format!("{} {street}", self.rng.random_range(1..200))]),
            city: Some(town.into()),
            postcode: Some(format!(
                "{district} {}{}{}",
                self.rng.random_range(1..10),
                char::from(b'A' + self.rng.random_range(0..26)),
                char::from(b'A' + self.rng.random_range(0..26))
            )),
            gp_practice_code: Some(format!("Z{:05}", 81000 + practice)),
            gp_practice_name: Some(format!("Practice {practice} (synthetic)")),
        };
        let patient_id = uuid::Uuid::from_bytes(self.rng.random());
        let mut summary = PatientSummary::create(patient_id, &demographics, self.actor.clone(), now_ms)?;
        let mut n = 0;
        let mut next_source = |kind: &str| {
            n += 1;
            format!("{kind}/syn-{}-{n}", nhs.as_str())
        };

        let old = age >= 65;
        let conditions = if old { CONDITIONS_OLD } else { CONDITIONS_YOUNG };
        let count = self.rng.random_range(0..=if old { 4 } else { 1 });
        let mut had = Vec::new();
        for _ in 0..count {
            let (code, display) = *self.pick(conditions);
            if had.contains(&code) {
                continue;
            }
            had.push(code);
            let source = next_source("Condition");
            let mut p = Problem::new(display, gp(now_ms, source.clone()));
            p.code = Some(Code::snomed(code, display));
            p.onset = Some(format!("{}-01-01", 2026 - self.rng.random_range(1..=age.max(1))));
            summary.upsert(PatientSummary::source_entry_id(&patient_id, Section::Problems, &source), &p)?;
        }
        if had.is_empty() && self.rng.random_bool(0.5) {
            summary.assert_none_known(Section::Problems, &gp(now_ms, "List/problems".into()))?;
        }

        let meds = self.rng.random_range(0..=if old { 3 } else { 1 });
        let mut taken: Vec<&str> = Vec::new();
        for _ in 0..meds {
            let (code, name, dose, frequency) = *self.pick(MEDICATIONS);
            // No duplicates, and never two anticoagulants.
            let anticoagulant = |n: &str| n == "Warfarin" || n == "Apixaban";
            if taken.contains(&name) || (anticoagulant(name) && taken.iter().any(|t| anticoagulant(t))) {
                continue;
            }
            taken.push(name);
            let source = next_source("MedicationStatement");
            let mut m = Medication::new(name, gp(now_ms, source.clone()));
            m.code = Some(Code::snomed(code, name));
            m.dose = Some(dose.into());
            m.frequency = Some(frequency.into());
            m.route = Some(if name.contains("inhaler") { "inhalation" } else { "oral" }.into());
            m.kind = Some("repeat".into());
            summary
                .upsert(PatientSummary::source_entry_id(&patient_id, Section::Medications, &source), &m)?;
        }
        if meds == 0 && self.rng.random_bool(0.5) {
            summary.assert_none_known(Section::Medications, &gp(now_ms, "List/medications".into()))?;
        }

        if self.rng.random_bool(0.2) {
            let (code, substance, reaction_code, reaction, category) = *self.pick(ALLERGENS);
            let source = next_source("AllergyIntolerance");
            let mut a = Allergy::new(substance, gp(now_ms, source.clone()));
            a.code = Some(Code::snomed(code, substance));
            a.reaction = Some(reaction.into());
            a.reaction_code = Some(Code::snomed(reaction_code, reaction));
            a.severity = Some(if reaction == "Anaphylaxis" { "severe" } else { "moderate" }.into());
            a.criticality = Some(if reaction == "Anaphylaxis" { "high" } else { "low" }.into());
            a.kind = Some("allergy".into());
            a.category = Some(category.into());
            summary.upsert(PatientSummary::source_entry_id(&patient_id, Section::Allergies, &source), &a)?;
        } else if self.rng.random_bool(0.6) {
            summary.assert_none_known(Section::Allergies, &gp(now_ms, "List/allergies".into()))?;
        }

        if age >= 80 && self.rng.random_bool(0.3) {
            let source = next_source("Consent");
            let mut alert = Alert::new(
                alert_kind::RESPECT_DNACPR,
                "ReSPECT: do not attempt cardiopulmonary resuscitation; ward-based care",
                gp(now_ms, source.clone()),
            );
            alert.code = Some(Code::snomed("304253006", "Not for resuscitation"));
            alert.decision_date = Some(format!(
                "2026-{:02}-{:02}",
                self.rng.random_range(1..=10),
                self.rng.random_range(1..=28)
            ));
            alert.author = Some(format!("Dr {} (synthetic)", self.pick(FAMILY)));
            alert.review_date = Some("2027-06-01".into());
            summary.upsert(PatientSummary::source_entry_id(&patient_id, Section::Alerts, &source), &alert)?;
        }
        if self.rng.random_bool(0.03) {
            let source = next_source("Flag");
            let alert = Alert::new(
                alert_kind::SAFEGUARDING,
                "Safeguarding concern: contact the safeguarding team",
                gp(now_ms, source.clone()),
            );
            summary.upsert(PatientSummary::source_entry_id(&patient_id, Section::Alerts, &source), &alert)?;
        }
        if old && self.rng.random_bool(0.15) {
            let source = next_source("Flag");
            let alert = Alert::new(
                alert_kind::ACCESS,
                "Key safe by the front door; code held by the community team",
                gp(now_ms, source.clone()),
            );
            summary.upsert(PatientSummary::source_entry_id(&patient_id, Section::Alerts, &source), &alert)?;
        }

        if old && self.rng.random_bool(0.6) {
            let source = next_source("RelatedPerson");
            let kin = format!("{} {family}", self.pick(GIVEN_F));
            let mut c = Contact::new(&kin, "next-of-kin", gp(now_ms, source.clone()));
            c.phone = Some(format!("07700 900{:03}", self.rng.random_range(0..1000)));
            summary.upsert(PatientSummary::source_entry_id(&patient_id, Section::Contacts, &source), &c)?;
        }
        if had.contains(&"84114007") || had.contains(&"52448006") {
            let source = next_source("CarePlan");
            let mut plan = CarePlan::new("Community nursing care plan", gp(now_ms, source.clone()));
            plan.description = Some("Weekly review of weight, fluid status and skin integrity".into());
            plan.period_start = Some("2026-09-01".into());
            summary
                .upsert(PatientSummary::source_entry_id(&patient_id, Section::CarePlans, &source), &plan)?;
        }
        if old && self.rng.random_bool(0.1) {
            let source = next_source("Encounter");
            let mut e = Encounter::new("admission", "finished", gp(now_ms, source.clone()));
            e.class = Some("inpatient".into());
            e.location = Some((*self.pick(WARDS)).into());
            e.facility = Some((*self.pick(HOSPITALS)).into());
            e.start = Some("2026-10-02T14:10:00Z".into());
            e.end = Some("2026-10-09T11:00:00Z".into());
            summary.upsert(PatientSummary::source_entry_id(&patient_id, Section::Encounters, &source), &e)?;
        }
        Ok(summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listing_read_agrees_with_the_hydrated_demographics() {
        let mut population = Population::new(11, ActorId::from(&[1u8; 16][..]));
        for _ in 0..300 {
            let summary = population.next_patient(0).unwrap();
            let (listing, d) = (summary.listing().unwrap(), summary.demographics().unwrap());
            assert_eq!(
                (listing.nhs_number, listing.name, listing.date_of_birth, listing.postcode),
                (d.nhs_number, d.name, d.date_of_birth, d.postcode)
            );
        }
        // A provisional record: no NHS number, nothing but a name.
        let provisional = care_node::summary::PatientSummary::create(
            uuid::Uuid::from_u128(9),
            &care_node::summary::Demographics::new("Unknown Male", None),
            ActorId::from(&[1u8; 16][..]),
            0,
        )
        .unwrap();
        let listing = provisional.listing().unwrap();
        assert_eq!(
            (listing.nhs_number, listing.name.as_str(), listing.postcode),
            (None, "Unknown Male", None)
        );
    }

    #[test]
    fn the_same_seed_gives_the_same_people_with_test_range_numbers() {
        let mut a = Population::new(7, ActorId::from(&[1u8; 16][..]));
        let mut b = Population::new(7, ActorId::from(&[1u8; 16][..]));
        let mut coded = 0;
        for _ in 0..200 {
            let mut pa = a.next_patient(0).unwrap();
            let pb = b.next_patient(0).unwrap();
            assert_eq!(pa.demographics().unwrap(), pb.demographics().unwrap());
            assert!(pa.nhs_number().unwrap().is_test_range());
            coded += pa.entries::<Problem>().unwrap().iter().filter(|p| p.data.code.is_some()).count();
        }
        assert!(coded > 20, "conditions are SNOMED-coded");
    }
}
