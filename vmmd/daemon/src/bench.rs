//! `vmmd bench`: steelcup's VMM side by side with QEMU's `microvm` machine,
//! same host, same guest kernel and initramfs, same run.
//!
//! # Method
//! Each round starts our worker (`vmm-worker`, the process vmmd runs per
//! VM) and then QEMU (`-M microvm -accel kvm -cpu host`, no default
//! devices, serial on stdio) with the same kernel, the same initramfs with
//! the same guest config appended (vminit running `echo MARKER`), the same
//! command line, 1 vCPU and the same memory. For each it measures:
//! - time from just before the process is spawned to the marker line on
//!   the guest's serial console (the guest's userspace has run);
//! - VMM setup (ours only): spawn to vCPU 0's first `KVM_RUN`, which the
//!   worker reports on CLOCK_MONOTONIC;
//! - peak RSS of the process (`ru_maxrss` from `wait4`);
//! - VMM overhead: RSS when the marker arrives minus the RSS of the guest
//!   memory mapping (the largest mapping in `/proc/PID/smaps`, at least the
//!   guest's size), i.e. what the VMM holds besides guest memory the guest
//!   touched.
//!
//! Medians over the rounds are printed as lines starting `vmm-bench| `
//! (a Markdown table), which `cargo xtask bench` copies into
//! `docs/performance.md`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use steelcup_proto::guest::GuestConfig;
use steelcup_proto::worker::{VmConfig, WorkerMessage, DEFAULT_CMDLINE};
use steelcup_vmm::builder;

const MARKER: &str = "steelcup-bench: guest userspace is up";
const PREFIX: &str = "vmm-bench| ";

/// One measurement.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub setup_ms: Option<f64>,
    pub to_line_ms: f64,
    pub peak_rss_kib: u64,
    pub overhead_kib: u64,
}

struct Args {
    rounds: usize,
    qemu: PathBuf,
    memory_mib: u64,
    kernel: PathBuf,
    initramfs: PathBuf,
    cmdline: String,
    trace: bool,
    setup_only: bool,
    huge_pages: bool,
    /// The guest kernel as an ELF vmlinux (PVH): when it exists, every VMM
    /// boots it (Firecracker and Cloud Hypervisor take nothing else).
    vmlinux: PathBuf,
    firecracker: PathBuf,
    cloud_hypervisor: PathBuf,
}

/// Where the bench image carries the peers and the ELF kernel.
const PEER_DIR: &str = "/usr/lib/steelcup/bench";

fn parse(args: &[String]) -> Result<Args, String> {
    let mut a = Args {
        rounds: 5,
        qemu: "/usr/bin/qemu-system-x86_64".into(),
        memory_mib: 128,
        kernel: crate::daemon::DEFAULT_KERNEL.into(),
        initramfs: crate::daemon::DEFAULT_INITRAMFS.into(),
        cmdline: DEFAULT_CMDLINE.into(),
        trace: false,
        setup_only: false,
        huge_pages: false,
        vmlinux: format!("{PEER_DIR}/vmlinux").into(),
        firecracker: format!("{PEER_DIR}/firecracker").into(),
        cloud_hypervisor: format!("{PEER_DIR}/cloud-hypervisor").into(),
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--rounds" => a.rounds = value()?.parse().map_err(|e| format!("--rounds: {e}"))?,
            "--memory" => a.memory_mib = value()?.parse().map_err(|e| format!("--memory: {e}"))?,
            "--qemu" => a.qemu = value()?.into(),
            "--kernel" => a.kernel = value()?.into(),
            "--initramfs" => a.initramfs = value()?.into(),
            "--cmdline" => a.cmdline = value()?,
            "--trace" => a.trace = true,
            "--setup-only" => a.setup_only = true,
            "--huge-pages" => a.huge_pages = true,
            "--vmlinux" => a.vmlinux = value()?.into(),
            "--firecracker" => a.firecracker = value()?.into(),
            "--cloud-hypervisor" => a.cloud_hypervisor = value()?.into(),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(a)
}

/// `vmmd bench [--rounds N] [--memory MIB] [--qemu PATH] [--kernel PATH]
/// [--initramfs PATH] [--cmdline TEXT] [--trace] [--setup-only] [--huge-pages]
/// [--vmlinux PATH] [--firecracker PATH] [--cloud-hypervisor PATH]`; `--trace`
/// prints every line of each guest's console with the ms since its VMM was
/// spawned. `--setup-only` measures the worker's setup alone, each worker
/// killed at its first `KVM_RUN` (no QEMU, and the guest need not boot, so
/// it runs wherever `/dev/kvm` can create a VM). `--huge-pages` gives our
/// guest memory transparent huge pages, as QEMU asks for its own.
pub fn main(args: &[String]) -> i32 {
    match run(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("vmmd bench: {e}");
            1
        }
    }
}

