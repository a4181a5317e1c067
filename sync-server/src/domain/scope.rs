//! Who gets what: the scope policy, decided on the server only.
//!
//! A device's scope is the union of four tiers, in priority order:
//! 1. explicit grants: break glass and permission to view (recorded at the point of care);
//! 2. incidents the device is assigned to (until closed or lapsed);
//! 3. its caseload;
//! 4. area prefetch: patients in the postcode districts it covers who carry a high-risk flag.
//!
//! A patient's objection to sharing removes them from caseload and prefetch delivery (tiers 3
//! and 4); grants and incidents still deliver, as direct emergency care allows. The device's
//! document budget caps the total: higher tiers first, and within a tier the nearest review date
//! first; what the budget leaves out is counted and reported to the device.
//!
//! [`candidates`] turns what the store holds (a device's grants, caseload and areas' patients,
//! as plain rows) into the reasons each patient is on the device; [`decide`] applies objection,
//! priority and budget. Both are pure and unit-tested; [`crate::session::scope::device_scope`]
//! gathers their inputs from the store.

use std::collections::HashSet;

use care_node::summary::{self as s, PatientId, PatientSummary};

use crate::domain::grant::GrantKind;

/// The default per-device document budget.
pub const DEFAULT_BUDGET: u64 = 20_000;
/// The default high-risk flags that make a patient prefetched in a device's area.
pub const DEFAULT_PREFETCH_FLAGS: &[&str] = &[
    s::alert_kind::RESPECT_DNACPR,
    s::alert_kind::END_OF_LIFE,
    s::alert_kind::SAFEGUARDING,
    FREQUENT_ATTENDER,
];
/// The flag of a patient with three or more recorded encounters.
pub const FREQUENT_ATTENDER: &str = "frequent-attender";
/// Encounters that make a frequent attender.
pub const FREQUENT_ATTENDANCES: usize = 3;

/// Why a patient is in a device's scope, highest priority first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    Grant,
    Incident,
    Caseload,
    AreaPrefetch,
}

/// One reason for one patient to be on one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub patient: PatientId,
    pub tier: Tier,
    /// The earliest review date of the patient's alerts (ISO 8601), if any.
    pub review_date: Option<String>,
    /// The patient objects to sharing.
    pub objection: bool,
    /// The patient has an active alert (ReSPECT/DNACPR, safeguarding, …): sent first.
    pub alerted: bool,
}

/// What the scope rules read of one stored patient.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PatientFacts {
    pub patient: PatientId,
    /// The earliest review date of the patient's alerts (ISO 8601), if any.
    pub review_date: Option<String>,
    pub objection: bool,
    /// The patient's risk flags ([`PatientIndex::flags`]).
    pub risk_flags: Vec<String>,
    /// An operator merged this record into another: it puts no one on a device.
    pub merged: bool,
}

/// A grant of one patient to the device, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantFacts {
    pub kind: GrantKind,
    pub expires_at_ms: i64,
    /// Closed by an operator (an incident closed), if it was.
    pub closed_at_ms: Option<i64>,
    pub patient: PatientFacts,
}

/// Everything stored that can put patients on one device. The store may leave out rows the rules
/// would drop (grants long ended, patients in the areas with none of the flags asked for): it
/// narrows, [`candidates`] decides.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScopeRows {
    pub grants: Vec<GrantFacts>,
    pub caseload: Vec<PatientFacts>,
    /// Patients of the postcode districts the device covers.
    pub area: Vec<PatientFacts>,
}

/// The tier a grant puts its patient in.
pub fn grant_tier(kind: GrantKind) -> Tier {
    match kind {
        GrantKind::Incident => Tier::Incident,
        GrantKind::PermissionToView | GrantKind::BreakGlass => Tier::Grant,
    }
}

