//! MLLP: each message framed as `0x0B` message `0x1C 0x0D`, answered with a framed ACK.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::store::ServerStore;

/// The largest message accepted; a longer one ends the connection.
pub const MAX_MESSAGE: usize = 1024 * 1024;
const START: u8 = 0x0b;
const END: [u8; 2] = [0x1c, 0x0d];

/// Who may connect and how long a connection may last.
#[derive(Debug, Clone, PartialEq)]
pub struct MllpOptions {
    /// Sender addresses allowed to connect (plain MLLP belongs on a trusted network, behind this
    /// list); anything else is closed at once, logged and counted.
    pub allow: Vec<std::net::IpAddr>,
    /// Connections open at once; more are closed at once.
    pub max_connections: usize,
    /// A connection that sends nothing for this long is closed.
    pub idle_timeout: std::time::Duration,
    /// How the messages are read (time zone, unknown patients).
    pub adt: super::adt::AdtOptions,
}

impl Default for MllpOptions {
    fn default() -> Self {
        MllpOptions {
            allow: vec![std::net::Ipv4Addr::LOCALHOST.into(), std::net::Ipv6Addr::LOCALHOST.into()],
            max_connections: 32,
            idle_timeout: std::time::Duration::from_secs(300),
            adt: super::adt::AdtOptions::default(),
        }
    }
}

/// A running MLLP listener.
pub struct MllpListener {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl MllpListener {
    pub fn stop(self) {
        self.task.abort();
    }
}

/// Listens for HL7 v2 over MLLP on `listen` (port 0 picks a free port), loopback senders only.
pub async fn start(store: Arc<dyn ServerStore>, listen: SocketAddr) -> std::io::Result<MllpListener> {
    start_with(store, listen, MllpOptions::default()).await
}

/// [`start`] with the allow-list and limits of `options`.
pub async fn start_with(
    store: Arc<dyn ServerStore>,
    listen: SocketAddr,
    options: MllpOptions,
) -> std::io::Result<MllpListener> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let feed = Feed::start(store, options.adt.clone());
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let task = tokio::spawn(async move {
        loop {
            let Ok((socket, peer)) = listener.accept().await else { continue };
            if !options.allow.contains(&peer.ip()) {
                tracing::warn!(%peer, "MLLP connection from an address not on the allow-list closed");
                continue; // dropping the socket closes it
            }
            if open.load(std::sync::atomic::Ordering::SeqCst) >= options.max_connections {
                tracing::warn!(%peer, max = options.max_connections, "MLLP connection over the limit closed");
                continue;
            }
            open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let (feed, counted, idle) = (feed.clone(), Counted(open.clone()), options.idle_timeout);
            tokio::spawn(async move {
                let _counted = counted; // released however the task ends
                if let Err(e) = serve(socket, feed, idle).await {
                    tracing::info!(%peer, error = %e, "MLLP connection ended");
                }
            });
        }
    });
    tracing::info!(%addr, "MLLP listener for HL7 v2 ADT");
    Ok(MllpListener { addr, task })
}

/// One open MLLP connection, counted while it lasts.
struct Counted(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The most messages committed as one group.
const MAX_GROUP: usize = 256;
/// The most messages of one connection in the feed at once.
const PER_CONNECTION: usize = 32;

type Reply = tokio::sync::oneshot::Sender<String>;

/// The one thread that applies every connection's messages, in the order they arrive (so a
/// patient's messages apply in order whichever connection brought them), as group commits:
/// all the messages waiting when a group starts are committed with one wait for the disk, and
/// each is acknowledged only after it.
#[derive(Clone)]
struct Feed(std::sync::mpsc::Sender<(String, Reply)>);

impl Feed {
    fn start(store: Arc<dyn ServerStore>, adt: super::adt::AdtOptions) -> Self {
        let (send, receive) = std::sync::mpsc::channel::<(String, Reply)>();
        std::thread::Builder::new()
            .name("mllp-feed".into())
            .spawn(move || {
                let mut cache = super::adt::DocCache::new(super::adt::FEED_CACHE);
                while let Ok(first) = receive.recv() {
                    let mut group = vec![first];
                    while group.len() < MAX_GROUP {
                        match receive.try_recv() {
                            Ok(next) => group.push(next),
                            Err(_) => break,
                        }
                    }
                    let (texts, replies): (Vec<String>, Vec<Reply>) = group.into_iter().unzip();
                    let acks = super::adt::process_group(store.as_ref(), &texts, &adt, &mut cache);
                    for (ack, reply) in acks.into_iter().zip(replies) {
                        let _ = reply.send(ack.message);
                    }
                }
            })
            .expect("start the MLLP feed thread");
        Feed(send)
    }

    fn submit(&self, text: String) -> tokio::sync::oneshot::Receiver<String> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let _ = self.0.send((text, reply)); // a feed that stopped drops `reply`: answered as an error
        answer
    }
}

async fn serve(
    mut socket: tokio::net::TcpStream,
    feed: Feed,
    idle: std::time::Duration,
) -> std::io::Result<()> {
    // Each ACK leaves at once (Nagle's algorithm would hold it back behind the last one).
    socket.set_nodelay(true)?;
    let mut buffer: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 8192];
    // Where the search for the end of a frame resumes: each byte is looked at once.
    let mut scanned = 0;
    loop {
        // Every complete frame in the buffer goes to the feed at once (a sender that does not
        // wait for each ACK gets its messages into one group), then the ACKs go back in order.
        let mut answers = Vec::new();
        // At most this many of one connection's messages wait in the feed at once, so that a
        // sender with thousands queued cannot hold back the others' ACKs for long.
        while answers.len() < PER_CONNECTION
            && let Some(at) = buffer[scanned.min(buffer.len())..].windows(2).position(|w| w == END)
        {
            let end = scanned + at;
            scanned = 0;
            let frame: Vec<u8> = buffer.drain(..end + 2).collect();
            let body = match frame.iter().position(|b| *b == START) {
                Some(start) => &frame[start + 1..frame.len() - 2],
                None => &frame[..frame.len() - 2],
            };
            answers.push(feed.submit(String::from_utf8_lossy(body).into_owned()));
        }
        // Stopped at the share, not at the end of what was read.
        let full = answers.len() == PER_CONNECTION;
        for answer in answers {
            let Ok(ack) = answer.await else {
                // No ACK, and the connection ends, so the sender sends again.
                return Err(std::io::Error::other("the feed stopped"));
            };
            let mut out = vec![START];
            out.extend_from_slice(ack.as_bytes());
            out.extend_from_slice(&END);
            socket.write_all(&out).await?;
        }
        if full {
            continue; // more complete frames may wait: answer them before reading again
        }
        scanned = buffer.len().saturating_sub(1);
        if buffer.len() > MAX_MESSAGE {
            return Err(std::io::Error::other("message larger than the MLLP limit"));
        }
        let n = match tokio::time::timeout(idle, socket.read(&mut chunk)).await {
            Ok(read) => read?,
            Err(_) => return Err(std::io::Error::other("idle for longer than the MLLP idle timeout")),
        };
        if n == 0 {
            return Ok(());
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
}
