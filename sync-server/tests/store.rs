//! The store suite: what every backend of [`ServerStore`] must do, written once against the
//! traits and run against each backend by `store_suite!` (as matrix-rust-sdk's
//! `statestore_integration_tests!` does). SQLite runs it today; another backend adds one line.
//!
//! Also here: a store made by the release before numbered migrations opens, is adopted, and
//! keeps everything it held.

use std::sync::Arc;

use care_node::summary::{Alert, Allergy, Demographics, PatientId, PatientSummary, Provenance};
use care_sync_server::store::postgres::PostgresStore;
use care_sync_server::store::prelude::*;
use care_sync_server::store::sqlite::SqliteStore;
use care_sync_server::store::{
    AuditFilter, BatchWrite, CheckedChanges, ConsentFlags, EnrolError, GrantKind, ImportProgress,
    NewDocument, Role, RoundOutcome, StoreError, UploadError,
};

/// A fresh store of one backend, and a way to reach the same data through another instance
/// (another connection, process or server in front of the same database).
trait Backend {
    fn fresh() -> Self;
    fn store(&self) -> Arc<dyn ServerStore>;
    fn another_instance(&self) -> Arc<dyn ServerStore>;
}

struct Sqlite {
    dir: tempfile::TempDir,
    store: Arc<dyn ServerStore>,
}

impl Backend for Sqlite {
    fn fresh() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path()).unwrap());
        Sqlite { dir, store }
    }
    fn store(&self) -> Arc<dyn ServerStore> {
        self.store.clone()
    }
    fn another_instance(&self) -> Arc<dyn ServerStore> {
        Arc::new(SqliteStore::open(self.dir.path()).unwrap())
    }
}

/// A database of its own in the PostgreSQL cluster at `CARE_SYNC_POSTGRES_URL` (`.ci/test`
/// starts one), dropped afterwards. Without the variable the PostgreSQL tests say so and pass,
/// unless `CARE_SYNC_REQUIRE_POSTGRES=1` (CI), when they fail.
struct Postgres {
    database: care_sync_server::store::postgres::scratch::ScratchDatabase,
    store: Option<Arc<dyn ServerStore>>,
}

impl Postgres {
    fn try_fresh() -> Option<Self> {
        let database = care_sync_server::store::postgres::scratch::ScratchDatabase::from_env()?;
        let store: Arc<dyn ServerStore> = Arc::new(PostgresStore::open(&database.url).unwrap());
        Some(Postgres { database, store: Some(store) })
    }
}

impl Backend for Postgres {
    fn fresh() -> Self {
        Self::try_fresh().expect("checked by the caller")
    }
    fn store(&self) -> Arc<dyn ServerStore> {
        self.store.clone().unwrap()
    }
    fn another_instance(&self) -> Arc<dyn ServerStore> {
        Arc::new(PostgresStore::open(&self.database.url).unwrap())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // The store's connections go before its database is dropped.
        self.store = None;
    }
}

/// Instantiates every test of [`suite`] for one backend, in a module named after it.
macro_rules! store_suite {
    ($backend:ident: $make:expr => $($test:ident),* $(,)?) => {
        mod $backend {
            $(
                #[test]
                fn $test() {
                    let make: fn() -> Option<_> = $make;
                    match make() {
                        Some(backend) => super::suite::$test(&backend),
                        None => eprintln!("skipped: no database for this backend (see its Backend)"),
                    }
                }
            )*
        }
    };
}

macro_rules! every_backend {
    ($($test:ident),* $(,)?) => {
        store_suite!(sqlite: || Some(<super::Sqlite as super::Backend>::fresh()) => $($test),*);
        store_suite!(postgres: super::Postgres::try_fresh => $($test),*);
    };
}

every_backend!(
    an_enrolment_token_binds_one_key_once_even_raced_through_two_instances,
    revocation_and_wipe_are_recorded_once,
    of_the_devices_named_those_ever_revoked_or_asked_to_wipe_are_found_and_no_others,
    patients_are_found_by_nhs_number_and_every_write_moves_their_log_position,
    a_batch_commits_whole_or_not_at_all_with_its_import_progress,
    the_change_log_only_grows_and_compaction_moves_its_horizon_forward,
    the_scope_epoch_moves_with_everything_a_scope_depends_on_and_nothing_else,
    grants_lapse_and_close,
    the_audit_is_filtered_and_in_order,
    quarantine_reviews_and_alert_acknowledgements_happen_once,
    hospital_feeds_are_counted_and_their_refusals_kept_newest_first,
    a_feed_message_is_claimed_by_one_instance_at_a_time_until_done_or_its_lease_lapses,
    a_provisional_record_merges_into_its_person_once,
    round_settlement_confirms_what_the_device_applied,
    a_newer_session_of_a_device_fences_off_the_older_one_on_another_instance,
    the_server_identity_and_incarnation_are_made_once_and_rotate_by_staging,
    concurrent_writers_through_two_instances_lose_nothing_and_never_deadlock,
    writers_naming_documents_in_opposite_orders_through_two_instances_all_commit,
);

const T0: i64 = 1_800_000_000_000;

fn by_server() -> Provenance {
    Provenance::new("server", "GP record", "gp-feed", T0)
}

/// Stores `n` synthetic patients (their NHS numbers are the population's first `n`: once per
/// store).
fn patients(store: &dyn ServerStore, seed: u64, n: usize) -> Vec<PatientId> {
    let identity = store.server_identity().unwrap();
    let mut population =
        care_sync_server::demo::population::Population::new(seed, care_sync_server::server_actor(&identity));
    let mut summaries: Vec<_> = (0..n).map(|_| population.next_patient(T0).unwrap()).collect();
    store.insert_patients(&mut summaries).unwrap()
}

/// A change by the server to a stored patient: an allergy, or (`alert`) a DNACPR alert, which
/// changes the patient's risk flags.
fn server_change(store: &dyn ServerStore, patient: &PatientId, alert: bool) -> Vec<automerge::Change> {
    let identity = store.server_identity().unwrap();
    let mut doc = PatientSummary::load(&store.load_document(patient).unwrap().unwrap()).unwrap();
    doc.set_actor(care_sync_server::server_actor(&identity).to_bytes());
    let before = doc.heads();
    if alert {
        doc.add(&Alert::new("respect-dnacpr", "DNACPR", by_server())).unwrap();
    } else {
        doc.add(&Allergy::new("penicillin", by_server())).unwrap();
    }
    doc.changes_since(&before)
}

