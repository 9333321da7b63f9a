//! `provision`: first-boot provisioning from a machine config
//! (docs/provisioning.md), in the manner of Ignition: applied once,
//! recorded, and checked whole before anything is changed.
//!
//! # Design
//! A machine config is one TOML file, `machine.toml`: the hostname, the
//! host network (as `network.toml`), unit files, registries vmmd pulls
//! from (credentials, plain HTTP), and the update key `cup update` checks
//! signatures with. init looks for one, first found wins:
//!
//! 1. a config drive: a FAT filesystem labelled `STEELCUPCFG` (a whole
//!    disk or a partition) holding `machine.toml`;
//! 2. a URL on the kernel command line, `steelcup.config=http://...`
//!    (PXE fleets), fetched once the network is up (a second step, after
//!    the `network` phase);
//! 3. `/etc/steelcup/machine.toml`, baked into the image by image-build.
//!
//! The config is parsed and every part validated (the hostname, the
//! network rules, each unit file as the supervisor reads it, the
//! registries) before anything is written; a bad config stops provisioning
//! with an error that names the source and the field, and nothing changes.
//! A good one is *applied*: written to `/var/lib/steelcup/machine/` (a new
//! directory renamed into place) with `applied.json` saying from where and
//! its SHA-256. It is never applied again while that record exists: a later
//! boot, or another config, only says so.
//!
//! Every boot *installs* what was applied: the files are copied into
//! `/etc/steelcup` (the image's root is in memory, made anew at each boot),
//! before the `hostname`, `network` and `units` phases read them. So
//! provisioned units sit beside the image's, and one of the same name
//! replaces the image's.
//!
//! # Limitations
//! Without a state partition `/var` is in memory: nothing is recorded, so
//! a config is applied at every boot (what a PXE fleet wants). A config
//! fetched by URL arrives after the `network` phase: its network rules take
//! effect from the next boot. Plain HTTP only (the fetch is PID 1's); serve
//! the config on a trusted network.

use crate::netconfig::NetworkConfig;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The FAT label of a config drive.
pub const DRIVE_LABEL: &str = "STEELCUPCFG";
/// The file on a config drive, and in the image.
pub const FILE: &str = "machine.toml";
/// Where an applied config is kept (on the state partition).
pub const APPLIED_DIR: &str = "/var/lib/steelcup/machine";
/// The largest config accepted.
pub const MAX_BYTES: u64 = 1 << 20;

/// A machine config, as written in `machine.toml`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// The machine's hostname.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The host network, as in `network.toml` (`[[network.interface]]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<toml::Table>,
    /// Unit files by name: `[units.web]` holds the unit's own TOML.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub units: BTreeMap<String, toml::Table>,
    /// Registries vmmd pulls from.
    #[serde(default, rename = "registry", skip_serializing_if = "Vec::is_empty")]
    pub registries: Vec<Registry>,
    /// The update key (an Ed25519 public key, 64 hex digits): `cup update`
    /// then takes only updates it signed.
    #[serde(
        default,
        rename = "update-key",
        skip_serializing_if = "Option::is_none"
    )]
    pub update_key: Option<String>,
    /// Remote administration without SSH: `cup --remote` over mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<Admin>,
    /// Time sync: NTP servers (`time.toml`; the `time-sync` unit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<crate::time::TimeConfig>,
    /// Prometheus metrics over HTTP (the `metrics` unit): off without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
}

/// `[metrics]`: `cup metrics --listen` as the `metrics` unit
/// (docs/observability.md).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Metrics {
    /// `ADDRESS:PORT` to serve `GET /metrics` on; [`METRICS_LISTEN`] by
    /// default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Serve over mutual TLS with `[admin]`'s certificates: only clients
    /// the admin CA signed may scrape. Without it, plain HTTP (for a
    /// management network).
    #[serde(default)]
    pub mutual_tls: bool,
}

/// Where `[metrics]` serves by default.
pub const METRICS_LISTEN: &str = "0.0.0.0:9847";
/// The unit that serves metrics.
const METRICS_UNIT: &str = "metrics";

