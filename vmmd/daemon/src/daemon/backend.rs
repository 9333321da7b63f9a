//! The real `Backend` of the reconciler's `Core`: jailed workers,
//! vsock requests to vminit, threads for pulls and probes.

use super::*;

/// The real backend: jailed workers, vsock requests to vminit, threads.
#[derive(Debug)]
pub struct WorkerBackend {
    pub(super) opts: Options,
    pub(super) tx: mpsc::Sender<Event>,
    pub(super) controls: BTreeMap<String, WorkerControl>,
    /// The workload network, or why there is none.
    pub(super) net: Result<crate::net::HostNet, NoNetwork>,
    /// Each running workload's tap.
    pub(super) taps: BTreeMap<String, String>,
    /// Numbers the taps (`sctN`).
    pub(super) next_tap: u32,
}

impl WorkerBackend {
    /// Workload `name`'s address on the workload network, if it has one.
    pub(super) fn address_of(&self, name: &str) -> Option<std::net::Ipv4Addr> {
        self.net.as_ref().ok()?.address_of(name)
    }

    /// A tap for a new VM `name` on the bridge (its MAC from the name), if
    /// there is a workload network: a pool VM's or a workload's.
    pub(super) fn pool_net(&mut self, name: &str) -> Option<NetConfig> {
        let net = self.net.as_ref().ok()?;
        self.next_tap = self.next_tap.wrapping_add(1);
        Some(NetConfig {
            tap: format!("sct{}", self.next_tap),
            mac: crate::net::mac_for_name(name),
            bridge: Some(net.opts.bridge.clone()),
            host_address: None,
            mtu: Some(net.opts.mtu),
        })
    }

    /// Workload `name`'s network: its address (leased), tap and how the
    /// guest sets it up; None for `network = "none"`.
    pub(super) fn workload_net(
        &mut self,
        name: &str,
        spec: &MicrovmSection,
    ) -> Result<Option<(NetConfig, GuestNetwork)>, VmError> {
        // `vmmd --network none`: no VM gets a network device.
        if spec.network == Network::None || self.opts.network.is_none() {
            return Ok(None);
        }
        let Some(tap) = self.pool_net(name) else {
            return match &self.net {
                Err(e) => Err(e.clone().into()),
                Ok(_) => Ok(None),
            };
        };
        let net = self.net.as_mut().map_err(|e| e.clone())?;
        let ip = net.lease(name)?;
        Ok(Some((tap, net.guest_network(name, ip))))
    }
}

impl Backend for WorkerBackend {
    type PoolVm = Worker;
    type Error = VmError;

    fn pool_fit(&self, _name: &str, w: &Workload) -> Option<crate::pool::Key> {
        let wants_net = w.spec.network != Network::None && self.opts.network.is_some();
        spec_fit(
            &self.opts,
            w,
            wants_net && self.net.is_ok(),
            self.net.is_ok(),
        )
    }

    fn boot_pool_vm(&mut self, name: &str, key: crate::pool::Key) -> Result<Worker, VmError> {
        let net = self.pool_net(name);
        let vm = pool_vm_config(&self.opts, name, key, net);
        let worker = spawn_worker(&self.opts, &vm, self.tx.clone())?;
        spawn_pool_ping(&self.opts, name, self.tx.clone());
        Ok(worker)
    }

    fn start_warm(
        &mut self,
        name: &str,
        w: &Workload,
        attach: bool,
        pool_name: &str,
        mut worker: Worker,
    ) -> Result<i32, VmError> {
        let t0 = Instant::now();
        let waited = worker.started.elapsed();
        let taken = self.workload_net(name, &w.spec).and_then(|net| {
            let mut vm = vm_config(&self.opts, name, w, net)?;
            (vm.guest.attach, vm.guest.tty) = (attach, w.tty);
            claim(&self.opts, pool_name, name, &mut worker, &vm)
        });
        if let Err(e) = taken {
            kill_worker(worker.pid);
            return Err(e);
        }
        tracing::info!(
            "workload {name}: started from the warm pool in {} ms (VM {pool_name}, worker pid {}, booted {:.1}s before)",
            t0.elapsed().as_millis(),
            worker.pid,
            waited.as_secs_f64()
        );
        if let Some(c) = worker.control.take() {
            self.controls.insert(name.to_string(), c);
        }
        if let Some(tap) = worker.tap.take() {
            self.taps.insert(name.to_string(), tap);
        }
        Ok(worker.pid)
    }

    fn kill_pool_vm(&mut self, _name: &str, worker: &Worker) {
        kill_worker(worker.pid);
    }

    fn prepare(&mut self, name: &str, image: &str) {
        spawn_prepare(&self.opts, name, image, self.tx.clone());
    }

    fn start(&mut self, name: &str, w: &Workload, attach: bool) -> Result<i32, VmError> {
        let net = self.workload_net(name, &w.spec)?;
        let mut vm = vm_config(&self.opts, name, w, net)?;
        (vm.guest.attach, vm.guest.tty) = (attach, w.tty);
        let mut worker = spawn_worker(&self.opts, &vm, self.tx.clone())?;
        tracing::info!(
            "workload {name}: starting microVM (worker pid {})",
            worker.pid
        );
        if let Some(c) = worker.control.take() {
            self.controls.insert(name.to_string(), c);
        }
        if let Some(tap) = worker.tap.take() {
            self.taps.insert(name.to_string(), tap);
        }
        Ok(worker.pid)
    }

    fn ask_stop(&mut self, name: &str) {
        let (uds, name) = (vsock_path(&self.opts, name), name.to_string());
        // The guest answers on its own time; the loop goes on.
        let _ = std::thread::Builder::new()
            .name(format!("stop-{name}"))
            .spawn(move || ask_to_stop(&uds, &name));
    }

    fn kill(&mut self, _name: &str, pid: i32) {
        kill_worker(pid);
    }

    fn probe(&mut self, name: &str, check: &HealthCheck) {
        let (uds, check, tx) = (vsock_path(&self.opts, name), check.clone(), self.tx.clone());
        let name = name.to_string();
        let _ = std::thread::Builder::new()
            .name(format!("probe-{name}"))
            .spawn(move || {
                let result = probe(&uds, &check);
                let _ = tx.send(Event::Probed { name, result });
            });
    }

    fn control(&mut self, name: &str, command: &WorkerCommand) -> Result<(), VmError> {
        match self.controls.get_mut(name) {
            Some(c) => c.ask(command),
            None => Err(VmError::NotRunning(name.to_string())),
        }
    }

    fn forgotten(&mut self, name: &str) {
        self.controls.remove(name);
        self.taps.remove(name);
        if let Ok(net) = &mut self.net {
            net.release(name);
        }
        self.opts.logs.forget(name);
        let _ = std::fs::remove_file(vsock_path(&self.opts, name));
    }
}
