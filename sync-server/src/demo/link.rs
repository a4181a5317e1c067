//! Links as users have them, on loopback: a userspace UDP relay between devices and the server
//! that adds delay and jitter, reordering, random and burst loss, duplication, a
//! bandwidth cap with a bounded queue, periodic outages and cuts — seeded, so a run's loss
//! pattern can be repeated. This machine's kernel has no `netem` qdisc, and a relay runs
//! unprivileged in CI; it is written here because no maintained crate does this for UDP.
//!
//! ```text
//! device ──UDP──▶ relay (127.0.0.1:port) ──UDP──▶ server
//!        ◀──────  one impaired pipe each way  ◀──────
//! ```
//!
//! [`Profile::named`] gives the links of the issue: `3g`, `edge`, `flaky-wifi` (and `loopback`).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Gilbert–Elliott burst loss: per packet, the chance to enter a burst and to leave it, and the
/// loss inside one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Burst {
    pub enter: f64,
    pub leave: f64,
    pub loss: f64,
}

/// What a link does to packets, the same each way.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub name: &'static str,
    /// One-way delay (half the round trip) and its jitter (uniform, ±). Jitter alone keeps the
    /// order packets were sent in, as a queue does (a packet never arrives before the one ahead).
    pub delay: Duration,
    pub jitter: Duration,
    /// Chance that a packet is held back by twice the jitter (at least 5 ms) outside the queue's
    /// order, so later ones overtake it.
    pub reorder: f64,
    /// Chance that a packet is lost outside bursts.
    pub loss: f64,
    pub burst: Option<Burst>,
    /// Chance that a packet arrives twice.
    pub duplicate: f64,
    /// Bits per second each way (`None`: unlimited). Packets queue behind the cap; a packet
    /// that would wait longer than [`MAX_QUEUE_DELAY`] is dropped, as a router's buffer does.
    pub rate_bps: Option<u64>,
    /// Outages: every `.0`, nothing passes for `.1` (the first starts `.0 - .1` after the start).
    pub outages: Option<(Duration, Duration)>,
}

/// The longest a packet waits behind the bandwidth cap before the queue drops it.
pub const MAX_QUEUE_DELAY: Duration = Duration::from_secs(1);

impl Profile {
    /// The names [`Profile::named`] knows.
    pub const NAMES: [&'static str; 4] = ["loopback", "3g", "edge", "flaky-wifi"];

    /// A named link: `loopback` (nothing added), `3g` (300 ms round trip, 1 Mbit/s, 2% loss),
    /// `edge` (600 ms, 200 kbit/s, 5% loss in bursts), `flaky-wifi` (40 ms, 20 Mbit/s, 1% loss,
    /// 2 s outages every 30 s).
    pub fn named(name: &str) -> Option<Profile> {
        let ms = Duration::from_millis;
        let base = Profile {
            name: "loopback",
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            reorder: 0.0,
            loss: 0.0,
            burst: None,
            duplicate: 0.0,
            rate_bps: None,
            outages: None,
        };
        Some(match name {
            "loopback" => base,
            "3g" => Profile {
                name: "3g",
                delay: ms(150),
                jitter: ms(10),
                reorder: 0.001,
                loss: 0.02,
                rate_bps: Some(1_000_000),
                duplicate: 0.001,
                ..base
            },
            "edge" => Profile {
                name: "edge",
                delay: ms(300),
                jitter: ms(40),
                reorder: 0.002,
                loss: 0.02,
                // About 3% more in bursts of three packets on average.
                burst: Some(Burst { enter: 0.01, leave: 0.33, loss: 0.9 }),
                rate_bps: Some(200_000),
                duplicate: 0.002,
                ..base
            },
            "flaky-wifi" => Profile {
                name: "flaky-wifi",
                delay: ms(20),
                jitter: ms(5),
                loss: 0.01,
                rate_bps: Some(20_000_000),
                outages: Some((Duration::from_secs(30), Duration::from_secs(2))),
                ..base
            },
            _ => return None,
        })
    }
}

/// What a relay did, both ways together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    pub packets_in: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicated: u64,
    /// Dropped while the link was cut or in an outage.
    pub cut: u64,
    /// Dropped by the queue behind the bandwidth cap.
    pub queue_drops: u64,
    pub bytes_delivered: u64,
}

