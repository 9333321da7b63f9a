//! `cargo xtask bench --image-only` (and part of `cargo xtask bench`): an
//! OCI image to a root image, steelcup's store beside `umoci unpack` +
//! `mkfs.erofs`, on a debootstrapped Debian image, in the same run.

use crate::{deps, sh, sh::step, TARGET};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const ROUNDS: usize = 5;

/// The Debian mirror apt uses here (debootstrap needs one).
fn mirror() -> String {
    let mut text = String::new();
    {
        let p = "/etc/apt/sources.list";
        text.push_str(&std::fs::read_to_string(p).unwrap_or_default());
    }
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for e in dir.flatten() {
            text.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
        }
    }
    for line in text.lines() {
        let line = line.trim();
        if let Some(uris) = line.strip_prefix("URIs:") {
            if let Some(u) = uris
                .split_whitespace()
                .find(|u| u.contains("/debian") && !u.contains("security"))
            {
                return u.to_string();
            }
        }
        if line.starts_with("deb ") {
            if let Some(u) = line
                .split_whitespace()
                .find(|w| w.starts_with("http") && w.contains("/debian") && !w.contains("security"))
            {
                return u.to_string();
            }
        }
    }
    "http://deb.debian.org/debian".to_string()
}

/// A debootstrapped Debian (minbase) as a one-layer OCI image made by
/// umoci, made once in the cache; returns its `LAYOUT:TAG`.
pub fn debian_image() -> Result<String> {
    debootstrap_image("debian-bookworm-oci", "bookworm", &[], &[])
}

/// Debian's nginx (`debootstrap --include=nginx-light`, without docs,
/// manuals, locales and apt lists) as an OCI image that runs `nginx -g
/// 'daemon off;'`, made once in the cache: a real server no one here wrote,
/// for the network tests. Returns its `LAYOUT:TAG`.
pub fn nginx_image() -> Result<String> {
    debootstrap_image(
        "debian-bookworm-nginx-oci",
        "nginx",
        &["nginx-light"],
        &["/usr/sbin/nginx", "-g", "daemon off;"],
    )
}

/// A minbase Debian with `include`d packages as a one-layer OCI image
/// `cache/NAME/layout:TAG`, with `cmd` as its command when given.
fn debootstrap_image(name: &str, tag: &str, include: &[&str], cmd: &[&str]) -> Result<String> {
    let dir = sh::cache_dir().join(name);
    std::fs::create_dir_all(&dir)?;
    let dir = dir.as_path();
    let layout = dir.join("layout");
    let image = format!("{}:{tag}", layout.display());
    if layout.join("index.json").is_file() {
        return Ok(image);
    }
    let root = dir.join("debootstrap");
    let _ = std::fs::remove_dir_all(&root);
    step(&format!(
        "debootstrap --variant=minbase bookworm{} (about half a minute with a close mirror)",
        if include.is_empty() {
            String::new()
        } else {
            format!(" --include={}", include.join(","))
        }
    ));
    let mut debootstrap = Command::new("debootstrap");
    debootstrap.arg("--variant=minbase");
    if !include.is_empty() {
        debootstrap.arg(format!("--include={}", include.join(",")));
    }
    sh::run(debootstrap.arg("bookworm").arg(&root).arg(mirror()))?;
    if !include.is_empty() {
        // What a server image does without: docs, manuals, locales, apt's lists.
        for d in [
            "usr/share/doc",
            "usr/share/man",
            "usr/share/locale",
            "var/lib/apt/lists",
            "var/cache/apt",
        ] {
            let p = root.join(d);
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p)?;
        }
    }
    let umoci = |args: &[&str]| sh::run(Command::new("umoci").args(args));
    let bundle = dir.join("bundle");
    let _ = std::fs::remove_dir_all(&bundle);
    let _ = std::fs::remove_dir_all(&layout);
    let layout_s = layout.display().to_string();
    umoci(&["init", "--layout", &layout_s])?;
    umoci(&["new", "--image", &image])?;
    if !cmd.is_empty() {
        let mut args = vec!["config", "--image", &image];
        for c in cmd {
            args.extend(["--config.cmd", c]);
        }
        umoci(&args)?;
    }
    umoci(&["unpack", "--image", &image, &bundle.display().to_string()])?;
    let rootfs = bundle.join("rootfs");
    std::fs::remove_dir_all(&rootfs)?;
    sh::run(Command::new("cp").arg("-a").arg(&root).arg(&rootfs))?;
    umoci(&["repack", "--image", &image, &bundle.display().to_string()])?;
    std::fs::remove_dir_all(&bundle)?;
    std::fs::remove_dir_all(&root)?;
    Ok(image)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn timed(cmd: &mut Command) -> Result<Duration> {
    let t = Instant::now();
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(t.elapsed())
}

