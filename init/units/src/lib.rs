//! Unit files: parsing and validation.
//!
//! # Design
//! A unit is one TOML file in the units directory; its name is the file name
//! without `.toml`. It has a `[unit]` section and exactly one of `[service]`
//! (a host process init supervises) or `[microvm]` (a workload vmmd runs).
//! Unknown fields are errors; every error names the file, the line and the
//! field. [`load_dir`] keeps the good units and returns the bad ones' errors,
//! so one bad file never stops the others. Pure: no I/O but reading the files.
//!
//! Drop-ins (`NAME.d/*.toml` beside a unit file) are merged over it in
//! name order before it is checked.
//!
//! # Limitations
//! A unit's file is read whole into memory; no size limit yet.

pub mod backoff;
pub mod graph;
mod load;
pub mod ports;
pub mod schedule;

pub use backoff::Backoff;
pub use load::{load_dir, load_files, parse, parse_layered, read_unit_file, MAX_UNIT_FILE};

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Errors in unit files.
#[derive(Debug, thiserror::Error)]
pub enum UnitError {
    #[error("{path}: cannot read unit file")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a regular file (a unit file is read only from one)")]
    NotAFile { path: PathBuf },
    #[error("{path}: larger than {max} bytes; a unit file is at most that")]
    TooLarge { path: PathBuf, max: u64 },
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl UnitError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            UnitError::Read { path, .. }
            | UnitError::NotAFile { path }
            | UnitError::TooLarge { path, .. }
            | UnitError::Parse { path, .. }
            | UnitError::Invalid { path, .. } => path,
        }
    }

    /// The unit the refused file is (or is a drop-in of): `NAME` of
    /// `NAME.toml` or of `NAME.toml.d/X.toml`.
    pub fn unit_name(&self) -> Option<String> {
        let p = self.path();
        let file = p.file_name()?.to_str()?;
        let name = match p
            .parent()
            .and_then(|d| d.file_name())
            .and_then(|d| d.to_str())
        {
            Some(dir) if dir.ends_with(".toml.d") => dir.strip_suffix(".toml.d")?,
            _ => file.strip_suffix(".toml")?,
        };
        valid_name(name).then(|| name.to_string())
    }

    fn invalid(path: &Path, message: impl Into<String>) -> Self {
        UnitError::Invalid {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

/// A parsed, validated unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    pub name: String,
    pub path: PathBuf,
    pub unit: UnitSection,
    pub kind: UnitKind,
}

/// What a unit runs. (A machine holds tens of units: the size of the
/// larger variant costs nothing worth a box.)
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)]
pub enum UnitKind {
    Service(ServiceSection),
    Microvm(MicrovmSection),
}

/// The file as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnitFile {
    #[serde(default)]
    pub unit: UnitSection,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceSection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub microvm: Option<MicrovmSection>,
}

/// `[unit]`: description and ordering.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnitSection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Start after these units (if they exist).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
    /// Start after these units, and only if they exist and can start.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requires: Vec<String>,
    /// Start these too; a failure of theirs does not matter.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wants: Vec<String>,
    /// Run only if the kernel command line has each of these words: `KEY`
    /// (present, with or without a value), `KEY=VALUE`, or `!KEY`/`!KEY=VALUE`
    /// (absent). A unit whose condition fails is skipped, not failed.
    #[serde(
        default,
        rename = "condition-kernel-cmdline",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub condition_kernel_cmdline: Vec<String>,
}

impl UnitSection {
    /// The first condition `cmdline` does not meet, if any.
    pub fn unmet_condition(&self, cmdline: &str) -> Option<&str> {
        self.condition_kernel_cmdline
            .iter()
            .find(|c| !cmdline_matches(cmdline, c))
            .map(String::as_str)
    }
}

fn cmdline_matches(cmdline: &str, condition: &str) -> bool {
    let (negate, want) = match condition.strip_prefix('!') {
        Some(rest) => (true, rest),
        None => (false, condition),
    };
    let found = cmdline.split_whitespace().any(|word| {
        if want.contains('=') {
            word == want
        } else {
            word == want || word.split_once('=').is_some_and(|(k, _)| k == want)
        }
    });
    found != negate
}

/// The running kernel's command line (empty if it cannot be read).
pub fn kernel_cmdline() -> String {
    std::fs::read_to_string("/proc/cmdline").unwrap_or_default()
}

pub use steelcup_proto::MemoryBacking;

/// A microVM's network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Network {
    /// No network device: the workload reaches nothing and nothing
    /// reaches it.
    None,
    /// A virtio-net device on a tap of the host's workload bridge: an
    /// address of the workload subnet, DNS from the host, outbound NAT,
    /// published `ports` (see `docs/networking.md`).
    #[default]
    Bridge,
}

/// Restart policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Restart {
    #[default]
    No,
    OnFailure,
    Always,
}

/// When a service counts as started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Ready {
    /// As soon as its process is running.
    #[default]
    Exec,
    /// When it says `READY=1` on the notify socket.
    Notify,
}

/// `[service]`: a host process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServiceSection {
    /// argv; `exec[0]` must be an absolute path.
    #[serde(default)]
    pub exec: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory (default `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<PathBuf>,
    /// User name or numeric uid to run as (default root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Group name or numeric gid (default: the user's group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default)]
    pub restart: Restart,
    #[serde(default)]
    pub ready: Ready,
    /// Seconds a `notify` service has to say `READY=1`.
    #[serde(default = "default_ready_timeout")]
    pub ready_timeout: u32,
    /// The signal that asks it to stop.
    #[serde(default = "default_stop_signal")]
    pub stop_signal: String,
    /// The signal sent on a reload (`cup reload`) to a running service
    /// whose unit did not change (vmmd re-reads its units on SIGHUP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload_signal: Option<String>,
    /// Seconds between the stop signal and SIGKILL.
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout: u32,
    /// cgroup v2 `memory.max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_max: Option<MemSize>,
    /// cgroup v2 `cpu.max`, in CPUs (0.5 = half of one CPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_max: Option<f64>,
    /// cgroup v2 `pids.max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids_max: Option<u32>,
}

