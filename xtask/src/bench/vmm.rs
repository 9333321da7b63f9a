//! The VMM benchmark: the test image plus Debian's QEMU, booted with
//! `steelcup.bench=vmm`, where the `bench-vmm` unit runs `vmmd bench`
//! (steelcup's worker beside QEMU's `microvm` machine on the appliance's
//! real, nested KVM) and prints a Markdown table, which lands in
//! `docs/performance.md` with a plot.

use crate::sh::{self, step};
use anyhow::{bail, Context, Result};
use qemu_tests::{Boot, Guest, GuestConfig};
use std::path::PathBuf;
use std::time::Duration;

const QEMU: &str = "/usr/bin/qemu-system-x86_64";

/// QEMU, the shared libraries it loads (by their path, with the content of
/// the file behind any symlink), and the microvm firmware.
fn qemu_files() -> Result<Vec<(String, PathBuf)>> {
    let mut files = crate::bench::http::with_libraries(std::path::Path::new(QEMU), QEMU)?;
    for fw in [
        "/usr/share/qemu/qboot.rom",
        "/usr/share/qemu/bios-microvm.bin",
    ] {
        let real = std::fs::canonicalize(fw).with_context(|| format!("QEMU firmware {fw}"))?;
        files.push((fw.to_string(), real));
    }
    Ok(files)
}

/// Where the bench image carries the peer VMMs and the guest's ELF kernel.
const PEER_DIR: &str = "/usr/lib/steelcup/bench";
/// The peers `vmmd bench` runs beside steelcup and QEMU, by file name.
const PEERS: [&str; 2] = ["firecracker", "cloud-hypervisor"];

/// The peer VMMs (from `$STEELCUP_PEERS`, else `../shared/peers` beside
/// the project) with their shared libraries, and the guest kernel as an
/// ELF vmlinux, for the bench image. A missing peer is said and left out:
/// `vmmd bench` names it as skipped.
fn peer_files() -> Result<Vec<(String, PathBuf)>> {
    let dir = std::env::var_os("STEELCUP_PEERS")
        .map(PathBuf::from)
        .unwrap_or_else(|| sh::root().join("../shared/peers"));
    let mut files = vec![(
        format!("{PEER_DIR}/vmlinux"),
        crate::kernel::guest_vmlinux()?,
    )];
    for peer in PEERS {
        let path = dir.join(peer);
        if path.is_file() {
            files.extend(crate::bench::http::with_libraries(
                &path,
                &format!("{PEER_DIR}/{peer}"),
            )?);
        } else {
            eprintln!(
                "VMM bench: no {} (set STEELCUP_PEERS=DIR): {peer} is skipped",
                path.display()
            );
        }
    }
    Ok(files)
}

/// Builds a bench image `dir` beside the others: the test image with the
/// example OCI image, the test root disk and `more` files; returns its
/// directory.
pub fn build_image(dir: &str, more: Vec<(String, PathBuf)>) -> Result<PathBuf> {
    let recorded = recorded_inputs()?;
    let out = sh::out_dir().join(dir);
    // What the appliance carries besides (the example OCI image, which
    // `vmmd bench-start` runs).
    let mut extra = more;
    extra.extend(recorded.extra_files.clone());
    extra.push((
        crate::TEST_ROOT_DISK.into(),
        sh::out_dir().join("test-root.ext4"),
    ));
    image_build::build(&image_build::Inputs {
        manifest: sh::root().join("qemu-tests/steelcup-test.toml"),
        out: out.clone(),
        extra_files: extra,
        ..recorded
    })?;
    Ok(out)
}

/// The inputs `cargo xtask build` recorded in `build-inputs.json` for the
/// appliance image (its manifest, binaries, kernels and extra files),
/// with the artifacts directory as `out`.
fn recorded_inputs() -> Result<image_build::Inputs> {
    let inputs: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sh::out_dir().join("build-inputs.json"))?)?;
    let path = |k: &str| -> Result<PathBuf> {
        Ok(PathBuf::from(
            inputs[k]
                .as_str()
                .with_context(|| format!("build-inputs.json: {k}"))?,
        ))
    };
    Ok(image_build::Inputs {
        manifest: path("manifest")?,
        bin_dir: path("bin_dir")?,
        guest_kernel: path("guest_kernel")?,
        host_kernel_root: path("host_kernel_root")?,
        out: sh::out_dir(),
        extra_files: serde_json::from_value(inputs["extra_files"].clone())
            .context("build-inputs.json: extra_files")?,
    })
}

