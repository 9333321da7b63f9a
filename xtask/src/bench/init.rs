//! init's benchmark: 100 trivial services, from exec of the supervisor to
//! every service running, and the supervisor's memory — side by side with
//! Debian's runit (runsvdir + one runsv per service) on the same services in
//! the same run.
//!
//! Method: each service is `/bin/sh -c 'echo > MARK/NAME; exec sleep N'`;
//! "all started" is when all 100 marker files exist (polled every 0.2 ms),
//! measured from just before the supervisor's exec. Memory is read from
//! /proc after all started: init's own, and runsvdir's plus all its runsv
//! processes, as RSS and as PSS (`smaps_rollup`: a page shared by N
//! processes counts 1/N in each, so the 100 runsv's shared libc is counted
//! once, not 100 times). Five rounds each, alternating; medians reported.

use anyhow::{bail, Context, Result};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const UNITS: usize = 100;
const ROUNDS: usize = 5;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Proportional set size: each page divided among the processes that
/// map it.
fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Processes whose command line contains `needle`.
fn pids_matching(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) {
            out.push(pid);
        }
    }
    out
}

fn kill_all(needle: &str) {
    for pid in pids_matching(needle) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

fn wait_marks(mark: &Path, child: &mut Child) -> Result<Duration> {
    let t0 = Instant::now();
    loop {
        if std::fs::read_dir(mark)?.count() >= UNITS {
            return Ok(t0.elapsed());
        }
        if let Some(st) = child.try_wait()? {
            bail!("supervisor exited early: {st}");
        }
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("not all {UNITS} services started within 30s");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

struct Round {
    start_ms: f64,
    rss_kib: u64,
    pss_kib: u64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs the benchmark with the static `init` at `init_bin`; returns markdown.
pub fn run(init_bin: &Path) -> Result<String> {
    crate::deps::ensure_packages(&["runit"])?;
    let dir = std::env::temp_dir().join(format!("steelcup-bench-init-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (units, sv, mark) = (dir.join("units"), dir.join("sv"), dir.join("mark"));
    for d in [&units, &sv, &mark] {
        std::fs::create_dir_all(d)?;
    }
    for i in 0..UNITS {
        let name = format!("u{i:03}");
        let script = format!("echo > {}/{name}; exec sleep 1001", mark.display());
        std::fs::write(
            units.join(format!("{name}.toml")),
            format!("[service]\nexec = [\"/bin/sh\", \"-c\", {script:?}]\n"),
        )?;
        let svdir = sv.join(&name);
        std::fs::create_dir_all(&svdir)?;
        let run = svdir.join("run");
        std::fs::write(
            &run,
            format!(
                "#!/bin/sh\necho > {}/{name}\nexec sleep 1002\n",
                mark.display()
            ),
        )?;
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755))?;
    }
    let runsvdir = ["/usr/bin/runsvdir", "/usr/sbin/runsvdir", "/sbin/runsvdir"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .context("runsvdir not found after installing runit")?;
    let clear = |mark: &Path| -> Result<()> {
        for e in std::fs::read_dir(mark)? {
            std::fs::remove_file(e?.path())?;
        }
        Ok(())
    };
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        eprintln!("  init benchmark: round {}/{ROUNDS}", round + 1);
        // steelcup init as a supervisor.
        clear(&mark)?;
        let _ = std::fs::remove_dir_all(dir.join("run"));
        let t0 = Instant::now();
        let mut child = Command::new(init_bin)
            .arg("--units")
            .arg(&units)
            .arg("--run-dir")
            .arg(dir.join("run"))
            .arg("--log-dir")
            .arg(dir.join("logs"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start init")?;
        let pre = t0.elapsed();
        let t = wait_marks(&mark, &mut child)? + pre;
        std::thread::sleep(Duration::from_millis(300));
        ours.push(Round {
            start_ms: t.as_secs_f64() * 1000.0,
            rss_kib: rss_kib(child.id()),
            pss_kib: pss_kib(child.id()),
        });
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = child.wait();
        kill_all("sleep 1001");

        // runit.
        clear(&mark)?;
        for e in std::fs::read_dir(&sv)? {
            let _ = std::fs::remove_dir_all(e?.path().join("supervise"));
        }
        let t0 = Instant::now();
        let mut child = Command::new(&runsvdir)
            .arg(&sv)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start runsvdir")?;
        let pre = t0.elapsed();
        let t = wait_marks(&mark, &mut child)? + pre;
        std::thread::sleep(Duration::from_millis(300));
        let runsvs = pids_matching("runsv u");
        let runsv: u64 = runsvs.iter().copied().map(rss_kib).sum();
        let runsv_pss: u64 = runsvs.iter().copied().map(pss_kib).sum();
        theirs.push(Round {
            start_ms: t.as_secs_f64() * 1000.0,
            rss_kib: rss_kib(child.id()) + runsv,
            pss_kib: pss_kib(child.id()) + runsv_pss,
        });
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGHUP,
        );
        let _ = child.wait();
        kill_all("runsv u");
        kill_all("sleep 1002");
    }
    let _ = std::fs::remove_dir_all(&dir);
    let ms_ours = median(ours.iter().map(|r| r.start_ms).collect());
    let ms_theirs = median(theirs.iter().map(|r| r.start_ms).collect());
    let rss_ours = median(ours.iter().map(|r| r.rss_kib as f64).collect());
    let rss_theirs = median(theirs.iter().map(|r| r.rss_kib as f64).collect());
    let pss_ours = median(ours.iter().map(|r| r.pss_kib as f64).collect());
    let pss_theirs = median(theirs.iter().map(|r| r.pss_kib as f64).collect());
    let mut md = String::from("## init: 100 services\n\n");
    md.push_str("Each service is `sh -c 'echo > MARK; exec sleep N'`; \"all started\" is when all 100 marker files exist, from just before the supervisor's exec (so it includes reading and ordering the unit files). Memory after all started: init's own; for runit, runsvdir plus its 100 runsv processes. RSS counts a shared page in every process that maps it, so runit's summed RSS overstates it (its 100 runsv share libc); PSS divides each page among the processes that map it, which is the fair sum and the comparison to read. Median of 5 rounds on this machine (2 cores: the 100 shells compete with the supervisor for CPU). Targets: under 50 ms and under 5 MiB.\n\n");
    md.push_str("| supervisor | exec → all 100 started | PSS | RSS |\n|---|---|---|---|\n");
    md.push_str(&format!(
        "| steelcup init | {ms_ours:.1} ms | {:.1} MiB | {:.1} MiB |\n",
        pss_ours / 1024.0,
        rss_ours / 1024.0
    ));
    md.push_str(&format!(
        "| runit (runsvdir + runsv) | {ms_theirs:.1} ms | {:.1} MiB | {:.1} MiB |\n",
        pss_theirs / 1024.0,
        rss_theirs / 1024.0
    ));
    md.push_str(&format!(
        "| **ratio init / runit** | **{:.2}×** | **{:.2}×** | **{:.2}×** |\n\n",
        ms_ours / ms_theirs,
        pss_ours / pss_theirs,
        rss_ours / rss_theirs
    ));
    md.push_str("Rounds (ms, init / runit): ");
    md.push_str(
        &ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| format!("{:.0}/{:.0}", a.start_ms, b.start_ms))
            .collect::<Vec<_>>()
            .join(", "),
    );
    md.push_str("\n\n");
    Ok(md)
}
