//! The image store against real images and a real registry, made by tools
//! no one here wrote: Debian's umoci (image layouts, layers with
//! whiteouts), skopeo (archives, pushes) and docker-registry (the OCI
//! distribution API on loopback). The root image we build is read back by
//! erofs-utils' `fsck.erofs --extract` and compared, file by file, with
//! what `umoci unpack` makes of the same image.
//!
//! Tests that need a tool say so and skip when it is missing; `cargo xtask
//! test` installs them all.

#![allow(clippy::unwrap_used)] // tests fail by panicking

use sha2::Digest as _;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use vmmd::image::source::{self, PullOptions, SourceError};
use vmmd::image::store::{Digest, Store, StoreError};

fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("STEELCUP_REQUIRE_TOOLS").is_none(),
            "{tool} is missing (a Debian package `cargo xtask test` installs)"
        );
        eprintln!("SKIP: {tool} is not installed (Debian package; `cargo xtask test` installs it)");
    }
    found
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn umoci(args: &[&str]) {
    run(Command::new("umoci").args(args));
}

fn policy(dir: &Path) -> PathBuf {
    let p = dir.join("policy.json");
    std::fs::write(&p, r#"{"default":[{"type":"insecureAcceptAnything"}]}"#).unwrap();
    p
}

/// A two-layer busybox image in an OCI layout made by umoci: the second
/// layer deletes a file, replaces a directory's contents and adds files,
/// so it carries whiteouts.
fn busybox_layout(dir: &Path) -> String {
    let layout = dir.join("layout");
    let image = format!("{}:latest", layout.display());
    umoci(&["init", "--layout", &layout.display().to_string()]);
    umoci(&["new", "--image", &image]);
    let bundle = dir.join("bundle");
    let b = bundle.display().to_string();
    umoci(&["unpack", "--image", &image, &b]);
    let root = bundle.join("rootfs");
    for d in ["bin", "etc/old", "usr/share/doc", "work"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for a in ["sh", "ls", "cat"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(a)).unwrap();
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(root.join("etc/old/a"), "a").unwrap();
    std::fs::write(root.join("etc/old/b"), "b").unwrap();
    std::fs::write(root.join("usr/share/doc/gone"), "gone").unwrap();
    std::fs::hard_link(root.join("etc/passwd"), root.join("etc/passwd.hard")).unwrap();
    run(Command::new("chown").args(["1000:1000", &root.join("work").display().to_string()]));
    run(Command::new("chmod").args(["1777", &root.join("work").display().to_string()]));
    umoci(&["repack", "--image", &image, &b]);
    // Layer 2.
    let _ = std::fs::remove_dir_all(&bundle);
    umoci(&["unpack", "--image", &image, &b]);
    std::fs::remove_file(root.join("usr/share/doc/gone")).unwrap();
    std::fs::remove_dir_all(root.join("etc/old")).unwrap();
    std::fs::create_dir_all(root.join("etc/old")).unwrap();
    std::fs::write(root.join("etc/old/c"), "c").unwrap();
    std::fs::write(root.join("big"), vec![5u8; 300_000]).unwrap();
    umoci(&["repack", "--image", &image, &b]);
    umoci(&["config", "--image", &image, "--config.cmd", "sh"]);
    image
}

/// Each path under `root`: kind, mode, owner, and contents or target.
fn describe(root: &Path) -> BTreeMap<String, String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        let rel = format!("/{}", p.strip_prefix(root).unwrap().display());
        let ft = m.file_type();
        let what = if ft.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
            "dir".to_string()
        } else if ft.is_symlink() {
            format!("-> {}", std::fs::read_link(&p).unwrap().display())
        } else if ft.is_file() {
            let data = std::fs::read(&p).unwrap();
            format!(
                "file {} {}",
                data.len(),
                vmmd::image::hex(&sha2::Sha256::digest(&data))
            )
        } else if ft.is_char_device() || ft.is_block_device() {
            format!("dev {}", m.rdev())
        } else {
            "other".to_string()
        };
        let mode = if ft.is_symlink() {
            0o777
        } else {
            m.mode() & 0o7777
        };
        out.insert(
            rel,
            format!(
                "{what} {mode:o} {}:{} links {}",
                m.uid(),
                m.gid(),
                if ft.is_dir() { 0 } else { m.nlink() }
            ),
        );
    }
    out
}