/// The worker's setup on this machine itself, through its own `/dev/kvm`
/// (no emulated host): `vmmd bench --setup-only`, each worker killed at its
/// first `KVM_RUN`, so the guest never needs to boot here. Returns the
/// Markdown section; where no VM can be created here, the section says so
/// and why.
pub fn native_setup() -> Result<String> {
    step("VMM setup on this machine (its own /dev/kvm, the host not emulated)");
    let build = recorded_inputs()?;
    let manifest = image_build::manifest::Manifest::load(&build.manifest)?;
    let initramfs = sh::out_dir().join("bench-guest-initramfs.cpio");
    std::fs::write(&initramfs, image_build::guest_initramfs(&build, &manifest)?)?;
    let mut md = String::from(
        "## VMM setup on the bench machine

",
    );
    md.push_str(NATIVE_METHOD);
    md.push('\n');
    let out = sh::output(
        std::process::Command::new(build.bin_dir.join("vmmd"))
            .args(["bench", "--setup-only", "--rounds", "21", "--kernel"])
            .arg(&build.guest_kernel)
            .arg("--initramfs")
            .arg(&initramfs),
    );
    let out = match out {
        Ok(out) => out,
        Err(e) => {
            eprintln!("VMM setup on this machine: not measured: {e:#}");
            md.push_str(&format!(
                "Not measured in the last run: no VM could be created on the machine that ran it ({e:#}).\n\n"
            ));
            return Ok(md);
        }
    };
    let lines: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("vmm-bench| ").map(str::trim_end))
        .collect();
    for l in lines.iter().filter(|l| l.starts_with('|')) {
        md.push_str(l);
        md.push('\n');
    }
    let field = |name: &str| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or("")
            .to_string()
    };
    md.push_str(&format!(
        "\nTarget in this run: {}.\n\nWhere the median round's setup goes (ms after spawn): {}.\n\n",
        field("targets: "),
        field("phases: ")
    ));
    Ok(md)
}

const NATIVE_METHOD: &str = "The same worker and guest (1 vCPU, 128 MiB, the guest kernel and initramfs the appliance ships, the bench's guest config) started by `vmmd bench --setup-only` straight on the machine that ran `cargo xtask bench`, through its own `/dev/kvm`: here the host kernel and the worker run at native speed, where inside the appliance every host instruction is emulated. Setup is spawn to vCPU 0's first `KVM_RUN` (CLOCK_MONOTONIC, reported by the worker); each worker is killed there, so the guest need not boot (the development and CI machines' `/dev/kvm` cannot run a Linux guest at speed: a paravirtual shim emulates guest ring-0 code). 21 rounds. Beside it, starting the worker binary alone: spawn to exit of `vmm-worker --version`. On our development machines `/dev/kvm` is a paravirtual KVM (PVM), whose VM creation and memory-slot changes are slower than hardware KVM's. Target: setup under 10 ms.\n";

