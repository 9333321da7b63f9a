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
//! A warm-pool VM boots with a config that has only [`GuestConfig::pool`]
//! set: vminit mounts the basics and waits on vsock [`POOL_PORT`], where
//! vmmd asks `ping` (answered `pong`: booted and waiting) or hands it the
//! workload's config, `claim JSON` (answered `ok`, or `error: WHY` and it
//! keeps waiting). By then vmmd has given the VM's empty root disk slot
//! its image; vminit waits for the disk to show its size, then goes on as
//! if it had booted with that config.
//!
//! # Limitations
//! A claimed VM keeps the kernel command line, vCPUs and memory it booted
//! with; disks other than the root and the network device are fixed at
//! boot, so workloads with volumes or a network start cold.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Where vminit finds its configuration inside the guest.
pub const CONFIG_PATH: &str = "/steelcup/config.json";
/// The I/O port vminit reports the workload's exit status to.
pub const STATUS_PORT: u16 = 0x0510;
/// The vsock port a warm-pool VM's vminit waits on for its workload.
pub const POOL_PORT: u32 = 1027;
/// The longest `claim` request vminit reads.
pub const MAX_CLAIM: u64 = 256 << 10;

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
    /// Who the workload runs as, as an OCI image config says it: `USER`,
    /// `UID`, `USER:GROUP`, `UID:GID` (names from the root's `/etc/passwd`
    /// and `/etc/group`); root when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Wait (up to a minute) for the host to connect to
    /// [`crate::stdio::ATTACH_PORT`] and give the workload that connection
    /// as its standard streams (`cup run` without `-d`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub attach: bool,
    /// With `attach`: the workload gets a terminal.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tty: bool,
    /// Resource limits (soft and hard) by name; `nofile` is 1048576 unless
    /// given, as container runtimes set it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rlimits: BTreeMap<String, u64>,
    /// A warm-pool VM: wait on [`POOL_PORT`] for the real config (see the
    /// module docs); every other field is ignored.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pool: bool,
    /// The root stays read-only: no writable layer over the root image
    /// (volumes and the tmpfs mounts stay writable).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
    /// More `/etc/hosts` lines: a name and its address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_hosts: Vec<(String, std::net::IpAddr)>,
}

/// The resource limits a workload may set, by the names `ulimit` and
/// `docker run --ulimit` use.
pub const RLIMITS: &[(&str, i32)] = &[
    ("as", libc::RLIMIT_AS as i32),
    ("core", libc::RLIMIT_CORE as i32),
    ("cpu", libc::RLIMIT_CPU as i32),
    ("data", libc::RLIMIT_DATA as i32),
    ("fsize", libc::RLIMIT_FSIZE as i32),
    ("locks", libc::RLIMIT_LOCKS as i32),
    ("memlock", libc::RLIMIT_MEMLOCK as i32),
    ("msgqueue", libc::RLIMIT_MSGQUEUE as i32),
    ("nice", libc::RLIMIT_NICE as i32),
    ("nofile", libc::RLIMIT_NOFILE as i32),
    ("nproc", libc::RLIMIT_NPROC as i32),
    ("rss", libc::RLIMIT_RSS as i32),
    ("rtprio", libc::RLIMIT_RTPRIO as i32),
    ("rttime", libc::RLIMIT_RTTIME as i32),
    ("sigpending", libc::RLIMIT_SIGPENDING as i32),
    ("stack", libc::RLIMIT_STACK as i32),
];

/// The default open-files limit of a workload.
pub const DEFAULT_NOFILE: u64 = 1 << 20;

/// Checks limit names (and that `nofile` stays within what Linux allows).
pub fn check_rlimits(limits: &BTreeMap<String, u64>) -> Result<(), String> {
    for (name, value) in limits {
        if !RLIMITS.iter().any(|(n, _)| n == name) {
            let known: Vec<&str> = RLIMITS.iter().map(|(n, _)| *n).collect();
            return Err(format!(
                "unknown limit {name:?} (one of {})",
                known.join(", ")
            ));
        }
        if name == "nofile" && *value > DEFAULT_NOFILE {
            return Err(format!(
                "nofile {value}: at most {DEFAULT_NOFILE} (the kernel's nr_open)"
            ));
        }
    }
    Ok(())
}

