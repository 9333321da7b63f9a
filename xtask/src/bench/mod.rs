//! `cargo xtask bench`: every benchmark, written over its section of
//! docs/performance.md.

use crate::*;

pub mod http;
pub mod image;
pub mod init;
pub mod vmm;

/// `cargo xtask bench --init-only`: the init benchmark alone, printed and
/// written over its section of docs/performance.md.
pub(crate) fn bench_init_only() -> Result<()> {
    build()?;
    let md = bench::init::run(&sh::root().join("target").join(TARGET).join("release/init"))?;
    print!("{md}");
    write_sections(&md)
}

/// `cargo xtask bench --image-only`: the image benchmark alone, printed and
/// written over its section of docs/performance.md.
pub(crate) fn bench_image_only() -> Result<()> {
    let md = bench::image::run()?;
    print!("{md}");
    write_sections(&md)
}

/// `cargo xtask bench --vmm-only`: the VMM and start benchmarks alone (one
/// boot of the bench image), printed and written over their sections.
pub(crate) fn bench_vmm_only() -> Result<()> {
    build()?;
    let md = bench::vmm::run()?;
    print!("{md}");
    write_sections(&md)
}

/// `cargo xtask bench --http-only`: the HTTP benchmark alone (one boot of
/// its bench image), printed and written over its section.
pub(crate) fn bench_http_only() -> Result<()> {
    build()?;
    let md = bench::http::run()?;
    print!("{md}");
    write_sections(&md)
}

/// Writes each `## ` section of `md` over the section of the same heading
/// in docs/performance.md (or at its end).
pub(crate) fn write_sections(md: &str) -> Result<()> {
    let path = sh::root().join("docs/performance.md");
    let mut doc = std::fs::read_to_string(&path).unwrap_or_default();
    let mut starts: Vec<usize> = md.match_indices("## ").map(|(i, _)| i).collect();
    starts.retain(|i| *i == 0 || md.as_bytes()[i - 1] == b'\n');
    starts.push(md.len());
    for w in starts.windows(2) {
        let section = &md[w[0]..w[1]];
        let heading = section.lines().next().unwrap_or_default();
        doc = match doc.find(heading) {
            Some(start) => {
                let rest = &doc[start + heading.len()..];
                let end = rest
                    .find("\n## ")
                    .map_or(doc.len(), |i| start + heading.len() + i + 1);
                format!("{}{section}{}", &doc[..start], &doc[end..])
            }
            None => format!("{}\n\n{section}", doc.trim_end()),
        };
    }
    std::fs::write(&path, doc)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

pub(crate) fn bench() -> Result<()> {
    let artifacts = build()?;
    let vmm_md = bench::vmm::run()?;
    eprint!("{vmm_md}");
    let http_md = bench::http::run()?;
    eprint!("{http_md}");
    step("OCI image to root image, beside umoci unpack + mkfs.erofs");
    let image_md = bench::image::run()?;
    eprint!("{image_md}");
    step("init: 100 services, side by side with runit");
    let init_md = bench::init::run(&sh::root().join("target").join(TARGET).join("release/init"))?;
    eprint!("{init_md}");
    let manifest: image_build::ArtifactManifest =
        serde_json::from_slice(&std::fs::read(artifacts.join("manifest.json"))?)?;
    let runs = 3;
    let mut rows = Vec::new();
    for i in 0..runs {
        step(&format!("boot {}/{runs}", i + 1));
        let mut g = Guest::boot(&GuestConfig::direct("bench", &artifacts)?)?;
        let long = Duration::from_secs(300);
        let init_at = g.wait_for("starting as PID 1", long)?;
        let units_at = g.wait_for("phase units: done", long)?;
        let line_at = g.wait_for("hello | hello from a steelcup microVM", long)?;
        let exit_at = g.wait_for("workload hello: exited with code 7", long)?;
        g.power_button()?;
        let t = Instant::now();
        g.wait_exit(long)?;
        let off = t.elapsed();
        let s = g.serial();
        let vm_secs: f64 = s
            .lines()
            .find(|l| l.contains("workload hello: exited with code 7 after"))
            .and_then(|l| l.rsplit("after ").next())
            .and_then(|v| v.trim_end_matches('s').parse().ok())
            .unwrap_or(f64::NAN);
        rows.push([
            init_at.as_secs_f64(),
            units_at.as_secs_f64(),
            line_at.as_secs_f64(),
            exit_at.as_secs_f64(),
            vm_secs,
            off.as_secs_f64(),
        ]);
    }
    let accel = format!("{:?}", qemu_tests::Accel::detect());
    let mut md = String::from("# Performance\n\nWritten by `cargo xtask bench`; numbers from the last run on the machine that ran it.\n\n");
    md.push_str(&format!(
        "## Host image\n\n| artifact | bytes |\n|---|---|\n| host kernel (Debian {}) | {} |\n| initramfs (zstd) | {} |\n| **total** | **{}** ({:.1} MB; budget 40 MB) |\n\n",
        manifest.kernel_release,
        manifest.artifacts["vmlinuz"].size,
        manifest.artifacts["initramfs.cpio.zst"].size,
        manifest.image_bytes,
        manifest.image_bytes as f64 / 1e6
    ));
    md.push_str(&init_md);
    md.push_str(&format!("## Boot to a microVM ({runs} boots, QEMU accelerator: {accel})\n\nSeconds from QEMU's start. Under software emulation (`Tcg`) every instruction of the host and the nested microVM is emulated, so these are far above what KVM hardware gives; compare runs on the same machine only.\n\n| boot | init starts | units started | microVM's line | exit code reported | microVM run (vmmd) | power-off |\n|---|---|---|---|---|---|---|\n"));
    for (i, r) in rows.iter().enumerate() {
        md.push_str(&format!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} |\n",
            i + 1,
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            r[5]
        ));
    }
    md.push_str("\nThe microVM run is vmmd's own measure: worker start to the guest's reset, including the guest kernel's boot.\n\n");
    md.push_str(&vmm_md);
    md.push_str(&http_md);
    md.push_str(&image_md);
    let path = sh::root().join("docs/performance.md");
    std::fs::write(&path, md)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
