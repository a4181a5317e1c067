-- Each instance looks, a few times a second, for devices revoked, asked to wipe or wiped since
-- its oldest live session began (to end those sessions), instead of reading every device: one
-- index per time, so the look reads the few devices it finds.
CREATE INDEX devices_revoked ON devices (revoked_at_ms) WHERE revoked_at_ms IS NOT NULL;
CREATE INDEX devices_wipe_requested ON devices (wipe_requested_at_ms) WHERE wipe_requested_at_ms IS NOT NULL;
CREATE INDEX devices_wiped ON devices (wiped_at_ms) WHERE wiped_at_ms IS NOT NULL;