/// Builds the root image of `image` (an OCI layout reference) in a new
/// store under `dir` and compares it, path by path, with `umoci unpack` of
/// the same image; returns our description, whether it was read by the
/// kernel (a loop mount), the store and the root image.
fn compare_with_umoci(dir: &Path, image: &str) -> (BTreeMap<String, String>, bool, Store, PathBuf) {
    let store = Store::open(&dir.join("store")).unwrap();
    let (name, digest) = source::pull(
        &store,
        &format!("oci:{image}"),
        &PullOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(store.resolve(&name).unwrap(), digest);
    let img = store.image(&digest).unwrap();
    let rootfs = store.rootfs(&img).unwrap();

    // Read back by the kernel's erofs driver where this machine may mount
    // a loop device; else by fsck.erofs, which extracts hard links as
    // copies (so link counts are left out of that comparison).
    let ours = dir.join("ours");
    std::fs::create_dir_all(&ours).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "erofs", "-o", "loop,ro"])
        .arg(&rootfs)
        .arg(&ours)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!(
            "note: cannot loop-mount here; reading the image with fsck.erofs --extract instead"
        );
        std::fs::remove_dir(&ours).unwrap();
        run(Command::new("fsck.erofs")
            .arg(format!("--extract={}", ours.display()))
            .arg(&rootfs));
    }
    let theirs = dir.join("theirs");
    umoci(&["unpack", "--image", image, &theirs.display().to_string()]);
    let (mut a, mut b) = (describe(&ours), describe(&theirs.join("rootfs")));
    if mounted {
        run(Command::new("umount").arg(&ours));
    } else {
        for v in a.values_mut().chain(b.values_mut()) {
            *v = v.split(" links ").next().unwrap().to_string();
        }
    }
    let diff: Vec<_> = a
        .iter()
        .filter(|(k, v)| b.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: ours {v}, umoci {:?}", b.get(k)))
        .chain(
            b.keys()
                .filter(|k| !a.contains_key(*k))
                .map(|k| format!("{k}: only in umoci's")),
        )
        .collect();
    assert!(diff.is_empty(), "the trees differ:\n{}", diff.join("\n"));
    let _ = std::fs::remove_dir_all(&theirs);
    (a, mounted, store, rootfs)
}