/// `[admin]`: the gateway `vmmd admin` that `cup --remote` reaches
/// (docs/remote.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Admin {
    /// `ADDRESS:PORT` to listen on; `0.0.0.0:7443` by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// The machine's certificate (PEM; its chain may follow) and key.
    pub server_cert: String,
    pub server_key: String,
    /// The CA whose certificates clients must present (PEM).
    pub client_ca: String,
}

/// The unit that runs the gateway.
const ADMIN_UNIT: &str = "admin";

/// One `[[registry]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Registry {
    /// `HOST[:PORT]`, as image references name it.
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Plain HTTP instead of HTTPS.
    #[serde(default)]
    pub insecure: bool,
}

/// The files a config becomes, relative to `/etc/steelcup` (and to the
/// applied directory): checked, ready to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Files {
    pub files: Vec<(String, String)>,
}

/// A valid hostname: dot-separated labels of letters, digits and inner
/// hyphens, each 1-63 long, 253 in all.
pub fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// What is wrong with a machine config, or with reading, fetching or
/// applying one. A config's errors name where it came from (`source`:
/// a file, a drive, a URL) and the field.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("{source_name}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Toml {
        source_name: String,
        line: Option<usize>,
        message: String,
    },
    #[error("{source_name}: hostname {hostname:?} is not a hostname (letters, digits, inner hyphens; labels of 1-63)")]
    Hostname {
        source_name: String,
        hostname: String,
    },
    #[error("{source_name}: {field}")]
    Encode {
        source_name: String,
        field: String,
        #[source]
        source: toml::ser::Error,
    },
    #[error("{0}")]
    Network(String),
    #[error("{source_name}: units.{name}: not a valid unit name")]
    UnitName { source_name: String, name: String },
    #[error(transparent)]
    Unit(#[from] steelcup_units::UnitError),
    #[error("{source_name}: registry host {host:?} is not HOST[:PORT]")]
    RegistryHost { source_name: String, host: String },
    #[error("{source_name}: registry {host}: username and password go together")]
    RegistryCredentials { source_name: String, host: String },
    #[error("{source_name}: {section}.listen {listen:?} is not ADDRESS:PORT")]
    Listen {
        source_name: String,
        section: &'static str,
        listen: String,
    },
    #[error("{source_name}: admin.{field}: not a PEM {kind}")]
    AdminPem {
        source_name: String,
        field: &'static str,
        kind: String,
    },
    #[error("{source_name}: units.{ADMIN_UNIT}: the name is taken by [admin]")]
    AdminUnitTaken { source_name: String },
    #[error(
        "{source_name}: metrics.mutual-tls needs [admin]'s certificates, and there is no [admin]"
    )]
    MetricsWithoutAdmin { source_name: String },
    #[error("{source_name}: units.{METRICS_UNIT}: the name is taken by [metrics]")]
    MetricsUnitTaken { source_name: String },
    #[error("{source_name}: update-key: {why}")]
    UpdateKey { source_name: String, why: String },
    #[error("{source_name}: [time]: {source}")]
    Time {
        source_name: String,
        source: Box<crate::time::TimeConfigError>,
    },
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: no parent directory", .0.display())]
    NoParent(PathBuf),
    #[error("the record")]
    Record(#[source] serde_json::Error),
    #[error("config drive {}: {why}", dev.display())]
    Drive { dev: PathBuf, why: String },
    #[error("{url}: only http:// URLs are fetched")]
    NotHttp { url: String },
    #[error("{url}: {why} (tried for {secs}s)")]
    Unreachable { url: String, why: String, secs: u64 },
    #[error("{url}")]
    Fetch {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{url}: not an HTTP answer")]
    NotAnAnswer { url: String },
    #[error("{url}: {status}")]
    Status { url: String, status: String },
    #[error("{url}: larger than {MAX_BYTES} bytes")]
    TooLarge { url: String },
    #[error("{what}: not UTF-8 text")]
    NotText { what: String },
}

/// Parses and checks a config read from `source`; its files, or an error
/// naming the source and what is wrong.
pub fn check(source: &str, text: &str) -> Result<Files, ProvisionError> {
    let src = || source.to_string();
    let c: MachineConfig = toml::from_str(text).map_err(|e| ProvisionError::Toml {
        source_name: src(),
        line: e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1),
        message: e.message().trim().to_string(),
    })?;
    let encode = |field: String| {
        move |source| ProvisionError::Encode {
            source_name: src(),
            field,
            source,
        }
    };
    let mut files = Vec::new();
    if let Some(h) = &c.hostname {
        if !valid_hostname(h) {
            return Err(ProvisionError::Hostname {
                source_name: src(),
                hostname: h.clone(),
            });
        }
        files.push(("hostname".to_string(), format!("{h}\n")));
    }
    if let Some(net) = &c.network {
        let text = toml::to_string(net).map_err(encode("network".into()))?;
        NetworkConfig::parse(Path::new(&format!("{source}: network")), &text)
            .map_err(ProvisionError::Network)?;
        files.push(("network.toml".to_string(), text));
    }
    for (name, unit) in &c.units {
        if !steelcup_units::valid_name(name) {
            return Err(ProvisionError::UnitName {
                source_name: src(),
                name: name.clone(),
            });
        }
        let text = toml::to_string(unit).map_err(encode(format!("units.{name}")))?;
        let path = PathBuf::from(format!("{source}: units.{name}")).join(format!("{name}.toml"));
        steelcup_units::parse(&path, &text)?;
        files.push((format!("units/{name}.toml"), text));
    }
    if !c.registries.is_empty() {
        for r in &c.registries {
            let ok = !r.host.is_empty()
                && r.host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
            if !ok {
                return Err(ProvisionError::RegistryHost {
                    source_name: src(),
                    host: r.host.clone(),
                });
            }
            if r.username.is_some() != r.password.is_some() {
                return Err(ProvisionError::RegistryCredentials {
                    source_name: src(),
                    host: r.host.clone(),
                });
            }
        }
        #[derive(Serialize)]
        struct Registries<'a> {
            registry: &'a [Registry],
        }
        let text = toml::to_string(&Registries {
            registry: &c.registries,
        })
        .map_err(encode("registry".into()))?;
        files.push(("registries.toml".to_string(), text));
    }
    if let Some(a) = &c.admin {
        let listen = listen_of(&src(), "admin", a.listen.as_deref(), "0.0.0.0:7443")?;
        for (field, text, kind) in [
            ("server-cert", &a.server_cert, "CERTIFICATE-----"),
            ("server-key", &a.server_key, "PRIVATE KEY-----"),
            ("client-ca", &a.client_ca, "CERTIFICATE-----"),
        ] {
            if !text.contains("-----BEGIN ") || !text.contains(kind) {
                return Err(ProvisionError::AdminPem {
                    source_name: src(),
                    field,
                    kind: kind.trim_end_matches('-').to_lowercase(),
                });
            }
        }
        if c.units.contains_key(ADMIN_UNIT) {
            return Err(ProvisionError::AdminUnitTaken { source_name: src() });
        }
        files.push(("admin/server.crt".into(), a.server_cert.clone()));
        files.push(("admin/server.key".into(), a.server_key.clone()));
        files.push(("admin/client-ca.crt".into(), a.client_ca.clone()));
        let unit = format!(
            "# Installed by the machine config's [admin] (docs/remote.md).\n\
             [unit]\ndescription = \"remote administration: cup --remote over mutual TLS\"\n\n\
             [service]\nexec = [\"/usr/bin/vmmd\", \"admin\", \"--listen\", \"{listen}\", \"--tls-dir\", \"/etc/steelcup/admin\"]\n\
             restart = \"always\"\n"
        );
        steelcup_units::parse(Path::new("admin.toml"), &unit)?;
        files.push((format!("units/{ADMIN_UNIT}.toml"), unit));
    }
    if let Some(m) = &c.metrics {
        let listen = listen_of(&src(), "metrics", m.listen.as_deref(), METRICS_LISTEN)?;
        if m.mutual_tls && c.admin.is_none() {
            return Err(ProvisionError::MetricsWithoutAdmin { source_name: src() });
        }
        if c.units.contains_key(METRICS_UNIT) {
            return Err(ProvisionError::MetricsUnitTaken { source_name: src() });
        }
        let tls = if m.mutual_tls {
            ", \"--tls-dir\", \"/etc/steelcup/admin\""
        } else {
            ""
        };
        let unit = format!(
            "# Installed by the machine config's [metrics] (docs/observability.md).\n\
             [unit]\ndescription = \"Prometheus metrics: GET http{s}://{listen}/metrics\"\n\n\
             [service]\nexec = [\"/usr/bin/cup\", \"metrics\", \"--listen\", \"{listen}\"{tls}]\n\
             restart = \"always\"\n",
            s = if m.mutual_tls { "s" } else { "" },
        );
        steelcup_units::parse(Path::new("metrics.toml"), &unit)?;
        files.push((format!("units/{METRICS_UNIT}.toml"), unit));
    }
    if let Some(t) = &c.time {
        t.check().map_err(|e| ProvisionError::Time {
            source_name: src(),
            source: Box::new(e),
        })?;
        let text = toml::to_string(t).map_err(encode("time".into()))?;
        files.push(("time.toml".to_string(), text));
    }
    if let Some(k) = &c.update_key {
        crate::update::parse_key(k).map_err(|why| ProvisionError::UpdateKey {
            source_name: src(),
            why,
        })?;
        files.push(("update.pub".to_string(), format!("{}\n", k.trim())));
    }
    Ok(Files { files })
}

