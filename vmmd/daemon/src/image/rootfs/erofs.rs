//! Writing a [`Tree`] as an uncompressed erofs image.
//!
//! # Design
//! The image is laid out in one pass over the layers and one over the
//! tree: block 0 holds the superblock (at byte 1024); file contents are
//! appended block by block from block 1 on as the layers stream past (the
//! [`BlockSink`]); when the tree is complete, large directories and long
//! symlinks are appended the same way, and the metadata area follows: every
//! inode in the 64-byte extended format (32-bit ids, 64-bit sizes, mtimes),
//! its extended attributes inline, and the last partial block of its data
//! (`FLAT_INLINE`, "tail packing") right after it, never crossing a block
//! boundary. The root directory comes first, so its nid is 0.
//!
//! The format is the kernel's `fs/erofs/erofs_fs.h`; everything written is
//! read by Linux 5.4 and later (no compression, no chunked files, no shared
//! xattrs, no superblock checksum). The same tree gives the same bytes.

use super::tree::{BlockSink, FileData, Ino, Kind, Tree, BLOCK_SIZE, ROOT};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;

const MAGIC: u32 = 0xE0F5_E1E2;
const SUPERBLOCK_OFFSET: u64 = 1024;
const INODE_SIZE: usize = 64;
const DIRENT_SIZE: usize = 12;
pub(super) const XATTR_HEADER: usize = 12;
const LAYOUT_PLAIN: u16 = 0;
const LAYOUT_INLINE: u16 = 2;
const BS: usize = BLOCK_SIZE as usize;
/// The most xattr bytes one inode keeps (inline, beside a 64-byte inode).
pub(super) const MAX_XATTR_BODY: usize = 2048;

/// File types in directory entries.
const FT_REG: u8 = 1;
const FT_DIR: u8 = 2;
const FT_CHR: u8 = 3;
const FT_BLK: u8 = 4;
const FT_FIFO: u8 = 5;
const FT_SYMLINK: u8 = 7;

/// What the finished image holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub inodes: u64,
    pub blocks: u64,
    /// Extended attributes left out: names erofs has no prefix for, or
    /// more than fit beside an inode.
    pub xattrs_dropped: u64,
}

/// An erofs image being written to a file.
#[derive(Debug)]
pub struct ErofsWriter {
    file: File,
    next_block: u32,
    buf: Vec<u8>,
}

impl BlockSink for ErofsWriter {
    fn append(&mut self, data: &mut dyn Read, len: u64) -> io::Result<u32> {
        let start = self.next_block;
        let mut offset = u64::from(start) * BLOCK_SIZE;
        let mut left = len;
        while left > 0 {
            let want = left.min(self.buf.len() as u64) as usize;
            let n = data.read(&mut self.buf[..want])?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.file.write_all_at(&self.buf[..n], offset)?;
            offset += n as u64;
            left -= n as u64;
        }
        let blocks = len.div_ceil(BLOCK_SIZE);
        self.next_block = u32::try_from(u64::from(start) + blocks)
            .map_err(|_| io::Error::other("image larger than 16 TiB"))?;
        Ok(start)
    }
}

/// The erofs prefix index and the rest of an xattr name; `None` for names
/// erofs cannot store.
fn xattr_prefix(name: &[u8]) -> Option<(u8, &[u8])> {
    if name == b"system.posix_acl_access" {
        return Some((2, b""));
    }
    if name == b"system.posix_acl_default" {
        return Some((3, b""));
    }
    for (prefix, index) in [(&b"user."[..], 1u8), (b"trusted.", 4), (b"security.", 6)] {
        if let Some(rest) = name.strip_prefix(prefix) {
            if !rest.is_empty() && rest.len() <= 255 {
                return Some((index, rest));
            }
        }
    }
    None
}

/// The bytes an xattr takes in an inode's xattr area; `None` for a name
/// erofs cannot store (it is left out).
pub(super) fn xattr_need(name: &[u8], value: &[u8]) -> Option<usize> {
    let (_, suffix) = xattr_prefix(name)?;
    Some((4 + suffix.len() + value.len()).next_multiple_of(4))
}

