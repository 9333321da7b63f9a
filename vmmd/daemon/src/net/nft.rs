//! The nftables rule set of the workload network, made from what runs,
//! and applied whole in one `nft -f` transaction (the old tables go in the
//! same transaction, so there is never a moment without rules).
//!
//! # The model
//! Every VM's tap is an *isolated* port of the bridge and the host answers
//! ARP for the whole subnet (private-VLAN proxy ARP): VMs never reach each
//! other at layer 2, so everything between two VMs is routed by the host
//! and passes the `ip steelcup` forward chain, with connection tracking:
//! - a VM reaches the outside world (masqueraded through the uplink);
//! - a VM reaches another VM of its network scope (by default its unit:
//!   replicas reach each other) on any port, and any VM's published guest
//!   ports; nothing else of another VM;
//! - the host's own addresses answer VMs only for DNS (and ping);
//! - a published port `HOST:GUEST` is DNATed on every local address of the
//!   host (or the one given), from outside and from the host itself
//!   (loopback included), spread over the ready replicas by a counter;
//! - a VM sends only from its own address (checked on its tap in the
//!   `bridge steelcup` table), and only IPv4 and ARP.

use super::ipam::Subnet;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use steelcup_units::ports::PortSpec;

/// Both tables' name.
pub const TABLE: &str = "steelcup";

/// One VM on the bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmEntry {
    pub name: String,
    pub tap: String,
    pub ip: Ipv4Addr,
    /// VMs sharing a scope reach each other on every port.
    pub scopes: Vec<String>,
}

/// A published port and the VMs behind it (ready ones only; none: the
/// port is not forwarded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    pub port: PortSpec,
    pub backends: Vec<Ipv4Addr>,
}

/// Everything the rule set is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub bridge: String,
    pub subnet: Subnet,
    pub vms: Vec<VmEntry>,
    pub publications: Vec<Publication>,
}

impl Plan {
    /// Every address some published port sends connections to.
    pub fn backends(&self) -> std::collections::BTreeSet<Ipv4Addr> {
        self.publications
            .iter()
            .flat_map(|p| p.backends.iter().copied())
            .collect()
    }
}

