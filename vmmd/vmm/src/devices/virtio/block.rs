//! virtio-blk: a raw disk image file as the guest's block device.
//!
//! # Design
//! One request queue. Each descriptor chain is parsed by [`parse`] into a
//! [`Request`] before anything touches the file: a readable header of 16
//! bytes, data buffers whose direction matches the request, and a writable
//! status byte last. A read or write is one `preadv`/`pwritev` straight
//! between the file and the guest's buffers (split only where guest memory
//! is, at the MMIO hole), so the worker copies no byte and a request of
//! any size costs it no memory. Reads go through the host's page cache:
//! a root image many VMs share is read from disk once. Flush is
//! `fdatasync`. A writable disk also takes discard (`fallocate` punching
//! a hole: a volume's file gives the space back to the host) and
//! write-zeroes (`FALLOC_FL_ZERO_RANGE`, or a hole where the guest allows
//! unmapping), one range per request. A read-only disk (a root image, which many
//! VMs may share) is opened read-only and offered with `VIRTIO_BLK_F_RO`; a
//! writable one is locked (`flock`) so two VMs never write one volume.
//!
//! Everything in a request is untrusted: a malformed chain, a sector past
//! the end, an unaligned length or a buffer outside guest memory gets
//! `VIRTIO_BLK_S_IOERR` (or is returned unused when it has no status byte),
//! with a rate-limited log line; the device never panics.
//!
//! An *empty slot* ([`Block::empty_slot`]) is a read-only disk of no
//! sectors until vmmd gives it an image ([`VirtioDevice::attach_backing`]):
//! a warm-pool VM boots with one and is handed its workload's root image
//! when it is claimed. The guest learns the new capacity from a
//! configuration-change interrupt.

use super::block_io::{move_data, Done, Iovecs, Op, Ring};
use super::VirtioDevice;
use crate::devices::Refusals;
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const SECTOR_SIZE: u64 = 512;
const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;
/// The most sectors one discard or write-zeroes range may cover (2 GiB).
pub const MAX_ZEROING_SECTORS: u32 = 1 << 22;
/// Ranges per discard or write-zeroes request (what Linux sends with a
/// limit of one: a request per range).
pub const MAX_ZEROING_RANGES: u32 = 1;
/// Discards are aligned to 4 KiB (the host file system's block).
const DISCARD_ALIGNMENT_SECTORS: u32 = 8;
const WRITE_ZEROES_UNMAP: u32 = 1;
/// Entries in the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request the driver may use (at most the queue size
/// less the header and status descriptors).
pub const SEG_MAX: u32 = 128;
/// The largest request (data bytes) the device serves.
pub const MAX_REQUEST_BYTES: u64 = 16 << 20;
/// Bytes of the device id (`VIRTIO_BLK_T_GET_ID`).
pub const ID_BYTES: usize = 20;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// One descriptor of a chain, as the parser sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
    /// Device-writable (`VIRTQ_DESC_F_WRITE`).
    pub write: bool,
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    /// Free the ranges' blocks (the guest no longer needs them).
    Discard,
    /// Make the ranges read as zeros.
    WriteZeroes,
    Unsupported(u32),
}

/// A well-formed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestType,
    pub sector: u64,
    /// Data buffers in order.
    pub data: Vec<Segment>,
    pub data_len: u64,
    pub status: GuestAddress,
}

/// Why a chain is not a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("empty descriptor chain")]
    Empty,
    #[error("request header is writable or shorter than 16 bytes")]
    BadHeader,
    #[error("request header is outside guest memory")]
    HeaderUnreadable,
    #[error("no writable status byte ends the chain")]
    NoStatus,
    #[error("a data buffer has the wrong direction for the request")]
    WrongDirection,
    #[error("request data is larger than {MAX_REQUEST_BYTES} bytes")]
    TooLarge,
}

/// Parses a descriptor chain into a request; nothing is read but the header.
pub fn parse(chain: &[Segment], mem: &GuestMemoryMmap) -> Result<Request, RequestError> {
    let (header, rest) = chain.split_first().ok_or(RequestError::Empty)?;
    if header.write || header.len < 16 {
        return Err(RequestError::BadHeader);
    }
    let kind: u32 = mem
        .read_obj(header.addr)
        .map_err(|_| RequestError::HeaderUnreadable)?;
    let sector: u64 = header
        .addr
        .0
        .checked_add(8)
        .and_then(|a| mem.read_obj(GuestAddress(a)).ok())
        .ok_or(RequestError::HeaderUnreadable)?;
    let (status, data) = rest.split_last().ok_or(RequestError::NoStatus)?;
    if !status.write || status.len < 1 {
        return Err(RequestError::NoStatus);
    }
    let kind = match kind {
        T_IN => RequestType::In,
        T_OUT => RequestType::Out,
        T_FLUSH => RequestType::Flush,
        T_GET_ID => RequestType::GetId,
        T_DISCARD => RequestType::Discard,
        T_WRITE_ZEROES => RequestType::WriteZeroes,
        other => RequestType::Unsupported(other),
    };
    let want_write = match kind {
        RequestType::In | RequestType::GetId => Some(true),
        RequestType::Out | RequestType::Discard | RequestType::WriteZeroes => Some(false),
        RequestType::Flush | RequestType::Unsupported(_) => None,
    };
    let mut data_len: u64 = 0;
    for s in data {
        if want_write.is_some_and(|w| w != s.write) {
            return Err(RequestError::WrongDirection);
        }
        data_len += u64::from(s.len);
        if data_len > MAX_REQUEST_BYTES {
            return Err(RequestError::TooLarge);
        }
    }
    Ok(Request {
        kind,
        sector,
        data: data.to_vec(),
        data_len,
        status: status.addr,
    })
}

