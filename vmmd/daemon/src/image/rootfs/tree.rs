//! The merged root filesystem of an image, built in memory from its layers.
//!
//! # Design
//! Layers are applied in order to a tree of inodes that lives only in
//! memory: nothing is created on the host's filesystem, so no entry can
//! escape onto it. Paths are resolved inside the tree the way a chroot
//! would resolve them (the securejoin rule): `..` at the root stays at the
//! root and an absolute symlink target starts again at the root, so
//! `link -> /etc` then `link/x` creates the image's `/etc/x`. Entry names
//! with a `..` component are refused outright; absolute names are taken
//! relative to the root.
//!
//! OCI whiteouts: `.wh.NAME` hides `NAME` of a lower layer (never following
//! a symlink), `.wh..wh..opq` hides everything a lower layer put in its
//! directory, wherever in the layer the marker comes. Each directory entry
//! remembers the layer that last declared it (a directory a layer writes
//! into counts as declared by it), which is what makes both
//! order-independent within a layer and keeps a layer's own files from
//! its own whiteouts.
//!
//! Regular file contents go to a [`BlockSink`] as they stream past (the
//! erofs image being written); small files and the tails of large ones stay
//! in memory, to be packed next to their inodes.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read};

/// The filesystem block size of the images we write.
pub const BLOCK_SIZE: u64 = 4096;

/// An inode number in the tree.
pub type Ino = usize;

/// The root directory's inode.
pub const ROOT: Ino = 0;

/// How many symlinks one path may pass through, as in Linux.
const MAX_SYMLINK_HOPS: u32 = 40;

/// Bounds that keep a hostile image (a tar bomb) from exhausting the host.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Tar entries over all layers.
    pub max_entries: u64,
    /// Bytes in one path or link target.
    pub max_path: usize,
    /// Bytes in one header extension (PAX record set, GNU long name).
    pub max_header: u64,
    /// Uncompressed bytes over all layers.
    pub max_bytes: u64,
    /// Bytes of file contents kept in memory to pack next to inodes.
    pub max_inline_total: u64,
    /// Inodes in the tree: entries and the parent directories their
    /// paths make.
    pub max_inodes: u64,
    /// Bytes of extended attributes over all inodes.
    pub max_xattr_total: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_entries: 1 << 20,
            max_path: 4096,
            max_header: 1 << 20,
            max_bytes: 32 << 30,
            max_inline_total: 256 << 20,
            max_inodes: 1 << 20,
            max_xattr_total: 64 << 20,
        }
    }
}

/// Errors applying a layer entry.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("{path}: a `..` component would leave the image")]
    Traversal { path: String },
    #[error("{path}: {component} is not a directory")]
    NotADirectory { path: String, component: String },
    #[error("{path}: {why}")]
    BadWhiteout { path: String, why: &'static str },
    #[error("{path}: too many levels of symbolic links")]
    SymlinkLoop { path: String },
    #[error("{path}: the image root must be a directory")]
    RootNotDirectory { path: String },
    #[error("{path}: hard link to {target}, which does not exist in the image")]
    LinkTargetMissing { path: String, target: String },
    #[error("{path}: hard link to {target}, which is a directory")]
    LinkToDirectory { path: String, target: String },
    #[error("{path}: a name component longer than 255 bytes")]
    NameTooLong { path: String },
    #[error("more than {limit} entries")]
    TooManyEntries { limit: u64 },
    #[error("{path}: file contents ended early")]
    ShortFile { path: String },
    /// Reading the entry's contents from the layer failed.
    #[error("read the layer")]
    Read(#[source] io::Error),
    /// Writing them into the root image failed (a full disk, say).
    #[error("write the root image")]
    Write(#[source] io::Error),
    #[error("{path}: a file larger than 16 TiB")]
    FileTooLarge { path: String },
    #[error("{path}: extended attributes of {bytes} bytes; an image inode holds at most {max}")]
    XattrsTooLarge {
        path: String,
        bytes: usize,
        max: usize,
    },
    #[error("more than {limit} bytes of extended attributes")]
    TooManyXattrs { limit: u64 },
    #[error("more than {limit} files and directories (those made for a path's parents count too)")]
    TooManyInodes { limit: u64 },
}

/// Passes reads through and remembers whether one failed, so a failure
/// of a copy is known to be the reader's or the writer's.
struct Tagged<'a> {
    inner: &'a mut dyn Read,
    failed: bool,
}

impl Read for Tagged<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).inspect_err(|_| self.failed = true)
    }
}

