//! How virtio-blk moves data: straight between the disk's file and the
//! guest's buffers, either right away on the device thread (`preadv`,
//! `pwritev`) or through an io_uring that keeps many requests in flight.
//!
//! # Design
//! A request's buffers become an [`Iovecs`], host addresses inside guest
//! memory (which the worker maps for the VM's whole life). With a [`Ring`]
//! each read, write or flush is one submission, tagged with a slot of the
//! in-flight table; the ring's completions signal an eventfd the device
//! thread watches (the disk's host-side descriptor), and the device hands
//! each finished request back to the guest from there. The table has a
//! slot per queue entry, so the ring (twice as many completion entries)
//! can never overflow. A flush is submitted with `IOSQE_IO_DRAIN`: it
//! starts once every earlier request has finished, as virtio asks. A
//! read or write the kernel finished short is completed with `preadv` /
//! `pwritev`. The kernel's io_uring workers (io-wq) are capped at
//! [`MAX_WORKERS`] of each kind, so the VM's worker stays within its
//! cgroup's `pids.max`.
//!
//! Where io_uring cannot be set up (a host that disables it), the device
//! does every request right away on its thread, as before.

use io_uring::{opcode, squeue, types, IoUring};
use std::os::fd::{AsRawFd, RawFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// The most io_uring workers of each kind (bounded, unbounded).
pub const MAX_WORKERS: u32 = 4;

/// A request's buffers as host addresses in guest memory.
#[derive(Debug)]
pub struct Iovecs {
    iovs: Vec<libc::iovec>,
    first: usize,
}

// SAFETY: the pointers are into guest memory, which the worker maps for
// the VM's whole life and which any thread of the worker may access; an
// `Iovecs` is only handed to the kernel.
unsafe impl Send for Iovecs {}

impl Iovecs {
    /// The buffers `segments` (guest address, length) as host ranges; a
    /// buffer across two memory regions becomes two. Err names a buffer
    /// outside guest memory.
    pub fn new(
        segments: impl Iterator<Item = (vm_memory::GuestAddress, u32)>,
        mem: &GuestMemoryMmap,
    ) -> Result<Self, String> {
        let mut iovs = Vec::new();
        for (addr, len) in segments {
            for slice in mem.get_slices(addr, len as usize) {
                let slice =
                    slice.map_err(|_| format!("buffer {:#x} is outside guest memory", addr.0))?;
                iovs.push(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: slice.len(),
                });
            }
        }
        // A chain has at most a queue's worth of buffers, each in at most
        // two regions (below and above the MMIO hole): within IOV_MAX.
        if iovs.len() > 1024 {
            return Err(format!("{} buffers in one request", iovs.len()));
        }
        Ok(Iovecs { iovs, first: 0 })
    }

    fn rest(&self) -> &[libc::iovec] {
        &self.iovs[self.first..]
    }

    /// Steps past `n` bytes moved: whole buffers, then part of one.
    fn advance(&mut self, mut n: usize) {
        while n > 0 && self.first < self.iovs.len() {
            let v = &mut self.iovs[self.first];
            if n >= v.iov_len {
                n -= v.iov_len;
                self.first += 1;
            } else {
                // SAFETY: advancing within the same buffer.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n).cast() };
                v.iov_len -= n;
                n = 0;
            }
        }
    }
}

/// Reads (`write` false) or writes `total` bytes between `fd` at `offset`
/// and `iovs`, of which `done` have moved already (a short completion);
/// `preadv`/`pwritev` until all have.
pub fn move_data(
    fd: RawFd,
    write: bool,
    iovs: &mut Iovecs,
    offset: u64,
    total: u64,
    mut done: u64,
) -> Result<(), String> {
    iovs.advance(done as usize);
    let what = if write { "write" } else { "read" };
    while done < total {
        let at = (offset + done) as libc::off_t;
        let rest = iovs.rest();
        // SAFETY: every iovec points into guest memory this process maps
        // for the VM's life, and the kernel reads or writes only within
        // their lengths.
        let n = unsafe {
            if write {
                libc::pwritev(fd, rest.as_ptr(), rest.len() as libc::c_int, at)
            } else {
                libc::preadv(fd, rest.as_ptr(), rest.len() as libc::c_int, at)
            }
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("{what} at {at}: {e}"));
        }
        if n == 0 {
            return Err(format!("{what} at {at}: end of file"));
        }
        done += n as u64;
        iovs.advance(n as usize);
    }
    Ok(())
}

/// What a request in flight is.
#[derive(Debug)]
pub enum Op {
    Read { iovs: Iovecs, offset: u64, len: u64 },
    Write { iovs: Iovecs, offset: u64, len: u64 },
    Flush,
}