/// A disk image as a virtio block device.
pub struct Block {
    /// Reads, writes and flushes in flight (`None`: done right away).
    /// First, so it is dropped (waiting for what is in flight) before the
    /// file is closed.
    ring: Option<Ring<Tag>>,
    file: File,
    read_only: bool,
    capacity_sectors: u64,
    id: [u8; ID_BYTES],
    /// An empty slot still waiting for its image.
    empty: bool,
    /// Requests refused as malformed or failed.
    pub refusals: Refusals,
}

/// Writes a request's status byte at `addr`; returns the bytes the used
/// entry reports: the `n` written into its buffers, and the status byte if
/// it could be written.
fn with_status(mem: &GuestMemoryMmap, addr: GuestAddress, status: u8, n: u32) -> u32 {
    match mem.write_obj(status, addr) {
        Ok(()) => n + 1,
        Err(_) => n,
    }
}

/// What a request in the ring needs to be handed back.
#[derive(Debug, Clone, Copy)]
struct Tag {
    head: u16,
    status: GuestAddress,
    kind: RequestType,
    bytes: u64,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("read_only", &self.read_only)
            .field("capacity_sectors", &self.capacity_sectors)
            .finish_non_exhaustive()
    }
}

/// The bytes and requests every disk of this worker read and wrote for
/// its guest (a worker runs one VM: these are that VM's), for `cup stats`.
pub static IO: IoCounters = IoCounters {
    read_bytes: AtomicU64::new(0),
    write_bytes: AtomicU64::new(0),
    reads: AtomicU64::new(0),
    writes: AtomicU64::new(0),
};

/// See [`IO`].
#[derive(Debug)]
pub struct IoCounters {
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
}

impl IoCounters {
    fn count(&self, kind: RequestType, bytes: u64) {
        let (b, n) = match kind {
            RequestType::In => (&self.read_bytes, &self.reads),
            RequestType::Out => (&self.write_bytes, &self.writes),
            _ => return,
        };
        b.fetch_add(bytes, Ordering::Relaxed);
        n.fetch_add(1, Ordering::Relaxed);
    }

    /// (bytes read, bytes written, reads, writes) so far.
    pub fn totals(&self) -> (u64, u64, u64, u64) {
        (
            self.read_bytes.load(Ordering::Relaxed),
            self.write_bytes.load(Ordering::Relaxed),
            self.reads.load(Ordering::Relaxed),
            self.writes.load(Ordering::Relaxed),
        )
    }
}

/// Errors opening a disk image.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("open disk image {path}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("disk image {path} is in use by another VM (it is locked)")]
    Locked { path: String },
    #[error("disk image {path} is smaller than one sector")]
    Empty { path: String },
}