/// `[section] listen`, else `default`, checked to be `ADDRESS:PORT`.
fn listen_of(
    source_name: &str,
    section: &'static str,
    given: Option<&str>,
    default: &str,
) -> Result<String, ProvisionError> {
    let listen = given.unwrap_or(default).to_string();
    match listen.parse::<std::net::SocketAddr>() {
        Ok(_) => Ok(listen),
        Err(_) => Err(ProvisionError::Listen {
            source_name: source_name.to_string(),
            section,
            listen,
        }),
    }
}

/// Maps an I/O error on `path` to [`ProvisionError::Io`], saying `what`
/// was being done.
fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ProvisionError {
    let path = path.to_path_buf();
    move |source| ProvisionError::Io { what, path, source }
}

/// What `applied.json` records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub source: String,
    pub sha256: String,
}

/// The record of a config applied before, if any.
pub fn applied(dir: &Path) -> Option<Record> {
    let text = std::fs::read_to_string(dir.join("applied.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// Writes `files` and the record into `dir`, all at once: a new directory
/// beside it renamed into place.
pub fn apply(
    dir: &Path,
    source: &str,
    text: &str,
    files: &Files,
) -> Result<Record, ProvisionError> {
    let record = Record {
        source: source.to_string(),
        sha256: crate::update::hex(&Sha256::digest(text.as_bytes())),
    };
    let parent = dir
        .parent()
        .ok_or_else(|| ProvisionError::NoParent(dir.to_path_buf()))?;
    let new = parent.join(".machine.new");
    let _ = std::fs::remove_dir_all(&new);
    let write = |rel: &str, data: &[u8]| -> Result<(), ProvisionError> {
        let p = new.join(rel);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).map_err(io("create", d))?;
        }
        // Private keys are root's alone (install copies the mode).
        let mode = if rel.ends_with(".key") { 0o600 } else { 0o644 };
        let mut f = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(&p)
        }
        .map_err(io("create", &p))?;
        f.write_all(data)
            .and_then(|_| f.sync_all())
            .map_err(io("write", &p))
    };
    std::fs::create_dir_all(&new).map_err(io("create", &new))?;
    for (rel, data) in &files.files {
        write(rel, data.as_bytes())?;
    }
    write(FILE, text.as_bytes())?;
    let json = serde_json::to_vec_pretty(&record).map_err(ProvisionError::Record)?;
    write("applied.json", &json)?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&new, dir).map_err(io("rename to", dir))?;
    if let Ok(d) = std::fs::File::open(parent) {
        let _ = d.sync_all();
    }
    Ok(record)
}

