//! The processes inside a guest, as vminit reads them from its `/proc`
//! for `cup top` (the host cannot see into a VM's process table).
//!
//! # Limitations
//! At most [`MAX_PROCESSES`] are listed, each command line cut at
//! [`MAX_CMDLINE`] bytes, so an answer stays small whatever the guest runs.
//! Kernel threads (no command line) are left out.

use serde::{Deserialize, Serialize};
use std::path::Path;

/// The most processes one answer lists.
pub const MAX_PROCESSES: usize = 4096;
/// The longest command line listed, in bytes.
pub const MAX_CMDLINE: usize = 1024;
/// The longest answer line cup reads (the bounds above, as JSON).
pub const MAX_ANSWER: u64 = 8 << 20;

/// One process in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestProcess {
    pub pid: u32,
    pub ppid: u32,
    pub uid: u32,
    /// User and system CPU time, in hundredths of a second.
    pub cpu_centis: u64,
    /// Resident memory, KiB.
    pub rss_kib: u64,
    /// `R`, `S`, `D`, `Z`, ...
    pub state: String,
    /// Its arguments joined by spaces.
    pub cmd: String,
}

/// The processes under `proc` (the guest's `/proc`), by pid.
pub fn list(proc: &Path) -> Vec<GuestProcess> {
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100)
        .max(1) as u64;
    let mut pids: Vec<u32> = std::fs::read_dir(proc)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    pids.sort_unstable();
    pids.into_iter()
        .filter_map(|pid| one(&proc.join(pid.to_string()), pid, hz))
        .take(MAX_PROCESSES)
        .collect()
}

fn one(dir: &Path, pid: u32, hz: u64) -> Option<GuestProcess> {
    let cmdline = std::fs::read(dir.join("cmdline")).ok()?;
    if cmdline.is_empty() {
        return None; // a kernel thread, or a zombie
    }
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse().ok())
        .unwrap_or(0);
    let page_kib = 4;
    let mut cmd: String = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    if cmd.len() > MAX_CMDLINE {
        let mut end = MAX_CMDLINE;
        while !cmd.is_char_boundary(end) {
            end -= 1;
        }
        cmd.truncate(end);
    }
    Some(GuestProcess {
        pid,
        ppid: num(1) as u32,
        uid,
        cpu_centis: (num(11) + num(12)) * 100 / hz,
        rss_kib: num(21) * page_kib,
        state: f.first().copied().unwrap_or("?").to_string(),
        cmd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_listed_with_its_command_line() {
        let all = list(Path::new("/proc"));
        let me = std::process::id();
        let p = all.iter().find(|p| p.pid == me).expect("this process");
        assert!(
            p.cmd.contains("steelcup_proto") || !p.cmd.is_empty(),
            "{p:?}"
        );
        assert_eq!(p.ppid, std::os::unix::process::parent_id());
        assert_eq!(p.uid, nix::unistd::getuid().as_raw());
        assert!(p.rss_kib > 0);
        assert!(all.len() <= MAX_PROCESSES);
        // Kernel threads (kthreadd is pid 2) have no command line.
        assert!(!all.iter().any(|p| p.pid == 2));
        let json = serde_json::to_string(&all).unwrap();
        assert!((json.len() as u64) < MAX_ANSWER);
    }
}