#[test]
fn a_root_image_holds_what_umoci_unpack_makes_of_the_image() {
    if !(have("umoci") && have("fsck.erofs")) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = busybox_layout(dir.path());
    let (a, mounted, store, rootfs) = compare_with_umoci(dir.path(), &image);
    let only = store.list().unwrap();
    let img = store.image(&only[0].digest.parse().unwrap()).unwrap();
    assert_eq!(img.manifest.layers().len(), 2);
    assert!(
        !a.contains_key("/usr/share/doc/gone") && !a.contains_key("/etc/old/a"),
        "whiteouts applied"
    );
    assert!(
        a["/work"].starts_with("dir 1777 1000:1000"),
        "{}",
        a["/work"]
    );
    if mounted {
        assert!(
            a["/etc/passwd.hard"].ends_with("links 2"),
            "hard link: {}",
            a["/etc/passwd.hard"]
        );
    }

    // The same layers in an oci-archive and a docker-archive (skopeo) give
    // the same root image file, built once.
    if have("skopeo") {
        let p = policy(dir.path());
        for (transport, file) in [
            ("oci-archive", "bb.oci.tar"),
            ("docker-archive", "bb.docker.tar"),
        ] {
            let dest = dir.path().join(file);
            let suffix = if transport == "docker-archive" {
                ":bb:latest"
            } else {
                ":latest"
            };
            run(Command::new("skopeo")
                .arg("--policy")
                .arg(&p)
                .args(["copy", "--quiet"])
                .arg(format!("oci:{image}"))
                .arg(format!("{transport}:{}{suffix}", dest.display())));
            let (_, d) = source::pull(
                &store,
                &format!("{transport}:{}", dest.display()),
                &PullOptions::default(),
                &mut |_| {},
            )
            .unwrap();
            assert_eq!(
                store.rootfs(&store.image(&d).unwrap()).unwrap(),
                rootfs,
                "{transport}"
            );
        }
        assert_eq!(
            std::fs::read_dir(dir.path().join("store/rootfs"))
                .unwrap()
                .count(),
            1
        );
    }

    // Garbage collection: what a name reaches stays (a docker-archive's
    // side files, never referenced, go), everything goes once the names do.
    let r = store.gc().unwrap();
    assert_eq!(r.rootfs, 0, "{r:?}");
    for i in store.list().unwrap() {
        let img = store.image(&store.resolve(&i.name).unwrap()).unwrap();
        assert!(
            store.rootfs_path(&img).is_file() && i.rootfs,
            "{} survives gc",
            i.name
        );
    }
    for i in store.list().unwrap() {
        store.untag(&i.name).unwrap();
    }
    let r = store.gc().unwrap();
    assert!(r.blobs >= 4 && r.rootfs == 1, "{r:?}");
    assert_eq!(
        std::fs::read_dir(dir.path().join("store/blobs/sha256"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn a_blob_with_one_byte_changed_never_reaches_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let good = b"layer contents".to_vec();
    let d = Digest::of(&good);
    let mut bad = good.clone();
    bad[3] ^= 1;
    let err = store
        .put_blob(&d, bad.len() as u64, &mut &bad[..])
        .unwrap_err();
    assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
    assert!(
        err.to_string().contains(&d.to_string()),
        "the error names the blob: {err}"
    );
    let err = store
        .put_blob(&d, good.len() as u64 + 1, &mut &good[..])
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::SizeMismatch {
                got: 14,
                want: 15,
                ..
            }
        ),
        "{err}"
    );
    let err = store.put_blob(&d, 5, &mut &good[..]).unwrap_err();
    assert!(
        matches!(err, StoreError::SizeMismatch { want: 5, .. }),
        "too long: {err}"
    );
    assert!(!store.has_blob(&d));
    assert_eq!(
        std::fs::read_dir(dir.path().join("blobs/sha256"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0,
        "no temp file left"
    );
    store
        .put_blob(&d, good.len() as u64, &mut &good[..])
        .unwrap();
    assert!(store.has_blob(&d));
}

#[test]
fn digests_are_checked_before_they_become_paths() {
    for bad in [
        "sha256:../../../../etc/passwd",
        "sha256:ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789",
        "sha256:abc",
        "md5:0123456789abcdef0123456789abcdef",
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef/",
    ] {
        assert!(
            matches!(bad.parse::<Digest>(), Err(StoreError::BadDigest(_))),
            "{bad}"
        );
    }
}

#[test]
fn a_corrupt_layer_in_a_layout_fails_the_import_and_names_the_blob() {
    if !have("umoci") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = busybox_layout(dir.path());
    let layout = dir.path().join("layout");
    // Flip one byte of the biggest blob (a layer).
    let mut blobs: Vec<_> = std::fs::read_dir(layout.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    blobs.sort_by_key(|p| std::fs::metadata(p).unwrap().len());
    let victim = blobs.last().unwrap().clone();
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&victim, &bytes).unwrap();
    let hex = victim.file_name().unwrap().to_string_lossy().into_owned();

    let store = Store::open(&dir.path().join("store")).unwrap();
    let err = source::pull(
        &store,
        &format!("oci:{image}"),
        &PullOptions::default(),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains(&hex), "names the blob: {err}");
    assert!(
        matches!(err, SourceError::Store(StoreError::DigestMismatch { .. })),
        "{err}"
    );
    assert!(!dir.path().join("store/blobs/sha256").join(&hex).exists());
    assert!(
        store.refs().unwrap().is_empty(),
        "no name for a half-imported image"
    );
}

#[test]
fn bad_sources_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let pull = |s: &str| {
        source::pull(&store, s, &PullOptions::default(), &mut |_| {})
            .unwrap_err()
            .to_string()
    };
    assert!(pull("Not A Ref").contains("not an image reference"));
    assert!(pull("UPPER/case:tag").contains("UPPER/case:tag"));
    assert!(pull("oci:/nonexistent:latest").contains("/nonexistent/index.json"));
    assert!(pull("oci-archive:/nonexistent.tar").contains("/nonexistent.tar"));
    // A layout whose manifest has the wrong media type.
    let layout = dir.path().join("layout");
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.artifact.manifest.v1+json","config":{}}"#;
    let d = Digest::of(manifest);
    std::fs::write(layout.join("blobs/sha256").join(d.hex()), manifest).unwrap();
    std::fs::write(
        layout.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"digest":"{d}","size":{}}}]}}"#,
            manifest.len()
        ),
    )
    .unwrap();
    let err = pull(&format!("oci:{}", layout.display()));
    assert!(
        err.contains("is not an image manifest") && err.contains(&d.to_string()),
        "{err}"
    );
}

