//! The contract between vmmd and vminit, the PID 1 inside every microVM.
//!
//! # Design
//! vmmd appends a small cpio archive holding [`CONFIG_PATH`] (JSON of
//! [`GuestConfig`]) to the guest's initramfs; the kernel unpacks both. When the
//! workload ends, vminit writes its [`ExitStatus`] as one 32-bit `out` to
//! [`STATUS_PORT`] and resets the VM through the i8042 controller. The port
//! is a dedicated device in the VMM, so nothing the workload prints can forge
//! an exit status.
//!
//! # Limitations
//! The configuration is fixed at boot; the vsock channel (exec, attach, a
//! warm pool handing a config to an already booted VM) is still to come.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Where vminit finds its configuration inside the guest.
pub const CONFIG_PATH: &str = "/steelcup/config.json";
/// The I/O port vminit reports the workload's exit status to.
pub const STATUS_PORT: u16 = 0x0510;

/// What vminit runs: the workload's process and its environment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestConfig {
    /// argv of the workload; `cmd[0]` is looked up in `PATH` if it has no `/`.
    pub cmd: Vec<String>,
    /// Environment of the workload.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory of the workload.
    #[serde(default)]
    pub workdir: Option<String>,
    /// Hostname of the microVM.
    #[serde(default)]
    pub hostname: Option<String>,
    /// The block device holding the read-only root filesystem (ext4 or
    /// erofs); vminit puts a writable layer in memory over it and runs the
    /// workload inside. Without it the workload runs in the initramfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<String>,
    /// Data disks to mount; a blank one is formatted (ext2 through
    /// busybox's mke2fs, mounted with the ext4 driver) on first use.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<GuestVolume>,
    /// `eth0`'s address; no network when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<GuestNetwork>,
}

/// The guest's interface, configured by vminit before the workload starts
/// (no DHCP round trip).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestNetwork {
    /// The interface, `eth0`.
    pub interface: String,
    /// Address and prefix length, like `10.200.3.2/30`.
    pub address: String,
    /// The default route's next hop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<std::net::Ipv4Addr>,
}

/// A data disk as the guest sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestVolume {
    /// The block device, like `/dev/vdb`.
    pub device: String,
    /// Where the workload sees it.
    pub path: String,
}

/// The guest device name of the `index`-th virtio disk (0 is `/dev/vda`).
pub fn disk_device(index: usize) -> String {
    let mut name = String::new();
    let mut i = index;
    loop {
        name.insert(0, char::from(b'a' + (i % 26) as u8));
        if i < 26 {
            break;
        }
        i = i / 26 - 1;
    }
    format!("/dev/vd{name}")
}

/// How the workload ended, as vminit reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ExitStatus {
    /// The workload exited with this code.
    Exited { code: u8 },
    /// The workload was killed by this signal.
    Killed { signal: u8 },
    /// vminit could not start the workload (bad config, missing program, ...).
    StartFailed { errno: u8 },
    /// Something in the guest asked vminit to reboot (busybox `reboot`
    /// signals PID 1 with SIGTERM, Ctrl-Alt-Del with SIGINT).
    Rebooted,
    /// Something in the guest asked vminit to power off or halt (SIGUSR2,
    /// SIGUSR1).
    PoweredOff,
}

impl ExitStatus {
    /// Encodes the status as the 32-bit value written to [`STATUS_PORT`]:
    /// bits 0..8 the code, bits 8..16 the kind, bits 16..32 a magic number.
    pub fn encode(self) -> u32 {
        let (kind, code) = match self {
            ExitStatus::Exited { code } => (1u32, code),
            ExitStatus::Killed { signal } => (2, signal),
            ExitStatus::StartFailed { errno } => (3, errno),
            ExitStatus::Rebooted => (4, 0),
            ExitStatus::PoweredOff => (5, 0),
        };
        (0x5c00 << 16) | (kind << 8) | u32::from(code)
    }

    /// Decodes a value written to [`STATUS_PORT`]; `None` for anything vminit
    /// would not write (a guest may write anything there).
    pub fn decode(value: u32) -> Option<Self> {
        if value >> 16 != 0x5c00 {
            return None;
        }
        let code = (value & 0xff) as u8;
        match (value >> 8) & 0xff {
            1 => Some(ExitStatus::Exited { code }),
            2 => Some(ExitStatus::Killed { signal: code }),
            3 => Some(ExitStatus::StartFailed { errno: code }),
            4 if code == 0 => Some(ExitStatus::Rebooted),
            5 if code == 0 => Some(ExitStatus::PoweredOff),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_devices_are_named_like_the_kernel_names_them() {
        assert_eq!(disk_device(0), "/dev/vda");
        assert_eq!(disk_device(1), "/dev/vdb");
        assert_eq!(disk_device(25), "/dev/vdz");
        assert_eq!(disk_device(26), "/dev/vdaa");
        assert_eq!(disk_device(27), "/dev/vdab");
    }

    #[test]
    fn status_round_trips() {
        for s in [
            ExitStatus::Exited { code: 0 },
            ExitStatus::Exited { code: 7 },
            ExitStatus::Exited { code: 255 },
            ExitStatus::Killed { signal: 9 },
            ExitStatus::StartFailed { errno: 2 },
            ExitStatus::Rebooted,
            ExitStatus::PoweredOff,
        ] {
            assert_eq!(ExitStatus::decode(s.encode()), Some(s));
        }
    }

    #[test]
    fn status_rejects_values_vminit_never_writes() {
        assert_eq!(ExitStatus::decode(0), None);
        assert_eq!(ExitStatus::decode(0xffff_ffff), None);
        assert_eq!(ExitStatus::decode((0x5c00 << 16) | (9 << 8)), None);
        assert_eq!(ExitStatus::decode((0x5c00 << 16) | (4 << 8) | 1), None);
    }

    #[test]
    fn config_round_trips_and_rejects_unknown_fields() {
        let c = GuestConfig {
            cmd: vec!["/bin/sh".into(), "-c".into(), "echo hi; exit 7".into()],
            env: [("PATH".to_string(), "/bin".to_string())].into(),
            workdir: Some("/".into()),
            hostname: Some("hello".into()),
            root: Some("/dev/vda".into()),
            volumes: vec![GuestVolume {
                device: "/dev/vdb".into(),
                path: "/data".into(),
            }],
            network: Some(GuestNetwork {
                interface: "eth0".into(),
                address: "10.200.3.2/30".into(),
                gateway: Some(std::net::Ipv4Addr::new(10, 200, 3, 1)),
            }),
        };
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<GuestConfig>(&json).unwrap(), c);
        assert!(serde_json::from_str::<GuestConfig>(r#"{"cmd":[],"bogus":1}"#).is_err());
    }
}
