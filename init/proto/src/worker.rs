//! The worker protocol: what vmmd hands a worker (the VM to build) and
//! what the worker reports back.
//!
//! # Design
//! vmmd starts each worker with one end of a Unix socket pair as its stdin,
//! the control socket. vmmd writes the [`VmConfig`] first, as one line of
//! JSON, with the VM's descriptors passed along ([`VmConfig::handles`]);
//! then [`WorkerCommand`]s, one JSON line each. The worker writes
//! [`WorkerMessage`]s back on the same socket, one JSON line each: an
//! answer per command, timing when asked, and its [`WorkerReport`] last.
//! The worker's stdout is its guest's serial console and its stderr its
//! own log, both read by vmmd as text and never parsed.

use crate::guest::GuestConfig;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The guest kernel command line vmmd uses unless told otherwise: serial
/// console, reset through the i8042 (how the VM ends), reboot on panic.
/// `no_timer_check`: the guest skips checking that the PIT's IRQ 0
/// reaches it (its clock is the TSC-deadline LAPIC timer), a check that
/// only costs boot time on a VM.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 pci=off nomodule no_timer_check quiet";

/// Everything a worker needs to build and run one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The workload's name (unit name), for logs.
    pub name: String,
    /// Guest kernel: bzImage or ELF vmlinux.
    pub kernel: PathBuf,
    /// Base initramfs with vminit as `/init`; the guest config is appended.
    pub initramfs: PathBuf,
    pub cmdline: String,
    pub vcpus: u8,
    pub memory_mib: u64,
    #[serde(default)]
    pub memory_backing: crate::MemoryBacking,
    #[serde(default)]
    pub huge_pages: bool,
    pub guest: GuestConfig,
    /// Block devices in order (the guest sees `/dev/vda`, `/dev/vdb`, ...).
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// A virtio-vsock device, its host side on Unix sockets.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// A virtio-net device on a tap.
    #[serde(default)]
    pub net: Option<NetConfig>,
    /// Send [`WorkerMessage::Phase`], [`WorkerMessage::GuestMemory`] and
    /// [`WorkerMessage::FirstKvmRun`] while the VM starts, for `vmmd bench`.
    #[serde(default)]
    pub report_timing: bool,
    /// Once the VM is built, the worker moves into a mount namespace that
    /// holds only the vsock socket's directory, built on this empty
    /// directory (see `jail::mount`). None: no jail (a worker run by hand).
    #[serde(default)]
    pub jail_scratch: Option<PathBuf>,
    /// For vmmd, not the worker: the CPU time its cgroup allows, in
    /// thousandths of a CPU per period (`cpu-max`, `cup run --cpus 1.5`);
    /// as many CPUs as vCPUs when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_max_millis: Option<u32>,
}

impl VmConfig {
    /// How many descriptors come with this config on the worker's control
    /// socket (`SCM_RIGHTS`, with the config's line): one open file per
    /// disk that is not an empty slot, in the order of `disks`, then the
    /// tap when `net` is set. vmmd opens them; the worker opens no disk or
    /// tap itself.
    pub fn handles(&self) -> usize {
        self.disks.iter().filter(|d| !d.empty_slot).count() + usize::from(self.net.is_some())
    }
}

/// A network device: the worker creates tap `tap` (it goes away with the
/// worker) and puts it on `bridge` as an isolated port, or gives its host
/// side `host_address`; then brings it up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    pub tap: String,
    pub mac: [u8; 6],
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// Like `10.200.3.1/30`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

/// A disk image file the guest sees as a virtio block device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    /// Opened read-only and offered to the guest as such (a root image that
    /// many VMs share); a writable disk is locked to this VM.
    #[serde(default)]
    pub read_only: bool,
    /// The disk's id as the guest reads it (at most 20 bytes are used).
    pub id: String,
    /// An empty read-only slot (`path` unused): the disk gets its image
    /// later, through the worker's `attach ID BYTES` command (a warm-pool VM is
    /// handed its workload's root image this way).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub empty_slot: bool,
}

/// The host side of a VM's vsock device (Firecracker's convention): a host
/// process connects to `uds` and writes `CONNECT PORT\n` to reach guest port
/// PORT; a guest connecting to host port P reaches `{uds}_P`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id (3 or more).
    pub cid: u32,
    pub uds: PathBuf,
}

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum VmOutcome {
    /// The workload exited with this code.
    Exited { code: u8 },
    /// The workload was killed by this signal.
    Killed { signal: u8 },
    /// vminit could not start the workload.
    StartFailed { errno: u8 },
    /// The workload asked for a reboot (`reboot` inside the guest).
    Rebooted,
    /// The workload asked for a power-off (`poweroff` or `halt`).
    PoweredOff,
    /// The guest reset without vminit reporting a status (a kernel panic
    /// with `panic=-1`, or `reboot -f` from inside).
    GuestReset,
    /// The guest crashed (triple fault) or halted for good.
    GuestCrashed { reason: String },
    /// The VMM could not build or run the VM.
    VmmError { message: String },
}

