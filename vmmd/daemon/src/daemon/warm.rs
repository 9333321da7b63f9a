//! The warm pool's side of the daemon: a pool VM's config, which start
//! fits which pool size, waiting for a pool VM to be ready, and the claim
//! that makes it a workload. What to keep booted is `crate::pool`.

use super::*;

/// The VM config of a warm-pool VM `name` of size `key`: the default
/// kernel and initramfs, an empty root disk slot, vsock; vminit waits.
pub(super) fn pool_vm_config(
    opts: &Options,
    name: &str,
    key: crate::pool::Key,
    net: Option<NetConfig>,
) -> VmConfig {
    VmConfig {
        name: name.to_string(),
        kernel: opts.kernel.clone(),
        initramfs: opts.initramfs.clone(),
        cmdline: DEFAULT_CMDLINE.to_string(),
        vcpus: key.0,
        memory_mib: key.1,
        memory_backing: Default::default(),
        huge_pages: false,
        guest: GuestConfig {
            pool: true,
            ..Default::default()
        },
        disks: vec![DiskConfig {
            path: PathBuf::new(),
            read_only: true,
            id: "root".into(),
            empty_slot: true,
        }],
        // The context id is the guest's own (each VM has its own vsock
        // device), so pool VMs need not differ from workloads.
        vsock: Some(VsockConfig {
            cid: 3,
            uds: vsock_path(opts, name),
        }),
        net,
        report_timing: false,
        jail_scratch: opts
            .jail
            .then(|| steelcup_vmm::jail::mount::scratch_dir(&opts.run_dir)),
        cpu_max_millis: None,
    }
}

/// The warm-pool size a start of workload `w` could take instead of a
/// cold boot: one read-only root image and nothing a booted pool VM lacks
/// (no volumes, the default kernel, initramfs and command line, plain
/// memory, and a network device exactly when the pool VMs have one).
/// `wants_net`: the workload would get a network device; `pool_has_net`:
/// pool VMs have one.
pub(super) fn spec_fit(
    opts: &Options,
    w: &Workload,
    wants_net: bool,
    pool_has_net: bool,
) -> Option<crate::pool::Key> {
    let spec = &w.spec;
    let fits = (w.prepared.is_some() || spec.root.is_some())
        && spec.volumes.is_empty()
        && wants_net == pool_has_net
        && spec.kernel.as_ref().is_none_or(|k| *k == opts.kernel)
        && spec.initramfs.as_ref().is_none_or(|i| *i == opts.initramfs)
        && spec.memory_backing == Default::default()
        && !spec.huge_pages;
    fits.then_some((spec.vcpus(), spec.memory.mib()))
}

/// How long a pool VM may take to boot before it is given up.
pub(super) const POOL_BOOT_LIMIT: Duration = Duration::from_secs(300);

/// Pings pool VM `name`'s vminit until it answers, then reports it ready.
pub(super) fn spawn_pool_ping(opts: &Options, name: &str, tx: mpsc::Sender<Event>) {
    let (uds, name) = (vsock_path(opts, name), name.to_string());
    let _ = std::thread::Builder::new()
        .name(format!("ping-{name}"))
        .spawn(move || {
            let t0 = Instant::now();
            while t0.elapsed() < POOL_BOOT_LIMIT {
                // Refused until the worker has bound its socket and vminit
                // listens.
                if ask_guest(&uds, POOL_PORT, &GuestRequest::Ping {}).is_ok() {
                    let _ = tx.send(Event::PoolReady { name });
                    return;
                }
                if !uds.exists() && t0.elapsed() > Duration::from_secs(10) {
                    return; // the worker is gone
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = tx.send(Event::PoolStuck { name });
        });
}

/// Hands pool VM `pool_name` (its worker `worker`) to workload `name`: the
/// root image to its empty slot, the config to its vminit, then the VM's
/// vsock socket takes the workload's name and its worker moves to the
/// workload's cgroup.
pub(super) fn claim(
    opts: &Options,
    pool_name: &str,
    name: &str,
    worker: &mut Worker,
    vm: &VmConfig,
) -> Result<(), VmError> {
    let root = &vm.disks[0].path;
    let file = std::fs::File::open(root).map_err(VmError::file("open", root))?;
    let len = file.metadata().map_err(VmError::file("open", root))?.len();
    let control = worker.control.as_mut().ok_or(VmError::NoControl)?;
    use std::os::fd::AsFd;
    let attach = WorkerCommand::Attach {
        disk: "root".into(),
        bytes: len,
    };
    control.ask_with_fd(&attach, file.as_fd())?;
    let claim = GuestRequest::Claim {
        config: Box::new(vm.guest.clone()),
    };
    // From here the VM's output and end are the workload's.
    worker.report_as(name, worker.started.elapsed());
    let old = vsock_path(opts, pool_name);
    if let Err(e) = ask_guest(&old, POOL_PORT, &claim) {
        worker.report_as(pool_name, Duration::ZERO);
        return Err(e.into());
    }
    let new = vsock_path(opts, name);
    let _ = std::fs::remove_file(&new);
    if let Err(e) = std::fs::rename(&old, &new) {
        // The VM runs the workload already: it is the workload's, whatever
        // its socket is called; but nothing reaches it at `new`.
        tracing::warn!("workload {name}: cannot rename {}: {e}", old.display());
    }
    if let Some(c) = worker
        .cgroup
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_mut()
    {
        let limits =
            steelcup_vmm::jail::cgroup::Limits::for_vm(vm.vcpus, vm.memory_mib, vm.cpu_max_millis);
        if let Err(e) = c.move_to(name, limits, worker.pid as u32) {
            tracing::warn!("workload {name}: its VM stays in the pool's cgroup: {e}");
        }
    }
    Ok(())
}
