//! The VMs' worker processes: starting one (its cgroup, its descriptors,
//! its config on the control socket), its control channel, and reading
//! what it says: its guest's console, its log, its protocol messages.

use super::*;

/// A worker's stdin (commands, a Unix socket so a command can carry a
/// descriptor) and its answers (from its stderr).
#[derive(Debug)]
pub(super) struct WorkerControl {
    pub(super) commands: UnixStream,
    /// Each command's answer: done, or refused and why.
    pub(super) answers: mpsc::Receiver<Answer>,
}

/// A worker's answer to a control command.
#[derive(Debug)]
pub(super) enum Answer {
    Done,
    /// Not carried out, and the worker's reason.
    Refused(String),
    Counters(steelcup_proto::worker::DeviceCounters),
}

/// How long a worker has to answer a control command.
pub(super) const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

impl WorkerControl {
    /// Sends `command`; Ok once the worker has carried it out.
    pub(super) fn ask(&mut self, command: &WorkerCommand) -> Result<(), VmError> {
        while self.answers.try_recv().is_ok() {}
        self.commands
            .write_all(command.line().as_bytes())
            .and_then(|_| self.commands.flush())
            .map_err(VmError::io("the worker's control channel"))?;
        self.answer(command)
    }

    /// Sends `command` with descriptor `fd` passed along (`SCM_RIGHTS`).
    pub(super) fn ask_with_fd(
        &mut self,
        command: &WorkerCommand,
        fd: std::os::fd::BorrowedFd,
    ) -> Result<(), VmError> {
        while self.answers.try_recv().is_ok() {}
        send_with_fds(&self.commands, command.line().as_bytes(), &[fd])
            .map_err(VmError::io("the worker's control channel"))?;
        self.answer(command)
    }

    /// The VM's device counters; None when the worker does not answer
    /// within a second (`cup stats` shows the host's counters alone).
    pub(super) fn counters(&mut self) -> Option<steelcup_proto::worker::DeviceCounters> {
        while self.answers.try_recv().is_ok() {}
        let line = WorkerCommand::Counters {}.line();
        self.commands.write_all(line.as_bytes()).ok()?;
        match self.answers.recv_timeout(Duration::from_secs(1)) {
            Ok(Answer::Counters(c)) => Some(c),
            _ => None,
        }
    }

    pub(super) fn answer(&mut self, command: &WorkerCommand) -> Result<(), VmError> {
        match self.answers.recv_timeout(CONTROL_TIMEOUT) {
            Ok(Answer::Done) => Ok(()),
            Ok(Answer::Counters(_)) => Err(VmError::Refused {
                command: format!("{command:?}"),
                reason: "answered with counters".into(),
            }),
            Ok(Answer::Refused(reason)) => Err(VmError::Refused {
                command: format!("{command:?}"),
                reason,
            }),
            Err(_) => Err(VmError::NoAnswer {
                command: format!("{command:?}"),
                secs: CONTROL_TIMEOUT.as_secs(),
            }),
        }
    }
}

/// Writes `bytes` on `sock` with `fds` passed along (`SCM_RIGHTS`, with
/// the first bytes); the rest of a short write follows plainly.
pub(super) fn send_with_fds(
    sock: &UnixStream,
    bytes: &[u8],
    fds: &[std::os::fd::BorrowedFd],
) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::os::fd::AsRawFd;
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs = [ControlMessage::ScmRights(&raw)];
    let sent = sendmsg::<()>(
        sock.as_raw_fd(),
        &[std::io::IoSlice::new(bytes)],
        if raw.is_empty() { &[] } else { &cmsgs },
        MsgFlags::empty(),
        None,
    )
    .map_err(std::io::Error::from)?;
    (&*sock).write_all(&bytes[sent..])
}

/// The descriptors a worker gets with its config (see
/// `steelcup_proto::worker::VmConfig`): each disk that is not an empty
/// slot, opened here (writable ones locked), then the VM's tap, made here
/// and put on its bridge. The jailed worker opens none of them itself and
/// needs no network capability.
pub(super) fn open_vm_handles(vm: &VmConfig) -> Result<Vec<std::fs::File>, VmError> {
    if vm.handles() > steelcup_vmm::worker::MAX_HANDLES {
        return Err(VmError::TooManyHandles {
            count: vm.handles(),
            max: steelcup_vmm::worker::MAX_HANDLES,
        });
    }
    let mut handles = Vec::new();
    for d in vm.disks.iter().filter(|d| !d.empty_slot) {
        let f = steelcup_vmm::devices::virtio::block::Block::open_file(&d.path, d.read_only)
            .map_err(|source| VmError::Disk {
                id: d.id.clone(),
                source,
            })?;
        handles.push(f);
    }
    if let Some(n) = &vm.net {
        handles.push(crate::net::link::open_tap(n)?);
    }
    Ok(handles)
}

