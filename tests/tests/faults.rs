//! Hard faults that must lose nothing: the disk under the server's store, or under a device's,
//! fills up in the middle of a sync. The sync fails with an error that says so, every write
//! acknowledged before stays, the store opens afterwards, and the next sync once there is space
//! again finishes the work without sending twice what already arrived.
//!
//! The disks are small tmpfs mounts of their own ([`SmallDisk`]): real `ENOSPC` from the
//! kernel, wherever SQLite meets it (the database, its write-ahead log, its shared memory).

use care_node::client::ClientError;
use care_node::store::{DeviceStore, StoreError};
use care_node::sync::SyncError;
use care_sync_e2e::{PASSPHRASE, SmallDisk, TestDevice, TestServer, admit_over_mllp, cheap_wrapper, within};
use care_sync_server::store::Role;

const MIB: u64 = 1 << 20;

/// Empties the server's write-ahead log into its database, so that every later write needs
/// new blocks of the disk (an old log's blocks are otherwise reused, and a full disk goes
/// unnoticed until the log outgrows them).
fn empty_write_ahead_log(server: &TestServer) {
    let db =
        rusqlite::Connection::open(server.data_dir().join("server.db")).expect("open the server's database");
    let busy: i64 = db.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0)).expect("checkpoint");
    assert_eq!(busy, 0, "the checkpoint finished");
}

/// Space returns: the next sync completes the round the full disk cut, bringing only what had
/// not arrived (`applied` of `total` had).
async fn completes_once_space_returns(
    disk: &mut SmallDisk,
    device: &mut TestDevice,
    total: usize,
    applied: usize,
) {
    disk.free();
    let report = within(120, device.sync()).await.expect("the sync after space returns");
    assert_eq!(device.store.document_count().unwrap() as usize, total, "nothing missing");
    assert_eq!(
        report.stats.documents_received as usize,
        total - applied,
        "documents stored before the disk filled are not sent again"
    );
}

