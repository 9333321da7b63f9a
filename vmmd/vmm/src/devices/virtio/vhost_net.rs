//! virtio-net on vhost-net: the host kernel moves the frames.
//!
//! # Design
//! The guest's two queues are served by the host kernel's vhost-net
//! worker (a thread of the worker's own, in its cgroup), which copies
//! frames between the rings and the tap directly: no frame crosses this
//! process. The guest's queue notifications are the queues' ioeventfds,
//! handed to vhost as its kick descriptors, so a transmit never leaves
//! the kernel; vhost signals the device's irqfd when it has used buffers,
//! which KVM raises as the device's interrupt line. Because KVM, not the
//! transport, raises that line, the transport's InterruptStatus reads
//! with the "used buffer" bit always set while the device runs (see
//! [`VirtioDevice::raises_own_interrupts`]): Linux's virtio-mmio driver
//! then looks at both queues, and a look that finds nothing is harmless.
//!
//! Offloads are negotiated honestly. The device offers checksum offload
//! and TSO both ways, ECN with TSO, mergeable receive buffers, and the
//! ring features vhost-net says it has (event index, indirect
//! descriptors). Once the driver is running, vhost gets the acked ring
//! features, and the tap the receive offloads the guest acked
//! (`TUNSETOFFLOAD`): a guest that takes TSO gets 64 KiB segments, one
//! that does not gets MTU-sized frames with their checksums filled in.
//! The guest's own TSO frames go to the tap as they are (a tap takes GSO
//! frames whatever its offloads).
//!
//! What the guest controls (ring addresses and sizes, acked features) is
//! checked here before any of it reaches the kernel: rings must lie in
//! guest memory, sizes must be powers of two no larger than offered, and
//! features must have been offered. A guest that breaks a rule gets a
//! device that needs a reset, nothing more. vhost-net bounds the work it
//! does per wake-up, and its thread runs in the worker's cgroup, under the
//! VM's CPU quota: a guest can't make the host spin.
//!
//! The ioctls the device makes after the seccomp filter is on (features,
//! rings, backend, tap offloads) are listed in [`runtime_ioctls`]; opening
//! `/dev/vhost-net`, `VHOST_SET_OWNER`, the memory table and the kick and
//! call descriptors are done while the VM is built.

use super::net::VNET_HDR_LEN;
use super::VirtioDevice;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use vhost::vhost_kern::vhost_binding as vb;
use vhost::vhost_kern::VhostKernBackend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// virtio-net feature bits.
pub mod features {
    pub const CSUM: u64 = 1 << 0;
    pub const GUEST_CSUM: u64 = 1 << 1;
    pub const MAC: u64 = 1 << 5;
    pub const GUEST_TSO4: u64 = 1 << 7;
    pub const GUEST_TSO6: u64 = 1 << 8;
    pub const GUEST_ECN: u64 = 1 << 9;
    pub const HOST_TSO4: u64 = 1 << 11;
    pub const HOST_TSO6: u64 = 1 << 12;
    pub const HOST_ECN: u64 = 1 << 13;
    pub const MRG_RXBUF: u64 = 1 << 15;
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    pub const VERSION_1: u64 = 1 << 32;
}
use features as f;

/// The offloads the device offers whatever vhost says (the tap does them).
const OFFLOADS: u64 = f::CSUM
    | f::GUEST_CSUM
    | f::GUEST_TSO4
    | f::GUEST_TSO6
    | f::GUEST_ECN
    | f::HOST_TSO4
    | f::HOST_TSO6
    | f::HOST_ECN;
/// The features vhost-net itself must carry out, offered if it has them.
const VHOST_RING: u64 = f::MRG_RXBUF | f::RING_INDIRECT_DESC | f::RING_EVENT_IDX | f::VERSION_1;

const QUEUE_SIZE: u16 = 256;
const QUEUES: usize = 2;

