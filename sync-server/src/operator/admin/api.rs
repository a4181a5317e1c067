//! The JSON endpoints under `/api` (described in `assets/openapi.json`). Every handler runs its
//! store work on the blocking pool and maps failures to a status code with a one-line message.
//!
//! Over 600 lines because it is one short handler per endpoint (25), in the order of
//! `assets/openapi.json`, so the two are read side by side.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::AdminState;
use crate::operator::ops::{self, OpsError};
use crate::store::{AuditFilter, GrantKind, Role, ServerStore, StoreError};

pub(super) fn routes() -> Router<Arc<AdminState>> {
    Router::new()
        .route("/api/status", get(status))
        .route("/api/devices", get(devices).post(enrol_device))
        .route("/api/devices/{name}/revoke", post(revoke_device))
        .route("/api/devices/{name}/wipe", post(wipe_device))
        .route("/api/scopes", get(scopes))
        .route("/api/caseload", post(caseload_add))
        .route("/api/caseload/remove", post(caseload_remove))
        .route("/api/incidents", post(incident_open))
        .route("/api/incidents/close", post(incident_close))
        .route("/api/areas", post(area_add))
        .route("/api/areas/remove", post(area_remove))
        .route("/api/alerts", get(alerts))
        .route("/api/alerts/{id}/ack", post(acknowledge_alert))
        .route("/api/alerts/{id}/reason", post(alert_reason))
        .route("/api/quarantine", get(quarantine))
        .route("/api/quarantine/{id}/review", post(review_quarantine))
        .route("/api/audit", get(audit))
        .route("/api/feeds", get(feeds))
        .route("/api/settings", get(settings).post(set_setting))
        .route("/api/planning.csv", get(planning_export))
}

/// An error answer: `{"error": "..."}` with a status code.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

impl From<OpsError> for ApiError {
    fn from(e: OpsError) -> Self {
        match e {
            OpsError::Store(e) => e.into(),
            // No patient has a number whose check digit fails (the format itself is the
            // schema's to check): not found, like any number the region does not know.
            OpsError::NhsNumber(_) => {
                ApiError::new(StatusCode::NOT_FOUND, format!("no patient has that NHS number: {e}"))
            }
            OpsError::Invalid(_) => ApiError::new(StatusCode::BAD_REQUEST, e.to_string()),
            OpsError::NotEnrolled(_) => ApiError::new(StatusCode::CONFLICT, e.to_string()),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let status = match e {
            StoreError::UnknownDevice(_) | StoreError::UnknownPatient => StatusCode::NOT_FOUND,
            StoreError::AlreadyEnrolled(_) | StoreError::DuplicatePatient | StoreError::Merge(_) => {
                StatusCode::CONFLICT
            }
            _ => {
                tracing::error!(error = %e, "admin request failed in the store");
                return ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the server store failed; see the server log",
                );
            }
        };
        ApiError::new(status, e.to_string())
    }
}

type ApiResult<T = Json<Value>> = Result<T, ApiError>;

/// An extractor's refusal, answered like every other error: `{"error": …}` with its status
/// (400 malformed, 415 not JSON, 422 wrong or missing fields), values hidden.
fn refused(status: StatusCode, text: String) -> ApiError {
    ApiError::new(status, crate::ingest::fhir::model::hide_values(text.lines().next().unwrap_or_default()))
}

/// `axum::Json` with JSON refusals.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(r) => Err(refused(r.status(), r.body_text())),
        }
    }
}

/// `axum::extract::Query` with JSON refusals.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(ApiQuery(value)),
            Err(r) => Err(refused(r.status(), r.body_text())),
        }
    }
}

/// `axum::extract::Path` with JSON refusals.
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(ApiPath(value)),
            Err(r) => Err(refused(r.status(), r.body_text())),
        }
    }
}

/// Runs store work on the blocking pool.
async fn blocking<T: Send + 'static>(
    state: &Arc<AdminState>,
    work: impl FnOnce(&dyn ServerStore) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let store = state.store.clone();
    tokio::task::spawn_blocking(move || work(store.as_ref()))
        .await
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the request's task failed"))?
}

