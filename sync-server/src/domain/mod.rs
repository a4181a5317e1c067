//! The domain rules of the region: who gets which patients, what access at the point of care a
//! device is granted, and what a device may write. Plain Rust with no I/O: nothing here reads
//! the store, a socket or the clock (callers pass what the rules need, including `now`), and
//! nothing here depends on another layer of the server (`src/layers.rs` checks it).
//!
//! - [`device`]: a device's role and where it stands (enrolled, revoked, asked to wipe).
//! - [`scope`]: who gets what: tiers, objection, budget (pure policy).
//! - [`limits`]: what one peer may cost the server (the `[limits]` settings).
//! - [`grant`]: the kinds of grant (incident, permission to view, break glass).
//! - [`governance`]: the setting each grant lasts for, when access is refused.
//! - [`settings`]: the settings an operator changes at run time (leases, grant hours, budget,
//!   prefetch flags), typed, with their defaults and precedence.
//! - [`compaction`]: how far back the change log must reach, and which devices fall below it.
//! - [`merge`]: when two records of one person may be merged, and the changes that do it.
//! - [`upload`]: where an upload gets checked: bounds, scope and the write policy
//!   ([`care_node::policy`]), before anything is committed.

pub mod compaction;
pub mod device;
pub mod governance;
pub mod grant;
pub mod limits;
pub mod merge;
pub mod scope;
pub mod settings;
pub mod upload;
