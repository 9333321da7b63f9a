//! The image store: content-addressed blobs, image names, and one erofs
//! root image per image, under `/var/lib/steelcup`.
//!
//! # Design
//! ```text
//! STORE/blobs/sha256/HEX     manifests, configs and layers, by digest
//! STORE/rootfs/HEX.erofs     root images, by the image's layer chain
//! STORE/tmp/                 downloads and images being built
//! STORE/refs.json            image names -> manifest digests
//! ```
//! A blob is written to `tmp/`, checked — size first, then digest — and
//! only then renamed into `blobs/`; a root image is built in `tmp/` and
//! renamed into `rootfs/` once every layer's diff ID matched. So a pull or
//! a build killed at any point leaves nothing half-made where it would be
//! used, and a rerun converges (an interrupted download resumes from its
//! `tmp/HEX.partial`). Digests are parsed into [`Digest`] (algorithm and
//! 64 hex digits) before any of them becomes part of a path.
//!
//! Garbage collection keeps what a named image reaches (its manifest,
//! config, layers and root image) and removes everything else, including
//! leftovers in `tmp/`.

use super::rootfs::{Compression, Limits, RootfsBuilder};
use oci_spec::image::{ImageConfiguration, ImageManifest};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Errors of the image store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0:?} is not a sha256 digest")]
    BadDigest(String),
    #[error("blob {digest}: {got} bytes, the descriptor says {want}")]
    SizeMismatch { digest: Digest, got: u64, want: u64 },
    #[error("blob {digest}: its content hashes to {got}")]
    DigestMismatch { digest: Digest, got: Digest },
    #[error("blob {0} is not in the store")]
    MissingBlob(Digest),
    #[error("no image named {0:?} in the store")]
    UnknownImage(String),
    #[error("manifest {digest}: {what}")]
    BadManifest { digest: Digest, what: String },
    #[error("config {digest}: {what}")]
    BadConfig { digest: Digest, what: String },
    #[error("layer {index} ({digest}): {source}")]
    Layer {
        index: usize,
        digest: Digest,
        source: super::rootfs::LayerError,
    },
    #[error("layer {index} ({digest}): its content is {got}, the image config says {want}")]
    DiffIdMismatch {
        index: usize,
        digest: Digest,
        got: Digest,
        want: String,
    },
    #[error("layer {index} ({digest}): media type {media_type:?} is not a layer")]
    LayerMediaType {
        index: usize,
        digest: Digest,
        media_type: String,
    },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A validated `sha256:HEX` digest.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest {
    hex: String,
}

impl Digest {
    /// The 64 hex digits.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest::from_raw(Sha256::digest(bytes).into())
    }

    /// The digest with the raw hash `hash`.
    pub fn from_raw(hash: [u8; 32]) -> Digest {
        Digest {
            hex: super::hex(&hash),
        }
    }
}

impl FromStr for Digest {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Digest, StoreError> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| StoreError::BadDigest(s.to_string()))?;
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(StoreError::BadDigest(s.to_string()));
        }
        Ok(Digest {
            hex: hex.to_string(),
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

/// Hashes and counts what is written through it.
struct HashingWriter<W> {
    inner: W,
    hash: Sha256,
    len: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// An image in the store, read and checked.
#[derive(Debug, Clone)]
pub struct Image {
    pub manifest_digest: Digest,
    pub manifest: ImageManifest,
    pub config_digest: Digest,
    pub config: ImageConfiguration,
}

impl Image {
    /// The key of the image's root image: the SHA-256 of its diff IDs in
    /// order (images sharing all layers share one root image).
    pub fn rootfs_key(&self) -> Digest {
        let mut h = Sha256::new();
        for d in self.config.rootfs().diff_ids() {
            h.update(d.as_bytes());
            h.update(b"\n");
        }
        Digest::from_raw(h.finalize().into())
    }
}

/// A named image, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSummary {
    pub name: String,
    pub digest: String,
    /// Compressed bytes of the layers.
    pub size: u64,
    /// Whether the root image is built.
    pub rootfs: bool,
}

/// What garbage collection removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    pub blobs: u64,
    pub rootfs: u64,
    pub tmp: u64,
    pub bytes: u64,
}

/// The store under one directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    limits: Limits,
}

