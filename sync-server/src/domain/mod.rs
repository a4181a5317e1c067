//! The domain rules of the region: who gets which patients, and what access at the point of care
//! a device is granted.
//!
//! - [`scope`]: who gets what: tiers, objection, budget (pure policy).
//! - [`governance`]: leases, permission to view, break glass, view-log verification.

pub mod governance;
pub mod scope;
