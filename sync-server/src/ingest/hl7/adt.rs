//! ADT events into the patient summary.
//!
//! Over 600 lines because the whole v2 mapping is here, a step per event; its tests are mostly in
//! `tests/adt.rs`.
//!
//! | event | effect |
//! |---|---|
//! | A01 admit | the visit's admission encounter, in progress, with location and start |
//! | A02 transfer | a transfer encounter for the visit (its own entry, so it can be cancelled) |
//! | A03 discharge | the admission finishes, with its end time |
//! | A04 register | the patient is created or updated |
//! | A08, A28, A31 | demographics updated from PID/PD1 |
//! | A11, A12, A13 | cancel admit / transfer / discharge: the event is undone by status, never deleted |
//! | A40 merge | an alert asks an operator to merge (merges are never automatic) |
//!
//! The NHS number comes from the PID-3 repetition with assigning authority `NHS` and type `NH`;
//! a message without a valid one is refused (AE) with the reason. A message whose control id
//! (MSH-10) was already processed is acknowledged again and changes nothing. A valid NHS number
//! the region has no record of creates one flagged for an operator's review, or is refused with
//! AE, as [`AdtOptions::unknown_patient`] says for the sending facility.
//!
//! Times are read by [`super::time`]: offsets honoured, local times in the feed's time zone.
//!
//! Every ACK is `ACK^<event>^ACK` in the inbound message's version; an AE or AR has an ERR
//! segment naming the segment, field and HL7 error code (table 0357), and a text that never
//! holds patient data.

use care_node::nhs::NhsNumber;
use care_node::summary::{Demographics, Encounter, EntryId, PatientId, PatientSummary, Provenance, Section};
use hl7_parser::Message;

use crate::store::{Hl7Claim, ServerStore, StoreError};

/// An acknowledgement: `AA` accepted, `AE` error, `AR` rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub code: &'static str,
    pub control_id: String,
    pub text: String,
    /// The HL7 ACK message to send back.
    pub message: String,
}

/// What to do with a valid NHS number the region has no record of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnknownPatient {
    /// Create the record from the message's demographics and raise a `feed-new-patient` alert
    /// for an operator to review (the default: an admission is never lost).
    Create,
    /// Refuse the message with AE (HL7 error 204, unknown key identifier).
    Refuse,
}

/// How a feed's messages are read.
#[derive(Debug, Clone, PartialEq)]
pub struct AdtOptions {
    /// The zone of times sent without an offset.
    pub time_zone: jiff::tz::TimeZone,
    /// For an unknown NHS number: the default, then by sending facility (MSH-4).
    pub unknown_patient: UnknownPatient,
    pub unknown_patient_by_facility: std::collections::BTreeMap<String, UnknownPatient>,
}

impl Default for AdtOptions {
    fn default() -> Self {
        AdtOptions {
            time_zone: super::time::zone(DEFAULT_TIME_ZONE)
                .expect("the bundled time zone database has London"),
            unknown_patient: UnknownPatient::Create,
            unknown_patient_by_facility: Default::default(),
        }
    }
}

/// The feeds' time zone unless configured otherwise.
pub const DEFAULT_TIME_ZONE: &str = "Europe/London";

impl AdtOptions {
    fn unknown_patient_from(&self, facility: &str) -> UnknownPatient {
        *self.unknown_patient_by_facility.get(facility.trim()).unwrap_or(&self.unknown_patient)
    }
}

/// Why a message was not accepted, for the ACK: where (segment and field) and the HL7 error
/// code of table 0357. The text never holds patient data.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Problem {
    segment: &'static str,
    field: usize,
    code: u16,
    text: String,
}

/// HL7 table 0357, the codes used here.
const SEGMENT_SEQUENCE_ERROR: u16 = 100;
const REQUIRED_FIELD_MISSING: u16 = 101;
const DATA_TYPE_ERROR: u16 = 102;
const UNSUPPORTED_MESSAGE_TYPE: u16 = 200;
const UNSUPPORTED_EVENT_CODE: u16 = 201;
const UNKNOWN_KEY_IDENTIFIER: u16 = 204;
const INTERNAL_ERROR: u16 = 207;

fn code_text(code: u16) -> &'static str {
    match code {
        SEGMENT_SEQUENCE_ERROR => "Segment sequence error",
        REQUIRED_FIELD_MISSING => "Required field missing",
        DATA_TYPE_ERROR => "Data type error",
        UNSUPPORTED_MESSAGE_TYPE => "Unsupported message type",
        UNSUPPORTED_EVENT_CODE => "Unsupported event code",
        UNKNOWN_KEY_IDENTIFIER => "Unknown key identifier",
        _ => "Application internal error",
    }
}