/// The inline xattr area of an inode (header and entries), empty when it
/// has none.
fn xattr_body(xattrs: &[(Box<[u8]>, Box<[u8]>)], dropped: &mut u64) -> Vec<u8> {
    let mut entries = Vec::new();
    for (name, value) in xattrs {
        let Some((index, suffix)) = xattr_prefix(name) else {
            *dropped += 1;
            continue;
        };
        let need = (4 + suffix.len() + value.len()).next_multiple_of(4);
        if XATTR_HEADER + entries.len() + need > MAX_XATTR_BODY {
            *dropped += 1;
            continue;
        }
        entries.push(suffix.len() as u8);
        entries.push(index);
        entries.extend_from_slice(&(value.len() as u16).to_le_bytes());
        entries.extend_from_slice(suffix);
        entries.extend_from_slice(value);
        entries.resize(entries.len().next_multiple_of(4), 0);
    }
    if entries.is_empty() {
        return entries;
    }
    let mut body = vec![0u8; XATTR_HEADER];
    body.extend(entries);
    body
}

/// How one inode is stored.
#[derive(Debug)]
struct Plan {
    ino: Ino,
    nlink: u32,
    parent: Ino,
    xattrs: Vec<u8>,
    layout: u16,
    size: u64,
    /// `raw_blkaddr` or the device number.
    iu: u32,
    /// Data packed after the inode (for directories, filled in once every
    /// nid is known).
    inline: Vec<u8>,
    inline_len: usize,
    /// A directory's blocks: names per block; the blocks before the last
    /// (or all of them when nothing is inline) go at `iu`.
    dir_blocks: Vec<Vec<(Box<[u8]>, Ino)>>,
    pos: u64,
}

impl ErofsWriter {
    /// Starts an image in `file` (which should be empty).
    pub fn new(file: File) -> ErofsWriter {
        ErofsWriter {
            file,
            next_block: 1,
            buf: vec![0; 256 << 10],
        }
    }

    fn append_bytes(&mut self, bytes: &[u8]) -> io::Result<u32> {
        self.append(&mut &bytes[..], bytes.len() as u64)
    }