impl Eq for ServiceSection {}

impl Default for ServiceSection {
    fn default() -> Self {
        ServiceSection {
            exec: Vec::new(),
            env: BTreeMap::new(),
            workdir: None,
            user: None,
            group: None,
            restart: Restart::No,
            ready: Ready::Exec,
            ready_timeout: default_ready_timeout(),
            stop_signal: default_stop_signal(),
            reload_signal: None,
            stop_timeout: default_stop_timeout(),
            memory_max: None,
            cpu_max: None,
            pids_max: None,
        }
    }
}

fn default_stop_timeout() -> u32 {
    10
}

fn default_ready_timeout() -> u32 {
    30
}

fn default_stop_signal() -> String {
    "SIGTERM".into()
}

impl ServiceSection {
    /// The stop signal, validated at parse time.
    pub fn stop_signal(&self) -> nix::sys::signal::Signal {
        parse_signal(&self.stop_signal).unwrap_or(nix::sys::signal::Signal::SIGTERM)
    }
}

/// `SIGTERM`, `TERM` or `15`.
pub fn parse_signal(s: &str) -> Option<nix::sys::signal::Signal> {
    use std::str::FromStr;
    if let Ok(n) = s.parse::<i32>() {
        return nix::sys::signal::Signal::try_from(n).ok();
    }
    let name = if s.starts_with("SIG") {
        s.to_string()
    } else {
        format!("SIG{s}")
    };
    nix::sys::signal::Signal::from_str(&name).ok()
}

/// `[microvm]`: a workload run by vmmd as its own microVM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MicrovmSection {
    /// OCI image reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Guest kernel; vmmd's default kernel if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    /// Guest initramfs (with vminit as `/init`); vmmd's default if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
    /// The workload's argv.
    #[serde(default)]
    pub cmd: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    #[serde(default)]
    pub memory: MemSize,
    #[serde(default)]
    pub restart: Restart,
    /// A read-only root filesystem image (ext4 or erofs) the workload runs
    /// in, with a writable layer in guest memory on top; without it the
    /// workload runs in the guest initramfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<PathBuf>,
    /// Persistent data disks: created empty by vmmd on first use, formatted
    /// by the guest, kept across restarts of the workload.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeSpec>,
    #[serde(default)]
    pub network: Network,
    /// Published ports, `[HOST_IP:]HOST:GUEST[/tcp|udp]`: the host forwards
    /// them to the workload (spread over its ready replicas).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ports::PortSpec>,
    /// Workloads sharing a scope reach each other on every port; others
    /// reach only published ports. A name or a list of names (a workload
    /// in several scopes, as a Compose service on several networks).
    /// Default: the unit's name (replicas of one unit share it).
    #[serde(
        default,
        rename = "network-scope",
        deserialize_with = "one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub network_scope: Vec<String>,
    /// More names the unit's VMs answer to in DNS, for workloads that
    /// share one of its network scopes (a Compose service's name in its
    /// networks); at most [`MAX_ALIASES`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    #[serde(default, rename = "memory-backing")]
    pub memory_backing: MemoryBacking,
    /// Huge pages for guest memory: transparent ones on anonymous memory,
    /// 2 MiB hugetlb pages (reserved on the host) on a memfd.
    #[serde(default, rename = "huge-pages")]
    pub huge_pages: bool,
    /// Resource limits of the workload's processes, by name (`nofile`,
    /// `nproc`, ... see [`steelcup_proto::guest::RLIMITS`]); soft and hard alike.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rlimits: BTreeMap<String, u64>,
    /// How many VMs of this unit vmmd keeps (0 to [`MAX_REPLICAS`]).
    #[serde(default = "default_replicas")]
    pub replicas: u32,
    /// A probe that tells whether the workload is healthy; failing it
    /// counts as the workload failing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCheck>,
    /// Labels, as Docker's (`cup run -l`, `cup ps --filter label=`): at
    /// most [`MAX_LABELS`], names non-empty, each at most 4 KiB.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Replaces the image's `Entrypoint` and, as `docker run --entrypoint`
    /// does, its `Cmd` (then `cmd` alone is the arguments); `[]` runs
    /// `cmd` alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// The working directory (absolute), over the image's `WorkingDir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Who the workload runs as (`USER`, `UID`, `USER:GROUP`, `UID:GID`),
    /// over the image's `User`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The guest's hostname; the workload's name when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The root filesystem is mounted read-only (no writable layer);
    /// volumes, `/tmp`, `/run` and `/dev` stay writable.
    #[serde(
        default,
        rename = "read-only",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub read_only: bool,
    /// More `/etc/hosts` lines: a name and its address (`cup run --add-host`).
    #[serde(
        default,
        rename = "extra-hosts",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub extra_hosts: BTreeMap<String, std::net::IpAddr>,
    /// CPU time the VM may use, in CPUs (`1.5`: one and a half CPUs' worth
    /// each 100 ms, spread over its vCPUs); it gets at least that many
    /// vCPUs, rounded up. As many CPUs as vCPUs when absent.
    #[serde(default, rename = "cpu-max", skip_serializing_if = "Option::is_none")]
    pub cpu_max: Option<Cpus>,
    /// With `restart = "on-failure"`: at most this many restarts, then the
    /// workload stays ended (Docker's `on-failure:N`); a `cup start`
    /// counts from 0 again.
    #[serde(
        default,
        rename = "max-restarts",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_restarts: Option<u32>,
    /// Run at these times (cron's five fields or `@hourly`-style names,
    /// see [`schedule`]): each time a fresh VM that runs to its end, none
    /// in between.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<schedule::CronSchedule>,
    /// The time zone `schedule` is read in (IANA name); UTC when absent.
    #[serde(default, rename = "time-zone", skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<schedule::TimeZone>,
    /// What a due run does while an earlier one still runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<schedule::Concurrency>,
    /// Seconds a scheduled run may take; then it is stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<u32>,
    /// A run missed while vmmd was not running is caught up once when it
    /// was due at most this many seconds ago (always when absent).
    #[serde(
        default,
        rename = "starting-deadline",
        skip_serializing_if = "Option::is_none"
    )]
    pub starting_deadline: Option<u32>,
    /// Ended runs kept, with their logs (default
    /// [`schedule::DEFAULT_HISTORY`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<u32>,
}

