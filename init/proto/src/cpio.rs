//! A writer for cpio `newc` archives, the format of Linux initramfs.
//!
//! # Design
//! Entries are written as given; the caller decides the order. Inode numbers
//! count up from 1 and mtimes are whatever the caller passes (image-build
//! passes 0), so the same entries give the same bytes. Sizes that do not fit
//! the format's 32-bit fields are errors, not truncation.

use std::io::{self, Write};

/// Errors writing an archive.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    #[error("{path}: {size} bytes is too large for a cpio entry")]
    TooLarge { path: String, size: u64 },
    #[error("{path:?}: not a valid archive path")]
    BadPath { path: String },
    #[error("write archive")]
    Io(#[from] io::Error),
}

pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFCHR: u32 = 0o020000;

/// Streams a newc archive to `W`.
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    out: W,
    ino: u32,
    written: u64,
    mtime: u32,
}

impl<W: Write> CpioWriter<W> {
    /// A writer whose entries all carry `mtime` (seconds since the epoch).
    pub fn new(out: W, mtime: u32) -> Self {
        CpioWriter {
            out,
            ino: 0,
            written: 0,
            mtime,
        }
    }

    fn header(
        &mut self,
        path: &str,
        mode: u32,
        size: u64,
        rdev: (u32, u32),
        nlink: u32,
    ) -> Result<(), CpioError> {
        if path.is_empty() || path.starts_with('/') || path.contains('\0') || path.len() > 4000 {
            return Err(CpioError::BadPath { path: path.into() });
        }
        let size32 = u32::try_from(size).map_err(|_| CpioError::TooLarge {
            path: path.into(),
            size,
        })?;
        self.ino += 1;
        let name_len = path.len() + 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino, mode, 0, 0, nlink, self.mtime, size32, 0, 0, rdev.0, rdev.1, name_len, 0
        );
        self.put(header.as_bytes())?;
        self.put(path.as_bytes())?;
        self.put(&[0])?;
        self.pad()
    }

    fn put(&mut self, b: &[u8]) -> Result<(), CpioError> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<(), CpioError> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..n])
    }

    pub fn dir(&mut self, path: &str, perm: u32) -> Result<(), CpioError> {
        self.header(path, S_IFDIR | (perm & 0o7777), 0, (0, 0), 2)
    }

    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> Result<(), CpioError> {
        self.header(
            path,
            S_IFREG | (perm & 0o7777),
            data.len() as u64,
            (0, 0),
            1,
        )?;
        self.put(data)?;
        self.pad()
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), CpioError> {
        self.header(path, S_IFLNK | 0o777, target.len() as u64, (0, 0), 1)?;
        self.put(target.as_bytes())?;
        self.pad()
    }

    pub fn char_dev(
        &mut self,
        path: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        self.header(path, S_IFCHR | (perm & 0o7777), 0, (major, minor), 1)
    }

    /// Writes the trailer and returns the writer.
    pub fn finish(mut self) -> Result<W, CpioError> {
        self.header("TRAILER!!!", 0, 0, (0, 0), 1)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_aligned_newc_entries() {
        let mut w = CpioWriter::new(Vec::new(), 0);
        w.dir("etc", 0o755).unwrap();
        w.file("etc/hostname", 0o644, b"box\n").unwrap();
        w.symlink("bin", "usr/bin").unwrap();
        w.char_dev("dev/console", 0o600, 5, 1).unwrap();
        let out = w.finish().unwrap();
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("etc/hostname\0"));
        assert!(text.contains("box\n"));
        assert!(text.contains("TRAILER!!!"));
        // Each header starts on a 4-byte boundary.
        for (i, _) in text.match_indices("070701") {
            assert_eq!(i % 4, 0);
        }
    }

    #[test]
    fn same_entries_same_bytes() {
        let build = || {
            let mut w = CpioWriter::new(Vec::new(), 0);
            w.file("a", 0o644, b"x").unwrap();
            w.finish().unwrap()
        };
        assert_eq!(build(), build());
    }

    #[test]
    fn bad_paths_are_refused() {
        let mut w = CpioWriter::new(Vec::new(), 0);
        assert!(w.file("/abs", 0o644, b"").is_err());
        assert!(w.file("", 0o644, b"").is_err());
        assert!(w.file("a\0b", 0o644, b"").is_err());
    }
}