/// Manifests and configs are small; anything bigger is refused unread.
pub const MAX_JSON: u64 = 4 << 20;

pub const MANIFEST_OCI: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MANIFEST_DOCKER: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const INDEX_OCI: &str = "application/vnd.oci.image.index.v1+json";
pub const INDEX_DOCKER: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

impl Store {
    /// Opens (creating) the store at `root`.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        for d in ["blobs/sha256", "rootfs", "tmp"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(io_at(&p))?;
        }
        Ok(Store {
            root: root.to_path_buf(),
            limits: Limits::default(),
        })
    }

    /// Uses `limits` for root images built from now on.
    pub fn with_limits(mut self, limits: Limits) -> Store {
        self.limits = limits;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(d.hex())
    }

    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    /// Whether blob `d` is in the store as a descriptor of `size` bytes
    /// says it is: a blob there of another length is a size error (the
    /// descriptor is wrong; the blob is what its digest says).
    pub fn has_blob_of(&self, d: &Digest, size: u64) -> Result<bool, StoreError> {
        match fs::metadata(self.blob_path(d)) {
            Ok(m) if m.is_file() && m.len() == size => Ok(true),
            Ok(m) if m.is_file() => Err(StoreError::SizeMismatch {
                digest: d.clone(),
                got: m.len(),
                want: size,
            }),
            _ => Ok(false),
        }
    }

    /// Where a download of `d` in progress is kept.
    pub fn partial_path(&self, d: &Digest) -> PathBuf {
        self.root.join("tmp").join(format!("{}.partial", d.hex()))
    }

    /// Checks the finished download at `partial` (size, then digest) and
    /// publishes it as blob `d`; a bad one is deleted.
    pub fn commit_partial(&self, partial: &Path, d: &Digest, size: u64) -> Result<(), StoreError> {
        let got = fs::metadata(partial).map_err(io_at(partial))?.len();
        if got != size {
            let _ = fs::remove_file(partial);
            return Err(StoreError::SizeMismatch {
                digest: d.clone(),
                got,
                want: size,
            });
        }
        let mut f = File::open(partial).map_err(io_at(partial))?;
        let mut h = HashingWriter {
            inner: io::sink(),
            hash: Sha256::new(),
            len: 0,
        };
        io::copy(&mut f, &mut h).map_err(io_at(partial))?;
        let got = Digest::from_raw(h.hash.finalize().into());
        if &got != d {
            let _ = fs::remove_file(partial);
            return Err(StoreError::DigestMismatch {
                digest: d.clone(),
                got,
            });
        }
        f.sync_all().map_err(io_at(partial))?;
        let dest = self.blob_path(d);
        fs::rename(partial, &dest).map_err(io_at(&dest))
    }

    /// Writes blob `d` of `size` bytes from `data`, checking it first.
    pub fn put_blob(&self, d: &Digest, size: u64, data: &mut dyn Read) -> Result<(), StoreError> {
        if self.has_blob_of(d, size)? {
            return Ok(());
        }
        let tmp =
            tempfile::NamedTempFile::new_in(self.root.join("tmp")).map_err(io_at(&self.root))?;
        let mut w = HashingWriter {
            inner: io::BufWriter::new(tmp.as_file()),
            hash: Sha256::new(),
            len: 0,
        };
        // One byte more than promised is enough to know it is too long.
        io::copy(&mut data.take(size.saturating_add(1)), &mut w).map_err(io_at(tmp.path()))?;
        w.flush().map_err(io_at(tmp.path()))?;
        let (len, hash) = (w.len, w.hash.clone());
        drop(w);
        if len != size {
            return Err(StoreError::SizeMismatch {
                digest: d.clone(),
                got: len,
                want: size,
            });
        }
        let got = Digest::from_raw(hash.finalize().into());
        if &got != d {
            return Err(StoreError::DigestMismatch {
                digest: d.clone(),
                got,
            });
        }
        tmp.as_file().sync_all().map_err(io_at(tmp.path()))?;
        let dest = self.blob_path(d);
        tmp.persist(&dest).map_err(|e| StoreError::Io {
            path: dest,
            source: e.error,
        })?;
        Ok(())
    }

    /// Stores what `data` holds under its own digest (content that comes
    /// with no digest to check, like `docker save` files) and returns it.
    pub fn put_by_content(&self, data: &mut dyn Read) -> Result<Digest, StoreError> {
        let tmp =
            tempfile::NamedTempFile::new_in(self.root.join("tmp")).map_err(io_at(&self.root))?;
        let mut w = HashingWriter {
            inner: io::BufWriter::new(tmp.as_file()),
            hash: Sha256::new(),
            len: 0,
        };
        io::copy(data, &mut w).map_err(io_at(tmp.path()))?;
        w.flush().map_err(io_at(tmp.path()))?;
        let hash = w.hash.clone();
        drop(w);
        let d = Digest::from_raw(hash.finalize().into());
        if !self.has_blob(&d) {
            let dest = self.blob_path(&d);
            tmp.persist(&dest).map_err(|e| StoreError::Io {
                path: dest,
                source: e.error,
            })?;
        }
        Ok(d)
    }

    /// Stores `bytes` as a blob and returns its digest.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<Digest, StoreError> {
        let d = Digest::of(bytes);
        self.put_blob(&d, bytes.len() as u64, &mut &bytes[..])?;
        Ok(d)
    }

    /// Opens blob `d`.
    pub fn open_blob(&self, d: &Digest) -> Result<File, StoreError> {
        let p = self.blob_path(d);
        File::open(&p).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::MissingBlob(d.clone()),
            _ => StoreError::Io { path: p, source: e },
        })
    }

    /// Reads a small blob (a manifest or config) whole.
    pub fn read_small(&self, d: &Digest) -> Result<Vec<u8>, StoreError> {
        let mut v = Vec::new();
        let p = self.blob_path(d);
        self.open_blob(d)?
            .take(MAX_JSON + 1)
            .read_to_end(&mut v)
            .map_err(io_at(&p))?;
        if v.len() as u64 > MAX_JSON {
            return Err(StoreError::BadManifest {
                digest: d.clone(),
                what: format!("larger than {MAX_JSON} bytes"),
            });
        }
        Ok(v)
    }

    fn refs_path(&self) -> PathBuf {
        self.root.join("refs.json")
    }

    /// Image names and their manifest digests.
    pub fn refs(&self) -> Result<BTreeMap<String, String>, StoreError> {
        let p = self.refs_path();
        match fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| StoreError::Io {
                path: p,
                source: io::Error::new(io::ErrorKind::InvalidData, e),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(StoreError::Io { path: p, source: e }),
        }
    }

    fn write_refs(&self, refs: &BTreeMap<String, String>) -> Result<(), StoreError> {
        let p = self.refs_path();
        let tmp = tempfile::NamedTempFile::new_in(self.root.join("tmp")).map_err(io_at(&p))?;
        serde_json::to_writer_pretty(tmp.as_file(), refs).map_err(|e| StoreError::Io {
            path: p.clone(),
            source: e.into(),
        })?;
        tmp.as_file().sync_all().map_err(io_at(&p))?;
        tmp.persist(&p).map_err(|e| StoreError::Io {
            path: p,
            source: e.error,
        })?;
        Ok(())
    }

    /// Names the image with manifest `d` `name` (replacing what had it).
    pub fn tag(&self, name: &str, d: &Digest) -> Result<(), StoreError> {
        let mut refs = self.refs()?;
        refs.insert(name.to_string(), d.to_string());
        self.write_refs(&refs)
    }

    /// Forgets the name `name`; false if there was none.
    pub fn untag(&self, name: &str) -> Result<bool, StoreError> {
        let mut refs = self.refs()?;
        let had = refs.remove(name).is_some();
        if had {
            self.write_refs(&refs)?;
        }
        Ok(had)
    }

    /// The manifest digest named `name` (also accepts a manifest digest).
    pub fn resolve(&self, name: &str) -> Result<Digest, StoreError> {
        if let Ok(d) = name.parse::<Digest>() {
            if self.has_blob(&d) {
                return Ok(d);
            }
        }
        let refs = self.refs()?;
        let d = refs
            .get(name)
            .ok_or_else(|| StoreError::UnknownImage(name.to_string()))?;
        d.parse()
    }

    /// Reads and checks the image with manifest `d`.
    pub fn image(&self, d: &Digest) -> Result<Image, StoreError> {
        let bytes = self.read_small(d)?;
        let manifest = parse_manifest(d, &bytes)?;
        let config_digest: Digest = manifest.config().digest().to_string().parse()?;
        let cbytes = self.read_small(&config_digest)?;
        let config: ImageConfiguration =
            serde_json::from_slice(&cbytes).map_err(|e| StoreError::BadConfig {
                digest: config_digest.clone(),
                what: e.to_string(),
            })?;
        if config.rootfs().diff_ids().len() != manifest.layers().len() {
            return Err(StoreError::BadConfig {
                digest: config_digest,
                what: format!(
                    "{} diff IDs for {} layers",
                    config.rootfs().diff_ids().len(),
                    manifest.layers().len()
                ),
            });
        }
        Ok(Image {
            manifest_digest: d.clone(),
            manifest,
            config_digest,
            config,
        })
    }

    /// Bytes of blobs and root images on disk (`cup metrics`); the
    /// allocated size, as `du` counts it.
    pub fn disk_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        ["blobs/sha256", "rootfs"]
            .iter()
            .filter_map(|d| fs::read_dir(self.root.join(d)).ok())
            .flatten()
            .filter_map(|e| e.ok()?.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.blocks() * 512)
            .sum()
    }

    pub fn rootfs_path(&self, image: &Image) -> PathBuf {
        self.root
            .join("rootfs")
            .join(format!("{}.erofs", image.rootfs_key().hex()))
    }

    /// The image's erofs root image, built from its layers if not yet
    /// there. Every layer's uncompressed digest must match its diff ID.
    pub fn rootfs(&self, image: &Image) -> Result<PathBuf, StoreError> {
        let dest = self.rootfs_path(image);
        if dest.is_file() {
            return Ok(dest);
        }
        let tmp = tempfile::Builder::new()
            .prefix(ROOTFS_TMP)
            .tempfile_in(self.root.join("tmp"))
            .map_err(io_at(&self.root))?;
        let file = tmp.reopen().map_err(io_at(tmp.path()))?;
        let mut builder = RootfsBuilder::new(file, self.limits);
        for (index, layer) in image.manifest.layers().iter().enumerate() {
            let digest: Digest = layer.digest().to_string().parse()?;
            let blob = self.open_blob(&digest)?;
            let len = blob
                .metadata()
                .map_err(io_at(&self.blob_path(&digest)))?
                .len();
            if len != layer.size() {
                return Err(StoreError::SizeMismatch {
                    digest,
                    got: len,
                    want: layer.size(),
                });
            }
            let media_type = layer.media_type().to_string();
            let compression = match Compression::of_media_type(&media_type) {
                Some(c) => c,
                None => {
                    return Err(StoreError::LayerMediaType {
                        index,
                        digest,
                        media_type,
                    });
                }
            };
            let mut stream = compression
                .reader(blob)
                .map_err(io_at(&self.blob_path(&digest)))?;
            let got = builder
                .add_layer(&mut stream)
                .map_err(|source| StoreError::Layer {
                    index,
                    digest: digest.clone(),
                    source,
                })?;
            let got = Digest::from_raw(got);
            let want = &image.config.rootfs().diff_ids()[index];
            if got.to_string() != *want {
                return Err(StoreError::DiffIdMismatch {
                    index,
                    digest,
                    got,
                    want: want.clone(),
                });
            }
        }
        builder.finish().map_err(io_at(tmp.path()))?;
        tmp.as_file().sync_all().map_err(io_at(tmp.path()))?;
        tmp.persist(&dest).map_err(|e| StoreError::Io {
            path: dest.clone(),
            source: e.error,
        })?;
        Ok(dest)
    }

    /// Every named image.
    pub fn list(&self) -> Result<Vec<ImageSummary>, StoreError> {
        let mut out = Vec::new();
        for (name, d) in self.refs()? {
            let d: Digest = d.parse()?;
            let (size, rootfs) = match self.image(&d) {
                Ok(img) => (
                    img.manifest.layers().iter().map(|l| l.size()).sum(),
                    self.rootfs_path(&img).is_file(),
                ),
                Err(_) => (0, false),
            };
            out.push(ImageSummary {
                name,
                digest: d.to_string(),
                size,
                rootfs,
            });
        }
        Ok(out)
    }

    /// Removes everything no named image reaches.
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        let mut keep_blobs = BTreeSet::new();
        let mut keep_rootfs = BTreeSet::new();
        for d in self.refs()?.values() {
            let d: Digest = d.parse()?;
            keep_blobs.insert(d.hex().to_string());
            if let Ok(img) = self.image(&d) {
                keep_blobs.insert(img.config_digest.hex().to_string());
                for l in img.manifest.layers() {
                    if let Ok(ld) = l.digest().to_string().parse::<Digest>() {
                        keep_blobs.insert(ld.hex().to_string());
                    }
                }
                keep_rootfs.insert(format!("{}.erofs", img.rootfs_key().hex()));
            }
        }
        let mut report = GcReport::default();
        let mut sweep =
            |dir: &Path, keep: &dyn Fn(&str) -> bool, count: &mut u64| -> Result<(), StoreError> {
                for e in fs::read_dir(dir).map_err(io_at(dir))? {
                    let e = e.map_err(io_at(dir))?;
                    let name = e.file_name().to_string_lossy().into_owned();
                    if keep(&name) {
                        continue;
                    }
                    let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                    fs::remove_file(e.path()).map_err(io_at(&e.path()))?;
                    *count += 1;
                    report.bytes += len;
                }
                Ok(())
            };
        let (mut blobs, mut rootfs, mut tmp) = (0, 0, 0);
        sweep(
            &self.root.join("blobs/sha256"),
            &|n| keep_blobs.contains(n),
            &mut blobs,
        )?;
        sweep(
            &self.root.join("rootfs"),
            &|n| keep_rootfs.contains(n),
            &mut rootfs,
        )?;
        // A temporary file still being written (a pull, a root image
        // build) is not garbage: only those untouched for a while go.
        let tmp_dir = self.root.join("tmp");
        let fresh = |n: &str| {
            std::fs::metadata(tmp_dir.join(n))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age < TMP_IN_USE)
        };
        sweep(&tmp_dir, &fresh, &mut tmp)?;
        (report.blobs, report.rootfs, report.tmp) = (blobs, rootfs, tmp);
        Ok(report)
    }
}

