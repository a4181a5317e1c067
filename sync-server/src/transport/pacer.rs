//! Pacing a round to the link and the device: how big each page is and how much of a round may
//! be sent and not yet applied (see [`Pacer`]; the figures behind the constants are in
//! docs/benchmarks.md and docs/protocol.md).

use std::time::Duration;

use crate::session::ServerSession;

/// How long a page of a round should take to deliver on this connection: a link cut part-way
/// through a page costs what of it arrived (the device applies whole pages), so slow links get
/// small pages.
const PAGE_SECONDS: f64 = 0.25;
/// How much of a round may be sent and not yet applied on the device: this many times the
/// link's bandwidth-delay product (BBR's own in-flight cap is two; the third keeps the link busy
/// while a lost packet is sent again, when the device can apply nothing behind it), plus two
/// pages (the one the device applies while the next arrives). Two made the uncut cold sync of
/// 10,000 over `3g` 133 s against 126 s, four overflowed the link's queue (docs/benchmarks.md).
const AHEAD_BDPS: f64 = 3.0;
/// The smallest page, whatever the link (a few documents; below that, per-page costs dominate).
const MIN_PAGE_BYTES: usize = 16 * 1024;
/// The least a round may have unapplied, whatever the link.
const MIN_AHEAD_BYTES: usize = 64 * 1024;
/// The rate is what the device applied over the last this many round trips (at least
/// [`RATE_WINDOW_MIN`]): long enough that a burst of acknowledgements (pages that queued on
/// the link arrive together) does not read as a faster link.
const RATE_WINDOW_RTTS: f64 = 8.0;
const RATE_WINDOW_MIN: Duration = Duration::from_millis(500);

/// Paces a round to the link and the device. Whatever is sent but not yet applied when a link
/// is cut is lost with the connection and sent again on the next one, so the round keeps no
/// more unapplied than the link needs to stay full: three times its bandwidth-delay product plus two
/// pages, from the rate the device applied pages at over the last few round trips
/// (`PageApplied`) and the lowest round trip seen. Neither the congestion window nor the
/// transport's own acknowledgements are a guide: BBR's window on 3G grew to three seconds of
/// the link behind its one-second queue, so data sent (and counted delivered) sat in the queue
/// or was dropped there, and each cut threw that away; pacing on data applied cannot overrun
/// the queue. Until pages are applied, a round starts with the least (see [`Pacer::pace`]).
pub(super) struct Pacer {
    min_rtt: Duration,
    /// What the device had applied when the round began.
    applied_at_start: u64,
    /// (when, bytes the device had applied by then), oldest first, over the rate's window; the
    /// first is the round's first page applied (the round trip before it is no measure of the
    /// link).
    points: std::collections::VecDeque<(std::time::Instant, u64)>,
    /// When the first page was written, if nothing was unapplied when pacing began (otherwise
    /// pages applied next were written before it, and no first estimate is made).
    first_written: Option<std::time::Instant>,
    fresh: bool,
}

impl Pacer {
    pub(super) fn new(conn: &quinn::Connection, session: &ServerSession) -> Self {
        Self {
            min_rtt: conn.rtt().max(Duration::from_micros(100)),
            applied_at_start: session.applied_bytes(),
            points: std::collections::VecDeque::new(),
            first_written: None,
            fresh: session.unapplied_bytes() == 0,
        }
    }

    /// Notes that a page was written (the first one starts the clock of the first estimate).
    pub(super) fn written(&mut self) {
        if self.fresh {
            self.first_written.get_or_insert_with(std::time::Instant::now);
        }
    }

    /// The link's rate as the device applies it (bytes per second), once a page has been
    /// applied.
    fn rate(&mut self, conn: &quinn::Connection, session: &ServerSession) -> Option<f64> {
        let rtt = conn.rtt().max(Duration::from_micros(100));
        self.min_rtt = self.min_rtt.min(rtt);
        let now = std::time::Instant::now();
        let window = self.min_rtt.mul_f64(RATE_WINDOW_RTTS).max(RATE_WINDOW_MIN);
        if session.applied_bytes() == self.applied_at_start {
            return None;
        }
        let last = self.points.back().map(|p| p.0);
        if last.is_none_or(|at| now - at >= Duration::from_millis(10)) {
            self.points.push_back((now, session.applied_bytes()));
        }
        // Keep one point at least a window old, so the rate spans a whole window.
        while self.points.len() > 2 && now - self.points[1].0 >= window {
            self.points.pop_front();
        }
        let (since, from) = self.points[0];
        let span = (now - since).as_secs_f64();
        let applied = session.applied_bytes().saturating_sub(from);
        if span >= self.min_rtt.as_secs_f64() && applied > 0 {
            return Some(applied as f64 / span);
        }
        // Until a round trip of pages has been applied: what was applied since the first page
        // was written, over that time less a round trip (what remains is the pages' time on
        // the link, and their applying, so this errs low). It opens the round a round trip
        // sooner: on `flaky-wifi` that round trip at 64 KB was a tenth of a cold sync of 1,000.
        let first = self.first_written?;
        let on_link = ((now - first).saturating_sub(self.min_rtt)).max(self.min_rtt / 4);
        let applied = session.applied_bytes().saturating_sub(self.applied_at_start);
        Some(applied as f64 / on_link.as_secs_f64())
    }

    /// The next page's size (a quarter of a second of the rate, between [`MIN_PAGE_BYTES`] and
    /// the protocol's [`TARGET_BATCH_BYTES`](care_node::protocol::TARGET_BATCH_BYTES): on
    /// loopback or a LAN the maximum) and how much of the round may be unapplied before it.
    pub(super) fn pace(&mut self, conn: &quinn::Connection, session: &ServerSession) -> (usize, usize) {
        if !*PACING {
            return (care_node::protocol::TARGET_BATCH_BYTES, usize::MAX);
        }
        // Until pages are applied, the least: quinn's BBR starts with a congestion window of
        // 240 KB, two seconds of `3g`, so its window is no estimate of the link.
        let Some(rate) = self.rate(conn, session) else {
            return (MIN_PAGE_BYTES, MIN_AHEAD_BYTES);
        };
        let page =
            ((rate * PAGE_SECONDS) as usize).clamp(MIN_PAGE_BYTES, care_node::protocol::TARGET_BATCH_BYTES);
        let ahead = (rate * self.min_rtt.as_secs_f64() * AHEAD_BDPS) as usize + 2 * page;
        (page, ahead.max(MIN_AHEAD_BYTES))
    }
}

/// `CARE_SYNC_PACING=off` sends rounds unpaced (512 KB pages, as fast as the connection
/// takes them), for side-by-side comparisons; read once.
static PACING: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| {
    let off = std::env::var("CARE_SYNC_PACING").is_ok_and(|v| v.eq_ignore_ascii_case("off"));
    if off {
        tracing::info!("rounds unpaced (CARE_SYNC_PACING=off)");
    }
    !off
});