impl Default for MicrovmSection {
    fn default() -> Self {
        MicrovmSection {
            image: None,
            kernel: None,
            initramfs: None,
            cmd: Vec::new(),
            env: BTreeMap::new(),
            vcpus: default_vcpus(),
            memory: MemSize::default(),
            restart: Restart::default(),
            root: None,
            volumes: Vec::new(),
            network: Network::default(),
            ports: Vec::new(),
            network_scope: Vec::new(),
            aliases: Vec::new(),
            memory_backing: MemoryBacking::default(),
            huge_pages: false,
            rlimits: BTreeMap::new(),
            replicas: default_replicas(),
            health: None,
            labels: BTreeMap::new(),
            entrypoint: None,
            workdir: None,
            user: None,
            hostname: None,
            read_only: false,
            extra_hosts: BTreeMap::new(),
            cpu_max: None,
            max_restarts: None,
            schedule: None,
            time_zone: None,
            concurrency: None,
            deadline: None,
            starting_deadline: None,
            history: None,
        }
    }
}

/// A number of CPUs as Docker's `--cpus` writes it (`0.5`, `2`), kept in
/// thousandths: 0.001 to 255.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Cpus(u32);

impl Cpus {
    /// Thousandths of a CPU.
    pub fn millis(self) -> u32 {
        self.0
    }
    /// The whole CPUs it needs: 1.5 needs 2.
    pub fn whole(self) -> u8 {
        self.0.div_ceil(1000).clamp(1, 255) as u8
    }
}

impl TryFrom<f64> for Cpus {
    type Error = String;
    fn try_from(c: f64) -> Result<Cpus, String> {
        let millis = (c * 1000.0).round();
        if !(1.0..=255_000.0).contains(&millis) {
            return Err(format!("{c} CPUs: 0.001 to 255"));
        }
        Ok(Cpus(millis as u32))
    }
}

impl From<Cpus> for f64 {
    fn from(c: Cpus) -> f64 {
        f64::from(c.0) / 1000.0
    }
}

impl std::str::FromStr for Cpus {
    type Err = String;
    fn from_str(s: &str) -> Result<Cpus, String> {
        let c: f64 = s
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: a number of CPUs, like 0.5 or 2"))?;
        Cpus::try_from(c)
    }
}

impl fmt::Display for Cpus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", f64::from(*self))
    }
}

/// The most `extra-hosts` a workload may have.
pub const MAX_EXTRA_HOSTS: usize = 64;

/// The most labels a workload may carry.
pub const MAX_LABELS: usize = 64;
/// The most network scopes one workload is in.
pub const MAX_SCOPES: usize = 16;
/// The most DNS aliases one unit has.
pub const MAX_ALIASES: usize = 16;

/// What is wrong with a workload's labels, if anything.
pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), String> {
    if labels.len() > MAX_LABELS {
        return Err(format!("{} labels: at most {MAX_LABELS}", labels.len()));
    }
    for (k, v) in labels {
        if k.is_empty() || k.len() > 256 || k.chars().any(|c| c.is_control() || c == '=') {
            return Err(format!(
                "label name {k:?}: 1 to 256 characters, no '=' or control characters"
            ));
        }
        if v.len() > 4096 {
            return Err(format!("label {k:?}: its value is longer than 4096 bytes"));
        }
    }
    Ok(())
}

impl MicrovmSection {
    /// What is wrong with `entrypoint`, `workdir`, `user`, `hostname`,
    /// `extra-hosts` and `cpu-max`, if anything (`cup run` checks the same).
    pub fn check_process(&self) -> Result<(), String> {
        let clean = |s: &str| !s.chars().any(|c| c.is_control());
        if let Some(e) = &self.entrypoint {
            if e.len() > 256
                || e.iter().any(|a| a.contains('\0'))
                || e.first().is_some_and(String::is_empty)
            {
                return Err("entrypoint: at most 256 arguments, the first not empty, none holding a NUL byte".into());
            }
        }
        if let Some(w) = &self.workdir {
            if !w.starts_with('/') || w.len() > 4096 || !clean(w) {
                return Err(format!("workdir: {w:?} must be an absolute path"));
            }
        }
        if let Some(u) = &self.user {
            let ok = !u.is_empty()
                && u.len() <= 256
                && u.split(':').count() <= 2
                && u.split(':').all(|p| !p.is_empty())
                && !u.chars().any(|c| c.is_whitespace() || c.is_control());
            if !ok {
                return Err(format!(
                    "user: {u:?} must be USER, UID, USER:GROUP or UID:GID"
                ));
            }
        }
        if let Some(h) = &self.hostname {
            if !valid_hostname(h) {
                return Err(format!(
                    "hostname: {h:?} must be 1-63 letters, digits and '-' per dot-separated label, at most 253 in all"
                ));
            }
        }
        if self.extra_hosts.len() > MAX_EXTRA_HOSTS {
            return Err(format!("extra-hosts: at most {MAX_EXTRA_HOSTS}"));
        }
        if let Some(h) = self.extra_hosts.keys().find(|h| !valid_hostname(h)) {
            return Err(format!(
                "extra-hosts: {h:?} is not a host name (letters, digits, '-' and '.')"
            ));
        }
        if self.max_restarts.is_some() && self.restart != Restart::OnFailure {
            return Err("max-restarts: only with restart = \"on-failure\"".into());
        }
        if self.cpu_max.is_some_and(|c| c.whole() > 32) {
            return Err("cpu-max: at most 32 CPUs (as vcpus)".into());
        }
        self.check_schedule()
    }

