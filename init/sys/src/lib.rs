//! The only place init and vminit make raw syscalls (and [`error_chain`],
//! the one way every steelcup binary prints an error with its causes).
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
    use std::os::fd::AsRawFd;
    let err = |source| SysError::LinkUp {
        name: name.to_string(),
        source,
    };
    let sock = inet_socket().map_err(err)?;
    let fd = sock.as_raw_fd();
    let mut req = ifreq_for(name).map_err(err)?;
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

/// Makes `cmd`'s child drop to `uid`, `gid` and the supplementary `groups`
/// before exec (in that order: groups and gid while still root).
pub fn run_as(cmd: &mut std::process::Command, uid: u32, gid: u32, groups: Vec<u32>) {
    use std::os::unix::process::CommandExt;
    let groups: Vec<libc::gid_t> = groups;
    // SAFETY: runs in the child between fork and exec; setgroups reads
    // `groups.len()` ids from the vector moved into the closure, which
    // lives until exec; setgid and setuid take plain integers. All three
    // are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
}

/// Makes `cmd`'s child the leader of a new session whose controlling
/// terminal is its stdin (a pty slave).
pub fn new_session_with_tty(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: runs in the child between fork and exec; setsid and the
    // TIOCSCTTY ioctl on fd 0 (already the pty slave) are
    // async-signal-safe and touch no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
}

/// Sets resource limit `resource` (a `libc::RLIMIT_*`) of this process,
/// soft and hard, to `value`; children inherit it.
pub fn set_rlimit(resource: i32, value: u64) -> std::io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: setrlimit reads one rlimit through the pointer, which points
    // at a live local of that type.
    if unsafe { libc::setrlimit(resource as libc::__rlimit_resource_t, &limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The size (rows, columns) of the terminal `tty`, if it is one.
pub fn window_size(tty: &impl std::os::fd::AsRawFd) -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize through the pointer, which
    // points at a live local of that type.
    let r = unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0).then_some((ws.ws_row, ws.ws_col))
}

/// Sets the size of the terminal `tty` (a pty master).
pub fn set_winsize(tty: &impl std::os::fd::AsRawFd, rows: u16, cols: u16) -> std::io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which points
    // at a live local of that type.
    if unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Tells the supervisor (init, or anything speaking sd_notify) that this
/// process is ready: `READY=1` to `$NOTIFY_SOCKET`, when there is one.
/// What `who` is, for the warning when it cannot be sent.
pub fn notify_ready(who: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent =
        std::os::unix::net::UnixDatagram::unbound().and_then(|s| s.send_to(b"READY=1", &path));
    if let Err(e) = sent {
        tracing::warn!(
            "cannot tell {} that {who} is ready: {e}",
            Path::new(&path).display()
        );
    }
}

