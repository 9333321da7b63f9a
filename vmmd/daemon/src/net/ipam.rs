//! Addresses for workload VMs: one lease per VM name in the workload
//! subnet, kept in a file so a VM gets the same address after a restart of
//! itself or of vmmd, and given back when the VM goes for good.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// An IPv4 subnet: network address and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

/// A workload subnet vmmd refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubnetError {
    /// Not `A.B.C.D/N` (what is wrong, from the CIDR parser).
    #[error("subnet {0}")]
    Cidr(String),
    #[error("subnet {0:?}: prefix must be 8 to 29")]
    Prefix(String),
    #[error("subnet {addr}/{prefix}: {addr} has host bits set; the network is {network}/{prefix}")]
    HostBits {
        addr: Ipv4Addr,
        network: Ipv4Addr,
        prefix: u8,
    },
}

impl Subnet {
    /// Parses `A.B.C.D/N`; the address must be the network's own (no host
    /// bits), and the subnet must hold a gateway and at least one VM.
    pub fn parse(s: &str) -> Result<Subnet, SubnetError> {
        let (addr, prefix) = steelcup_proto::parse_cidr(s).map_err(SubnetError::Cidr)?;
        if !(8..=29).contains(&prefix) {
            return Err(SubnetError::Prefix(s.to_string()));
        }
        let net = Subnet {
            network: addr,
            prefix,
        };
        if u32::from(addr) & !net.mask() != 0 {
            return Err(SubnetError::HostBits {
                addr,
                network: Ipv4Addr::from(u32::from(addr) & net.mask()),
                prefix,
            });
        }
        Ok(net)
    }

    pub fn mask(&self) -> u32 {
        u32::MAX << (32 - u32::from(self.prefix))
    }

    pub fn contains(&self, a: Ipv4Addr) -> bool {
        u32::from(a) & self.mask() == u32::from(self.network)
    }

