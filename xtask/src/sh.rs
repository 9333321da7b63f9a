//! Running commands and telling the user what is going on.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

/// Prints a step header.
pub fn step(what: &str) {
    eprintln!("\x1b[1m==> {what}\x1b[0m");
}

/// Runs a command, inheriting stdio; fails with the command line on error.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

/// Runs a command and returns its stdout.
pub fn output(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("start {shown}"))?;
    if !out.status.success() {
        bail!("{shown} failed: {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| ".".into())
}

/// Where xtask keeps built artifacts (inside target/).
pub fn out_dir() -> PathBuf {
    root().join("target/steelcup")
}

/// The cache for slow, reusable inputs (guest kernel, host kernel package):
/// `$STEELCUP_CACHE`, else `$XDG_CACHE_HOME/steelcup`, else `~/.cache/steelcup`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("STEELCUP_CACHE") {
        return d.into();
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("steelcup");
    }
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/steelcup"))
        .unwrap_or_else(|| root().join("target/cache"))
}

/// Formats an elapsed time as `1m05s`.
pub fn elapsed(t0: Instant) -> String {
    let s = t0.elapsed().as_secs();
    format!("{}m{:02}s", s / 60, s % 60)
}
