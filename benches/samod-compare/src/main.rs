//! care-sync against samod 0.16 (automerge-repo in Rust) on the same synthetic patient summaries,
//! in one run, printed side by side as ratios.
//!
//! care-sync: the harness of `care-sync-bench` (server in a child process, QUIC over loopback).
//! samod: a server repo holding the same N documents and a client repo in this process, over TCP
//! on loopback with samod's own length-delimited framing (no TLS). Bytes are counted on the
//! client's socket in both directions; for care-sync they are the UDP payload bytes, QUIC and
//! TLS included, so the comparison leans in samod's favour.
//!
//! Scenarios, as in `care-sync-bench`: cold sync of N documents to a new client; then reconnects
//! with 0, 1 and 100 documents changed on the server while the client was away. A samod reconnect
//! is complete when every document has been synced with the new connection in both directions.
//!
//! `cargo run --release --manifest-path benches/samod-compare/Cargo.toml [N...]` (default 1000 and
//! 10000; samod needs minutes at 10,000).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use care_node::client::SyncReport;
use care_node::summary::PatientSummary;
use care_sync_server::demo::bench::{self, SEED, ms};
use care_sync_server::demo::population::Population;
use futures::FutureExt;
use futures::future::BoxFuture;
use samod::{BackoffConfig, DialError, Dialer, DocHandle, Repo, Transport, Url};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Longest wait for samod to finish one scenario.
const PATIENCE: Duration = Duration::from_secs(900);

#[derive(Clone, Default)]
struct Counters {
    read: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

impl Counters {
    fn take(&self) -> u64 {
        self.read.swap(0, Ordering::Relaxed) + self.written.swap(0, Ordering::Relaxed)
    }
}

/// A TCP stream that counts what crosses it.
struct Counting {
    inner: tokio::net::TcpStream,
    counters: Counters,
}

impl AsyncRead for Counting {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.counters.read.fetch_add((buf.filled().len() - before) as u64, Ordering::Relaxed);
        result
    }
}

impl AsyncWrite for Counting {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &result {
            self.counters.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Dials the samod server over TCP, counting bytes.
struct CountingDialer {
    addr: std::net::SocketAddr,
    counters: Counters,
}

impl Dialer for CountingDialer {
    type Error = std::io::Error;

    fn url(&self) -> Url {
        Url::parse(&format!("tcp://{}", self.addr)).expect("url")
    }

