//! `vmmd bench-start IMAGE [CMD...]`: how fast `cup run --rm IMAGE true`
//! (or CMD) is, cold
//! and from the warm pool, and how many cold VMs a second vmmd starts, on
//! the running host (inside the booted appliance, through the real daemon
//! and CLI).
//!
//! # Method
//! Each round times the whole `cup run --rm IMAGE true` from spawning `cup`
//! to its exit (the workload ran, reported exit code 0, and was removed):
//! - *warm*: the default size (1 vCPU, 128 MiB), started once vmmd's log
//!   says a pool VM is ready; the round counts only if vmmd's log then says
//!   the workload started from the warm pool;
//! - *cold*: `--memory 120MiB`, a size the pool does not keep, so vmmd
//!   boots a VM for it (the same kernel and image; 8 MiB less guest memory
//!   changes nothing the guest touches while booting).
//!
//! Rounds alternate cold and warm, each started once the pool is full
//! again, so no pool VM boots beside the run being timed. Then `--parallel` cold runs are started
//! at once and the VMs per second are their count over the time until the
//! last exits. Results are printed as lines starting `start-bench| ` (a
//! Markdown table), which `cargo xtask bench` copies into
//! `docs/performance.md`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PREFIX: &str = "start-bench| ";

fn cup() -> Command {
    let mut c = Command::new(std::env::var("CUP").unwrap_or_else(|_| "/usr/bin/cup".into()));
    c.stdin(Stdio::null()).stdout(Stdio::null());
    c
}

/// vmmd's log lines that contain `needle`.
fn log_count(needle: &str) -> usize {
    log_count_all(&[needle])
}

/// vmmd's log lines that contain every one of `needles`.
fn log_count_all(needles: &[&str]) -> usize {
    let out = cup()
        .args(["logs", "--unit", "vmmd", "-n", "100000"])
        .stdout(Stdio::piped())
        .output();
    match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .count(),
        Err(_) => 0,
    }
}

/// Warm VMs that came up minus those taken.
fn warm_ready() -> isize {
    log_count_all(&["warm pool: _pool-", " ready ("]) as isize
        - log_count("started from the warm pool") as isize
}

