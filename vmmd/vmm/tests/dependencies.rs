//! Each crate's Cargo.toml is its dependency policy; this test holds the
//! two that matter most to it. The worker (`steelcup-vmm`) is what a
//! hostile guest faces, and vminit runs in every guest: neither may link an
//! async runtime, D-Bus, HTTP, netlink or a TOML parser. It reads `cargo
//! tree` for the normal (non-dev, non-build) dependencies, so a crate that
//! comes back through any path fails it.

#![allow(clippy::unwrap_used)] // tests fail by panicking

use std::collections::BTreeSet;
use std::process::Command;

/// Crates no process a guest can reach may link.
const FORBIDDEN: &[&str] = &[
    "tokio",
    "zbus",
    "reqwest",
    "rtnetlink",
    "netlink-proto",
    "hyper",
    "toml",
    "oci-client",
    "async-io",
];

fn normal_dependencies(package: &str) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "tree",
            "--offline",
            "-e",
            "normal",
            "--prefix",
            "none",
            "-p",
            package,
        ])
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree -p {package}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

fn check(package: &str, allowed_steelcup: &[&str]) {
    let deps = normal_dependencies(package);
    assert!(
        deps.contains(package),
        "{package} is not in its own tree: {deps:?}"
    );
    let bad: Vec<_> = deps
        .iter()
        .filter(|d| FORBIDDEN.contains(&d.as_str()))
        .collect();
    assert!(bad.is_empty(), "{package} links {bad:?}");
    let ours: Vec<_> = deps
        .iter()
        .filter(|d| d.starts_with("steelcup-") && *d != package)
        .filter(|d| !allowed_steelcup.contains(&d.as_str()))
        .collect();
    assert!(ours.is_empty(), "{package} depends on {ours:?}");
}

#[test]
fn the_worker_links_no_async_runtime_dbus_http_netlink_or_toml() {
    check("steelcup-vmm", &["steelcup-proto", "steelcup-sys"]);
}

#[test]
fn vminit_depends_on_the_protocol_and_syscall_crates_only() {
    check("steelcup-vminit", &["steelcup-proto", "steelcup-sys"]);
}

#[test]
fn the_check_sees_a_forbidden_crate_where_there_is_one() {
    // vmmd itself links tokio and zbus: the same reading must find them.
    let deps = normal_dependencies("vmmd");
    assert!(deps.contains("tokio") && deps.contains("zbus"), "{deps:?}");
}
