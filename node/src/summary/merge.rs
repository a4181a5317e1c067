//! Merging two records of one person: an explicit, audited operator action, never automatic.
//!
//! The kept record absorbs every entry of the merged one under the same entry ids (so absorbing
//! twice changes nothing, and entered-in-error markers travel with their entries). The merged
//! record is kept for the record with a `merged_into` pointer; it is taken out of every scope.

use automerge::ReadDoc;
use automerge::transaction::Transactable;

use super::*;

impl PatientSummary {
    /// The record this one was merged into, if it was.
    pub fn merged_into(&self) -> Result<Option<PatientId>, SummaryError> {
        match self.doc.get(ROOT, "merged_into")? {
            Some((Value::Scalar(s), _)) => match s.as_ref() {
                ScalarValue::Str(id) => Ok(Some(
                    id.parse().map_err(|_| SummaryError::Layout("merged_into is not a UUID".into()))?,
                )),
                _ => Ok(None),
            },
            _ => Ok(None),
        }
    }

    /// Marks this record as merged into `target`.
    pub fn mark_merged_into(&mut self, target: PatientId, at_ms: i64) -> Result<(), SummaryError> {
        self.doc.put(ROOT, "merged_into", target.to_string())?;
        self.commit(at_ms);
        Ok(())
    }

    /// Copies every entry of `other` into this record under the same ids; returns how many
    /// entries changed. Demographics this record lacks (e.g. the NHS number of a provisional
    /// record) are taken from `other`.
    pub fn absorb(
        &mut self,
        other: &mut PatientSummary,
        provenance: &Provenance,
    ) -> Result<usize, SummaryError> {
        let mut changed = 0;
        changed += self.absorb_section::<Alert>(other, provenance)?;
        changed += self.absorb_section::<Allergy>(other, provenance)?;
        changed += self.absorb_section::<Medication>(other, provenance)?;
        changed += self.absorb_section::<Problem>(other, provenance)?;
        changed += self.absorb_section::<CarePlan>(other, provenance)?;
        changed += self.absorb_section::<Contact>(other, provenance)?;
        changed += self.absorb_section::<Encounter>(other, provenance)?;
        changed += self.absorb_section::<Report>(other, provenance)?;
        let mut mine = self.demographics()?;
        let theirs = other.demographics()?;
        let before = mine.clone();
        mine.nhs_number = mine.nhs_number.or(theirs.nhs_number);
        mine.nhs_number_status = mine.nhs_number_status.or(theirs.nhs_number_status);
        mine.date_of_birth = mine.date_of_birth.or(theirs.date_of_birth);
        mine.sex = mine.sex.or(theirs.sex);
        mine.postcode = mine.postcode.or(theirs.postcode);
        mine.gp_practice_code = mine.gp_practice_code.or(theirs.gp_practice_code);
        mine.gp_practice_name = mine.gp_practice_name.or(theirs.gp_practice_name);
        if mine != before {
            self.set_demographics(&mine, provenance.recorded_at_ms)?;
            changed += 1;
        }
        Ok(changed)
    }

    fn absorb_section<T: SectionEntry>(
        &mut self,
        other: &mut PatientSummary,
        provenance: &Provenance,
    ) -> Result<usize, SummaryError> {
        let mut changed = 0;
        for entry in other.entries::<T>()? {
            if self.upsert(entry.id, &entry.data)? {
                changed += 1;
            }
            if let Some(marker) = &entry.entered_in_error {
                let already =
                    self.entries::<T>()?.iter().any(|e| e.id == entry.id && e.entered_in_error.is_some());
                if !already {
                    self.mark_entered_in_error(T::SECTION, entry.id, &marker.reason, provenance)?;
                    changed += 1;
                }
            }
        }
        Ok(changed)
    }
}