/// How root images under construction are named in `tmp/`.
pub const ROOTFS_TMP: &str = "rootfs-";

/// A temporary file modified this recently is in use (`gc` leaves it).
const TMP_IN_USE: std::time::Duration = std::time::Duration::from_secs(3600);

impl Store {
    /// Removes temporary files in `tmp/` whose names start with `prefix`
    /// (all with an empty prefix); how many went. For vmmd's start (no
    /// pull or build of its own runs yet) and after a build that died.
    pub fn remove_tmp(&self, prefix: &str) -> usize {
        let mut n = 0;
        for e in std::fs::read_dir(self.root.join("tmp"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.file_name().to_string_lossy().starts_with(prefix)
                && std::fs::remove_file(e.path()).is_ok()
            {
                n += 1;
            }
        }
        n
    }
}

/// Parses an image manifest (OCI or Docker schema 2), refusing anything
/// else by its media type.
pub fn parse_manifest(d: &Digest, bytes: &[u8]) -> Result<ImageManifest, StoreError> {
    let bad = |what: String| StoreError::BadManifest {
        digest: d.clone(),
        what,
    };
    let probe: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    let media_type = probe
        .get("mediaType")
        .and_then(|m| m.as_str())
        .unwrap_or(MANIFEST_OCI);
    if media_type != MANIFEST_OCI && media_type != MANIFEST_DOCKER {
        return Err(bad(format!(
            "media type {media_type:?} is not an image manifest"
        )));
    }
    if probe.get("schemaVersion").and_then(|v| v.as_u64()) != Some(2) {
        return Err(bad("schemaVersion is not 2".into()));
    }
    serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))
}
