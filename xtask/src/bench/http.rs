//! The HTTP benchmark: the test image plus wrk, Debian's nginx OCI image
//! and the same nginx for the host, booted with `steelcup.bench=http`,
//! where the `bench-http` unit (qemu-tests/bench/http-bench.sh) runs wrk
//! against nginx in a microVM through a published port and against nginx on
//! the appliance itself, in the same boot. The result lands in
//! `docs/performance.md`.

use crate::sh::{self, step};
use anyhow::{bail, Context, Result};
use qemu_tests::{Boot, GuestConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Where the nginx image's layout is in the bench image (`oci:` of it is
/// what the script runs).
const IMAGE_DIR: &str = "usr/lib/steelcup/bench/nginx";

/// `program` (a file of the build machine, shipped at `at`) and the shared
/// libraries `ldd` says it loads, each as (path in the image, the file
/// behind any symlink).
pub fn with_libraries(program: &Path, at: &str) -> Result<Vec<(String, PathBuf)>> {
    let mut files = Vec::new();
    for f in image_build::program_files(program)? {
        let real = std::fs::canonicalize(&f).with_context(|| format!("resolve {}", f.display()))?;
        let path = if f == program {
            at.to_string()
        } else {
            f.to_string_lossy().into_owned()
        };
        files.push((path, real));
    }
    Ok(files)
}

/// The nginx image's only layer (a gzip tar) in its OCI layout.
fn layer(layout: &Path) -> Result<PathBuf> {
    let json = |p: PathBuf| -> Result<serde_json::Value> {
        serde_json::from_slice(&std::fs::read(&p).with_context(|| format!("read {}", p.display()))?)
            .with_context(|| format!("parse {}", p.display()))
    };
    let blob = |d: &serde_json::Value| -> Result<PathBuf> {
        let d = d.as_str().context("a digest that is not a string")?;
        let hex = d
            .strip_prefix("sha256:")
            .context("a digest that is not sha256")?;
        Ok(layout.join("blobs/sha256").join(hex))
    };
    let index = json(layout.join("index.json"))?;
    let manifest = json(blob(&index["manifests"][0]["digest"])?)?;
    let layers = manifest["layers"]
        .as_array()
        .context("manifest without layers")?;
    if layers.len() != 1 {
        bail!("the nginx image has {} layers, not one", layers.len());
    }
    blob(&layers[0]["digest"])
}

/// What the bench image carries besides the test image: wrk, the nginx
/// image's layout, and from that image's layer the nginx binary (with the
/// build machine's libraries, the same Debian release), its config and
/// its site.
fn files(nginx_image: &str) -> Result<Vec<(String, PathBuf)>> {
    let layout = PathBuf::from(nginx_image.rsplit_once(':').map_or(nginx_image, |(l, _)| l));
    let mut files = with_libraries(Path::new("/usr/bin/wrk"), "/usr/bin/wrk")?;
    for e in walkdir(&layout)? {
        let rel = e.strip_prefix(&layout)?.to_string_lossy().into_owned();
        files.push((format!("{IMAGE_DIR}/{rel}"), e));
    }
    let host = sh::cache_dir().join("debian-bookworm-nginx-oci/host");
    let layer = layer(&layout)?;
    let stamp = host.join(".layer");
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(layer.to_string_lossy().as_ref()) {
        let _ = std::fs::remove_dir_all(&host);
        std::fs::create_dir_all(&host)?;
        sh::run(
            Command::new("tar")
                .arg("-xzf")
                .arg(&layer)
                .arg("-C")
                .arg(&host)
                .args(["usr/sbin/nginx", "etc/nginx", "var/www/html"]),
        )?;
        std::fs::write(&stamp, layer.to_string_lossy().as_bytes())?;
    }
    files.extend(with_libraries(
        &host.join("usr/sbin/nginx"),
        "/usr/sbin/nginx",
    )?);
    for dir in ["etc/nginx", "var/www/html"] {
        for e in walkdir(&host.join(dir))? {
            let rel = e.strip_prefix(&host)?.to_string_lossy().into_owned();
            // sites-enabled/default links to /etc/nginx/sites-available/default:
            // absolute, so resolved inside the extracted tree.
            let src = match std::fs::read_link(&e) {
                Ok(t) if t.is_absolute() => host.join(t.strip_prefix("/")?),
                _ => e.clone(),
            };
            // modules-enabled links into /usr/share/nginx (dynamic modules
            // the page does not need), which is not extracted: left out.
            if !src.exists() {
                continue;
            }
            files.push((rel, src));
        }
    }
    files.push((
        "usr/lib/steelcup/bench/http-bench.sh".into(),
        sh::root().join("qemu-tests/bench/http-bench.sh"),
    ));
    Ok(files)
}

/// The regular files and symlinks under `dir`, sorted.
fn walkdir(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("read {}", d.display()))? {
            let e = e?;
            let t = e.file_type()?;
            if t.is_dir() {
                todo.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// One wrk run's numbers.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Wrk {
    pub requests_per_sec: f64,
    /// Latency percentiles in ms: 50, 75, 90, 99.
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub errors: u64,
}

/// A wrk duration ("812.00us", "1.20ms", "2.01s") in ms.
fn ms(s: &str) -> Option<f64> {
    let (n, unit) = s
        .find(|c: char| c.is_ascii_alphabetic())
        .map(|i| s.split_at(i))?;
    let n: f64 = n.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => return None,
    })
}

