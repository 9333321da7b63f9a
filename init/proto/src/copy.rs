//! `cup cp`: files into and out of a running microVM, as a tar stream
//! over vsock through vminit. Both ends compile against this module.
//!
//! # Design
//! cup connects to the guest's [`COPY_PORT`] and writes one
//! [`CopyRequest`] line; then the archive travels in stdio frames
//! ([`crate::stdio`]): out of the guest as `STDOUT` frames, into it as
//! `STDIN` frames ended by `STDIN_EOF`. vminit ends with an `EXIT` frame
//! (code 0, or 1 after a `STDERR` frame that says why).
//!
//! Where an archive is unpacked ([`place`]) — into the guest, or onto the
//! user's machine from a guest that may be hostile — every entry must land
//! inside the destination: an entry with `..`, an absolute name, a hard
//! link to outside, or one whose parent is reached through a symlink
//! pointing out is refused, the copy fails naming it, and nothing is
//! written outside. Symlinks themselves are copied as symlinks, never
//! followed, on either side.
//!
//! # Limitations
//! No xattrs; owners are kept only where the unpacking side is root.

use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

/// The vsock port vminit serves copies on.
pub const COPY_PORT: u32 = 1027;

/// The longest path a request names.
pub const MAX_PATH: usize = 4096;

/// What cup asks vminit to copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "copy", rename_all = "kebab-case", deny_unknown_fields)]
pub enum CopyRequest {
    /// `path` in the guest, as a tar archive whose one top entry is its
    /// last component.
    Out { path: String },
    /// A tar archive to [`place`] at `path` in the guest.
    In { path: String },
}

/// Why a copy failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("{0:?}: a path in the guest is absolute, without '..', at most 4096 bytes")]
    BadPath(String),
    #[error("archive entry {0:?} would land outside {1}; refused")]
    Escapes(PathBuf, PathBuf),
    #[error("{0}: {1}")]
    Io(String, #[source] io::Error),
    #[error("{0}")]
    Shape(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> CopyError {
    let what = what.into();
    move |e| CopyError::Io(what, e)
}

/// Checks a guest path as a request names it.
pub fn check_guest_path(p: &str) -> Result<(), CopyError> {
    let ok = p.starts_with('/')
        && p.len() <= MAX_PATH
        && !p.contains('\0')
        && !Path::new(p).components().any(|c| c == Component::ParentDir);
    if ok {
        Ok(())
    } else {
        Err(CopyError::BadPath(p.to_string()))
    }
}

/// The name `path`'s top entry gets in an archive: its last component
/// (`/` itself: `.`).
pub fn top_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| ".".into())
}

/// Writes `path` (a file, a directory with everything under it, or a
/// symlink as a symlink) to `out` as a tar archive whose top entry is
/// `name`.
pub fn pack(path: &Path, name: &str, out: impl Write) -> Result<(), CopyError> {
    let shown = path.display().to_string();
    let meta = std::fs::symlink_metadata(path).map_err(io_err(shown.clone()))?;
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Complete);
    if meta.is_dir() {
        b.append_dir_all(name, path)
            .map_err(io_err(shown.clone()))?;
    } else {
        b.append_path_with_name(path, name)
            .map_err(io_err(shown.clone()))?;
    }
    b.into_inner().map_err(io_err(shown))?.flush().ok();
    Ok(())
}

