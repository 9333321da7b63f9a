//! Each service's cgroup v2 under init's tree, with the unit's limits.
//! When the service's main process ends (it exited, was killed, or was
//! stopped), whatever it left behind in its cgroup is killed
//! (`cgroup.kill`) and the cgroup removed: a restart starts clean, and a
//! stopped unit leaves no process and no cgroup.

use super::*;

impl Supervisor {
    pub(super) fn cgroup_of(&self, name: &str) -> Option<PathBuf> {
        self.opts
            .cgroup
            .as_ref()
            .map(|c| c.join(format!("{name}.service")))
    }

    pub(super) fn setup_cgroup(&self, name: &str, spec: &ServiceSection) -> Option<PathBuf> {
        let Some(dir) = self.cgroup_of(name) else {
            if spec.memory_max.is_some() || spec.cpu_max.is_some() || spec.pids_max.is_some() {
                tracing::warn!("unit {name}: no cgroup tree; its limits are not applied");
            }
            return None;
        };
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::warn!("unit {name}: cgroup {}: {e}", dir.display());
            return None;
        }
        let limits = [
            ("memory.max", spec.memory_max.map(|m| m.0.to_string())),
            (
                "cpu.max",
                spec.cpu_max
                    .map(|c| format!("{} 100000", (c * 100_000.0).round() as u64)),
            ),
            ("pids.max", spec.pids_max.map(|p| p.to_string())),
        ];
        for (file, value) in limits {
            if let Some(v) = value {
                if let Err(e) = std::fs::write(dir.join(file), &v) {
                    tracing::warn!("unit {name}: {file} = {v}: {e}");
                }
            }
        }
        Some(dir.join("cgroup.procs"))
    }

    /// Kills what is left in `name`'s cgroup and removes it once empty.
    pub(super) fn clean_cgroup(&self, name: &str) {
        let Some(dir) = self.cgroup_of(name) else {
            return;
        };
        let populated = || {
            std::fs::read_to_string(dir.join("cgroup.events"))
                .is_ok_and(|e| e.lines().any(|l| l == "populated 1"))
        };
        if populated() {
            let left = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            tracing::info!(
                "unit {name}: killing {} processes it left behind",
                left.lines().count()
            );
            if std::fs::write(dir.join("cgroup.kill"), "1").is_err() {
                // Kernels before 5.14: one by one.
                for pid in left.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
            // A killed process leaves the cgroup as it exits (before it is
            // reaped).
            let t0 = Instant::now();
            while populated() && t0.elapsed() < Duration::from_millis(500) {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        if let Err(e) = std::fs::remove_dir(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::debug!("unit {name}: cgroup {}: {e}", dir.display());
            }
        }
    }

    pub(super) fn remove_cgroup(&self, name: &str) {
        if let Some(dir) = self.cgroup_of(name) {
            let _ = std::fs::remove_dir(dir);
        }
    }

    /// (unit, CPU time µs, memory bytes) of each running service: its
    /// cgroup's `cpu.stat` and `memory.current`, or without a cgroup tree
    /// its main process's (`/proc/PID/stat` times, resident set).
    pub(super) fn usage(&self) -> Vec<(String, u64, u64)> {
        let mut out = Vec::new();
        for (name, s) in &self.services {
            let Some(pid) = s.pid else { continue };
            let from_cgroup = self.cgroup_of(name).and_then(|dir| {
                let cpu = std::fs::read_to_string(dir.join("cpu.stat")).ok()?;
                let usec = cpu
                    .lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))?
                    .trim()
                    .parse()
                    .ok()?;
                let mem = std::fs::read_to_string(dir.join("memory.current"))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()?;
                Some((usec, mem))
            });
            let (cpu, mem) = from_cgroup.unwrap_or_else(|| process_usage(pid.as_raw()));
            out.push((name.clone(), cpu, mem));
        }
        out
    }
}

/// (CPU time µs, resident bytes) of one process, from `/proc`.
fn process_usage(pid: i32) -> (u64, u64) {
    // SAFETY: sysconf only reads a constant of the system.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK).max(1) as u64,
            libc::sysconf(libc::_SC_PAGESIZE).max(1) as u64,
        )
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may hold spaces) in parentheses:
    // utime and stime are the 14th and 15th of the whole line.
    let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let cpu =
        (f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)) * 1_000_000 / ticks;
    let rss = std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|t| t.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        * page;
    (cpu, rss)
}
