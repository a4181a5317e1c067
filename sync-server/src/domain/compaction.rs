//! Compaction of the change log: how far back the log must reach, and who is left below it.
//!
//! Every patient's document is stored whole, so the log is only a fast path: it lets a device
//! that holds a document receive just the changes after its cursor. An entry no device will ask
//! for again can go. Devices that have not synced for longer than the hold do not keep the log
//! growing for everyone: their next sync receives the documents that changed since their cursor
//! whole, and merges them (nothing is lost; the cost is bytes).

use crate::domain::device::DeviceRecord;

/// Where compaction may cut the log, and the devices it leaves below.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Horizon {
    /// Entries with `seq <= seq` may be dropped.
    pub seq: u64,
    /// Devices whose cursor is below the horizon (by name): their next sync receives the
    /// documents that changed since it whole.
    pub below: Vec<String>,
}

/// The horizon for a log whose newest entry is `head`: the lowest cursor acknowledged by an
/// enrolled device (not revoked, no wipe pending) that synced within `hold_ms` of `now_ms`.
/// Devices that never completed a round (cursor 0) hold nothing and receive everything whole
/// anyway; revoked devices and devices told to wipe will never ask for changes again.
pub fn horizon(devices: &[DeviceRecord], head: u64, now_ms: i64, hold_ms: i64) -> Horizon {
    let counts = |d: &&DeviceRecord| {
        d.public_key.is_some() && d.revoked_at_ms.is_none() && !d.wipe_pending() && d.acked_cursor > 0
    };
    let holding = |d: &&DeviceRecord| d.last_sync_ms.is_some_and(|t| now_ms.saturating_sub(t) <= hold_ms);
    let seq =
        devices.iter().filter(counts).filter(holding).map(|d| d.acked_cursor).min().unwrap_or(head).min(head);
    let mut below: Vec<String> =
        devices.iter().filter(counts).filter(|d| d.acked_cursor < seq).map(|d| d.name.clone()).collect();
    below.sort();
    Horizon { seq, below }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::device::Role;

    const HOUR: i64 = 3_600_000;

    fn device(name: &str, cursor: u64, last_sync_ms: Option<i64>) -> DeviceRecord {
        DeviceRecord {
            id: 0,
            name: name.into(),
            role: Role::CommunityNurse,
            public_key: Some([7; 32]),
            enrolled_at_ms: Some(0),
            revoked_at_ms: None,
            acked_cursor: cursor,
            last_sync_ms,
            wipe_requested_at_ms: None,
            wiped_at_ms: None,
            left_out: 0,
        }
    }

    #[test]
    fn the_oldest_recent_cursor_holds_the_log_and_stale_devices_fall_below() {
        let now = 1_000 * HOUR;
        let devices = [
            device("recent-a", 900, Some(now - HOUR)),
            device("recent-b", 700, Some(now - 20 * HOUR)),
            device("in-a-drawer", 100, Some(now - 40 * 24 * HOUR)),
            device("never-synced", 0, None),
        ];
        let h = horizon(&devices, 1_000, now, 30 * 24 * HOUR);
        assert_eq!(h, Horizon { seq: 700, below: vec!["in-a-drawer".into()] });
        // A hold long enough to cover the drawer keeps the log back to it.
        assert_eq!(horizon(&devices, 1_000, now, 60 * 24 * HOUR).seq, 100);
    }

    #[test]
    fn revoked_or_wiping_devices_do_not_hold_the_log_and_no_devices_means_the_head() {
        let now = 1_000 * HOUR;
        let mut revoked = device("lost-tablet", 10, Some(now));
        revoked.revoked_at_ms = Some(now);
        // Told to wipe and not (yet) revoked: it will only ever be told to wipe again.
        let mut wiping = device("stolen-phone", 20, Some(now));
        wiping.wipe_requested_at_ms = Some(now);
        assert!(wiping.wipe_pending() && wiping.revoked_at_ms.is_none());
        let h = horizon(&[revoked.clone(), wiping.clone(), device("recent", 500, Some(now))], 800, now, HOUR);
        assert_eq!(h, Horizon { seq: 500, below: vec![] });
        assert_eq!(horizon(&[revoked], 800, now, HOUR).seq, 800, "a revoked device alone holds nothing");
        assert_eq!(horizon(&[wiping], 800, now, HOUR).seq, 800, "nor one told to wipe");
        assert_eq!(horizon(&[], 800, now, HOUR).seq, 800);
    }
}
