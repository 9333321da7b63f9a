//! The warm pool: VMs booted ahead of time, waiting in vminit for a
//! workload (Hyper's VM cache).
//!
//! # Design
//! vmmd keeps, for each configured (vCPUs, memory) size, `count` VMs booted
//! from the default guest kernel and initramfs with an empty read-only root
//! disk slot and a vsock device, their vminit waiting on
//! [`steelcup_proto::guest::POOL_PORT`]. A start that fits one (an image's
//! root disk, no volumes, no network, the default kernel, plain memory; see
//! `daemon::pool_fit`) claims the oldest ready VM of its size: vmmd passes
//! the root image's descriptor to the worker (`attach root BYTES`), hands
//! vminit the workload's config over vsock (`claim JSON`), and renames the
//! VM's vsock socket and cgroup to the workload's; the workload starts
//! without a kernel boot. The pool refills in the background. Anything
//! else, or an empty pool, starts cold, as before.
//!
//! This module is the bookkeeping (which members exist, which are ready,
//! what to boot next, backoff when pool VMs keep dying), pure and
//! unit-tested; the daemon boots, pings and claims them.
//!
//! # Limitations
//! A claimed VM keeps the kernel command line it booted with; workloads
//! with volumes, a network device, their own kernel or huge pages start
//! cold. Every pool VM holds its guest memory while it waits (what it has
//! touched booting: about 20 MiB of a 128 MiB guest).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use steelcup_units::Backoff;

/// One size of warm VM and how many to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSpec {
    pub vcpus: u8,
    pub memory_mib: u64,
    pub count: u32,
}

/// The most warm VMs of one size.
pub const MAX_COUNT: u32 = 64;

impl TryFrom<&str> for PoolSpec {
    type Error = PoolSpecError;
    /// `vcpus=N,memory=SIZE,count=N` (any order; vcpus 1 and memory 128MiB
    /// when left out; count is required).
    fn try_from(s: &str) -> Result<Self, PoolSpecError> {
        let bad = |why: String| PoolSpecError {
            spec: s.to_string(),
            why,
        };
        let (mut vcpus, mut memory, mut count) = (1u8, 128u64, None);
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("{part:?} is not KEY=VALUE")))?;
            match k {
                "vcpus" => {
                    vcpus = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=32).contains(n))
                        .ok_or_else(|| bad(format!("vcpus {v:?} is not 1..=32")))?
                }
                "memory" => {
                    let m = steelcup_units::MemSize::try_from(v)
                        .map_err(|e| bad(format!("memory: {e}")))?;
                    if m.mib() < 16 {
                        return Err(bad(format!("memory {v:?} is under 16MiB")));
                    }
                    memory = m.mib();
                }
                "count" => {
                    count = Some(
                        v.parse()
                            .ok()
                            .filter(|n| *n <= MAX_COUNT)
                            .ok_or_else(|| bad(format!("count {v:?} is not 0..={MAX_COUNT}")))?,
                    )
                }
                other => return Err(bad(format!("unknown key {other:?} (vcpus, memory, count)"))),
            }
        }
        Ok(PoolSpec {
            vcpus,
            memory_mib: memory,
            count: count.ok_or_else(|| bad("count=N is missing".into()))?,
        })
    }
}

/// A `--warm-pool` value vmmd refuses: the value, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("warm pool {spec:?}: {why}")]
pub struct PoolSpecError {
    pub spec: String,
    pub why: String,
}

/// What a member's size is: (vCPUs, memory in MiB).
pub type Key = (u8, u64);

/// A pool VM.
#[derive(Debug)]
pub struct Member<T> {
    pub key: Key,
    /// vminit answered `pong`: booted and waiting.
    pub ready: bool,
    pub since: Instant,
    pub handle: T,
}

/// Refill backoff for one size whose VMs die before they are claimed.
#[derive(Debug, Clone, Copy)]
struct Refill {
    until: Instant,
    backoff: Backoff,
}

