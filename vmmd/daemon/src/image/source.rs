//! Where images come from: registries, OCI layout directories, and the
//! archives `skopeo copy` and `docker save` write.
//!
//! # Design
//! A source string names the transport the way skopeo does:
//!
//! | source | what |
//! |---|---|
//! | `REGISTRY/REPO[:TAG\|@DIGEST]`, `docker://…` | the OCI distribution API (oci-client) |
//! | `oci:DIR[:TAG]` | an OCI image layout directory |
//! | `oci-archive:FILE[:TAG]` | a tar of an OCI image layout |
//! | `docker-archive:FILE[:REPO:TAG]` | `docker save` output |
//!
//! Every blob goes through [`Store::put_blob`] or
//! [`Store::commit_partial`], so it is checked before it is used. Indexes
//! resolve to their linux/amd64 manifest. A registry is spoken to over
//! HTTPS unless it is listed as insecure; a download cut short resumes
//! from where it stopped.

use super::archive::{pick_from_index, Archive};
use super::store::{
    parse_manifest, Digest, Store, StoreError, INDEX_DOCKER, INDEX_OCI, MANIFEST_DOCKER,
    MANIFEST_OCI, MAX_JSON,
};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Errors getting an image.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{source_str:?}: {what}")]
    BadReference { source_str: String, what: String },
    #[error("{path}: {what}")]
    BadArchive { path: PathBuf, what: String },
    #[error("{reference}: {what}")]
    Registry { reference: String, what: String },
    #[error("{reference}: no linux/amd64 image in the index")]
    NoPlatform { reference: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A parsed source string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Registry {
        reference: String,
    },
    Layout {
        dir: PathBuf,
        tag: Option<String>,
    },
    OciArchive {
        file: PathBuf,
        tag: Option<String>,
    },
    DockerArchive {
        file: PathBuf,
        reference: Option<String>,
    },
}

fn split_tag(rest: &str) -> (PathBuf, Option<String>) {
    match rest.rsplit_once(':') {
        Some((p, t)) if !t.contains('/') && !t.is_empty() => {
            (PathBuf::from(p), Some(t.to_string()))
        }
        _ => (PathBuf::from(rest), None),
    }
}

impl Source {
    /// Its kind, as metrics label it: `registry`, `layout`,
    /// `oci-archive`, `docker-archive`.
    pub fn kind(&self) -> &'static str {
        match self {
            Source::Registry { .. } => "registry",
            Source::Layout { .. } => "layout",
            Source::OciArchive { .. } => "oci-archive",
            Source::DockerArchive { .. } => "docker-archive",
        }
    }

    /// Parses a source string (see the module documentation).
    pub fn parse(s: &str) -> Result<Source, SourceError> {
        let bad = |what: &str| SourceError::BadReference {
            source_str: s.to_string(),
            what: what.to_string(),
        };
        if s.is_empty() || s.len() > 4096 || s.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(bad("not an image reference"));
        }
        if let Some(rest) = s.strip_prefix("oci:") {
            let (dir, tag) = split_tag(rest);
            return Ok(Source::Layout { dir, tag });
        }
        if let Some(rest) = s.strip_prefix("oci-archive:") {
            let (file, tag) = split_tag(rest);
            return Ok(Source::OciArchive { file, tag });
        }
        if let Some(rest) = s.strip_prefix("docker-archive:") {
            // The reference inside may hold a `:` itself (REPO:TAG).
            let (file, reference) = match rest.split_once(':') {
                Some((f, r)) => (PathBuf::from(f), Some(r.to_string())),
                None => (PathBuf::from(rest), None),
            };
            return Ok(Source::DockerArchive { file, reference });
        }
        let r = s.strip_prefix("docker://").unwrap_or(s);
        let parsed: oci_client::Reference = r
            .parse()
            .map_err(|e: oci_client::ParseError| bad(&e.to_string()))?;
        Ok(Source::Registry {
            reference: parsed.whole(),
        })
    }

    /// The name the image gets in the store.
    pub fn name(&self, original: &str) -> String {
        match self {
            Source::Registry { reference } => reference.clone(),
            _ => original.to_string(),
        }
    }
}