impl Problem {
    fn at(segment: &'static str, field: usize, code: u16, text: impl Into<String>) -> Self {
        Problem { segment, field, code, text: text.into() }
    }
}

struct Header {
    control_id: String,
    event: String,
    sending_app: String,
    sending_facility: String,
    version: String,
}

fn field(msg: &Message<'_>, segment: &str, n: usize) -> String {
    msg.segment(segment)
        .and_then(|s| s.field(n))
        .map(|f| f.display(&msg.separators).to_string())
        .unwrap_or_default()
}

fn component(msg: &Message<'_>, segment: &str, n: usize, c: usize) -> String {
    msg.segment(segment)
        .and_then(|s| s.field(n))
        .and_then(|f| f.component(c))
        .map(|x| x.display(&msg.separators).to_string())
        .unwrap_or_default()
}

fn some(s: String) -> Option<String> {
    let s = s.trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// An HL7 time field as the record stores it; a malformed one is a data type error there.
fn time_field(
    msg: &Message<'_>,
    segment: &'static str,
    n: usize,
    options: &AdtOptions,
) -> Result<Option<String>, Problem> {
    super::time::parse(&field(msg, segment, n), &options.time_zone)
        .map(|t| t.map(super::time::Hl7Time::into_string))
        .map_err(|e| Problem::at(segment, n, DATA_TYPE_ERROR, format!("{segment}-{n}: {e}")))
}

fn ack_message(
    header: Option<&Header>,
    code: &str,
    control_id: &str,
    text: &str,
    problem: Option<&Problem>,
    now_ms: i64,
) -> String {
    let ts = time::OffsetDateTime::from_unix_timestamp(now_ms / 1000)
        .ok()
        .and_then(|t| {
            t.format(time::macros::format_description!("[year][month][day][hour][minute][second]+0000")).ok()
        })
        .unwrap_or_default();
    let clean = |s: &str| escape(s);
    // MSH-3/4 echo into MSH-5/6 as they came, components and all (HD: `PAS^1.2.3^ISO`), minus
    // anything that could end the field or the segment.
    let hd = |s: &str| s.replace(['|', '\r', '\n'], " ");
    let (app, facility, event, version) = header
        .map(|h| (h.sending_app.as_str(), h.sending_facility.as_str(), h.event.as_str(), h.version.as_str()))
        .unwrap_or(("", "", "", "2.4"));
    let kind = match clean(event).trim() {
        "" => "ACK".to_string(),
        event => format!("ACK^{event}^ACK"),
    };
    let mut message = format!(
        "MSH|^~\\&|CARE-SYNC|REGION|{}|{}|{ts}||{kind}|ACK{}|P|{}\rMSA|{code}|{}|{}\r",
        hd(app),
        hd(facility),
        clean(control_id),
        clean(version),
        clean(control_id),
        clean(text)
    );
    if let Some(p) = problem {
        // ERR-1 (the element of 2.4 and before), ERR-2 location, ERR-3 the table 0357 code,
        // ERR-4 severity, ERR-8 the message for a person.
        let (code_num, code_text) = (p.code, code_text(p.code));
        message.push_str(&format!(
            "ERR|{seg}^1^{field}^{code_num}&{code_text}&HL70357|{seg}^1^{field}|{code_num}^{code_text}^HL70357|E||||{}\r",
            clean(&p.text),
            seg = p.segment,
            field = p.field,
        ));
    }
    message
}

/// A value as HL7 v2 text: the delimiters escaped (`\F\` `\S\` `\R\` `\E\` `\T\`), line
/// breaks as spaces (a segment ends at a carriage return).
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '|' => out.push_str("\\F\\"),
            '^' => out.push_str("\\S\\"),
            '~' => out.push_str("\\R\\"),
            '\\' => out.push_str("\\E\\"),
            '&' => out.push_str("\\T\\"),
            '\r' | '\n' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

fn ack(
    header: Option<&Header>,
    code: &'static str,
    control_id: &str,
    text: impl Into<String>,
    problem: Option<&Problem>,
    now_ms: i64,
) -> Ack {
    let text = text.into();
    Ack {
        code,
        control_id: control_id.to_string(),
        message: ack_message(header, code, control_id, &text, problem, now_ms),
        text,
    }
}

fn refuse(
    header: Option<&Header>,
    code: &'static str,
    control_id: &str,
    problem: Problem,
    now_ms: i64,
) -> Ack {
    ack(header, code, control_id, problem.text.clone(), Some(&problem), now_ms)
}

/// The NHS number in PID-3 (`number^^^NHS^NH`), if there is one.
fn nhs_from_pid(msg: &Message<'_>) -> Result<NhsNumber, Problem> {
    let missing = |text: &str| Problem::at("PID", 3, REQUIRED_FIELD_MISSING, text);
    let pid3 = msg
        .segment("PID")
        .and_then(|s| s.field(3))
        .ok_or_else(|| missing("PID-3 (patient identifiers) is missing"))?;
    for repeat in pid3.repeats() {
        let part = |n: usize| {
            repeat.component(n).map(|c| c.raw_value().trim().to_ascii_uppercase()).unwrap_or_default()
        };
        if part(4) == "NHS" && part(5) == "NH" {
            return NhsNumber::parse(&part(1)).map_err(|e| {
                Problem::at("PID", 3, DATA_TYPE_ERROR, format!("the NHS number in PID-3 is invalid: {e}"))
            });
        }
    }
    Err(missing("PID-3 holds no NHS number (assigning authority NHS, type NH)"))
}

fn demographics_from(msg: &Message<'_>, nhs: &NhsNumber) -> Demographics {
    let family = some(component(msg, "PID", 5, 1));
    let given = some(component(msg, "PID", 5, 2));
    let name =
        [given.clone().unwrap_or_default(), family.clone().unwrap_or_default()].join(" ").trim().to_string();
    let sex = match field(msg, "PID", 8).trim() {
        "M" => Some("male".to_string()),
        "F" => Some("female".to_string()),
        "O" => Some("other".to_string()),
        "U" => Some("unknown".to_string()),
        _ => None,
    };
    let dob = super::time::date_of(&field(msg, "PID", 7));
    let mut demographics =
        Demographics::new(if name.is_empty() { "Unknown" } else { &name }, Some(nhs.as_str()));
    demographics.family = family;
    demographics.given = given;
    demographics.sex = sex;
    demographics.date_of_birth = dob;
    let line1 = some(component(msg, "PID", 11, 1));
    demographics.address_lines = line1.map(|l| vec![l]);
    demographics.city = some(component(msg, "PID", 11, 3));
    demographics.postcode = some(component(msg, "PID", 11, 5));
    demographics.nhs_number_status = some(field(msg, "PID", 32));
    demographics.gp_practice_code =
        some(component(msg, "PD1", 3, 3)).or_else(|| some(component(msg, "PD1", 3, 10)));
    demographics.gp_practice_name = some(component(msg, "PD1", 3, 1));
    demographics
}

/// Merges incoming demographics over the stored ones: the feed's non-empty values win.
fn update_demographics(current: &Demographics, incoming: &Demographics) -> Demographics {
    let pick = |a: &Option<String>, b: &Option<String>| b.clone().or_else(|| a.clone());
    Demographics {
        nhs_number: current.nhs_number.clone(),
        nhs_number_status: pick(&current.nhs_number_status, &incoming.nhs_number_status),
        name: if incoming.name == "Unknown" { current.name.clone() } else { incoming.name.clone() },
        family: pick(&current.family, &incoming.family),
        given: pick(&current.given, &incoming.given),
        date_of_birth: pick(&current.date_of_birth, &incoming.date_of_birth),
        sex: pick(&current.sex, &incoming.sex),
        address_lines: incoming.address_lines.clone().or_else(|| current.address_lines.clone()),
        city: pick(&current.city, &incoming.city),
        postcode: pick(&current.postcode, &incoming.postcode),
        gp_practice_code: pick(&current.gp_practice_code, &incoming.gp_practice_code),
        gp_practice_name: pick(&current.gp_practice_name, &incoming.gp_practice_name),
    }
}

/// Processes one ADT message and returns the ACK to send; records its outcome (with the
/// control id of a refused one) for the feed status and metrics.
pub fn process(store: &dyn ServerStore, text: &str, now_ms: i64, options: &AdtOptions) -> Ack {
    process_with(store, text, now_ms, options, None)
}

/// Documents a feed wrote lately, kept parsed with the log position they were stored at: the
/// next message about the same patient (a discharge after its admission) starts from the copy
/// instead of reading and parsing the document again, as long as nothing else wrote it since.
/// Documents a feed keeps parsed ([`DocCache`]); a realistic summary is a few hundred
/// kilobytes in memory.
pub const FEED_CACHE: usize = 512;

pub struct DocCache {
    docs: std::collections::HashMap<PatientId, (PatientSummary, u64)>,
    order: std::collections::VecDeque<PatientId>,
    capacity: usize,
}

impl DocCache {
    pub fn new(capacity: usize) -> Self {
        DocCache { docs: Default::default(), order: Default::default(), capacity }
    }

    fn take(&mut self, patient: &PatientId) -> Option<(PatientSummary, u64)> {
        self.docs.remove(patient)
    }

    fn put(&mut self, patient: PatientId, summary: PatientSummary, seq: u64) {
        self.docs.insert(patient, (summary, seq));
        self.order.push_back(patient);
        while self.docs.len() > self.capacity {
            match self.order.pop_front() {
                Some(oldest) => {
                    self.docs.remove(&oldest);
                }
                None => break,
            }
        }
        if self.order.len() > 4 * self.capacity.max(1) {
            let docs = &self.docs;
            self.order.retain(|id| docs.contains_key(id));
        }
    }
}

fn process_with(
    store: &dyn ServerStore,
    text: &str,
    now_ms: i64,
    options: &AdtOptions,
    cache: Option<&mut DocCache>,
) -> Ack {
    let ack = process_message(store, text, now_ms, options, cache);
    if let Err(e) = store.feed_record(ack.code, &ack.control_id, &ack.text, now_ms) {
        tracing::error!(error = %e, "could not record a feed message's outcome");
    }
    ack
}

/// Processes messages in order as one group commit: each message's writes commit without
/// waiting for the disk, then one durable commit covers them all, and only then are the ACKs
/// returned (one per message, in order). When the group could not be made durable, every
/// message it accepted is answered AE instead (the sender sends it again, and one that did reach
/// the disk is then answered as already processed, by MSH-10: never applied twice).
pub fn process_group(
    store: &dyn ServerStore,
    texts: &[String],
    options: &AdtOptions,
    cache: &mut DocCache,
) -> Vec<Ack> {
    let mut acks = Vec::with_capacity(texts.len());
    let durable = store.group_commit(&mut || {
        for text in texts {
            acks.push(process_with(store, text, care_node::now_ms(), options, Some(&mut *cache)));
        }
    });
    if let Err(e) = durable {
        // Not on disk: no message may be acknowledged as stored. Each accepted one is answered
        // AE instead (send it again), as a store error inside it would have been; one that did
        // reach the disk is then answered as a duplicate.
        tracing::error!(error = %e, messages = texts.len(), "an ADT group could not be made durable");
        *cache = DocCache::new(cache.capacity);
        for (ack, text) in acks.iter_mut().zip(texts) {
            if ack.code == "AA" {
                *ack = not_stored(text, &e, care_node::now_ms());
            }
        }
    }
    acks
}

/// The AE for a message whose group could not be made durable.
fn not_stored(text: &str, e: &StoreError, now_ms: i64) -> Ack {
    let text =
        text.trim_matches(|c| c == '\n' || c == '\r' || c == ' ').replace("\r\n", "\r").replace('\n', "\r");
    let header = Message::parse(&text).ok().map(|msg| header_of(&msg));
    let control_id = header.as_ref().map(|h| h.control_id.clone()).unwrap_or_default();
    let problem =
        Problem::at("MSH", 1, INTERNAL_ERROR, format!("the server could not store the message: {e}"));
    refuse(header.as_ref(), "AE", &control_id, problem, now_ms)
}

fn header_of(msg: &Message<'_>) -> Header {
    Header {
        control_id: field(msg, "MSH", 10),
        event: some(component(msg, "MSH", 9, 2)).unwrap_or_else(|| field(msg, "EVN", 1)),
        sending_app: field(msg, "MSH", 3),
        sending_facility: field(msg, "MSH", 4),
        version: some(field(msg, "MSH", 12)).unwrap_or_else(|| "2.4".into()),
    }
}

fn process_message(
    store: &dyn ServerStore,
    text: &str,
    now_ms: i64,
    options: &AdtOptions,
    cache: Option<&mut DocCache>,
) -> Ack {
    let text =
        text.trim_matches(|c| c == '\n' || c == '\r' || c == ' ').replace("\r\n", "\r").replace('\n', "\r");
    let Ok(msg) = Message::parse(&text) else {
        let problem =
            Problem::at("MSH", 1, SEGMENT_SEQUENCE_ERROR, "the message could not be parsed as HL7 v2");
        return refuse(None, "AR", "", problem, now_ms);
    };
    let header = header_of(&msg);
    let h = Some(&header);
    if header.control_id.trim().is_empty() {
        let problem =
            Problem::at("MSH", 10, REQUIRED_FIELD_MISSING, "MSH-10 (message control id) is missing");
        return refuse(h, "AR", "", problem, now_ms);
    }
    if component(&msg, "MSH", 9, 1) != "ADT" {
        let problem = Problem::at("MSH", 9, UNSUPPORTED_MESSAGE_TYPE, "only ADT messages are accepted");
        return refuse(h, "AR", &header.control_id, problem, now_ms);
    }
    // Claimed before it is applied: another instance given the same retransmission at the same
    // moment answers it as busy instead of applying it a second time.
    let claim = match store.hl7_claim(&header.control_id, &header.event, now_ms) {
        Ok(Hl7Claim::Done) => {
            return ack(h, "AA", &header.control_id, "already processed (duplicate MSH-10)", None, now_ms);
        }
        Ok(Hl7Claim::Busy) => {
            let problem = Problem::at(
                "MSH",
                10,
                INTERNAL_ERROR,
                "another server instance is applying this message now (MSH-10): send it again",
            );
            return refuse(h, "AE", &header.control_id, problem, now_ms);
        }
        Ok(Hl7Claim::Claimed(claim)) => claim,
        Err(e) => {
            let problem = Problem::at(
                "MSH",
                10,
                INTERNAL_ERROR,
                format!("the server could not check the message: {e}"),
            );
            return refuse(h, "AE", &header.control_id, problem, now_ms);
        }
    };
    let result = apply(store, &msg, &header, now_ms, options, cache);
    let (code, text, problem) = match result {
        Ok(text) => ("AA", text, None),
        Err(Refusal::Content(p)) => ("AE", p.text.clone(), Some(p)),
        Err(Refusal::Unsupported(p)) => ("AR", p.text.clone(), Some(p)),
        Err(Refusal::Store(e)) => {
            tracing::error!(error = %e, "ADT message failed in the store");
            let p =
                Problem::at("MSH", 1, INTERNAL_ERROR, format!("the server could not store the message: {e}"));
            ("AE", p.text.clone(), Some(p))
        }
    };
    let settled = if code == "AA" {
        store.hl7_record(&header.control_id, &header.event, now_ms)
    } else {
        store.hl7_release(&header.control_id, claim)
    };
    if let Err(e) = settled {
        // An unrecorded claim lapses after its lease; a resend is then applied again, which
        // updates the visit's entries rather than adding more (an A40's alert and the audit
        // line come again).
        tracing::error!(error = %e, "could not record the outcome of an ADT message");
    }
    let _ = store.append_audit(
        &format!("hl7:{}", header.sending_facility),
        &format!("adt-{}", header.event),
        None,
        &format!("MSH-10 {} → {code}", header.control_id),
        now_ms,
    );
    ack(h, code, &header.control_id, text, problem.as_ref(), now_ms)
}

enum Refusal {
    Content(Problem),
    Unsupported(Problem),
    Store(StoreError),
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        Refusal::Store(e)
    }
}

