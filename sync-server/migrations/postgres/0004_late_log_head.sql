-- Writers that log changes take the log head as their last statement instead of their first
-- (docs/storage.md, "The log head is taken last"). The scope epoch moves at commit, after it:
-- its triggers become deferred constraint triggers, so a transaction takes the scope epoch's
-- lock only when it commits, after every document and the log head, and no writer holding the
-- epoch ever waits for a document (no cycle).
DROP TRIGGER scope_caseload ON caseload;
DROP TRIGGER scope_grants ON grants;
DROP TRIGGER scope_areas ON device_areas;
DROP TRIGGER scope_settings ON settings;
DROP TRIGGER scope_budget ON devices;
DROP TRIGGER scope_patients ON patients;
DROP TRIGGER scope_patients_change ON patients;
CREATE CONSTRAINT TRIGGER scope_caseload AFTER INSERT OR DELETE ON caseload
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION scope_moved();
CREATE CONSTRAINT TRIGGER scope_grants AFTER INSERT OR UPDATE OR DELETE ON grants
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION scope_moved();
CREATE CONSTRAINT TRIGGER scope_areas AFTER INSERT OR DELETE ON device_areas
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION scope_moved();
CREATE CONSTRAINT TRIGGER scope_settings AFTER INSERT OR UPDATE OR DELETE ON settings
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION scope_moved();
CREATE CONSTRAINT TRIGGER scope_budget AFTER UPDATE OF budget ON devices
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (OLD.budget IS DISTINCT FROM NEW.budget) EXECUTE FUNCTION scope_moved();
CREATE CONSTRAINT TRIGGER scope_patients AFTER INSERT OR DELETE ON patients
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION scope_moved();
CREATE CONSTRAINT TRIGGER scope_patients_change AFTER UPDATE ON patients
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (OLD.district IS DISTINCT FROM NEW.district OR OLD.risk_flags IS DISTINCT FROM NEW.risk_flags
       OR OLD.review_date IS DISTINCT FROM NEW.review_date OR OLD.merged IS DISTINCT FROM NEW.merged
       OR OLD.objection IS DISTINCT FROM NEW.objection)
    EXECUTE FUNCTION scope_moved();
