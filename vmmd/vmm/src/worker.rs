//! The per-VM worker process: builds one VM, runs its vCPUs on their own
//! threads, and reports how it ended.
//!
//! # Design
//! vmmd starts `vmm-worker` with its control socket as stdin and speaks
//! the worker protocol on it (`steelcup_proto::worker`): the [`VmConfig`]
//! first, with the VM's disks and tap as descriptors, then
//! [`WorkerCommand`]s (pause, resume, attach an image to an empty disk
//! slot, its descriptor passed along); the worker answers each with a
//! [`WorkerMessage`] on the same socket and sends its [`WorkerReport`]
//! last. The worker, jailed, opens no disk or tap itself. Guest serial
//! output goes to the worker's stdout and the worker's own log to its
//! stderr. A worker started by hand with a pipe as stdin writes its
//! messages to stderr instead. A VM that crashes, or a worker that dies,
//! takes nothing else down.
//!
//! Once the VM is built, a seccomp filter (see [`crate::jail::seccomp`]) is
//! installed on every worker thread before any guest instruction runs.
//!
//! Before that, still single threaded, the worker moves into its own mount
//! namespace holding only its vsock directory (see [`crate::jail::mount`]);
//! vmmd has already put it in its cgroup (see [`crate::jail::cgroup`]).

use crate::builder;
use crate::builder::VmSource;
use crate::config::{VmConfig, VmOutcome, WorkerCommand, WorkerMessage, WorkerReport};
use crate::vstate::pause::{self, PauseGate};
use crate::vstate::vcpu::VcpuStop;
use crate::vstate::vm::Vm;
use std::os::unix::thread::JoinHandleExt;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;
use steelcup_proto::guest::ExitStatus;