fn iso(ms: Option<i64>) -> Value {
    ms.and_then(care_node::view::iso_time).map_or(Value::Null, Value::String)
}

async fn status(State(state): State<Arc<AdminState>>) -> ApiResult {
    blocking(&state, |store| {
        let devices = store.devices()?;
        Ok(Json(json!({
            "patients": store.patient_count()?,
            "devices": devices.len(),
            "revoked_devices": devices.iter().filter(|d| d.revoked_at_ms.is_some()).count(),
            "open_alerts": store.alerts(false)?.len(),
            "connected_devices": crate::operator::metrics::metrics().connected_devices.get(),
            "server_key_fingerprint": care_node::identity::hex(&store.server_identity()?.fingerprint()),
        })))
    })
    .await
}

/// A device as the console shows it.
#[derive(Serialize)]
struct DeviceView {
    name: String,
    role: &'static str,
    /// `pending` (token issued), `enrolled`, `wipe-requested`, `wiped` or `revoked`.
    state: &'static str,
    enrolled_at: Value,
    last_sync: Value,
    /// `valid`, `expired` or `never-synced`: whether the device may still show records offline.
    lease: &'static str,
    lease_expires_at: Value,
    /// No sync for longer than the configured stale threshold (and not revoked).
    stale: bool,
    documents_held: u64,
    /// Patients in scope that the device's budget left out at its last round.
    left_out: u64,
    cursor: u64,
}

async fn devices(State(state): State<Arc<AdminState>>) -> ApiResult {
    let stale_after = state.stale_after_ms;
    blocking(&state, move |store| {
        let out: Vec<DeviceView> = ops::device_overview(store, stale_after, care_node::now_ms())?
            .into_iter()
            .map(|d| DeviceView {
                name: d.name,
                role: d.role.as_str(),
                state: d.state,
                enrolled_at: iso(d.enrolled_at_ms),
                last_sync: iso(d.last_sync_ms),
                lease: d.lease,
                lease_expires_at: iso(d.lease_expires_at_ms),
                stale: d.stale,
                documents_held: d.documents_held,
                left_out: d.left_out,
                cursor: d.cursor,
            })
            .collect();
        Ok(Json(json!({ "devices": out })))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrolRequest {
    name: String,
    role: String,
    expires_in_hours: Option<f64>,
}

async fn enrol_device(
    State(state): State<Arc<AdminState>>,
    ApiJson(request): ApiJson<EnrolRequest>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let name = request.name.trim().to_string();
    if name.is_empty() || name.chars().count() > 64 || name.chars().any(|c| c.is_control()) {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "a device name is 1 to 64 printable characters"));
    }
    let role: Role = request.role.parse().map_err(|e: String| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    let hours = request.expires_in_hours.unwrap_or(ops::DEFAULT_TOKEN_TTL.as_secs_f64() / 3600.0);
    if !(hours > 0.0 && hours <= 24.0 * 30.0) {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "expires_in_hours must be between 0 and 720"));
    }
    let addr = state.sync_addr.clone();
    let ttl = Duration::from_secs_f64(hours * 3600.0);
    let shown = addr.to_string();
    let token = blocking(&state, move |store| Ok(ops::issue_token(store, &name, role, addr, ttl)?)).await?;
    let expires = care_node::now_ms() + ttl.as_millis() as i64;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "token": token, "server_addr": shown, "expires_at": iso(Some(expires)) })),
    ))
}

async fn revoke_device(State(state): State<Arc<AdminState>>, ApiPath(name): ApiPath<String>) -> ApiResult {
    blocking(&state, move |store| {
        ops::revoke(store, &name)?;
        Ok(Json(json!({ "device": name, "state": "revoked" })))
    })
    .await
}