/// What kind of file an inode is, with what only that kind has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Entries by name (sorted bytewise, as erofs stores them).
    Dir(BTreeMap<Box<[u8]>, Dirent>),
    File(FileData),
    Symlink(Box<[u8]>),
    CharDevice {
        major: u32,
        minor: u32,
    },
    BlockDevice {
        major: u32,
        minor: u32,
    },
    Fifo,
}

/// One name in a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dirent {
    pub ino: Ino,
    /// The layer that last declared this name.
    pub layer: u32,
}

/// Where a regular file's contents are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileData {
    /// Entirely in memory (small files).
    Inline(Vec<u8>),
    /// `blocks` whole blocks from `start` in the sink, then `tail` (the
    /// last `size % BLOCK_SIZE` bytes) in memory when it is `Some`; without
    /// a tail the last block in the sink is zero-padded.
    Blocks {
        start: u32,
        blocks: u32,
        size: u64,
        tail: Option<Vec<u8>>,
    },
}

impl FileData {
    /// The file's size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            FileData::Inline(v) => v.len() as u64,
            FileData::Blocks { size, .. } => *size,
        }
    }
}

/// One file of the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    /// Permission bits with setuid, setgid and sticky (`0o7777`).
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u64,
    /// Extended attributes by full name (`user.x`, `security.capability`).
    pub xattrs: Vec<(Box<[u8]>, Box<[u8]>)>,
    pub kind: Kind,
}

impl Inode {
    fn dir(mode: u16) -> Inode {
        Inode {
            mode,
            uid: 0,
            gid: 0,
            mtime: 0,
            xattrs: Vec::new(),
            kind: Kind::Dir(BTreeMap::new()),
        }
    }
}

/// What a layer entry is, after its headers have been read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    /// A regular file whose contents follow.
    File {
        size: u64,
    },
    Symlink(Vec<u8>),
    /// A hard link to another path of the image.
    Hardlink(Vec<u8>),
    CharDevice {
        major: u32,
        minor: u32,
    },
    BlockDevice {
        major: u32,
        minor: u32,
    },
    Fifo,
}

impl EntryKind {
    /// The kind's name in messages.
    pub fn name(&self) -> &'static str {
        match self {
            EntryKind::Dir => "directory",
            EntryKind::File { .. } => "file",
            EntryKind::Symlink(_) => "symlink",
            EntryKind::Hardlink(_) => "hard link",
            EntryKind::CharDevice { .. } => "character device",
            EntryKind::BlockDevice { .. } => "block device",
            EntryKind::Fifo => "FIFO",
        }
    }
}

/// One entry of a layer: its path, kind and metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: Vec<u8>,
    pub kind: EntryKind,
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u64,
    pub xattrs: Vec<(Box<[u8]>, Box<[u8]>)>,
}

/// Where the contents of large files go as they stream past.
pub trait BlockSink {
    /// Writes `len` bytes from `data` starting at a fresh block and returns
    /// that block; the rest of the last block reads as zeros.
    fn append(&mut self, data: &mut dyn Read, len: u64) -> io::Result<u32>;
}

/// A block sink in memory, for tests and small images.
#[derive(Debug, Default)]
pub struct MemorySink {
    pub bytes: Vec<u8>,
}

impl BlockSink for MemorySink {
    fn append(&mut self, data: &mut dyn Read, len: u64) -> io::Result<u32> {
        let start = self.bytes.len() as u64 / BLOCK_SIZE;
        let got = data.take(len).read_to_end(&mut self.bytes)? as u64;
        if got != len {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let padded = self.bytes.len().div_ceil(BLOCK_SIZE as usize) * BLOCK_SIZE as usize;
        self.bytes.resize(padded, 0);
        u32::try_from(start).map_err(|_| io::Error::other("image larger than 16 TiB"))
    }
}

/// The merged filesystem of an image's layers.
#[derive(Debug)]
pub struct Tree {
    inodes: Vec<Inode>,
    entries: u64,
    inline_bytes: u64,
    xattr_bytes: u64,
    limits: Limits,
}

/// A name as an error shows it: a long one (a hostile layer's 4 KiB
/// path) shortened to its start and end, with its length.
pub(super) fn show(path: &[u8]) -> String {
    const KEEP: usize = 96;
    if path.len() <= 2 * KEEP {
        return String::from_utf8_lossy(path).into_owned();
    }
    format!(
        "{}...{} ({} bytes)",
        String::from_utf8_lossy(&path[..KEEP]),
        String::from_utf8_lossy(&path[path.len() - KEEP..]),
        path.len()
    )
}

/// Splits an entry name into its components, refusing `..` and taking an
/// absolute name as relative to the root.
fn components(path: &[u8]) -> Result<Vec<&[u8]>, TreeError> {
    let mut out = Vec::new();
    for c in path.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(TreeError::Traversal { path: show(path) }),
            c if c.len() > 255 => return Err(TreeError::NameTooLong { path: show(path) }),
            c => out.push(c),
        }
    }
    Ok(out)
}

