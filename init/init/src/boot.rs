//! The host's boot, as a sequence of named phases.
//!
//! # Design
//! Each phase logs its start and its duration; a phase that fails is logged
//! and the boot goes on where it can (a machine without networking still
//! runs its local units). The phases: `early-mounts`, `kmsg-logging`,
//! `modules`, `state`, `provision`, `hostname`, `entropy`, `network`
//! (`provision-url`), `units`.
//!
//! # Limitations
//! kmsg logging, entropy seeding, DHCP and coldplug of drivers by modalias
//! are still to come.

use crate::modules;
use nix::mount::MsFlags;
use std::path::Path;
use std::time::Instant;
use steelcup_sys::{self as sys, SysError};

/// Where the boot configuration lives in the image.
pub const ETC: &str = "/etc/steelcup";

/// Runs `f` as the named phase, logging start and duration.
pub fn phase<T>(name: &str, f: impl FnOnce() -> T) -> T {
    tracing::info!("phase {name}: start");
    let t0 = Instant::now();
    let out = f();
    let took = t0.elapsed();
    steelcup_os::host::record_phase(name, took);
    tracing::info!("phase {name}: done in {:.1}ms", took.as_secs_f64() * 1000.0);
    out
}

/// `early-mounts`: the pseudo filesystems every process expects.
pub fn early_mounts(container: bool) -> Result<(), SysError> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let mounts: &[(&str, &str, &str, MsFlags, Option<&str>)] = &[
        ("proc", "/proc", "proc", nosuid, None),
        ("sysfs", "/sys", "sysfs", nosuid, None),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("gid=5,mode=0620,ptmxmode=0666"),
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "cgroup2",
            "/sys/fs/cgroup",
            "cgroup2",
            nosuid,
            Some("nsdelegate"),
        ),
    ];
    let mounted = mount_points();
    for (src, target, fstype, flags, data) in mounts {
        // A container's /run and /tmp are its own (a tmpfs over them would
        // hide what the runtime put there).
        if container && matches!(*target, "/run" | "/tmp") {
            continue;
        }
        // A container runtime (or whoever made this PID namespace) may have
        // mounted it already: that one stays.
        if mounted.iter().any(|m| m == target) {
            tracing::debug!("early-mounts: {target} is mounted already");
            continue;
        }
        match sys::mount(src, Path::new(target), fstype, *flags, *data) {
            Ok(()) => {}
            // In a container, what cannot be mounted is the runtime's call.
            Err(e) if container => tracing::warn!("early-mounts: {}", error_chain(&e)),
            Err(e) => return Err(e),
        }
    }
    // Let child cgroups use every controller the kernel offers.
    if let Ok(ctrls) = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers") {
        let enable: String = ctrls.split_whitespace().map(|c| format!("+{c} ")).collect();
        if let Err(e) = std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", enable.trim()) {
            tracing::warn!("cgroup2: cannot enable controllers: {e}");
        }
    }
    Ok(())
}

/// The mount points of this mount namespace (none when /proc is not
/// there yet).
fn mount_points() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(String::from))
        .collect()
}

/// True when this PID 1 is a container's (or a PID namespace's), not the
/// machine's: `container=` in the environment (the convention container
/// runtimes and systemd share), or `--container`. Then only the phases
/// that belong to a container run: no kernel log, modules, state
/// partition, machine config, entropy, host network or power button.
pub fn in_container(flag: bool) -> bool {
    flag || std::env::var_os("container").is_some_and(|v| !v.is_empty())
}

/// The cgroup that holds one cgroup per unit, `/sys/fs/cgroup/steelcup`,
/// with every controller enabled for the units.
pub fn unit_cgroups() -> Option<std::path::PathBuf> {
    if !Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        tracing::warn!("no cgroup v2 at /sys/fs/cgroup; unit limits are off");
        return None;
    }
    let dir = Path::new("/sys/fs/cgroup/steelcup");
    if let Err(e) = std::fs::create_dir_all(dir) {
        tracing::warn!("cgroup {}: {e}; unit limits are off", dir.display());
        return None;
    }
    if let Ok(ctrls) = std::fs::read_to_string(dir.join("cgroup.controllers")) {
        let enable: Vec<String> = ctrls.split_whitespace().map(|c| format!("+{c}")).collect();
        if let Err(e) = std::fs::write(dir.join("cgroup.subtree_control"), enable.join(" ")) {
            tracing::warn!("cgroup {}: enable controllers: {e}", dir.display());
        }
    }
    Some(dir.to_path_buf())
}

