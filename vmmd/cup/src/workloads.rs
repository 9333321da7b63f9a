//! `cup run`, `cup exec`, `cup rm` and the image verbs (`pull`, `images`,
//! `rmi`, `image prune`): docker-like, against vmmd's `org.steelcup.Vmm1`.

use crate::cli::{AttachArgs, ExecArgs, ImagesArgs, InspectArgs, PortArgs, PsArgs, RunArgs};
use crate::error::{usage, CupError};
use crate::view;
use std::io::Write;
use std::time::Duration;
use steelcup_api::attach;
use steelcup_api::vmm1::{Outcome, RunSpec, TimedLine, Vmm1ClientProxy, WorkloadState};
use steelcup_proto::stdio::{ExecRequest, ATTACH_PORT};

fn env_pair(v: &str) -> Result<(String, String), CupError> {
    match v.split_once('=') {
        Some((k, val)) if !k.is_empty() => Ok((k.to_string(), val.to_string())),
        _ => match std::env::var(v) {
            // `-e NAME` passes cup's own value, as docker does.
            Ok(val) if !v.is_empty() => Ok((v.to_string(), val)),
            _ => Err(usage!("-e {v:?}: expected NAME=VALUE")),
        },
    }
}

/// `-e` values and `--env-file` files, as Docker reads them: `NAME=VALUE`,
/// or `NAME` alone for cup's own value (left out when cup has none, from a
/// file); in a file, blank lines and `#` comments are skipped and nothing
/// is unquoted.
pub(crate) fn environment(
    flags: &[String],
    files: &[std::path::PathBuf],
) -> Result<std::collections::BTreeMap<String, String>, CupError> {
    let mut env = std::collections::BTreeMap::new();
    for f in files {
        let text = crate::read_bounded(f, 1 << 20)?;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim_start();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match line.split_once('=') {
                Some((k, v)) if !k.is_empty() && !k.contains(char::is_whitespace) => {
                    env.insert(k.to_string(), v.to_string());
                }
                Some(_) => {
                    return Err(usage!(
                        "{}:{}: {line:?} is not NAME=VALUE",
                        f.display(),
                        i + 1
                    ))
                }
                None => {
                    if let Ok(v) = std::env::var(line.trim_end()) {
                        env.insert(line.trim_end().to_string(), v);
                    }
                }
            }
        }
    }
    for v in flags {
        let (k, val) = env_pair(v)?;
        env.insert(k, val);
    }
    Ok(env)
}

/// Labels as Docker writes them: `NAME=VALUE`, or `NAME` with an empty
/// value.
pub(crate) fn labels(list: &[String]) -> std::collections::BTreeMap<String, String> {
    list.iter()
        .map(|l| match l.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (l.clone(), String::new()),
        })
        .collect()
}

/// `--entrypoint PROGRAM` as the workload's entrypoint: as with Docker,
/// `--entrypoint ""` runs the command alone.
pub(crate) fn entrypoint(flag: Option<String>) -> Option<Vec<String>> {
    flag.map(|e| if e.is_empty() { vec![] } else { vec![e] })
}

/// `cup run`: returns cup's exit code (the workload's, attached).
pub fn run(p: &Vmm1ClientProxy<'static>, r: RunArgs) -> Result<u8, CupError> {
    let (image, cmd) = r
        .image_and_command
        .split_first()
        .ok_or_else(|| usage!("run needs an image"))?;
    let labels = labels(&r.label);
    steelcup_units::check_labels(&labels).map_err(|e| usage!("--label: {e}"))?;
    let spec = RunSpec {
        image: image.clone(),
        cmd: cmd.to_vec(),
        env: environment(&r.env, &r.env_file)?,
        name: r.name,
        vcpus: None,
        cpus: r.cpus,
        memory: r.memory,
        attach: !r.detach,
        tty: r.tty && !r.detach,
        rm: r.rm,
        rlimits: r.ulimit.into_iter().collect(),
        volumes: r.volume,
        restart: r.restart.map(|(p, _)| p).unwrap_or_default(),
        max_restarts: r.restart.and_then(|(_, n)| n),
        ports: r.publish,
        network: r.network,
        labels,
        entrypoint: entrypoint(r.entrypoint),
        workdir: r.workdir,
        user: r.user,
        hostname: r.hostname,
        read_only: r.read_only,
        extra_hosts: r.add_host.into_iter().collect(),
    };
    let stdin = r.interactive;
    let json = serde_json::to_string(&spec)?;
    let name = p.run(&json)?;
    if !spec.attach {
        println!("{name}");
        return Ok(0);
    }
    // The run's end as vmmd announces it, for when the stream ends
    // without the exit frame (the VM reset before its last packet left).
    let ended = run_end(p, &name)?;
    let conn = attach::connect_when_ready(
        &mut || vm_socket(p, &name),
        ATTACH_PORT,
        Duration::from_secs(900),
    )?;
    match attach::session(conn, stdin, spec.tty) {
        Ok(status) => Ok(attach::exit_code(status)),
        Err(e) => match ended.recv_timeout(Duration::from_secs(60)) {
            Ok(o) if o.is_some() => Ok(o.code().unwrap_or(125)),
            _ => Err(CupError::Workload {
                why: format!("{}{}", steelcup_sys::error_chain(&e), outcome(p, &name)),
                name,
            }),
        },
    }
}

