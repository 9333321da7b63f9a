//! The API's actions, executed on the daemon's loop: each decodes into
//! what the reconciler's `Core` or the image store does, and answers.

use super::*;

/// Executes an API request on the daemon's state and answers it, or (a
/// stop) keeps the answer for when the VM has ended.
pub(super) fn execute(opts: &Options, core: &mut Daemon, req: dbus::Request) {
    let now = Instant::now();
    if let Action::Stop(name, within) = &req.action {
        if !core.workloads.contains_key(name) {
            let _ = req.reply.send(Err(ApiError::NoSuchVm(name.clone())));
            return;
        }
        let grace = within.map_or(crate::reconcile::STOP_GRACE, |s| {
            Duration::from_secs(u64::from(s))
        });
        core.stop_within(name, Some(req.reply), AfterStop::Stay, now, grace);
        return;
    }
    if let Action::Login(registry, user, password) = &req.action {
        let checked = crate::image::registries::login_registry(registry)
            .map_err(ApiError::Refused)
            .and_then(|r| match user.is_empty() || password.is_empty() {
                true => Err(ApiError::Refused(
                    "a login needs a username and a password".into(),
                )),
                false => Ok(r),
            });
        let registry = match checked {
            Ok(r) => r,
            Err(e) => {
                let _ = req.reply.send(Err(e));
                return;
            }
        };
        // The registry answers on its own time; the loop goes on.
        let insecure = pull_options(opts, &format!("{registry}/_"))
            .insecure
            .contains(&registry);
        let (user, password, reply) = (user.clone(), password.clone(), req.reply);
        let tx = core.backend.tx.clone();
        let _ = std::thread::Builder::new()
            .name("login".into())
            .spawn(move || {
                match crate::image::login::check(&registry, &user, &password, insecure) {
                    Ok(()) => {
                        let _ = tx.send(Event::LoginChecked {
                            registry,
                            user,
                            password,
                            reply,
                        });
                    }
                    Err(e) => {
                        tracing::warn!("cup login: {e}");
                        let _ = reply.send(Err(ApiError::Refused(e.to_string())));
                    }
                }
            });
        return;
    }
    if let Action::Pull(source) = &req.action {
        let (store, source) = (opts.state_dir.clone(), source.clone());
        let pull = pull_options(&core.backend.opts, &source);
        let reply = req.reply;
        let pulls = opts.pulls.clone();
        let _ = std::thread::Builder::new()
            .name("pull".into())
            .spawn(move || {
                let (mut progress, _guard) = track(&pulls, &source);
                let answer = crate::image::store::Store::open(&store)
                    .map_err(|e| e.to_string())
                    .and_then(|s| {
                        crate::image::source::pull(&s, &source, &pull, &mut progress)
                            .map_err(|e| steelcup_sys::error_chain(&e))
                    })
                    .map(|(name, d)| Reply::Pulled {
                        name,
                        digest: d.to_string(),
                    })
                    .map_err(ApiError::Refused);
                let _ = reply.send(answer);
            });
        return;
    }
    let answer = match req.action {
        Action::Run(spec) => {
            let keep = runs::kept(&spec).then(|| spec.as_ref().clone());
            run_workload(&core.workloads, &core.units, *spec, now).map(|(name, w)| {
                if let Some(spec) = keep {
                    runs::keep(&opts.state_dir, &name, &spec);
                }
                core.add(name.clone(), w);
                Reply::Text(name)
            })
        }
        Action::Socket(name) => match core.workloads.get(&name) {
            None => {
                let removed = opts.removed.lock().unwrap_or_else(|e| e.into_inner());
                match removed.iter().rev().find(|(n, _)| *n == name) {
                    Some((_, outcome)) => Err(ApiError::Refused(format!(
                        "workload {name:?} ended ({}) and was removed",
                        outcome.text
                    ))),
                    None => Err(ApiError::NoSuchVm(name)),
                }
            }
            Some(w) if w.pid.is_none() => Err(ApiError::Refused(format!(
                "workload {name:?} is not running"
            ))),
            Some(_) => Ok(Reply::Text(vsock_path(opts, &name).display().to_string())),
        },
        Action::Remove(name) => match core.workloads.get(&name) {
            None => Err(ApiError::NoSuchVm(name)),
            Some(w) if w.pid.is_some() || w.preparing => Err(ApiError::Refused(format!(
                "workload {name:?} is running; stop it first (or cup rm -f)"
            ))),
            Some(_) => {
                runs::forget(&opts.state_dir, &name);
                core.forget(&name);
                Ok(Reply::Done)
            }
        },
        Action::Save(names) => transfer::save(opts, names),
        Action::Load => transfer::load(opts),
        Action::Images
        | Action::RemoveImage(_)
        | Action::Prune
        | Action::InspectImage(_)
        | Action::TagImage(..) => image_action(opts, req.action),
        Action::Inspect(name) => match core.workloads.get(&name) {
            None => Err(ApiError::NoSuchVm(name)),
            Some(w) => Ok(Reply::Text(inspect(opts, &core.backend, &name, w))),
        },
        Action::Kill(name, signal) => {
            match core.workloads.get(&name) {
                None => Err(ApiError::NoSuchVm(name)),
                Some(w) if w.pid.is_none() => Err(ApiError::Refused(format!(
                    "workload {name:?} is not running"
                ))),
                Some(_) if Signal::try_from(signal).is_err() => {
                    Err(ApiError::Refused(format!("{signal} is not a signal")))
                }
                Some(_) => {
                    // The guest answers on its own time; the loop goes on.
                    let uds = vsock_path(opts, &name);
                    let reply = req.reply;
                    let _ = std::thread::Builder::new()
                        .name(format!("kill-{name}"))
                        .spawn(move || {
                            let answer =
                                ask_guest(&uds, CONTROL_PORT, &GuestRequest::Kill { signal })
                                    .map(|()| Reply::Done)
                                    .map_err(|e| {
                                        ApiError::Refused(format!("workload {name:?}: {e}"))
                                    });
                            let _ = reply.send(answer);
                        });
                    return;
                }
            }
        }
        Action::Pulls => Ok(Reply::Pulls(
            opts.pulls
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .cloned()
                .collect(),
        )),
        Action::Logs { name, since, max } => match core.workloads.get(&name) {
            None => Err(ApiError::NoSuchVm(name)),
            Some(w) => {
                let max = max.min(10_000) as usize;
                let (lines, next) = match since {
                    Some(s) => opts.logs.read_timed(&name, s, max),
                    None => opts.logs.tail_timed(&name, max),
                };
                Ok(Reply::Logs(
                    lines
                        .into_iter()
                        .map(|l| (l.seq, l.micros, l.text))
                        .collect(),
                    next,
                    w.pid.is_some() || w.restart_at.is_some() || w.preparing,
                ))
            }
        },
        action => execute_now(core, action),
    };
    let _ = req.reply.send(answer);
}

