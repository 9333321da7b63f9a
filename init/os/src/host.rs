//! The host's own state as an operator reads it (`cup health`, `cup
//! support-bundle`): name, kernel, uptime, load, memory, network links,
//! `/var`, the clock.
//!
//! # Design
//! Read from `/proc`, `/sys/class/net`, `getifaddrs`, `statvfs` and
//! `adjtimex` each time it is asked: nothing is kept, nothing runs in the
//! background. Anything unreadable is left empty or zero rather than
//! failing the whole answer (a health view must work on a sick machine).

use serde::{Deserialize, Serialize};
use std::path::Path;
use zbus::zvariant::Type;

/// One network interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct Interface {
    pub name: String,
    /// The kernel's `operstate`: `up`, `down`, `unknown` (loopback, taps).
    pub state: String,
    /// IPv4 and IPv6 addresses with their prefix length.
    pub addresses: Vec<String>,
    /// Bytes received and sent since the link appeared.
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// One block device's totals since boot (`/proc/diskstats`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct Disk {
    pub name: String,
    pub read_bytes: u64,
    pub written_bytes: u64,
    /// Completed reads and writes.
    pub reads: u64,
    pub writes: u64,
}

/// The host, now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Type)]
pub struct HostStatus {
    pub hostname: String,
    pub kernel: String,
    pub uptime_secs: u64,
    /// Load averages over 1, 5 and 15 minutes.
    pub load: Vec<f64>,
    pub memory_total: u64,
    pub memory_available: u64,
    pub interfaces: Vec<Interface>,
    /// `/var` is the state partition (kept across reboots), not memory.
    pub var_persistent: bool,
    pub var_total: u64,
    pub var_available: u64,
    /// The kernel's clock is marked synchronized (`adjtimex`: no
    /// `STA_UNSYNC`, not `TIME_ERROR`).
    pub clock_synchronized: bool,
    /// The kernel's estimate of its clock error, microseconds.
    pub clock_max_error_us: i64,
    /// The clock, Unix seconds.
    pub now_unix: u64,
    /// The hardware clock (`/sys/class/rtc/rtc0/since_epoch`), Unix
    /// seconds; 0 without one.
    pub rtc_unix: u64,
    /// The `time-sync` unit's last answer: its server (empty: none yet),
    /// how far off the clock was (ms), when (Unix seconds); or why the
    /// last attempt failed.
    pub time_server: String,
    pub time_offset_ms: f64,
    pub time_last_sync_unix: u64,
    pub time_error: String,
    /// CPU time of all CPUs since boot by mode (`user`, `nice`, `system`,
    /// `idle`, `iowait`, `irq`, `softirq`, `steal`), seconds.
    pub cpu_seconds: Vec<(String, f64)>,
    /// Whole disks (partitions, loop and RAM devices left out).
    pub disks: Vec<Disk>,
    /// init's boot phases in the order they ran, with how long each took
    /// (µs): empty outside PID 1.
    pub boot_phases: Vec<(String, u64)>,
}

/// init's boot phases so far (see [`record_phase`]).
static PHASES: std::sync::Mutex<Vec<(String, u64)>> = std::sync::Mutex::new(Vec::new());

/// Notes that boot phase `name` took `took` (init, as it boots); the
/// status shows them.
pub fn record_phase(name: &str, took: std::time::Duration) {
    let mut p = PHASES.lock().unwrap_or_else(|e| e.into_inner());
    if p.len() < 64 {
        p.push((name.to_string(), took.as_micros() as u64));
    }
}

/// `/proc/stat`'s first line as (mode, seconds) at `ticks` per second.
fn cpu_seconds(stat: &str, ticks: f64) -> Vec<(String, f64)> {
    const MODES: [&str; 8] = [
        "user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal",
    ];
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return Vec::new();
    };
    MODES
        .iter()
        .zip(line.split_whitespace().skip(1))
        .filter_map(|(m, v)| Some((m.to_string(), v.parse::<f64>().ok()? / ticks)))
        .collect()
}