/// Copies what was applied in `dir` into `etc` (files other than the
/// record and the config itself): returns their paths.
pub fn install(dir: &Path, etc: &Path) -> Result<Vec<String>, ProvisionError> {
    let mut done = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let entries = std::fs::read_dir(dir.join(&rel)).map_err(io("read", &dir.join(&rel)))?;
        let mut names: Vec<_> = entries.flatten().collect();
        names.sort_by_key(|e| e.file_name());
        for e in names {
            let r = rel.join(e.file_name());
            let s = r.to_string_lossy().to_string();
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(r);
            } else if s != "applied.json" && s != FILE {
                let to = etc.join(&r);
                if let Some(d) = to.parent() {
                    std::fs::create_dir_all(d).map_err(io("create", d))?;
                }
                std::fs::copy(e.path(), &to).map_err(io("copy to", &to))?;
                done.push(s);
            }
        }
    }
    done.sort();
    Ok(done)
}

/// The label of the FAT filesystem whose boot sector is `sector`, if it
/// is one (FAT32's label field, else FAT12/16's).
pub fn fat_label(sector: &[u8]) -> Option<String> {
    if sector.len() < 512 || sector[510..512] != [0x55, 0xaa] {
        return None;
    }
    let field = if &sector[82..87] == b"FAT32" {
        &sector[71..82]
    } else if &sector[54..57] == b"FAT" {
        &sector[43..54]
    } else {
        return None;
    };
    Some(String::from_utf8_lossy(field).trim_end().to_string())
}