/// `cup inspect`: what vmmd knows of a workload.
pub(super) fn inspect(opts: &Options, backend: &WorkerBackend, name: &str, w: &Workload) -> String {
    let v = serde_json::json!({
        "name": name,
        "state": w.state(),
        "health": w.health_name(),
        "last_probe": w.last_probe,
        "pid": w.pid,
        "runs": w.runs,
        "last_outcome": w.last_outcome.text,
        "exit_code": w.last_outcome.code(),
        "from": if w.unit.is_some() { "unit" } else { "cup run" },
        "unit": w.unit,
        "replica": w.unit.as_ref().map(|_| w.slot + 1),
        "remove_when_done": w.remove_when_done,
        "vsock_cid": w.cid,
        "vsock_socket": vsock_path(opts, name),
        "address": backend.address_of(name).map(|a| a.to_string()),
        "network": {
            "mode": w.spec.network,
            "scopes": network_scopes(name, w),
            "aliases": w.spec.aliases,
            "ports": w.spec.ports,
            "tap": backend.taps.get(name),
            "mac": backend.address_of(name).map(|_| steelcup_proto::guest::format_mac(crate::net::mac_for_name(name))),
        },
        "image": w.spec.image,
        "image_digest": w.prepared.as_ref().map(|p| p.digest.clone()),
        "root_image": w.prepared.as_ref().map(|p| p.rootfs.clone()),
        "spec": w.spec,
        // Docker's names for the same, so `cup inspect -f
        // '{{.State.ExitCode}}'` and its kin read as they do with docker.
        "Name": name,
        "State": {
            "Status": docker_status(w),
            "Running": w.pid.is_some() && !w.paused,
            "Paused": w.paused,
            "Restarting": w.restart_at.is_some(),
            "Pid": w.pid.unwrap_or(0),
            "ExitCode": w.last_outcome.code().unwrap_or(0),
            "Error": if w.last_outcome.code().is_none() { w.last_outcome.text.clone() } else { String::new() },
            "Health": w.spec.health.as_ref().map(|_| serde_json::json!({"Status": w.health_name()})),
        },
        "Config": {
            "Image": w.spec.image,
            "Cmd": w.spec.cmd,
            "Env": w.spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
            "Labels": w.spec.labels,
        },
        "NetworkSettings": {
            "IPAddress": backend.address_of(name).map(|a| a.to_string()).unwrap_or_default(),
        },
        "RestartCount": w.runs.saturating_sub(1),
    });
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

/// A workload's state as Docker names it: `created`, `running`, `paused`,
/// `restarting`, `removing` (stopping) or `exited`.
fn docker_status(w: &Workload) -> &'static str {
    match w.state() {
        WorkloadState::Preparing => "created",
        WorkloadState::Waiting => "restarting",
        WorkloadState::Running => "running",
        WorkloadState::Paused => "paused",
        WorkloadState::Stopping => "removing",
        WorkloadState::Ended | WorkloadState::Removed => "exited",
    }
}

