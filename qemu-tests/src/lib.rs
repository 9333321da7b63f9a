//! The QEMU harness: boot the built appliance, capture its serial console,
//! wait for what it prints, press its power button.
//!
//! # Design
//! [`Guest`] is the fixture, in the manner of Cloud Hypervisor's
//! `test_infra`: [`Guest::boot`] starts QEMU with the serial console on a
//! pipe, a thread copies it into a buffer and a log file, [`Guest::wait_for`]
//! polls the buffer with a timeout, and the QMP socket drives the machine
//! (`system_powerdown` is the power button). The accelerator is KVM only
//! where `/proc/cpuinfo` shows `vmx` or `svm` and `/dev/kvm` opens; otherwise
//! TCG with `-cpu max`, an emulated CPU with AMD-V, nested paging and XSAVE,
//! so that KVM works inside the booted host. A guest dropped while a test is
//! panicking keeps its serial log and says where it is.

pub mod ntp;
pub mod prometheus;
pub mod registry;
pub mod run_machine;

use anyhow::{anyhow, bail, Context, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How QEMU runs the appliance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization: the host has vmx/svm and /dev/kvm.
    Kvm,
    /// Software emulation of a CPU with AMD-V.
    Tcg,
}

impl Accel {
    /// Picks KVM only where it is real.
    pub fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let has_virt = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        let kvm_opens = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        if has_virt && kvm_opens && std::env::var_os("STEELCUP_FORCE_TCG").is_none() {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }

    /// What the emulated host's KVM is told under software emulation
    /// (init passes a module its command-line parameters, as modprobe
    /// does): shadow paging instead of nested paging, and no virtual GIF.
    /// With QEMU's emulation of those (and of 5-level paging, which
    /// `-cpu max,-la57` leaves out) the emulated host now and then
    /// corrupted itself (a page fault on its own per-CPU data, recursing
    /// until the stack guard: "corrupted stack end detected inside
    /// scheduler") or stopped taking timer interrupts, more often the
    /// busier its microVMs were; see docs/architecture.md, Limitations.
    pub const TCG_KVM_PARAMS: &'static str = "kvm_amd.npt=0 kvm_amd.vgif=0";

    /// [`Self::TCG_KVM_PARAMS`], or `$STEELCUP_TCG_KVM_PARAMS` when set
    /// (empty: none), to try others.
    pub fn tcg_kvm_params() -> String {
        std::env::var("STEELCUP_TCG_KVM_PARAMS").unwrap_or_else(|_| Self::TCG_KVM_PARAMS.into())
    }

    /// The emulated CPU under software emulation: `max` without 5-level
    /// paging, or `$STEELCUP_TCG_CPU` when set.
    pub const TCG_CPU: &'static str = "max,-la57";

    pub fn args(&self) -> Vec<String> {
        match self {
            Accel::Kvm => ["-accel", "kvm", "-cpu", "host"].map(String::from).to_vec(),
            Accel::Tcg => vec![
                "-accel".into(),
                "tcg".into(),
                "-cpu".into(),
                std::env::var("STEELCUP_TCG_CPU").unwrap_or_else(|_| Self::TCG_CPU.into()),
            ],
        }
    }
}

/// `cmdline` (an image's own) with its KVM module parameters replaced by
/// the emulation's ([`Accel::tcg_kvm_params`]) under TCG, and dropped on
/// hardware KVM: the test image carries the emulation's for its disk and
/// PXE boots, `cargo xtask run`'s appliance none, and a direct boot gets
/// exactly the ones asked for.
pub fn with_kvm_params(cmdline: &str, accel: Accel) -> String {
    let mut words: Vec<String> = cmdline
        .split_whitespace()
        .filter(|w| !w.starts_with("kvm_amd.") && !w.starts_with("kvm_intel."))
        .map(String::from)
        .collect();
    if accel == Accel::Tcg {
        words.extend(Accel::tcg_kvm_params().split_whitespace().map(String::from));
    }
    words.join(" ")
}

/// How to boot.
#[derive(Debug, Clone)]
pub enum Boot {
    /// QEMU loads the kernel and initramfs itself.
    Direct {
        kernel: PathBuf,
        initrd: PathBuf,
        cmdline: String,
    },
    /// QEMU's iPXE ROM fetches `bootfile` from `dir` over QEMU's built-in TFTP.
    Pxe { dir: PathBuf, bootfile: String },
    /// UEFI firmware (Debian's OVMF) boots `disk` (qcow2) as a server boots
    /// its disk; `vars` is this machine's copy of the firmware's variables.
    Uefi { disk: PathBuf, vars: PathBuf },
}