/// `TUNSETOFFLOAD` and its flags.
pub const TUNSETOFFLOAD: u64 = 0x4004_54d0;
const TUN_F_CSUM: u32 = 0x01;
const TUN_F_TSO4: u32 = 0x02;
const TUN_F_TSO6: u32 = 0x04;
const TUN_F_TSO_ECN: u32 = 0x08;

/// The ioctls the device makes while the VM runs (the driver starting or
/// resetting it), for the seccomp filter, each with why.
pub fn runtime_ioctls() -> [(u64, &'static str); 6] {
    [
        (
            vb::VHOST_SET_FEATURES() as u64,
            "VHOST_SET_FEATURES: the ring features the guest acked",
        ),
        (
            vb::VHOST_SET_VRING_NUM() as u64,
            "VHOST_SET_VRING_NUM: each queue's size, set by the guest",
        ),
        (
            vb::VHOST_SET_VRING_ADDR() as u64,
            "VHOST_SET_VRING_ADDR: each queue's rings, checked to lie in guest memory",
        ),
        (
            vb::VHOST_SET_VRING_BASE() as u64,
            "VHOST_SET_VRING_BASE: each queue starts at entry 0",
        ),
        (
            vb::VHOST_NET_SET_BACKEND() as u64,
            "VHOST_NET_SET_BACKEND: the tap on (driver running) and off (reset)",
        ),
        (
            TUNSETOFFLOAD,
            "TUNSETOFFLOAD: the receive offloads the guest acked, on the VM's tap",
        ),
    ]
}

/// Why vhost-net could not be used (the caller falls back to the
/// userspace device, and says why).
#[derive(Debug, thiserror::Error)]
pub enum VhostError {
    #[error("/dev/vhost-net: {0}")]
    Open(#[source] std::io::Error),
    #[error("{what}: {source}")]
    Ioctl {
        what: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("vhost-net lacks VIRTIO_F_VERSION_1")]
    NoVersion1,
}

/// What the device does to the kernel, so that the guest-facing logic is
/// the same whether the kernel is real (vhost-net and a tap) or a checker
/// (the fuzz targets and unit tests, which may lack `/dev/vhost-net`).
pub trait Datapath: Send {
    /// The ring features the kernel side carries out.
    fn ring_features(&self) -> u64;
    fn set_features(&mut self, features: u64) -> Result<(), String>;
    fn set_vring(&mut self, index: usize, ring: &VringConfigData) -> Result<(), String>;
    /// The backend on (`true`) or off for queue `index`.
    fn set_backend(&mut self, index: usize, on: bool) -> Result<(), String>;
    /// The tap's receive offloads (`TUN_F_*`).
    fn set_offloads(&mut self, tun_flags: u32) -> Result<(), String>;
}

/// The real thing: a vhost-net instance owned by this process and the tap.
pub struct Kernel {
    vhost: vhost::vhost_kern::net::Net<Arc<GuestMemoryMmap>>,
    tap: File,
    features: u64,
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernel")
            .field("vhost", &self.vhost.as_raw_fd())
            .field("tap", &self.tap)
            .field("features", &format_args!("{:#x}", self.features))
            .finish()
    }
}

impl Kernel {
    /// Opens `/dev/vhost-net`, becomes its owner, gives it guest memory
    /// and, for each queue, its kick (`kicks`) and call (`call`)
    /// descriptors. Called while the VM is built (before seccomp).
    pub fn open(
        tap: File,
        mem: &GuestMemoryMmap,
        kicks: &[EventFd],
        call: &EventFd,
    ) -> Result<Self, VhostError> {
        let err = |what| move |source| VhostError::Ioctl { what, source };
        let vhost =
            vhost::vhost_kern::net::Net::new(Arc::new(mem.clone())).map_err(|e| match e {
                vhost::Error::VhostOpen(io) => VhostError::Open(io),
                other => VhostError::Ioctl {
                    what: "open",
                    source: other,
                },
            })?;
        vhost.set_owner().map_err(err("VHOST_SET_OWNER"))?;
        let features = vhost.get_features().map_err(err("VHOST_GET_FEATURES"))?;
        if features & f::VERSION_1 == 0 {
            return Err(VhostError::NoVersion1);
        }
        let regions: Vec<VhostUserMemoryRegionInfo> = mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.start_addr().0,
                memory_size: r.len(),
                userspace_addr: r.as_ptr() as u64,
                mmap_offset: 0,
                mmap_handle: -1,
            })
            .collect();
        vhost
            .set_mem_table(&regions)
            .map_err(err("VHOST_SET_MEM_TABLE"))?;
        for (i, kick) in kicks.iter().enumerate() {
            vhost
                .set_vring_kick(i, kick)
                .map_err(err("VHOST_SET_VRING_KICK"))?;
            vhost
                .set_vring_call(i, call)
                .map_err(err("VHOST_SET_VRING_CALL"))?;
        }
        Ok(Kernel {
            vhost,
            tap,
            features,
        })
    }
}

