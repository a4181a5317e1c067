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

/// Listens for HL7 v2 over MLLP on `listen` (port 0 picks a free port).
pub async fn start(store: Arc<dyn ServerStore>, listen: SocketAddr) -> std::io::Result<MllpListener> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((socket, peer)) = listener.accept().await else { continue };
            let store = store.clone();
            tokio::spawn(async move {
                if let Err(e) = serve(socket, store).await {
                    tracing::info!(%peer, error = %e, "MLLP connection ended");
                }
            });
        }
    });
    tracing::info!(%addr, "MLLP listener for HL7 v2 ADT");
    Ok(MllpListener { addr, task })
}

async fn serve(mut socket: tokio::net::TcpStream, store: Arc<dyn ServerStore>) -> std::io::Result<()> {
    let mut buffer: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        // Extract every complete frame in the buffer.
        while let Some(end) = buffer.windows(2).position(|w| w == END) {
            let frame: Vec<u8> = buffer.drain(..end + 2).collect();
            let body = match frame.iter().position(|b| *b == START) {
                Some(start) => &frame[start + 1..frame.len() - 2],
                None => &frame[..frame.len() - 2],
            };
            let text = String::from_utf8_lossy(body).into_owned();
            let store = store.clone();
            let ack = tokio::task::spawn_blocking(move || {
                super::adt::process(store.as_ref(), &text, care_node::now_ms())
            })
            .await
            .map_err(std::io::Error::other)?;
            let mut out = vec![START];
            out.extend_from_slice(ack.message.as_bytes());
            out.extend_from_slice(&END);
            socket.write_all(&out).await?;
        }
        if buffer.len() > MAX_MESSAGE {
            return Err(std::io::Error::other("message larger than the MLLP limit"));
        }
        let n = socket.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
}