/// Stores a provisional record (no NHS number) with an allergy.
fn provisional(store: &dyn ServerStore, name: &str) -> PatientId {
    let actor = care_sync_server::server_actor(&store.server_identity().unwrap());
    let mut summary =
        PatientSummary::create(uuid::Uuid::new_v4(), &Demographics::new(name, None), actor, T0).unwrap();
    summary.add(&Allergy::new("latex", by_server())).unwrap();
    store.insert_patients(std::slice::from_mut(&mut summary)).unwrap()[0]
}

fn device(
    store: &dyn ServerStore,
    name: &str,
    role: Role,
    seed: u8,
) -> care_sync_server::store::DeviceRecord {
    let secret = [seed; 32];
    store.create_enrolment(name, role, secret, T0 + 3_600_000).unwrap();
    let key = care_node::identity::Identity::from_seed(&[seed; 32]).public_key();
    store.redeem_enrolment(secret, key, T0).unwrap()
}

mod suite {
    use super::*;

    pub fn an_enrolment_token_binds_one_key_once_even_raced_through_two_instances(b: &impl Backend) {
        let (a, other) = (b.store(), b.another_instance());
        let key = |n: u8| care_node::identity::Identity::from_seed(&[n; 32]).public_key();
        a.create_enrolment("tablet-1", Role::AmbulanceCrew, [1; 32], T0 + 1000).unwrap();
        assert_eq!(a.redeem_enrolment([7; 32], key(1), T0), Err(EnrolError::UnknownToken));
        assert_eq!(a.redeem_enrolment([1; 32], key(1), T0 + 1001), Err(EnrolError::Expired));
        let tablet = a.redeem_enrolment([1; 32], key(1), T0).unwrap();
        assert_eq!((tablet.name.as_str(), tablet.public_key), ("tablet-1", Some(key(1))));
        assert_eq!(other.redeem_enrolment([1; 32], key(2), T0), Err(EnrolError::AlreadyUsed));
        assert_eq!(other.device_by_key(&key(1)).unwrap().map(|d| d.id), Some(tablet.id));

        // A key already enrolled cannot enrol a second device.
        a.create_enrolment("tablet-2", Role::AmbulanceCrew, [2; 32], T0 + 1000).unwrap();
        assert_eq!(a.redeem_enrolment([2; 32], key(1), T0), Err(EnrolError::KeyInUse));

        // One token redeemed at once through two instances with two keys: one device, one key.
        for round in 0..20u8 {
            let name = format!("raced-{round}");
            a.create_enrolment(&name, Role::CommunityNurse, [100 + round; 32], T0 + 1000).unwrap();
            let (x, y) = (b.store(), b.another_instance());
            let (kx, ky) = (key(100 + round), key(200 - round));
            let tx = std::thread::spawn(move || x.redeem_enrolment([100 + round; 32], kx, T0));
            let ty = std::thread::spawn(move || y.redeem_enrolment([100 + round; 32], ky, T0));
            let results = [tx.join().unwrap(), ty.join().unwrap()];
            let won: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
            assert_eq!(won.len(), 1, "exactly one redemption succeeds: {results:?}");
            let stored = a.device_by_name(&name).unwrap().unwrap();
            assert_eq!(stored.public_key, won[0].public_key, "the stored key is the winner's");
            assert_eq!(a.redeem_enrolment([100 + round; 32], key(1), T0), Err(EnrolError::AlreadyUsed));
        }
    }

    pub fn revocation_and_wipe_are_recorded_once(b: &impl Backend) {
        let s = b.store();
        let d = device(&*s, "tablet", Role::AmbulanceCrew, 3);
        assert!(s.request_wipe("tablet", T0 + 1).unwrap());
        assert!(!s.request_wipe("tablet", T0 + 2).unwrap(), "asked already");
        assert!(s.revoke_device("tablet", T0 + 3).unwrap());
        assert!(!s.revoke_device("tablet", T0 + 4).unwrap(), "revoked already");
        let seen = b.another_instance().device_by_name("tablet").unwrap().unwrap();
        assert_eq!((seen.revoked_at_ms, seen.wipe_requested_at_ms), (Some(T0 + 3), Some(T0 + 1)));
        s.confirm_wipe(d.id, T0 + 5).unwrap();
        assert_eq!(s.device_by_name("tablet").unwrap().unwrap().wiped_at_ms, Some(T0 + 5));
        assert!(matches!(s.revoke_device("nobody", T0), Err(StoreError::UnknownDevice(_))));
        assert_eq!(s.devices().unwrap().len(), 1);
    }

    pub fn of_the_devices_named_those_ever_revoked_or_asked_to_wipe_are_found_and_no_others(
        b: &impl Backend,
    ) {
        let s = b.store();
        let quiet = device(&*s, "quiet", Role::AmbulanceCrew, 3);
        let early = device(&*s, "early", Role::AmbulanceCrew, 4);
        let revoked = device(&*s, "revoked", Role::CommunityNurse, 5);
        let asked = device(&*s, "asked", Role::AmbulanceCrew, 6);
        let wiped = device(&*s, "wiped", Role::AmbulanceCrew, 7);
        s.revoke_device("early", T0 - 365 * 24 * 3_600_000).unwrap();
        s.revoke_device("revoked", T0 + 10).unwrap();
        s.request_wipe("asked", T0 + 10).unwrap();
        s.request_wipe("wiped", T0 + 2).unwrap();
        s.confirm_wipe(wiped.id, T0 + 10).unwrap();
        let names = |ids: &[i64]| -> Vec<String> {
            b.another_instance().controlled_devices(ids).unwrap().into_iter().map(|d| d.name).collect()
        };
        let all = [quiet.id, early.id, revoked.id, asked.id, wiped.id];
        assert_eq!(names(&all), ["early", "revoked", "asked", "wiped"], "whenever, by whatever clock");
        assert_eq!(names(&[quiet.id, revoked.id, 999_999]), ["revoked"], "only the devices named");
        assert!(names(&[quiet.id]).is_empty());
        assert!(names(&[]).is_empty());
    }

