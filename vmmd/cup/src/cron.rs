//! `cup cron ls` and `cup cron history UNIT`: the scheduled units
//! (`schedule = ...` in a `[microvm]` unit) and what their runs did. A
//! run's output is its workload's: `cup logs UNIT-YYYYMMDD-HHMM`.

use crate::cli::CronCommand;
use crate::error::{usage, CupError};
use crate::view;
use serde_json::{json, Value};
use steelcup_api::vmm1::{CronInfo, CronRun, Vmm1ClientProxy};

pub fn cron(p: &Vmm1ClientProxy<'static>, c: CronCommand) -> Result<u8, CupError> {
    match c {
        CronCommand::Ls { format } => {
            let format = view::Format::parse(format.as_deref());
            let rows: Vec<Value> = p.cron()?.iter().map(unit_row).collect();
            view::print_rows(&rows, &format, |rows| {
                println!(
                    "{:<20} {:<16} {:<14} {:<8} {:<20} {:<24} LAST RUN",
                    "UNIT", "SCHEDULE", "TIME ZONE", "CONCUR.", "NEXT", "LAST RUN'S WORKLOAD"
                );
                for r in rows {
                    let f = |k: &str| r[k].as_str().unwrap_or_default().to_string();
                    println!(
                        "{:<20} {:<16} {:<14} {:<8} {:<20} {:<24} {}",
                        f("Unit"),
                        f("Schedule"),
                        f("TimeZone"),
                        f("Concurrency"),
                        f("Next"),
                        or_dash(f("LastWorkload")),
                        or_dash(f("LastStatus"))
                    );
                }
            })?;
            Ok(0)
        }
        CronCommand::History { unit, format } => {
            let format = view::Format::parse(format.as_deref());
            let all = p.cron()?;
            let Some(info) = all.iter().find(|c| c.unit == unit) else {
                return Err(usage!(
                    "no scheduled unit named {unit:?}; see `cup cron ls`"
                ));
            };
            let rows: Vec<Value> = info.runs.iter().map(run_row).collect();
            view::print_rows(&rows, &format, |rows| {
                println!(
                    "{:<20} {:<28} {:<9} {:>4}  OUTCOME",
                    "DUE", "WORKLOAD", "STATE", "EXIT"
                );
                for r in rows {
                    let f = |k: &str| r[k].as_str().unwrap_or_default().to_string();
                    let code = r["ExitCode"].as_i64().unwrap_or(-1);
                    let outcome = [f("Outcome"), f("Note")]
                        .into_iter()
                        .filter(|s| !s.is_empty())
                        .collect::<Vec<_>>()
                        .join("; ");
                    println!(
                        "{:<20} {:<28} {:<9} {:>4}  {}",
                        f("Due"),
                        or_dash(f("Workload")),
                        f("State"),
                        if code < 0 {
                            "-".into()
                        } else {
                            code.to_string()
                        },
                        or_dash(outcome)
                    );
                }
            })?;
            Ok(0)
        }
    }
}

fn or_dash(s: String) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s
    }
}

/// Seconds since the Unix epoch as `2026-12-07 21:05` (UTC); empty for 0.
fn time(secs: i64) -> String {
    match chrono::DateTime::from_timestamp(secs, 0) {
        Some(t) if secs != 0 => t.format("%Y-%m-%d %H:%M UTC").to_string(),
        _ => String::new(),
    }
}

fn status(r: &CronRun) -> String {
    match (r.state.as_str(), r.exit_code) {
        ("skipped", _) => "skipped".into(),
        (_, c) if c >= 0 => format!("exited {c} ({})", time(r.due)),
        (s, _) => format!("{s} ({})", time(r.due)),
    }
}

fn unit_row(c: &CronInfo) -> Value {
    let last = c.runs.last();
    json!({
        "Unit": c.unit,
        "Schedule": c.schedule,
        "TimeZone": c.time_zone,
        "Concurrency": c.concurrency,
        "Next": time(c.next_due),
        "Last": time(c.last_due),
        "LastWorkload": last.map(|r| r.workload.clone()).unwrap_or_default(),
        "LastStatus": last.map(status).unwrap_or_default(),
        "Runs": c.runs.len(),
    })
}

