//! The workload network: a bridge on the host, a tap per VM on it, an
//! address per VM from a subnet (leases kept in the state directory),
//! nftables for NAT, published ports and isolation, and a DNS server on
//! the bridge that knows the workloads by name.
//!
//! # Design
//! vmmd makes the bridge (over rtnetlink) with the subnet's first address,
//! and keeps the whole nftables rule set as a function of what runs
//! ([`nft::render`]): after every event the daemon hands [`HostNet::sync`]
//! the running VMs and the published ports, and the rule set is replaced in
//! one transaction when it changed. A VM's worker creates its own tap and
//! puts it on the bridge as an isolated port before it jails itself; the
//! tap goes when the worker goes. So after `kill -9` of vmmd (its workers
//! die with it) nothing stays but the bridge, whose rules the next vmmd
//! replaces at start, and the leases, which it prunes to the workloads it
//! knows.
//!
//! When an address stops being a backend of a published port (its replica
//! ended, became unhealthy or is stopping), the connections the kernel
//! tracks to it are deleted (Debian's `conntrack -D --reply-src`): a client
//! that reuses a source port (QEMU's user network does) would otherwise
//! ride the old NAT binding to the dead replica's address, which the
//! restarted replica reuses before its server listens.
//!
//! # Limitations
//! IPv4 only; one bridge; DNS over UDP only; published ports are DNATed by
//! the kernel, so a connection stays with the replica it first reached.

pub mod dns;
pub mod ipam;
pub mod nft;

use ipam::{Ipam, Subnet};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use steelcup_proto::guest::GuestNetwork;
use steelcup_units::ports::{PortSpec, Protocol};

/// The workload network's settings (`vmmd --network`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetOptions {
    pub bridge: String,
    pub subnet: Subnet,
    pub mtu: u32,
    /// The domain workloads are known under.
    pub domain: String,
}

impl Default for NetOptions {
    fn default() -> Self {
        NetOptions {
            bridge: "steelcup0".into(),
            subnet: Subnet {
                network: Ipv4Addr::new(10, 88, 0, 0),
                prefix: 16,
            },
            mtu: 1500,
            domain: "steelcup.internal".into(),
        }
    }
}

impl NetOptions {
    /// Parses `none` (no workload network: None) or
    /// `bridge=NAME,subnet=CIDR,mtu=N,domain=NAME` (any of them, the rest
    /// default).
    pub fn parse(s: &str) -> Result<Option<NetOptions>, OptionError> {
        if s == "none" {
            return Ok(None);
        }
        let mut o = NetOptions::default();
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| OptionError::NotKeyValue(part.to_string()))?;
            match k {
                "bridge" => {
                    if v.is_empty()
                        || v.len() > 15
                        || !v
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                    {
                        return Err(OptionError::Bridge(v.to_string()));
                    }
                    o.bridge = v.to_string();
                }
                "subnet" => o.subnet = Subnet::parse(v)?,
                "mtu" => {
                    o.mtu = v
                        .parse()
                        .ok()
                        .filter(|m| (576..=65535).contains(m))
                        .ok_or_else(|| OptionError::Mtu(v.to_string()))?
                }
                "domain" => {
                    let ok = !v.is_empty()
                        && v.len() <= 200
                        && v.split('.').all(|l| {
                            !l.is_empty()
                                && l.len() <= 63
                                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                        });
                    if !ok {
                        return Err(OptionError::Domain(v.to_string()));
                    }
                    o.domain = v.to_ascii_lowercase();
                }
                other => return Err(OptionError::UnknownKey(other.to_string())),
            }
        }
        Ok(Some(o))
    }
}

/// A `--network` value vmmd refuses, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    #[error("{0:?}: expected KEY=VALUE (bridge, subnet, mtu, domain) or none")]
    NotKeyValue(String),
    #[error("bridge {0:?}: 1 to 15 letters, digits, '-' or '_'")]
    Bridge(String),
    #[error(transparent)]
    Subnet(#[from] ipam::SubnetError),
    #[error("mtu {0:?}: 576 to 65535")]
    Mtu(String),
    #[error("domain {0:?} is not a DNS name")]
    Domain(String),
    #[error("unknown key {0:?} (bridge, subnet, mtu, domain)")]
    UnknownKey(String),
}

