//! `cup compose`: a Docker Compose project run as steelcup units.
//!
//! Each service becomes a `[microvm]` unit `PROJECT-SERVICE` ([`map`]),
//! sent with `cup apply`'s API: init checks the set whole, keeps the files
//! across reboots and reloads, and vmmd reconciles what changed (a service
//! whose image or settings changed is rolled; the others are left alone).
//! The verbs that read what runs (`ps`, `logs`, `exec`, `restart`) find
//! the project's workloads by their units.

pub mod load;
pub mod map;

use crate::cli::{ComposeArgs, ComposeCommand, ExecArgs, LogsArgs, PsArgs};
use crate::error::{usage, CupError};
use map::ServiceUnit;
use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use steelcup_api::vmm1::{VmInfo, Vmm1ClientProxy};

/// A project: its name and, when its files were read, its units.
struct Project {
    name: String,
    loaded: Option<load::Loaded>,
    units: Vec<ServiceUnit>,
}

/// The project name as Compose makes it: lowercase letters, digits, `_`
/// and `-`, starting with a letter or digit.
pub fn normalize_name(raw: &str) -> Option<String> {
    let n: String = raw
        .to_ascii_lowercase()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .collect();
    let n = n.trim_start_matches(['_', '-']).to_string();
    (!n.is_empty() && n.len() <= 40).then_some(n)
}

fn env_vars() -> BTreeMap<String, String> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect()
}

