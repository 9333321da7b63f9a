//! Image archives: the tars `skopeo copy oci-archive:`, `docker save` (both
//! its layouts) and `cup save` write, read by `cup load` and by the
//! `oci-archive:`/`docker-archive:` sources; and the archive `cup save`
//! writes.
//!
//! # Design
//! Reading is one pass, so an archive can come from a stream (`cup load`
//! over a transfer socket). Every regular file goes into the store as it
//! goes by: checked against its name where the name is a digest
//! (`blobs/sha256/HEX`), named by its content otherwise (the older `docker
//! save` layout's `ID/layer.tar`). `index.json` and `manifest.json` are
//! kept (at most [`MAX_JSON`] each) and symlinks remembered (that layout
//! links repeated layers). Then the OCI `index.json` if there is one, else
//! Docker's `manifest.json`, says which images the archive holds and what
//! they are called. Nothing is named until every blob of an image is in
//! the store and checked.
//!
//! Writing: an OCI image layout in a tar, whose index names each image by
//! `io.containerd.image.name` (the whole name) and
//! `org.opencontainers.image.ref.name` (its tag), with Docker's
//! `manifest.json` beside it, as `docker save` has written since Docker 25:
//! `docker load`, `skopeo` (either transport) and `cup load` read it.
//! Entries come in a fixed order, owned by root, dated 0: the same images
//! make the same bytes.

use super::source::{resolve_manifest, Source, SourceError};
use super::store::{Digest, Store, MANIFEST_OCI, MAX_JSON};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

/// The most entries an archive may hold (each costs a little memory).
const MAX_ENTRIES: usize = 100_000;

const INDEX: &str = "index.json";
const DOCKER_MANIFEST: &str = "manifest.json";
const ANNOTATION_NAME: &str = "io.containerd.image.name";
const ANNOTATION_REF: &str = "org.opencontainers.image.ref.name";

/// An archive read into the store: its files as blobs, not yet images.
#[derive(Debug)]
pub struct Archive {
    what: PathBuf,
    index: Option<Vec<u8>>,
    manifest: Option<Vec<u8>>,
    files: BTreeMap<String, (Digest, u64)>,
    links: BTreeMap<String, String>,
}

/// `path` without `./`, `..` resolved inside the archive.
fn normal(path: &Path) -> String {
    let mut out: Vec<String> = Vec::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n.to_string_lossy().into_owned()),
            _ => {}
        }
    }
    out.join("/")
}

impl Archive {
    /// Reads the tar `r` (`what` names it in errors), putting its files in
    /// `store`.
    pub fn read(store: &Store, what: &Path, r: impl Read) -> Result<Archive, SourceError> {
        let mut a = Archive {
            what: what.to_path_buf(),
            index: None,
            manifest: None,
            files: BTreeMap::new(),
            links: BTreeMap::new(),
        };
        let mut tar = tar::Archive::new(r);
        for entry in tar.entries().map_err(|e| a.bad(e.to_string()))? {
            let mut entry = entry.map_err(|e| a.bad(e.to_string()))?;
            if a.files.len() + a.links.len() >= MAX_ENTRIES {
                return Err(a.bad(format!("more than {MAX_ENTRIES} entries")));
            }
            let path = normal(&entry.path().map_err(|e| a.bad(e.to_string()))?);
            let ty = entry.header().entry_type();
            if ty.is_symlink() {
                if let Some(target) = entry.link_name().map_err(|e| a.bad(e.to_string()))? {
                    let base = Path::new(&path).parent().unwrap_or(Path::new(""));
                    let to = normal(&base.join(target));
                    a.links.insert(path, to);
                }
                continue;
            }
            if !ty.is_file() {
                continue;
            }
            let size = entry.size();
            if path == INDEX || path == DOCKER_MANIFEST {
                if size > MAX_JSON {
                    return Err(a.bad(format!("{path} is too large")));
                }
                let mut v = Vec::new();
                entry
                    .read_to_end(&mut v)
                    .map_err(|e| a.bad(e.to_string()))?;
                match path.as_str() {
                    INDEX => a.index = Some(v),
                    _ => a.manifest = Some(v),
                }
                continue;
            }
            let d = match path.strip_prefix("blobs/sha256/") {
                Some(hex) => {
                    let d: Digest = format!("sha256:{hex}").parse()?;
                    store.put_blob(&d, size, &mut entry)?;
                    d
                }
                None => store.put_by_content(&mut entry)?,
            };
            a.files.insert(path, (d, size));
        }
        Ok(a)
    }