    /// What is wrong with `schedule` and the settings that go with it.
    fn check_schedule(&self) -> Result<(), String> {
        if self.schedule.is_none() {
            let given = [
                ("time-zone", self.time_zone.is_some()),
                ("concurrency", self.concurrency.is_some()),
                ("deadline", self.deadline.is_some()),
                ("starting-deadline", self.starting_deadline.is_some()),
                ("history", self.history.is_some()),
            ];
            return match given.iter().find(|(_, set)| *set) {
                Some((name, _)) => Err(format!("{name}: only with schedule")),
                None => Ok(()),
            };
        }
        if self.replicas != 1 {
            return Err("replicas: a scheduled unit starts one VM per run (concurrency = \"allow\" lets runs overlap)".into());
        }
        if self.restart == Restart::Always {
            return Err(
                "restart: a scheduled run ends; \"on-failure\" retries a failed one".into(),
            );
        }
        if self.deadline == Some(0) {
            return Err("deadline: at least 1 second".into());
        }
        if self.history.is_some_and(|h| h > schedule::MAX_HISTORY) {
            return Err(format!("history: at most {}", schedule::MAX_HISTORY));
        }
        Ok(())
    }

    /// Ended runs a scheduled unit keeps.
    pub fn history(&self) -> u32 {
        self.history.unwrap_or(schedule::DEFAULT_HISTORY)
    }

    /// The vCPUs the VM gets: `vcpus`, or more when `cpu-max` needs them.
    pub fn vcpus(&self) -> u8 {
        self.vcpus.max(self.cpu_max.map_or(1, Cpus::whole))
    }

    /// What is wrong with `network`, `ports` and `network-scope`, if
    /// anything (`cup run` checks the same).
    pub fn check_network(&self) -> Result<(), String> {
        if self.network == Network::None && !self.ports.is_empty() {
            return Err("ports: a workload with network = \"none\" cannot publish ports".into());
        }
        if self.ports.len() > MAX_PORTS {
            return Err(format!("ports: at most {MAX_PORTS}"));
        }
        if let Some((a, b)) = ports::first_clash(&self.ports) {
            return Err(format!("ports: {a} and {b} publish the same host port"));
        }
        if self.network_scope.len() > MAX_SCOPES {
            return Err(format!("network-scope: at most {MAX_SCOPES} scopes"));
        }
        for s in &self.network_scope {
            let ok = !s.is_empty()
                && s.len() <= 64
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
            if !ok {
                return Err(format!(
                    "network-scope: {s:?} must be 1-64 letters, digits, '-', '_' or '.'"
                ));
            }
        }
        if self.aliases.len() > MAX_ALIASES {
            return Err(format!("aliases: at most {MAX_ALIASES}"));
        }
        if let Some(a) = self.aliases.iter().find(|a| !valid_hostname(a)) {
            return Err(format!("aliases: {a:?} is not a host name"));
        }
        if !self.aliases.is_empty() && self.network == Network::None {
            return Err("aliases: a workload with network = \"none\" has no name in DNS".into());
        }
        Ok(())
    }
}

/// A host name as RFC 1123 allows it: dot-separated labels of 1-63
/// letters, digits and '-' (not first or last), at most 253 in all.
pub fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// The most ports one workload may publish.
pub const MAX_PORTS: usize = 64;

/// The most replicas a unit may ask for.
pub const MAX_REPLICAS: u32 = 64;

/// A string or a list of strings, read as a list (`network-scope`).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d) {
        Ok(OneOrMany::One(s)) => vec![s],
        Ok(OneOrMany::Many(v)) => v,
        Err(_) => {
            return Err(serde::de::Error::custom(
                "expected a scope name or a list of scope names",
            ))
        }
    })
}

fn default_replicas() -> u32 {
    1
}

/// `[microvm.health]`: how vmmd tells whether a workload is healthy. One
/// of `command`, `tcp` or `http`, run inside the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct HealthCheck {
    /// A program run inside the VM (as `cup exec` runs it): healthy when
    /// it exits 0.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// A TCP port on the guest's loopback that accepts a connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<u16>,
    /// A port on the guest's loopback where `GET path` answers 2xx or 3xx.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<u16>,
    /// The path of the `http` probe.
    #[serde(default = "default_health_path")]
    pub path: String,
    /// Seconds between probes of a healthy workload (until it is first
    /// healthy: every second).
    #[serde(default = "default_health_interval")]
    pub interval: u32,
    /// Seconds a probe may take.
    #[serde(default = "default_health_timeout")]
    pub timeout: u32,
    /// Consecutive failures that make the workload unhealthy.
    #[serde(default = "default_health_retries")]
    pub retries: u32,
    /// Seconds after a start in which failures do not count (the workload
    /// is still coming up).
    #[serde(default)]
    pub start_period: u32,
}

