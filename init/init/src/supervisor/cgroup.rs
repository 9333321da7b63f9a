//! Each service's cgroup v2 under init's tree, with the unit's limits;
//! removed with the unit.

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

    pub(super) fn remove_cgroup(&self, name: &str) {
        if let Some(dir) = self.cgroup_of(name) {
            let _ = std::fs::remove_dir(dir);
        }
    }
}