const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// The pool's members by name (`_pool-N`: no workload name starts with `_`).
#[derive(Debug)]
pub struct Pool<T> {
    specs: Vec<PoolSpec>,
    members: BTreeMap<String, Member<T>>,
    next: u64,
    backoff: BTreeMap<Key, Refill>,
}

impl<T> Pool<T> {
    pub fn new(specs: Vec<PoolSpec>) -> Self {
        Pool {
            specs,
            members: BTreeMap::new(),
            next: 1,
            backoff: BTreeMap::new(),
        }
    }

    /// True when the pool has sizes to keep.
    pub fn enabled(&self) -> bool {
        self.specs.iter().any(|s| s.count > 0)
    }

    /// Whether `name` is a pool member (not yet claimed).
    pub fn owns(&self, name: &str) -> bool {
        self.members.contains_key(name)
    }

    /// Names and sizes of the VMs to boot now, each a new member's name: one
    /// per missing member of each size not backing off.
    pub fn wanted(&mut self, now: Instant) -> Vec<(String, Key)> {
        let mut out = Vec::new();
        for spec in &self.specs {
            let key = (spec.vcpus, spec.memory_mib);
            if self.backoff.get(&key).is_some_and(|b| b.until > now) {
                continue;
            }
            let have = self.members.values().filter(|m| m.key == key).count() as u32;
            for _ in have..spec.count {
                out.push((format!("_pool-{}", self.next), key));
                self.next += 1;
            }
        }
        out
    }

    /// A VM booting for the pool.
    pub fn add(&mut self, name: String, key: Key, handle: T, now: Instant) {
        self.members.insert(
            name,
            Member {
                key,
                ready: false,
                since: now,
                handle,
            },
        );
    }

    /// A member's vminit answered: it may be claimed. Its size's backoff
    /// is over.
    pub fn ready(&mut self, name: &str) -> Option<&Member<T>> {
        let m = self.members.get_mut(name)?;
        m.ready = true;
        self.backoff.remove(&m.key);
        Some(m)
    }

    /// The handle of member `name` while it is still booting.
    pub fn booting_handle(&self, name: &str) -> Option<&T> {
        self.members
            .get(name)
            .filter(|m| !m.ready)
            .map(|m| &m.handle)
    }

    /// Takes the longest-waiting ready member of size `key`.
    pub fn take(&mut self, key: Key) -> Option<(String, Member<T>)> {
        let name = self
            .members
            .iter()
            .filter(|(_, m)| m.ready && m.key == key)
            .min_by_key(|(_, m)| m.since)
            .map(|(n, _)| n.clone())?;
        self.members.remove(&name).map(|m| (name, m))
    }

    /// A member's VM ended before it was claimed: it goes, and its size
    /// backs off (1 s doubling to 60 s, until one of its VMs is ready).
    pub fn ended(&mut self, name: &str, now: Instant) -> Option<Member<T>> {
        let m = self.members.remove(name)?;
        self.boot_failed(m.key, now);
        Some(m)
    }

    /// A VM of size `key` could not be booted (or died unclaimed): the
    /// size backs off.
    pub fn boot_failed(&mut self, key: Key, now: Instant) {
        let refill = self.backoff.entry(key).or_insert(Refill {
            until: now,
            backoff: Backoff::new(BACKOFF_FIRST, BACKOFF_MAX),
        });
        refill.until = now + refill.backoff.take();
    }

    /// When a backoff ends (the next refill to try).
    pub fn next_wakeup(&self) -> Option<Instant> {
        self.backoff.values().map(|b| b.until).min()
    }

    /// Every member, for shutdown.
    pub fn drain(&mut self) -> Vec<(String, Member<T>)> {
        std::mem::take(&mut self.members).into_iter().collect()
    }