impl From<Problem> for Refusal {
    fn from(p: Problem) -> Self {
        Refusal::Content(p)
    }
}

impl From<care_node::summary::SummaryError> for Refusal {
    fn from(e: care_node::summary::SummaryError) -> Self {
        Refusal::Store(StoreError::Document("adt".into(), Box::new(e)))
    }
}

fn apply(
    store: &dyn ServerStore,
    msg: &Message<'_>,
    header: &Header,
    now_ms: i64,
    options: &AdtOptions,
    cache: Option<&mut DocCache>,
) -> Result<String, Refusal> {
    let event = header.event.to_ascii_uppercase();
    const SUPPORTED: &[&str] = &["A01", "A02", "A03", "A04", "A08", "A11", "A12", "A13", "A28", "A31", "A40"];
    if !SUPPORTED.contains(&event.as_str()) {
        let text = "this ADT event is not supported (A01–A04, A08, A11–A13, A28, A31, A40 are)";
        return Err(Refusal::Unsupported(Problem::at("MSH", 9, UNSUPPORTED_EVENT_CODE, text)));
    }
    let nhs = nhs_from_pid(msg)?;
    let incoming = demographics_from(msg, &nhs);
    if event == "A40" {
        return request_merge(store, msg, header, &nhs, now_ms);
    }

    let mut cache = cache;
    let (mut summary, created, base) =
        open_record(store, header, &nhs, &incoming, options, now_ms, cache.as_deref_mut())?;
    let patient = summary.patient_id()?;
    let before = summary.heads();
    if !created && matches!(event.as_str(), "A04" | "A08" | "A28" | "A31") {
        let current = summary.demographics()?;
        let updated = update_demographics(&current, &incoming);
        if updated != current {
            summary.set_demographics(&updated, now_ms)?;
        }
    }
    let outcome = record_visit(&mut summary, msg, header, &event, &patient, options, now_ms)?;

    if created {
        store.insert_patients(std::slice::from_mut(&mut summary))?;
        flag_new_record(store, header, &patient, now_ms)?;
    } else {
        let changes = summary.changes_since(&before);
        let seq = if changes.is_empty() {
            Some(base)
        } else {
            store.apply_server_changes_on(&patient, &changes, &mut summary, base)?
        };
        // Kept only if it is the stored document (no other writer came between).
        if let (Some(cache), Some(seq)) = (cache, seq) {
            cache.put(patient, summary, seq);
        }
    }
    Ok(if created { format!("{outcome}; new record created for review") } else { outcome.to_string() })
}