/// The name a worker's output and end are reported under: a warm-pool
/// VM's (`_pool-N`) until a workload claims it, then the workload's.
pub(super) type Label = Arc<Mutex<String>>;

pub(super) fn label_of(l: &Label) -> String {
    l.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// A running worker, as its starter holds it.
#[derive(Debug)]
pub struct Worker {
    pub(super) pid: i32,
    pub(super) control: Option<WorkerControl>,
    pub(super) label: Label,
    /// Set when a workload takes a warm VM: the time the VM waited in the
    /// pool (ms), which its reported run time leaves out.
    pub(super) waited_ms: Arc<std::sync::atomic::AtomicU64>,
    pub(super) started: Instant,
    pub(super) cgroup: Arc<Mutex<Option<steelcup_vmm::jail::cgroup::VmCgroup>>>,
    /// The VM's tap, when it has a network.
    pub(super) tap: Option<String>,
}

impl Worker {
    /// From now on the worker's output and end are reported as `name`'s,
    /// its run time less `waited` (the time a warm VM spent in the pool).
    pub(super) fn report_as(&self, name: &str, waited: Duration) {
        *self.label.lock().unwrap_or_else(|p| p.into_inner()) = name.to_string();
        self.waited_ms.store(
            waited.as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}

/// Starts a worker for `vm` (its cgroup named after `vm.name`); a monitor
/// thread reports its end on `tx` under the worker's label.
pub(super) fn spawn_worker(
    opts: &Options,
    vm: &VmConfig,
    tx: mpsc::Sender<Event>,
) -> Result<Worker, VmError> {
    let name = vm.name.as_str();
    let mut config = serde_json::to_vec(&vm).map_err(VmError::Encode)?;
    config.push(b'\n');
    let cgroup = opts.cgroup_root.as_ref().and_then(|root| {
        let limits =
            steelcup_vmm::jail::cgroup::Limits::for_vm(vm.vcpus, vm.memory_mib, vm.cpu_max_millis);
        steelcup_vmm::jail::cgroup::VmCgroup::create(root, name, limits)
            .map_err(|e| tracing::warn!("workload {name}: no cgroup, limits are off: {e}"))
            .ok()
    });
    let mut cmd = Command::new(&opts.worker_exe);
    steelcup_sys::reset_signal_mask(&mut cmd);
    let procs_fd = cgroup.as_ref().map(|c| c.procs_fd());
    // SAFETY: the closure runs between fork and exec and makes only
    // async-signal-safe calls (prctl, write).
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            // A worker never outlives vmmd (its control channel and output
            // go to vmmd).
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(fd) = procs_fd {
                steelcup_vmm::jail::cgroup::join_self(fd)?;
            }
            Ok(())
        });
    }
    let handles = open_vm_handles(vm)?;
    let (commands, theirs) =
        UnixStream::pair().map_err(VmError::io("a control socket for the worker"))?;
    let mut child = cmd
        .args(["worker", name])
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| VmError::Spawn {
            program: opts.worker_exe.clone(),
            source,
        })?;
    let pid = child.id() as i32;
    let started = Instant::now();
    // One line with the VM's descriptors; the worker reads it first thing.
    let fds: Vec<_> = handles.iter().map(std::os::fd::AsFd::as_fd).collect();
    send_with_fds(&commands, &config, &fds)
        .map_err(VmError::io("send the config to the worker"))?;
    drop(handles);
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let messages = commands
        .try_clone()
        .map_err(VmError::io("the worker's control socket"))?;
    let label: Label = Arc::new(Mutex::new(name.to_string()));
    let cgroup = Arc::new(Mutex::new(cgroup));
    let (answer_tx, answers) = mpsc::channel();
    let logs = opts.logs.clone();
    let (l, cg) = (label.clone(), cgroup.clone());
    let waited_ms: Arc<std::sync::atomic::AtomicU64> = Arc::default();
    let waited = waited_ms.clone();
    std::thread::Builder::new()
        .name(format!("worker-{name}"))
        .spawn(move || {
            let out_thread = stdout.map(|o| {
                let l = l.clone();
                let logs = logs.clone();
                std::thread::spawn(move || echo_guest(&l, o, &logs))
            });
            let err_thread = stderr.map(|e| {
                let l = l.clone();
                std::thread::spawn(move || echo_worker_log(&l, e))
            });
            let report = read_messages(&l, messages, &answer_tx);
            let status = child.wait();
            if let Some(t) = err_thread {
                let _ = t.join();
            }
            let ran = started.elapsed();
            if let Some(c) = cg.lock().unwrap_or_else(|p| p.into_inner()).take() {
                c.remove();
            }
            if let Some(t) = out_thread {
                let _ = t.join();
            }
            let mut report = report.unwrap_or_else(|| WorkerReport {
                outcome: VmOutcome::VmmError {
                    message: worker_death(&status),
                },
                run_ms: ran.as_millis() as u64,
            });
            report.run_ms = report
                .run_ms
                .saturating_sub(waited.load(std::sync::atomic::Ordering::Relaxed));
            let name = label_of(&l);
            let _ = tx.send(Event::Ended { name, report });
        })
        .map_err(VmError::io("spawn a monitor thread"))?;
    Ok(Worker {
        pid,
        control: Some(WorkerControl { commands, answers }),
        label,
        waited_ms,
        started,
        cgroup,
        tap: vm.net.as_ref().map(|n| n.tap.clone()),
    })
}

