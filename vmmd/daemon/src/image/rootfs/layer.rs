//! Reading one layer's tar stream into the [`Tree`].
//!
//! # Design
//! The `tar` crate frames the stream in raw mode: GNU long names and PAX
//! extension headers come out as entries of their own, so their sizes are
//! checked against [`Limits::max_header`] before a byte of them is read
//! (the crate would otherwise read any size into memory). PAX records
//! (`path`, `linkpath`, `uid`, `gid`, `mtime`, `SCHILY.xattr.*`) apply to
//! the next entry. Every byte of the (uncompressed) stream is counted
//! against [`Limits::max_bytes`] and hashed, so the caller can check the
//! layer's diff ID once the stream ends.

use super::tree::{BlockSink, Entry, EntryKind, Limits, Tree, TreeError};
use sha2::{Digest, Sha256};
use std::io::{self, Read};

/// Errors reading a layer.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("entry {index}: {source}")]
    Entry { index: u64, source: TreeError },
    #[error("entry {index} ({path}): {what}")]
    Bad {
        index: u64,
        path: String,
        what: String,
    },
    #[error("more than {limit} bytes uncompressed")]
    TooLarge { limit: u64 },
    #[error("read the tar stream")]
    Io(#[source] io::Error),
    #[error("write the root image")]
    Write(#[source] io::Error),
}

/// Counts and hashes everything read through it; fails once more than
/// `limit` bytes (over all layers) have passed.
struct Meter<R> {
    inner: R,
    hash: Sha256,
    total: u64,
    limit: u64,
}

impl<R: Read> Read for Meter<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.total += n as u64;
        if self.total > self.limit {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                "layer too large",
            ));
        }
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// Extension records that apply to the next entry.
#[derive(Default)]
struct Pending {
    path: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    uid: Option<u64>,
    gid: Option<u64>,
    mtime: Option<u64>,
    size: Option<u64>,
    xattrs: Vec<(Box<[u8]>, Box<[u8]>)>,
}

/// A PAX extended header that is not one.
#[derive(Debug, thiserror::Error)]
pub enum PaxError {
    #[error("a PAX record without a length")]
    NoLength,
    #[error("a PAX record with a bad length")]
    BadLength,
    #[error("a PAX record without `=`")]
    NoEquals,
    #[error("a PAX number that is not text")]
    NumberNotText,
    #[error("a bad PAX number {0:?}")]
    BadNumber(String),
    #[error("a PAX {0} with a NUL byte")]
    Nul(&'static str),
    #[error("GNU sparse files are not supported")]
    Sparse,
}

/// Parses PAX records (`LEN KEY=VALUE\n`) into `p`.
fn parse_pax(data: &[u8], p: &mut Pending) -> Result<(), PaxError> {
    let mut rest = data;
    while !rest.is_empty() {
        let sp = rest
            .iter()
            .position(|b| *b == b' ')
            .ok_or(PaxError::NoLength)?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or(PaxError::BadLength)?;
        if len <= sp + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(PaxError::BadLength);
        }
        let record = &rest[sp + 1..len - 1];
        rest = &rest[len..];
        let eq = record
            .iter()
            .position(|b| *b == b'=')
            .ok_or(PaxError::NoEquals)?;
        let (key, value) = (&record[..eq], &record[eq + 1..]);
        let number = |v: &[u8]| -> Result<u64, PaxError> {
            let s = std::str::from_utf8(v).map_err(|_| PaxError::NumberNotText)?;
            // mtime may carry a fraction; whole seconds are kept.
            let whole = s.split('.').next().unwrap_or("");
            if whole.starts_with('-') {
                return Ok(0);
            }
            whole
                .parse()
                .map_err(|_| PaxError::BadNumber(s.chars().take(64).collect()))
        };
        match key {
            // A NUL would end the name for a C reader (GNU tar) and not
            // for us: `a` and `a\0x` would be two files, one image apart.
            b"path" if value.contains(&0) => return Err(PaxError::Nul("path")),
            b"linkpath" if value.contains(&0) => return Err(PaxError::Nul("linkpath")),
            b"path" => p.path = Some(value.to_vec()),
            b"linkpath" => p.link = Some(value.to_vec()),
            b"uid" => p.uid = Some(number(value)?),
            b"gid" => p.gid = Some(number(value)?),
            b"mtime" => p.mtime = Some(number(value)?),
            b"size" => p.size = Some(number(value)?),
            k if k.starts_with(b"SCHILY.xattr.") => {
                p.xattrs
                    .push((k[b"SCHILY.xattr.".len()..].into(), value.into()));
            }
            k if k.starts_with(b"GNU.sparse.") => return Err(PaxError::Sparse),
            _ => {}
        }
    }
    Ok(())
}

/// Trims a NUL-terminated header field.
fn trim_nul(v: &[u8]) -> Vec<u8> {
    v.iter()
        .position(|b| *b == 0)
        .map_or(v, |n| &v[..n])
        .to_vec()
}

