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

pub mod mmio;
pub mod rng;

use vm_memory::GuestMemoryMmap;

/// `VIRTIO_F_VERSION_1`: the modern interface, required on MMIO version 2.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

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
    /// Handles the available buffers of queue `index`; true if any was used
    /// (the guest gets an interrupt).
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut virtio_queue::Queue,
        mem: &GuestMemoryMmap,
    ) -> bool;
}