fn run_row(r: &CronRun) -> Value {
    json!({
        "Due": time(r.due),
        "Workload": r.workload,
        "State": r.state,
        "ExitCode": r.exit_code,
        "Outcome": r.outcome,
        "Note": r.note,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_history_row_says_when_what_ran_and_how_it_ended() {
        let r = CronRun {
            due: 1_796_677_500,
            workload: "backup-20261207-2105".into(),
            state: "ended".into(),
            outcome: "exited with code 3".into(),
            exit_code: 3,
            note: String::new(),
        };
        let row = run_row(&r);
        assert_eq!(row["Due"], "2026-12-07 21:05 UTC");
        assert_eq!(row["ExitCode"], 3);
        assert_eq!(status(&r), "exited 3 (2026-12-07 21:05 UTC)");
        let skipped = CronRun {
            state: "skipped".into(),
            workload: String::new(),
            exit_code: -1,
            ..r
        };
        assert_eq!(status(&skipped), "skipped");
        assert_eq!(time(0), "");
    }
}

/// `cup run --schedule CRON --name NAME IMAGE [CMD...]`: the scheduled
/// unit it stands for, as `(NAME.toml, text)` for `cup apply`'s API. The
/// options that describe one VM carry over; those of a single attached
/// run (`-i`, `-t`, `--rm`, `-d`, `--restart`) and host resources shared
/// beyond one run (`-p`, `-v`) are refused.
pub fn unit_of_run(r: crate::cli::RunArgs) -> Result<(String, String), CupError> {
    use steelcup_units::{MicrovmSection, UnitFile, UnitSection};
    let refused = [
        (r.interactive, "-i"),
        (r.tty, "-t"),
        (r.rm, "--rm (each run is kept in the unit's history)"),
        (r.detach, "-d (a scheduled run is always detached)"),
        (
            r.restart.is_some(),
            "--restart (a run that fails waits for the next due time)",
        ),
        (!r.publish.is_empty(), "-p (runs may overlap)"),
        (!r.volume.is_empty(), "-v (give the unit file a volume)"),
    ];
    if let Some((_, flag)) = refused.iter().find(|(set, _)| *set) {
        return Err(usage!("run --schedule: {flag} does not go with a schedule"));
    }
    let name = r.name.clone().unwrap_or_default();
    if !steelcup_units::valid_name(&name) {
        return Err(usage!(
            "run --schedule: --name {name:?} names the unit: lowercase letters, digits, '.', '_', '-'"
        ));
    }
    let (image, cmd) = r
        .image_and_command
        .split_first()
        .ok_or_else(|| usage!("run needs an image"))?;
    let m = MicrovmSection {
        image: Some(image.clone()),
        cmd: cmd.to_vec(),
        env: crate::workloads::environment(&r.env, &r.env_file)?,
        memory: r.memory.unwrap_or_default(),
        cpu_max: r.cpus,
        rlimits: r.ulimit.into_iter().collect(),
        network: r.network.unwrap_or_default(),
        labels: crate::workloads::labels(&r.label),
        entrypoint: crate::workloads::entrypoint(r.entrypoint),
        workdir: r.workdir,
        user: r.user,
        hostname: r.hostname,
        read_only: r.read_only,
        extra_hosts: r.add_host.into_iter().collect(),
        ..Default::default()
    };
    let file = UnitFile {
        unit: UnitSection {
            description: Some("cup run --schedule".into()),
            ..Default::default()
        },
        service: None,
        microvm: Some(m),
    };
    let mut table = toml::Table::try_from(&file).map_err(|e| usage!("{e}"))?;
    if let Some(toml::Value::Table(vm)) = table.get_mut("microvm") {
        let text = |s: &Option<String>| s.clone().map(toml::Value::String);
        for (k, v) in [
            ("schedule", text(&r.schedule)),
            ("time-zone", text(&r.time_zone)),
            ("concurrency", text(&r.concurrency)),
            (
                "deadline",
                r.deadline.map(|d| toml::Value::Integer(d.into())),
            ),
        ] {
            if let Some(v) = v {
                vm.insert(k.into(), v);
            }
        }
    }
    let text = format!("# Made by cup run --schedule.\n{table}");
    let file = format!("{name}.toml");
    // Checked as init will read it, so a bad schedule is said here.
    steelcup_units::parse(std::path::Path::new(&file), &text)
        .map_err(|e| usage!("run --schedule: {}", steelcup_sys::error_chain(&e)))?;
    Ok((file, text))
}

#[cfg(test)]
mod schedule_tests {
    use super::*;
    use clap::Parser;

    fn run_args(args: &[&str]) -> crate::cli::RunArgs {
        let cli = crate::cli::Cli::try_parse_from(["cup", "run"].iter().chain(args).copied())
            .expect("parses");
        match cli.command {
            crate::cli::Command::Run(r) => *r,
            _ => panic!("not run"),
        }
    }

    #[test]
    fn run_with_a_schedule_is_a_scheduled_unit() {
        let (file, text) = unit_of_run(run_args(&[
            "--schedule",
            "*/5 * * * *",
            "--time-zone",
            "Europe/Berlin",
            "--concurrency",
            "forbid",
            "--deadline",
            "60",
            "--name",
            "backup",
            "-e",
            "TARGET=s3",
            "-m",
            "64m",
            "busybox",
            "sh",
            "-c",
            "echo backup",
        ]))
        .unwrap();
        assert_eq!(file, "backup.toml");
        let u = steelcup_units::parse(std::path::Path::new(&file), &text).unwrap();
        let steelcup_units::UnitKind::Microvm(m) = u.kind else {
            panic!("not a microvm")
        };
        assert_eq!(
            m.schedule.map(|s| s.to_string()).as_deref(),
            Some("*/5 * * * *")
        );
        assert_eq!(m.deadline, Some(60));
        assert_eq!(m.env["TARGET"], "s3");
        assert_eq!(m.cmd, ["sh", "-c", "echo backup"]);
        assert_eq!(m.memory.mib(), 64);
    }

    #[test]
    fn run_with_a_schedule_refuses_what_does_not_fit_and_says_bad_schedules() {
        let e = unit_of_run(run_args(&[
            "--schedule",
            "@hourly",
            "--name",
            "x",
            "-p",
            "80:80",
            "img",
        ]))
        .unwrap_err()
        .to_string();
        assert!(e.contains("-p"), "{e}");
        let e = unit_of_run(run_args(&["--schedule", "* * *", "--name", "x", "img"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("has 3 fields"), "{e}");
        let e = unit_of_run(run_args(&[
            "--schedule",
            "@daily",
            "--name",
            "Bad Name",
            "img",
        ]))
        .unwrap_err()
        .to_string();
        assert!(e.contains("--name"), "{e}");
        // --schedule needs --name (clap says so before anything connects).
        assert!(
            crate::cli::Cli::try_parse_from(["cup", "run", "--schedule", "@daily", "img"]).is_err()
        );
    }
}