/// A docker-registry on a free loopback port, stopped on drop.
struct Registry {
    child: std::process::Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn registry() -> Option<Registry> {
    registry_with(None)
}

/// A registry that wants basic credentials `user:password` (an htpasswd
/// file made by Apache's htpasswd) when `auth` is given.
fn registry_with(auth: Option<(&str, &str)>) -> Option<Registry> {
    if !have("docker-registry") || !have("skopeo") || !have("umoci") {
        return None;
    }
    if auth.is_some() && !have("htpasswd") {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut auth_config = String::new();
    if let Some((user, password)) = auth {
        let out = Command::new("htpasswd")
            .args(["-Bbn", user, password])
            .output()
            .unwrap();
        assert!(out.status.success());
        let file = dir.path().join("htpasswd");
        std::fs::write(&file, out.stdout).unwrap();
        auth_config = format!(
            "auth:\n  htpasswd:\n    realm: steelcup-test\n    path: {}\n",
            file.display()
        );
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let config = dir.path().join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n{auth_config}",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let mut child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if std::net::TcpStream::connect(&addr).is_ok() {
            return Some(Registry {
                child,
                addr,
                _dir: dir,
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("docker-registry did not listen on {addr}");
}

#[test]
fn pulls_from_a_real_registry_resume_and_fail_clearly() {
    let Some(reg) = registry() else { return };
    let dir = tempfile::tempdir().unwrap();
    let image = busybox_layout(dir.path());
    let p = policy(dir.path());
    run(Command::new("skopeo")
        .arg("--policy")
        .arg(&p)
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci:{image}"))
        .arg(format!("docker://{}/busybox:1", reg.addr)));
    let opts = PullOptions {
        insecure: vec![reg.addr.clone()],
        credentials: None,
    };
    let store = Store::open(&dir.path().join("store")).unwrap();
    let reference = format!("{}/busybox:1", reg.addr);

    // Over HTTPS (the default) a plain-HTTP registry is refused.
    let err = source::pull(&store, &reference, &PullOptions::default(), &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains(&reference), "{err}");
    // ... with what to try.
    assert!(err.to_string().contains("insecure = true"), "{err}");

    // A download cut short: its first half is already in tmp/.
    let layout_store = Store::open(&dir.path().join("layout-store")).unwrap();
    let (_, want) = source::pull(
        &layout_store,
        &format!("oci:{image}"),
        &PullOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    let layer = layout_store.image(&want).unwrap().manifest.layers()[0].clone();
    let ld: Digest = layer.digest().to_string().parse().unwrap();
    let bytes = std::fs::read(layout_store.blob_path(&ld)).unwrap();
    std::fs::write(store.partial_path(&ld), &bytes[..bytes.len() / 2]).unwrap();

    let mut seen = 0u64;
    let (name, got) =
        source::pull(&store, &reference, &opts, &mut |p| seen = seen.max(p.done)).unwrap();
    assert_eq!(got, want, "the registry's manifest is the layout's");
    assert_eq!(name, reference);
    assert!(seen > 0, "progress was reported");
    assert!(store.has_blob(&ld) && !store.partial_path(&ld).exists());
    let img = store.image(&got).unwrap();
    assert_eq!(
        store.rootfs(&img).unwrap().file_name(),
        layout_store
            .rootfs(&layout_store.image(&want).unwrap())
            .unwrap()
            .file_name()
    );
    // Pulling again converges on the same image.
    assert_eq!(
        source::pull(&store, &reference, &opts, &mut |_| {})
            .unwrap()
            .1,
        got
    );

    let err = source::pull(
        &store,
        &format!("{}/nothing:1", reg.addr),
        &opts,
        &mut |_| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("manifest unknown"), "{err}");
    assert!(err.to_string().contains("has no nothing:1"), "{err}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = source::pull(
        &store,
        &format!("127.0.0.1:{closed}/x:1"),
        &PullOptions {
            insecure: vec![format!("127.0.0.1:{closed}")],
            credentials: None,
        },
        &mut |_| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("Connection refused"), "{err}");
    assert!(
        err.to_string().contains("nothing answers at 127.0.0.1:"),
        "{err}"
    );
}

/// A debootstrapped Debian (`cargo xtask test` makes it with Debian's
/// debootstrap and umoci and names its layout in STEELCUP_DEBIAN_IMAGE):
/// thousands of files, hard links, setuid programs.
#[test]
fn a_debootstrapped_debian_converts_as_umoci_unpacks_it() {
    let Some(image) = std::env::var_os("STEELCUP_DEBIAN_IMAGE") else {
        assert!(
            std::env::var_os("STEELCUP_REQUIRE_TOOLS").is_none(),
            "STEELCUP_DEBIAN_IMAGE is not set"
        );
        eprintln!(
            "SKIP: no debootstrapped image (STEELCUP_DEBIAN_IMAGE); `cargo xtask test` makes one"
        );
        return;
    };
    if !(have("umoci") && have("fsck.erofs")) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (a, _, _, _) = compare_with_umoci(dir.path(), &image.to_string_lossy());
    assert!(a.len() > 5000, "a whole Debian: {} paths", a.len());
    assert!(
        a["/usr/bin/su"].contains(" 4755 "),
        "setuid kept: {}",
        a["/usr/bin/su"]
    );
}

#[test]
fn a_registry_that_wants_credentials_gets_them_or_refuses_clearly() {
    let Some(reg) = registry_with(Some(("alice", "s3cret"))) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let image = busybox_layout(dir.path());
    let p = policy(dir.path());
    run(Command::new("skopeo")
        .arg("--policy")
        .arg(&p)
        .args([
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--dest-creds",
            "alice:s3cret",
        ])
        .arg(format!("oci:{image}"))
        .arg(format!("docker://{}/private:1", reg.addr)));
    let store = Store::open(&dir.path().join("store")).unwrap();
    let reference = format!("{}/private:1", reg.addr);
    let opts = |credentials: Option<(&str, &str)>| PullOptions {
        insecure: vec![reg.addr.clone()],
        credentials: credentials.map(|(u, p)| (u.to_string(), p.to_string())),
    };
    for (who, creds) in [
        ("anonymous", None),
        ("a wrong password", Some(("alice", "nope"))),
    ] {
        let err = source::pull(&store, &reference, &opts(creds), &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("Not authorized"), "{who}: {err}");
        assert!(
            err.to_string().contains(&reference),
            "{who}: names the image: {err}"
        );
    }
    assert!(store.refs().unwrap().is_empty());
    let (name, _) = source::pull(
        &store,
        &reference,
        &opts(Some(("alice", "s3cret"))),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(name, reference);
    // `cup login`'s check, against the same registry: the right password
    // is taken, a wrong one refused; a registry that wants none takes any.
    vmmd::image::login::check(&reg.addr, "alice", "s3cret", true).unwrap();
    let e = vmmd::image::login::check(&reg.addr, "alice", "nope", true).unwrap_err();
    assert!(
        e.to_string().contains("incorrect username or password"),
        "{e}"
    );
    let open = registry().unwrap();
    vmmd::image::login::check(&open.addr, "anyone", "x", true).unwrap();
    // Over HTTPS, a plain-HTTP registry is no login.
    assert!(vmmd::image::login::check(&reg.addr, "alice", "s3cret", false).is_err());
}

/// An OCI layout (in `dir`) of one image whose one layer holds `files`
/// files of `size` bytes each: tiny gzipped, large to build (each small
/// file is kept in memory to pack beside its inode).
fn bomb_layout(dir: &Path, files: usize, size: usize) -> String {
    use sha2::Digest as _;
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| -> String {
        let d = hex(&sha2::Sha256::digest(bytes));
        std::fs::write(blobs.join(&d), bytes).unwrap();
        format!("sha256:{d}")
    };
    let mut tar = tar::Builder::new(Vec::new());
    let data = vec![b'x'; size];
    for i in 0..files {
        let mut h = tar::Header::new_ustar();
        h.set_path(format!("d{}/f{i}", i % 100)).unwrap();
        h.set_size(size as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        tar.append(&h, &data[..]).unwrap();
    }
    let raw = tar.into_inner().unwrap();
    let diff_id = format!("sha256:{}", hex(&sha2::Sha256::digest(&raw)));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &raw).unwrap();
    let layer = gz.finish().unwrap();
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Cmd":["sh"]}},"rootfs":{{"type":"layers","diff_ids":["{diff_id}"]}}}}"#
    );
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":{}}}]}}"#,
        put(config.as_bytes()),
        config.len(),
        put(&layer),
        layer.len()
    );
    let m = put(manifest.as_bytes());
    std::fs::write(
        dir.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{m}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"bomb"}}}}]}}"#,
            manifest.len()
        ),
    )
    .unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    format!("oci:{}:bomb", dir.display())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// vmmd builds root images in a child process with its address space