fn run(args: &[String]) -> Result<(), String> {
    let mut a = parse(args)?;
    // One guest kernel for all four: the ELF vmlinux where the image has
    // it (built with the bzImage, from the same configuration).
    let elf = !a.setup_only && a.vmlinux.is_file();
    if elf {
        a.kernel = a.vmlinux.clone();
        eprintln!("vmmd bench: every VMM boots {}", a.kernel.display());
    }
    let config = VmConfig {
        name: "bench".into(),
        kernel: a.kernel.clone(),
        initramfs: a.initramfs.clone(),
        cmdline: a.cmdline.clone(),
        vcpus: 1,
        memory_mib: a.memory_mib,
        memory_backing: Default::default(),
        huge_pages: a.huge_pages,
        guest: GuestConfig {
            cmd: vec!["/bin/echo".into(), MARKER.into()],
            env: Default::default(),
            workdir: None,
            hostname: Some("bench".into()),
            root: None,
            volumes: vec![],
            network: None,
            user: None,
            attach: false,
            tty: false,
            rlimits: Default::default(),
            ..Default::default()
        },
        disks: vec![],
        vsock: None,
        net: None,
        report_timing: true,
        jail_scratch: None,
        cpu_max_millis: None,
    };
    // QEMU gets the very initramfs our worker builds in guest memory.
    let mut initrd =
        std::fs::read(&a.initramfs).map_err(|e| format!("read {}: {e}", a.initramfs.display()))?;
    initrd.extend(builder::guest_config_cpio(&config).map_err(|e| e.to_string())?);
    let initrd_path = std::env::temp_dir().join("steelcup-bench-initramfs.cpio");
    std::fs::write(&initrd_path, &initrd)
        .map_err(|e| format!("write {}: {e}", initrd_path.display()))?;
    let line = serde_json::to_string(&config).map_err(|e| e.to_string())? + "\n";
    // The worker vmmd itself would start.
    let exe = steelcup_vmm::worker::exe();

    if a.setup_only {
        return setup_only(&a, &exe, &line);
    }

    let (mut ours, mut qemu, mut scraped) = (Vec::new(), Vec::new(), Vec::new());
    let mut peers = peers(&a, elf, &initrd_path)?;
    for round in 1..=a.rounds {
        // Our worker plain, and again with its counters read as a scrape
        // reads them; which goes first alternates, so whatever the boot
        // before leaves behind (a VM still being torn down) weighs on both
        // alike.
        for scrape in [round % 2 == 0, round % 2 == 1] {
            let s = measure(
                Command::new(&exe).args(["worker", "bench"]),
                Some(&line),
                a.memory_mib,
                true,
                (a.trace && !scrape).then_some("steelcup"),
                scrape.then_some(SCRAPE_EVERY),
            )?;
            if scrape {
                eprintln!("vmmd bench: round {round}: steelcup scraped {s:?}");
                scraped.push(s);
            } else {
                eprintln!("vmmd bench: round {round}: steelcup {s:?}");
                ours.push(s);
            }
        }
        let mut cmd = Command::new(&a.qemu);
        cmd.args([
            "-M",
            "microvm,x-option-roms=off,rtc=off",
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-smp",
            "1",
            "-m",
        ])
        .arg(format!("{}M", a.memory_mib))
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
            "-kernel",
        ])
        .arg(&a.kernel)
        .arg("-initrd")
        .arg(&initrd_path)
        .arg("-append")
        .arg(&a.cmdline);
        let s = measure(
            &mut cmd,
            None,
            a.memory_mib,
            false,
            a.trace.then_some("qemu"),
            None,
        )?;
        eprintln!("vmmd bench: round {round}: QEMU microvm {s:?}");
        qemu.push(s);
        for p in peers.iter_mut().filter(|p| p.skipped.is_none()) {
            // Each stopped at the marker: Cloud Hypervisor would reboot the
            // guest at its end rather than exit.
            match measure(
                &mut (p.command)(),
                None,
                a.memory_mib,
                false,
                a.trace.then_some(p.name),
                None,
            ) {
                Ok(s) => {
                    eprintln!("vmmd bench: round {round}: {} {s:?}", p.name);
                    p.samples.push(s);
                }
                Err(e) => {
                    eprintln!("vmmd bench: round {round}: {} failed: {e}", p.name);
                    p.skipped = Some(format!("failed in round {round}: {e}"));
                    p.samples.clear();
                }
            }
        }
    }
    let _ = std::fs::remove_file(&initrd_path);
    let measured: Vec<(&str, &[Sample])> = peers
        .iter()
        .filter(|p| p.skipped.is_none())
        .map(|p| (p.name, p.samples.as_slice()))
        .collect();
    for l in table(&ours, &qemu, &measured, a.memory_mib) {
        println!("{PREFIX}{l}");
    }
    for p in peers
        .iter()
        .filter_map(|p| Some((p.name, p.skipped.as_ref()?)))
    {
        println!("{PREFIX}skipped: {}: {}", p.0, p.1);
    }
    println!("{PREFIX}rounds: {}", rounds_line(&ours, &qemu));
    println!("{PREFIX}targets: {}", verdict(&ours, &qemu, &measured));
    println!("{PREFIX}metrics: {}", metrics_cost(&ours, &scraped));
    if let Some(floor) = start_floor(&exe, a.rounds)? {
        println!("{PREFIX}floor: {floor:.1}");
    }
    println!("vmm-bench: done");
    Ok(())
}

