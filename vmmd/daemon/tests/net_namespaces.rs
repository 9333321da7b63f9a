//! The workload network on a real kernel, in network namespaces this test
//! makes: vmmd's bridge, NAT, published ports, isolation and DNS, with veth
//! pairs standing in for VM taps and namespaces for the guests and for a
//! machine outside; after teardown nothing of it is left.
//!
//! Needs root, `ip` (iproute2), `nft` (nftables), `conntrack`, `curl` and
//! `python3`; says so and skips without them. The same behaviour with real VMs is
//! covered by qemu-tests (`network_on_nested_kvm`).

#![allow(clippy::unwrap_used)] // tests fail by panicking

use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use steelcup_units::ports::PortSpec;
use vmmd::net::{HostNet, NetOptions, RunningVm};

fn missing_tools() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root".into());
    }
    for tool in ["ip", "curl", "python3", "conntrack"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!("no {tool}"));
        }
    }
    if let Err(e) = vmmd::net::find_nft() {
        return Some(e.to_string());
    }
    None
}

fn sh(cmd: &str) {
    let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The namespaces, deleted (with what runs in them) when dropped.
struct Namespaces {
    names: Vec<String>,
    servers: Vec<Child>,
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// An HTTP GET with curl from namespace `ns` (None: the test's host
/// namespace); Ok with the body.
fn get(ns: Option<&str>, url: &str) -> Result<String, String> {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "curl"]);
            c
        }
        None => Command::new("curl"),
    };
    let out = cmd
        .args(["-sS", "--max-time", "3", url])
        .output()
        .map_err(|e| e.to_string())?;
    match out.status.success() {
        true => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        false => Err(String::from_utf8_lossy(&out.stderr).trim().to_string()),
    }
}

/// A web server in `ns` on `port` that answers `GET /` with `body`.
fn serve(ns: &str, port: u16, body: &str) -> Child {
    let dir = tempfile::tempdir().unwrap().keep();
    std::fs::write(dir.join("index.html"), body).unwrap();
    Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-m", "http.server"])
        .arg(port.to_string())
        .arg("--directory")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    for _ in 0..50 {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what}: not within 5 s");
}

