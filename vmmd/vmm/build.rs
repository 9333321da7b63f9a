//! The worker's build identity for snapshots: a hash of this crate's
//! sources and of the workspace's `Cargo.lock`, so a snapshot taken by one
//! build of the device model is never restored by another
//! (`STEELCUP_VMM_BUILD`, see `src/snapshot.rs`).

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            files(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn main() {
    let here = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let mut all = Vec::new();
    files(&here.join("src"), &mut all);
    all.sort();
    let mut h = Sha256::new();
    for f in &all {
        h.update(
            f.strip_prefix(&here)
                .unwrap_or(f)
                .to_string_lossy()
                .as_bytes(),
        );
        h.update(std::fs::read(f).unwrap_or_default());
    }
    let lock = here.join("../../Cargo.lock");
    h.update(std::fs::read(&lock).unwrap_or_default());
    let digest = h.finalize();
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    println!(
        "cargo:rustc-env=STEELCUP_VMM_BUILD={}+{hex}",
        std::env::var("CARGO_PKG_VERSION").unwrap_or_default()
    );
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed={}", lock.display());
}