/// Debian's OVMF (ovmf): the firmware code, and the variables a machine
/// starts from.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// What to start.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    /// Names the log file and the QMP socket.
    pub name: String,
    pub boot: Boot,
    pub memory_mib: u32,
    pub cpus: u32,
    /// Where serial logs go.
    pub log_dir: PathBuf,
    /// Copy the serial console to our stdout as it arrives.
    pub echo: bool,
    /// This port of the appliance reachable from here on a free port of
    /// 127.0.0.1 ([`Guest::forwarded`]), through QEMU's user networking (a
    /// direct boot gets a network interface only with it).
    pub forward_port: Option<u16>,
    /// Ports of 127.0.0.1 here forwarded to the appliance's: (here,
    /// there). The caller has checked they are free.
    pub forwards: Vec<(u16, u16)>,
    /// More disks (raw images) after the boot disk, as virtio drives: a
    /// config drive, say.
    pub drives: Vec<PathBuf>,
    /// The emulated hardware clock's start (`-rtc base=`, UTC, like
    /// `2026-12-07T10:00:00`); None: now.
    pub rtc_base: Option<String>,
}

impl GuestConfig {
    /// The appliance in `artifacts` (image-build's output), booted directly.
    pub fn direct(name: &str, artifacts: &Path) -> Result<Self> {
        let cmdline = std::fs::read_to_string(artifacts.join("cmdline"))
            .with_context(|| format!("read {}/cmdline", artifacts.display()))?;
        Ok(GuestConfig {
            name: name.into(),
            boot: Boot::Direct {
                kernel: artifacts.join("vmlinuz"),
                initrd: artifacts.join("initramfs.cpio.zst"),
                cmdline: cmdline.trim().into(),
            },
            memory_mib: 2048,
            cpus: 2,
            log_dir: log_dir(artifacts),
            echo: false,
            forward_port: None,
            forwards: Vec::new(),
            rtc_base: None,
            drives: Vec::new(),
        })
    }

    /// A machine that boots `disk` under UEFI, its firmware variables
    /// (fresh from OVMF's) kept beside its log.
    pub fn uefi(name: &str, disk: &Path, log_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(log_dir)?;
        let vars = log_dir.join(format!("{name}.ovmf-vars.fd"));
        std::fs::copy(OVMF_VARS, &vars)
            .with_context(|| format!("copy {OVMF_VARS} (is ovmf installed?)"))?;
        Ok(GuestConfig {
            name: name.into(),
            boot: Boot::Uefi {
                disk: disk.into(),
                vars,
            },
            memory_mib: 2048,
            cpus: 2,
            log_dir: log_dir.into(),
            echo: false,
            forward_port: None,
            forwards: Vec::new(),
            rtc_base: None,
            drives: Vec::new(),
        })
    }

    /// The appliance's PXE set in `artifacts/pxe`.
    pub fn pxe(name: &str, artifacts: &Path) -> Self {
        GuestConfig {
            name: name.into(),
            boot: Boot::Pxe {
                dir: artifacts.join("pxe"),
                bootfile: "boot.ipxe".into(),
            },
            memory_mib: 2048,
            cpus: 2,
            log_dir: log_dir(artifacts),
            echo: false,
            forward_port: None,
            forwards: Vec::new(),
            rtc_base: None,
            drives: Vec::new(),
        }
    }
}

/// QEMU's user network with a virtio NIC: `cfg.forward_port` from a free
/// port of 127.0.0.1 (written to `forwarded`), and `cfg.forwards` as
/// given.
fn user_nic(cfg: &GuestConfig, forwarded: &mut Option<u16>) -> Result<String> {
    let mut nic = "user,model=virtio-net-pci".to_string();
    if let Some(port) = cfg.forward_port {
        let free = free_port()?;
        *forwarded = Some(free);
        nic.push_str(&format!(",hostfwd=tcp:127.0.0.1:{free}-:{port}"));
    }
    for (here, there) in &cfg.forwards {
        nic.push_str(&format!(",hostfwd=tcp:127.0.0.1:{here}-:{there}"));
    }
    Ok(nic)
}

/// A free port of 127.0.0.1 for QEMU's host forwarding.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("a free port for QEMU's host forwarding")?
        .port())
}