/// A peer VMM in the run: how to start it on the bench's guest, and what
/// it gave (or why it was not run).
struct Peer {
    name: &'static str,
    command: Box<dyn Fn() -> Command>,
    skipped: Option<String>,
    samples: Vec<Sample>,
}

/// Firecracker and Cloud Hypervisor on the same kernel (ELF), initramfs
/// (with the guest config), command line, 1 vCPU and memory; each without
/// an API socket. A missing binary or kernel makes the peer skipped, said
/// with the reason.
fn peers(a: &Args, elf: bool, initrd: &std::path::Path) -> Result<Vec<Peer>, String> {
    let skipped = |path: &PathBuf| {
        if !path.is_file() {
            Some(format!("{} is not in the image (cargo xtask bench takes it from $STEELCUP_PEERS or ../shared/peers)", path.display()))
        } else if !elf {
            Some(format!(
                "it boots only an ELF vmlinux, and {} is not there",
                a.vmlinux.display()
            ))
        } else {
            None
        }
    };
    let fc_config = std::env::temp_dir().join("steelcup-bench-firecracker.json");
    let config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": a.kernel,
            "initrd_path": initrd,
            "boot_args": a.cmdline,
        },
        "drives": [],
        "machine-config": { "vcpu_count": 1, "mem_size_mib": a.memory_mib },
    });
    std::fs::write(&fc_config, config.to_string())
        .map_err(|e| format!("write {}: {e}", fc_config.display()))?;
    let fc = a.firecracker.clone();
    let fc_log = std::env::temp_dir().join("steelcup-bench-firecracker.log");
    let firecracker = move || {
        let mut c = Command::new(&fc);
        // Its own log to a file: stdout is the guest's serial port.
        c.arg("--no-api")
            .arg("--config-file")
            .arg(&fc_config)
            .arg("--log-path")
            .arg(&fc_log);
        c
    };
    let (ch, kernel, initrd, cmdline, memory) = (
        a.cloud_hypervisor.clone(),
        a.kernel.clone(),
        initrd.to_path_buf(),
        a.cmdline.clone(),
        a.memory_mib,
    );
    let cloud_hypervisor = move || {
        let mut c = Command::new(&ch);
        c.arg("--kernel")
            .arg(&kernel)
            .arg("--initramfs")
            .arg(&initrd)
            .arg("--cmdline")
            .arg(&cmdline)
            .args(["--cpus", "boot=1", "--memory"])
            .arg(format!("size={memory}M"))
            .args(["--serial", "tty", "--console", "off"]);
        c
    };
    Ok(vec![
        Peer {
            name: "Firecracker",
            command: Box::new(firecracker),
            skipped: skipped(&a.firecracker),
            samples: Vec::new(),
        },
        Peer {
            name: "Cloud Hypervisor",
            command: Box::new(cloud_hypervisor),
            skipped: skipped(&a.cloud_hypervisor),
            samples: Vec::new(),
        },
    ])
}

/// `--setup-only`: the worker's setup, spawn to first `KVM_RUN`, over the
/// rounds (each worker killed there), beside starting the worker binary
/// alone; printed as a `vmm-bench| ` table, the target and the phases of
/// the median round.
fn setup_only(a: &Args, exe: &std::path::Path, line: &str) -> Result<(), String> {
    let mut rounds = Vec::new();
    for round in 1..=a.rounds {
        let (ms, phases) = setup_round(exe, line)?;
        eprintln!("vmmd bench: round {round}: setup {ms:.1} ms ({phases})");
        rounds.push((ms, phases));
    }
    rounds.sort_by(|x, y| x.0.total_cmp(&y.0));
    let (med, phases) = rounds[rounds.len() / 2].clone();
    let (min, max) = (rounds[0].0, rounds[rounds.len() - 1].0);
    println!(
        "{PREFIX}| worker, 1 vCPU, {} MiB | median | min | max |",
        a.memory_mib
    );
    println!("{PREFIX}|---|---|---|---|");
    println!(
        "{PREFIX}| setup: spawn to first `KVM_RUN` | **{med:.1} ms** | {min:.1} ms | {max:.1} ms |"
    );
    if let Some(floor) = start_floor(exe, a.rounds)? {
        println!("{PREFIX}| starting the binary alone: spawn to exit of `vmm-worker --version` | {floor:.1} ms | | |");
    }
    let mark = if med < 10.0 { "met" } else { "not met" };
    println!("{PREFIX}targets: setup under 10 ms: {mark} ({med:.1} ms)");
    println!("{PREFIX}phases: {phases}");
    println!("vmm-bench: done");
    Ok(())
}

