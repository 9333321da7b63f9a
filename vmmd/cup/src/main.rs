//! `cup`: steelcup's command-line interface.
//!
//! Host verbs talk to init's `org.steelcup.Init1` on `$STEELCUP_RUN_DIR/init.sock`
//! (default `/run/steelcup`): `cup units`, `cup unit status|start|stop|restart
//! NAME`, `cup logs --unit NAME [-f] [-n N]`, `cup reload`, `cup poweroff`,
//! `cup reboot`, `cup update`, `cup rollback`. Workload verbs talk to vmmd's `org.steelcup.Vmm1` on
//! `$STEELCUP_VMMD_SOCKET` (default `/run/steelcup/vmmd.sock`): `cup ps`,
//! `cup pause NAME`, `cup unpause NAME`, `cup stop NAME`, `cup start NAME`,
//! `cup run`, `cup exec`, `cup rm`, `cup pull`, `cup images`, `cup rmi`,
//! `cup image prune` (see [`crate::workloads`]). `cup validate FILE...`
//! checks unit files offline.

mod apply;
mod context;
mod error;
mod update;
mod workloads;

use error::{usage, CupError};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;
use steelcup_api::init1::UnitInfo;
use steelcup_api::init1::{self as client, Init1Proxy};
use steelcup_api::vmm1::WorkloadState;

const USAGE: &str = "usage:
  cup units [--format json]          list units: name, kind, state, pid, restarts, last exit
  cup unit status|start|stop|restart NAME [--format json]
  cup logs --unit NAME [-f] [-n N]   a unit's output (-f: follow)
  cup reload                         re-read unit files, apply the difference
  cup apply [--dry-run] FILE|DIR...  send unit files (NAME.toml) to the machine: checked whole there,
                                     then installed and applied like reload (a bad one changes nothing)
  cup machine apply [--dry-run] FILE | cup machine show | cup machine reset --wipe-all-data
                                     the machine config (docs/provisioning.md): checked whole, applied live
                                     where it can be, kept on /var / shown without secrets / back to first boot
  cup unit cat NAME | cup unit rm NAME
                                     a unit's file as the machine reads it / remove a unit cup apply installed
  cup poweroff | cup reboot          stop every unit in order, then power off / reboot
  cup validate UNIT-FILE...          check unit files as the host reads them
  cup update FILE|URL [--no-reboot]  write a new OS (slot.img) into the slot not running, check it, boot it once
  cup update --status [--format json]
                                     the OS slots: which booted, what boots next, each slot's version
  cup rollback [--no-reboot]         boot the other slot's OS next (once), if it holds one
  cup ps [-a] [--format json]        microVM workloads (-a: ended ones too): name, state, pid, runs, vCPUs, memory
  cup pause NAME | cup unpause NAME  stop a workload's vCPUs / let them run again
  cup stop NAME | cup start NAME     ask the guest to stop (killed after 5 s) / start it again
  cup run [-d] [--rm] [-i] [-t] [--name NAME] [-e K=V]... [-v VOLUME:/PATH[:ro]]... [-p [IP:]HOST:GUEST[/udp]]... [--network bridge|none] [--restart POLICY] [--cpus N] [--memory SIZE] IMAGE [CMD...]
                                     run an image as a new microVM; attached, cup exits with its code
  cup exec [-i] [-t] [-e K=V]... [-w DIR] [-u USER] NAME CMD...
                                     run a process inside a running workload
  cup rm [-f] NAME...                forget ended workloads (-f: stop them first)
  cup logs [-f] [-n N] NAME          a workload's console output (-f: follow while it runs)
  cup attach [--no-sig-proxy] NAME   follow a running workload's output until it ends (exit code = its);
                                     signals (Ctrl-C) go to it, or with --no-sig-proxy Ctrl-C detaches
  cup kill [-s SIGNAL] NAME...       a signal (KILL unless given) to a workload's processes
  cup inspect NAME...                what vmmd knows of workloads, as JSON
  cup events                         workload state changes as they happen
  cup pull IMAGE | cup images [--format json] | cup rmi NAME | cup image prune
                                     the image store (IMAGE: REGISTRY/REPO:TAG, oci:DIR:TAG,
                                     oci-archive:FILE:TAG, docker-archive:FILE)
  cup version

  cup context ls | use NAME | show [NAME] | add NAME --remote HOST[:PORT] [--tls-dir DIR] | rm NAME
                                     the machines cup talks to, and which one it uses

