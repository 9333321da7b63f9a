//! `cup metrics`: the machine's state in Prometheus' text format (0.0.4),
//! encoded by `prometheus-client`: the host, init's units and vmmd's
//! microVMs, read through the same APIs as `cup health` and `cup top`.
//! Names follow Prometheus' conventions (`steelcup_…`, base units,
//! `_total` for counters).
//!
//! # Limitations
//! Gathered when asked, from what the APIs say now: a counter that init or
//! vmmd restarted from zero is reset for Prometheus too (which its `rate()`
//! handles).
//!
//! # Serving
//! `cup metrics --listen ADDR` serves them over HTTP (hyper), the way the
//! machine config's `[metrics]` runs it as the `metrics` unit; with
//! `--tls-dir` over mutual TLS with the admin gateway's certificates.

use crate::error::CupError;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
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
    pub counters: Option<steelcup_api::vmm1::VmmdCounters>,
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
        counters: None,
        vmmd_up: false,
    };
    if let Ok(v) = vmmd {
        if let (Ok(vms), Ok(stats), Ok(images)) = (v.list(), v.stats(), v.images()) {
            (s.vms, s.stats, s.images, s.vmmd_up) = (vms, stats, images, true);
            s.counters = v.counters().ok();
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
        let net_rx = f.counter(
            "steelcup_host_network_receive",
            "Bytes the interface received",
            Some(Unit::Bytes),
        );
        let net_tx = f.counter(
            "steelcup_host_network_transmit",
            "Bytes the interface sent",
            Some(Unit::Bytes),
        );
        for i in &h.interfaces {
            let l = labels(&[("interface", &i.name)]);
            net_rx.get_or_create(&l).inc_by(i.rx_bytes as f64);
            net_tx.get_or_create(&l).inc_by(i.tx_bytes as f64);
        }
        let cpu = f.counter(
            "steelcup_host_cpu",
            "CPU time of all the host's CPUs, by mode",
            Some(Unit::Seconds),
        );
        for (mode, secs) in &h.cpu_seconds {
            cpu.get_or_create(&labels(&[("mode", mode)])).inc_by(*secs);
        }
        let disk_read = f.counter(
            "steelcup_host_disk_read",
            "Bytes read from the disk",
            Some(Unit::Bytes),
        );
        let disk_written = f.counter(
            "steelcup_host_disk_written",
            "Bytes written to the disk",
            Some(Unit::Bytes),
        );
        for d in &h.disks {
            let l = labels(&[("device", &d.name)]);
            disk_read.get_or_create(&l).inc_by(d.read_bytes as f64);
            disk_written
                .get_or_create(&l)
                .inc_by(d.written_bytes as f64);
        }
        let phases = f.gauge(
            "steelcup_boot_phase",
            "How long each of init's boot phases took",
            Some(Unit::Seconds),
        );
        for (phase, usec) in &h.boot_phases {
            phases
                .get_or_create(&labels(&[("phase", phase)]))
                .set(*usec as f64 / 1e6);
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
    let start = f.gauge(
        "steelcup_unit_start",
        "How long the unit's last start took (to READY=1 with ready = \"notify\", else to its process running)",
        Some(Unit::Seconds),
    );
    let dropped = f.counter(
        "steelcup_unit_log_dropped",
        "The unit's output lost: cut from overlong lines, or let go from memory with no log file",
        Some(Unit::Bytes),
    );
    for u in &s.units {
        if u.start_usec > 0 {
            start
                .get_or_create(&labels(&[("unit", &u.name)]))
                .set(u.start_usec as f64 / 1e6);
        }
        if u.kind == "service" {
            dropped
                .get_or_create(&labels(&[("unit", &u.name)]))
                .inc_by(u.log_bytes_dropped as f64);
        }
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
    let ops = f.counter(
        "steelcup_workload_block_requests",
        "Requests the workload's disks served, by op (read, write)",
        None,
    );
    let exits = f.counter(
        "steelcup_workload_vm_exits",
        "Exits of the workload's vCPUs to the VMM, by kind (io, mmio, other)",
        None,
    );
    let boot = f.gauge(
        "steelcup_workload_boot",
        "From the VM's start (a warm VM's claim) to the workload's process running",
        Some(Unit::Seconds),
    );
    for st in &s.stats {
        let l = labels(&[("name", &st.name)]);
        vm_cpu.get_or_create(&l).inc_by(st.cpu_usec as f64 / 1e6);
        vm_mem.get_or_create(&l).set(st.memory_bytes as f64);
        rx.get_or_create(&l).inc_by(st.net_rx as f64);
        tx.get_or_create(&l).inc_by(st.net_tx as f64);
        br.get_or_create(&l).inc_by(st.block_read as f64);
        bw.get_or_create(&l).inc_by(st.block_write as f64);
        for (op, n) in [("read", st.block_reads), ("write", st.block_writes)] {
            ops.get_or_create(&labels(&[("name", &st.name), ("op", op)]))
                .inc_by(n as f64);
        }
        for (kind, n) in [
            ("io", st.exits_io),
            ("mmio", st.exits_mmio),
            ("other", st.exits_other),
        ] {
            exits
                .get_or_create(&labels(&[("name", &st.name), ("kind", kind)]))
                .inc_by(n as f64);
        }
        if st.boot_usec > 0 {
            boot.get_or_create(&l).set(st.boot_usec as f64 / 1e6);
        }
    }
    if let Some(c) = &s.counters {
        let pool = f.counter(
            "steelcup_warm_pool_starts",
            "Starts that fit the warm pool: served by a ready VM (hit) or not (miss)",
            None,
        );
        pool.get_or_create(&labels(&[("result", "hit")]))
            .inc_by(c.pool_hits as f64);
        pool.get_or_create(&labels(&[("result", "miss")]))
            .inc_by(c.pool_misses as f64);
        let vms = f.gauge(
            "steelcup_warm_pool_vms",
            "Warm pool VMs, by state (ready, booting)",
            None,
        );
        vms.get_or_create(&labels(&[("state", "ready")]))
            .set(f64::from(c.pool_ready));
        vms.get_or_create(&labels(&[("state", "booting")]))
            .set(f64::from(c.pool_booting));
        let pulls = f.counter(
            "steelcup_image_pulls",
            "Image pulls and imports, by source kind and result",
            None,
        );
        let pull_time = f.counter(
            "steelcup_image_pull",
            "Time spent in image pulls and imports, by source kind",
            Some(Unit::Seconds),
        );
        for (kind, ok, failed, usec) in &c.pulls {
            pulls
                .get_or_create(&labels(&[("source", kind), ("result", "ok")]))
                .inc_by(*ok as f64);
            pulls
                .get_or_create(&labels(&[("source", kind), ("result", "failed")]))
                .inc_by(*failed as f64);
            pull_time
                .get_or_create(&labels(&[("source", kind)]))
                .inc_by(*usec as f64 / 1e6);
        }
        f.gauge(
            "steelcup_image_store_disk",
            "Disk space the image store's blobs and root images take",
            Some(Unit::Bytes),
        )
        .get_or_create(&none())
        .set(c.store_bytes as f64);
        let outcomes = f.counter(
            "steelcup_workload_outcomes",
            "Runs that ended, by workload and how (success, failure, killed, start_failed, rebooted, powered_off, guest_reset, guest_crashed, vmm_error, vmmd_failed)",
            None,
        );
        for (name, kind, n) in &c.outcomes {
            outcomes
                .get_or_create(&labels(&[("name", name), ("outcome", kind)]))
                .inc_by(*n as f64);
        }
        f.counter(
            "steelcup_workload_log_dropped",
            "Workload console output lost: cut from overlong lines or let go unread",
            Some(Unit::Bytes),
        )
        .get_or_create(&none())
        .inc_by(c.log_bytes_dropped as f64);
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

/// Connects to init or vmmd for one scrape.
pub type Connect<T> = fn() -> Result<T, CupError>;

/// Prometheus' content type for the text format.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Connections served at once; more wait in the listen queue.
const MAX_CONNECTIONS: usize = 32;
/// A client has this long to send its request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// `cup metrics --listen ADDR [--tls-dir DIR]`: serves `GET /metrics`
/// (gathered afresh for each scrape, one scrape at a time) until killed.
/// With `tls_dir` (server.crt, server.key, client-ca.crt, the admin
/// gateway's) only clients with a certificate the CA signed are served.
pub fn serve(
    listen: &str,
    tls_dir: Option<&Path>,
    init: Connect<Init1Proxy<'static>>,
    vmmd: Connect<Vmm1ClientProxy<'static>>,
) -> Result<u8, CupError> {
    let tls = match tls_dir {
        Some(dir) => {
            let mut config = steelcup_api::remote::server_config(dir)
                .map_err(|e| CupError::Usage(steelcup_sys::error_chain(&e)))?;
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
        }
        None => None,
    };
    let gather: Gather = Arc::new(move || {
        let p = init().map_err(|e| e.to_string())?;
        gather(&p, &vmmd())
            .map(|s| encode(&s))
            .map_err(|e| e.to_string())
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| CupError::File {
            what: "start the metrics server's runtime",
            path: PathBuf::from(listen),
            source,
        })?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|source| CupError::File {
                what: "listen for scrapes on",
                path: PathBuf::from(listen),
                source,
            })?;
        eprintln!(
            "metrics: serving http{}://{}/metrics{}",
            if tls.is_some() { "s" } else { "" },
            listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            if tls.is_some() { " (mutual TLS)" } else { "" }
        );
        serve_on(listener, tls, gather).await;
        Ok(0)
    })
}

/// Gathers one scrape's text (blocking: it calls init and vmmd).
type Gather = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// Serves scrapes on `listener` forever: at most [`MAX_CONNECTIONS`]
/// connections at once, and one scrape gathered at a time (a burst of
/// clients cannot multiply the load on init and vmmd).
async fn serve_on(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    gather: Gather,
) {
    let scraper = Arc::new(Scraper {
        gather,
        one_at_a_time: tokio::sync::Mutex::new(()),
    });
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Ok((tcp, peer)) = listener.accept().await else {
            continue;
        };
        let (scraper, tls) = (scraper.clone(), tls.clone());
        tokio::spawn(async move {
            let served = match tls {
                Some(acceptor) => {
                    match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => serve_connection(stream, scraper).await,
                        Ok(Err(e)) => Err(format!("TLS handshake: {e}")),
                        Err(_) => Err("TLS handshake: timed out".into()),
                    }
                }
                None => serve_connection(tcp, scraper).await,
            };
            if let Err(e) = served {
                eprintln!("metrics: {peer}: {e}");
            }
            drop(permit);
        });
    }
}

struct Scraper {
    gather: Gather,
    one_at_a_time: tokio::sync::Mutex<()>,
}

impl Scraper {
    async fn scrape(&self) -> Result<String, String> {
        let _turn = self.one_at_a_time.lock().await;
        let gather = self.gather.clone();
        tokio::task::spawn_blocking(move || gather())
            .await
            .map_err(|e| format!("scrape: {e}"))?
    }
}

async fn serve_connection<S>(stream: S, scraper: Arc<Scraper>) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let scraper = scraper.clone();
        async move { Ok::<_, std::convert::Infallible>(respond(req, &scraper).await) }
    });
    hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
        .await
        .map_err(|e| e.to_string())
}

