//! What the region's operators use.
//!
//! - [`ops`]: operator actions (tokens, caseloads, revocation) shared by CLI, API, demo and tests.
//! - [`planning`]: anonymised, suppressed planning exports (national data opt-out respected).
//! - [`config`]: the TOML configuration file and its defaults.
//! - [`metrics`]: Prometheus metrics.
//! - [`admin`]: the operators' admin API, dashboard and `/metrics` (axum).

pub mod admin;
pub mod config;
pub mod metrics;
pub mod ops;
pub mod planning;