impl Block {
    /// Opens the disk image at `path` for a VM (vmmd does, and hands the
    /// worker the descriptor): a writable one is locked (`flock`), so two
    /// VMs never write one volume; the lock goes with the descriptor.
    pub fn open_file(path: &Path, read_only: bool) -> Result<File, BlockError> {
        let shown = path.display().to_string();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: shown.clone(),
                source,
            })?;
        if !read_only {
            // SAFETY: flock on a descriptor we own.
            let r = unsafe {
                libc::flock(
                    std::os::fd::AsRawFd::as_raw_fd(&file),
                    libc::LOCK_EX | libc::LOCK_NB,
                )
            };
            if r != 0 {
                return Err(BlockError::Locked { path: shown });
            }
        }
        Ok(file)
    }

    /// A device over the disk image `file`, opened by [`Block::open_file`].
    pub fn from_open(file: File, read_only: bool, id: &str) -> Result<Self, BlockError> {
        let shown = format!("disk {id}");
        let len = file
            .metadata()
            .map_err(|source| BlockError::Open {
                path: shown.clone(),
                source,
            })?
            .len();
        Self::from_file(file, len, read_only, id).ok_or(BlockError::Empty { path: shown })
    }

    /// [`Block::open_file`] then [`Block::from_open`]; `id` names the disk
    /// to the guest (`GET_ID`, 20 bytes).
    pub fn open(path: &Path, read_only: bool, id: &str) -> Result<Self, BlockError> {
        let file = Self::open_file(path, read_only)?;
        Self::from_open(file, read_only, id).map_err(|e| match e {
            BlockError::Empty { .. } => BlockError::Empty {
                path: path.display().to_string(),
            },
            e => e,
        })
    }

    /// A read-only disk with no image yet (see the module docs); reads of
    /// it fail until [`VirtioDevice::attach_backing`] gives it one.
    pub fn empty_slot(id: &str) -> Result<Self, BlockError> {
        let placeholder = File::open("/dev/null").map_err(|source| BlockError::Open {
            path: "/dev/null".into(),
            source,
        })?;
        let mut b =
            Self::from_file(placeholder, SECTOR_SIZE, true, id).ok_or(BlockError::Empty {
                path: "/dev/null".into(),
            })?;
        b.capacity_sectors = 0;
        b.empty = true;
        Ok(b)
    }

    /// A device over an open file of `len` bytes (tests use temporary files).
    pub fn from_file(file: File, len: u64, read_only: bool, id: &str) -> Option<Self> {
        let capacity_sectors = len / SECTOR_SIZE;
        if capacity_sectors == 0 {
            return None;
        }
        let mut id_bytes = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        let ring = match Ring::new(QUEUE_SIZE) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::debug!("virtio-blk: no io_uring ({e}): one request at a time");
                None
            }
        };
        Some(Block {
            file,
            read_only,
            capacity_sectors,
            id: id_bytes,
            empty: false,
            ring,
            refusals: Refusals::new("virtio-blk: request refused"),
        })
    }

    /// Whether requests go through io_uring.
    pub fn has_ring(&self) -> bool {
        self.ring.is_some()
    }

    /// Queues a read, write or flush in the ring; Err gives it back to be
    /// done right away (no ring, a bad request, or the ring full).
    fn submit(&mut self, req: &Request, head: u16, mem: &GuestMemoryMmap) -> Result<(), ()> {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.file);
        let tag = Tag {
            head,
            status: req.status,
            kind: req.kind,
            bytes: req.data_len,
        };
        let op = match req.kind {
            RequestType::In | RequestType::Out => {
                let Some(offset) = self.range(req) else {
                    return Err(());
                };
                if req.kind == RequestType::Out && self.read_only {
                    return Err(());
                }
                let segments = req.data.iter().map(|s| (s.addr, s.len));
                let Ok(iovs) = Iovecs::new(segments, mem) else {
                    return Err(());
                };
                let len = req.data_len;
                match req.kind {
                    RequestType::In => Op::Read { iovs, offset, len },
                    _ => Op::Write { iovs, offset, len },
                }
            }
            RequestType::Flush if !self.read_only => Op::Flush,
            _ => return Err(()),
        };
        let ring = self.ring.as_mut().ok_or(())?;
        ring.push(fd, op, tag).map_err(|_| ())
    }

    fn refuse(&mut self, why: &dyn std::fmt::Display) {
        self.refusals.note(why);
    }

    /// Carries out a parsed request; returns its status and the bytes written
    /// into guest buffers (besides the status byte). Each read and write
    /// done counts in [`IO`].
    pub fn execute(&mut self, req: &Request, mem: &GuestMemoryMmap) -> (u8, u32) {
        let answer = self.carry_out(req, mem);
        if answer.0 == S_OK {
            IO.count(req.kind, req.data_len);
        }
        answer
    }

    fn carry_out(&mut self, req: &Request, mem: &GuestMemoryMmap) -> (u8, u32) {
        match req.kind {
            RequestType::In | RequestType::Out => {
                let Some(offset) = self.range(req) else {
                    self.refuse(&format_args!(
                        "sector {} + {} bytes is past the end or unaligned",
                        req.sector, req.data_len
                    ));
                    return (S_IOERR, 0);
                };
                if req.kind == RequestType::Out && self.read_only {
                    self.refuse(&"write to a read-only disk");
                    return (S_IOERR, 0);
                }
                match self.transfer(req, offset, mem) {
                    Ok(()) if req.kind == RequestType::In => (S_OK, req.data_len as u32),
                    Ok(()) => (S_OK, 0),
                    Err(e) => {
                        self.refuse(&e);
                        (S_IOERR, 0)
                    }
                }
            }
            RequestType::Flush => {
                if self.read_only {
                    return (S_OK, 0);
                }
                match self.file.sync_data() {
                    Ok(()) => (S_OK, 0),
                    Err(e) => {
                        self.refuse(&format_args!("flush: {e}"));
                        (S_IOERR, 0)
                    }
                }
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                if self.read_only {
                    self.refuse(&"discard or write-zeroes on a read-only disk");
                    return (S_UNSUPP, 0);
                }
                match self.zero_ranges(req, mem) {
                    Ok(()) => (S_OK, 0),
                    Err((status, why)) => {
                        self.refuse(&why);
                        (status, 0)
                    }
                }
            }
            RequestType::GetId => {
                let Some(first) = req.data.first() else {
                    return (S_IOERR, 0);
                };
                let n = (first.len as usize).min(ID_BYTES);
                match mem.write_slice(&self.id[..n], first.addr) {
                    Ok(()) => (S_OK, n as u32),
                    Err(_) => (S_IOERR, 0),
                }
            }
            RequestType::Unsupported(t) => {
                self.refuse(&format_args!("unsupported request type {t}"));
                (S_UNSUPP, 0)
            }
        }
    }

    /// The byte offset of a read or write that lies wholly inside the disk.
    fn range(&self, req: &Request) -> Option<u64> {
        if !req.data_len.is_multiple_of(SECTOR_SIZE) {
            return None;
        }
        req.sector
            .checked_add(req.data_len / SECTOR_SIZE)
            .filter(|end| *end <= self.capacity_sectors)
            .map(|_| req.sector * SECTOR_SIZE)
    }

    /// Carries out a discard or write-zeroes request: its data is
    /// [`MAX_ZEROING_RANGES`] at most of `{sector: u64, sectors: u32,
    /// flags: u32}`; each range must lie in the disk and (for discard) carry
    /// no flags, or nothing is done.
    fn zero_ranges(&mut self, req: &Request, mem: &GuestMemoryMmap) -> Result<(), (u8, String)> {
        let mut bytes = Vec::new();
        for seg in &req.data {
            let start = bytes.len();
            bytes.resize(start + seg.len as usize, 0);
            mem.read_slice(&mut bytes[start..], seg.addr).map_err(|_| {
                (
                    S_IOERR,
                    format!("buffer {:#x} is outside guest memory", seg.addr.0),
                )
            })?;
        }
        if bytes.is_empty()
            || bytes.len() % 16 != 0
            || bytes.len() / 16 > MAX_ZEROING_RANGES as usize
        {
            return Err((
                S_IOERR,
                format!(
                    "{} bytes are not 1 to {MAX_ZEROING_RANGES} ranges of 16",
                    bytes.len()
                ),
            ));
        }
        let mut ranges = Vec::new();
        for r in bytes.chunks_exact(16) {
            let sector = u64::from_le_bytes(r[..8].try_into().unwrap_or_default());
            let sectors = u32::from_le_bytes(r[8..12].try_into().unwrap_or_default());
            let flags = u32::from_le_bytes(r[12..16].try_into().unwrap_or_default());
            let allowed = match req.kind {
                RequestType::WriteZeroes => WRITE_ZEROES_UNMAP,
                _ => 0,
            };
            if flags & !allowed != 0 {
                return Err((S_UNSUPP, format!("range flags {flags:#x}")));
            }
            let in_disk = sector
                .checked_add(u64::from(sectors))
                .is_some_and(|end| end <= self.capacity_sectors);
            if !in_disk || sectors > MAX_ZEROING_SECTORS {
                return Err((
                    S_IOERR,
                    format!("sectors {sector} + {sectors} are past the end or too many"),
                ));
            }
            ranges.push((
                sector * SECTOR_SIZE,
                u64::from(sectors) * SECTOR_SIZE,
                flags,
            ));
        }
        for (offset, len, flags) in ranges {
            let mode = match req.kind {
                RequestType::WriteZeroes if flags & WRITE_ZEROES_UNMAP == 0 => {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                }
                _ => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            };
            // SAFETY: fallocate on a descriptor we own, within its size.
            let rc = unsafe {
                libc::fallocate(
                    std::os::fd::AsRawFd::as_raw_fd(&self.file),
                    mode,
                    offset as libc::off_t,
                    len as libc::off_t,
                )
            };
            if rc != 0 {
                return Err((
                    S_IOERR,
                    format!(
                        "fallocate {offset}+{len}: {}",
                        std::io::Error::last_os_error()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// A read or write of the request's buffers at `offset` in one
    /// `preadv`/`pwritev` (more if the file moves less at once), straight
    /// between the file and guest memory.
    fn transfer(&self, req: &Request, offset: u64, mem: &GuestMemoryMmap) -> Result<(), String> {
        let mut iovs = Iovecs::new(req.data.iter().map(|d| (d.addr, d.len)), mem)?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.file);
        move_data(
            fd,
            req.kind == RequestType::Out,
            &mut iovs,
            offset,
            req.data_len,
            0,
        )
    }

    /// The device's configuration space (`struct virtio_blk_config` up to
    /// the write-zeroes fields): capacity, seg_max, and the discard and
    /// write-zeroes limits.
    fn config_bytes(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        c[..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[36..40].copy_from_slice(&MAX_ZEROING_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&MAX_ZEROING_RANGES.to_le_bytes());
        c[44..48].copy_from_slice(&DISCARD_ALIGNMENT_SECTORS.to_le_bytes());
        c[48..52].copy_from_slice(&MAX_ZEROING_SECTORS.to_le_bytes());
        c[52..56].copy_from_slice(&MAX_ZEROING_RANGES.to_le_bytes());
        c[56] = 1; // write_zeroes_may_unmap
        c
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        2
    }

    fn features(&self) -> u64 {
        let by_access = if self.read_only {
            VIRTIO_BLK_F_RO
        } else {
            VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES
        };
        super::VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_FLUSH | by_access
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn attach_backing(&mut self, file: File, len: u64) -> Result<(), String> {
        if !self.empty {
            return Err("the disk already has its image".into());
        }
        let sectors = len / SECTOR_SIZE;
        if sectors == 0 {
            return Err(format!(
                "an image of {len} bytes is smaller than one sector"
            ));
        }
        self.file = file;
        self.capacity_sectors = sectors;
        self.empty = false;
        Ok(())
    }

    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [virtio_queue::Queue],
        mem: &GuestMemoryMmap,
    ) -> bool {
        use virtio_queue::QueueT;
        let Some(queue) = queues.get_mut(index) else {
            return false;
        };
        let mut segments = Vec::with_capacity(usize::from(QUEUE_SIZE));
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            segments.clear();
            segments.extend(chain.map(|d| Segment {
                addr: d.addr(),
                len: d.len(),
                write: d.is_write_only(),
            }));
            let written = match parse(&segments, mem) {
                Ok(req) => {
                    if self.submit(&req, head, mem).is_ok() {
                        continue;
                    }
                    if req.kind == RequestType::Flush {
                        // Done right away, a flush still comes after every
                        // write before it.
                        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.file);
                        if let Some(ring) = &mut self.ring {
                            let done = ring.drain_into(fd);
                            used |= self.hand_back(done, queue, mem);
                        }
                    }
                    let (status, n) = self.execute(&req, mem);
                    with_status(mem, req.status, status, n)
                }
                Err(e) => {
                    self.refuse(&e);
                    // Tell the driver if it left room for a status byte.
                    match segments.last() {
                        Some(s) if s.write && segments.len() > 1 => {
                            u32::from(mem.write_obj(S_IOERR, s.addr).is_ok())
                        }
                        _ => 0,
                    }
                }
            };
            if queue.add_used(mem, head, written).is_err() {
                break;
            }
            used = true;
        }
        if let Some(ring) = &mut self.ring {
            if let Err(e) = ring.submit() {
                self.refusals.note(&format_args!("io_uring submit: {e}"));
            }
        }
        used
    }

    fn host_event_fd(&self) -> Option<std::os::fd::RawFd> {
        self.ring.as_ref().map(|r| r.event_fd())
    }

    fn process_host_event(
        &mut self,
        queues: &mut [virtio_queue::Queue],
        mem: &GuestMemoryMmap,
    ) -> bool {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.file);
        let Some(ring) = &mut self.ring else {
            return false;
        };
        let done = ring.reap(fd);
        match queues.get_mut(0) {
            Some(queue) => self.hand_back(done, queue, mem),
            // The driver is not running the device: nothing goes back.
            None => false,
        }
    }

    fn reset(&mut self) {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.file);
        if let Some(ring) = &mut self.ring {
            ring.drain(fd);
        }
    }
}

impl Block {
    /// Gives finished requests back to the guest: the status byte, the
    /// used entry; true if any went back.
    fn hand_back(
        &mut self,
        done: Vec<Done<Tag>>,
        queue: &mut virtio_queue::Queue,
        mem: &GuestMemoryMmap,
    ) -> bool {
        use virtio_queue::QueueT;
        let mut used = false;
        for (tag, _op, result) in done {
            let (status, n) = match result {
                Ok(()) => {
                    IO.count(tag.kind, tag.bytes);
                    let n = if tag.kind == RequestType::In {
                        tag.bytes as u32
                    } else {
                        0
                    };
                    (S_OK, n)
                }
                Err(e) => {
                    self.refuse(&e);
                    (S_IOERR, 0)
                }
            };
            let written = with_status(mem, tag.status, status, n);
            if queue.add_used(mem, tag.head, written).is_ok() {
                used = true;
            }
        }
        used
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    const HDR: u64 = 0x1000;
    const DATA: u64 = 0x2000;
    const STATUS: u64 = 0x9000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn disk(sectors: u64, read_only: bool) -> (Block, File) {
        let f = tempfile();
        f.set_len(sectors * SECTOR_SIZE).unwrap();
        let clone = f.try_clone().unwrap();
        (
            Block::from_file(f, sectors * SECTOR_SIZE, read_only, "test-disk").unwrap(),
            clone,
        )
    }

    fn tempfile() -> File {
        let dir = std::env::temp_dir();
        let path = dir.join(format!(
            "steelcup-blk-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
        mem.write_obj(kind, GuestAddress(HDR)).unwrap();
        mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    }

    fn seg(addr: u64, len: u32, write: bool) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
            write,
        }
    }

    fn chain(data: &[Segment]) -> Vec<Segment> {
        let mut c = vec![seg(HDR, 16, false)];
        c.extend_from_slice(data);
        c.push(seg(STATUS, 1, true));
        c
    }

    fn run(b: &mut Block, m: &GuestMemoryMmap, c: &[Segment]) -> (u8, u32) {
        let req = parse(c, m).unwrap();
        b.execute(&req, m)
    }

    #[test]
    fn an_empty_slot_refuses_io_until_it_gets_its_image_once() {
        let m = mem();
        let mut b = Block::empty_slot("root").unwrap();
        assert_ne!(b.features() & VIRTIO_BLK_F_RO, 0, "offered read-only");
        let mut cap = [0xffu8; 8];
        b.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 0);
        header(&m, T_IN, 0);
        assert_eq!(
            run(&mut b, &m, &chain(&[seg(DATA, 512, true)])).0,
            S_IOERR,
            "nothing to read before the image comes"
        );
        let f = tempfile();
        f.write_all_at(&[0x42; 1024], 0).unwrap();
        assert!(
            b.attach_backing(f.try_clone().unwrap(), 10).is_err(),
            "under a sector"
        );
        b.attach_backing(f.try_clone().unwrap(), 1024).unwrap();
        b.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 2);
        assert_eq!(
            run(&mut b, &m, &chain(&[seg(DATA, 512, true)])),
            (S_OK, 512)
        );
        let mut got = [0u8; 512];
        m.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, [0x42; 512]);
        header(&m, T_OUT, 0);
        assert_eq!(
            run(&mut b, &m, &chain(&[seg(DATA, 512, false)])).0,
            S_IOERR,
            "still read-only"
        );
        assert!(b.attach_backing(f, 1024).is_err(), "an image is given once");
        let (mut full, _) = disk(4, true);
        assert!(
            full.attach_backing(tempfile(), 1024).is_err(),
            "not an empty slot"
        );
    }

    #[test]
    fn writes_then_reads_back_and_flushes() {
        let m = mem();
        let (mut b, file) = disk(64, false);
        let before = IO.totals();
        m.write_slice(&[0x5a; 1024], GuestAddress(DATA)).unwrap();
        header(&m, T_OUT, 3);
        assert_eq!(
            run(&mut b, &m, &chain(&[seg(DATA, 1024, false)])),
            (S_OK, 0)
        );
        let mut on_disk = [0u8; 1024];
        file.read_exact_at(&mut on_disk, 3 * 512).unwrap();
        assert_eq!(on_disk, [0x5a; 1024]);

        m.write_slice(&[0; 1024], GuestAddress(DATA)).unwrap();
        header(&m, T_IN, 3);
        // Two buffers for one read.
        let c = chain(&[seg(DATA, 512, true), seg(DATA + 512, 512, true)]);
        assert_eq!(run(&mut b, &m, &c), (S_OK, 1024));
        let mut back = [0u8; 1024];
        m.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(back, [0x5a; 1024]);

        header(&m, T_FLUSH, 0);
        assert_eq!(run(&mut b, &m, &chain(&[])), (S_OK, 0));
        // Counted for `cup stats` (other tests count in the same process).
        let after = IO.totals();
        assert!(after.0 >= before.0 + 1024 && after.1 >= before.1 + 1024);
        assert!(after.2 > before.2 && after.3 > before.3);
    }

    #[test]
    fn large_requests_move_straight_between_file_and_guest_memory() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let (mut b, file) = disk(2048, false);
        let pattern: Vec<u8> = (0..(512 << 10)).map(|i| (i % 251) as u8).collect();
        file.write_all_at(&pattern, 0).unwrap();
        header(&m, T_IN, 0);
        let c = chain(&[seg(0x10000, 512 << 10, true)]);
        assert_eq!(run(&mut b, &m, &c), (S_OK, 512 << 10));
        let mut got = vec![0u8; 512 << 10];
        m.read_slice(&mut got, GuestAddress(0x10000)).unwrap();
        assert!(got == pattern);
    }

    #[test]
    fn a_buffer_across_two_memory_regions_is_read_and_written_whole() {
        // Two regions that meet at 0x10000 (as memory meets around the
        // MMIO hole, in a small scale), a buffer across the seam.
        let m = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x10000), 0x10000),
        ])
        .unwrap();
        let (mut b, file) = disk(64, false);
        let pattern: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8).collect();
        m.write_slice(&pattern, GuestAddress(0xf000)).unwrap();
        header(&m, T_OUT, 4);
        let c = chain(&[seg(0xf000, 4096, false), seg(0x10000, 4096, false)]);
        assert_eq!(run(&mut b, &m, &c), (S_OK, 0));
        let mut on_disk = vec![0u8; 8192];
        file.read_exact_at(&mut on_disk, 4 * SECTOR_SIZE).unwrap();
        assert!(on_disk == pattern);
        header(&m, T_IN, 4);
        let c = chain(&[seg(0xe800, 8192, true)]);
        assert_eq!(run(&mut b, &m, &c), (S_OK, 8192));
        let mut got = vec![0u8; 8192];
        m.read_slice(&mut got, GuestAddress(0xe800)).unwrap();
        assert!(got == pattern);
    }

    /// A request chain (header, data, status) offered on a 16-entry queue
    /// at 0xa000 (descriptors), 0xb000 (available), 0xc000 (used).
    fn queue_with(m: &GuestMemoryMmap, requests: &[(u32, u64, u64)]) -> virtio_queue::Queue {
        use virtio_queue::QueueT;
        let mut q = virtio_queue::Queue::new(QUEUE_SIZE).unwrap();
        q.set_size(16);
        q.set_desc_table_address(Some(0xa000), Some(0));
        q.set_avail_ring_address(Some(0xb000), Some(0));
        q.set_used_ring_address(Some(0xc000), Some(0));
        q.set_ready(true);
        for (i, (kind, sector, data)) in requests.iter().enumerate() {
            let hdr = 0xd000 + 16 * i as u64;
            m.write_obj(*kind, GuestAddress(hdr)).unwrap();
            m.write_obj(*sector, GuestAddress(hdr + 8)).unwrap();
            let descs = [
                (hdr, 16u32, 1u16),
                (*data, 512, 1 | if *kind == T_IN { 2 } else { 0 }),
                (0xe000 + i as u64, 1, 2),
            ];
            for (j, (addr, len, flags)) in descs.iter().enumerate() {
                let idx = (3 * i + j) as u16;
                let base = 0xa000 + 16 * u64::from(idx);
                m.write_obj(*addr, GuestAddress(base)).unwrap();
                m.write_obj(*len, GuestAddress(base + 8)).unwrap();
                m.write_obj(*flags, GuestAddress(base + 12)).unwrap();
                m.write_obj(idx + 1, GuestAddress(base + 14)).unwrap();
            }
            m.write_obj((3 * i) as u16, GuestAddress(0xb004 + 2 * i as u64))
                .unwrap();
        }
        m.write_obj(requests.len() as u16, GuestAddress(0xb002))
            .unwrap();
        q
    }

    #[test]
    fn requests_stay_in_flight_until_the_ring_finishes_them() {
        let m = mem();
        let (b, file) = disk(64, false);
        if !b.has_ring() {
            eprintln!("skipped: no io_uring here (the requests are done right away, tested above)");
            return;
        }
        let mut b = b;
        file.write_all_at(&[0x33; 512], 512).unwrap();
        m.write_slice(&[0x44; 512], GuestAddress(0x2000)).unwrap();
        let mut queues = vec![queue_with(
            &m,
            &[(T_IN, 1, 0x3000), (T_OUT, 5, 0x2000), (T_FLUSH, 0, 0x4000)],
        )];
        // Nothing handed back yet: all three are in the ring.
        assert!(!b.process_queue(0, &mut queues, &m));
        let used_idx = |m: &GuestMemoryMmap| -> u16 { m.read_obj(GuestAddress(0xc002)).unwrap() };
        let fd = b.host_event_fd().unwrap();
        let mut handed = 0;
        for _ in 0..100 {
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll on one valid pollfd.
            unsafe { libc::poll(&mut p, 1, 100) };
            if b.process_host_event(&mut queues, &m) {
                handed = used_idx(&m);
            }
            if handed == 3 {
                break;
            }
        }
        assert_eq!(handed, 3, "all three came back");
        let status: Vec<u8> = (0..3)
            .map(|i| m.read_obj(GuestAddress(0xe000 + i)).unwrap())
            .collect();
        assert_eq!(status, [S_OK; 3]);
        let mut got = [0u8; 512];
        m.read_slice(&mut got, GuestAddress(0x3000)).unwrap();
        assert_eq!(got, [0x33; 512]);
        file.read_exact_at(&mut got, 5 * 512).unwrap();
        assert_eq!(got, [0x44; 512]);
        // The used entry of the read says 512 bytes and the status byte.
        let lens: Vec<(u32, u32)> = (0..3u64)
            .map(|i| {
                (
                    m.read_obj(GuestAddress(0xc004 + 8 * i)).unwrap(),
                    m.read_obj(GuestAddress(0xc008 + 8 * i)).unwrap(),
                )
            })
            .collect();
        assert!(lens.contains(&(0, 513)), "{lens:?}");
        assert_eq!(lens.last().map(|l| l.0), Some(6), "the flush last");
    }

    /// A discard or write-zeroes range at DATA.
    fn range(m: &GuestMemoryMmap, sector: u64, sectors: u32, flags: u32) {
        m.write_obj(sector, GuestAddress(DATA)).unwrap();
        m.write_obj(sectors, GuestAddress(DATA + 8)).unwrap();
        m.write_obj(flags, GuestAddress(DATA + 12)).unwrap();
    }

    #[test]
    fn discard_and_write_zeroes_free_and_zero_the_range() {
        use std::os::unix::fs::MetadataExt;
        let m = mem();
        let (mut b, file) = disk(2048, false);
        assert_ne!(b.features() & VIRTIO_BLK_F_DISCARD, 0);
        assert_ne!(b.features() & VIRTIO_BLK_F_WRITE_ZEROES, 0);
        let mut cfg = [0u8; 4];
        b.read_config(40, &mut cfg);
        assert_eq!(
            u32::from_le_bytes(cfg),
            MAX_ZEROING_RANGES,
            "max_discard_seg"
        );
        file.write_all_at(&vec![0x5a; 1 << 20], 0).unwrap();
        file.sync_all().unwrap();
        let blocks = file.metadata().unwrap().blocks();
        // Discard the first 512 KiB: it reads as zeros, and the file's
        // blocks go back to the host.
        header(&m, T_DISCARD, 0);
        range(&m, 0, 1024, 0);
        assert_eq!(run(&mut b, &m, &chain(&[seg(DATA, 16, false)])), (S_OK, 0));
        let mut got = vec![1u8; 512 << 10];
        file.read_exact_at(&mut got, 0).unwrap();
        assert!(got.iter().all(|x| *x == 0));
        assert!(
            file.metadata().unwrap().blocks() < blocks,
            "a hole was punched"
        );
        // Write zeroes without unmapping.
        header(&m, T_WRITE_ZEROES, 1024);
        range(&m, 1024, 8, 0);
        assert_eq!(run(&mut b, &m, &chain(&[seg(DATA, 16, false)])), (S_OK, 0));
        let mut four = [1u8; 4096];
        file.read_exact_at(&mut four, 1024 * SECTOR_SIZE).unwrap();
        assert_eq!(four, [0; 4096]);
        let mut after = [0u8; 1];
        file.read_exact_at(&mut after, 1032 * SECTOR_SIZE).unwrap();
        assert_eq!(after, [0x5a], "nothing past the range");
    }

    #[test]
    fn bad_discards_change_nothing() {
        let m = mem();
        let (mut b, file) = disk(64, false);
        file.write_all_at(&[0x5a; 4096], 0).unwrap();
        let discard = |b: &mut Block, sector, sectors, flags, len| {
            header(&m, T_DISCARD, 0);
            range(&m, sector, sectors, flags);
            run(b, &m, &chain(&[seg(DATA, len, false)])).0
        };
        // Past the end, the unmap flag on a discard, two ranges, half a range.
        assert_eq!(discard(&mut b, 60, 8, 0, 16), S_IOERR);
        assert_eq!(discard(&mut b, u64::MAX, 8, 0, 16), S_IOERR);
        assert_eq!(discard(&mut b, 0, 8, 1, 16), S_UNSUPP);
        assert_eq!(discard(&mut b, 0, 8, 0, 32), S_IOERR);
        assert_eq!(discard(&mut b, 0, 8, 0, 12), S_IOERR);
        let mut got = [0u8; 4096];
        file.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(got, [0x5a; 4096]);
        // A read-only disk offers neither and refuses both.
        let (mut ro, _) = disk(64, true);
        assert_eq!(
            ro.features() & (VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES),
            0
        );
        assert_eq!(discard(&mut ro, 0, 8, 0, 16), S_UNSUPP);
    }

    #[test]
    fn read_only_disks_refuse_writes_and_say_so() {
        let m = mem();
        let (mut b, _) = disk(8, true);
        assert_ne!(b.features() & VIRTIO_BLK_F_RO, 0);
        header(&m, T_OUT, 0);
        assert_eq!(
            run(&mut b, &m, &chain(&[seg(DATA, 512, false)])),
            (S_IOERR, 0)
        );
        header(&m, T_FLUSH, 0);
        assert_eq!(run(&mut b, &m, &chain(&[])), (S_OK, 0));
    }

    #[test]
    fn out_of_range_and_unaligned_requests_fail() {
        let m = mem();
        let (mut b, _) = disk(8, false);
        for (sector, len) in [(8, 512), (7, 1024), (u64::MAX, 512), (0, 100)] {
            header(&m, T_IN, sector);
            let c = chain(&[seg(DATA, len, true)]);
            assert_eq!(run(&mut b, &m, &c).0, S_IOERR, "sector {sector} len {len}");
        }
        // A buffer outside guest memory.
        header(&m, T_IN, 0);
        let c = chain(&[seg(0xffff_f000, 512, true)]);
        assert_eq!(run(&mut b, &m, &c).0, S_IOERR);
        header(&m, 77, 0);
        assert_eq!(run(&mut b, &m, &chain(&[])).0, S_UNSUPP);
        assert!(b.refusals.count >= 6);
    }

    #[test]
    fn malformed_chains_do_not_parse() {
        let m = mem();
        header(&m, T_IN, 0);
        assert_eq!(parse(&[], &m), Err(RequestError::Empty));
        assert_eq!(
            parse(&[seg(HDR, 8, false), seg(STATUS, 1, true)], &m),
            Err(RequestError::BadHeader)
        );
        assert_eq!(
            parse(&[seg(HDR, 16, true), seg(STATUS, 1, true)], &m),
            Err(RequestError::BadHeader)
        );
        assert_eq!(
            parse(&[seg(0xffff_fff0, 16, false), seg(STATUS, 1, true)], &m),
            Err(RequestError::HeaderUnreadable)
        );
        assert_eq!(
            parse(&[seg(HDR, 16, false)], &m),
            Err(RequestError::NoStatus)
        );
        assert_eq!(
            parse(&[seg(HDR, 16, false), seg(STATUS, 1, false)], &m),
            Err(RequestError::NoStatus)
        );
        // A read whose buffer the device may not write.
        assert_eq!(
            parse(&chain(&[seg(DATA, 512, false)]), &m),
            Err(RequestError::WrongDirection)
        );
        let huge: Vec<Segment> = (0..40).map(|_| seg(DATA, 1 << 20, true)).collect();
        assert_eq!(parse(&chain(&huge), &m), Err(RequestError::TooLarge));
        let big = [seg(DATA, u32::MAX, true), seg(DATA, u32::MAX, true)];
        assert_eq!(parse(&chain(&big), &m), Err(RequestError::TooLarge));
    }

    #[test]
    fn get_id_and_config_space() {
        let m = mem();
        let (mut b, _) = disk(16, false);
        header(&m, T_GET_ID, 0);
        assert_eq!(run(&mut b, &m, &chain(&[seg(DATA, 20, true)])), (S_OK, 20));
        let mut id = [0u8; 20];
        m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert!(id.starts_with(b"test-disk\0"));
        let mut cap = [0u8; 8];
        b.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 16);
        let mut seg_max = [0u8; 4];
        b.read_config(12, &mut seg_max);
        assert_eq!(u32::from_le_bytes(seg_max), SEG_MAX);
        let mut past = [0xffu8; 4];
        b.read_config(u64::MAX, &mut past);
        assert_eq!(past, [0; 4]);
    }

    #[test]
    fn a_writable_disk_is_locked_against_a_second_vm() {
        let path = std::env::temp_dir().join(format!("steelcup-lock-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let first = Block::open(&path, false, "a").unwrap();
        assert!(matches!(
            Block::open(&path, false, "b"),
            Err(BlockError::Locked { .. })
        ));
        // A read-only open (a shared root image) needs no lock.
        Block::open(&path, true, "c").unwrap();
        drop(first);
        Block::open(&path, false, "d").unwrap();
        std::fs::remove_file(&path).unwrap();
    }
}