/// A workload for `cup run`: its name and the workload, checked.
pub(super) fn run_workload(
    workloads: &BTreeMap<String, Workload>,
    units: &BTreeMap<String, MicrovmSection>,
    spec: vmm1::RunSpec,
    now: Instant,
) -> Result<(String, Workload), ApiError> {
    let refused = |s: String| Err(ApiError::Refused(s));
    crate::image::source::Source::parse(&spec.image)
        .map_err(|e| ApiError::Refused(e.to_string()))?;
    let taken = |n: &str| workloads.contains_key(n) || units.contains_key(n);
    let name = match spec.name {
        Some(n) => {
            if !units::valid_name(&n) {
                return refused(format!(
                    "name {n:?}: lowercase letters, digits, '.', '_', '-', at most 64"
                ));
            }
            if taken(&n) {
                return refused(format!(
                    "a workload or unit named {n:?} exists; `cup rm {n}` first or pick another name"
                ));
            }
            n
        }
        None => (1..)
            .map(|i| format!("run-{i}"))
            .find(|n| !taken(n))
            .unwrap_or_default(),
    };
    let memory = spec.memory.unwrap_or_default();
    steelcup_proto::guest::check_rlimits(&spec.rlimits)
        .map_err(|e| ApiError::Refused(format!("--ulimit: {e}")))?;
    // With `cpus`, the VM gets at least that many, rounded up (see
    // `MicrovmSection::vcpus`).
    let vcpus = spec.vcpus.unwrap_or(1);
    if !(1..=32).contains(&vcpus) {
        return refused(format!("{vcpus} vCPUs: 1 to 32"));
    }
    if memory.mib() < 16 || memory.mib() > steelcup_vmm::vstate::memory::MAX_MIB {
        return refused(format!("memory {}MiB: 16 MiB to 256 GiB", memory.mib()));
    }
    // Guest memory is taken as the guest touches it; more than the machine
    // has would end in the host's OOM killer, not a clear answer now.
    if let Some(host) = host_memory_mib().filter(|h| memory.mib() > *h) {
        return refused(format!(
            "memory {}MiB: this machine has {host} MiB",
            memory.mib()
        ));
    }
    let network = spec.network.unwrap_or_default();
    let ports = spec.ports;
    let section = MicrovmSection {
        image: Some(spec.image),
        cmd: spec.cmd,
        env: spec.env,
        vcpus,
        memory,
        restart: spec.restart,
        kernel: None,
        initramfs: None,
        root: None,
        volumes: spec.volumes.into_iter().map(named_volume).collect(),
        network,
        ports,
        network_scope: Vec::new(),
        aliases: Vec::new(),
        memory_backing: Default::default(),
        huge_pages: false,
        rlimits: spec.rlimits,
        replicas: 1,
        health: None,
        labels: spec.labels,
        entrypoint: spec.entrypoint,
        workdir: spec.workdir,
        user: spec.user,
        hostname: spec.hostname,
        read_only: spec.read_only,
        extra_hosts: spec.extra_hosts,
        cpu_max: spec.cpus,
        max_restarts: spec.max_restarts,
        ..Default::default()
    };
    section.check_process().map_err(ApiError::Refused)?;
    units::check_labels(&section.labels).map_err(|e| ApiError::Refused(format!("--label: {e}")))?;
    section
        .check_network()
        .map_err(|e| ApiError::Refused(e.replace("ports:", "-p:")))?;
    port_clash(workloads, units, &name, &section.ports)
        .map_err(|e| ApiError::Refused(e.to_string()))?;
    for p in &section.ports {
        crate::net::host_port_free(p).map_err(|e| ApiError::Refused(e.to_string()))?;
    }
    let used: std::collections::BTreeSet<u32> = workloads.values().map(|w| w.cid).collect();
    let cid = (3..).find(|c| !used.contains(c)).unwrap_or(3);
    if spec.rm && spec.restart != Restart::No {
        return refused(
            "--rm and --restart cannot go together (a workload that restarts never ends)".into(),
        );
    }
    let mut w = Workload::new(section, cid, now);
    w.remove_when_done = spec.rm;
    w.attach = spec.attach;
    w.tty = spec.tty;
    Ok((name, w))
}