    fn bad(&self, what: String) -> SourceError {
        SourceError::BadArchive {
            path: self.what.clone(),
            what,
        }
    }

    /// The image manifest of the OCI index entry tagged `tag` (or of its
    /// only entry).
    pub fn oci_image(&self, store: &Store, tag: Option<&str>) -> Result<Digest, SourceError> {
        let index = self
            .index
            .as_ref()
            .ok_or_else(|| self.bad("no index.json: not an OCI archive".into()))?;
        let (d, size) = pick_from_index(&self.what, index, tag)?;
        self.resolve(store, d, size)
    }

    fn resolve(&self, store: &Store, d: Digest, size: u64) -> Result<Digest, SourceError> {
        let mut present = |d: &Digest, size: u64| -> Result<(), SourceError> {
            if store.has_blob_of(d, size)? {
                Ok(())
            } else {
                Err(self.bad(format!("blob {d} is not in the archive")))
            }
        };
        resolve_manifest(
            store,
            &self.what.display().to_string(),
            d,
            size,
            &mut present,
        )
    }

    fn docker_list(&self) -> Result<Vec<serde_json::Value>, SourceError> {
        let manifest = self
            .manifest
            .as_ref()
            .ok_or_else(|| self.bad("no manifest.json: not a docker-archive".into()))?;
        let list: serde_json::Value = serde_json::from_slice(manifest)
            .map_err(|e| self.bad(format!("manifest.json: {e}")))?;
        match list {
            serde_json::Value::Array(v) => Ok(v),
            _ => Err(self.bad("manifest.json is not a list".into())),
        }
    }

    /// The image of `manifest.json` tagged `reference` (or its only one),
    /// as a manifest in the store.
    pub fn docker_image(
        &self,
        store: &Store,
        reference: Option<&str>,
    ) -> Result<Digest, SourceError> {
        let list = self.docker_list()?;
        let chosen = match reference {
            Some(r) => list.iter().find(|m| repo_tags(m).any(|t| t == r)),
            None if list.len() == 1 => list.first(),
            None => {
                return Err(self.bad(format!(
                    "{} images in the archive; name one with :REPO:TAG",
                    list.len()
                )))
            }
        };
        let m = chosen
            .ok_or_else(|| self.bad(format!("no image tagged {:?}", reference.unwrap_or(""))))?;
        self.docker_manifest(store, m)
    }