fn default_health_path() -> String {
    "/".into()
}

fn default_health_interval() -> u32 {
    5
}

fn default_health_timeout() -> u32 {
    3
}

fn default_health_retries() -> u32 {
    3
}

impl HealthCheck {
    /// What is wrong with it, if anything.
    pub fn check(&self) -> Result<(), String> {
        let kinds = usize::from(!self.command.is_empty())
            + usize::from(self.tcp.is_some())
            + usize::from(self.http.is_some());
        if kinds != 1 {
            return Err("give exactly one of command, tcp or http".into());
        }
        if self.tcp == Some(0) || self.http == Some(0) {
            return Err("port 0 is not a port".into());
        }
        if !self.path.starts_with('/')
            || self.path.len() > 1024
            || self
                .path
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(format!(
                "path {:?}: an absolute URL path without spaces, at most 1024 bytes",
                self.path
            ));
        }
        if !(1..=3600).contains(&self.interval) {
            return Err(format!("interval {}: 1 to 3600 seconds", self.interval));
        }
        if !(1..=600).contains(&self.timeout) {
            return Err(format!("timeout {}: 1 to 600 seconds", self.timeout));
        }
        if !(1..=100).contains(&self.retries) {
            return Err(format!("retries {}: 1 to 100", self.retries));
        }
        if self.start_period > 3600 {
            return Err(format!(
                "start-period {}: at most 3600 seconds",
                self.start_period
            ));
        }
        Ok(())
    }
}

/// A persistent data disk of a workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSpec {
    /// Names the disk file (`VOLUMES/UNIT/NAME.img`); letters, digits, `-`, `_`.
    pub name: String,
    /// Size of the disk when vmmd creates it.
    pub size: MemSize,
    /// Where the guest mounts it (absolute).
    pub mount: PathBuf,
    /// Mounted read-only (the disk too); a blank one is refused, not
    /// formatted.
    #[serde(
        default,
        rename = "read-only",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub read_only: bool,
}

/// The most volumes a workload may have.
pub const MAX_VOLUMES: usize = 8;

fn default_vcpus() -> u8 {
    1
}

/// A memory size written as `128MiB`, `1GiB`, `512M`, or a number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct MemSize(pub u64);

impl Default for MemSize {
    fn default() -> Self {
        MemSize(128 << 20)
    }
}

impl MemSize {
    pub fn mib(self) -> u64 {
        self.0 >> 20
    }
}

impl TryFrom<&str> for MemSize {
    type Error = String;
    fn try_from(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let num: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a size (like 128MiB)"))?;
        let shift = match unit.trim() {
            "" | "B" => 0,
            "K" | "KiB" | "k" => 10,
            "M" | "MiB" => 20,
            "G" | "GiB" => 30,
            other => return Err(format!("unknown size unit {other:?} (use KiB, MiB or GiB)")),
        };
        num.checked_mul(1 << shift)
            .map(MemSize)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl MemSize {
    /// A size as Docker writes it (`-m 512m`, `1g`, `1.5g`, `64MB`): a
    /// number, fractions allowed, with an optional case-insensitive `b`,
    /// `k`, `m`, `g` or `t` (and a trailing `b` or `ib`), in powers of
    /// 1024 as Docker's `RAMInBytes` reads them; a plain number is bytes.
    pub fn from_docker(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let bad = || format!("{s:?} is not a size (like 512m, 1g or 1.5g)");
        if num.is_empty()
            || num.starts_with('.')
            || num.ends_with('.')
            || num.matches('.').count() > 1
        {
            return Err(bad());
        }
        let shift = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 0,
            "k" | "kb" | "kib" => 10,
            "m" | "mb" | "mib" => 20,
            "g" | "gb" | "gib" => 30,
            "t" | "tb" | "tib" => 40,
            _ => return Err(bad()),
        };
        let (whole, frac) = num.split_once('.').unwrap_or((num, ""));
        let whole: u64 = whole.parse().map_err(|_| bad())?;
        let too_large = || format!("{s:?} is too large");
        let mut bytes = whole.checked_mul(1u64 << shift).ok_or_else(too_large)?;
        if !frac.is_empty() {
            // At most 9 digits of fraction: exact in u128 and far below a byte.
            let digits = &frac[..frac.len().min(9)];
            let f: u128 = digits.parse().map_err(|_| bad())?;
            let part = (f << shift) / 10u128.pow(digits.len() as u32);
            bytes = bytes.checked_add(part as u64).ok_or_else(too_large)?;
        }
        Ok(MemSize(bytes))
    }
}

impl fmt::Display for MemSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_multiple_of(1 << 30) && self.0 > 0 {
            write!(f, "{}GiB", self.0 >> 30)
        } else if self.0.is_multiple_of(1 << 20) && self.0 > 0 {
            write!(f, "{}MiB", self.0 >> 20)
        } else {
            write!(f, "{}", self.0)
        }
    }
}

impl Serialize for MemSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for MemSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(n) => Ok(MemSize(n)),
            Raw::Str(s) => MemSize::try_from(s.as_str()).map_err(serde::de::Error::custom),
        }
    }
}

/// Checks a unit name: `[a-z0-9][a-z0-9._-]*`, at most 64 bytes.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric()
}

impl Unit {
    pub fn stop_timeout(&self) -> Duration {
        match &self.kind {
            UnitKind::Service(s) => Duration::from_secs(u64::from(s.stop_timeout)),
            UnitKind::Microvm(_) => Duration::from_secs(10),
        }
    }
}