/// Runs the benchmark; returns the Markdown section for performance.md.
pub fn run() -> Result<String> {
    let native = native_setup()?;
    step("VMM: steelcup's worker beside QEMU microvm, inside the appliance");
    let mut files = qemu_files()?;
    files.extend(peer_files()?);
    let dir = build_image("bench-artifacts", files)?;
    let mut cfg = GuestConfig::direct("bench-vmm", &dir)?;
    cfg.memory_mib = 3072;
    if let Boot::Direct { cmdline, .. } = &mut cfg.boot {
        cmdline.push_str(" steelcup.bench=vmm");
    }
    let serial = boot_until(
        &cfg,
        &[
            ("vmm-bench: done", Duration::from_secs(600)),
            // Then `cup run` cold and warm (vmmd bench-start).
            ("start-bench: done", Duration::from_secs(900)),
        ],
    )?;
    let log_path = sh::out_dir().join("qemu-logs/bench-vmm.log");
    let lines: Vec<&str> = serial
        .lines()
        .filter_map(|l| l.split_once("vmm-bench| ").map(|(_, t)| t.trim_end()))
        .collect();
    if lines.len() < 6 {
        bail!("the benchmark printed no table; see {}", log_path.display());
    }
    let table: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with('|'))
        .collect();
    let rounds = lines
        .iter()
        .find_map(|l| l.strip_prefix("rounds: "))
        .unwrap_or("");
    let targets = lines
        .iter()
        .find_map(|l| l.strip_prefix("targets: "))
        .unwrap_or("");
    let metrics = lines
        .iter()
        .find_map(|l| l.strip_prefix("metrics: "))
        .map(|m| format!("\n\n**Metrics cost**, same run: each round also boots our worker while its counters are read as a metrics scrape reads them (the worker's `Counters` command and its `/proc` files), the plain boot and the scraped one taking turns to go first, each measured boot after 2 s with the host left alone; {m}."))
        .unwrap_or_default();
    let floor = lines
        .iter()
        .find_map(|l| l.strip_prefix("floor: "))
        .map(|ms| format!(" Starting the worker binary alone (spawn to exit of `vmm-worker --version`) took {ms} ms of that in this run."))
        .unwrap_or_default();
    let phases = serial
        .lines()
        .filter_map(|l| {
            l.split_once("worker phases (ms after spawn): ")
                .map(|(_, p)| p)
        })
        .next_back()
        .unwrap_or("");
    let skipped: String = lines
        .iter()
        .filter_map(|l| l.strip_prefix("skipped: "))
        .map(|l| format!("\n\nSkipped in this run: {l}."))
        .collect();
    let svg = plot(&table);
    let svg_path = sh::root().join("docs/performance-vmm.svg");
    std::fs::write(&svg_path, svg).with_context(|| format!("write {}", svg_path.display()))?;
    let mut md = String::from(
        "## VMM: steelcup beside QEMU `microvm`, Firecracker and Cloud Hypervisor\n\n",
    );
    md.push_str(METHOD);
    md.push('\n');
    for l in &table {
        md.push_str(l);
        md.push('\n');
    }
    md.push_str(&format!(
        "{skipped}\n\nRounds (ms to the guest's line, steelcup/QEMU): {rounds}\n\nTargets in this run: {targets}.{metrics}\n\nWhere the worker's setup goes (last round, ms after spawn): {phases}.{floor}\n\n![steelcup beside QEMU microvm](performance-vmm.svg)\n\n{READING}"
    ));
    md.push_str(&start_section(&serial, &log_path)?);
    md.push_str(&native);
    Ok(md)
}

/// Boots `cfg` and waits for each marker in turn (within its time, or 90 s
/// of silence: a hang of the emulated host), then for the power-off;
/// returns the serial console. Under software emulation the emulated host
/// now and then hangs, resets or panics while a VM starts (see
/// docs/architecture.md); such a run gets one more boot.
pub fn boot_until(cfg: &GuestConfig, markers: &[(&str, Duration)]) -> Result<String> {
    for attempt in 1..=2 {
        let mut g = Guest::boot(cfg)?;
        let mut done = Ok(Duration::ZERO);
        for (marker, limit) in markers {
            let t0 = std::time::Instant::now();
            done = loop {
                match g.wait_for(marker, Duration::from_secs(15)) {
                    Ok(t) => break Ok(t),
                    Err(e)
                        if g.silent_for() < Duration::from_secs(90)
                            && t0.elapsed() < *limit
                            && !e.to_string().contains("QEMU exited") => {}
                    Err(e) => break Err(e),
                }
            };
            if done.is_err() {
                break;
            }
        }
        match done {
            Ok(_) => {
                let serial = g.serial();
                g.wait_exit(Duration::from_secs(120))?;
                return Ok(serial);
            }
            Err(e) if attempt == 1 && g.silent_for() > Duration::from_secs(90) => {
                eprintln!(
                    "the emulated host stopped during the benchmark ({e:#}); booting once more"
                );
            }
            // A nested guest that triple-faulted (under TCG now and then)
            // fails the start benchmark's run, whenever in the boot.
            Err(e)
                if attempt == 1
                    && qemu_tests::emulation_fault(&g, &e).is_none()
                    && g.accel == qemu_tests::Accel::Tcg
                    && g.serial().contains("guest crashed: triple fault") =>
            {
                eprintln!(
                    "a nested guest triple-faulted during the benchmark ({e:#}); booting once more"
                );
            }
            Err(e) if attempt == 1 => match qemu_tests::emulation_fault(&g, &e) {
                // The emulated host reset or panicked: the emulation's
                // doing, not the benchmark's (see qemu-tests).
                Some(why) => eprintln!("{why} during the benchmark ({e:#}); booting once more"),
                None => return Err(e.context(format!("see {}", g.log_path.display()))),
            },
            Err(e) => return Err(e.context(format!("see {}", g.log_path.display()))),
        }
    }
    bail!("no benchmark run finished")
}

