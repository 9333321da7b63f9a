//! A Prometheus server on this machine scraping an appliance's metrics,
//! and promtool checking a scrape: Debian's `prometheus` package, run
//! with a config, a port and a storage directory of its own.

use anyhow::{bail, ensure, Context, Result};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running Prometheus, stopped (and its data removed) on drop.
#[derive(Debug)]
pub struct Prometheus {
    child: Child,
    dir: PathBuf,
    pub port: u16,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `GET path` from `addr` (`HOST:PORT`) over HTTP/1.0: the status line's
/// code, the headers, the body.
pub fn http_get(addr: &str, path: &str) -> Result<(u16, String, String)> {
    let mut c = std::net::TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    c.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(c, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut out = String::new();
    c.read_to_string(&mut out)?;
    let (head, body) = out
        .split_once("\r\n\r\n")
        .with_context(|| format!("GET {addr}{path}: no end of headers in {out:?}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("GET {addr}{path}: no status in {head:?}"))?;
    Ok((code, head.to_string(), body.to_string()))
}

/// `promtool check metrics` on `text`: what it said when it found
/// something wrong.
pub fn promtool_check(text: &str) -> Result<()> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run promtool (Debian package prometheus)")?;
    child
        .stdin
        .take()
        .context("promtool's stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

impl Prometheus {
    /// Starts Prometheus scraping `target` (`HOST:PORT`, path /metrics)
    /// every `every`, as job `steelcup`; returns once it answers.
    pub fn start(target: &str, every: Duration) -> Result<Prometheus> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir = std::env::temp_dir().join(format!("steelcup-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let conf = dir.join("prometheus.yml");
        let secs = every.as_secs().max(1);
        std::fs::write(
            &conf,
            format!(
                "global:\n  scrape_interval: {secs}s\n  scrape_timeout: {secs}s\n\
                 scrape_configs:\n  - job_name: steelcup\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )?;
        let mut child = Command::new("prometheus")
            .arg(format!("--config.file={}", conf.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(dir.join("prometheus.log"))
                    .map(Stdio::from)
                    .unwrap_or(Stdio::null()),
            )
            .spawn()
            .context("start prometheus (Debian package prometheus)")?;
        let addr = format!("127.0.0.1:{port}");
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(60) {
            if matches!(http_get(&addr, "/-/ready"), Ok((200, _, _))) {
                return Ok(Prometheus { child, dir, port });
            }
            if let Ok(Some(status)) = child.try_wait() {
                bail!(
                    "prometheus exited: {status}: {}",
                    std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        let _ = child.kill();
        bail!("prometheus did not get ready on {addr}")
    }

    /// An instant query's result: each series' labels (as JSON text) and
    /// its value.
    pub fn query(&self, promql: &str) -> Result<Vec<(String, f64)>> {
        let encoded: String = promql
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let (code, _, body) = http_get(
            &format!("127.0.0.1:{}", self.port),
            &format!("/api/v1/query?query={encoded}"),
        )?;
        ensure!(code == 200, "query {promql}: HTTP {code}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body)?;
        let result = v["data"]["result"]
            .as_array()
            .with_context(|| format!("query {promql}: {body}"))?;
        Ok(result
            .iter()
            .filter_map(|r| {
                let value = r["value"][1].as_str()?.parse().ok()?;
                Some((r["metric"].to_string(), value))
            })
            .collect())
    }

    /// Waits until `promql` has a series whose value `ok` accepts.
    pub fn wait_for(
        &self,
        promql: &str,
        within: Duration,
        ok: impl Fn(f64) -> bool,
    ) -> Result<Vec<(String, f64)>> {
        let t = Instant::now();
        loop {
            let got = self.query(promql)?;
            if got.iter().any(|(_, v)| ok(*v)) {
                return Ok(got);
            }
            ensure!(
                t.elapsed() < within,
                "Prometheus: {promql} is {got:?} after {within:?}: {}",
                std::fs::read_to_string(self.dir.join("prometheus.log"))
                    .unwrap_or_default()
                    .lines()
                    .rev()
                    .take(5)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}
