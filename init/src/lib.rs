//! steelcup's init: the host PID 1 (`init`) and the guest PID 1 (`vminit`).
//!
//! # Design
//! One library, two thin binaries. [`units`] parses unit files and orders them
//! (pure, no I/O beyond reading the files); [`supervisor`] starts, watches and
//! stops services; [`boot`] runs the host's boot phases; [`sys`] is the only
//! place for raw syscalls; [`guest`] is the contract between vmmd and vminit.
//!
//! # Limitations
//! The D-Bus API (`org.steelcup.Init1`), reload, cgroup limits and log files are
//! not there yet; services are supervised with restart and backoff, and their
//! output is echoed to the console with the unit's name.

pub mod api;
pub mod boot;
pub mod guest;
pub mod modules;
pub mod power;
pub mod supervisor;
pub mod sys;
pub mod units;

/// Log timestamps in the kernel's own format, `[   12.345678]`, from
/// CLOCK_BOOTTIME, so init's, vmmd's and the kernel's lines on the console
/// line up.
#[derive(Debug, Clone, Copy)]
pub struct BootTime;

impl tracing_subscriber::fmt::time::FormatTime for BootTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        match nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME) {
            Ok(t) => write!(w, "[{:>5}.{:06}]", t.tv_sec(), t.tv_nsec() / 1000),
            Err(_) => write!(w, "[    ?.??????]"),
        }
    }
}

/// Sets up logging to the console (stderr) with the time since boot.
/// `STEELCUP_LOG` takes a tracing filter (`debug`, `init=trace`, ...).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STEELCUP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .with_timer(BootTime)
        .with_env_filter(filter)
        .try_init();
}
