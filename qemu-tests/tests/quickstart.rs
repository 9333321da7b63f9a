//! The README's quick start, from this machine's side through the real
//! `cup` binary: the appliance booted as `cargo xtask run` boots it (user
//! networking, the admin gateway and workload ports forwarded to
//! 127.0.0.1, a config drive turning the gateway on), a cup context made
//! the way `cargo xtask run` makes it, then plain `cup` verbs with no
//! flags: `ps`, `units`, `run -d --restart always -p` of nginx from a
//! registry on this machine, an HTTP GET on the published port from here,
//! `logs`, vmmd restarted (the run comes back), `exec`, `stop`, `save`
//! and `load` of its image, `health`, `support-bundle`, `apply`
//! of a new, a changed and a bad unit, `unit cat`/`rm`, `poweroff`.

#![allow(clippy::unwrap_used)] // tests fail by panicking

use anyhow::{ensure, Context, Result};
use qemu_tests::prometheus::{http_get, promtool_check, Prometheus};
use qemu_tests::run_machine::{run_machine_with, RunMachine};
use qemu_tests::Guest;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const BOOT: Duration = Duration::from_secs(300);
/// Pulling ~40 MB and building its root image under emulation, then a
/// nested nginx boot.
const PULL_AND_BOOT: Duration = Duration::from_secs(900);
const STEP: Duration = Duration::from_secs(300);

/// `cup ARGS` with cup's config in `config`, as a user in another
/// terminal types it: no flags but the verb's.
fn cup(config: &Path, args: &[&str]) -> Result<Output> {
    let out = output_within(
        Command::new(qemu_tests::cup_binary())
            .args(args)
            .env("STEELCUP_CONFIG_DIR", config)
            .env_remove("STEELCUP_REMOTE")
            .env_remove("STEELCUP_CONTEXT")
            .env_remove("STEELCUP_TLS_DIR"),
        CUP_LIMIT,
    )
    .with_context(|| format!("cup {}", args.join(" ")))?;
    println!(
        "quickstart: $ cup {} -> {}\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

/// The longest one `cup` may take: a machine whose emulated host has
/// locked up never answers, and the step must end (as an error the
/// attempt logic reads the serial log for) rather than hang the suite.
const CUP_LIMIT: Duration = Duration::from_secs(600);

/// `cmd`'s output, or an error once it has run `limit` (it is killed).
fn output_within(cmd: &mut Command, limit: Duration) -> Result<Output> {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {}", qemu_tests::cup_binary().display()))?;
    let read = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut v);
            }
            v
        })
    };
    let out = read(
        child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn Read + Send>),
    );
    let err = read(
        child
            .stderr
            .take()
            .map(|e| Box::new(e) as Box<dyn Read + Send>),
    );
    let t = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("no answer in {limit:?}: killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// `cup ARGS`, which must succeed; its standard output.
fn cup_ok(config: &Path, args: &[&str]) -> Result<String> {
    let out = cup(config, args)?;
    ensure!(
        out.status.success(),
        "cup {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `GET /` from here on 127.0.0.1:`port`.
fn get_page(port: u16) -> Result<String> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port))?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(c, "GET / HTTP/1.0\r\nHost: steelcup\r\n\r\n")?;
    let mut out = String::new();
    c.read_to_string(&mut out)?;
    Ok(out)
}

#[test]
fn the_gateway_port_is_vmmd_admins_default() {
    assert_eq!(
        qemu_tests::run_machine::GATEWAY_PORT,
        steelcup_api::remote::DEFAULT_PORT
    );
}