/// A stable, locally administered MAC address for VM `name`.
pub fn mac_for_name(name: &str) -> [u8; 6] {
    use sha2::Digest;
    let h = sha2::Sha256::digest(name.as_bytes());
    // 02: locally administered, unicast; 53:43: "SC".
    [0x02, 0x53, 0x43, h[0], h[1], h[2]]
}

/// One VM for [`HostNet::sync`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningVm {
    pub name: String,
    pub tap: String,
    /// Its unit; None for `cup run`'s.
    pub unit: Option<String>,
    /// Its network scopes (at least one).
    pub scopes: Vec<String>,
    /// Its unit's DNS aliases, answered in its scopes.
    pub aliases: Vec<String>,
    pub ports: Vec<PortSpec>,
    /// Running, not stopping, healthy if it has a check: it gets traffic.
    pub ready: bool,
}

impl RunningVm {
    /// Who publishes its ports: its unit, or itself.
    pub fn owner(&self) -> &str {
        self.unit.as_deref().unwrap_or(&self.name)
    }
}

/// The host side of the workload network.
#[derive(Debug)]
pub struct HostNet {
    pub opts: NetOptions,
    ipam: Ipam,
    records: dns::Records,
    nft: PathBuf,
    /// Debian's conntrack program (None: tracked connections to a gone
    /// backend are left to time out).
    conntrack: Option<PathBuf>,
    /// The backends of the rule set applied last.
    backends: BTreeSet<Ipv4Addr>,
    applied: Option<String>,
    failed: Option<String>,
    dns: Option<(
        std::sync::Arc<std::net::UdpSocket>,
        std::sync::Arc<std::sync::atomic::AtomicBool>,
    )>,
}

