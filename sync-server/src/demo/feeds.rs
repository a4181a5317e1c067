//! The feeds bench (`care-sync-bench --feeds N`): onboarding N patients from NDJSON, then HL7
//! v2 ADT from a file and over MLLP, and the ACK latency at a steady rate. Everything in this
//! process, on a fresh SQLite store in a temporary directory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::ingest::fhir::bulk::{self, BulkOptions, Event};
use crate::ingest::hl7::adt::{AdtOptions, process, process_group};
use crate::store::ServerStore;
use crate::store::sqlite::SqliteStore;

/// An admission (A01) or discharge (A03) for `nhs`, visit `visit`.
pub fn adt_message(event: &str, control: &str, nhs: &str, visit: &str) -> String {
    let structure = if event == "A03" { "ADT_A03" } else { "ADT_A01" };
    format!(
        "MSH|^~\\&|PAS|RHM|CARE|REGION|20261125143000||ADT^{event}^{structure}|{control}|P|2.4\r\
         EVN|{event}|20261125143000\r\
         PID|1||{nhs}^^^NHS^NH||BENCH^PATIENT^^^MX||19500101|U\r\
         PV1|1|I|Ward 7^Bay 2^Bed 4^Wessex General||||||||||||||||{visit}\r"
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Runs the feeds bench with `patients` patients of the bench population's records.
pub async fn run(patients: usize) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let started = Instant::now();
    let identity_store = SqliteStore::open(&dir.path().join("generator")).expect("a store");
    let identity = crate::store::DeviceRegistry::server_identity(&identity_store).expect("an identity");
    let mut population = super::bench::population(crate::server_actor(&identity));
    let file = dir.path().join("patients.ndjson");
    let mut numbers = Vec::with_capacity(patients);
    {
        use std::io::Write;
        let mut out = std::io::BufWriter::new(std::fs::File::create(&file).expect("the NDJSON file"));
        for _ in 0..patients {
            let mut summary = population.next_patient(super::bench::unix_ms()).expect("a patient");
            numbers.push(summary.nhs_number().expect("an NHS number").as_str().to_string());
            let bundle = crate::ingest::fhir::export::export_ips(&mut summary, 0).expect("an IPS");
            for line in bulk::ndjson_of(&serde_json::to_value(&bundle).expect("JSON")) {
                writeln!(out, "{line}").expect("write");
            }
        }
        out.flush().expect("write");
    }
    let bytes = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    println!(
        "\nFeeds: {patients} {} patients as NDJSON ({:.1} MB, made in {:.1} s), into a fresh SQLite store",
        format!("{:?}", super::bench::records()).to_lowercase(),
        bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );

    let store: Arc<dyn ServerStore> =
        Arc::new(SqliteStore::open(&dir.path().join("server")).expect("a store"));
    let options = BulkOptions { feed: "bench".into(), ..BulkOptions::default() };
    let progress = bulk::import(store.as_ref(), &[file], &options, &mut |e| {
        if let Event::Refused { at, reason } = e {
            eprintln!("{at}: refused: {reason}");
        }
    })
    .expect("the import");
    println!(
        "  import-fhir (NDJSON, {} workers, {} per transaction): {} patients in {:.2} s = {:.0} patients/s ({:.1} MB/s)",
        options.workers,
        options.batch,
        progress.imported,
        progress.elapsed.as_secs_f64(),
        progress.rate(),
        bytes as f64 / 1e6 / progress.elapsed.as_secs_f64()
    );

    // ADT: an admission then a discharge for every patient in turn, each message its own id.
    let messages = |tag: &str, count: usize| -> Vec<String> {
        (0..count)
            .map(|i| {
                let nhs = &numbers[(i / 2) % numbers.len()];
                let event = if i % 2 == 0 { "A01" } else { "A03" };
                adt_message(event, &format!("{tag}{i}"), nhs, &format!("{tag}V{}", i / 2))
            })
            .collect()
    };
    let adt = AdtOptions::default();
    let count = (patients * 4).max(2_000);
    // One durable commit per message (as before group commit), on a sample.
    let single = messages("S", count.min(2_000));
    let t = Instant::now();
    for m in &single {
        process(store.as_ref(), m, super::bench::unix_ms(), &adt);
    }
    let per_message = single.len() as f64 / t.elapsed().as_secs_f64();
    let grouped = messages("F", count);
    let t = Instant::now();
    let mut refused = 0;
    let mut cache = crate::ingest::hl7::adt::DocCache::new(crate::ingest::hl7::adt::FEED_CACHE);
    for group in grouped.chunks(500) {
        let acks = process_group(store.as_ref(), group, &adt, &mut cache);
        refused += acks.iter().filter(|a| a.code != "AA").count();
    }
    let from_file = grouped.len() as f64 / t.elapsed().as_secs_f64();
    println!(
        "  ADT from a file: {from_file:.0} messages/s in group commits of 500 ({count} messages, {refused} refused); \
         {per_message:.0} messages/s committing each alone ({} messages): {:.1}x",
        single.len(),
        from_file / per_message
    );

    // MLLP: 10 senders, each waiting for every ACK, all at once.
    let listener = crate::ingest::hl7::mllp::start(store.clone(), "127.0.0.1:0".parse().expect("an address"))
        .await
        .expect("the MLLP listener");
    let senders = 10;
    let over_mllp = messages("M", count);
    let t = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..senders {
        let mine: Vec<String> = over_mllp.iter().skip(s).step_by(senders).cloned().collect();
        let addr = listener.addr;
        tasks.push(tokio::spawn(async move { send_all(addr, &mine, None).await }));
    }
    for task in tasks {
        task.await.expect("a sender");
    }
    let mllp_rate = over_mllp.len() as f64 / t.elapsed().as_secs_f64();
    println!(
        "  ADT over MLLP, {senders} senders each waiting for its ACKs: {mllp_rate:.0} messages/s ({count} messages)"
    );

    // ACK latency at a steady 200 messages/s, from 10 senders at 20 each.
    let paced = messages("L", 2_000);
    let mut tasks = Vec::new();
    for s in 0..senders {
        let mine: Vec<String> = paced.iter().skip(s).step_by(senders).cloned().collect();
        let addr = listener.addr;
        // Senders out of step with each other, as independent systems are: sender s starts
        // s × 5 ms into the first 50 ms.
        let start = Duration::from_millis(5 * s as u64);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(start).await;
            send_all(addr, &mine, Some(Duration::from_millis(50))).await
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.expect("a sender"));
    }
    latencies.sort();
    println!(
        "  ACK latency at 200 messages/s (10 senders, {} messages): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        latencies.len(),
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
    listener.stop();
}

/// Sends each message over one MLLP connection, waiting for its ACK (then `every`, if given,
/// from the previous send); returns each ACK's latency.
async fn send_all(addr: std::net::SocketAddr, messages: &[String], every: Option<Duration>) -> Vec<Duration> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(addr).await.expect("connect");
    socket.set_nodelay(true).expect("TCP_NODELAY");
    let mut latencies = Vec::with_capacity(messages.len());
    let mut next = tokio::time::Instant::now();
    let mut reply = Vec::new();
    let mut chunk = [0u8; 4096];
    for m in messages {
        if let Some(every) = every {
            tokio::time::sleep_until(next).await;
            next += every;
        }
        let mut frame = vec![0x0b];
        frame.extend_from_slice(m.as_bytes());
        frame.extend_from_slice(&[0x1c, 0x0d]);
        let sent = Instant::now();
        socket.write_all(&frame).await.expect("send");
        reply.clear();
        while !reply.ends_with(&[0x1c, 0x0d]) {
            let n = socket.read(&mut chunk).await.expect("an ACK");
            assert!(n > 0, "the listener closed the connection");
            reply.extend_from_slice(&chunk[..n]);
        }
        latencies.push(sent.elapsed());
    }
    latencies
}
