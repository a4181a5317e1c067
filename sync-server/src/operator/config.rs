//! The server's configuration file (`care-sync-server --config FILE`), TOML.
//!
//! Every setting has its default here, in [`Config::default`] and [`PolicyConfig::defaults`];
//! `care-sync-server config` prints the effective configuration with every default filled in,
//! which is also a complete example file.
//! Unknown keys and wrong values are refused with the key's dotted name.
//!
//! The `[policy]` keys are optional: a key present in the file is written to the store at `serve`
//! (audited when it changes a value), and one left out keeps what `care-sync-server set` stored or,
//! failing that, the built-in default ([`PolicyConfig::defaults`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::operator::addrs::ServerAddrs;
use crate::store::{Role, ServerStore};

/// The default address of QUIC sync and enrolment.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7400";
/// The default MLLP address for HL7 v2 feeds.
pub const DEFAULT_MLLP: &str = "127.0.0.1:2575";
/// The default address of the admin API and dashboard (loopback only).
pub const DEFAULT_ADMIN: &str = "127.0.0.1:7480";
/// The default data directory.
pub const DEFAULT_DATA_DIR: &str = "./care-sync-data";
/// A device that has not synced for this long is shown as stale.
pub const DEFAULT_STALE_HOURS: f64 = 24.0;
/// The default log filter of `serve` (`tracing` env-filter syntax).
pub const DEFAULT_LOG_FILTER: &str = "warn,care_sync_server=info";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the server keeps its store (on SQLite), its operator token and its advertised
    /// address.
    pub data_dir: PathBuf,
    pub store: StoreConfig,
    pub sync: SyncConfig,
    pub feeds: FeedsConfig,
    pub admin: AdminConfig,
    pub logging: LoggingConfig,
    pub policy: PolicyConfig,
    /// What one peer may cost the server (docs/security.md, Bounds).
    pub limits: crate::domain::limits::Limits,
    pub compaction: CompactionConfig,
}

/// The longest hold (ten years) and period (a year) of compaction: beyond them a duration no
/// longer means anything, and would not fit the clocks.
pub const MAX_HOLD_DAYS: f64 = 3650.0;
const MAX_COMPACTION_HOURS: f64 = 8760.0;

/// When `serve` compacts the change log (docs/operations.md, Compact the change log).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompactionConfig {
    /// Hours between compactions while `serve` runs (0: never; run `compact-log` yourself).
    pub every_hours: f64,
    /// Days a device that stopped syncing holds the log back; devices away longer receive what
    /// changed whole when they return.
    pub hold_days: f64,
}

impl Default for CompactionConfig {
    fn default() -> Self {
        CompactionConfig {
            every_hours: 24.0,
            hold_days: crate::operator::ops::DEFAULT_COMPACTION_HOLD.as_secs_f64() / 86_400.0,
        }
    }
}

impl CompactionConfig {
    /// The hold as a duration.
    pub fn hold(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.hold_days.clamp(0.0, MAX_HOLD_DAYS) * 86_400.0)
    }

    /// The period between compactions, or `None` for never.
    pub fn every(&self) -> Option<std::time::Duration> {
        (self.every_hours > 0.0)
            .then(|| std::time::Duration::from_secs_f64(self.every_hours.min(MAX_COMPACTION_HOURS) * 3_600.0))
    }
}

/// Which database holds the store (docs/storage.md).
#[derive(Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `postgres://user@host:port/database` for PostgreSQL, shared by every instance of a
    /// region; left out, the embedded SQLite store in `data_dir`. Keep a password out of the
    /// file with `password_file`. TLS as libpq's `sslmode` and `sslrootcert` say
    /// (`?sslmode=require&sslrootcert=/etc/care-sync/db-ca.pem`), the certificate always verified.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// A file holding the database password (one line), readable only by the server's user.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
}

/// The URL may carry a password: never shown.
impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("url", &self.url.as_deref().map(crate::store::redact_url))
            .field("password_file", &self.password_file)
            .finish()
    }
}

