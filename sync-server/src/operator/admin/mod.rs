//! The operators' console: a JSON admin API, a dashboard page and Prometheus `/metrics`, served
//! over HTTP by axum on a loopback address by default.
//!
//! - `/health` and `/ready` answer without a token (for load balancers and systemd checks).
//! - `/`, `/assets/*` and `/openapi.json` are static and hold no data; the page asks for the
//!   operator token and sends it with every call.
//! - `/api/*` and `/metrics` need `Authorization: Bearer <operator token>`; the token is compared
//!   in constant time (as BLAKE3 hashes, so neither its length nor its bytes leak), and a missing
//!   or wrong token gets 401 with nothing changed.
//!
//! Responses carry opaque ids (device names, patient UUIDs), never patient data; NHS numbers are
//! accepted as input (to find a patient) but never echoed.

mod api;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use subtle::ConstantTimeEq;

use crate::store::ServerStore;

/// What the admin server needs besides the store.
#[derive(Debug, Clone)]
pub struct AdminOptions {
    pub listen: SocketAddr,
    /// The operator token (see [`load_or_create_token`]).
    pub token: String,
    /// Devices that have not synced for this long are reported as stale.
    pub stale_after_ms: i64,
    /// The QUIC address written into enrolment tokens.
    pub sync_addr: crate::operator::config::ServerAddrs,
}

struct AdminState {
    store: Arc<dyn ServerStore>,
    token_hash: [u8; 32],
    stale_after_ms: i64,
    sync_addr: crate::operator::config::ServerAddrs,
}

/// A running admin server.
pub struct AdminServer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl AdminServer {
    pub fn stop(self) {
        self.task.abort();
    }
}

/// Why the admin server could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot listen for the admin API on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("the operator token file {0}: {1}")]
    Token(String, std::io::Error),
    #[error("the operator token must be at least 16 characters")]
    WeakToken,
}

/// Starts the admin API, dashboard and metrics on `options.listen` (port 0 picks a free port).
pub async fn start(store: Arc<dyn ServerStore>, options: AdminOptions) -> Result<AdminServer, AdminError> {
    if options.token.trim().len() < 16 {
        return Err(AdminError::WeakToken);
    }
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|e| AdminError::Bind(options.listen, e))?;
    let addr = listener.local_addr().map_err(|e| AdminError::Bind(options.listen, e))?;
    let state = Arc::new(AdminState {
        store,
        token_hash: *blake3::hash(options.token.trim().as_bytes()).as_bytes(),
        stale_after_ms: options.stale_after_ms,
        sync_addr: options.sync_addr,
    });
    let app = router(state);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the admin server stopped");
        }
    });
    tracing::info!(%addr, "admin API, dashboard and /metrics");
    Ok(AdminServer { addr, task })
}