/// A40: an alert for an operator, who runs the merge (merges are never automatic).
fn request_merge(
    store: &dyn ServerStore,
    msg: &Message<'_>,
    header: &Header,
    nhs: &NhsNumber,
    now_ms: i64,
) -> Result<String, Refusal> {
    let prior = msg
        .segment("MRG")
        .and_then(|s| s.field(1))
        .and_then(|f| {
            f.repeats().find_map(|r| {
                let part = |n: usize| {
                    r.component(n).map(|c| c.raw_value().trim().to_ascii_uppercase()).unwrap_or_default()
                };
                (part(4) == "NHS").then(|| part(1))
            })
        })
        .ok_or_else(|| Problem::at("MRG", 1, REQUIRED_FIELD_MISSING, "MRG-1 holds no prior NHS number"))?;
    let prior = NhsNumber::parse(&prior).map_err(|e| {
        Problem::at("MRG", 1, DATA_TYPE_ERROR, format!("the NHS number in MRG-1 is invalid: {e}"))
    })?;
    let keep = store.patient_by_nhs(nhs)?;
    let merge = store.patient_by_nhs(&prior)?;
    let reason = format!(
        "{} asks to merge two records (A40, MSH-10 {}): run merge-patients",
        header.sending_facility, header.control_id
    );
    store.raise_alert("merge-request", None, keep.as_ref().or(merge.as_ref()), &reason, now_ms)?;
    Ok("merge request recorded for an operator; records are never merged automatically".into())
}