/// The last outcome of workload `name`'s run, sent once vmmd says the run
/// ended (state `ended` or `waiting`, or `removed`: a `--rm` workload is
/// forgotten at once, so its outcome is only in the signal).
fn run_end(
    p: &Vmm1ClientProxy<'static>,
    name: &str,
) -> Result<std::sync::mpsc::Receiver<Outcome>, CupError> {
    let (tx, ended) = std::sync::mpsc::channel::<Outcome>();
    let changes = p.receive_workload_changed()?;
    let watched = name.to_string();
    std::thread::spawn(move || {
        for c in changes {
            let Ok(a) = c.args() else { continue };
            let over = WorkloadState::parse(a.state).is_some_and(WorkloadState::run_is_over);
            if a.name == watched && over {
                let _ = tx.send(Outcome {
                    text: a.last_outcome.to_string(),
                    exit_code: a.exit_code,
                });
            }
        }
    });
    Ok(ended)
}

/// How workload `name` last ended, as `; OUTCOME`, if vmmd still knows it.
fn outcome(p: &Vmm1ClientProxy<'static>, name: &str) -> String {
    std::thread::sleep(Duration::from_millis(200));
    p.list()
        .ok()
        .and_then(|l| l.into_iter().find(|v| v.name == name))
        .filter(|v| !v.last_outcome.is_empty())
        .map(|v| format!("; {}", v.last_outcome))
        .unwrap_or_default()
}

/// The VM's vsock socket once it runs; an error once it will not.
fn vm_socket(p: &Vmm1ClientProxy<'static>, name: &str) -> Result<Option<String>, CupError> {
    let why = match p.socket(name) {
        Ok(path) => return Ok(Some(path)),
        Err(e) => e,
    };
    let vms = p.list()?;
    match vms.into_iter().find(|v| v.name == name) {
        None => Err(why.into()),
        Some(v) if v.state() == Some(WorkloadState::Ended) && !v.last_outcome.is_empty() => {
            Err(CupError::Workload {
                name: name.to_string(),
                why: v.last_outcome,
            })
        }
        Some(_) => Ok(None),
    }
}

/// `cup exec [-i] [-t] [-e K=V]... [-w DIR] [-u USER] NAME CMD...`.
pub fn exec(p: &Vmm1ClientProxy<'static>, e: ExecArgs) -> Result<u8, CupError> {
    let request = ExecRequest {
        argv: e.command,
        env: environment(&e.env, &[])?,
        workdir: e.workdir,
        user: e.user,
        tty: e.tty,
        detach: e.detach,
    };
    let uds = p.socket(&e.name)?;
    let conn = attach::start_exec(std::path::Path::new(&uds), &request)?;
    let status =
        attach::session(conn, e.interactive, request.tty).map_err(|err| CupError::Workload {
            name: e.name.clone(),
            why: steelcup_sys::error_chain(&err),
        })?;
    Ok(attach::exit_code(status))
}

/// A signal by name (`KILL`, `SIGTERM`) or number.
pub fn parse_signal(s: &str) -> Result<i32, CupError> {
    if let Ok(n) = s.parse::<i32>() {
        return nix::sys::signal::Signal::try_from(n)
            .map(|_| n)
            .map_err(|_| usage!("{n} is not a signal"));
    }
    let name = s.to_ascii_uppercase();
    let name = if name.starts_with("SIG") {
        name
    } else {
        format!("SIG{name}")
    };
    name.parse::<nix::sys::signal::Signal>()
        .map(|sig| sig as i32)
        .map_err(|_| usage!("{s:?} is not a signal (like KILL, TERM, HUP or 9)"))
}

