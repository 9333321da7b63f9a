//! `cargo xtask`: steelcup's two set-up commands and the benchmarks.
//!
//! - `cargo xtask run [--once]`: install what is missing, build the guest
//!   kernel (cached), the static binaries and the appliance image, boot it in
//!   QEMU with the example units from `configs/`, and show the console. With
//!   `--once`, or when stdin is not a terminal, press the appliance's power
//!   button once the example workloads have finished and exit 0.
//! - `cargo xtask test`: unit tests, then the QEMU end-to-end tests;
//!   `--qemu NAME` builds and runs only `qemu-tests/tests/NAME.rs`.
//! - `cargo xtask bench`: boot measurements, written to `docs/performance.md`.
//! - `cargo xtask build`: just build the appliance into `target/steelcup/artifacts`.
//! - `cargo xtask fuzz [--seconds N] [TARGET...]`: the fuzz targets under
//!   libFuzzer; crashing inputs become regression inputs every test plays.

mod bench;
mod build;
mod deps;
mod disk;
mod fuzz;
mod kernel;
mod keys;
mod run;
mod sh;
mod test;

pub(crate) use bench::*;
pub(crate) use build::*;
pub(crate) use disk::*;
pub(crate) use keys::*;
pub(crate) use run::*;
pub(crate) use test::*;

use anyhow::{bail, Context, Result};
use qemu_tests::{Guest, GuestConfig};
use sh::step;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub const TARGET: &str = "x86_64-unknown-linux-gnu";
const STATIC_BINS: &[&str] = &["init", "vminit", "vmmd", "vmm-worker", "cup"];

/// steelcup's set-up, test, build and benchmark commands.
#[derive(Debug, clap::Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, clap::Subcommand)]
enum Task {
    /// Install what is missing, build everything, boot the appliance in QEMU
    Run {
        /// Power off once the example workloads have finished
        #[arg(long)]
        once: bool,
    },
    /// Unit tests, clippy, then the QEMU end-to-end tests
    Test {
        /// Only qemu-tests/tests/NAME.rs (like disk)
        #[arg(long, value_name = "NAME")]
        qemu: Option<String>,
    },
    /// Measurements, written to docs/performance.md
    Bench {
        /// Only init's (beside runit)
        #[arg(long, group = "only")]
        init_only: bool,
        /// Only the image build's
        #[arg(long, group = "only")]
        image_only: bool,
        /// Only the VMM's, beside QEMU microvm
        #[arg(long, group = "only")]
        vmm_only: bool,
        /// Only HTTP through a published port
        #[arg(long, group = "only")]
        http_only: bool,
    },
    /// Build the appliance into target/steelcup/artifacts
    Build,
    /// Build the disk image
    Disk,
    /// Make an update-signing key pair in DIR
    UpdateKey { dir: Option<String> },
    /// Make admin certificates for HOSTs in DIR
    AdminCerts {
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "DIR HOST..."
        )]
        args: Vec<String>,
    },
    /// The fuzz targets under libFuzzer: [--seconds N] [TARGET...]
    #[command(disable_help_flag = true)]
    Fuzz {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() {
    let cli = <Cli as clap::Parser>::parse();
    let result = match cli.command {
        Task::Run { once } => run(once),
        Task::Test { qemu: Some(name) } => test_qemu_only(&name),
        Task::Test { qemu: None } => test(),
        Task::Bench {
            init_only: true, ..
        } => bench_init_only(),
        Task::Bench {
            image_only: true, ..
        } => bench_image_only(),
        Task::Bench { vmm_only: true, .. } => bench_vmm_only(),
        Task::Bench {
            http_only: true, ..
        } => bench_http_only(),
        Task::Bench { .. } => bench(),
        Task::Build => build().map(|_| ()),
        Task::Disk => disk().map(|_| ()),
        Task::UpdateKey { dir } => update_key(dir.as_deref()),
        Task::AdminCerts { args } => admin_certs(&args),
        Task::Fuzz { args } => fuzz::fuzz(&args),
    };
    if let Err(e) = result {
        eprintln!("\x1b[1;31merror:\x1b[0m {e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
        let c = Cli::try_parse_from(["xtask", "test", "--qemu", "disk"]).unwrap();
        assert!(matches!(c.command, Task::Test { qemu: Some(n) } if n == "disk"));
        assert!(Cli::try_parse_from(["xtask", "bench", "--vmm-only", "--http-only"]).is_err());
        let c = Cli::try_parse_from(["xtask", "fuzz", "--seconds", "5", "unit_file"]).unwrap();
        assert!(
            matches!(c.command, Task::Fuzz { args } if args == ["--seconds", "5", "unit_file"])
        );
    }
}