/// The ids a workload runs with, resolved inside its root filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the primary group included).
    pub groups: Vec<u32>,
    /// The home directory from `/etc/passwd`, `/` without an entry.
    pub home: String,
}

/// Parses an id that must fit 32 bits and not be -1 (`(uid_t)-1` means
/// "unchanged" to the kernel); `None` if `s` is not a number at all.
fn parse_id(s: &str, what: &str) -> Option<Result<u32, String>> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // As runc: an id is at most 2^31 - 1 (the kernel's ids are unsigned,
    // but -1 and its neighbours mean "no id" to too much of userspace).
    Some(match s.parse::<u64>() {
        Ok(n) if n <= MAX_ID => Ok(n as u32),
        _ => Err(format!("{what} {s} is above {MAX_ID}")),
    })
}

/// The largest uid or gid a workload may run as (runc's bound).
pub const MAX_ID: u64 = 2_147_483_647;

/// An id field of `/etc/passwd` or `/etc/group`: a number within
/// [`MAX_ID`], or an error naming the entry (never a silent 0, which would
/// be root).
fn id_field(file: &str, entry: &str, field: &str, value: &str) -> Result<u32, String> {
    match parse_id(value, field) {
        Some(Ok(id)) => Ok(id),
        _ => Err(format!(
            "{entry:?} in the image's {file}: its {field} {value:?} is not a number up to {MAX_ID}"
        )),
    }
}

/// Resolves an OCI `User` (`user[:group]`, names or ids) against the
/// contents of `/etc/passwd` and `/etc/group`, as runc does: a name must
/// exist; a numeric uid without an entry gets gid 0 and home `/`;
/// supplementary groups are those of `/etc/group` that list the user.
pub fn resolve_user(spec: &str, passwd: &str, group: &str) -> Result<Credentials, String> {
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    // name:x:uid:gid:gecos:home:shell; the ids are checked where an entry
    // is used.
    let passwd_entries = passwd.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 7).then(|| (f[0], f[2], f[3], f[5]))
    });
    let gid_of = |name: &str, gid: &str| id_field("/etc/passwd", name, "gid", gid);
    let entry = match parse_id(user, "uid") {
        Some(uid) => {
            let uid = uid?;
            match passwd_entries
                .clone()
                .find(|e| parse_id(e.1, "uid").and_then(Result::ok) == Some(uid))
            {
                Some(e) => Some((e.0, uid, gid_of(e.0, e.2)?, e.3)),
                None => Some(("", uid, 0, "/")),
            }
        }
        None if user.is_empty() => Some(("root", 0, 0, "/root")),
        None => match passwd_entries.clone().find(|e| e.0 == user) {
            Some(e) => Some((
                e.0,
                id_field("/etc/passwd", e.0, "uid", e.1)?,
                gid_of(e.0, e.2)?,
                e.3,
            )),
            None => None,
        },
    };
    let Some((name, uid, mut gid, home)) = entry else {
        return Err(format!("user {user:?} is not in the image's /etc/passwd"));
    };
    // name:x:gid:member,member
    let groups: Vec<(&str, Option<u32>, Vec<&str>)> = group
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 4).then(|| {
                (
                    f[0],
                    parse_id(f[2], "gid").and_then(Result::ok),
                    f[3].split(',').filter(|m| !m.is_empty()).collect(),
                )
            })
        })
        .collect();
    if let Some(g) = grp {
        gid = match parse_id(g, "gid") {
            Some(id) => id?,
            None => groups
                .iter()
                .find(|e| e.0 == g)
                .and_then(|e| e.1)
                .ok_or_else(|| format!("group {g:?} is not in the image's /etc/group"))?,
        };
    }
    let mut supplementary = vec![gid];
    if !name.is_empty() && grp.is_none() {
        for (_, id, members) in &groups {
            if let Some(id) = id {
                if members.contains(&name) && !supplementary.contains(id) {
                    supplementary.push(*id);
                }
            }
        }
    }
    let home = if home.is_empty() { "/" } else { home };
    Ok(Credentials {
        uid,
        gid,
        groups: supplementary,
        home: home.to_string(),
    })
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
    /// The interface's MAC address, set before it comes up (a warm-pool VM
    /// booted with another), like `02:53:43:0a:0b:0c`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Resolvers for `/etc/resolv.conf`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<std::net::Ipv4Addr>,
    /// Search domains for `/etc/resolv.conf`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
}