#[test]
fn quick_start_from_this_machines_shell() {
    let Some(artifacts) = qemu_tests::artifacts() else {
        assert!(
            std::env::var_os("STEELCUP_REQUIRE_ARTIFACTS").is_none(),
            "STEELCUP_ARTIFACTS is not set"
        );
        eprintln!("quickstart: skipped: no appliance built (cargo xtask test builds it)");
        return;
    };
    let Some(image) = std::env::var_os("STEELCUP_NGINX_IMAGE") else {
        assert!(
            std::env::var_os("STEELCUP_REQUIRE_ARTIFACTS").is_none(),
            "STEELCUP_NGINX_IMAGE is not set (cargo xtask test builds the image)"
        );
        eprintln!("quickstart: skipped: needs the nginx image `cargo xtask test` builds");
        return;
    };
    let _registry = qemu_tests::registry::Registry::with_nginx(&image.to_string_lossy()).unwrap();
    // An NTP server here, and the machine's hardware clock an hour behind:
    // its time-sync unit must set it right.
    let chrony = qemu_tests::ntp::Chrony::start().unwrap();
    let home = tempfile_dir("quickstart");
    let config = home.join("config");
    let certs = config.join("appliance");
    let mut machine = run_machine_with(
        "quickstart",
        &artifacts.dir,
        &certs,
        &[qemu_tests::registry::FROM_APPLIANCE],
        &format!(
            "\n[time]\nservers = [\"10.0.2.2:{}\"]\nwait = 60\n",
            chrony.port
        ),
    )
    .unwrap();
    let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    machine.cfg.rtc_base = Some(
        humantime::format_rfc3339_seconds(hour_ago)
            .to_string()
            .trim_end_matches('Z')
            .to_string(),
    );
    // A Prometheus server here scrapes the machine's metrics port.
    let prometheus =
        qemu_tests::prometheus::Prometheus::start(&machine.metrics, Duration::from_secs(2))
            .unwrap();
    qemu_tests::run_booted(
        "quickstart",
        || Some(Guest::boot(&machine.cfg).unwrap()),
        |g| scenario(g, &machine, &config, &certs, &prometheus),
    );
    let _ = std::fs::remove_dir_all(&home);
}