/// Runs the benchmark; returns its section of docs/performance.md.
pub fn run() -> Result<String> {
    deps::ensure_packages(&["debootstrap", "umoci", "erofs-utils"])?;
    step("building vmmd");
    sh::run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(sh::root())
            .args(["build", "--release", "--target", TARGET, "-p", "vmmd"])
            .env("RUSTFLAGS", "-C target-feature=+crt-static"),
    )?;
    let vmmd: PathBuf = sh::root().join("target").join(TARGET).join("release/vmmd");
    let dir = sh::out_dir().join("bench-image");
    std::fs::create_dir_all(&dir)?;
    let image = debian_image()?;
    let layout = PathBuf::from(image.rsplit_once(':').map_or(image.as_str(), |(l, _)| l));
    let layer_bytes: u64 = std::fs::read_dir(layout.join("blobs/sha256"))?
        .flatten()
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .max()
        .unwrap_or(0);

    // The store holds the image's blobs (pulling is not measured); each
    // round builds its root image from them.
    let store = dir.join("store");
    let _ = std::fs::remove_dir_all(&store);
    let name = format!("oci:{image}");
    sh::run(
        Command::new(&vmmd)
            .args(["image", "--store"])
            .arg(&store)
            .args(["pull", &name]),
    )?;
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let (mut ours_bytes, mut theirs_bytes) = (0, 0);
    for round in 1..=ROUNDS {
        step(&format!("round {round}/{ROUNDS}"));
        let _ = std::fs::remove_dir_all(store.join("rootfs"));
        std::fs::create_dir_all(store.join("rootfs"))?;
        ours.push(timed(
            Command::new(&vmmd)
                .args(["image", "--store"])
                .arg(&store)
                .args(["rootfs", &name]),
        )?);
        ours_bytes = std::fs::read_dir(store.join("rootfs"))?
            .flatten()
            .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
            .sum();

        let bundle = dir.join("peer-bundle");
        let out = dir.join("peer.erofs");
        let _ = std::fs::remove_dir_all(&bundle);
        let _ = std::fs::remove_file(&out);
        let t = Instant::now();
        timed(
            Command::new("umoci")
                .args(["unpack", "--image", &image])
                .arg(&bundle),
        )?;
        timed(
            Command::new("mkfs.erofs")
                .arg("--quiet")
                .arg(&out)
                .arg(bundle.join("rootfs")),
        )?;
        theirs.push(t.elapsed());
        theirs_bytes = std::fs::metadata(&out)?.len();
        std::fs::remove_dir_all(&bundle)?;
        std::fs::remove_file(&out)?;
    }
    let (o, t) = (median(ours.clone()), median(theirs.clone()));
    let ratio = t.as_secs_f64() / o.as_secs_f64();
    let list = |v: &[Duration]| {
        v.iter()
            .map(|d| format!("{:.2}", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let verdict = if ratio >= 2.0 { "met" } else { "not met" };
    Ok(format!(
        "## OCI image to root image\n\n\
A debootstrapped Debian 12 (`debootstrap --variant=minbase bookworm`, {:.0} MB in one gzip layer of {:.0} MB, made by umoci) turned into a read-only erofs root image, {ROUNDS} rounds on the machine that ran the benchmark (not under emulation), caches warm. steelcup: `vmmd image rootfs` on the image already in the store (pulling not measured), which streams the compressed layer once into the erofs image, checking its diff ID. Peer: `umoci unpack` then Debian's `mkfs.erofs` (erofs-utils 1.5, uncompressed) of the unpacked tree. Target: at least 2× faster.\n\n\
| | steelcup | umoci unpack + mkfs.erofs |\n|---|---|---|\n\
| seconds (median) | **{:.2}** | {:.2} |\n| rounds | {} | {} |\n| image bytes | {} | {} |\n\n\
steelcup is **{ratio:.1}×** faster (target ≥ 2×: {verdict}).\n\n",
        debian_bytes(&image) as f64 / 1e6,
        layer_bytes as f64 / 1e6,
        o.as_secs_f64(),
        t.as_secs_f64(),
        list(&ours),
        list(&theirs),
        ours_bytes,
        theirs_bytes,
    ))
}

/// Uncompressed bytes of the image's (one) layer.
fn debian_bytes(image: &str) -> u64 {
    let layout = image.rsplit_once(':').map(|(l, _)| l).unwrap_or(image);
    let blobs = Path::new(layout).join("blobs/sha256");
    let biggest = std::fs::read_dir(&blobs).ok().and_then(|d| {
        d.flatten()
            .max_by_key(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
    });
    let Some(e) = biggest else { return 0 };
    let Ok(f) = std::fs::File::open(e.path()) else {
        return 0;
    };
    let mut d = flate2::read::MultiGzDecoder::new(std::io::BufReader::new(f));
    std::io::copy(&mut d, &mut std::io::sink()).unwrap_or(0)
}