/// Unpacks `archive` into the existing directory `dest`, every entry
/// inside it (see the module docs); the number of entries.
pub fn unpack(archive: impl Read, dest: &Path) -> Result<u64, CopyError> {
    let mut ar = tar::Archive::new(archive);
    ar.set_preserve_permissions(true);
    ar.set_overwrite(true);
    ar.set_unpack_xattrs(false);
    ar.set_preserve_ownerships(nix::unistd::geteuid().is_root());
    let outside = |p: &Path| {
        p.components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    };
    let mut n = 0;
    for entry in ar.entries().map_err(io_err("read the archive"))? {
        let mut e = entry.map_err(io_err("read the archive"))?;
        let path = e.path().map_err(io_err("an entry's name"))?.into_owned();
        if path.as_os_str().is_empty() || outside(&path) {
            return Err(CopyError::Escapes(path, dest.to_path_buf()));
        }
        if e.header().entry_type().is_hard_link() {
            let target = e
                .link_name()
                .map_err(io_err("a link's target"))?
                .unwrap_or_default()
                .into_owned();
            if outside(&target) {
                return Err(CopyError::Escapes(target, dest.to_path_buf()));
            }
        }
        // tar's own check: the entry's parent, symlinks resolved, must be
        // inside `dest` (a symlink in the archive cannot be a way out).
        match e.unpack_in(dest) {
            Ok(true) => n += 1,
            Ok(false) => return Err(CopyError::Escapes(path, dest.to_path_buf())),
            Err(err) if chain(&err).contains("outside of") => {
                return Err(CopyError::Escapes(path, dest.to_path_buf()))
            }
            Err(err) => return Err(CopyError::Io(format!("unpack {}", path.display()), err)),
        }
    }
    Ok(n)
}