impl StoreConfig {
    /// Opens the store this section names (SQLite in `data_dir` when it names none).
    pub fn open(&self, data_dir: &Path) -> Result<std::sync::Arc<dyn ServerStore>, crate::store::StoreError> {
        use std::os::unix::fs::PermissionsExt;
        let refuse = |why: String| crate::store::StoreError::Backend(why.into());
        let password = match &self.password_file {
            Some(_) if self.url.is_none() => {
                return Err(refuse(
                    "store.password_file is set but store.url is not: name the database".into(),
                ));
            }
            Some(file) => {
                let shown = file.display();
                let mode = std::fs::metadata(file)
                    .map_err(|e| refuse(format!("cannot read store.password_file {shown}: {e}")))?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    return Err(refuse(format!(
                        "store.password_file {shown} may be read by other users (mode {:o}): chmod 600 it",
                        mode & 0o777
                    )));
                }
                let text = std::fs::read_to_string(file)
                    .map_err(|e| refuse(format!("cannot read store.password_file {shown}: {e}")))?;
                Some(text.trim_end_matches(['\n', '\r']).to_string())
            }
            None => None,
        };
        crate::store::open(self.url.as_deref(), password.as_deref(), data_dir)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyncConfig {
    /// QUIC address devices sync and enrol on.
    pub listen: SocketAddr,
    /// The address written into enrolment tokens, when devices reach the server through another
    /// address than `listen` (a public interface, NAT). Several instances of a region: every
    /// instance's address, separated by commas (or a name that resolves to them all); a device
    /// tries the next when one does not answer. Default: `listen`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertised_addr: Option<ServerAddrs>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FeedsConfig {
    /// Whether `serve` listens for HL7 v2 over MLLP.
    pub mllp_enabled: bool,
    pub mllp_listen: SocketAddr,
    /// Sender addresses allowed to connect over MLLP (the integration engines). Plain MLLP has no
    /// authentication of its own: keep it on a trusted network, behind this list.
    pub mllp_allow: Vec<std::net::IpAddr>,
    /// MLLP connections open at once.
    pub mllp_max_connections: usize,
    /// Seconds an MLLP connection may stay silent before it is closed.
    pub mllp_idle_timeout_secs: u64,
    /// The IANA time zone of HL7 times sent without an offset (UK feeds send local time).
    pub time_zone: String,
    /// An ADT message for a valid NHS number the region has no record of: `create` a record
    /// (and alert an operator to review it) or `refuse` the message with AE.
    pub adt_unknown_patient: crate::ingest::hl7::adt::UnknownPatient,
    /// The same choice for particular sending facilities (MSH-4), e.g. `{ RHM = "refuse" }`.
    pub adt_unknown_patient_by_facility:
        std::collections::BTreeMap<String, crate::ingest::hl7::adt::UnknownPatient>,
}

impl FeedsConfig {
    /// The listener's options from this section.
    pub fn mllp_options(&self) -> crate::ingest::hl7::mllp::MllpOptions {
        crate::ingest::hl7::mllp::MllpOptions {
            allow: self.mllp_allow.clone(),
            max_connections: self.mllp_max_connections,
            idle_timeout: std::time::Duration::from_secs(self.mllp_idle_timeout_secs),
            adt: self.adt_options(),
        }
    }

