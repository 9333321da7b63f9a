//! `vminit`: PID 1 inside every steelcup microVM.
//!
//! Mounts the basics, reads the workload's configuration that vmmd put in the
//! initramfs, runs the workload with the console as its stdio, reaps every
//! process, and when the workload ends reports its exit status to the VMM on
//! the status port and resets the VM.

use nix::mount::MsFlags;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::{mpsc, Mutex};
use std::time::Duration;
use steelcup_proto::control::{GuestAnswer, GuestRequest, CONTROL_PORT, MAX_REQUEST};
use steelcup_proto::guest::{
    ExitStatus, GuestConfig, GuestVolume, CONFIG_PATH, MAX_CLAIM, POOL_PORT, STATUS_PORT,
};
use steelcup_proto::stdio;
use steelcup_sys as sys;
use steelcup_sys::error_chain;

fn mounts() -> Result<(), sys::SysError> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    sys::mount("proc", Path::new("/proc"), "proc", nosuid, None)?;
    sys::mount("sysfs", Path::new("/sys"), "sysfs", nosuid, None)?;
    sys::mount(
        "devtmpfs",
        Path::new("/dev"),
        "devtmpfs",
        MsFlags::MS_NOSUID,
        None,
    )?;
    sys::mount(
        "devpts",
        Path::new("/dev/pts"),
        "devpts",
        MsFlags::MS_NOSUID,
        Some("ptmxmode=0666"),
    )?;
    sys::mkdir_p(Path::new("/dev/shm"))?;
    sys::mount(
        "tmpfs",
        Path::new("/dev/shm"),
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    sys::mount(
        "tmpfs",
        Path::new("/run"),
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None,
    )?;
    sys::mount(
        "tmpfs",
        Path::new("/tmp"),
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None,
    )?;
    Ok(())
}

/// Filesystems vminit recognises on a disk, by their superblock magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fs {
    /// ext2/3/4, mounted with the ext4 driver.
    Ext,
    Erofs,
    /// All zeros at the start: a new volume.
    Blank,
    Unknown,
}

fn probe(device: &str) -> std::io::Result<Fs> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(device)?;
    let mut head = vec![0u8; 64 << 10];
    let n = f.read_at(&mut head, 0)?;
    let head = &head[..n];
    Ok(if head.get(1080..1082) == Some(&[0x53, 0xef]) {
        Fs::Ext
    } else if head.get(1024..1028) == Some(&[0xe2, 0xe1, 0xf5, 0xe0]) {
        Fs::Erofs
    } else if head.iter().all(|b| *b == 0) {
        Fs::Blank
    } else {
        Fs::Unknown
    })
}