/// The machine's memory (`MemTotal`), in MiB.
fn host_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib >> 10)
}

/// The name the store knows an image by: as given (a digest, an
/// `oci-archive:` source, a full reference), else the registry reference
/// spelled out as pulls and tags keep it (`mybox:1` is
/// `docker.io/library/mybox:1`).
pub(super) fn store_name(store: &crate::image::store::Store, name: &str) -> String {
    if store.resolve(name).is_ok() {
        return name.to_string();
    }
    crate::image::source::Source::parse(name)
        .map(|s| s.name(name))
        .unwrap_or_else(|_| name.to_string())
}

/// The image store's actions, answered at once.
pub(super) fn image_action(opts: &Options, action: Action) -> Result<Reply, ApiError> {
    let store = crate::image::store::Store::open(&opts.state_dir)
        .map_err(|e| ApiError::Refused(e.to_string()))?;
    let err = |e: crate::image::store::StoreError| ApiError::Refused(steelcup_sys::error_chain(&e));
    match action {
        Action::Images => Ok(Reply::Images(
            store
                .list()
                .map_err(err)?
                .into_iter()
                .map(|i| vmm1::ImageInfo {
                    name: i.name,
                    digest: i.digest,
                    size: i.size,
                    rootfs: i.rootfs,
                })
                .collect(),
        )),
        Action::RemoveImage(name) => match store.untag(&store_name(&store, &name)).map_err(err)? {
            true => Ok(Reply::Done),
            false => Err(ApiError::Refused(format!(
                "no image named {name:?}; see `cup images`"
            ))),
        },
        Action::InspectImage(name) => {
            let d = store.resolve(&store_name(&store, &name)).map_err(|_| {
                ApiError::Refused(format!("no image named {name:?}; see `cup images`"))
            })?;
            let img = store.image(&d).map_err(err)?;
            let refs = store.refs().map_err(err)?;
            let names: Vec<&String> = refs
                .iter()
                .filter(|(_, v)| **v == d.to_string())
                .map(|(k, _)| k)
                .collect();
            let c = img.config.config();
            let size: u64 = img.manifest.layers().iter().map(|l| l.size()).sum();
            let v = serde_json::json!({
                "Id": img.config_digest.to_string(),
                "RepoTags": names,
                "RepoDigests": [d.to_string()],
                "Created": img.config.created(),
                "Architecture": img.config.architecture().to_string(),
                "Os": img.config.os().to_string(),
                "Size": size,
                "Config": {
                    "Env": c.as_ref().and_then(|c| c.env().clone()),
                    "Cmd": c.as_ref().and_then(|c| c.cmd().clone()),
                    "Entrypoint": c.as_ref().and_then(|c| c.entrypoint().clone()),
                    "WorkingDir": c.as_ref().and_then(|c| c.working_dir().clone()),
                    "User": c.as_ref().and_then(|c| c.user().clone()),
                    "ExposedPorts": c.as_ref().and_then(|c| c.exposed_ports().clone()),
                    "Labels": c.as_ref().and_then(|c| c.labels().clone()),
                },
                "RootFS": {
                    "Type": "layers",
                    "Layers": img.config.rootfs().diff_ids(),
                },
                "RootImage": store.rootfs_path(&img).display().to_string(),
                "RootImageBuilt": store.rootfs_path(&img).is_file(),
            });
            Ok(Reply::Text(
                serde_json::to_string_pretty(&v).unwrap_or_default(),
            ))
        }
        Action::TagImage(source, target) => {
            let d = store.resolve(&store_name(&store, &source)).map_err(|_| {
                ApiError::Refused(format!("no image named {source:?}; see `cup images`"))
            })?;
            let name = match crate::image::source::Source::parse(&target) {
                Ok(s @ crate::image::source::Source::Registry { .. }) => s.name(&target),
                Ok(_) => {
                    return Err(ApiError::Refused(format!(
                        "{target:?}: a tag is a registry reference (REPO[:TAG]), not a file or directory"
                    )))
                }
                Err(e) => return Err(ApiError::Refused(e.to_string())),
            };
            store.tag(&name, &d).map_err(err)?;
            tracing::info!("image {source}: tagged {name}");
            Ok(Reply::Text(name))
        }
        Action::Prune => {
            let r = store.gc().map_err(err)?;
            Ok(Reply::Text(format!(
                "removed {} blobs, {} root images, {} temporary files ({} bytes)",
                r.blobs, r.rootfs, r.tmp, r.bytes
            )))
        }
        other => Err(ApiError::Refused(format!("{other:?}: not an image action"))),
    }
}