    pub fn patients_are_found_by_nhs_number_and_every_write_moves_their_log_position(b: &impl Backend) {
        let s = b.store();
        let ids = patients(&*s, 1, 3);
        assert_eq!(s.patient_count().unwrap(), 3);
        let nhs =
            PatientSummary::load(&s.load_document(&ids[1]).unwrap().unwrap()).unwrap().nhs_number().unwrap();
        assert_eq!(s.patient_by_nhs(&nhs).unwrap(), Some(ids[1]));
        // The same person again is refused, not stored twice.
        let mut again = PatientSummary::create(
            uuid::Uuid::new_v4(),
            &Demographics::new("Someone", Some(nhs.as_str())),
            automerge::ActorId::random(),
            T0,
        )
        .unwrap();
        assert!(matches!(
            s.insert_patients(std::slice::from_mut(&mut again)),
            Err(StoreError::DuplicatePatient)
        ));
        assert_eq!(s.patient_count().unwrap(), 3);

        let before = s.document_seq(&ids[1]).unwrap().unwrap();
        s.apply_server_changes(&ids[1], &server_change(&*s, &ids[1], false)).unwrap();
        let (saved, after) = b.another_instance().load_document_seq(&ids[1]).unwrap().unwrap();
        assert!(after > before, "a write moves the document's log position");
        let mut summary = PatientSummary::load(&saved).unwrap();
        assert_eq!(
            summary
                .clinical_entries::<Allergy>()
                .unwrap()
                .iter()
                .filter(|a| a.data.substance == "penicillin")
                .count(),
            1
        );
        assert!(s.load_listed(&ids[1]).unwrap().unwrap().1.is_some(), "stored with its listing");
        assert_eq!(s.document_seq(&uuid::Uuid::new_v4()).unwrap(), None);
    }

    pub fn a_batch_commits_whole_or_not_at_all_with_its_import_progress(b: &impl Backend) {
        let s = b.store();
        let actor = care_sync_server::server_actor(&s.server_identity().unwrap());
        let mut population = care_sync_server::demo::population::Population::new(2, actor);
        let new = |p: &mut care_sync_server::demo::population::Population| {
            BatchWrite::NewPatient(Box::new(NewDocument::of(&mut p.next_patient(T0).unwrap()).unwrap()))
        };
        let progress = |offset| {
            BatchWrite::Progress(ImportProgress {
                source: "/imports/a.ndjson".into(),
                fingerprint: "1-2".into(),
                offset,
                line: offset,
                refused: 0,
            })
        };
        // The last write fails (changes to a patient that does not exist): nothing of it stays.
        let mut failing =
            vec![new(&mut population), progress(10), BatchWrite::Changes(uuid::Uuid::new_v4(), Vec::new())];
        let max_before = s.max_seq().unwrap();
        assert!(s.write_batch(&mut failing).is_err());
        assert_eq!(s.patient_count().unwrap(), 0);
        assert_eq!(s.import_progress("/imports/a.ndjson").unwrap(), None);
        assert_eq!(s.max_seq().unwrap(), max_before, "no change logged");

        let mut ok = vec![new(&mut population), new(&mut population), progress(20)];
        s.write_batch(&mut ok).unwrap();
        let other = b.another_instance();
        assert_eq!(other.patient_count().unwrap(), 2);
        assert_eq!(other.import_progress("/imports/a.ndjson").unwrap().map(|p| p.offset), Some(20));
        s.write_batch(&mut [progress(30)]).unwrap();
        assert_eq!(
            other.import_progress("/imports/a.ndjson").unwrap().map(|p| p.offset),
            Some(30),
            "replaced"
        );
    }

    pub fn the_change_log_only_grows_and_compaction_moves_its_horizon_forward(b: &impl Backend) {
        let s = b.store();
        let ids = patients(&*s, 3, 4);
        let start = s.max_seq().unwrap();
        assert!(start > 0, "creating patients logs their changes");
        for id in &ids[..2] {
            s.apply_server_changes(id, &server_change(&*s, id, false)).unwrap();
        }
        let mid = s.max_seq().unwrap();
        assert!(mid > start);
        let changed = s.changed_docs(start, mid).unwrap();
        assert_eq!(changed, ids[..2].iter().copied().collect());
        assert!(s.changed_docs(mid, mid).unwrap().is_empty());

        let below = s.log_below(start).unwrap();
        assert!(below.entries > 0 && below.bytes > 0);
        let dropped = s.compact_log(start).unwrap();
        assert_eq!(dropped, below);
        assert_eq!(s.log_horizon().unwrap(), start);
        assert_eq!(s.compact_log(start - 1).unwrap().entries, 0, "a lower horizon drops nothing");
        assert_eq!(s.log_horizon().unwrap(), start, "and never moves the horizon back");
        assert_eq!(s.max_seq().unwrap(), mid);
        // Every entry gone: the newest sequence number stays at the horizon, never below.
        s.compact_log(mid).unwrap();
        assert_eq!((s.max_seq().unwrap(), b.another_instance().log_horizon().unwrap()), (mid, mid));
        s.apply_server_changes(&ids[3], &server_change(&*s, &ids[3], false)).unwrap();
        assert!(s.max_seq().unwrap() > mid, "numbers after compaction are new");
        // Documents are whole after compaction: nothing of a patient is lost.
        let mut doc = PatientSummary::load(&s.load_document(&ids[0]).unwrap().unwrap()).unwrap();
        assert!(doc.clinical_entries::<Allergy>().unwrap().iter().any(|a| a.data.substance == "penicillin"));
    }

