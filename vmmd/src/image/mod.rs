//! Image formats shared by vmmd and image-build.

pub mod cpio;
