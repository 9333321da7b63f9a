//! Image formats shared by vmmd and image-build.

pub mod archive;
pub mod cli;
pub mod login;
pub mod registries;
pub mod rootfs;
pub mod source;
pub mod store;
pub mod workload;

/// Lower-case hex of `bytes`, as digests are written.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}
