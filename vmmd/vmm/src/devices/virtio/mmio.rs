//! The virtio-mmio transport, version 2 (virtio 1.x).

use super::VirtioDevice;
use crate::devices::serial::IrqTrigger;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vm_superio::Trigger;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x5354_4355; // "STCU"
/// Bytes of register space per device (the command line says 4K).
pub const MMIO_SIZE: u64 = 0x1000;
/// The QueueNotify register (the driver writes a queue's index).
pub const QUEUE_NOTIFY: u64 = 0x50;

const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_NEEDS_RESET: u32 = 0x40;

/// A device with its transport state.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
    /// Bumped whenever the device's configuration space changes.
    config_generation: u32,
    irq: IrqTrigger,
    /// Accesses the transport ignored (bad size, offset or state).
    pub ignored: u64,
    /// Starts of the device (DRIVER_OK) refused.
    pub refused: crate::devices::Refusals,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, irq: IrqTrigger) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .filter_map(|s| Queue::new(*s).ok())
            .collect();
        MmioTransport {
            device,
            mem,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
            irq,
            ignored: 0,
            refused: crate::devices::Refusals::new("virtio: the driver's start refused"),
        }
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status = 0;
        self.device.reset();
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// A guest read at `offset` into the device's window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
            return;
        }
        if data.len() != 4 {
            self.ignored += 1;
            data.fill(0);
            return;
        }
        let features = self.device.features();
        let v: u32 = match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR,
            0x10 => match self.device_features_sel {
                0 => features as u32,
                1 => (features >> 32) as u32,
                _ => 0,
            },
            0x34 => self
                .queues
                .get(self.queue_sel as usize)
                .map(|q| u32::from(q.max_size()))
                .unwrap_or(0),
            0x44 => self
                .queues
                .get(self.queue_sel as usize)
                .map(|q| u32::from(q.ready()))
                .unwrap_or(0),
            0x60 if self.status & STATUS_DRIVER_OK != 0 && self.device.raises_own_interrupts() => {
                self.interrupt_status | 1
            }
            0x60 => self.interrupt_status,
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => {
                self.ignored += 1;
                0
            }
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A guest write at `offset` into the device's window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.ignored += 1;
            return;
        };
        let v = u32::from_le_bytes(bytes);
        // Queue setup only while the driver is not yet running the device.
        let setting_up = self.status & STATUS_DRIVER_OK == 0;
        let queue_idle = self
            .queues
            .get(self.queue_sel as usize)
            .is_some_and(|q| !q.ready());
        match offset {
            0x14 => self.device_features_sel = v,
            0x20 if self.status & STATUS_FEATURES_OK == 0 => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => self.ignored += 1,
            },
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 if queue_idle => {
                if let Some(q) = self.queue() {
                    q.set_size(v as u16);
                }
            }
            0x44 if queue_idle || v == 0 => {
                let mem = self.mem.clone();
                if let Some(q) = self.queue() {
                    // A queue only stays ready if its size and addresses are
                    // valid (is_valid checks a queue marked ready).
                    q.set_ready(v == 1);
                    if v == 1 && !q.is_valid(&mem) {
                        q.set_ready(false);
                    }
                }
            }
            0x50 => self.notify(v as usize),
            0x64 => self.interrupt_status &= !v,
            0x70 => {
                if v == 0 {
                    self.reset();
                } else if v & STATUS_FEATURES_OK != 0
                    && self.driver_features & !self.device.features() != 0
                {
                    // The driver accepted features we never offered: refuse.
                    self.status = v & !STATUS_FEATURES_OK;
                } else if v & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0 {
                    self.status = v;
                    if let Err(e) =
                        self.device
                            .activate(self.driver_features, &self.queues, &self.mem)
                    {
                        self.refused.note(&e);
                        self.status |= STATUS_NEEDS_RESET;
                        self.interrupt_status |= 2;
                        let _ = self.irq.trigger();
                    }
                } else {
                    self.status = v;
                }
            }
            0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 if queue_idle && setting_up => {
                if let Some(q) = self.queue() {
                    let (lo, hi) = if offset.is_multiple_of(8) {
                        (Some(v), None)
                    } else {
                        (None, Some(v))
                    };
                    match offset {
                        0x80 | 0x84 => q.set_desc_table_address(lo, hi),
                        0x90 | 0x94 => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            _ => self.ignored += 1,
        }
    }

    /// The driver notified queue `index` (a write to QueueNotify, or the
    /// queue's ioeventfd firing on the device thread).
    pub fn notify(&mut self, index: usize) {
        if self.status & STATUS_DRIVER_OK == 0 {
            self.ignored += 1;
            return;
        }
        if !self.queues.get(index).is_some_and(|q| q.ready()) {
            self.ignored += 1;
            return;
        }
        if self
            .device
            .process_queue(index, &mut self.queues, &self.mem)
        {
            self.interrupt();
        }
    }

    /// The device's host-side descriptor became ready (see
    /// [`VirtioDevice::host_event_fd`]).
    pub fn host_event(&mut self) {
        if self.status & STATUS_DRIVER_OK == 0 {
            // Let the device drain its host side; nothing reaches the guest.
            self.device.process_host_event(&mut [], &self.mem);
            return;
        }
        if self.device.process_host_event(&mut self.queues, &self.mem) {
            self.interrupt();
        }
    }

    fn interrupt(&mut self) {
        self.interrupt_status |= 1;
        let _ = self.irq.trigger();
    }

    /// Gives the device (an empty disk slot) its backing file and tells the
    /// driver: a new configuration generation and a configuration-change
    /// interrupt (virtio-mmio's InterruptStatus bit 1), on which Linux's
    /// virtio-blk reads the new capacity.
    pub fn attach_backing(&mut self, file: std::fs::File, len: u64) -> Result<(), String> {
        self.device.attach_backing(file, len)?;
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt_status |= 2;
        let _ = self.irq.trigger();
        Ok(())
    }

    /// The number of queues the device has.
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// The device behind the transport.
    pub fn device(&self) -> &dyn VirtioDevice {
        &*self.device
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::rng::Rng;
    use vm_memory::{Bytes, GuestAddress};

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const BUF: u64 = 0x4000;

    fn transport() -> (MmioTransport, GuestMemoryMmap) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let rng = Rng::with_source(Box::new(std::io::repeat(0xab)));
        (
            MmioTransport::new(Box::new(rng), mem.clone(), IrqTrigger(None)),
            mem,
        )
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    /// The driver's side of setting up queue 0 with `size` entries.
    fn set_up(t: &mut MmioTransport, size: u32) {
        w(t, 0x70, 1 | 2);
        w(t, 0x24, 1);
        w(t, 0x20, 1); // VERSION_1
        w(t, 0x70, 1 | 2 | STATUS_FEATURES_OK);
        w(t, 0x30, 0);
        w(t, 0x38, size);
        w(t, 0x80, DESC as u32);
        w(t, 0x90, AVAIL as u32);
        w(t, 0xa0, USED as u32);
        w(t, 0x44, 1);
        w(t, 0x70, 1 | 2 | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    }

    /// Puts descriptor `i` (addr, len, flags, next) and makes `head` available.
    fn offer(mem: &GuestMemoryMmap, descs: &[(u64, u32, u16, u16)], head: u16, avail_idx: u16) {
        for (i, (addr, len, flags, next)) in descs.iter().enumerate() {
            let base = DESC + 16 * i as u64;
            mem.write_obj(*addr, GuestAddress(base)).unwrap();
            mem.write_obj(*len, GuestAddress(base + 8)).unwrap();
            mem.write_obj(*flags, GuestAddress(base + 12)).unwrap();
            mem.write_obj(*next, GuestAddress(base + 14)).unwrap();
        }
        mem.write_obj(head, GuestAddress(AVAIL + 4 + 2 * u64::from(avail_idx)))
            .unwrap();
        mem.write_obj(avail_idx + 1, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    #[test]
    fn identifies_itself() {
        let (mut t, _) = transport();
        assert_eq!(r(&mut t, 0x00), MAGIC);
        assert_eq!(r(&mut t, 0x04), 2);
        assert_eq!(r(&mut t, 0x08), 4);
        w(&mut t, 0x14, 1);
        assert_eq!(r(&mut t, 0x10), 1, "VERSION_1 offered");
        assert_eq!(r(&mut t, 0x34), 256);
    }

    #[test]
    fn an_attached_image_is_a_config_change() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let slot = crate::devices::virtio::block::Block::empty_slot("root").unwrap();
        let mut t = MmioTransport::new(Box::new(slot), mem, IrqTrigger(None));
        assert_eq!(r(&mut t, 0xfc), 0);
        let f = std::fs::File::open("/proc/self/exe").unwrap();
        t.attach_backing(f, 4096).unwrap();
        assert_eq!(r(&mut t, 0xfc), 1, "a new config generation");
        assert_eq!(r(&mut t, 0x60) & 2, 2, "configuration-change interrupt");
        assert_eq!(r(&mut t, 0x100), 8, "capacity in sectors");
        w(&mut t, 0x64, 2);
        assert_eq!(r(&mut t, 0x60), 0, "acknowledged");
        let (mut rng, _) = transport();
        let f = std::fs::File::open("/proc/self/exe").unwrap();
        assert!(
            rng.attach_backing(f, 4096).is_err(),
            "only disk slots take one"
        );
        assert_eq!(r(&mut rng, 0xfc), 0);
    }

    #[test]
    fn fills_a_request_and_interrupts() {
        let (mut t, mem) = transport();
        set_up(&mut t, 16);
        assert_eq!(r(&mut t, 0x44), 1, "queue ready");
        offer(&mem, &[(BUF, 64, 2 /* WRITE */, 0)], 0, 0);
        w(&mut t, 0x50, 0);
        let mut got = [0u8; 64];
        mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
        assert_eq!(got, [0xab; 64]);
        let used_idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(used_idx, 1);
        let used_len: u32 = mem.read_obj(GuestAddress(USED + 4 + 4)).unwrap();
        assert_eq!(used_len, 64);
        assert_eq!(r(&mut t, 0x60), 1, "interrupt pending");
        w(&mut t, 0x64, 1);
        assert_eq!(r(&mut t, 0x60), 0, "acknowledged");
    }

    #[test]
    fn hostile_requests_are_bounded_or_ignored() {
        let (mut t, mem) = transport();
        set_up(&mut t, 16);
        // Outside guest memory, a huge length, a loop, a read-only buffer.
        offer(
            &mem,
            &[
                (0xffff_0000, 4096, 2, 0),
                (BUF, u32::MAX, 2, 0),
                (BUF, 16, 2 | 1 /* NEXT */, 2),
                (BUF, 16, 0, 0),
            ],
            0,
            0,
        );
        w(&mut t, 0x50, 0);
        offer(&mem, &[], 1, 1);
        w(&mut t, 0x50, 0);
        offer(&mem, &[], 2, 2);
        w(&mut t, 0x50, 0);
        // A loop: descriptor 2 chains to itself.
        mem.write_obj(2u16, GuestAddress(DESC + 16 * 2 + 14))
            .unwrap();
        offer(&mem, &[], 2, 3);
        w(&mut t, 0x50, 0);
        let used_idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
        assert!(used_idx >= 1);
        // The huge one was capped.
        let lens: Vec<u32> = (0..used_idx)
            .map(|i| {
                mem.read_obj(GuestAddress(USED + 4 + 8 * u64::from(i) + 4))
                    .unwrap()
            })
            .collect();
        assert!(
            lens.iter()
                .all(|l| *l <= crate::devices::virtio::rng::MAX_REQUEST),
            "{lens:?}"
        );
        // Bad register accesses are ignored, not a panic.
        t.write(0x70, &[1, 2]);
        let mut odd = [0u8; 3];
        t.read(0x10, &mut odd);
        w(&mut t, 0x50, 7); // a queue that does not exist
        w(&mut t, 0x30, 9);
        w(&mut t, 0x38, 8);
        assert!(t.ignored >= 3);
    }

    /// The driver's side of setting up queue `q` at `base` (rings 4 KiB apart).
    fn set_up_queue(t: &mut MmioTransport, q: u32, base: u32) {
        w(t, 0x30, q);
        w(t, 0x38, 256);
        w(t, 0x80, base);
        w(t, 0x90, base + 0x1000);
        w(t, 0xa0, base + 0x2000);
        w(t, 0x44, 1);
    }

    #[test]
    fn a_kernel_served_device_starts_on_driver_ok_and_its_interrupts_read_as_used() {
        use crate::devices::virtio::vhost_net::{self, Recorder, VhostNet};
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let dev = VhostNet::new(
            Recorder {
                ring: vhost_net::LINUX_VHOST_NET_FEATURES,
                ..Default::default()
            },
            [2; 6],
        );
        let mut t = MmioTransport::new(Box::new(dev), mem, IrqTrigger(None));
        w(&mut t, 0x70, 1 | 2);
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1); // VERSION_1
        w(&mut t, 0x70, 1 | 2 | STATUS_FEATURES_OK);
        set_up_queue(&mut t, 0, 0x1000);
        // Only one queue ready: the start is refused, the device needs a reset.
        w(&mut t, 0x70, 1 | 2 | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert_ne!(r(&mut t, 0x70) & STATUS_NEEDS_RESET, 0);
        assert_eq!(t.refused.count, 1);
        // Reset, and set up properly.
        w(&mut t, 0x70, 0);
        assert_eq!(r(&mut t, 0x60), 0, "no interrupt while stopped");
        w(&mut t, 0x70, 1 | 2);
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1);
        w(&mut t, 0x70, 1 | 2 | STATUS_FEATURES_OK);
        set_up_queue(&mut t, 0, 0x1000);
        set_up_queue(&mut t, 1, 0x4000);
        w(&mut t, 0x70, 1 | 2 | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert_eq!(r(&mut t, 0x70) & STATUS_NEEDS_RESET, 0);
        assert_eq!(t.refused.count, 1);
        // KVM raises its line: the driver always finds the used-buffer bit.
        assert_eq!(r(&mut t, 0x60), 1);
        w(&mut t, 0x64, 1);
        assert_eq!(r(&mut t, 0x60), 1);
    }

    #[test]
    fn notify_before_driver_ok_does_nothing() {
        let (mut t, mem) = transport();
        offer(&mem, &[(BUF, 64, 2, 0)], 0, 0);
        w(&mut t, 0x50, 0);
        let mut got = [0u8; 4];
        mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
        assert_eq!(got, [0; 4]);
        assert_eq!(r(&mut t, 0x60), 0);
    }
}
