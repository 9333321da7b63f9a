//! `cup metrics`: the machine's state in Prometheus' text format (0.0.4),
//! encoded by `prometheus-client`: the host, init's units and vmmd's
//! microVMs, read through the same APIs as `cup health` and `cup top`.
//! Names follow Prometheus' conventions (`steelcup_…`, base units,
//! `_total` for counters).
//!
//! # Limitations
//! Gathered when asked, from what the APIs say now: no VM-exit, boot-time,
//! warm-pool or pull-duration series yet, and the machine does not serve
//! them over HTTP itself (scrape `cup metrics` output, e.g. through node
//! exporter's textfile collector).

use crate::error::CupError;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;
use steelcup_api::init1::Init1Proxy;
use steelcup_api::vmm1::Vmm1ClientProxy;

type Labels = Vec<(String, String)>;
type GaugeF = Family<Labels, Gauge<f64, AtomicU64>>;
type CounterF = Family<Labels, Counter<f64, AtomicU64>>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The families, registered in one registry.
struct Families {
    registry: Registry,
}

impl Families {
    fn gauge(&mut self, name: &str, help: &str, unit: Option<Unit>) -> GaugeF {
        let f = GaugeF::default();
        match unit {
            Some(u) => self.registry.register_with_unit(name, help, u, f.clone()),
            None => self.registry.register(name, help, f.clone()),
        }
        f
    }

    fn counter(&mut self, name: &str, help: &str, unit: Option<Unit>) -> CounterF {
        let f = CounterF::default();
        match unit {
            Some(u) => self.registry.register_with_unit(name, help, u, f.clone()),
            None => self.registry.register(name, help, f.clone()),
        }
        f
    }
}

/// What the APIs said, gathered for one scrape.
pub struct Scrape {
    pub host: Option<steelcup_os::host::HostStatus>,
    pub units: Vec<steelcup_api::init1::UnitInfo>,
    pub usage: Vec<(String, u64, u64)>,
    pub update: Option<steelcup_os::update::Status>,
    pub vms: Vec<steelcup_api::vmm1::VmInfo>,
    pub stats: Vec<steelcup_api::vmm1::VmStats>,
    pub images: Vec<steelcup_api::vmm1::ImageInfo>,
    /// vmmd answered.
    pub vmmd_up: bool,
}

/// Asks init and vmmd (a vmmd that does not answer is `steelcup_vmmd_up 0`).
pub fn gather(
    p: &Init1Proxy<'static>,
    vmmd: &Result<Vmm1ClientProxy<'static>, CupError>,
) -> Result<Scrape, CupError> {
    let mut s = Scrape {
        host: p.host_status().ok(),
        units: p.list_units()?,
        usage: p.usage()?,
        update: p.update_status().ok(),
        vms: Vec::new(),
        stats: Vec::new(),
        images: Vec::new(),
        vmmd_up: false,
    };
    if let Ok(v) = vmmd {
        if let (Ok(vms), Ok(stats), Ok(images)) = (v.list(), v.stats(), v.images()) {
            (s.vms, s.stats, s.images, s.vmmd_up) = (vms, stats, images, true);
        }
    }
    Ok(s)
}