    fn connect(&self) -> BoxFuture<'static, Result<Transport, DialError<Self::Error>>> {
        let (addr, counters) = (self.addr, self.counters.clone());
        async move {
            let inner = tokio::net::TcpStream::connect(addr).await.map_err(DialError::transient)?;
            inner.set_nodelay(true).map_err(DialError::transient)?;
            Ok(Transport::from_tokio_io(Counting { inner, counters }))
        }
        .boxed()
    }
}

struct Run {
    time: Duration,
    bytes: u64,
}

/// Dials the server and waits for the connection (the dialer would reconnect; close it to stop).
async fn connect(
    client: &Repo,
    addr: std::net::SocketAddr,
    counters: &Counters,
) -> (samod::DialerHandle<std::io::Error>, samod::ConnectionId) {
    let dialer = client
        .dial(BackoffConfig::default(), Arc::new(CountingDialer { addr, counters: counters.clone() }))
        .expect("dial");
    dialer.established().await.expect("connected");
    let conn = dialer.connection_id().expect("connection");
    (dialer, conn)
}

/// Closes the connection and lets it go quiet before the next scenario counts bytes.
async fn disconnect(dialer: samod::DialerHandle<std::io::Error>, counters: &Counters) {
    dialer.close();
    tokio::time::sleep(Duration::from_millis(200)).await;
    counters.take();
}

/// Connects `client` to the server and waits until every handle is in sync with it both ways.
async fn reconnect(
    client: &Repo,
    addr: std::net::SocketAddr,
    counters: &Counters,
    handles: &[DocHandle],
) -> Run {
    counters.take();
    let t = Instant::now();
    let (dialer, conn) = connect(client, addr, counters).await;
    let synced = handles.iter().map(|h| {
        let (theirs, ours) = (h.we_have_their_changes(conn), h.they_have_our_changes(conn));
        async move {
            theirs.await;
            ours.await;
        }
    });
    tokio::time::timeout(PATIENCE, futures::future::join_all(synced)).await.expect("samod finished in time");
    let run = Run { time: t.elapsed(), bytes: counters.take() };
    disconnect(dialer, counters).await;
    run
}

/// samod's figures for the same scenarios: cold, then reconnects with 0, 1 and 100 changed.
async fn samod_run(n: usize) -> Vec<Run> {
    let mut population = Population::new(SEED, automerge::ActorId::from(&[7u8; 16][..]));
    let server = Repo::build_tokio().load().await;
    let mut server_handles = Vec::with_capacity(n);
    for _ in 0..n {
        let saved = population.next_patient(0).expect("patient").save();
        let doc = automerge::Automerge::load(&saved).expect("load");
        server_handles.push(server.create(doc).await.expect("create"));
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("listen");
    let addr = listener.local_addr().expect("addr");
    let acceptor =
        server.make_acceptor(Url::parse(&format!("tcp://{addr}")).expect("url")).expect("acceptor");
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let _ = socket.set_nodelay(true);
            let _ = acceptor.accept(Transport::from_tokio_io(socket));
        }
    });

    let client = Repo::build_tokio().load().await;
    let counters = Counters::default();
    // Cold: find every document through the server.
    let t = Instant::now();
    let (dialer, conn) = connect(&client, addr, &counters).await;
    let finds = server_handles.iter().map(|h| client.find(h.document_id().clone()));
    let found =
        tokio::time::timeout(PATIENCE, futures::future::join_all(finds)).await.expect("samod in time");
    let handles: Vec<DocHandle> =
        found.into_iter().map(|h| h.expect("repo").expect("document found")).collect();
    let complete = handles.iter().map(|h| h.we_have_their_changes(conn));
    tokio::time::timeout(PATIENCE, futures::future::join_all(complete)).await.expect("samod in time");
    let mut runs = vec![Run { time: t.elapsed(), bytes: counters.take() }];
    eprintln!("samod N={n}: cold sync done in {:.1} s", runs[0].time.as_secs_f64());
    disconnect(dialer, &counters).await;

    runs.push(reconnect(&client, addr, &counters, &handles).await);
    eprintln!("samod N={n}: reconnect with nothing changed done in {:.1} s", runs[1].time.as_secs_f64());
    for k in [1usize, 100] {
        for (i, h) in server_handles.iter().step_by((n / k).max(1)).take(k).enumerate() {
            h.with_document(|doc| {
                let mut summary = PatientSummary::load(&doc.save()).expect("load");
                summary.set_actor(&[9u8; 16]);
                let changes = bench::bench_change(&mut summary, &format!("Bench allergen {i}"));
                doc.apply_changes(changes).expect("apply");
            });
        }
        let run = reconnect(&client, addr, &counters, &handles).await;
        for h in server_handles.iter().step_by((n / k).max(1)).take(k) {
            let heads = h.with_document(|d| d.get_heads());
            let local = handles.iter().find(|c| c.document_id() == h.document_id()).expect("held");
            assert_eq!(local.with_document(|d| d.get_heads()), heads, "the change reached the client");
        }
        runs.push(run);
    }
    server.stop().await;
    client.stop().await;
    runs
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--server-role") {
        bench::server_role(&args[1], args[2].parse().expect("N"));
        return;
    }
    let sizes: Vec<usize> = args.iter().map(|a| a.parse().expect("a size")).collect();
    let sizes = if sizes.is_empty() { vec![1_000, 10_000] } else { sizes };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("care-sync vs samod 0.16 on {cpus} CPU(s), same synthetic summaries, loopback, one run");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    for n in sizes {
        let ours = runtime.block_on(bench::measure(n, None));
        let theirs = runtime.block_on(samod_run(n));
        let mine: Vec<&SyncReport> =
            [&ours.cold, &ours.idle].into_iter().chain(ours.changed.iter().map(|(_, r)| r)).collect();
        println!("\nN = {n} documents ({:.1} KB each saved)", ours.plain_bytes as f64 / n as f64 / 1024.0);
        println!(
            "  {:<22} {:>9} {:>10} {:>10} {:>9} {:>10} {:>7} {:>8} {:>9}",
            "", "ours ms", "UDP bytes", "frame B", "samod ms", "TCP bytes", "x time", "x bytes", "x frame B"
        );
        let names = ["cold sync", "reconnect, 0 changed", "reconnect, 1 changed", "reconnect, 100 changed"];
        for ((name, c), s) in names.iter().zip(mine).zip(&theirs) {
            println!(
                "  {name:<22} {:>9.1} {:>10} {:>10} {:>9.1} {:>10} {:>7.1} {:>8.1} {:>9.0}",
                ms(c.duration),
                c.udp_bytes(),
                c.frame_bytes(),
                ms(s.time),
                s.bytes,
                s.time.as_secs_f64() / c.duration.as_secs_f64(),
                s.bytes as f64 / c.udp_bytes() as f64,
                s.bytes as f64 / c.frame_bytes() as f64
            );
        }
        println!(
            "  x = samod / care-sync. UDP bytes: everything care-sync sent and received, QUIC and the TLS \
             handshake with both certificates included; frame B: its protocol frames after the handshake. \
             samod: its TCP stream (no TLS)."
        );
        println!(
            "  peak memory: care-sync server process {:.0} MB, device process {:.0} MB",
            ours.server_peak_mb, ours.device_peak_mb
        );
    }
}
