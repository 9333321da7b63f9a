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
mod archive;
mod cli;
mod compose;
mod context;
mod copy;
mod cron;
mod error;
mod host;
mod login;
mod logs;
mod metrics;
mod stats;
mod system;
mod top;
mod update;
mod view;
mod volumes;
mod workloads;

use clap::Parser;
use cli::{Cli, Command, ImageCommand, MachineCommand, UnitCommand};
use error::{usage, CupError};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use steelcup_api::init1::UnitInfo;
use steelcup_api::init1::{self as client, Init1Proxy};

fn main() -> ExitCode {
    // Like any Unix filter: `cup logs ... | head` ends cup quietly when the
    // reader goes away, instead of a panic on a broken pipe.
    // SAFETY: restores the default disposition of SIGPIPE before any thread
    // or I/O exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // As docker run: 125 when cup run itself fails.
            let run = std::env::args().nth(1).as_deref() == Some("run");
            let _ = e.print();
            return ExitCode::from(match e.exit_code() {
                0 => 0,
                _ if run => 125,
                c => c as u8,
            });
        }
    };
    let mut asked = context::Asked::from_env();
    if let Some(v) = &cli.host {
        let path = v.strip_prefix("unix:").unwrap_or(v);
        let _ = VMMD_SOCKET.set(path.into());
        asked.context = Some(context::LOCAL.into());
    }
    if let Some(c) = &cli.context {
        asked.context = Some(c.clone());
    }
    if let Some(r) = &cli.remote {
        asked.remote = Some(r.clone());
    }
    if let Some(d) = &cli.tls_dir {
        asked.tls_dir = Some(d.clone());
    }
    // Verbs that reach no machine do not read the contexts.
    if !cli.command.offline() {
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
    let is_run = matches!(cli.command, Command::Run(_));
    match run(cli.command, &asked) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cup: {e}");
            match e {
                _ if is_run => ExitCode::from(125),
                CupError::Usage(_) => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// `--format json`, for the verbs that know only it and their table.
fn json(format: &Option<String>) -> Result<bool, CupError> {
    match format.as_deref() {
        None | Some("table") => Ok(false),
        Some("json") => Ok(true),
        Some(other) => Err(usage!("--format {other:?}: table or json")),
    }
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
fn machine(m: MachineCommand) -> Result<ExitCode, CupError> {
    match m {
        MachineCommand::Apply { dry_run, file } => {
            let text = read_bounded(&file, steelcup_os::provision::MAX_BYTES)?;
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
        MachineCommand::Show => print!("{}", proxy()?.machine_show()?),
        MachineCommand::Reset { wipe_all_data: true } => {
            proxy()?.machine_reset("wipe-all-data")?;
            println!("the state partition is wiped at the next boot; rebooting");
        }
        MachineCommand::Reset { wipe_all_data: false } => {
            return Err(usage!(
                "machine reset wipes /var (workloads' volumes, images, logs, the applied config) and provisions the machine again: confirm with `cup machine reset --wipe-all-data`"
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

/// `cup validate`: the whole set as init reads it: each file with its
/// drop-ins (a directory: every unit in it), then the dependency graph
/// (cycles, a `requires` of a unit that is not in the set).
fn validate(paths: &[PathBuf]) -> ExitCode {
    let (mut units, mut errors) = (Vec::new(), Vec::new());
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let (u, e) = steelcup_units::load_dir(path);
            units.extend(u);
            errors.extend(e);
        } else {
            files.push(path.clone());
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
    if errors.is_empty() && plan.refused.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// A unit's log, for `cup logs --unit NAME`: followed until cup is
/// interrupted.
struct UnitLog<'a> {
    p: Init1Proxy<'static>,
    unit: &'a str,
}

impl logs::Source for UnitLog<'_> {
    fn tail(&self, n: u32) -> Result<(Vec<steelcup_api::vmm1::TimedLine>, u64, bool), CupError> {
        let (lines, next) = self.p.tail_timed(self.unit, n)?;
        Ok((lines, next, true))
    }
    fn read(
        &self,
        cursor: u64,
    ) -> Result<(Vec<steelcup_api::vmm1::TimedLine>, u64, bool), CupError> {
        let (lines, next) = self.p.logs_timed(self.unit, cursor, 1000)?;
        Ok((lines, next, true))
    }
}

/// The same action on each workload named, as Docker does: each name
/// printed once done; an error for one is said and the others go on
/// (exit code 1 if any failed).
fn each(
    names: &[String],
    mut act: impl FnMut(&str) -> Result<(), CupError>,
) -> Result<ExitCode, CupError> {
    let mut failed = false;
    for n in names {
        match act(n) {
            Ok(()) => println!("{n}"),
            Err(e) => {
                eprintln!("cup: {e}");
                failed = true;
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn run(command: Command, asked: &context::Asked) -> Result<ExitCode, CupError> {
    match command {
        Command::Version => println!("cup {}", env!("CARGO_PKG_VERSION")),
        Command::Completion(c) => {
            clap_complete::generate(
                c.shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "cup",
                &mut std::io::stdout(),
            );
        }
        Command::Man { dir } => {
            std::fs::create_dir_all(&dir).map_err(CupError::file("create", &dir))?;
            clap_mangen::generate_to(<Cli as clap::CommandFactory>::command(), &dir)
                .map_err(CupError::file("write man pages into", &dir))?;
        }
        Command::Context(c) => return code(context::command(c, asked)),
        Command::Validate(v) => return Ok(validate(&v.paths)),
        Command::Units(f) => {
            let json = json(&f.format)?;
            let units = proxy()?.list_units()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&units)?);
            } else {
                print_units(&units);
            }
        }
        Command::Unit(u) => {
            let p = proxy()?;
            match u {
                UnitCommand::Status { name, format } => {
                    let json = json(&format.format)?;
                    let u = p.status(&name)?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&u)?);
                    } else {
                        print_units(&[u]);
                    }
                }
                UnitCommand::Start { name } => p.start(&name)?,
                UnitCommand::Stop { name } => p.stop(&name)?,
                UnitCommand::Restart { name } => p.restart(&name)?,
                UnitCommand::Cat { name } => print!("{}", p.cat_unit(&name)?),
                UnitCommand::Rm { name } => print_summary("removed", &p.remove_unit(&name)?),
            }
        }
        Command::Logs(l) => match (&l.unit, &l.name) {
            (Some(unit), _) => {
                let src = UnitLog { p: proxy()?, unit };
                return code(logs::show(&src, &l, &mut std::io::stdout().lock()));
            }
            (None, Some(name)) => {
                let p = vmmd()?;
                let src = crate::workloads::WorkloadLog { p: &p, name };
                return code(logs::show(&src, &l, &mut std::io::stdout().lock()));
            }
            (None, None) => return Err(usage!("logs needs a workload name or --unit NAME")),
        },
        Command::Apply(a) => {
            let files = apply::read_files(&a.paths)?;
            let s = proxy()?.apply(&files, a.dry_run)?;
            print_summary(if a.dry_run { "would apply" } else { "applied" }, &s);
        }
        Command::Machine(m) => return machine(m),
        Command::Reload => {
            let s = proxy()?.reload()?;
            print_summary("reloaded", &s);
            for e in &s.errors {
                eprintln!("{e}");
            }
            if !s.errors.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Update(u) => {
            if u.status {
                let json = json(&u.format)?;
                return code(crate::update::status(&proxy()?, json));
            }
            let source = u.source.unwrap_or_default();
            return code(crate::update::update(
                &proxy()?,
                &source,
                !u.reboot.no_reboot,
                &steelcup_api::bus::run_dir(),
            ));
        }
        Command::Rollback(r) => return code(crate::update::rollback(&proxy()?, !r.no_reboot)),
        Command::Dmesg(a) => return code(crate::host::dmesg(&proxy()?, &a)),
        Command::Health(f) => {
            let json = json(&f.format)?;
            return code(crate::host::health(&proxy()?, vmmd(), json));
        }
        Command::Metrics(m) => {
            return code(match &m.listen {
                Some(listen) => crate::metrics::serve(listen, m.tls_dir.as_deref(), proxy, vmmd),
                None => crate::metrics::metrics(&proxy()?, vmmd()),
            })
        }
        Command::SupportBundle { output } => {
            return code(crate::host::support_bundle(
                &proxy()?,
                vmmd(),
                output.as_deref(),
            ))
        }
        Command::Poweroff => proxy()?.power_off()?,
        Command::Reboot => proxy()?.reboot()?,
        Command::Ps(ps) => return code(crate::workloads::ps(&vmmd()?, &ps)),
        Command::Compose(c) => return compose::run(c),
        Command::Stats(s) => return code(crate::stats::stats(&vmmd()?, &s)),
        Command::Top { name: Some(name) } => return code(crate::top::top(&vmmd()?, &name)),
        Command::Top { name: None } => return code(crate::host::top(&proxy()?, vmmd())),
        Command::Login {
            username,
            password,
            password_stdin,
            registry,
        } => {
            let a = crate::login::LoginArgs {
                registry,
                username,
                password,
                password_stdin,
            };
            return code(crate::login::login(&vmmd()?, a));
        }
        Command::Logout { registry } => return code(crate::login::logout(&vmmd()?, registry)),
        Command::Rename { name, new_name } => vmmd()?.rename(&name, &new_name)?,
        Command::Cp { src, dst } => return code(crate::copy::cp(&vmmd()?, &src, &dst)),
        Command::Run(r) if r.schedule.is_some() => {
            let (file, text) = crate::cron::unit_of_run(*r)?;
            let s = proxy()?.apply(&[(file.clone(), text)], false)?;
            print_summary("applied", &s);
            let name = file.trim_end_matches(".toml");
            println!("scheduled as unit {name}: cup cron ls, cup cron history {name}; cup unit rm {name} ends it");
        }
        Command::Run(r) => return code(vmmd().and_then(|p| crate::workloads::run(&p, *r))),
        Command::Exec(e) => return code(crate::workloads::exec(&vmmd()?, e)),
        Command::Rm(r) => {
            let p = vmmd()?;
            return each(&r.names, |n| {
                if r.force {
                    let _ = p.stop_within(n, 0);
                }
                Ok(p.remove(n)?)
            });
        }
        Command::Pull(a) | Command::Image(ImageCommand::Pull(a)) => {
            return code(crate::workloads::pull(&vmmd()?, &a.image))
        }
        Command::Images(a) | Command::Image(ImageCommand::Ls(a)) => {
            return code(crate::workloads::images(&vmmd()?, &a))
        }
        Command::Rmi(n) | Command::Image(ImageCommand::Rm(n)) => {
            let p = vmmd()?;
            let mut failed = false;
            for name in &n.names {
                match p.remove_image(name) {
                    Ok(()) => println!("untagged {name}"),
                    Err(e) => {
                        eprintln!("cup: {}", CupError::from(e));
                        failed = true;
                    }
                }
            }
            return Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            });
        }
        Command::Image(ImageCommand::Prune) => println!("{}", vmmd()?.prune()?),
        Command::Image(ImageCommand::Inspect { format, names }) => {
            let p = vmmd()?;
            return code(view::inspect_each(&names, format.as_deref(), |n| {
                Ok(serde_json::from_str(&p.inspect_image(n)?)?)
            }));
        }
        Command::Tag { source, target } | Command::Image(ImageCommand::Tag { source, target }) => {
            vmmd()?.tag_image(&source, &target)?;
        }
        Command::Save(a) | Command::Image(ImageCommand::Save(a)) => {
            return code(crate::archive::save(&vmmd()?, &a))
        }
        Command::Load(a) | Command::Image(ImageCommand::Load(a)) => {
            return code(crate::archive::load(&vmmd()?, &a))
        }
        Command::System(cli::SystemCommand::Df) => return code(crate::system::df(&vmmd()?)),
        Command::System(cli::SystemCommand::Prune { all, volumes, .. }) => {
            return code(crate::system::prune(&vmmd()?, all, volumes))
        }
        Command::Volume(v) => return code(crate::volumes::volume(&vmmd()?, v)),
        Command::Cron(c) => return code(crate::cron::cron(&vmmd()?, c)),
        Command::Pause(n) => {
            let p = vmmd()?;
            return each(&n.names, |name| Ok(p.pause(name)?));
        }
        Command::Unpause(n) => {
            let p = vmmd()?;
            return each(&n.names, |name| Ok(p.resume(name)?));
        }
        Command::Start(n) => {
            let p = vmmd()?;
            return each(&n.names, |name| Ok(p.start(name)?));
        }
        Command::Stop(s) => {
            let p = vmmd()?;
            return each(&s.names, |name| {
                match s.time {
                    Some(t) => p.stop_within(name, t)?,
                    None => p.stop(name)?,
                }
                Ok(())
            });
        }
        Command::Kill(k) => {
            let p = vmmd()?;
            return each(&k.names, |name| Ok(p.kill(name, k.signal)?));
        }
        Command::Attach(a) => return code(crate::workloads::attach(&vmmd()?, &a)),
        Command::Wait(n) => return code(crate::workloads::wait(&vmmd()?, &n.names)),
        Command::Port(a) => return code(crate::workloads::port(&vmmd()?, &a)),
        Command::Events => {
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
        Command::Inspect(i) => return code(crate::workloads::inspect(&vmmd()?, &i)),
    }
    Ok(ExitCode::SUCCESS)
}