/// `cup inspect [-f TEMPLATE] NAME...`: what vmmd knows of each, as a
/// JSON array, or the template once per workload.
pub fn inspect(p: &Vmm1ClientProxy<'static>, i: &InspectArgs) -> Result<u8, CupError> {
    view::inspect_each(&i.names, i.format.as_deref(), |n| {
        Ok(serde_json::from_str(&p.inspect(n)?)?)
    })
}

/// `cup ps [-a] [-q] [--filter K=V]... [--format F] [--no-trunc]`.
pub fn ps(p: &Vmm1ClientProxy<'static>, a: &PsArgs) -> Result<u8, CupError> {
    let format = view::Format::parse(a.format.as_deref());
    if let view::Format::Template { text, .. } = &format {
        view::Template::parse(text)?;
    }
    let mut vms = p.list()?;
    // As docker ps: what runs (or is about to); -a (or a status filter):
    // every workload.
    let all = a.all || view::wants_ended(&a.filter);
    vms.retain(|v| (all || v.state() != Some(WorkloadState::Ended)) && view::passes(&a.filter, v));
    if a.quiet {
        for v in &vms {
            println!("{}", v.name);
        }
        return Ok(0);
    }
    let rows: Vec<serde_json::Value> = vms.iter().map(view::ps_row).collect();
    view::print_rows(&rows, &format, |_| {
        println!(
            "{:<16} {:<20} {:>7} {:>5} {:>5} {:>7}  {:<15}  {:<24}  LAST OUTCOME",
            "NAME", "STATE", "PID", "RUNS", "VCPUS", "MEMORY", "ADDRESS", "IMAGE"
        );
        for v in &vms {
            let state = match v.health.as_str() {
                "" => v.state.clone(),
                h => format!("{} ({h})", v.state),
            };
            let dash = |s: &str| {
                if s.is_empty() {
                    "-".to_string()
                } else {
                    s.to_string()
                }
            };
            println!(
                "{:<16} {:<20} {:>7} {:>5} {:>5} {:>6}M  {:<15}  {:<24}  {}",
                v.name,
                state,
                if v.pid == 0 {
                    "-".to_string()
                } else {
                    v.pid.to_string()
                },
                v.runs,
                v.vcpus,
                v.memory_mib,
                dash(&v.address),
                view::trunc(&dash(&v.image), 24, a.no_trunc),
                view::trunc(&v.last_outcome, 48, a.no_trunc)
            );
        }
    })?;
    Ok(0)
}

/// `cup wait NAME...`: blocks until each workload's run has ended, then
/// prints its exit code, as docker wait.
pub fn wait(p: &Vmm1ClientProxy<'static>, names: &[String]) -> Result<u8, CupError> {
    for name in names {
        let ended = run_end(p, name)?;
        let now = p
            .list()?
            .into_iter()
            .find(|v| v.name == *name)
            .ok_or_else(|| CupError::NoWorkload(name.clone()))?;
        let code = if now.state().is_some_and(WorkloadState::run_is_over) && now.exit_code >= 0 {
            now.exit_code
        } else {
            ended
                .recv()
                .map_err(|_| CupError::Thread("the signal"))?
                .exit_code
        };
        println!("{code}");
    }
    Ok(0)
}

/// `cup port NAME [PORT[/PROTO]]`: `80/tcp -> 0.0.0.0:8080`, as docker port.
pub fn port(p: &Vmm1ClientProxy<'static>, a: &PortArgs) -> Result<u8, CupError> {
    let v: serde_json::Value = serde_json::from_str(&p.inspect(&a.name)?)?;
    let ports = v["network"]["ports"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut shown = 0;
    for spec in ports {
        let spec: steelcup_units::ports::PortSpec = serde_json::from_value(spec)?;
        let guest = format!("{}/{}", spec.guest_port, spec.protocol.name());
        if let Some(want) = &a.port {
            if *want != guest && *want != spec.guest_port.to_string() {
                continue;
            }
        }
        let ip = spec
            .host_ip
            .map_or("0.0.0.0".to_string(), |ip| ip.to_string());
        println!("{guest} -> {ip}:{}", spec.host_port);
        shown += 1;
    }
    if shown == 0 && a.port.is_some() {
        return Err(usage!(
            "{}: no published port {}",
            a.name,
            a.port.as_deref().unwrap_or("")
        ));
    }
    Ok(0)
}

/// One line of progress: `sha256:0123456789ab [#####     ] 12.0 MiB/40.1 MiB`.
pub fn progress_bar(p: &steelcup_api::vmm1::PullInfo) -> String {
    let width = 30;
    let filled = (p.done.min(p.total) * width as u64)
        .checked_div(p.total)
        .map_or(width, |f| f as usize);
    format!(
        "{} [{}{}] {}/{}",
        &p.digest[..19.min(p.digest.len())],
        "#".repeat(filled),
        " ".repeat(width - filled),
        steelcup_api::human(p.done),
        steelcup_api::human(p.total)
    )
}

/// A new connection to vmmd (for a call made from another thread).
/// (The socket `-H` named, or the remote machine, as the first one.)
fn connect_again() -> Result<Vmm1ClientProxy<'static>, CupError> {
    crate::vmmd()
}

