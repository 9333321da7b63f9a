//! The worker gives up every capability once its jail is built.
//!
//! # Design
//! vmmd starts workers as root, and a worker needs privilege only to enter
//! its mount namespace. Everything else it touches is a descriptor it
//! already holds (KVM, the guest memory, the disks and the tap vmmd opened)
//! or a socket in its own vsock directory, owned by its own uid. So right
//! after the jail, still single threaded (capabilities are per thread, and
//! the vCPU and device threads inherit the caller's), it empties its
//! bounding set (where it may) and its ambient, inheritable, permitted and
//! effective sets. A guest that took over the worker gets a process with no
//! CAP_NET_ADMIN, CAP_SYS_ADMIN or any other capability, on top of the
//! seccomp filter.

/// `CAP_SETPCAP` (linux/capability.h).
const CAP_SETPCAP: u32 = 8;

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct Header {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Failed capability calls, one variant per call.
#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    #[error("clear the ambient capabilities")]
    Ambient(#[source] std::io::Error),
    #[error("drop capability {cap} from the bounding set")]
    Bounding {
        cap: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("capset(2)")]
    Capset(#[source] std::io::Error),
    #[error("capget(2)")]
    Capget(#[source] std::io::Error),
}

/// Drops every capability of the calling thread; see the module docs.
/// Call it while the process has one thread.
pub fn drop_all() -> Result<(), CapsError> {
    // SAFETY: prctl with integer arguments only.
    if unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    } != 0
    {
        return Err(CapsError::Ambient(std::io::Error::last_os_error()));
    }
    // The bounding set can be shrunk only with CAP_SETPCAP (a worker run
    // by hand as another user has nothing to drop there); it stops at the
    // first capability number the kernel does not know (EINVAL).
    if effective()? & (1 << CAP_SETPCAP) != 0 {
        for cap in 0..64u32 {
            // SAFETY: prctl with integer arguments only.
            let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
            if r != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINVAL) {
                    break;
                }
                return Err(CapsError::Bounding { cap, source: e });
            }
        }
    }
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let data = [Data::default(); 2];
    // SAFETY: `header` and `data` are valid for the v3 layout the header
    // names (one header, two data words); capset only reads them.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    if r != 0 {
        return Err(CapsError::Capset(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The calling thread's effective set (its first 64 capabilities).
pub fn effective() -> Result<u64, CapsError> {
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: `header` and `data` are valid for the v3 layout (one header,
    // two data words), which capget fills.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if r != 0 {
        return Err(CapsError::Capget(std::io::Error::last_os_error()));
    }
    Ok(u64::from(data[0].effective) | (u64::from(data[1].effective) << 32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_that_drops_its_capabilities_has_none() {
        // In a child process, so the test runner keeps its own.
        // SAFETY: the child only makes syscalls and exits.
        match unsafe { libc::fork() } {
            0 => {
                let ok = drop_all().is_ok() && effective().ok() == Some(0);
                let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
                let cap_eff_zero = status.lines().any(|l| {
                    l.starts_with("CapEff:") && l.trim_end().ends_with("0000000000000000")
                });
                // SAFETY: leaves the forked child at once.
                unsafe { libc::_exit(if ok && cap_eff_zero { 0 } else { 1 }) }
            }
            pid => {
                assert!(pid > 0, "fork");
                let mut status = 0;
                // SAFETY: waits for the child just forked.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
            }
        }
    }
}