/// The `cup run` cold/warm section from `vmmd bench-start`'s lines.
fn start_section(serial: &str, log_path: &std::path::Path) -> Result<String> {
    let lines: Vec<&str> = serial
        .lines()
        .filter_map(|l| l.split_once("start-bench| ").map(|(_, t)| t.trim_end()))
        .collect();
    if lines.len() < 8 {
        bail!(
            "the start benchmark printed no table; see {}",
            log_path.display()
        );
    }
    let mut md = String::from("## Starting a workload: cold and from the warm pool\n\n");
    md.push_str(START_METHOD);
    md.push('\n');
    for l in lines.iter().filter(|l| l.starts_with('|')) {
        md.push_str(l);
        md.push('\n');
    }
    md.push('\n');
    for l in lines.iter().filter(|l| !l.starts_with('|')) {
        md.push_str(&format!("- {l}\n"));
    }
    md.push('\n');
    md.push_str(START_READING);
    Ok(md)
}

const START_METHOD: &str = "Run in the same boot right after the VMM benchmark, by `vmmd bench-start` through the real daemon and CLI, with the appliance's warm pool (one VM of 1 vCPU and 128 MiB, `docs/warm-pool.md`). Each round times `cup run --rm IMAGE sh -c true` (the example busybox OCI image, already in the store; it has no `true` program) from spawning `cup` to its exit: the VM started, the workload ran and reported exit code 0 over vsock, the VM ended and was removed. *Cold*: `--memory 120MiB`, a size the pool does not keep, so vmmd boots a VM; *warm*: the default size, once vmmd says a pool VM is ready, counted only if vmmd then says the workload started from the pool. Rounds alternate, each once the pool is full again (no pool VM boots beside a timed run). Throughput: 4 cold runs started at once, VMs per second until the last exits. Target: warm at most a quarter of cold (on KVM hardware, under 50 ms).\n";

const START_READING: &str = "Reading it: a warm start skips the guest kernel's boot and vminit's own start; what is left is `cup` and the API, handing the root image's descriptor to the worker and the config to vminit, mounting the erofs root under its writable layer, running the program and tearing the VM down. Under TCG all of it is emulated, the guest's kernel boot most of all, so the absolute numbers are far above KVM hardware; the ratio is the comparison.\n\n";

const METHOD: &str = "Run inside the booted test image (QEMU TCG with an emulated AMD-V CPU, so the VMMs run on real, nested KVM) by `vmmd bench`, with Debian's QEMU and the peers of `../shared/peers` (Firecracker v1.16.1, Cloud Hypervisor v53.0; `STEELCUP_PEERS=DIR` for others) added to the image. Each round starts steelcup's per-VM worker (`vmm-worker`, as vmmd does), then `qemu-system-x86_64 -M microvm,x-option-roms=off,rtc=off -accel kvm -cpu host -nodefaults -no-user-config -serial stdio`, then `firecracker --no-api --config-file` (no drives, its log to a file) and `cloud-hypervisor --cpus boot=1 --serial tty --console off` (no API socket; its default virtio-rng and seccomp filters on), all with the same guest kernel (the ELF `vmlinux` of the appliance's build, which has the PVH entry the peers need), the same initramfs with the same guest config appended (vminit runs `echo` of a marker), the same command line, 1 vCPU and 128 MiB. Time: from just before the process is spawned to the marker on its serial console; each VMM is killed there (Cloud Hypervisor reboots the guest when it ends rather than exiting, so none is left to exit on its own). Setup: spawn to vCPU 0's first `KVM_RUN`, reported by the worker on CLOCK_MONOTONIC. Peak RSS: `ru_maxrss` from `wait4`. Overhead: RSS when the marker arrives minus the RSS of the guest-memory mapping (from `/proc/PID/smaps`). Medians of 9 rounds, started once the appliance's own boot-time workloads are done; each measured boot starts after 2 s with the host left alone (the VM before is still being taken down for a while after its VMM has exited, and a boot right after another took half as long again, whichever VMM it was). Targets: setup under 10 ms, overhead under 5 MiB, time and peak RSS at most 0.5× QEMU's. Under TCG every instruction of the host is emulated, so absolute times are far above KVM hardware; the ratios are the comparison.\n";