/// capped: a layer that makes the build take more memory than that fails
/// that child with a clear error (vmmd goes on), leaves no temporary file,
/// and the next build, with room, succeeds.
#[test]
fn a_root_image_build_that_runs_out_of_memory_fails_alone() {
    use vmmd::image::workload::{prepare, Builder};
    let dir = tempfile::tempdir().unwrap();
    // 40 000 files of 3 KiB: about 120 MiB kept in memory to build, from a
    // layer of a few hundred KiB. (The cap leaves room for vmmd's own
    // mapped binary, over 36 MiB in a debug build.)
    let source = bomb_layout(&dir.path().join("layout"), 40_000, 3072);
    let store_dir = dir.path().join("store");
    let opts = vmmd::image::source::PullOptions::default();
    let exe = std::path::PathBuf::from(env!("CARGO_BIN_EXE_vmmd"));
    let starved = Builder::Child {
        exe: exe.clone(),
        memory: 64 << 20,
        timeout: std::time::Duration::from_secs(300),
    };
    let err = prepare(&store_dir, &source, &opts, &mut |_| {}, &starved)
        .unwrap_err()
        .to_string();
    println!("the starved build: {err}");
    assert!(
        err.starts_with("build the root image: killed by SIGABRT (more than 64 MiB of memory?)"),
        "{err}"
    );
    let tmp: Vec<_> = std::fs::read_dir(store_dir.join("tmp")).unwrap().collect();
    assert!(tmp.is_empty(), "a failed build left {tmp:?}");
    let roomy = Builder::Child {
        exe,
        memory: 1 << 30,
        timeout: std::time::Duration::from_secs(300),
    };
    let ready = prepare(&store_dir, &source, &opts, &mut |_| {}, &roomy).unwrap();
    assert!(ready.rootfs.is_file());
    // Built once: the next preparation finds it.
    let again = prepare(&store_dir, &source, &opts, &mut |_| {}, &roomy).unwrap();
    assert_eq!(again.rootfs, ready.rootfs);
}