    /// How ADT messages are read, from this section (the time zone was checked at load).
    pub fn adt_options(&self) -> crate::ingest::hl7::adt::AdtOptions {
        let defaults = crate::ingest::hl7::adt::AdtOptions::default();
        crate::ingest::hl7::adt::AdtOptions {
            time_zone: crate::ingest::hl7::time::zone(&self.time_zone).unwrap_or(defaults.time_zone),
            unknown_patient: self.adt_unknown_patient,
            unknown_patient_by_facility: self.adt_unknown_patient_by_facility.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Whether `serve` runs the admin API, dashboard and `/metrics`.
    pub enabled: bool,
    /// Loopback by default; put a TLS-terminating proxy in front for anything else.
    pub listen: SocketAddr,
    /// File holding the operator token (created with a random token at first `serve`).
    /// Default: `admin-token` in the data directory. `CARE_SYNC_ADMIN_TOKEN` overrides it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Devices that have not synced for this many hours are highlighted as stale.
    pub stale_after_hours: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per event, for log shippers.
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingConfig {
    pub format: LogFormat,
    /// `tracing` filter, e.g. `warn,care_sync_server=info`; `CARE_SYNC_LOG` overrides it.
    pub filter: String,
}

/// Governance policy; every key optional (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// Documents a device holds at most.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<u64>,
    /// Alert kinds and flags that make a patient prefetched in a device's area.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefetch_flags: Option<Vec<String>>,
    /// How long a permission-to-view grant lasts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub permission_hours: Option<f64>,
    /// How long break-glass access lasts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub break_glass_hours: Option<f64>,
    /// Offline lease of ambulance crews' devices.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_hours_ambulance_crew: Option<f64>,
    /// Offline lease of community nurses' devices.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_hours_community_nurse: Option<f64>,
}

impl PolicyConfig {
    /// The built-in policy defaults, every key set.
    pub fn defaults() -> PolicyConfig {
        use crate::domain::settings::{
            DEFAULT_BREAK_GLASS_HOURS, DEFAULT_LEASE_HOURS, DEFAULT_PERMISSION_HOURS,
        };
        PolicyConfig {
            budget: Some(crate::domain::scope::DEFAULT_BUDGET),
            prefetch_flags: Some(
                crate::domain::scope::DEFAULT_PREFETCH_FLAGS.iter().map(|f| f.to_string()).collect(),
            ),
            permission_hours: Some(DEFAULT_PERMISSION_HOURS),
            break_glass_hours: Some(DEFAULT_BREAK_GLASS_HOURS),
            lease_hours_ambulance_crew: Some(DEFAULT_LEASE_HOURS),
            lease_hours_community_nurse: Some(DEFAULT_LEASE_HOURS),
        }
    }

    /// This policy with every key it leaves out set to its built-in default.
    pub fn or_defaults(&self) -> PolicyConfig {
        let d = PolicyConfig::defaults();
        PolicyConfig {
            budget: self.budget.or(d.budget),
            prefetch_flags: self.prefetch_flags.clone().or(d.prefetch_flags),
            permission_hours: self.permission_hours.or(d.permission_hours),
            break_glass_hours: self.break_glass_hours.or(d.break_glass_hours),
            lease_hours_ambulance_crew: self.lease_hours_ambulance_crew.or(d.lease_hours_ambulance_crew),
            lease_hours_community_nurse: self.lease_hours_community_nurse.or(d.lease_hours_community_nurse),
        }
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("valid default address")
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            sync: SyncConfig::default(),
            feeds: FeedsConfig::default(),
            admin: AdminConfig::default(),
            store: StoreConfig::default(),
            logging: LoggingConfig::default(),
            policy: PolicyConfig::default(),
            limits: crate::domain::limits::Limits::default(),
            compaction: CompactionConfig::default(),
        }
    }
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig { listen: addr(DEFAULT_LISTEN), advertised_addr: None }
    }
}

impl Default for FeedsConfig {
    fn default() -> Self {
        let defaults = crate::ingest::hl7::mllp::MllpOptions::default();
        FeedsConfig {
            mllp_enabled: true,
            mllp_listen: addr(DEFAULT_MLLP),
            mllp_allow: defaults.allow,
            mllp_max_connections: defaults.max_connections,
            mllp_idle_timeout_secs: defaults.idle_timeout.as_secs(),
            time_zone: crate::ingest::hl7::adt::DEFAULT_TIME_ZONE.into(),
            adt_unknown_patient: defaults.adt.unknown_patient,
            adt_unknown_patient_by_facility: defaults.adt.unknown_patient_by_facility,
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            listen: addr(DEFAULT_ADMIN),
            token_file: None,
            stale_after_hours: DEFAULT_STALE_HOURS,
        }
    }
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig { format: LogFormat::Text, filter: DEFAULT_LOG_FILTER.into() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("configuration file {file}: {message}")]
    Syntax { file: PathBuf, message: String },
    #[error("configuration file {file}: key `{key}`: {message}")]
    Key { file: PathBuf, key: String, message: String },
}

impl Config {
    /// Reads a configuration file; every key left out keeps its default.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|e| ConfigError::Read(file.into(), e))?;
        Config::parse(&text).map_err(|e| match e {
            ParseError::Syntax(message) => ConfigError::Syntax { file: file.into(), message },
            ParseError::Key { key, message } => ConfigError::Key { file: file.into(), key, message },
        })
    }