    /// A manifest for one `manifest.json` entry (Docker's layout has none).
    fn docker_manifest(&self, store: &Store, m: &serde_json::Value) -> Result<Digest, SourceError> {
        let lookup = |name: &str| -> Result<(Digest, u64), SourceError> {
            let name = normal(Path::new(name));
            let name = self.links.get(&name).unwrap_or(&name);
            self.files.get(name).cloned().ok_or_else(|| {
                self.bad(format!(
                    "{name} is named in manifest.json but not in the archive"
                ))
            })
        };
        let config_name = m
            .get("Config")
            .and_then(|c| c.as_str())
            .ok_or_else(|| self.bad("an image without Config".into()))?;
        let (config, config_size) = lookup(config_name)?;
        let mut layers = Vec::new();
        for l in m
            .get("Layers")
            .and_then(|l| l.as_array())
            .ok_or_else(|| self.bad("an image without Layers".into()))?
        {
            let (d, size) = lookup(
                l.as_str()
                    .ok_or_else(|| self.bad("a layer name that is not text".into()))?,
            )?;
            let mut head = [0u8; 4];
            let n = store.open_blob(&d)?.read(&mut head).unwrap_or(0);
            let media_type = match super::rootfs::Compression::sniff(&head[..n]) {
                super::rootfs::Compression::None => "application/vnd.docker.image.rootfs.diff.tar",
                super::rootfs::Compression::Gzip => {
                    "application/vnd.docker.image.rootfs.diff.tar.gzip"
                }
                super::rootfs::Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
            };
            layers.push(
                serde_json::json!({"mediaType": media_type, "digest": d.to_string(), "size": size}),
            );
        }
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": super::store::MANIFEST_DOCKER,
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": config.to_string(), "size": config_size},
            "layers": layers,
        });
        let bytes = serde_json::to_vec(&manifest).map_err(|e| self.bad(e.to_string()))?;
        Ok(store.put_bytes(&bytes)?)
    }

    /// Every image the archive holds, with the names it gives each (as
    /// the store spells them; names that are no image reference are
    /// dropped). The OCI index when there is one, else `manifest.json`.
    pub fn images(&self, store: &Store) -> Result<Vec<(Vec<String>, Digest)>, SourceError> {
        let mut out: Vec<(Vec<String>, Digest)> = Vec::new();
        let mut add = |names: Vec<String>, d: Digest| match out.iter_mut().find(|(_, o)| *o == d) {
            Some((have, _)) => {
                for n in names {
                    if !have.contains(&n) {
                        have.push(n);
                    }
                }
            }
            None => out.push((names, d)),
        };
        if let Some(index) = &self.index {
            let v: serde_json::Value =
                serde_json::from_slice(index).map_err(|e| self.bad(format!("index.json: {e}")))?;
            let manifests = v
                .get("manifests")
                .and_then(|m| m.as_array())
                .ok_or_else(|| self.bad("index.json has no manifests".into()))?;
            for m in manifests {
                let (d, size) = descriptor(m).ok_or_else(|| {
                    self.bad("an index.json entry without a digest or size".into())
                })?;
                let d = self.resolve(store, d, size)?;
                let annotation =
                    |k: &str| m.pointer(&format!("/annotations/{}", k.replace('/', "~1")));
                let name = annotation(ANNOTATION_NAME)
                    .or_else(|| annotation(ANNOTATION_REF))
                    .and_then(|n| n.as_str())
                    .filter(|n| n.contains(':') || n.contains('/'))
                    .and_then(image_name);
                add(name.into_iter().collect(), d);
            }
        } else {
            for m in self.docker_list()? {
                let d = self.docker_manifest(store, &m)?;
                add(repo_tags(&m).filter_map(image_name).collect(), d);
            }
        }
        if out.is_empty() {
            return Err(self.bad("it holds no image".into()));
        }
        Ok(out)
    }
}

fn repo_tags(m: &serde_json::Value) -> impl Iterator<Item = &str> {
    m.get("RepoTags")
        .and_then(|t| t.as_array())
        .into_iter()
        .flatten()
        .filter_map(|t| t.as_str())
}

/// A registry reference as the store spells it, if `name` is one.
fn image_name(name: &str) -> Option<String> {
    match Source::parse(name) {
        Ok(s @ Source::Registry { .. }) => Some(s.name(name)),
        _ => None,
    }
}

fn descriptor(m: &serde_json::Value) -> Option<(Digest, u64)> {
    Some((
        m.get("digest")?.as_str()?.parse().ok()?,
        m.get("size")?.as_u64()?,
    ))
}

/// The descriptor an `index.json` names `tag` (or its only one).
pub fn pick_from_index(
    what: &Path,
    index: &[u8],
    tag: Option<&str>,
) -> Result<(Digest, u64), SourceError> {
    let bad = |w: String| SourceError::BadArchive {
        path: what.to_path_buf(),
        what: w,
    };
    let v: serde_json::Value =
        serde_json::from_slice(index).map_err(|e| bad(format!("index.json: {e}")))?;
    let manifests = v
        .get("manifests")
        .and_then(|m| m.as_array())
        .ok_or_else(|| bad("index.json has no manifests".into()))?;
    let chosen = match tag {
        Some(t) => manifests.iter().find(|m| {
            m.pointer("/annotations/org.opencontainers.image.ref.name")
                .and_then(|n| n.as_str())
                == Some(t)
        }),
        None if manifests.len() == 1 => manifests.first(),
        None => {
            return Err(bad(format!(
                "{} images in index.json; name one with :TAG",
                manifests.len()
            )))
        }
    };
    let m = chosen.ok_or_else(|| bad(format!("no image tagged {:?}", tag.unwrap_or(""))))?;
    descriptor(m).ok_or_else(|| bad("a manifest without a digest or size".into()))
}

