-- The store as of release 0.1 (the first with numbered migrations). Every statement is
-- idempotent (IF NOT EXISTS, OR IGNORE): a store made before migrations were recorded runs this
-- file again to be adopted (see store/sqlite/migrations.rs), and gains what it lacked.
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS patients (
    id BLOB PRIMARY KEY,
    nhs_number TEXT UNIQUE, -- NULL for a provisional record
    doc BLOB NOT NULL,
    last_seq INTEGER NOT NULL,
    -- Derived from the document whenever it changes, for scopes (see domain/scope.rs).
    district TEXT,
    risk_flags TEXT NOT NULL DEFAULT ',',
    review_date TEXT,
    merged INTEGER NOT NULL DEFAULT 0,
    -- What a device lists the patient by (postcard `Listing`), derived with the columns above;
    -- sent with the document so a device can store it without parsing it. NULL: not recorded.
    listing BLOB,
    -- Consent, kept on the server only.
    objection INTEGER NOT NULL DEFAULT 0,
    opt_out INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS patients_by_district ON patients (district) WHERE risk_flags != ',';
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    patient_id BLOB NOT NULL,
    author_device INTEGER,
    hash BLOB NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_by_patient ON changes (patient_id, seq);
CREATE TABLE IF NOT EXISTS devices (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    public_key BLOB UNIQUE,
    enrolled_at_ms INTEGER,
    revoked_at_ms INTEGER,
    acked_cursor INTEGER NOT NULL DEFAULT 0,
    last_sync_ms INTEGER,
    pending_round INTEGER,
    budget INTEGER,
    left_out INTEGER NOT NULL DEFAULT 0,
    wipe_requested_at_ms INTEGER,
    wiped_at_ms INTEGER,
    view_seq INTEGER NOT NULL DEFAULT 0,
    view_hash BLOB
);
CREATE TABLE IF NOT EXISTS device_staged_keys (
    device_id INTEGER PRIMARY KEY REFERENCES devices (id),
    key BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS hl7_messages (
    control_id TEXT PRIMARY KEY,
    event TEXT NOT NULL,
    received_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS feed_counts (
    code TEXT PRIMARY KEY,
    n INTEGER NOT NULL,
    last_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS feed_refusals (
    id INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    code TEXT NOT NULL,
    reason TEXT NOT NULL,
    control_id TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS grants (
    id INTEGER PRIMARY KEY,
    device_id INTEGER NOT NULL REFERENCES devices (id),
    patient_id BLOB NOT NULL REFERENCES patients (id),
    kind TEXT NOT NULL,
    reason TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    closed_at_ms INTEGER
);
CREATE INDEX IF NOT EXISTS grants_by_device ON grants (device_id, expires_at_ms);
CREATE TABLE IF NOT EXISTS device_areas (
    device_id INTEGER NOT NULL REFERENCES devices (id),
    district TEXT NOT NULL,
    PRIMARY KEY (device_id, district)
);
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    device_id INTEGER NOT NULL REFERENCES devices (id),
    patient_id BLOB NOT NULL,
    rule TEXT NOT NULL,
    place TEXT NOT NULL,
    changes BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS quarantine_by_device ON quarantine (device_id);
CREATE TABLE IF NOT EXISTS quarantine_reviews (
    quarantine_id INTEGER PRIMARY KEY REFERENCES quarantine (id),
    at_ms INTEGER NOT NULL,
    note TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    device_id INTEGER,
    patient_id BLOB,
    reason TEXT NOT NULL,
    acknowledged_at_ms INTEGER,
    note TEXT
);
CREATE TABLE IF NOT EXISTS enrolment_tokens (
    secret_hash BLOB PRIMARY KEY,
    device_id INTEGER NOT NULL REFERENCES devices (id),
    expires_at_ms INTEGER NOT NULL,
    used_at_ms INTEGER
);
CREATE TABLE IF NOT EXISTS caseload (
    device_id INTEGER NOT NULL REFERENCES devices (id),
    patient_id BLOB NOT NULL REFERENCES patients (id),
    PRIMARY KEY (device_id, patient_id)
);
-- Append-only: rows are never updated or deleted.
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    patient_id BLOB,
    detail TEXT NOT NULL
);
-- How far each import read each source file (committed with what it read), so a rerun resumes.
CREATE TABLE IF NOT EXISTS import_progress (
    source TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    offset INTEGER NOT NULL,
    line INTEGER NOT NULL,
    refused INTEGER NOT NULL
);
-- One row a group commit writes last, so that its commit syncs the WAL (and every commit before).
CREATE TABLE IF NOT EXISTS group_commit (id INTEGER PRIMARY KEY CHECK (id = 1), n INTEGER NOT NULL);
INSERT OR IGNORE INTO group_commit VALUES (1, 0);
CREATE TABLE IF NOT EXISTS scope_epoch (id INTEGER PRIMARY KEY CHECK (id = 1), n INTEGER NOT NULL);
INSERT OR IGNORE INTO scope_epoch VALUES (1, 0);
-- Change-log entries with seq <= this were dropped by compaction (documents are stored whole).
CREATE TABLE IF NOT EXISTS log_horizon (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL);
INSERT OR IGNORE INTO log_horizon VALUES (1, 0);
CREATE TABLE IF NOT EXISTS device_scope_cache (
    device_id INTEGER PRIMARY KEY REFERENCES devices (id),
    epoch INTEGER NOT NULL,
    valid_until_ms INTEGER NOT NULL,
    in_scope INTEGER NOT NULL,
    left_out INTEGER NOT NULL
);
-- Everything a device's scope depends on moves the scope epoch (see domain/scope.rs): declared here
-- rather than in each writer, so that no code path can forget it.
CREATE TRIGGER IF NOT EXISTS scope_caseload_in AFTER INSERT ON caseload BEGIN UPDATE scope_epoch SET n = n + 1; END;
CREATE TRIGGER IF NOT EXISTS scope_caseload_out AFTER DELETE ON caseload BEGIN UPDATE scope_epoch SET n = n + 1; END;
CREATE TRIGGER IF NOT EXISTS scope_grants_in AFTER INSERT ON grants BEGIN UPDATE scope_epoch SET n = n + 1; END;
CREATE TRIGGER IF NOT EXISTS scope_grants_change AFTER UPDATE ON grants BEGIN UPDATE scope_epoch SET n = n + 1; END;
CREATE TRIGGER IF NOT EXISTS scope_grants_out AFTER DELETE ON grants BEGIN UPDATE scope_epoch SET n = n + 1; END;
CREATE TRIGGER IF NOT EXISTS scope_areas_in AFTER INSERT ON device_areas BEGIN UPDATE scope_epoch SET n = n + 1; END;
CREATE TRIGGER IF NOT EXISTS scope_areas_out AFTER DELETE ON device_areas BEGIN UPDATE scope_epoch SET n = n + 1; END;
CREATE TRIGGER IF NOT EXISTS scope_settings_in AFTER INSERT ON settings BEGIN UPDATE scope_epoch SET n = n + 1; END;
CREATE TRIGGER IF NOT EXISTS scope_settings_change AFTER UPDATE ON settings BEGIN UPDATE scope_epoch SET n = n + 1; END;
CREATE TRIGGER IF NOT EXISTS scope_settings_out AFTER DELETE ON settings BEGIN UPDATE scope_epoch SET n = n + 1; END;
CREATE TRIGGER IF NOT EXISTS scope_budget AFTER UPDATE OF budget ON devices
    WHEN OLD.budget IS NOT NEW.budget BEGIN UPDATE scope_epoch SET n = n + 1; END;
CREATE TRIGGER IF NOT EXISTS scope_patients_in AFTER INSERT ON patients BEGIN UPDATE scope_epoch SET n = n + 1; END;
CREATE TRIGGER IF NOT EXISTS scope_patients_out AFTER DELETE ON patients BEGIN UPDATE scope_epoch SET n = n + 1; END;
CREATE TRIGGER IF NOT EXISTS scope_patients_change AFTER UPDATE ON patients
    WHEN OLD.district IS NOT NEW.district OR OLD.risk_flags IS NOT NEW.risk_flags
      OR OLD.review_date IS NOT NEW.review_date OR OLD.merged IS NOT NEW.merged
      OR OLD.objection IS NOT NEW.objection
    BEGIN UPDATE scope_epoch SET n = n + 1; END;
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit BEGIN SELECT RAISE(ABORT, 'the audit is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit BEGIN SELECT RAISE(ABORT, 'the audit is append-only'); END;
-- state: 0 held (confirmed), 1 sent whole in the pending round, 2 purged in the pending round;
-- since: the round the document was last sent whole at (it holds every change up to it)
CREATE TABLE IF NOT EXISTS device_docs (
    device_id INTEGER NOT NULL REFERENCES devices (id),
    patient_id BLOB NOT NULL,
    state INTEGER NOT NULL,
    since INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (device_id, patient_id)
);