/// The numbers in one wrk `--latency` report.
pub fn parse_wrk(lines: &[&str]) -> Result<Wrk> {
    let mut w = Wrk::default();
    let mut seen = false;
    for l in lines {
        let f: Vec<&str> = l.split_whitespace().collect();
        match f.as_slice() {
            ["Requests/sec:", n] => {
                w.requests_per_sec = n.parse().context("Requests/sec")?;
                seen = true;
            }
            ["50%", t] => w.p50 = ms(t).context("50%")?,
            ["90%", t] => w.p90 = ms(t).context("90%")?,
            ["99%", t] => w.p99 = ms(t).context("99%")?,
            // "Socket errors: connect 0, read 0, write 0, timeout 3" and
            // "Non-2xx or 3xx responses: 5".
            ["Socket", "errors:", rest @ ..] => {
                w.errors += rest
                    .iter()
                    .filter_map(|x| x.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>()
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => w.errors += n.parse::<u64>().unwrap_or(0),
            _ => {}
        }
    }
    if !seen {
        bail!("no Requests/sec in wrk's report: {}", lines.join(" / "));
    }
    Ok(w)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the benchmark; returns the Markdown section for performance.md.
pub fn run() -> Result<String> {
    crate::deps::ensure_packages(&["wrk"])?;
    step("HTTP: nginx in a microVM through a published port, beside nginx on the appliance");
    let nginx = crate::bench::image::nginx_image()?;
    let dir = crate::bench::vmm::build_image("bench-http-artifacts", files(&nginx)?)?;
    let mut cfg = GuestConfig::direct("bench-http", &dir)?;
    cfg.memory_mib = 3072;
    if let Boot::Direct { cmdline, .. } = &mut cfg.boot {
        cmdline.push_str(" steelcup.bench=http");
    }
    let serial =
        crate::bench::vmm::boot_until(&cfg, &[("http-bench: done", Duration::from_secs(1500))])?;
    let log = sh::out_dir().join("qemu-logs/bench-http.log");
    section(&serial).with_context(|| format!("see {}", log.display()))
}

/// The report from the script's lines in the serial console.
fn section(serial: &str) -> Result<String> {
    let lines: Vec<&str> = serial
        .lines()
        .filter_map(|l| l.split_once("http-bench| ").map(|(_, t)| t.trim_end()))
        .collect();
    if let Some(e) = lines.iter().find_map(|l| l.strip_prefix("error: ")) {
        bail!("the HTTP benchmark failed: {e}");
    }
    let setup = lines
        .iter()
        .find_map(|l| l.strip_prefix("setup: "))
        .unwrap_or("");
    // "round N microvm: <wrk line>" grouped by (round, where).
    let mut runs: BTreeMap<(u32, String), Vec<&str>> = BTreeMap::new();
    for l in &lines {
        let Some(rest) = l.strip_prefix("round ") else {
            continue;
        };
        let Some((head, line)) = rest.split_once(": ") else {
            continue;
        };
        let Some((n, who)) = head.split_once(' ') else {
            continue;
        };
        runs.entry((n.parse()?, who.to_string()))
            .or_default()
            .push(line);
    }
    let mut by: BTreeMap<String, Vec<Wrk>> = BTreeMap::new();
    for ((_, who), l) in &runs {
        by.entry(who.clone()).or_default().push(parse_wrk(l)?);
    }
    let (Some(vm), Some(host)) = (by.get("microvm"), by.get("host")) else {
        bail!("the HTTP benchmark printed no wrk reports for both nginx");
    };
    Ok(report(setup, vm, host))
}

fn report(setup: &str, vm: &[Wrk], host: &[Wrk]) -> String {
    let m = |v: &[Wrk], f: fn(&Wrk) -> f64| median(v.iter().map(f).collect());
    let row = |name: &str, v: &[Wrk]| {
        format!(
            "| {name} | {:.0} | {:.2} | {:.2} | {:.2} | {} |\n",
            m(v, |w| w.requests_per_sec),
            m(v, |w| w.p50),
            m(v, |w| w.p90),
            m(v, |w| w.p99),
            v.iter().map(|w| w.errors).sum::<u64>()
        )
    };
    let ratio = m(vm, |w| w.requests_per_sec) / m(host, |w| w.requests_per_sec);
    let lat = m(vm, |w| w.p50) / m(host, |w| w.p50);
    let rounds = |v: &[Wrk]| {
        v.iter()
            .map(|w| format!("{:.0}", w.requests_per_sec))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut md = String::from("## HTTP: nginx in a microVM beside nginx on the host\n\n");
    md.push_str(HTTP_METHOD);
    md.push_str(&format!("\nThis run: {setup}.\n\n"));
    md.push_str("| nginx (Debian 12, 1 worker) | requests/s (median) | p50 ms | p90 ms | p99 ms | errors |\n|---|---|---|---|---|---|\n");
    md.push_str(&row("in a microVM, through published port 8080", vm));
    md.push_str(&row("on the host, port 80", host));
    md.push_str(&format!(
        "| **microVM / host** | **{ratio:.2}×** | **{lat:.2}×** | | | |\n\nRounds (requests/s): microVM {}; host {}.\n\n",
        rounds(vm),
        rounds(host)
    ));
    md.push_str(HTTP_READING);
    md
}

const HTTP_METHOD: &str = "Run inside the booted test image (QEMU TCG with an emulated AMD-V CPU, the microVM on real, nested KVM) by `qemu-tests/bench/http-bench.sh` with `steelcup.bench=http`. The server is Debian 12's `nginx-light` in an OCI image made with debootstrap (the one the QEMU network test serves from a registry), run by `cup run -d --cpus 1 -p 8080:80 oci:…` with the image's own command and config (`worker_processes auto`: one worker on one vCPU). Its peer is the same nginx binary, config and page taken from that image's layer and run directly on the appliance (the build machine's Debian 12 libraries; `worker_processes 1`). Load: Debian's `wrk` on the appliance, to `127.0.0.1:8080` (the published port: nftables DNAT to the VM's address over the bridge and its tap, virtio-net on vhost-net with offloads) and to `127.0.0.1:80`, alternating rounds, the default page (615 bytes), keep-alive connections. Medians over the rounds.\n";

const HTTP_READING: &str = "Reading it: on the host, a request is a loopback round trip into nginx. Through the published port it is also DNAT and conntrack on the host, the bridge and the tap, the host kernel's vhost-net thread moving each frame between the tap and the guest's queues, an interrupt into the guest and its own TCP stack, and back. Under TCG every one of those instructions is emulated (the guest's twice over, nested), and the VM's one vCPU competes with wrk and the vhost-net thread for the two emulated CPUs, so the absolute numbers are far below hardware and the ratio is the comparison.\n\n";

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 15s test @ http://127.0.0.1:8080/
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    10.12ms    2.01ms  30.00ms   80.00%
    Req/Sec     1.58k   100.00     1.80k    70.00%
  Latency Distribution
     50%  812.00us
     75%   10.50ms
     90%   12.00ms
     99%    1.20s
  31600 requests in 15.00s, 25.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 3
Requests/sec:   2106.67
Transfer/sec:      1.67MB";

    #[test]
    fn a_wrk_report_gives_rate_percentiles_and_errors() {
        let lines: Vec<&str> = WRK.lines().collect();
        let w = parse_wrk(&lines).unwrap();
        assert_eq!(w.requests_per_sec, 2106.67);
        assert_eq!(w.p50, 0.812);
        assert_eq!(w.p90, 12.0);
        assert_eq!(w.p99, 1200.0);
        assert_eq!(w.errors, 5);
    }

    #[test]
    fn a_report_without_a_rate_is_an_error() {
        let e = parse_wrk(&["unable to connect to 127.0.0.1:8080 Connection refused"]).unwrap_err();
        assert!(e.to_string().contains("Connection refused"), "{e}");
    }

    #[test]
    fn the_section_pairs_rounds_and_gives_the_ratio() {
        let mut serial = String::from("[bench-http] http-bench| setup: wrk -t1 -c16\n");
        for (r, vm, host) in [
            (1, "1000.00", "4000.00"),
            (2, "1200.00", "4400.00"),
            (3, "900.00", "3900.00"),
        ] {
            for (who, rate) in [("microvm", vm), ("host", host)] {
                for l in WRK.lines() {
                    let l = if l.starts_with("Requests/sec") {
                        format!("Requests/sec: {rate}")
                    } else {
                        l.to_string()
                    };
                    serial.push_str(&format!("[bench-http] http-bench| round {r} {who}: {l}\n"));
                }
            }
        }
        let md = section(&serial).unwrap();
        assert!(
            md.contains("| in a microVM, through published port 8080 | 1000 |"),
            "{md}"
        );
        assert!(md.contains("| on the host, port 80 | 4000 |"), "{md}");
        assert!(md.contains("**0.25×**"), "{md}");
        assert!(
            md.contains("microVM 1000, 1200, 900; host 4000, 4400, 3900"),
            "{md}"
        );
    }

    #[test]
    fn a_failed_run_says_why() {
        let e =
            section("http-bench| error: nginx in the microVM never served on 8080\n").unwrap_err();
        assert!(e.to_string().contains("never served"), "{e}");
    }
}