/// How long a pause may take before it is given up.
const PAUSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Builds and runs the VM, in the KVM VM `vm` gives (see [`create_vm`];
/// created here if `None`); returns how it ended. Commands are read from
/// `control` (see the module docs) while the VM runs.
pub fn run_vm(
    config: &VmConfig,
    handles: Vec<std::fs::File>,
    control: Control,
    vm: Option<VmSource>,
) -> VmOutcome {
    TIMING.store(config.report_timing, std::sync::atomic::Ordering::Relaxed);
    if config.report_timing {
        let main = MAIN_NS.load(std::sync::atomic::Ordering::Relaxed);
        send(&WorkerMessage::Phase {
            name: "main".into(),
            ns: main,
        });
    }
    mark("config-read");
    if let Err(e) = pause::install_kick_handler() {
        return VmOutcome::VmmError {
            message: format!("install the vCPU kick handler: {e}"),
        };
    }
    // The seccomp filter is compiled now, while the VM is still being
    // created on its own thread (it is installed once the VM is built).
    let program = match crate::jail::seccomp::filter() {
        Ok(p) => p,
        Err(e) => {
            return VmOutcome::VmmError {
                message: format!("build seccomp filter: {e}"),
            }
        }
    };
    let vm = match vm {
        Some(source) => source,
        None => match Vm::new() {
            Ok(vm) => {
                mark("vm-created");
                VmSource::Ready(vm)
            }
            Err(e) => {
                return VmOutcome::VmmError {
                    message: error_chain(&e),
                }
            }
        },
    };
    let built = match builder::build(config, handles, Box::new(std::io::stdout()), vm) {
        Ok(b) => b,
        Err(e) => {
            return VmOutcome::VmmError {
                message: error_chain(&e),
            }
        }
    };
    mark("built");
    // For the control thread, which turns off PIT tick replay while the
    // guest starts (see `stop_pit_replay`).
    let pit = match built.vm.dup_fd() {
        Ok(fd) => fd,
        Err(e) => {
            return VmOutcome::VmmError {
                message: format!("duplicate the VM's descriptor: {e}"),
            }
        }
    };
    // Still single threaded: the new mount namespace covers the whole
    // process only if it is entered before the vCPU threads exist.
    if let (Some(scratch), Some(vsock)) = (&config.jail_scratch, &config.vsock) {
        let keep = vsock.uds.parent().unwrap_or(std::path::Path::new("/"));
        if let Err(e) = crate::jail::mount::enter(scratch, keep) {
            return VmOutcome::VmmError {
                message: format!("jail the worker: {}", error_chain(&e)),
            };
        }
    }
    // Still single threaded, so every thread started below inherits an
    // empty set.
    if let Err(e) = crate::jail::caps::drop_all() {
        return VmOutcome::VmmError {
            message: format!("drop capabilities: {}", error_chain(&e)),
        };
    }
    mark("jailed");
    let (tx, rx) = mpsc::channel();
    // Two rendezvous: `ready` once every vCPU thread is up (a new thread
    // makes its own start-up syscalls, which the filter would refuse), `go`
    // once the filter is on every thread.
    // Parties: the vCPU threads, the device thread, the control thread and
    // this one.
    let ready = Arc::new(std::sync::Barrier::new(built.vcpus.len() + 3));
    let start = Arc::new(std::sync::Barrier::new(built.vcpus.len() + 3));
    let gate = Arc::new(PauseGate::default());
    let mut handles = Vec::new();
    let report_timing = config.report_timing;
    for mut vcpu in built.vcpus {
        let bus = built.bus.clone();
        let gate = gate.clone();
        let tx = tx.clone();
        let start = start.clone();
        let ready = ready.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("vcpu{}", vcpu.index))
            .spawn(move || {
                ready.wait();
                start.wait();
                if report_timing && vcpu.index == 0 {
                    send(&WorkerMessage::FirstKvmRun { ns: monotonic_ns() });
                }
                let stop = vcpu.run(&bus, &gate);
                let _ = tx.send((vcpu.index, stop));
            });
        match spawned {
            Ok(h) => handles.push(h),
            Err(e) => {
                return VmOutcome::VmmError {
                    message: format!("spawn vCPU thread: {e}"),
                }
            }
        }
    }
    // The device thread: virtio queue work and host-side device events.
    let devices = built.devices;
    let (dready, dstart) = (ready.clone(), start.clone());
    let dtx = tx.clone();
    if let Err(e) = std::thread::Builder::new()
        .name("devices".into())
        .spawn(move || {
            dready.wait();
            dstart.wait();
            let err = devices.run();
            let _ = dtx.send((u8::MAX, VcpuStop::Failed(format!("device thread: {err}"))));
        })
    {
        return VmOutcome::VmmError {
            message: format!("spawn device thread: {e}"),
        };
    }
    // The control thread: first PIT tick replay off, then pause, resume
    // and attach from vmmd.
    let threads: Vec<libc::pthread_t> = handles.iter().map(|h| h.as_pthread_t()).collect();
    let (cready, cstart) = (ready.clone(), start.clone());
    let slots = built.slots;
    if let Err(e) = std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            cready.wait();
            cstart.wait();
            if let Err(e) = crate::vstate::vm::stop_pit_replay(&pit) {
                tracing::warn!("PIT ticks stay replayed: {}", error_chain(&e));
            }
            drop(pit);
            serve_control(control, &gate, &threads, &slots);
        })
    {
        return VmOutcome::VmmError {
            message: format!("spawn control thread: {e}"),
        };
    }
    mark("threads");
    ready.wait();
    if let Err(e) = crate::jail::seccomp::apply_all_threads(&program) {
        // Never run a guest unconfined: the waiting vCPU threads die with
        // the process when the report is written.
        return VmOutcome::VmmError {
            message: format!("install seccomp filter: {e}"),
        };
    }
    start.wait();
    drop(tx);
    let Ok((index, stop)) = rx.recv() else {
        return VmOutcome::VmmError {
            message: "every vCPU thread ended without a reason".into(),
        };
    };
    tracing::debug!("vCPU {index} stopped: {stop:?}");
    let status = built
        .bus
        .lock()
        .map(|b| b.status)
        .unwrap_or_else(|p| p.into_inner().status);
    // The other vCPUs are left running; the worker process exits right after.
    match (stop, status) {
        (VcpuStop::Failed(message), _) => VmOutcome::VmmError { message },
        (_, Some(ExitStatus::Exited { code })) => VmOutcome::Exited { code },
        (_, Some(ExitStatus::Killed { signal })) => VmOutcome::Killed { signal },
        (_, Some(ExitStatus::StartFailed { errno })) => VmOutcome::StartFailed { errno },
        (_, Some(ExitStatus::Rebooted)) => VmOutcome::Rebooted,
        (_, Some(ExitStatus::PoweredOff)) => VmOutcome::PoweredOff,
        (VcpuStop::Reset | VcpuStop::Exited, None) => VmOutcome::GuestReset,
        (VcpuStop::TripleFault, None) => VmOutcome::GuestCrashed {
            reason: "triple fault".into(),
        },
        (VcpuStop::Halted, None) => VmOutcome::GuestCrashed {
            reason: "halted".into(),
        },
    }
}