/// A fresh directory under the system's temporary one.
fn tempfile_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("steelcup-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn scenario(
    g: &mut Guest,
    machine: &RunMachine,
    config: &Path,
    certs: &Path,
    prometheus: &Prometheus,
) -> Result<()> {
    // Before anything is set up, cup says what is missing and what makes it.
    let out = cup(config, &["--context", "appliance", "ps"])?;
    ensure!(!out.status.success(), "cup ps with no context succeeded");
    // The context, made as `cargo xtask run` makes it.
    let certs_arg = certs.to_string_lossy();
    cup_ok(
        config,
        &[
            "context",
            "add",
            "appliance",
            "--remote",
            &machine.admin,
            "--tls-dir",
            &certs_arg,
            "--made-by",
            "cargo xtask run",
        ],
    )?;
    cup_ok(config, &["context", "use", "appliance"])?;
    let ls = cup_ok(config, &["context", "ls"])?;
    ensure!(ls.contains("appliance *"), "context ls: {ls}");
    g.wait_for("phase units: done", BOOT)?;
    g.wait_for("admin: cup --remote on", BOOT)?;
    g.wait_for("unit vmmd: ready", BOOT)?;
    // Booted an hour behind; set right from the NTP server here.
    g.wait_for("time: stepped the clock by +", BOOT)?;
    let health = cup_ok(config, &["health"])?;
    let time = health
        .lines()
        .find(|l| l.starts_with("time"))
        .unwrap_or_default()
        .to_string();
    let offset: f64 = time
        .split_once("ms off")
        .and_then(|(before, _)| before.rsplit(' ').nth(1)?.parse().ok())
        .unwrap_or(f64::MAX);
    ensure!(
        time.contains("synchronized to 10.0.2.2:") && offset.abs() < 100.0,
        "cup health, time: {time} (offset {offset} ms)"
    );
    // Written back to the hardware clock, an hour behind at boot.
    ensure!(
        time.contains("hardware clock in step;"),
        "cup health, time: the RTC was not set: {time}"
    );
    let clock: std::time::SystemTime = time
        .rsplit("clock ")
        .next()
        .and_then(|c| humantime::parse_rfc3339(c.trim()).ok())
        .with_context(|| format!("no clock in {time:?}"))?;
    let skew = clock
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_else(|e| e.duration());
    ensure!(
        skew < Duration::from_secs(5),
        "the machine's clock is {skew:?} off this one's: {time}"
    );
    // Plain verbs, the context's machine.
    let units = cup_ok(config, &["units"])?;
    ensure!(
        units.contains("vmmd") && units.contains("admin"),
        "cup units: {units}"
    );
    let ps = cup_ok(config, &["ps", "-a"])?;
    ensure!(ps.contains("hello"), "cup ps -a: {ps}");
    // The machine's kernel log, as dmesg prints it (init's own lines are
    // in it once it has opened /dev/kmsg, as far as the kernel's rate
    // limit on /dev/kmsg writers lets them in).
    let dmesg = cup_ok(config, &["dmesg"])?;
    ensure!(
        dmesg.contains("] Linux version")
            && dmesg.contains("] steelcup: ")
            && dmesg
                .lines()
                .all(|l| l.starts_with('[') && l.as_bytes().get(13) == Some(&b']')),
        "cup dmesg: {}",
        dmesg.chars().take(2000).collect::<String>()
    );
    // The host's own top: its units and microVMs by CPU and memory.
    let top = cup_ok(config, &["top"])?;
    ensure!(
        top.lines()
            .any(|l| l.starts_with("unit") && l.contains("vmmd"))
            && top.lines().any(|l| l.starts_with("microvm")),
        "cup top: {top}"
    );
    // The same in Prometheus' text format.
    let metrics = cup_ok(config, &["metrics"])?;
    for family in [
        "# TYPE steelcup_host_uptime_seconds gauge",
        "steelcup_unit_state{unit=\"vmmd\",kind=\"service\",state=\"running\"} 1.0",
        "steelcup_vmmd_up 1.0",
        "# TYPE steelcup_workload_cpu_seconds_total counter",
        "steelcup_host_clock_synchronized 1.0",
    ] {
        ensure!(
            metrics.contains(family),
            "cup metrics has no {family:?}: {metrics}"
        );
    }
    let last = cup_ok(config, &["dmesg", "-n", "3"])?;
    ensure!(last.lines().count() == 3, "cup dmesg -n 3: {last}");
    let port = *machine
        .ports
        .first()
        .context("no workload port was free here")?;
    let publish = format!("{port}:80");
    cup_ok(
        config,
        &[
            "run",
            "-d",
            "--name",
            "web",
            "--restart",
            "always",
            // A secret a support bundle must not carry.
            "-e",
            "API_TOKEN=quickstart-secret-4711",
            "-p",
            &publish,
            qemu_tests::registry::NGINX,
        ],
    )?;
    // Pulled from the registry on this machine, its root image built, its
    // VM booted: the page answers here on localhost.
    let t = Instant::now();
    let page = loop {
        match get_page(port) {
            Ok(p) if p.starts_with("HTTP/1.1 200") => break p,
            other if t.elapsed() > PULL_AND_BOOT => {
                anyhow::bail!("GET localhost:{port} after {:?}: {other:?}", t.elapsed())
            }
            _ => std::thread::sleep(Duration::from_secs(2)),
        }
    };
    ensure!(
        page.contains("<title>Welcome to nginx!</title>"),
        "GET localhost:{port}: {page}"
    );
    println!(
        "quickstart: nginx answered on localhost:{port} after {:.0}s",
        t.elapsed().as_secs_f64()
    );
    let ps = cup_ok(config, &["ps"])?;
    ensure!(
        ps.lines()
            .any(|l| l.starts_with("web") && l.contains("running")),
        "cup ps: {ps}"
    );
    // (Debian's nginx logs to files, not its console: nothing to show.)
    cup_ok(config, &["logs", "web"])?;
    let vmmd_restarts = metrics_over_http(machine, config)?;
    // Each line with the time it was logged, as `docker logs -t` prints
    // it; a window that closed in 1970 holds none of them.
    let stamped = cup_ok(config, &["logs", "-t", "--since", "1h", "--unit", "vmmd"])?;
    ensure!(
        stamped.lines().count() > 3
            && stamped
                .lines()
                .all(|l| l.len() > 28 && l.starts_with("20") && l.as_bytes()[26] == b'Z'),
        "cup logs -t --since 1h --unit vmmd: {stamped}"
    );
    ensure!(
        stamped.contains("workload web"),
        "cup logs -t --unit vmmd: no line of web: {stamped}"
    );
    let none = cup_ok(
        config,
        &["logs", "--until", "1970-01-02T00:00:00Z", "--unit", "vmmd"],
    )?;
    ensure!(none.trim().is_empty(), "cup logs --until 1970: {none}");
    // Like docker's restart policies: a `--restart always` run outlives
    // vmmd (its spec is kept on /var); the new vmmd runs it again.
    cup_ok(config, &["unit", "restart", "vmmd"])?;
    g.wait_for("workload web: kept run, started again", STEP)?;
    // The restart counted once, over HTTP and in Prometheus.
    let after = scrape(machine)?;
    let restarts = sample(&after, "steelcup_unit_restarts_total{unit=\"vmmd\"}")?;
    ensure!(
        restarts == vmmd_restarts + 1.0,
        "vmmd's restarts went from {vmmd_restarts} to {restarts}"
    );
    prometheus_has_it_all(prometheus, vmmd_restarts + 1.0)?;
    let t = Instant::now();
    loop {
        match get_page(port) {
            Ok(p) if p.contains("<title>Welcome to nginx!</title>") => break,
            other => ensure!(t.elapsed() < STEP, "web after vmmd restarted: {other:?}"),
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    let hostname = cup_ok(config, &["exec", "web", "cat", "/proc/sys/kernel/hostname"])?;
    ensure!(
        hostname.trim() == "web",
        "cup exec web: hostname {hostname:?}"
    );
    cup_ok(config, &["stop", "web"])?;
    let t = Instant::now();
    loop {
        let ps = cup_ok(config, &["ps", "-a"])?;
        if ps
            .lines()
            .any(|l| l.starts_with("web") && !l.contains("running"))
        {
            break;
        }
        ensure!(t.elapsed() < STEP, "web did not stop: {ps}");
        std::thread::sleep(Duration::from_secs(1));
    }
    save_and_load(config)?;
    health_and_bundle(config)?;
    apply_units(config)?;
    compose(config, machine)?;
    machine_config(g, config, certs)?;
    cup_ok(config, &["poweroff"])?;
    g.wait_clean_poweroff(STEP)?;
    Ok(())
}

/// One scrape of the machine's metrics over HTTP (the `[metrics]` unit,
/// forwarded here), checked by promtool.
fn scrape(machine: &RunMachine) -> Result<String> {
    let (code, head, body) = http_get(&machine.metrics, "/metrics")?;
    ensure!(
        code == 200
            && head
                .to_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
        "GET {}/metrics: {code} {head}",
        machine.metrics
    );
    promtool_check(&body)?;
    Ok(body)
}

/// The value of the sample whose name and labels are `series`.
fn sample(text: &str, series: &str) -> Result<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .with_context(|| format!("no sample {series} in:\n{text}"))
}

/// Every family the issue names is in a scrape over HTTP, and the
/// counters move as the work does: a workload's 8 MiB written show in its
/// block counter, a busy loop in it moves its CPU counter. Answers vmmd's
/// restarts so far.
fn metrics_over_http(machine: &RunMachine, config: &Path) -> Result<f64> {
    cup_ok(
        config,
        &[
            "run",
            "-d",
            "--name",
            "writer",
            "-v",
            "qsdata:/data",
            qemu_tests::registry::NGINX,
            "sh",
            "-c",
            "dd if=/dev/zero of=/data/f bs=1M count=8 conv=fsync 2>/dev/null && echo wrote; exec sleep 600",
        ],
    )?;
    let t = Instant::now();
    while !cup_ok(config, &["logs", "writer"])?.contains("wrote") {
        ensure!(t.elapsed() < STEP, "writer did not write its 8 MiB");
        std::thread::sleep(Duration::from_secs(2));
    }
    let a = scrape(machine)?;
    for family in [
        "steelcup_host_cpu_seconds_total{mode=\"idle\"}",
        "steelcup_host_network_receive_bytes_total{interface=\"eth0\"}",
        "steelcup_host_disk_written_bytes_total{device=",
        "steelcup_host_var_size_bytes{",
        "steelcup_boot_phase_seconds{phase=\"units\"}",
        "steelcup_unit_start_seconds{unit=\"vmmd\"}",
        "steelcup_unit_log_dropped_bytes_total{unit=\"vmmd\"}",
        "steelcup_unit_memory_bytes{unit=\"vmmd\"}",
        "steelcup_workload_vcpus{name=\"web\",image=",
        "steelcup_workload_guest_memory_bytes{name=\"web\"",
        "steelcup_workload_memory_bytes{name=\"web\"}",
        "steelcup_workload_network_receive_bytes_total{name=\"web\"}",
        "steelcup_workload_block_requests_total{name=\"writer\",op=\"write\"}",
        "steelcup_workload_vm_exits_total{name=\"web\",kind=\"mmio\"}",
        "steelcup_workload_boot_seconds{name=\"web\"}",
        "steelcup_workload_outcomes_total{name=\"hello\"",
        "steelcup_warm_pool_starts_total{result=\"hit\"}",
        "steelcup_warm_pool_vms{state=\"ready\"}",
        "steelcup_image_pulls_total{source=\"registry\",result=\"ok\"}",
        "steelcup_image_pull_seconds_total{source=\"registry\"}",
        "steelcup_image_store_disk_bytes ",
        "steelcup_workload_log_dropped_bytes_total ",
    ] {
        ensure!(
            a.lines().any(|l| l.starts_with(family)),
            "GET /metrics has no {family}:\n{a}"
        );
    }
    let written = sample(
        &a,
        "steelcup_workload_block_write_bytes_total{name=\"writer\"}",
    )?;
    ensure!(
        written >= 8.0 * 1024.0 * 1024.0,
        "writer wrote {written} bytes"
    );
    let boot = sample(&a, "steelcup_workload_boot_seconds{name=\"web\"}")?;
    ensure!(boot > 0.0 && boot < 600.0, "web booted in {boot} s");
    let cpu = "steelcup_workload_cpu_seconds_total{name=\"writer\"}";
    let before = sample(&a, cpu)?;
    // Four seconds of a busy loop in its VM (timeout ends it: 124).
    cup(
        config,
        &[
            "exec",
            "writer",
            "timeout",
            "4",
            "sh",
            "-c",
            "while :; do :; done",
        ],
    )?;
    let b = scrape(machine)?;
    let busy = sample(&b, cpu)? - before;
    ensure!(busy >= 1.0, "a busy loop moved writer's CPU by {busy} s");
    println!("quickstart: metrics: writer wrote {written} bytes; busy for {busy:.1} CPU s; web booted in {boot:.2} s");
    cup_ok(config, &["rm", "-f", "writer"])?;
    cup_ok(config, &["volume", "rm", "qsdata"])?;
    sample(&b, "steelcup_unit_restarts_total{unit=\"vmmd\"}")
}

/// The Prometheus server here has been scraping the machine all along:
/// it sees it up, sees vmmd's restart, and kept what writer wrote.
fn prometheus_has_it_all(p: &Prometheus, vmmd_restarts: f64) -> Result<()> {
    let within = Duration::from_secs(60);
    p.wait_for("up{job=\"steelcup\"}", within, |v| v == 1.0)?;
    p.wait_for("steelcup_vmmd_up", within, |v| v == 1.0)?;
    p.wait_for("steelcup_unit_restarts_total{unit=\"vmmd\"}", within, |v| {
        v == vmmd_restarts
    })?;
    p.wait_for(
        "max_over_time(steelcup_workload_block_write_bytes_total{name=\"writer\"}[1h])",
        within,
        |v| v >= 8.0 * 1024.0 * 1024.0,
    )?;
    let series = p.query("count(steelcup_host_cpu_seconds_total)")?;
    println!("quickstart: Prometheus scraped the machine: {series:?} CPU modes");
    Ok(())
}

/// `cup save` of nginx to a file here, `cup rmi`, `cup load` of that file:
/// the image goes out and comes back through the gateway, under its name.
fn save_and_load(config: &Path) -> Result<()> {
    let nginx = qemu_tests::registry::NGINX;
    let dir = tempfile_dir("quickstart-save");
    let file = dir.join("nginx.tar");
    let path = file.to_string_lossy();
    let t = Instant::now();
    cup_ok(config, &["save", "-o", &path, nginx])?;
    let size = std::fs::metadata(&file)?.len();
    ensure!(size > 1 << 20, "cup save wrote {size} bytes");
    let mut names = Vec::new();
    for e in tar::Archive::new(std::fs::File::open(&file)?).entries()? {
        names.push(e?.path()?.display().to_string());
    }
    ensure!(
        names.iter().any(|n| n == "index.json") && names.iter().any(|n| n == "manifest.json"),
        "cup save: not an OCI archive with Docker's manifest: {names:?}"
    );
    cup_ok(config, &["rmi", nginx])?;
    let images = cup_ok(config, &["images", "-q"])?;
    ensure!(!images.contains("nginx"), "cup rmi left it: {images}");
    let loaded = cup_ok(config, &["load", "-i", &path])?;
    ensure!(
        loaded.trim() == format!("Loaded image: {nginx}"),
        "cup load: {loaded}"
    );
    let images = cup_ok(config, &["images"])?;
    ensure!(images.contains("nginx"), "cup images after load: {images}");
    println!(
        "quickstart: {:.1} MB saved and loaded back in {:.0}s",
        size as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `cup health` says how each subsystem is; `cup support-bundle` writes
/// a tarball here with what a bug report needs and no secret: neither
/// web's `API_TOKEN` nor the machine config's private key.
fn health_and_bundle(config: &Path) -> Result<()> {
    let out = cup(config, &["health"])?;
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    for what in ["host", "units", "vmmd", "network", "time", "disk", "update"] {
        ensure!(
            said.lines().any(|l| l.starts_with(what)),
            "cup health has no {what} line: {said}"
        );
    }
    ensure!(
        out.status.success() && !said.contains("FAIL"),
        "cup health found a failure on the quick-start machine: {said}"
    );
    ensure!(
        said.lines()
            .any(|l| l.starts_with("network") && l.contains("10.0.2.15")),
        "cup health: no address on the user network: {said}"
    );
    let dir = tempfile_dir("quickstart-bundle");
    let file = dir.join("bundle.tar.gz");
    cup_ok(config, &["support-bundle", "-o", &file.to_string_lossy()])?;
    let mut names = Vec::new();
    let gz = flate2::read::GzDecoder::new(std::fs::File::open(&file)?);
    for e in tar::Archive::new(gz).entries()? {
        let mut e = e?;
        let name = e.path()?.display().to_string();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut e, &mut text)?;
        for secret in ["quickstart-secret-4711", "PRIVATE KEY"] {
            ensure!(
                !text.contains(secret),
                "support bundle: {name} holds {secret:?}"
            );
        }
        names.push(name);
    }
    for want in [
        "/health.txt",
        "/host.json",
        "/dmesg.txt",
        "/units.json",
        "/units/vmmd.log",
        "/machine.toml",
        "/workloads.json",
        "/workloads/web.json",
    ] {
        ensure!(
            names.iter().any(|n| n.ends_with(want)),
            "support bundle has no {want}: {names:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `cup apply` from here: a new unit, then it changed (only it restarts),
/// then a bad file (refused, with its error, nothing changed).
fn apply_units(config: &Path) -> Result<()> {
    let dir = config.join("units");
    std::fs::create_dir_all(&dir)?;
    let unit = |word: &str| {
        format!(
            "[unit]\ndescription = \"applied from cup\"\nafter = [\"vmmd\"]\n\n[microvm]\ncmd = [\"/bin/sh\", \"-c\", \"echo greet {word}\"]\nmemory = \"64MiB\"\nrestart = \"no\"\n"
        )
    };
    let greet = dir.join("greet.toml");
    std::fs::write(&greet, unit("one"))?;
    let path = greet.to_string_lossy().into_owned();
    let dry = cup_ok(config, &["apply", "--dry-run", &path])?;
    ensure!(
        dry.contains("would apply: started [greet]"),
        "apply --dry-run: {dry}"
    );
    let units = cup_ok(config, &["units"])?;
    ensure!(
        !units.contains("greet"),
        "a dry run installed greet: {units}"
    );
    let out = cup_ok(config, &["apply", &path])?;
    ensure!(out.contains("applied: started [greet]"), "apply: {out}");
    std::fs::write(&greet, unit("two"))?;
    let out = cup_ok(config, &["apply", &path])?;
    ensure!(
        out.contains("started [], stopped [], restarted [greet]"),
        "apply of a changed unit: {out}"
    );
    let cat = cup_ok(config, &["unit", "cat", "greet"])?;
    ensure!(cat.contains("echo greet two"), "unit cat greet: {cat}");
    let bad = dir.join("broken.toml");
    std::fs::write(&bad, "[microvm]\ncmd = 3\n")?;
    let out = cup(config, &["apply", &bad.to_string_lossy()])?;
    let said = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && said.contains("nothing applied") && said.contains("broken.toml"),
        "apply of a bad unit: {said}"
    );
    let units = cup_ok(config, &["units"])?;
    ensure!(
        !units.contains("broken"),
        "a refused unit was installed: {units}"
    );
    let gone = cup_ok(config, &["unit", "rm", "greet"])?;
    ensure!(
        gone.contains("stopped [greet]") || gone.contains("removed"),
        "unit rm: {gone}"
    );
    // A scheduled unit, as the README shows one: listed with its schedule
    // and the next time it is due; its runs are the vms test's.
    let heartbeat = dir.join("heartbeat.toml");
    std::fs::write(
        &heartbeat,
        "[unit]\nafter = [\"vmmd\"]\n\n[microvm]\nimage = \"oci-archive:/usr/lib/steelcup/examples/busybox.oci.tar:latest\"\ncmd = [\"sh\", \"-c\", \"echo heartbeat\"]\nmemory = \"64MiB\"\nschedule = \"*/5 * * * *\"\ntime-zone = \"Europe/Berlin\"\nconcurrency = \"forbid\"\n",
    )?;
    let out = cup_ok(config, &["apply", &heartbeat.to_string_lossy()])?;
    ensure!(
        out.contains("started [heartbeat]"),
        "apply heartbeat: {out}"
    );
    let ls = cup_ok(config, &["cron", "ls"])?;
    let line = ls
        .lines()
        .find(|l| l.starts_with("heartbeat "))
        .with_context(|| format!("cup cron ls: {ls}"))?;
    ensure!(
        line.contains("*/5 * * * *")
            && line.contains("Europe/Berlin")
            && line.contains("forbid")
            && line.contains(" UTC"),
        "cup cron ls: {ls}"
    );
    cup_ok(config, &["unit", "rm", "heartbeat"])?;
    Ok(())
}

/// The README's compose project: a database with a healthcheck and a named
/// volume, two web replicas behind a published port that start once it
/// is healthy, and a worker that finds the database by its service name.
const SHOP: &str = r#"name: shop
services:
  db:
    image: ${BUSYBOX}
    command: sh -c 'mkdir -p /data/www && echo db-ok > /data/www/index.html && exec httpd -f -p 5432 -h /data/www'
    volumes:
      - dbdata:/data
    healthcheck:
      test: ["CMD", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:5432/"]
      interval: 2s
      retries: 3
  web:
    image: ${BUSYBOX}
    # The image's user is not root: port 80 needs root.
    user: "0:0"
    command: sh -c 'mkdir -p /tmp/www && echo web-ok > /tmp/www/index.html && exec httpd -f -p 80 -h /tmp/www'
    ports:
      - "${WEB_PORT}:80"
    depends_on:
      db:
        condition: service_healthy
    deploy:
      replicas: 2
      resources:
        limits:
          memory: 128M
    restart: always
  worker:
    image: ${BUSYBOX}
    command: sh -c 'while true; do wget -q -O - http://db:5432/; sleep 2; done'
    depends_on: [db]
volumes:
  dbdata:
    x-steelcup-size: 64MiB
"#;

/// `cup compose`: up, the page from here, names between services, a
/// changed service rolled alone, refusals with file and line, down -v.
fn compose(config: &Path, machine: &RunMachine) -> Result<()> {
    let dir = config.join("shop");
    std::fs::create_dir_all(&dir)?;
    let port = *machine
        .ports
        .get(1)
        .context("a second workload port was not free here")?;
    let file = dir.join("compose.yaml");
    std::fs::write(&file, SHOP)?;
    std::fs::write(
        dir.join(".env"),
        format!(
            "BUSYBOX=oci-archive:/usr/lib/steelcup/examples/busybox.oci.tar:latest\nWEB_PORT={port}\n"
        ),
    )?;
    let f = file.to_string_lossy().into_owned();
    let services = cup_ok(config, &["compose", "-f", &f, "config", "--services"])?;
    ensure!(
        services == "db\nweb\nworker\n",
        "compose config --services: {services}"
    );
    let t = Instant::now();
    let up = cup_ok(config, &["compose", "-f", &f, "up", "-d", "--wait"])?;
    ensure!(
        up.contains("applied: started [shop-db, shop-web, shop-worker]")
            && up.contains("service web: 2 of 2 started"),
        "compose up: {up}"
    );
    println!(
        "quickstart: compose up took {:.0}s",
        t.elapsed().as_secs_f64()
    );
    // Started is booted, not yet serving: the page comes once a replica's
    // guest runs httpd.
    let t = Instant::now();
    loop {
        match get_page(port) {
            Ok(p) if p.contains("web-ok") => break,
            other => ensure!(t.elapsed() < STEP, "GET localhost:{port}: {other:?}"),
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    // web waited for db to be healthy.
    let log = cup_ok(config, &["logs", "--unit", "vmmd", "-n", "400"])?;
    ensure!(
        log.contains("unit shop-web: waiting for shop-db to be ready (after)"),
        "vmmd's log: no wait of web for db: {log}"
    );
    // Service names answer inside the project's network (the first
    // replica's guest may still be booting).
    let exec = [
        "compose",
        "-f",
        &f,
        "exec",
        "-T",
        "web",
        "wget",
        "-q",
        "-O",
        "-",
        "http://db:5432/",
    ];
    let t = Instant::now();
    let got = loop {
        let out = cup(config, &exec)?;
        if out.status.success() || t.elapsed() > STEP {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    ensure!(got.trim() == "db-ok", "web -> db by name: {got:?}");
    let t = Instant::now();
    loop {
        let logs = cup_ok(config, &["compose", "-f", &f, "logs", "worker"])?;
        if logs
            .lines()
            .any(|l| l.starts_with("shop-worker") && l.ends_with("| db-ok"))
        {
            break;
        }
        ensure!(t.elapsed() < STEP, "the worker never reached db: {logs}");
        std::thread::sleep(Duration::from_secs(2));
    }
    let ps = cup_ok(
        config,
        &["compose", "-f", &f, "ps", "--format", "{{.Names}}"],
    )?;
    let mut names: Vec<&str> = ps.lines().collect();
    names.sort();
    ensure!(
        names == ["shop-db", "shop-web.1", "shop-web.2", "shop-worker"],
        "compose ps: {ps}"
    );
    // restart and pull, by service.
    let out = cup_ok(config, &["compose", "-f", &f, "restart", "worker"])?;
    ensure!(
        out.contains("restarted shop-worker"),
        "compose restart: {out}"
    );
    let t = Instant::now();
    loop {
        let ps = cup_ok(
            config,
            &[
                "ps",
                "--filter",
                "name=shop-worker",
                "--format",
                "{{.Names}} {{.State}}",
            ],
        )?;
        if ps.contains("shop-worker running") {
            break;
        }
        ensure!(t.elapsed() < STEP, "after compose restart: {ps}");
        std::thread::sleep(Duration::from_secs(1));
    }
    let out = cup_ok(config, &["compose", "-f", &f, "pull", "db"])?;
    ensure!(
        out.contains("db: pulling oci-archive:"),
        "compose pull: {out}"
    );
    // A changed image (in a second file, merged over the first) rolls
    // that service and leaves the others alone.
    let roll = dir.join("nginx.yaml");
    std::fs::write(
        &roll,
        format!(
            "services:\n  web:\n    image: {}\n    command: [\"nginx\", \"-g\", \"daemon off;\"]\n",
            qemu_tests::registry::NGINX
        ),
    )?;
    let r = roll.to_string_lossy().into_owned();
    let out = cup_ok(config, &["compose", "-f", &f, "-f", &r, "up", "-d"])?;
    ensure!(
        out.contains("started [], stopped [], restarted [shop-web]"),
        "compose up with web's image changed: {out}"
    );
    let t = Instant::now();
    loop {
        match get_page(port) {
            Ok(p) if p.contains("<title>Welcome to nginx!</title>") => break,
            other => ensure!(t.elapsed() < PULL_AND_BOOT, "web after its roll: {other:?}"),
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    let ps = cup_ok(
        config,
        &["compose", "-f", &f, "ps", "--format", "{{.Names}}"],
    )?;
    ensure!(
        ps.lines().any(|l| l == "shop-db") && ps.lines().any(|l| l == "shop-worker"),
        "compose ps after the roll: {ps}"
    );
    // What steelcup cannot carry out is refused with its file and line.
    let build = dir.join("build.yaml");
    std::fs::write(&build, "services:\n  app:\n    image: x\n    build: .\n")?;
    let bind = dir.join("bind.yaml");
    std::fs::write(
        &bind,
        "services:\n  app:\n    image: x\n    volumes:\n      - ./site:/srv\n",
    )?;
    for (file, at) in [
        (&build, ":4: services.app.build"),
        (&bind, ":5: services.app.volumes.[0]"),
    ] {
        let out = cup(
            config,
            &["compose", "-f", &file.to_string_lossy(), "up", "-d"],
        )?;
        let said = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(2) && said.contains(&format!("{}{at}", file.display())),
            "compose up of {}: {said}",
            file.display()
        );
    }
    // down -v leaves nothing: no units, no workloads, no volumes.
    let down = cup_ok(config, &["compose", "-f", &f, "down", "-v"])?;
    ensure!(
        down.contains("removed volume shop-db/dbdata"),
        "compose down -v: {down}"
    );
    let units = cup_ok(config, &["units"])?;
    let ps = cup_ok(config, &["ps", "-a"])?;
    let volumes = cup_ok(config, &["volume", "ls"])?;
    for (what, text) in [("units", &units), ("ps -a", &ps), ("volume ls", &volumes)] {
        ensure!(
            !text.contains("shop-"),
            "after compose down -v, cup {what}: {text}"
        );
    }
    Ok(())
}

/// `cup machine show` and `apply`: the running machine's config, changed
/// live (its hostname), its secrets never shown.
fn machine_config(g: &mut Guest, config: &Path, certs: &Path) -> Result<()> {
    let shown = cup_ok(config, &["machine", "show"])?;
    ensure!(
        shown.contains("steelcup-run") && shown.contains("(secret: not shown)"),
        "machine show: {shown}"
    );
    ensure!(
        !shown.contains("PRIVATE KEY"),
        "machine show printed a key: {shown}"
    );
    let text =
        qemu_tests::run_machine::machine_config(certs, &[qemu_tests::registry::FROM_APPLIANCE])?
            .replace("steelcup-run", "quick-start");
    let file = config.join("machine.toml");
    std::fs::write(&file, text)?;
    let path = file.to_string_lossy();
    let dry = cup_ok(config, &["machine", "apply", "--dry-run", &path])?;
    ensure!(
        dry.contains("would change: hostname"),
        "machine apply --dry-run: {dry}"
    );
    let done = cup_ok(config, &["machine", "apply", &path])?;
    ensure!(done.contains("changed: hostname"), "machine apply: {done}");
    g.wait_for("hostname quick-start", STEP)?;
    let shown = cup_ok(config, &["machine", "show"])?;
    ensure!(
        shown.contains("quick-start"),
        "machine show after apply: {shown}"
    );
    Ok(())
}