/// An error with its causes, as one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// Puts the archive's one top entry at `dest`, as `docker cp` does: into
/// `dest` when it is a directory, else as `dest` itself (its parent must
/// exist). The archive is unpacked beside `dest` first, so a refused one
/// leaves nothing at `dest`.
pub fn place(archive: impl Read, dest: &Path) -> Result<(), CopyError> {
    if dest.is_dir() {
        return unpack(archive, dest).map(|_| ());
    }
    let parent = match dest.parent() {
        Some(p) if p.as_os_str().is_empty() => Path::new("."),
        Some(p) => p,
        None => {
            return Err(CopyError::Shape(format!(
                "{}: no parent directory",
                dest.display()
            )))
        }
    };
    if !parent.is_dir() {
        return Err(CopyError::Shape(format!(
            "{}: no such directory",
            parent.display()
        )));
    }
    let tmp = parent.join(format!(".cup-cp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(io_err(tmp.display().to_string()))?;
    let result = unpack(archive, &tmp).and_then(|_| {
        let mut tops = std::fs::read_dir(&tmp)
            .map_err(io_err(tmp.display().to_string()))?
            .flatten();
        match (tops.next(), tops.next()) {
            (Some(one), None) => std::fs::rename(one.path(), dest)
                .map_err(io_err(format!("rename into {}", dest.display()))),
            _ => Err(CopyError::Shape(
                "the archive does not hold exactly one top entry".into(),
            )),
        }
    });
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

/// Writes what it is given as frames of one kind: `STDOUT` out of the
/// guest, `STDIN` into it.
#[derive(Debug)]
pub struct FrameWriter<W: Write> {
    pub inner: W,
    pub kind: u8,
}

impl<W: Write> Write for FrameWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(crate::stdio::MAX_FRAME);
        if n > 0 {
            crate::stdio::write_frame(&mut self.inner, self.kind, &buf[..n])?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Reads the data of `STDIN` frames until `STDIN_EOF` (or the stream's
/// end); any other frame is an error.
#[derive(Debug)]
pub struct FrameReader<R: Read> {
    inner: R,
    buf: Vec<u8>,
    at: usize,
    done: bool,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            buf: Vec::new(),
            at: 0,
            done: false,
        }
    }
}

impl<R: Read> Read for FrameReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.at == self.buf.len() {
            if self.done {
                return Ok(0);
            }
            match crate::stdio::read_frame(&mut self.inner)? {
                Some((crate::stdio::STDIN, data)) => (self.buf, self.at) = (data, 0),
                Some((crate::stdio::STDIN_EOF, _)) | None => self.done = true,
                Some((kind, _)) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("frame kind {kind} in an archive"),
                    ))
                }
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(dir: &Path) {
        std::fs::create_dir_all(dir.join("conf/sub")).unwrap();
        std::fs::write(dir.join("conf/a.txt"), "alpha").unwrap();
        std::fs::write(dir.join("conf/sub/b.txt"), "beta").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.join("conf/link")).unwrap();
    }

    #[test]
    fn a_directory_goes_over_and_lands_in_or_as_the_destination() {
        let src = tempfile::tempdir().unwrap();
        tree(src.path());
        let mut tar = Vec::new();
        pack(&src.path().join("conf"), "conf", &mut tar).unwrap();
        // Into an existing directory: dest/conf.
        let into = tempfile::tempdir().unwrap();
        place(&tar[..], into.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(into.path().join("conf/sub/b.txt")).unwrap(),
            "beta"
        );
        // A symlink stays a symlink, not followed.
        assert_eq!(
            std::fs::read_link(into.path().join("conf/link")).unwrap(),
            Path::new("/etc/passwd")
        );
        // As a new name.
        let as_new = into.path().join("renamed");
        place(&tar[..], &as_new).unwrap();
        assert_eq!(
            std::fs::read_to_string(as_new.join("a.txt")).unwrap(),
            "alpha"
        );
        // A file as a new file.
        let mut one = Vec::new();
        pack(&src.path().join("conf/a.txt"), "a.txt", &mut one).unwrap();
        let f = into.path().join("copy.txt");
        place(&one[..], &f).unwrap();
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "alpha");
        assert!(place(&one[..], &into.path().join("no/such/dir")).is_err());
    }

    /// Entries a hostile guest could send, each on its own.
    fn hostile(kind: &str) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let header = || {
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h
        };
        let mut h = header();
        let file = |b: &mut tar::Builder<Vec<u8>>, name: &[u8], data: &[u8]| {
            let mut h = header();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            // Written raw: tar's own setters refuse these names.
            h.as_old_mut().name[..name.len()].copy_from_slice(name);
            h.set_cksum();
            b.append(&h, data).unwrap();
        };
        match kind {
            "dotdot" => file(&mut b, b"x/../../evil", b"pwned"),
            "absolute" => file(&mut b, b"/tmp/steelcup-cp-evil", b"pwned"),
            "through-symlink" => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                h.set_mode(0o777);
                b.append_link(&mut h, "way-out", "..").unwrap();
                file(&mut b, b"way-out/evil", b"pwned");
            }
            "hard-link" => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_size(0);
                h.as_old_mut().name[..4].copy_from_slice(b"hard");
                h.as_old_mut().linkname[..13].copy_from_slice(b"../../outside");
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
            _ => unreachable!(),
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn entries_that_would_leave_the_destination_are_refused() {
        for kind in ["dotdot", "absolute", "through-symlink", "hard-link"] {
            let top = tempfile::tempdir().unwrap();
            let dest = top.path().join("dest");
            std::fs::create_dir(&dest).unwrap();
            let err = place(&hostile(kind)[..], &dest).unwrap_err();
            assert!(matches!(err, CopyError::Escapes(..)), "{kind}: {err}");
            assert!(err.to_string().contains("outside"), "{kind}: {err}");
            assert!(!top.path().join("evil").exists(), "{kind}");
            assert!(!Path::new("/tmp/steelcup-cp-evil").exists(), "{kind}");
        }
    }

    #[test]
    fn guest_paths_are_checked() {
        check_guest_path("/etc/nginx").unwrap();
        for bad in ["etc", "/a/../b", "/a\0b", ""] {
            assert!(check_guest_path(bad).is_err(), "{bad:?}");
        }
        assert_eq!(top_name(Path::new("/etc/nginx/")), "nginx");
        assert_eq!(top_name(Path::new("/")), ".");
    }

    #[test]
    fn frames_carry_the_archive() {
        let mut framed = Vec::new();
        FrameWriter {
            inner: &mut framed,
            kind: crate::stdio::STDOUT,
        }
        .write_all(&[7u8; 100_000])
        .unwrap();
        crate::stdio::write_frame(&mut framed, crate::stdio::STDIN_EOF, b"").unwrap();
        // Written as STDOUT frames; read back as STDIN ones by the other side.
        let mut as_stdin = framed.clone();
        let mut i = 0;
        while i < as_stdin.len() {
            let len = u32::from_le_bytes(as_stdin[i + 1..i + 5].try_into().unwrap()) as usize;
            if as_stdin[i] == crate::stdio::STDOUT {
                as_stdin[i] = crate::stdio::STDIN;
            }
            i += 5 + len;
        }
        let mut back = Vec::new();
        FrameReader::new(&as_stdin[..])
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, vec![7u8; 100_000]);
        assert!(FrameReader::new(&framed[..])
            .read_to_end(&mut Vec::new())
            .is_err());
    }
}