/// `cup pull SOURCE`: a progress bar on a terminal, then `NAME DIGEST`.
pub fn pull(p: &Vmm1ClientProxy<'static>, source: &str) -> Result<u8, CupError> {
    // The pull is one call on its own connection; this one polls
    // `Pulls` to draw the bar meanwhile.
    let call = std::thread::spawn({
        let source = source.to_string();
        move || -> Result<(String, String), CupError> { Ok(connect_again()?.pull(&source)?) }
    });
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut drawn = false;
    while !call.is_finished() {
        if tty {
            if let Some(pi) = p
                .pulls()
                .ok()
                .and_then(|v| v.into_iter().find(|x| x.source == source))
            {
                eprint!("\r\x1b[2K{}", progress_bar(&pi));
                drawn = true;
            }
        }
        std::thread::sleep(Duration::from_millis(150));
    }
    if drawn {
        eprint!("\r\x1b[2K");
    }
    let (name, digest) = call.join().map_err(|_| CupError::Thread("the pull"))??;
    println!("{name} {digest}");
    Ok(0)
}

/// `cup images [-q] [--format F] [--no-trunc]`.
pub fn images(p: &Vmm1ClientProxy<'static>, a: &ImagesArgs) -> Result<u8, CupError> {
    let format = view::Format::parse(a.format.as_deref());
    if let view::Format::Template { text, .. } = &format {
        view::Template::parse(text)?;
    }
    let images = p.images()?;
    if a.quiet {
        for i in &images {
            println!("{}", i.name);
        }
        return Ok(0);
    }
    let rows: Vec<serde_json::Value> = images
        .iter()
        .map(|i| view::image_row(i, a.no_trunc))
        .collect();
    view::print_rows(&rows, &format, |_| {
        let w = if a.no_trunc { 71 } else { 19 };
        println!("{:<56} {:<w$} {:>10}  ROOT IMAGE", "NAME", "DIGEST", "SIZE");
        for i in &images {
            println!(
                "{:<56} {:<w$} {:>10}  {}",
                i.name,
                &i.digest[..w.min(i.digest.len())],
                steelcup_api::human(i.size),
                if i.rootfs { "built" } else { "-" }
            );
        }
    })?;
    Ok(0)
}

/// Signals `cup attach` passes on to the workload, as docker attach does
/// (all but those that cannot be caught or concern the terminal).
const PROXIED: [i32; 6] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// The last signal `cup attach` received and has not yet passed on.
static PENDING_SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn note_signal(sig: libc::c_int) {
    PENDING_SIGNAL.store(sig, std::sync::atomic::Ordering::SeqCst);
}