/// The scrape in Prometheus' text format.
pub fn encode(s: &Scrape) -> String {
    let mut f = Families {
        registry: Registry::default(),
    };
    let none = Labels::new;
    if let Some(h) = &s.host {
        f.gauge(
            "steelcup_host_info",
            "The host: hostname and kernel release (always 1)",
            None,
        )
        .get_or_create(&labels(&[("hostname", &h.hostname), ("kernel", &h.kernel)]))
        .set(1.0);
        f.gauge(
            "steelcup_host_uptime",
            "Time since the host booted",
            Some(Unit::Seconds),
        )
        .get_or_create(&none())
        .set(h.uptime_secs as f64);
        let load = f.gauge(
            "steelcup_host_load_average",
            "Load average over the window",
            None,
        );
        for (w, v) in ["1m", "5m", "15m"].iter().zip(&h.load) {
            load.get_or_create(&labels(&[("window", w)])).set(*v);
        }
        f.gauge(
            "steelcup_host_memory_total",
            "Memory the host has",
            Some(Unit::Bytes),
        )
        .get_or_create(&none())
        .set(h.memory_total as f64);
        f.gauge(
            "steelcup_host_memory_available",
            "Memory available for new work",
            Some(Unit::Bytes),
        )
        .get_or_create(&none())
        .set(h.memory_available as f64);
        let var = labels(&[(
            "persistent",
            if h.var_persistent { "true" } else { "false" },
        )]);
        f.gauge(
            "steelcup_host_var_size",
            "Size of the filesystem at /var",
            Some(Unit::Bytes),
        )
        .get_or_create(&var)
        .set(h.var_total as f64);
        f.gauge(
            "steelcup_host_var_available",
            "Free space at /var",
            Some(Unit::Bytes),
        )
        .get_or_create(&var)
        .set(h.var_available as f64);
        let up = f.gauge(
            "steelcup_host_network_up",
            "1 if the link is up (its operstate), else 0",
            None,
        );
        for i in &h.interfaces {
            up.get_or_create(&labels(&[("interface", &i.name)])).set(
                if i.state == "up" || i.state == "unknown" {
                    1.0
                } else {
                    0.0
                },
            );
        }
        f.gauge(
            "steelcup_host_clock_synchronized",
            "1 if the kernel's clock is marked synchronized",
            None,
        )
        .get_or_create(&none())
        .set(if h.clock_synchronized { 1.0 } else { 0.0 });
        f.gauge(
            "steelcup_host_clock_offset",
            "How far off the clock was at time sync's last answer",
            Some(Unit::Seconds),
        )
        .get_or_create(&none())
        .set(h.time_offset_ms / 1e3);
    }
    if let Some(u) = &s.update {
        f.gauge(
            "steelcup_update_slot_info",
            "The booted OS slot and whether it passed its health gate (always 1)",
            None,
        )
        .get_or_create(&labels(&[
            ("slot", &u.booted),
            ("good", if u.good { "true" } else { "false" }),
        ]))
        .set(1.0);
    }
    let state = f.gauge(
        "steelcup_unit_state",
        "1 for each service unit's current state",
        None,
    );
    let restarts = f.counter(
        "steelcup_unit_restarts",
        "Restarts of the unit since boot",
        None,
    );
    for u in &s.units {
        state
            .get_or_create(&labels(&[
                ("unit", &u.name),
                ("kind", &u.kind),
                ("state", &u.state),
            ]))
            .set(1.0);
        restarts
            .get_or_create(&labels(&[("unit", &u.name)]))
            .inc_by(f64::from(u.restarts));
    }
    let cpu = f.counter(
        "steelcup_unit_cpu",
        "CPU time of the unit's processes (its cgroup)",
        Some(Unit::Seconds),
    );
    let mem = f.gauge(
        "steelcup_unit_memory",
        "Memory charged to the unit's cgroup",
        Some(Unit::Bytes),
    );
    for (name, usec, bytes) in &s.usage {
        let l = labels(&[("unit", name)]);
        cpu.get_or_create(&l).inc_by(*usec as f64 / 1e6);
        mem.get_or_create(&l).set(*bytes as f64);
    }
    f.gauge("steelcup_vmmd_up", "1 if vmmd answered this scrape", None)
        .get_or_create(&none())
        .set(if s.vmmd_up { 1.0 } else { 0.0 });
    let vm_state = f.gauge(
        "steelcup_workload_state",
        "1 for each microVM workload's current state",
        None,
    );
    let runs = f.counter(
        "steelcup_workload_runs",
        "Runs started since vmmd started",
        None,
    );
    let vcpus = f.gauge(
        "steelcup_workload_vcpus",
        "vCPUs of the workload's VM",
        None,
    );
    let guest = f.gauge(
        "steelcup_workload_guest_memory",
        "Guest memory of the workload's VM",
        Some(Unit::Bytes),
    );
    for v in &s.vms {
        let who = [
            ("name", v.name.as_str()),
            ("image", v.image.as_str()),
            ("unit", v.unit.as_str()),
        ];
        let mut with_state = who.to_vec();
        with_state.push(("state", v.state.as_str()));
        vm_state.get_or_create(&labels(&with_state)).set(1.0);
        runs.get_or_create(&labels(&who)).inc_by(f64::from(v.runs));
        vcpus.get_or_create(&labels(&who)).set(f64::from(v.vcpus));
        guest
            .get_or_create(&labels(&who))
            .set(f64::from(v.memory_mib) * 1024.0 * 1024.0);
    }
    let vm_cpu = f.counter(
        "steelcup_workload_cpu",
        "CPU time of the workload's VMM worker (vCPUs and devices)",
        Some(Unit::Seconds),
    );
    let vm_mem = f.gauge(
        "steelcup_workload_memory",
        "Memory charged to the workload's cgroup (guest memory touched and the VMM)",
        Some(Unit::Bytes),
    );
    let rx = f.counter(
        "steelcup_workload_network_receive",
        "Bytes the guest received on its network device",
        Some(Unit::Bytes),
    );
    let tx = f.counter(
        "steelcup_workload_network_transmit",
        "Bytes the guest sent on its network device",
        Some(Unit::Bytes),
    );
    let br = f.counter(
        "steelcup_workload_block_read",
        "Bytes read from the workload's disk files",
        Some(Unit::Bytes),
    );
    let bw = f.counter(
        "steelcup_workload_block_write",
        "Bytes written to the workload's disk files",
        Some(Unit::Bytes),
    );
    for st in &s.stats {
        let l = labels(&[("name", &st.name)]);
        vm_cpu.get_or_create(&l).inc_by(st.cpu_usec as f64 / 1e6);
        vm_mem.get_or_create(&l).set(st.memory_bytes as f64);
        rx.get_or_create(&l).inc_by(st.net_rx as f64);
        tx.get_or_create(&l).inc_by(st.net_tx as f64);
        br.get_or_create(&l).inc_by(st.block_read as f64);
        bw.get_or_create(&l).inc_by(st.block_write as f64);
    }
    f.gauge("steelcup_images", "Images named in the store", None)
        .get_or_create(&none())
        .set(s.images.len() as f64);
    f.gauge(
        "steelcup_image_store_layers",
        "Compressed layers of the named images (shared layers counted once per image)",
        Some(Unit::Bytes),
    )
    .get_or_create(&none())
    .set(s.images.iter().map(|i| i.size as f64).sum());
    let mut out = String::new();
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &f.registry);
    out
}