    pub fn the_scope_epoch_moves_with_everything_a_scope_depends_on_and_nothing_else(b: &impl Backend) {
        let s = b.store();
        let other = b.another_instance();
        let ids = patients(&*s, 4, 3);
        let nurse = device(&*s, "nurse", Role::CommunityNurse, 4);
        let mut epoch = s.scope_epoch().unwrap();
        let mut moves = |what: &str, expected: bool| {
            let now = other.scope_epoch().unwrap();
            assert_eq!(
                now > epoch,
                expected,
                "{what}: the scope epoch {}",
                if expected { "must move" } else { "must stay" }
            );
            assert!(now >= epoch, "{what}: the epoch went back");
            epoch = now;
        };
        s.caseload_add(nurse.id, &ids[0]).unwrap();
        moves("caseload add", true);
        s.caseload_remove(nurse.id, &ids[0]).unwrap();
        moves("caseload remove", true);
        s.caseload_add_many(&[(nurse.id, ids[1]), (nurse.id, ids[2])]).unwrap();
        moves("caseload add many", true);
        let g = s.grant(nurse.id, &ids[0], GrantKind::PermissionToView, "consented", T0 + 10, T0).unwrap();
        assert!(g > 0);
        moves("grant", true);
        s.close_grants(nurse.id, &ids[0], GrantKind::PermissionToView, T0 + 1).unwrap();
        moves("grant closed", true);
        s.area_add(nurse.id, "SO16").unwrap();
        moves("area add", true);
        s.area_add_many(&[(nurse.id, "SO17".into())]).unwrap();
        moves("area add many", true);
        s.area_remove(nurse.id, "SO16").unwrap();
        moves("area remove", true);
        s.set_setting("budget", "100").unwrap();
        moves("setting", true);
        s.set_device_budget(nurse.id, Some(50)).unwrap();
        moves("device budget", true);
        s.set_consent(&ids[1], ConsentFlags { objection: true, opt_out: false }).unwrap();
        moves("objection", true);
        provisional(&*s, "Unknown Female");
        moves("new patient", true);
        s.apply_server_changes(&ids[2], &server_change(&*s, &ids[2], true)).unwrap();
        moves("a risk flag (DNACPR alert)", true);

        // What no scope depends on leaves the epoch (and so every device's cached scope) alone.
        s.apply_server_changes(&ids[2], &server_change(&*s, &ids[2], false)).unwrap();
        moves("an allergy", false);
        s.append_audit("op", "look", Some(&ids[0]), "", T0).unwrap();
        moves("an audit line", false);
        s.feed_record("AA", "C1", "", T0).unwrap();
        s.hl7_record("C1", "A01", T0).unwrap();
        moves("a feed count", false);
        s.set_device_budget(nurse.id, Some(50)).unwrap();
        moves("the same budget again", false);
        let session = s.begin_session(nurse.id).unwrap();
        moves("a sync session begun", false);
        s.set_view_head(nurse.id, session, 3, [5; 32]).unwrap();
        moves("a view-log head", false);
        s.set_consent(&ids[1], ConsentFlags { objection: true, opt_out: true }).unwrap();
        moves("the national data opt-out (planning only)", false);
        let merged = provisional(&*s, "Unknown");
        moves("another new patient", true);
        s.merge_patients(&ids[0], &merged, "op", T0).unwrap();
        moves("a merge", true);
    }

    pub fn grants_lapse_and_close(b: &impl Backend) {
        let s = b.store();
        let ids = patients(&*s, 5, 2);
        let crew = device(&*s, "crew", Role::AmbulanceCrew, 5);
        s.grant(crew.id, &ids[0], GrantKind::BreakGlass, "unconscious", T0 + 100, T0).unwrap();
        s.grant(crew.id, &ids[1], GrantKind::Incident, "incident 7", T0 + 200, T0).unwrap();
        let active = |at| {
            let mut kinds: Vec<_> =
                b.another_instance().grants(Some(crew.id), at).unwrap().into_iter().map(|g| g.kind).collect();
            kinds.sort_by_key(|k| k.as_str());
            kinds
        };
        assert_eq!(active(T0 + 50), vec![GrantKind::BreakGlass, GrantKind::Incident]);
        assert_eq!(active(T0 + 150), vec![GrantKind::Incident], "lapsed at its expiry");
        assert_eq!(s.close_grants(crew.id, &ids[1], GrantKind::Incident, T0 + 160).unwrap(), 1);
        assert_eq!(
            s.close_grants(crew.id, &ids[1], GrantKind::Incident, T0 + 161).unwrap(),
            0,
            "closed once"
        );
        assert!(active(T0 + 170).is_empty());
        assert_eq!(
            s.grants(None, T0 + 50).unwrap().len(),
            1,
            "the closed one is not active even before its expiry"
        );
    }

    pub fn the_audit_is_filtered_and_in_order(b: &impl Backend) {
        let s = b.store();
        let ids = patients(&*s, 6, 2);
        let before = s.audit_entries(&AuditFilter::default()).unwrap().len();
        s.append_audit("alice", "view", Some(&ids[0]), "d1", T0 + 1).unwrap();
        b.another_instance().append_audit("bob", "view", Some(&ids[1]), "d2", T0 + 2).unwrap();
        s.append_audit("alice", "export", None, "d3", T0 + 3).unwrap();
        let all = s.audit_entries(&AuditFilter::default()).unwrap();
        assert_eq!(all.len(), before + 3);
        assert!(all.windows(2).all(|w| w[0].seq < w[1].seq), "in sequence order");
        let alice =
            s.audit_entries(&AuditFilter { actor: Some("alice".into()), ..Default::default() }).unwrap();
        assert_eq!(alice.iter().map(|a| a.detail.as_str()).collect::<Vec<_>>(), ["d1", "d3"]);
        let first = s.audit_entries(&AuditFilter { patient: Some(ids[0]), ..Default::default() }).unwrap();
        assert_eq!(
            first.iter().filter(|a| a.actor != "server").map(|a| a.detail.as_str()).collect::<Vec<_>>(),
            ["d1"]
        );
        let late = s.audit_entries(&AuditFilter { since_ms: Some(T0 + 2), ..Default::default() }).unwrap();
        assert_eq!(late.iter().map(|a| a.detail.as_str()).collect::<Vec<_>>(), ["d2", "d3"]);
    }

    pub fn quarantine_reviews_and_alert_acknowledgements_happen_once(b: &impl Backend) {
        let s = b.store();
        let ids = patients(&*s, 7, 1);
        let crew = device(&*s, "crew", Role::AmbulanceCrew, 7);
        let q = s.quarantine(crew.id, &ids[0], "no-delete", "allergies", &[vec![1, 2, 3]], T0).unwrap();
        assert_eq!(s.quarantine_count(crew.id, T0 - 1).unwrap(), 1);
        let item = b.another_instance().quarantined_item(q).unwrap().unwrap();
        assert_eq!(
            (item.device.as_str(), item.changes.clone(), item.reviewed),
            ("crew", vec![vec![1, 2, 3]], None)
        );
        assert!(s.review_quarantine(q, "checked", T0 + 1).unwrap());
        assert!(!s.review_quarantine(q, "again", T0 + 2).unwrap(), "the first review stands");
        assert_eq!(s.quarantined_item(q).unwrap().unwrap().reviewed.map(|r| r.note), Some("checked".into()));
        assert_eq!(s.quarantine_count(crew.id, T0 - 1).unwrap(), 0, "reviewed items do not count");
        assert_eq!(s.quarantined(None).unwrap().len(), 1, "kept after review");
        assert!(!s.review_quarantine(q + 1000, "none", T0).unwrap());

        let a = s.raise_alert("break-glass", Some(crew.id), Some(&ids[0]), "unconscious", T0).unwrap();
        assert_eq!(s.alerts(false).unwrap().len(), 1);
        assert!(b.another_instance().acknowledge_alert(a, "reviewed", T0 + 1).unwrap());
        assert!(!s.acknowledge_alert(a, "again", T0 + 2).unwrap());
        assert!(s.alerts(false).unwrap().is_empty());
        assert_eq!(s.alerts(true).unwrap()[0].note.as_deref(), Some("reviewed"));
    }