/// The patient's record as the server's actor edits it, and whether this message creates it.
/// An unknown NHS number is refused when the sending facility's feed does not create records.
fn open_record(
    store: &dyn ServerStore,
    header: &Header,
    nhs: &NhsNumber,
    incoming: &Demographics,
    options: &AdtOptions,
    now_ms: i64,
    cache: Option<&mut DocCache>,
) -> Result<(PatientSummary, bool, u64), Refusal> {
    let identity = store.server_identity()?;
    let actor = crate::instance_actor(&identity);
    let opened = match store.patient_by_nhs(nhs)? {
        Some(id) => match cache.and_then(|c| c.take(&id)) {
            // The copy a feed wrote last, if nothing has written the document since.
            Some((summary, seq)) if store.document_seq(&id)? == Some(seq) => (summary, false, seq),
            _ => {
                let (saved, seq) = store.load_document_seq(&id)?.ok_or(StoreError::UnknownPatient)?;
                let mut summary = PatientSummary::load(&saved)?;
                summary.set_actor(actor.to_bytes());
                (summary, false, seq)
            }
        },
        None if options.unknown_patient_from(&header.sending_facility) == UnknownPatient::Refuse => {
            let text =
                "no record in this region has the NHS number in PID-3; this feed does not create records";
            return Err(Problem::at("PID", 3, UNKNOWN_KEY_IDENTIFIER, text).into());
        }
        None => (PatientSummary::create(uuid::Uuid::new_v4(), incoming, actor.clone(), now_ms)?, true, 0),
    };
    Ok(opened)
}