/// Starts the worker `cmd` as vmmd does: its control socket as stdin, the
/// config `line` sent on it. Returns the child and vmmd's end of the
/// socket, where the worker's messages arrive.
fn spawn_worker(
    cmd: &mut Command,
    line: &str,
) -> Result<(std::process::Child, UnixStream), String> {
    let (mut ours, theirs) =
        UnixStream::pair().map_err(|e| format!("a control socket for the worker: {e}"))?;
    let child = cmd
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
        .spawn()
        .map_err(|e| format!("start {cmd:?}: {e}"));
    // The command keeps the worker's end of the socket until it is
    // dropped, which is after the measurement: let it go now, so the
    // worker's messages end (and their reader with them) when it exits.
    cmd.stdin(Stdio::null());
    let child = child?;
    ours.write_all(line.as_bytes())
        .map_err(|e| format!("config to the worker: {e}"))?;
    Ok((child, ours))
}

/// The worker's messages on `socket`, as they come, until it closes.
fn worker_messages(socket: UnixStream) -> impl Iterator<Item = WorkerMessage> {
    BufReader::new(socket)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str(&l).ok())
}

/// The first lines of `err` (a child's stderr), for an error message; the
/// rest is read and counted, so a chatty child never blocks on a full pipe.
fn first_lines(
    err: Option<impl std::io::Read + Send + 'static>,
    trace: Option<String>,
) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let Some(e) = err else {
            return Vec::new();
        };
        let mut kept = Vec::new();
        let mut more = 0usize;
        for l in BufReader::new(e).lines().map_while(Result::ok) {
            if let Some(label) = &trace {
                eprintln!("vmmd bench: {label} stderr | {l}");
            }
            if kept.len() < 20 {
                kept.push(l);
            } else {
                more += 1;
            }
        }
        if more > 0 {
            kept.push(format!("({more} more lines)"));
        }
        kept
    })
}

