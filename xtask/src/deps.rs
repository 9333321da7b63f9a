//! Debian packages the build and the tests need, installed on demand.

use crate::sh::{self, step};
use anyhow::{bail, Result};
use std::process::Command;

/// Packages for building the guest kernel and the image, and for running the
/// appliance in QEMU (with its iPXE ROMs for PXE boot).
pub const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "ipxe-qemu",
    "linux-source-6.1",
    "busybox-static",
    "build-essential",
    "bc",
    "bison",
    "flex",
    "libelf-dev",
    "libssl-dev",
    "xz-utils",
    "lz4", // the guest kernel is LZ4-compressed
    // dbus-send: the tests drive init's API with a standard D-Bus client.
    "dbus",
    // mkfs.ext4 -d: the root disk image the QEMU tests boot a workload from.
    "e2fsprogs",
    // OCI images made by tools no one here wrote (umoci, skopeo), a real
    // registry on loopback, and erofs-utils reading back our root images.
    "umoci",
    "skopeo",
    "docker-registry",
    "erofs-utils",
    // A whole Debian as a test and benchmark image.
    "debootstrap",
    // htpasswd: a registry that asks for credentials.
    "apache2-utils",
    // The workload network: nft (shipped in the image, and applied by the
    // host-side tests in network namespaces made with ip), curl as the
    // client from outside.
    "nftables",
    // conntrack: vmmd deletes a gone replica's tracked connections.
    "conntrack",
    // The CA certificates shipped in the image, for registries over HTTPS.
    "ca-certificates",
    "iproute2",
    "curl",
    // Python's tarfile reads the crafted layers beside GNU tar and ours.
    "python3",
    "tar",
    // chronyd: the NTP server the quick-start test's machine sets its
    // clock from (run by the test on a port of its own, never as the
    // host's clock keeper).
    "chrony",
    // promtool checks `cup metrics`' exposition, and a Prometheus server
    // (run by the quick-start test on a port and a directory of its own)
    // scrapes the machine and answers queries.
    "prometheus",
];

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// True once `apt-get update` has run in this process.
static UPDATED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Runs `apt-get update` once per run.
pub fn apt_update() -> Result<()> {
    if !UPDATED.swap(true, std::sync::atomic::Ordering::SeqCst) {
        step("apt-get update");
        sh::run(Command::new("apt-get").args(["update", "-q"]))?;
    }
    Ok(())
}

/// Installs whatever of [`PACKAGES`] is missing.
pub fn ensure() -> Result<()> {
    ensure_packages(PACKAGES)
}

/// Installs whatever of `packages` is missing.
pub fn ensure_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !nix::unistd::Uid::effective().is_root() {
        bail!(
            "missing Debian packages: {}; run as root or install them with\n  sudo apt-get install {}",
            missing.join(" "),
            missing.join(" ")
        );
    }
    apt_update()?;
    step(&format!("installing {}", missing.join(" ")));
    sh::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}
