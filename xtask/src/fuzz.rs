//! `cargo xtask fuzz [--seconds N] [TARGET...]`: each fuzz target under
//! libFuzzer (cargo-fuzz, installed on first use; `RUSTC_BOOTSTRAP` lets
//! the stable toolchain build it) for N seconds. An input that crashes a
//! target is kept in `init/fuzz/regressions/TARGET/` or
//! `vmmd/fuzz/regressions/TARGET/`, where every `cargo xtask test` plays
//! it again (`vmmd/daemon/tests/fuzz_smoke.rs`), and the command fails
//! naming it. The corpora grow in `target/steelcup/fuzz/` from run to run.

use crate::*;

/// (the folder holding `fuzz/`, target).
const TARGETS: &[(&str, &str)] = &[
    ("init", "unit_file"),
    ("vmmd", "layer_tar"),
    ("vmmd", "image_json"),
    ("vmmd", "api_bodies"),
    ("vmmd", "virtio_mmio"),
    ("vmmd", "block_request"),
    ("vmmd", "vsock_packet"),
];

pub(crate) fn fuzz(args: &[String]) -> Result<()> {
    let mut seconds = 60u64;
    let mut only = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => {
                seconds = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .filter(|s| *s > 0)
                    .context("--seconds needs a number of seconds")?
            }
            t if TARGETS.iter().any(|(_, n)| *n == t) => only.push(t.to_string()),
            other => bail!(
                "unknown fuzz target or flag {other:?}; targets: {}",
                TARGETS
                    .iter()
                    .map(|(_, n)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
    let root = sh::root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let has_fuzz = Command::new(&cargo)
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_fuzz {
        step("installing cargo-fuzz (once)");
        sh::run(Command::new(&cargo).args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let mut crashes = Vec::new();
    for (dir, target) in TARGETS
        .iter()
        .filter(|(_, t)| only.is_empty() || only.iter().any(|o| o == t))
    {
        step(&format!("fuzzing {target} for {seconds} s"));
        let work = sh::out_dir().join("fuzz").join(target);
        let (corpus, found) = (work.join("corpus"), work.join("artifacts"));
        std::fs::create_dir_all(&corpus)?;
        std::fs::create_dir_all(&found)?;
        let regressions = root.join(dir).join("fuzz/regressions").join(target);
        let status = Command::new(&cargo)
            .current_dir(&root)
            .args(["fuzz", "run", "--fuzz-dir"])
            .arg(root.join(dir).join("fuzz"))
            .arg(target)
            .arg(&corpus)
            .args([
                "--",
                &format!("-max_total_time={seconds}"),
                &format!("-artifact_prefix={}/", found.display()),
            ])
            .env("RUSTC_BOOTSTRAP", "1")
            .status()
            .context("run cargo fuzz")?;
        if status.success() {
            continue;
        }
        std::fs::create_dir_all(&regressions)?;
        for e in std::fs::read_dir(&found)?.flatten() {
            let keep = regressions.join(e.file_name());
            std::fs::copy(e.path(), &keep)?;
            crashes.push(keep);
        }
        if crashes.is_empty() {
            bail!("cargo fuzz run {target} failed ({status}) without a crashing input");
        }
    }
    if !crashes.is_empty() {
        bail!(
            "inputs that crash a target, kept as regressions (fix, then commit them): {}",
            crashes
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}
