//! A deterministic synthetic population for the demo, tests and benchmarks.
//! Over 600 lines with its tests (about 120): one builder per part of a summary.
//!
//! Patients of the Wessex region (postcode districts of Hampshire, Dorset and the Isle of Wight)
//! with only NHS numbers from the 999 test range (valid check digits), postcodes in the UK format
//! (inward code: a digit and two of the letters postcodes use), SNOMED CT-coded conditions recorded
//! at the ages they occur, medications (coded at SNOMED substance level) each prescribed for one
//! of the patient's conditions ([`CONDITIONS`]), allergies with coded substances and reactions, ReSPECT/DNACPR decisions for some frail elderly people, next of kin, care plans and
//! recent hospital encounters. The same seed always gives the same people; no real person, GP
//! practice or address appears (practice codes start with `Z`, streets are invented).

use automerge::ActorId;
use care_node::nhs::NhsNumber;
use care_node::summary::{
    Alert, Allergy, CarePlan, Code, Contact, Demographics, Encounter, Medication, PatientId, PatientSummary,
    Problem, Provenance, Report, Section, SectionEntry, SummaryError, alert_kind,
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

/// A medication as a GP record lists it: SNOMED CT substance code, name, dose, frequency, route.
#[derive(Debug, Clone, Copy)]
pub struct Drug {
    pub code: &'static str,
    pub name: &'static str,
    pub dose: &'static str,
    pub frequency: &'static str,
    pub route: &'static str,
}

const fn drug(
    code: &'static str,
    name: &'static str,
    dose: &'static str,
    frequency: &'static str,
    route: &'static str,
) -> Drug {
    Drug { code, name, dose, frequency, route }
}

const FUROSEMIDE: Drug = drug("387475002", "Furosemide", "40 mg", "once daily", "oral");
const RAMIPRIL: Drug = drug("386872004", "Ramipril", "2.5 mg", "once daily", "oral");
const BISOPROLOL: Drug = drug("386868003", "Bisoprolol", "2.5 mg", "once daily", "oral");
const APIXABAN: Drug = drug("698090000", "Apixaban", "5 mg", "twice daily", "oral");
const WARFARIN: Drug = drug("372756006", "Warfarin", "as per INR clinic", "once daily", "oral");
const METFORMIN: Drug = drug("372567009", "Metformin", "500 mg", "twice daily", "oral");
const SALBUTAMOL: Drug = drug("372897005", "Salbutamol inhaler", "2 puffs", "when required", "inhalation");
const PARACETAMOL: Drug =
    drug("387517004", "Paracetamol", "1 g", "up to four times daily when required", "oral");
const AMLODIPINE: Drug = drug("386864001", "Amlodipine", "5 mg", "once daily", "oral");
const LEVETIRACETAM: Drug = drug("387000003", "Levetiracetam", "500 mg", "twice daily", "oral");
const SERTRALINE: Drug = drug("372594008", "Sertraline", "50 mg", "once daily", "oral");
const INSULIN_GLARGINE: Drug = drug("411529005", "Insulin glargine", "20 units", "at night", "subcutaneous");

/// A condition a GP record holds: SNOMED CT code and display, the ages it is recorded at, and
/// what is prescribed for it (`one_of`: one of these, e.g. one anticoagulant; otherwise each).
pub struct Condition {
    pub code: &'static str,
    pub display: &'static str,
    pub min_age: i32,
    pub drugs: &'static [Drug],
    pub one_of: bool,
}

const fn condition(
    code: &'static str,
    display: &'static str,
    min_age: i32,
    drugs: &'static [Drug],
    one_of: bool,
) -> Condition {
    Condition { code, display, min_age, drugs, one_of }
}

/// The conditions of the synthetic records, each with its usual treatment.
pub const CONDITIONS: &[Condition] = &[
    condition("84114007", "Heart failure", 65, &[FUROSEMIDE, RAMIPRIL, BISOPROLOL], false),
    condition("49436004", "Atrial fibrillation", 60, &[APIXABAN, APIXABAN, APIXABAN, WARFARIN], true),
    condition("44054006", "Type 2 diabetes mellitus", 40, &[METFORMIN], false),
    condition("13645005", "Chronic obstructive lung disease", 50, &[SALBUTAMOL], false),
    condition("433144002", "Chronic kidney disease stage 3", 60, &[], false),
    condition("52448006", "Dementia", 70, &[], false),
    condition("239872002", "Osteoarthritis of hip", 55, &[PARACETAMOL], false),
    condition("38341003", "Hypertensive disorder", 40, &[AMLODIPINE], false),
    condition("195967001", "Asthma", 3, &[SALBUTAMOL], false),
    condition("84757009", "Epilepsy", 2, &[LEVETIRACETAM], false),
    condition("35489007", "Depressive disorder", 18, &[SERTRALINE], false),
    condition("46635009", "Type 1 diabetes mellitus", 2, &[INSULIN_GLARGINE], false),
    condition("37796009", "Migraine", 12, &[], false),
];

/// The conditions a medication (by SNOMED CT code) is prescribed for in the synthetic records.
pub fn indications(drug_code: &str) -> Vec<&'static str> {
    CONDITIONS.iter().filter(|c| c.drugs.iter().any(|d| d.code == drug_code)).map(|c| c.code).collect()
}