/// Serial logs go beside the artifacts directory, in `qemu-logs/`.
pub fn log_dir(artifacts: &Path) -> PathBuf {
    artifacts
        .parent()
        .map(|p| p.join("qemu-logs"))
        .unwrap_or_else(|| artifacts.join("qemu-logs"))
}

/// How long the console may stay silent under TCG before a wait gives up
/// (the longest quiet step, pulling the nginx image, takes about 100 s).
const SILENCE_LIMIT: Duration = Duration::from_secs(240);

/// A running QEMU with the appliance.
#[derive(Debug)]
pub struct Guest {
    child: Child,
    serial: Arc<Mutex<String>>,
    /// When the console last printed a line.
    last_output: Arc<Mutex<Instant>>,
    pub log_path: PathBuf,
    qmp_path: PathBuf,
    pub started: Instant,
    pub accel: Accel,
    /// The port of 127.0.0.1 that reaches `GuestConfig::forward_port`.
    pub forwarded: Option<u16>,
    /// How much of the console there was when the last wait began: what
    /// went wrong during a failed step is in the console after it.
    wait_began: usize,
}

impl Guest {
    /// Starts QEMU.
    pub fn boot(cfg: &GuestConfig) -> Result<Self> {
        std::fs::create_dir_all(&cfg.log_dir)
            .with_context(|| format!("create {}", cfg.log_dir.display()))?;
        let log_path = cfg.log_dir.join(format!("{}.log", cfg.name));
        let qmp_path = std::env::temp_dir().join(format!(
            "steelcup-qmp-{}-{}.sock",
            cfg.name,
            std::process::id()
        ));
        let _ = std::fs::remove_file(&qmp_path);
        let accel = Accel::detect();
        let mut forwarded = None;
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(accel.args())
            .args(["-m", &cfg.memory_mib.to_string()])
            .args(["-smp", &cfg.cpus.to_string()])
            .args(["-display", "none", "-serial", "stdio", "-monitor", "none"])
            .arg("-no-reboot")
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
        if let Some(base) = &cfg.rtc_base {
            cmd.args(["-rtc", &format!("base={base}")]);
        }
        match &cfg.boot {
            Boot::Direct {
                kernel,
                initrd,
                cmdline,
            } => {
                for p in [kernel, initrd] {
                    if !p.exists() {
                        bail!(
                            "{} does not exist; build the appliance with `cargo xtask`",
                            p.display()
                        );
                    }
                }
                cmd.arg("-kernel").arg(kernel).arg("-initrd").arg(initrd);
                // A hardware RNG, as servers have: init's coldplug must load
                // its driver (virtio_pci, virtio_rng) by modalias.
                let nic = if cfg.forward_port.is_none() && cfg.forwards.is_empty() {
                    "none".to_string()
                } else {
                    user_nic(cfg, &mut forwarded)?
                };
                let cmdline = with_kvm_params(cmdline, accel);
                cmd.args([
                    "-append",
                    &cmdline,
                    "-nic",
                    &nic,
                    "-device",
                    "virtio-rng-pci",
                ]);
            }
            Boot::Uefi { disk, vars } => {
                cmd.args(["-machine", "q35"])
                    .arg("-drive")
                    .arg(format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}"))
                    .arg("-drive")
                    .arg(format!("if=pflash,format=raw,file={}", vars.display()))
                    .arg("-drive")
                    .arg(format!("file={},if=virtio,format=qcow2", disk.display()))
                    .arg("-nic")
                    .arg(user_nic(cfg, &mut forwarded)?)
                    .args(["-device", "virtio-rng-pci"]);
            }
            Boot::Pxe { dir, bootfile } => {
                cmd.arg("-nic").arg(format!(
                    "user,model=e1000,tftp={},bootfile={bootfile}",
                    dir.display()
                ));
                cmd.args(["-boot", "n"]);
            }
        }
        for d in &cfg.drives {
            cmd.arg("-drive")
                .arg(format!("file={},if=virtio,format=raw", d.display()));
        }
        // An empty signal mask: the caller may block signals it reads
        // through a signalfd (xtask does), and QEMU must not inherit that.
        steelcup_sys::reset_signal_mask(&mut cmd);
        // Its own process group: a Ctrl-C at the terminal is ours to handle.
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd
            .spawn()
            .context("start qemu-system-x86_64 (is qemu-system-x86 installed?)")?;
        let started = Instant::now();
        let serial = Arc::new(Mutex::new(String::new()));
        let mut log = std::fs::File::create(&log_path)
            .with_context(|| format!("create {}", log_path.display()))?;
        let out = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("no qemu stdout"))?;
        let err = child
            .stderr
            .take()
            .ok_or_else(|| anyhow!("no qemu stderr"))?;
        let buf = serial.clone();
        let echo = cfg.echo;
        let last_output = Arc::new(Mutex::new(Instant::now()));
        let last = last_output.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(out);
            let mut line = Vec::new();
            while let Ok(n) = r.read_until(b'\n', &mut line) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&line).replace('\r', "");
                let _ = log.write_all(text.as_bytes());
                if echo {
                    print!("{text}");
                    let _ = std::io::stdout().flush();
                }
                if let Ok(mut b) = buf.lock() {
                    b.push_str(&text);
                }
                if let Ok(mut t) = last.lock() {
                    *t = Instant::now();
                }
                line.clear();
            }
        });
        let buf = serial.clone();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = BufReader::new(err).read_to_string(&mut s);
            if !s.is_empty() {
                if let Ok(mut b) = buf.lock() {
                    b.push_str(&format!("\n[qemu stderr] {s}\n"));
                }
            }
        });
        Ok(Guest {
            child,
            serial,
            last_output,
            log_path,
            qmp_path,
            started,
            accel,
            forwarded,
            wait_began: 0,
        })
    }

    /// How long the console has printed nothing.
    pub fn silent_for(&self) -> Duration {
        self.last_output
            .lock()
            .map(|t| t.elapsed())
            .unwrap_or_default()
    }

    /// Everything the console printed so far.
    pub fn serial(&self) -> String {
        self.serial.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits until the console has printed `needle`; returns the time since
    /// QEMU started. Fails on timeout, on a kernel panic, or if QEMU exits.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<Duration> {
        self.wait_until(needle, timeout, |s| s.contains(needle))
    }

    /// Waits until `done` holds for the console output.
    pub fn wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&str) -> bool,
    ) -> Result<Duration> {
        let t0 = Instant::now();
        self.wait_began = self.serial.lock().map(|s| s.len()).unwrap_or(0);
        loop {
            let s = self.serial();
            if done(&s) {
                return Ok(self.started.elapsed());
            }
            if s.contains("Kernel panic") {
                bail!(
                    "kernel panic while waiting for {what:?}; serial log: {}",
                    self.log_path.display()
                );
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(200));
                if done(&self.serial()) {
                    return Ok(self.started.elapsed());
                }
                bail!(
                    "QEMU exited ({status}) before {what:?}; serial log: {}",
                    self.log_path.display()
                );
            }
            // A lock-up or an RCU stall of the emulated host's own kernel
            // under TCG: the boot is lost; say so now rather than at the
            // step's timeout (run_booted then boots again).
            if self.accel == Accel::Tcg {
                if let Some(why) = host_stall(s.get(self.wait_began..).unwrap_or(&s)) {
                    bail!(
                        "{why} while waiting for {what:?}; serial log: {}",
                        self.log_path.display()
                    );
                }
            }
            // Under TCG the emulated host now and then stops dead; no step
            // of ours is silent this long, so say so now rather than at a
            // long step's timeout (run_booted then boots again).
            if self.accel == Accel::Tcg && self.silent_for() > SILENCE_LIMIT {
                bail!(
                    "no console output for {}s while waiting for {what:?}; serial log: {}",
                    SILENCE_LIMIT.as_secs(),
                    self.log_path.display()
                );
            }
            if t0.elapsed() > timeout {
                bail!(
                    "timed out after {}s waiting for {what:?}; serial log: {}",
                    timeout.as_secs(),
                    self.log_path.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends one QMP command and returns its answer.
    pub fn qmp(&self, command: &str) -> Result<serde_json::Value> {
        let mut s = UnixStream::connect(&self.qmp_path)
            .with_context(|| format!("connect to QMP at {}", self.qmp_path.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut r = BufReader::new(s.try_clone()?);
        let mut line = String::new();
        r.read_line(&mut line)?; // greeting
        for cmd in ["qmp_capabilities", command] {
            writeln!(s, "{{\"execute\":\"{cmd}\"}}")?;
            loop {
                line.clear();
                r.read_line(&mut line)?;
                let v: serde_json::Value = serde_json::from_str(&line)?;
                if v.get("event").is_some() {
                    continue;
                }
                if let Some(e) = v.get("error") {
                    bail!("QMP {cmd}: {e}");
                }
                if cmd == command {
                    return Ok(v);
                }
                break;
            }
        }
        unreachable!("the loop returns on the last command")
    }

    /// Presses the power button (ACPI), as on a real server.
    pub fn power_button(&self) -> Result<()> {
        self.qmp("system_powerdown").map(|_| ())
    }

    /// Waits for QEMU to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st);
            }
            if t0.elapsed() > timeout {
                bail!(
                    "QEMU still running {}s after power-off; serial log: {}",
                    timeout.as_secs(),
                    self.log_path.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for QEMU to exit by itself after a power-off, and checks it
    /// exited successfully with no kernel panic on the console; returns the
    /// console output.
    pub fn wait_clean_poweroff(&mut self, timeout: Duration) -> Result<String> {
        let status = self.wait_exit(timeout)?;
        if !status.success() {
            bail!(
                "QEMU exited with {status}; serial log: {}",
                self.log_path.display()
            );
        }
        let s = self.serial();
        if s.contains("Kernel panic") {
            bail!("kernel panic; serial log: {}", self.log_path.display());
        }
        Ok(s)
    }

    /// True while QEMU runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills QEMU at once.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.qmp_path);
        if std::thread::panicking() {
            eprintln!("serial log kept: {}", self.log_path.display());
        }
    }
}

/// The build outputs the tests run on, as `cargo xtask test` passes them.
#[derive(Debug, Clone)]
pub struct Artifacts {
    pub dir: PathBuf,
}

/// `STEELCUP_TEST_ARTIFACTS`, the test image (with qemu-tests/units), set by
/// `cargo xtask test`.
pub fn test_artifacts() -> Option<Artifacts> {
    std::env::var_os("STEELCUP_TEST_ARTIFACTS").map(|d| Artifacts { dir: d.into() })
}

/// cup as `cargo xtask build` made it (static: it runs here too):
/// `STEELCUP_CUP`, else the workspace's release build.
pub fn cup_binary() -> PathBuf {
    std::env::var_os("STEELCUP_CUP")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/x86_64-unknown-linux-gnu/release/cup")
        })
}

/// `STEELCUP_ARTIFACTS`, set by `cargo xtask test`.
pub fn artifacts() -> Option<Artifacts> {
    std::env::var_os("STEELCUP_ARTIFACTS").map(|d| Artifacts { dir: d.into() })
}

/// Appends a measurement to `results.txt` beside the artifacts and prints it.
pub fn record(artifacts: &Artifacts, key: &str, value: &str) {
    println!("RESULT {key} = {value}");
    let path = artifacts
        .dir
        .parent()
        .unwrap_or(&artifacts.dir)
        .join("qemu-results.txt");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{key} = {value}");
    }
}

/// Boots the test image (`qemu-tests/steelcup-test.toml`) with
/// `steelcup.test=MODE` on its command line, for the driver unit in
/// `qemu-tests/units/`. `None` (after saying so) when the test image was not
/// built; a failure instead under `cargo xtask test`.
pub fn boot_test_image(mode: &str) -> Option<Guest> {
    let Some(a) = test_artifacts() else {
        assert!(
            std::env::var_os("STEELCUP_REQUIRE_ARTIFACTS").is_none(),
            "STEELCUP_TEST_ARTIFACTS is not set"
        );
        eprintln!("{mode}: skipped: needs the test image built by `cargo xtask test`");
        return None;
    };
    let mut cfg =
        GuestConfig::direct(&format!("test-{mode}"), &a.dir).expect("the test image's artifacts");
    // The workloads and network boots publish port 8080 of a unit: reached
    // from here through QEMU's host forwarding.
    if mode == "workloads" || mode == "network" {
        cfg.forward_port = Some(8080);
    }
    if let Boot::Direct { cmdline, .. } = &mut cfg.boot {
        cmdline.push_str(&format!(" steelcup.test={mode}"));
    }
    Some(Guest::boot(&cfg).expect("boot the test image"))
}

/// Signs, under software emulation, that the emulated host itself failed
/// underneath a test rather than anything steelcup does: QEMU's TCG
/// emulation of nested AMD-V now and then hangs or resets the emulated
/// host (seen right after a VM ended and a new VMM process started), or
/// triple-faults a nested guest (see the Limitations in
/// docs/architecture.md). None on KVM hardware.
pub fn emulation_fault(g: &Guest, err: &anyhow::Error) -> Option<&'static str> {
    if g.accel != Accel::Tcg {
        return None;
    }
    let all = g.serial();
    // The emulated host's own kernel (not a nested guest's, whose lines
    // vmmd prefixes) panicking in KVM; a dying init is steelcup's fault.
    let host_panic = all.lines().any(|l| {
        !l.starts_with("[vmmd]")
            && l.contains("Kernel panic - not syncing")
            && !l.contains("Attempted to kill init")
    });
    // The other signs count while the failed step ran: a warm-pool VM that
    // triple-faulted minutes before (and was replaced) does not explain a
    // later step's timeout.
    let s = all.get(g.wait_began..).unwrap_or(&all);
    if s.contains("guest crashed: triple fault") {
        Some("a nested guest triple-faulted")
    } else if host_panic {
        Some("the emulated host's kernel panicked")
    } else if let Some(why) = host_stall(s) {
        Some(why)
    } else if err.to_string().contains("QEMU exited") && !all.contains("reboot: Power down") {
        Some("the emulated host reset")
    } else if g.silent_for() > Duration::from_secs(90) {
        Some("the emulated host stopped (no console output for 90 s)")
    } else {
        None
    }
}

