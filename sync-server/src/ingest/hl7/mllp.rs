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
            let (store, counted, idle) = (store.clone(), Counted(open.clone()), options.idle_timeout);
            let adt = Arc::new(options.adt.clone());
            tokio::spawn(async move {
                let _counted = counted; // released however the task ends
                if let Err(e) = serve(socket, store, idle, adt).await {
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

async fn serve(
    mut socket: tokio::net::TcpStream,
    store: Arc<dyn ServerStore>,
    idle: std::time::Duration,
    adt: Arc<super::adt::AdtOptions>,
) -> std::io::Result<()> {
    let mut buffer: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 8192];
    // Where the search for the end of a frame resumes: each byte is looked at once.
    let mut scanned = 0;
    loop {
        // Extract every complete frame in the buffer.
        while let Some(at) = buffer[scanned.min(buffer.len())..].windows(2).position(|w| w == END) {
            let end = scanned + at;
            scanned = 0;
            let frame: Vec<u8> = buffer.drain(..end + 2).collect();
            let body = match frame.iter().position(|b| *b == START) {
                Some(start) => &frame[start + 1..frame.len() - 2],
                None => &frame[..frame.len() - 2],
            };
            let text = String::from_utf8_lossy(body).into_owned();
            let (store, adt) = (store.clone(), adt.clone());
            let ack = tokio::task::spawn_blocking(move || {
                super::adt::process(store.as_ref(), &text, care_node::now_ms(), &adt)
            })
            .await
            .map_err(std::io::Error::other)?;
            let mut out = vec![START];
            out.extend_from_slice(ack.message.as_bytes());
            out.extend_from_slice(&END);
            socket.write_all(&out).await?;
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