/// `cup attach [--no-sig-proxy] NAME`: a running workload's console output
/// from now on, as it comes, until its run ends; cup then exits with the
/// workload's code. Signals to cup (Ctrl-C is SIGINT) go to the workload;
/// with `--no-sig-proxy`, Ctrl-C detaches and leaves it running. stdin is
/// not connected: a detached workload runs with its stdin closed.
pub fn attach(p: &Vmm1ClientProxy<'static>, a: &AttachArgs) -> Result<u8, CupError> {
    // First, so no signal meant for the workload ends cup instead.
    for sig in PROXIED {
        // SAFETY: the handler only stores into an atomic.
        unsafe {
            libc::signal(
                sig,
                note_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
    }
    let proxy_signals = !a.no_sig_proxy && a.sig_proxy.unwrap_or(true);
    let name = &a.name;
    let info = p
        .list()?
        .into_iter()
        .find(|v| v.name == *name)
        .ok_or_else(|| CupError::NoWorkload(name.to_string()))?;
    if !info.state().is_some_and(WorkloadState::is_live) {
        return Err(CupError::NotRunning {
            name: name.to_string(),
            state: info.state,
        });
    }
    let ended = run_end(p, name)?;
    let (_, mut cursor, _) = p.tail(name, 0)?;
    let mut out = std::io::stdout().lock();
    let mut outcome: Option<Outcome> = None;
    loop {
        let sig = PENDING_SIGNAL.swap(0, std::sync::atomic::Ordering::SeqCst);
        if sig != 0 {
            if !proxy_signals && sig == libc::SIGINT {
                eprintln!("cup: detached from {name}; it goes on running");
                return Ok(0);
            }
            if proxy_signals {
                // Gone already: its end arrives as a signal above.
                let _ = p.kill(name, sig);
            }
        }
        if outcome.is_none() {
            outcome = ended.try_recv().ok();
        }
        let (more, next, _) = match p.logs(name, cursor, 1000) {
            Ok(l) => l,
            // Removed (--rm): its last lines went with it.
            Err(_) if outcome.is_some() => (Vec::new(), cursor, false),
            Err(e) => return Err(e.into()),
        };
        for (_, l) in &more {
            let _ = writeln!(out, "{l}");
        }
        let _ = out.flush();
        cursor = next;
        if more.is_empty() {
            if let Some(o) = &outcome {
                return Ok(o.code().unwrap_or(125));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A workload's console output, for `cup logs NAME`: followed until the
/// workload has ended.
pub struct WorkloadLog<'a> {
    pub p: &'a Vmm1ClientProxy<'static>,
    pub name: &'a str,
}

impl WorkloadLog<'_> {
    fn api(&self, e: zbus::Error) -> CupError {
        match e {
            zbus::Error::MethodError(n, _, _) if n.as_str().ends_with(".NoSuchVm") => {
                CupError::NoWorkloadLog(self.name.to_string())
            }
            e => e.into(),
        }
    }
}

impl crate::logs::Source for WorkloadLog<'_> {
    fn tail(&self, n: u32) -> Result<(Vec<TimedLine>, u64, bool), CupError> {
        self.p.tail_timed(self.name, n).map_err(|e| self.api(e))
    }
    fn read(&self, cursor: u64) -> Result<(Vec<TimedLine>, u64, bool), CupError> {
        self.p
            .logs_timed(self.name, cursor, 1000)
            .map_err(|e| self.api(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_progress_bar_fills_with_the_bytes() {
        let p = |done, total| steelcup_api::vmm1::PullInfo {
            source: "s".into(),
            digest: "sha256:0123456789abcdef".into(),
            done,
            total,
        };
        assert_eq!(
            progress_bar(&p(0, 100)),
            format!("sha256:0123456789ab [{}] 0 B/100 B", " ".repeat(30))
        );
        assert_eq!(
            progress_bar(&p(50, 100)),
            format!(
                "sha256:0123456789ab [{}{}] 50 B/100 B",
                "#".repeat(15),
                " ".repeat(15)
            )
        );
        assert!(
            progress_bar(&p(200, 100)).contains(&"#".repeat(30)),
            "never past full"
        );
    }

    #[test]
    fn signals_by_name_or_number() {
        assert_eq!(parse_signal("KILL").unwrap(), libc::SIGKILL);
        assert_eq!(parse_signal("sigterm").unwrap(), libc::SIGTERM);
        assert_eq!(parse_signal("1").unwrap(), libc::SIGHUP);
        assert!(parse_signal("NOPE")
            .unwrap_err()
            .to_string()
            .contains("not a signal"));
        assert!(parse_signal("99")
            .unwrap_err()
            .to_string()
            .contains("not a signal"));
    }

    #[test]
    fn env_files_as_docker_reads_them() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("app.env");
        std::fs::write(&f, "# settings\n\nA=1\nB=two words\nQ=\"kept\"\nA=3\n").unwrap();
        let env = environment(&["B=flag".into()], std::slice::from_ref(&f)).unwrap();
        assert_eq!(env["A"], "3", "a later line wins");
        assert_eq!(env["B"], "flag", "-e wins over the file");
        assert_eq!(env["Q"], "\"kept\"", "nothing is unquoted");
        std::fs::write(&f, "A=1\nBAD NAME=2\n").unwrap();
        let e = environment(&[], std::slice::from_ref(&f))
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with("app.env:2: \"BAD NAME=2\" is not NAME=VALUE"),
            "{e}"
        );
    }

    #[test]
    fn env_pairs() {
        assert_eq!(env_pair("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert!(env_pair("=x").is_err());
    }
}
