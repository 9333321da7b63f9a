//! The workload network with a real server no one here wrote: Debian's
//! nginx (an OCI image `cargo xtask test` builds with debootstrap and
//! umoci), pushed by skopeo into a docker-registry on this machine, pulled
//! by the appliance over QEMU's user network, run as a `[microvm]` unit of
//! two replicas with `ports = ["8080:80"]`, and read with an HTTP GET from
//! here through QEMU's host forwarding — before and while one replica is
//! killed. (Names, `network = "none"` and the spread over replicas are in
//! `microvms.rs`, `workloads_on_nested_kvm`.)

#![allow(clippy::unwrap_used)] // tests fail by panicking

use anyhow::{Context, Result};
use qemu_tests::Guest;
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(300);
/// Pulling ~40 MB and building its root image under emulation, then two
/// nested nginx boots.
const PULL_AND_BOOT: Duration = Duration::from_secs(900);
const STEP: Duration = Duration::from_secs(300);
/// `GET /` from here on the appliance's forwarded port 8080.
fn get_page(g: &Guest) -> Result<String> {
    use std::io::{Read, Write};
    let port = g
        .forwarded
        .context("the network boot has no forwarded port")?;
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port))?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(c, "GET / HTTP/1.0\r\nHost: steelcup\r\n\r\n")?;
    let mut out = String::new();
    c.read_to_string(&mut out)?;
    Ok(out)
}

fn welcome(page: &str) -> bool {
    page.starts_with("HTTP/1.1 200") && page.contains("<title>Welcome to nginx!</title>")
}

#[test]
fn nginx_replicas_behind_a_published_port() {
    let Some(image) = std::env::var_os("STEELCUP_NGINX_IMAGE") else {
        assert!(
            std::env::var_os("STEELCUP_REQUIRE_ARTIFACTS").is_none(),
            "STEELCUP_NGINX_IMAGE is not set (cargo xtask test builds the image)"
        );
        eprintln!(
            "network: skipped: needs the nginx image and test image built by `cargo xtask test`"
        );
        return;
    };
    let _registry = qemu_tests::registry::Registry::with_nginx(&image.to_string_lossy()).unwrap();
    qemu_tests::run_booted(
        "network",
        || qemu_tests::boot_test_image("network"),
        scenario,
    );
}

fn scenario(g: &mut Guest) -> Result<()> {
    g.wait_for("phase units: done", BOOT)?;
    // Pulled from the registry outside, its root image built, both
    // replicas healthy by their HTTP probes.
    g.wait_for("driver: both nginx replicas serve", PULL_AND_BOOT)?;
    g.wait_for(
        "driver: nginx from the appliance: <title>Welcome to nginx!</title>",
        STEP,
    )?;
    let page = get_page(g)?;
    anyhow::ensure!(welcome(&page), "GET / from outside QEMU: {page:?}");
    println!("network: nginx answered from outside QEMU");
    // One replica killed: the page is served from the other, every time.
    g.wait_for(
        "driver: killed nginx.2; from the appliance: <title>Welcome to nginx!</title>",
        STEP,
    )?;
    for i in 0..5 {
        let page = get_page(g)?;
        anyhow::ensure!(welcome(&page), "GET {i} with nginx.2 down: {page:?}");
    }
    println!("network: served from outside QEMU 5 times with one replica down");
    g.wait_for("driver: nginx.2 is back: running (healthy)", STEP)?;
    g.wait_for("driver: cup poweroff", STEP)?;
    g.wait_clean_poweroff(STEP)?;
    Ok(())
}