impl Datapath for Kernel {
    fn ring_features(&self) -> u64 {
        self.features
    }

    fn set_features(&mut self, features: u64) -> Result<(), String> {
        self.vhost
            .set_features(features)
            .map_err(|e| format!("VHOST_SET_FEATURES: {e}"))
    }

    fn set_vring(&mut self, index: usize, ring: &VringConfigData) -> Result<(), String> {
        let what = |w: &'static str| move |e: vhost::Error| format!("queue {index}: {w}: {e}");
        if !self.vhost.is_valid(ring) {
            return Err(format!("queue {index}: rings outside guest memory"));
        }
        self.vhost
            .set_vring_num(index, ring.queue_size)
            .map_err(what("VHOST_SET_VRING_NUM"))?;
        self.vhost
            .set_vring_addr(index, ring)
            .map_err(what("VHOST_SET_VRING_ADDR"))?;
        self.vhost
            .set_vring_base(index, 0)
            .map_err(what("VHOST_SET_VRING_BASE"))
    }

    fn set_backend(&mut self, index: usize, on: bool) -> Result<(), String> {
        use vhost::net::VhostNet;
        self.vhost
            .set_backend(index, on.then_some(&self.tap))
            .map_err(|e| format!("queue {index}: VHOST_NET_SET_BACKEND: {e}"))
    }