    /// Lays out and writes the tree's metadata and the superblock; the
    /// image is complete when this returns.
    pub fn finish(mut self, tree: &Tree, build_time: u64) -> io::Result<Stats> {
        // Every reachable inode once, breadth first from the root.
        let mut order: Vec<Plan> = Vec::new();
        let mut index: HashMap<Ino, usize> = HashMap::new();
        let mut queue = std::collections::VecDeque::from([(ROOT, ROOT)]);
        let mut dropped = 0;
        while let Some((ino, parent)) = queue.pop_front() {
            if let Some(&i) = index.get(&ino) {
                order[i].nlink += 1;
                continue;
            }
            index.insert(ino, order.len());
            let inode = tree.inode(ino);
            let mut nlink = 1;
            if let Kind::Dir(children) = &inode.kind {
                nlink = 2;
                for d in children.values() {
                    if matches!(tree.inode(d.ino).kind, Kind::Dir(_)) {
                        nlink += 1;
                    }
                    queue.push_back((d.ino, ino));
                }
            }
            let xattrs = xattr_body(&inode.xattrs, &mut dropped);
            order.push(Plan {
                ino,
                nlink,
                parent,
                xattrs,
                layout: LAYOUT_PLAIN,
                size: 0,
                iu: 0,
                inline: Vec::new(),
                inline_len: 0,
                dir_blocks: Vec::new(),
                pos: 0,
            });
        }

        // Data layout: what is inline, what goes to blocks.
        let room = |p: &Plan| BS - INODE_SIZE - p.xattrs.len().min(BS - INODE_SIZE);
        for p in order.iter_mut() {
            let inode = tree.inode(p.ino);
            match &inode.kind {
                Kind::File(FileData::Inline(v)) => {
                    p.size = v.len() as u64;
                    if v.is_empty() {
                    } else if v.len() <= room(p) {
                        (p.layout, p.inline, p.inline_len) = (LAYOUT_INLINE, v.clone(), v.len());
                    } else {
                        p.iu = self.append_bytes(v)?;
                    }
                }
                Kind::File(FileData::Blocks {
                    start,
                    blocks,
                    size,
                    tail,
                }) => {
                    p.size = *size;
                    p.iu = *start;
                    match tail {
                        None => {}
                        Some(t) if t.len() <= room(p) => {
                            (p.layout, p.inline, p.inline_len) =
                                (LAYOUT_INLINE, t.clone(), t.len());
                        }
                        Some(t) => {
                            // Too many xattrs to pack the tail: copy the
                            // blocks so the tail can follow them.
                            let mut body = vec![0u8; *blocks as usize * BS];
                            self.file
                                .read_exact_at(&mut body, u64::from(*start) * BLOCK_SIZE)?;
                            body.extend_from_slice(t);
                            p.iu = self.append_bytes(&body)?;
                        }
                    }
                }
                Kind::Symlink(target) => {
                    p.size = target.len() as u64;
                    if target.len() <= room(p) {
                        (p.layout, p.inline, p.inline_len) =
                            (LAYOUT_INLINE, target.to_vec(), target.len());
                    } else {
                        p.iu = self.append_bytes(target)?;
                    }
                }
                Kind::CharDevice { major, minor } | Kind::BlockDevice { major, minor } => {
                    p.iu = (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12);
                }
                Kind::Fifo => {}
                Kind::Dir(children) => {
                    let mut names: Vec<(Box<[u8]>, Ino)> =
                        children.iter().map(|(n, d)| (n.clone(), d.ino)).collect();
                    names.push((b".".to_vec().into(), p.ino));
                    names.push((b"..".to_vec().into(), p.parent));
                    names.sort_by(|a, b| a.0.cmp(&b.0));
                    let mut blocks: Vec<Vec<(Box<[u8]>, Ino)>> = vec![Vec::new()];
                    let mut used = 0;
                    for (name, ino) in names {
                        let need = DIRENT_SIZE + name.len();
                        if used + need > BS {
                            blocks.push(Vec::new());
                            used = 0;
                        }
                        used += need;
                        blocks.last_mut().expect("one block").push((name, ino));
                    }
                    p.size = (blocks.len() as u64 - 1) * BLOCK_SIZE + used as u64;
                    let full = if used < BS && used <= room(p) {
                        (p.layout, p.inline_len) = (LAYOUT_INLINE, used);
                        blocks.len() - 1
                    } else {
                        blocks.len()
                    };
                    if full > 0 {
                        // Reserved now, written once nids are known.
                        p.iu = self.next_block;
                        self.next_block += full as u32;
                    }
                    p.dir_blocks = blocks;
                }
            }
        }

        // Metadata positions: 32-byte slots, nothing crossing a block.
        let mut pos = 0u64;
        for p in order.iter_mut() {
            pos = pos.next_multiple_of(32);
            let need = (INODE_SIZE + p.xattrs.len() + p.inline_len) as u64;
            if pos % BLOCK_SIZE + need > BLOCK_SIZE {
                pos = pos.next_multiple_of(BLOCK_SIZE);
            }
            p.pos = pos;
            pos += need;
        }
        let nids: HashMap<Ino, u64> = order.iter().map(|p| (p.ino, p.pos / 32)).collect();
        let nid = |ino: Ino| nids[&ino];
        let file_type = |ino: Ino| match tree.inode(ino).kind {
            Kind::Dir(_) => FT_DIR,
            Kind::File(_) => FT_REG,
            Kind::Symlink(_) => FT_SYMLINK,
            Kind::CharDevice { .. } => FT_CHR,
            Kind::BlockDevice { .. } => FT_BLK,
            Kind::Fifo => FT_FIFO,
        };

        // Directory blocks.
        let mut dir_data: Vec<(usize, Vec<u8>)> = Vec::new();
        for (i, p) in order.iter().enumerate() {
            if p.dir_blocks.is_empty() {
                continue;
            }
            let mut bytes = Vec::with_capacity(p.dir_blocks.len() * BS);
            for (b, block) in p.dir_blocks.iter().enumerate() {
                let start = bytes.len();
                let mut nameoff = block.len() * DIRENT_SIZE;
                for (name, ino) in block {
                    bytes.extend_from_slice(&nid(*ino).to_le_bytes());
                    bytes.extend_from_slice(&(nameoff as u16).to_le_bytes());
                    bytes.push(file_type(*ino));
                    bytes.push(0);
                    nameoff += name.len();
                }
                for (name, _) in block {
                    bytes.extend_from_slice(name);
                }
                if b + 1 < p.dir_blocks.len() {
                    bytes.resize(start + BS, 0);
                }
            }
            dir_data.push((i, bytes));
        }
        for (i, bytes) in dir_data {
            let p = &mut order[i];
            let inline_from = if p.layout == LAYOUT_INLINE {
                bytes.len() - p.inline_len
            } else {
                bytes.len()
            };
            if inline_from > 0 {
                self.file
                    .write_all_at(&bytes[..inline_from], u64::from(p.iu) * BLOCK_SIZE)?;
            }
            p.inline = bytes[inline_from..].to_vec();
        }

        // The metadata area.
        let meta_blkaddr = self.next_block;
        let mut meta = vec![0u8; pos.next_multiple_of(BLOCK_SIZE) as usize];
        for (n, p) in order.iter().enumerate() {
            let inode = tree.inode(p.ino);
            let type_bits: u16 = match inode.kind {
                Kind::Dir(_) => 0o040000,
                Kind::File(_) => 0o100000,
                Kind::Symlink(_) => 0o120000,
                Kind::CharDevice { .. } => 0o020000,
                Kind::BlockDevice { .. } => 0o060000,
                Kind::Fifo => 0o010000,
            };
            let icount: u16 = if p.xattrs.is_empty() {
                0
            } else {
                ((p.xattrs.len() - XATTR_HEADER) / 4 + 1) as u16
            };
            let at = p.pos as usize;
            let out = &mut meta[at..at + INODE_SIZE];
            out[0..2].copy_from_slice(&(1 | (p.layout << 1)).to_le_bytes());
            out[2..4].copy_from_slice(&icount.to_le_bytes());
            out[4..6].copy_from_slice(&(type_bits | inode.mode).to_le_bytes());
            out[8..16].copy_from_slice(&p.size.to_le_bytes());
            out[16..20].copy_from_slice(&p.iu.to_le_bytes());
            out[20..24].copy_from_slice(&(n as u32 + 1).to_le_bytes());
            out[24..28].copy_from_slice(&inode.uid.to_le_bytes());
            out[28..32].copy_from_slice(&inode.gid.to_le_bytes());
            out[32..40].copy_from_slice(&inode.mtime.to_le_bytes());
            out[44..48].copy_from_slice(&p.nlink.to_le_bytes());
            let mut at = at + INODE_SIZE;
            meta[at..at + p.xattrs.len()].copy_from_slice(&p.xattrs);
            at += p.xattrs.len();
            meta[at..at + p.inline.len()].copy_from_slice(&p.inline);
        }
        self.file
            .write_all_at(&meta, u64::from(meta_blkaddr) * BLOCK_SIZE)?;
        let blocks = u64::from(meta_blkaddr) + meta.len() as u64 / BLOCK_SIZE;

        let mut sb = [0u8; 128];
        sb[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        sb[12] = 12; // blkszbits: 4096-byte blocks
        sb[14..16].copy_from_slice(&(nid(ROOT) as u16).to_le_bytes());
        sb[16..24].copy_from_slice(&(order.len() as u64).to_le_bytes());
        sb[24..32].copy_from_slice(&build_time.to_le_bytes());
        sb[36..40].copy_from_slice(&(blocks as u32).to_le_bytes());
        sb[40..44].copy_from_slice(&meta_blkaddr.to_le_bytes());
        sb[64..72].copy_from_slice(b"steelcup");
        self.file.write_all_at(&sb, SUPERBLOCK_OFFSET)?;
        self.file.set_len(blocks * BLOCK_SIZE)?;
        Ok(Stats {
            inodes: order.len() as u64,
            blocks,
            xattrs_dropped: dropped,
        })
    }
}
