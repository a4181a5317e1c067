//! Enrolment connections: one request read within its deadline and size limit, answered by
//! [`crate::session::enrol`], with a bound on how many are open at once.

use std::sync::Arc;
use std::time::Duration;

use care_node::protocol::{ClientMessage, EnrolRequest, EnrolResponse, MAX_ENROL_FRAME_LEN, close};
use care_node::wire::{read_frame_within, write_frame};

use super::{ConnectionError, LINGER, Shared, close_with};
use crate::operator::metrics::{OutcomeLabel, metrics};

/// Reads an enrolment frame: small, and within `deadline`.
async fn read_with_deadline<T: serde::de::DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    deadline: Duration,
) -> Result<Option<T>, ConnectionError> {
    match tokio::time::timeout(deadline, read_frame_within::<T>(recv, MAX_ENROL_FRAME_LEN)).await {
        Ok(result) => Ok(result?.map(|(message, _)| message)),
        Err(_) => Err(ConnectionError::Timeout(deadline)),
    }
}

/// Finishes our stream and waits for the device to close the connection: dropping the
/// connection first would discard frames still in flight (close is not delivery).
async fn finish_and_linger(
    conn: &quinn::Connection,
    mut send: quinn::SendStream,
    recv: &mut quinn::RecvStream,
) {
    let _ = send.finish();
    let _ = read_with_deadline::<ClientMessage>(recv, LINGER).await;
    let _ = tokio::time::timeout(LINGER, conn.closed()).await;
}

/// Counts an enrolment connection while it lasts.
struct Enrolling<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Enrolling<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

pub(super) async fn handle_enrol(
    conn: quinn::Connection,
    shared: Arc<Shared>,
) -> Result<(), ConnectionError> {
    let open = shared.enrolling.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let _counted = Enrolling(&shared.enrolling);
    if open >= shared.limits.enrol_connections {
        conn.close(close::INTERNAL.into(), b"too many enrolments at once; try again shortly");
        return Err(ConnectionError::Busy);
    }
    let result = enrol_exchange(&conn, &shared).await;
    if let Err(e) = &result {
        close_with(&conn, e);
    }
    result
}

async fn enrol_exchange(conn: &quinn::Connection, shared: &Shared) -> Result<(), ConnectionError> {
    let deadline = Duration::from_secs(shared.limits.enrol_timeout_secs);
    let (mut send, mut recv) = tokio::time::timeout(deadline, conn.accept_bi())
        .await
        .map_err(|_| ConnectionError::Timeout(deadline))??;
    // Close with the reason while our stream is still open: dropping it first would finish it,
    // and the device would read a clean end instead of why.
    let request = match read_with_deadline::<EnrolRequest>(&mut recv, deadline).await {
        Ok(Some(request)) => request,
        Ok(None) => return Ok(()),
        Err(e) => {
            close_with(conn, &e);
            return Err(e);
        }
    };
    let response = enrol(&request, shared).await;
    let outcome = match &response {
        EnrolResponse::Refused { message } => {
            tracing::info!(reason = %message, "enrolment refused");
            "refused"
        }
        _ => "ok",
    };
    metrics().enrolments.get_or_create(&OutcomeLabel { outcome }).inc();
    write_frame(&mut send, &response).await?;
    finish_and_linger(conn, send, &mut recv).await;
    Ok(())
}

async fn enrol(request: &EnrolRequest, shared: &Shared) -> EnrolResponse {
    let store = shared.store.clone();
    let request = request.clone();
    let (server_key, now_ms) = (shared.server_key, shared.clock.now_ms());
    // The connection's span (its address) goes with the work, so its log lines still say whose.
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || {
        span.in_scope(|| crate::session::enrol::enrol(store.as_ref(), &request, server_key, now_ms))
    })
    .await
    .unwrap_or_else(|_| EnrolResponse::Refused { message: crate::store::EnrolError::Internal.to_string() })
}