/// Whole disks in `/proc/diskstats` (sectors are 512 bytes there).
fn disks(diskstats: &str) -> Vec<Disk> {
    diskstats
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let name = *f.get(2)?;
            let whole = Path::new("/sys/block").join(name).exists();
            let virtual_dev = ["loop", "ram", "zram", "dm-"]
                .iter()
                .any(|p| name.starts_with(p));
            let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
            (whole && !virtual_dev).then_some(())?;
            Some(Disk {
                name: name.to_string(),
                reads: n(3)?,
                read_bytes: n(5)? * 512,
                writes: n(7)?,
                written_bytes: n(9)? * 512,
            })
        })
        .collect()
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// `MemTotal`-style lines of `/proc/meminfo`, in bytes.
fn meminfo(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

fn interfaces() -> Vec<Interface> {
    let mut out: Vec<Interface> = Vec::new();
    let Ok(dir) = std::fs::read_dir("/sys/class/net") else {
        return out;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let state = read_trimmed(&format!("/sys/class/net/{name}/operstate"));
        let count = |f: &str| {
            read_trimmed(&format!("/sys/class/net/{name}/statistics/{f}"))
                .parse()
                .unwrap_or(0)
        };
        let (rx_bytes, tx_bytes) = (count("rx_bytes"), count("tx_bytes"));
        out.push(Interface {
            name,
            state,
            addresses: Vec::new(),
            rx_bytes,
            tx_bytes,
        });
    }
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            let Some(addr) = a.address else { continue };
            let mask = a.netmask;
            let text = if let Some(v4) = addr.as_sockaddr_in() {
                let prefix = mask
                    .as_ref()
                    .and_then(|m| m.as_sockaddr_in())
                    .map_or(32, |m| m.ip().to_bits().count_ones());
                format!("{}/{prefix}", v4.ip())
            } else if let Some(v6) = addr.as_sockaddr_in6() {
                let prefix = mask
                    .as_ref()
                    .and_then(|m| m.as_sockaddr_in6())
                    .map_or(128, |m| m.ip().to_bits().count_ones());
                format!("{}/{prefix}", v6.ip())
            } else {
                continue;
            };
            if let Some(i) = out.iter_mut().find(|i| i.name == a.interface_name) {
                i.addresses.push(text);
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// (synchronized, maximum error in microseconds) from `adjtimex`.
fn clock() -> (bool, i64) {
    // SAFETY: timex is plain integers, for which all zeroes is a value.
    let mut t: libc::timex = unsafe { std::mem::zeroed() };
    // SAFETY: with modes 0, adjtimex only reads the kernel's clock state
    // into the struct it is given, which lives for the call.
    let state = unsafe { libc::adjtimex(&mut t) };
    let synced = state >= 0 && state != libc::TIME_ERROR && t.status & libc::STA_UNSYNC == 0;
    (synced, t.maxerror)
}

/// The host's state now; `var` is where the state partition is mounted.
pub fn status(var: &Path) -> HostStatus {
    let meminfo_text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let (var_total, var_available) = nix::sys::statvfs::statvfs(var)
        .map(|s| {
            let f = s.fragment_size();
            (s.blocks() * f, s.blocks_available() * f)
        })
        .unwrap_or((0, 0));
    let (clock_synchronized, clock_max_error_us) = clock();
    let sync = crate::time::TimeState::load(Path::new(crate::time::STATE)).unwrap_or_default();
    HostStatus {
        hostname: read_trimmed("/proc/sys/kernel/hostname"),
        kernel: read_trimmed("/proc/sys/kernel/osrelease"),
        uptime_secs: read_trimmed("/proc/uptime")
            .split_whitespace()
            .next()
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0) as u64,
        load: read_trimmed("/proc/loadavg")
            .split_whitespace()
            .take(3)
            .filter_map(|s| s.parse().ok())
            .collect(),
        memory_total: meminfo(&meminfo_text, "MemTotal"),
        memory_available: meminfo(&meminfo_text, "MemAvailable"),
        interfaces: interfaces(),
        var_persistent: crate::state::var_is_persistent(),
        var_total,
        var_available,
        clock_synchronized,
        clock_max_error_us,
        now_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        rtc_unix: read_trimmed("/sys/class/rtc/rtc0/since_epoch")
            .parse()
            .unwrap_or(0),
        time_server: sync.server,
        time_offset_ms: sync.offset_ms,
        time_last_sync_unix: sync.last_sync_unix,
        time_error: sync.error,
        cpu_seconds: cpu_seconds(
            &std::fs::read_to_string("/proc/stat").unwrap_or_default(),
            // SAFETY: sysconf reads a constant.
            match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
                t if t > 0 => t as f64,
                _ => 100.0,
            },
        ),
        disks: disks(&std::fs::read_to_string("/proc/diskstats").unwrap_or_default()),
        boot_phases: PHASES.lock().unwrap_or_else(|e| e.into_inner()).clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_modes_and_disks_read_from_the_kernel_files() {
        let stat = "cpu  100 5 50 1000 20 0 3 0 0 0\ncpu0 50 2 25 500 10 0 1 0 0 0\n";
        let c = cpu_seconds(stat, 100.0);
        assert_eq!(c[0], ("user".to_string(), 1.0));
        assert_eq!(c[3], ("idle".to_string(), 10.0));
        assert_eq!(c.len(), 8);
        // This machine's own: every disk named is a whole one.
        for d in disks(&std::fs::read_to_string("/proc/diskstats").unwrap()) {
            assert!(Path::new("/sys/block").join(&d.name).exists(), "{d:?}");
            assert!(!d.name.starts_with("loop"), "{d:?}");
        }
        let s = status(Path::new("/"));
        assert!(
            s.cpu_seconds.iter().any(|(m, v)| m == "idle" && *v > 0.0),
            "{s:?}"
        );
        record_phase("modules", std::time::Duration::from_millis(12));
        assert!(status(Path::new("/"))
            .boot_phases
            .contains(&("modules".to_string(), 12_000)));
    }

    #[test]
    fn this_machine_reads_as_itself() {
        let s = status(Path::new("/"));
        assert_eq!(s.hostname, read_trimmed("/proc/sys/kernel/hostname"));
        assert!(!s.kernel.is_empty() && s.uptime_secs > 0);
        assert_eq!(s.load.len(), 3);
        assert!(s.memory_total > 0 && s.memory_available <= s.memory_total);
        let lo = s.interfaces.iter().find(|i| i.name == "lo").unwrap();
        assert!(lo.addresses.iter().any(|a| a == "127.0.0.1/8"), "{lo:?}");
        assert!(s.var_total > 0 && s.var_available <= s.var_total);
        assert!(s.now_unix > 1_700_000_000);
        assert_eq!(
            meminfo(
                "MemTotal:  2048 kB\nMemAvailable: 1024 kB\n",
                "MemAvailable"
            ),
            1 << 20
        );
    }
}

#[cfg(test)]
mod signature {
    use super::*;
    use zbus::zvariant::Type;

    /// docs/api.md spells the D-Bus signature out.
    #[test]
    fn host_status_has_the_documented_signature() {
        assert_eq!(
            HostStatus::SIGNATURE.to_string(),
            "(sstadtta(ssastt)bttbxttsdtsa(sd)a(stttt)a(st))"
        );
    }
}