/// A unit's `sd_notify` socket: a datagram socket that receives `READY=1`.
/// Each unit has its own, so the socket says whose a message is.
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
        Ok(NotifySocket {
            sock,
            path: path.to_path_buf(),
        })
    }

    /// One pending message, if any.
    pub fn recv(&self) -> Option<String> {
        let mut buf = [0u8; 4096];
        let n = self.sock.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
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

/// What [`spawn`] starts: everything prepared before the fork, so the child
/// only makes async-signal-safe syscalls.
#[derive(Debug)]
pub struct SpawnSpec {
    /// `argv[0]` is the absolute path that is executed.
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    pub cwd: CString,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// The child's cgroup's `cgroup.procs`, joined before exec.
    pub cgroup_procs: Option<CString>,
    pub stdout: std::os::fd::OwnedFd,
    pub stderr: std::os::fd::OwnedFd,
}

/// Errors preparing a spawn.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("{0:?} contains a NUL byte")]
    Nul(String),
    #[error("fork")]
    Fork(#[source] Errno),
    #[error("open /dev/null")]
    DevNull(#[source] std::io::Error),
}

/// A C string from `s`, or an error naming it.
pub fn cstring(s: impl AsRef<std::ffi::OsStr>) -> Result<CString, SpawnError> {
    use std::os::unix::ffi::OsStrExt;
    let b = s.as_ref().as_bytes();
    CString::new(b).map_err(|_| SpawnError::Nul(String::from_utf8_lossy(b).into_owned()))
}

/// Starts a service the way an init must: fork, set the child up (own
/// process group, empty signal mask, default SIGPIPE, cgroup, ids, working
/// directory, stdio), exec — and return at once, without waiting for the exec
/// as `std::process::Command` does (that wait serializes starts behind every
/// exec). If the child's setup or exec fails it writes why to its stderr (the
/// unit's log) and exits with 127, which the supervisor sees like any exit.
pub fn spawn(spec: &SpawnSpec) -> Result<Pid, SpawnError> {
    use std::os::fd::AsRawFd;
    let devnull = std::fs::File::open("/dev/null").map_err(SpawnError::DevNull)?;
    let mut argv: Vec<*const libc::c_char> = spec.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = spec.envp.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    let (null_fd, out_fd, err_fd) = (
        devnull.as_raw_fd(),
        spec.stdout.as_raw_fd(),
        spec.stderr.as_raw_fd(),
    );
    // SAFETY: fork in a multi-threaded process. The child touches only memory
    // prepared above (argv/envp pointer arrays, C strings, raw fds), which
    // stays valid because this frame is copied into the child, and calls only
    // async-signal-safe functions (setpgid, getrlimit, setrlimit,
    // sigprocmask, signal, open, write,
    // close, setgroups, setgid, setuid, chdir, dup2, execve, _exit) before
    // exec or exit. No allocation, no locks.
    match unsafe { libc::fork() } {
        -1 => Err(SpawnError::Fork(Errno::last())),
        0 => unsafe {
            // SAFETY: (the child) see above.
            child_exec(spec, &argv, &envp, null_fd, out_fd, err_fd)
        },
        pid => {
            // The child makes itself a group leader too; doing it here as
            // well closes the race where a stop signalled to the group
            // right after the fork finds no group yet and is lost.
            // SAFETY: setpgid on our own child; EACCES once it has exec'd
            // is harmless (it has done it itself by then).
            unsafe {
                libc::setpgid(pid, pid);
            }
            Ok(Pid::from_raw(pid))
        }
    }
}

/// The child's side of [`spawn`]. Never returns.
///
/// # Safety
/// Only to be called in the child right after fork, with pointers prepared
/// before the fork.
unsafe fn child_exec(
    spec: &SpawnSpec,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    null_fd: libc::c_int,
    out_fd: libc::c_int,
    err_fd: libc::c_int,
) -> ! {
    /// # Safety
    /// Child side of fork only: async-signal-safe write and _exit.
    unsafe fn fail(err_fd: libc::c_int, what: &[u8]) -> ! {
        // SAFETY: errno is thread-local and valid in the forked child.
        let errno = unsafe { *libc::__errno_location() };
        let mut digits = [0u8; 12];
        let mut n = errno.unsigned_abs();
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 || i == 0 {
                break;
            }
        }
        // The error's name from a table of our own (strerror may take a
        // lock or allocate, which a forked child of a threaded parent must
        // not), with the number for any other.
        let (name, number): (&[u8], &[u8]) = match errno_text(errno) {
            Some(text) => (text, b""),
            None => (b"errno ", &digits[i..]),
        };
        let msg: [&[u8]; 6] = [
            b"steelcup init: cannot start: ",
            what,
            b": ",
            name,
            number,
            b"\n",
        ];
        // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffers are
        // on this stack.
        unsafe {
            for part in msg {
                libc::write(err_fd, part.as_ptr().cast(), part.len());
            }
            libc::_exit(127)
        }
    }
    // SAFETY: every call below is an async-signal-safe syscall on values
    // prepared before the fork (see `spawn`).
    unsafe {
        libc::setpgid(0, 0);
        // The open-file limit init had before it raised its own.
        let nofile = CHILD_NOFILE.load(std::sync::atomic::Ordering::Relaxed);
        if nofile > 0 {
            let mut lim: libc::rlimit = std::mem::zeroed();
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                lim.rlim_cur = nofile.min(lim.rlim_max);
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            }
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        // Every disposition back to the default, whatever init inherited
        // or set: an ignored signal stays ignored across exec (the Rust
        // runtime ignores SIGPIPE; init started by hand may have SIGHUP
        // ignored, and then a service could never trap its reload signal).
        // SIGKILL and SIGSTOP refuse, as they should. The raw system call,
        // not signal(3): glibc refuses 32 and 33 (its own), which a parent
        // may still have set to ignored.
        #[repr(C)]
        struct KernelSigaction {
            handler: usize,
            flags: libc::c_ulong,
            restorer: usize,
            mask: u64,
        }
        let default = KernelSigaction {
            handler: libc::SIG_DFL,
            flags: 0,
            restorer: 0,
            mask: 0,
        };
        for sig in 1..=64 {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                &default as *const KernelSigaction,
                std::ptr::null_mut::<KernelSigaction>(),
                8usize,
            );
        }
        if libc::dup2(null_fd, 0) < 0 || libc::dup2(out_fd, 1) < 0 || libc::dup2(err_fd, 2) < 0 {
            fail(err_fd, b"stdio");
        }
        if let Some(procs) = &spec.cgroup_procs {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                fail(2, b"join cgroup");
            }
            libc::close(fd);
        }
        if (spec.uid.is_some() || spec.gid.is_some()) && libc::setgroups(0, std::ptr::null()) != 0 {
            fail(2, b"setgroups");
        }
        if let Some(gid) = spec.gid {
            if libc::setgid(gid) != 0 {
                fail(2, b"setgid");
            }
        }
        if let Some(uid) = spec.uid {
            if libc::setuid(uid) != 0 {
                fail(2, b"setuid");
            }
        }
        if libc::chdir(spec.cwd.as_ptr()) != 0 {
            fail(2, b"chdir");
        }
        libc::execve(argv[0], argv.as_ptr(), envp.as_ptr());
        fail(2, spec.argv[0].as_bytes())
    }
}