#[test]
fn bridge_nat_published_ports_isolation_and_dns() {
    if let Some(why) = missing_tools() {
        eprintln!("SKIP: the network namespace test needs root, ip, nft, conntrack, curl and python3: {why}");
        return;
    }
    // `ip -n` makes "/" a slave mount in the namespace; in a chroot whose
    // root is no mount point that is refused (EINVAL), whatever steelcup does.
    let root_mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some("/"));
    if !root_mounted {
        eprintln!("SKIP: \"/\" is not a mount point here (a chroot), so `ip netns` cannot enter a namespace; the workload network is checked on machines where it can and in qemu-tests' network test");
        return;
    }
    let id = std::process::id();
    let [host, a, b, out] = ["host", "a", "b", "out"].map(|n| format!("sct-{n}-{id}"));
    let mut ns = Namespaces {
        names: vec![],
        servers: vec![],
    };
    for n in [&host, &a, &b, &out] {
        sh(&format!("ip netns add {n}"));
        ns.names.push(n.clone());
        sh(&format!("ip -n {n} link set lo up"));
    }
    // Two "VMs" (a, b) on veth pairs whose host ends play their taps, and
    // a machine outside on the host's uplink.
    for (vm, tap) in [(&a, "sctap-a"), (&b, "sctap-b")] {
        sh(&format!(
            "ip -n {host} link add {tap} type veth peer name eth0 netns {vm}"
        ));
    }
    sh(&format!(
        "ip -n {host} link add uplink type veth peer name eth0 netns {out}"
    ));
    sh(&format!("ip -n {host} addr add 192.168.77.1/24 dev uplink"));
    sh(&format!("ip -n {host} link set uplink up"));
    sh(&format!("ip -n {out} addr add 192.168.77.2/24 dev eth0"));
    sh(&format!("ip -n {out} link set eth0 up"));

    // From here this thread lives in the host namespace: vmmd's netlink
    // sockets, sysctls and nft runs go there.
    let fd = std::fs::File::open(format!("/run/netns/{host}")).unwrap();
    nix::sched::setns(fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();

    let state = tempfile::tempdir().unwrap();
    let opts = NetOptions::parse("bridge=sctbr0,subnet=10.77.0.0/24")
        .unwrap()
        .unwrap();
    let mut net = HostNet::setup(opts.clone(), state.path()).expect("network setup");
    let ip_a = net.lease("web.1").unwrap();
    let ip_b = net.lease("db").unwrap();
    assert_eq!(
        (ip_a, ip_b),
        (Ipv4Addr::new(10, 77, 0, 2), Ipv4Addr::new(10, 77, 0, 3))
    );
    for (vm, tap, ip) in [(&a, "sctap-a", ip_a), (&b, "sctap-b", ip_b)] {
        vmmd::net::link::add_isolated_port("sctbr0", tap).unwrap();
        let g = net.guest_network(if vm == &a { "web.1" } else { "db" }, ip);
        sh(&format!("ip -n {vm} addr add {} dev eth0", g.address));
        sh(&format!("ip -n {vm} link set eth0 up"));
        sh(&format!(
            "ip -n {vm} route add default via {}",
            g.gateway.unwrap()
        ));
    }
    let web = RunningVm {
        name: "web.1".into(),
        tap: "sctap-a".into(),
        unit: Some("web".into()),
        scopes: vec!["web".into()],
        aliases: vec![],
        ports: vec![PortSpec::parse("8080:80").unwrap()],
        ready: true,
    };
    let db = RunningVm {
        name: "db".into(),
        tap: "sctap-b".into(),
        unit: Some("db".into()),
        scopes: vec!["db".into()],
        aliases: vec![],
        ports: vec![],
        ready: true,
    };
    net.sync(&[web.clone(), db.clone()]).expect("rules applied");

    ns.servers.push(serve(&a, 80, "web on 80"));
    ns.servers.push(serve(&a, 81, "web on 81, unpublished"));
    ns.servers.push(serve(&out, 9000, "outside"));
    wait_until("the servers listen", || {
        get(Some(&a), "http://127.0.0.1:81/").is_ok()
            && get(Some(&out), "http://127.0.0.1:9000/").is_ok()
    });

    // Published: from outside, from the host itself (loopback too).
    assert_eq!(
        get(Some(&out), "http://192.168.77.1:8080/").as_deref(),
        Ok("web on 80")
    );
    assert_eq!(
        get(None, "http://127.0.0.1:8080/").as_deref(),
        Ok("web on 80")
    );
    // Another workload reaches the published guest port, not the others;
    // nor the host's own services.
    assert_eq!(
        get(Some(&b), &format!("http://{ip_a}:80/")).as_deref(),
        Ok("web on 80")
    );
    let blocked = get(Some(&b), &format!("http://{ip_a}:81/"));
    assert!(blocked.is_err(), "unpublished port reached: {blocked:?}");
    // Outbound NAT: the outside machine sees the host's uplink address.
    assert_eq!(
        get(Some(&a), "http://192.168.77.2:9000/").as_deref(),
        Ok("outside")
    );
    // Same scope: every port.
    let db_in_web = RunningVm {
        scopes: vec!["web".into()],
        aliases: vec![],
        ..db.clone()
    };
    net.sync(&[web.clone(), db_in_web]).unwrap();
    assert_eq!(
        get(Some(&b), &format!("http://{ip_a}:81/")).as_deref(),
        Ok("web on 81, unpublished")
    );
    // The kernel tracks the published port's connections to web.1 (their
    // NAT bindings) ...
    let tracked = || {
        let out = Command::new("conntrack")
            .args(["-L", "--reply-src", &ip_a.to_string()])
            .output()
            .expect("conntrack -L");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("dport=8080"))
            .count()
    };
    assert!(
        tracked() > 0,
        "no tracked connection to {ip_a} through 8080"
    );
    // Not ready: the published port forwards nowhere, and what the kernel
    // tracked to web.1 is gone (a client reusing its source port would
    // otherwise still reach it).
    net.sync(&[RunningVm {
        ready: false,
        ..web.clone()
    }])
    .unwrap();
    assert_eq!(
        tracked(),
        0,
        "connections to a gone backend are still tracked"
    );
    assert!(get(Some(&out), "http://192.168.77.1:8080/").is_err());

    // DNS on the gateway: workloads by name.
    net.sync(&[web.clone(), db.clone()]).unwrap();
    let answer = dns_a(opts.subnet.gateway(), "web.steelcup.internal.");
    assert_eq!(answer, vec![ip_a]);

    // Teardown: no table, no bridge; the leases stay for the next vmmd.
    net.teardown();
    let rules = Command::new(vmmd::net::find_nft().unwrap())
        .args(["list", "ruleset"])
        .output()
        .unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(!rules.contains("steelcup"), "{rules}");
    assert_eq!(
        vmmd::net::link::names_with_prefix("sctbr").unwrap(),
        Vec::<String>::new()
    );
    let again = HostNet::setup(opts, state.path()).unwrap();
    assert_eq!(again.address_of("db"), Some(ip_b));
    drop(again);
}

/// The A records `server` answers for `name`.
fn dns_a(server: Ipv4Addr, name: &str) -> Vec<Ipv4Addr> {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RData, RecordType};
    use std::str::FromStr;
    let mut m = Message::query();
    m.add_query(Query::query(Name::from_str(name).unwrap(), RecordType::A));
    let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.send_to(&m.to_vec().unwrap(), (server, 53)).unwrap();
    let mut buf = [0u8; 512];
    let n = s.recv(&mut buf).unwrap();
    Message::from_vec(&buf[..n])
        .unwrap()
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}
