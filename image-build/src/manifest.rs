//! The image manifest (`steelcup.toml`).

use anyhow::{Context, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub host: Host,
    pub guest: Guest,
    pub units: Units,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Host {
    pub kernel_package: String,
    pub cmdline: String,
    pub hostname: String,
    #[serde(default)]
    pub modules: Vec<String>,
    #[serde(default)]
    pub ship: Vec<String>,
    /// Debian programs of the build machine shipped with the shared
    /// libraries they load (`nft` for the workload network's rules).
    #[serde(default)]
    pub programs: Vec<PathBuf>,
    /// Files of the build machine shipped at their own paths (the CA
    /// certificates registries over HTTPS are checked against).
    #[serde(default)]
    pub files: Vec<PathBuf>,
    /// A static busybox for the host, with these applets (test images only:
    /// the appliance itself has no shell).
    #[serde(default)]
    pub busybox: Option<PathBuf>,
    #[serde(default)]
    pub busybox_applets: Vec<String>,
    /// A machine config baked into the image as
    /// `/etc/steelcup/machine.toml`, applied at first boot when no config
    /// drive or URL gives one (docs/provisioning.md).
    #[serde(default)]
    pub machine_config: Option<PathBuf>,
    /// The update key's public half (64 hex digits, from `cargo xtask
    /// update-key`), baked in as `/etc/steelcup/update.pub`: `cup update`
    /// then takes only updates signed with it.
    #[serde(default)]
    pub update_key: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Guest {
    pub busybox: PathBuf,
    #[serde(default)]
    pub applets: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Units {
    pub dir: PathBuf,
    /// More unit directories, layered over `dir` (a file of the same name wins).
    #[serde(default)]
    pub extra: Vec<PathBuf>,
}

impl Manifest {
    /// Reads a manifest; relative paths are taken from its directory.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read manifest {}", path.display()))?;
        let mut m: Manifest =
            toml::from_str(&text).with_context(|| format!("manifest {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        m.units.dir = base.join(&m.units.dir);
        for e in &mut m.units.extra {
            *e = base.join(&*e);
        }
        if let Some(b) = &mut m.host.busybox {
            *b = base.join(&*b);
        }
        if let Some(c) = &mut m.host.machine_config {
            *c = base.join(&*c);
        }
        if let Some(k) = &mut m.host.update_key {
            *k = base.join(&*k);
        }
        m.guest.busybox = base.join(&m.guest.busybox);
        Ok(m)
    }
}