impl GuestNetwork {
    /// `/etc/resolv.conf` for the workload (None: no resolvers given, the
    /// image's own file stays).
    pub fn resolv_conf(&self) -> Option<String> {
        if self.dns.is_empty() {
            return None;
        }
        let mut s = String::from("# written by vminit from the steelcup workload network\n");
        if !self.search.is_empty() {
            s.push_str(&format!("search {}\n", self.search.join(" ")));
        }
        for d in &self.dns {
            s.push_str(&format!("nameserver {d}\n"));
        }
        Some(s)
    }

    /// `/etc/hosts`: loopback, and the workload's own name on its address.
    pub fn hosts(&self, hostname: Option<&str>) -> String {
        let mut s = String::from(LOCALHOST_LINES);
        let addr = self.address.split('/').next().unwrap_or_default();
        if let Some(h) = hostname.filter(|h| !h.is_empty()) {
            match self.search.first() {
                Some(domain) => s.push_str(&format!("{addr}\t{h}.{domain} {h}\n")),
                None => s.push_str(&format!("{addr}\t{h}\n")),
            }
        }
        s
    }
}

/// The loopback lines every `/etc/hosts` vminit writes starts with.
pub const LOCALHOST_LINES: &str =
    "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n";

/// Parses a MAC address written `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!(
            "MAC address {s:?}: expected six hex bytes like 02:00:00:00:00:01"
        ));
    }
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16)
            .ok()
            .filter(|_| p.len() == 2)
            .ok_or_else(|| format!("MAC address {s:?}: {p:?} is not a hex byte"))?;
    }
    Ok(mac)
}

/// Writes a MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// A data disk as the guest sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestVolume {
    /// The block device, like `/dev/vdb`.
    pub device: String,
    /// Where the workload sees it.
    pub path: String,
    /// Mounted read-only.
    #[serde(default)]
    pub read_only: bool,
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