    pub fn a_feed_message_is_claimed_by_one_instance_at_a_time_until_done_or_its_lease_lapses(
        b: &impl Backend,
    ) {
        use care_sync_server::store::{HL7_CLAIM_LEASE_MS, Hl7Claim};
        // Times far ahead of any clock, so the lease follows them (PostgreSQL times a lease by
        // its own clock unless the caller's is ahead).
        const T: i64 = 4_000_000_000_000;
        let (s, other) = (b.store(), b.another_instance());
        let claimed = |c: Hl7Claim| matches!(c, Hl7Claim::Claimed(_));
        assert!(claimed(s.hl7_claim("C1", "A01", T).unwrap()));
        // The same retransmission on another instance meanwhile: busy, not applied twice.
        assert_eq!(other.hl7_claim("C1", "A01", T + 5).unwrap(), Hl7Claim::Busy);
        assert!(!other.hl7_seen("C1").unwrap(), "claimed is not applied");
        s.hl7_record("C1", "A01", T + 10).unwrap();
        assert_eq!(other.hl7_claim("C1", "A01", T + 20).unwrap(), Hl7Claim::Done);
        assert!(other.hl7_seen("C1").unwrap());
        // A refused message is released: a resend is applied afresh.
        let Hl7Claim::Claimed(first) = s.hl7_claim("C2", "A01", T).unwrap() else { panic!("claimed") };
        s.hl7_release("C2", first).unwrap();
        let Hl7Claim::Claimed(second) = other.hl7_claim("C2", "A01", T + 1).unwrap() else {
            panic!("claimed")
        };
        // A release never undoes a message that was applied.
        s.hl7_release("C1", first).unwrap();
        assert!(s.hl7_seen("C1").unwrap());
        // The holder died: its claim lapses after the lease, not before.
        assert_eq!(s.hl7_claim("C2", "A01", T + HL7_CLAIM_LEASE_MS).unwrap(), Hl7Claim::Busy);
        let Hl7Claim::Claimed(third) = s.hl7_claim("C2", "A01", T + 1 + HL7_CLAIM_LEASE_MS).unwrap() else {
            panic!("a lapsed claim is taken over")
        };
        assert_eq!(other.hl7_claim("C2", "A01", T + 2 + HL7_CLAIM_LEASE_MS).unwrap(), Hl7Claim::Busy);
        // The first holder's late release leaves the new holder's claim alone.
        other.hl7_release("C2", second).unwrap();
        assert_eq!(other.hl7_claim("C2", "A01", T + 3 + HL7_CLAIM_LEASE_MS).unwrap(), Hl7Claim::Busy);
        s.hl7_release("C2", third).unwrap();
        assert!(claimed(other.hl7_claim("C2", "A01", T + 4 + HL7_CLAIM_LEASE_MS).unwrap()));
    }

    pub fn hospital_feeds_are_counted_and_their_refusals_kept_newest_first(b: &impl Backend) {
        let s = b.store();
        assert!(!s.hl7_seen("M1").unwrap());
        s.hl7_record("M1", "A01", T0).unwrap();
        assert!(b.another_instance().hl7_seen("M1").unwrap());
        s.feed_record("AA", "M1", "", T0).unwrap();
        let kept = care_sync_server::store::FEED_ERRORS_KEPT;
        for n in 0..kept + 5 {
            s.feed_record("AE", &format!("E{n}"), "unknown ward", T0 + 1 + n as i64).unwrap();
        }
        s.feed_record("AR", "R1", "not HL7", T0 + 1000).unwrap();
        let status = s.feed_status().unwrap();
        assert_eq!((status.accepted, status.errors, status.rejected), (1, kept as u64 + 5, 1));
        assert_eq!(status.last_message_ms, Some(T0 + 1000));
        assert_eq!(status.recent_refusals.len(), kept);
        assert_eq!(status.recent_refusals[0].control_id, "R1", "newest first");
        assert_eq!(status.recent_refusals[1].control_id, format!("E{}", kept + 4));
    }

    pub fn a_provisional_record_merges_into_its_person_once(b: &impl Backend) {
        let s = b.store();
        let keep = patients(&*s, 8, 1)[0];
        let merged = provisional(&*s, "Unknown Male");
        let nurse = device(&*s, "nurse", Role::CommunityNurse, 8);
        s.caseload_add(nurse.id, &merged).unwrap();

        assert!(matches!(s.merge_patients(&keep, &keep, "op", T0), Err(StoreError::Merge(_))));
        let outcome = s.merge_patients(&keep, &merged, "op", T0).unwrap();
        assert!(outcome.entries_moved >= 1);
        assert_eq!(outcome.caseloads_moved, 1);
        let other = b.another_instance();
        assert_eq!(other.merged_into(&merged).unwrap(), Some(keep));
        assert_eq!(other.caseload(nurse.id).unwrap(), vec![keep]);
        let mut kept = PatientSummary::load(&other.load_document(&keep).unwrap().unwrap()).unwrap();
        assert!(kept.clinical_entries::<Allergy>().unwrap().iter().any(|a| a.data.substance == "latex"));
        // Merged away, it cannot be kept nor merged into another record; merging it into the
        // same record again (a retried command) moves nothing twice.
        let third = provisional(&*s, "Someone Else");
        assert!(matches!(s.merge_patients(&merged, &third, "op", T0 + 1), Err(StoreError::Merge(_))));
        assert!(matches!(s.merge_patients(&third, &merged, "op", T0 + 1), Err(StoreError::Merge(_))));
        let again = s.merge_patients(&keep, &merged, "op", T0 + 2).unwrap();
        assert_eq!((again.entries_moved, again.caseloads_moved), (0, 0));
        let mut kept = PatientSummary::load(&s.load_document(&keep).unwrap().unwrap()).unwrap();
        assert_eq!(
            kept.clinical_entries::<Allergy>()
                .unwrap()
                .iter()
                .filter(|a| a.data.substance == "latex")
                .count(),
            1
        );
    }