/// A lock-up or an RCU stall of the emulated host's own kernel in console
/// output `s` (a nested guest's lines, which vmmd prefixes, do not count):
/// seen under TCG while a nested guest formats its volume, and while the
/// host powers off.
fn host_stall(s: &str) -> Option<&'static str> {
    let host = |l: &&str| !l.starts_with("[vmmd]");
    if s.lines().filter(host).any(|l| l.contains("soft lockup")) {
        Some("the emulated host locked up")
    } else if s.lines().filter(host).any(|l| {
        l.contains("rcu_preempt detected stalls") || l.contains("rcu_preempt self-detected stall")
    }) {
        Some("the emulated host's kernel stalled (RCU)")
    } else {
        None
    }
}

/// How many times a test boots when the emulated host fails under it.
/// A boot of the microVM test starts about twenty nested VMs, and under
/// TCG now and then one of them triple-faults.
const ATTEMPTS: u32 = 4;

/// Runs `body` on the guest `boot` starts. When the run fails because the
/// emulated host failed underneath it ([`emulation_fault`]), boots again
/// (up to [`ATTEMPTS`] in all), saying why and keeping each failed serial
/// log beside the last; any other failure, or the last, panics with the
/// error and the log. `boot` returning None (no artifacts) skips.
pub fn run_booted<T>(
    name: &str,
    mut boot: impl FnMut() -> Option<Guest>,
    body: impl Fn(&mut Guest) -> Result<T>,
) -> Option<T> {
    for attempt in 1..=ATTEMPTS {
        let mut g = boot()?;
        match body(&mut g) {
            Ok(v) => return Some(v),
            Err(e) => match emulation_fault(&g, &e) {
                Some(why) if attempt < ATTEMPTS => {
                    let kept = g.log_path.with_extension(format!("attempt{attempt}.log"));
                    let _ = std::fs::copy(&g.log_path, &kept);
                    eprintln!(
                        "{name}: attempt {attempt} ended by the emulation, not by steelcup: {why} ({e:#}); its log is {}; booting again",
                        kept.display()
                    );
                }
                _ => panic!("{name}: {e:#}; serial log: {}", g.log_path.display()),
            },
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_direct_boot_gets_exactly_the_kvm_parameters_asked_for() {
        let image = "console=ttyS0 kvm_amd.npt=0 quiet kvm_amd.vgif=0 kvm_intel.ept=0";
        assert_eq!(with_kvm_params(image, Accel::Kvm), "console=ttyS0 quiet");
        let tcg = with_kvm_params(image, Accel::Tcg);
        let params = Accel::tcg_kvm_params();
        let want: Vec<&str> = params.split_whitespace().collect();
        let got: Vec<&str> = tcg.split_whitespace().collect();
        assert_eq!(&got[..2], ["console=ttyS0", "quiet"]);
        assert_eq!(&got[2..], &want[..]);
    }

    #[test]
    fn the_host_kernel_stalling_counts_and_a_nested_guests_does_not() {
        let host = "[  272.5] rcu: INFO: rcu_preempt self-detected stall on CPU\n";
        assert!(host_stall(host).unwrap().contains("RCU"));
        let lockup =
            "[  360.5] watchdog: BUG: soft lockup - CPU#0 stuck for 104s! [control:1479]\n";
        assert!(host_stall(lockup).unwrap().contains("locked up"));
        let nested = "[vmmd] web | [ 9.1] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:\n";
        assert_eq!(host_stall(nested), None);
        assert_eq!(
            host_stall("[vmmd] web | watchdog: BUG: soft lockup\n"),
            None
        );
    }
}