/// What PV1 and EVN say of the visit a message is about.
struct Visit {
    /// PV1-19, else the message's control id.
    id: String,
    facility: Option<String>,
    location: Option<String>,
    class: Option<String>,
    /// EVN-2, else the time the message arrived.
    event_time: Option<String>,
}

impl Visit {
    fn read(msg: &Message<'_>, header: &Header, options: &AdtOptions, now_ms: i64) -> Result<Visit, Problem> {
        let id = some(field(msg, "PV1", 19)).unwrap_or_else(|| header.control_id.clone());
        let facility = some(component(msg, "PV1", 3, 4)).or_else(|| some(header.sending_facility.clone()));
        let location = {
            let parts: Vec<String> = (1..=3).filter_map(|c| some(component(msg, "PV1", 3, c))).collect();
            (!parts.is_empty()).then(|| parts.join(", "))
        };
        let class = match field(msg, "PV1", 2).trim() {
            "I" => Some("inpatient".to_string()),
            "E" => Some("emergency".to_string()),
            "O" => Some("outpatient".to_string()),
            _ => None,
        };
        let event_time = time_field(msg, "EVN", 2, options)?.or_else(|| care_node::view::iso_time(now_ms));
        Ok(Visit { id, facility, location, class, event_time })
    }
}

/// Records what the event does to the visit's encounters; returns the ACK's text.
fn record_visit(
    summary: &mut PatientSummary,
    msg: &Message<'_>,
    header: &Header,
    event: &str,
    patient: &PatientId,
    options: &AdtOptions,
    now_ms: i64,
) -> Result<&'static str, Refusal> {
    let mut provenance = Provenance::new("server", header.sending_facility.trim(), "hospital-feed", now_ms);
    provenance.clock_offset_ms = Some(0);
    provenance.source = Some(format!("HL7 {event} {}", header.control_id));
    let visit = Visit::read(msg, header, options, now_ms)?;
    let admission =
        PatientSummary::source_entry_id(patient, Section::Encounters, &format!("visit:{}", visit.id));
    let existing = summary.entry_data::<Encounter>(admission)?;
    Ok(match event {
        "A01" => {
            let start = time_field(msg, "PV1", 44, options)?;
            summary.upsert(admission, &admitted(existing, visit, start, &provenance))?;
            "admission recorded"
        }
        "A02" => {
            // Its own entry (one per message), so that an A12 can cancel it.
            let id = PatientSummary::source_entry_id(
                patient,
                Section::Encounters,
                &format!("transfer:{}", header.control_id),
            );
            summary.upsert(id, &transferred(visit, &provenance))?;
            "transfer recorded"
        }
        "A03" => {
            let end = time_field(msg, "PV1", 45, options)?;
            let disposition = some(field(msg, "PV1", 36));
            summary.upsert(admission, &discharged(existing, visit, end, disposition, &provenance))?;
            "discharge recorded"
        }
        "A11" => cancel_admission(summary, admission, existing, &provenance)?,
        "A12" => cancel_transfer(summary, &visit.id, &provenance)?,
        "A13" => cancel_discharge(summary, admission, existing, &provenance)?,
        _ => "patient registered or updated",
    })
}

