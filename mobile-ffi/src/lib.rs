//! `care-mobile-ffi`: UniFFI bindings of `care-node` for Kotlin and Swift.
//!
//! Empty for now: the bindings are the subject of their own issue. Nothing of the logic will
//! live here; each exported function will convert, call `care-node` and map the error.