/// Starts creating the KVM VM (`KVM_CREATE_VM`, the irqchip, the PIT) on a
/// thread of its own, which then registers the guest memory `build` sends
/// it. It needs nothing from the VM's config, and it takes longer than
/// exec and reading the config together on a nested host (registering
/// memory waits out an SRCU grace period in the host kernel), so they
/// overlap with the rest of the build. The thread has ended by the time
/// [`run_vm`] has the VM, so the worker is single threaded again when it
/// enters its mount namespace. `None` if no thread could be started: the
/// caller then creates the VM itself.
pub fn create_vm() -> Option<VmSource> {
    let (memory, guest_memory) = mpsc::channel::<vm_memory::GuestMemoryMmap>();
    let vm = std::thread::Builder::new()
        .name("create-vm".into())
        .spawn(move || {
            let vm = Vm::new()?;
            mark("vm-created");
            if let Ok(mem) = guest_memory.recv() {
                vm.register_memory(&mem)?;
                mark("memory-registered");
            }
            Ok(vm)
        })
        .ok()?;
    Some(VmSource::Pending { memory, vm })
}

static TIMING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// When the worker's `main` began (CLOCK_MONOTONIC, ns).
static MAIN_NS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// When a warm pool VM was handed its workload's root disk (0: never).
static CLAIMED_NS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How long the workload took to start: from the worker's start (or, for
/// a warm pool VM, from its claim) to vminit's word that the workload's
/// process runs; 0 until it has.
fn boot_ns() -> u64 {
    use std::sync::atomic::Ordering::Relaxed;
    let started = crate::devices::WORKLOAD_STARTED_NS.load(Relaxed);
    let from = match CLAIMED_NS.load(Relaxed) {
        0 => MAIN_NS.load(Relaxed),
        claimed => claimed,
    };
    if started == 0 {
        0
    } else {
        started.saturating_sub(from)
    }
}

/// With `report_timing`, tells vmmd when a phase of the worker's start
/// ended (for `vmmd bench`).
pub fn mark(phase: &str) {
    if TIMING.load(std::sync::atomic::Ordering::Relaxed) {
        send(&WorkerMessage::Phase {
            name: phase.to_string(),
            ns: monotonic_ns(),
        });
    }
}