    fn set_offloads(&mut self, tun_flags: u32) -> Result<(), String> {
        // SAFETY: TUNSETOFFLOAD takes an integer argument on a tap we own.
        let rc = unsafe {
            libc::ioctl(
                self.tap.as_raw_fd(),
                TUNSETOFFLOAD as libc::c_ulong,
                tun_flags as libc::c_ulong,
            )
        };
        if rc < 0 {
            return Err(format!(
                "TUNSETOFFLOAD {tun_flags:#x}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }
}

/// The network device on a kernel datapath.
pub struct VhostNet<D: Datapath> {
    datapath: D,
    mac: [u8; 6],
    offered: u64,
    /// The backend is attached (the driver is running the device).
    running: bool,
}

impl<D: Datapath> std::fmt::Debug for VhostNet<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostNet")
            .field("mac", &self.mac)
            .field("offered", &format_args!("{:#x}", self.offered))
            .field("running", &self.running)
            .finish_non_exhaustive()
    }
}

impl<D: Datapath> VhostNet<D> {
    pub fn new(datapath: D, mac: [u8; 6]) -> Self {
        let offered = f::MAC | OFFLOADS | (datapath.ring_features() & VHOST_RING);
        VhostNet {
            datapath,
            mac,
            offered,
            running: false,
        }
    }

    /// The datapath (tests look at what it was told).
    pub fn datapath(&self) -> &D {
        &self.datapath
    }

    fn stop(&mut self) {
        if self.running {
            for i in 0..QUEUES {
                if let Err(e) = self.datapath.set_backend(i, false) {
                    tracing::warn!("virtio-net (vhost): {e}");
                }
            }
            self.running = false;
        }
    }
}

/// The tap's receive offloads for the guest's acked features: what the
/// guest can take from the network.
pub fn tun_offloads(acked: u64) -> u32 {
    if acked & f::GUEST_CSUM == 0 {
        // TSO frames need checksum offload; without it, nothing.
        return 0;
    }
    let mut flags = TUN_F_CSUM;
    if acked & f::GUEST_TSO4 != 0 {
        flags |= TUN_F_TSO4;
    }
    if acked & f::GUEST_TSO6 != 0 {
        flags |= TUN_F_TSO6;
    }
    if acked & f::GUEST_ECN != 0 && flags & (TUN_F_TSO4 | TUN_F_TSO6) != 0 {
        flags |= TUN_F_TSO_ECN;
    }
    flags
}

impl<D: Datapath> VirtioDevice for VhostNet<D> {
    fn device_type(&self) -> u32 {
        1
    }

    fn features(&self) -> u64 {
        self.offered
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.mac, offset, data);
    }

    fn process_queue(&mut self, _: usize, _: &mut [Queue], _: &GuestMemoryMmap) -> bool {
        // The kernel serves the queues; a notify that reaches here (a
        // QueueNotify value no ioeventfd matched) has nothing to do.
        false
    }

    fn raises_own_interrupts(&self) -> bool {
        true
    }

    fn activate(
        &mut self,
        acked: u64,
        queues: &[Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<(), String> {
        self.stop();
        if acked & !self.offered != 0 {
            return Err(format!(
                "the driver acked features {:#x} never offered",
                acked & !self.offered
            ));
        }
        if queues.len() != QUEUES || queues.iter().any(|q| !q.ready()) {
            return Err("the driver runs the device without both queues ready".into());
        }
        // The header vhost and the tap agree on: 12 bytes with VERSION_1
        // or mergeable buffers (what the tap was opened with).
        if acked & (f::VERSION_1 | f::MRG_RXBUF) == 0 {
            return Err(format!(
                "a legacy {}-byte header: the device is virtio 1 only",
                VNET_HDR_LEN - 2
            ));
        }
        self.datapath.set_features(acked & VHOST_RING)?;
        for (i, q) in queues.iter().enumerate() {
            let ring = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: q.desc_table(),
                used_ring_addr: q.used_ring(),
                avail_ring_addr: q.avail_ring(),
                log_addr: None,
            };
            check_ring(&ring, mem).map_err(|e| format!("queue {i}: {e}"))?;
            self.datapath.set_vring(i, &ring)?;
        }
        self.datapath.set_offloads(tun_offloads(acked))?;
        for i in 0..QUEUES {
            self.datapath.set_backend(i, true)?;
            self.running = true;
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.stop();
    }
}

/// A ring the guest set up: a power-of-two size no larger than offered,
/// and its three parts inside guest memory (vhost would refuse it too;
/// checked here so the rule does not rest on one implementation).
pub fn check_ring(ring: &VringConfigData, mem: &GuestMemoryMmap) -> Result<(), String> {
    let n = u64::from(ring.queue_size);
    if n == 0 || !n.is_power_of_two() || ring.queue_size > ring.queue_max_size {
        return Err(format!(
            "size {} is not a power of two up to {}",
            ring.queue_size, ring.queue_max_size
        ));
    }
    for (what, addr, len) in [
        ("descriptor table", ring.desc_table_addr, 16 * n),
        ("available ring", ring.avail_ring_addr, 6 + 2 * n),
        ("used ring", ring.used_ring_addr, 6 + 8 * n),
    ] {
        let inside = addr
            .checked_add(len - 1)
            .is_some_and(|last| mem.address_in_range(GuestAddress(last)))
            && mem.address_in_range(GuestAddress(addr));
        if !inside {
            return Err(format!(
                "{what} at {addr:#x} ({len} bytes) outside guest memory"
            ));
        }
    }
    Ok(())
}

/// A datapath that only records and checks what it is told: the fuzz
/// targets and unit tests drive the device's guest-facing logic with it.
#[derive(Default)]
pub struct Recorder {
    /// Ring features it claims (as vhost-net's would be).
    pub ring: u64,
    pub features: Option<u64>,
    pub rings: Vec<(usize, VringConfigData)>,
    pub backends: Vec<(usize, bool)>,
    pub offloads: Option<u32>,
    /// Fail `set_backend` (as the kernel would for a tap gone bad).
    pub fail_backend: bool,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("features", &self.features)
            .field("rings", &self.rings.len())
            .field("backends", &self.backends)
            .field("offloads", &self.offloads)
            .finish_non_exhaustive()
    }
}

impl Datapath for Recorder {
    fn ring_features(&self) -> u64 {
        self.ring
    }
    fn set_features(&mut self, features: u64) -> Result<(), String> {
        self.features = Some(features);
        Ok(())
    }
    fn set_vring(&mut self, index: usize, ring: &VringConfigData) -> Result<(), String> {
        self.rings.push((index, *ring));
        Ok(())
    }
    fn set_backend(&mut self, index: usize, on: bool) -> Result<(), String> {
        if self.fail_backend {
            return Err("backend refused".into());
        }
        self.backends.push((index, on));
        Ok(())
    }
    fn set_offloads(&mut self, tun_flags: u32) -> Result<(), String> {
        self.offloads = Some(tun_flags);
        Ok(())
    }
}

/// Ring features vhost-net reports on Linux 6.1 (for [`Recorder`]s that
/// stand in for it).
pub const LINUX_VHOST_NET_FEATURES: u64 = f::MRG_RXBUF
    | f::RING_INDIRECT_DESC
    | f::RING_EVENT_IDX
    | f::VERSION_1
    | (1 << 27) // VHOST_NET_F_VIRTIO_NET_HDR / ANY_LAYOUT
    | (1 << 33); // ACCESS_PLATFORM

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20000)]).unwrap()
    }

    fn device() -> VhostNet<Recorder> {
        VhostNet::new(
            Recorder {
                ring: LINUX_VHOST_NET_FEATURES,
                ..Default::default()
            },
            super::super::net::mac_for(3),
        )
    }

    fn ready_queues(mem: &GuestMemoryMmap, size: u16, desc: u64) -> Vec<Queue> {
        (0..2u64)
            .map(|i| {
                let mut q = Queue::new(QUEUE_SIZE).unwrap();
                q.set_size(size);
                let base = desc + i * 0x4000;
                q.set_desc_table_address(Some(base as u32), Some((base >> 32) as u32));
                q.set_avail_ring_address(Some(base as u32 + 0x1000), Some((base >> 32) as u32));
                q.set_used_ring_address(Some(base as u32 + 0x2000), Some((base >> 32) as u32));
                q.set_ready(true);
                let _ = mem;
                q
            })
            .collect()
    }

    #[test]
    fn offers_offloads_and_what_vhost_carries_out() {
        let d = device();
        let offered = d.features();
        for bit in [
            f::CSUM,
            f::GUEST_CSUM,
            f::GUEST_TSO4,
            f::GUEST_TSO6,
            f::HOST_TSO4,
            f::HOST_TSO6,
            f::MRG_RXBUF,
            f::RING_EVENT_IDX,
            f::VERSION_1,
            f::MAC,
        ] {
            assert_ne!(offered & bit, 0, "bit {bit:#x} offered");
        }
        assert_eq!(offered & (1 << 27), 0, "vhost's own header is not offered");
        assert_eq!(offered & (1 << 33), 0, "no IOMMU platform");
        // A vhost without event index: not offered.
        let plain = VhostNet::new(
            Recorder {
                ring: f::VERSION_1,
                ..Default::default()
            },
            [0; 6],
        );
        assert_eq!(plain.features() & (f::RING_EVENT_IDX | f::MRG_RXBUF), 0);
    }

    #[test]
    fn activation_hands_the_kernel_checked_rings_and_acked_offloads() {
        let m = mem();
        let mut d = device();
        let acked = f::VERSION_1 | f::MAC | f::CSUM | f::GUEST_CSUM | f::GUEST_TSO4 | f::MRG_RXBUF;
        d.activate(acked, &ready_queues(&m, 256, 0x8000), &m)
            .unwrap();
        let r = d.datapath();
        assert_eq!(r.features, Some(f::VERSION_1 | f::MRG_RXBUF));
        assert_eq!(r.offloads, Some(TUN_F_CSUM | TUN_F_TSO4));
        assert_eq!(r.rings.len(), 2);
        assert_eq!(r.rings[1].1.desc_table_addr, 0xc000);
        assert_eq!(r.rings[1].1.used_ring_addr, 0xe000);
        assert_eq!(r.backends, vec![(0, true), (1, true)]);
        // A reset detaches the tap.
        d.reset();
        assert_eq!(&d.datapath().backends[2..], &[(0, false), (1, false)]);
    }

    #[test]
    fn hostile_setups_never_reach_the_kernel() {
        let m = mem();
        let acked = f::VERSION_1;
        // Rings past the end of memory, a size that is not a power of two,
        // features never offered, a legacy header, a queue not ready.
        let mut d = device();
        assert!(d
            .activate(acked, &ready_queues(&m, 256, 0x1e000), &m)
            .unwrap_err()
            .contains("outside guest memory"));
        // (virtio-queue keeps a queue's size a power of two; the check
        // holds without it.)
        let ring = |size, desc| VringConfigData {
            queue_max_size: 256,
            queue_size: size,
            flags: 0,
            desc_table_addr: desc,
            used_ring_addr: 0x2000,
            avail_ring_addr: 0x1000,
            log_addr: None,
        };
        assert!(check_ring(&ring(100, 0), &m).is_err());
        assert!(check_ring(&ring(512, 0), &m).is_err());
        assert!(check_ring(&ring(0, 0), &m).is_err());
        assert!(check_ring(&ring(256, u64::MAX - 8), &m).is_err());
        assert!(check_ring(&ring(256, 0), &m).is_ok());
        assert!(d
            .activate(acked | (1 << 40), &ready_queues(&m, 256, 0x8000), &m)
            .unwrap_err()
            .contains("never offered"));
        assert!(d
            .activate(f::MAC, &ready_queues(&m, 256, 0x8000), &m)
            .unwrap_err()
            .contains("legacy"));
        let mut q = ready_queues(&m, 256, 0x8000);
        q[1].set_ready(false);
        assert!(d.activate(acked, &q, &m).is_err());
        assert!(d.datapath().backends.is_empty(), "no tap attached");
        assert!(
            d.datapath()
                .rings
                .iter()
                .all(|(_, r)| check_ring(r, &m).is_ok()),
            "every ring the kernel saw was checked"
        );
    }

    #[test]
    fn receive_offloads_follow_what_the_guest_takes() {
        assert_eq!(tun_offloads(f::GUEST_TSO4), 0, "TSO without checksum");
        assert_eq!(tun_offloads(f::GUEST_CSUM), TUN_F_CSUM);
        assert_eq!(
            tun_offloads(f::GUEST_CSUM | f::GUEST_TSO4 | f::GUEST_TSO6 | f::GUEST_ECN),
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
        );
        assert_eq!(tun_offloads(f::GUEST_CSUM | f::GUEST_ECN), TUN_F_CSUM);
    }

    #[test]
    fn the_kernel_datapath_is_used_where_vhost_net_exists() {
        let m = mem();
        let (tap, _) = super::super::net::Net::socketpair().unwrap();
        let kicks = [EventFd::new(0).unwrap(), EventFd::new(0).unwrap()];
        let call = EventFd::new(0).unwrap();
        match Kernel::open(tap, &m, &kicks, &call) {
            Ok(k) => assert_ne!(k.ring_features() & f::VERSION_1, 0),
            Err(VhostError::Open(e)) => {
                eprintln!("skipped: /dev/vhost-net: {e} (the QEMU network test covers vhost-net)")
            }
            Err(e) => panic!("{e}"),
        }
    }
}