    /// (ready, booting) members.
    pub fn counts(&self) -> (usize, usize) {
        let ready = self.members.values().filter(|m| m.ready).count();
        (ready, self.members.len() - ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_with_defaults_and_name_what_is_wrong() {
        assert_eq!(
            PoolSpec::try_from("count=2").unwrap(),
            PoolSpec {
                vcpus: 1,
                memory_mib: 128,
                count: 2
            }
        );
        assert_eq!(
            PoolSpec::try_from("memory=1GiB, vcpus=4,count=0").unwrap(),
            PoolSpec {
                vcpus: 4,
                memory_mib: 1024,
                count: 0
            }
        );
        for (bad, says) in [
            ("vcpus=1", "count=N is missing"),
            ("count=x", "count \"x\""),
            ("count=65", "count \"65\""),
            ("vcpus=0,count=1", "vcpus \"0\""),
            ("memory=8MiB,count=1", "under 16MiB"),
            ("memory=lots,count=1", "memory:"),
            ("size=1,count=1", "unknown key \"size\""),
            ("count", "not KEY=VALUE"),
        ] {
            let e = PoolSpec::try_from(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    fn pool() -> Pool<u32> {
        Pool::new(vec![
            PoolSpec::try_from("count=2").unwrap(),
            PoolSpec::try_from("vcpus=2,memory=256MiB,count=1").unwrap(),
        ])
    }

    #[test]
    fn fills_every_size_and_hands_out_only_ready_members_oldest_first() {
        let t0 = Instant::now();
        let mut p = pool();
        let want = p.wanted(t0);
        assert_eq!(
            want,
            vec![
                ("_pool-1".to_string(), (1, 128)),
                ("_pool-2".to_string(), (1, 128)),
                ("_pool-3".to_string(), (2, 256)),
            ]
        );
        for (i, (name, key)) in want.into_iter().enumerate() {
            p.add(name, key, i as u32, t0 + Duration::from_millis(i as u64));
        }
        assert!(p.wanted(t0).is_empty(), "full while they boot");
        assert!(p.take((1, 128)).is_none(), "nothing is ready yet");
        assert_eq!(p.booting_handle("_pool-2"), Some(&1));
        p.ready("_pool-2");
        assert_eq!(p.booting_handle("_pool-2"), None, "ready, not booting");
        p.ready("_pool-1");
        assert_eq!(p.counts(), (2, 1));
        let (name, m) = p.take((1, 128)).unwrap();
        assert_eq!(
            (name.as_str(), m.handle),
            ("_pool-1", 0),
            "the oldest first"
        );
        assert!(p.take((4, 128)).is_none(), "no such size");
        assert!(!p.owns("_pool-1"), "a claimed VM is the workload's");
        assert_eq!(p.wanted(t0), vec![("_pool-4".to_string(), (1, 128))]);
    }

    #[test]
    fn a_size_whose_vms_keep_dying_backs_off_until_one_is_ready() {
        let t0 = Instant::now();
        let mut p: Pool<u32> = Pool::new(vec![PoolSpec::try_from("count=1").unwrap()]);
        let mut now = t0;
        let mut delays = Vec::new();
        for _ in 0..8 {
            let (name, key) = p.wanted(now).pop().expect("a VM to boot");
            p.add(name.clone(), key, 0, now);
            assert!(p.ended(&name, now).is_some());
            assert!(p.wanted(now).is_empty(), "backing off");
            let until = p.next_wakeup().unwrap();
            delays.push((until - now).as_secs());
            now = until;
        }
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60]);
        let (name, key) = p.wanted(now).pop().unwrap();
        p.add(name.clone(), key, 0, now);
        p.ready(&name);
        assert!(p.next_wakeup().is_none(), "a ready VM ends the backoff");
        assert!(p.ended("_pool-unknown", now).is_none());
        // A VM that could not even be booted backs its size off too.
        let mut q: Pool<u32> = Pool::new(vec![PoolSpec::try_from("count=1").unwrap()]);
        q.boot_failed((1, 128), t0);
        assert!(q.wanted(t0).is_empty());
        assert_eq!(q.wanted(t0 + Duration::from_secs(1)).len(), 1);
        assert_eq!(p.drain().len(), 1);
        assert_eq!(p.counts(), (0, 0));
        assert!(p.enabled());
        assert!(!Pool::<u32>::new(vec![PoolSpec::try_from("count=0").unwrap()]).enabled());
    }
}