    /// The host's address on the bridge: the first one.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// Addresses VMs may get: all but the network, the gateway and the
    /// broadcast address.
    fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> {
        let first = u32::from(self.network) + 2;
        let broadcast = u32::from(self.network) | !self.mask();
        (first..broadcast).map(Ipv4Addr::from)
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct LeaseFile {
    /// VM name -> address.
    leases: BTreeMap<String, Ipv4Addr>,
}

/// The leases of one subnet, saved to `file` on every change.
#[derive(Debug)]
pub struct Ipam {
    subnet: Subnet,
    file: Option<PathBuf>,
    leases: BTreeMap<String, Ipv4Addr>,
}

impl Ipam {
    /// Leases of `subnet`, loaded from `file` if it exists. Leases outside
    /// the subnet (it was changed) or held twice are dropped with a log
    /// line; an unreadable file starts empty, renamed aside.
    pub fn load(subnet: Subnet, file: Option<&Path>) -> Ipam {
        let mut ipam = Ipam {
            subnet,
            file: file.map(Path::to_path_buf),
            leases: BTreeMap::new(),
        };
        let Some(path) = file else { return ipam };
        let loaded = match std::fs::read(path) {
            Ok(bytes) => match serde_json::from_slice::<LeaseFile>(&bytes) {
                Ok(f) => f.leases,
                Err(e) => {
                    let aside = path.with_extension("json.bad");
                    tracing::warn!(
                        "network: {}: {e}; starting with no leases (the file is kept as {})",
                        path.display(),
                        aside.display()
                    );
                    let _ = std::fs::rename(path, aside);
                    BTreeMap::new()
                }
            },
            Err(_) => BTreeMap::new(),
        };
        let mut taken = std::collections::BTreeSet::new();
        for (name, addr) in loaded {
            if !subnet.contains(addr) || addr == subnet.gateway() || !taken.insert(addr) {
                tracing::warn!("network: dropped the lease of {addr} to {name}: not a free address of {subnet}");
                continue;
            }
            ipam.leases.insert(name, addr);
        }
        ipam
    }

    pub fn subnet(&self) -> Subnet {
        self.subnet
    }

    /// VM `name`'s address: its lease, or the lowest free address.
    pub fn lease(&mut self, name: &str) -> Result<Ipv4Addr, super::NetError> {
        if let Some(a) = self.leases.get(name) {
            return Ok(*a);
        }
        let used: std::collections::BTreeSet<Ipv4Addr> = self.leases.values().copied().collect();
        let addr =
            self.subnet
                .hosts()
                .find(|a| !used.contains(a))
                .ok_or(super::NetError::NoAddress {
                    subnet: self.subnet,
                    held: self.leases.len(),
                })?;
        self.leases.insert(name.to_string(), addr);
        self.save();
        Ok(addr)
    }

    /// The address VM `name` holds, if any.
    pub fn get(&self, name: &str) -> Option<Ipv4Addr> {
        self.leases.get(name).copied()
    }

    /// Gives VM `name`'s address back.
    pub fn release(&mut self, name: &str) {
        if self.leases.remove(name).is_some() {
            self.save();
        }
    }

    /// Keeps only the leases of VMs for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        let before = self.leases.len();
        self.leases.retain(|n, _| keep(n));
        if self.leases.len() != before {
            self.save();
        }
    }

    pub fn leases(&self) -> &BTreeMap<String, Ipv4Addr> {
        &self.leases
    }

    fn save(&self) {
        let Some(path) = &self.file else { return };
        let text = match serde_json::to_vec_pretty(&LeaseFile {
            leases: self.leases.clone(),
        }) {
            Ok(t) => t,
            Err(_) => return,
        };
        // Written aside and renamed: a crash leaves the old file or the new.
        let tmp = path.with_extension("json.tmp");
        let saved = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|_| std::fs::write(&tmp, text))
            .and_then(|_| std::fs::rename(&tmp, path));
        if let Err(e) = saved {
            tracing::warn!("network: cannot save leases to {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_are_checked() {
        let s = Subnet::parse("10.88.0.0/16").unwrap();
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 88, 0, 1));
        assert!(s.contains(Ipv4Addr::new(10, 88, 255, 3)));
        assert!(!s.contains(Ipv4Addr::new(10, 89, 0, 3)));
        for (bad, says) in [
            ("10.88.0.1/16", "host bits"),
            ("10.88.0.0/30", "prefix must be 8 to 29"),
            ("10.88.0.0", "ADDRESS/PREFIX"),
            ("10.88.0.0/33", "prefix must be"),
            ("ten/16", "not an IPv4 address"),
        ] {
            let e = Subnet::parse(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn leases_are_stable_lowest_first_and_released() {
        let mut ipam = Ipam::load(Subnet::parse("10.1.0.0/29").unwrap(), None);
        assert_eq!(ipam.lease("a").unwrap(), Ipv4Addr::new(10, 1, 0, 2));
        assert_eq!(ipam.lease("b").unwrap(), Ipv4Addr::new(10, 1, 0, 3));
        assert_eq!(ipam.lease("a").unwrap(), Ipv4Addr::new(10, 1, 0, 2));
        ipam.release("a");
        assert_eq!(ipam.lease("c").unwrap(), Ipv4Addr::new(10, 1, 0, 2));
        assert_eq!(ipam.get("a"), None);
    }

    #[test]
    fn an_exhausted_pool_says_so() {
        // A /29: .2 to .6 for VMs (.1 is the gateway, .7 broadcast).
        let mut ipam = Ipam::load(Subnet::parse("10.1.0.0/29").unwrap(), None);
        for i in 0..5 {
            ipam.lease(&format!("vm{i}")).unwrap();
        }
        let e = ipam.lease("one-too-many").unwrap_err().to_string();
        assert!(
            e.contains("no free address") && e.contains("10.1.0.0/29"),
            "{e}"
        );
        ipam.release("vm3");
        assert_eq!(
            ipam.lease("one-too-many").unwrap(),
            Ipv4Addr::new(10, 1, 0, 5)
        );
    }

    #[test]
    fn leases_survive_a_restart_and_bad_ones_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("net/leases.json");
        let subnet = Subnet::parse("10.2.0.0/24").unwrap();
        {
            let mut ipam = Ipam::load(subnet, Some(&file));
            ipam.lease("web").unwrap();
            ipam.lease("db").unwrap();
        }
        let mut ipam = Ipam::load(subnet, Some(&file));
        assert_eq!(ipam.get("db"), Some(Ipv4Addr::new(10, 2, 0, 3)));
        ipam.retain(|n| n == "db");
        assert_eq!(Ipam::load(subnet, Some(&file)).leases().len(), 1);
        // Another subnet: the old leases don't fit and are dropped.
        let other = Ipam::load(Subnet::parse("10.3.0.0/24").unwrap(), Some(&file));
        assert!(other.leases().is_empty());
        // Garbage: set aside, not fatal.
        std::fs::write(&file, b"{not json").unwrap();
        assert!(Ipam::load(subnet, Some(&file)).leases().is_empty());
        assert!(file.with_extension("json.bad").exists());
    }
}
