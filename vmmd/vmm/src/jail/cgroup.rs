//! Each worker in a cgroup v2 of its own, with its VM's limits.
//!
//! # Design
//! vmmd keeps the VMs' cgroups under `/sys/fs/cgroup/vms` (a sibling of
//! init's per-unit `steelcup/` tree: a cgroup whose controllers are
//! enabled for children may not hold processes itself, and vmmd lives in
//! its unit's cgroup). Before a worker starts, vmmd creates `vms/NAME`,
//! writes the limits — `memory.max` (guest memory plus
//! [`MEMORY_OVERHEAD_MIB`] for the VMM, KVM's own structures and page
//! cache), `pids.max` (the vCPU threads plus a few), `cpu.max` (as many
//! CPUs as the VM has vCPUs) — and opens `cgroup.procs`; the child writes
//! `0` to it between fork and exec (joining before it runs anything), so
//! no worker ever runs outside its cgroup. The cgroup is removed when the
//! worker has ended.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

/// Where the VMs' cgroups live on the appliance.
pub const DEFAULT_ROOT: &str = "/sys/fs/cgroup/vms";
/// Memory beyond the guest's: the worker itself, KVM's page tables, page
/// cache of the VM's disk I/O.
pub const MEMORY_OVERHEAD_MIB: u64 = 64;
/// Threads beyond one per vCPU: main, devices, control, the vhost-net
/// kernel thread (which vhost puts in its owner's cgroups), the disks'
/// io_uring workers (at most `block_io::MAX_WORKERS` of each of two
/// kinds), and slack.
const EXTRA_PIDS: u64 = 8 + 2 * crate::devices::virtio::block_io::MAX_WORKERS as u64;

/// The limits of one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub pids: u64,
    /// Microseconds of CPU per 100 ms period.
    pub cpu_quota_us: u64,
}

impl Limits {
    /// A VM of `vcpus` and `memory_mib`; `cpu_max_millis` (thousandths of
    /// a CPU) caps its CPU time below its vCPUs' worth (`--cpus 1.5`).
    pub fn for_vm(vcpus: u8, memory_mib: u64, cpu_max_millis: Option<u32>) -> Self {
        let whole = u64::from(vcpus.max(1)) * 100_000;
        Limits {
            memory_bytes: (memory_mib + MEMORY_OVERHEAD_MIB) << 20,
            pids: u64::from(vcpus) + EXTRA_PIDS,
            // The kernel's floor for a quota is 1 ms.
            cpu_quota_us: cpu_max_millis
                .map_or(whole, |m| (u64::from(m) * 100).clamp(1_000, whole)),
        }
    }
}

/// A VM's cgroup, ready for its worker to join.
#[derive(Debug)]
pub struct VmCgroup {
    pub path: PathBuf,
    procs: File,
}

impl VmCgroup {
    /// Creates (or empties and reuses) `root/name` with `limits`.
    pub fn create(root: &Path, name: &str, limits: Limits) -> Result<Self, String> {
        let err = |what: &str, p: &Path, e: std::io::Error| format!("{what} {}: {e}", p.display());
        std::fs::create_dir_all(root).map_err(|e| err("create", root, e))?;
        let ctrls = std::fs::read_to_string(root.join("cgroup.controllers"))
            .map_err(|e| err("read", &root.join("cgroup.controllers"), e))?;
        let wanted: Vec<&str> = ["memory", "pids", "cpu"]
            .into_iter()
            .filter(|c| ctrls.split_whitespace().any(|have| have == *c))
            .collect();
        let enable: Vec<String> = wanted.iter().map(|c| format!("+{c}")).collect();
        let subtree = root.join("cgroup.subtree_control");
        std::fs::write(&subtree, enable.join(" ")).map_err(|e| err("write", &subtree, e))?;
        let path = root.join(name);
        if path.exists() {
            // Left by a worker of an earlier vmmd; empty by now or busy.
            let _ = std::fs::remove_dir(&path);
        }
        std::fs::create_dir_all(&path).map_err(|e| err("create", &path, e))?;
        let set = |file: &str, value: String| -> Result<(), String> {
            std::fs::write(path.join(file), &value)
                .map_err(|e| format!("set {file} = {value} in {}: {e}", path.display()))
        };
        if wanted.contains(&"memory") {
            set("memory.max", limits.memory_bytes.to_string())?;
        }
        if wanted.contains(&"pids") {
            set("pids.max", limits.pids.to_string())?;
        }
        if wanted.contains(&"cpu") {
            set("cpu.max", format!("{} 100000", limits.cpu_quota_us))?;
        }
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(path.join("cgroup.procs"))
            .map_err(|e| err("open", &path.join("cgroup.procs"), e))?;
        Ok(VmCgroup { path, procs })
    }