/// The letters of a postcode's inward code (the last two): not C, I, K, M, O or V.
pub const INWARD_LETTERS: &[u8] = b"ABDEFGHJLNPQRSTUWXYZ";

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

/// The first NHS number stem of the synthetic population (the 999 test range).
pub const FIRST_STEM: u32 = 999_000_001;

/// The first stem after the synthetic numbers a store already holds (`exists` tells), found
/// by galloping and bisection over the stems, which generators hand out in order.
pub fn first_free_stem(exists: impl Fn(&NhsNumber) -> bool) -> u32 {
    // Whether the valid number at or after `stem` is taken.
    let taken =
        |stem: u32| (stem..stem.saturating_add(2)).find_map(NhsNumber::from_stem).is_some_and(|n| exists(&n));
    if !taken(FIRST_STEM) {
        return FIRST_STEM;
    }
    let (mut low, mut step) = (FIRST_STEM, 1u32);
    while taken(low.saturating_add(step)) && step < 1 << 30 {
        low = low.saturating_add(step);
        step *= 2;
    }
    let mut high = low.saturating_add(step).min(999_999_999);
    while high - low > 1 {
        let mid = low + (high - low) / 2;
        if taken(mid) { low = mid } else { high = mid }
    }
    high
}

/// How full each generated record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Records {
    /// A handful of coded entries per patient (about 1.2 KB saved): the population of every
    /// figure before session 12.
    #[default]
    Synthetic,
    /// Closer to a real summary (issue 18): at least 15 entries and 20 hospital events each,
    /// and one record in 200 with a history of 500 changes (a result amended again and again).
    Realistic,
}

