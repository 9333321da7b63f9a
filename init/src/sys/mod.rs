//! The only place init and vminit make raw syscalls.
//!
//! # Design
//! Each wrapper maps its call to its own [`SysError`] variant, so an error says
//! which call failed and on what. `unsafe` is confined to this module.

use nix::errno::Errno;
use nix::mount::MsFlags;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::ffi::CString;
use std::path::{Path, PathBuf};

/// Failed syscalls, one variant per call site.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("mount {fstype} on {target}")]
    Mount {
        target: PathBuf,
        fstype: String,
        #[source]
        source: Errno,
    },
    #[error("create directory {path}")]
    Mkdir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("load module {path}")]
    LoadModule {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("open module {path}")]
    OpenModule {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("set hostname {name:?}")]
    Hostname {
        name: String,
        #[source]
        source: Errno,
    },
    #[error("bring up interface {name}")]
    LinkUp {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reboot(2)")]
    Reboot(#[source] Errno),
    #[error("block signals")]
    SigMask(#[source] Errno),
    #[error("create signalfd")]
    SignalFd(#[source] Errno),
    #[error("ioperm port {port:#x}")]
    Ioperm {
        port: u16,
        #[source]
        source: std::io::Error,
    },
}

/// Mounts `fstype` at `target`, creating `target` first.
pub fn mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), SysError> {
    mkdir_p(target)?;
    nix::mount::mount(Some(source), target, Some(fstype), flags, data).map_err(|source| {
        SysError::Mount {
            target: target.to_path_buf(),
            fstype: fstype.to_string(),
            source,
        }
    })
}

/// Creates a directory and its parents.
pub fn mkdir_p(path: &Path) -> Result<(), SysError> {
    std::fs::create_dir_all(path).map_err(|source| SysError::Mkdir {
        path: path.to_path_buf(),
        source,
    })
}

/// Loads a kernel module from a file (uncompressed `.ko`). `Ok(false)` if it
/// was already loaded.
pub fn finit_module(path: &Path, params: &str) -> Result<bool, SysError> {
    let file = std::fs::File::open(path).map_err(|source| SysError::OpenModule {
        path: path.to_path_buf(),
        source,
    })?;
    let params = CString::new(params).unwrap_or_default();
    match nix::kmod::finit_module(&file, &params, nix::kmod::ModuleInitFlags::empty()) {
        Ok(()) => Ok(true),
        Err(Errno::EEXIST) => Ok(false),
        Err(source) => Err(SysError::LoadModule {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Sets the hostname.
pub fn set_hostname(name: &str) -> Result<(), SysError> {
    nix::unistd::sethostname(name).map_err(|source| SysError::Hostname {
        name: name.to_string(),
        source,
    })
}

/// Brings a network interface up (`ip link set NAME up`).
pub fn link_up(name: &str) -> Result<(), SysError> {
    let err = |source| SysError::LinkUp {
        name: name.to_string(),
        source,
    };
    // SAFETY: socket(2) with constant arguments; the returned descriptor is
    // checked and owned by `fd` below, which closes it.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh, valid descriptor that nothing else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&fd);
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return Err(err(std::io::Error::from(std::io::ErrorKind::InvalidInput)));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the interface named in `req` and writes only
    // `req.ifr_ifru`; `req` is a valid, NUL-terminated ifreq that outlives the call.
    if unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: after SIOCGIFFLAGS the flags member of the union is initialised.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    // SAFETY: SIOCSIFFLAGS only reads `req`, a valid ifreq as above.
    if unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// How to leave: power off, reboot, or halt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    PowerOff,
    Reboot,
}

/// Syncs the disks and asks the kernel to power off or reboot. Returns only on failure.
pub fn power(action: PowerAction) -> SysError {
    nix::unistd::sync();
    let mode = match action {
        PowerAction::PowerOff => nix::sys::reboot::RebootMode::RB_POWER_OFF,
        PowerAction::Reboot => nix::sys::reboot::RebootMode::RB_AUTOBOOT,
    };
    match nix::sys::reboot::reboot(mode) {
        Err(e) => SysError::Reboot(e),
        Ok(never) => match never {},
    }
}

/// Makes ctrl-alt-del send SIGINT to PID 1 instead of rebooting at once.
pub fn disable_ctrl_alt_del() -> Result<(), SysError> {
    nix::sys::reboot::set_cad_enabled(false).map_err(SysError::Reboot)
}

/// Reaps every child that has exited, without blocking: `waitpid(-1, WNOHANG)`
/// until it returns nothing.
pub fn reap() -> Vec<(Pid, WaitStatus)> {
    let mut out = Vec::new();
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return out,
            Ok(status) => {
                if let Some(pid) = status.pid() {
                    out.push((pid, status));
                }
            }
        }
    }
}

/// Blocks `signals` in this thread (and threads and children spawned after)
/// and returns a signalfd that reads them.
pub fn signalfd(
    signals: &[nix::sys::signal::Signal],
) -> Result<nix::sys::signalfd::SignalFd, SysError> {
    let mut set = nix::sys::signal::SigSet::empty();
    for s in signals {
        set.add(*s);
    }
    set.thread_block().map_err(SysError::SigMask)?;
    nix::sys::signalfd::SignalFd::with_flags(
        &set,
        nix::sys::signalfd::SfdFlags::SFD_CLOEXEC | nix::sys::signalfd::SfdFlags::SFD_NONBLOCK,
    )
    .map_err(SysError::SignalFd)
}

/// Writes a 32-bit value to an I/O port (guest side: vminit's status report).
pub fn outl(port: u16, value: u32) -> Result<(), SysError> {
    // SAFETY: ioperm(2) only changes this process's I/O permission bitmap.
    if unsafe { libc::ioperm(libc::c_ulong::from(port), 4, 1) } != 0 {
        return Err(SysError::Ioperm {
            port,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: ioperm above granted this process ports `port..port+4`; an `out`
    // to them traps to the VMM and touches no memory of this process.
    unsafe {
        std::arch::asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack));
    }
    Ok(())
}

/// True when this process is PID 1.
pub fn is_pid1() -> bool {
    std::process::id() == 1
}

/// Unblocks every signal in the child between fork and exec. init and vmmd
/// block the signals they read through a signalfd, and a child inherits the
/// mask (std's `Command` does not reset it): without this a service would
/// never see its SIGTERM.
pub fn reset_signal_mask(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: runs in the child between fork and exec and only calls
    // sigemptyset and sigprocmask on a stack-local set, both
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            if libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
}

/// Prepares `cmd` to run with an empty signal mask, in a cgroup and with no
/// supplementary groups: the child writes `0` to `procs` (its cgroup's
/// `cgroup.procs`) between fork and exec, so it is inside its cgroup before
/// it can fork.
pub fn spawn_in(cmd: &mut std::process::Command, procs: Option<&Path>, drop_groups: bool) {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::CommandExt;
    reset_signal_mask(cmd);
    let procs = procs.and_then(|p| CString::new(p.as_os_str().as_bytes()).ok());
    // SAFETY: the closure runs in the child between fork and exec. It only
    // makes async-signal-safe syscalls (open, write, close, setgroups) on data
    // prepared before the fork (`procs` is moved in, not allocated here).
    unsafe {
        cmd.pre_exec(move || {
            if let Some(path) = &procs {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if n != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if drop_groups && libc::setgroups(0, std::ptr::null()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
}

/// The `sd_notify` socket: a datagram socket that receives `READY=1` from
/// services, with the sender's pid from SCM_CREDENTIALS.
#[derive(Debug)]
pub struct NotifySocket {
    sock: std::os::unix::net::UnixDatagram,
    pub path: PathBuf,
}

impl NotifySocket {
    pub fn bind(path: &Path) -> std::io::Result<Self> {
        let _ = std::fs::remove_file(path);
        let sock = std::os::unix::net::UnixDatagram::bind(path)?;
        sock.set_nonblocking(true)?;
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::PassCred, &true)
            .map_err(std::io::Error::from)?;
        Ok(NotifySocket {
            sock,
            path: path.to_path_buf(),
        })
    }

    /// One pending message and its sender's pid, if any.
    pub fn recv(&self) -> Option<(i32, String)> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixCredentials};
        use std::os::fd::AsRawFd;
        let mut buf = [0u8; 4096];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut cmsg = nix::cmsg_space!(UnixCredentials);
        let msg = recvmsg::<()>(
            self.sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .ok()?;
        let mut pid = 0;
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmCredentials(cred) = c {
                    pid = cred.pid();
                }
            }
        }
        let n = msg.bytes;
        Some((pid, String::from_utf8_lossy(&buf[..n]).into_owned()))
    }
}

impl std::os::fd::AsFd for NotifySocket {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

/// Looks a user up in `/etc/passwd` (or takes a number): (uid, primary gid).
/// Parsed directly: static binaries cannot use NSS.
pub fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    if let Ok(uid) = name.parse::<u32>() {
        let gid = passwd
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.len() > 3 && f[2] == name)
            .and_then(|f| f[3].parse().ok())
            .unwrap_or(uid);
        return Some((uid, gid));
    }
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[0] == name)
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
}

/// Looks a group up in `/etc/group` (or takes a number).
pub fn lookup_group(name: &str) -> Option<u32> {
    if let Ok(gid) = name.parse::<u32>() {
        return Some(gid);
    }
    std::fs::read_to_string("/etc/group")
        .unwrap_or_default()
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[0] == name)
        .and_then(|f| f[2].parse().ok())
}