    pub fn round_settlement_confirms_what_the_device_applied(b: &impl Backend) {
        let s = b.store();
        let ids = patients(&*s, 9, 4);
        let crew = device(&*s, "crew", Role::AmbulanceCrew, 9);
        let session = s.begin_session(crew.id).unwrap();
        s.record_round_page(crew.id, session, 1, false, &ids[..2], &[]).unwrap();
        assert_eq!(s.pending_round(crew.id).unwrap(), Some(1));
        assert!(s.held(crew.id).unwrap().is_empty(), "nothing held before the device confirms");
        s.settle_round(crew.id, session, 1, RoundOutcome::Complete, T0).unwrap();
        assert_eq!(b.another_instance().held(crew.id).unwrap(), ids[..2].iter().copied().collect());
        assert_eq!(s.pending_round(crew.id).unwrap(), None);
        assert_eq!(s.held_counts().unwrap().get(&crew.id), Some(&2));

        // A round applied by the device up to its first document, and one applied not at all.
        s.record_round_page(crew.id, session, 2, false, &ids[2..], &[ids[0]]).unwrap();
        s.settle_round(crew.id, session, 2, RoundOutcome::Nothing, T0 + 1).unwrap();
        assert_eq!(
            s.held(crew.id).unwrap(),
            ids[..2].iter().copied().collect(),
            "nothing applied, nothing changed"
        );
        // A round's documents go in patient id order; `through` names the last one applied.
        let mut rest = ids[2..].to_vec();
        rest.sort();
        s.record_round_page(crew.id, session, 3, false, &rest, &[]).unwrap();
        s.settle_round(
            crew.id,
            session,
            3,
            RoundOutcome::Through { priority: false, through: rest[0] },
            T0 + 2,
        )
        .unwrap();
        assert!(s.held(crew.id).unwrap().contains(&rest[0]));
        assert!(!s.held(crew.id).unwrap().contains(&rest[1]), "after `through`: not applied");

        // Changes for the device: only to documents it holds.
        let start = s.max_seq().unwrap();
        for id in &ids {
            s.apply_server_changes(id, &server_change(&*s, id, false)).unwrap();
        }
        let changes = s.changes_for_device(crew.id, start, s.max_seq().unwrap()).unwrap();
        let held = s.held(crew.id).unwrap();
        assert_eq!(changes.keys().copied().collect::<std::collections::HashSet<_>>(), held);
        assert!(changes.values().all(|c| c.windows(2).all(|w| w[0].0 < w[1].0)), "in sequence order");
    }

    /// A device reconnected to another instance while its old session there still runs (the
    /// instance has not noticed the device is gone): the old session's writes of the round
    /// state are refused and change nothing of what the new one wrote.
    pub fn a_newer_session_of_a_device_fences_off_the_older_one_on_another_instance(b: &impl Backend) {
        use care_sync_server::store::{ScopeCache, StoreError};
        let (s, other) = (b.store(), b.another_instance());
        let ids = patients(&*s, 17, 4);
        let crew = device(&*s, "crew", Role::AmbulanceCrew, 17);
        let old = s.begin_session(crew.id).unwrap();
        s.record_round_page(crew.id, old, 1, false, &ids[..2], &[]).unwrap();
        // The device comes back through the other instance.
        let new = other.begin_session(crew.id).unwrap();
        assert!(new > old);
        other.settle_round(crew.id, new, 1, RoundOutcome::Nothing, T0).unwrap();
        other.record_round_page(crew.id, new, 2, false, &ids[2..], &[]).unwrap();
        let cache = ScopeCache { epoch: 1, valid_until_ms: T0, in_scope: 4, left_out: 0 };
        // The stale session: every write refused.
        let superseded = |r: Result<(), StoreError>| matches!(r, Err(StoreError::Superseded));
        assert!(superseded(s.record_round_page(crew.id, old, 1, false, &ids[..2], &[])));
        assert!(superseded(s.settle_round(crew.id, old, 1, RoundOutcome::Complete, T0 + 1)));
        assert!(superseded(s.set_scope_cache(crew.id, old, &cache)));
        other.set_view_head(crew.id, new, 4, [4; 32]).unwrap();
        assert!(superseded(s.set_view_head(crew.id, old, 2, [2; 32])));
        assert_eq!(s.view_head(crew.id).unwrap(), (4, [4; 32]), "the view-log head never moves back");
        assert_eq!(s.pending_round(crew.id).unwrap(), Some(2), "the new session's round stands");
        assert!(s.held(crew.id).unwrap().is_empty(), "the stale settlement confirmed nothing");
        assert_eq!(s.scope_cache(crew.id).unwrap(), None);
        // The new one goes on.
        other.settle_round(crew.id, new, 2, RoundOutcome::Complete, T0 + 2).unwrap();
        other.set_scope_cache(crew.id, new, &cache).unwrap();
        assert_eq!(s.held(crew.id).unwrap(), ids[2..].iter().copied().collect());
        assert_eq!(s.scope_cache(crew.id).unwrap(), Some(cache));
    }

    pub fn concurrent_writers_through_two_instances_lose_nothing_and_never_deadlock(b: &impl Backend) {
        let s = b.store();
        let ids = patients(&*s, 13, 4);
        let nurse = device(&*s, "nurse", Role::CommunityNurse, 13);
        // Two instances write allergies to the same four patients at once, a third writes
        // risk flags (which move the scope epoch), new patients and caseloads meanwhile.
        let writers: Vec<_> = (0..2)
            .map(|w| {
                let (store, ids) = (if w == 0 { b.store() } else { b.another_instance() }, ids.clone());
                std::thread::spawn(move || {
                    for i in 0..12 {
                        let id = ids[(i + w) % ids.len()];
                        // An actor of each writer's own: two writers as one actor from stale
                        // copies would make different changes with one sequence number.
                        let mut doc =
                            PatientSummary::load(&store.load_document(&id).unwrap().unwrap()).unwrap();
                        doc.set_actor(&[0xa0 + w as u8; 32]);
                        let before = doc.heads();
                        doc.add(&Allergy::new(&format!("substance-{w}-{i}"), by_server())).unwrap();
                        store.apply_server_changes(&id, &doc.changes_since(&before)).unwrap();
                    }
                })
            })
            .collect();
        let other = b.another_instance();
        for i in 0..4 {
            other.apply_server_changes(&ids[i], &server_change(&*other, &ids[i], true)).unwrap();
            let new = provisional(&*other, "Unknown");
            other.caseload_add_many(&[(nurse.id, new), (nurse.id, ids[3 - i])]).unwrap();
        }
        writers.into_iter().for_each(|w| w.join().unwrap());
        let mut written = 0;
        for id in &ids {
            let mut doc = PatientSummary::load(&s.load_document(id).unwrap().unwrap()).unwrap();
            written += doc
                .clinical_entries::<Allergy>()
                .unwrap()
                .iter()
                .filter(|a| a.data.substance.starts_with("substance-"))
                .count();
        }
        assert_eq!(written, 24, "every allergy written through either instance is kept, once");
        assert_eq!(
            s.log_below(s.max_seq().unwrap()).unwrap().entries,
            s.max_seq().unwrap(),
            "a log without gaps"
        );
    }