/// Every reason each patient is on the device at `now_ms`, before objection and budget: grants
/// open and not yet expired, the caseload, and the area's patients carrying one of
/// `prefetch_flags`; never a merged record. A patient is alerted by any flag but
/// [`FREQUENT_ATTENDER`] (attendance is no alert).
pub fn candidates(rows: ScopeRows, prefetch_flags: &[String], now_ms: i64) -> Vec<Candidate> {
    let candidate = |facts: PatientFacts, tier: Tier| Candidate {
        alerted: facts.risk_flags.iter().any(|f| f != FREQUENT_ATTENDER),
        patient: facts.patient,
        tier,
        review_date: facts.review_date,
        objection: facts.objection,
    };
    let grants = rows
        .grants
        .into_iter()
        .filter(|g| g.closed_at_ms.is_none() && g.expires_at_ms > now_ms)
        .map(|g| (g.patient, grant_tier(g.kind)));
    let caseload = rows.caseload.into_iter().map(|p| (p, Tier::Caseload));
    let area = rows
        .area
        .into_iter()
        .filter(|p| p.risk_flags.iter().any(|f| prefetch_flags.contains(f)))
        .map(|p| (p, Tier::AreaPrefetch));
    grants
        .chain(caseload)
        .chain(area)
        .filter(|(p, _)| !p.merged)
        .map(|(p, tier)| candidate(p, tier))
        .collect()
}

/// The decided scope of a device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    /// Patients to hold, sorted by id.
    pub patients: Vec<PatientId>,
    /// The patients among them a new device gets first: granted (break glass, permission),
    /// incident, or with an active alert.
    pub first: HashSet<PatientId>,
    /// Patients in scope that the budget left out.
    pub left_out: u64,
    /// Patients withheld because they object to sharing.
    pub withheld_by_objection: u64,
}

/// Applies objection, priority and budget to the candidates.
pub fn decide(mut candidates: Vec<Candidate>, budget: u64) -> Scope {
    let mut withheld = HashSet::new();
    candidates.retain(|c| {
        let keep = !(c.objection && matches!(c.tier, Tier::Caseload | Tier::AreaPrefetch));
        if !keep {
            withheld.insert(c.patient);
        }
        keep
    });
    // Highest tier first; within a tier the nearest review first (none last), then by id.
    candidates.sort_by(|a, b| {
        a.tier
            .cmp(&b.tier)
            .then_with(|| match (&a.review_date, &b.review_date) {
                (Some(x), Some(y)) => x.cmp(y),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => std::cmp::Ordering::Equal,
            })
            .then_with(|| a.patient.cmp(&b.patient))
    });
    let mut chosen = Vec::new();
    let mut seen = HashSet::new();
    let mut first = HashSet::new();
    let mut left_out = HashSet::new();
    for c in candidates {
        if seen.contains(&c.patient) {
            continue;
        }
        if (chosen.len() as u64) < budget {
            seen.insert(c.patient);
            chosen.push(c.patient);
            if c.alerted || matches!(c.tier, Tier::Grant | Tier::Incident) {
                first.insert(c.patient);
            }
        } else {
            left_out.insert(c.patient);
        }
    }
    left_out.retain(|p| !seen.contains(p));
    withheld.retain(|p| !seen.contains(p));
    chosen.sort_unstable();
    Scope {
        patients: chosen,
        first,
        left_out: left_out.len() as u64,
        withheld_by_objection: withheld.len() as u64,
    }
}

/// What the scope needs to know of a patient, derived from the document whenever it changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PatientIndex {
    /// Postcode district, e.g. `SO16`.
    pub district: Option<String>,
    /// High-risk flags: active alert kinds, and `frequent-attender`.
    pub flags: Vec<String>,
    pub review_date: Option<String>,
}

impl PatientIndex {
    pub fn of(summary: &mut PatientSummary) -> Result<Self, s::SummaryError> {
        let postcode = summary.demographics()?.postcode;
        Self::with_postcode(summary, postcode.as_deref())
    }

