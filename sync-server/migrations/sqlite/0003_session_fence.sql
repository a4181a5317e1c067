-- Each sync session of a device takes the next number; per-device session state (the pending
-- round, its pages, the scope a round established) is written only by the newest session, so a
-- stale one (on an instance that lost the device) cannot overwrite what a newer one wrote.
ALTER TABLE devices ADD COLUMN session_epoch INTEGER NOT NULL DEFAULT 0;