/// Kills a VM's worker (its monitor thread reports the end); pids of 0 or
/// less are never signalled.
pub(super) fn kill_worker(pid: i32) {
    if pid > 0 {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Why a worker ended without a report.
pub(super) fn worker_death(status: &std::io::Result<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.signal(), s.code()) {
            (Some(sig), _) => match Signal::try_from(sig) {
                // SIGSYS: the seccomp filter killed it for a forbidden call.
                Ok(Signal::SIGSYS) => {
                    "worker killed by SIGSYS (a syscall its seccomp filter forbids)".into()
                }
                Ok(sig) => format!("worker killed by {sig}"),
                Err(_) => format!("worker killed by signal {sig}"),
            },
            (None, Some(code)) => format!("worker exited with code {code} without a report"),
            _ => "worker ended without a report".into(),
        },
        Err(e) => format!("wait for worker: {e}"),
    }
}

/// Passes guest output on as `NAME | line` and into the workload's log,
/// lines capped at [`MAX_LINE`].
pub(super) fn echo_guest(label: &Label, out: impl Read, logs: &LogStore) {
    let mut r = BufReader::new(out);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut r).take(MAX_LINE).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end_matches(['\n', '\r']);
                let name = label_of(label);
                logs.push(&name, text);
                let mut so = std::io::stdout().lock();
                let _ = writeln!(so, "{name} | {text}");
                let _ = so.flush();
            }
        }
    }
}

/// The worker's own log lines (its stderr), under the workload's name.
pub(super) fn echo_worker_log(label: &Label, err: impl Read) {
    for line in BufReader::new(err).lines().map_while(Result::ok) {
        eprintln!("{}: {line}", label_of(label));
    }
}

/// Reads the worker's messages on its control socket until it closes:
/// answers go to `answers`, the report is returned.
pub(super) fn read_messages(
    label: &Label,
    socket: UnixStream,
    answers: &mpsc::Sender<Answer>,
) -> Option<WorkerReport> {
    let mut report = None;
    // A line is a short JSON object; a worker that sends more is cut off.
    let mut reader = BufReader::new(socket);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader).take(MAX_MESSAGE).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) if line.last() != Some(&b'\n') => {
                tracing::error!(
                    "workload {}: a worker message over {MAX_MESSAGE} bytes; its control channel is closed",
                    label_of(label)
                );
                break;
            }
            Ok(_) => {}
        }
        match serde_json::from_slice::<WorkerMessage>(&line) {
            Ok(WorkerMessage::Done) => {
                let _ = answers.send(Answer::Done);
            }
            Ok(WorkerMessage::Refused { reason }) => {
                let _ = answers.send(Answer::Refused(reason));
            }
            Ok(WorkerMessage::Counters { counters }) => {
                let _ = answers.send(Answer::Counters(counters));
            }
            Ok(WorkerMessage::Report { report: r }) => report = Some(r),
            Ok(timing) => tracing::debug!("workload {}: {timing:?}", label_of(label)),
            Err(e) => tracing::error!(
                "workload {}: unreadable worker message: {e}",
                label_of(label)
            ),
        }
    }
    report
}

/// The longest message a worker sends (a report with a long VMM error).
pub(super) const MAX_MESSAGE: u64 = 64 * 1024;
