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

/// The rest of the driver's line that starts with `prefix`.
fn driver_value(g: &mut Guest, prefix: &str, timeout: Duration) -> Result<String> {
    g.wait_for(prefix, timeout)?;
    let serial = g.serial();
    let line = serial
        .lines()
        .find_map(|l| {
            l.split_once(prefix)
                .map(|(_, rest)| rest.trim().to_string())
        })
        .context("the driver's line")?;
    Ok(line)
}

/// virtio-net's feature bits as Linux lists them (`features` in sysfs,
/// bit 0 first): offloads and mergeable buffers on vhost-net, none on the
/// worker's own device.
fn check_offloads(bits: &str, offloads: bool) -> Result<()> {
    let bit = |n: usize| bits.as_bytes().get(n) == Some(&b'1');
    anyhow::ensure!(bits.len() >= 33 && bit(32), "no VERSION_1 in {bits:?}");
    // CSUM, GUEST_CSUM, GUEST_TSO4, HOST_TSO4, MRG_RXBUF.
    for n in [0, 1, 7, 11, 15] {
        anyhow::ensure!(
            bit(n) == offloads,
            "feature bit {n} is {} in {bits:?}",
            bit(n)
        );
    }
    println!("network: virtio-net features {bits} (offloads: {offloads})");
    Ok(())
}

/// The driver's download of `bytes` from `vm`: both sums present and equal.
fn check_download(g: &mut Guest, vm: &str, bytes: u64) -> Result<()> {
    let line = driver_value(g, &format!("driver: {vm} sent {bytes} bytes in "), STEP)?;
    let sums: Vec<&str> = line
        .split_whitespace()
        .filter(|w| w.len() == 64 && w.bytes().all(|b| b.is_ascii_hexdigit()))
        .collect();
    anyhow::ensure!(
        sums.len() == 2 && sums[0] == sums[1],
        "{vm}: the download's checksums differ or are missing: {line}"
    );
    println!("network: {bytes} bytes from {vm} intact: {line}");
    Ok(())
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
    // vhost-net: the guest's driver took the offloads and mergeable
    // buffers, and 100 MB came through intact.
    let features = driver_value(g, "driver: nginx.1 virtio-net features ", STEP)?;
    check_offloads(&features, true)?;
    check_download(g, "nginx.1", 100_000_000)?;
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
    // With /dev/vhost-net gone, nginx.2 came back on the worker's own
    // device: no offloads, and the worker said why.
    let features = driver_value(g, "driver: nginx.2 virtio-net features ", STEP)?;
    check_offloads(&features, false)?;
    check_download(g, "nginx.2", 10_000_000)?;
    let why = driver_value(g, "driver: nginx.2 worker says: ", STEP)?;
    anyhow::ensure!(
        why.starts_with("virtio-net: vhost-net unavailable (/dev/vhost-net: "),
        "vmmd's log does not say why nginx.2 is without vhost-net: {why:?}"
    );
    g.wait_for("driver: cup poweroff", STEP)?;
    g.wait_clean_poweroff(STEP)?;
    Ok(())
}
