//! virtio devices on the MMIO transport (virtio 1.x, declared to the guest
//! on its command line as `virtio_mmio.device=SIZE@ADDR:IRQ`).
//!
//! # Design
//! [`mmio::MmioTransport`] owns the registers, the queues (rust-vmm
//! `virtio-queue`) and the interrupt; a [`VirtioDevice`] only says what it is
//! and processes its queues. Everything the guest writes is untrusted: a
//! register access of the wrong size, an unknown offset or a queue set up
//! wrongly is ignored; descriptor chains are walked by `virtio-queue`, which
//! bounds them; each request's size is capped by the device.

pub mod block;
pub mod block_io;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod vhost_net;
pub mod vsock;

use std::sync::{Arc, Mutex, MutexGuard};
use vm_memory::GuestMemoryMmap;

/// A transport shared by the vCPU threads (register accesses) and the
/// device thread (queue notifications and host-side events).
pub type SharedTransport = Arc<Mutex<mmio::MmioTransport>>;

/// Locks a transport; a panic on another thread (impossible with
/// panic=abort) would not make its state unusable.
pub fn lock(t: &SharedTransport) -> MutexGuard<'_, mmio::MmioTransport> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

/// `VIRTIO_F_VERSION_1`: the modern interface, required on MMIO version 2.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Copies the bytes of a device's configuration space `config` at `offset`
/// into `data`; bytes past its end (or an offset that overflows) read as 0.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o).copied())
            .unwrap_or(0);
    }
}

/// Pops every available chain of `queue`, lets `serve` handle it (returning
/// the bytes it wrote into the chain's buffers) and hands it back to the
/// guest; stops if the used ring cannot be written. True if any chain was
/// returned (the guest gets an interrupt).
pub fn serve_chains<'m>(
    queue: &mut virtio_queue::Queue,
    mem: &'m GuestMemoryMmap,
    mut serve: impl FnMut(virtio_queue::DescriptorChain<&'m GuestMemoryMmap>) -> u32,
) -> bool {
    use virtio_queue::QueueT;
    let mut used = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let written = serve(chain);
        if queue.add_used(mem, head, written).is_err() {
            break;
        }
        used = true;
    }
    used
}

/// Gathers the readable bytes of `chain` into `out` (at most `max`).
/// Err if the chain has a writable buffer, points outside guest memory or
/// holds more than `max` bytes.
pub fn read_chain(
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    out: &mut Vec<u8>,
    max: usize,
) -> Result<(), &'static str> {
    use vm_memory::Bytes;
    out.clear();
    for d in chain {
        if d.is_write_only() {
            return Err("a writable buffer in a chain the device only reads");
        }
        let start = out.len();
        let end = start
            .checked_add(d.len() as usize)
            .filter(|e| *e <= max)
            .ok_or("a chain larger than the device accepts")?;
        out.resize(end, 0);
        mem.read_slice(&mut out[start..], d.addr())
            .map_err(|_| "a buffer outside guest memory")?;
    }
    Ok(())
}

/// Writes `header` then `payload` across writable buffers `bufs`; returns
/// the bytes written (short if the buffers are, or one is unwritable).
pub fn write_chain(
    mem: &GuestMemoryMmap,
    bufs: &[(vm_memory::GuestAddress, u32)],
    header: &[u8],
    payload: &[u8],
) -> u32 {
    use vm_memory::Bytes;
    let mut written = 0u32;
    let mut src = header.iter().chain(payload.iter()).copied();
    let mut chunk = Vec::new();
    for (addr, len) in bufs {
        chunk.clear();
        chunk.extend(src.by_ref().take(*len as usize));
        if chunk.is_empty() {
            break;
        }
        if mem.write_slice(&chunk, *addr).is_err() {
            break;
        }
        written += chunk.len() as u32;
    }
    written
}

/// A device behind a transport.
pub trait VirtioDevice: Send {
    /// The virtio device id (4: entropy source).
    fn device_type(&self) -> u32;
    /// Feature bits the device offers.
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    /// Maximum size of each queue; their count is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the device-specific configuration space (zeros by default).
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    /// Handles the available buffers of queue `index` (of `queues`, all the
    /// device's queues); true if any was used (the guest gets an interrupt).
    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [virtio_queue::Queue],
        mem: &GuestMemoryMmap,
    ) -> bool;
    /// A descriptor the device thread watches for the device's host side
    /// (vsock's own epoll set); `None` for devices driven only by the guest.
    fn host_event_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// The host side is ready; `queues` is empty while the driver is not
    /// running the device. True if the guest should get an interrupt.
    fn process_host_event(
        &mut self,
        _queues: &mut [virtio_queue::Queue],
        _mem: &GuestMemoryMmap,
    ) -> bool {
        false
    }
    /// The device's interrupts are raised by the host kernel straight
    /// through its irqfd (vhost), not by the transport: the transport then
    /// reads InterruptStatus with the used-buffer bit set while the driver
    /// runs the device.
    fn raises_own_interrupts(&self) -> bool {
        false
    }
    /// The driver set DRIVER_OK with features `acked` and `queues` set up:
    /// a device the kernel serves hands them over now. An error leaves the
    /// device needing a reset (the guest's driver sees it fail).
    fn activate(
        &mut self,
        _acked: u64,
        _queues: &[virtio_queue::Queue],
        _mem: &GuestMemoryMmap,
    ) -> Result<(), String> {
        Ok(())
    }
    /// The driver reset the device (status 0).
    fn reset(&mut self) {}
    /// Gives an empty disk slot its image (a warm VM handed its workload's
    /// root image); the transport then tells the guest its configuration
    /// changed. Only empty virtio-blk slots accept one.
    fn attach_backing(&mut self, _file: std::fs::File, _len: u64) -> Result<(), String> {
        Err(format!(
            "device type {} has no empty disk slot",
            self.device_type()
        ))
    }
}