const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";

impl Tree {
    /// An empty image: a root directory, mode 0755, owned by root.
    pub fn new(limits: Limits) -> Tree {
        Tree {
            inodes: vec![Inode::dir(0o755)],
            entries: 0,
            inline_bytes: 0,
            xattr_bytes: 0,
            limits,
        }
    }

    /// The limits this tree enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The inode `ino`.
    pub fn inode(&self, ino: Ino) -> &Inode {
        &self.inodes[ino]
    }

    fn children(&self, ino: Ino) -> Option<&BTreeMap<Box<[u8]>, Dirent>> {
        match &self.inodes[ino].kind {
            Kind::Dir(c) => Some(c),
            _ => None,
        }
    }

    fn children_mut(&mut self, ino: Ino) -> &mut BTreeMap<Box<[u8]>, Dirent> {
        match &mut self.inodes[ino].kind {
            Kind::Dir(c) => c,
            _ => unreachable!("children_mut on a non-directory"),
        }
    }

    /// Resolves `comps` as a chain of directories from the root, following
    /// symlinks inside the image. Missing directories are created (mode
    /// 0755, declared by `layer`) when `create`, else the answer is `None`.
    fn resolve_dir(
        &mut self,
        path: &[u8],
        comps: &[&[u8]],
        create: bool,
        layer: u32,
    ) -> Result<Option<Ino>, TreeError> {
        let mut stack = vec![ROOT];
        let mut queue: VecDeque<Vec<u8>> = comps.iter().map(|c| c.to_vec()).collect();
        let mut hops = 0;
        while let Some(c) = queue.pop_front() {
            match c.as_slice() {
                b"" | b"." => continue,
                b".." => {
                    if stack.len() > 1 {
                        stack.pop();
                    }
                    continue;
                }
                _ => {}
            }
            let cur = *stack.last().unwrap_or(&ROOT);
            let found = self
                .children(cur)
                .and_then(|m| m.get(c.as_slice()))
                .copied();
            let Some(d) = found else {
                if !create {
                    return Ok(None);
                }
                if c.len() > 255 {
                    return Err(TreeError::NameTooLong { path: show(path) });
                }
                let ino = self.push(Inode::dir(0o755));
                self.children_mut(cur)
                    .insert(c.into_boxed_slice(), Dirent { ino, layer });
                stack.push(ino);
                continue;
            };
            match &self.inodes[d.ino].kind {
                Kind::Dir(_) => {
                    // A directory this layer writes into is this layer's
                    // too: its own opaque marker or whiteout further on
                    // hides only what lower layers put there.
                    if create && d.layer < layer {
                        if let Some(e) = self.children_mut(cur).get_mut(c.as_slice()) {
                            e.layer = layer;
                        }
                    }
                    stack.push(d.ino)
                }
                Kind::Symlink(target) => {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(TreeError::SymlinkLoop { path: show(path) });
                    }
                    if target.first() == Some(&b'/') {
                        stack.truncate(1);
                    }
                    let target = target.clone();
                    for t in target.split(|b| *b == b'/').rev() {
                        queue.push_front(t.to_vec());
                    }
                }
                _ => {
                    return Err(TreeError::NotADirectory {
                        path: show(path),
                        component: show(&c),
                    })
                }
            }
        }
        Ok(stack.last().copied())
    }

    fn push(&mut self, inode: Inode) -> Ino {
        self.inodes.push(inode);
        self.inodes.len() - 1
    }

    /// Removes from `dir`'s subtree every name declared below `layer`.
    fn hide_lower(&mut self, dir: Ino, layer: u32) {
        let mut work = vec![dir];
        while let Some(d) = work.pop() {
            let Some(children) = self.children(d) else {
                continue;
            };
            let keep: Vec<Ino> = children
                .values()
                .filter(|e| e.layer >= layer)
                .map(|e| e.ino)
                .collect();
            self.children_mut(d).retain(|_, e| e.layer >= layer);
            work.extend(keep);
        }
    }

    /// Applies one entry of layer number `layer`; a regular file's
    /// contents are read from `data`.
    pub fn apply(
        &mut self,
        entry: Entry,
        layer: u32,
        data: &mut dyn Read,
        sink: &mut dyn BlockSink,
    ) -> Result<(), TreeError> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(TreeError::TooManyEntries {
                limit: self.limits.max_entries,
            });
        }
        // An entry makes its inode and its path's missing parents (at most
        // `max_path / 2` of them): the tree stops once it holds the most.
        if self.inodes.len() as u64 >= self.limits.max_inodes {
            return Err(TreeError::TooManyInodes {
                limit: self.limits.max_inodes,
            });
        }
        let path = entry.path.clone();
        // What an image inode can hold of extended attributes, and what
        // the whole tree may keep of them.
        let mut need = 0;
        for (name, value) in &entry.xattrs {
            need += super::erofs::xattr_need(name, value).unwrap_or(0);
        }
        if need > 0 && super::erofs::XATTR_HEADER + need > super::erofs::MAX_XATTR_BODY {
            return Err(TreeError::XattrsTooLarge {
                path: show(&path),
                bytes: super::erofs::XATTR_HEADER + need,
                max: super::erofs::MAX_XATTR_BODY,
            });
        }
        self.xattr_bytes += entry
            .xattrs
            .iter()
            .map(|(n, v)| (n.len() + v.len()) as u64)
            .sum::<u64>();
        if self.xattr_bytes > self.limits.max_xattr_total {
            return Err(TreeError::TooManyXattrs {
                limit: self.limits.max_xattr_total,
            });
        }
        let comps = components(&path)?;
        let Some((name, parents)) = comps.split_last() else {
            // The root itself: only its metadata can change.
            if entry.kind != EntryKind::Dir {
                return Err(TreeError::RootNotDirectory { path: show(&path) });
            }
            let root = &mut self.inodes[ROOT];
            (root.mode, root.uid, root.gid, root.mtime) =
                (entry.mode, entry.uid, entry.gid, entry.mtime);
            root.xattrs = entry.xattrs;
            return Ok(());
        };
        let name: &[u8] = name;
        // What other runtimes would read differently is refused: a
        // whiteout name on a directory of the path, a whiteout of nothing
        // (`.wh.`), of `.` or `..`, or another name under the reserved
        // `.wh..wh.` prefix than the opaque marker.
        let bad_whiteout = |why| TreeError::BadWhiteout {
            path: show(&path),
            why,
        };
        if parents.iter().any(|c| c.starts_with(WHITEOUT)) {
            return Err(bad_whiteout("a whiteout name as a directory of the path"));
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT) {
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(bad_whiteout("a whiteout of nothing, `.` or `..`"));
            }
            if name != OPAQUE && hidden.starts_with(WHITEOUT) {
                return Err(bad_whiteout(
                    "a reserved `.wh..wh.` name other than the opaque marker",
                ));
            }
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT) {
            let Some(dir) = self.resolve_dir(&path, parents, false, layer)? else {
                return Ok(()); // hides something no lower layer has
            };
            if name == OPAQUE {
                self.hide_lower(dir, layer);
            } else {
                let found = self.children(dir).and_then(|m| m.get(hidden)).copied();
                match found {
                    Some(d) if d.layer < layer => {
                        self.children_mut(dir).remove(hidden);
                    }
                    // Declared again by this layer: only what lies below
                    // it in lower layers goes.
                    Some(d) => self.hide_lower(d.ino, layer),
                    None => {}
                }
            }
            return Ok(());
        }

        let parent = self
            .resolve_dir(&path, parents, true, layer)?
            .unwrap_or(ROOT);
        let existing = self.children(parent).and_then(|m| m.get(name)).copied();
        let inode = |kind| Inode {
            mode: entry.mode & 0o7777,
            uid: entry.uid,
            gid: entry.gid,
            mtime: entry.mtime,
            xattrs: entry.xattrs.clone(),
            kind,
        };
        let ino = match &entry.kind {
            EntryKind::Dir => {
                if let Some(d) =
                    existing.filter(|d| matches!(self.inodes[d.ino].kind, Kind::Dir(_)))
                {
                    let old = &mut self.inodes[d.ino];
                    (old.mode, old.uid, old.gid, old.mtime) =
                        (entry.mode & 0o7777, entry.uid, entry.gid, entry.mtime);
                    old.xattrs = entry.xattrs.clone();
                    d.ino
                } else {
                    self.push(inode(Kind::Dir(BTreeMap::new())))
                }
            }
            EntryKind::File { size } => {
                let contents = self.read_file(&path, *size, data, sink)?;
                self.push(inode(Kind::File(contents)))
            }
            EntryKind::Symlink(target) => self.push(inode(Kind::Symlink(target.clone().into()))),
            EntryKind::CharDevice { major, minor } => self.push(inode(Kind::CharDevice {
                major: *major,
                minor: *minor,
            })),
            EntryKind::BlockDevice { major, minor } => self.push(inode(Kind::BlockDevice {
                major: *major,
                minor: *minor,
            })),
            EntryKind::Fifo => self.push(inode(Kind::Fifo)),
            EntryKind::Hardlink(target) => {
                let tcomps = components(target)?;
                let missing = || TreeError::LinkTargetMissing {
                    path: show(&path),
                    target: show(target),
                };
                let Some((tname, tparents)) = tcomps.split_last() else {
                    return Err(TreeError::LinkToDirectory {
                        path: show(&path),
                        target: show(target),
                    });
                };
                let tdir = self
                    .resolve_dir(target, tparents, false, layer)?
                    .ok_or_else(missing)?;
                let t = self
                    .children(tdir)
                    .and_then(|m| m.get(*tname))
                    .copied()
                    .ok_or_else(missing)?;
                if matches!(self.inodes[t.ino].kind, Kind::Dir(_)) {
                    return Err(TreeError::LinkToDirectory {
                        path: show(&path),
                        target: show(target),
                    });
                }
                t.ino
            }
        };
        self.children_mut(parent)
            .insert(name.into(), Dirent { ino, layer });
        Ok(())
    }

    /// Reads a regular file's `size` bytes: small files and the tails of
    /// large ones into memory while the budget lasts, whole blocks to the
    /// sink.
    fn read_file(
        &mut self,
        path: &[u8],
        size: u64,
        data: &mut dyn Read,
        sink: &mut dyn BlockSink,
    ) -> Result<FileData, TreeError> {
        let short = |e: io::Error| match e.kind() {
            io::ErrorKind::UnexpectedEof => TreeError::ShortFile { path: show(path) },
            _ => TreeError::Read(e),
        };
        let tail_len = size % BLOCK_SIZE;
        let inline_ok =
            tail_len > 0 && self.inline_bytes + tail_len <= self.limits.max_inline_total;
        if size < BLOCK_SIZE && inline_ok {
            let mut v = Vec::with_capacity(size as usize);
            data.take(size).read_to_end(&mut v).map_err(short)?;
            if v.len() as u64 != size {
                return Err(TreeError::ShortFile { path: show(path) });
            }
            self.inline_bytes += size;
            return Ok(FileData::Inline(v));
        }
        if size == 0 {
            return Ok(FileData::Inline(Vec::new()));
        }
        let body = if inline_ok { size - tail_len } else { size };
        let mut tagged = Tagged {
            inner: data,
            failed: false,
        };
        let start = sink.append(&mut tagged, body).map_err(|e| {
            if tagged.failed || e.kind() == io::ErrorKind::UnexpectedEof {
                short(e)
            } else {
                TreeError::Write(e)
            }
        })?;
        let data = tagged.inner;
        let blocks = u32::try_from(body.div_ceil(BLOCK_SIZE))
            .map_err(|_| TreeError::FileTooLarge { path: show(path) })?;
        let tail = if inline_ok {
            let mut v = Vec::with_capacity(tail_len as usize);
            data.take(tail_len).read_to_end(&mut v).map_err(short)?;
            if v.len() as u64 != tail_len {
                return Err(TreeError::ShortFile { path: show(path) });
            }
            self.inline_bytes += tail_len;
            Some(v)
        } else {
            None
        };
        Ok(FileData::Blocks {
            start,
            blocks,
            size,
            tail,
        })
    }

    /// Looks `path` up without following a final symlink (`None` when it
    /// does not exist); for tests and tools.
    pub fn lookup(&mut self, path: &str) -> Option<Ino> {
        let comps = components(path.as_bytes()).ok()?;
        let Some((name, parents)) = comps.split_last() else {
            return Some(ROOT);
        };
        let dir = self
            .resolve_dir(path.as_bytes(), parents, false, 0)
            .ok()??;
        self.children(dir)?.get(*name).map(|d| d.ino)
    }

    /// Walks every name in the image, depth first in name order, calling
    /// `f(path, ino)` (the root is `/`).
    pub fn walk(&self, mut f: impl FnMut(&[u8], Ino)) {
        let mut stack: Vec<(Vec<u8>, Ino)> = vec![(b"/".to_vec(), ROOT)];
        while let Some((path, ino)) = stack.pop() {
            f(&path, ino);
            if let Some(children) = self.children(ino) {
                for (name, d) in children.iter().rev() {
                    let mut p = path.clone();
                    if p.len() > 1 {
                        p.push(b'/');
                    }
                    p.extend_from_slice(name);
                    stack.push((p, d.ino));
                }
            }
        }
    }
}