/// Registry settings.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Registries (`host[:port]`) spoken to over plain HTTP.
    pub insecure: Vec<String>,
    /// Basic credentials; a bearer token is fetched with them (or
    /// anonymously) when the registry asks for one.
    pub credentials: Option<(String, String)>,
}

/// Progress of a pull: `done` of `total` bytes of blob `digest`.
#[derive(Debug, Clone)]
pub struct Progress {
    pub digest: String,
    pub done: u64,
    pub total: u64,
}

/// A registry client's error with what to try, where its text says
/// which kind of failure it is (the client's own words stay first).
pub fn with_advice(image: &oci_client::Reference, what: &str) -> String {
    let host = image.registry();
    let repo = format!("{}:{}", image.repository(), image.tag().unwrap_or("latest"));
    let w = what.to_ascii_lowercase();
    // A status code counts only as a number of its own: port 40111 is
    // not a 401.
    let status = |code: &str| {
        w.match_indices(code).any(|(i, _)| {
            let before = w[..i].chars().next_back();
            let after = w[i + code.len()..].chars().next();
            !before.is_some_and(|c| c.is_ascii_digit())
                && !after.is_some_and(|c| c.is_ascii_digit())
        })
    };
    let has = |needles: &[&str]| {
        needles
            .iter()
            .any(|n| match n.bytes().all(|b| b.is_ascii_digit()) {
                true => status(n),
                false => w.contains(n),
            })
    };
    let advice = if has(&[
        "invalidcontenttype",
        "http response to https",
        "wrong version number",
    ]) {
        format!("{host} answered plain HTTP to HTTPS: if it is a plain-HTTP registry, name it `insecure = true` in /etc/steelcup/registries.toml (a machine config's registries; docs/images.md) or start vmmd with --insecure-registry {host}")
    } else if has(&["certificate", "unknownissuer", "invalidcertificate"]) {
        format!("{host}'s TLS certificate is not trusted here: a registry with a private CA needs it in the machine's CA bundle, or `insecure = true` for plain HTTP (docs/images.md)")
    } else if has(&[
        "unauthorized",
        "not authorized",
        "authenticationfailure",
        "authentication failure",
        "denied",
        "401",
        "403",
    ]) {
        format!("{host} refused the pull: log in with `cup login {host}` (a private repository, or one that does not exist, answers the same)")
    } else if has(&[
        "manifest_unknown",
        "manifest unknown",
        "name_unknown",
        "not found",
        "404",
    ]) {
        format!("{host} has no {repo}: check the repository and tag")
    } else if has(&[
        "dns error",
        "failed to lookup",
        "name or service not known",
        "no address associated",
    ]) {
        format!("{host} does not resolve: check the machine's DNS (`cup machine show`), or name the registry by its address")
    } else if has(&["connection refused"]) {
        format!("nothing answers at {host}: is the registry running, and is its port right?")
    } else if has(&["timed out", "timeout", "deadline"]) {
        format!("{host} did not answer in time: check the machine's network and the registry")
    } else {
        return what.to_string();
    };
    format!("{what}; {advice}")
}