/// One `cup run --rm`; its wall time, or why it failed.
fn run_once(image: &[String], extra: &[&str]) -> Result<Duration, String> {
    let t0 = Instant::now();
    let status = cup()
        .args(["run", "--rm"])
        .args(extra)
        .args(image)
        .status()
        .map_err(|e| format!("cup: {e}"))?;
    let took = t0.elapsed();
    if !status.success() {
        return Err(format!("cup run exited {status}"));
    }
    Ok(took)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The Markdown table and summary lines for these measurements (ms).
pub fn report(cold: &[f64], warm: &[f64], parallel: usize, parallel_s: f64) -> Vec<String> {
    let row = |name: &str, v: &[f64]| {
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(0.0, f64::max);
        format!(
            "| {name} | {:.0} | {min:.0} | {max:.0} | {} |",
            median(v.to_vec()),
            v.len()
        )
    };
    let ratio = median(warm.to_vec()) / median(cold.to_vec());
    let met = if ratio <= 0.25 { "met" } else { "not met" };
    vec![
        "| `cup run --rm IMAGE true` | median ms | min | max | rounds |".into(),
        "|---|---|---|---|---|".into(),
        row("cold (a VM booted for it)", cold),
        row("warm (a VM from the pool)", warm),
        format!("| **warm / cold** | **{ratio:.2}×** | | | |"),
        format!(
            "rounds: cold [{}] warm [{}]",
            cold.iter()
                .map(|v| format!("{v:.0}"))
                .collect::<Vec<_>>()
                .join(", "),
            warm.iter()
                .map(|v| format!("{v:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        format!(
            "throughput: {parallel} cold starts at once took {parallel_s:.1} s: {:.2} VMs/s",
            parallel as f64 / parallel_s
        ),
        format!("targets: warm at most 0.25x cold: {met} ({ratio:.2}x)"),
    ]
}

pub fn main(args: &[String]) -> i32 {
    let mut rounds = 5usize;
    let mut parallel = 4usize;
    let mut image: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--rounds" if image.is_empty() => {
                rounds = it.next().and_then(|v| v.parse().ok()).unwrap_or(0)
            }
            "--parallel" if image.is_empty() => {
                parallel = it.next().and_then(|v| v.parse().ok()).unwrap_or(0)
            }
            other if !other.starts_with('-') || !image.is_empty() => image.push(other.to_string()),
            other => {
                eprintln!("vmmd bench-start: unknown argument {other:?}; usage: vmmd bench-start [--rounds N] [--parallel N] IMAGE [CMD...]");
                return 2;
            }
        }
    }
    if image.is_empty() || rounds == 0 || parallel == 0 {
        eprintln!(
            "usage: vmmd bench-start [--rounds N] [--parallel N] IMAGE [CMD...] (N at least 1)"
        );
        return 2;
    }
    if image.len() == 1 {
        image.push("true".into());
    }
    // The image is pulled once, before anything is timed.
    if let Err(e) = run_once(&image, &["--memory", "120MiB"]) {
        eprintln!(
            "vmmd bench-start: a first run of {} failed: {e}",
            image.join(" ")
        );
        return 1;
    }
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    let wait_ready = || {
        let t0 = Instant::now();
        while warm_ready() < 1 && t0.elapsed() < Duration::from_secs(300) {
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    for round in 1..=rounds {
        // Nothing boots beside a cold round: the pool has refilled.
        wait_ready();
        match run_once(&image, &["--memory", "120MiB"]) {
            Ok(t) => cold.push(t.as_secs_f64() * 1e3),
            Err(e) => eprintln!("vmmd bench-start: cold round {round}: {e}"),
        }
        wait_ready();
        let claimed = log_count("started from the warm pool");
        match run_once(&image, &[]) {
            Ok(t) if log_count("started from the warm pool") > claimed => {
                warm.push(t.as_secs_f64() * 1e3)
            }
            Ok(_) => {
                eprintln!("vmmd bench-start: warm round {round} found no warm VM; not counted")
            }
            Err(e) => eprintln!("vmmd bench-start: warm round {round}: {e}"),
        }
    }
    let t0 = Instant::now();
    let children: Vec<_> = (0..parallel)
        .filter_map(|_| {
            cup()
                .args(["run", "--rm", "--memory", "120MiB"])
                .args(&image)
                .spawn()
                .ok()
        })
        .collect();
    let started = children.len();
    let ok = children
        .into_iter()
        .filter_map(|mut c| c.wait().ok())
        .filter(|s| s.success())
        .count();
    let parallel_s = t0.elapsed().as_secs_f64();
    if cold.is_empty() || warm.is_empty() || ok != parallel || started != parallel {
        eprintln!(
            "vmmd bench-start: not enough runs: {} cold, {} warm, {ok} of {parallel} at once",
            cold.len(),
            warm.len()
        );
        return 1;
    }
    for l in report(&cold, &warm, parallel, parallel_s) {
        println!("{PREFIX}{l}");
    }
    println!("start-bench: done");
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_has_medians_the_ratio_and_the_verdict() {
        let lines = report(&[400.0, 600.0, 500.0], &[100.0, 50.0], 4, 2.0);
        assert_eq!(
            lines[2],
            "| cold (a VM booted for it) | 500 | 400 | 600 | 3 |"
        );
        assert_eq!(
            lines[3],
            "| warm (a VM from the pool) | 75 | 50 | 100 | 2 |"
        );
        assert_eq!(lines[4], "| **warm / cold** | **0.15×** | | | |");
        assert!(lines[6].ends_with("2.00 VMs/s"), "{}", lines[6]);
        assert!(lines[7].contains(": met (0.15x)"), "{}", lines[7]);
        let slow = report(&[100.0], &[50.0], 1, 1.0);
        assert!(slow[7].contains("not met"), "{}", slow[7]);
    }
}