/// `cup metrics`.
pub fn metrics(
    p: &Init1Proxy<'static>,
    vmmd: Result<Vmm1ClientProxy<'static>, CupError>,
) -> Result<u8, CupError> {
    print!("{}", encode(&gather(p, &vmmd)?));
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape() -> Scrape {
        let vm = steelcup_api::vmm1::VmInfo {
            name: "web".into(),
            state: "running".into(),
            last_outcome: String::new(),
            exit_code: -1,
            health: String::new(),
            unit: "web".into(),
            pid: 7,
            runs: 2,
            vcpus: 1,
            memory_mib: 128,
            address: "10.88.0.2".into(),
            image: "nginx:alpine".into(),
            labels: Default::default(),
        };
        let stats = steelcup_api::vmm1::VmStats {
            name: "web".into(),
            cpu_usec: 1_500_000,
            memory_bytes: 40 << 20,
            memory_limit: 200 << 20,
            pids: 5,
            net_rx: 1000,
            net_tx: 2000,
            block_read: 3000,
            block_write: 104_857_600,
        };
        Scrape {
            host: None,
            units: vec![steelcup_api::init1::UnitInfo {
                name: "vmmd".into(),
                kind: "service".into(),
                state: "running".into(),
                reason: String::new(),
                pid: 9,
                restarts: 1,
                last_exit: -1,
                description: String::new(),
            }],
            usage: vec![("vmmd".into(), 2_500_000, 5 << 20)],
            update: None,
            vms: vec![vm],
            stats: vec![stats],
            images: Vec::new(),
            vmmd_up: true,
        }
    }

    #[test]
    fn families_follow_prometheus_naming_and_carry_their_values() {
        let text = encode(&scrape());
        for line in [
            "# TYPE steelcup_unit_restarts_total counter",
            "steelcup_unit_restarts_total{unit=\"vmmd\"} 1.0",
            "steelcup_unit_cpu_seconds_total{unit=\"vmmd\"} 2.5",
            "steelcup_unit_memory_bytes{unit=\"vmmd\"} 5242880.0",
            "steelcup_vmmd_up 1.0",
            "steelcup_workload_state{name=\"web\",image=\"nginx:alpine\",unit=\"web\",state=\"running\"} 1.0",
            "steelcup_workload_cpu_seconds_total{name=\"web\"} 1.5",
            "steelcup_workload_block_write_bytes_total{name=\"web\"} 104857600.0",
            "steelcup_workload_guest_memory_bytes{name=\"web\",image=\"nginx:alpine\",unit=\"web\"} 134217728.0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in:\n{text}");
        }
        // Every sample has its HELP and TYPE.
        let typed = text.lines().filter(|l| l.starts_with("# TYPE")).count();
        let helped = text.lines().filter(|l| l.starts_with("# HELP")).count();
        assert!(typed > 10 && typed == helped, "{text}");
        // Debian's promtool, where it is installed, finds nothing to say.
        match std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
        {
            Ok(mut child) => {
                use std::io::Write;
                child
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(text.as_bytes())
                    .unwrap();
                let out = child.wait_with_output().unwrap();
                assert!(
                    out.status.success(),
                    "promtool: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Err(_) => eprintln!("SKIP: promtool (Debian package prometheus) is not installed: the exposition is checked by this test's own lines only"),
        }
    }
}