/// Gets the image named by `source` into `store` and names it there;
/// returns the store name and the manifest digest.
pub fn pull(
    store: &Store,
    source: &str,
    opts: &PullOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<(String, Digest), SourceError> {
    let parsed = Source::parse(source)?;
    let t0 = std::time::Instant::now();
    let pulled = pull_parsed(store, source, &parsed, opts, progress);
    PULLS.count(parsed.kind(), pulled.is_ok(), t0.elapsed());
    pulled
}

/// Pulls and imports since vmmd started, by kind of source
/// (`cup metrics`).
#[derive(Debug)]
pub struct PullCounters {
    /// kind -> (done, failed, µs spent)
    by_kind: std::sync::Mutex<BTreeMap<&'static str, (u64, u64, u64)>>,
}

/// The process's.
pub static PULLS: PullCounters = PullCounters {
    by_kind: std::sync::Mutex::new(BTreeMap::new()),
};

impl PullCounters {
    fn count(&self, kind: &'static str, ok: bool, took: std::time::Duration) {
        let mut m = self.by_kind.lock().unwrap_or_else(|p| p.into_inner());
        let e = m.entry(kind).or_default();
        if ok {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
        e.2 += took.as_micros() as u64;
    }

    /// (kind, done, failed, µs spent) for each kind seen.
    pub fn totals(&self) -> Vec<(String, u64, u64, u64)> {
        let m = self.by_kind.lock().unwrap_or_else(|p| p.into_inner());
        m.iter()
            .map(|(k, (ok, failed, us))| (k.to_string(), *ok, *failed, *us))
            .collect()
    }
}

fn pull_parsed(
    store: &Store,
    source: &str,
    parsed: &Source,
    opts: &PullOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<(String, Digest), SourceError> {
    let digest = match parsed {
        Source::Layout { dir, tag } => import_layout(store, dir, tag.as_deref())?,
        Source::OciArchive { file, tag } => import_oci_archive(store, file, tag.as_deref())?,
        Source::DockerArchive { file, reference } => {
            import_docker_archive(store, file, reference.as_deref())?
        }
        Source::Registry { reference } => pull_registry(store, reference, opts, progress)?,
    };
    let name = parsed.name(source);
    store.tag(&name, &digest)?;
    Ok((name, digest))
}

/// The linux/amd64 manifest of an index (OCI or Docker manifest list).
fn pick_platform(index: &serde_json::Value) -> Option<(Digest, u64)> {
    let manifests = index.get("manifests")?.as_array()?;
    let single = manifests.len() == 1;
    manifests.iter().find_map(|m| {
        let p = m.get("platform");
        let ok = match p {
            Some(p) => {
                p.get("os")?.as_str()? == "linux" && p.get("architecture")?.as_str()? == "amd64"
            }
            None => single,
        };
        if !ok {
            return None;
        }
        Some((
            m.get("digest")?.as_str()?.parse().ok()?,
            m.get("size")?.as_u64()?,
        ))
    })
}

fn media_type(bytes: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    Some(v.get("mediaType")?.as_str()?.to_string())
}

/// From a descriptor in a layout to the image manifest (through nested
/// indexes), copying blobs with `fetch` into the store.
pub(super) fn resolve_manifest(
    store: &Store,
    what: &str,
    mut d: Digest,
    mut size: u64,
    fetch: &mut dyn FnMut(&Digest, u64) -> Result<(), SourceError>,
) -> Result<Digest, SourceError> {
    for _ in 0..4 {
        if size > MAX_JSON {
            return Err(StoreError::BadManifest {
                digest: d,
                what: format!("{size} bytes is too large"),
            }
            .into());
        }
        fetch(&d, size)?;
        let bytes = store.read_small(&d)?;
        match media_type(&bytes).as_deref() {
            Some(INDEX_OCI) | Some(INDEX_DOCKER) => {
                let v: serde_json::Value =
                    serde_json::from_slice(&bytes).map_err(|e| StoreError::BadManifest {
                        digest: d.clone(),
                        what: e.to_string(),
                    })?;
                (d, size) = pick_platform(&v).ok_or_else(|| SourceError::NoPlatform {
                    reference: what.to_string(),
                })?;
            }
            _ => {
                let m = parse_manifest(&d, &bytes)?;
                let config: Digest = m.config().digest().to_string().parse()?;
                fetch(&config, m.config().size())?;
                for l in m.layers() {
                    fetch(&l.digest().to_string().parse()?, l.size())?;
                }
                return Ok(d);
            }
        }
    }
    Err(SourceError::NoPlatform {
        reference: what.to_string(),
    })
}

fn import_layout(store: &Store, dir: &Path, tag: Option<&str>) -> Result<Digest, SourceError> {
    let index_path = dir.join("index.json");
    let index = fs::read(&index_path).map_err(|e| SourceError::BadArchive {
        path: index_path.clone(),
        what: e.to_string(),
    })?;
    let (d, size) = pick_from_index(dir, &index, tag)?;
    let mut fetch = |d: &Digest, size: u64| -> Result<(), SourceError> {
        if store.has_blob_of(d, size)? {
            return Ok(());
        }
        let p = dir.join("blobs/sha256").join(d.hex());
        let mut f = File::open(&p).map_err(|e| SourceError::BadArchive {
            path: p.clone(),
            what: e.to_string(),
        })?;
        store.put_blob(d, size, &mut f)?;
        Ok(())
    };
    resolve_manifest(store, &dir.display().to_string(), d, size, &mut fetch)
}

fn import_oci_archive(
    store: &Store,
    file: &Path,
    tag: Option<&str>,
) -> Result<Digest, SourceError> {
    Archive::read(store, file, open_archive(file)?)?.oci_image(store, tag)
}

/// `docker save` output (either layout).
fn import_docker_archive(
    store: &Store,
    file: &Path,
    reference: Option<&str>,
) -> Result<Digest, SourceError> {
    Archive::read(store, file, open_archive(file)?)?.docker_image(store, reference)
}

fn open_archive(file: &Path) -> Result<io::BufReader<File>, SourceError> {
    File::open(file)
        .map(io::BufReader::new)
        .map_err(|e| SourceError::BadArchive {
            path: file.to_path_buf(),
            what: e.to_string(),
        })
}

fn pull_registry(
    store: &Store,
    reference: &str,
    opts: &PullOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<Digest, SourceError> {
    use futures_util::StreamExt;
    use oci_client::client::{ClientConfig, ClientProtocol};
    use oci_client::secrets::RegistryAuth;

    let err = |what: String| SourceError::Registry {
        reference: reference.to_string(),
        what,
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let image: oci_client::Reference = reference
        .parse()
        .map_err(|e: oci_client::ParseError| err(e.to_string()))?;
    let protocol = if opts.insecure.is_empty() {
        ClientProtocol::Https
    } else {
        ClientProtocol::HttpsExcept(opts.insecure.clone())
    };
    // try_from, not new: new falls back to a client that panics when it
    // cannot be made (no CA certificates on the host, say).
    let client = oci_client::Client::try_from(ClientConfig {
        protocol,
        ..Default::default()
    })
    .map_err(|e| err(format!("set up the registry client: {e}")))?;
    let auth = match &opts.credentials {
        Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
        None => RegistryAuth::Anonymous,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| err(format!("start the pull: {e}")))?;
    rt.block_on(async {
        let accepted = [MANIFEST_OCI, MANIFEST_DOCKER, INDEX_OCI, INDEX_DOCKER];
        let mut target = image.clone();
        for _ in 0..3 {
            let (bytes, _) = client
                .pull_manifest_raw(&target, &auth, &accepted)
                .await
                .map_err(|e| err(with_advice(&target, &steelcup_sys::error_chain(&e))))?;
            if bytes.len() as u64 > MAX_JSON {
                return Err(err("the manifest is too large".into()));
            }
            let d = store.put_bytes(&bytes)?;
            if let Some(pinned) = target.digest() {
                if pinned != d.to_string() {
                    return Err(err(format!("the registry sent manifest {d} for {pinned}")));
                }
            }
            match media_type(&bytes).as_deref() {
                Some(INDEX_OCI) | Some(INDEX_DOCKER) => {
                    let v: serde_json::Value =
                        serde_json::from_slice(&bytes).map_err(|e| err(format!("index: {e}")))?;
                    let (pd, _) = pick_platform(&v).ok_or_else(|| SourceError::NoPlatform {
                        reference: reference.to_string(),
                    })?;
                    target = image.clone_with_digest(pd.to_string());
                    continue;
                }
                _ => {}
            }
            let m = parse_manifest(&d, &bytes)?;
            let mut blobs = vec![(m.config().digest().to_string(), m.config().size())];
            blobs.extend(
                m.layers()
                    .iter()
                    .map(|l| (l.digest().to_string(), l.size())),
            );
            for (digest, size) in blobs {
                let bd: Digest = digest.parse()?;
                if store.has_blob_of(&bd, size)? {
                    progress(Progress {
                        digest,
                        done: size,
                        total: size,
                    });
                    continue;
                }
                let partial = store.partial_path(&bd);
                let mut offset = fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
                if offset > size {
                    let _ = fs::remove_file(&partial);
                    offset = 0;
                }
                if offset < size {
                    let response = client
                        .pull_blob_stream_partial(&target, digest.as_str(), offset, None)
                        .await
                        .map_err(|e| {
                            let what = steelcup_sys::error_chain(&e);
                            err(format!("blob {digest}: {}", with_advice(&target, &what)))
                        })?;
                    let (stream, append) = match response {
                        oci_client::client::BlobResponse::Full(s) => (s, false),
                        oci_client::client::BlobResponse::Partial(s) => (s, true),
                    };
                    let mut file = fs::OpenOptions::new()
                        .create(true)
                        .write(true)
                        .append(append)
                        .truncate(!append)
                        .open(&partial)
                        .map_err(|e| StoreError::Io {
                            path: partial.clone(),
                            source: e,
                        })?;
                    let mut done = if append { offset } else { 0 };
                    let mut stream = stream.stream;
                    while let Some(chunk) = stream.next().await {
                        let chunk = chunk.map_err(|e| err(format!("blob {digest}: {e}")))?;
                        done += chunk.len() as u64;
                        if done > size {
                            let _ = fs::remove_file(&partial);
                            return Err(StoreError::SizeMismatch {
                                digest: bd,
                                got: done,
                                want: size,
                            }
                            .into());
                        }
                        file.write_all(&chunk).map_err(|e| StoreError::Io {
                            path: partial.clone(),
                            source: e,
                        })?;
                        progress(Progress {
                            digest: digest.clone(),
                            done,
                            total: size,
                        });
                    }
                }
                store.commit_partial(&partial, &bd, size)?;
            }
            return Ok(d);
        }
        Err(SourceError::NoPlatform {
            reference: reference.to_string(),
        })
    })
}

#[cfg(test)]
mod advice_tests {
    use super::*;

    #[test]
    fn registry_failures_say_what_to_try() {
        let r: oci_client::Reference = "registry.example.com:5000/team/app:1".parse().unwrap();
        for (what, says) in [
            (
                "error sending request: InvalidContentType",
                "insecure = true",
            ),
            ("invalid peer certificate: UnknownIssuer", "CA bundle"),
            (
                "Not authorized: url https://x/v2/team/app/manifests/1",
                "cup login registry.example.com:5000",
            ),
            ("OCI API error: MANIFEST_UNKNOWN", "has no team/app:1"),
            (
                "dns error: failed to lookup address information",
                "does not resolve",
            ),
            (
                "tcp connect error: Connection refused (os error 111)",
                "nothing answers at registry.example.com:5000",
            ),
        ] {
            let got = with_advice(&r, what);
            assert!(got.starts_with(what) && got.contains(says), "{what}: {got}");
        }
        assert_eq!(with_advice(&r, "something else"), "something else");
        // A port that holds a status code's digits is not that status.
        for port in ["40111", "14031", "4040"] {
            let what = format!(
                "error sending request for url (http://127.0.0.1:{port}/v2/x/manifests/1): tcp connect error: Connection refused (os error 111)"
            );
            let got = with_advice(&r, &what);
            assert!(got.contains("nothing answers at"), "{port}: {got}");
        }
        assert!(with_advice(&r, "server answered 401 Unauthorized").contains("cup login"));
        assert!(with_advice(&r, "status 404").contains("has no team/app:1"));
    }
}
