//! `image-build`: builds the steelcup appliance artifacts from a manifest.

use clap::Parser;
use std::path::PathBuf;

/// Build the host initramfs, the PXE set and manifest.json.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The image manifest.
    #[arg(long, default_value = "image-build/steelcup.toml")]
    manifest: PathBuf,
    /// Directory holding the static init, vminit, vmmd, vmm-worker and cup.
    #[arg(long)]
    bin_dir: PathBuf,
    /// The guest kernel (bzImage).
    #[arg(long)]
    guest_kernel: PathBuf,
    /// The host kernel package, unpacked (dpkg-deb -x).
    #[arg(long)]
    host_kernel_root: PathBuf,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let m = image_build::build(&image_build::Inputs {
        manifest: a.manifest,
        bin_dir: a.bin_dir,
        guest_kernel: a.guest_kernel,
        host_kernel_root: a.host_kernel_root,
        out: a.out.clone(),
        extra_files: Vec::new(),
    })?;
    for (name, f) in &m.artifacts {
        println!("{:>12}  {}  {name}", f.size, &f.sha256[..16]);
    }
    println!(
        "host image (kernel {} + initramfs): {:.1} MB in {}",
        m.kernel_release,
        m.image_bytes as f64 / 1e6,
        a.out.display()
    );
    Ok(())
}
