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

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => run(args.iter().any(|a| a == "--once")),
        Some("test") => match args.iter().position(|a| a == "--qemu") {
            Some(i) => match args.get(i + 1) {
                Some(name) => test_qemu_only(name),
                None => Err(anyhow::anyhow!(
                    "--qemu needs the name of a file in qemu-tests/tests, like disk"
                )),
            },
            None => test(),
        },
        Some("bench") if args.iter().any(|a| a == "--init-only") => bench_init_only(),
        Some("bench") if args.iter().any(|a| a == "--image-only") => bench_image_only(),
        Some("bench") if args.iter().any(|a| a == "--vmm-only") => bench_vmm_only(),
        Some("bench") if args.iter().any(|a| a == "--http-only") => bench_http_only(),
        Some("bench") => bench(),
        Some("build") => build().map(|_| ()),
        Some("disk") => disk().map(|_| ()),
        Some("update-key") => update_key(args.get(1).map(String::as_str)),
        Some("admin-certs") => admin_certs(&args[1..]),
        Some("fuzz") => fuzz::fuzz(&args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask run [--once] | test [--qemu NAME] | bench [--init-only|--image-only|--vmm-only|--http-only] | build | disk | update-key DIR | admin-certs DIR HOST... | fuzz [--seconds N] [TARGET...]"
            );
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("\x1b[1;31merror:\x1b[0m {e:#}");
        std::process::exit(1);
    }
}
