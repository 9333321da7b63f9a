//! Layer application with hostile and ordinary layers, and the erofs image
//! checked by erofs-utils' own reader.

use super::tree::{FileData, Kind, Limits, MemorySink, Tree, TreeError};
use super::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// One tar entry of a test layer.
enum T<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8]),
    Sym(&'a str, &'a str),
    Link(&'a str, &'a str),
    Chr(&'a str, u32, u32),
    Fifo(&'a str),
    Xattr(&'a str, &'a str, &'a [u8]),
}

/// A tar stream of `items`, names written as given (no checks: hostile
/// names are the point).
fn tar(items: &[T]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for item in items {
        let mut h = tar::Header::new_gnu();
        let (path, ty, data, link): (&str, tar::EntryType, &[u8], &str) = match item {
            T::Dir(p) => (p, tar::EntryType::Directory, b"", ""),
            T::File(p, d) => (p, tar::EntryType::Regular, d, ""),
            T::Sym(p, l) => (p, tar::EntryType::Symlink, b"", l),
            T::Link(p, l) => (p, tar::EntryType::Link, b"", l),
            T::Chr(p, ..) => (p, tar::EntryType::Char, b"", ""),
            T::Fifo(p) => (p, tar::EntryType::Fifo, b"", ""),
            T::Xattr(p, ..) => (p, tar::EntryType::Regular, b"x", ""),
        };
        if let T::Xattr(_, name, value) = item {
            let mut rec = format!(" SCHILY.xattr.{name}=").into_bytes();
            rec.extend_from_slice(value);
            rec.push(b'\n');
            let mut len = rec.len() + 1;
            while rec.len() + len.to_string().len() != len {
                len = rec.len() + len.to_string().len();
            }
            let mut pax = len.to_string().into_bytes();
            pax.extend_from_slice(&rec);
            assert_eq!(pax.len(), len, "PAX record length");
            let mut x = tar::Header::new_ustar();
            x.set_entry_type(tar::EntryType::XHeader);
            x.set_size(pax.len() as u64);
            x.set_path("pax").unwrap();
            x.set_cksum();
            b.append(&x, &pax[..]).unwrap();
        }
        let old = h.as_old_mut();
        old.name = [0; 100];
        old.name[..path.len()].copy_from_slice(path.as_bytes());
        old.linkname = [0; 100];
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_entry_type(ty);
        h.set_mode(if matches!(item, T::Dir(_)) {
            0o755
        } else {
            0o644
        });
        h.set_uid(1000);
        h.set_gid(100);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        if let T::Chr(_, major, minor) = item {
            h.set_device_major(*major).unwrap();
            h.set_device_minor(*minor).unwrap();
        }
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

fn apply_all(layers: &[Vec<u8>], limits: Limits) -> Result<(Tree, MemorySink), LayerError> {
    let mut tree = Tree::new(limits);
    let mut sink = MemorySink::default();
    let mut used = 0;
    for (i, l) in layers.iter().enumerate() {
        let (_, n) = layer::apply_layer(&mut tree, &mut sink, &mut &l[..], i as u32, used)?;
        used += n;
    }
    Ok((tree, sink))
}

/// Every path in the tree with its kind, e.g. `/etc/x file`.
fn paths(tree: &Tree) -> Vec<String> {
    let mut out = Vec::new();
    tree.walk(|p, ino| {
        let kind = match &tree.inode(ino).kind {
            Kind::Dir(_) => "dir".to_string(),
            Kind::File(_) => "file".to_string(),
            Kind::Symlink(t) => format!("-> {}", String::from_utf8_lossy(t)),
            Kind::CharDevice { major, minor } => format!("chr {major}:{minor}"),
            Kind::BlockDevice { .. } => "blk".to_string(),
            Kind::Fifo => "fifo".to_string(),
        };
        out.push(format!("{} {kind}", String::from_utf8_lossy(p)));
    });
    out
}

fn file_bytes(tree: &Tree, sink: &MemorySink, ino: usize) -> Vec<u8> {
    match &tree.inode(ino).kind {
        Kind::File(FileData::Inline(v)) => v.clone(),
        Kind::File(FileData::Blocks {
            start,
            blocks,
            size,
            tail,
        }) => {
            let from = *start as usize * 4096;
            let mut v = sink.bytes[from..from + *blocks as usize * 4096].to_vec();
            if let Some(t) = tail {
                v.extend_from_slice(t);
            }
            v.truncate(*size as usize);
            v
        }
        other => panic!("not a file: {other:?}"),
    }
}

#[test]
fn dot_dot_names_are_refused_and_nothing_is_created() {
    let err = apply_all(
        &[tar(&[T::File(
            "../../etc/passwd",
            b"root::0:0::/:/bin/sh\n",
        )])],
        Limits::default(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            LayerError::Entry {
                index: 1,
                source: TreeError::Traversal { .. }
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("../../etc/passwd"), "{err}");
    let err = apply_all(
        &[tar(&[T::Link("h", "a/../../etc/shadow")])],
        Limits::default(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            LayerError::Entry {
                source: TreeError::Traversal { .. },
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn absolute_names_land_inside_the_image() {
    let (tree, _) = apply_all(
        &[tar(&[T::File("/etc/hostname", b"box\n")])],
        Limits::default(),
    )
    .unwrap();
    assert_eq!(paths(&tree), ["/ dir", "/etc dir", "/etc/hostname file"]);
}

#[test]
fn a_symlink_to_an_absolute_directory_is_followed_inside_the_image() {
    let (tree, _) = apply_all(
        &[tar(&[
            T::Dir("etc"),
            T::Sym("link", "/etc"),
            T::File("link/x", b"x"),
        ])],
        Limits::default(),
    )
    .unwrap();
    assert_eq!(
        paths(&tree),
        ["/ dir", "/etc dir", "/etc/x file", "/link -> /etc"]
    );
}

#[test]
fn a_symlink_to_dot_dot_stays_at_the_root() {
    let (tree, _) = apply_all(
        &[tar(&[T::Sym("x", ".."), T::File("x/a/b", b"b")])],
        Limits::default(),
    )
    .unwrap();
    assert_eq!(paths(&tree), ["/ dir", "/a dir", "/a/b file", "/x -> .."]);
    let (tree, _) = apply_all(
        &[tar(&[
            T::Sym("up", "../../../.."),
            T::Sym("abs", "/up/up"),
            T::File("abs/escape", b"e"),
        ])],
        Limits::default(),
    )
    .unwrap();
    assert_eq!(
        paths(&tree),
        [
            "/ dir",
            "/abs -> /up/up",
            "/escape file",
            "/up -> ../../../.."
        ]
    );
}

#[test]
fn symlink_loops_are_an_error() {
    let err = apply_all(
        &[tar(&[
            T::Sym("a", "b"),
            T::Sym("b", "a"),
            T::File("a/x", b""),
        ])],
        Limits::default(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            LayerError::Entry {
                source: TreeError::SymlinkLoop { .. },
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn hardlinks_resolve_inside_the_image_and_never_to_a_directory_or_nothing() {
    let mut tree_sink = apply_all(
        &[tar(&[
            T::File("etc/passwd", b"root:x:0:0\n"),
            T::Sym("l", "/etc"),
            T::Link("h", "l/passwd"),
        ])],
        Limits::default(),
    )
    .unwrap();
    let a = tree_sink.0.lookup("/etc/passwd").unwrap();
    let h = tree_sink.0.lookup("/h").unwrap();
    assert_eq!(a, h, "the hard link shares the inode");
    assert_eq!(file_bytes(&tree_sink.0, &tree_sink.1, h), b"root:x:0:0\n");

    for (link, want) in [
        ("nothing", "does not exist"),
        ("etc", "is a directory"),
        ("/", "is a directory"),
    ] {
        let err = apply_all(
            &[tar(&[T::Dir("etc"), T::Link("h", link)])],
            Limits::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains(want), "{link}: {err}");
    }
}

#[test]
fn whiteouts_hide_lower_layers_only() {
    let lower = tar(&[
        T::Dir("a"),
        T::File("a/1", b"1"),
        T::File("a/2", b"2"),
        T::Sym("b", "a"),
        T::File("c", b"c"),
        T::Dir("d"),
        T::File("d/old", b"old"),
    ]);
    // Opaque marker first, as most tools write it.
    let upper = tar(&[
        T::File("a/.wh..wh..opq", b""),
        T::File("a/3", b"3"),
        T::File(".wh.b", b""),
    ]);
    let (tree, _) = apply_all(&[lower.clone(), upper], Limits::default()).unwrap();
    assert_eq!(
        paths(&tree),
        [
            "/ dir",
            "/a dir",
            "/a/3 file",
            "/c file",
            "/d dir",
            "/d/old file"
        ],
        "the whiteout of the symlink b removed b, not a"
    );
    // A late opaque marker keeps what this layer put there before it.
    let upper = tar(&[
        T::File("a/3", b"3"),
        T::Dir("a/sub"),
        T::File("a/.wh..wh..opq", b""),
    ]);
    let (tree, _) = apply_all(&[lower.clone(), upper], Limits::default()).unwrap();
    assert_eq!(
        paths(&tree),
        [
            "/ dir",
            "/a dir",
            "/a/3 file",
            "/a/sub dir",
            "/b -> a",
            "/c file",
            "/d dir",
            "/d/old file"
        ]
    );
    // Whiteouts of a directory, of nothing, and of a name under a missing
    // directory are fine; a whiteout never shows up itself.
    let upper = tar(&[
        T::File(".wh.d", b""),
        T::File(".wh.nothing", b""),
        T::File("zz/.wh.y", b""),
    ]);
    let (tree, _) = apply_all(&[lower, upper], Limits::default()).unwrap();
    assert_eq!(
        paths(&tree),
        [
            "/ dir",
            "/a dir",
            "/a/1 file",
            "/a/2 file",
            "/b -> a",
            "/c file"
        ]
    );
}

#[test]
fn a_root_entry_that_is_not_a_directory_is_an_error() {
    for root in ["./", ".", "/"] {
        let err = apply_all(&[tar(&[T::File(root, b"not a dir")])], Limits::default()).unwrap_err();
        assert!(
            matches!(
                err,
                LayerError::Entry {
                    source: TreeError::RootNotDirectory { .. },
                    ..
                }
            ),
            "{root}: {err}"
        );
    }
    let (tree, _) = apply_all(&[tar(&[T::Dir("./")])], Limits::default()).unwrap();
    assert_eq!(
        tree.inode(tree::ROOT).uid,
        1000,
        "a root directory entry sets the root's owner"
    );
}

#[test]
fn bombs_stop_at_the_caps() {
    let many: Vec<T> = (0..50).map(|_| T::Dir("d")).collect();
    let limits = Limits {
        max_entries: 40,
        ..Limits::default()
    };
    let err = apply_all(&[tar(&many)], limits).unwrap_err();
    assert!(
        matches!(
            err,
            LayerError::Entry {
                source: TreeError::TooManyEntries { limit: 40 },
                ..
            }
        ),
        "{err}"
    );

    let big = vec![7u8; 1 << 20];
    let limits = Limits {
        max_bytes: 512 << 10,
        ..Limits::default()
    };
    let err = apply_all(&[tar(&[T::File("big", &big)])], limits).unwrap_err();
    assert!(
        matches!(err, LayerError::TooLarge { limit } if limit == 512 << 10),
        "{err}"
    );

    let limits = Limits {
        max_header: 64,
        ..Limits::default()
    };
    let err = apply_all(&[tar(&[T::Xattr("f", "user.big", &[b'v'; 200])])], limits).unwrap_err();
    assert!(err.to_string().contains("extension header"), "{err}");

    // The cap counts all layers together.
    let half = vec![1u8; 300 << 10];
    let limits = Limits {
        max_bytes: 512 << 10,
        ..Limits::default()
    };
    let err = apply_all(
        &[tar(&[T::File("a", &half)]), tar(&[T::File("b", &half)])],
        limits,
    )
    .unwrap_err();
    assert!(matches!(err, LayerError::TooLarge { .. }), "{err}");

    // Parent directories a path makes count: a few entries of deep paths
    // cannot make millions of inodes.
    let deep: Vec<String> = (0..20)
        .map(|i| format!("{i}/{}", ["d"; 40].join("/")))
        .collect();
    let items: Vec<T> = deep.iter().map(|p| T::File(p, b"x")).collect();
    let limits = Limits {
        max_inodes: 200,
        ..Limits::default()
    };
    let err = apply_all(&[tar(&items)], limits).unwrap_err();
    assert!(
        err.to_string()
            .contains("more than 200 files and directories"),
        "{err}"
    );

    // Extended attributes: what one inode cannot hold is an error (not
    // left out), and the whole tree's are capped.
    let err = apply_all(
        &[tar(&[T::Xattr("f", "user.big", &[b'v'; 4000])])],
        Limits::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("extended attributes of"), "{err}");
    let many: Vec<T> = (0..10)
        .map(|_| T::Xattr("f", "user.x", &[b'v'; 1000]))
        .collect();
    let limits = Limits {
        max_xattr_total: 4096,
        ..Limits::default()
    };
    let err = apply_all(&[tar(&many)], limits).unwrap_err();
    assert!(
        err.to_string()
            .contains("more than 4096 bytes of extended attributes"),
        "{err}"
    );
}

/// A failure writing the root image is said as that, not as a failure to
/// read the layer.
#[test]
fn a_write_failure_is_not_a_read_failure() {
    struct Full;
    impl tree::BlockSink for Full {
        fn append(&mut self, _data: &mut dyn std::io::Read, _len: u64) -> std::io::Result<u32> {
            Err(std::io::Error::from(std::io::ErrorKind::StorageFull))
        }
    }
    let big = vec![3u8; 64 << 10];
    let layer = tar(&[T::File("big", &big)]);
    let mut tree = Tree::new(Limits::default());
    let err = layer::apply_layer(&mut tree, &mut Full, &mut &layer[..], 0, 0).unwrap_err();
    assert!(matches!(err, LayerError::Write(_)), "{err}");
    assert_eq!(err.to_string(), "write the root image");
}

/// A directory (or link, device, FIFO) whose header declared a size: we
/// skipped that many bytes, where Go's archive/tar and GNU tar read a
/// header there, so a scanner and the VM saw different files.
#[test]
fn a_header_only_entry_that_declares_data_is_refused() {
    for ty in [
        tar::EntryType::Directory,
        tar::EntryType::Symlink,
        tar::EntryType::Link,
        tar::EntryType::Char,
        tar::EntryType::Fifo,
    ] {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_path("smuggler").unwrap();
        h.set_link_name("target").unwrap();
        h.set_entry_type(ty);
        h.set_mode(0o755);
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        h.set_size(512);
        h.set_cksum();
        // The 512 "data" bytes are a whole header of a file for the others.
        let mut hidden = tar::Header::new_ustar();
        hidden.set_path("hidden").unwrap();
        hidden.set_size(0);
        hidden.set_cksum();
        b.append(&h, hidden.as_bytes().as_slice()).unwrap();
        let layer = b.into_inner().unwrap();
        let e = apply_all(&[layer], Limits::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("declares 512 bytes of data"), "{ty:?}: {e}");
    }
}

/// `a` and `a\0x` in PAX paths landed as two files (and the erofs
/// directory unsorted); GNU tar reads both as `a`.
#[test]
fn a_nul_byte_in_a_pax_path_is_refused() {
    for key in ["path", "linkpath"] {
        let mut rec = format!(" {key}=a").into_bytes();
        rec.extend_from_slice(b"\0x\n");
        let mut len = rec.len() + 1;
        while rec.len() + len.to_string().len() != len {
            len = rec.len() + len.to_string().len();
        }
        let mut pax = len.to_string().into_bytes();
        pax.extend_from_slice(&rec);
        let mut b = tar::Builder::new(Vec::new());
        let mut x = tar::Header::new_ustar();
        x.set_entry_type(tar::EntryType::XHeader);
        x.set_size(pax.len() as u64);
        x.set_path("pax").unwrap();
        x.set_cksum();
        b.append(&x, &pax[..]).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_path("a").unwrap();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_link_name("b").unwrap();
        h.set_size(0);
        h.set_cksum();
        b.append(&h, &b""[..]).unwrap();
        let e = apply_all(&[b.into_inner().unwrap()], Limits::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("a PAX {key} with a NUL byte")), "{e}");
    }
}

/// `.wh..`, `.wh...`, `.wh.` and whiteout names as directories were
/// silently ignored where other runtimes read them otherwise.
#[test]
fn odd_whiteouts_are_errors_not_no_ops() {
    for name in [
        "a/.wh.",
        "a/.wh..",
        "a/.wh...",
        "a/.wh..wh.other",
        ".wh.dir/file",
        "a/.wh.b/c",
    ] {
        let e = apply_all(
            &[tar(&[T::Dir("a"), T::File(name, b"")])],
            Limits::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("whiteout") || e.contains("`.wh..wh.`"),
            "{name}: {e}"
        );
    }
    // The opaque marker and an ordinary whiteout still work.
    apply_all(
        &[
            tar(&[T::Dir("a"), T::File("a/x", b"1")]),
            tar(&[T::File("a/.wh..wh..opq", b""), T::File(".wh.zz", b"")]),
        ],
        Limits::default(),
    )
    .unwrap();
}

#[test]
fn a_truncated_layer_is_an_error() {
    let mut t = tar(&[T::File("f", &[1u8; 10000])]);
    t.truncate(512 + 5000);
    let err = apply_all(&[t], Limits::default()).unwrap_err();
    assert!(
        matches!(
            err,
            LayerError::Entry {
                source: TreeError::ShortFile { .. },
                ..
            } | LayerError::Io(_)
        ),
        "{err}"
    );
}

#[test]
fn the_diff_id_is_the_sha256_of_the_whole_stream() {
    use sha2::Digest;
    let t = tar(&[T::File("f", b"hello")]);
    let mut tree = Tree::new(Limits::default());
    let (digest, n) =
        layer::apply_layer(&mut tree, &mut MemorySink::default(), &mut &t[..], 0, 0).unwrap();
    assert_eq!(n, t.len() as u64);
    assert_eq!(digest, <[u8; 32]>::from(sha2::Sha256::digest(&t)));
}

#[test]
fn file_contents_survive_in_memory_and_in_blocks() {
    let small = b"small".to_vec();
    let tail: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let exact = vec![9u8; 8192];
    let (mut tree, sink) = apply_all(
        &[tar(&[
            T::File("small", &small),
            T::File("tail", &tail),
            T::File("exact", &exact),
            T::File("empty", b""),
        ])],
        Limits::default(),
    )
    .unwrap();
    for (name, want) in [
        ("small", &small),
        ("tail", &tail),
        ("exact", &exact),
        ("empty", &Vec::new()),
    ] {
        let ino = tree.lookup(name).unwrap();
        assert_eq!(&file_bytes(&tree, &sink, ino), want, "{name}");
    }
    // With no memory budget everything goes to blocks and still reads back.
    let limits = Limits {
        max_inline_total: 0,
        ..Limits::default()
    };
    let (mut tree, sink) = apply_all(
        &[tar(&[T::File("small", &small), T::File("tail", &tail)])],
        limits,
    )
    .unwrap();
    for (name, want) in [("small", &small), ("tail", &tail)] {
        let ino = tree.lookup(name).unwrap();
        assert!(matches!(
            tree.inode(ino).kind,
            Kind::File(FileData::Blocks { tail: None, .. })
        ));
        assert_eq!(&file_bytes(&tree, &sink, ino), want, "{name}");
    }
}

/// What a path on disk is, for comparing an extracted image.
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
                crate::image::hex(&sha2::Sha256::digest(&data))
            )
        } else if ft.is_char_device() {
            format!("chr {}", m.rdev())
        } else if ft.is_fifo() {
            "fifo".to_string()
        } else {
            "other".to_string()
        };
        out.insert(
            rel,
            format!("{what} {:o} {}:{}", m.mode() & 0o7777, m.uid(), m.gid()),
        );
    }
    out
}

use sha2::Digest;

#[test]
fn the_erofs_image_reads_back_with_erofs_utils() {
    if Command::new("fsck.erofs").arg("-V").output().is_err() {
        eprintln!("SKIP: fsck.erofs (Debian's erofs-utils) is not installed; `cargo xtask test` installs it");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let big: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 253) as u8).collect();
    let many: Vec<String> = (0..400)
        .map(|i| format!("many/a-rather-long-file-name-number-{i:04}"))
        .collect();
    let mut items = vec![
        T::Dir("etc"),
        T::File("etc/hostname", b"box\n"),
        T::File("big", &big),
        T::File("page", &[3u8; 4096]),
        T::File("empty", b""),
        T::Sym("etc/link", "../big"),
        T::Link("hard", "etc/hostname"),
        T::Chr("null", 1, 3),
        T::Fifo("fifo"),
        T::Xattr("cap", "security.capability", b"\x01\x00\x00\x02"),
        T::Dir("many"),
    ];
    items.extend(many.iter().map(|m| T::File(m.as_str(), b"m")));
    let layers = [
        tar(&items),
        tar(&[T::File("etc/.wh.hostname", b""), T::File("added", b"later")]),
    ];

    let image = dir.path().join("root.erofs");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&image)
        .unwrap();
    let mut b = RootfsBuilder::new(file, Limits::default());
    for l in &layers {
        b.add_layer(&mut &l[..]).unwrap();
    }
    let stats = b.finish().unwrap();
    assert_eq!(stats.xattrs_dropped, 0);

    let out = dir.path().join("x");
    let fsck = Command::new("fsck.erofs")
        .arg(format!("--extract={}", out.display()))
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "fsck.erofs: {}",
        String::from_utf8_lossy(&fsck.stderr)
    );
    let got = describe(&out);
    let sum = |d: &[u8]| crate::image::hex(&sha2::Sha256::digest(d));
    assert_eq!(got["/etc"], "dir 755 1000:100");
    assert!(!got.contains_key("/etc/hostname"), "whited out");
    assert_eq!(
        got["/hard"],
        format!("file 4 {} 644 1000:100", sum(b"box\n")),
        "the hard link kept the contents"
    );
    assert_eq!(
        got["/big"],
        format!("file 100000 {} 644 1000:100", sum(&big))
    );
    assert_eq!(
        got["/page"],
        format!("file 4096 {} 644 1000:100", sum(&[3u8; 4096]))
    );
    assert_eq!(got["/empty"], format!("file 0 {} 644 1000:100", sum(b"")));
    assert_eq!(
        got["/added"],
        format!("file 5 {} 644 1000:100", sum(b"later"))
    );
    assert_eq!(got["/etc/link"], "-> ../big 777 1000:100");
    assert_eq!(
        got["/null"],
        format!("chr {} 644 1000:100", libc::makedev(1, 3))
    );
    assert_eq!(got["/fifo"], "fifo 644 1000:100");
    assert_eq!(
        got.keys().filter(|k| k.starts_with("/many/")).count(),
        400,
        "a directory of many blocks"
    );
    assert_eq!(
        got[many[399].replace("many", "/many").as_str()],
        format!("file 1 {} 644 1000:100", sum(b"m"))
    );
}

/// A directory a layer writes into belongs to that layer too: an opaque
/// marker or a whiteout later in the same layer hides what lower layers
/// put there, never the layer's own files (as Docker and containerd read
/// it).
#[test]
fn a_layers_own_files_under_an_implicit_parent_survive_its_opaque_marker() {
    let lower = tar(&[T::File("a/b/old", b"old"), T::File("c/d/old", b"old")]);
    let upper = tar(&[
        T::File("a/b/new", b"new"),
        T::File("a/.wh..wh..opq", b""),
        T::File("c/d/new", b"new"),
        T::File("c/.wh.d", b""),
    ]);
    let (tree, _) = apply_all(&[lower, upper], Limits::default()).unwrap();
    let p = paths(&tree);
    for want in ["/a/b/new file", "/c/d/new file"] {
        assert!(p.iter().any(|x| x == want), "{want} missing: {p:?}");
    }
    for gone in ["/a/b/old file", "/c/d/old file"] {
        assert!(!p.iter().any(|x| x == gone), "{gone} still there: {p:?}");
    }
}

#[test]
fn long_names_are_shortened_in_errors() {
    let long = format!("{}/..", "a".repeat(3000));
    let err = apply_all(&[tar_pax_path(&long)], Limits::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("(3003 bytes)") && err.len() < 400, "{err}");
}

/// A layer of one file whose (long) name is in a PAX `path` record.
fn tar_pax_path(path: &str) -> Vec<u8> {
    let mut rec = format!(" path={path}\n").into_bytes();
    let mut len = rec.len() + 1;
    while rec.len() + len.to_string().len() != len {
        len = rec.len() + len.to_string().len();
    }
    let mut pax = len.to_string().into_bytes();
    pax.append(&mut rec);
    let mut b = tar::Builder::new(Vec::new());
    let mut x = tar::Header::new_ustar();
    x.set_entry_type(tar::EntryType::XHeader);
    x.set_size(pax.len() as u64);
    x.set_path("pax").unwrap();
    x.set_cksum();
    b.append(&x, &pax[..]).unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_path("placeholder").unwrap();
    h.set_size(0);
    h.set_mode(0o644);
    h.set_cksum();
    b.append(&h, &b""[..]).unwrap();
    b.into_inner().unwrap()
}

/// One raw 512-byte tar header, fields written as given (a hostile or
/// merely unusual header is the point): ustar magic, checksum computed.
fn raw_header(name: &[u8], kind: u8, size: &[u8], link: &[u8], prefix: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 512];
    h[..name.len()].copy_from_slice(name);
    h[100..107].copy_from_slice(b"0000644");
    h[108..115].copy_from_slice(b"0001750");
    h[116..123].copy_from_slice(b"0000144");
    h[124..124 + size.len()].copy_from_slice(size);
    h[136..147].copy_from_slice(b"14524722400");
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    if kind == b'3' {
        h[329..336].copy_from_slice(b"0000001");
        h[337..344].copy_from_slice(b"0000003");
    }
    h[345..345 + prefix.len()].copy_from_slice(prefix);
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    h
}

/// A header and its data, padded to whole blocks.
fn member(header: Vec<u8>, data: &[u8]) -> Vec<u8> {
    let mut v = header;
    v.extend_from_slice(data);
    v.resize(v.len().next_multiple_of(512), 0);
    v
}

fn octal(n: usize) -> Vec<u8> {
    format!("{n:011o}").into_bytes()
}

fn file(name: &str, data: &[u8]) -> Vec<u8> {
    member(
        raw_header(name.as_bytes(), b'0', &octal(data.len()), b"", b""),
        data,
    )
}

/// A PAX extended header (`kind` b'x', or b'g' for a global one) of records.
fn pax(kind: u8, records: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (k, v) in records {
        let rec = format!(" {k}={v}\n");
        let mut len = rec.len() + 1;
        while rec.len() + len.to_string().len() != len {
            len = rec.len() + len.to_string().len();
        }
        body.extend_from_slice(format!("{len}{rec}").as_bytes());
    }
    member(
        raw_header(b"pax", kind, &octal(body.len()), b"", b""),
        &body,
    )
}

fn end(mut v: Vec<u8>) -> Vec<u8> {
    v.extend_from_slice(&[0u8; 1024]);
    v
}

/// Crafted layers: (name, bytes, whether steelcup must take it).
fn corpus() -> Vec<(&'static str, Vec<u8>, bool)> {
    let long = "d/".to_string() + &"n".repeat(150);
    let mut base256 = vec![0x80u8];
    base256.extend_from_slice(&[0u8; 10]);
    base256.push(5);
    vec![
        (
            "plain members of every kind",
            end([
                member(raw_header(b"d/", b'5', &octal(0), b"", b""), b""),
                file("d/f", b"hello"),
                member(raw_header(b"s", b'2', &octal(0), b"d/f", b""), b""),
                member(raw_header(b"h", b'1', &octal(0), b"d/f", b""), b""),
                member(raw_header(b"p", b'6', &octal(0), b"", b""), b""),
                member(raw_header(b"c", b'3', &octal(0), b"", b""), b""),
                file("./dot", b"x"),
                file("/abs", b"y"),
            ]
            .concat()),
            true,
        ),
        (
            "a GNU long name",
            end([
                member(
                    raw_header(b"././@LongLink", b'L', &octal(long.len() + 1), b"", b""),
                    format!("{long}\0").as_bytes(),
                ),
                member(raw_header(b"short", b'0', &octal(2), b"", b""), b"ln"),
            ]
            .concat()),
            true,
        ),
        (
            "a GNU long link target",
            end([
                member(
                    raw_header(b"././@LongLink", b'K', &octal(long.len() + 1), b"", b""),
                    format!("{long}\0").as_bytes(),
                ),
                member(raw_header(b"sym", b'2', &octal(0), b"x", b""), b""),
            ]
            .concat()),
            true,
        ),
        (
            "PAX path and linkpath",
            end([
                pax(b'x', &[("path", &long)]),
                file("placeholder", b"pp"),
                pax(b'x', &[("linkpath", &long)]),
                member(raw_header(b"plink", b'2', &octal(0), b"x", b""), b""),
            ]
            .concat()),
            true,
        ),
        (
            "a ustar prefix",
            end(member(
                raw_header(b"f", b'0', &octal(3), b"", b"pre/fix"),
                b"pfx",
            )),
            true,
        ),
        (
            "the same name twice: the last wins",
            end([file("dup", b"one"), file("dup", b"two")].concat()),
            true,
        ),
        (
            "a global PAX header",
            end([pax(b'g', &[("comment", "hi")]), file("g", b"global")].concat()),
            true,
        ),
        (
            "data after the end of the archive",
            [end(file("e", b"end")), file("after", b"ignored")].concat(),
            true,
        ),
        (
            "a PAX size larger than the header's",
            end([
                pax(b'x', &[("size", "3")]),
                member(raw_header(b"ps", b'0', &octal(0), b"", b""), b"abc"),
            ]
            .concat()),
            false,
        ),
        (
            "a base-256 size",
            end(member(
                raw_header(b"b256", b'0', &base256, b"", b""),
                b"hello",
            )),
            false,
        ),
        (
            "a directory that declares data",
            end([
                member(
                    raw_header(b"dd", b'5', &octal(512), b"", b""),
                    &file("hidden", b""),
                ),
                file("z", b"z"),
            ]
            .concat()),
            false,
        ),
        (
            "a bad checksum",
            end({
                let mut h = raw_header(b"bad", b'0', &octal(1), b"", b"");
                h[0] = b'B';
                member(h, b"b")
            }),
            false,
        ),
    ]
}

/// A tree as `path kind` lines: `dir`, `file SHA-256`, `-> target`,
/// `chr M:m`, `fifo`; relative paths, the root left out.
type Listing = BTreeMap<String, String>;

fn sha(data: &[u8]) -> String {
    sha2::Sha256::digest(data)[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn our_listing(tree: &Tree, sink: &MemorySink) -> Listing {
    let mut out = Listing::new();
    tree.walk(|p, ino| {
        let p = String::from_utf8_lossy(p)
            .trim_start_matches('/')
            .to_string();
        if p.is_empty() {
            return;
        }
        let kind = match &tree.inode(ino).kind {
            Kind::Dir(_) => "dir".to_string(),
            Kind::File(_) => format!("file {}", sha(&file_bytes(tree, sink, ino))),
            Kind::Symlink(t) => format!("-> {}", String::from_utf8_lossy(t)),
            Kind::CharDevice { major, minor } => format!("chr {major}:{minor}"),
            Kind::BlockDevice { major, minor } => format!("blk {major}:{minor}"),
            Kind::Fifo => "fifo".to_string(),
        };
        out.insert(p, kind);
    });
    out
}

/// GNU tar's reading: the layer extracted (as root: devices too), then
/// walked. None where GNU tar fails or warns of an error.
fn gnu_listing(layer: &[u8]) -> Option<Listing> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("layer.tar");
    std::fs::write(&file, layer).unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let ok = Command::new("tar")
        .arg("-xf")
        .arg(&file)
        .arg("-C")
        .arg(&root)
        .args(["--no-same-owner", "--warning=no-timestamp"])
        .output()
        .unwrap()
        .status
        .success();
    if !ok {
        return None;
    }
    let mut out = Listing::new();
    let mut stack = vec![root.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(&root).unwrap().display().to_string();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let t = m.file_type();
            let kind = if t.is_dir() {
                stack.push(p.clone());
                "dir".to_string()
            } else if t.is_symlink() {
                format!("-> {}", std::fs::read_link(&p).unwrap().display())
            } else if t.is_char_device() {
                format!("chr {}:{}", (m.rdev() >> 8) & 0xfff, m.rdev() & 0xff)
            } else if t.is_fifo() {
                "fifo".to_string()
            } else {
                format!("file {}", sha(&std::fs::read(&p).unwrap()))
            };
            out.insert(rel, kind);
        }
    }
    Some(out)
}

/// Python tarfile's reading (POSIX's rules): its members, the last of a
/// name winning, parents implied. None where it refuses the archive.
fn python_listing(layer: &[u8]) -> Option<Listing> {
    const SCRIPT: &str = r#"
import hashlib, json, sys, tarfile
tf = tarfile.open(sys.argv[1], errorlevel=2)
for m in tf.getmembers():
    name = m.name
    while name.startswith("./"):
        name = name[2:]
    name = name.strip("/")
    if not name or name == ".":
        continue
    if m.isdir():
        kind = "dir"
    elif m.issym():
        kind = "-> " + m.linkname
    elif m.ischr():
        kind = "chr %d:%d" % (m.devmajor, m.devminor)
    elif m.isfifo():
        kind = "fifo"
    else:
        kind = "file " + hashlib.sha256(tf.extractfile(m).read()).hexdigest()[:16]
    print(json.dumps([name, kind]))
"#;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("layer.tar");
    std::fs::write(&file, layer).unwrap();
    let out = Command::new("python3")
        .args(["-c", SCRIPT])
        .arg(&file)
        .output()
        .unwrap();
    if !out.status.success() {
        return None;
    }
    let mut listing = Listing::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let [name, kind]: [String; 2] = serde_json::from_str(line).unwrap();
        let mut parent = Path::new(&name).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            listing
                .entry(p.display().to_string())
                .or_insert_with(|| "dir".into());
            parent = p.parent();
        }
        listing.insert(name, kind);
    }
    Some(listing)
}

/// A layer means to steelcup what it means to GNU tar and to Python's
/// tarfile — the same names, kinds, link targets and contents — or
/// steelcup refuses it. Each crafted layer of the corpus is read all three
/// ways.
#[test]
fn layers_read_as_gnu_tar_and_python_read_them_or_are_refused() {
    let have = |tool: &str| Command::new(tool).arg("--version").output().is_ok();
    if !have("tar") || !have("python3") {
        assert!(
            std::env::var_os("STEELCUP_REQUIRE_TOOLS").is_none(),
            "GNU tar and python3 are needed (cargo xtask test installs them)"
        );
        eprintln!("SKIP: the tar differential test needs GNU tar and python3");
        return;
    }
    let mut taken = 0;
    for (name, layer, must_take) in corpus() {
        let ours = apply_all(std::slice::from_ref(&layer), Limits::default());
        let (tree, sink) = match ours {
            Ok(t) => t,
            Err(e) => {
                assert!(!must_take, "{name}: refused: {e}");
                println!("{name}: refused ({e})");
                continue;
            }
        };
        taken += 1;
        let ours = our_listing(&tree, &sink);
        assert_eq!(
            Some(&ours),
            gnu_listing(&layer).as_ref(),
            "{name}: GNU tar reads it otherwise"
        );
        assert_eq!(
            Some(&ours),
            python_listing(&layer).as_ref(),
            "{name}: Python's tarfile reads it otherwise"
        );
        println!("{name}: {} entries, read alike", ours.len());
    }
    assert!(taken >= 8, "the corpus's ordinary layers were taken");
}