cup talks to the machine of its current context (`cup context ls`; `cargo
xtask run` adds and selects `appliance`), else this machine: init at
$STEELCUP_RUN_DIR/init.sock (default /run/steelcup), vmmd at -H/--host PATH
(before the verb), else $STEELCUP_VMMD_SOCKET, else /run/steelcup/vmmd.sock.
Before the verb, --context NAME (or $STEELCUP_CONTEXT) picks another
context, and --remote HOST[:PORT] (or $STEELCUP_REMOTE) another machine's
init and vmmd over mutual TLS (vmmd admin there), with ca.crt, client.crt
and client.key from --tls-dir DIR, $STEELCUP_TLS_DIR or
~/.config/steelcup/tls (docs/remote.md, docs/cli.md).";

fn main() -> ExitCode {
    // Like any Unix filter: `cup logs ... | head` ends cup quietly when the
    // reader goes away, instead of a panic on a broken pipe.
    // SAFETY: restores the default disposition of SIGPIPE before any thread
    // or I/O exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    // `-H PATH` / `--host PATH` / `--host=PATH` before the verb: vmmd's
    // socket (unix:PATH is accepted too). `--remote HOST[:PORT]` (or
    // $STEELCUP_REMOTE): another machine, over mutual TLS with the files
    // in `--tls-dir DIR` (or $STEELCUP_TLS_DIR, else ~/.config/steelcup/tls).
    let mut asked = context::Asked::from_env();
    while let Some(first) = args.first().cloned() {
        let (taken, value) = match first.as_str() {
            "-H" | "--host" => (2, args.get(1).cloned()),
            s if s.starts_with("--host=") => (1, Some(s["--host=".len()..].to_string())),
            "--remote" | "--tls-dir" | "--context" | "-c" => {
                let Some(v) = args.get(1).cloned() else {
                    eprintln!("cup: {first} needs a value");
                    return ExitCode::from(2);
                };
                match first.as_str() {
                    "--remote" => asked.remote = Some(v),
                    "--tls-dir" => asked.tls_dir = Some(v.into()),
                    _ => asked.context = Some(v),
                }
                args.drain(..2);
                continue;
            }
            _ => break,
        };
        let Some(v) = value else {
            eprintln!("cup: {first} needs vmmd's socket, like -H /run/steelcup/vmmd.sock");
            return ExitCode::from(2);
        };
        let path = v.strip_prefix("unix:").unwrap_or(&v);
        let _ = VMMD_SOCKET.set(path.into());
        asked.context = Some(context::LOCAL.into());
        args.drain(..taken);
    }
    // Verbs that reach no machine do not read the contexts.
    let offline = matches!(
        args.first().map(String::as_str),
        None | Some("context" | "validate" | "version" | "--version" | "help" | "--help" | "-h")
    );
    if !offline {
        let target = context::Asked::resolve(&asked, &context::config_dir())
            .and_then(|t| t.check_files().map(|()| t));
        match target {
            Ok(context::Target::Local) => {}
            Ok(context::Target::Remote { addr, tls_dir, .. }) => {
                let _ = steelcup_api::remote::REMOTE
                    .set(steelcup_api::remote::Remote { addr, tls_dir });
            }
            Err(e) => {
                eprintln!("cup: {e}");
                return ExitCode::from(2);
            }
        }
    }
    if args.first().map(String::as_str) == Some("context") {
        return match context::command(&args[1..], &asked) {
            Ok(c) => ExitCode::from(c),
            Err(e) => {
                eprintln!("cup: {e}");
                ExitCode::from(2)
            }
        };
    }
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cup: {e}");
            ExitCode::FAILURE
        }
    }
}

fn json(args: &[String]) -> bool {
    args.windows(2)
        .any(|w| w[0] == "--format" && w[1] == "json")
        || args.iter().any(|a| a == "--format=json")
}