fn storage_full(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Store(StoreError::StorageFull)
            | ClientError::Sync(SyncError::Store(StoreError::StorageFull))
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_on_the_server_fails_syncs_clearly_and_loses_nothing() {
    let Some(mut disk) = SmallDisk::mount(32 * MIB) else { return };
    const PATIENTS: usize = 400;
    let server = TestServer::start_in(disk.path(), PATIENTS).await;
    let mut recorder = TestDevice::enrolled(&server, "nurse-recorder", Role::CommunityNurse).await;
    server.caseload("nurse-recorder", [0]);
    within(60, recorder.sync()).await.expect("first sync");
    let nhs = server.patients[0].clone();
    let recorded: Vec<String> = (0..30).map(|i| format!("Substance {i}")).collect();
    for substance in &recorded {
        recorder.add_allergy(&nhs, substance);
    }
    let pending = recorder.store.pending_count().unwrap();
    assert!(pending >= 30, "the offline entries wait to upload ({pending})");

    // The disk fills: the upload fails, says why, and the device keeps every entry.
    empty_write_ahead_log(&server);
    disk.fill(0);
    let failed = within(60, recorder.sync()).await.expect_err("a sync onto a full disk fails");
    assert!(
        matches!(&failed, ClientError::ServerUnavailable(m) if m.contains("storage is full")),
        "the device is told the server's storage is full: {failed}"
    );
    assert!(failed.to_string().contains("nothing on this device was lost"), "{failed}");
    assert_eq!(recorder.store.pending_count().unwrap(), pending, "every entry still waits to upload");
    // A hospital's admission meanwhile is answered AE (not AA), so the feed keeps it to resend.
    let mllp =
        care_sync_server::ingest::hl7::mllp::start(server.store.clone(), "127.0.0.1:0".parse().unwrap())
            .await
            .expect("MLLP listener");
    let ack = admit_over_mllp(mllp.addr, &nhs, "FULL1").await;
    assert!(ack.contains("MSA|AE|FULL1") && ack.contains("storage is full"), "{ack}");
    disk.free();
    let ack = admit_over_mllp(mllp.addr, &nhs, "FULL1").await;
    assert!(ack.contains("MSA|AA|FULL1"), "the resent admission is stored once there is space: {ack}");
    mllp.stop();

    // Space returns: the same device uploads everything, once.
    let report = within(60, recorder.sync()).await.expect("the sync after space returns");
    assert_eq!(recorder.store.pending_count().unwrap(), 0, "all uploaded");
    assert!(report.stats.uploaded_changes >= 30, "{:?}", report.stats);

    // Mid-round: a colleague's cold sync of the whole caseload runs out of disk part-way.
    let mut colleague = TestDevice::enrolled(&server, "nurse-colleague", Role::CommunityNurse).await;
    server.caseload("nurse-colleague", 0..PATIENTS);
    empty_write_ahead_log(&server);
    disk.fill(48 * 1024);
    let failed = within(60, colleague.sync()).await.expect_err("the round runs out of disk");
    assert!(
        matches!(&failed, ClientError::ServerUnavailable(m) if m.contains("storage is full")),
        "{failed}"
    );
    let applied = colleague.store.document_count().unwrap() as usize;
    assert!(0 < applied && applied < PATIENTS, "the disk filled mid-round ({applied} of {PATIENTS} arrived)");
    completes_once_space_returns(&mut disk, &mut colleague, PATIENTS, applied).await;
    let mut seen = colleague.allergies(&nhs);
    seen.retain(|s| s.starts_with("Substance "));
    seen.sort();
    let mut expected = recorded.clone();
    expected.sort();
    assert_eq!(seen, expected, "every entry recorded offline is in the shared record, once");

    // The store opens afterwards (a restart after the incident) and has it all.
    let reopened =
        care_sync_server::store::sqlite::SqliteStore::open(server.data_dir()).expect("the store opens");
    use care_sync_server::store::PatientRecords;
    assert_eq!(reopened.patient_ids().unwrap().len(), PATIENTS);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_on_a_device_fails_the_sync_clearly_and_loses_nothing() {
    let Some(mut disk) = SmallDisk::mount(8 * MIB) else { return };
    const PATIENTS: usize = 1_500;
    let server = TestServer::start(PATIENTS).await;
    let mut tablet = TestDevice::new_in("tablet", disk.path());
    care_node::client::enrol(&mut tablet.store, &server.token("tablet", Role::CommunityNurse))
        .await
        .expect("enrol");
    server.caseload("tablet", [0]);
    within(60, tablet.sync()).await.expect("first sync");
    let nhs = server.patients[0].clone();
    tablet.add_allergy(&nhs, "Latex");

    // The whole caseload arrives onto a disk with 1 MiB left: it runs out part-way.
    server.caseload("tablet", 1..PATIENTS);
    disk.fill(MIB);
    let failed = within(120, tablet.sync()).await.expect_err("the round runs out of disk");
    assert!(storage_full(&failed), "the sync says the device's storage is full: {failed}");
    assert!(failed.to_string().contains("storage is full"), "{failed}");

    // Still full: the store opens, holds what arrived, and the entry recorded offline.
    let TestDevice { store, path, .. } = &mut tablet;
    drop(std::mem::replace(
        store,
        DeviceStore::open(path, &cheap_wrapper(PASSPHRASE)).expect("opens while full"),
    ));
    let applied = tablet.store.document_count().unwrap() as usize;
    assert!(1 < applied && applied < PATIENTS, "the disk filled mid-round ({applied} of {PATIENTS} held)");
    assert_eq!(
        tablet.allergies(&nhs).iter().filter(|s| *s == "Latex").count(),
        1,
        "the offline entry is kept"
    );

    // Space returns: the round completes and brings only what was missing.
    completes_once_space_returns(&mut disk, &mut tablet, PATIENTS, applied).await;
    assert_eq!(tablet.store.pending_count().unwrap(), 0, "the offline entry uploaded");
    let mut colleague = TestDevice::enrolled(&server, "colleague", Role::CommunityNurse).await;
    server.caseload("colleague", [0]);
    within(60, colleague.sync()).await.expect("colleague syncs");
    assert_eq!(colleague.allergies(&nhs).iter().filter(|s| *s == "Latex").count(), 1, "uploaded once");
}