/// `machine.toml` on a config drive among the block devices in
/// `class_block`: (the device, the text).
pub fn find_drive(
    class_block: &Path,
    dev_dir: &Path,
) -> Result<Option<(PathBuf, String)>, ProvisionError> {
    let Ok(entries) = std::fs::read_dir(class_block) else {
        return Ok(None);
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    for name in names {
        let dev = dev_dir.join(&name);
        let Ok(mut f) = std::fs::File::open(&dev) else {
            continue;
        };
        let mut sector = vec![0u8; 512];
        if f.read_exact(&mut sector).is_err() || fat_label(&sector).as_deref() != Some(DRIVE_LABEL)
        {
            continue;
        }
        f.seek(SeekFrom::Start(0))
            .map_err(|source| ProvisionError::Io {
                what: "read",
                path: dev.clone(),
                source,
            })?;
        return read_from_fat(f, &dev).map(|text| Some((dev.clone(), text)));
    }
    Ok(None)
}

/// `machine.toml` from the FAT filesystem on `f` (config drive `dev`),
/// read only.
fn read_from_fat(f: std::fs::File, dev: &Path) -> Result<String, ProvisionError> {
    let drive = |why: String| ProvisionError::Drive {
        dev: dev.to_path_buf(),
        why,
    };
    let fs = crate::update::open_fat(f).map_err(drive)?;
    let bytes = crate::update::read_file(&fs, FILE, MAX_BYTES).map_err(drive)?;
    String::from_utf8(bytes).map_err(|_| drive(format!("{FILE} is not UTF-8 text")))
}

/// `steelcup.config=URL` on the kernel command line.
pub fn url_from_cmdline(cmdline: &str) -> Option<String> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("steelcup.config="))
        .map(String::from)
}

/// GETs `url` (plain `http://HOST[:PORT]/PATH`), trying to connect until
/// `patience` has passed (DHCP may still be getting the address); the
/// body of a 200 answer, at most [`MAX_BYTES`].
pub fn fetch(url: &str, patience: Duration) -> Result<String, ProvisionError> {
    let at = || url.to_string();
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| ProvisionError::NotHttp { url: at() })?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:80")
    };
    let t0 = Instant::now();
    let mut stream = loop {
        let tried = std::net::ToSocketAddrs::to_socket_addrs(&addr.as_str())
            .map_err(|e| e.to_string())
            .and_then(|mut a| a.next().ok_or_else(|| "no address".to_string()))
            .and_then(|a| {
                std::net::TcpStream::connect_timeout(&a, Duration::from_secs(5))
                    .map_err(|e| e.to_string())
            });
        match tried {
            Ok(s) => break s,
            Err(why) if t0.elapsed() >= patience => {
                return Err(ProvisionError::Unreachable {
                    url: at(),
                    why,
                    secs: patience.as_secs(),
                })
            }
            Err(_) => std::thread::sleep(Duration::from_secs(1)),
        }
    };
    let io = |source| ProvisionError::Fetch { url: at(), source };
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io)?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {hostport}\r\nUser-Agent: steelcup-init\r\n\r\n"
    )
    .map_err(io)?;
    let mut answer = Vec::new();
    stream
        .take(MAX_BYTES + 64 * 1024)
        .read_to_end(&mut answer)
        .map_err(io)?;
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| ProvisionError::NotAnAnswer { url: at() })?;
    let head = String::from_utf8_lossy(&answer[..split]);
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(ProvisionError::Status {
            url: at(),
            status: status.to_string(),
        });
    }
    let body = &answer[split + 4..];
    if body.len() as u64 > MAX_BYTES {
        return Err(ProvisionError::TooLarge { url: at() });
    }
    String::from_utf8(body.to_vec()).map_err(|_| ProvisionError::NotText { what: at() })
}

