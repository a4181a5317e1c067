//! Prometheus metrics, served by the admin API at `/metrics` (text exposition format).
//!
//! One process-wide set ([`metrics()`]), as with every Prometheus client: counters only ever
//! grow, so scrapers compute rates. No label ever carries a patient or device identifier.

use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AckLabel {
    /// HL7 v2 acknowledgement code: AA, AE or AR.
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

pub struct Metrics {
    registry: Registry,
    /// Devices with a sync session open now (live sessions included).
    pub connected_devices: Gauge,
    /// Sync sessions ended, by outcome (`ok`, `error`).
    pub syncs: Family<OutcomeLabel, Counter>,
    /// Seconds from a session's start to its last round (or its end); live waiting not counted.
    pub sync_duration: Histogram,
    /// UDP payload bytes of sync and enrolment connections, by direction (`sent`, `received`).
    pub bytes: Family<DirectionLabel, Counter>,
    /// Patient documents, by direction (`sent` to devices, `received` from them).
    pub documents: Family<DirectionLabel, Counter>,
    /// Connections refused or failed before a session (unknown or revoked keys, bad TLS).
    pub refused_handshakes: Counter,
    /// Enrolments, by outcome (`ok`, `refused`).
    pub enrolments: Family<OutcomeLabel, Counter>,
    /// HL7 v2 messages processed, by acknowledgement code.
    pub mllp_messages: Family<AckLabel, Counter>,
    /// Access grants to devices, by kind (`break-glass`, `permission-to-view`).
    pub access_grants: Family<KindLabel, Counter>,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("care_sync");
        let connected_devices = Gauge::default();
        registry.register("connected_devices", "Devices with a sync session open", connected_devices.clone());
        let syncs = Family::<OutcomeLabel, Counter>::default();
        registry.register("syncs", "Sync sessions ended, by outcome", syncs.clone());
        let sync_duration = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register(
            "sync_duration_seconds",
            "Time from session start to the end of its last round",
            sync_duration.clone(),
        );
        let bytes = Family::<DirectionLabel, Counter>::default();
        registry.register("bytes", "UDP payload bytes of device connections", bytes.clone());
        let documents = Family::<DirectionLabel, Counter>::default();
        registry.register(
            "documents",
            "Patient documents sent to and received from devices",
            documents.clone(),
        );
        let refused_handshakes = Counter::default();
        registry.register(
            "refused_handshakes",
            "Connections refused before a session (unknown or revoked keys, bad TLS)",
            refused_handshakes.clone(),
        );
        let enrolments = Family::<OutcomeLabel, Counter>::default();
        registry.register("enrolments", "Device enrolments, by outcome", enrolments.clone());
        let mllp_messages = Family::<AckLabel, Counter>::default();
        registry.register(
            "mllp_messages",
            "HL7 v2 messages processed (MLLP and ingest-adt files), by ACK code",
            mllp_messages.clone(),
        );
        let access_grants = Family::<KindLabel, Counter>::default();
        registry.register("access_grants", "Access grants to devices, by kind", access_grants.clone());
        Metrics {
            registry,
            connected_devices,
            syncs,
            sync_duration,
            bytes,
            documents,
            refused_handshakes,
            enrolments,
            mllp_messages,
            access_grants,
        }
    }

    /// Brings the HL7 message counter up to the store's counts by ACK code (`AR` counts every
    /// rejection). Counters only grow: a store whose counts went down (a restored backup) leaves
    /// the counter where it was.
    pub fn catch_up_feeds(&self, feeds: &crate::store::FeedStatus) {
        for (code, stored) in [("AA", feeds.accepted), ("AE", feeds.errors), ("AR", feeds.rejected)] {
            let counter = self.mllp_messages.get_or_create(&AckLabel { code: code.into() });
            let now = counter.get();
            if stored > now {
                counter.inc_by(stored - now);
            }
        }
    }

    /// The metrics in the Prometheus text exposition format (0.0.4), which Prometheus and
    /// `promtool check metrics` read: `prometheus-client` writes OpenMetrics, where a counter's
    /// HELP and TYPE name the family without `_total` and the text ends with `# EOF`; here they
    /// name the samples, as the older format wants.
    pub fn encode(&self) -> String {
        let mut open_metrics = String::new();
        prometheus_client::encoding::text::encode(&mut open_metrics, &self.registry)
            .expect("writing to a String");
        let counters: std::collections::HashSet<&str> = open_metrics
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
            .collect();
        let mut out = String::with_capacity(open_metrics.len() + 256);
        for line in open_metrics.lines() {
            if line == "# EOF" || line.starts_with("# UNIT ") {
                continue;
            }
            let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
                let rest = line.strip_prefix(prefix)?;
                let (name, tail) = rest.split_once(' ')?;
                counters.contains(name).then(|| format!("{prefix}{name}_total {tail}"))
            });
            out.push_str(renamed.as_deref().unwrap_or(line));
            out.push('\n');
        }
        out
    }
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

pub(crate) const SENT: DirectionLabel = DirectionLabel { direction: "sent" };
pub(crate) const RECEIVED: DirectionLabel = DirectionLabel { direction: "received" };

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_appear_in_the_exposition() {
        metrics().mllp_messages.get_or_create(&AckLabel { code: "AR".into() }).inc();
        let text = metrics().encode();
        assert!(text.contains("care_sync_mllp_messages_total{code=\"AR\"}"), "{text}");
        assert!(text.contains("# TYPE care_sync_mllp_messages_total counter\n"), "{text}");
        assert!(text.contains("# HELP care_sync_mllp_messages_total HL7"), "{text}");
        assert!(!text.contains("# EOF"), "{text}");
        assert!(text.contains("# TYPE care_sync_sync_duration_seconds histogram"), "{text}");
        assert!(text.contains("care_sync_connected_devices"), "{text}");
    }
}
