//! The machine `cargo xtask run` boots, which its quick-start test boots
//! too: the appliance with user-mode networking, its admin gateway
//! (mutual TLS) and a range of workload ports forwarded to 127.0.0.1 here,
//! and a config drive whose machine config turns the gateway on.

use crate::GuestConfig;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// The admin gateway's port on the machine (`vmmd admin`'s default,
/// `steelcup_api::remote::DEFAULT_PORT`; the quick-start test checks they
/// agree).
pub const GATEWAY_PORT: u16 = 7443;

/// The port of 127.0.0.1 the admin gateway is forwarded to, when free.
pub const ADMIN_PORT: u16 = 17443;

/// The appliance's ports forwarded to the same ports of 127.0.0.1 (each
/// one that is free here): `cup run -p 8080:80` is `localhost:8080`.
pub const WORKLOAD_PORTS: std::ops::RangeInclusive<u16> = 8080..=8089;

/// Where the machine serves its metrics (the machine config's
/// `[metrics]`, `steelcup_os::provision::METRICS_LISTEN`'s port), and the
/// port of 127.0.0.1 it is forwarded to when free.
pub const METRICS_PORT: u16 = 9847;

/// This machine as the appliance sees it on QEMU's user network.
pub const HOST_FROM_APPLIANCE: &str = "10.0.2.2";

/// A registry on this machine on port 5000 is reached over plain HTTP.
pub const LOCAL_REGISTRY: &str = "10.0.2.2:5000";

/// The machine to boot and how to reach it.
#[derive(Debug)]
pub struct RunMachine {
    pub cfg: GuestConfig,
    /// `127.0.0.1:PORT` of the admin gateway.
    pub admin: String,
    /// `127.0.0.1:PORT` of the machine's metrics (plain HTTP).
    pub metrics: String,
    /// The workload ports forwarded (those that were free).
    pub ports: Vec<u16>,
    /// The ports of [`WORKLOAD_PORTS`] something here holds already.
    pub taken: Vec<u16>,
}

/// The admin certificates in `dir` (ca.crt, client.crt, client.key and
/// the machine's [admin] section), made on first use and kept: a context
/// made once goes on working.
pub fn ensure_certs(dir: &Path) -> Result<bool> {
    let want = [
        "ca.crt",
        "client.crt",
        "client.key",
        "server.crt",
        "machine-admin.toml",
    ];
    if want.iter().all(|f| dir.join(f).is_file()) {
        return Ok(false);
    }
    image_build::admin::certs(dir, &["127.0.0.1".to_string(), "localhost".to_string()])?;
    Ok(true)
}

/// The machine config on the config drive: the admin gateway with the
/// certificates in `certs`, metrics over plain HTTP (QEMU's user network
/// lets only this machine reach them), and the registries reached over
/// plain HTTP.
pub fn machine_config(certs: &Path, insecure: &[&str]) -> Result<String> {
    let admin = std::fs::read_to_string(certs.join("machine-admin.toml"))
        .with_context(|| format!("read {}/machine-admin.toml", certs.display()))?;
    let mut config = String::from(
        "# The machine `cargo xtask run` boots (qemu-tests/src/run_machine.rs).\n\
         hostname = \"steelcup-run\"\n\n",
    );
    for host in std::iter::once(&LOCAL_REGISTRY).chain(insecure) {
        config.push_str(&format!(
            "[[registry]]\nhost = \"{host}\"\ninsecure = true\n\n"
        ));
    }
    config.push_str(&format!(
        "[metrics]\nlisten = \"0.0.0.0:{METRICS_PORT}\"\n\n"
    ));
    config.push_str(&admin);
    Ok(config)
}

/// The appliance in `artifacts` as `cargo xtask run` boots it, named
/// `name`, with the certificates in `certs` (made if missing) and
/// `insecure` registries besides [`LOCAL_REGISTRY`].
pub fn run_machine(
    name: &str,
    artifacts: &Path,
    certs: &Path,
    insecure: &[&str],
) -> Result<RunMachine> {
    run_machine_with(name, artifacts, certs, insecure, "")
}

/// As [`run_machine`], with `more` (TOML) added to the machine config.
pub fn run_machine_with(
    name: &str,
    artifacts: &Path,
    certs: &Path,
    insecure: &[&str],
    more: &str,
) -> Result<RunMachine> {
    ensure_certs(certs)?;
    let mut cfg = GuestConfig::direct(name, artifacts)?;
    let drive_dir = cfg.log_dir.clone();
    std::fs::create_dir_all(&drive_dir)?;
    let drive: PathBuf = drive_dir.join(format!("{name}.config-drive.img"));
    let fat = image_build::disk::fat(
        8 << 20,
        "STEELCUPCFG",
        &[(
            "machine.toml".to_string(),
            (machine_config(certs, insecure)? + more).into_bytes(),
        )],
    )?;
    std::fs::write(&drive, fat).with_context(|| format!("write {}", drive.display()))?;
    cfg.drives.push(drive);
    let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
    let free_or_any = |p: u16, what: &str| -> Result<u16> {
        if free(p) {
            return Ok(p);
        }
        Ok(std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .with_context(|| format!("a free port for {what}"))?
            .port())
    };
    let admin_port = free_or_any(ADMIN_PORT, "the admin gateway")?;
    cfg.forwards.push((admin_port, GATEWAY_PORT));
    let metrics_port = free_or_any(METRICS_PORT, "the metrics")?;
    cfg.forwards.push((metrics_port, METRICS_PORT));
    let (ports, taken): (Vec<u16>, Vec<u16>) = WORKLOAD_PORTS.partition(|p| free(*p));
    cfg.forwards.extend(ports.iter().map(|p| (*p, *p)));
    Ok(RunMachine {
        cfg,
        admin: format!("127.0.0.1:{admin_port}"),
        metrics: format!("127.0.0.1:{metrics_port}"),
        ports,
        taken,
    })
}
