//! `cup stats`: CPU, memory, network and disk I/O of each running microVM,
//! as `docker stats` shows a container's. vmmd answers with counters
//! (totals since each VM's worker started); cup takes two readings a
//! second apart and shows the CPU rate between them and the totals.

use crate::cli::StatsArgs;
use crate::error::CupError;
use crate::view;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use steelcup_api::vmm1::{VmStats, Vmm1ClientProxy};

/// Between two readings.
const PERIOD: Duration = Duration::from_secs(1);

pub fn stats(p: &Vmm1ClientProxy<'static>, a: &StatsArgs) -> Result<u8, CupError> {
    let format = view::Format::parse(a.format.as_deref());
    if let view::Format::Template { text, .. } = &format {
        view::Template::parse(text)?;
    }
    let read = || -> Result<(Vec<VmStats>, Instant), CupError> {
        let mut s = p.stats()?;
        s.retain(|v| a.names.is_empty() || a.names.contains(&v.name));
        Ok((s, Instant::now()))
    };
    let (mut before, mut at) = read()?;
    for n in &a.names {
        if !before.iter().any(|s| s.name == *n) {
            return Err(CupError::Workload {
                name: n.clone(),
                why: "is not running (or not a workload)".into(),
            });
        }
    }
    loop {
        std::thread::sleep(PERIOD);
        let (now, t) = read()?;
        let rows = rows(&before, &now, t.duration_since(at));
        if !a.no_stream {
            // Each screen replaces the last, as docker stats draws it.
            print!("\x1b[2J\x1b[H");
        }
        view::print_rows(&rows, &format, table)?;
        if a.no_stream {
            return Ok(0);
        }
        (before, at) = (now, t);
    }
}

/// The rows of `after`, with CPU % from the time each VM's worker used
/// since `before` over `wall` (100% = one CPU's worth, as Docker's).
fn rows(before: &[VmStats], after: &[VmStats], wall: Duration) -> Vec<Value> {
    let wall_us = wall.as_micros().max(1) as f64;
    after
        .iter()
        .map(|s| {
            let used = before
                .iter()
                .find(|b| b.name == s.name)
                .map_or(0, |b| s.cpu_usec.saturating_sub(b.cpu_usec));
            let cpu = used as f64 * 100.0 / wall_us;
            let mem = if s.memory_limit > 0 {
                s.memory_bytes as f64 * 100.0 / s.memory_limit as f64
            } else {
                0.0
            };
            json!({
                "Name": s.name,
                "Container": s.name,
                "ID": s.name,
                "CPUPerc": format!("{cpu:.2}%"),
                "MemUsage": format!("{} / {}", binary(s.memory_bytes), binary(s.memory_limit)),
                "MemPerc": format!("{mem:.2}%"),
                "NetIO": format!("{} / {}", decimal(s.net_rx), decimal(s.net_tx)),
                "BlockIO": format!("{} / {}", decimal(s.block_read), decimal(s.block_write)),
                "PIDs": s.pids.to_string(),
            })
        })
        .collect()
}

fn table(rows: &[Value]) {
    println!(
        "{:<20} {:>8} {:>22} {:>7} {:>20} {:>20} {:>5}",
        "NAME", "CPU %", "MEM USAGE / LIMIT", "MEM %", "NET I/O", "BLOCK I/O", "PIDS"
    );
    for r in rows {
        let f = |k: &str| r[k].as_str().unwrap_or_default().to_string();
        println!(
            "{:<20} {:>8} {:>22} {:>7} {:>20} {:>20} {:>5}",
            f("Name"),
            f("CPUPerc"),
            f("MemUsage"),
            f("MemPerc"),
            f("NetIO"),
            f("BlockIO"),
            f("PIDs")
        );
    }
}

/// Memory as Docker shows it: powers of 1024 (`1.5MiB`).
fn binary(n: u64) -> String {
    scaled(n, 1024.0, &["B", "KiB", "MiB", "GiB", "TiB"])
}

/// Network and disk bytes as Docker shows them: powers of 1000 (`1.2MB`).
fn decimal(n: u64) -> String {
    scaled(n, 1000.0, &["B", "kB", "MB", "GB", "TB"])
}

fn scaled(n: u64, base: f64, units: &[&str]) -> String {
    let mut v = n as f64;
    let mut i = 0;
    while v >= base && i + 1 < units.len() {
        v /= base;
        i += 1;
    }
    if i == 0 {
        format!("{n}{}", units[0])
    } else {
        // Three significant digits, as Go's %.3g that Docker uses.
        let digits = if v >= 100.0 {
            0
        } else if v >= 10.0 {
            1
        } else {
            2
        };
        let s = format!("{v:.digits$}");
        let s = if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        };
        format!("{s}{}", units[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_as_docker_prints_them() {
        assert_eq!(binary(512), "512B");
        assert_eq!(binary(3 << 19), "1.5MiB");
        assert_eq!(binary(192 << 20), "192MiB");
        assert_eq!(decimal(648), "648B");
        assert_eq!(decimal(1_230), "1.23kB");
        assert_eq!(decimal(104_857_600), "105MB");
        assert_eq!(decimal(12_500_000_000), "12.5GB");
    }

    #[test]
    fn cpu_is_the_rate_between_readings() {
        let s = |name: &str, cpu_usec| VmStats {
            name: name.into(),
            cpu_usec,
            memory_bytes: 64 << 20,
            memory_limit: 256 << 20,
            pids: 9,
            net_rx: 1_230,
            net_tx: 648,
            block_read: 0,
            block_write: 104_857_600,
            ..VmStats::default()
        };
        let before = [s("busy", 1_000_000), s("idle", 5_000)];
        let after = [s("busy", 1_980_000), s("idle", 5_000), s("new", 40_000)];
        let r = rows(&before, &after, Duration::from_secs(1));
        assert_eq!(r[0]["CPUPerc"], "98.00%");
        assert_eq!(r[1]["CPUPerc"], "0.00%");
        assert_eq!(r[2]["CPUPerc"], "0.00%", "no earlier reading: no rate");
        assert_eq!(r[0]["MemUsage"], "64MiB / 256MiB");
        assert_eq!(r[0]["MemPerc"], "25.00%");
        assert_eq!(r[0]["NetIO"], "1.23kB / 648B");
        assert_eq!(r[0]["BlockIO"], "0B / 105MB");
        assert_eq!(r[0]["PIDs"], "9");
    }
}
