//! What the region's operators use.
//!
//! - [`ops`]: operator actions (tokens, caseloads, revocation) shared by CLI, API, demo and tests.
//! - [`planning`]: anonymised, suppressed planning exports (national data opt-out respected).
//! - [`config`]: the TOML configuration file and its defaults.
//! - [`addrs`]: where devices reach the region's instances (enrolment tokens).
//! - [`metrics`]: Prometheus metrics.
//! - [`admin`]: the operators' admin API, dashboard and `/metrics` (axum).

pub mod addrs;
pub mod admin;
pub mod config;
pub mod metrics;
pub mod ops;
pub mod planning;