/// Where [`send`] writes: the control socket (fd 0), or stderr (fd 2) for
/// a worker started by hand with a pipe as stdin.
static MESSAGES_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);
/// One message at a time: several threads send (vCPU 0, control, main).
static SENDING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Sends `msg` to vmmd as one line, written in one `write` where the
/// socket takes it whole, so the timing costs the start it measures as
/// little as it can.
pub fn send(msg: &WorkerMessage) {
    let line = msg.line();
    let fd = MESSAGES_FD.load(std::sync::atomic::Ordering::Relaxed);
    let _one = SENDING.lock().unwrap_or_else(|p| p.into_inner());
    // SAFETY: fd 0 (the control socket) and fd 2 stay open for the
    // worker's whole life; the borrow ends with this call.
    let out = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let mut rest = &line[..];
    while !rest.is_empty() {
        match nix::unistd::write(out, rest) {
            Ok(0) => return,
            Ok(n) => rest = &rest[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return,
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds (the same clock in every process).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The most descriptors one message on the control socket may carry (a
/// config's disks and tap, see `VmConfig::handles`).
pub const MAX_HANDLES: usize = 32;

/// The control channel: what was read past the config line, then fd 0.
#[derive(Debug)]
pub struct Control {
    /// Bytes already read from fd 0 after the config line.
    pub pending: Vec<u8>,
    /// The channel (stdin; a Unix socket when vmmd started the worker).
    pub fd: std::os::fd::RawFd,
}

/// The longest command line the control channel takes.
const MAX_COMMAND: usize = 4096;

/// Reads the next command and the descriptors that came with it; None once
/// the channel is closed (or broken).
fn next_line(control: &mut Control, fds: &mut Vec<std::fs::File>, max: usize) -> Option<String> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::FromRawFd;
    loop {
        if let Some(n) = control.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = control.pending.drain(..=n).collect();
            return Some(String::from_utf8_lossy(&line).trim().to_string());
        }
        if control.pending.len() > max {
            return None;
        }
        let mut buf = [0u8; 4096];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; MAX_HANDLES]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let got = match recvmsg::<()>(
            control.fd,
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
                    // Descriptors beyond the buffer were dropped by the
                    // kernel: what came cannot be matched to the config.
                    tracing::error!("more than {MAX_HANDLES} descriptors came with one message");
                    return None;
                }
                for c in msg.cmsgs().into_iter().flatten() {
                    if let ControlMessageOwned::ScmRights(received) = c {
                        for fd in received {
                            // SAFETY: the kernel just installed `fd` in this
                            // process for this message; nothing else owns it.
                            fds.push(unsafe { std::fs::File::from_raw_fd(fd) });
                        }
                    }
                }
                msg.bytes
            }
            // A pipe (a worker started by hand): no descriptors, plain reads.
            Err(nix::errno::Errno::ENOTSOCK) => {
                match nix::unistd::read(
                    // SAFETY: fd 0 stays open for the worker's life.
                    unsafe { std::os::fd::BorrowedFd::borrow_raw(control.fd) },
                    &mut buf,
                ) {
                    Ok(n) => n,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => return None,
                }
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return None,
        };
        if got == 0 {
            return None;
        }
        control.pending.extend_from_slice(&buf[..got]);
    }
}

/// Answers vmmd's commands until stdin closes.
fn serve_control(
    mut control: Control,
    gate: &PauseGate,
    threads: &[libc::pthread_t],
    slots: &[(String, crate::devices::virtio::SharedTransport)],
) {
    let mut fds = Vec::new();
    while let Some(line) = next_line(&mut control, &mut fds, MAX_COMMAND) {
        let refused = |reason: String| WorkerMessage::Refused { reason };
        let answer = match serde_json::from_str::<WorkerCommand>(&line) {
            Err(e) => refused(format!("not a command: {e}")),
            Ok(WorkerCommand::Pause {}) => match gate.pause(threads, PAUSE_TIMEOUT) {
                Ok(()) => WorkerMessage::Done,
                Err(e) => refused(e.to_string()),
            },
            Ok(WorkerCommand::Resume {}) => {
                gate.resume();
                WorkerMessage::Done
            }
            Ok(WorkerCommand::Counters {}) => {
                let (r, w, reads, writes) = crate::devices::virtio::block::IO.totals();
                let (exits_io, exits_mmio, exits_other) = crate::vstate::vcpu::EXITS.totals();
                WorkerMessage::Counters {
                    counters: steelcup_proto::worker::DeviceCounters {
                        block_read_bytes: r,
                        block_write_bytes: w,
                        block_reads: reads,
                        block_writes: writes,
                        exits_io,
                        exits_mmio,
                        exits_other,
                        boot_ns: boot_ns(),
                    },
                }
            }
            // vmmd says how long the image is (the filter allows no fstat).
            Ok(WorkerCommand::Attach { disk, bytes }) => {
                match (fds.pop(), slots.iter().find(|(s, _)| *s == disk)) {
                    (None, _) => refused("attach needs a disk image passed with it".into()),
                    (_, None) => refused(format!("no empty disk slot {disk:?}")),
                    (Some(file), Some((_, t))) => {
                        match crate::devices::virtio::lock(t).attach_backing(file, bytes) {
                            Ok(()) => {
                                if disk == "root" {
                                    CLAIMED_NS.store(
                                        monotonic_ns(),
                                        std::sync::atomic::Ordering::Relaxed,
                                    );
                                }
                                WorkerMessage::Done
                            }
                            Err(e) => refused(e.to_string()),
                        }
                    }
                }
            }
        };
        // Descriptors no command took are not kept.
        fds.clear();
        send(&answer);
    }
}

/// `vmmd worker`: reads the config from stdin, runs the VM, writes the report.
pub fn main() -> i32 {
    let t0 = Instant::now();
    MAIN_NS.store(monotonic_ns(), std::sync::atomic::Ordering::Relaxed);
    init_logging();
    // vmmd alone decides when a VM ends: a SIGTERM or SIGINT meant for vmmd's
    // whole process group (init stopping the vmmd unit, Ctrl-C on a
    // terminal) must not kill the VM before vmmd has asked the guest to stop.
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: sets a signal to be ignored; no handler code runs.
        unsafe {
            libc::signal(sig, libc::SIG_IGN);
        }
    }
    // The control socket carries the messages back; a pipe (a worker run
    // by hand) cannot, so they go to stderr then.
    if !nix::sys::stat::fstat(std::io::stdin())
        .is_ok_and(|s| s.st_mode & libc::S_IFMT == libc::S_IFSOCK)
    {
        MESSAGES_FD.store(2, std::sync::atomic::Ordering::Relaxed);
    }
    let vm = create_vm();
    let mut control = Control {
        pending: Vec::new(),
        fd: 0,
    };
    let mut handles = Vec::new();
    let outcome = match next_line(&mut control, &mut handles, 1 << 20) {
        None => VmOutcome::VmmError {
            message: "read config from stdin: closed before a whole line".into(),
        },
        Some(line) => match serde_json::from_str::<VmConfig>(&line) {
            Err(e) => VmOutcome::VmmError {
                message: format!("config on stdin: {e}"),
            },
            Ok(config) => run_vm(&config, handles, control, vm),
        },
    };
    let report = WorkerReport {
        outcome,
        run_ms: t0.elapsed().as_millis() as u64,
    };
    send(&WorkerMessage::Report { report });
    0
}