/// `hostname`: from `/etc/steelcup/hostname`, else `steelcup`.
pub fn hostname() -> Result<(), SysError> {
    let name = std::fs::read_to_string(Path::new(ETC).join("hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "steelcup".into());
    sys::set_hostname(&name)?;
    tracing::info!("hostname {name}");
    Ok(())
}

/// `modules`: the KVM module for this CPU, then those listed in
/// `/etc/steelcup/modules` (one name per line, `#` comments).
pub fn load_modules() {
    let dir = modules::running_kernel_dir();
    let db = match modules::read_db(&dir) {
        Ok(db) => db,
        Err(e) => {
            tracing::error!("modules: {}", error_chain(&e));
            return;
        }
    };
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let mut wanted: Vec<String> = Vec::new();
    match modules::kvm_module_for(&cpuinfo) {
        Some(m) => wanted.push(m.to_string()),
        None => tracing::warn!(
            "modules: this CPU has neither vmx nor svm; KVM is not available and microVMs cannot run"
        ),
    }
    if let Ok(list) = std::fs::read_to_string(Path::new(ETC).join("modules")) {
        wanted.extend(
            list.lines()
                .map(|l| l.split('#').next().unwrap_or("").trim())
                .filter(|l| !l.is_empty())
                .map(String::from),
        );
    }
    for m in wanted {
        match modules::load(&dir, &db, &m) {
            Ok(loaded) if loaded.is_empty() => tracing::info!("module {m}: already present"),
            Ok(loaded) => tracing::info!("module {m}: loaded {}", loaded.join(", ")),
            Err(e) => tracing::error!("module {m}: {}", error_chain(&e)),
        }
    }
    coldplug(&dir, &db);
}

/// Loads the drivers for the devices present (see [`modules::coldplug_matches`]).
fn coldplug(dir: &Path, db: &modules::ModuleDb) {
    let aliases = match std::fs::read_to_string(dir.join("modules.alias")) {
        Ok(t) => modules::parse_aliases(&t),
        Err(e) => {
            tracing::warn!("coldplug: {}/modules.alias: {e}", dir.display());
            return;
        }
    };
    // A bus driver (virtio_pci, say) makes the devices behind it appear, with
    // their own modaliases: scan again until a round loads nothing new.
    let mut wanted = std::collections::BTreeSet::new();
    let mut loaded = Vec::new();
    let mut devices = Vec::new();
    for _round in 0..4 {
        devices = modules::read_modaliases(Path::new("/sys/devices"));
        let now = modules::coldplug_matches(&aliases, &devices);
        let new: Vec<String> = now.difference(&wanted).cloned().collect();
        if new.is_empty() {
            break;
        }
        for m in &new {
            match modules::load(dir, db, m) {
                Ok(l) => loaded.extend(l),
                Err(e) => tracing::error!("coldplug: module {m}: {}", error_chain(&e)),
            }
        }
        wanted.extend(new);
        // Let the bus probe the devices it just found.
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    tracing::info!(
        "coldplug: {} devices, drivers matched: {}; loaded: {}",
        devices.len(),
        if wanted.is_empty() {
            "none".to_string()
        } else {
            wanted.iter().cloned().collect::<Vec<_>>().join(", ")
        },
        if loaded.is_empty() {
            "none".to_string()
        } else {
            loaded.join(", ")
        }
    );
}

/// `entropy`: mixes a saved seed into the kernel's pool (when /var keeps
/// one) and reports what the kernel has; RDRAND and virtio-rng feed it too.
pub fn entropy() {
    let seed = Path::new("/var/lib/steelcup/random-seed");
    match std::fs::read(seed) {
        Ok(bytes) if !bytes.is_empty() => match std::fs::write("/dev/urandom", &bytes) {
            Ok(()) => tracing::info!("entropy: mixed {} bytes of saved seed", bytes.len()),
            Err(e) => tracing::warn!("entropy: write /dev/urandom: {e}"),
        },
        _ => tracing::info!("entropy: no saved seed"),
    }
    let avail =
        std::fs::read_to_string("/proc/sys/kernel/random/entropy_avail").unwrap_or_default();
    let rdrand = std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| c.contains(" rdrand"))
        .unwrap_or(false);
    tracing::info!(
        "entropy: {} bits available; CPU RDRAND: {}",
        avail.trim(),
        if rdrand { "yes" } else { "no" }
    );
}

/// Saves a fresh seed for the next boot when /var is writable and kept.
pub fn save_seed() {
    let dir = Path::new("/var/lib/steelcup");
    if !dir.exists() {
        return;
    }
    let mut buf = [0u8; 512];
    let read = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf));
    if read.is_ok() {
        let _ = std::fs::write(dir.join("random-seed"), buf);
    }
}

pub use steelcup_sys::error_chain;