/// Writes the images `images` (each name, and its manifest digest; an
/// image may come under several names) as an archive to `w`.
pub fn write(store: &Store, images: &[(String, Digest)], w: impl Write) -> Result<(), SourceError> {
    let io_err = |e: io::Error| SourceError::BadArchive {
        path: PathBuf::from("the archive being written"),
        what: e.to_string(),
    };
    let mut blobs: Vec<Digest> = Vec::new();
    let mut seen = BTreeSet::new();
    let mut index = Vec::new();
    let mut docker: Vec<(Digest, Vec<String>, Vec<String>)> = Vec::new();
    for (name, d) in images {
        let img = store.image(d)?;
        let mut these = vec![d.clone(), img.config_digest.clone()];
        for l in img.manifest.layers() {
            these.push(l.digest().to_string().parse()?);
        }
        let paths: Vec<String> = these[2..]
            .iter()
            .map(|l| format!("blobs/sha256/{}", l.hex()))
            .collect();
        for b in these {
            if seen.insert(b.clone()) {
                blobs.push(b);
            }
        }
        let bytes = store.read_small(d)?;
        let media_type = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("mediaType")?.as_str().map(str::to_string))
            .unwrap_or_else(|| MANIFEST_OCI.to_string());
        let whole = image_name(name);
        let mut entry = serde_json::json!({
            "mediaType": media_type,
            "digest": d.to_string(),
            "size": bytes.len(),
        });
        if let Some(whole) = &whole {
            let tag = whole
                .rsplit_once(':')
                .filter(|(_, t)| !t.contains('/'))
                .map_or("latest", |(_, t)| t);
            entry["annotations"] = serde_json::json!({
                ANNOTATION_NAME: whole,
                ANNOTATION_REF: tag,
            });
        }
        index.push(entry);
        match docker.iter_mut().find(|(o, _, _)| o == d) {
            Some((_, tags, _)) => tags.extend(whole),
            None => docker.push((d.clone(), whole.into_iter().collect(), paths)),
        }
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": super::store::INDEX_OCI,
        "manifests": index,
    });
    let manifest: Vec<serde_json::Value> = docker
        .iter()
        .map(|(d, tags, layers)| {
            let config = store
                .image(d)
                .map(|i| format!("blobs/sha256/{}", i.config_digest.hex()))
                .unwrap_or_default();
            serde_json::json!({"Config": config, "RepoTags": tags, "Layers": layers})
        })
        .collect();
    let mut tar = tar::Builder::new(w);
    let head = |path: &str, size: u64, dir: bool| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(if dir {
            tar::EntryType::Directory
        } else {
            tar::EntryType::Regular
        });
        h.set_mode(if dir { 0o755 } else { 0o644 });
        h.set_size(size);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        let _ = h.set_path(path);
        h.set_cksum();
        h
    };
    let json = |v: &serde_json::Value| serde_json::to_vec(v).unwrap_or_default();
    for (path, bytes) in [
        (
            "oci-layout",
            json(&serde_json::json!({"imageLayoutVersion": "1.0.0"})),
        ),
        (INDEX, json(&index)),
        (DOCKER_MANIFEST, json(&serde_json::Value::Array(manifest))),
    ] {
        tar.append(&head(path, bytes.len() as u64, false), &bytes[..])
            .map_err(io_err)?;
    }
    for dir in ["blobs", "blobs/sha256"] {
        tar.append(&head(dir, 0, true), io::empty())
            .map_err(io_err)?;
    }
    for b in &blobs {
        let f = store.open_blob(b)?;
        let len = f.metadata().map_err(io_err)?.len();
        let path = format!("blobs/sha256/{}", b.hex());
        // Exactly the length the header says, even if the file changed.
        tar.append(&head(&path, len, false), f.take(len))
            .map_err(io_err)?;
    }
    tar.into_inner().map_err(io_err)?.flush().map_err(io_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            let mut h = tar::Header::new_ustar();
            h.set_path(path).unwrap();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    /// A one-layer image in `store`'s own blobs: (manifest digest, bytes
    /// of its layer).
    fn image_in(store: &Store) -> Digest {
        let layer = tar_of(&[("hello", b"hi\n")]);
        let ld = store.put_bytes(&layer).unwrap();
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Cmd": ["/hello"]},
            "rootfs": {"type": "layers", "diff_ids": [ld.to_string()]},
        });
        let config = serde_json::to_vec(&config).unwrap();
        let cd = store.put_bytes(&config).unwrap();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_OCI,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd.to_string(), "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld.to_string(), "size": layer.len()}],
        });
        store
            .put_bytes(&serde_json::to_vec(&manifest).unwrap())
            .unwrap()
    }

    #[test]
    fn a_saved_archive_loads_back_with_its_names_and_the_same_bytes_each_time() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let from = Store::open(a.path()).unwrap();
        let d = image_in(&from);
        let names = [
            ("docker.io/library/hello:1".to_string(), d.clone()),
            (
                "registry.local:5000/team/hello:latest".to_string(),
                d.clone(),
            ),
        ];
        let mut out = Vec::new();
        write(&from, &names, &mut out).unwrap();
        let mut again = Vec::new();
        write(&from, &names, &mut again).unwrap();
        assert_eq!(out, again, "the same images make the same bytes");

        let to = Store::open(b.path()).unwrap();
        let archive = Archive::read(&to, Path::new("saved.tar"), &out[..]).unwrap();
        let images = archive.images(&to).unwrap();
        assert_eq!(
            images,
            vec![(
                vec![
                    "docker.io/library/hello:1".to_string(),
                    "registry.local:5000/team/hello:latest".to_string()
                ],
                d.clone()
            )]
        );
        assert!(to.image(&d).is_ok(), "every blob came along");
        // The same archive read as Docker's layout names the same image
        // content (a manifest of Docker's media type, same config and layer).
        let list = archive.docker_list().unwrap();
        let dd = archive.docker_manifest(&to, &list[0]).unwrap();
        let (x, y) = (to.image(&d).unwrap(), to.image(&dd).unwrap());
        assert_eq!(x.config_digest, y.config_digest);
        assert_eq!(
            x.manifest.layers()[0].digest(),
            y.manifest.layers()[0].digest()
        );
    }

    #[test]
    fn a_blob_that_is_not_its_name_never_reaches_the_store_and_nothing_is_named() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let from = Store::open(a.path()).unwrap();
        let d = image_in(&from);
        let mut out = Vec::new();
        write(&from, &[("hello:1".to_string(), d.clone())], &mut out).unwrap();
        // Flip one byte of the layer's content ("hi\n" in its inner tar).
        let at = out
            .windows(3)
            .rposition(|w| w == b"hi\n")
            .expect("the layer is in the archive");
        out[at] ^= 1;
        let to = Store::open(b.path()).unwrap();
        let e = Archive::read(&to, Path::new("bad.tar"), &out[..]).unwrap_err();
        assert!(e.to_string().contains("sha256:"), "{e}");
        assert!(to.refs().unwrap().is_empty());
    }

    #[test]
    fn archives_that_hold_no_image_or_miss_a_blob_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let empty = tar_of(&[("hello.txt", b"hi")]);
        let e = Archive::read(&store, Path::new("x.tar"), &empty[..])
            .unwrap()
            .images(&store)
            .unwrap_err();
        assert!(
            e.to_string().contains("x.tar") && e.to_string().contains("manifest.json"),
            "{e}"
        );
        let index = serde_json::json!({"manifests": [{"digest": format!("sha256:{}", "a".repeat(64)), "size": 10}]});
        let missing = tar_of(&[("index.json", &serde_json::to_vec(&index).unwrap())]);
        let e = Archive::read(&store, Path::new("y.tar"), &missing[..])
            .unwrap()
            .images(&store)
            .unwrap_err();
        assert!(e.to_string().contains("not in the archive"), "{e}");
    }

    #[test]
    fn a_descriptor_that_lies_about_a_blobs_length_is_a_size_error() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let from = Store::open(a.path()).unwrap();
        let d = image_in(&from);
        let manifest = from.read_small(&d).unwrap();
        let index = serde_json::json!({"manifests": [{"digest": d.to_string(), "size": manifest.len() + 1}]});
        let archive = tar_of(&[
            ("index.json", &serde_json::to_vec(&index).unwrap()),
            (&format!("blobs/sha256/{}", d.hex()), &manifest),
        ]);
        let to = Store::open(b.path()).unwrap();
        let e = Archive::read(&to, Path::new("z.tar"), &archive[..])
            .unwrap()
            .images(&to)
            .unwrap_err();
        assert!(e.to_string().contains("the descriptor says"), "{e}");
        // The same where the blob was in the store already.
        let e = to
            .put_blob(&d, manifest.len() as u64 - 1, &mut &manifest[..])
            .unwrap_err();
        assert!(e.to_string().contains("the descriptor says"), "{e}");
    }
}