const READING: &str = "Reading it: both VMMs boot the same guest, whose own boot (decompressing the kernel, unpacking the initramfs, all emulated twice over here) is most of the time to its first line, so the time ratio says as much about the guest as about the VMM, and it swings from round to round under emulation. Setup is the VMM's alone: exec of `vmm-worker` (2.5 MB, the worker without the rest of vmmd) and reading its config, while a thread creates the KVM VM (`KVM_CREATE_VM`, the in-kernel interrupt controllers, the PIT) and registers guest memory as soon as the main thread has mapped it; meanwhile the main thread maps the kernel copy-on-write from its file (nothing read or copied; the host's page cache is shared by every VM), reads the initramfs in, writes the boot tables and opens the devices; vCPUs, the threads and the seccomp filter take the rest. Guest memory has 4 KiB pages except the ranges the guest writes end to end while it boots, which get transparent huge pages: where its kernel decompresses itself, its initramfs, and just below that its memory map. On a nested host every page the guest first touches is an exit to the host's KVM, so that spares the guest thousands of exits for about a MiB more memory. Turning off PIT tick replay, which waits out two SRCU grace periods in the host kernel, happens on the control thread once the guest runs. Under emulation even starting a process costs tens of ms (the worker binary alone, above), so the 10 ms target is checked where the host runs at native speed: see *VMM setup on the bench machine* below. Overhead counts every mapping inside the guest's memory range as guest memory. Memory is where the VMM shows most: beyond the guest's own pages, the worker holds a few MiB where QEMU holds tens; and where QEMU asks for transparent huge pages on all of guest memory, the worker asks only for those ranges, so the same guest's touched memory costs it less.\n\n";

/// A small SVG: steelcup's value relative to QEMU's (QEMU = 1) for time,
/// peak RSS and overhead, from the ratio row of `table`.
fn plot(table: &[&str]) -> String {
    let ratios: Vec<f64> = table
        .iter()
        .find(|l| l.contains("ratio"))
        .map(|l| {
            l.split('|')
                .filter_map(|c| {
                    c.trim()
                        .trim_matches('*')
                        .trim_end_matches('×')
                        .parse()
                        .ok()
                })
                .collect()
        })
        .unwrap_or_default();
    let labels = ["time to guest userspace", "peak RSS", "VMM overhead"];
    let (w, bar_h, gap, left) = (520.0, 22.0, 14.0, 170.0);
    let scale = (w - left - 60.0) / 1.2;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n<text x=\"4\" y=\"16\">steelcup / QEMU microvm (QEMU = 1; lower is better)</text>\n",
        40.0 + 3.0 * (bar_h + gap)
    );
    for (i, (label, r)) in labels.iter().zip(ratios.iter()).enumerate() {
        let y = 30.0 + i as f64 * (bar_h + gap);
        let len = (r.min(1.2) * scale).max(1.0);
        svg.push_str(&format!(
            "<text x=\"4\" y=\"{:.0}\">{label}</text>\n<rect x=\"{left}\" y=\"{y:.0}\" width=\"{len:.0}\" height=\"{bar_h}\" fill=\"#3b7dd8\"/>\n<text x=\"{:.0}\" y=\"{:.0}\">{r:.2}×</text>\n",
            y + 15.0,
            left + len + 4.0,
            y + 15.0
        ));
    }
    let x1 = left + scale;
    svg.push_str(&format!(
        "<line x1=\"{x1:.0}\" y1=\"26\" x2=\"{x1:.0}\" y2=\"{:.0}\" stroke=\"#c33\" stroke-dasharray=\"4 3\"/>\n</svg>\n",
        30.0 + 3.0 * (bar_h + gap)
    ));
    svg
}