/// The nft script that replaces both tables with the rule set of `plan`.
pub fn render(plan: &Plan) -> String {
    let br = &plan.bridge;
    let net = plan.subnet;
    let gw = net.gateway();
    let mut s = String::new();
    // `table X {}` first so `delete` never fails on a fresh host.
    let _ = writeln!(s, "table ip {TABLE} {{}}\ndelete table ip {TABLE}");
    let _ = writeln!(s, "table bridge {TABLE} {{}}\ndelete table bridge {TABLE}");

    let _ = writeln!(s, "table ip {TABLE} {{");
    // Published ports.
    let mut dnat = String::new();
    for p in plan.publications.iter().filter(|p| !p.backends.is_empty()) {
        let dest = match p.host_ip() {
            Some(ip) => format!("ip daddr {ip}"),
            None => "fib daddr type local".to_string(),
        };
        let to = match p.backends.as_slice() {
            [one] => format!("{one}:{}", p.port.guest_port),
            many => {
                let map: Vec<String> = many
                    .iter()
                    .enumerate()
                    .map(|(i, b)| format!("{i} : {b} . {}", p.port.guest_port))
                    .collect();
                format!("numgen inc mod {} map {{ {} }}", many.len(), map.join(", "))
            }
        };
        let _ = writeln!(
            dnat,
            "    {dest} {} dport {} dnat ip to {to}",
            p.port.protocol.name(),
            p.port.host_port
        );
    }
    let _ = writeln!(
        s,
        "  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n{dnat}  }}"
    );
    let _ = writeln!(
        s,
        "  chain output {{\n    type nat hook output priority -100; policy accept;\n{dnat}  }}"
    );
    let _ = writeln!(
        s,
        "  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n\
         \x20   oifname \"{br}\" ip saddr 127.0.0.0/8 masquerade\n\
         \x20   oifname \"{br}\" ct status dnat ip saddr {net} masquerade\n\
         \x20   oifname != \"{br}\" ip saddr {net} masquerade\n  }}"
    );

    // Between VMs, and from outside to VMs.
    let _ = writeln!(
        s,
        "  chain forward {{\n    type filter hook forward priority filter; policy accept;\n\
         \x20   oifname \"{br}\" ct state established,related accept\n\
         \x20   iifname \"{br}\" oifname != \"{br}\" ip saddr {net} accept\n\
         \x20   oifname \"{br}\" ct status dnat accept"
    );
    let published: Vec<String> = plan
        .publications
        .iter()
        .flat_map(|p| {
            p.backends
                .iter()
                .map(move |b| format!("{b} . {} . {}", p.port.protocol.name(), p.port.guest_port))
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if !published.is_empty() {
        let _ = writeln!(
            s,
            "    oifname \"{br}\" ip daddr . meta l4proto . th dport {{ {} }} accept",
            published.join(", ")
        );
    }
    let mut scopes: std::collections::BTreeMap<&str, Vec<Ipv4Addr>> = Default::default();
    for vm in &plan.vms {
        for scope in &vm.scopes {
            scopes.entry(scope).or_default().push(vm.ip);
        }
    }
    for ips in scopes.values().filter(|ips| ips.len() > 1) {
        let set: Vec<String> = ips.iter().map(Ipv4Addr::to_string).collect();
        let set = set.join(", ");
        let _ = writeln!(
            s,
            "    iifname \"{br}\" oifname \"{br}\" ip saddr {{ {set} }} ip daddr {{ {set} }} accept"
        );
    }
    let _ = writeln!(s, "    oifname \"{br}\" drop\n  }}");

    // To the host itself.
    let _ = writeln!(
        s,
        "  chain input {{\n    type filter hook input priority filter; policy accept;\n\
         \x20   iifname != \"{br}\" accept\n\
         \x20   ct state established,related accept\n\
         \x20   ip daddr {gw} meta l4proto {{ tcp, udp }} th dport 53 accept\n\
         \x20   ip daddr {gw} icmp type echo-request accept\n\
         \x20   drop\n  }}\n}}"
    );

    // On the bridge ports: each VM speaks only from its own address.
    let _ = writeln!(
        s,
        "table bridge {TABLE} {{\n  chain input {{\n    type filter hook input priority filter; policy accept;"
    );
    let mut forward = String::new();
    for vm in &plan.vms {
        let _ = writeln!(
            s,
            "    iifname \"{0}\" ether type ip ip saddr != {1} drop\n    iifname \"{0}\" ether type arp arp saddr ip != {1} drop\n    iifname \"{0}\" ether type != {{ ip, arp }} drop",
            vm.tap, vm.ip
        );
        let _ = writeln!(forward, "    iifname \"{}\" drop", vm.tap);
    }
    let _ = writeln!(
        s,
        "  }}\n  chain forward {{\n    type filter hook forward priority filter; policy accept;\n{forward}  }}\n}}"
    );
    s
}

impl Publication {
    fn host_ip(&self) -> Option<Ipv4Addr> {
        self.port.host_ip
    }
}

/// The script that removes both tables (nothing else of the host's).
pub fn render_teardown() -> String {
    format!(
        "table ip {TABLE} {{}}\ndelete table ip {TABLE}\ntable bridge {TABLE} {{}}\ndelete table bridge {TABLE}\n"
    )
}

/// Runs `nft -f -` with `script`; the error carries nft's message.
pub fn apply(nft: &std::path::Path, script: &str) -> Result<(), super::NetError> {
    use super::NetError;
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(nft)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| NetError::Run {
            program: nft.to_path_buf(),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|source| NetError::Run {
                program: nft.to_path_buf(),
                source,
            })?;
    }
    let out = child.wait_with_output().map_err(|source| NetError::Run {
        program: nft.to_path_buf(),
        source,
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError::NftRefused {
            status: out.status,
            said: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        let vm = |name: &str, tap: &str, last: u8, scope: &str| VmEntry {
            name: name.into(),
            tap: tap.into(),
            ip: Ipv4Addr::new(10, 88, 0, last),
            scopes: scope.split(',').map(Into::into).collect(),
        };
        Plan {
            bridge: "steelcup0".into(),
            subnet: Subnet::parse("10.88.0.0/16").unwrap(),
            vms: vec![
                vm("web.1", "sct1", 2, "web"),
                vm("web.2", "sct2", 3, "web"),
                vm("db", "sct3", 4, "db"),
            ],
            publications: vec![
                Publication {
                    port: PortSpec::parse("8080:80").unwrap(),
                    backends: vec![Ipv4Addr::new(10, 88, 0, 2), Ipv4Addr::new(10, 88, 0, 3)],
                },
                Publication {
                    port: PortSpec::parse("127.0.0.1:5353:53/udp").unwrap(),
                    backends: vec![Ipv4Addr::new(10, 88, 0, 4)],
                },
                Publication {
                    port: PortSpec::parse("9000:9000").unwrap(),
                    backends: vec![],
                },
            ],
        }
    }

    #[test]
    fn published_ports_spread_over_ready_replicas_from_outside_and_the_host() {
        let r = render(&plan());
        let spread = "fib daddr type local tcp dport 8080 dnat ip to numgen inc mod 2 map { 0 : 10.88.0.2 . 80, 1 : 10.88.0.3 . 80 }";
        // In prerouting (from outside) and output (the host itself).
        assert_eq!(r.matches(spread).count(), 2, "{r}");
        assert_eq!(
            r.matches("ip daddr 127.0.0.1 udp dport 5353 dnat ip to 10.88.0.4:53")
                .count(),
            2,
            "{r}"
        );
        // No ready VM: no forwarding at all.
        assert!(!r.contains("dport 9000"), "{r}");
        // The host reaches them through loopback too, and VMs through the host.
        assert!(r.contains("oifname \"steelcup0\" ip saddr 127.0.0.0/8 masquerade"));
        assert!(r.contains("oifname \"steelcup0\" ct status dnat ip saddr 10.88.0.0/16 masquerade"));
    }

    #[test]
    fn vms_reach_their_scope_and_published_ports_only() {
        let r = render(&plan());
        assert!(r.contains(
            "ip saddr { 10.88.0.2, 10.88.0.3 } ip daddr { 10.88.0.2, 10.88.0.3 } accept"
        ));
        // db is alone in its scope: no rule of its own.
        assert!(!r.contains("ip saddr { 10.88.0.4 }"));
        assert!(r.contains("ip daddr . meta l4proto . th dport { 10.88.0.2 . tcp . 80, 10.88.0.3 . tcp . 80, 10.88.0.4 . udp . 53 } accept"));
        // The forward chain ends in a drop for everything else to a VM.
        let forward = r.split("chain forward").nth(1).unwrap();
        let end = forward.split("chain input").next().unwrap();
        assert!(
            end.trim_end().ends_with("oifname \"steelcup0\" drop\n  }"),
            "{end}"
        );
        // Egress: out of the uplink only, masqueraded.
        assert!(r.contains("oifname != \"steelcup0\" ip saddr 10.88.0.0/16 masquerade"));
        // The host answers VMs' DNS on the gateway and drops the rest.
        assert!(r.contains("ip daddr 10.88.0.1 meta l4proto { tcp, udp } th dport 53 accept"));
    }

    #[test]
    fn a_vm_in_two_scopes_reaches_both_and_they_not_each_other() {
        let mut p = plan();
        let vm = |name: &str, last: u8, scopes: &[&str]| VmEntry {
            name: name.into(),
            tap: format!("t{last}"),
            ip: Ipv4Addr::new(10, 88, 1, last),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
        };
        p.vms = vec![
            vm("front", 2, &["shop_front"]),
            vm("api", 3, &["shop_front", "shop_back"]),
            vm("db", 4, &["shop_back"]),
        ];
        let r = render(&p);
        assert!(
            r.contains(
                "ip saddr { 10.88.1.2, 10.88.1.3 } ip daddr { 10.88.1.2, 10.88.1.3 } accept"
            ),
            "{r}"
        );
        assert!(
            r.contains(
                "ip saddr { 10.88.1.3, 10.88.1.4 } ip daddr { 10.88.1.3, 10.88.1.4 } accept"
            ),
            "{r}"
        );
        assert!(
            !r.contains("10.88.1.2, 10.88.1.4"),
            "front must not reach db: {r}"
        );
    }

    #[test]
    fn each_tap_speaks_only_from_its_address() {
        let r = render(&plan());
        assert!(r.contains("iifname \"sct1\" ether type ip ip saddr != 10.88.0.2 drop"));
        assert!(r.contains("iifname \"sct3\" ether type arp arp saddr ip != 10.88.0.4 drop"));
        assert!(r.contains("iifname \"sct2\" ether type != { ip, arp } drop"));
        // Nothing from a tap is bridged to another port.
        assert!(r.contains("chain forward {\n    type filter hook forward priority filter; policy accept;\n    iifname \"sct1\" drop\n"));
    }

    #[test]
    fn the_script_replaces_the_tables_whole() {
        let r = render(&Plan {
            vms: vec![],
            publications: vec![],
            ..plan()
        });
        // Old tables go in the same transaction; no empty sets (nft refuses them).
        assert!(r.starts_with("table ip steelcup {}\ndelete table ip steelcup\n"));
        assert!(!r.contains("{ }"), "{r}");
        assert_eq!(r.matches('{').count(), r.matches('}').count());
        assert!(render_teardown().contains("delete table bridge steelcup"));
    }
}