impl VmOutcome {
    /// The exit code a client gives for a run that ended so (`cup run`,
    /// `cup attach`, as docker does): the workload's code, 128 + its
    /// signal, 127 when its program was not found and 126 when it could
    /// not be started otherwise, 0 for a power-off or reboot from inside,
    /// 125 when the VM itself failed.
    pub fn exit_code(&self) -> u8 {
        match self {
            VmOutcome::Exited { code } => *code,
            VmOutcome::Killed { signal } => 128u8.saturating_add(*signal),
            VmOutcome::StartFailed { errno } if i32::from(*errno) == libc::ENOENT => 127,
            VmOutcome::StartFailed { .. } => 126,
            VmOutcome::Rebooted | VmOutcome::PoweredOff => 0,
            VmOutcome::GuestReset | VmOutcome::GuestCrashed { .. } | VmOutcome::VmmError { .. } => {
                125
            }
        }
    }

    /// A word for how it ended, for counting outcomes (`cup metrics`):
    /// `success`, `failure` (a nonzero exit code), `killed`,
    /// `start_failed`, `rebooted`, `powered_off`, `guest_reset`,
    /// `guest_crashed`, `vmm_error`.
    pub fn kind(&self) -> &'static str {
        match self {
            VmOutcome::Exited { code: 0 } => "success",
            VmOutcome::Exited { .. } => "failure",
            VmOutcome::Killed { .. } => "killed",
            VmOutcome::StartFailed { .. } => "start_failed",
            VmOutcome::Rebooted => "rebooted",
            VmOutcome::PoweredOff => "powered_off",
            VmOutcome::GuestReset => "guest_reset",
            VmOutcome::GuestCrashed { .. } => "guest_crashed",
            VmOutcome::VmmError { .. } => "vmm_error",
        }
    }

    /// True when the workload ran and exited 0.
    pub fn success(&self) -> bool {
        matches!(self, VmOutcome::Exited { code: 0 } | VmOutcome::PoweredOff)
    }
}

impl std::fmt::Display for VmOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmOutcome::Exited { code } => write!(f, "exited with code {code}"),
            VmOutcome::Killed { signal } => write!(f, "killed by signal {signal}"),
            VmOutcome::StartFailed { errno } => write!(
                f,
                "could not start: {}",
                std::io::Error::from_raw_os_error(i32::from(*errno))
            ),
            VmOutcome::Rebooted => write!(f, "rebooted from inside the guest"),
            VmOutcome::PoweredOff => write!(f, "powered off from inside the guest"),
            VmOutcome::GuestReset => write!(
                f,
                "guest reset without an exit status (reboot -f or a kernel panic)"
            ),
            VmOutcome::GuestCrashed { reason } => write!(f, "guest crashed: {reason}"),
            VmOutcome::VmmError { message } => write!(f, "VMM error: {message}"),
        }
    }
}

/// How a VM ended, the worker's last word ([`WorkerMessage::Report`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerReport {
    #[serde(flatten)]
    pub outcome: VmOutcome,
    /// From the worker's start to the end of the VM.
    pub run_ms: u64,
}

/// What vmmd sends a worker on its control socket after the config line:
/// one JSON object per line, each answered by one
/// [`WorkerMessage::Done`] or [`WorkerMessage::Refused`], in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum WorkerCommand {
    // Empty struct variants, not unit ones, so an unknown field is
    // refused (serde lets a unit variant of a tagged enum ignore them).
    /// Stop every vCPU where it is.
    Pause {},
    /// Let them run again.
    Resume {},
    /// The image for empty disk slot `disk`, `bytes` long (the jailed
    /// worker cannot `fstat`); its descriptor comes with this line.
    Attach { disk: String, bytes: u64 },
    /// The devices' counters, answered with [`WorkerMessage::Counters`].
    Counters {},
}

impl WorkerCommand {
    /// The command as it goes on the wire: JSON and a newline.
    pub fn line(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_default();
        s.push('\n');
        s
    }
}

