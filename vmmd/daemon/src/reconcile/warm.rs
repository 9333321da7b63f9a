//! The warm pool's decisions, in the core: what to boot, when a pool VM
//! is ready or gone, and what goes when vmmd stops. Which start takes a
//! pool VM is decided where a workload starts (`Core::tick_one`).

use super::*;

impl<B: Backend> Core<B> {
    /// Boots what the warm pool is missing (none of a size that backs off).
    pub fn refill_pool(&mut self, now: Instant) {
        for (name, key) in self.pool.wanted(now) {
            match self.backend.boot_pool_vm(&name, key) {
                Ok(vm) => {
                    tracing::debug!("warm pool: booting {name} ({} vCPU, {} MiB)", key.0, key.1);
                    self.pool.add(name, key, vm, now);
                }
                Err(e) => {
                    tracing::warn!(
                        "warm pool: cannot boot {name}: {}",
                        steelcup_sys::error_chain(&e)
                    );
                    self.pool.boot_failed(key, now);
                }
            }
        }
    }

    /// Pool VM `name`'s vminit answered: it may be claimed.
    pub fn pool_ready(&mut self, name: &str, now: Instant) {
        let Some((key, since)) = self.pool.ready(name).map(|m| (m.key, m.since)) else {
            return;
        };
        let (ready, booting) = self.pool.counts();
        tracing::info!(
            "warm pool: {name} ready ({} vCPU, {} MiB) after {:.1}s; {ready} ready, {booting} booting",
            key.0,
            key.1,
            now.saturating_duration_since(since).as_secs_f64()
        );
    }

    /// A VM named `name` ended: true if it was a pool VM no workload had
    /// taken (its size backs off).
    pub fn pool_ended(&mut self, name: &str, now: Instant) -> bool {
        self.pool.ended(name, now).is_some()
    }

    /// Pool VM `name` did not come up in time: it is killed (its end then
    /// comes through [`Core::pool_ended`]).
    pub fn pool_stuck(&mut self, name: &str) {
        if let Some(vm) = self.pool.booting_handle(name) {
            tracing::warn!("warm pool: {name} did not come up in time; killing it");
            self.backend.kill_pool_vm(name, vm);
        }
    }

    /// vmmd stops: every pool VM goes (they run no workload).
    pub fn drain_pool(&mut self) {
        for (name, m) in self.pool.drain() {
            tracing::debug!("warm pool: {name} goes");
            self.backend.kill_pool_vm(&name, &m.handle);
        }
    }
}
