//! Hospital feeds: HL7 v2 ADT messages into the summary, with ACKs, idempotency and cancellation.

use std::sync::Arc;

use care_node::summary::{Encounter, PatientSummary};
use care_sync_server::ingest::hl7::adt::{Ack, AdtOptions, UnknownPatient};
use care_sync_server::store::ServerStore;
use care_sync_server::store::sqlite::SqliteStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One message through the feed with the default options (Europe/London, unknown patients
/// create records).
fn process(store: &dyn ServerStore, text: &str, now_ms: i64) -> Ack {
    care_sync_server::ingest::hl7::adt::process(store, text, now_ms, &AdtOptions::default())
}

fn store() -> (Arc<dyn ServerStore>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (Arc::new(SqliteStore::open(dir.path()).unwrap()), dir)
}

/// An ADT message for the test patient 999 000 0018 (visit V100 unless said otherwise).
fn adt(event: &str, control: &str, extra_pv1: &str) -> String {
    let structure = match event {
        "A02" | "A03" | "A12" => "ADT_A02",
        "A28" | "A31" => "ADT_A28",
        "A40" => "ADT_A39",
        _ => "ADT_A01",
    };
    format!(
        "MSH|^~\\&|PAS|WGH|CARE|REGION|20261125143000||ADT^{event}^{structure}|{control}|P|2.4\r\
         EVN|{event}|20261125143000\r\
         PID|1||9990000018^^^NHS^NH~D1234567^^^RHM^MR||TESTER^EDITH^^^MRS||19300517|F|||1 Example Lane^^Newport^^PO30 1AB||||||||||||||||||||||NSTS01\r\
         PD1|||Practice One^^Z81001\r\
         PV1|1|I|Ward 7^Bay 2^Bed 4^Wessex General||||||||||||||||V100{extra_pv1}\r"
    )
}

fn encounters(store: &dyn ServerStore) -> Vec<Encounter> {
    let id = store.patient_by_nhs(&care_node::nhs::NhsNumber::parse("9990000018").unwrap()).unwrap().unwrap();
    let mut s = PatientSummary::load(&store.load_document(&id).unwrap().unwrap()).unwrap();
    s.entries::<Encounter>().unwrap().into_iter().map(|e| e.data).collect()
}

fn accepted(ack: &Ack) {
    assert_eq!(ack.code, "AA", "{}", ack.text);
    assert!(ack.message.contains(&format!("MSA|AA|{}", ack.control_id)), "{}", ack.message);
}

#[test]
fn admit_transfer_discharge_and_their_cancellations() {
    let (store, _d) = store();
    let s = store.as_ref();
    accepted(&process(s, &adt("A01", "M1", ""), 0));
    let admission = encounters(s).into_iter().find(|e| e.kind == "admission").unwrap();
    assert_eq!(admission.status, "in-progress");
    assert_eq!(admission.location.as_deref(), Some("Ward 7, Bay 2, Bed 4"));
    assert_eq!(admission.facility.as_deref(), Some("Wessex General"));
    assert_eq!(admission.visit.as_deref(), Some("V100"));
    let patient =
        s.patient_by_nhs(&care_node::nhs::NhsNumber::parse("9990000018").unwrap()).unwrap().unwrap();
    let demographics =
        PatientSummary::load(&s.load_document(&patient).unwrap().unwrap()).unwrap().demographics().unwrap();
    assert_eq!(demographics.name, "EDITH TESTER");
    assert_eq!(demographics.postcode.as_deref(), Some("PO30 1AB"));
    assert_eq!(demographics.gp_practice_code.as_deref(), Some("Z81001"));

    accepted(&process(s, &adt("A02", "M2", "").replace("Ward 7^Bay 2^Bed 4", "Ward 9^^"), 0));
    let transfer = encounters(s).into_iter().find(|e| e.kind == "transfer").unwrap();
    assert_eq!((transfer.status.as_str(), transfer.location.as_deref()), ("in-progress", Some("Ward 9")));
    accepted(&process(s, &adt("A12", "M3", ""), 0));
    let transfer = encounters(s).into_iter().find(|e| e.kind == "transfer").unwrap();
    assert_eq!(transfer.status, "cancelled", "a cancelled transfer stays in the record");

    accepted(&process(s, &adt("A03", "M4", ""), 0));
    let admission = encounters(s).into_iter().find(|e| e.kind == "admission").unwrap();
    assert_eq!(admission.status, "finished");
    assert!(admission.end.is_some());
    accepted(&process(s, &adt("A13", "M5", ""), 0));
    let admission = encounters(s).into_iter().find(|e| e.kind == "admission").unwrap();
    assert_eq!((admission.status.as_str(), admission.end.as_ref()), ("in-progress", None));
    accepted(&process(s, &adt("A11", "M6", ""), 0));
    let all = encounters(s);
    assert_eq!(all.len(), 2, "nothing deleted: the admission and the transfer are both kept");
    assert_eq!(all.iter().find(|e| e.kind == "admission").unwrap().status, "cancelled");
}

#[test]
fn duplicates_are_idempotent_and_bad_messages_are_refused_with_a_reason() {
    let (store, _d) = store();
    let s = store.as_ref();
    accepted(&process(s, &adt("A01", "DUP1", ""), 0));
    let seq = s.max_seq().unwrap();
    let again = process(s, &adt("A01", "DUP1", ""), 0);
    assert_eq!(again.code, "AA");
    assert!(again.text.contains("duplicate"));
    assert_eq!(s.max_seq().unwrap(), seq, "a duplicate changes nothing");

    let no_nhs = adt("A01", "N1", "").replace("9990000018^^^NHS^NH~", "");
    let ack = process(s, &no_nhs, 0);
    assert_eq!(ack.code, "AE");
    assert!(ack.text.contains("no NHS number"), "{}", ack.text);
    let bad_nhs = adt("A01", "N2", "").replace("9990000018", "9990000010");
    let ack = process(s, &bad_nhs, 0);
    assert_eq!(ack.code, "AE");
    assert!(ack.text.contains("invalid") && !ack.text.contains("9990000010"), "{}", ack.text);
    let ack = process(s, &adt("A01", "N3", "").replace("ADT^A01^ADT_A01", "ORU^R01"), 0);
    assert_eq!(ack.code, "AR");
    let ack = process(s, &adt("A01", "N4", "").replace("ADT^A01^ADT_A01", "ADT^A99"), 0);
    assert_eq!((ack.code, ack.text.contains("not supported")), ("AR", true));
    let ack = process(s, "this is not HL7", 0);
    assert_eq!(ack.code, "AR");
    assert!(ack.message.starts_with("MSH|") && ack.message.contains("\rMSA|AR|"));
    let ack = process(s, &adt("A13", "N5", "").replace("V100", "V404"), 0);
    assert_eq!((ack.code, ack.text.contains("no discharge")), ("AE", true));
}

#[test]
fn updates_change_demographics_and_a_merge_asks_an_operator() {
    let (store, _d) = store();
    let s = store.as_ref();
    accepted(&process(s, &adt("A28", "P1", ""), 0));
    accepted(&process(s, &adt("A31", "P2", "").replace("TESTER^EDITH", "TESTER-SMITH^EDITH"), 0));
    let patient =
        s.patient_by_nhs(&care_node::nhs::NhsNumber::parse("9990000018").unwrap()).unwrap().unwrap();
    let d =
        PatientSummary::load(&s.load_document(&patient).unwrap().unwrap()).unwrap().demographics().unwrap();
    assert_eq!(d.family.as_deref(), Some("TESTER-SMITH"));
    let merge = format!("{}MRG|9990000026^^^NHS^NH\r", adt("A40", "P3", ""));
    let ack = process(s, &merge, 0);
    assert_eq!(ack.code, "AA");
    assert!(
        s.alerts(false).unwrap().iter().any(|a| a.kind == "merge-request"),
        "an operator is asked to merge"
    );
    assert_eq!(s.patient_count().unwrap(), 1, "nothing was merged automatically");
}

/// The ACK's segments, parsed back by the `hl7-parser` crate: `field(segment, n)` as text.
fn parsed(ack: &Ack) -> impl Fn(&str, usize) -> String + use<> {
    let message = hl7_parser::Message::parse(ack.message.trim_end_matches('\r')).expect("the ACK is HL7 v2");
    let fields: Vec<(String, Vec<String>)> = message
        .segments()
        .map(|s| {
            (
                s.name.to_string(),
                (1..=12).map(|n| s.field(n).map(|f| f.raw_value().to_string()).unwrap_or_default()).collect(),
            )
        })
        .collect();
    move |segment, n| {
        fields
            .iter()
            .find(|(name, _)| name == segment)
            .map(|(_, f)| f[n - 1].clone())
            .unwrap_or_else(|| format!("<no {segment}>"))
    }
}

#[test]
fn acks_carry_the_message_structure_the_inbound_version_and_an_err_segment_a_parser_reads() {
    let (store, _d) = store();
    let s = store.as_ref();
    let ok = process(s, &adt("A01", "S1", ""), 0);
    let field = parsed(&ok);
    assert_eq!(
        (field("MSH", 9), field("MSH", 12), field("MSA", 1), field("MSA", 2)),
        ("ACK^A01^ACK".into(), "2.4".into(), "AA".into(), "S1".into())
    );
    assert_eq!(field("ERR", 1), "<no ERR>", "an AA has no ERR segment");

    let v251 = adt("A01", "S2", "").replace("|P|2.4\r", "|P|2.5.1\r").replace("9990000018", "9990000010");
    let refused = process(s, &v251, 0);
    let field = parsed(&refused);
    assert_eq!(
        (field("MSH", 9), field("MSH", 12), field("MSA", 1)),
        ("ACK^A01^ACK".into(), "2.5.1".into(), "AE".into())
    );
    assert_eq!(field("ERR", 2), "PID^1^3", "the location: segment, sequence, field");
    assert_eq!(field("ERR", 3), "102^Data type error^HL70357");
    assert_eq!(field("ERR", 4), "E");
    assert!(
        field("ERR", 8).contains("NHS number in PID-3 is invalid") && !refused.message.contains("9990000010")
    );

    let unsupported = parsed(&process(s, &adt("A01", "S3", "").replace("ADT^A01^ADT_A01", "ADT^A99"), 0));
    assert_eq!(
        (unsupported("MSA", 1), unsupported("ERR", 3)),
        ("AR".into(), "201^Unsupported event code^HL70357".into())
    );
    let not_adt = parsed(&process(s, &adt("A01", "S4", "").replace("ADT^A01^ADT_A01", "ORU^R01"), 0));
    assert_eq!(
        (not_adt("MSA", 1), not_adt("ERR", 2), not_adt("ERR", 3)),
        ("AR".into(), "MSH^1^9".into(), "200^Unsupported message type^HL70357".into())
    );
    let garbage = parsed(&process(s, "this is not HL7", 0));
    assert_eq!((garbage("MSH", 9), garbage("MSA", 1)), ("ACK".into(), "AR".into()));

    // An A11 for a visit the region does not know: the field named, the visit number not echoed.
    let unknown = process(s, &adt("A11", "S5", "").replace("V100", "V404^^^RHM^VN"), 0);
    let field = parsed(&unknown);
    assert_eq!(
        (field("MSA", 1), field("ERR", 2), field("ERR", 3)),
        ("AE".into(), "PV1^1^19".into(), "204^Unknown key identifier^HL70357".into())
    );
    assert!(!unknown.message.contains("V404"), "{}", unknown.message);

    // The feed status keeps each refusal's control id for the engineer who looks for it.
    let refusals = s.feed_status().unwrap().recent_refusals;
    assert_eq!(refusals[0].control_id, "S5");
    assert!(refusals.iter().any(|r| r.control_id == "S2" && r.code == "AE"));
}

#[test]
fn times_keep_their_offsets_and_local_times_follow_the_feed_zone() {
    let (store, _d) = store();
    let s = store.as_ref();
    let admitted_at = |control: &str, visit: &str, pv1_44: &str| {
        let msg = adt("A01", control, "").replace("V100", &format!("{visit}{}", "|".repeat(25) + pv1_44));
        let ack = process(s, &msg, 0);
        assert_eq!(ack.code, "AA", "{}", ack.text);
        encounters(s).into_iter().find(|e| e.visit.as_deref() == Some(visit)).unwrap().start.unwrap()
    };
    assert_eq!(admitted_at("T1", "V1", "20260701115000+0100"), "2026-07-01T10:50:00Z");
    assert_eq!(admitted_at("T2", "V2", "20260701115000"), "2026-07-01T10:50:00Z", "summer: BST");
    assert_eq!(admitted_at("T3", "V3", "20261125115000"), "2026-11-25T11:50:00Z", "winter: GMT");
    assert_eq!(
        admitted_at("T4", "V4", "20261025013000"),
        "2026-10-25T00:30:00Z",
        "the October repeat: the first"
    );
    assert_eq!(admitted_at("T5", "V5", "20260329023000"), "2026-03-29T01:30:00Z", "after the March change");
    assert_eq!(admitted_at("T6", "V6", "202607011150"), "2026-07-01T10:50:00Z", "minutes precision");
    assert_eq!(admitted_at("T7", "V7", "20260701115030.25+0100"), "2026-07-01T10:50:30.25Z", "fractions");
    // Another configured zone.
    let utc = AdtOptions { time_zone: jiff::tz::TimeZone::UTC, ..AdtOptions::default() };
    let msg = adt("A01", "T8", "").replace("V100", &format!("V8{}20260701115000", "|".repeat(25)));
    assert_eq!(care_sync_server::ingest::hl7::adt::process(s, &msg, 0, &utc).code, "AA");
    let start = encounters(s).into_iter().find(|e| e.visit.as_deref() == Some("V8")).unwrap().start.unwrap();
    assert_eq!(start, "2026-07-01T11:50:00Z");
    // A malformed time is an error in its field, not a wrong time.
    let bad = adt("A01", "T9", "").replace("V100", &format!("V9{}2026070111500", "|".repeat(25)));
    let ack = process(s, &bad, 0);
    assert_eq!((ack.code, parsed(&ack)("ERR", 2)), ("AE", "PV1^1^44".into()));
}

#[test]
fn an_unknown_nhs_number_creates_a_record_for_review_or_is_refused_as_configured() {
    let (store, _d) = store();
    let s = store.as_ref();
    // By default: created, and one alert for the facility however many such messages.
    accepted(&process(s, &adt("A01", "U1", ""), 0));
    accepted(&process(s, &adt("A01", "U2", "").replace("9990000018", "9990000026"), 0));
    assert_eq!(s.patient_count().unwrap(), 2);
    let alerts: Vec<_> =
        s.alerts(false).unwrap().into_iter().filter(|a| a.kind == "feed-new-patient").collect();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert!(alerts[0].reason.contains("WGH") && alerts[0].reason.contains("U1"));
    // A feed configured to refuse: AE 204, nothing created; a known patient is still updated.
    let mut refuse = AdtOptions::default();
    refuse.unknown_patient_by_facility.insert("WGH".into(), UnknownPatient::Refuse);
    let unknown = adt("A01", "U3", "").replace("9990000018", "9990000034");
    let ack = care_sync_server::ingest::hl7::adt::process(s, &unknown, 0, &refuse);
    assert_eq!((ack.code, parsed(&ack)("ERR", 3)), ("AE", "204^Unknown key identifier^HL70357".into()));
    assert_eq!(s.patient_count().unwrap(), 2);
    let seq = s.max_seq().unwrap();
    accepted(&care_sync_server::ingest::hl7::adt::process(s, &adt("A03", "U4", ""), 0, &refuse));
    assert!(s.max_seq().unwrap() > seq, "the known patient's discharge was applied");
    // Another facility keeps the default.
    let other = unknown.replace("|PAS|WGH|", "|PAS|QAH|").replace("U3", "U5");
    accepted(&care_sync_server::ingest::hl7::adt::process(s, &other, 0, &refuse));
    assert_eq!(s.patient_count().unwrap(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn mllp_frames_messages_and_acks() {
    let (store, _d) = store();
    let listener = care_sync_server::ingest::hl7::mllp::start(store.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let mut socket = tokio::net::TcpStream::connect(listener.addr).await.unwrap();
    for (i, message) in [adt("A01", "T1", ""), "garbage".to_string()].iter().enumerate() {
        let mut frame = vec![0x0b];
        frame.extend_from_slice(message.as_bytes());
        frame.extend_from_slice(&[0x1c, 0x0d]);
        socket.write_all(&frame).await.unwrap();
        let mut reply = Vec::new();
        let mut byte = [0u8; 1];
        while !reply.ends_with(&[0x1c, 0x0d]) {
            socket.read_exact(&mut byte).await.unwrap();
            reply.push(byte[0]);
        }
        let text = String::from_utf8_lossy(&reply);
        assert!(text.starts_with("\u{0b}MSH|"));
        let expected = if i == 0 { "MSA|AA|T1" } else { "MSA|AR|" };
        assert!(text.contains(expected), "{text}");
    }
    listener.stop();
}

/// Whether the listener closes `socket` (reads end) within `seconds`.
async fn closed_within(socket: &mut tokio::net::TcpStream, seconds: u64) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(std::time::Duration::from_secs(seconds), socket.read(&mut byte)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn mllp_senders_off_the_allow_list_over_the_limit_or_idle_are_closed() {
    use care_sync_server::ingest::hl7::mllp::{MllpOptions, start_with};
    let (store, _d) = store();
    // Nobody allowed: even loopback is closed at once, and nothing is admitted.
    let closed = MllpOptions { allow: vec![], ..Default::default() };
    let listener = start_with(store.clone(), "127.0.0.1:0".parse().unwrap(), closed).await.unwrap();
    let mut socket = tokio::net::TcpStream::connect(listener.addr).await.unwrap();
    let mut frame = vec![0x0b];
    frame.extend_from_slice(adt("A01", "T9", "").as_bytes());
    frame.extend_from_slice(&[0x1c, 0x0d]);
    let _ = socket.write_all(&frame).await;
    assert!(closed_within(&mut socket, 5).await, "a sender off the allow-list is closed");
    assert_eq!(store.patient_count().unwrap(), 0, "and nothing it sent was admitted");
    listener.stop();

    // Two connections at most; the third is closed; an idle one is closed after its timeout.
    // The idle timeout (3 s) is longer than the wait for the third's close (1 s), so that close
    // is the limit's.
    let limited = MllpOptions {
        max_connections: 2,
        idle_timeout: std::time::Duration::from_secs(3),
        ..Default::default()
    };
    let listener = start_with(store.clone(), "127.0.0.1:0".parse().unwrap(), limited).await.unwrap();
    let opened = std::time::Instant::now();
    let mut first = tokio::net::TcpStream::connect(listener.addr).await.unwrap();
    let _second = tokio::net::TcpStream::connect(listener.addr).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let mut third = tokio::net::TcpStream::connect(listener.addr).await.unwrap();
    assert!(closed_within(&mut third, 1).await, "over the connection limit");
    assert!(closed_within(&mut first, 10).await, "idle past the timeout");
    let idle = opened.elapsed();
    assert!(idle >= std::time::Duration::from_millis(2_900), "not before its timeout: {idle:?}");
    listener.stop();
}

fn framed(message: &str) -> Vec<u8> {
    let mut frame = vec![0x0b];
    frame.extend_from_slice(message.as_bytes());
    frame.extend_from_slice(&[0x1c, 0x0d]);
    frame
}

async fn read_ack(socket: &mut tokio::net::TcpStream) -> String {
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while !reply.ends_with(&[0x1c, 0x0d]) {
        socket.read_exact(&mut byte).await.unwrap();
        reply.push(byte[0]);
    }
    String::from_utf8_lossy(&reply).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_mllp_sender_whose_connection_drops_before_its_ack_resends_and_nothing_applies_twice() {
    let (store, _d) = store();
    let listener = care_sync_server::ingest::hl7::mllp::start(store.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let admission = adt("A01", "DROP1", "");
    // Sent, and the connection dropped before the ACK could be read.
    let mut socket = tokio::net::TcpStream::connect(listener.addr).await.unwrap();
    socket.write_all(&framed(&admission)).await.unwrap();
    drop(socket);
    // The sender had no ACK, so it sends the message again on a new connection.
    let mut socket = tokio::net::TcpStream::connect(listener.addr).await.unwrap();
    socket.write_all(&framed(&admission)).await.unwrap();
    let ack = read_ack(&mut socket).await;
    assert!(ack.contains("MSA|AA|DROP1"), "{ack}");
    // One admission, however the two copies met the feed.
    let admitted: Vec<_> =
        encounters(store.as_ref()).into_iter().filter(|e| e.status == "in-progress").collect();
    assert_eq!(admitted.len(), 1, "{admitted:?}");
    assert_eq!(encounters(store.as_ref()).len(), 1);
    listener.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn mllp_messages_sent_without_waiting_are_acknowledged_in_order_after_their_commit() {
    let (store, _d) = store();
    let listener = care_sync_server::ingest::hl7::mllp::start(store.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let mut socket = tokio::net::TcpStream::connect(listener.addr).await.unwrap();
    // Forty admissions, each its own visit, in one write: more than one connection's share of
    // the feed at once.
    let mut all = Vec::new();
    for i in 0..40 {
        all.extend(framed(&adt("A01", &format!("P{i}"), "").replace("V100", &format!("V{i}"))));
    }
    socket.write_all(&all).await.unwrap();
    for i in 0..40 {
        let ack = read_ack(&mut socket).await;
        assert!(ack.contains(&format!("MSA|AA|P{i}|")), "ACK {i}: {ack}");
        // Acknowledged means committed: the admission is in the store already.
        assert!(encounters(store.as_ref()).len() > i, "ACK {i} came before its admission was stored");
    }
    assert_eq!(encounters(store.as_ref()).len(), 40);
    listener.stop();
}

#[test]
fn a_feed_s_kept_copy_of_a_record_is_never_used_once_another_writer_changed_it() {
    use care_sync_server::ingest::hl7::adt::{DocCache, process_group};
    let (store, _d) = store();
    let options = AdtOptions::default();
    let mut cache = DocCache::new(8);
    let group = |texts: &[String], cache: &mut DocCache| {
        for ack in process_group(store.as_ref(), texts, &options, cache) {
            accepted(&ack);
        }
    };
    group(&[adt("A01", "C1", "")], &mut cache);
    // Another writer (a second feed, without the copy) records another visit meanwhile.
    accepted(&process(store.as_ref(), &adt("A01", "C2", "").replace("V100", "V200"), 1));
    // The first feed's next message must start from the record as stored, with both visits.
    group(&[adt("A03", "C3", "")], &mut cache);
    let visits: Vec<(Option<String>, String)> =
        encounters(store.as_ref()).into_iter().map(|e| (e.visit.clone(), e.status)).collect();
    assert_eq!(visits.len(), 2, "{visits:?}");
    assert!(visits.contains(&(Some("V200".into()), "in-progress".into())), "{visits:?}");
    assert!(visits.contains(&(Some("V100".into()), "finished".into())), "{visits:?}");
    // And a message after that, with the copy kept again, still sees everything.
    group(&[adt("A01", "C4", "").replace("V100", "V300")], &mut cache);
    assert_eq!(encounters(store.as_ref()).len(), 3);
}

#[test]
fn changes_saved_on_a_copy_another_writer_overtook_are_merged_and_the_copy_is_disowned() {
    let (store, _d) = store();
    accepted(&process(store.as_ref(), &adt("A01", "R1", ""), 1));
    let id = store.patient_by_nhs(&care_node::nhs::NhsNumber::parse("9990000018").unwrap()).unwrap().unwrap();
    let (saved, seq) = store.load_document_seq(&id).unwrap().unwrap();
    let mut copy = PatientSummary::load(&saved).unwrap();
    copy.set_actor(&[5; 32]);
    let before = copy.heads();
    let mut note =
        Encounter::new("attendance", "finished", care_node::summary::Provenance::new("x", "x", "server", 2));
    note.visit = Some("V999".into());
    copy.add(&note).unwrap();
    let changes = copy.changes_since(&before);
    // Another writer moves the record on after the copy was read.
    accepted(&process(store.as_ref(), &adt("A01", "R2", "").replace("V100", "V200"), 3));
    assert_eq!(store.apply_server_changes_on(&id, &changes, &mut copy, seq).unwrap(), None);
    let mut visits: Vec<_> = encounters(store.as_ref()).into_iter().filter_map(|e| e.visit).collect();
    visits.sort();
    assert_eq!(visits, ["V100", "V200", "V999"]);
    // On a copy that is the stored document, it is saved as it is and the new position returned.
    let (saved, seq) = store.load_document_seq(&id).unwrap().unwrap();
    let mut copy = PatientSummary::load(&saved).unwrap();
    copy.set_actor(&[5; 32]);
    let before = copy.heads();
    note.visit = Some("V1000".into());
    copy.add(&note).unwrap();
    let changes = copy.changes_since(&before);
    let after = store.apply_server_changes_on(&id, &changes, &mut copy, seq).unwrap();
    assert_eq!(after, store.document_seq(&id).unwrap());
    assert!(after.unwrap() > seq);
    assert_eq!(encounters(store.as_ref()).len(), 4);
}
