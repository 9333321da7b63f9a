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