/// What went wrong setting up or running the workload network.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("no {program} program (looked in {looked})")]
    NoProgram {
        program: &'static str,
        looked: String,
    },
    #[error("run {}", program.display())]
    Run {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("conntrack -D --reply-src {ip} ({status}): {said}")]
    Conntrack {
        ip: Ipv4Addr,
        status: std::process::ExitStatus,
        said: String,
    },
    #[error("nft refused the rule set ({status}): {said}")]
    NftRefused {
        status: std::process::ExitStatus,
        said: String,
    },
    #[error("bridge {bridge}")]
    Bridge {
        bridge: String,
        #[source]
        source: Box<NetError>,
    },
    #[error("sysctl {key}={value}")]
    Sysctl {
        key: String,
        value: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("DNS server on {addr}:53")]
    Dns {
        addr: Ipv4Addr,
        #[source]
        source: std::io::Error,
    },
    #[error("spawn the DNS thread")]
    DnsThread(#[source] std::io::Error),
    #[error("the workload network {subnet} has no free address ({held} VMs hold one); give vmmd a larger --network subnet or remove workloads")]
    NoAddress { subnet: Subnet, held: usize },
    #[error("port {port}/{protocol} is in use on the host")]
    PortInUse { port: u16, protocol: &'static str },
    #[error("port {spec}: {ip} is not an address of this host")]
    NotHostAddress { spec: String, ip: Ipv4Addr },
    #[error("port {spec}")]
    Port {
        spec: String,
        #[source]
        source: std::io::Error,
    },
    #[error("a runtime for netlink")]
    Runtime(#[source] std::io::Error),
    #[error("netlink")]
    Netlink(#[source] std::io::Error),
    #[error("{what}")]
    Link {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("no interface {0}")]
    NoLink(String),
    #[error("tap {tap}")]
    Tap {
        tap: String,
        #[source]
        source: std::io::Error,
    },
    #[error("tap {tap}")]
    TapSetup {
        tap: String,
        #[source]
        source: steelcup_sys::NetError,
    },
    #[error("tap {tap}")]
    TapUp {
        tap: String,
        #[source]
        source: steelcup_sys::SysError,
    },
    #[error("tap {tap}: host address {address:?}: {why}")]
    TapAddress {
        tap: String,
        address: String,
        why: String,
    },
}

/// Where vmmd looks for `nft`.
const NFT_PATHS: &[&str] = &["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"];

/// Where vmmd looks for `conntrack`.
const CONNTRACK_PATHS: &[&str] = &["/usr/sbin/conntrack", "/sbin/conntrack"];

fn find_program(name: &'static str, paths: &[&str]) -> Result<PathBuf, NetError> {
    paths
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| NetError::NoProgram {
            program: name,
            looked: paths.join(", "),
        })
}

/// The `nft` program, or why there is none.
pub fn find_nft() -> Result<PathBuf, NetError> {
    find_program("nft", NFT_PATHS)
}

/// Deletes the connections the kernel tracks whose replies come from `ip`
/// (`conntrack -D --reply-src IP`): its NAT bindings included. None found
/// is not an error.
pub fn forget_flows(conntrack: &Path, ip: Ipv4Addr) -> Result<usize, NetError> {
    let out = std::process::Command::new(conntrack)
        .args(["-D", "--reply-src"])
        .arg(ip.to_string())
        .output()
        .map_err(|source| NetError::Run {
            program: conntrack.to_path_buf(),
            source,
        })?;
    let said = String::from_utf8_lossy(&out.stderr);
    match flows_deleted(&said) {
        Some(n) => Ok(n),
        None if out.status.success() => Ok(0),
        None => Err(NetError::Conntrack {
            ip,
            status: out.status,
            said: said.trim().to_string(),
        }),
    }
}

/// How many entries conntrack's report (on its stderr) says it deleted:
/// "conntrack v1.4.7 (conntrack-tools): N flow entries have been deleted."
/// (it exits 1 when N is 0).
fn flows_deleted(said: &str) -> Option<usize> {
    said.lines()
        .find_map(|l| l.split_once(" flow entries have been deleted"))
        .and_then(|(n, _)| n.rsplit(' ').next()?.parse().ok())
}

impl HostNet {
    /// Makes (or takes over) the bridge, sets the sysctls routing needs,
    /// replaces the rule set with one for no VMs, loads the leases and
    /// starts the DNS server.
    pub fn setup(opts: NetOptions, state_dir: &Path) -> Result<HostNet, NetError> {
        let nft = find_nft()?;
        let conntrack = find_program("conntrack", CONNTRACK_PATHS)
            .map_err(|e| {
                tracing::warn!(
                    "network: {e}: connections to a replica that went stay bound to its address until they time out"
                )
            })
            .ok();
        link::ensure_bridge(&opts.bridge, opts.subnet, opts.mtu).map_err(|e| NetError::Bridge {
            bridge: opts.bridge.clone(),
            source: Box::new(e),
        })?;
        set_sysctls(&opts.bridge)?;
        let ipam = Ipam::load(opts.subnet, Some(&state_dir.join("net/leases.json")));
        let mut net = HostNet {
            opts,
            ipam,
            records: Default::default(),
            nft,
            conntrack,
            backends: BTreeSet::new(),
            applied: None,
            failed: None,
            dns: None,
        };
        net.sync(&[])?;
        let gw = net.opts.subnet.gateway();
        let socket = std::net::UdpSocket::bind((gw, 53))
            .map(std::sync::Arc::new)
            .map_err(|source| NetError::Dns { addr: gw, source })?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        net.dns = Some((socket.clone(), stop.clone()));
        let server = dns::Server {
            records: net.records.clone(),
            domain: net.opts.domain.clone(),
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
        };
        std::thread::Builder::new()
            .name("dns".into())
            .spawn(move || server.serve(socket, stop))
            .map_err(NetError::DnsThread)?;
        tracing::info!(
            "network: bridge {} at {}/{}, DNS for *.{} on {gw}:53, {} leases kept",
            net.opts.bridge,
            gw,
            net.opts.subnet.prefix,
            net.opts.domain,
            net.ipam.leases().len()
        );
        Ok(net)
    }

    /// VM `name`'s address (kept across its restarts).
    pub fn lease(&mut self, name: &str) -> Result<Ipv4Addr, NetError> {
        self.ipam.lease(name)
    }

    pub fn address_of(&self, name: &str) -> Option<Ipv4Addr> {
        self.ipam.get(name)
    }

    /// VM `name` is gone for good: its address goes back.
    pub fn release(&mut self, name: &str) {
        self.ipam.release(name);
    }

    /// Drops the leases of VMs that `keep` does not know.
    pub fn prune(&mut self, keep: impl FnMut(&str) -> bool) {
        self.ipam.retain(keep);
    }

    /// How VM `name` with address `ip` sees the network.
    pub fn guest_network(&self, name: &str, ip: Ipv4Addr) -> GuestNetwork {
        let gw = self.opts.subnet.gateway();
        GuestNetwork {
            interface: "eth0".into(),
            address: format!("{ip}/{}", self.opts.subnet.prefix),
            gateway: Some(gw),
            mac: Some(steelcup_proto::guest::format_mac(mac_for_name(name))),
            mtu: Some(self.opts.mtu),
            dns: vec![gw],
            search: vec![self.opts.domain.clone()],
        }
    }

    /// Replaces the rule set and the DNS records with those of `vms`, if
    /// they changed.
    pub fn sync(&mut self, vms: &[RunningVm]) -> Result<(), NetError> {
        let plan = self.plan(vms);
        *self.records.write().unwrap_or_else(|p| p.into_inner()) = records(vms, &self.ipam);
        let script = nft::render(&plan);
        if self.applied.as_deref() == Some(script.as_str()) {
            return Ok(());
        }
        match nft::apply(&self.nft, &script) {
            Ok(()) => {
                self.applied = Some(script);
                self.failed = None;
                // New connections no longer go to a gone backend; the ones
                // the kernel still tracks to it go now.
                let backends = plan.backends();
                if let Some(ct) = &self.conntrack {
                    for ip in self.backends.difference(&backends) {
                        match forget_flows(ct, *ip) {
                            Ok(0) => {}
                            Ok(n) => tracing::info!(
                                "network: {n} tracked connections to {ip} deleted (no longer behind a published port)"
                            ),
                            Err(e) => {
                                tracing::warn!("network: {}", steelcup_sys::error_chain(&e))
                            }
                        }
                    }
                }
                self.backends = backends;
                Ok(())
            }
            Err(e) => {
                // Said once per rule set, not on every event.
                if self.failed.as_deref() != Some(script.as_str()) {
                    tracing::error!("network: {}", steelcup_sys::error_chain(&e));
                    self.failed = Some(script);
                }
                Err(e)
            }
        }
    }

    fn plan(&self, vms: &[RunningVm]) -> nft::Plan {
        let mut entries = Vec::new();
        let mut publications: BTreeMap<(String, PortSpec), Vec<Ipv4Addr>> = BTreeMap::new();
        for vm in vms {
            let Some(ip) = self.ipam.get(&vm.name) else {
                continue;
            };
            entries.push(nft::VmEntry {
                name: vm.name.clone(),
                tap: vm.tap.clone(),
                ip,
                scopes: vm.scopes.clone(),
            });
            for p in &vm.ports {
                let backends = publications
                    .entry((vm.owner().to_string(), *p))
                    .or_default();
                if vm.ready {
                    backends.push(ip);
                }
            }
        }
        nft::Plan {
            bridge: self.opts.bridge.clone(),
            subnet: self.opts.subnet,
            vms: entries,
            publications: publications
                .into_iter()
                .map(|((_, port), backends)| nft::Publication { port, backends })
                .collect(),
        }
    }

    /// Removes the rule set and the bridge (vmmd stopping).
    pub fn teardown(&mut self) {
        if let Some((socket, stop)) = self.dns.take() {
            dns::stop(&socket, &stop);
        }
        if let Err(e) = nft::apply(&self.nft, &nft::render_teardown()) {
            tracing::warn!("network: removing the rule set: {e}");
        }
        if let Err(e) = link::delete(&self.opts.bridge) {
            tracing::warn!("network: removing bridge {}: {e}", self.opts.bridge);
        }
        self.applied = None;
    }
}

/// DNS names: each running VM by its name, each unit by its ready
/// replicas; each ready VM by its aliases in its scopes.
fn records(vms: &[RunningVm], ipam: &Ipam) -> dns::Names {
    let mut r = dns::Names::default();
    for vm in vms {
        let Some(ip) = ipam.get(&vm.name) else {
            continue;
        };
        r.global
            .entry(vm.name.to_ascii_lowercase())
            .or_default()
            .push(ip);
        if let Some(u) = &vm.unit {
            if u != &vm.name && vm.ready {
                r.global.entry(u.to_ascii_lowercase()).or_default().push(ip);
            }
        }
        r.scopes_of.insert(ip, vm.scopes.clone());
        if vm.ready {
            for scope in &vm.scopes {
                let names = r.scoped.entry(scope.clone()).or_default();
                for a in &vm.aliases {
                    names.entry(a.to_ascii_lowercase()).or_default().push(ip);
                }
            }
        }
    }
    let lists = r
        .global
        .values_mut()
        .chain(r.scoped.values_mut().flat_map(|m| m.values_mut()));
    for ips in lists {
        ips.sort();
        ips.dedup();
    }
    r
}

/// Whether host port `p` is free of the host's own listeners (a
/// publication would hide them).
pub fn host_port_free(p: &PortSpec) -> Result<(), NetError> {
    let ip = p.host_ip.unwrap_or(Ipv4Addr::UNSPECIFIED);
    let bound = match p.protocol {
        Protocol::Tcp => std::net::TcpListener::bind((ip, p.host_port)).map(drop),
        Protocol::Udp => std::net::UdpSocket::bind((ip, p.host_port)).map(drop),
    };
    bound.map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => NetError::PortInUse {
            port: p.host_port,
            protocol: p.protocol.name(),
        },
        std::io::ErrorKind::AddrNotAvailable => NetError::NotHostAddress {
            spec: p.to_string(),
            ip,
        },
        _ => NetError::Port {
            spec: p.to_string(),
            source: e,
        },
    })
}