/// Keeps credentials the registry took (`cup login`).
pub(super) fn keep_login(
    core: &mut Daemon,
    registry: String,
    user: &str,
    password: &str,
) -> Result<Reply, ApiError> {
    core.backend
        .opts
        .logins
        .set(&registry, user, password)
        .map_err(|e| ApiError::Refused(format!("keeping the login: {e}")))?;
    tracing::info!("registry {registry}: logged in as {user}; its pulls use it");
    Ok(Reply::Text(registry))
}

/// Executes an action that is answered at once.
pub(super) fn execute_now(core: &mut Daemon, action: Action) -> Result<Reply, ApiError> {
    let running = |core: &Daemon, name: &str| match core.workloads.get(name) {
        None => Err(ApiError::NoSuchVm(name.to_string())),
        Some(w) if w.pid.is_none() => Err(ApiError::Refused(format!(
            "workload {name:?} is not running"
        ))),
        Some(_) => Ok(()),
    };
    let pause = matches!(action, Action::Pause(_));
    match action {
        Action::List => Ok(Reply::Vms(
            core.workloads
                .iter()
                .map(|(name, w)| VmInfo {
                    name: name.clone(),
                    state: w.state().as_str().into(),
                    health: w.health_name().into(),
                    unit: w.unit.clone().unwrap_or_default(),
                    last_outcome: w.last_outcome.text.clone(),
                    exit_code: w.last_outcome.exit_code,
                    pid: w.pid.unwrap_or(0) as u32,
                    runs: w.runs as u32,
                    vcpus: u32::from(w.spec.vcpus()),
                    memory_mib: w.spec.memory.mib() as u32,
                    image: w.spec.image.clone().unwrap_or_default(),
                    labels: w.spec.labels.clone(),
                    address: core
                        .backend
                        .address_of(name)
                        .map(|a| a.to_string())
                        .unwrap_or_default(),
                })
                .collect(),
        )),
        Action::Rename(name, to) => {
            let taken = core.workloads.contains_key(&to) || core.units.contains_key(&to);
            match core.workloads.get(&name) {
                None => Err(ApiError::NoSuchVm(name)),
                Some(w) if w.unit.is_some() => Err(ApiError::Refused(format!(
                    "workload {name:?} is its unit's; a unit's workloads are named by its unit file"
                ))),
                Some(w) if w.state() != WorkloadState::Ended => Err(ApiError::Refused(format!(
                    "workload {name:?} is {}; stop it first (a running microVM's vsock socket and cgroup carry its name)",
                    w.state().as_str()
                ))),
                Some(_) if !units::valid_name(&to) => Err(ApiError::Refused(format!(
                    "name {to:?}: lowercase letters, digits, '.', '_', '-', at most 64"
                ))),
                Some(_) if taken => Err(ApiError::Refused(format!(
                    "a workload or unit named {to:?} exists"
                ))),
                Some(_) => {
                    let w = core.workloads.remove(&name).expect("looked up above");
                    core.workloads.insert(to.clone(), w);
                    // Its lines first: forgetting the old name drops them.
                    core.backend.opts.logs.rename(&name, &to);
                    core.backend.forgotten(&name);
                    runs::rename(&core.backend.opts.state_dir, &name, &to);
                    tracing::info!("workload {name}: renamed {to}");
                    Ok(Reply::Done)
                }
            }
        }
        Action::Logout(registry) => {
            let registry =
                crate::image::registries::login_registry(&registry).map_err(ApiError::Refused)?;
            let had = core
                .backend
                .opts
                .logins
                .remove(&registry)
                .map_err(|e| ApiError::Refused(format!("forgetting the login: {e}")))?;
            if had {
                tracing::info!("registry {registry}: logged out");
            }
            Ok(Reply::Text(if had { registry } else { String::new() }))
        }
        Action::Volumes => Ok(Reply::Volumes(list_volumes(
            &core.backend.opts.state_dir,
            &core.workloads,
        ))),
        Action::CreateVolume(name, size) => {
            create_volume(&core.backend.opts.state_dir, &name, size).map(Reply::Text)
        }
        Action::RemoveVolume(name) => {
            remove_volume(&core.backend.opts.state_dir, &core.workloads, &name).map(|_| Reply::Done)
        }
        Action::PruneVolumes => Ok(Reply::Text(
            prune_volumes(&core.backend.opts.state_dir, &core.workloads)
                .into_iter()
                .map(|n| n + "\n")
                .collect(),
        )),
        Action::Stats => {
            let backend = &mut core.backend;
            Ok(Reply::Stats(
                core.workloads
                    .iter()
                    .filter_map(|(name, w)| {
                        let cgroup = (backend.opts.cgroup_root.as_ref())
                            .map(|r| r.join(name))
                            .filter(|c| c.exists());
                        let mut s = stats::read(
                            name,
                            w.pid?,
                            cgroup.as_deref(),
                            backend.taps.get(name).map(String::as_str),
                            w.spec.memory.0,
                        );
                        // The disks' own counts, where the worker answers.
                        if let Some(c) = backend.controls.get_mut(name).and_then(|c| c.counters()) {
                            (s.block_read, s.block_write) =
                                (c.block_read_bytes, c.block_write_bytes);
                            (s.block_reads, s.block_writes) = (c.block_reads, c.block_writes);
                            (s.exits_io, s.exits_mmio, s.exits_other) =
                                (c.exits_io, c.exits_mmio, c.exits_other);
                            s.boot_usec = c.boot_ns / 1000;
                        }
                        Some(s)
                    })
                    .collect(),
            ))
        }
        Action::Cron => Ok(Reply::Cron(core.cron_info())),
        Action::Counters => {
            let (ready, booting) = core.pool.counts();
            let c = &core.counters;
            Ok(Reply::Counters(Box::new(vmm1::VmmdCounters {
                pool_hits: c.pool_hits,
                pool_misses: c.pool_misses,
                pool_ready: ready as u32,
                pool_booting: booting as u32,
                pulls: crate::image::source::PULLS.totals(),
                store_bytes: crate::image::store::Store::open(&core.backend.opts.state_dir)
                    .map(|s| s.disk_bytes())
                    .unwrap_or(0),
                outcomes: c
                    .outcomes
                    .iter()
                    .map(|((n, k), v)| (n.clone(), k.clone(), *v))
                    .collect(),
                log_bytes_dropped: core
                    .backend
                    .opts
                    .logs
                    .dropped_bytes()
                    .iter()
                    .map(|(_, b)| b)
                    .sum(),
            })))
        }
        Action::Pause(name) | Action::Resume(name) => {
            running(core, &name)?;
            let (command, done) = if pause {
                (WorkerCommand::Pause {}, "paused")
            } else {
                (WorkerCommand::Resume {}, "resumed")
            };
            core.backend
                .control(&name, &command)
                .map_err(|e| ApiError::Refused(steelcup_sys::error_chain(&e)))?;
            if let Some(w) = core.workloads.get_mut(&name) {
                w.paused = pause;
            }
            tracing::info!("workload {name}: {done}");
            Ok(Reply::Done)
        }
        Action::Start(name) => {
            let w = core
                .workloads
                .get_mut(&name)
                .ok_or_else(|| ApiError::NoSuchVm(name.clone()))?;
            if w.pid.is_some() {
                return Err(ApiError::Refused(format!(
                    "workload {name:?} is already running"
                )));
            }
            w.restart_at = Some(Instant::now());
            w.backoff.reset();
            w.policy_restarts = 0;
            Ok(Reply::Done)
        }
        // Answered by `execute`.
        other => Err(ApiError::Refused(format!("{other:?}: internal error"))),
    }
}