/// The name of the errors a start fails with most, as strerror words it.
fn errno_text(errno: libc::c_int) -> Option<&'static [u8]> {
    Some(match errno {
        libc::ENOENT => b"No such file or directory",
        libc::EACCES => b"Permission denied",
        libc::EPERM => b"Operation not permitted",
        libc::ENOEXEC => b"Exec format error",
        libc::ENOTDIR => b"Not a directory",
        libc::EISDIR => b"Is a directory",
        libc::ELOOP => b"Too many levels of symbolic links",
        libc::ENAMETOOLONG => b"File name too long",
        libc::E2BIG => b"Argument list too long",
        libc::ENOMEM => b"Cannot allocate memory",
        libc::ETXTBSY => b"Text file busy",
        libc::EINVAL => b"Invalid argument",
        libc::ELIBBAD => b"Accessing a corrupted shared library",
        libc::EMFILE => b"Too many open files",
        libc::EAGAIN => b"Resource temporarily unavailable",
        _ => return None,
    })
}

/// A pipe whose ends are close-on-exec (the child's end is dup2'd to its
/// stdio, which clears the flag on the copy).
pub fn pipe() -> std::io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)
}

fn ifreq_for(name: &str) -> std::io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.is_empty() || name.len() >= req.ifr_name.len() {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(req)
}

fn inet_socket() -> std::io::Result<std::os::fd::OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked and
    // owned by the returned OwnedFd.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) })
}