fn router(state: Arc<AdminState>) -> Router {
    let protected = api::routes()
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", include_str!("assets/index.html")) }))
        .route(
            "/assets/dashboard.js",
            get(|| async { asset("text/javascript; charset=utf-8", include_str!("assets/dashboard.js")) }),
        )
        // The browser asks for /favicon.ico on every page load: answer it (no 404 in the logs).
        .route("/favicon.ico", get(|| async { asset("image/svg+xml", include_str!("assets/favicon.svg")) }))
        .route(
            "/assets/favicon.svg",
            get(|| async { asset("image/svg+xml", include_str!("assets/favicon.svg")) }),
        )
        .route(
            "/assets/dashboard.css",
            get(|| async { asset("text/css; charset=utf-8", include_str!("assets/dashboard.css")) }),
        )
        .route(
            "/openapi.json",
            get(|| async { asset("application/json", include_str!("assets/openapi.json")) }),
        )
        .route("/health", get(|| async { axum::Json(serde_json::json!({ "status": "ok" })) }))
        .route("/ready", get(ready))
        .merge(protected)
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(state)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// No framing, no inline scripts, nothing fetched from elsewhere, nothing cached.
async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; frame-ancestors 'none'"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

async fn require_token(State(state): State<Arc<AdminState>>, request: Request, next: Next) -> Response {
    if token_matches(request.headers(), &state.token_hash) {
        return next.run(request).await;
    }
    tracing::warn!(path = %request.uri().path(), "admin request without a valid operator token");
    let mut response =
        api::ApiError::new(StatusCode::UNAUTHORIZED, "a valid operator token is required").into_response();
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    // The request's body is not read: the connection ends with the answer, and says so, so a
    // client does not send its next request on a connection the server is closing (seen as
    // "peer disconnected" by a client that pools connections).
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

fn token_matches(headers: &HeaderMap, expected_hash: &[u8; 32]) -> bool {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let given_hash = blake3::hash(given.trim().as_bytes());
    bool::from(given_hash.as_bytes().ct_eq(expected_hash))
}

async fn metrics(State(state): State<Arc<AdminState>>) -> Response {
    // HL7 messages are counted in the store (MLLP and `ingest-adt` files alike, whichever
    // process handled them); the counter catches up with it at each scrape.
    let store = state.store.clone();
    if let Ok(Ok(feeds)) = tokio::task::spawn_blocking(move || store.feed_status()).await {
        crate::operator::metrics::metrics().catch_up_feeds(&feeds);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        crate::operator::metrics::metrics().encode(),
    )
        .into_response()
}

/// Ready when the store answers.
async fn ready(State(state): State<Arc<AdminState>>) -> Response {
    let store = state.store.clone();
    match tokio::task::spawn_blocking(move || store.max_seq()).await {
        Ok(Ok(_)) => axum::Json(serde_json::json!({ "status": "ready" })).into_response(),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({ "status": "store unavailable" })),
        )
            .into_response(),
    }
}

/// The operator token: `CARE_SYNC_ADMIN_TOKEN` if set, else the file's contents; a missing file
/// is created (mode 0600) with a new random token. Returns the token and whether it was created.
pub fn load_or_create_token(file: &Path) -> Result<(String, bool), AdminError> {
    if let Ok(token) = std::env::var("CARE_SYNC_ADMIN_TOKEN")
        && !token.trim().is_empty()
    {
        return Ok((token.trim().to_string(), false));
    }
    let shown = file.display().to_string();
    match std::fs::read_to_string(file) {
        Ok(token) => return Ok((token.trim().to_string(), false)),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(AdminError::Token(shown, e)),
        Err(_) => {}
    }
    let mut bytes = [0u8; 32];
    rand::Rng::fill(&mut rand::rng(), &mut bytes);
    let token = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, bytes);
    if let Some(parent) = file.parent() {
        std::fs::create_dir_all(parent).map_err(|e| AdminError::Token(shown.clone(), e))?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut out = options.open(file).map_err(|e| AdminError::Token(shown.clone(), e))?;
    std::io::Write::write_all(&mut out, format!("{token}\n").as_bytes())
        .map_err(|e| AdminError::Token(shown, e))?;
    Ok((token, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_token_matches() {
        let hash = *blake3::hash(b"correct-horse-battery-staple").as_bytes();
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            headers
        };
        assert!(token_matches(&with("Bearer correct-horse-battery-staple"), &hash));
        assert!(!token_matches(&with("Bearer correct-horse-battery-stapl"), &hash));
        assert!(!token_matches(&with("Bearer correct-horse-battery-staple!"), &hash));
        assert!(!token_matches(&with("Basic correct-horse-battery-staple"), &hash));
        assert!(!token_matches(&HeaderMap::new(), &hash));
    }

    #[test]
    fn a_missing_token_file_is_created_private_and_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("admin-token");
        let (first, created) = load_or_create_token(&file).unwrap();
        assert!(created && first.len() >= 40);
        let (again, created) = load_or_create_token(&file).unwrap();
        assert!(!created);
        assert_eq!(first, again);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        }
    }
}
