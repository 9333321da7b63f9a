//! Phase `network`: loopback, then the machine's interfaces — static
//! addresses or DHCP — from `/etc/steelcup/network.toml`.
//!
//! # Design
//! Each `[[interface]]` rule matches interface names by glob; the first rule
//! that matches an interface configures it. Without a file every physical
//! Ethernet interface (one with a `device` in sysfs) gets DHCP, so a PXE
//! fleet needs no configuration. Static addresses are applied during the
//! phase; DHCP runs on a thread per interface so the boot does not wait on a
//! slow server, logs its lease, and renews it at half its lifetime.
//! `/etc/resolv.conf` is written from the DNS servers configured or leased.
//!
//! # Limitations
//! IPv4 only; no IPv6 autoconfiguration, VLANs or bonds yet.

pub mod dhcp;

use std::net::Ipv4Addr;
use std::path::Path;
use steelcup_proto::parse_cidr;
use steelcup_sys as sys;

pub use steelcup_os::netconfig::{InterfaceRule, NetworkConfig};

/// Physical Ethernet interfaces (a `device` in sysfs, type 1) and their MACs.
pub fn physical_interfaces() -> Vec<(String, [u8; 6])> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/sys/class/net") else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let p = e.path();
        let ether = std::fs::read_to_string(p.join("type")).is_ok_and(|t| t.trim() == "1");
        if !ether || !p.join("device").exists() {
            continue;
        }
        let mac = std::fs::read_to_string(p.join("address")).unwrap_or_default();
        let bytes: Vec<u8> = mac
            .trim()
            .split(':')
            .filter_map(|b| u8::from_str_radix(b, 16).ok())
            .collect();
        if let Ok(mac) = <[u8; 6]>::try_from(bytes.as_slice()) {
            out.push((name, mac));
        }
    }
    out.sort();
    out
}

/// Writes `/etc/resolv.conf` (in the writable root) from `dns`.
pub fn write_resolv_conf(dns: &[Ipv4Addr]) {
    if dns.is_empty() {
        return;
    }
    let text: String = dns.iter().map(|d| format!("nameserver {d}\n")).collect();
    let _ = std::fs::create_dir_all("/etc");
    if let Err(e) = std::fs::write("/etc/resolv.conf", text) {
        tracing::warn!("network: /etc/resolv.conf: {e}");
    }
}

/// Phase `network`.
pub fn bring_up() {
    if let Err(e) = sys::link_up("lo") {
        tracing::error!("network: {}", steelcup_sys::error_chain(&e));
    }
    let path = Path::new(crate::boot::ETC).join("network.toml");
    let config = match std::fs::read_to_string(&path) {
        Ok(text) => match NetworkConfig::parse(&path, &text) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("network: {e}; configuring no interfaces");
                return;
            }
        },
        Err(_) => NetworkConfig::default_dhcp(),
    };
    let ifaces = physical_interfaces();
    if ifaces.is_empty() {
        tracing::info!("network: no physical interfaces");
    }
    for (name, mac) in ifaces {
        let Some(rule) = config.rule_for(&name).cloned() else {
            tracing::info!("network: {name}: no rule; left down");
            continue;
        };
        if let Err(e) = sys::link_up(&name) {
            tracing::error!("network: {}", steelcup_sys::error_chain(&e));
            continue;
        }
        if let Some(mtu) = rule.mtu {
            if let Err(e) = sys::set_mtu(&name, mtu) {
                tracing::error!("network: {}", steelcup_sys::error_chain(&e));
            }
        }
        if rule.dhcp {
            let spawned = std::thread::Builder::new()
                .name(format!("dhcp-{name}"))
                .spawn(move || dhcp::run(&name, mac));
            if let Err(e) = spawned {
                tracing::error!("network: cannot start DHCP: {e}");
            }
            continue;
        }
        let Some(Ok((addr, prefix))) = rule.address.as_deref().map(parse_cidr) else {
            continue;
        };
        let applied = sys::set_ipv4(&name, addr, prefix).and_then(|_| {
            rule.gateway
                .map_or(Ok(()), |g| sys::add_default_route(&name, g))
        });
        match applied {
            Ok(()) => {
                tracing::info!(
                    "network: {name} {addr}/{prefix}{} (static)",
                    rule.gateway
                        .map(|g| format!(" via {g}"))
                        .unwrap_or_default()
                );
                write_resolv_conf(&rule.dns);
            }
            Err(e) => tracing::error!("network: {}", steelcup_sys::error_chain(&e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr() {
        assert_eq!(
            parse_cidr("10.0.0.5/8").unwrap(),
            (Ipv4Addr::new(10, 0, 0, 5), 8)
        );
        assert!(parse_cidr("10.0.0.5").is_err());
        assert!(parse_cidr("10.0.0.5/33").is_err());
        assert!(parse_cidr("10.0.0/8").is_err());
    }

    #[test]
    fn rules_parse_validate_and_match_first() {
        let p = Path::new("/etc/steelcup/network.toml");
        let c = NetworkConfig::parse(
            p,
            "[[interface]]\nmatch = \"eth0\"\naddress = \"192.168.1.10/24\"\ngateway = \"192.168.1.1\"\ndns = [\"1.1.1.1\"]\n[[interface]]\nmatch = \"e*\"\ndhcp = true\n",
        )
        .unwrap();
        assert_eq!(
            c.rule_for("eth0").unwrap().address.as_deref(),
            Some("192.168.1.10/24")
        );
        assert!(c.rule_for("eth1").unwrap().dhcp);
        assert!(c.rule_for("wlan0").is_none());
        for (text, needle) in [
            ("[[interface]]\nmatch = \"x\"\n", "needs dhcp"),
            (
                "[[interface]]\nmatch = \"x\"\ndhcp = true\naddress = \"1.2.3.4/8\"\n",
                "exclusive",
            ),
            (
                "[[interface]]\nmatch = \"x\"\naddress = \"1.2.3.4\"\n",
                "ADDRESS/PREFIX",
            ),
            (
                "[[interface]]\nmatch = \"x\"\ndhcp = true\nmtu = 10\n",
                "mtu",
            ),
            (
                "[[interface]]\nmatch = \"x\"\ndhcp = true\nbogus = 1\n",
                "bogus",
            ),
        ] {
            let e = NetworkConfig::parse(p, text).unwrap_err();
            assert!(
                e.contains(needle) && e.contains("network.toml"),
                "{text}: {e}"
            );
        }
        assert!(
            NetworkConfig::default_dhcp()
                .rule_for("enp3s0")
                .unwrap()
                .dhcp
        );
    }
}
