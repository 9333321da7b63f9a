//! `cargo xtask test`: formatting, lints, unit and host-side tests, then
//! the QEMU end-to-end tests.

use crate::*;

pub(crate) fn test() -> Result<()> {
    deps::ensure()?;
    let root = sh::root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    step("formatting (cargo fmt --check)");
    sh::run(
        Command::new(&cargo)
            .current_dir(&root)
            .args(["fmt", "--all", "--", "--check"]),
    )
    .context("code is not formatted: run `cargo fmt --all`")?;
    step("lints (cargo clippy --workspace --all-targets -- -D warnings)");
    sh::run(Command::new(&cargo).current_dir(&root).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
    .context("clippy found something: fix it, or allow it where it is with the reason")?;
    step("a debootstrapped Debian as an OCI image, for the image store's tests");
    let debian = bench::image::debian_image()?;
    step("unit and host-side integration tests");
    sh::run(
        Command::new(&cargo)
            .current_dir(&root)
            .args(["test", "--workspace", "--exclude", "qemu-tests"])
            // Tests that need a tool from Debian fail instead of skipping.
            .env("STEELCUP_REQUIRE_TOOLS", "1")
            .env("STEELCUP_DEBIAN_IMAGE", &debian),
    )?;
    qemu_tests(None)
}

/// `cargo xtask test --qemu NAME`: builds what the QEMU tests need and runs
/// only `qemu-tests/tests/NAME.rs` (for working on one of them).
pub(crate) fn test_qemu_only(name: &str) -> Result<()> {
    deps::ensure()?;
    if !sh::root()
        .join("qemu-tests/tests")
        .join(format!("{name}.rs"))
        .exists()
    {
        bail!("no qemu-tests/tests/{name}.rs");
    }
    qemu_tests(Some(name))
}

/// Builds the appliance, the test disk and the nginx image, then runs the
/// QEMU tests (`only`: one test file).
pub(crate) fn qemu_tests(only: Option<&str>) -> Result<()> {
    let root = sh::root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let artifacts = build()?;
    let disk = test_disk(&sh::out_dir().join("test-artifacts"))?;
    step("Debian's nginx as an OCI image, for the network test");
    let nginx = bench::image::nginx_image()?;
    let results = sh::out_dir().join("qemu-results.txt");
    let _ = std::fs::remove_file(&results);
    step("QEMU end-to-end tests (the appliance booted under QEMU, one test at a time)");
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&root).args(["test", "-p", "qemu-tests"]);
    if let Some(name) = only {
        cmd.args(["--test", name]);
    }
    sh::run(
        cmd.args(["--", "--test-threads=1", "--nocapture"])
            .env("STEELCUP_ARTIFACTS", &artifacts)
            .env("STEELCUP_CUP", run::cup_binary())
            .env(
                "STEELCUP_TEST_ARTIFACTS",
                sh::out_dir().join("test-artifacts"),
            )
            .env("STEELCUP_REQUIRE_ARTIFACTS", "1")
            .env("STEELCUP_DISK", &disk)
            .env("STEELCUP_NGINX_IMAGE", &nginx),
    )?;
    step("results");
    eprint!("{}", std::fs::read_to_string(&results).unwrap_or_default());
    Ok(())
}