fn set_sysctls(bridge: &str) -> Result<(), NetError> {
    let settings = [
        ("net/ipv4/ip_forward".to_string(), "1"),
        // Private-VLAN proxy ARP: VMs on isolated ports reach each other
        // only through the host (see `nft`).
        (format!("net/ipv4/conf/{bridge}/proxy_arp"), "1"),
        (format!("net/ipv4/conf/{bridge}/proxy_arp_pvlan"), "1"),
        (format!("net/ipv4/neigh/{bridge}/proxy_delay"), "0"),
        // The host routes VM to VM on one interface: no redirects.
        (format!("net/ipv4/conf/{bridge}/send_redirects"), "0"),
        ("net/ipv4/conf/all/send_redirects".to_string(), "0"),
        // Published ports from the host's loopback.
        (format!("net/ipv4/conf/{bridge}/route_localnet"), "1"),
    ];
    for (key, value) in settings {
        let path = Path::new("/proc/sys").join(&key);
        std::fs::write(&path, value).map_err(|source| NetError::Sysctl { key, value, source })?;
    }
    Ok(())
}

/// The bridge and the VMs' taps, over rtnetlink.
pub mod link {
    use super::{NetError, Subnet};
    use futures_util::TryStreamExt;
    use steelcup_proto::worker::NetConfig;
    use steelcup_sys as sys;