    /// Parses configuration text (see [`Config::load`]).
    pub fn parse(text: &str) -> Result<Config, ParseError> {
        let deserializer =
            toml::de::Deserializer::parse(text).map_err(|e| ParseError::Syntax(one_line(&e.to_string())))?;
        let config: Config = serde_path_to_error::deserialize(deserializer).map_err(|e| ParseError::Key {
            key: e.path().to_string(),
            message: one_line(&e.inner().to_string()),
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ParseError> {
        let key = |key: &str, message: &str| ParseError::Key { key: key.into(), message: message.into() };
        let hours = [
            ("admin.stale_after_hours", Some(self.admin.stale_after_hours)),
            ("policy.permission_hours", self.policy.permission_hours),
            ("policy.break_glass_hours", self.policy.break_glass_hours),
            ("policy.lease_hours_ambulance_crew", self.policy.lease_hours_ambulance_crew),
            ("policy.lease_hours_community_nurse", self.policy.lease_hours_community_nurse),
            ("compaction.every_hours", Some(self.compaction.every_hours)),
        ];
        for (name, value) in hours {
            if value.is_some_and(|h| !h.is_finite() || h < 0.0) {
                return Err(key(name, "must be a non-negative number of hours"));
            }
        }
        if !(0.0..=MAX_HOLD_DAYS).contains(&self.compaction.hold_days) {
            return Err(key("compaction.hold_days", "must be a number of days from 0 to 3650"));
        }
        if !(0.0..=MAX_COMPACTION_HOURS).contains(&self.compaction.every_hours) {
            return Err(key(
                "compaction.every_hours",
                "must be a number of hours from 0 (never) to 8760 (a year)",
            ));
        }
        if self.policy.prefetch_flags.as_ref().is_some_and(|f| f.iter().any(|f| f.trim().is_empty())) {
            return Err(key("policy.prefetch_flags", "flags must not be empty strings"));
        }
        if let Err(message) = crate::ingest::hl7::time::zone(&self.feeds.time_zone) {
            return Err(key("feeds.time_zone", &message));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.logging.filter).is_err() {
            return Err(key("logging.filter", "not a valid tracing filter"));
        }
        Ok(())
    }

    /// The configuration as TOML.
    pub fn to_toml(&self) -> String {
        // A password in the store URL is not printed (the file keeps it).
        let mut shown = self.clone();
        shown.store.url = shown.store.url.as_deref().map(crate::store::redact_url);
        toml::to_string(&shown).expect("the configuration serialises")
    }

    /// Where the operator token lives.
    pub fn token_file(&self) -> PathBuf {
        self.admin.token_file.clone().unwrap_or_else(|| self.data_dir.join("admin-token"))
    }

    /// Applies the `[policy]` keys the file sets, by the precedence of
    /// [`crate::domain::settings`]: a file value that changed since it was last applied is put in
    /// force (audited); one that did not never undoes an operator's change. Returns what
    /// happened to each setting worth a log line.
    pub fn apply_policy(
        &self,
        store: &dyn ServerStore,
    ) -> Result<
        Vec<(crate::domain::settings::Setting, crate::domain::settings::Applied)>,
        crate::operator::ops::OpsError,
    > {
        use crate::domain::settings::{Applied, Setting};
        let p = &self.policy;
        let number = |v: Option<f64>| v.map(|h| h.to_string());
        let wanted = [
            (Setting::Budget, p.budget.map(|b| b.to_string())),
            (Setting::PrefetchFlags, p.prefetch_flags.as_ref().map(|f| f.join(","))),
            (Setting::PermissionHours, number(p.permission_hours)),
            (Setting::BreakGlassHours, number(p.break_glass_hours)),
            (Setting::LeaseHours(Role::AmbulanceCrew), number(p.lease_hours_ambulance_crew)),
            (Setting::LeaseHours(Role::CommunityNurse), number(p.lease_hours_community_nurse)),
        ];
        let mut outcomes = Vec::new();
        for (setting, value) in wanted {
            let Some(value) = value else { continue };
            setting.validate(&value).map_err(crate::operator::ops::OpsError::Invalid)?;
            if let Some(applied) = store.apply_file_setting(setting, &value)? {
                if let Applied::FromFile { value, replaced } = &applied {
                    let detail = match replaced {
                        Some(old) => format!(
                            "{} = {value} from the configuration file (replacing {old} set by an operator)",
                            setting.name()
                        ),
                        None => format!("{} = {value} from the configuration file", setting.name()),
                    };
                    store.append_audit(
                        "configuration-file",
                        "setting",
                        None,
                        &detail,
                        care_node::now_ms(),
                    )?;
                }
                outcomes.push((setting, applied));
            }
        }
        Ok(outcomes)
    }
}

/// Why configuration text was refused.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum ParseError {
    #[error("{0}")]
    Syntax(String),
    #[error("key `{key}`: {message}")]
    Key { key: String, message: String },
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_is_the_default_configuration() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn the_printed_configuration_reads_back_as_itself() {
        let config = Config {
            policy: PolicyConfig::defaults(),
            sync: SyncConfig {
                advertised_addr: Some(addr("192.0.2.1:7400").into()),
                ..SyncConfig::default()
            },
            ..Config::default()
        };
        assert_eq!(Config::parse(&config.to_toml()).unwrap(), config);
    }

    #[test]
    fn keys_left_out_keep_their_defaults() {
        let config = Config::parse("[admin]\nlisten = \"127.0.0.1:9000\"\n[policy]\nbudget = 500\n").unwrap();
        assert_eq!(config.admin.listen, addr("127.0.0.1:9000"));
        assert_eq!(config.admin.stale_after_hours, DEFAULT_STALE_HOURS);
        assert_eq!(config.sync, SyncConfig::default());
        assert_eq!(config.policy.budget, Some(500));
        assert_eq!(config.policy.lease_hours_ambulance_crew, None);
    }

    #[test]
    fn a_wrong_value_names_its_key() {
        let err = Config::parse("[admin]\nlisten = \"not an address\"\n").unwrap_err();
        let ParseError::Key { key, .. } = &err else { panic!("{err}") };
        assert_eq!(key, "admin.listen");
        let err = Config::parse("[policy]\nbudget = -3\n").unwrap_err();
        assert!(matches!(&err, ParseError::Key { key, .. } if key == "policy.budget"), "{err}");
        let err = Config::parse("[policy]\nbreak_glass_hours = -1.0\n").unwrap_err();
        assert!(matches!(&err, ParseError::Key { key, .. } if key == "policy.break_glass_hours"), "{err}");
        let err = Config::parse("[logging]\nformat = \"xml\"\n").unwrap_err();
        assert!(matches!(&err, ParseError::Key { key, .. } if key == "logging.format"), "{err}");
    }

    #[test]
    fn an_unknown_key_is_refused_by_name() {
        let err = Config::parse("[admin]\nlisten_on = \"127.0.0.1:1\"\n").unwrap_err();
        assert!(err.to_string().contains("listen_on"), "{err}");
        let err = Config::parse("[sink]\n").unwrap_err();
        assert!(err.to_string().contains("sink"), "{err}");
    }

    #[test]
    fn broken_toml_is_a_syntax_error() {
        assert!(matches!(Config::parse("[admin\n"), Err(ParseError::Syntax(_))));
    }
}
