//! Reload: the unit files read again and only the difference applied
//! (new units started, removed ones stopped, changed ones restarted).

use super::*;

impl Supervisor {
    /// Installs a new set of units (at start, or the new side of a reload).
    /// Existing services with an identical unit keep running.
    pub(super) fn apply(&mut self, units: Vec<Unit>) -> ReloadSummary {
        // Nothing is reaped in here: a changed or removed unit only begins
        // to stop, and its exit comes to the loop (stop.rs), so no exit of
        // a service being moved between maps can be missed.
        self.apply_units(units)
    }

    fn apply_units(&mut self, units: Vec<Unit>) -> ReloadSummary {
        let plan = graph::plan(&units);
        for (name, why) in &plan.refused {
            tracing::error!("unit {name}: refused: {why}");
        }
        let names: Vec<String> = units.iter().map(|u| u.name.clone()).collect();
        let mut summary = ReloadSummary::default();
        let mut next: BTreeMap<String, Service> = BTreeMap::new();
        let mut stops: Vec<(String, stop::AfterStop)> = Vec::new();
        let old_microvms = std::mem::take(&mut self.microvms);
        for u in &units {
            if let UnitKind::Microvm(_) = u.kind {
                match old_microvms.get(&u.name) {
                    None => summary.started.push(u.name.clone()),
                    Some(o) if *o != *u => summary.restarted.push(u.name.clone()),
                    Some(_) => {}
                }
            }
        }
        for name in old_microvms.keys() {
            if !units.iter().any(|u| u.name == *name) {
                summary.stopped.push(name.clone());
            }
        }
        for u in units {
            let spec = match &u.kind {
                UnitKind::Service(s) => s.clone(),
                UnitKind::Microvm(_) => {
                    self.microvms.insert(u.name.clone(), u);
                    continue;
                }
            };
            let deps = u
                .unit
                .after
                .iter()
                .chain(&u.unit.requires)
                .filter(|d| names.contains(d))
                .cloned()
                .collect();
            let refused = plan.refused.get(&u.name).cloned();
            match self.services.remove(&u.name) {
                Some(old) if old.unit == u && refused.is_none() => {
                    next.insert(u.name.clone(), old);
                }
                Some(old) => {
                    // Changed: the new definition starts from Waiting, once
                    // the old one (running) has stopped.
                    let state = refused.map(State::Failed).unwrap_or(State::Waiting);
                    let name = u.name.clone();
                    let mut s = Service::new(u, spec, deps, state);
                    if old.pid.is_some() || old.stopping.is_some() {
                        summary.restarted.push(name.clone());
                        stops.push((name.clone(), stop::AfterStop::Replace(Box::new(s))));
                        next.insert(name, old);
                    } else {
                        s.restarts = old.restarts;
                        next.insert(name, s);
                    }
                }
                None => {
                    if refused.is_none() {
                        summary.started.push(u.name.clone());
                    }
                    let state = refused.map(State::Failed).unwrap_or(State::Waiting);
                    next.insert(u.name.clone(), Service::new(u, spec, deps, state));
                }
            }
        }
        // What is left in self.services was removed from disk: a running
        // one stops, then goes.
        for (name, old) in std::mem::take(&mut self.services) {
            if old.pid.is_some() || old.stopping.is_some() {
                summary.stopped.push(name.clone());
                stops.push((name.clone(), stop::AfterStop::Remove));
                next.insert(name, old);
            } else {
                self.remove_cgroup(&name);
            }
        }
        self.services = next;
        self.started.retain(|n| self.services.contains_key(n));
        self.order = plan
            .order
            .into_iter()
            .filter(|n| self.services.contains_key(n))
            .collect();
        self.all_started_reported = false;
        for (name, then) in stops {
            self.begin_stop(&name, then, None);
        }
        summary
    }

    /// Records the units whose files `errors` refuse (shown by `cup
    /// units` with the error) in place of those refused before; returns
    /// their names.
    pub fn refuse_files(&mut self, errors: &[units::UnitError]) -> Vec<String> {
        self.refused_files.clear();
        for e in errors {
            if let Some(name) = e.unit_name() {
                self.refused_files
                    .entry(name)
                    .or_insert_with(|| steelcup_sys::error_chain(e));
            }
        }
        self.refused_files.keys().cloned().collect()
    }

    /// Re-reads the units directory and applies only the difference: new
    /// units start, removed ones stop, changed ones restart.
    pub fn reload(&mut self) -> ReloadSummary {
        let (mut units, errors) = units::load_dir(&self.opts.units_dir);
        for e in &errors {
            tracing::error!("{}", steelcup_sys::error_chain(e));
        }
        // A unit whose file no longer reads keeps its last good definition
        // (it is not stopped for a typo) until the file is fixed.
        for name in self.refuse_files(&errors) {
            let old = self
                .services
                .get(&name)
                .map(|s| s.unit.clone())
                .or_else(|| self.microvms.get(&name).cloned());
            if let Some(u) = old.filter(|_| !units.iter().any(|u| u.name == name)) {
                tracing::warn!("unit {name}: its file is refused; it goes on as it was");
                units.push(u);
            }
        }
        units.sort_by(|a, b| a.name.cmp(&b.name));
        let mut summary = self.apply(units);
        summary.errors = errors
            .iter()
            .map(|e| steelcup_sys::error_chain(e))
            .collect();
        // Running services whose units stayed the same hear of the reload.
        for (name, svc) in &self.services {
            let (Some(pid), Some(sig)) = (svc.pid, svc.spec.reload_signal.as_deref()) else {
                continue;
            };
            if summary.restarted.contains(name) || summary.started.contains(name) {
                continue;
            }
            if let Some(sig) = units::parse_signal(sig) {
                tracing::info!("reload: {sig} to {name} (pid {pid})");
                if let Err(e) = nix::sys::signal::kill(pid, sig) {
                    tracing::warn!("reload: cannot send {sig} to {name}: {e}");
                }
            }
        }
        tracing::info!(
            "reload: {} new, {} removed, {} changed, {} bad files",
            summary.started.len(),
            summary.stopped.len(),
            summary.restarted.len(),
            summary.errors.len()
        );
        self.start_ready(Instant::now());
        summary
    }
}