async fn wipe_device(State(state): State<Arc<AdminState>>, ApiPath(name): ApiPath<String>) -> ApiResult {
    blocking(&state, move |store| {
        ops::wipe(store, &name)?;
        Ok(Json(json!({ "device": name, "state": "wipe-requested" })))
    })
    .await
}

async fn scopes(State(state): State<Arc<AdminState>>) -> ApiResult {
    blocking(&state, |store| {
        let now = care_node::now_ms();
        let grants = store.grants(None, now)?;
        let mut out = Vec::new();
        for d in store.devices()? {
            let incidents: Vec<Value> = grants
                .iter()
                .filter(|g| g.device == d.id && g.kind == GrantKind::Incident)
                .map(
                    |g| json!({ "patient": g.patient.to_string(), "expires_at": iso(Some(g.expires_at_ms)) }),
                )
                .collect();
            let caseload: Vec<String> = store.caseload(d.id)?.iter().map(|p| p.to_string()).collect();
            out.push(json!({
                "device": d.name,
                "caseload": caseload,
                "incidents": incidents,
                "areas": store.areas(d.id)?,
                "budget": store.device_budget(d.id)?,
            }));
        }
        Ok(Json(json!({ "scopes": out })))
    })
    .await
}

/// A device and a patient (by NHS number or care-sync patient id).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DevicePatient {
    device: String,
    nhs: String,
}

/// An incident to open: a device, a patient, and how long the grant lasts.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IncidentRequest {
    device: String,
    nhs: String,
    hours: Option<f64>,
}

async fn caseload_add(State(state): State<Arc<AdminState>>, ApiJson(r): ApiJson<DevicePatient>) -> ApiResult {
    blocking(&state, move |store| {
        Ok(Json(json!({ "changed": ops::caseload_add(store, &r.device, &r.nhs)? })))
    })
    .await
}

async fn caseload_remove(
    State(state): State<Arc<AdminState>>,
    ApiJson(r): ApiJson<DevicePatient>,
) -> ApiResult {
    blocking(&state, move |store| {
        Ok(Json(json!({ "changed": ops::caseload_remove(store, &r.device, &r.nhs)? })))
    })
    .await
}

async fn incident_open(
    State(state): State<Arc<AdminState>>,
    ApiJson(r): ApiJson<IncidentRequest>,
) -> ApiResult {
    blocking(&state, move |store| {
        let hours = r.hours.unwrap_or(ops::DEFAULT_INCIDENT_HOURS);
        Ok(Json(json!({ "grant": ops::incident_open(store, &r.device, &r.nhs, hours)? })))
    })
    .await
}

