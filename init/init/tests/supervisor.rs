//! init as a supervisor (a child subreaper, outside PID 1), with real
//! processes, driven through its API: the behaviour PID 1 relies on.

#![allow(clippy::unwrap_used)] // tests fail by panicking

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use steelcup_api::init1::{connect, Init1Proxy};

struct Sup {
    child: Child,
    dir: PathBuf,
    out: Arc<Mutex<String>>,
}

impl Sup {
    fn start(test: &str, units: &[(&str, &str)]) -> Sup {
        Self::start_with(test, units, true)
    }

    /// `read_console: false` leaves init's stdout (where unit output is
    /// echoed) a pipe nobody reads, like a console that cannot keep up.
    fn start_with(test: &str, units: &[(&str, &str)], read_console: bool) -> Sup {
        Self::start_ignoring(test, units, read_console, &[])
    }

    /// Starts init with `ignored` signals set to SIG_IGN, as a parent
    /// (nohup, a shell, a container runtime) may hand them over.
    fn start_ignoring(
        test: &str,
        units: &[(&str, &str)],
        read_console: bool,
        ignored: &[i32],
    ) -> Sup {
        let dir = std::env::temp_dir().join(format!("steelcup-it-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("units")).unwrap();
        for (name, text) in units {
            std::fs::write(dir.join("units").join(format!("{name}.toml")), text).unwrap();
        }
        // STEELCUP_TEST_WRAP (e.g. "strace -f -o FILE") runs init under a tool.
        let wrap: Vec<String> = std::env::var("STEELCUP_TEST_WRAP")
            .map(|w| w.split_whitespace().map(String::from).collect())
            .unwrap_or_default();
        let mut cmd = match wrap.split_first() {
            Some((tool, args)) => {
                let mut c = Command::new(tool);
                c.args(args).arg(env!("CARGO_BIN_EXE_init"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_init")),
        };
        let ignored = ignored.to_vec();
        // SAFETY: the closure runs between fork and exec and only calls
        // signal(2), which is async-signal-safe.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                for s in &ignored {
                    libc::signal(*s, libc::SIG_IGN);
                }
                Ok(())
            });
        }
        let mut child = cmd
            .arg("--units")
            .arg(dir.join("units"))
            .arg("--run-dir")
            .arg(dir.join("run"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = Arc::new(Mutex::new(String::new()));
        let mut streams: Vec<Box<dyn Read + Send>> = vec![Box::new(child.stderr.take().unwrap())];
        let stdout = child.stdout.take().unwrap();
        if read_console {
            streams.push(Box::new(stdout));
        } else {
            // Held open, never read: the pipe fills and writes to it block.
            std::mem::forget(stdout);
        }
        for stream in streams {
            let out = out.clone();
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut buf = [0u8; 65536];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let mut o = out.lock().unwrap();
                    // Keep the test's memory bounded when a unit floods.
                    if o.len() < 4 << 20 {
                        o.push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                }
            });
        }
        let s = Sup { child, dir, out };
        s.wait_for("phase units: done", Duration::from_secs(10));
        s
    }

    fn output(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    fn wait_for(&self, needle: &str, timeout: Duration) {
        self.wait_until(needle, timeout, |o| o.contains(needle));
    }

    fn wait_until(&self, what: &str, timeout: Duration, f: impl Fn(&str) -> bool) {
        let t0 = Instant::now();
        while !f(&self.output()) {
            assert!(
                t0.elapsed() < timeout,
                "timed out waiting for {what:?}; output:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn api(&self) -> Init1Proxy<'static> {
        connect(&self.dir.join("run")).unwrap()
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn terminate(mut self) -> String {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGTERM,
        );
        let t0 = Instant::now();
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "init did not exit on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(100));
        self.output()
    }
}

impl Drop for Sup {
    /// SIGTERM first, so init stops its units (each in a process group of
    /// its own, which a SIGKILL of init would leave running); SIGKILL if it
    /// has not exited after 20 s.
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGTERM,
        );
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn service(exec: &str, extra: &str) -> String {
    format!("[service]\nexec = [\"/bin/sh\", \"-c\", {exec:?}]\n{extra}\n")
}

fn with_unit(section: &str, svc: &str) -> String {
    format!("[unit]\n{section}\n{svc}")
}

/// Children of `pid` that are zombies.
fn zombies_of(pid: i32) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let ppid = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .map(|v| v.trim().to_string());
        let zombie = status
            .lines()
            .any(|l| l.starts_with("State:") && l.contains('Z'));
        if zombie && ppid.as_deref() == Some(&pid.to_string()) {
            n += 1;
        }
    }
    n
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn crash_loop_backs_off_then_fails_at_the_start_limit() {
    let s = Sup::start(
        "crash",
        &[(
            "crashy",
            &service("echo boom; exit 1", "restart = \"on-failure\""),
        )],
    );
    let t0 = Instant::now();
    let api = s.api();
    while api.status("crashy").unwrap().state != "failed" {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "never failed:\n{}",
            s.output()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let elapsed = t0.elapsed();
    let u = api.status("crashy").unwrap();
    assert_eq!(u.restarts, 4);
    assert_eq!(u.last_exit, 1);
    assert_eq!(u.reason, "start limit hit");
    // Backoff 0.5 + 1 + 2 + 4 s between the five starts.
    assert!(
        elapsed >= Duration::from_millis(7000),
        "no backoff: failed after {elapsed:?}"
    );
    let out = s.output();
    for step in [
        "restarting in 0.5s",
        "restarting in 1.0s",
        "restarting in 2.0s",
        "restarting in 4.0s",
    ] {
        assert!(out.contains(step), "{step} missing:\n{out}");
    }
    assert!(out.contains("[crashy] boom"));
}

#[test]
fn reaps_ten_thousand_orphans() {
    // Each `(true &)` forks a subshell that forks `true` and exits at once: the
    // `true` is orphaned and re-parented to init, the subreaper.
    let s = Sup::start(
        "orphans",
        &[("forker", &service("i=0; while [ $i -lt 10000 ]; do (true &); i=$((i+1)); done; echo forked; sleep 300", ""))],
    );
    s.wait_for("[forker] forked", Duration::from_secs(120));
    let t0 = Instant::now();
    loop {
        let z = zombies_of(s.pid());
        if z == 0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{z} zombies left under init"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn stops_in_reverse_start_order_and_honours_stop_timeouts() {
    let s = Sup::start(
        "order",
        &[
            ("a", &service("sleep 300", "")),
            (
                "b",
                &with_unit("after = [\"a\"]", &service("sleep 300", "")),
            ),
            (
                "c",
                &with_unit(
                    "after = [\"b\"]",
                    &service(
                        "trap '' TERM; echo trapped; while :; do sleep 1; done",
                        "stop-timeout = 1",
                    ),
                ),
            ),
        ],
    );
    s.wait_for("[c] trapped", Duration::from_secs(10));
    let out = s.terminate();
    let pos = |n: &str| {
        out.find(n)
            .unwrap_or_else(|| panic!("{n:?} missing:\n{out}"))
    };
    assert!(
        pos("unit a: started") < pos("unit b: started")
            && pos("unit b: started") < pos("unit c: started")
    );
    assert!(pos("unit c: stopping") < pos("unit b: stopping"));
    assert!(pos("unit b: stopping") < pos("unit a: stopping"));
    assert!(
        out.contains("unit c: did not stop in 1s; killing it"),
        "{out}"
    );
    assert!(out.contains("unit c: killed by SIGKILL"), "{out}");
}

/// Regression: services inherited init's blocked signals (std's Command does
/// not reset the mask), so a bare `sleep` ignored SIGTERM until SIGKILL.
#[test]
fn services_get_an_empty_signal_mask_and_stop_on_sigterm() {
    let s = Sup::start(
        "sigmask",
        &[
            (
                "bare",
                "[service]\nexec = [\"/bin/sleep\", \"300\"]\nstop-timeout = 20\n",
            ),
            (
                "mask",
                &service("grep SigBlk /proc/self/status; sleep 300", ""),
            ),
        ],
    );
    s.wait_for("[mask] SigBlk:", Duration::from_secs(10));
    assert!(
        s.output().contains("[mask] SigBlk:\t0000000000000000"),
        "{}",
        s.output()
    );
    let api = s.api();
    let t0 = Instant::now();
    api.stop("bare").unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "bare sleep ignored SIGTERM"
    );
    // The line is read from init's output by another thread: it may come
    // a little after the call has returned.
    s.wait_for("unit bare: killed by SIGTERM", Duration::from_secs(10));
}

/// A service of an init started with SIGHUP ignored could not trap
/// SIGHUP, so its `reload-signal` was lost: every disposition is reset.
#[test]
fn services_start_with_default_signal_dispositions_whatever_init_inherited() {
    let s = Sup::start_ignoring(
        "sigign",
        &[(
            "dispositions",
            &service("grep SigIgn /proc/self/status; sleep 300", ""),
        )],
        true,
        &[libc::SIGHUP, libc::SIGINT, libc::SIGUSR1],
    );
    s.wait_for("[dispositions] SigIgn:", Duration::from_secs(10));
    assert!(
        s.output()
            .contains("[dispositions] SigIgn:\t0000000000000000"),
        "{}",
        s.output()
    );
}

#[test]
fn init_help_prints_its_usage_and_exits_0() {
    let out = Command::new(env!("CARGO_BIN_EXE_init"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "{:?}", out.status);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("usage: init [--units DIR]"), "{text}");
}

#[test]
fn the_logs_of_a_unit_that_does_not_exist_are_an_error() {
    let s = Sup::start("nolog", &[("quiet", &service("sleep 300", ""))]);
    let e = s.api().tail("nosuch", 10).unwrap_err().to_string();
    assert!(
        e.contains("NoSuchUnit") || e.contains("no unit named"),
        "{e}"
    );
    assert!(
        s.api().tail("quiet", 10).is_ok(),
        "a unit with no output yet"
    );
}

/// A program that is not there is said so in words, not as `errno 2`.
#[test]
fn a_failed_exec_names_the_error() {
    let s = Sup::start(
        "execfail",
        &[(
            "missing",
            "[service]\nexec = [\"/no/such/program\"]\nrestart = \"no\"\n",
        )],
    );
    s.wait_for("/no/such/program", Duration::from_secs(10));
    s.wait_until("the error's name", Duration::from_secs(10), |o| {
        o.contains("/no/such/program: No such file or directory")
    });
    assert!(!s.output().contains("errno 2"), "{}", s.output());
}

#[test]
fn bad_files_and_cycles_refuse_only_themselves() {
    let s = Sup::start(
        "bad",
        &[
            ("good", &service("echo good; sleep 300", "")),
            (
                "typo",
                "[service]\nexec = [\"/bin/true\"]\nrestrat = \"always\"\n",
            ),
            (
                "x",
                &with_unit("after = [\"y\"]", &service("sleep 300", "")),
            ),
            (
                "y",
                &with_unit("after = [\"x\"]", &service("sleep 300", "")),
            ),
        ],
    );
    s.wait_for("[good] good", Duration::from_secs(10));
    let out = s.output();
    assert!(
        out.contains("typo.toml:3:1: unknown field `restrat`"),
        "{out}"
    );
    let api = s.api();
    assert_eq!(api.status("good").unwrap().state, "running");
    for n in ["x", "y"] {
        let u = api.status(n).unwrap();
        assert_eq!(u.state, "failed");
        assert!(u.reason.contains("dependency cycle: x -> y"), "{u:?}");
    }
    // Listed, with its error, and never run.
    let typo = api.status("typo").unwrap();
    assert_eq!((typo.state.as_str(), typo.pid), ("refused", 0));
    assert!(typo.reason.contains("unknown field `restrat`"), "{typo:?}");
}

#[test]
fn reload_applies_only_the_difference() {
    let s = Sup::start(
        "reload",
        &[
            ("same", &service("sleep 300", "")),
            ("changed", &service("sleep 300", "")),
            ("removed", &service("sleep 300", "")),
        ],
    );
    let api = s.api();
    let pid = |n: &str| api.status(n).unwrap().pid;
    let (same, changed) = (pid("same"), pid("changed"));
    let units = s.dir.join("units");
    std::fs::write(units.join("changed.toml"), service("sleep 301", "")).unwrap();
    std::fs::remove_file(units.join("removed.toml")).unwrap();
    std::fs::write(units.join("added.toml"), service("sleep 300", "")).unwrap();
    let summary = api.reload().unwrap();
    assert_eq!(summary.started, ["added"]);
    assert_eq!(summary.stopped, ["removed"]);
    assert_eq!(summary.restarted, ["changed"]);
    assert!(summary.errors.is_empty());
    assert_eq!(pid("same"), same, "an unchanged unit keeps running");
    assert_ne!(pid("changed"), changed);
    assert_eq!(api.status("changed").unwrap().state, "running");
    assert_eq!(api.status("added").unwrap().state, "running");
    assert!(api.status("removed").is_err());
}

#[test]
fn reload_signals_unchanged_services_that_ask_for_it() {
    let hup = "trap 'echo got HUP' HUP; echo up; while :; do sleep 0.1; done";
    let s = Sup::start(
        "reload-signal",
        &[
            ("listener", &service(hup, "reload-signal = \"SIGHUP\"")),
            ("deaf", &service("sleep 300", "")),
        ],
    );
    let api = s.api();
    s.wait_for("[listener] up", Duration::from_secs(10));
    let (listener, deaf) = (
        api.status("listener").unwrap().pid,
        api.status("deaf").unwrap().pid,
    );
    // A microvm unit appearing is part of the summary (vmmd runs it).
    std::fs::write(
        s.dir.join("units/web.toml"),
        "[microvm]\ncmd = [\"/bin/true\"]\n",
    )
    .unwrap();
    let summary = api.reload().unwrap();
    assert_eq!(summary.started, ["web"]);
    s.wait_for("[listener] got HUP", Duration::from_secs(10));
    assert_eq!(
        api.status("listener").unwrap().pid,
        listener,
        "signalled, not restarted"
    );
    assert_eq!(api.status("deaf").unwrap().pid, deaf);
    assert_eq!(api.status("deaf").unwrap().state, "running");
}

#[test]
fn notify_readiness_orders_dependents() {
    let notify = "perl -MIO::Socket::UNIX -e 'my $s = IO::Socket::UNIX->new(Type => SOCK_DGRAM, Peer => $ENV{NOTIFY_SOCKET}) or die; $s->send(qq(READY=1\\n))'";
    let s = Sup::start(
        "notify",
        &[
            (
                "slow",
                &service(
                    &format!("sleep 1; {notify}; echo notified; sleep 300"),
                    "ready = \"notify\"",
                ),
            ),
            (
                "after-slow",
                &with_unit("after = [\"slow\"]", &service("echo up; sleep 300", "")),
            ),
            (
                "silent",
                &service("sleep 300", "ready = \"notify\"\nready-timeout = 1"),
            ),
        ],
    );
    s.wait_for("[after-slow] up", Duration::from_secs(15));
    s.wait_for(
        "unit silent: not ready within 1s; killing it",
        Duration::from_secs(10),
    );
    let out = s.output();
    let pos = |n: &str| {
        out.find(n)
            .unwrap_or_else(|| panic!("{n:?} missing:\n{out}"))
    };
    assert!(
        pos("unit slow: ready") < pos("unit after-slow: started"),
        "{out}"
    );
}

#[test]
fn logs_stay_bounded_when_a_unit_writes_a_gibibyte() {
    let s = Sup::start(
        "flood",
        &[(
            "flood",
            &service(
                "yes $(printf '%0999d' 0) | head -c 1073741824; echo finished; sleep 300",
                "",
            ),
        )],
    );
    let api = s.api();
    let t0 = Instant::now();
    let mut peak = 0;
    loop {
        peak = peak.max(rss_kib(s.pid()));
        let (tail, _) = api.tail("flood", 1).unwrap();
        // 1 GiB is not a whole number of lines: "finished" ends the last, partial one.
        if tail.first().is_some_and(|(_, l)| l.ends_with("finished")) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "1 GiB not through in 5 minutes"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(peak < 64 * 1024, "init's RSS reached {peak} KiB");
    let (lines, next) = api.logs("flood", 0, 100_000).unwrap();
    assert!(lines.len() <= steelcup_os::logs::RING_LINES);
    assert!(next > 1_000_000, "every line was counted ({next})");
    let log_dir = s.dir.join("run/logs");
    let total: u64 = std::fs::read_dir(&log_dir)
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .sum();
    let cap = (steelcup_os::logs::FILE_KEEP as u64 + 1) * steelcup_os::logs::FILE_BYTES;
    assert!(total <= cap, "log files hold {total} bytes");
    assert!(s.output().contains("lines not shown on the console"));
}

/// Regression: the console echo was written from the capture thread, so a
/// console that could not keep up (a 115200-baud serial line) blocked the
/// capture of every unit's output, and then the units themselves.
#[test]
fn a_stuck_console_does_not_stall_log_capture() {
    let s = Sup::start_with(
        "console",
        &[(
            "chatty",
            // 1000-byte lines: the first burst of console echo (200 lines)
            // is more than a pipe holds.
            &service(
                "yes $(printf '%0999d' 0) | head -n 20000; echo finished; sleep 300",
                "",
            ),
        )],
        false,
    );
    let api = s.api();
    let t0 = Instant::now();
    loop {
        let (tail, _) = api.tail("chatty", 1).unwrap();
        if tail.first().is_some_and(|(_, l)| l == "finished") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "capture stalled behind the console: {tail:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, next) = api.tail("chatty", 1).unwrap();
    assert_eq!(next, 20_001, "every line was captured");
}

fn dbus_send() -> Option<PathBuf> {
    let found = ["/usr/bin/dbus-send", "/bin/dbus-send"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    if found.is_none() {
        assert!(
            std::env::var_os("STEELCUP_REQUIRE_TOOLS").is_none(),
            "dbus-send is missing (Debian package dbus-bin)"
        );
        eprintln!("skipped: dbus-send (Debian package dbus-bin) is not installed; `cargo xtask test` installs it");
    }
    found
}

#[test]
fn a_standard_dbus_client_drives_the_api() {
    let Some(dbus_send) = dbus_send() else { return };
    let s = Sup::start("dbus", &[("svc", &service("sleep 300", ""))]);
    let addr = format!("--peer=unix:path={}", s.dir.join("run/init.sock").display());
    let call = |method: &str, args: &[&str]| {
        let out = Command::new(&dbus_send)
            .args([addr.as_str(), "--print-reply", "/org/steelcup/Init1"])
            .arg(format!("org.steelcup.Init1.{method}"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = call("ListUnits", &[]);
    assert!(
        ok && out.contains("\"svc\"") && out.contains("\"running\""),
        "{out}"
    );
    let (ok, out) = call("Stop", &["string:svc"]);
    assert!(ok, "{out}");
    let (_, out) = call("Status", &["string:svc"]);
    assert!(out.contains("\"stopped\""), "{out}");
    let (ok, out) = call("Status", &["string:ghost"]);
    assert!(
        !ok && out.contains("org.steelcup.Init1.Error.NoSuchUnit"),
        "{out}"
    );
    let (ok, out) = call("PowerOff", &[]);
    assert!(ok, "{out}");
    s.wait_for("all units stopped; exiting", Duration::from_secs(10));
}

/// Regression: an exit reaped while a reload stopped another unit was
/// lost (the unit stayed "running" with a dead pid, never restarted).
#[test]
fn an_exit_during_a_reload_is_recorded() {
    let go = std::env::temp_dir()
        .join(format!("steelcup-it-lost-exit-{}", std::process::id()))
        .join("go");
    let s = Sup::start(
        "lost-exit",
        &[
            (
                "alpha",
                &service(
                    &format!(
                        "while [ ! -e {} ]; do sleep 0.05; done; exit 4",
                        go.display()
                    ),
                    "restart = \"no\"",
                ),
            ),
            (
                "zeta",
                &service(
                    &format!(
                        "trap 'touch {}' TERM; echo ready; while :; do sleep 0.1; done",
                        go.display()
                    ),
                    "stop-timeout = 2",
                ),
            ),
        ],
    );
    s.wait_for("[zeta] ready", Duration::from_secs(10));
    // zeta changes: the reload stops it, its TERM trap lets alpha end, and
    // alpha's exit is reaped while zeta is still stopping.
    std::fs::write(
        s.dir.join("units/zeta.toml"),
        service("echo ready again; sleep 300", ""),
    )
    .unwrap();
    let api = s.api();
    let summary = api.reload().unwrap();
    assert_eq!(summary.restarted, ["zeta"]);
    s.wait_for("[zeta] ready again", Duration::from_secs(10));
    let alpha = api.status("alpha").unwrap();
    assert_eq!(
        (alpha.state.as_str(), alpha.last_exit, alpha.pid),
        ("exited", 4, 0),
        "{alpha:?}\n{}",
        s.output()
    );
}

/// `Usage` (`cup top`): a busy unit's CPU time grows by about its share
/// of a core, an idle one's does not, and both hold memory.
#[test]
fn usage_shows_who_is_busy() {
    let s = Sup::start(
        "usage",
        &[
            ("busy", &service("while :; do :; done", "")),
            ("idle", &service("exec sleep 300", "")),
        ],
    );
    let api = s.api();
    let t = Instant::now();
    while api.usage().unwrap().len() < 2 {
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", api.usage());
        std::thread::sleep(Duration::from_millis(20));
    }
    let get = |u: &[(String, u64, u64)], n: &str| u.iter().find(|x| x.0 == n).cloned().unwrap();
    let a = api.usage().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let b = api.usage().unwrap();
    let busy = get(&b, "busy").1 - get(&a, "busy").1;
    let idle = get(&b, "idle").1 - get(&a, "idle").1;
    assert!(busy > 100_000, "busy used {busy} µs of CPU in a second");
    assert!(idle < 50_000, "idle used {idle} µs of CPU in a second");
    assert!(get(&b, "busy").2 > 0 && get(&b, "idle").2 > 0, "{b:?}");
}

/// `KernelLog` (`cup dmesg`) reads the machine's kernel log through the
/// API, from a sequence number on.
#[test]
fn the_kernel_log_is_read_through_the_api() {
    let s = Sup::start("kmsg", &[]);
    let api = s.api();
    match api.kernel_log(0, 3) {
        Ok((records, next)) => {
            assert!(records.len() <= 3, "{records:?}");
            if let Some(last) = records.last() {
                assert!(next > last.0);
                let (again, _) = api.kernel_log(last.0, 10_000).unwrap();
                assert_eq!(again.first(), Some(last));
            }
        }
        Err(e) => {
            assert!(e.to_string().contains("/dev/kmsg"), "{e}");
            eprintln!("SKIP: /dev/kmsg cannot be read here ({e}); the QEMU quick-start test reads the appliance's with cup dmesg");
        }
    }
}

/// A unit in its stop timeout holds nothing up: while `slow` ignores its
/// SIGTERM for 3 s, other calls answer at once, another unit restarts, a
/// reload removes a third; `slow`'s own `stop` call returns once it has
/// been killed, and a reload that changed it while it stopped brings the
/// new definition up after.
#[test]
fn stopping_is_asynchronous() {
    let s = Sup::start(
        "async-stop",
        &[
            (
                "slow",
                &service(
                    "trap 'echo term ignored' TERM; echo up; while :; do sleep 0.1; done",
                    "stop-timeout = 3",
                ),
            ),
            ("quick", &service("echo quick up; sleep 300", "")),
            ("gone", &service("sleep 300", "")),
        ],
    );
    s.wait_for("[slow] up", Duration::from_secs(10));
    s.wait_for("[quick] quick up", Duration::from_secs(10));
    let dir = s.dir.clone();
    let stopper = std::thread::spawn(move || {
        let api = connect(&dir.join("run")).unwrap();
        let t0 = Instant::now();
        api.stop("slow").unwrap();
        t0.elapsed()
    });
    s.wait_for("[slow] term ignored", Duration::from_secs(10));
    let api = s.api();
    let t0 = Instant::now();
    assert_eq!(api.status("slow").unwrap().state, "stopping");
    api.restart("quick").unwrap();
    std::fs::remove_file(s.dir.join("units/gone.toml")).unwrap();
    let summary = api.reload().unwrap();
    assert_eq!(summary.stopped, ["gone"]);
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "calls waited for slow's stop: {:?}",
        t0.elapsed()
    );
    s.wait_until("quick started again", Duration::from_secs(10), |o| {
        o.matches("[quick] quick up").count() == 2
    });
    let took = stopper.join().unwrap();
    assert!(
        took >= Duration::from_secs(2),
        "stop returned before slow was killed: {took:?}"
    );
    let out = s.output();
    assert!(
        out.contains("unit slow: did not stop in 3s; killing it"),
        "{out}"
    );
    assert_eq!(api.status("slow").unwrap().state, "stopped");
    assert!(api.status("gone").is_err(), "gone is still there");

    // A start while it stops: it starts again once it has stopped, never
    // as a second copy beside the one on its way out.
    api.start("slow").unwrap();
    s.wait_until("slow up again", Duration::from_secs(10), |o| {
        o.matches("[slow] up").count() == 2
    });
    let dir = s.dir.clone();
    let stopper = std::thread::spawn(move || connect(&dir.join("run")).unwrap().stop("slow"));
    s.wait_until("slow asked to stop again", Duration::from_secs(10), |o| {
        o.matches("[slow] term ignored").count() == 2
    });
    api.start("slow").unwrap();
    assert_eq!(api.status("slow").unwrap().state, "stopping");
    stopper.join().unwrap().unwrap();
    s.wait_until("slow up a third time", Duration::from_secs(15), |o| {
        o.matches("[slow] up").count() == 3
    });
    assert_eq!(api.status("slow").unwrap().state, "running");

    // A reload that changes a unit while it stops: the new definition
    // comes up once the old one has gone.
    std::fs::write(
        s.dir.join("units/slow.toml"),
        service("echo new slow; sleep 300", ""),
    )
    .unwrap();
    let summary = api.reload().unwrap();
    assert_eq!(summary.restarted, ["slow"]);
    assert_eq!(api.status("slow").unwrap().state, "stopping");
    s.wait_for("[slow] new slow", Duration::from_secs(15));
    assert_eq!(api.status("slow").unwrap().state, "running");
}

/// A running unit whose file turns bad goes on as it was; `cup units`
/// lists refused files with their error, and a fixed file is taken.
#[test]
fn a_unit_whose_file_turns_bad_keeps_its_last_good_definition() {
    let s = Sup::start(
        "keep-good",
        &[("web", &service("sleep 300", "")), ("broken", "[service\n")],
    );
    let api = s.api();
    let web = api.status("web").unwrap();
    let listed = api.list_units().unwrap();
    let broken = listed.iter().find(|u| u.name == "broken").unwrap();
    assert_eq!(broken.state, "refused");
    assert!(broken.reason.contains("broken.toml"), "{broken:?}");
    // A typo in web's file: web is neither stopped nor restarted.
    std::fs::write(s.dir.join("units/web.toml"), "[service]\nexec = 3\n").unwrap();
    let summary = api.reload().unwrap();
    assert!(
        summary.stopped.is_empty() && summary.restarted.is_empty(),
        "{summary:?}"
    );
    assert_eq!(summary.errors.len(), 2, "{summary:?}");
    let now = api.status("web").unwrap();
    assert_eq!((now.state.as_str(), now.pid), ("running", web.pid));
    assert!(now.reason.contains("its file is refused"), "{now:?}");
    // Fixed (and changed): taken as any change is.
    std::fs::write(s.dir.join("units/web.toml"), service("sleep 301", "")).unwrap();
    let summary = api.reload().unwrap();
    assert_eq!(summary.restarted, ["web"]);
    let now = api.status("web").unwrap();
    assert!(now.reason.is_empty() && now.pid != web.pid, "{now:?}");
}

/// How many threads and descriptors process `pid` has.
/// The names of `pid`'s threads, counted: what a leak would be made of.
fn thread_names(pid: i32) -> String {
    let mut names: std::collections::BTreeMap<String, usize> = Default::default();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        *names.entry(comm.trim().to_string()).or_default() += 1;
    }
    format!("{names:?}")
}

fn threads_and_fds(pid: i32) -> (usize, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    (threads, fds)
}

/// A D-Bus client that does the handshake by hand and then never reads:
/// a suspended `cup logs -f`.
fn suspended_follower(socket: &std::path::Path) -> std::os::unix::net::UnixStream {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    let uid: String = nix::unistd::getuid()
        .to_string()
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect();
    s.write_all(format!("\0AUTH EXTERNAL {uid}\r\n").as_bytes())
        .unwrap();
    let mut ok = String::new();
    std::io::BufReader::new(&s).read_line(&mut ok).unwrap();
    assert!(ok.starts_with("OK "), "{ok:?}");
    s.write_all(b"BEGIN\r\n").unwrap();
    s
}

/// No client wedges or exhausts init's API: 500 connections that never
/// finish the handshake, a follower that stops reading its signals (it is
/// dropped once its queue is full, and nobody waits for it), and 1000
/// clients at once, while calls keep answering within a second; the
/// threads and descriptors go back to what they were.
#[test]
fn no_client_wedges_or_exhausts_the_api() {
    let s = Sup::start("api-load", &[("svc", &service("sleep 300", ""))]);
    let socket = s.dir.join("run/init.sock");
    let run = s.dir.join("run");
    // Warmed up (zbus starts its shared threads on first use), then the
    // baseline.
    let warm: Vec<_> = (0..50).map(|_| connect(&run).unwrap()).collect();
    for w in &warm {
        w.list_units().unwrap();
    }
    drop(warm);
    std::thread::sleep(Duration::from_secs(2));
    let before = threads_and_fds(s.pid());
    let idle: Vec<_> = (0..std::env::var("IDLE")
        .map(|v| v.parse().unwrap())
        .unwrap_or(500))
        .map(|_| std::os::unix::net::UnixStream::connect(&socket).unwrap())
        .collect();
    // A follower that never reads: every restart is several state changes,
    // and its socket and queue fill; restarts go on at their pace.
    let follower = suspended_follower(&socket);
    let api = s.api();
    for i in 0..600 {
        let t = Instant::now();
        api.restart("svc").unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "restart {i} took {:?}",
            t.elapsed()
        );
    }
    follower
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut drained = Vec::new();
    let end = (&follower).read_to_end(&mut drained);
    assert!(end.is_ok(), "the follower was not dropped: {end:?}");
    // 1000 clients at once, each with a call; then signals for them all.
    let clients: Vec<_> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..20)
            .map(|_| {
                let run = &run;
                scope.spawn(move || {
                    (0..50)
                        .map(|_| {
                            let api = connect(run).unwrap();
                            assert!(!api.list_units().unwrap().is_empty());
                            api
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    assert_eq!(clients.len(), 1000);
    // All 1000 call at once, over and over, while another call is timed.
    let clients = std::sync::Arc::new(clients);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let callers: Vec<_> = (0..20)
        .map(|i| {
            let (clients, stop) = (clients.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for c in clients.iter().skip(i * 50).take(50) {
                        c.status("svc").unwrap();
                    }
                }
            })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        let c = Instant::now();
        api.list_units().unwrap();
        slowest = slowest.max(c.elapsed());
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in callers {
        c.join().unwrap();
    }
    assert!(
        slowest < Duration::from_secs(1),
        "a call took {slowest:?} while 1000 clients called"
    );
    drop((idle, clients, follower, api));
    // Handshakes cut after 10 s, hang-ups noticed: back to the baseline.
    let t = Instant::now();
    loop {
        let now = threads_and_fds(s.pid());
        // Descriptors exactly; threads within the few that zbus's shared
        // pools keep once they have grown (async-io's, and the blocking
        // pool, bounded by steelcup_api::bus::BLOCKING_THREADS).
        if now.0 <= before.0 + 8 && now.1 <= before.1 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "threads and descriptors before {before:?}, now {now:?}; threads: {}",
            thread_names(s.pid())
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// init as PID 1 of a PID namespace (`container=` set, as container
/// runtimes set it): what is mounted already is left alone, the machine's
/// phases are skipped, the units run, and cup reaches its API from outside
/// the namespace; SIGTERM stops it.
#[test]
fn init_is_pid_1_of_a_pid_namespace_and_is_reached_from_outside() {
    if !nix::unistd::geteuid().is_root() || !std::path::Path::new("/usr/bin/unshare").exists() {
        eprintln!("skipped: needs root and util-linux's unshare (a new PID namespace)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("steelcup-it-pidns-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("units")).unwrap();
    std::fs::write(
        dir.join("units/web.toml"),
        service("echo up as $$; exec sleep 300", ""),
    )
    .unwrap();
    let mut child = Command::new("/usr/bin/unshare")
        .args([
            "--pid",
            "--fork",
            "--mount",
            "--propagation",
            "private",
            "--mount-proc",
            "--",
        ])
        .arg(env!("CARGO_BIN_EXE_init"))
        .arg("--units")
        .arg(dir.join("units"))
        .arg("--run-dir")
        .arg(dir.join("run"))
        .env("container", "steelcup-test")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = Arc::new(Mutex::new(String::new()));
    for stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let out = out.clone();
        std::thread::spawn(move || {
            let mut stream = stream;
            let mut buf = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
    }
    let t = Instant::now();
    let api = loop {
        let tried = connect(&dir.join("run"));
        if let Ok(api) = tried {
            break api;
        }
        // In a chroot "/" is no mount point, so no private mount namespace
        // can be made of it (util-linux refuses): not init's to judge.
        if out
            .lock()
            .unwrap()
            .contains("cannot change root filesystem propagation")
        {
            let _ = child.wait();
            eprintln!("SKIP: unshare cannot make a private mount namespace here (\"/\" is not a mount point: a chroot); init in a PID namespace is checked on machines where it can");
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no API ({:?}): {}",
            tried.err().map(|e| steelcup_sys::error_chain(&e)),
            out.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let t = Instant::now();
    while api.status("web").unwrap().state != "running" {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{}",
            out.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let said = out.lock().unwrap().clone();
    assert!(said.contains("starting as PID 1 of a container"), "{said}");
    assert!(!said.contains("phase modules"), "{said}");
    // init is the only child of unshare (it forked it into the namespace).
    let init = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", child.id()))
        .unwrap()
        .trim()
        .parse::<i32>()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(init),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{}",
            out.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(100));
    let said = out.lock().unwrap().clone();
    assert!(said.contains("unit web: stopped"), "{said}");
    let _ = std::fs::remove_dir_all(&dir);
}
