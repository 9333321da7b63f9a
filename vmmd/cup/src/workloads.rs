//! `cup run`, `cup exec`, `cup rm` and the image verbs (`pull`, `images`,
//! `rmi`, `image prune`): docker-like, against vmmd's `org.steelcup.Vmm1`.

use crate::error::{usage, CupError};
use std::io::Write;
use std::time::Duration;
use steelcup_api::attach;
use steelcup_api::vmm1::{NamedVolume, Outcome, RunSpec, Vmm1ClientProxy, WorkloadState};
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

/// Splits `-it`-style flag clusters; stops at the first non-flag (the
/// image or the workload name), after which everything is the command.
fn flags(
    args: &[String],
    with_value: &[&str],
) -> Result<(Vec<(String, Option<String>)>, Vec<String>), CupError> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if a == "--" {
            i += 1;
            break;
        }
        if !a.starts_with('-') || a == "-" {
            break;
        }
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        if with_value.contains(&name.as_str()) {
            let v = match inline {
                Some(v) => v,
                None => {
                    i += 1;
                    args.get(i)
                        .cloned()
                        .ok_or_else(|| usage!("{name} needs a value"))?
                }
            };
            out.push((name, Some(v)));
        } else if !name.starts_with("--") && name.len() > 2 {
            // -it, -dt, ...
            for c in name[1..].chars() {
                out.push((format!("-{c}"), None));
            }
        } else {
            // `--flag=value` of a flag that needs none keeps its value
            // (`--sig-proxy=false`).
            out.push((name, inline));
        }
        i += 1;
    }
    Ok((out, args[i..].to_vec()))
}

