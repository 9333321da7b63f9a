//! The worker's own mount namespace: once the VM is built, the worker
//! needs no file but its VM's vsock directory, so that is all it keeps.
//!
//! # Design
//! By the time the worker jails itself, everything it opens is open: the
//! guest kernel and initramfs are in guest memory, disks and `/dev/kvm` and
//! `/dev/urandom` are descriptors, the vsock listener is bound. What it
//! still reaches by path is `{uds}_PORT`, the host listeners a guest
//! connects to, beside its vsock socket. So the worker, still single
//! threaded (a mount namespace is per thread until the threads exist):
//! unshares its mount namespace, makes every mount private (nothing
//! propagates back to the host), mounts an empty tmpfs, bind-mounts the
//! vsock directory into it at the same path, makes the tmpfs read-only,
//! `pivot_root`s into it and detaches the old root (on an initramfs root,
//! which cannot be pivoted, it moves the tmpfs over `/` and chroots, as
//! `switch_root` does). In a chroot, whose `/` is no mount point, mounts
//! cannot be kept from propagating to the host, and there is no jail (an
//! error that says so). A worker compromised through its device models
//! sees a read-only tree holding one directory.

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::path::{Path, PathBuf};

/// Why the jail could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("{step}")]
pub struct JailError {
    step: String,
    #[source]
    source: nix::Error,
}

impl JailError {
    /// Where vmmd runs gives no way to a jail: no mount namespaces (no
    /// CAP_SYS_ADMIN, an unprivileged container), or a root that is no
    /// mount point (a chroot), so mounts could not be kept from
    /// propagating back to the host.
    pub fn is_unsupported(&self) -> bool {
        (self.step.starts_with("unshare") && self.source == nix::Error::EPERM)
            || (self.step.starts_with("make every mount private")
                && self.source == nix::Error::EINVAL)
    }
}

fn step(what: impl Into<String>) -> impl FnOnce(nix::Error) -> JailError {
    let step = what.into();
    move |source| JailError { step, source }
}

/// Moves the calling (single-threaded) process into a new mount namespace
/// whose root holds only `keep` (a directory, bind-mounted read-write at
/// its own path). `scratch` is an existing empty directory to build the
/// new root on.
pub fn enter(scratch: &Path, keep: &Path) -> Result<(), JailError> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(step("unshare the mount namespace"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(step("make every mount private"))?;
    mount(
        Some("steelcup-jail"),
        scratch,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("size=64k,mode=0755"),
    )
    .map_err(step(format!("mount a tmpfs on {}", scratch.display())))?;
    let inside = scratch.join(keep.strip_prefix("/").unwrap_or(keep));
    std::fs::create_dir_all(&inside).map_err(|e| JailError {
        step: format!("create {}", inside.display()),
        source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    })?;
    mount(
        Some(keep),
        &inside,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(step(format!("bind {} into the jail", keep.display())))?;
    let old = scratch.join(".old-root");
    std::fs::create_dir(&old).map_err(|e| JailError {
        step: format!("create {}", old.display()),
        source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    })?;
    match nix::unistd::pivot_root(scratch, &old) {
        Ok(()) => {
            nix::unistd::chdir("/").map_err(step("chdir to the new root"))?;
            umount2("/.old-root", MntFlags::MNT_DETACH).map_err(step("detach the old root"))?;
            let _ = std::fs::remove_dir("/.old-root");
        }
        // The root is the initramfs (rootfs), which cannot be pivoted away:
        // move the new root over it and chroot, as switch_root does. The
        // old root stays underneath, unreachable by any path, and the
        // worker's seccomp filter allows neither chroot nor mount.
        Err(nix::Error::EINVAL) => {
            let _ = std::fs::remove_dir(&old);
            nix::unistd::chdir(scratch).map_err(step("chdir to the new root"))?;
            mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
                .map_err(step("move the jail over the initramfs root"))?;
            nix::unistd::chroot(".").map_err(step("chroot into the jail"))?;
            nix::unistd::chdir("/").map_err(step("chdir to the new root"))?;
        }
        Err(e) => return Err(step("pivot_root into the jail")(e)),
    }
    // Read-only from here on; the kept directory is its own mount and
    // stays writable.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(step("make the jail's root read-only"))?;
    Ok(())
}

/// Where vmmd has the workers build their roots: `RUN_DIR/jail`.
pub fn scratch_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("jail")
}