/// Applies the tar stream `stream` (already decompressed) as layer number
/// `layer`; returns the SHA-256 of the stream (the layer's diff ID) and the
/// bytes it held. `used` is what earlier layers already counted against
/// [`Limits::max_bytes`].
pub fn apply_layer(
    tree: &mut Tree,
    sink: &mut dyn BlockSink,
    stream: &mut dyn Read,
    layer: u32,
    used: u64,
) -> Result<([u8; 32], u64), LayerError> {
    let limits: Limits = *tree.limits();
    let mut meter = Meter {
        inner: stream,
        hash: Sha256::new(),
        total: used,
        limit: limits.max_bytes,
    };
    let too_large = |e: io::Error| {
        if e.kind() == io::ErrorKind::FileTooLarge {
            LayerError::TooLarge {
                limit: limits.max_bytes,
            }
        } else {
            LayerError::Io(e)
        }
    };
    {
        let mut archive = tar::Archive::new(&mut meter);
        let mut pending = Pending::default();
        let entries = archive.entries().map_err(LayerError::Io)?.raw(true);
        for (i, entry) in entries.enumerate() {
            // Entries are counted from 1 in messages.
            let index = i as u64 + 1;
            let mut entry = entry.map_err(too_large)?;
            let header = entry.header().clone();
            let path_now = || String::from_utf8_lossy(&header.path_bytes()).into_owned();
            let bad = |what: String| LayerError::Bad {
                index,
                path: path_now(),
                what,
            };
            let size = header.entry_size().map_err(|e| bad(e.to_string()))?;
            let kind = header.entry_type();
            if kind.is_gnu_longname()
                || kind.is_gnu_longlink()
                || kind.is_pax_local_extensions()
                || kind.is_pax_global_extensions()
            {
                if size > limits.max_header {
                    return Err(bad(format!(
                        "a {size}-byte extension header (at most {})",
                        limits.max_header
                    )));
                }
                let mut data = Vec::with_capacity(size as usize);
                entry.read_to_end(&mut data).map_err(too_large)?;
                if kind.is_gnu_longname() {
                    pending.path = Some(trim_nul(&data));
                } else if kind.is_gnu_longlink() {
                    pending.link = Some(trim_nul(&data));
                } else if kind.is_pax_local_extensions() {
                    parse_pax(&data, &mut pending).map_err(|e| bad(e.to_string()))?;
                }
                continue;
            }
            let p = std::mem::take(&mut pending);
            let path = p.path.unwrap_or_else(|| header.path_bytes().into_owned());
            let bad = |what: String| LayerError::Bad {
                index,
                path: super::tree::show(&path),
                what,
            };
            if path.len() > limits.max_path {
                return Err(bad(format!("a path longer than {} bytes", limits.max_path)));
            }
            if p.size.is_some_and(|s| s != size) {
                return Err(bad("a PAX size that differs from the header's".into()));
            }
            let link = || -> Result<Vec<u8>, LayerError> {
                let l = p
                    .link
                    .clone()
                    .or_else(|| header.link_name_bytes().map(|l| l.into_owned()));
                let l = l.ok_or_else(|| bad("a link without a target".into()))?;
                if l.len() > limits.max_path {
                    return Err(bad(format!(
                        "a link target longer than {} bytes",
                        limits.max_path
                    )));
                }
                Ok(l)
            };
            let device = || -> Result<(u32, u32), LayerError> {
                let major = header
                    .device_major()
                    .map_err(|e| bad(e.to_string()))?
                    .unwrap_or(0);
                let minor = header
                    .device_minor()
                    .map_err(|e| bad(e.to_string()))?
                    .unwrap_or(0);
                Ok((major, minor))
            };
            let kind = match kind {
                tar::EntryType::Regular | tar::EntryType::Continuous => EntryKind::File { size },
                tar::EntryType::Directory => EntryKind::Dir,
                tar::EntryType::Symlink => EntryKind::Symlink(link()?),
                tar::EntryType::Link => EntryKind::Hardlink(link()?),
                tar::EntryType::Char => {
                    let (major, minor) = device()?;
                    EntryKind::CharDevice { major, minor }
                }
                tar::EntryType::Block => {
                    let (major, minor) = device()?;
                    EntryKind::BlockDevice { major, minor }
                }
                tar::EntryType::Fifo => EntryKind::Fifo,
                other => {
                    return Err(bad(format!(
                        "unsupported entry type {:?}",
                        other.as_byte() as char
                    )))
                }
            };
            // Go's archive/tar (Docker, containerd, umoci) and GNU tar read
            // no data after a directory, link, device or FIFO whatever its
            // size says, and take what follows as the next header; skipping
            // the bytes would show another file list than theirs.
            if size != 0 && !matches!(kind, EntryKind::File { .. }) {
                return Err(bad(format!(
                    "a {} entry that declares {size} bytes of data (other tar readers take them for headers)",
                    kind.name()
                )));
            }
            let id = |pax: Option<u64>, raw: io::Result<u64>| -> Result<u32, LayerError> {
                let v = match pax {
                    Some(v) => v,
                    None => raw.map_err(|e| bad(e.to_string()))?,
                };
                u32::try_from(v).map_err(|_| bad(format!("owner id {v} does not fit 32 bits")))
            };
            let entry_meta = Entry {
                mode: (header.mode().map_err(|e| bad(e.to_string()))? & 0o7777) as u16,
                uid: id(p.uid, header.uid())?,
                gid: id(p.gid, header.gid())?,
                mtime: match p.mtime {
                    Some(m) => m,
                    None => header.mtime().map_err(|e| bad(e.to_string()))?,
                },
                xattrs: p.xattrs,
                kind,
                path,
            };
            tree.apply(entry_meta, layer, &mut entry, sink)
                .map_err(|source| match source {
                    TreeError::Read(e) => too_large(e),
                    TreeError::Write(e) => LayerError::Write(e),
                    source => LayerError::Entry { index, source },
                })?;
        }
    }
    // Whatever follows the end-of-archive blocks is part of the diff ID too.
    io::copy(&mut meter, &mut io::sink()).map_err(too_large)?;
    Ok((meter.hash.finalize().into(), meter.total - used))
}