/// A population generator with a fixed seed.
pub struct Population {
    rng: StdRng,
    next_stem: u32,
    actor: ActorId,
    records: Records,
    /// Draws for what a realistic record adds, apart from `rng`: the same seed gives the same
    /// people whatever the records.
    detail: StdRng,
    /// Patients made so far.
    made: u64,
    /// False for records of people not (yet) identified: no NHS number ([`Population::unidentified`]).
    identified: bool,
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
        Self::seeded(seed, actor, FIRST_STEM)
    }

    /// The same people, with records as full as `records` says.
    pub fn with_records(mut self, records: Records) -> Self {
        self.records = records;
        self
    }

    /// A population whose NHS numbers start at `first_stem` (see [`first_free_stem`]), with
    /// people of their own (the seed is mixed with the stem), to add to an existing store.
    pub fn starting_at(seed: u64, actor: ActorId, first_stem: u32) -> Self {
        let mixed = seed ^ u64::from(first_stem.wrapping_sub(FIRST_STEM)).rotate_left(32);
        Self::seeded(mixed, actor, first_stem)
    }

    fn seeded(seed: u64, actor: ActorId, first_stem: u32) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            next_stem: first_stem,
            actor,
            records: Records::Synthetic,
            detail: StdRng::seed_from_u64(seed ^ 0x5eed_de7a),
            made: 0,
            identified: true,
        }
    }

    /// People whose records carry no NHS number (as an unidentified patient's do until they
    /// are traced): for stores larger than the test range's numbers (999 000 0000 to 999 999
    /// 9999, about 909,000 valid), and takes none of them.
    pub fn unidentified(mut self) -> Self {
        self.identified = false;
        self
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
        let nhs = self.identified.then(|| self.next_nhs());
        let age: i32 = self.rng.random_range(1..100);
        let female = self.rng.random_bool(0.5);
        let given = *self.pick(if female { GIVEN_F } else { GIVEN_M });
        let family = *self.pick(FAMILY);
        let demographics = self.demographics(nhs.as_ref(), age, female, given, family);
        let patient_id = uuid::Uuid::from_bytes(self.rng.random());
        let summary = PatientSummary::create(patient_id, &demographics, self.actor.clone(), now_ms)?;
        let label = match &nhs {
            Some(nhs) => nhs.as_str().to_string(),
            None => format!("u{}", patient_id.simple()),
        };
        let mut draft = Draft { summary, patient_id, label, added: 0, now_ms };

        let had = self.add_conditions(&mut draft, age)?;
        self.add_medications(&mut draft, &had, age)?;
        self.add_allergy(&mut draft)?;
        self.add_alerts(&mut draft, age)?;
        self.add_support(&mut draft, age, family, &had)?;
        self.add_history(&mut draft, age)?;
        if self.records == Records::Realistic {
            self.add_realistic(&mut draft)?;
        }
        self.made += 1;
        Ok(draft.summary)
    }

    /// The rest of the person: birth date, address and GP practice.
    fn demographics(
        &mut self,
        nhs: Option<&NhsNumber>,
        age: i32,
        female: bool,
        given: &str,
        family: &str,
    ) -> Demographics {
        let (district, town) = *self.pick(DISTRICTS);
        let practice = self.rng.random_range(1..40);
        let street = *self.pick(STREETS);
        Demographics {
            nhs_number: nhs.map(|n| n.as_str().to_string()),
            nhs_number_status: nhs.map(|_| "number-present-and-verified".into()),
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
                self.rng.random_range(0..10),
                char::from(*self.pick(INWARD_LETTERS)),
                char::from(*self.pick(INWARD_LETTERS))
            )),
            gp_practice_code: Some(format!("Z{:05}", 81000 + practice)),
            gp_practice_name: Some(format!("Practice {practice} (synthetic)")),
        }
    }

    /// Conditions usual at this age: frail older people always have some; a GP record that
    /// lists none says so ("none known") more often than not.
    fn add_conditions(
        &mut self,
        draft: &mut Draft,
        age: i32,
    ) -> Result<Vec<&'static Condition>, SummaryError> {
        let count = match age {
            65.. => self.rng.random_range(1..=4),
            40..=64 => self.rng.random_range(0..=2),
            _ => self.rng.random_range(0..=1),
        };
        let possible: Vec<&'static Condition> = CONDITIONS.iter().filter(|c| c.min_age <= age).collect();
        let mut had: Vec<&'static Condition> = Vec::new();
        for _ in 0..if possible.is_empty() { 0 } else { count } {
            let c = possible[self.rng.random_range(0..possible.len())];
            if had.iter().any(|h| h.code == c.code) {
                continue;
            }
            had.push(c);
            let source = draft.next_source("Condition");
            let mut p = Problem::new(c.display, gp(draft.now_ms, source.clone()));
            p.code = Some(Code::snomed(c.code, c.display));
            let since = self.rng.random_range(0..=(age - c.min_age).max(0));
            p.onset = Some(format!("{}-01-01", 2026 - since));
            draft.upsert(Section::Problems, &source, &p)?;
        }
        if had.is_empty() && self.rng.random_bool(0.8) {
            draft.none_known(Section::Problems, "List/problems")?;
        }
        Ok(had)
    }

    /// Each medication is prescribed for one of the recorded conditions.
    fn add_medications(
        &mut self,
        draft: &mut Draft,
        had: &[&Condition],
        age: i32,
    ) -> Result<(), SummaryError> {
        let mut taken: Vec<&str> = Vec::new();
        for c in had {
            let drugs: Vec<Drug> =
                if c.one_of && !c.drugs.is_empty() { vec![*self.pick(c.drugs)] } else { c.drugs.to_vec() };
            for d in drugs {
                if taken.contains(&d.name) || !self.rng.random_bool(0.9) {
                    continue;
                }
                taken.push(d.name);
                let source = draft.next_source("MedicationStatement");
                let mut m = Medication::new(d.name, gp(draft.now_ms, source.clone()));
                m.code = Some(Code::snomed(d.code, d.name));
                m.dose = Some(
                    if age < 16 { "as advised by the specialist team (weight-based)" } else { d.dose }.into(),
                );
                m.frequency = Some(d.frequency.into());
                m.route = Some(d.route.into());
                m.kind = Some("repeat".into());
                draft.upsert(Section::Medications, &source, &m)?;
            }
        }
        if taken.is_empty() && self.rng.random_bool(0.8) {
            draft.none_known(Section::Medications, "List/medications")?;
        }
        Ok(())
    }

    /// One in five has an allergy; most of the others' records say "none known".
    fn add_allergy(&mut self, draft: &mut Draft) -> Result<(), SummaryError> {
        if self.rng.random_bool(0.2) {
            let (code, substance, reaction_code, reaction, category) = *self.pick(ALLERGENS);
            let source = draft.next_source("AllergyIntolerance");
            let mut a = Allergy::new(substance, gp(draft.now_ms, source.clone()));
            a.code = Some(Code::snomed(code, substance));
            a.reaction = Some(reaction.into());
            a.reaction_code = Some(Code::snomed(reaction_code, reaction));
            a.severity = Some(if reaction == "Anaphylaxis" { "severe" } else { "moderate" }.into());
            a.criticality = Some(if reaction == "Anaphylaxis" { "high" } else { "low" }.into());
            a.kind = Some("allergy".into());
            a.category = Some(category.into());
            draft.upsert(Section::Allergies, &source, &a)?;
        } else if self.rng.random_bool(0.6) {
            draft.none_known(Section::Allergies, "List/allergies")?;
        }
        Ok(())
    }

    /// ReSPECT/DNACPR decisions for some of the very old, safeguarding and access alerts.
    fn add_alerts(&mut self, draft: &mut Draft, age: i32) -> Result<(), SummaryError> {
        let old = age >= 65;
        if age >= 80 && self.rng.random_bool(0.3) {
            let source = draft.next_source("Consent");
            let mut alert = Alert::new(
                alert_kind::RESPECT_DNACPR,
                "ReSPECT: do not attempt cardiopulmonary resuscitation; ward-based care",
                gp(draft.now_ms, source.clone()),
            );
            alert.code = Some(Code::snomed("304253006", "Not for resuscitation"));
            alert.decision_date = Some(format!(
                "2026-{:02}-{:02}",
                self.rng.random_range(1..=10),
                self.rng.random_range(1..=28)
            ));
            alert.author = Some(format!("Dr {} (synthetic)", self.pick(FAMILY)));
            alert.review_date = Some("2027-06-01".into());
            draft.upsert(Section::Alerts, &source, &alert)?;
        }
        if self.rng.random_bool(0.03) {
            let source = draft.next_source("Flag");
            let alert = Alert::new(
                alert_kind::SAFEGUARDING,
                "Safeguarding concern: contact the safeguarding team",
                gp(draft.now_ms, source.clone()),
            );
            draft.upsert(Section::Alerts, &source, &alert)?;
        }
        if old && self.rng.random_bool(0.15) {
            let source = draft.next_source("Flag");
            let alert = Alert::new(
                alert_kind::ACCESS,
                "Key safe by the front door; code held by the community team",
                gp(draft.now_ms, source.clone()),
            );
            draft.upsert(Section::Alerts, &source, &alert)?;
        }
        Ok(())
    }

    /// Next of kin for most older people; a community nursing plan for heart failure or dementia.
    fn add_support(
        &mut self,
        draft: &mut Draft,
        age: i32,
        family: &str,
        had: &[&Condition],
    ) -> Result<(), SummaryError> {
        let old = age >= 65;
        if old && self.rng.random_bool(0.6) {
            let source = draft.next_source("RelatedPerson");
            let kin = format!("{} {family}", self.pick(GIVEN_F));
            let mut c = Contact::new(&kin, "next-of-kin", gp(draft.now_ms, source.clone()));
            c.phone = Some(format!("07700 900{:03}", self.rng.random_range(0..1000)));
            draft.upsert(Section::Contacts, &source, &c)?;
        }
        if had.iter().any(|c| c.code == "84114007" || c.code == "52448006") {
            let source = draft.next_source("CarePlan");
            let mut plan = CarePlan::new("Community nursing care plan", gp(draft.now_ms, source.clone()));
            plan.description = Some("Weekly review of weight, fluid status and skin integrity".into());
            plan.period_start = Some("2026-09-01".into());
            draft.upsert(Section::CarePlans, &source, &plan)?;
        }
        Ok(())
    }

    /// A recent hospital stay for some older people.
    fn add_history(&mut self, draft: &mut Draft, age: i32) -> Result<(), SummaryError> {
        let old = age >= 65;
        if old && self.rng.random_bool(0.1) {
            let source = draft.next_source("Encounter");
            let mut e = Encounter::new("admission", "finished", gp(draft.now_ms, source.clone()));
            e.class = Some("inpatient".into());
            e.location = Some((*self.pick(WARDS)).into());
            e.facility = Some((*self.pick(HOSPITALS)).into());
            e.start = Some("2026-10-02T14:10:00Z".into());
            e.end = Some("2026-10-09T11:00:00Z".into());
            draft.upsert(Section::Encounters, &source, &e)?;
        }
        Ok(())
    }
}

