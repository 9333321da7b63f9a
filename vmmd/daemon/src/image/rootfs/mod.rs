//! An image's layers to one read-only erofs root image, streamed.
//!
//! # Design
//! [`RootfsBuilder`] reads each layer once, in order, straight from its
//! (compressed) blob: entries are merged in memory ([`tree`]), file
//! contents are written into the image as they pass ([`erofs`]), and
//! nothing is unpacked onto the host's filesystem. Each layer's
//! uncompressed SHA-256 comes back so the caller checks it against the
//! image config's diff IDs before publishing the image.

pub mod erofs;
pub mod layer;
pub mod tree;

use std::fs::File;
use std::io::{self, Read};

pub use erofs::Stats;
pub use layer::LayerError;
pub use tree::Limits;

/// How a layer blob is compressed, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The compression of a layer of media type `media_type`; `None` for
    /// media types that are not layers.
    pub fn of_media_type(media_type: &str) -> Option<Compression> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
                Some(Compression::Gzip)
            }
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
                Some(Compression::Zstd)
            }
            _ => None,
        }
    }

    /// Sniffs the compression from a blob's first bytes (docker-archive
    /// layers carry no media type).
    pub fn sniff(head: &[u8]) -> Compression {
        match head {
            [0x1f, 0x8b, ..] => Compression::Gzip,
            [0x28, 0xb5, 0x2f, 0xfd, ..] => Compression::Zstd,
            _ => Compression::None,
        }
    }

    /// A reader of the uncompressed stream.
    pub fn reader<'a>(self, blob: impl Read + 'a) -> io::Result<Box<dyn Read + 'a>> {
        let blob = io::BufReader::with_capacity(256 << 10, blob);
        Ok(match self {
            Compression::None => Box::new(blob),
            Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(blob)),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(blob)?),
        })
    }
}

/// Builds one erofs image from an image's layers.
#[derive(Debug)]
pub struct RootfsBuilder {
    tree: tree::Tree,
    writer: erofs::ErofsWriter,
    layers: u32,
    bytes: u64,
}

impl RootfsBuilder {
    /// Starts an image in `file` (empty, opened for reading and writing).
    pub fn new(file: File, limits: Limits) -> RootfsBuilder {
        RootfsBuilder {
            tree: tree::Tree::new(limits),
            writer: erofs::ErofsWriter::new(file),
            layers: 0,
            bytes: 0,
        }
    }

    /// Applies the next layer from its uncompressed tar stream; returns the
    /// stream's SHA-256 (its diff ID).
    pub fn add_layer(&mut self, stream: &mut dyn Read) -> Result<[u8; 32], LayerError> {
        let (digest, bytes) = layer::apply_layer(
            &mut self.tree,
            &mut self.writer,
            stream,
            self.layers,
            self.bytes,
        )?;
        self.layers += 1;
        self.bytes += bytes;
        Ok(digest)
    }

    /// The merged tree so far.
    pub fn tree(&mut self) -> &mut tree::Tree {
        &mut self.tree
    }

    /// Writes the metadata; the image is complete.
    pub fn finish(self) -> io::Result<Stats> {
        self.writer.finish(&self.tree, 0)
    }
}

#[cfg(test)]
mod tests;