    /// Makes the VM's tap `n.tap` and its host side: on its bridge (an
    /// isolated port: the VM reaches other ports only through the host) or
    /// with the host's end's address, its MTU, up. The descriptor goes to
    /// the VM's worker; the tap lives as long as a descriptor of it is open.
    pub fn open_tap(n: &NetConfig) -> Result<std::fs::File, NetError> {
        let setup = |source: steelcup_sys::NetError| NetError::TapSetup {
            tap: n.tap.clone(),
            source,
        };
        let tap = steelcup_vmm::devices::virtio::net::open_tap(&n.tap).map_err(|source| {
            NetError::Tap {
                tap: n.tap.clone(),
                source,
            }
        })?;
        if let Some(mtu) = n.mtu {
            sys::set_mtu(&n.tap, mtu).map_err(setup)?;
        }
        if let Some(bridge) = &n.bridge {
            add_isolated_port(bridge, &n.tap)?;
        }
        if let Some(address) = &n.host_address {
            let (addr, prefix) =
                steelcup_proto::parse_cidr(address).map_err(|why| NetError::TapAddress {
                    tap: n.tap.clone(),
                    address: address.clone(),
                    why,
                })?;
            sys::set_ipv4(&n.tap, addr, prefix).map_err(setup)?;
        }
        sys::link_up(&n.tap).map_err(|source| NetError::TapUp {
            tap: n.tap.clone(),
            source,
        })?;
        Ok(tap)
    }