#[derive(Default)]
struct Counters {
    packets_in: AtomicU64,
    delivered: AtomicU64,
    lost: AtomicU64,
    duplicated: AtomicU64,
    cut: AtomicU64,
    queue_drops: AtomicU64,
    bytes_delivered: AtomicU64,
}

struct Shared {
    profile: Profile,
    started: Instant,
    /// Until when nothing passes (a cut); far in the future for a cut for good.
    cut_until: Mutex<Option<Instant>>,
    /// Flows started before this generation are lost for good ([`Relay::lose_flows`]).
    generation: AtomicU64,
    /// Flows bound before this generation move to a new address ([`Relay::rebind`]).
    binding: AtomicU64,
    counters: Counters,
}

impl Shared {
    fn is_cut(&self, now: Instant) -> bool {
        if self.cut_until.lock().expect("cut lock").is_some_and(|until| now < until) {
            return true;
        }
        // A zero period or length means no outages (not "always cut").
        self.profile.outages.filter(|(every, length)| !every.is_zero() && !length.is_zero()).is_some_and(
            |(every, length)| {
                let phase = (now - self.started).as_nanos() % every.as_nanos().max(1);
                phase >= (every - length.min(every)).as_nanos()
            },
        )
    }
}

/// A running relay: devices send to [`Relay::addr`] instead of the server's address. Each device
/// address is a flow with its own pipes (and bandwidth cap); flows last as long as the relay.
pub struct Relay {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Starts a relay on 127.0.0.1 (a free port) in front of `server`. Each direction of each
    /// device's flow draws from its own generator seeded from `seed`, so the same traffic meets
    /// the same losses.
    pub async fn start(server: SocketAddr, profile: Profile, seed: u64) -> std::io::Result<Relay> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = front.local_addr()?;
        let shared = Arc::new(Shared {
            profile,
            started: Instant::now(),
            cut_until: Mutex::new(None),
            generation: AtomicU64::new(0),
            binding: AtomicU64::new(0),
            counters: Counters::default(),
        });
        let task = tokio::spawn(relay(front, server, shared.clone(), seed));
        Ok(Relay { addr, shared, task })
    }

    /// Nothing passes either way for `length` (packets in flight still arrive).
    pub fn cut_for(&self, length: Duration) {
        *self.shared.cut_until.lock().expect("cut lock") = Some(Instant::now() + length);
    }

    /// Nothing passes any more, until [`Relay::restore`].
    pub fn cut(&self) {
        self.cut_for(Duration::from_secs(365 * 24 * 3600));
    }

    /// Every flow open now is lost for good, packets on the way included, as when the device's
    /// address changes (another network, a new NAT binding): nothing of it reaches either side
    /// again, while a new flow (a new connection, from another port) passes at once.
    pub fn lose_flows(&self) {
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Every flow open now reaches the server from a new address at its next packet, and what
    /// the server sends to the old one is lost, as when a NAT rebinds or a phone moves from Wi-Fi
    /// to 3G with the same socket: the connection survives only if the server follows it to
    /// the new address (QUIC connection migration).
    pub fn rebind(&self) {
        self.shared.binding.fetch_add(1, Ordering::SeqCst);
    }

    /// Ends a cut.
    pub fn restore(&self) {
        *self.shared.cut_until.lock().expect("cut lock") = None;
    }

    pub fn stats(&self) -> RelayStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RelayStats {
            packets_in: get(&c.packets_in),
            delivered: get(&c.delivered),
            lost: get(&c.lost),
            duplicated: get(&c.duplicated),
            cut: get(&c.cut),
            queue_drops: get(&c.queue_drops),
            bytes_delivered: get(&c.bytes_delivered),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads what devices send; each new device address gets its own socket towards the server
/// (so the server sees one address per device, as through a NAT) and a pipe each way.
async fn relay(front: Arc<UdpSocket>, server: SocketAddr, shared: Arc<Shared>, seed: u64) {
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        // An error for one datagram (e.g. an ICMP report on some systems) is not the relay's end.
        let Ok((n, device)) = front.recv_from(&mut buf).await else { continue };
        let binding = shared.binding.load(Ordering::SeqCst);
        if !flows.contains_key(&device) {
            let Some(back) = bind_towards(server).await else { continue };
            let number = flows.len() as u64;
            let slot = Arc::new(Mutex::new(back.clone()));
            let up =
                Pipe::start(shared.clone(), seed ^ (number << 1), Out::Connected(slot.clone()), &mut tasks);
            let down = Arc::new(Pipe::start(
                shared.clone(),
                seed ^ (number << 1 | 1),
                Out::To(front.clone(), device),
                &mut tasks,
            ));
            let reader = tasks.spawn(read_back(back, down.clone()));
            flows.insert(device, Flow { up, down, slot, reader, binding });
        }
        let flow = flows.get_mut(&device).expect("the flow was just made");
        if flow.binding < binding {
            // A new address towards the server; the old one is gone with what is sent to it.
            let Some(back) = bind_towards(server).await else { continue };
            *flow.slot.lock().expect("binding lock") = back.clone();
            flow.reader.abort();
            flow.reader = tasks.spawn(read_back(back, flow.down.clone()));
            flow.binding = binding;
        }
        flow.up.offer(&buf[..n]);
    }
}

/// One device's flow: its pipes, and the socket (its address towards the server) and reader
/// of the current binding.
struct Flow {
    up: Pipe,
    down: Arc<Pipe>,
    slot: Arc<Mutex<Arc<UdpSocket>>>,
    reader: tokio::task::AbortHandle,
    binding: u64,
}

async fn bind_towards(server: SocketAddr) -> Option<Arc<UdpSocket>> {
    let back = UdpSocket::bind("127.0.0.1:0").await.ok()?;
    back.connect(server).await.ok()?;
    Some(Arc::new(back))
}

/// Hands what the server sends to one binding to the flow's downward pipe.
async fn read_back(back: Arc<UdpSocket>, down: Arc<Pipe>) {
    let mut buf = vec![0u8; 65_536];
    loop {
        match back.recv(&mut buf).await {
            Ok(n) => down.offer(&buf[..n]),
            // The server's port is closed for now (a restart): its return is awaited.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            Err(_) => return,
        }
    }
}

enum Out {
    /// Towards the server, from the flow's current binding.
    Connected(Arc<Mutex<Arc<UdpSocket>>>),
    To(Arc<UdpSocket>, SocketAddr),
}

impl Out {
    async fn send(&self, bytes: &[u8]) {
        let _ = match self {
            Out::Connected(slot) => {
                let socket = slot.lock().expect("binding lock").clone();
                socket.send(bytes).await
            }
            Out::To(s, to) => s.send_to(bytes, to).await,
        };
    }
}

/// One direction of one flow: decides each packet's fate and hands survivors, with the time
/// they arrive, to a task that sends them then.
struct Pipe {
    fate: Mutex<Fate>,
    deliver: mpsc::UnboundedSender<(Instant, Vec<u8>)>,
    shared: Arc<Shared>,
    /// The relay's generation when the flow started.
    generation: u64,
}

impl Shared {
    fn is_lost(&self, generation: u64) -> bool {
        self.generation.load(Ordering::SeqCst) > generation
    }
}

struct Fate {
    rng: StdRng,
    in_burst: bool,
    /// When the bandwidth cap is free for the next packet.
    next_free: Instant,
    /// When the last packet in the queue's order arrives.
    last_arrival: Instant,
}

impl Pipe {
    fn start(shared: Arc<Shared>, seed: u64, out: Out, tasks: &mut tokio::task::JoinSet<()>) -> Pipe {
        let (deliver, mut queue) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
        let counters = shared.clone();
        let generation = shared.generation.load(Ordering::SeqCst);
        tasks.spawn(async move {
            // Packets by arrival time (then by order offered), sent as each falls due.
            let mut due: BinaryHeap<Reverse<(Instant, u64, Vec<u8>)>> = BinaryHeap::new();
            let mut order = 0u64;
            loop {
                let next = due.peek().map(|Reverse((at, _, _))| *at);
                tokio::select! {
                    offered = queue.recv() => {
                        let Some((at, bytes)) = offered else { break };
                        order += 1;
                        due.push(Reverse((at, order, bytes)));
                    }
                    () = async { tokio::time::sleep_until(next.expect("a packet is due")).await }, if next.is_some() => {
                        let Reverse((_, _, bytes)) = due.pop().expect("a packet is due");
                        let c = &counters.counters;
                        if counters.is_lost(generation) {
                            c.cut.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        out.send(&bytes).await;
                        c.delivered.fetch_add(1, Ordering::Relaxed);
                        c.bytes_delivered.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    }
                }
            }
            // The flow ended: what is still on the wire arrives (unless the flow was lost).
            while let Some(Reverse((at, _, bytes))) = due.pop() {
                tokio::time::sleep_until(at).await;
                if !counters.is_lost(generation) {
                    out.send(&bytes).await;
                }
            }
        });
        let now = Instant::now();
        let fate =
            Fate { rng: StdRng::seed_from_u64(seed), in_burst: false, next_free: now, last_arrival: now };
        Pipe { fate: Mutex::new(fate), deliver, shared, generation }
    }

    fn offer(&self, bytes: &[u8]) {
        let profile = &self.shared.profile;
        let c = &self.shared.counters;
        c.packets_in.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut fate = self.fate.lock().expect("fate lock");
        // Draw every number for every packet, so one decision never shifts the next ones.
        let draws: [f64; 5] = std::array::from_fn(|_| fate.rng.random::<f64>());
        let [lost_draw, burst_draw, dup_draw, jitter_draw, reorder_draw] = draws;
        if let Some(burst) = profile.burst {
            fate.in_burst = if fate.in_burst { burst_draw >= burst.leave } else { burst_draw < burst.enter };
        }
        if self.shared.is_cut(now) || self.shared.is_lost(self.generation) {
            c.cut.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let loss = match profile.burst {
            Some(burst) if fate.in_burst => burst.loss,
            _ => profile.loss,
        };
        if lost_draw < loss {
            c.lost.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut leaves = now;
        if let Some(rate) = profile.rate_bps {
            let serialise = Duration::from_secs_f64(bytes.len() as f64 * 8.0 / rate as f64);
            let start = fate.next_free.max(now);
            if start - now > MAX_QUEUE_DELAY {
                c.queue_drops.fetch_add(1, Ordering::Relaxed);
                return;
            }
            fate.next_free = start + serialise;
            leaves = fate.next_free;
        }
        let jitter = profile.jitter.as_secs_f64() * (2.0 * jitter_draw - 1.0);
        let mut arrives = leaves + Duration::from_secs_f64((profile.delay.as_secs_f64() + jitter).max(0.0));
        if reorder_draw < profile.reorder {
            arrives += (profile.jitter * 2).max(Duration::from_millis(5));
        } else {
            arrives = arrives.max(fate.last_arrival);
            fate.last_arrival = arrives;
        }
        let _ = self.deliver.send((arrives, bytes.to_vec()));
        if dup_draw < profile.duplicate {
            c.duplicated.fetch_add(1, Ordering::Relaxed);
            let _ = self.deliver.send((arrives + Duration::from_millis(1), bytes.to_vec()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends 1,000 numbered datagrams through a relay to a sink; returns the numbers that arrived.
    async fn survivors(profile: Profile, seed: u64) -> Vec<u16> {
        let sink = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let relay = Relay::start(sink.local_addr().unwrap(), profile, seed).await.unwrap();
        // The sink reads as packets come, so loopback's own buffer never drops any; it stops when
        // the relay has accounted for every packet (or after 10 quiet seconds).
        let stats = relay.shared.clone();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 16];
            loop {
                let c = &stats.counters;
                let settled =
                    c.lost.load(Ordering::Relaxed) + c.cut.load(Ordering::Relaxed) + got.len() as u64;
                if settled >= 1_000 {
                    return got;
                }
                match tokio::time::timeout(Duration::from_secs(10), sink.recv(&mut buf)).await {
                    Ok(Ok(n)) => {
                        assert_eq!(n, 2);
                        got.push(u16::from_be_bytes([buf[0], buf[1]]));
                    }
                    _ => return got,
                }
            }
        });
        let device = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for i in 0..1_000u16 {
            device.send_to(&i.to_be_bytes(), relay.addr).await.unwrap();
            if i % 20 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let mut got = reader.await.unwrap();
        got.sort_unstable();
        got
    }

    #[tokio::test]
    async fn the_same_seed_loses_the_same_packets_and_another_seed_others() {
        let lossy = Profile {
            name: "test",
            loss: 0.2,
            burst: Some(Burst { enter: 0.05, leave: 0.5, loss: 1.0 }),
            ..Profile::named("loopback").unwrap()
        };
        let a = survivors(lossy.clone(), 1).await;
        let b = survivors(lossy.clone(), 1).await;
        let c = survivors(lossy, 2).await;
        assert_eq!(a, b, "a seed is a repeatable loss pattern");
        assert_ne!(a, c);
        let lost = 1_000 - a.len();
        assert!((150..400).contains(&lost), "about a quarter lost with bursts: {lost}");
    }

    #[tokio::test]
    async fn outages_drop_everything_while_they_last_and_nothing_between() {
        // Every 100 ms, 50 ms of outage: about half of a steady stream is cut, the rest passes.
        let flaky = Profile {
            name: "test",
            outages: Some((Duration::from_millis(100), Duration::from_millis(50))),
            ..Profile::named("loopback").unwrap()
        };
        let sink = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let relay = Relay::start(sink.local_addr().unwrap(), flaky, 1).await.unwrap();
        let device = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for i in 0..100u16 {
            device.send_to(&i.to_be_bytes(), relay.addr).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let stats = relay.stats();
        assert_eq!(stats.packets_in, 100, "{stats:?}");
        assert!((25..=75).contains(&stats.cut), "about half cut: {stats:?}");
        assert_eq!(stats.lost, 0);
        // No outages at all when the period or the length is zero.
        let never = Profile {
            outages: Some((Duration::ZERO, Duration::ZERO)),
            ..Profile::named("loopback").unwrap()
        };
        let relay = Relay::start(sink.local_addr().unwrap(), never, 1).await.unwrap();
        for i in 0..20u16 {
            device.send_to(&i.to_be_bytes(), relay.addr).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(relay.stats().cut, 0);
    }

    #[tokio::test]
    async fn a_lost_flow_passes_nothing_again_not_even_what_was_on_the_way_and_a_new_flow_passes() {
        // 200 ms of delay: the first ten datagrams are on the way when the flow is lost.
        let slow = Profile {
            name: "test",
            delay: Duration::from_millis(200),
            ..Profile::named("loopback").unwrap()
        };
        let sink = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let relay = Relay::start(sink.local_addr().unwrap(), slow, 1).await.unwrap();
        let old = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for i in 0..10u16 {
            old.send_to(&i.to_be_bytes(), relay.addr).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        relay.lose_flows();
        for i in 10..20u16 {
            old.send_to(&i.to_be_bytes(), relay.addr).await.unwrap();
        }
        let new = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for i in 100..110u16 {
            new.send_to(&i.to_be_bytes(), relay.addr).await.unwrap();
        }
        let mut got = Vec::new();
        let mut buf = [0u8; 16];
        while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(600), sink.recv(&mut buf)).await {
            got.push(u16::from_be_bytes([buf[0], buf[1]]));
        }
        got.sort_unstable();
        assert_eq!(got, (100..110).collect::<Vec<_>>(), "only the new flow's datagrams arrive");
        let stats = relay.stats();
        assert_eq!((stats.cut, stats.delivered), (20, 10), "{stats:?}");
    }

    #[test]
    fn every_named_profile_exists_and_says_what_the_issue_asks() {
        for name in Profile::NAMES {
            assert_eq!(Profile::named(name).unwrap().name, name);
        }
        let g3 = Profile::named("3g").unwrap();
        assert_eq!((g3.delay * 2, g3.rate_bps, g3.loss), (Duration::from_millis(300), Some(1_000_000), 0.02));
        let edge = Profile::named("edge").unwrap();
        assert_eq!((edge.delay * 2, edge.rate_bps), (Duration::from_millis(600), Some(200_000)));
        assert!(edge.burst.is_some());
        let wifi = Profile::named("flaky-wifi").unwrap();
        assert_eq!(wifi.outages, Some((Duration::from_secs(30), Duration::from_secs(2))));
        assert!(Profile::named("5g-dream").is_none());
    }
}