/// Reads the project's files; `files_needed`: a verb that can work with
/// `-p` alone (ps, logs, down...) goes on without them.
fn project(a: &ComposeArgs, files_needed: bool) -> Result<Project, CupError> {
    let cwd = std::env::current_dir().map_err(CupError::file("read", std::path::Path::new(".")))?;
    let files = load::find_files(&cwd, &a.files);
    let env = env_vars();
    let loaded = match files.and_then(|f| load::load(&f, &env)) {
        Ok(l) => Some(l),
        Err(e) if files_needed || a.project.is_none() => return Err(usage!("{e}")),
        Err(_) => None,
    };
    let raw = a
        .project
        .clone()
        .or_else(|| env.get("COMPOSE_PROJECT_NAME").cloned())
        .or_else(|| {
            let l = loaded.as_ref()?;
            l.value.get("name")?.as_str().map(str::to_string)
        })
        .or_else(|| {
            let dir = loaded.as_ref().map_or(cwd.clone(), |l| l.dir.clone());
            let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
            dir.file_name().map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_default();
    let name = normalize_name(&raw).ok_or_else(|| {
        usage!(
            "project name {raw:?}: give one with -p NAME (letters, digits, '_', '-'; at most 40)"
        )
    })?;
    let profiles: Vec<String> = a
        .profiles
        .iter()
        .cloned()
        .chain(
            env.get("COMPOSE_PROFILES")
                .into_iter()
                .flat_map(|p| p.split(',').map(str::to_string).collect::<Vec<_>>()),
        )
        .collect();
    let units = match &loaded {
        Some(l) => map::units(&name, l, &profiles).map_err(|e| usage!("{e}"))?,
        None => Vec::new(),
    };
    Ok(Project {
        name,
        loaded,
        units,
    })
}

/// The machine's units of project `name`.
fn installed(name: &str) -> Result<Vec<String>, CupError> {
    Ok(crate::proxy()?
        .list_units()?
        .into_iter()
        .filter(|u| map::owner(&u.description).is_some_and(|(p, _)| p == name))
        .map(|u| u.name)
        .collect())
}

/// The workloads of the project's units (of `services` only, if given),
/// by name.
fn workloads(
    p: &Vmm1ClientProxy<'static>,
    project: &str,
    services: &[String],
) -> Result<Vec<VmInfo>, CupError> {
    let mut vms: Vec<VmInfo> = p
        .list()?
        .into_iter()
        .filter(|v| v.labels.get(map::PROJECT_LABEL).map(String::as_str) == Some(project))
        .filter(|v| v.unit.starts_with(&format!("{project}-")))
        .filter(|v| {
            services.is_empty()
                || v.labels
                    .get(map::SERVICE_LABEL)
                    .is_some_and(|s| services.contains(s))
        })
        .collect();
    vms.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(vms)
}

pub fn run(a: ComposeArgs) -> Result<ExitCode, CupError> {
    match &a.command {
        ComposeCommand::Config {
            units,
            services,
            quiet,
        } => {
            let pr = project(&a, true)?;
            if *quiet {
                return Ok(ExitCode::SUCCESS);
            }
            if *services {
                for u in &pr.units {
                    println!("{}", u.service);
                }
            } else if *units {
                for u in &pr.units {
                    println!("# {}.toml\n{}", u.unit, u.text());
                }
            } else {
                let mut v = pr.loaded.map(|l| l.value).unwrap_or_default();
                if let Some(m) = v.as_mapping_mut() {
                    m.insert("name".into(), pr.name.clone().into());
                }
                print!("{}", serde_yaml::to_string(&v).map_err(|e| usage!("{e}"))?);
            }
        }
        ComposeCommand::Up {
            detach,
            wait,
            wait_timeout,
            dry_run,
        } => {
            let pr = project(&a, true)?;
            if pr.units.is_empty() {
                return Err(usage!("project {}: no services to start", pr.name));
            }
            let init = crate::proxy()?;
            let before = installed(&pr.name)?;
            let files: Vec<(String, String)> = pr
                .units
                .iter()
                .map(|u| (format!("{}.toml", u.unit), u.text()))
                .collect();
            let s = init.apply(&files, *dry_run)?;
            crate::print_summary(if *dry_run { "would apply" } else { "applied" }, &s);
            for e in &s.errors {
                eprintln!("{e}");
            }
            // Services gone from the files: their units go.
            for orphan in before
                .iter()
                .filter(|n| !pr.units.iter().any(|u| &u.unit == *n))
            {
                if *dry_run {
                    println!("would remove {orphan} (no longer a service)");
                } else {
                    init.remove_unit(orphan)?;
                    println!("removed {orphan} (no longer a service)");
                }
            }
            if *dry_run {
                return Ok(ExitCode::SUCCESS);
            }
            let p = crate::vmmd()?;
            let ok = wait_up(&p, &pr, *wait, Duration::from_secs(*wait_timeout))?;
            if !ok {
                return Ok(ExitCode::FAILURE);
            }
            if !*detach {
                return follow(&pr.name, &[], true, 10, false);
            }
        }
        ComposeCommand::Down { volumes } => {
            let pr = project(&a, false)?;
            let init = crate::proxy()?;
            let units = installed(&pr.name)?;
            if units.is_empty() {
                println!("project {}: no units on the machine", pr.name);
            }
            for u in &units {
                init.remove_unit(u)?;
                println!("removed {u}");
            }
            let p = crate::vmmd()?;
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let left: Vec<String> = p
                    .list()?
                    .into_iter()
                    .filter(|v| units.contains(&v.unit))
                    .map(|v| v.name)
                    .collect();
                if left.is_empty() {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(usage!("still stopping after 60 s: {}", left.join(", ")));
                }
                std::thread::sleep(Duration::from_millis(300));
            }
            if *volumes {
                let gone = p
                    .volumes()?
                    .into_iter()
                    .filter(|v| units.iter().any(|u| v.name.starts_with(&format!("{u}/"))));
                for v in gone {
                    p.remove_volume(&v.name)?;
                    println!("removed volume {}", v.name);
                }
            }
        }
        ComposeCommand::Ps { all, quiet, format } => {
            let pr = project(&a, false)?;
            let args = PsArgs {
                all: *all,
                quiet: *quiet,
                filter: vec![crate::view::Filter::Label(
                    map::PROJECT_LABEL.into(),
                    Some(pr.name.clone()),
                )],
                format: format.clone(),
                no_trunc: false,
            };
            return crate::code(crate::workloads::ps(&crate::vmmd()?, &args));
        }
        ComposeCommand::Logs {
            follow: f,
            tail,
            timestamps,
            services,
        } => {
            let pr = project(&a, false)?;
            return follow(&pr.name, services, *f, *tail, *timestamps);
        }
        ComposeCommand::Exec {
            detach,
            no_tty,
            env,
            workdir,
            user,
            index,
            service,
            command,
        } => {
            let pr = project(&a, false)?;
            let p = crate::vmmd()?;
            let vms = workloads(&p, &pr.name, std::slice::from_ref(service))?;
            let running: Vec<&VmInfo> = vms.iter().filter(|v| v.pid != 0).collect();
            let vm = running.get(index.saturating_sub(1)).ok_or_else(|| {
                usage!(
                    "service {service} of project {}: {} running (see cup compose ps)",
                    pr.name,
                    if running.is_empty() {
                        "none".to_string()
                    } else {
                        format!("only {}", running.len())
                    }
                )
            })?;
            let terminal = nix::unistd::isatty(std::io::stdin()).unwrap_or(false);
            let tty = !*detach && !*no_tty && terminal;
            let e = ExecArgs {
                interactive: !*detach,
                tty,
                env: env.clone(),
                workdir: workdir.clone(),
                user: user.clone(),
                detach: *detach,
                name: vm.name.clone(),
                command: command.clone(),
            };
            return crate::code(crate::workloads::exec(&p, e));
        }
        ComposeCommand::Restart { services } => {
            let pr = project(&a, false)?;
            let p = crate::vmmd()?;
            let vms = workloads(&p, &pr.name, services)?;
            for v in &vms {
                p.stop(&v.name)?;
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            for v in &vms {
                while p.list()?.iter().any(|x| x.name == v.name && x.pid != 0) {
                    if Instant::now() > deadline {
                        return Err(usage!("{} still stopping after 30 s", v.name));
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                p.start(&v.name)?;
                println!("restarted {}", v.name);
            }
        }
        ComposeCommand::Pull { services } => {
            let pr = project(&a, true)?;
            let p = crate::vmmd()?;
            let mut failed = false;
            for u in pr
                .units
                .iter()
                .filter(|u| services.is_empty() || services.contains(&u.service))
            {
                let image = u
                    .file
                    .microvm
                    .as_ref()
                    .and_then(|m| m.image.clone())
                    .unwrap_or_default();
                println!("{}: pulling {image}", u.service);
                failed |= crate::workloads::pull(&p, &image)? != 0;
            }
            if failed {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Waits until every service has its replicas started (running, or run
/// and ended), and with `healthy` until each checked one is healthy.
fn wait_up(
    p: &Vmm1ClientProxy<'static>,
    pr: &Project,
    healthy: bool,
    timeout: Duration,
) -> Result<bool, CupError> {
    let deadline = Instant::now() + timeout;
    let mut said: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let vms = workloads(p, &pr.name, &[])?;
        let mut all = true;
        for u in &pr.units {
            let m = u.file.microvm.as_ref();
            let want = m.map_or(1, |m| m.replicas) as usize;
            let mine: Vec<&VmInfo> = vms.iter().filter(|v| v.unit == u.unit).collect();
            let started = mine
                .iter()
                .filter(|v| {
                    let up = v.pid != 0 || v.runs > 0;
                    up && (!healthy
                        || v.health.is_empty()
                        || v.health == "none"
                        || v.health == "healthy")
                })
                .count()
                // While a changed service rolls, old and new VMs are both
                // there: at most the replicas wanted count.
                .min(want);
            let state = match mine
                .iter()
                .find(|v| !v.last_outcome.is_empty() && v.pid == 0)
            {
                Some(v) if started < want => {
                    format!("{started} of {want} started ({})", v.last_outcome)
                }
                _ => format!("{started} of {want} started"),
            };
            if said.get(&u.service) != Some(&state) {
                println!("service {}: {state}", u.service);
                said.insert(u.service.clone(), state);
            }
            all &= started >= want;
        }
        if all {
            return Ok(true);
        }
        if Instant::now() > deadline {
            eprintln!(
                "cup: not all services started within {} s; see cup compose ps and cup compose logs",
                timeout.as_secs()
            );
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A writer that puts `prefix` before each line.
struct Prefixed<W: Write> {
    out: W,
    prefix: String,
    at_start: bool,
}

impl<W: Write> Write for Prefixed<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for line in buf.split_inclusive(|b| *b == b'\n') {
            if self.at_start {
                self.out.write_all(self.prefix.as_bytes())?;
            }
            self.out.write_all(line)?;
            self.at_start = line.ends_with(b"\n");
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// The logs of the project's workloads, each line after its workload's
/// name; `-f` follows them all at once.
fn follow(
    project: &str,
    services: &[String],
    follow: bool,
    tail: u32,
    timestamps: bool,
) -> Result<ExitCode, CupError> {
    let p = crate::vmmd()?;
    let vms = workloads(&p, project, services)?;
    if vms.is_empty() {
        return Err(usage!(
            "project {project}: no workloads (cup compose up first)"
        ));
    }
    let width = vms.iter().map(|v| v.name.len()).max().unwrap_or(0);
    let args = |name: &str| LogsArgs {
        unit: None,
        follow,
        tail,
        since: None,
        until: None,
        timestamps,
        name: Some(name.to_string()),
    };
    let prefixed = |name: &str| Prefixed {
        out: std::io::stdout(),
        prefix: format!("{name:<width$} | "),
        at_start: true,
    };
    if !follow {
        for v in &vms {
            let src = crate::workloads::WorkloadLog {
                p: &p,
                name: &v.name,
            };
            crate::logs::show(&src, &args(&v.name), &mut prefixed(&v.name))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let threads: Vec<_> = vms
        .iter()
        .map(|v| {
            let (name, a, mut out) = (v.name.clone(), args(&v.name), prefixed(&v.name));
            std::thread::spawn(move || -> Result<(), String> {
                let p = crate::vmmd().map_err(|e| e.to_string())?;
                let src = crate::workloads::WorkloadLog { p: &p, name: &name };
                crate::logs::show(&src, &a, &mut out).map_err(|e| e.to_string())?;
                Ok(())
            })
        })
        .collect();
    for t in threads {
        if let Ok(Err(e)) = t.join() {
            eprintln!("cup: {e}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