/// A01: the visit's admission, in progress; what the message leaves out is kept.
fn admitted(
    existing: Option<Encounter>,
    visit: Visit,
    start: Option<String>,
    provenance: &Provenance,
) -> Encounter {
    let mut e = existing.unwrap_or_else(|| Encounter::new("admission", "in-progress", provenance.clone()));
    e.status = "in-progress".into();
    e.class = visit.class.or(e.class);
    e.location = visit.location.or(e.location);
    e.facility = visit.facility.or(e.facility);
    e.start = start.or(visit.event_time).or(e.start);
    e.visit = Some(visit.id);
    e.provenance = provenance.clone();
    e
}

/// A02: a transfer encounter of the visit, starting at the event.
fn transferred(visit: Visit, provenance: &Provenance) -> Encounter {
    let mut e = Encounter::new("transfer", "in-progress", provenance.clone());
    e.location = visit.location;
    e.facility = visit.facility;
    e.start = visit.event_time;
    e.visit = Some(visit.id);
    e
}

/// A03: the visit's admission finishes (created finished if the feed never sent the A01).
fn discharged(
    existing: Option<Encounter>,
    visit: Visit,
    end: Option<String>,
    disposition: Option<String>,
    provenance: &Provenance,
) -> Encounter {
    let mut e = existing.unwrap_or_else(|| Encounter::new("admission", "finished", provenance.clone()));
    e.status = "finished".into();
    e.end = end.or(visit.event_time);
    e.facility = e.facility.or(visit.facility);
    e.reason = disposition.map(|d| format!("discharge disposition {d}")).or(e.reason);
    e.visit = Some(visit.id);
    e.provenance = provenance.clone();
    e
}

/// A11: the admission stays in the record, as cancelled.
fn cancel_admission(
    summary: &mut PatientSummary,
    admission: EntryId,
    existing: Option<Encounter>,
    provenance: &Provenance,
) -> Result<&'static str, Refusal> {
    match existing {
        Some(mut e) => {
            e.status = "cancelled".into();
            e.provenance = provenance.clone();
            summary.upsert(admission, &e)?;
            Ok("admission cancelled (kept in the record as cancelled)")
        }
        None => Err(no_visit("no admission for this visit (PV1-19) to cancel")),
    }
}