/// A request in flight: what the device needs to hand it back.
#[derive(Debug)]
pub struct InFlight<T> {
    pub op: Op,
    /// The device's own (descriptor head, status byte address, ...).
    pub tag: T,
}

/// A finished request: its tag, and Ok or why it failed.
pub type Done<T> = (T, Op, Result<(), String>);

/// An io_uring for one disk, with its in-flight table.
pub struct Ring<T> {
    ring: IoUring,
    done: EventFd,
    slots: Vec<Option<InFlight<T>>>,
    free: Vec<usize>,
    /// Queued but not yet passed to the kernel.
    unsubmitted: usize,
}

impl<T> std::fmt::Debug for Ring<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("in_flight", &(self.slots.len() - self.free.len()))
            .finish_non_exhaustive()
    }
}

impl<T> Ring<T> {
    /// A ring for up to `depth` requests in flight, its completions
    /// signalled on an eventfd. Err where the host has no io_uring.
    pub fn new(depth: u16) -> std::io::Result<Self> {
        let ring = IoUring::builder().build(u32::from(depth))?;
        let done = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        ring.submitter().register_eventfd(done.as_raw_fd())?;
        let mut limits = [MAX_WORKERS, MAX_WORKERS];
        ring.submitter().register_iowq_max_workers(&mut limits)?;
        Ok(Ring {
            ring,
            done,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..usize::from(depth)).rev().collect(),
            unsubmitted: 0,
        })
    }

    /// The descriptor the device thread watches for completions.
    pub fn event_fd(&self) -> RawFd {
        self.done.as_raw_fd()
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Queues `op` on `fd`; Err gives it back when the table or the ring
    /// is full (the caller does it right away instead).
    pub fn push(&mut self, fd: RawFd, op: Op, tag: T) -> Result<(), (Op, T)> {
        let Some(slot) = self.free.pop() else {
            return Err((op, tag));
        };
        let fd = types::Fd(fd);
        let entry = match &op {
            Op::Read { iovs, offset, .. } => {
                let rest = iovs.rest();
                opcode::Readv::new(fd, rest.as_ptr(), rest.len() as u32)
                    .offset(*offset)
                    .build()
            }
            Op::Write { iovs, offset, .. } => {
                let rest = iovs.rest();
                opcode::Writev::new(fd, rest.as_ptr(), rest.len() as u32)
                    .offset(*offset)
                    .build()
            }
            Op::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .flags(squeue::Flags::IO_DRAIN),
        }
        .user_data(slot as u64);
        // SAFETY: the entry's buffers (the iovec array and what it points
        // to) live in the in-flight table until its completion is reaped.
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.free.push(slot);
            return Err((op, tag));
        }
        self.slots[slot] = Some(InFlight { op, tag });
        self.unsubmitted += 1;
        Ok(())
    }

    /// Passes what was queued to the kernel (one system call).
    pub fn submit(&mut self) -> std::io::Result<()> {
        while self.unsubmitted > 0 {
            match self.ring.submit() {
                Ok(n) => self.unsubmitted = self.unsubmitted.saturating_sub(n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The requests that have finished; a read or write the kernel did
    /// short is finished here with `fd`.
    pub fn reap(&mut self, fd: RawFd) -> Vec<Done<T>> {
        self.reap_with(Some(fd))
    }

    /// [`Ring::reap`]; with `fd` `None`, short transfers are left short
    /// (reported as errors).
    fn reap_with(&mut self, fd: Option<RawFd>) -> Vec<Done<T>> {
        let _ = self.done.read();
        let finished: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        let mut out = Vec::with_capacity(finished.len());
        for (slot, res) in finished {
            let Some(InFlight { mut op, tag }) =
                self.slots.get_mut(slot as usize).and_then(Option::take)
            else {
                continue;
            };
            self.free.push(slot as usize);
            let result = match (res, &mut op, fd) {
                (res, _, _) if res < 0 => Err(std::io::Error::from_raw_os_error(-res).to_string()),
                (_, Op::Flush, _) => Ok(()),
                (res, Op::Read { iovs, offset, len }, Some(fd)) => {
                    move_data(fd, false, iovs, *offset, *len, res as u64)
                }
                (res, Op::Write { iovs, offset, len }, Some(fd)) => {
                    move_data(fd, true, iovs, *offset, *len, res as u64)
                }
                (res, Op::Read { len, .. } | Op::Write { len, .. }, None) => {
                    if res as u64 == *len {
                        Ok(())
                    } else {
                        Err(format!("{res} of {len} bytes moved"))
                    }
                }
            };
            out.push((tag, op, result));
        }
        out
    }

    /// Waits until nothing is in flight and returns what finished.
    pub fn drain_into(&mut self, fd: RawFd) -> Vec<Done<T>> {
        self.wait_all(Some(fd))
    }

    /// Waits until nothing is in flight (the driver reset the device: no
    /// request may touch guest memory afterwards) and drops what finished.
    pub fn drain(&mut self, fd: RawFd) {
        drop(self.wait_all(Some(fd)));
    }

    fn wait_all(&mut self, fd: Option<RawFd>) -> Vec<Done<T>> {
        let _ = self.submit();
        let mut all = self.reap_with(fd);
        while self.in_flight() > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
            all.extend(self.reap_with(fd));
        }
        all
    }
}

impl<T> Drop for Ring<T> {
    /// Waits for what is in flight: the kernel must be done with guest
    /// memory (and the iovec arrays) before they go. Short transfers are
    /// not finished (the disk's file may be closed already).
    fn drop(&mut self) {
        drop(self.wait_all(None));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use vm_memory::{Bytes, GuestAddress};

    fn ring() -> Option<Ring<u32>> {
        match Ring::new(8) {
            Ok(r) => Some(r),
            Err(e) => {
                eprintln!("skipped: io_uring: {e} (the synchronous path is tested instead)");
                None
            }
        }
    }

    #[test]
    fn requests_finish_through_the_ring_and_a_flush_waits_for_them() {
        let Some(mut r) = ring() else { return };
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let file = tempfile::tempfile().unwrap();
        file.set_len(1 << 20).unwrap();
        file.write_all_at(&[7u8; 4096], 8192).unwrap();
        mem.write_slice(&[9u8; 4096], GuestAddress(0x1000)).unwrap();
        let fd = file.as_raw_fd();
        let iovs = |a: u64| Iovecs::new([(GuestAddress(a), 4096)].into_iter(), &mem).unwrap();
        r.push(
            fd,
            Op::Read {
                iovs: iovs(0x4000),
                offset: 8192,
                len: 4096,
            },
            1,
        )
        .unwrap();
        r.push(
            fd,
            Op::Write {
                iovs: iovs(0x1000),
                offset: 0,
                len: 4096,
            },
            2,
        )
        .unwrap();
        r.push(fd, Op::Flush, 3).unwrap();
        assert_eq!(r.in_flight(), 3);
        r.submit().unwrap();
        let mut tags = Vec::new();
        while tags.len() < 3 {
            r.ring.submit_and_wait(1).unwrap();
            for (tag, _, result) in r.reap(fd) {
                result.unwrap();
                tags.push(tag);
            }
        }
        assert_eq!(tags.last(), Some(&3), "the flush finishes last");
        assert_eq!(r.in_flight(), 0);
        let mut got = [0u8; 4096];
        mem.read_slice(&mut got, GuestAddress(0x4000)).unwrap();
        assert_eq!(got, [7u8; 4096]);
        file.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(got, [9u8; 4096]);
    }

    #[test]
    fn a_full_table_gives_the_request_back_and_drain_empties_it() {
        let Some(mut r) = ring() else { return };
        let file = tempfile::tempfile().unwrap();
        let fd = file.as_raw_fd();
        for i in 0..8 {
            r.push(fd, Op::Flush, i).unwrap();
        }
        assert!(matches!(r.push(fd, Op::Flush, 8), Err((Op::Flush, 8))));
        r.drain(fd);
        assert_eq!(r.in_flight(), 0);
        r.push(fd, Op::Flush, 9).unwrap();
    }

    #[test]
    fn a_short_transfer_is_finished_by_hand() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let file = tempfile::tempfile().unwrap();
        let pattern: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        file.write_all_at(&pattern, 0).unwrap();
        let mut iovs = Iovecs::new(
            [(GuestAddress(0x1000), 3000), (GuestAddress(0x3000), 5192)].into_iter(),
            &mem,
        )
        .unwrap();
        // As if the kernel had read the first 1000 bytes already.
        mem.write_slice(&pattern[..1000], GuestAddress(0x1000))
            .unwrap();
        move_data(file.as_raw_fd(), false, &mut iovs, 0, 8192, 1000).unwrap();
        let mut a = vec![0u8; 3000];
        let mut b = vec![0u8; 5192];
        mem.read_slice(&mut a, GuestAddress(0x1000)).unwrap();
        mem.read_slice(&mut b, GuestAddress(0x3000)).unwrap();
        a.extend_from_slice(&b);
        assert!(a == pattern);
        assert!(Iovecs::new([(GuestAddress(0xff00), 0x200)].into_iter(), &mem).is_err());
    }
}