/// One worker started with `line` as its config and killed at its first
/// `KVM_RUN`: ms from spawn to then, and its phases (ms after spawn).
fn setup_round(exe: &std::path::Path, line: &str) -> Result<(f64, String), String> {
    let t0 = steelcup_vmm::worker::monotonic_ns();
    let (mut child, control) = spawn_worker(
        Command::new(exe)
            .args(["worker", "bench"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
        line,
    )?;
    let tail = first_lines(child.stderr.take(), None);
    let (mut first_run, mut phases, mut report) = (None, Vec::new(), None);
    for m in worker_messages(control) {
        match m {
            WorkerMessage::FirstKvmRun { ns } => {
                first_run = Some(ns.saturating_sub(t0) as f64 / 1e6);
                break;
            }
            WorkerMessage::Phase { name, ns } => phases.push(phase_ms(&name, ns, t0)),
            WorkerMessage::Report { report: r } => report = Some(r.outcome),
            _ => {}
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let tail = tail.join().unwrap_or_default();
    match first_run {
        Some(v) => Ok((v, phases.join(", "))),
        None => Err(format!(
            "{} never reached KVM_RUN ({}); its stderr: {}",
            exe.display(),
            report.map_or("no report".to_string(), |o| o.to_string()),
            tail.join(" | ")
        )),
    }
}

/// A worker's phase `name`, ended at `ns`, as `NAME MS`, the ms counted
/// from `t0`.
fn phase_ms(name: &str, ns: u64, t0: u64) -> String {
    format!("{name} {:.1}", ns.saturating_sub(t0) as f64 / 1e6)
}

/// The median ms from spawning `vmm-worker --version` to its exit: what
/// starting the worker binary costs before it does anything. `None` when
/// `exe` is not `vmm-worker` (vmmd itself has no `--version`).
fn start_floor(exe: &std::path::Path, rounds: usize) -> Result<Option<f64>, String> {
    if exe.file_name() != Some(std::ffi::OsStr::new("vmm-worker")) {
        return Ok(None);
    }
    let mut times = Vec::new();
    for _ in 0..rounds.max(1) {
        let t0 = steelcup_vmm::worker::monotonic_ns();
        let status = Command::new(exe)
            .arg("--version")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .map_err(|e| format!("start {}: {e}", exe.display()))?;
        let t1 = steelcup_vmm::worker::monotonic_ns();
        if !status.success() {
            return Err(format!("{} --version: {status}", exe.display()));
        }
        times.push(t1.saturating_sub(t0) as f64 / 1e6);
    }
    Ok(Some(median(times)))
}

/// How often a scraped round reads the worker's counters (vmmd's
/// `Counters` command on its control socket, and its `/proc` files, as
/// `cup metrics` makes vmmd do): 15 times as often as Prometheus' common
/// 15 s scrape interval, from the worker's spawn on.
const SCRAPE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Reads the counters of worker `pid` over `control` every `every` until
/// `stop`: what a metrics scrape costs the worker.
fn scrape_worker(
    mut control: UnixStream,
    pid: i32,
    every: std::time::Duration,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let ask = steelcup_proto::worker::WorkerCommand::Counters {}.line();
        let mut asked = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if control.write_all(ask.as_bytes()).is_err() {
                break;
            }
            for f in ["stat", "io", "status"] {
                let _ = std::fs::read_to_string(format!("/proc/{pid}/{f}"));
            }
            asked += 1;
            std::thread::sleep(every);
        }
        asked
    })
}

/// Scraped rounds beside plain ones: medians, the ratio, and each
/// spread (min-max).
fn metrics_cost(plain: &[Sample], scraped: &[Sample]) -> String {
    let spread = |s: &[Sample], f: fn(&Sample) -> f64| {
        let v: Vec<f64> = s.iter().map(f).collect();
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
        (median(v), lo, hi)
    };
    let time = |s: &Sample| s.to_line_ms;
    let peak = |s: &Sample| s.peak_rss_kib as f64 / 1024.0;
    let (pt, ptl, pth) = spread(plain, time);
    let (st, stl, sth) = spread(scraped, time);
    let (pp, _, _) = spread(plain, peak);
    let (sp, _, _) = spread(scraped, peak);
    format!(
        "counters read every {} ms during the boot: spawn to guest userspace line {st:.0} ms ({stl:.0}-{sth:.0}) vs {pt:.0} ms ({ptl:.0}-{pth:.0}) unscraped, {:.2}×; peak RSS {sp:.1} vs {pp:.1} MiB, {:.2}×",
        SCRAPE_EVERY.as_millis(),
        st / pt,
        sp / pp
    )
}

/// Starts `cmd` (with `worker`, a config line: our worker, started as
/// vmmd starts it), waits for the marker on its stdout, samples its
/// memory, then lets it end (`wait_exit`) or kills it. With `scrape`, its
/// counters are read that often meanwhile ([`scrape_worker`]).
/// How long the host is left alone before each measured boot: the VM
/// before is still being taken down for a while after its VMM has exited
/// (a boot right after another took half as long again under emulation,
/// whichever VMM it was).
const SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

fn measure(
    cmd: &mut Command,
    worker: Option<&str>,
    memory_mib: u64,
    wait_exit: bool,
    trace: Option<&str>,
    scrape: Option<std::time::Duration>,
) -> Result<Sample, String> {
    std::thread::sleep(SETTLE);
    let t0 = steelcup_vmm::worker::monotonic_ns();
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    // The worker's control channel, kept open until the child is reaped.
    let (mut child, control) = match worker {
        Some(line) => {
            let (child, control) = spawn_worker(cmd, line)?;
            (child, Some(control))
        }
        None => (
            cmd.stdin(Stdio::null())
                .spawn()
                .map_err(|e| format!("start {cmd:?}: {e}"))?,
            None,
        ),
    };
    let pid = child.id() as i32;
    let stage = std::sync::Arc::new(std::sync::atomic::AtomicU8::new(0));
    let watched = watchdog(pid, stage.clone());
    let tail = first_lines(child.stderr.take(), trace.map(str::to_string));
    // The guest memory's host range, as the worker reports it.
    let guest_range = std::sync::Arc::new(std::sync::Mutex::new(None::<(u64, u64)>));
    let range_seen = guest_range.clone();
    let messages = control
        .as_ref()
        .map(|c| c.try_clone())
        .transpose()
        .map_err(|e| format!("the worker's control socket: {e}"))?;
    let timing = std::thread::spawn(move || {
        let mut first_run = None;
        let mut phases = Vec::new();
        for m in messages.into_iter().flat_map(worker_messages) {
            match m {
                WorkerMessage::FirstKvmRun { ns } => first_run = Some(ns),
                WorkerMessage::GuestMemory { start, len } => {
                    *range_seen.lock().unwrap_or_else(|p| p.into_inner()) = Some((start, len));
                }
                WorkerMessage::Phase { name, ns } => phases.push(phase_ms(&name, ns, t0)),
                _ => {}
            }
        }
        if !phases.is_empty() {
            eprintln!(
                "vmmd bench: worker phases (ms after spawn): {}",
                phases.join(", ")
            );
        }
        first_run
    });
    let stop_scraping = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scraper = match (scrape, &control) {
        (Some(every), Some(c)) => Some(scrape_worker(
            c.try_clone()
                .map_err(|e| format!("the worker's control socket: {e}"))?,
            pid,
            every,
            stop_scraping.clone(),
        )),
        _ => None,
    };
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = None;
    for l in lines.by_ref().map_while(Result::ok) {
        if let Some(label) = trace {
            let ms = steelcup_vmm::worker::monotonic_ns().saturating_sub(t0) as f64 / 1e6;
            eprintln!("vmmd bench: {label} {ms:8.1} | {}", l.trim_end());
        }
        if l.contains(MARKER) && !l.contains("echo") {
            seen = Some(steelcup_vmm::worker::monotonic_ns());
            break;
        }
    }
    stop_scraping.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(asked) = scraper.and_then(|s| s.join().ok()) {
        eprintln!("vmmd bench: counters read {asked} times during the boot");
    }
    let range = *guest_range.lock().unwrap_or_else(|p| p.into_inner());
    stage.store(1, std::sync::atomic::Ordering::Relaxed);
    let rss = memory_at(pid, memory_mib, range);
    stage.store(2, std::sync::atomic::Ordering::Relaxed);
    if !wait_exit || seen.is_none() {
        // SAFETY: kill of our own child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    // Drain the rest so the child never blocks on a full pipe.
    let drain = std::thread::spawn(move || lines.map_while(Result::ok).count());
    let mut status = 0;
    // SAFETY: a zeroed rusage is valid for wait4 to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    reap(pid, &mut status, &mut usage);
    stage.store(3, std::sync::atomic::Ordering::Relaxed);
    drop(control);
    let _ = drain.join();
    let first_run = timing.join().ok().flatten();
    let tail = tail.join().unwrap_or_default();
    drop(watched);
    let Some(seen) = seen else {
        return Err(format!(
            "{cmd:?} ended without printing {MARKER:?}; its stderr: {}",
            tail.join(" | ")
        ));
    };
    let (rss_kib, guest_kib) = rss?;
    Ok(Sample {
        setup_ms: first_run.map(|ns| ns.saturating_sub(t0) as f64 / 1e6),
        to_line_ms: seen.saturating_sub(t0) as f64 / 1e6,
        peak_rss_kib: usage.ru_maxrss as u64,
        overhead_kib: rss_kib.saturating_sub(guest_kib),
    })
}

/// How long a VMM may take to end after its guest's line.
const EXIT_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Waits for child `pid` to end, at most [`EXIT_WAIT`]; then says where
/// each of its threads is (state, kernel wait channel, syscall) and kills
/// it.
fn reap(pid: i32, status: &mut i32, usage: &mut libc::rusage) {
    let t0 = std::time::Instant::now();
    loop {
        // SAFETY: wait4 on our own child with valid pointers.
        let r = unsafe { libc::wait4(pid, status, libc::WNOHANG, usage) };
        if r != 0 {
            return;
        }
        if t0.elapsed() > EXIT_WAIT {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    eprintln!(
        "vmmd bench: pid {pid} did not end within {}s of its guest's line; killing it. Its threads: {}",
        EXIT_WAIT.as_secs(),
        threads(pid)
    );
    // SAFETY: kill and wait4 of our own child.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::wait4(pid, status, 0, usage);
    }
}

/// Where each thread of process `pid` is: name, state, kernel wait
/// channel, syscall.
fn threads(pid: i32) -> String {
    let task = PathBuf::from(format!("/proc/{pid}/task"));
    let mut threads = Vec::new();
    for t in std::fs::read_dir(&task).into_iter().flatten().flatten() {
        let p = t.path();
        let read = |f: &str| {
            std::fs::read_to_string(p.join(f))
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        let state = read("status")
            .lines()
            .find_map(|l| l.strip_prefix("State:").map(|s| s.trim().to_string()))
            .unwrap_or_default();
        threads.push(format!(
            "{} ({state}, in {}, syscall {})",
            read("comm"),
            read("wchan"),
            read("syscall")
        ));
    }
    threads.join("; ")
}

/// Says every 20 s how long a measurement has been at its `stage` (0:
/// waiting for the guest's line, 1: reading its memory, 2: waiting for
/// it to end, 3: for its messages to end), and where the VMM's threads
/// and the bench's own are, until the returned sender is dropped. It
/// sleeps in between, so it costs the measured boot nothing.
fn watchdog(
    pid: i32,
    stage: std::sync::Arc<std::sync::atomic::AtomicU8>,
) -> std::sync::mpsc::Sender<()> {
    let (done, over) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let t0 = std::time::Instant::now();
        while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
            over.recv_timeout(std::time::Duration::from_secs(20))
        {
            let at = match stage.load(std::sync::atomic::Ordering::Relaxed) {
                0 => "waiting for the guest's line",
                1 => "reading the VMM's memory",
                2 => "waiting for the VMM to end",
                _ => "waiting for the VMM's messages to end",
            };
            eprintln!(
                "vmmd bench: pid {pid}: {}s, {at}; its threads: {}; the bench's: {}",
                t0.elapsed().as_secs(),
                threads(pid),
                threads(std::process::id() as i32)
            );
        }
    });
    done
}

/// (total RSS, RSS of the guest memory mapping) of `pid`, in KiB.
/// With `guest` (the guest memory's host start and length, as our worker
/// reports it), the guest's RSS is that of every mapping inside the range
/// (the kernel's file mapping and the huge-page ranges split it); without (QEMU),
/// that of the largest mapping of at least the guest's size.
fn memory_at(pid: i32, memory_mib: u64, guest: Option<(u64, u64)>) -> Result<(u64, u64), String> {
    let path = PathBuf::from(format!("/proc/{pid}/smaps"));
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(match guest {
        Some(range) => parse_smaps_in(&text, range),
        None => parse_smaps(&text, memory_mib << 10),
    })
}

/// The number of kB on an smaps line (`Rss:   20480 kB`).
fn smaps_kib(line: &str) -> u64 {
    line.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Sums `Rss:` over all mappings, and over the mappings that lie inside
/// `start..start+len`.
pub fn parse_smaps_in(text: &str, (start, len): (u64, u64)) -> (u64, u64) {
    let (mut total, mut inside, mut within) = (0, 0, false);
    for l in text.lines() {
        let head = l.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = head.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                within = a >= start && b <= start + len;
                continue;
            }
        }
        if l.starts_with("Rss:") {
            let rss = smaps_kib(l);
            total += rss;
            if within {
                inside += rss;
            }
        }
    }
    (total, inside)
}

/// Sums `Rss:` over all mappings, and finds the largest mapping of at least
/// `guest_kib` (the guest's memory) and its `Rss:`.
pub fn parse_smaps(text: &str, guest_kib: u64) -> (u64, u64) {
    let kib = smaps_kib;
    let (mut total, mut best_size, mut best_rss, mut size) = (0, 0, 0, 0);
    for l in text.lines() {
        if l.starts_with("Size:") {
            size = kib(l);
        } else if l.starts_with("Rss:") {
            let rss = kib(l);
            total += rss;
            if size >= guest_kib && size > best_size {
                best_size = size;
                best_rss = rss;
            }
        }
    }
    (total, best_rss)
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The Markdown table of medians: steelcup, QEMU and each measured peer,
/// then steelcup's ratio to each.
fn table(
    ours: &[Sample],
    qemu: &[Sample],
    peers: &[(&str, &[Sample])],
    memory_mib: u64,
) -> Vec<String> {
    let m = |s: &[Sample], f: fn(&Sample) -> f64| median(s.iter().map(f).collect());
    let time = |s: &Sample| s.to_line_ms;
    let peak = |s: &Sample| s.peak_rss_kib as f64 / 1024.0;
    let over = |s: &Sample| s.overhead_kib as f64 / 1024.0;
    let setup = m(ours, |s| s.setup_ms.unwrap_or(f64::NAN));
    let others: Vec<(&str, &[Sample])> = std::iter::once(("QEMU", qemu))
        .chain(peers.iter().copied())
        .collect();
    let mut t = vec![
        format!("| VMM (1 vCPU, {memory_mib} MiB) | setup: spawn to first KVM_RUN | spawn to guest userspace line | peak RSS | overhead (RSS − guest memory touched) |"),
        "|---|---|---|---|---|".into(),
        format!(
            "| steelcup worker | {setup:.1} ms | {:.0} ms | {:.1} MiB | {:.1} MiB |",
            m(ours, time),
            m(ours, peak),
            m(ours, over)
        ),
    ];
    for (name, s) in &others {
        let label = if *name == "QEMU" {
            "QEMU `-M microvm`"
        } else {
            name
        };
        t.push(format!(
            "| {label} | – | {:.0} ms | {:.1} MiB | {:.1} MiB |",
            m(s, time),
            m(s, peak),
            m(s, over)
        ));
    }
    for (name, s) in &others {
        t.push(format!(
            "| **ratio steelcup / {name}** | | **{:.2}×** | **{:.2}×** | **{:.2}×** |",
            m(ours, time) / m(s, time),
            m(ours, peak) / m(s, peak),
            m(ours, over) / m(s, over)
        ));
    }
    t
}

/// Each target, met or not, with the number.
fn verdict(ours: &[Sample], qemu: &[Sample], peers: &[(&str, &[Sample])]) -> String {
    let m = |s: &[Sample], f: fn(&Sample) -> f64| median(s.iter().map(f).collect());
    let setup = m(ours, |s| s.setup_ms.unwrap_or(f64::NAN));
    let over = m(ours, |s| s.overhead_kib as f64 / 1024.0);
    let time = |o: &[Sample]| m(ours, |s| s.to_line_ms) / m(o, |s| s.to_line_ms);
    let peak = |o: &[Sample]| m(ours, |s| s.peak_rss_kib as f64) / m(o, |s| s.peak_rss_kib as f64);
    let mark = |ok: bool| if ok { "met" } else { "not met" };
    let mut v = format!(
        "setup under 10 ms: {} ({setup:.1} ms); overhead under 5 MiB: {} ({over:.1} MiB); time at most 0.5× QEMU's: {} ({:.2}×); peak RSS at most 0.5× QEMU's: {} ({:.2}×)",
        mark(setup < 10.0),
        mark(over < 5.0),
        mark(time(qemu) <= 0.5),
        time(qemu),
        mark(peak(qemu) <= 0.5),
        peak(qemu)
    );
    for (name, s) in peers {
        v.push_str(&format!(
            "; time below {name}'s: {} ({:.2}×); peak RSS below {name}'s: {} ({:.2}×)",
            mark(time(s) < 1.0),
            time(s),
            mark(peak(s) < 1.0),
            peak(s)
        ));
    }
    v
}

/// Every round's time to the line, ours / QEMU, in ms.
fn rounds_line(ours: &[Sample], qemu: &[Sample]) -> String {
    ours.iter()
        .zip(qemu)
        .map(|(o, q)| format!("{:.0}/{:.0}", o.to_line_ms, q.to_line_ms))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workers_messages_end_when_it_exits_while_its_command_lives_on() {
        // The bench's commands outlive the measurement; the reader of the
        // worker's messages must still see the end of them.
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "read -r config; exit 0"]);
        let (mut child, control) = spawn_worker(&mut cmd, "{}\n").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let n = worker_messages(control).count();
            let _ = tx.send(n);
        });
        let _ = child.wait();
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(10)),
            Ok(0),
            "the messages did not end with the worker"
        );
        drop(cmd);
    }

    #[test]
    fn smaps_finds_the_guest_mapping_and_sums_the_rest() {
        let text = "\
55d0-55e0 r-xp 00000000 08:01 1 /usr/bin/vmmd
Size:                 64 kB
Rss:                  60 kB
7f00-7f08 rw-p 00000000 00:00 0
Size:             131072 kB
Rss:               20480 kB
7f10-7f11 rw-p 00000000 00:00 0
Size:               2048 kB
Rss:                1024 kB
";
        assert_eq!(parse_smaps(text, 128 << 10), (60 + 20480 + 1024, 20480));
        // No mapping as large as the guest: nothing counts as guest memory.
        assert_eq!(parse_smaps(text, 256 << 10).1, 0);
    }

    #[test]
    fn smaps_sums_the_mappings_inside_the_guest_range() {
        // Guest memory at 0x7f00000..0x7f08000 (32 KiB here), split by a
        // file mapped over its middle.
        let text = "\
55d0-55e0 r-xp 00000000 08:01 1 /usr/bin/vmmd
Size:                 64 kB
Rss:                  60 kB
7f00000-7f02000 rw-p 00000000 00:00 0
Size:                  8 kB
Rss:                   8 kB
7f02000-7f04000 rw-p 00000000 00:05 9 /usr/lib/steelcup/guest/initramfs
Size:                  8 kB
Rss:                   4 kB
7f04000-7f08000 rw-p 00000000 00:00 0
Size:                 16 kB
Rss:                  12 kB
7f10000-7f11000 rw-p 00000000 00:00 0
Size:                  4 kB
Rss:                   4 kB
";
        assert_eq!(
            parse_smaps_in(text, (0x7f0_0000, 0x8000)),
            (60 + 8 + 4 + 12 + 4, 8 + 4 + 12)
        );
    }

    #[test]
    fn phases_become_names_with_ms_after_the_spawn() {
        assert_eq!(
            phase_ms("vm-created", 3_500_000, 1_000_000),
            "vm-created 2.5"
        );
        assert_eq!(phase_ms("main", 0, 1_000_000), "main 0.0");
    }

    #[test]
    fn medians_and_table() {
        let s = |t, p| Sample {
            setup_ms: Some(3.0),
            to_line_ms: t,
            peak_rss_kib: p,
            overhead_kib: 1024,
        };
        let ours = [s(100.0, 10240), s(120.0, 10240), s(90.0, 10240)];
        let qemu = [s(200.0, 40960), s(220.0, 40960), s(210.0, 40960)];
        let t = table(&ours, &qemu, &[], 128);
        assert!(t[2].contains("| 3.0 ms | 100 ms | 10.0 MiB |"), "{}", t[2]);
        assert!(
            t[4].contains("**0.48×** | **0.25×** | **1.00×**"),
            "{}",
            t[4]
        );
        // With the peers: a row each, and a ratio to each.
        let fc = [s(150.0, 20480), s(160.0, 20480), s(140.0, 20480)];
        let t = table(&ours, &qemu, &[("Firecracker", &fc)], 128);
        assert!(
            t[4].starts_with("| Firecracker | – | 150 ms | 20.0 MiB |"),
            "{}",
            t[4]
        );
        assert!(
            t[6].contains("ratio steelcup / Firecracker** | | **0.67×** | **0.50×**"),
            "{}",
            t[6]
        );
        let v = verdict(&ours, &qemu, &[("Firecracker", &fc)]);
        assert!(
            v.contains(
                "time below Firecracker's: met (0.67×); peak RSS below Firecracker's: met (0.50×)"
            ),
            "{v}"
        );
        assert_eq!(rounds_line(&ours, &qemu), "100/200, 120/220, 90/210");
    }
}