fn sockaddr_in(addr: std::net::Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size on Linux and
    // sockaddr is plain old data.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Errors configuring an interface, with the interface and the step.
#[derive(Debug, thiserror::Error)]
#[error("{iface}: {step}")]
pub struct NetError {
    pub iface: String,
    pub step: &'static str,
    #[source]
    pub source: std::io::Error,
}

/// One `ioctl(request, &ifreq)` on `name`, `fill` setting the request's data.
fn ifreq_ioctl(
    name: &str,
    step: &'static str,
    request: libc::Ioctl,
    fill: impl FnOnce(&mut libc::ifreq),
) -> Result<(), NetError> {
    use std::os::fd::AsRawFd;
    let err = |step, source| NetError {
        iface: name.to_string(),
        step,
        source,
    };
    let sock = inet_socket().map_err(|e| err("socket", e))?;
    let mut req = ifreq_for(name).map_err(|e| err("interface name", e))?;
    fill(&mut req);
    // SAFETY: the SIOCSIF* requests used here only read the valid ifreq `req`
    // for the duration of the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), request, &req) } < 0 {
        return Err(err(step, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Sets an interface's IPv4 address and prefix (`ip addr add ADDR/PREFIX dev NAME`).
pub fn set_ipv4(name: &str, addr: std::net::Ipv4Addr, prefix: u8) -> Result<(), NetError> {
    ifreq_ioctl(name, "set address", libc::SIOCSIFADDR, |r| {
        r.ifr_ifru.ifru_addr = sockaddr_in(addr)
    })?;
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    };
    ifreq_ioctl(name, "set netmask", libc::SIOCSIFNETMASK, |r| {
        r.ifr_ifru.ifru_netmask = sockaddr_in(std::net::Ipv4Addr::from(mask))
    })
}

/// Sets an interface's MAC address (`ip link set NAME address MAC`).
pub fn set_mac(name: &str, mac: [u8; 6]) -> Result<(), NetError> {
    ifreq_ioctl(name, "set MAC address", libc::SIOCSIFHWADDR, |r| {
        // SAFETY: sockaddr is plain old data; all-zero is a valid value.
        let mut sa: libc::sockaddr = unsafe { std::mem::zeroed() };
        sa.sa_family = libc::ARPHRD_ETHER;
        for (d, b) in sa.sa_data.iter_mut().zip(mac) {
            *d = b as libc::c_char;
        }
        r.ifr_ifru.ifru_hwaddr = sa;
    })
}

/// Sets an interface's MTU.
pub fn set_mtu(name: &str, mtu: u32) -> Result<(), NetError> {
    ifreq_ioctl(name, "set MTU", libc::SIOCSIFMTU, |r| {
        r.ifr_ifru.ifru_mtu = mtu as libc::c_int
    })
}

/// Adds the default route via `gateway` on `name` (`ip route add default via GW dev NAME`).
pub fn add_default_route(name: &str, gateway: std::net::Ipv4Addr) -> Result<(), NetError> {
    use std::os::fd::AsRawFd;
    let err = |step, source| NetError {
        iface: name.to_string(),
        step,
        source,
    };
    let sock = inet_socket().map_err(|e| err("socket", e))?;
    let dev = CString::new(name)
        .map_err(|_| err("interface name", std::io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: rtentry is plain old data; all-zero is a valid value.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr_in(std::net::Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr_in(std::net::Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr_in(gateway);
    rt.rt_flags = (libc::RTF_UP | libc::RTF_GATEWAY) as libc::c_ushort;
    rt.rt_dev = dev.as_ptr() as *mut libc::c_char;
    // SAFETY: SIOCADDRT reads `rt` and the NUL-terminated `dev` it points to;
    // both outlive the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCADDRT, &rt) } < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(err("add default route", e));
        }
    }
    Ok(())
}

/// Filesystems that hold no data to lose: left mounted at shutdown.
const PSEUDO_FS: &[&str] = &[
    "rootfs",
    "proc",
    "sysfs",
    "devtmpfs",
    "devpts",
    "tmpfs",
    "ramfs",
    "cgroup",
    "cgroup2",
    "securityfs",
    "debugfs",
    "tracefs",
    "bpf",
    "mqueue",
    "hugetlbfs",
    "pstore",
    "configfs",
    "fusectl",
    "efivarfs",
    "autofs",
    "binfmt_misc",
];

/// The mount points in `mounts` (the text of `/proc/self/mounts`) that hold
/// data, in the order to unmount them: the reverse of mounting, so a mount
/// inside another goes first.
pub fn data_mounts(mounts: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_src, target, fstype) = (f.next()?, f.next()?, f.next()?);
            if PSEUDO_FS.contains(&fstype) || target == "/" {
                return None;
            }
            // /proc/mounts escapes space, tab, newline and backslash as octal.
            let target = target
                .replace("\\040", " ")
                .replace("\\011", "\t")
                .replace("\\012", "\n")
                .replace("\\134", "\\");
            Some(PathBuf::from(target))
        })
        .collect();
    out.reverse();
    out
}

/// Unmounts every filesystem that holds data (after sync), or remounts it
/// read-only when it is busy; returns what happened, a line per mount.
pub fn unmount_all() -> Vec<String> {
    nix::unistd::sync();
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    data_mounts(&mounts)
        .into_iter()
        .map(
            |target| match nix::mount::umount2(&target, nix::mount::MntFlags::empty()) {
                Ok(()) => format!("unmounted {}", target.display()),
                Err(e) => {
                    let ro = nix::mount::mount(
                        None::<&str>,
                        &target,
                        None::<&str>,
                        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                        None::<&str>,
                    );
                    match ro {
                        Ok(()) => format!("{} busy ({e}); remounted read-only", target.display()),
                        Err(e2) => format!(
                            "{}: cannot unmount ({e}) or remount read-only ({e2})",
                            target.display()
                        ),
                    }
                }
            },
        )
        .collect()
}

/// Formats an error with its whole cause chain, once: a cause whose text
/// the message already holds (errors that print their source) is not
/// repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}

/// Raises this process's open-file limit to `want` (the hard limit too
/// when allowed: root's), or as far as the hard limit lets; returns the
/// soft limit now. A daemon serving many clients (init's and vmmd's APIs)
/// would otherwise stop accepting at 1024 descriptors.
///
/// Processes [`spawn`] starts get the soft limit back as it was: a raised
/// limit is the daemon's own, not its services' (select(2) breaks above
/// 1024).
pub fn raise_nofile(want: u64) -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    if soft >= want {
        return soft;
    }
    CHILD_NOFILE.store(soft, std::sync::atomic::Ordering::Relaxed);
    if hard < want && setrlimit(Resource::RLIMIT_NOFILE, want, want).is_ok() {
        return want;
    }
    let to = want.min(hard);
    match setrlimit(Resource::RLIMIT_NOFILE, to, hard) {
        Ok(()) => to,
        Err(_) => soft,
    }
}

/// The open-file soft limit [`spawn`]'s children get (0: as inherited);
/// set by [`raise_nofile`].
static CHILD_NOFILE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[cfg(test)]
mod tests {
    #[test]
    fn data_mounts_skip_pseudo_filesystems_and_go_in_reverse() {
        let m = "rootfs / rootfs rw 0 0\nproc /proc proc rw 0 0\n/dev/vda3 /var ext4 rw 0 0\n/dev/vda4 /var/lib/steelcup\\040data xfs rw 0 0\ntmpfs /run tmpfs rw 0 0\n";
        let d = super::data_mounts(m);
        assert_eq!(
            d,
            [
                std::path::PathBuf::from("/var/lib/steelcup data"),
                std::path::PathBuf::from("/var")
            ]
        );
    }
}