/// `cup run [-d] [--rm] [-i] [-t] [--name N] [-e K=V]... [--cpus N]
/// [--memory SIZE] [--ulimit NAME=N]... [-p [IP:]HOST:GUEST[/PROTO]]...
/// [--network bridge|none] IMAGE [CMD...]`; returns cup's exit code.
pub fn run(p: &Vmm1ClientProxy<'static>, args: &[String]) -> Result<u8, CupError> {
    let (flags, rest) = flags(
        args,
        &[
            "--name",
            "-e",
            "--env",
            "--cpus",
            "--memory",
            "-m",
            "--ulimit",
            "--restart",
            "-v",
            "--volume",
            "-p",
            "--publish",
            "--network",
            "--net",
        ],
    )?;
    let mut spec = RunSpec {
        attach: true,
        ..Default::default()
    };
    let mut stdin = false;
    for (f, v) in flags {
        let v = v.unwrap_or_default();
        match f.as_str() {
            "-d" | "--detach" => spec.attach = false,
            "--rm" => spec.rm = true,
            "-i" | "--interactive" => stdin = true,
            "-t" | "--tty" => spec.tty = true,
            "--name" => spec.name = Some(v),
            "-e" | "--env" => {
                let (k, val) = env_pair(&v)?;
                spec.env.insert(k, val);
            }
            "--cpus" => {
                spec.vcpus = Some(
                    v.parse()
                        .map_err(|_| usage!("--cpus {v:?}: a whole number of vCPUs"))?,
                )
            }
            "--memory" | "-m" => {
                spec.memory = Some(
                    steelcup_units::MemSize::try_from(v.as_str())
                        .map_err(|e| usage!("{f} {v:?}: {e}"))?,
                )
            }
            "-v" | "--volume" => spec
                .volumes
                .push(NamedVolume::try_from(v.as_str()).map_err(|e| usage!("{f} {e}"))?),
            "--restart" => {
                spec.restart = match v.as_str() {
                    "no" => steelcup_units::Restart::No,
                    "on-failure" => steelcup_units::Restart::OnFailure,
                    "always" | "unless-stopped" => steelcup_units::Restart::Always,
                    _ => return Err(usage!("--restart {v:?}: no, on-failure or always")),
                }
            }
            "--ulimit" => {
                // NAME=N or NAME=SOFT:HARD (one value is kept: the hard one).
                let (n, val) = v
                    .split_once('=')
                    .ok_or_else(|| usage!("--ulimit {v:?}: expected NAME=N"))?;
                let val = val.rsplit(':').next().unwrap_or(val);
                let val = val
                    .parse()
                    .map_err(|_| usage!("--ulimit {v:?}: {val:?} is not a number"))?;
                spec.rlimits.insert(n.to_string(), val);
            }
            // Checked here, once: a typo fails before anything is sent.
            "-p" | "--publish" => spec
                .ports
                .push(steelcup_units::ports::PortSpec::parse(&v).map_err(|e| usage!("{f} {e}"))?),
            "--network" | "--net" => {
                spec.network = Some(match v.as_str() {
                    "bridge" => steelcup_units::Network::Bridge,
                    "none" => steelcup_units::Network::None,
                    _ => return Err(usage!("{f} {v:?}: bridge or none")),
                })
            }
            other => return Err(usage!("run: unknown flag {other:?}; see `cup help`")),
        }
    }
    let Some((image, cmd)) = rest.split_first() else {
        return Err(usage!(
            "run needs an image, like `cup run --rm oci-archive:/path/image.tar sh -c 'echo hi'`"
        ));
    };
    spec.image = image.clone();
    spec.cmd = cmd.to_vec();
    if !spec.attach {
        spec.tty = false;
    }
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
pub fn exec(p: &Vmm1ClientProxy<'static>, args: &[String]) -> Result<u8, CupError> {
    let (flags, rest) = flags(args, &["-e", "--env", "-w", "--workdir", "-u", "--user"])?;
    let mut request = ExecRequest::default();
    let mut stdin = false;
    for (f, v) in flags {
        let v = v.unwrap_or_default();
        match f.as_str() {
            "-i" | "--interactive" => stdin = true,
            "-t" | "--tty" => request.tty = true,
            "-e" | "--env" => {
                let (k, val) = env_pair(&v)?;
                request.env.insert(k, val);
            }
            "-w" | "--workdir" => request.workdir = Some(v),
            "-u" | "--user" => request.user = Some(v),
            other => return Err(usage!("exec: unknown flag {other:?}; see `cup help`")),
        }
    }
    let (name, argv) = match rest.split_first() {
        Some((n, a)) if !a.is_empty() => (n, a),
        _ => {
            return Err(usage!(
                "exec needs a workload and a command, like `cup exec web ls /`"
            ))
        }
    };
    request.argv = argv.to_vec();
    let uds = p.socket(name)?;
    let conn = attach::start_exec(std::path::Path::new(&uds), &request)?;
    let status = attach::session(conn, stdin, request.tty).map_err(|e| CupError::Workload {
        name: name.to_string(),
        why: steelcup_sys::error_chain(&e),
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

/// `cup kill [-s SIGNAL] NAME...`: a signal (KILL unless given) to each
/// workload's processes in its VM.
pub fn kill(p: &Vmm1ClientProxy<'static>, args: &[String]) -> Result<u8, CupError> {
    let (flags, names) = flags(args, &["-s", "--signal"])?;
    let mut signal = libc::SIGKILL;
    for (f, v) in flags {
        match f.as_str() {
            "-s" | "--signal" => signal = parse_signal(&v.unwrap_or_default())?,
            other => return Err(usage!("kill: unknown flag {other:?}")),
        }
    }
    if names.is_empty() {
        return Err(usage!("kill needs a workload name (see `cup ps`)"));
    }
    for n in &names {
        p.kill(n, signal)?;
        println!("{n}");
    }
    Ok(0)
}

/// `cup inspect NAME...`: what vmmd knows of each, as a JSON array.
pub fn inspect(p: &Vmm1ClientProxy<'static>, args: &[String]) -> Result<u8, CupError> {
    if args.is_empty() {
        return Err(usage!("inspect needs a workload name (see `cup ps`)"));
    }
    let mut all = Vec::new();
    for n in args {
        let json = p.inspect(n)?;
        all.push(serde_json::from_str::<serde_json::Value>(&json)?);
    }
    println!("{}", serde_json::to_string_pretty(&all)?);
    Ok(0)
}

/// `cup rm [-f] NAME...`: forgets ended workloads (`-f` stops them first).
pub fn rm(p: &Vmm1ClientProxy<'static>, args: &[String]) -> Result<u8, CupError> {
    let force = args.iter().any(|a| a == "-f" || a == "--force");
    let names: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    if names.is_empty() {
        return Err(usage!("rm needs a workload name (see `cup ps`)"));
    }
    for n in names {
        if force {
            let _ = p.stop(n);
        }
        p.remove(n)?;
        println!("{n}");
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
fn connect_again() -> Result<Vmm1ClientProxy<'static>, CupError> {
    let socket = std::env::var_os("STEELCUP_VMMD_SOCKET")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| steelcup_api::vmm1::DEFAULT_SOCKET.into());
    Ok(steelcup_api::vmm1::connect(&socket)?)
}

/// `cup pull SOURCE`, `cup images`, `cup rmi NAME`, `cup image prune`.
pub fn image_verb(
    p: &Vmm1ClientProxy<'static>,
    verb: &str,
    args: &[String],
    json: bool,
) -> Result<u8, CupError> {
    match verb {
        "pull" => {
            let source = args
                .first()
                .ok_or_else(|| usage!("pull needs an image, like `cup pull localhost:5000/app:1`"))?
                .clone();
            // The pull is one call on its own connection; this one polls
            // `Pulls` to draw the bar meanwhile.
            let call = std::thread::spawn({
                let source = source.clone();
                move || -> Result<(String, String), CupError> {
                    Ok(connect_again()?.pull(&source)?)
                }
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
        }
        "images" => {
            let images = p.images()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&images)?);
            } else {
                println!("{:<56} {:<19} {:>10}  ROOT IMAGE", "NAME", "DIGEST", "SIZE");
                for i in images {
                    println!(
                        "{:<56} {:<19} {:>10}  {}",
                        i.name,
                        &i.digest[..19.min(i.digest.len())],
                        steelcup_api::human(i.size),
                        if i.rootfs { "built" } else { "-" }
                    );
                }
            }
        }
        "rmi" => {
            let name = args
                .first()
                .ok_or_else(|| usage!("rmi needs an image name (see `cup images`)"))?;
            p.remove_image(name)?;
            println!("untagged {name}");
        }
        "prune" => println!("{}", p.prune()?),
        other => return Err(usage!("unknown image verb {other:?}")),
    }
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
pub fn attach(p: &Vmm1ClientProxy<'static>, args: &[String]) -> Result<u8, CupError> {
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
    let (flags, names) = flags(args, &[])?;
    let mut proxy_signals = true;
    for (f, v) in flags {
        match (f.as_str(), v.as_deref()) {
            ("--no-sig-proxy", None) | ("--sig-proxy", Some("false")) => proxy_signals = false,
            ("--sig-proxy", None | Some("true")) => proxy_signals = true,
            (other, _) => return Err(usage!("attach: unknown flag {other:?}; see `cup help`")),
        }
    }
    let [name] = names.as_slice() else {
        return Err(usage!("attach needs one workload name (see `cup ps`)"));
    };
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

/// `cup logs [-f] [-n N] NAME`: a workload's console output; with `-f`,
/// new lines as they come until the workload has ended.
pub fn logs(p: &Vmm1ClientProxy, name: &str, lines: u32, follow: bool) -> Result<u8, CupError> {
    let api = |e: zbus::Error| match e {
        zbus::Error::MethodError(n, _, _) if n.as_str().ends_with(".NoSuchVm") => {
            CupError::NoWorkloadLog(name.to_string())
        }
        e => e.into(),
    };
    let (first, mut cursor, mut running) = p.tail(name, lines).map_err(api)?;
    let mut out = std::io::stdout().lock();
    for (_, l) in first {
        let _ = writeln!(out, "{l}");
    }
    let _ = out.flush();
    if !follow {
        return Ok(0);
    }
    // Until the workload has ended and its log is read.
    loop {
        let (more, next, still) = p.logs(name, cursor, 1000).map_err(api)?;
        if more.is_empty() {
            if !running {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        for (_, l) in more {
            let _ = writeln!(out, "{l}");
        }
        let _ = out.flush();
        (cursor, running) = (next, still);
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn flags_stop_at_the_image_and_split_clusters() {
        let (f, rest) = flags(
            &s(&[
                "-it", "--rm", "--name", "web", "-e", "A=1", "img", "sh", "-c", "x",
            ]),
            &["--name", "-e"],
        )
        .unwrap();
        assert_eq!(
            f,
            vec![
                ("-i".to_string(), None),
                ("-t".to_string(), None),
                ("--rm".to_string(), None),
                ("--name".to_string(), Some("web".to_string())),
                ("-e".to_string(), Some("A=1".to_string())),
            ]
        );
        assert_eq!(rest, s(&["img", "sh", "-c", "x"]));
        let (f, rest) = flags(&s(&["--memory=64MiB", "--", "-img"]), &["--memory"]).unwrap();
        assert_eq!(f, vec![("--memory".to_string(), Some("64MiB".to_string()))]);
        assert_eq!(rest, s(&["-img"]));
        assert!(flags(&s(&["--name"]), &["--name"])
            .unwrap_err()
            .to_string()
            .contains("needs a value"));
    }

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
    fn env_pairs() {
        assert_eq!(env_pair("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert!(env_pair("=x").is_err());
    }
}