    /// The descriptor a child writes `0` to (see [`join_self`]).
    pub fn procs_fd(&self) -> RawFd {
        self.procs.as_raw_fd()
    }

    /// Moves process `pid` in (for tests and processes started elsewhere).
    pub fn add(&mut self, pid: u32) -> std::io::Result<()> {
        write!(self.procs, "{pid}")
    }

    /// Moves process `pid` (every thread of it) from this cgroup into a new
    /// one, `name` beside it with `limits`, which this becomes; the old one
    /// is removed. (A warm-pool VM taken by a workload gets the workload's
    /// name: cgroup v2 refuses to rename a cgroup.)
    pub fn move_to(&mut self, name: &str, limits: Limits, pid: u32) -> Result<(), String> {
        let root = self.path.parent().ok_or("a cgroup without a parent")?;
        let mut new = VmCgroup::create(root, name, limits)?;
        new.add(pid)
            .map_err(|e| format!("move pid {pid} into {}: {e}", new.path.display()))?;
        let old = std::mem::replace(self, new);
        old.remove();
        Ok(())
    }

    /// Removes the cgroup; its processes must have ended.
    pub fn remove(self) {
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Removes the VM cgroups under `root` that an earlier vmmd left (it
/// ended without removing them: killed, or crashed): kills what is still
/// in each (`cgroup.kill`), waits up to 2 s for it to empty, removes it.
/// Returns what it removed, as (name, processes killed).
pub fn remove_leftovers(root: &Path) -> Vec<(String, usize)> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(root) else {
        return removed;
    };
    for e in entries.flatten() {
        let path = e.path();
        if !path.join("cgroup.procs").exists() {
            continue;
        }
        let procs = || {
            std::fs::read_to_string(path.join("cgroup.procs"))
                .map(|s| s.lines().count())
                .unwrap_or(0)
        };
        let killed = procs();
        if killed > 0 {
            let _ = std::fs::write(path.join("cgroup.kill"), "1");
            let t = std::time::Instant::now();
            while procs() > 0 && t.elapsed() < std::time::Duration::from_secs(2) {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        if std::fs::remove_dir(&path).is_ok() {
            removed.push((e.file_name().to_string_lossy().into_owned(), killed));
        }
    }
    removed
}

/// In a forked child before exec: join the cgroup whose `cgroup.procs` is
/// open as `fd`. Async-signal-safe (one `write`).
pub fn join_self(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: write of a 1-byte static buffer to a descriptor we own.
    if unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) } == 1 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_vm() {
        let l = Limits::for_vm(2, 128, None);
        assert_eq!(l.memory_bytes, (128 + MEMORY_OVERHEAD_MIB) << 20);
        assert_eq!(l.pids, 2 + EXTRA_PIDS);
        assert_eq!(l.cpu_quota_us, 200_000);
        // --cpus 1.5 on 2 vCPUs: 150 ms of each 100 ms period's 200.
        assert_eq!(Limits::for_vm(2, 128, Some(1500)).cpu_quota_us, 150_000);
        assert_eq!(Limits::for_vm(1, 128, Some(1)).cpu_quota_us, 1_000);
    }
}
