//! `cup stats`: each running VM's counters, read where the host keeps
//! them — its worker's cgroup (CPU time, memory, tasks), its tap (network
//! bytes), the worker's own I/O accounting (bytes its disk files read and
//! wrote at the storage layer). Counters only: cup makes rates from two
//! readings.

use std::path::Path;
use steelcup_api::vmm1::VmStats;

/// The counters of workload `name`, whose worker is `pid`, in cgroup
/// `cgroup` (when vmmd keeps cgroups) with tap `tap` (when it has a
/// network). Missing files read as 0: a VM that ended between the list
/// and the read shows nothing rather than failing the whole answer.
pub(super) fn read(
    name: &str,
    pid: i32,
    cgroup: Option<&Path>,
    tap: Option<&str>,
    memory_limit: u64,
) -> VmStats {
    let proc_dir = Path::new("/proc").join(pid.to_string());
    let (cpu_usec, memory, limit, pids) = match cgroup {
        Some(cg) => (
            keyed(&cg.join("cpu.stat"), "usage_usec"),
            number(&cg.join("memory.current")),
            number(&cg.join("memory.max")),
            number(&cg.join("pids.current")),
        ),
        None => (
            proc_cpu_usec(&proc_dir),
            keyed(&proc_dir.join("status"), "VmRSS:") * 1024,
            0,
            keyed(&proc_dir.join("status"), "Threads:"),
        ),
    };
    // The tap's receive is what the guest sent, and the other way round.
    let net = |file: &str| {
        tap.map_or(0, |t| {
            number(
                &Path::new("/sys/class/net")
                    .join(t)
                    .join("statistics")
                    .join(file),
            )
        })
    };
    VmStats {
        name: name.to_string(),
        cpu_usec,
        memory_bytes: memory,
        memory_limit: if limit == 0 { memory_limit } else { limit },
        pids,
        net_rx: net("tx_bytes"),
        net_tx: net("rx_bytes"),
        block_read: keyed(&proc_dir.join("io"), "read_bytes:"),
        block_write: keyed(&proc_dir.join("io"), "write_bytes:"),
        ..VmStats::default()
    }
}

/// A file holding one number (`max` and unreadable: 0).
fn number(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The number after `key` on its line in a `key value` file.
fn keyed(path: &Path, key: &str) -> u64 {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    find_keyed(&text, key)
}

fn find_keyed(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some(key)).then(|| words.next()?.parse().ok())?
        })
        .unwrap_or(0)
}

/// User plus system time of a process from `/proc/PID/stat`, in µs.
fn proc_cpu_usec(proc_dir: &Path) -> u64 {
    let stat = std::fs::read_to_string(proc_dir.join("stat")).unwrap_or_default();
    // The fields after the command (which may hold spaces) in parentheses.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100)
        .max(1) as u64;
    ticks * 1_000_000 / hz
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_read_by_their_keys() {
        let stat = "usage_usec 1234\nuser_usec 1000\nsystem_usec 234\n";
        assert_eq!(find_keyed(stat, "usage_usec"), 1234);
        assert_eq!(find_keyed(stat, "nr_periods"), 0);
        let io = "rchar: 10\nwchar: 20\nread_bytes: 4096\nwrite_bytes: 104857600\n";
        assert_eq!(find_keyed(io, "write_bytes:"), 104_857_600);
    }

    #[test]
    fn this_process_reads_as_a_vm_without_a_cgroup() {
        // Some CPU time, memory and I/O accounting of our own.
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert_ne!(x, 1);
        let s = read("me", std::process::id() as i32, None, None, 7);
        assert_eq!(s.name, "me");
        assert!(s.memory_bytes > 1 << 20, "{s:?}");
        assert!(s.pids >= 1, "{s:?}");
        assert_eq!(s.memory_limit, 7);
        assert_eq!((s.net_rx, s.net_tx), (0, 0));
        let gone = read("gone", i32::MAX, None, None, 0);
        assert_eq!((gone.cpu_usec, gone.memory_bytes), (0, 0));
    }
}