async fn incident_close(
    State(state): State<Arc<AdminState>>,
    ApiJson(r): ApiJson<DevicePatient>,
) -> ApiResult {
    blocking(&state, move |store| {
        Ok(Json(json!({ "closed": ops::incident_close(store, &r.device, &r.nhs)? })))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceDistrict {
    device: String,
    district: String,
}

async fn area_add(State(state): State<Arc<AdminState>>, ApiJson(r): ApiJson<DeviceDistrict>) -> ApiResult {
    blocking(&state, move |store| {
        Ok(Json(json!({ "changed": ops::area(store, &r.device, &r.district, true)? })))
    })
    .await
}

async fn area_remove(State(state): State<Arc<AdminState>>, ApiJson(r): ApiJson<DeviceDistrict>) -> ApiResult {
    blocking(&state, move |store| {
        Ok(Json(json!({ "changed": ops::area(store, &r.device, &r.district, false)? })))
    })
    .await
}

#[derive(Deserialize)]
struct AlertsQuery {
    #[serde(default)]
    all: bool,
}

async fn alerts(State(state): State<Arc<AdminState>>, ApiQuery(q): ApiQuery<AlertsQuery>) -> ApiResult {
    blocking(&state, move |store| {
        let alerts: Vec<Value> = store
            .alerts(q.all)?
            .into_iter()
            .map(|a| {
                json!({
                    "id": a.id,
                    "at": iso(Some(a.at_ms)),
                    "kind": a.kind,
                    "device": a.device,
                    "patient": a.patient.map(|p| p.to_string()),
                    "reason": if ops::reason_sealed(&a) { None } else { Some(a.reason.clone()) },
                    "reason_sealed": ops::reason_sealed(&a),
                    "acknowledged_at": iso(a.acknowledged_at_ms),
                    "note": a.note,
                })
            })
            .collect();
        Ok(Json(json!({ "alerts": alerts })))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AckRequest {
    note: String,
}

async fn acknowledge_alert(
    State(state): State<Arc<AdminState>>,
    ApiPath(id): ApiPath<i64>,
    ApiJson(r): ApiJson<AckRequest>,
) -> ApiResult {
    blocking(&state, move |store| {
        if ops::acknowledge_alert(store, id, &r.note)? {
            Ok(Json(json!({ "id": id, "acknowledged": true })))
        } else {
            Err(ApiError::new(StatusCode::NOT_FOUND, format!("no open alert {id}")))
        }
    })
    .await
}

/// A sealed alert reason, for the operator who asks; the look is audited.
async fn alert_reason(State(state): State<Arc<AdminState>>, ApiPath(id): ApiPath<i64>) -> ApiResult {
    blocking(&state, move |store| match ops::alert_reason(store, id)? {
        Some(reason) => Ok(Json(json!({ "id": id, "reason": reason }))),
        None => Err(ApiError::new(StatusCode::NOT_FOUND, format!("no alert {id}"))),
    })
    .await
}

#[derive(Deserialize)]
struct QuarantineQuery {
    device: Option<String>,
    #[serde(default)]
    all: bool,
}

async fn review_quarantine(
    State(state): State<Arc<AdminState>>,
    ApiPath(id): ApiPath<i64>,
    ApiJson(r): ApiJson<AckRequest>,
) -> ApiResult {
    blocking(&state, move |store| {
        if ops::review_quarantine(store, id, &r.note)? {
            Ok(Json(json!({ "id": id, "reviewed": true })))
        } else {
            Err(ApiError::new(StatusCode::NOT_FOUND, format!("no quarantined upload {id}")))
        }
    })
    .await
}

/// Uploads the write policy refused: rule and place, never the changes themselves.
async fn quarantine(
    State(state): State<Arc<AdminState>>,
    ApiQuery(q): ApiQuery<QuarantineQuery>,
) -> ApiResult {
    let all = q.all;
    blocking(&state, move |store| {
        let device = match q.device.filter(|d| !d.trim().is_empty()) {
            Some(name) => Some(
                store
                    .device_by_name(&name)?
                    .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no device named `{name}`")))?
                    .id,
            ),
            None => None,
        };
        let items: Vec<Value> = store
            .quarantined(device)?
            .into_iter()
            .filter(|q| all || q.reviewed.is_none())
            .map(|q| {
                json!({
                    "id": q.id,
                    "at": iso(Some(q.at_ms)),
                    "device": q.device,
                    "patient": q.patient.to_string(),
                    "rule": q.rule,
                    "place": q.place,
                    "changes": q.changes.len(),
                    "reviewed_at": q.reviewed.as_ref().map(|r| iso(Some(r.at_ms))),
                    "review_note": q.reviewed.map(|r| r.note),
                })
            })
            .collect();
        Ok(Json(json!({ "quarantine": items })))
    })
    .await
}

#[derive(Deserialize)]
struct AuditQuery {
    /// A patient by NHS number or care-sync id.
    nhs: Option<String>,
    device: Option<String>,
    since: Option<String>,
    limit: Option<usize>,
}

/// The most audit lines one request returns.
const MAX_AUDIT_LIMIT: usize = 10_000;

async fn audit(State(state): State<Arc<AdminState>>, ApiQuery(q): ApiQuery<AuditQuery>) -> ApiResult {
    blocking(&state, move |store| {
        // An empty parameter is no filter (as the schema says); anything else is read.
        let blank = |s: Option<String>| s.filter(|s| !s.is_empty());
        let filter = AuditFilter {
            patient: blank(q.nhs).map(|n| ops::find_patient(store, &n)).transpose()?,
            actor: blank(q.device),
            since_ms: blank(q.since).map(|s| ops::parse_since(&s)).transpose()?,
        };
        let entries = ops::audit_search(store, &filter)?;
        let limit = q.limit.unwrap_or(500);
        if limit > MAX_AUDIT_LIMIT {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("limit is at most {MAX_AUDIT_LIMIT}"),
            ));
        }
        let total = entries.len();
        // Newest first, so that a limit keeps the most recent.
        let shown: Vec<Value> = entries
            .into_iter()
            .rev()
            .take(limit)
            .map(|a| {
                json!({
                    "seq": a.seq,
                    "at": iso(Some(a.at_ms)),
                    "actor": a.actor,
                    "action": a.action,
                    "patient": a.patient.map(|p| p.to_string()),
                    "detail": a.detail,
                })
            })
            .collect();
        Ok(Json(json!({ "total": total, "entries": shown })))
    })
    .await
}

/// Every setting in force, with its default and where it came from.
async fn settings(State(state): State<Arc<AdminState>>) -> ApiResult {
    blocking(&state, |store| {
        let mut out = Vec::new();
        for setting in crate::domain::settings::Setting::ALL {
            let (value, source) = store.effective_setting(setting)?;
            out.push(json!({
                "name": setting.name(),
                "value": value,
                "default": setting.default_value(),
                "source": source.as_str(),
                "description": setting.describe(),
            }));
        }
        Ok(Json(json!({ "settings": out })))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingRequest {
    name: String,
    value: String,
}

/// Changes a setting as an operator (audited).
async fn set_setting(State(state): State<Arc<AdminState>>, ApiJson(r): ApiJson<SettingRequest>) -> ApiResult {
    blocking(&state, move |store| {
        ops::set_setting(store, &r.name, &r.value)?;
        Ok(Json(json!({ "name": r.name, "value": r.value.trim(), "source": "operator" })))
    })
    .await
}

async fn feeds(State(state): State<Arc<AdminState>>) -> ApiResult {
    blocking(&state, |store| {
        let status = store.feed_status()?;
        let refusals: Vec<Value> = status
            .recent_refusals
            .iter()
            .map(|r| json!({ "at": iso(Some(r.at_ms)), "code": r.code, "control_id": r.control_id, "reason": r.reason }))
            .collect();
        Ok(Json(json!({
            "mllp": {
                "accepted": status.accepted,
                "errors": status.errors,
                "rejected": status.rejected,
                "last_message_at": iso(status.last_message_ms),
                "last_error": refusals.first(),
                "recent_refusals": refusals,
            }
        })))
    })
    .await
}

#[derive(Deserialize)]
struct PlanningQuery {
    by: Option<String>,
}

/// The planning CSV, grouped by `?by=` (default condition × age band × district); how many
/// cells it has and how many were suppressed come in `X-Planning-Cells` and
/// `X-Planning-Suppressed-Cells`.
async fn planning_export(
    State(state): State<Arc<AdminState>>,
    ApiQuery(q): ApiQuery<PlanningQuery>,
) -> Result<Response, ApiError> {
    let grouping = match q.by.as_deref().filter(|b| !b.is_empty()) {
        Some(by) => crate::operator::planning::Grouping::parse(by)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?,
        None => crate::operator::planning::Grouping::ALL,
    };
    let export = blocking(&state, move |store| Ok(ops::planning_export(store, grouping)?)).await?;
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
            (header::CONTENT_DISPOSITION, "attachment; filename=\"care-sync-planning.csv\"".to_string()),
            (header::HeaderName::from_static("x-planning-cells"), export.cells.to_string()),
            (
                header::HeaderName::from_static("x-planning-suppressed-cells"),
                export.suppressed_cells.to_string(),
            ),
        ],
        export.csv,
    )
        .into_response())
}