impl Population {
    /// What makes a record realistic: past problems, results and letters (at least 15 entries
    /// with the synthetic ones), 20 hospital events over the last years, and for one patient in
    /// 200 a result amended 500 times, each its own change.
    fn add_realistic(&mut self, draft: &mut Draft) -> Result<(), SummaryError> {
        let rng = &mut self.detail;
        const PAST: &[&str] = &[
            "Fractured wrist",
            "Appendicitis",
            "Pneumonia",
            "Cellulitis of leg",
            "Urinary tract infection",
            "Gout",
        ];
        for description in PAST {
            let source = draft.next_source("Condition");
            let mut p = Problem::new(description, gp(draft.now_ms, source.clone()));
            p.clinical_status = "resolved".into();
            p.onset = Some(format!(
                "20{:02}-0{}-1{}",
                rng.random_range(5..25),
                rng.random_range(1..10),
                rng.random_range(0..10)
            ));
            draft.upsert(Section::Problems, &source, &p)?;
        }
        const RESULTS: &[(&str, &str)] = &[
            ("Haemoglobin", "g/L"),
            ("Serum sodium", "mmol/L"),
            ("Serum potassium", "mmol/L"),
            ("eGFR", "mL/min/1.73m2"),
            ("HbA1c", "mmol/mol"),
            ("C-reactive protein", "mg/L"),
            ("White cell count", "10*9/L"),
            ("Platelet count", "10*9/L"),
        ];
        for (title, unit) in RESULTS {
            let source = draft.next_source("Observation");
            let mut r = Report::new("result", title, gp(draft.now_ms, source.clone()));
            r.value = Some(rng.random_range(3..150).to_string());
            r.unit = Some((*unit).into());
            r.effective = Some(format!("2026-0{}-1{}", rng.random_range(1..10), rng.random_range(0..10)));
            draft.upsert(Section::Results, &source, &r)?;
        }
        for title in ["Discharge summary", "Outpatient clinic letter"] {
            let source = draft.next_source("DocumentReference");
            let r = Report::new("letter", title, gp(draft.now_ms, source.clone()));
            draft.upsert(Section::Results, &source, &r)?;
        }
        const EVENTS: &[(&str, &str)] =
            &[("attendance", "emergency"), ("outpatient", "ambulatory"), ("admission", "inpatient")];
        for i in 0..20 {
            let source = draft.next_source("Encounter");
            let (kind, class) = EVENTS[rng.random_range(0..EVENTS.len())];
            let mut e = Encounter::new(kind, "finished", gp(draft.now_ms, source.clone()));
            e.class = Some(class.into());
            e.facility = Some(HOSPITALS[rng.random_range(0..HOSPITALS.len())].into());
            if kind == "admission" {
                e.location = Some(WARDS[rng.random_range(0..WARDS.len())].into());
            }
            let (year, month) = (2026 - i / 4, 1 + (i * 5) % 12);
            e.start = Some(format!("{year}-{month:02}-0{}T09:30:00Z", 1 + i % 9));
            e.end = Some(format!("{year}-{month:02}-0{}T16:00:00Z", 1 + i % 9));
            draft.upsert(Section::Encounters, &source, &e)?;
        }
        if self.made.is_multiple_of(200) {
            let source = draft.next_source("Observation");
            for k in 0..500 {
                let mut r =
                    Report::new("result", "Capillary blood glucose", gp(draft.now_ms + k, source.clone()));
                r.value = Some(format!("{}.{}", 4 + k % 9, k % 10));
                r.unit = Some("mmol/L".into());
                r.effective = Some(format!("2026-11-{:02}T{:02}:00:00Z", 1 + k / 24 % 28, k % 24));
                draft.upsert(Section::Results, &source, &r)?;
            }
        }
        Ok(())
    }
}

