//! `cup machine apply|show|reset`: the machine config of a running
//! machine (docs/provisioning.md), changed the way first boot applies it.
//!
//! A new config is checked whole exactly as at first boot (a bad one
//! changes nothing and names the field), written to the applied directory
//! on `/var` (so later boots install it, as they install the first one),
//! installed into `/etc/steelcup`, and applied now where that can be done
//! live: the hostname, units (a reload: only the difference changes),
//! registries (vmmd re-reads them on the reload's SIGHUP), the update key
//! (read at each update), the admin certificates (the gateway restarts a
//! moment after the answer has left). The host network's rules are read
//! at boot: a change to them says it needs a reboot.
//!
//! `reset` marks the state partition to be wiped and reboots: the `state`
//! phase formats it again and provisioning runs as on a first boot.

use super::*;
use steelcup_os::provision;

/// What a machine apply changed (or would).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MachineChange {
    /// Files of the config (relative to `/etc/steelcup`) new, changed or
    /// gone.
    pub changed: Vec<String>,
    /// Of those, what needs a reboot to take effect.
    pub needs_reboot: Vec<String>,
    /// What the reload of the units did.
    pub units: ReloadSummary,
}

/// How long the admin gateway waits before it restarts with new
/// certificates: the answer to `cup machine apply` goes out through it.
const ADMIN_RESTART_DELAY: Duration = Duration::from_secs(2);

impl Supervisor {
    fn machine_dir(&self) -> Result<&Path, ApiError> {
        self.opts.machine_dir.as_deref().ok_or_else(|| {
            ApiError::Refused(
                "this init keeps no machine config (it is not the machine's PID 1)".into(),
            )
        })
    }

    /// `cup machine apply`: checks `text` whole; unless `dry_run`,
    /// applies it.
    pub fn machine_apply(&mut self, text: &str, dry_run: bool) -> Result<MachineChange, ApiError> {
        let dir = self.machine_dir()?.to_path_buf();
        if text.len() as u64 > provision::MAX_BYTES {
            return Err(ApiError::Refused(format!(
                "the machine config is more than {} bytes",
                provision::MAX_BYTES
            )));
        }
        let files = provision::check("cup machine apply", text)
            .map_err(|e| ApiError::Refused(steelcup_sys::error_chain(&e)))?;
        let old = applied_files(&dir);
        let new: BTreeMap<String, String> = files.files.iter().cloned().collect();
        let changed: Vec<String> = old
            .keys()
            .chain(new.keys())
            .filter(|k| old.get(*k) != new.get(*k))
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let needs_reboot: Vec<String> = changed
            .iter()
            .filter(|f| *f == "network.toml")
            .cloned()
            .collect();
        let mut change = MachineChange {
            changed,
            needs_reboot,
            units: ReloadSummary::default(),
        };
        if dry_run {
            return Ok(change);
        }
        provision::apply(&dir, "cup machine apply", text, &files)
            .map_err(|e| ApiError::Refused(steelcup_sys::error_chain(&e)))?;
        let etc = self.opts.etc_dir.clone();
        // What the old config installed and the new one does not have
        // goes (a unit it no longer lists stops at the reload).
        for gone in old.keys().filter(|k| !new.contains_key(*k)) {
            let _ = std::fs::remove_file(etc.join(gone));
        }
        provision::install(&dir, &etc)
            .map_err(|e| ApiError::Refused(steelcup_sys::error_chain(&e)))?;
        if self.opts.pid1 && change.changed.iter().any(|f| f == "hostname") {
            match crate::boot::hostname() {
                Ok(()) => {}
                Err(e) => {
                    tracing::error!("machine apply: hostname: {}", steelcup_sys::error_chain(&e))
                }
            }
        }
        tracing::info!(
            "machine apply: changed {}{}",
            change.changed.join(", "),
            if change.needs_reboot.is_empty() {
                String::new()
            } else {
                format!(
                    "; {} take effect at the next boot",
                    change.needs_reboot.join(", ")
                )
            }
        );
        change.units = self.reload();
        let certs = change.changed.iter().any(|f| f.starts_with("admin/"));
        let unit_changed = change.units.restarted.iter().any(|u| u == "admin")
            || change.units.started.iter().any(|u| u == "admin");
        // New NTP servers: time-sync starts again with them.
        if change.changed.iter().any(|f| f == "time.toml")
            && self.services.contains_key("time-sync")
            && !change.units.restarted.iter().any(|u| u == "time-sync")
        {
            self.begin_stop("time-sync", super::stop::AfterStop::Start, None);
        }
        // The metrics server may serve with the admin certificates too.
        if certs
            && self.services.contains_key("metrics")
            && !change.units.restarted.iter().any(|u| u == "metrics")
            && !change.units.started.iter().any(|u| u == "metrics")
        {
            self.begin_stop("metrics", super::stop::AfterStop::Start, None);
        }
        if certs && !unit_changed && self.services.contains_key("admin") {
            self.restart_later
                .push(("admin".into(), Instant::now() + ADMIN_RESTART_DELAY));
        }
        Ok(change)
    }