fn proxy() -> Result<Init1Proxy<'static>, CupError> {
    match steelcup_api::remote_stream("init") {
        Some(remote) => {
            let (stream, addr) = remote?;
            Ok(client::init1_over(stream, &addr)?)
        }
        None => Ok(client::connect(&steelcup_api::bus::run_dir())?),
    }
}

/// vmmd's socket: `-H`/`--host`, else `$STEELCUP_VMMD_SOCKET`, else the
/// appliance's.
static VMMD_SOCKET: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

fn vmmd() -> Result<steelcup_api::vmm1::Vmm1ClientProxy<'static>, CupError> {
    let socket = VMMD_SOCKET.get().cloned().unwrap_or_else(|| {
        std::env::var_os("STEELCUP_VMMD_SOCKET")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| steelcup_api::vmm1::DEFAULT_SOCKET.into())
    });
    Ok(steelcup_api::vmm1::connect(&socket)?)
}

/// cup's exit code from a workload verb's result.
fn code(r: Result<u8, CupError>) -> Result<ExitCode, CupError> {
    r.map(ExitCode::from)
}

/// `cup machine apply [--dry-run] FILE | show | reset --wipe-all-data`.
fn machine(args: &[String]) -> Result<ExitCode, CupError> {
    let dry_run = args.iter().any(|a| a == "--dry-run");
    let words: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| *a != "--dry-run")
        .collect();
    match words.as_slice() {
        ["apply", file] => {
            let path = Path::new(file);
            let text = read_bounded(path, steelcup_os::provision::MAX_BYTES)?;
            let (changed, reboot, units) = proxy()?.machine_apply(&text, dry_run)?;
            let verb = if dry_run { "would change" } else { "changed" };
            if changed.is_empty() {
                println!("nothing {verb}: the machine has this config");
            } else {
                println!("{verb}: {}", changed.join(", "));
            }
            if !reboot.is_empty() {
                println!(
                    "{} {} effect at the next boot (`cup reboot`)",
                    reboot.join(", "),
                    if dry_run { "would take" } else { "takes" }
                );
            }
            if !dry_run {
                print_summary("units", &units);
            }
        }
        ["show"] => print!("{}", proxy()?.machine_show()?),
        ["reset", "--wipe-all-data"] => {
            proxy()?.machine_reset("wipe-all-data")?;
            println!("the state partition is wiped at the next boot; rebooting");
        }
        ["reset"] => {
            return Err(usage!(
                "machine reset wipes /var (workloads' volumes, images, logs, the applied config) and provisions the machine again: confirm with `cup machine reset --wipe-all-data`"
            ))
        }
        _ => {
            return Err(usage!(
                "machine needs apply [--dry-run] FILE, show, or reset --wipe-all-data"
            ))
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A file of at most `max` bytes, as text.
fn read_bounded(path: &Path, max: u64) -> Result<String, CupError> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(max + 1).read_to_string(&mut text))
        .map_err(CupError::file("read", path))?;
    if text.len() as u64 > max {
        return Err(usage!("{}: more than {max} bytes", path.display()));
    }
    Ok(text)
}

/// What a reload, an apply or a removal changed (or would).
fn print_summary(what: &str, s: &steelcup_api::init1::ReloadSummary) {
    println!(
        "{what}: started [{}], stopped [{}], restarted [{}]",
        s.started.join(", "),
        s.stopped.join(", "),
        s.restarted.join(", ")
    );
}

fn print_units(units: &[UnitInfo]) {
    println!(
        "{:<24} {:<8} {:<9} {:>7} {:>8} {:>9}  DESCRIPTION",
        "NAME", "KIND", "STATE", "PID", "RESTARTS", "LAST-EXIT"
    );
    for u in units {
        let pid = if u.pid == 0 {
            "-".to_string()
        } else {
            u.pid.to_string()
        };
        let exit = if u.last_exit < 0 {
            "-".to_string()
        } else {
            u.last_exit.to_string()
        };
        let state = if u.reason.is_empty() {
            u.state.clone()
        } else {
            format!("{} ({})", u.state, u.reason)
        };
        println!(
            "{:<24} {:<8} {:<9} {:>7} {:>8} {:>9}  {}",
            u.name, u.kind, state, pid, u.restarts, exit, u.description
        );
    }
}

