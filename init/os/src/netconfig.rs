//! The host network's config file, `/etc/steelcup/network.toml`: its
//! schema and checks (pure). init's `network` phase applies it; provisioning
//! checks a machine config's copy before anything changes.

use serde::Deserialize;
use std::net::Ipv4Addr;
use std::path::Path;
use steelcup_proto::parse_cidr;

/// `/etc/steelcup/network.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    #[serde(default, rename = "interface")]
    pub interfaces: Vec<InterfaceRule>,
}

/// One `[[interface]]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct InterfaceRule {
    /// Interface name or glob (`eth0`, `enp*`).
    #[serde(rename = "match")]
    pub pattern: String,
    #[serde(default)]
    pub dhcp: bool,
    /// Static address in CIDR form, `192.168.1.10/24`.
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub gateway: Option<Ipv4Addr>,
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
    #[serde(default)]
    pub mtu: Option<u32>,
}

impl NetworkConfig {
    /// Parses and checks the file's text; errors name the file and field.
    pub fn parse(path: &Path, text: &str) -> Result<Self, String> {
        let c: NetworkConfig =
            toml::from_str(text).map_err(|e| format!("{}: {}", path.display(), e.message()))?;
        for r in &c.interfaces {
            glob::Pattern::new(&r.pattern)
                .map_err(|e| format!("{}: match {:?}: {e}", path.display(), r.pattern))?;
            match (&r.address, r.dhcp) {
                (Some(_), true) => {
                    return Err(format!(
                        "{}: {:?}: dhcp and address are exclusive",
                        path.display(),
                        r.pattern
                    ))
                }
                (Some(a), false) => {
                    parse_cidr(a).map_err(|e| format!("{}: address {e}", path.display()))?;
                }
                (None, false) => {
                    return Err(format!(
                        "{}: {:?}: needs dhcp = true or an address",
                        path.display(),
                        r.pattern
                    ))
                }
                (None, true) => {}
            }
            if r.mtu.is_some_and(|m| !(68..=65535).contains(&m)) {
                return Err(format!(
                    "{}: {:?}: mtu must be 68..=65535",
                    path.display(),
                    r.pattern
                ));
            }
        }
        Ok(c)
    }

    /// DHCP on every interface: what applies when there is no file.
    pub fn default_dhcp() -> Self {
        NetworkConfig {
            interfaces: vec![InterfaceRule {
                pattern: "*".into(),
                dhcp: true,
                address: None,
                gateway: None,
                dns: Vec::new(),
                mtu: None,
            }],
        }
    }

    /// The first rule matching `iface`.
    pub fn rule_for(&self, iface: &str) -> Option<&InterfaceRule> {
        self.interfaces
            .iter()
            .find(|r| glob::Pattern::new(&r.pattern).is_ok_and(|p| p.matches(iface)))
    }
}
