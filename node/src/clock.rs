//! Wall-clock time, passed in rather than read where it is used: the device store and the
//! server's transport each hold a [`Clock`], and the protocol's state machines are handed the
//! moment ([`Now`]) with each frame, so a test can put a device's clock hours ahead, jump it
//! mid-round, or carry a device a year into the future — and a phone's clock, which users and
//! networks set, is one input among others.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

/// The system clock, moved by an offset that can change while the clock is in use (clones
/// share it).
#[derive(Clone, Default)]
pub struct Clock {
    offset_ms: Arc<AtomicI64>,
}

impl Clock {
    /// This machine's clock (offset 0, until [`Clock::set_offset`] moves it).
    pub fn system() -> Self {
        Self::default()
    }

    /// This machine's clock moved by `offset_ms` (negative: behind).
    pub fn offset(offset_ms: i64) -> Self {
        Self { offset_ms: Arc::new(AtomicI64::new(offset_ms)) }
    }

    /// Moves this clock and every clone of it to `offset_ms` from the system clock: a clock
    /// corrected by the network, wound by a user, or a test's passage of time.
    pub fn set_offset(&self, offset_ms: i64) {
        self.offset_ms.store(offset_ms, Ordering::Relaxed);
    }

    /// Milliseconds since the Unix epoch by this clock.
    pub fn now_ms(&self) -> i64 {
        crate::now_ms() + self.offset_ms.load(Ordering::Relaxed)
    }

    /// Milliseconds on a monotonic clock (since this process first asked): it never jumps when
    /// the wall clock is set, so it measures how long something took.
    pub fn monotonic_ms(&self) -> i64 {
        static START: std::sync::LazyLock<std::time::Instant> =
            std::sync::LazyLock::new(std::time::Instant::now);
        START.elapsed().as_millis() as i64
    }
}

/// One moment by a [`Clock`]: the wall clock (which users and networks set) and the monotonic
/// one (which never jumps). The protocol's state machines are handed it with each frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub wall_ms: i64,
    pub monotonic_ms: i64,
}

impl Clock {
    /// This moment by this clock.
    pub fn now(&self) -> Now {
        Now { wall_ms: self.now_ms(), monotonic_ms: self.monotonic_ms() }
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clock").field("offset_ms", &self.offset_ms.load(Ordering::Relaxed)).finish()
    }
}

/// Formats milliseconds since the epoch as `2026-11-25 17:04 UTC`.
pub fn format_time(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ms / 1000)
        .ok()
        .and_then(|t| {
            t.format(time::macros::format_description!("[year]-[month]-[day] [hour]:[minute] UTC")).ok()
        })
        .unwrap_or_else(|| "unknown time".into())
}

/// Formats milliseconds since the epoch as ISO 8601 (`2026-11-25T17:04:00Z`), for record fields.
pub fn iso_time(ms: i64) -> Option<String> {
    time::OffsetDateTime::from_unix_timestamp(ms / 1000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offset_clock_moves_with_its_clones() {
        let clock = Clock::offset(-3_600_000);
        let clone = clock.clone();
        let behind = crate::now_ms() - clone.now_ms();
        assert!((3_599_000..=3_601_000).contains(&behind), "{behind}");
        clock.set_offset(400 * 86_400_000);
        let ahead = clone.now_ms() - crate::now_ms();
        assert!((400 * 86_400_000 - 1_000..=400 * 86_400_000 + 1_000).contains(&ahead), "{ahead}");
        assert!((Clock::system().now_ms() - crate::now_ms()).abs() < 1_000);
    }
}