    /// Each writer locks the documents it changes in one order (and, on PostgreSQL, numbers its
    /// changes last), so uploads and batches naming the same documents in opposite orders,
    /// through two instances at once, all commit: none deadlocks, none is lost, the log has no
    /// gap.
    pub fn writers_naming_documents_in_opposite_orders_through_two_instances_all_commit(b: &impl Backend) {
        let s = b.store();
        let ids = patients(&*s, 14, 4);
        let crew = device(&*s, "crew", Role::CommunityNurse, 14);
        const ROUNDS: usize = 8;
        let writers: Vec<_> = (0..2)
            .map(|w| {
                let (store, crew) = (if w == 0 { b.store() } else { b.another_instance() }, crew.clone());
                let order: Vec<PatientId> =
                    if w == 0 { ids.clone() } else { ids.iter().rev().copied().collect() };
                std::thread::spawn(move || {
                    for i in 0..ROUNDS {
                        // A device's upload of all four documents, checked against what it read;
                        // read again while another writer moved one of them.
                        loop {
                            let checked: Vec<CheckedChanges> = order
                                .iter()
                                .map(|id| {
                                    let mut doc =
                                        PatientSummary::load(&store.load_document(id).unwrap().unwrap())
                                            .unwrap();
                                    doc.set_actor(&[0xb0 + w as u8; 32]);
                                    let before = doc.heads();
                                    doc.add(&Allergy::new(&format!("upload-{w}-{i}"), by_server())).unwrap();
                                    CheckedChanges {
                                        doc: *id,
                                        changes: doc.changes_since(&before),
                                        checked_at: before,
                                    }
                                })
                                .collect();
                            match store.commit_device_changes(&crew, &checked) {
                                Ok(outcome) => break assert_eq!(outcome.accepted, 4),
                                Err(UploadError::Moved(_)) => continue,
                                Err(e) => panic!("upload {w}-{i} failed: {e}"),
                            }
                        }
                        // A server batch of the same documents in the same order.
                        let mut writes: Vec<BatchWrite> = order
                            .iter()
                            .map(|id| {
                                let mut doc =
                                    PatientSummary::load(&store.load_document(id).unwrap().unwrap()).unwrap();
                                doc.set_actor(&[0xc0 + w as u8; 32]);
                                let before = doc.heads();
                                doc.add(&Allergy::new(&format!("batch-{w}-{i}"), by_server())).unwrap();
                                BatchWrite::Changes(*id, doc.changes_since(&before))
                            })
                            .collect();
                        store.write_batch(&mut writes).unwrap();
                    }
                })
            })
            .collect();
        writers.into_iter().for_each(|w| w.join().unwrap());
        for id in &ids {
            let mut doc = PatientSummary::load(&s.load_document(id).unwrap().unwrap()).unwrap();
            let mut written: Vec<String> = doc
                .clinical_entries::<Allergy>()
                .unwrap()
                .into_iter()
                .map(|a| a.data.substance)
                .filter(|s| s.starts_with("upload-") || s.starts_with("batch-"))
                .collect();
            written.sort();
            let mut expected: Vec<String> = (0..2)
                .flat_map(|w| {
                    (0..ROUNDS).flat_map(move |i| [format!("upload-{w}-{i}"), format!("batch-{w}-{i}")])
                })
                .collect();
            expected.sort();
            assert_eq!(written, expected, "every write to the document is kept, once");
        }
        let newest = s.max_seq().unwrap();
        assert_eq!(s.log_below(newest).unwrap().entries, newest, "a log without gaps");
    }

    pub fn the_server_identity_and_incarnation_are_made_once_and_rotate_by_staging(b: &impl Backend) {
        let s = b.store();
        let id = s.server_identity().unwrap().public_key();
        let other = b.another_instance();
        assert_eq!(other.server_identity().unwrap().public_key(), id, "one identity for every instance");
        assert_eq!(other.incarnation().unwrap(), s.incarnation().unwrap());
        assert!(s.next_server_identity().unwrap().is_none());
        let staged = s.stage_server_key().unwrap().public_key();
        assert_eq!(
            other.stage_server_key().unwrap().public_key(),
            staged,
            "staging again keeps the staged key"
        );
        assert!(s.cancel_server_key().unwrap());
        assert!(!s.cancel_server_key().unwrap());
        let next = s.stage_server_key().unwrap().public_key();
        assert_eq!(s.activate_server_key().unwrap().public_key(), next);
        assert_eq!(other.server_identity().unwrap().public_key(), next);
    }
}