/// The program vmmd starts as a VM's worker, with the arguments `worker
/// NAME`: `vmm-worker` beside the running executable (the worker alone,
/// installed with vmmd as `/usr/bin/vmm-worker`), or else the running
/// executable itself (`vmmd worker` runs the same worker, with the rest of
/// vmmd mapped in).
pub fn exe() -> std::path::PathBuf {
    let own = std::env::current_exe().unwrap_or_else(|_| "/usr/bin/vmmd".into());
    sibling_worker(&own).unwrap_or(own)
}

/// `vmm-worker` in the directory of `own`, if it is there.
fn sibling_worker(own: &std::path::Path) -> Option<std::path::PathBuf> {
    let candidate = own.parent()?.join("vmm-worker");
    candidate.is_file().then_some(candidate)
}

/// The worker's own log lines (a device refusing what the guest wrote,
/// rate limited; PIT replay left on) go to its stderr, one `write` each
/// (the seccomp filter allows it), without time or level colours: vmmd
/// prints them in its log under the workload's name. `STEELCUP_LOG` set
/// to a level (`warn`, `debug`, ...) changes the default `info`; a level
/// and no directive syntax, since `EnvFilter`'s parser would add a MB to
/// the worker and its start-up to every VM's setup.
fn init_logging() {
    let level = std::env::var("STEELCUP_LOG")
        .ok()
        .and_then(|v| v.parse::<tracing_subscriber::filter::LevelFilter>().ok())
        .unwrap_or(tracing_subscriber::filter::LevelFilter::INFO);
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .without_time()
        .with_max_level(level)
        .try_init();
}