/// Written to [`STATUS_PORT`] by vminit once the workload's process runs:
/// the VM's boot is over (`steelcup_workload_boot_seconds`). Not an exit
/// status ([`ExitStatus::decode`] refuses it).
pub const STARTED: u32 = 0x5c00_0600;

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
                read_only: false,
            }],
            network: Some(GuestNetwork {
                interface: "eth0".into(),
                address: "10.200.3.2/30".into(),
                gateway: Some(std::net::Ipv4Addr::new(10, 200, 3, 1)),
                mac: Some("02:53:43:00:00:07".into()),
                mtu: Some(1500),
                dns: vec![std::net::Ipv4Addr::new(10, 200, 3, 1)],
                search: vec!["steelcup.internal".into()],
            }),
            user: Some("app:staff".into()),
            attach: true,
            tty: false,
            rlimits: [("nofile".to_string(), 1024)].into(),
            pool: false,
            read_only: true,
            extra_hosts: vec![("db.internal".into(), [10, 1, 2, 3].into())],
        };
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<GuestConfig>(&json).unwrap(), c);
        // A warm-pool VM's config says only that.
        let pool = GuestConfig {
            pool: true,
            ..Default::default()
        };
        let json = serde_json::to_string(&pool).unwrap();
        assert!(json.contains("\"pool\":true"), "{json}");
        assert_eq!(serde_json::from_str::<GuestConfig>(&json).unwrap(), pool);
        assert!(serde_json::from_str::<GuestConfig>(r#"{"cmd":[],"bogus":1}"#).is_err());
    }

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\napp:x:1234:1234:app:/work:/bin/sh\nnohome:x:7:8:::/bin/false\nbroken line\n";
    const GROUP: &str = "root:x:0:\nstaff:x:50:app,other\nwheel:x:10:app\napp:x:1234:\n";

    #[test]
    fn rlimit_names_are_checked() {
        let l = |n: &str, v| [(n.to_string(), v)].into();
        assert!(check_rlimits(&l("nofile", 1024)).is_ok());
        assert!(check_rlimits(&l("nproc", 10)).is_ok());
        assert!(check_rlimits(&l("files", 1))
            .unwrap_err()
            .contains("unknown limit \"files\""));
        assert!(check_rlimits(&l("nofile", 1 << 30))
            .unwrap_err()
            .contains("at most"));
    }

    #[test]
    fn users_resolve_like_runc() {
        let r = |s: &str| resolve_user(s, PASSWD, GROUP);
        let c = |uid, gid, groups: &[u32], home: &str| Credentials {
            uid,
            gid,
            groups: groups.to_vec(),
            home: home.into(),
        };
        assert_eq!(r(""), Ok(c(0, 0, &[0], "/root")));
        assert_eq!(r("app"), Ok(c(1234, 1234, &[1234, 50, 10], "/work")));
        assert_eq!(r("1234"), Ok(c(1234, 1234, &[1234, 50, 10], "/work")));
        assert_eq!(r("app:staff"), Ok(c(1234, 50, &[50], "/work")));
        assert_eq!(r("app:99"), Ok(c(1234, 99, &[99], "/work")));
        assert_eq!(
            r("4000"),
            Ok(c(4000, 0, &[0], "/")),
            "a numeric uid needs no entry"
        );
        assert_eq!(r("4000:4001"), Ok(c(4000, 4001, &[4001], "/")));
        assert_eq!(r("nohome"), Ok(c(7, 8, &[8], "/")));
        assert!(r("nobody")
            .unwrap_err()
            .contains("\"nobody\" is not in the image's /etc/passwd"));
        assert!(r("app:nogroup").unwrap_err().contains("/etc/group"));
        assert!(
            r("4294967295").unwrap_err().contains("above 2147483647"),
            "-1 is refused"
        );
        assert!(r("99999999999").unwrap_err().contains("above"));
        assert!(r("0:4294967296").unwrap_err().contains("above"));
        // runc's bound: 2^31 - 1 is the largest id.
        assert_eq!(r("2147483647"), Ok(c(2147483647, 0, &[0], "/")));
        assert!(r("2147483648").unwrap_err().contains("above 2147483647"));
        assert!(r("0:2147483648").unwrap_err().contains("above"));
    }

    /// A passwd entry whose uid or gid was not a number ran the workload
    /// as uid 0 or gid 0.
    #[test]
    fn a_passwd_entry_with_a_bad_id_is_an_error_not_root() {
        let passwd =
            "web:x:abc:100:web:/srv:/bin/sh\ndb:x:70:-1:db:/db:/bin/sh\nok:x:80:80::/:/bin/sh\n";
        let e = resolve_user("web", passwd, "").unwrap_err();
        assert!(
            e.contains("\"web\" in the image's /etc/passwd: its uid \"abc\""),
            "{e}"
        );
        let e = resolve_user("db", passwd, "").unwrap_err();
        assert!(e.contains("its gid \"-1\""), "{e}");
        let e = resolve_user("70", passwd, "").unwrap_err();
        assert!(e.contains("its gid"), "by number too: {e}");
        assert_eq!(
            resolve_user("ok", passwd, "").map(|c| (c.uid, c.gid)),
            Ok((80, 80))
        );
    }

    #[test]
    fn resolv_conf_hosts_and_macs() {
        let n = GuestNetwork {
            interface: "eth0".into(),
            address: "10.88.0.5/16".into(),
            gateway: Some(std::net::Ipv4Addr::new(10, 88, 0, 1)),
            mac: None,
            mtu: None,
            dns: vec![std::net::Ipv4Addr::new(10, 88, 0, 1)],
            search: vec!["steelcup.internal".into()],
        };
        assert_eq!(
            n.resolv_conf().unwrap().lines().skip(1).collect::<Vec<_>>(),
            ["search steelcup.internal", "nameserver 10.88.0.1"]
        );
        assert!(n
            .hosts(Some("web"))
            .contains("10.88.0.5\tweb.steelcup.internal web\n"));
        assert!(GuestNetwork { dns: vec![], ..n }.resolv_conf().is_none());
        let mac = parse_mac("02:53:43:0a:ff:00").unwrap();
        assert_eq!(format_mac(mac), "02:53:43:0a:ff:00");
        for bad in ["02:53:43:0a:ff", "02:53:43:0a:ff:0g", "2:53:43:0a:ff:00:"] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }
}