    fn block_on<T>(
        f: impl std::future::Future<Output = Result<T, NetError>>,
    ) -> Result<T, NetError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(NetError::Runtime)?;
        rt.block_on(f)
    }

    fn link_err(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
        let what = what.into();
        move |source| NetError::Link { what, source }
    }

    async fn index_of(handle: &rtnetlink::Handle, name: &str) -> Result<Option<u32>, NetError> {
        let mut links = handle.link().get().match_name(name.to_string()).execute();
        match links.try_next().await {
            Ok(Some(l)) => Ok(Some(l.header.index)),
            Ok(None) => Ok(None),
            // No such device.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(link_err(format!("look up {name}"))(e)),
        }
    }

    /// Makes bridge `name` if it is missing, gives it the subnet's first
    /// address and `mtu`, and brings it up.
    pub fn ensure_bridge(name: &str, subnet: Subnet, mtu: u32) -> Result<(), NetError> {
        let name = name.to_string();
        block_on(async move {
            let (conn, handle, _) = rtnetlink::new_connection().map_err(NetError::Netlink)?;
            tokio::spawn(conn);
            let index = match index_of(&handle, &name).await? {
                Some(i) => i,
                None => {
                    handle
                        .link()
                        .add(rtnetlink::LinkBridge::new(&name).build())
                        .execute()
                        .await
                        .map_err(link_err("create"))?;
                    index_of(&handle, &name)
                        .await?
                        .ok_or_else(|| NetError::NoLink(name.clone()))?
                }
            };
            handle
                .address()
                .add(index, std::net::IpAddr::V4(subnet.gateway()), subnet.prefix)
                .replace()
                .execute()
                .await
                .map_err(link_err(format!(
                    "address {}/{}",
                    subnet.gateway(),
                    subnet.prefix
                )))?;
            handle
                .link()
                .set(
                    rtnetlink::LinkUnspec::new_with_index(index)
                        .mtu(mtu)
                        .up()
                        .build(),
                )
                .execute()
                .await
                .map_err(link_err("bring up"))?;
            Ok(())
        })
    }

    /// Puts `port` on `bridge` as an isolated port (it reaches the other
    /// ports only through the host) and brings it up.
    pub fn add_isolated_port(bridge: &str, port: &str) -> Result<(), NetError> {
        let (bridge, port) = (bridge.to_string(), port.to_string());
        block_on(async move {
            let (conn, handle, _) = rtnetlink::new_connection().map_err(NetError::Netlink)?;
            tokio::spawn(conn);
            let br = index_of(&handle, &bridge)
                .await?
                .ok_or_else(|| NetError::NoLink(bridge.clone()))?;
            let p = index_of(&handle, &port)
                .await?
                .ok_or_else(|| NetError::NoLink(port.clone()))?;
            let what = format!("put {port} on {bridge}");
            handle
                .link()
                .set(
                    rtnetlink::LinkUnspec::new_with_index(p)
                        .controller(br)
                        .up()
                        .build(),
                )
                .execute()
                .await
                .map_err(link_err(what.clone()))?;
            handle
                .link()
                .set_port(rtnetlink::LinkBridgePort::new(p).isolated(true).build())
                .execute()
                .await
                .map_err(link_err(what.clone()))?;
            Ok(())
        })
    }

    /// Deletes link `name` (Ok if there is none).
    pub fn delete(name: &str) -> Result<(), NetError> {
        let name = name.to_string();
        block_on(async move {
            let (conn, handle, _) = rtnetlink::new_connection().map_err(NetError::Netlink)?;
            tokio::spawn(conn);
            if let Some(index) = index_of(&handle, &name).await? {
                handle
                    .link()
                    .del(index)
                    .execute()
                    .await
                    .map_err(link_err(format!("delete {name}")))?;
            }
            Ok(())
        })
    }

    /// The names of every link whose name starts with `prefix`.
    pub fn names_with_prefix(prefix: &str) -> Result<Vec<String>, NetError> {
        use rtnetlink::packet_route::link::LinkAttribute;
        let prefix = prefix.to_string();
        block_on(async move {
            let (conn, handle, _) = rtnetlink::new_connection().map_err(NetError::Netlink)?;
            tokio::spawn(conn);
            let mut links = handle.link().get().execute();
            let mut names = Vec::new();
            while let Some(l) = links.try_next().await.map_err(link_err("list links"))? {
                for a in l.attributes {
                    if let LinkAttribute::IfName(n) = a {
                        if n.starts_with(&prefix) {
                            names.push(n);
                        }
                    }
                }
            }
            Ok(names)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conntrack_reports_are_read() {
        assert_eq!(
            flows_deleted(
                "conntrack v1.4.7 (conntrack-tools): 3 flow entries have been deleted.\n"
            ),
            Some(3)
        );
        assert_eq!(
            flows_deleted(
                "conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted.\n"
            ),
            Some(0)
        );
        assert_eq!(
            flows_deleted("conntrack v1.4.7 (conntrack-tools): Operation not permitted\n"),
            None
        );
    }

    #[test]
    fn network_options_parse() {
        assert_eq!(NetOptions::parse("none").unwrap(), None);
        assert_eq!(NetOptions::parse("").unwrap(), Some(NetOptions::default()));
        let o = NetOptions::parse("bridge=br1,subnet=10.5.0.0/24,mtu=1400,domain=Lab.Example")
            .unwrap()
            .unwrap();
        assert_eq!(o.bridge, "br1");
        assert_eq!(o.subnet.to_string(), "10.5.0.0/24");
        assert_eq!((o.mtu, o.domain.as_str()), (1400, "lab.example"));
        for (bad, says) in [
            ("bridge=this-name-is-too-long", "1 to 15"),
            ("subnet=10.5.0.1/24", "host bits"),
            ("mtu=9", "576 to 65535"),
            ("domain=a..b", "not a DNS name"),
            ("colour=blue", "unknown key"),
            ("bridge", "KEY=VALUE"),
        ] {
            let e = NetOptions::parse(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn macs_are_stable_and_local() {
        assert_eq!(mac_for_name("web.1"), mac_for_name("web.1"));
        assert_ne!(mac_for_name("web.1"), mac_for_name("web.2"));
        let m = mac_for_name("x");
        assert_eq!(m[0] & 0b11, 0b10, "locally administered unicast");
    }

    #[test]
    fn units_resolve_to_ready_replicas_and_vms_to_themselves() {
        let mut ipam = Ipam::load(Subnet::parse("10.9.0.0/24").unwrap(), None);
        let vm = |name: &str, unit: Option<&str>, ready| RunningVm {
            name: name.into(),
            tap: "t".into(),
            unit: unit.map(Into::into),
            scopes: vec![unit.unwrap_or(name).into(), "shared".into()],
            aliases: vec!["Front".into()],
            ports: vec![PortSpec::parse("8080:80").unwrap()],
            ready,
        };
        let vms = [
            vm("web.1", Some("web"), true),
            vm("web.2", Some("web"), false),
            vm("Solo", None, true),
        ];
        for v in &vms {
            ipam.lease(&v.name).unwrap();
        }
        let r = records(&vms, &ipam);
        assert_eq!(r.global["web"], vec![Ipv4Addr::new(10, 9, 0, 2)]);
        assert_eq!(r.global["web.2"], vec![Ipv4Addr::new(10, 9, 0, 3)]);
        assert_eq!(r.global["solo"], vec![Ipv4Addr::new(10, 9, 0, 4)]);
        // Aliases: ready VMs only, in each of their scopes, lower case.
        let ready = vec![Ipv4Addr::new(10, 9, 0, 2), Ipv4Addr::new(10, 9, 0, 4)];
        assert_eq!(r.scoped["shared"]["front"], ready);
        assert_eq!(r.scoped["web"]["front"], vec![Ipv4Addr::new(10, 9, 0, 2)]);
        assert_eq!(r.scopes_of[&Ipv4Addr::new(10, 9, 0, 3)], ["web", "shared"]);
    }

    #[test]
    fn a_port_the_host_listens_on_is_refused() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let p = PortSpec::parse(&format!("127.0.0.1:{port}:80")).unwrap();
        let e = host_port_free(&p).unwrap_err().to_string();
        assert!(e.contains("in use on the host"), "{e}");
        drop(l);
        assert!(host_port_free(&p).is_ok());
        let e = host_port_free(&PortSpec::parse("192.0.2.1:8080:80").unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("not an address of this host"), "{e}");
    }
}