/// A patient's record while it is generated. Its entries' source ids
/// (`Condition/syn-<nhs>-<n>`) are numbered in the order they are added.
struct Draft {
    summary: PatientSummary,
    patient_id: PatientId,
    /// What the record's source ids are made of: the NHS number, or the record's id.
    label: String,
    added: u32,
    now_ms: i64,
}

impl Draft {
    fn next_source(&mut self, kind: &str) -> String {
        self.added += 1;
        format!("{kind}/syn-{}-{}", self.label, self.added)
    }

    fn upsert<T: SectionEntry>(
        &mut self,
        section: Section,
        source: &str,
        entry: &T,
    ) -> Result<(), SummaryError> {
        self.summary.upsert(PatientSummary::source_entry_id(&self.patient_id, section, source), entry)?;
        Ok(())
    }

    fn none_known(&mut self, section: Section, list: &str) -> Result<(), SummaryError> {
        self.summary.assert_none_known(section, &gp(self.now_ms, list.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn realistic_records_have_15_entries_20_hospital_events_and_some_a_history_of_500_changes() {
        let actor = ActorId::from(&[1u8; 16][..]);
        let mut realistic = Population::new(5, actor.clone()).with_records(Records::Realistic);
        let mut synthetic = Population::new(5, actor);
        for i in 0..40 {
            let mut r = realistic.next_patient(0).unwrap();
            let mut s = synthetic.next_patient(0).unwrap();
            assert_eq!(r.listing().unwrap(), s.listing().unwrap(), "the same people");
            let (entries, events) = (r.entry_lines().unwrap().len(), r.entries::<Encounter>().unwrap().len());
            assert!(events >= 20, "patient {i}: {events} hospital events");
            assert!(entries - events >= 15, "patient {i}: {} entries besides them", entries - events);
            let changes = r.changes_since(&[]).len();
            if i % 200 == 0 {
                assert!(changes > 500, "patient {i}: a long history ({changes} changes)");
            } else {
                assert!(changes < 100, "patient {i}: {changes} changes");
                assert!(s.changes_since(&[]).len() < changes);
            }
        }
    }

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

    /// The UK postcode format: an outward code of the listed districts, a space, a digit and two
    /// letters of [`INWARD_LETTERS`].
    fn is_uk_postcode(postcode: &str) -> bool {
        let Some((outward, inward)) = postcode.split_once(' ') else { return false };
        let inward = inward.as_bytes();
        DISTRICTS.iter().any(|(d, _)| *d == outward)
            && inward.len() == 3
            && inward[0].is_ascii_digit()
            && INWARD_LETTERS.contains(&inward[1])
            && INWARD_LETTERS.contains(&inward[2])
    }

    #[test]
    fn records_are_believable_postcodes_valid_and_every_medication_has_its_indication() {
        let mut population = Population::new(3, ActorId::from(&[1u8; 16][..]));
        let (mut medications, mut dnacpr) = (0, 0);
        for _ in 0..2_000 {
            let mut p = population.next_patient(0).unwrap();
            let d = p.demographics().unwrap();
            let postcode = d.postcode.clone().unwrap();
            assert!(is_uk_postcode(&postcode), "{postcode}");
            let age = 2026 - d.date_of_birth.unwrap()[..4].parse::<i32>().unwrap();
            let problems: Vec<String> =
                p.entries::<Problem>().unwrap().into_iter().map(|e| e.data.code.unwrap().code).collect();
            for code in &problems {
                let c = CONDITIONS.iter().find(|c| c.code == *code).unwrap();
                assert!(age >= c.min_age, "{} at {age}", c.display);
            }
            for m in p.entries::<Medication>().unwrap() {
                let code = m.data.code.unwrap().code;
                assert!(
                    indications(&code).iter().any(|i| problems.iter().any(|p| p == i)),
                    "{} without its indication",
                    m.data.name
                );
                medications += 1;
            }
            let anticoagulants = p
                .entries::<Medication>()
                .unwrap()
                .iter()
                .filter(|m| ["Apixaban", "Warfarin"].contains(&m.data.name.as_str()))
                .count();
            assert!(anticoagulants <= 1);
            if p.entries::<Alert>().unwrap().iter().any(|a| a.data.kind == alert_kind::RESPECT_DNACPR) {
                dnacpr += 1;
                assert!(!problems.is_empty(), "a patient with a DNACPR decision has recorded conditions");
            }
            if age >= 65 {
                assert!(!problems.is_empty(), "older people have recorded conditions");
            }
        }
        assert!(medications > 1_000 && dnacpr > 20, "{medications} medications, {dnacpr} DNACPR");
        for bad in ["SO16 9OA", "SO15 4WI", "SO16 9A", "XX1 1AA", "SO161AA"] {
            assert!(!is_uk_postcode(bad), "{bad}");
        }
    }

    #[test]
    fn a_second_population_starts_after_the_numbers_a_store_holds() {
        let mut first = Population::new(5, ActorId::from(&[1u8; 16][..]));
        let held: std::collections::HashSet<String> = (0..300)
            .map(|_| first.next_patient(0).unwrap().nhs_number().unwrap().as_str().to_string())
            .collect();
        let stem = first_free_stem(|n| held.contains(n.as_str()));
        assert_eq!(stem, first.next_stem, "right after the last one handed out");
        let mut second = Population::starting_at(5, ActorId::from(&[1u8; 16][..]), stem);
        for _ in 0..50 {
            let nhs = second.next_patient(0).unwrap().nhs_number().unwrap();
            assert!(!held.contains(nhs.as_str()));
        }
        assert_eq!(first_free_stem(|_| false), FIRST_STEM);
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