    /// `cup machine show`: the applied config, with its secrets (private
    /// keys, passwords) left out.
    pub fn machine_show(&self) -> Result<String, ApiError> {
        let dir = self.machine_dir()?;
        let path = dir.join(provision::FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok("# no machine config applied\n".into())
            }
            Err(e) => return Err(ApiError::Refused(format!("{}: {e}", path.display()))),
        };
        let source = provision::applied(dir)
            .map(|r| format!("# applied from {} (sha256 {})\n", r.source, r.sha256))
            .unwrap_or_default();
        Ok(format!("{source}{}", redact(&text)))
    }

    /// `cup machine reset`: the state partition is wiped at the next boot
    /// and provisioning runs again; reboots.
    pub fn machine_reset(&mut self) -> Result<(), ApiError> {
        let marker = Path::new(steelcup_os::state::RESET_MARKER);
        if !steelcup_os::state::var_is_persistent() {
            return Err(ApiError::Refused(
                "this machine has no state partition (/var is in memory): a reboot is already a reset"
                    .into(),
            ));
        }
        if let Some(d) = marker.parent() {
            std::fs::create_dir_all(d)
                .map_err(|e| ApiError::Refused(format!("{}: {e}", d.display())))?;
        }
        std::fs::write(marker, "requested by cup machine reset\n")
            .and_then(|()| std::fs::File::open(marker)?.sync_all())
            .map_err(|e| ApiError::Refused(format!("{}: {e}", marker.display())))?;
        tracing::warn!("machine reset: the state partition is wiped at the next boot; rebooting");
        Ok(())
    }

    /// Restarts what [`Supervisor::machine_apply`] left for later.
    pub(super) fn restart_due(&mut self, now: Instant) {
        let due: Vec<String> = self
            .restart_later
            .iter()
            .filter(|(_, at)| *at <= now)
            .map(|(n, _)| n.clone())
            .collect();
        self.restart_later.retain(|(_, at)| *at > now);
        for name in due {
            if self.services.contains_key(&name) {
                tracing::info!("machine apply: restarting {name} with its new certificates");
                let _ = self.handle(Action::Restart(name));
            }
        }
    }
}

/// The files a config applied in `dir` installed (relative paths, text).
fn applied_files(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(dir.join(&rel)) else {
            continue;
        };
        for e in rd.flatten() {
            let r = rel.join(e.file_name());
            let s = r.to_string_lossy().into_owned();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(r);
            } else if s != "applied.json" && s != provision::FILE {
                out.insert(s, std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
    }
    out
}

/// `text` (a machine config) with the values of secret keys replaced.
fn redact(text: &str) -> String {
    let Ok(mut v) = text.parse::<toml::Table>() else {
        return "# (the applied config does not parse; not shown)\n".into();
    };
    fn walk(t: &mut toml::Table) {
        for (k, v) in t.iter_mut() {
            if matches!(k.as_str(), "server-key" | "password") {
                *v = toml::Value::String("(secret: not shown)".into());
            } else if let Some(inner) = v.as_table_mut() {
                walk(inner);
            } else if let Some(items) = v.as_array_mut() {
                for i in items.iter_mut().filter_map(|i| i.as_table_mut()) {
                    walk(i);
                }
            }
        }
    }
    walk(&mut v);
    toml::to_string(&v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "hostname = \"node-1\"\n\n[units.web]\nmicrovm = { cmd = [\"/bin/true\"], restart = \"no\" }\n\n[[registry]]\nhost = \"r.example:5000\"\nusername = \"u\"\npassword = \"hunter2\"\n";

    fn sup(dir: &Path) -> Supervisor {
        let etc = dir.join("etc");
        std::fs::create_dir_all(etc.join("units")).unwrap();
        let opts = Options {
            units_dir: etc.join("units"),
            applied_dir: None,
            machine_dir: Some(dir.join("var/machine")),
            etc_dir: etc,
            run_dir: dir.to_path_buf(),
            cgroup: None,
            pid1: false,
        };
        Supervisor::new(Vec::new(), opts, Arc::new(LogStore::new(None, false)))
    }

    #[test]
    fn a_config_is_checked_applied_live_and_shown_without_secrets() {
        let d = tempfile::tempdir().unwrap();
        let mut s = sup(d.path());
        let bad = s
            .machine_apply("hostname = \"-no-\"\n", false)
            .unwrap_err()
            .to_string();
        assert!(bad.contains("hostname"), "{bad}");
        assert!(
            !d.path().join("var/machine").exists(),
            "a bad config changes nothing"
        );
        let would = s.machine_apply(CONFIG, true).unwrap();
        assert_eq!(
            would.changed,
            ["hostname", "registries.toml", "units/web.toml"]
        );
        assert!(
            !d.path().join("etc/units/web.toml").exists(),
            "a dry run changes nothing"
        );
        let done = s.machine_apply(CONFIG, false).unwrap();
        assert_eq!(done.units.started, ["web"]);
        assert!(done.needs_reboot.is_empty());
        assert!(d.path().join("etc/units/web.toml").is_file());
        let shown = s.machine_show().unwrap();
        assert!(
            shown.contains("r.example:5000") && !shown.contains("hunter2"),
            "{shown}"
        );
        assert!(
            shown.starts_with("# applied from cup machine apply"),
            "{shown}"
        );
        // A second config: the unit it no longer lists goes, the network
        // needs a reboot.
        let next =
            "hostname = \"node-1\"\n\n[[network.interface]]\nmatch = \"eth0\"\ndhcp = true\n";
        let done = s.machine_apply(next, false).unwrap();
        assert_eq!(done.needs_reboot, ["network.toml"]);
        assert_eq!(done.units.stopped, ["web"]);
        assert!(!d.path().join("etc/units/web.toml").exists());
    }
}