type Body = http_body_util::Full<hyper::body::Bytes>;

fn reply(status: u16, content_type: &str, body: String) -> hyper::Response<Body> {
    let mut r = hyper::Response::new(Body::new(body.into()));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

async fn respond(
    req: hyper::Request<hyper::body::Incoming>,
    scraper: &Scraper,
) -> hyper::Response<Body> {
    let text = "text/plain; charset=utf-8";
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        let mut r = reply(405, text, "only GET and HEAD\n".into());
        r.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return r;
    }
    match req.uri().path() {
        "/metrics" => match scraper.scrape().await {
            Ok(body) => reply(200, CONTENT_TYPE, body),
            Err(e) => reply(503, text, format!("steelcup: cannot gather metrics: {e}\n")),
        },
        "/" => reply(
            200,
            text,
            "steelcup metrics: GET /metrics (Prometheus text format)\n".into(),
        ),
        other => reply(
            404,
            text,
            format!("{other}: not here; the metrics are at /metrics\n"),
        ),
    }
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
            block_reads: 3,
            block_writes: 800,
            exits_io: 10,
            exits_mmio: 20,
            exits_other: 30,
            boot_usec: 1_250_000,
        };
        Scrape {
            host: Some(steelcup_os::host::status(Path::new("/"))),
            units: vec![steelcup_api::init1::UnitInfo {
                name: "vmmd".into(),
                kind: "service".into(),
                state: "running".into(),
                reason: String::new(),
                pid: 9,
                restarts: 1,
                last_exit: -1,
                description: String::new(),
                start_usec: 1_500,
                log_bytes_dropped: 42,
            }],
            usage: vec![("vmmd".into(), 2_500_000, 5 << 20)],
            update: None,
            vms: vec![vm],
            stats: vec![stats],
            images: Vec::new(),
            counters: Some(steelcup_api::vmm1::VmmdCounters {
                pool_hits: 4,
                pool_misses: 1,
                pool_ready: 1,
                pool_booting: 0,
                pulls: vec![("registry".into(), 2, 1, 3_500_000)],
                store_bytes: 1 << 20,
                outcomes: vec![("web".into(), "killed".into(), 2)],
                log_bytes_dropped: 7,
            }),
            vmmd_up: true,
        }
    }

    /// One request on a fresh connection; the whole response.
    fn get(addr: std::net::SocketAddr, request: &str) -> String {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn the_server_answers_scrapes_and_nothing_else() {
        let scrapes = Arc::new(AtomicU64::new(0));
        let counted = scrapes.clone();
        let gather: Gather = Arc::new(move || {
            if counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 2 {
                return Err("init did not answer".into());
            }
            Ok(encode(&scrape()))
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || rt.block_on(serve_on(listener, None, gather)));
        let close = "Connection: close\r\n\r\n";
        let ok = get(
            addr,
            &format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{close}"),
        );
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains("content-type: text/plain; version=0.0.4; charset=utf-8\r\n"),
            "{ok}"
        );
        assert!(ok.contains("\nsteelcup_vmmd_up 1.0\n"), "{ok}");
        // HEAD: the headers, no body.
        let head = get(
            addr,
            &format!("HEAD /metrics HTTP/1.1\r\nHost: x\r\n{close}"),
        );
        assert!(
            head.starts_with("HTTP/1.1 200 OK") && !head.contains("steelcup_"),
            "{head}"
        );
        // A scrape that cannot be gathered is a 503 saying why.
        let down = get(
            addr,
            &format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{close}"),
        );
        assert!(
            down.starts_with("HTTP/1.1 503") && down.contains("init did not answer"),
            "{down}"
        );
        let other = get(addr, &format!("GET /secret HTTP/1.1\r\nHost: x\r\n{close}"));
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
        let post = get(
            addr,
            &format!("POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n{close}"),
        );
        assert!(
            post.starts_with("HTTP/1.1 405") && post.contains("allow: GET, HEAD"),
            "{post}"
        );
        let garbage = get(addr, "\x16\x03\x01 not http at all\r\n\r\n");
        assert!(
            garbage.is_empty() || garbage.starts_with("HTTP/1.1 400"),
            "{garbage}"
        );
        // The 404, 405 and garbage asked for no scrape.
        assert_eq!(scrapes.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[test]
    fn families_follow_prometheus_naming_and_carry_their_values() {
        let text = encode(&scrape());
        for line in [
            "# TYPE steelcup_unit_restarts_total counter",
            "steelcup_unit_restarts_total{unit=\"vmmd\"} 1.0",
            "steelcup_unit_cpu_seconds_total{unit=\"vmmd\"} 2.5",
            "steelcup_unit_memory_bytes{unit=\"vmmd\"} 5242880.0",
            "steelcup_unit_start_seconds{unit=\"vmmd\"} 0.0015",
            "steelcup_unit_log_dropped_bytes_total{unit=\"vmmd\"} 42.0",
            "steelcup_vmmd_up 1.0",
            "steelcup_workload_state{name=\"web\",image=\"nginx:alpine\",unit=\"web\",state=\"running\"} 1.0",
            "steelcup_workload_cpu_seconds_total{name=\"web\"} 1.5",
            "steelcup_workload_block_write_bytes_total{name=\"web\"} 104857600.0",
            "steelcup_workload_block_requests_total{name=\"web\",op=\"write\"} 800.0",
            "steelcup_workload_vm_exits_total{name=\"web\",kind=\"mmio\"} 20.0",
            "steelcup_workload_boot_seconds{name=\"web\"} 1.25",
            "steelcup_warm_pool_starts_total{result=\"hit\"} 4.0",
            "steelcup_warm_pool_vms{state=\"ready\"} 1.0",
            "steelcup_image_pulls_total{source=\"registry\",result=\"failed\"} 1.0",
            "steelcup_image_pull_seconds_total{source=\"registry\"} 3.5",
            "steelcup_image_store_disk_bytes 1048576.0",
            "steelcup_workload_outcomes_total{name=\"web\",outcome=\"killed\"} 2.0",
            "steelcup_workload_log_dropped_bytes_total 7.0",
            "steelcup_workload_guest_memory_bytes{name=\"web\",image=\"nginx:alpine\",unit=\"web\"} 134217728.0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in:\n{text}");
        }
        // This machine's own host families.
        for prefix in [
            "steelcup_host_cpu_seconds_total{mode=\"idle\"} ",
            "steelcup_host_network_receive_bytes_total{interface=\"lo\"} ",
            "steelcup_host_memory_total_bytes ",
            "steelcup_host_uptime_seconds ",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(prefix)),
                "{prefix} not in:\n{text}"
            );
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