    /// [`PatientIndex::of`] for a summary whose postcode is already read.
    pub fn with_postcode(
        summary: &mut PatientSummary,
        postcode: Option<&str>,
    ) -> Result<Self, s::SummaryError> {
        let district = postcode.and_then(|p| p.split_whitespace().next().map(|d| d.to_ascii_uppercase()));
        let mut flags = Vec::new();
        let mut review_date: Option<String> = None;
        for alert in summary.clinical_entries::<s::Alert>()? {
            if alert.data.status.as_deref().unwrap_or("active") != "active" {
                continue;
            }
            if !flags.contains(&alert.data.kind) {
                flags.push(alert.data.kind.clone());
            }
            if let Some(r) = alert.data.review_date {
                review_date = Some(match review_date {
                    Some(current) if current <= r => current,
                    _ => r,
                });
            }
        }
        if summary.clinical_count(s::Section::Encounters)? >= FREQUENT_ATTENDANCES {
            flags.push(FREQUENT_ATTENDER.to_string());
        }
        flags.sort();
        Ok(Self { district, flags, review_date })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(n: u8, tier: Tier, review: Option<&str>, objection: bool) -> Candidate {
        Candidate {
            patient: PatientId::from_bytes([n; 16]),
            tier,
            review_date: review.map(str::to_string),
            objection,
            alerted: false,
        }
    }

    fn facts(n: u8, flags: &[&str], merged: bool) -> PatientFacts {
        PatientFacts {
            patient: PatientId::from_bytes([n; 16]),
            risk_flags: flags.iter().map(|f| f.to_string()).collect(),
            merged,
            ..Default::default()
        }
    }

    fn grant(n: u8, kind: GrantKind, expires_at_ms: i64, closed_at_ms: Option<i64>) -> GrantFacts {
        GrantFacts { kind, expires_at_ms, closed_at_ms, patient: facts(n, &[], false) }
    }

    #[test]
    fn candidates_are_open_grants_the_caseload_and_flagged_area_patients_never_merged_ones() {
        let rows = ScopeRows {
            grants: vec![
                grant(1, GrantKind::BreakGlass, 100, None),
                grant(2, GrantKind::Incident, 100, None),
                grant(3, GrantKind::PermissionToView, 50, None), // lapsed at 50
                grant(4, GrantKind::Incident, 100, Some(10)),    // closed
            ],
            caseload: vec![facts(5, &[FREQUENT_ATTENDER], false), facts(6, &[], true)],
            area: vec![
                facts(7, &["safeguarding"], false),
                facts(8, &["frequent-attender"], false), // not a flag asked for
                facts(9, &["safeguarding"], true),
            ],
        };
        let found = candidates(rows, &["safeguarding".to_string()], 60);
        let got: Vec<(u8, Tier, bool)> =
            found.iter().map(|c| (c.patient.as_bytes()[0], c.tier, c.alerted)).collect();
        assert_eq!(
            got,
            vec![
                (1, Tier::Grant, false),
                (2, Tier::Incident, false),
                (5, Tier::Caseload, false), // frequent attendance is no alert
                (7, Tier::AreaPrefetch, true),
            ]
        );
    }

    #[test]
    fn the_budget_keeps_higher_tiers_and_nearer_reviews_first() {
        let candidates = vec![
            c(1, Tier::AreaPrefetch, Some("2026-12-01"), false),
            c(2, Tier::Caseload, None, false),
            c(3, Tier::Incident, None, false),
            c(4, Tier::AreaPrefetch, Some("2026-11-30"), false),
            c(5, Tier::Grant, None, false),
        ];
        let scope = decide(candidates.clone(), 4);
        let ids: Vec<u8> = scope.patients.iter().map(|p| p.as_bytes()[0]).collect();
        assert_eq!(ids, vec![2, 3, 4, 5], "area prefetch with the later review is left out");
        assert_eq!(scope.left_out, 1);
        assert_eq!(decide(candidates, 100).left_out, 0);
    }

    #[test]
    fn a_patient_in_two_tiers_counts_once() {
        let scope = decide(vec![c(1, Tier::Caseload, None, false), c(1, Tier::AreaPrefetch, None, false)], 1);
        assert_eq!((scope.patients.len(), scope.left_out), (1, 0));
    }

    #[test]
    fn objection_withholds_caseload_and_prefetch_but_not_grants_or_incidents() {
        let scope = decide(
            vec![
                c(1, Tier::Caseload, None, true),
                c(2, Tier::AreaPrefetch, None, true),
                c(3, Tier::Incident, None, true),
                c(4, Tier::Grant, None, true),
                c(5, Tier::Caseload, None, false),
            ],
            10,
        );
        let ids: Vec<u8> = scope.patients.iter().map(|p| p.as_bytes()[0]).collect();
        assert_eq!(ids, vec![3, 4, 5]);
        assert_eq!(scope.withheld_by_objection, 2);
    }
}