/// What a worker sends vmmd on its control socket: one JSON object per
/// line. Its own log lines go to its stderr and its guest's console to its
/// stdout, so nothing here is ever mistaken for either.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "message", rename_all = "kebab-case", deny_unknown_fields)]
pub enum WorkerMessage {
    /// The last command was carried out.
    Done,
    /// The last command was not carried out, and why.
    Refused { reason: String },
    /// With `report_timing`: a phase of the worker's start ended at `ns`
    /// (CLOCK_MONOTONIC, the same clock in every process).
    Phase { name: String, ns: u64 },
    /// With `report_timing`: where guest memory lies in the worker.
    GuestMemory { start: u64, len: u64 },
    /// With `report_timing`: vCPU 0 entered the guest for the first time.
    FirstKvmRun { ns: u64 },
    /// How the VM ended: the worker's last message.
    Report { report: WorkerReport },
    /// The answer to [`WorkerCommand::Counters`].
    Counters { counters: DeviceCounters },
}

/// What a VM's devices counted since its worker started (`cup stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceCounters {
    /// Bytes the guest read from and wrote to its disks.
    pub block_read_bytes: u64,
    pub block_write_bytes: u64,
    /// Read and write requests.
    pub block_reads: u64,
    pub block_writes: u64,
    /// vCPU exits to the VMM: port I/O, MMIO, and the rest (halts,
    /// interrupted runs, system events).
    #[serde(default)]
    pub exits_io: u64,
    #[serde(default)]
    pub exits_mmio: u64,
    #[serde(default)]
    pub exits_other: u64,
    /// From the worker's start (a warm VM's: its claim) to vminit's word
    /// that the workload's process runs, ns; 0 until it has.
    #[serde(default)]
    pub boot_ns: u64,
}

impl WorkerMessage {
    /// The message as it goes on the wire: JSON and a newline.
    pub fn line(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).unwrap_or_default();
        v.push(b'\n');
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_round_trips() {
        for outcome in [
            VmOutcome::Exited { code: 7 },
            VmOutcome::GuestReset,
            VmOutcome::GuestCrashed {
                reason: "triple fault".into(),
            },
            VmOutcome::VmmError {
                message: "x".into(),
            },
        ] {
            let r = WorkerReport {
                outcome,
                run_ms: 12,
            };
            let s = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<WorkerReport>(&s).unwrap(), r);
            let m = WorkerMessage::Report { report: r };
            let back: WorkerMessage = serde_json::from_slice(&m.line()).unwrap();
            assert_eq!(back, m);
        }
        assert_eq!(
            VmOutcome::Exited { code: 7 }.to_string(),
            "exited with code 7"
        );
    }

    #[test]
    fn commands_and_messages_are_one_line_of_json_each() {
        let attach = WorkerCommand::Attach {
            disk: "root".into(),
            bytes: 4096,
        };
        assert_eq!(
            attach.line(),
            "{\"command\":\"attach\",\"disk\":\"root\",\"bytes\":4096}\n"
        );
        assert_eq!(WorkerCommand::Pause {}.line(), "{\"command\":\"pause\"}\n");
        let refused = WorkerMessage::Refused {
            reason: "no empty disk slot \"x\"\nsecond line".into(),
        };
        let line = refused.line();
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        assert_eq!(
            serde_json::from_slice::<WorkerMessage>(&line).unwrap(),
            refused
        );
        assert!(serde_json::from_str::<WorkerCommand>("{\"command\":\"reboot\"}").is_err());
        assert!(serde_json::from_str::<WorkerCommand>("{\"command\":\"pause\",\"x\":1}").is_err());
    }

    #[test]
    fn each_outcome_has_the_exit_code_docker_would_give() {
        let code = |o: VmOutcome| o.exit_code();
        assert_eq!(code(VmOutcome::Exited { code: 3 }), 3);
        assert_eq!(code(VmOutcome::Exited { code: 0 }), 0);
        assert_eq!(code(VmOutcome::Killed { signal: 15 }), 143);
        assert_eq!(code(VmOutcome::StartFailed { errno: 2 }), 127);
        assert_eq!(code(VmOutcome::StartFailed { errno: 13 }), 126);
        assert_eq!(code(VmOutcome::PoweredOff), 0);
        assert_eq!(code(VmOutcome::Rebooted), 0);
        assert_eq!(code(VmOutcome::GuestReset), 125);
        let crash = VmOutcome::GuestCrashed {
            reason: "triple fault".into(),
        };
        assert_eq!(code(crash), 125);
        let vmm = VmOutcome::VmmError {
            message: "out of memory".into(),
        };
        assert_eq!(code(vmm), 125);
    }
}
