//! Explicit schema migrations. Only the server runs them, as its own actor, so a migration
//! happens once per document and reaches devices as ordinary changes.
//!
//! - v1 → v2: version 2 only added optional fields (every v1 entry reads as a v2 entry with them
//!   absent) and new maps: `actors`, `assertions`, and the sections `care_plans`, `contacts`,
//!   `encounters`, `results`. The migration creates the missing maps and bumps the version.
//!
//! Shipped migrations are never edited; a new schema version adds a new step.

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, ObjType, ROOT, ReadDoc};

use super::{PatientSummary, SCHEMA_VERSION, Section, SummaryError};

impl PatientSummary {
    /// Brings the document to [`SCHEMA_VERSION`]; returns whether anything changed.
    pub fn migrate(&mut self, server_actor: ActorId, now_ms: i64) -> Result<bool, SummaryError> {
        let version = self.schema_version()?;
        if version >= SCHEMA_VERSION {
            return Ok(false);
        }
        let doc = self.doc_mut();
        doc.set_actor(server_actor);
        if version < 2 {
            let mut keys = vec!["actors", "assertions"];
            keys.extend(Section::ALL.iter().map(|s| s.key()));
            for key in keys {
                if doc.get(ROOT, key)?.is_none() {
                    doc.put_object(ROOT, key, ObjType::Map)?;
                }
            }
        }
        doc.put(ROOT, "schema_version", SCHEMA_VERSION)?;
        doc.commit_with(
            CommitOptions::default().with_time(now_ms / 1000).with_message("migrate to schema 2"),
        );
        Ok(true)
    }
}