/// A store made by release 0.1, before migrations were recorded (made with that release's
/// `care-sync-server`: 12 generated patients, 2 devices, a caseload, an area, an opt-out, a
/// budget setting, 30 ADT messages; then `backup`).
#[test]
fn a_store_made_before_numbered_migrations_is_adopted_and_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/store-0.1-before-migrations.db");
    std::fs::copy(&fixture, dir.path().join("server.db")).unwrap();
    let counts = |path: &std::path::Path| -> Vec<i64> {
        let conn = rusqlite::Connection::open(path).unwrap();
        ["patients", "changes", "devices", "audit", "caseload", "device_areas", "hl7_messages"]
            .iter()
            .map(|t| conn.query_row(&format!("SELECT count(*) FROM {t}"), [], |r| r.get(0)).unwrap())
            .collect()
    };
    let before = counts(&fixture);
    let store = SqliteStore::open(dir.path()).unwrap();
    assert_eq!(
        store.schema_steps().unwrap(),
        vec![(1, "initial".to_string()), (2, "hl7_claims".to_string()), (3, "session_fence".to_string())]
    );
    assert_eq!(counts(&dir.path().join("server.db")), before, "nothing lost or added by the upgrade");

    // What it held reads as before, and it takes new writes.
    assert_eq!(store.patient_count().unwrap(), 15);
    let nurse = store.device_by_name("nurse-1").unwrap().unwrap();
    assert_eq!(store.caseload(nurse.id).unwrap().len(), 1);
    assert_eq!(store.areas(store.device_by_name("ambulance-1").unwrap().unwrap().id).unwrap(), ["SO16"]);
    assert_eq!(store.setting("budget").unwrap().as_deref(), Some("5000"));
    let opted_out =
        store.patient_ids().unwrap().into_iter().filter(|(id, _)| store.consent(id).unwrap().opt_out).count();
    assert_eq!(opted_out, 1);
    assert!(store.hl7_seen("F29").unwrap());
    let id = store.patient_ids().unwrap()[0].0;
    let seq = store.document_seq(&id).unwrap().unwrap();
    store.apply_server_changes(&id, &server_change(&store, &id, false)).unwrap();
    assert!(store.document_seq(&id).unwrap().unwrap() > seq);
    drop(store);
    // Opened again: no step runs twice.
    assert_eq!(SqliteStore::open(dir.path()).unwrap().schema_steps().unwrap().len(), 3);
}

/// TLS to the database. `.ci/postgres`'s cluster takes TLS connections only (pg_hba `hostssl`),
/// with a certificate from a CA of its own that the cluster URL names
/// (`sslmode=require&sslrootcert=…`), so every PostgreSQL test already connects over verified
/// TLS. Here: that works; the same URL without the CA is refused, saying how to name it (the
/// certificate is verified, against the system's roots then); and without TLS the cluster
/// refuses the connection, so the tests' connections were encrypted.
#[test]
fn postgres_connections_use_tls_verified_against_the_url_s_root_certificate() {
    let Some(pg) = Postgres::try_fresh() else { return eprintln!("skipped: no PostgreSQL") };
    let url = pg.database.url.clone();
    if !url.contains("sslrootcert=") {
        assert!(
            std::env::var("CARE_SYNC_REQUIRE_POSTGRES").map_or(true, |v| v != "1"),
            "CI's cluster (.ci/postgres) names its CA in CARE_SYNC_POSTGRES_URL: {}",
            care_sync_server::store::redact_url(&url)
        );
        return eprintln!("skipped: the cluster's URL names no sslrootcert (a cluster without TLS)");
    }
    let (base, query) = url.split_once('?').unwrap();
    let without = |key: &str| query.split('&').filter(|p| !p.starts_with(key)).collect::<Vec<_>>().join("&");
    assert_eq!(PostgresStore::open(&url).unwrap().devices().unwrap().len(), 0, "over TLS, verified");

    let e = PostgresStore::open(&format!("{base}?{}", without("sslrootcert="))).expect_err("not trusted");
    assert!(e.to_string().contains("not trusted") && e.to_string().contains("sslrootcert=PATH"), "{e}");

    let plain = format!("{base}?{}", without("sslrootcert=").replace("sslmode=require", "sslmode=disable"));
    let e = PostgresStore::open(&plain).expect_err("the cluster takes TLS only");
    assert!(format!("{e} {e:?}").contains("no encryption"), "{e:?}");
}

/// Issue 12's skipped-sequence hazard, made to happen if it can: two instances write at once,
/// one holding each transaction open for 300 ms after its changes are numbered (a trigger made
/// for this test sleeps after each insert into the log), while a reader follows the log as a
/// device's cursor does. At every read, the log below the newest number holds every number
/// (none committed later can appear below a cursor), and at the end each change is there once.
#[test]
fn postgres_log_numbers_are_never_skipped_by_a_cursor_while_two_instances_write_slowly() {
    let Some(pg) = Postgres::try_fresh() else { return eprintln!("skipped: no PostgreSQL") };
    care_sync_server::store::postgres::scratch::execute(
        &pg.database.url,
        "CREATE FUNCTION test_slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_sleep(coalesce(nullif(current_setting('care_sync.test_delay', true), ''), '0')::float); RETURN NULL; END $$;
         CREATE TRIGGER test_slow_commit AFTER INSERT ON changes FOR EACH STATEMENT EXECUTE FUNCTION test_slow_commit();",
    )
    .unwrap();
    let store = pg.store();
    let ids = patients(&*store, 12, 20);
    // One instance holds each transaction 300 ms after numbering, the other not at all: with
    // numbers from a SEQUENCE, the fast one's later numbers would commit first, a gap below.
    let url = &pg.database.url;
    let slow =
        format!("{url}{}options=-c%20care_sync.test_delay%3D0.3", if url.contains('?') { '&' } else { '?' });
    let writers: Vec<_> = [(&slow, &ids[..4]), (&pg.database.url, &ids[4..])]
        .into_iter()
        .map(|(url, chunk)| {
            let (instance, chunk): (Arc<dyn ServerStore>, Vec<PatientId>) =
                (Arc::new(PostgresStore::open(url).unwrap()), chunk.to_vec());
            std::thread::spawn(move || {
                for id in &chunk {
                    instance.apply_server_changes(id, &server_change(&*instance, id, false)).unwrap();
                }
            })
        })
        .collect();
    let reader = pg.another_instance();
    let (mut reads, mut cursor, mut seen) =
        (0, reader.log_horizon().unwrap(), std::collections::HashSet::new());
    while writers.iter().any(|w| !w.is_finished()) {
        let newest = reader.max_seq().unwrap();
        assert_eq!(
            reader.log_below(newest).unwrap().entries,
            newest,
            "every number up to {newest} is in the log"
        );
        seen.extend(reader.changed_docs(cursor, newest).unwrap());
        cursor = newest;
        reads += 1;
    }
    writers.into_iter().for_each(|w| w.join().unwrap());
    let newest = reader.max_seq().unwrap();
    seen.extend(reader.changed_docs(cursor, newest).unwrap());
    assert_eq!(seen, ids.iter().copied().collect(), "the cursor met every document's change");
    assert_eq!(reader.log_below(newest).unwrap().entries, newest);
    assert!(reads > 5, "the reader read while the writers were slow ({reads} reads)");
}