/// What the provisioning phase did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// No config anywhere.
    None,
    /// Applied now, from `source`.
    Applied(Record),
    /// Applied at an earlier boot; `offered` is a config found now that
    /// was not applied.
    Before {
        record: Record,
        offered: Option<String>,
    },
}

/// Applies the config `text` from `source` unless one was applied before;
/// then installs what was applied into `etc`.
pub fn provision(
    dir: &Path,
    etc: &Path,
    found: Option<(String, String)>,
) -> Result<Outcome, ProvisionError> {
    let outcome = match (applied(dir), found) {
        (Some(record), offered) => Outcome::Before {
            record,
            offered: offered.map(|(s, _)| s),
        },
        (None, None) => return Ok(Outcome::None),
        (None, Some((source, text))) => {
            let files = check(&source, &text)?;
            Outcome::Applied(apply(dir, &source, &text, &files)?)
        }
    };
    let installed = install(dir, etc)?;
    tracing::info!("provision: installed {}", installed.join(", "));
    Ok(outcome)
}

/// Says on the console what [`provision`] did.
pub fn report(r: &Result<Outcome, ProvisionError>) {
    match r {
        Ok(Outcome::None) => tracing::info!("provision: no machine config"),
        Ok(Outcome::Applied(rec)) => tracing::info!(
            "provision: applied the machine config from {} (sha256 {})",
            rec.source,
            rec.sha256
        ),
        Ok(Outcome::Before { record, offered }) => {
            tracing::info!(
                "provision: the machine config from {} was applied at an earlier boot; not applied again",
                record.source
            );
            if let Some(o) = offered {
                tracing::info!("provision: the config offered by {o} is not applied (this machine is provisioned)");
            }
        }
        Err(e) => tracing::error!(
            "provision: {}; provisioning stopped, nothing was changed",
            steelcup_sys::error_chain(e)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use steelcup_units::UnitKind;

    const GOOD: &str = r#"
hostname = "node-17"
update-key = "8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c"

[[network.interface]]
match = "eth*"
dhcp = true

[units.hello]
unit = { description = "hello from the machine config" }
service = { exec = ["/bin/echo", "provisioned"] }

[[registry]]
host = "registry.example.com:5000"
username = "fleet"
password = "s3cret"
"#;

    #[test]
    fn a_good_config_becomes_files_the_phases_read() {
        let f = check("drive /dev/vdb", GOOD).unwrap();
        let names: Vec<&str> = f.files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "hostname",
                "network.toml",
                "units/hello.toml",
                "registries.toml",
                "update.pub"
            ]
        );
        assert_eq!(f.files[0].1, "node-17\n");
        let unit = steelcup_units::parse(Path::new("hello.toml"), &f.files[2].1).unwrap();
        assert_eq!(unit.name, "hello");
        assert!(f.files[3].1.contains("registry.example.com:5000"));
        // The config round-trips.
        let c: MachineConfig = toml::from_str(GOOD).unwrap();
        let again: MachineConfig = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(c, again);
    }

    #[test]
    fn bad_configs_name_the_source_and_what_is_wrong() {
        let cases = [
            ("hostnme = \"x\"\n", "drive:1: unknown field `hostnme`"),
            (
                "hostname = \"-bad\"\n",
                "hostname \"-bad\" is not a hostname",
            ),
            (
                "[[network.interface]]\nmatch = \"eth0\"\ndhcp = true\naddress = \"10.0.0.2/24\"\n",
                "dhcp and address are exclusive",
            ),
            ("[units.web]\nservice = { exec = [] }\n", "units.web"),
            (
                "[units.\"a b\"]\nservice = { exec = [\"/x\"] }\n",
                "not a valid unit name",
            ),
            (
                "[[registry]]\nhost = \"r\"\nusername = \"u\"\n",
                "go together",
            ),
            ("hostname = \"x\"\nhostname = \"y\"\n", "drive:2:"),
            ("update-key = \"00\"\n", "update-key: not 64 hex digits"),
        ];
        for (text, want) in cases {
            let e = steelcup_sys::error_chain(&check("drive", text).unwrap_err());
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(e.starts_with("drive"), "{e}");
        }
    }

    #[test]
    fn applied_once_then_only_installed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("var/machine");
        std::fs::create_dir_all(tmp.path().join("var")).unwrap();
        let etc = tmp.path().join("etc");
        let first = provision(&dir, &etc, Some(("drive /dev/vdb".into(), GOOD.into()))).unwrap();
        let Outcome::Applied(rec) = first else {
            panic!("{first:?}")
        };
        assert_eq!(rec.source, "drive /dev/vdb");
        assert_eq!(
            std::fs::read_to_string(etc.join("hostname")).unwrap(),
            "node-17\n"
        );
        assert!(etc.join("units/hello.toml").exists());
        assert!(!etc.join("applied.json").exists() && !etc.join(FILE).exists());
        // Next boot: a fresh /etc, another config offered: not applied.
        let etc2 = tmp.path().join("etc2");
        let other = "hostname = \"other\"\n".to_string();
        let second = provision(&dir, &etc2, Some(("url".into(), other))).unwrap();
        assert_eq!(
            second,
            Outcome::Before {
                record: rec,
                offered: Some("url".into())
            }
        );
        assert_eq!(
            std::fs::read_to_string(etc2.join("hostname")).unwrap(),
            "node-17\n"
        );
    }

    #[test]
    fn admin_access_becomes_the_gateway_unit_and_its_files() {
        let cert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let key = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n";
        let text = format!(
            "[admin]\nlisten = \"0.0.0.0:9443\"\nserver-cert = '''{cert}'''\nserver-key = '''{key}'''\nclient-ca = '''{cert}'''\n"
        );
        let f = check("drive", &text).unwrap();
        let names: Vec<&str> = f.files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "admin/server.crt",
                "admin/server.key",
                "admin/client-ca.crt",
                "units/admin.toml"
            ]
        );
        let unit = steelcup_units::parse(Path::new("admin.toml"), &f.files[3].1).unwrap();
        let UnitKind::Service(s) = unit.kind else {
            panic!("{unit:?}")
        };
        assert_eq!(
            s.exec,
            [
                "/usr/bin/vmmd",
                "admin",
                "--listen",
                "0.0.0.0:9443",
                "--tls-dir",
                "/etc/steelcup/admin"
            ]
        );
        // The key is root's alone, on /var and in /etc.
        let tmp = tempfile::tempdir().unwrap();
        let (dir, etc) = (tmp.path().join("machine"), tmp.path().join("etc"));
        provision(&dir, &etc, Some(("drive".into(), text.clone()))).unwrap();
        use std::os::unix::fs::PermissionsExt;
        for d in [&dir, &etc] {
            let mode = std::fs::metadata(d.join("admin/server.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{}", d.display());
        }
        let e = steelcup_sys::error_chain(
            &check("drive", &text.replace("PRIVATE KEY", "PUBLIC KEY")).unwrap_err(),
        );
        assert!(e.contains("admin.server-key: not a PEM private key"), "{e}");
        let e = steelcup_sys::error_chain(
            &check("drive", &text.replace("0.0.0.0:9443", "anywhere")).unwrap_err(),
        );
        assert!(e.contains("admin.listen \"anywhere\""), "{e}");
    }

    #[test]
    fn metrics_become_the_metrics_unit_plain_or_over_mutual_tls() {
        let exec = |text: &str| {
            let f = check("drive", text).unwrap();
            let (_, unit) = f
                .files
                .iter()
                .find(|(n, _)| n == "units/metrics.toml")
                .expect("no metrics unit");
            let unit = steelcup_units::parse(Path::new("metrics.toml"), unit).unwrap();
            let UnitKind::Service(s) = unit.kind else {
                panic!("{unit:?}")
            };
            s.exec
        };
        assert_eq!(
            exec("[metrics]\n"),
            ["/usr/bin/cup", "metrics", "--listen", METRICS_LISTEN]
        );
        let cert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let key = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n";
        let admin = format!(
            "[admin]\nserver-cert = '''{cert}'''\nserver-key = '''{key}'''\nclient-ca = '''{cert}'''\n"
        );
        assert_eq!(
            exec(&format!(
                "[metrics]\nlisten = \"10.0.0.5:9100\"\nmutual-tls = true\n{admin}"
            )),
            [
                "/usr/bin/cup",
                "metrics",
                "--listen",
                "10.0.0.5:9100",
                "--tls-dir",
                "/etc/steelcup/admin"
            ]
        );
        // Off without [metrics]; refused with what was wrong.
        assert!(!check("drive", "hostname = \"a\"\n")
            .unwrap()
            .files
            .iter()
            .any(|(n, _)| n.contains("metrics")));
        for (text, says) in [
            ("[metrics]\nlisten = \"9100\"\n", "metrics.listen \"9100\""),
            (
                "[metrics]\nmutual-tls = true\n",
                "metrics.mutual-tls needs [admin]",
            ),
            ("[metrics]\nport = 1\n", "port"),
            (
                "[metrics]\n[units.metrics.service]\nexec = [\"/bin/true\"]\n",
                "units.metrics: the name is taken",
            ),
        ] {
            let e = steelcup_sys::error_chain(&check("drive", text).unwrap_err());
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn a_bad_config_changes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("machine");
        let etc = tmp.path().join("etc");
        let e = steelcup_sys::error_chain(
            &provision(&dir, &etc, Some(("drive".into(), "hostname = 7\n".into()))).unwrap_err(),
        );
        assert!(e.starts_with("drive:1:"), "{e}");
        assert!(!dir.exists() && !etc.exists());
        assert_eq!(provision(&dir, &etc, None).unwrap(), Outcome::None);
    }

    #[test]
    fn fat_labels_are_read_from_the_boot_sector() {
        let mut img = std::io::Cursor::new(vec![0u8; 40 << 20]);
        let mut label = [b' '; 11];
        label.copy_from_slice(DRIVE_LABEL.as_bytes());
        fatfs::format_volume(
            &mut img,
            fatfs::FormatVolumeOptions::new()
                .fat_type(fatfs::FatType::Fat32)
                .volume_label(label),
        )
        .unwrap();
        assert_eq!(
            fat_label(&img.get_ref()[..512]).as_deref(),
            Some(DRIVE_LABEL)
        );
        let mut small = std::io::Cursor::new(vec![0u8; 4 << 20]);
        fatfs::format_volume(
            &mut small,
            fatfs::FormatVolumeOptions::new()
                .fat_type(fatfs::FatType::Fat16)
                .volume_label(*b"OTHER      "),
        )
        .unwrap();
        assert_eq!(fat_label(&small.get_ref()[..512]).as_deref(), Some("OTHER"));
        assert_eq!(fat_label(&[0u8; 512]), None);
    }

    #[test]
    fn a_config_is_fetched_over_http() {
        use std::io::{BufRead, BufReader};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            for answer in [
                "HTTP/1.0 200 OK\r\nContent-Length: 19\r\n\r\nhostname = \"node\"\n",
                "HTTP/1.0 404 Not Found\r\n\r\n",
            ] {
                let (mut s, _) = l.accept().unwrap();
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut first = String::new();
                r.read_line(&mut first).unwrap();
                assert_eq!(first, "GET /fleet/machine.toml HTTP/1.0\r\n");
                let mut line = String::new();
                while r.read_line(&mut line).unwrap() > 2 {
                    line.clear();
                }
                s.write_all(answer.as_bytes()).unwrap();
            }
        });
        let url = format!("http://127.0.0.1:{port}/fleet/machine.toml");
        assert_eq!(
            fetch(&url, Duration::from_secs(5)).unwrap(),
            "hostname = \"node\"\n"
        );
        let e = fetch(&url, Duration::from_secs(5)).unwrap_err().to_string();
        assert!(e.ends_with("HTTP/1.0 404 Not Found"), "{e}");
        server.join().unwrap();
        assert!(fetch("https://x/", Duration::ZERO)
            .unwrap_err()
            .to_string()
            .contains("only http://"));
        assert_eq!(
            url_from_cmdline("console=ttyS0 steelcup.config=http://10.0.2.2:8000/m.toml quiet"),
            Some("http://10.0.2.2:8000/m.toml".into())
        );
    }
}