/// A12: the visit's latest transfer stays in the record, as cancelled.
fn cancel_transfer(
    summary: &mut PatientSummary,
    visit: &str,
    provenance: &Provenance,
) -> Result<&'static str, Refusal> {
    // Entries come in causal order: the last live transfer of the visit is the latest.
    let latest = summary.entries::<Encounter>()?.into_iter().rev().find(|e| {
        e.data.kind == "transfer" && e.data.visit.as_deref() == Some(visit) && e.data.status != "cancelled"
    });
    match latest {
        Some(mut t) => {
            t.data.status = "cancelled".into();
            t.data.provenance = provenance.clone();
            summary.upsert(t.id, &t.data)?;
            Ok("transfer cancelled (kept in the record as cancelled)")
        }
        None => Err(no_visit("no transfer for this visit (PV1-19) to cancel")),
    }
}

/// A13: a finished admission is in progress again.
fn cancel_discharge(
    summary: &mut PatientSummary,
    admission: EntryId,
    existing: Option<Encounter>,
    provenance: &Provenance,
) -> Result<&'static str, Refusal> {
    match existing {
        Some(mut e) if e.status == "finished" => {
            e.status = "in-progress".into();
            e.end = None;
            e.provenance = provenance.clone();
            summary.upsert(admission, &e)?;
            Ok("discharge cancelled: the admission is in progress again")
        }
        _ => Err(no_visit("no discharge for this visit (PV1-19) to cancel")),
    }
}

/// A record the region did not have: an operator checks it is not a duplicate of a
/// provisional one (one open alert per facility, however many messages).
fn flag_new_record(
    store: &dyn ServerStore,
    header: &Header,
    patient: &PatientId,
    now_ms: i64,
) -> Result<(), StoreError> {
    let reason = format!(
        "{} sent ADT messages (first: MSH-10 {}) for NHS numbers the region had no record of; records were created: review them (audit action feed-new-patient) and merge any duplicates",
        header.sending_facility.trim(),
        header.control_id
    );
    let detail = format!("record created from MSH-10 {} for review", header.control_id);
    store.append_audit(
        &format!("hl7:{}", header.sending_facility.trim()),
        "feed-new-patient",
        Some(patient),
        &detail,
        now_ms,
    )?;
    let facility = format!("{} sent", header.sending_facility.trim());
    if !store.alerts(false)?.iter().any(|a| a.kind == "feed-new-patient" && a.reason.starts_with(&facility)) {
        store.raise_alert("feed-new-patient", None, Some(patient), &reason, now_ms)?;
    }
    Ok(())
}

fn no_visit(text: &str) -> Refusal {
    Refusal::Content(Problem::at("PV1", 19, UNKNOWN_KEY_IDENTIFIER, text))
}

/// Splits a file of ADT messages (MLLP-framed, or plain and starting with `MSH|`) into messages.
pub fn split_messages(text: &str) -> Vec<String> {
    if text.contains('\u{0b}') {
        return text
            .split('\u{0b}')
            .filter_map(|m| m.split('\u{1c}').next())
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(str::to_string)
            .collect();
    }
    let normalised = text.replace("\r\n", "\n").replace('\r', "\n");
    let mut messages: Vec<String> = Vec::new();
    for line in normalised.lines() {
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        if line.starts_with("MSH|") || messages.is_empty() {
            messages.push(line.to_string());
        } else if let Some(last) = messages.last_mut() {
            last.push('\r');
            last.push_str(line);
        }
    }
    messages
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_split_into_messages() {
        let plain = "MSH|^~\\&|A\nPID|1\n\nMSH|^~\\&|B\r\nEVN|A01\n";
        assert_eq!(split_messages(plain), vec!["MSH|^~\\&|A\rPID|1", "MSH|^~\\&|B\rEVN|A01"]);
        let framed = "\u{0b}MSH|x\rPID|1\r\u{1c}\r\u{0b}MSH|y\r\u{1c}\r";
        assert_eq!(split_messages(framed), vec!["MSH|x\rPID|1", "MSH|y"]);
    }

    #[test]
    fn acks_echo_the_control_id_and_never_break_the_format() {
        let a = ack(None, "AE", "MSG|1", "bad | text ^~&\\ end", None, 0);
        assert!(
            a.message.contains("\rMSA|AE|MSG\\F\\1|bad \\F\\ text \\S\\\\R\\\\T\\\\E\\ end\r"),
            "{}",
            a.message
        );
    }
}
