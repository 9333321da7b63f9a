//! `cup`: steelcup's command-line interface.
//!
//! This build has the offline verbs: `cup validate FILE...` checks unit
//! files the way init and vmmd read them, and `cup version`. The verbs that
//! talk to a running host (run, ps, logs, ...) need vmmd's D-Bus API.

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("version") | Some("--version") => {
            println!("cup {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some("validate") if args.len() > 1 => {
            let mut ok = true;
            for f in &args[1..] {
                let path = Path::new(f);
                let result = std::fs::read_to_string(path)
                    .map_err(|e| format!("{f}: {e}"))
                    .and_then(|t| {
                        steelcup_init::units::parse(path, &t).map_err(|e| e.to_string())
                    });
                match result {
                    Ok(u) => println!("{f}: ok ({})", match u.kind {
                        steelcup_init::units::UnitKind::Service(_) => "service",
                        steelcup_init::units::UnitKind::Microvm(_) => "microvm",
                    }),
                    Err(e) => {
                        eprintln!("{e}");
                        ok = false;
                    }
                }
            }
            if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Some(verb @ ("run" | "ps" | "logs" | "exec" | "stop" | "kill" | "rm" | "images" | "pull" | "rmi" | "inspect" | "units" | "reboot")) => {
            eprintln!("cup {verb}: this build of steelcup has no vmmd API yet; declare workloads as unit files in /etc/steelcup/units");
            ExitCode::from(2)
        }
        _ => {
            eprintln!("usage: cup validate UNIT-FILE...\n       cup version");
            ExitCode::from(2)
        }
    }
}