/// Waits (briefly) for the kernel to create a disk's device node and to
/// know its size (a warm VM's root disk gets its image just before its
/// workload comes).
fn wait_for(device: &str) -> Result<(), String> {
    let size = Path::new("/sys/block")
        .join(Path::new(device).file_name().unwrap_or_default())
        .join("size");
    for _ in 0..1000 {
        let sized = std::fs::read_to_string(&size)
            .map(|s| s.trim() != "0")
            .unwrap_or(true);
        if Path::new(device).exists() && sized {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Err(format!("{device} did not appear (with a size) within 5s"))
}

/// Mounts the read-only root image with a writable tmpfs layer over it,
/// moves the API filesystems across and makes it the root.
fn switch_root(device: &str, volumes: &[GuestVolume], user: Option<&str>) -> Result<(), String> {
    let err = |e: sys::SysError| error_chain(&e);
    wait_for(device)?;
    let fstype = match probe(device).map_err(|e| format!("{device}: {e}"))? {
        Fs::Ext => "ext4",
        Fs::Erofs => "erofs",
        other => return Err(format!("{device}: no ext4 or erofs filesystem ({other:?})")),
    };
    let lower = Path::new("/mnt/lower");
    let rw = Path::new("/mnt/rw");
    let new = Path::new("/mnt/root");
    sys::mount(device, lower, fstype, MsFlags::MS_RDONLY, None).map_err(err)?;
    sys::mount("tmpfs", rw, "tmpfs", MsFlags::empty(), Some("mode=0755")).map_err(err)?;
    for d in ["upper", "work"] {
        sys::mkdir_p(&rw.join(d)).map_err(err)?;
    }
    sys::mount(
        "overlay",
        new,
        "overlay",
        MsFlags::empty(),
        Some("lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work"),
    )
    .map_err(err)?;
    // Volumes first: their device nodes are in this /dev, mke2fs in this /bin.
    mount_volumes(new, volumes, user)?;
    for m in ["/proc", "/sys", "/dev", "/run", "/tmp"] {
        let target = new.join(m.trim_start_matches('/'));
        sys::mkdir_p(&target).map_err(err)?;
        nix::mount::mount(
            Some(m),
            &target,
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .map_err(|e| format!("move {m} into the new root: {e}"))?;
    }
    std::env::set_current_dir(new).map_err(|e| format!("chdir {}: {e}", new.display()))?;
    nix::mount::mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| format!("move the new root to /: {e}"))?;
    nix::unistd::chroot(".").map_err(|e| format!("chroot: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    Ok(())
}

/// Mounts each data disk under `root`, formatting a blank one first; a
/// new one's top directory belongs to the workload's `user` (as the
/// image's /etc/passwd and /etc/group say), so a workload that is not root
/// can write to it.
fn mount_volumes(root: &Path, volumes: &[GuestVolume], user: Option<&str>) -> Result<(), String> {
    for v in volumes {
        wait_for(&v.device)?;
        let mut formatted = false;
        match probe(&v.device).map_err(|e| format!("{}: {e}", v.device))? {
            Fs::Ext => {}
            Fs::Blank if v.read_only => {
                return Err(format!(
                    "{}: the read-only volume for {} is blank (write to it once first)",
                    v.device, v.path
                ))
            }
            Fs::Blank => {
                eprintln!("vminit: formatting new volume {} for {}", v.device, v.path);
                let status = Command::new("/bin/mke2fs")
                    .args(["-q", &v.device])
                    .status()
                    .map_err(|e| format!("run mke2fs: {e}"))?;
                if !status.success() {
                    return Err(format!("mke2fs {}: {status}", v.device));
                }
                formatted = true;
            }
            other => {
                return Err(format!(
                    "{}: not an ext filesystem and not blank ({other:?}); refusing to format it",
                    v.device
                ))
            }
        }
        let target = root.join(v.path.trim_start_matches('/'));
        let flags = if v.read_only {
            MsFlags::MS_NODEV | MsFlags::MS_RDONLY
        } else {
            MsFlags::MS_NODEV
        };
        // A writable volume discards what its files free: the disk punches
        // holes in the volume's file, and the host gets the space back.
        let options = (!v.read_only).then_some("discard");
        sys::mount(&v.device, &target, "ext4", flags, options).map_err(|e| error_chain(&e))?;
        // New: formatted here, or by vmmd on the host (nothing in it but
        // mke2fs's lost+found, still root's).
        let new = formatted || (!v.read_only && untouched(&target));
        if let (true, Some(user)) = (new, user) {
            let read = |f: &str| std::fs::read_to_string(root.join(f)).unwrap_or_default();
            let owner =
                steelcup_proto::guest::resolve_user(user, &read("etc/passwd"), &read("etc/group"))
                    .map_err(|e| format!("volume {}: user {user:?}: {e}", v.path))?;
            nix::unistd::chown(
                &target,
                Some(nix::unistd::Uid::from_raw(owner.uid)),
                Some(nix::unistd::Gid::from_raw(owner.gid)),
            )
            .map_err(|e| format!("volume {}: give it to {user:?}: {e}", v.path))?;
        }
    }
    Ok(())
}

/// A filesystem root as mke2fs leaves it: owned by root, holding only
/// `lost+found`.
fn untouched(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let root_owned = std::fs::metadata(dir)
        .map(|m| m.uid() == 0)
        .unwrap_or(false);
    let only_lost_found = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .all(|e| e.file_name() == std::ffi::OsStr::new("lost+found"))
        })
        .unwrap_or(false);
    root_owned && only_lost_found
}

/// Listens on vsock [`CONTROL_PORT`] for vmmd's requests
/// ([`GuestRequest`], one JSON line per connection): stop (SIGTERM to the
/// workload's process group; vmmd kills the VM if it does not end in
/// time), kill, ping and health probes.
fn serve_control(workload: Pid) -> std::io::Result<()> {
    use std::io::{BufRead, BufReader, Write};
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: plain socket calls on a descriptor this function owns; the
    // address is a fully initialised sockaddr_vm of the right length.
    let listener = unsafe {
        let fd = libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_vm = std::mem::zeroed();
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_port = CONTROL_PORT;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        if libc::bind(raw, std::ptr::addr_of!(addr).cast(), len) != 0 || libc::listen(raw, 4) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        fd
    };
    loop {
        let raw = std::os::fd::AsRawFd::as_raw_fd(&listener);
        // SAFETY: accept4 on our listening socket; the new descriptor is
        // owned by the File below.
        let conn = unsafe {
            libc::accept4(
                raw,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if conn < 0 {
            continue;
        }
        // SAFETY: `conn` is a new descriptor nobody else owns.
        let mut stream = unsafe { std::fs::File::from_raw_fd(conn) };
        let mut line = String::new();
        let _ = BufReader::new((&stream).take(MAX_REQUEST)).read_line(&mut line);
        let refused = |reason: String| GuestAnswer::Refused { reason };
        let (answer, signal) = match GuestRequest::parse(&line) {
            // A health probe takes its time: answered by a thread of its own.
            Ok(GuestRequest::Probe {
                probe,
                timeout_secs,
            }) => {
                std::thread::spawn(move || {
                    let answer = match probe.run(Duration::from_secs(timeout_secs)) {
                        Ok(()) => GuestAnswer::Done {},
                        Err(reason) => GuestAnswer::Failed { reason },
                    };
                    let _ = stream.write_all(answer.line().as_bytes());
                });
                continue;
            }
            Ok(GuestRequest::Stop {}) => (GuestAnswer::Done {}, Some(Signal::SIGTERM)),
            Ok(GuestRequest::Kill { signal }) => match Signal::try_from(signal) {
                Ok(s) => (GuestAnswer::Done {}, Some(s)),
                Err(_) => (refused(format!("{signal} is not a signal")), None),
            },
            Ok(GuestRequest::Ping {}) => (GuestAnswer::Done {}, None),
            Ok(GuestRequest::Processes {}) => (
                GuestAnswer::Processes {
                    processes: steelcup_proto::processes::list(Path::new("/proc")),
                },
                None,
            ),
            Ok(GuestRequest::Claim { .. }) => (refused("not a warm VM".into()), None),
            Err(e) => (refused(e), None),
        };
        // Answer first: once the workload ends, the VM ends with it.
        let _ = stream.write_all(answer.line().as_bytes());
        let _ = stream.flush();
        if let Some(sig) = signal {
            eprintln!("vminit: vmmd sends the workload {sig}");
            let _ = kill(Pid::from_raw(-workload.as_raw()), sig);
        }
    }
}

/// How long vminit waits for `cup run` to attach.
const ATTACH_WAIT: Duration = Duration::from_secs(60);

/// The command for `argv` inside the workload's root: the workload's
/// environment with `env` over it, its working directory or `workdir`, its
/// user or `user`.
fn command(
    config: &GuestConfig,
    argv: &[String],
    env: &BTreeMap<String, String>,
    workdir: Option<&str>,
    user: Option<&str>,
) -> Result<Command, String> {
    let program = argv.first().ok_or("no command to run")?;
    let mut cmd = Command::new(program);
    sys::reset_signal_mask(&mut cmd);
    cmd.args(&argv[1..])
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .envs(&config.env)
        .envs(env);
    if let Some(dir) = workdir.or(config.workdir.as_deref()) {
        cmd.current_dir(dir);
    }
    let has_home = config.env.contains_key("HOME") || env.contains_key("HOME");
    match user.or(config.user.as_deref()) {
        Some(user) => {
            let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
            let c = steelcup_proto::guest::resolve_user(
                user,
                &read("/etc/passwd"),
                &read("/etc/group"),
            )
            .map_err(|e| format!("user {user:?}: {e}"))?;
            if !has_home {
                cmd.env("HOME", &c.home);
            }
            sys::run_as(&mut cmd, c.uid, c.gid, c.groups);
        }
        None if !has_home => {
            cmd.env("HOME", "/root");
        }
        None => {}
    }
    Ok(cmd)
}

/// Processes started by `cup exec`, by pid: where their status goes. The
/// main loop reaps every child and hands these theirs.
static EXECS: Mutex<BTreeMap<i32, mpsc::Sender<ExitStatus>>> = Mutex::new(BTreeMap::new());

fn exec_ended(execs: &BTreeMap<i32, mpsc::Sender<ExitStatus>>, pid: Pid, status: ExitStatus) {
    if let Some(tx) = execs.get(&pid.as_raw()) {
        let _ = tx.send(status);
    }
}

/// `cup exec`: each connection to the exec port asks for one process.
fn serve_exec(config: &GuestConfig) -> std::io::Result<()> {
    let listener = stdio::guest::listen(stdio::EXEC_PORT)?;
    loop {
        let Ok(Some(conn)) = stdio::guest::accept(&listener, None) else {
            continue;
        };
        let config = config.clone();
        std::thread::spawn(move || exec_one(&config, conn));
    }
}

fn exec_one(config: &GuestConfig, conn: std::fs::File) {
    // Byte by byte: what follows the line (stdin frames) stays unread.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    let read = loop {
        match (&conn).read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => break Ok(()),
            Ok(1) if (line.len() as u64) < stdio::MAX_REQUEST => line.push(byte[0]),
            Ok(1) => break Err("the request is too long".to_string()),
            Ok(_) => break Err("the connection ended".to_string()),
            Err(e) => break Err(e.to_string()),
        }
    };
    let request: stdio::ExecRequest =
        match read.and_then(|_| serde_json::from_slice(&line).map_err(|e| e.to_string())) {
            Ok(r) => r,
            Err(e) => {
                return stdio::guest::refuse(conn, &format!("bad exec request: {e}"), libc::EINVAL)
            }
        };
    let cmd = match command(
        config,
        &request.argv,
        &request.env,
        request.workdir.as_deref(),
        request.user.as_deref(),
    ) {
        Ok(c) => c,
        Err(e) => return stdio::guest::refuse(conn, &e, libc::EINVAL),
    };
    if request.detach {
        return exec_detached(cmd, conn, &request.argv);
    }
    let (tx, rx) = mpsc::channel();
    // Registered before the main loop can reap it: the lock is held from
    // before the fork until the pid is in the map.
    let refuse_conn = conn.try_clone();
    let spawned = {
        let mut execs = EXECS.lock().unwrap_or_else(|p| p.into_inner());
        let spawned = stdio::guest::spawn(cmd, conn, request.tty);
        if let Ok(a) = &spawned {
            execs.insert(a.pid as i32, tx);
        }
        spawned
    };
    // Refused with the lock released: the refusal lingers for the host,
    // and the main loop must go on reaping meanwhile.
    let attached = match spawned {
        Ok(a) => a,
        Err(e) => {
            if let Ok(c) = refuse_conn {
                stdio::guest::refuse(
                    c,
                    &format!(
                        "cannot run {}: {e}",
                        request.argv.first().map(String::as_str).unwrap_or("")
                    ),
                    e.raw_os_error().unwrap_or(libc::ENOENT),
                );
            }
            return;
        }
    };
    let pid = attached.pid as i32;
    let status = rx.recv().unwrap_or(ExitStatus::StartFailed { errno: 0 });
    EXECS.lock().unwrap_or_else(|p| p.into_inner()).remove(&pid);
    attached.finish(status);
}

/// `cup cp`: each connection to the copy port copies one path out of or
/// into the guest (see `steelcup_proto::copy`), as root.
fn serve_copy() -> std::io::Result<()> {
    let listener = stdio::guest::listen(steelcup_proto::copy::COPY_PORT)?;
    loop {
        let Ok(Some(conn)) = stdio::guest::accept(&listener, None) else {
            continue;
        };
        std::thread::spawn(move || copy_one(conn));
    }
}

fn copy_one(mut conn: std::fs::File) {
    use steelcup_proto::copy::{self, CopyError, CopyRequest};
    // Byte by byte: what follows the line (the archive) stays unread.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while (&conn).read(&mut byte).ok() == Some(1) && byte[0] != b'\n' {
        if line.len() as u64 >= stdio::MAX_REQUEST {
            break;
        }
        line.push(byte[0]);
    }
    let result = serde_json::from_slice::<CopyRequest>(&line)
        .map_err(|e| CopyError::Shape(format!("bad copy request: {e}")))
        .and_then(|req| match req {
            CopyRequest::Out { path } => {
                copy::check_guest_path(&path)?;
                let p = Path::new(&path);
                copy::pack(
                    p,
                    &copy::top_name(p),
                    copy::FrameWriter {
                        inner: &mut conn,
                        kind: stdio::STDOUT,
                    },
                )
            }
            CopyRequest::In { path } => {
                copy::check_guest_path(&path)?;
                copy::place(copy::FrameReader::new(&conn), Path::new(&path))
            }
        });
    let status = match result {
        Ok(()) => ExitStatus::Exited { code: 0 },
        Err(e) => {
            let why = format!("{}\n", steelcup_sys::error_chain(&e));
            let _ = stdio::write_frame(&mut conn, stdio::STDERR, why.as_bytes());
            ExitStatus::Exited { code: 1 }
        }
    };
    let _ = stdio::write_frame(
        &mut conn,
        stdio::EXIT,
        &serde_json::to_vec(&status).unwrap_or_default(),
    );
}

/// `cup exec -d`: the process runs with stdin closed and its output on
/// the console (the workload's log); the host is told it started (exit
/// code 0) or why not. The main loop reaps it like any orphan.
fn exec_detached(mut cmd: std::process::Command, mut conn: std::fs::File, argv: &[String]) {
    cmd.stdin(std::process::Stdio::null()).process_group(0);
    // Held across the spawn, as for an attached exec (see `run`).
    let spawned = {
        let _execs = EXECS.lock().unwrap_or_else(|p| p.into_inner());
        cmd.spawn()
    };
    match spawned {
        Ok(_) => {
            let status = ExitStatus::Exited { code: 0 };
            let _ = stdio::write_frame(
                &mut conn,
                stdio::EXIT,
                &serde_json::to_vec(&status).unwrap_or_default(),
            );
        }
        Err(e) => stdio::guest::refuse(
            conn,
            &format!(
                "cannot run {}: {e}",
                argv.first().map(String::as_str).unwrap_or("")
            ),
            e.raw_os_error().unwrap_or(libc::ENOENT),
        ),
    }
}

/// Brings the interface up with its address and default route.
fn configure_network(net: &steelcup_proto::guest::GuestNetwork) -> Result<(), String> {
    let (addr, prefix) = steelcup_proto::parse_cidr(&net.address)?;
    if let Some(mac) = &net.mac {
        let mac = steelcup_proto::guest::parse_mac(mac)?;
        sys::set_mac(&net.interface, mac).map_err(|e| error_chain(&e))?;
    }
    if let Some(mtu) = net.mtu {
        sys::set_mtu(&net.interface, mtu).map_err(|e| error_chain(&e))?;
    }
    sys::link_up(&net.interface).map_err(|e| error_chain(&e))?;
    sys::set_ipv4(&net.interface, addr, prefix).map_err(|e| error_chain(&e))?;
    if let Some(gw) = net.gateway {
        sys::add_default_route(&net.interface, gw).map_err(|e| error_chain(&e))?;
    }
    Ok(())
}

/// `/etc/hosts` (with the extra hosts) and `/etc/resolv.conf` of the
/// workload's root (its writable layer), replacing the image's (a symlink
/// too). Without a network, `/etc/hosts` only when there are extra hosts.
fn write_name_files(config: &GuestConfig) -> Result<(), String> {
    let write = |path: &str, text: &str| {
        let _ = std::fs::create_dir_all("/etc");
        let _ = std::fs::remove_file(path);
        std::fs::write(path, text).map_err(|e| format!("{path}: {e}"))
    };
    let hostname = config.hostname.as_deref();
    let mut hosts = match &config.network {
        Some(net) => net.hosts(hostname),
        None if config.extra_hosts.is_empty() => return Ok(()),
        None => steelcup_proto::guest::LOCALHOST_LINES.to_string(),
    };
    for (name, addr) in &config.extra_hosts {
        hosts.push_str(&format!("{addr}\t{name}\n"));
    }
    write("/etc/hosts", &hosts)?;
    if let Some(r) = config.network.as_ref().and_then(|n| n.resolv_conf()) {
        write("/etc/resolv.conf", &r)?;
    }
    Ok(())
}

/// `--read-only`: the root mount (the overlay, or the initramfs) becomes
/// read-only; the mounts under it (volumes, /proc, /dev, /run, /tmp) keep
/// their own flags.
fn root_read_only() -> Result<(), String> {
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(|e| format!("remount / read-only: {e}"))
}

fn fail(msg: &str, errno: i32) -> ExitStatus {
    eprintln!("vminit: {msg}");
    ExitStatus::StartFailed {
        errno: u8::try_from(errno).unwrap_or(u8::MAX),
    }
}

/// A warm-pool VM: answers vmmd's `ping`s on [`POOL_PORT`] until a `claim`
/// hands it a config that parses (see `steelcup_proto::guest`).
fn wait_in_pool() -> Result<GuestConfig, String> {
    use std::io::{BufRead, BufReader, Write};
    let listener =
        stdio::guest::listen(POOL_PORT).map_err(|e| format!("pool port {POOL_PORT}: {e}"))?;
    loop {
        let mut conn = match stdio::guest::accept(&listener, None) {
            Ok(Some(c)) => c,
            Ok(None) | Err(_) => continue,
        };
        let mut line = String::new();
        if BufReader::new((&conn).take(MAX_CLAIM))
            .read_line(&mut line)
            .is_err()
        {
            continue;
        }
        let refused = |reason: String| GuestAnswer::Refused { reason };
        let (answer, config) = match GuestRequest::parse(&line) {
            Ok(GuestRequest::Ping {}) => (GuestAnswer::Done {}, None),
            Ok(GuestRequest::Claim { config }) => (GuestAnswer::Done {}, Some(config)),
            Ok(_) => (refused("a warm VM takes ping and claim".into()), None),
            Err(e) => (refused(e), None),
        };
        let _ = conn.write_all(answer.line().as_bytes());
        if let Some(c) = config {
            return Ok(*c);
        }
    }
}

fn run() -> ExitStatus {
    if let Err(e) = mounts() {
        return fail(&error_chain(&e), libc::EIO);
    }
    let config: GuestConfig = match std::fs::read(CONFIG_PATH) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(c) => c,
            Err(e) => return fail(&format!("{CONFIG_PATH}: {e}"), libc::EINVAL),
        },
        Err(e) => {
            return fail(
                &format!("{CONFIG_PATH}: {e}"),
                e.raw_os_error().unwrap_or(libc::EIO),
            )
        }
    };
    let config = match config.pool {
        false => config,
        true => match wait_in_pool() {
            Ok(c) => c,
            Err(e) => return fail(&e, libc::EIO),
        },
    };
    if let Some(h) = &config.hostname {
        let _ = sys::set_hostname(h);
    }
    let _ = sys::link_up("lo");
    if let Some(net) = &config.network {
        if let Err(e) = configure_network(net) {
            return fail(&format!("network {}: {e}", net.interface), libc::ENETDOWN);
        }
    }
    let prepared = match &config.root {
        Some(device) => switch_root(device, &config.volumes, config.user.as_deref()),
        None => mount_volumes(Path::new("/"), &config.volumes, config.user.as_deref()),
    };
    if let Err(e) = prepared {
        return fail(&e, libc::EIO);
    }
    if let Err(e) = write_name_files(&config) {
        return fail(&format!("network files: {e}"), libc::EIO);
    }
    if config.read_only {
        if let Err(e) = root_read_only() {
            return fail(&e, libc::EIO);
        }
    }
    let Some(program) = config.cmd.first() else {
        return fail("no command to run", libc::EINVAL);
    };
    // Signals reach PID 1 only through handlers or a signalfd: read the
    // guest's reboot/poweroff requests and child exits from one.
    let signals = match sys::signalfd(&[
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ]) {
        Ok(s) => s,
        Err(e) => return fail(&error_chain(&e), libc::EIO),
    };
    // Limits for the workload and every exec: vminit's own, inherited.
    let mut limits =
        BTreeMap::from([("nofile".to_string(), steelcup_proto::guest::DEFAULT_NOFILE)]);
    limits.extend(config.rlimits.clone());
    for (name, value) in &limits {
        match steelcup_proto::guest::RLIMITS
            .iter()
            .find(|(n, _)| n == name)
        {
            Some((_, resource)) => {
                if let Err(e) = sys::set_rlimit(*resource, *value) {
                    return fail(&format!("rlimit {name}={value}: {e}"), libc::EINVAL);
                }
            }
            None => return fail(&format!("unknown rlimit {name:?}"), libc::EINVAL),
        }
    }
    let cmd = match command(&config, &config.cmd, &BTreeMap::new(), None, None) {
        Ok(c) => c,
        Err(e) => return fail(&e, libc::EINVAL),
    };
    let exec_config = config.clone();
    std::thread::spawn(move || {
        if let Err(e) = serve_exec(&exec_config) {
            eprintln!("vminit: no vsock exec port: {e}");
        }
    });
    std::thread::spawn(|| {
        if let Err(e) = serve_copy() {
            eprintln!("vminit: no vsock copy port: {e}");
        }
    });
    // `cup run`: the workload's stdio is the host's connection, once it comes.
    let conn = if config.attach {
        match stdio::guest::listen(stdio::ATTACH_PORT)
            .and_then(|l| stdio::guest::accept(&l, Some(ATTACH_WAIT)))
        {
            Ok(Some(c)) => Some(c),
            Ok(None) => {
                eprintln!(
                    "vminit: nobody attached within {}s; output goes to the console",
                    ATTACH_WAIT.as_secs()
                );
                None
            }
            Err(e) => return fail(&format!("attach port: {e}"), libc::EIO),
        }
    } else {
        None
    };
    let (main, mut attached) = match conn {
        Some(conn) => {
            let told = conn.try_clone();
            match stdio::guest::spawn(cmd, conn, config.tty) {
                Ok(a) => (Pid::from_raw(a.pid as i32), Some(a)),
                Err(e) => {
                    let errno = e.raw_os_error().unwrap_or(libc::ENOENT);
                    let why = format!("cannot run {program}: {e}");
                    if let Ok(c) = told {
                        stdio::guest::refuse_last(c, &format!("vminit: {why}"), errno);
                    }
                    return fail(&why, errno);
                }
            }
        }
        None => {
            let mut cmd = cmd;
            match cmd.process_group(0).spawn() {
                Ok(child) => (Pid::from_raw(child.id() as i32), None),
                Err(e) => {
                    return fail(
                        &format!("cannot run {program}: {e}"),
                        e.raw_os_error().unwrap_or(libc::ENOENT),
                    )
                }
            }
        }
    };
    // The boot is over; the VMM notes when (no exit: it goes on).
    let _ = sys::outl(STATUS_PORT, steelcup_proto::guest::STARTED);
    std::thread::spawn(move || {
        if let Err(e) = serve_control(main) {
            eprintln!("vminit: no vsock control port: {e}");
        }
    });
    let finish = |attached: &mut Option<stdio::guest::Attached>, status: ExitStatus| {
        if let Some(a) = attached.take() {
            a.finish(status);
        }
        status
    };
    // Reap everything; the workload's own exit, or a reboot/poweroff request
    // from inside the guest, decides the VM's status.
    loop {
        // Never reap while an exec is being spawned: std's spawn waits for
        // a child whose exec failed, and must find it (EXECS is held across
        // the spawn).
        let execs = EXECS.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == main => {
                    return finish(&mut attached, ExitStatus::Exited { code: code as u8 });
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid == main => {
                    return finish(&mut attached, ExitStatus::Killed { signal: sig as u8 });
                }
                Ok(WaitStatus::Exited(pid, code)) => {
                    exec_ended(&execs, pid, ExitStatus::Exited { code: code as u8 })
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    exec_ended(&execs, pid, ExitStatus::Killed { signal: sig as u8 })
                }
                Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => break,
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return fail(&format!("waitpid: {e}"), e as i32),
            }
        }
        drop(execs);
        let mut fds = [PollFd::new(signals.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::NONE);
        while let Ok(Some(info)) = signals.read_signal() {
            match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGTERM | Signal::SIGINT) => {
                    eprintln!("vminit: reboot requested");
                    return finish(&mut attached, ExitStatus::Rebooted);
                }
                Ok(Signal::SIGUSR1 | Signal::SIGUSR2) => {
                    eprintln!("vminit: power-off requested");
                    return finish(&mut attached, ExitStatus::PoweredOff);
                }
                _ => {}
            }
        }
    }
}

fn main() {
    if !sys::is_pid1() {
        eprintln!("vminit: must run as PID 1 inside a steelcup microVM");
        std::process::exit(2);
    }
    let status = std::panic::catch_unwind(run).unwrap_or(ExitStatus::StartFailed { errno: 0 });
    // Ask the rest of the guest's processes to end, give them up to two
    // seconds, then kill what is left.
    // No exec may be spawning from here on (see the main loop).
    let _no_more_execs = EXECS.lock().unwrap_or_else(|p| p.into_inner());
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    for _ in 0..100 {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Err(nix::errno::Errno::ECHILD) => break,
            Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(20)),
            _ => {}
        }
    }
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    nix::unistd::sync();
    // Everything the workload wrote to the console leaves the serial port
    // before the VM ends (the kernel sends it a byte at a time from its
    // tty queue; the status write would cut the tail of the last line).
    let _ = nix::sys::termios::tcdrain(std::io::stderr());
    // The VMM ends the VM on this write; the reset below is the fallback.
    if let Err(e) = sys::outl(STATUS_PORT, status.encode()) {
        eprintln!("vminit: cannot report exit status: {}", error_chain(&e));
    }
    let _ = sys::power(sys::PowerAction::Reboot);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