pub use steelcup_sys::error_chain;

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::{AsFd, AsRawFd};
    use std::os::unix::net::UnixStream;

    fn control_on(fd: &impl AsRawFd) -> Control {
        Control {
            pending: Vec::new(),
            fd: fd.as_raw_fd(),
        }
    }

    /// A config with two disks and a tap came with three descriptors, and
    /// the worker's buffer had room for two: it got none.
    #[test]
    fn a_config_s_disks_and_tap_all_arrive_with_it() {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let (vmmd, worker) = UnixStream::pair().unwrap();
        let mut control = control_on(&worker);
        let files: Vec<std::fs::File> = (0..3)
            .map(|_| std::fs::File::open("/proc/self/exe").unwrap())
            .collect();
        let raw: Vec<i32> = files.iter().map(|f| f.as_raw_fd()).collect();
        let line = b"{\"config\": 1}\n";
        sendmsg::<()>(
            vmmd.as_raw_fd(),
            &[std::io::IoSlice::new(line)],
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let mut fds = Vec::new();
        assert_eq!(
            next_line(&mut control, &mut fds, 1 << 20).as_deref(),
            Some("{\"config\": 1}")
        );
        assert_eq!(fds.len(), 3);
        // More than a message may carry ends the channel, not silently
        // short.
        let many: Vec<std::fs::File> = (0..MAX_HANDLES + 1)
            .map(|_| std::fs::File::open("/proc/self/exe").unwrap())
            .collect();
        let raw: Vec<i32> = many.iter().map(|f| f.as_raw_fd()).collect();
        sendmsg::<()>(
            vmmd.as_raw_fd(),
            &[std::io::IoSlice::new(b"pause\n")],
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let mut fds = Vec::new();
        assert_eq!(next_line(&mut control, &mut fds, 64), None);
    }

    #[test]
    fn commands_arrive_with_the_descriptors_passed_along() {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let (mut vmmd, worker) = UnixStream::pair().unwrap();
        let mut control = control_on(&worker);
        vmmd.write_all(b"{\"config\": 1}\npause\n").unwrap();
        let mut fds = Vec::new();
        assert_eq!(
            next_line(&mut control, &mut fds, 1 << 20).as_deref(),
            Some("{\"config\": 1}")
        );
        assert_eq!(
            next_line(&mut control, &mut fds, 64).as_deref(),
            Some("pause")
        );
        let image = std::fs::File::open("/proc/self/exe").unwrap();
        let line = b"attach root 4096\n";
        sendmsg::<()>(
            vmmd.as_raw_fd(),
            &[std::io::IoSlice::new(line)],
            &[ControlMessage::ScmRights(&[image.as_fd().as_raw_fd()])],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        assert_eq!(
            next_line(&mut control, &mut fds, 64).as_deref(),
            Some("attach root 4096")
        );
        assert_eq!(fds.len(), 1, "the image came with its command");
        let same = |a: &std::fs::File, b: &std::fs::File| {
            let (a, b) = (a.metadata().unwrap(), b.metadata().unwrap());
            use std::os::unix::fs::MetadataExt;
            (a.dev(), a.ino()) == (b.dev(), b.ino())
        };
        assert!(same(&fds[0], &image));
        drop(vmmd);
        assert_eq!(next_line(&mut control, &mut fds, 64), None, "closed");
    }

    #[test]
    fn a_pipe_works_without_descriptors_and_long_lines_end_the_channel() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let mut w = std::fs::File::from(w);
        w.write_all(b"resume\n").unwrap();
        let mut control = control_on(&r);
        let mut fds = Vec::new();
        assert_eq!(
            next_line(&mut control, &mut fds, 64).as_deref(),
            Some("resume")
        );
        w.write_all(&[b'x'; 5000]).unwrap();
        assert_eq!(
            next_line(&mut control, &mut fds, 64),
            None,
            "over the limit"
        );
        assert!(fds.is_empty());
    }

    #[test]
    fn the_worker_binary_beside_vmmd_is_preferred() {
        let dir = tempfile::tempdir().unwrap();
        let own = dir.path().join("vmmd");
        std::fs::write(&own, b"").unwrap();
        assert_eq!(sibling_worker(&own), None, "no vmm-worker installed");
        std::fs::create_dir(dir.path().join("vmm-worker")).unwrap();
        assert_eq!(sibling_worker(&own), None, "a directory is not a program");
        std::fs::remove_dir(dir.path().join("vmm-worker")).unwrap();
        std::fs::write(dir.path().join("vmm-worker"), b"").unwrap();
        assert_eq!(sibling_worker(&own), Some(dir.path().join("vmm-worker")));
    }
}