fn run(args: &[String]) -> Result<ExitCode, CupError> {
    let verb = args.first().map(String::as_str);
    match verb {
        Some("version") | Some("--version") => {
            println!("cup {}", env!("CARGO_PKG_VERSION"));
        }
        Some("validate") if args.len() > 1 => {
            // The whole set as init reads it: each file with its drop-ins
            // (a directory: every unit in it), then the dependency graph
            // (cycles, a `requires` of a unit that is not in the set).
            let (mut units, mut errors) = (Vec::new(), Vec::new());
            let mut files = Vec::new();
            for f in &args[1..] {
                let path = Path::new(f);
                if path.is_dir() {
                    let (u, e) = steelcup_units::load_dir(path);
                    units.extend(u);
                    errors.extend(e);
                } else {
                    files.push(path.to_path_buf());
                }
            }
            let (u, e) = steelcup_units::load_files(&files);
            units.extend(u);
            errors.extend(e);
            let plan = steelcup_units::graph::plan(&units);
            for e in &errors {
                eprintln!("{}", steelcup_sys::error_chain(e));
            }
            for u in &units {
                match plan.refused.get(&u.name) {
                    Some(why) => eprintln!("{}: refused: {why}", u.name),
                    None => println!(
                        "{}: ok ({})",
                        u.name,
                        match u.kind {
                            steelcup_units::UnitKind::Service(_) => "service",
                            steelcup_units::UnitKind::Microvm(_) => "microvm",
                        }
                    ),
                }
            }
            return Ok(if errors.is_empty() && plan.refused.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        Some("units") => {
            let units = proxy()?.list_units()?;
            if json(args) {
                println!("{}", serde_json::to_string_pretty(&units)?);
            } else {
                print_units(&units);
            }
        }
        Some("unit") => {
            let (Some(action), Some(name)) = (args.get(1), args.get(2)) else {
                return Err(usage!("unit needs an action and a unit name\n{USAGE}"));
            };
            let p = proxy()?;
            match action.as_str() {
                "status" => {
                    let u = p.status(name)?;
                    if json(args) {
                        println!("{}", serde_json::to_string_pretty(&u)?);
                    } else {
                        print_units(&[u]);
                    }
                }
                "start" => p.start(name)?,
                "stop" => p.stop(name)?,
                "restart" => p.restart(name)?,
                "cat" => print!("{}", p.cat_unit(name)?),
                "rm" => print_summary("removed", &p.remove_unit(name)?),
                other => {
                    return Err(usage!(
                        "unknown unit action {other:?}; use status, start, stop, restart, cat or rm"
                    ))
                }
            }
        }
        Some("logs") => {
            let (mut unit, mut workload) = (None, None);
            let mut follow = false;
            let mut lines = 100u32;
            let mut it = args[1..].iter();
            while let Some(a) = it.next() {
                match a.as_str() {
                    "--unit" | "-u" => unit = it.next().cloned(),
                    "-f" | "--follow" => follow = true,
                    "-n" | "--tail" => {
                        lines = it
                            .next()
                            .and_then(|n| n.parse().ok())
                            .ok_or_else(|| usage!("-n needs a number"))?
                    }
                    other if workload.is_none() && !other.starts_with('-') => {
                        workload = Some(other.to_string())
                    }
                    other => return Err(usage!("unknown logs option {other:?}")),
                }
            }
            if let (None, Some(name)) = (&unit, workload) {
                return code(crate::workloads::logs(&vmmd()?, &name, lines, follow));
            }
            let unit = unit.ok_or_else(|| usage!("logs needs a workload name or --unit NAME"))?;
            let p = proxy()?;
            let (first, mut cursor) = p.tail(&unit, lines)?;
            for (_, l) in first {
                println!("{l}");
            }
            // A unit's log is followed until cup is interrupted.
            if follow {
                loop {
                    let (more, next) = p.logs(&unit, cursor, 1000)?;
                    if more.is_empty() {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    for (_, l) in more {
                        println!("{l}");
                    }
                    cursor = next;
                }
            }
        }
        Some("apply") => {
            let dry_run = args[1..].iter().any(|a| a == "--dry-run");
            if let Some(bad) = args[1..]
                .iter()
                .find(|a| a.starts_with('-') && *a != "--dry-run")
            {
                return Err(usage!("apply: unknown flag {bad:?}"));
            }
            let paths: Vec<&String> = args[1..].iter().filter(|a| !a.starts_with('-')).collect();
            let files = apply::read_files(&paths)?;
            let s = proxy()?.apply(&files, dry_run)?;
            print_summary(if dry_run { "would apply" } else { "applied" }, &s);
        }
        Some("machine") => return machine(&args[1..]),
        Some("reload") => {
            let s = proxy()?.reload()?;
            print_summary("reloaded", &s);
            for e in &s.errors {
                eprintln!("{e}");
            }
            if !s.errors.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
        }
        Some("update") => {
            return code(crate::update::update(
                &proxy()?,
                &args[1..],
                &steelcup_api::bus::run_dir(),
            ))
        }
        Some("rollback") => return code(crate::update::rollback(&proxy()?, &args[1..])),
        Some("poweroff") => proxy()?.power_off()?,
        Some("reboot") => proxy()?.reboot()?,
        Some("ps") => {
            let all = args[1..].iter().any(|a| a == "-a" || a == "--all");
            let mut vms = vmmd()?.list()?;
            // As docker ps: what runs (or is about to); -a: every workload.
            vms.retain(|v| all || v.state() != Some(WorkloadState::Ended));
            if json(args) {
                println!("{}", serde_json::to_string_pretty(&vms)?);
            } else {
                println!(
                    "{:<16} {:<20} {:>7} {:>5} {:>5} {:>7}  {:<15}  LAST OUTCOME",
                    "NAME", "STATE", "PID", "RUNS", "VCPUS", "MEMORY", "ADDRESS"
                );
                for v in &vms {
                    let state = match v.health.as_str() {
                        "" => v.state.clone(),
                        h => format!("{} ({h})", v.state),
                    };
                    println!(
                        "{:<16} {:<20} {:>7} {:>5} {:>5} {:>6}M  {:<15}  {}",
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
                        if v.address.is_empty() {
                            "-"
                        } else {
                            &v.address
                        },
                        v.last_outcome
                    );
                }
            }
        }
        // As docker run: 125 when cup run itself fails, else the workload's code.
        Some("run") => {
            return match vmmd().and_then(|p| crate::workloads::run(&p, &args[1..])) {
                Ok(c) => Ok(ExitCode::from(c)),
                Err(e) => {
                    eprintln!("cup: {e}");
                    Ok(ExitCode::from(125))
                }
            }
        }
        Some("exec") => return code(crate::workloads::exec(&vmmd()?, &args[1..])),
        Some("rm") => return code(crate::workloads::rm(&vmmd()?, &args[1..])),
        Some(verb @ ("pull" | "images" | "rmi")) => {
            return code(crate::workloads::image_verb(
                &vmmd()?,
                verb,
                &args[1..],
                json(args),
            ))
        }
        Some("image") if args.get(1).map(String::as_str) == Some("prune") => {
            return code(crate::workloads::image_verb(&vmmd()?, "prune", &[], false))
        }
        Some(verb @ ("pause" | "unpause" | "stop" | "start")) => {
            let name = args
                .get(1)
                .ok_or_else(|| usage!("{verb} needs a workload name (see `cup ps`)"))?;
            let p = vmmd()?;
            match verb {
                "pause" => p.pause(name),
                "unpause" => p.resume(name),
                "stop" => p.stop(name),
                _ => p.start(name),
            }?;
            println!("{name}");
        }
        Some("kill") => return code(crate::workloads::kill(&vmmd()?, &args[1..])),
        Some("attach") => return code(crate::workloads::attach(&vmmd()?, &args[1..])),
        Some("events") => {
            let p = vmmd()?;
            let changes = p.receive_workload_changed()?;
            for c in changes {
                let Ok(a) = c.args() else { continue };
                let state = match a.health {
                    "" => a.state.to_string(),
                    h => format!("{} ({h})", a.state),
                };
                println!("{} {state} {}", a.name, a.last_outcome);
            }
        }
        Some("inspect") => return code(crate::workloads::inspect(&vmmd()?, &args[1..])),
        _ => {
            eprintln!("{USAGE}");
            return Ok(ExitCode::from(2));
        }
    }
    Ok(ExitCode::SUCCESS)
}
