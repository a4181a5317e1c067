//! `care-sync-bench`: sync figures on this machine, printed as a table.
//!
//! For each N (default 1,000 and 10,000; add 100000 on the command line) it builds a server with
//! N synthetic patients, enrols one device with all of them in scope and measures over real QUIC
//! on loopback: the cold sync; reconnects with 0, 1 and 100 documents changed; the device store
//! size against plain Automerge; and the per-document floor (Automerge load and save,
//! XChaCha20-Poly1305, SQLite insert) that the cold sync is compared with.
//!
//! Run it optimised: `cargo run --release -p care-sync-server --bin care-sync-bench [N...]`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use care_node::client;
use care_node::crypto::{DataKey, KdfParams, PassphraseWrapper};
use care_node::store::DeviceStore;
use care_node::summary::{Allergy, PatientSummary, Provenance};
use care_sync_server::population::Population;
use care_sync_server::sqlite::SqliteStore;
use care_sync_server::store::{Role, ServerStore};

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| l.to_string()))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        .map_or(0.0, |kb| kb / 1024.0)
}

fn file_size(path: &std::path::Path) -> u64 {
    let wal = path.with_extension("db-wal");
    std::fs::metadata(path).map_or(0, |m| m.len()) + std::fs::metadata(wal).map_or(0, |m| m.len())
}

struct Floor {
    load: Duration,
    save: Duration,
    seal: Duration,
    insert: Duration,
}

/// The per-document floor, measured on `docs` saved documents.
fn floor(docs: &[Vec<u8>]) -> Floor {
    let n = docs.len() as u32;
    let t = Instant::now();
    let mut loaded: Vec<PatientSummary> =
        docs.iter().map(|d| PatientSummary::load(d).expect("load")).collect();
    let load = t.elapsed() / n;
    let t = Instant::now();
    let saved: Vec<Vec<u8>> = loaded.iter_mut().map(|d| d.save()).collect();
    let save = t.elapsed() / n;
    let key = DataKey::generate();
    let t = Instant::now();
    let sealed: Vec<Vec<u8>> = saved.iter().map(|d| key.seal(d, b"bench")).collect();
    let seal = t.elapsed() / n;
    let dir = tempfile::tempdir().expect("temp dir");
    let conn = rusqlite::Connection::open(dir.path().join("floor.db")).expect("sqlite");
    conn.pragma_update(None, "journal_mode", "WAL").expect("wal");
    conn.execute_batch("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)").expect("table");
    let t = Instant::now();
    conn.execute_batch("BEGIN").expect("begin");
    for (i, s) in sealed.iter().enumerate() {
        conn.execute("INSERT INTO t VALUES (?1, ?2)", rusqlite::params![i as i64, s]).expect("insert");
    }
    conn.execute_batch("COMMIT").expect("commit");
    let insert = t.elapsed() / n;
    Floor { load, save, seal, insert }
}

async fn run(n: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store: Arc<dyn ServerStore> =
        Arc::new(SqliteStore::open(&dir.path().join("server")).expect("server store"));
    let actor = care_sync_server::server_actor(&store.server_identity().expect("identity"));
    let t = Instant::now();
    let mut population = Population::new(7, actor.clone());
    let mut plain_bytes = 0u64;
    let mut sample = Vec::new();
    let mut made = 0;
    while made < n {
        let batch = (n - made).min(1_000);
        let mut summaries: Vec<PatientSummary> =
            (0..batch).map(|_| population.next_patient(0).expect("patient")).collect();
        for s in &mut summaries {
            let saved = s.save();
            plain_bytes += saved.len() as u64;
            if sample.len() < 1_000 {
                sample.push(saved);
            }
        }
        store.insert_patients(&mut summaries).expect("insert");
        made += batch;
    }
    let generation = t.elapsed();
    let running = care_sync_server::server::start(store.clone(), "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("server");
    let token = care_sync_server::ops::issue_token(
        store.as_ref(),
        "tablet",
        Role::AmbulanceCrew,
        running.addr,
        care_sync_server::ops::DEFAULT_TOKEN_TTL,
    )
    .expect("token");
    let device_path = dir.path().join("device.db");
    let wrapper = PassphraseWrapper::with_params("bench", KdfParams::default());
    let mut device = DeviceStore::open(&device_path, &wrapper).expect("device store");
    client::enrol(&mut device, &token).await.expect("enrol");
    let device_id = store.device_by_name("tablet").expect("device").expect("device").id;
    let ids: Vec<_> = store.patient_ids().expect("ids").into_iter().map(|(id, _)| id).collect();
    for id in &ids {
        store.caseload_add(device_id, id).expect("caseload");
    }
    store.set_device_budget(device_id, Some(n as u64 + 1)).expect("budget");

    let cold = client::sync(&mut device).await.expect("cold sync");
    assert_eq!(cold.stats.documents_received as usize, n);
    let idle = client::sync(&mut device).await.expect("reconnect");
    let mut changed = Vec::new();
    for k in [1usize, 100] {
        for (i, id) in ids.iter().step_by((n / k).max(1)).take(k).enumerate() {
            let mut s =
                PatientSummary::load(&store.load_document(id).expect("doc").expect("doc")).expect("load");
            s.set_actor(actor.to_bytes());
            let before = s.heads();
            s.add(&Allergy::new(
                &format!("Bench allergen {i}"),
                Provenance::new("server", "bench", "gp-feed", 1),
            ))
            .expect("add");
            store.apply_server_changes(id, &s.changes_since(&before)).expect("apply");
        }
        let report = client::sync(&mut device).await.expect("reconnect");
        assert_eq!(report.stats.changes_received as usize, k);
        changed.push((k, report));
    }
    running.shutdown().await;
    let f = floor(&sample);
    let floor_total = (f.load + f.save + f.seal + f.insert) * n as u32;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "\nN = {n} documents in scope ({:.1} s to generate; {:.1} KB per saved document)",
        generation.as_secs_f64(),
        plain_bytes as f64 / n as f64 / 1024.0
    );
    println!("  {:<28} {:>10} {:>12} {:>12}", "", "time ms", "frame bytes", "UDP bytes");
    let row = |name: &str, r: &client::SyncReport| {
        println!("  {name:<28} {:>10.1} {:>12} {:>12}", ms(r.duration), r.frame_bytes(), r.udp_bytes())
    };
    row("cold sync", &cold);
    row("reconnect, 0 changed", &idle);
    for (k, r) in &changed {
        row(&format!("reconnect, {k} changed"), r);
    }
    println!(
        "  per-document floor: load {:.0} µs + save {:.0} µs + seal {:.1} µs + insert {:.1} µs = {:.1} ms for N; cold sync / floor = {:.2}",
        f.load.as_secs_f64() * 1e6,
        f.save.as_secs_f64() * 1e6,
        f.seal.as_secs_f64() * 1e6,
        f.insert.as_secs_f64() * 1e6,
        ms(floor_total),
        cold.duration.as_secs_f64() / floor_total.as_secs_f64()
    );
    let on_disk = file_size(&device_path);
    println!(
        "  device store {:.1} MB on disk vs {:.1} MB plain Automerge ({:.2}x); process peak memory {:.0} MB",
        on_disk as f64 / 1e6,
        plain_bytes as f64 / 1e6,
        on_disk as f64 / plain_bytes as f64,
        peak_rss_mb()
    );
}

fn main() {
    let sizes: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() { vec![1_000, 10_000] } else { sizes };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("care-sync bench: {cpus} CPU(s); server and device in one process over QUIC on 127.0.0.1");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    for n in sizes {
        runtime.block_on(run(n));
    }
}
