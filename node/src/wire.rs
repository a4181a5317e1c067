//! Moving protocol frames over QUIC streams: length-checked reads and writes, nothing more.

use serde::{Serialize, de::DeserializeOwned};

use crate::protocol::{FrameError, check_frame_len, decode_frame, encode_frame};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("the stream was cut in the middle of a frame")]
    Truncated,
    #[error("reading failed: {0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("writing failed: {0}")]
    Write(#[from] quinn::WriteError),
}

impl WireError {
    /// The connection-level cause, if the stream failed because the connection did.
    pub fn connection_error(&self) -> Option<&quinn::ConnectionError> {
        match self {
            WireError::Read(quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(e)))
            | WireError::Write(quinn::WriteError::ConnectionLost(e)) => Some(e),
            _ => None,
        }
    }
}

/// Writes one message as a frame; returns the frame's size in bytes.
pub async fn write_frame<T: Serialize>(
    send: &mut quinn::SendStream,
    message: &T,
) -> Result<usize, WireError> {
    let frame = encode_frame(message)?;
    send.write_all(&frame).await?;
    Ok(frame.len())
}

/// Reads one frame; `Ok(None)` when the peer finished the stream cleanly between frames.
pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
) -> Result<Option<(T, usize)>, WireError> {
    read_frame_within(recv, crate::protocol::MAX_FRAME_LEN).await
}

/// How much of a frame is allocated before its bytes arrive: a peer that announces a large
/// frame and sends nothing costs this, not what it announced.
const READ_CHUNK: usize = 64 * 1024;

/// [`read_frame`] with a smaller limit, for exchanges whose frames are small (enrolment).
pub async fn read_frame_within<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max_len: usize,
) -> Result<Option<(T, usize)>, WireError> {
    let mut len = [0u8; 4];
    match recv.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(WireError::Truncated),
        Err(e) => return Err(e.into()),
    }
    let len = check_frame_len(u32::from_be_bytes(len))?;
    if len > max_len {
        return Err(FrameError::TooLargeHere(len, max_len).into());
    }
    let mut body = Vec::with_capacity(len.min(READ_CHUNK));
    while body.len() < len {
        let start = body.len();
        let end = (start + READ_CHUNK).min(len);
        body.resize(end, 0);
        match recv.read_exact(&mut body[start..end]).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(WireError::Truncated),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Some((decode_frame(&body)?, len + 4)))
}