/// The fuzzing entry point: any bytes as a unit file, alone and layered over
/// itself as a drop-in. It must return, never panic.
pub fn fuzz_one(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/etc/steelcup/units/fuzz.toml");
    let _ = parse(path, text);
    let _ = parse_layered(
        path,
        text,
        &[(
            PathBuf::from("/etc/steelcup/units/fuzz.d/10.toml"),
            text.to_string(),
        )],
    );
}

#[cfg(test)]
mod fuzz_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str) -> PathBuf {
        PathBuf::from(format!("/etc/steelcup/units/{name}.toml"))
    }

    #[test]
    fn sizes_as_docker_writes_them() {
        let b = |s: &str| MemSize::from_docker(s).map(|m| m.0);
        assert_eq!(b("512m"), Ok(512 << 20));
        assert_eq!(b("1g"), Ok(1 << 30));
        assert_eq!(b("1.5g"), Ok(3 << 29));
        assert_eq!(b("64MB"), Ok(64 << 20));
        assert_eq!(b("2GiB"), Ok(2 << 30));
        assert_eq!(b("4096"), Ok(4096));
        assert_eq!(b("1k"), Ok(1024));
        for bad in [
            "",
            "m",
            ".5g",
            "1.g",
            "1..2m",
            "1.2.3m",
            "12x",
            "-1m",
            "99999999999t",
        ] {
            assert!(b(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn parses_a_service() {
        let u = parse(
            &p("vmmd"),
            r#"
[unit]
description = "VMM daemon"
[service]
exec = ["/usr/bin/vmmd"]
restart = "always"
ready = "notify"
"#,
        )
        .unwrap();
        assert_eq!(u.name, "vmmd");
        let UnitKind::Service(s) = u.kind else {
            panic!("not a service")
        };
        assert_eq!(s.restart, Restart::Always);
        assert_eq!(s.ready, Ready::Notify);
        assert_eq!(s.stop_timeout, 10);
    }

    #[test]
    fn parses_a_microvm() {
        let u = parse(
            &p("hello"),
            r#"
[unit]
after = ["vmmd"]
[microvm]
cmd = ["/bin/sh", "-c", "echo hi; exit 7"]
memory = "64MiB"
vcpus = 2
"#,
        )
        .unwrap();
        let UnitKind::Microvm(m) = u.kind else {
            panic!("not a microvm")
        };
        assert_eq!(m.memory, MemSize(64 << 20));
        assert_eq!(m.vcpus, 2);
        assert_eq!(u.unit.after, vec!["vmmd"]);
    }

    #[test]
    fn network_scopes_are_one_or_many_and_aliases_are_host_names() {
        let read = |body: &str| {
            parse(
                &p("api"),
                &format!("[microvm]\nimage = \"busybox\"\n{body}\n"),
            )
            .map(|u| {
                let UnitKind::Microvm(m) = u.kind else {
                    panic!("not a microvm")
                };
                m
            })
        };
        let m = read("network-scope = \"shop\"").unwrap();
        assert_eq!(m.network_scope, ["shop"]);
        let m =
            read("network-scope = [\"shop_front\", \"shop_back\"]\naliases = [\"api\"]").unwrap();
        assert_eq!(m.network_scope, ["shop_front", "shop_back"]);
        assert_eq!(m.aliases, ["api"]);
        let again = toml::to_string(&m).unwrap();
        assert_eq!(toml::from_str::<MicrovmSection>(&again).unwrap(), m);
        for (body, says) in [
            ("network-scope = 3", "a scope name or a list"),
            ("network-scope = [\"a b\"]", "network-scope"),
            ("aliases = [\"-x\"]", "aliases"),
            ("aliases = [\"db\"]\nnetwork = \"none\"", "aliases"),
        ] {
            let e = read(body).unwrap_err().to_string();
            assert!(e.contains(says), "{body}: {e}");
        }
    }

    #[test]
    fn a_microvm_takes_dockers_process_options() {
        let u = parse(
            &p("app"),
            r#"
[microvm]
image = "busybox"
entrypoint = ["/bin/sh", "-c"]
cmd = ["echo hi"]
workdir = "/srv"
user = "app:staff"
hostname = "box.example"
read-only = true
extra-hosts = { "db.internal" = "10.1.2.3", "v6" = "::1" }
cpu-max = 1.5
restart = "on-failure"
max-restarts = 3
"#,
        )
        .unwrap();
        let UnitKind::Microvm(m) = u.kind else {
            panic!("not a microvm")
        };
        assert_eq!(m.entrypoint, Some(vec!["/bin/sh".into(), "-c".into()]));
        assert_eq!(m.workdir.as_deref(), Some("/srv"));
        assert_eq!(m.user.as_deref(), Some("app:staff"));
        assert_eq!(m.hostname.as_deref(), Some("box.example"));
        assert!(m.read_only);
        assert_eq!(m.extra_hosts["db.internal"].to_string(), "10.1.2.3");
        assert_eq!(m.cpu_max.map(Cpus::millis), Some(1500));
        assert_eq!(m.vcpus(), 2, "1.5 CPUs need 2 vCPUs");
        assert_eq!(m.max_restarts, Some(3));
        // Written back as read.
        let again = toml::to_string(&m).unwrap();
        assert_eq!(toml::from_str::<MicrovmSection>(&again).unwrap(), m);
        for (line, says) in [
            ("workdir = \"srv\"", "workdir"),
            ("user = \"a:b:c\"", "user"),
            ("user = \"\"", "user"),
            ("hostname = \"-bad\"", "hostname"),
            ("hostname = \"a b\"", "hostname"),
            ("extra-hosts = { \"x_y\" = \"10.0.0.1\" }", "extra-hosts"),
            (
                "extra-hosts = { \"db\" = \"10.0.0\" }",
                "invalid IP address",
            ),
            ("cpu-max = 0", "0.001 to 255"),
            ("cpu-max = 40", "cpu-max"),
            ("max-restarts = 3", "only with restart"),
            ("entrypoint = [\"\"]", "entrypoint"),
            ("schedule = \"* * * *\"", "has 4 fields"),
            ("schedule = \"@reboot\"", "@reboot"),
            ("schedule = \"0 0 L * *\"", "extension"),
            (
                "concurrency = \"forbid\"",
                "concurrency: only with schedule",
            ),
            ("deadline = 60", "deadline: only with schedule"),
            ("time-zone = \"UTC\"", "time-zone: only with schedule"),
            ("schedule = \"@hourly\"\ntime-zone = \"Moon/Base\"", "IANA"),
            (
                "schedule = \"@hourly\"\nconcurrency = \"sometimes\"",
                "sometimes",
            ),
            ("schedule = \"@hourly\"\nreplicas = 2", "one VM per run"),
            (
                "schedule = \"@hourly\"\nrestart = \"always\"",
                "a scheduled run ends",
            ),
            ("schedule = \"@hourly\"\ndeadline = 0", "at least 1 second"),
            (
                "schedule = \"@hourly\"\nhistory = 1000",
                "history: at most 100",
            ),
        ] {
            let text = format!("[microvm]\nimage = \"busybox\"\n{line}\n");
            let err = parse(&p("app"), &text).unwrap_err().to_string();
            assert!(err.contains(says), "{line}: {err}");
        }
    }

    #[test]
    fn a_scheduled_unit_reads_back_as_written() {
        let text = "[microvm]\nimage = \"busybox\"\nschedule = \"*/5 * * * *\"\ntime-zone = \"Europe/Berlin\"\nconcurrency = \"forbid\"\ndeadline = 120\nstarting-deadline = 600\nhistory = 3\n";
        let u = parse(&p("backup"), text).unwrap();
        let UnitKind::Microvm(m) = &u.kind else {
            panic!("a microvm unit")
        };
        assert_eq!(m.schedule.as_ref().unwrap().to_string(), "*/5 * * * *");
        assert_eq!(m.time_zone.unwrap().to_string(), "Europe/Berlin");
        assert_eq!(m.concurrency, Some(schedule::Concurrency::Forbid));
        assert_eq!(
            (m.deadline, m.starting_deadline, m.history()),
            (Some(120), Some(600), 3)
        );
        let again = toml::to_string(m).unwrap();
        assert!(again.contains("schedule = \"*/5 * * * *\""), "{again}");
        assert!(again.contains("time-zone = \"Europe/Berlin\""), "{again}");
    }

    #[test]
    fn unknown_field_names_file_line_and_field() {
        let err = parse(
            &p("web"),
            "[service]\nexec = [\"/bin/x\"]\nrestrat = \"always\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("/etc/steelcup/units/web.toml:3:1:"),
            "{err}"
        );
        assert!(err.contains("restrat"), "{err}");
    }

    #[test]
    fn wrong_type_names_the_line() {
        let err = parse(&p("web"), "[microvm]\ncmd = [\"x\"]\nvcpus = \"two\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("web.toml:3:"), "{err}");
    }

    #[test]
    fn semantic_errors_name_the_field() {
        let cases = [
            ("[service]\nexec = []\n", "exec"),
            ("[service]\nexec = [\"bin/x\"]\n", "absolute"),
            ("[microvm]\ncmd = [\"x\"]\nvcpus = 0\n", "vcpus"),
            ("[microvm]\ncmd = [\"x\"]\nmemory = \"1KiB\"\n", "memory"),
            (
                "[microvm]\ncmd = [\"x\"]\nmemory = \"12XB\"\n",
                "unknown size unit",
            ),
            ("[unit]\n", "neither"),
            (
                "[unit]\nafter = [\"Bad Name\"]\n[service]\nexec=[\"/x\"]\n",
                "valid unit name",
            ),
        ];
        for (text, needle) in cases {
            let err = parse(&p("u"), text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?} gave {err}");
        }
    }

    #[test]
    fn bad_file_name_is_refused() {
        assert!(parse(Path::new("/x/Bad Name.toml"), "[service]\nexec=[\"/x\"]").is_err());
    }

    #[test]
    fn unit_file_round_trips() {
        let text = r#"
[unit]
description = "d"
after = ["a"]
[microvm]
image = "localhost:5000/nginx:latest"
cmd = ["nginx"]
memory = "256MiB"
restart = "on-failure"
"#;
        let f: UnitFile = toml::from_str(text).unwrap();
        let again: UnitFile = toml::from_str(&toml::to_string(&f).unwrap()).unwrap();
        assert_eq!(f, again);
    }

    #[test]
    fn mem_sizes() {
        assert_eq!(MemSize::try_from("128MiB").unwrap().0, 128 << 20);
        assert_eq!(MemSize::try_from("1G").unwrap().0, 1 << 30);
        assert_eq!(MemSize::try_from("4096").unwrap().0, 4096);
        assert!(MemSize::try_from("MiB").is_err());
        assert!(MemSize::try_from("99999999999999999999GiB").is_err());
        assert_eq!(MemSize(128 << 20).to_string(), "128MiB");
    }

    #[test]
    fn kernel_cmdline_conditions() {
        let u = |c: &[&str]| UnitSection {
            condition_kernel_cmdline: c.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let cmdline = "console=ttyS0 steelcup.test=vms quiet\n";
        assert_eq!(u(&[]).unmet_condition(cmdline), None);
        assert_eq!(u(&["steelcup.test=vms"]).unmet_condition(cmdline), None);
        assert_eq!(u(&["steelcup.test"]).unmet_condition(cmdline), None);
        assert_eq!(u(&["quiet", "!debug"]).unmet_condition(cmdline), None);
        assert_eq!(
            u(&["quiet", "steelcup.test=poweroff"]).unmet_condition(cmdline),
            Some("steelcup.test=poweroff")
        );
        assert_eq!(u(&["!quiet"]).unmet_condition(cmdline), Some("!quiet"));
        assert_eq!(u(&["steelcup"]).unmet_condition(cmdline), Some("steelcup"));
        let parsed = parse(
            &p("x"),
            "[unit]\ncondition-kernel-cmdline = [\"steelcup.test=vms\"]\n[service]\nexec = [\"/bin/x\"]\n",
        )
        .unwrap();
        assert_eq!(
            parsed.unit.condition_kernel_cmdline,
            vec!["steelcup.test=vms".to_string()]
        );
    }

    #[test]
    fn load_dir_keeps_good_units_beside_bad_ones() {
        let dir = std::env::temp_dir().join(format!("steelcup-units-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.toml"), "[service]\nexec=[\"/bin/a\"]\n").unwrap();
        std::fs::write(dir.join("b.toml"), "[service\n").unwrap();
        std::fs::write(dir.join("c.toml"), "[service]\nexec=[\"/bin/c\"]\n").unwrap();
        std::fs::write(dir.join("notes.txt"), "not a unit").unwrap();
        let (units, errors) = load_dir(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        let names: Vec<_> = units.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["a", "c"]);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].to_string().contains("b.toml:1:"), "{}", errors[0]);
    }

    /// A FIFO named `*.toml` hung the read of the units directory, and a
    /// link to /dev/zero would have read until memory ran out: only
    /// regular files of a bounded size are read, and the rest load.
    #[test]
    fn fifos_devices_and_huge_files_are_refused_without_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("good.toml"), "[service]\nexec=[\"/bin/a\"]\n").unwrap();
        nix::unistd::mkfifo(
            &d.join("fifo.toml"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        std::os::unix::fs::symlink("/dev/zero", d.join("zero.toml")).unwrap();
        std::fs::write(d.join("huge.toml"), vec![b'#'; MAX_UNIT_FILE as usize + 1]).unwrap();
        std::fs::create_dir_all(d.join("good.d")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", d.join("good.d/10-zero.toml")).unwrap();
        std::fs::write(d.join("ok.toml"), "[service]\nexec=[\"/bin/b\"]\n").unwrap();
        let t0 = std::time::Instant::now();
        let (units, errors) = load_dir(d);
        assert!(t0.elapsed() < std::time::Duration::from_secs(5));
        let names: Vec<_> = units.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["ok"]);
        let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(text.len(), 4, "{text:?}");
        assert!(
            text.iter()
                .any(|e| e.contains("fifo.toml: not a regular file")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|e| e.contains("zero.toml: not a regular file")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|e| e.contains("10-zero.toml: not a regular file")),
            "{text:?}"
        );
        assert!(
            text.iter().any(|e| e.contains("huge.toml: larger than")),
            "{text:?}"
        );
    }

    #[test]
    fn dropins_layer_over_the_unit_and_name_their_own_errors() {
        let dir = std::env::temp_dir().join(format!("steelcup-dropins-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("web.d")).unwrap();
        std::fs::write(
            dir.join("web.toml"),
            "[service]\nexec=[\"/bin/web\"]\nrestart=\"no\"\n[service.env]\nA=\"1\"\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("web.d/10-restart.toml"),
            "[service]\nrestart=\"always\"\n[service.env]\nB=\"2\"\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("web.d/20-more.toml"),
            "[service]\nrestart=\"on-failure\"\n",
        )
        .unwrap();
        std::fs::write(dir.join("bad.toml"), "[service]\nexec=[\"/bin/bad\"]\n").unwrap();
        std::fs::create_dir_all(dir.join("bad.d")).unwrap();
        std::fs::write(dir.join("bad.d/10-x.toml"), "[service]\n\nbogus = 1\n").unwrap();
        let (units, errors) = load_dir(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(units.len(), 1);
        let UnitKind::Service(s) = &units[0].kind else {
            panic!()
        };
        assert_eq!(s.restart, Restart::OnFailure, "later drop-ins win");
        assert_eq!(s.env.len(), 2, "tables merge");
        assert_eq!(errors.len(), 1);
        let e = errors[0].to_string();
        assert!(e.contains("bad.d/10-x.toml:3:1"), "{e}");
    }

    #[test]
    fn service_fields_are_validated() {
        let ok = parse(&p("s"), "[service]\nexec=[\"/x\"]\nstop-signal=\"SIGINT\"\nmemory-max=\"64MiB\"\ncpu-max=0.5\npids-max=100\nuser=\"nobody\"\nworkdir=\"/tmp\"\n").unwrap();
        let UnitKind::Service(s) = ok.kind else {
            panic!()
        };
        assert_eq!(s.stop_signal(), nix::sys::signal::Signal::SIGINT);
        assert_eq!(s.memory_max, Some(MemSize(64 << 20)));
        for (text, needle) in [
            ("stop-signal=\"SIGNOPE\"", "stop-signal"),
            ("cpu-max=0.0", "cpu-max"),
            ("cpu-max=nan", "cpu-max"),
            ("workdir=\"rel\"", "workdir"),
        ] {
            let err = parse(&p("s"), &format!("[service]\nexec=[\"/x\"]\n{text}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
        assert_eq!(
            parse_signal("TERM"),
            Some(nix::sys::signal::Signal::SIGTERM)
        );
        assert_eq!(parse_signal("9"), Some(nix::sys::signal::Signal::SIGKILL));
    }
}
