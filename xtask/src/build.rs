//! `cargo xtask build`: the guest kernel, the static binaries and the
//! appliance image, with the example OCI image it carries.

use crate::*;

pub(crate) fn build() -> Result<PathBuf> {
    let t0 = Instant::now();
    deps::ensure()?;
    let root = sh::root();
    let manifest_path = root.join("image-build/steelcup.toml");
    let manifest = image_build::manifest::Manifest::load(&manifest_path)?;
    let guest_kernel = kernel::guest_kernel()?;
    let host_root = kernel::host_kernel(&manifest.host.kernel_package)?;

    step("building static binaries (init, vminit, vmmd, vmm-worker, cup)");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    sh::run(
        Command::new(cargo)
            .current_dir(&root)
            .args([
                "build",
                "--release",
                "--target",
                TARGET,
                "-p",
                "steelcup-init",
                "-p",
                "steelcup-vminit",
                "-p",
                "vmmd",
                "-p",
                "steelcup-vmm",
                "-p",
                "cup",
            ])
            .env("RUSTFLAGS", "-C target-feature=+crt-static"),
    )?;
    let bin_dir = root.join("target").join(TARGET).join("release");
    for b in STATIC_BINS {
        let path = bin_dir.join(b);
        let data = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
        let elf = object::File::parse(&*data)
            .with_context(|| format!("{} is not ELF", path.display()))?;
        if object::Object::section_by_name(&elf, ".interp").is_some() {
            bail!("{b} is dynamically linked; the image needs static binaries");
        }
    }

    // cup's man pages and shell completions, beside the binaries.
    let cup = bin_dir.join("cup");
    sh::run(Command::new(&cup).arg("man").arg(bin_dir.join("man/man1")))?;
    let completions = bin_dir.join("completions");
    std::fs::create_dir_all(&completions)?;
    for (shell, file) in [("bash", "cup.bash"), ("zsh", "_cup"), ("fish", "cup.fish")] {
        let out = Command::new(&cup)
            .args(["completion", shell])
            .output()
            .with_context(|| format!("run {} completion {shell}", cup.display()))?;
        if !out.status.success() {
            bail!(
                "cup completion {shell} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::fs::write(completions.join(file), out.stdout)?;
    }
    println!(
        "cup's man pages: {}, completions: {}",
        bin_dir.join("man/man1").display(),
        completions.display()
    );

    step("building the appliance image");
    let out = sh::out_dir().join("artifacts");
    let oci_archive = example_oci_archive()?;
    let inputs = image_build::Inputs {
        manifest: manifest_path,
        bin_dir,
        guest_kernel,
        host_kernel_root: host_root,
        out: out.clone(),
        extra_files: vec![(EXAMPLE_OCI_ARCHIVE.into(), oci_archive)],
    };
    let m = image_build::build(&inputs)?;
    // The test image: the same plus a host busybox, qemu-tests/units and a
    // root disk image for a workload.
    let root_disk = test_root_disk()?;
    let mut extra_files = inputs.extra_files.clone();
    extra_files.push((TEST_ROOT_DISK.into(), root_disk));
    image_build::build(&image_build::Inputs {
        manifest: root.join("qemu-tests/steelcup-test.toml"),
        out: sh::out_dir().join("test-artifacts"),
        extra_files,
        ..inputs.clone()
    })?;
    let recorded = serde_json::json!({
        "manifest": inputs.manifest,
        "bin_dir": inputs.bin_dir,
        "guest_kernel": inputs.guest_kernel,
        "host_kernel_root": inputs.host_kernel_root,
        "extra_files": inputs.extra_files,
    });
    std::fs::write(
        sh::out_dir().join("build-inputs.json"),
        recorded.to_string(),
    )?;
    eprintln!(
        "host image: {:.1} MB (Debian kernel {} + initramfs {:.1} MB) in {}; built in {}",
        m.image_bytes as f64 / 1e6,
        m.kernel_release,
        m.artifacts["initramfs.cpio.zst"].size as f64 / 1e6,
        out.display(),
        sh::elapsed(t0)
    );
    Ok(out)
}

/// Where the appliance carries the example OCI image of
/// configs/units/hello-oci.toml (the test units use it too).
pub const EXAMPLE_OCI_ARCHIVE: &str = "usr/lib/steelcup/examples/busybox.oci.tar";

/// A busybox OCI image made by Debian's umoci and written as an
/// `oci-archive` by skopeo (tools no one here wrote): a user `app`
/// (1234:1234), a working directory, an environment and a default command.
pub fn example_oci_archive() -> Result<PathBuf> {
    deps::ensure_packages(&["umoci", "skopeo"])?;
    let dir = sh::out_dir().join("test-oci");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let layout = dir.join("layout");
    let image = format!("{}:latest", layout.display());
    let umoci = |args: &[&str]| sh::run(Command::new("umoci").args(args));
    umoci(&["init", "--layout", &layout.display().to_string()])?;
    umoci(&["new", "--image", &image])?;
    let bundle = dir.join("bundle");
    umoci(&["unpack", "--image", &image, &bundle.display().to_string()])?;
    let rootfs = bundle.join("rootfs");
    for d in ["bin", "etc", "work", "tmp"] {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).context("copy /bin/busybox")?;
    for applet in [
        "sh", "echo", "id", "pwd", "cat", "ls", "sleep", "wc", "mkdir", "hostname", "httpd", "wget",
    ] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))?;
    }
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1234:1234:app:/work:/bin/sh\n",
    )?;
    std::fs::write(
        rootfs.join("etc/group"),
        "root:x:0:\napp:x:1234:\nstaff:x:50:app\n",
    )?;
    umoci(&["repack", "--image", &image, &bundle.display().to_string()])?;
    umoci(&[
        "config",
        "--image",
        &image,
        "--config.env",
        "PATH=/bin",
        "--config.env",
        "GREETING=hello",
        "--config.workingdir",
        "/work",
        "--config.user",
        "app",
        "--config.cmd",
        "sh",
        "--config.cmd",
        "-c",
        "--config.cmd",
        "echo \"hi from $GREETING as $(id -u):$(id -g) groups $(id -G) in $(pwd) home $HOME\"; exit 3",
    ])?;
    let policy = dir.join("policy.json");
    std::fs::write(
        &policy,
        r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )?;
    let archive = dir.join("busybox-oci.tar");
    sh::run(
        Command::new("skopeo")
            .arg("--policy")
            .arg(&policy)
            .args(["copy", "--quiet"])
            .arg(format!("oci:{image}"))
            .arg(format!("oci-archive:{}:latest", archive.display())),
    )?;
    Ok(archive)
}
