//! virtio-net over a tap device.
//!
//! # Design
//! The backend is a packet descriptor: a tap opened with `IFF_TAP |
//! IFF_NO_PI | IFF_VNET_HDR` and a 12-byte vnet header, so every read and
//! write is one Ethernet frame behind a `virtio_net_hdr_v1` — exactly what
//! the guest puts before each frame. No offloads are offered (no checksum,
//! TSO or mergeable buffers), so frames are at most MTU-sized and each
//! receive buffer the guest posts holds a whole one. Tests use a
//! `SOCK_SEQPACKET` socket pair as the backend.
//!
//! TX (queue 1): each chain's readable bytes (header and frame, at most
//! [`MAX_FRAME`]) are written to the backend in one `write`; a chain with a
//! writable buffer, or larger than that, is dropped and counted. RX (queue
//! 0): the backend is registered edge-triggered in the device's own epoll
//! set, whose descriptor the device thread watches; on each event the
//! device reads frames until the backend is empty or the guest has no
//! buffer left, keeping the one frame it could not place until the guest
//! posts buffers (a notify on queue 0). A frame larger than the buffer it
//! lands in is dropped. Memory stays bounded: one frame in flight.

use super::VirtioDevice;
use crate::devices::Refusals;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// `virtio_net_hdr_v1`: flags, gso type, hdr len, gso size, csum start,
/// csum offset, num buffers.
pub const VNET_HDR_LEN: usize = 12;
/// The largest frame with its header that the device moves (no TSO: an
/// MTU-sized frame, with room for a VLAN tag and jumbo-less slack).
pub const MAX_FRAME: usize = VNET_HDR_LEN + 9216;
const QUEUE_SIZE: u16 = 256;
const RXQ: usize = 0;
const TXQ: usize = 1;
const VIRTIO_NET_F_MAC: u64 = 1 << 5;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens (creating if needed) tap `name`, non-blocking, with vnet headers
/// and no offloads.
pub fn open_tap(name: &str) -> std::io::Result<File> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ', '\0']) {
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            format!("tap name {name:?} must be 1 to 15 characters without '/', space or NUL"),
        ));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| std::io::Error::new(e.kind(), format!("/dev/net/tun: {e}")))?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    let hdr = VNET_HDR_LEN as libc::c_int;
    // SAFETY: the three ioctls get a valid ifreq, a valid int pointer and
    // an integer argument on a tun descriptor we own.
    unsafe {
        if libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) < 0 {
            let e = std::io::Error::last_os_error();
            return Err(std::io::Error::new(
                e.kind(),
                format!("create tap {name}: {e}"),
            ));
        }
        if libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr) < 0
            || libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, 0 as libc::c_uint) < 0
        {
            let e = std::io::Error::last_os_error();
            return Err(std::io::Error::new(
                e.kind(),
                format!("set up tap {name}: {e}"),
            ));
        }
    }
    Ok(file)
}

/// The network device.
pub struct Net {
    backend: File,
    epoll: Epoll,
    mac: [u8; 6],
    /// Frames from the backend land here; one that found no guest buffer
    /// yet stays, its length in `rx_pending`.
    rx_buf: Vec<u8>,
    rx_pending: Option<usize>,
    /// A frame from the guest on its way to the backend.
    tx_buf: Vec<u8>,
    /// Frames dropped (malformed, too large, or with nowhere to go).
    pub dropped: Refusals,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("mac", &self.mac)
            .field("dropped", &self.dropped.count)
            .finish_non_exhaustive()
    }
}

impl Net {
    /// A device on `backend` (a non-blocking packet descriptor: a tap from
    /// [`open_tap`], or a socket pair in tests) with MAC address `mac`.
    pub fn new(backend: File, mac: [u8; 6]) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            backend.as_raw_fd(),
            EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, 0),
        )?;
        Ok(Net {
            backend,
            epoll,
            mac,
            rx_buf: vec![0; MAX_FRAME],
            rx_pending: None,
            tx_buf: Vec::with_capacity(MAX_FRAME),
            dropped: Refusals::new("virtio-net: dropped a frame"),
        })
    }

    /// A socket pair for tests: the device's end and the "network" end.
    pub fn socketpair() -> std::io::Result<(File, File)> {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two descriptors into `fds`.
        if unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        } != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: both descriptors are fresh and owned by nothing else.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok((File::from(a), File::from(b)))
    }

    fn drop_frame(&mut self, why: &dyn std::fmt::Display) {
        self.dropped.note(why);
    }

    /// Sends every frame the guest queued for transmission.
    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut frame = std::mem::take(&mut self.tx_buf);
        let used = super::serve_chains(queue, mem, |chain| {
            match super::read_chain(chain, mem, &mut frame, MAX_FRAME) {
                Err(why) => self.drop_frame(&why),
                Ok(()) if frame.len() <= VNET_HDR_LEN => {
                    self.drop_frame(&"a frame with no bytes after its header")
                }
                Ok(()) => {
                    if let Err(e) = self.backend.write(&frame) {
                        self.drop_frame(&format!("backend write: {e}"));
                    }
                }
            }
            0
        });
        self.tx_buf = frame;
        used
    }

    /// Moves frames from the backend into the guest's receive buffers.
    fn receive(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        loop {
            let len = match self.rx_pending.take() {
                Some(n) => n,
                None => match self.backend.read(&mut self.rx_buf) {
                    Ok(0) => return used,
                    Ok(n) if n < VNET_HDR_LEN => {
                        self.drop_frame(&"a frame shorter than its header");
                        continue;
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return used,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        self.drop_frame(&format!("backend read: {e}"));
                        return used;
                    }
                },
            };
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                // No buffer: keep the frame until the guest posts some.
                self.rx_pending = Some(len);
                return used;
            };
            let head = chain.head_index();
            let bufs: Vec<(GuestAddress, u32)> = chain
                .filter(|d| d.is_write_only())
                .map(|d| (d.addr(), d.len()))
                .collect();
            let room: u64 = bufs.iter().map(|(_, l)| u64::from(*l)).sum();
            let frame = &self.rx_buf[..len];
            let written = if room < len as u64 {
                self.drop_frame(&format!(
                    "{len} bytes do not fit the guest's {room}-byte buffer"
                ));
                0
            } else {
                // VERSION_1: num_buffers is 1 (no mergeable buffers).
                let mut header = [0u8; VNET_HDR_LEN];
                header[..10].copy_from_slice(&frame[..10]);
                header[10..].copy_from_slice(&1u16.to_le_bytes());
                super::write_chain(mem, &bufs, &header, &frame[VNET_HDR_LEN..])
            };
            if queue.add_used(mem, head, written).is_err() {
                return used;
            }
            used = true;
        }
    }

    /// Consumes the readiness the device's epoll set holds.
    fn drain_epoll(&self) {
        let mut events = [EpollEvent::default(); 4];
        while matches!(self.epoll.wait(0, &mut events), Ok(n) if n > 0) {}
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        1
    }

    fn features(&self) -> u64 {
        super::VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.mac, offset, data);
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        match index {
            TXQ => queues.get_mut(TXQ).is_some_and(|q| self.transmit(q, mem)),
            // New receive buffers: place what is waiting.
            RXQ => queues.get_mut(RXQ).is_some_and(|q| self.receive(q, mem)),
            _ => false,
        }
    }

    fn host_event_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn process_host_event(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        self.drain_epoll();
        match queues.get_mut(RXQ) {
            Some(q) if q.ready() => self.receive(q, mem),
            // The driver is not up: frames from the network are dropped.
            _ => {
                // Into a scratch buffer (a frame read short is discarded
                // whole), so a frame kept in `rx_buf` stays.
                let mut sink = [0u8; 64];
                while self.backend.read(&mut sink).is_ok_and(|n| n > 0) {
                    self.dropped.count += 1;
                }
                false
            }
        }
    }
}

/// A MAC address for VM `index`: locally administered, unicast, stable.
pub fn mac_for(index: u32) -> [u8; 6] {
    let i = index.to_be_bytes();
    [0x06, 0x5c, i[0], i[1], i[2], i[3]]
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20000)]).unwrap()
    }

    fn queue(mem: &GuestMemoryMmap) -> Queue {
        let mut q = Queue::new(QUEUE_SIZE).unwrap();
        q.set_size(16);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        let _ = mem;
        q
    }

    /// Offers one chain of (addr, len, writable) buffers as entry `slot`.
    fn offer(mem: &GuestMemoryMmap, slot: u16, first_desc: u16, bufs: &[(u64, u32, bool)]) {
        for (i, (addr, len, write)) in bufs.iter().enumerate() {
            let idx = first_desc + i as u16;
            let base = DESC + 16 * u64::from(idx);
            let mut flags = if *write { 2u16 } else { 0 };
            if i + 1 < bufs.len() {
                flags |= 1;
            }
            mem.write_obj(*addr, GuestAddress(base)).unwrap();
            mem.write_obj(*len, GuestAddress(base + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(base + 12)).unwrap();
            mem.write_obj(idx + 1, GuestAddress(base + 14)).unwrap();
        }
        mem.write_obj(first_desc, GuestAddress(AVAIL + 4 + 2 * u64::from(slot)))
            .unwrap();
        mem.write_obj(slot + 1, GuestAddress(AVAIL + 2)).unwrap();
    }

    fn used_len(mem: &GuestMemoryMmap, slot: u16) -> u32 {
        mem.read_obj(GuestAddress(USED + 4 + 8 * u64::from(slot) + 4))
            .unwrap()
    }

    /// A device on a socket pair, the network's end, guest memory and two
    /// ready queues.
    fn fixture() -> (Net, File, GuestMemoryMmap, Vec<Queue>) {
        let (dev_end, net_end) = Net::socketpair().unwrap();
        let net = Net::new(dev_end, mac_for(1)).unwrap();
        let m = mem();
        let queues = vec![queue(&m), queue(&m)];
        (net, net_end, m, queues)
    }

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn transmits_the_guests_frames_one_write_each() {
        let (mut net, mut net_end, m, mut queues) = fixture();
        // Header and frame split over two buffers.
        m.write_slice(&[0u8; VNET_HDR_LEN], GuestAddress(0x8000))
            .unwrap();
        m.write_slice(b"ethernet frame", GuestAddress(0x9000))
            .unwrap();
        offer(
            &m,
            0,
            0,
            &[(0x8000, VNET_HDR_LEN as u32, false), (0x9000, 14, false)],
        );
        assert!(net.process_queue(TXQ, &mut queues, &m));
        let mut got = vec![0u8; 100];
        let n = net_end.read(&mut got).unwrap();
        assert_eq!(&got[..n], frame(b"ethernet frame").as_slice());
        assert_eq!(net.dropped.count, 0);
    }

    #[test]
    fn hostile_tx_chains_are_dropped_not_sent() {
        let (mut net, mut net_end, m, mut queues) = fixture();
        // A writable buffer in a TX chain; then one outside guest memory;
        // then one larger than any frame.
        offer(&m, 0, 0, &[(0x8000, 20, true)]);
        offer(&m, 1, 1, &[(0xffff_0000, 64, false)]);
        offer(
            &m,
            2,
            2,
            &[(0x8000, 0x8000, false), (0x8000, 0x8000, false)],
        );
        assert!(net.process_queue(TXQ, &mut queues, &m));
        assert_eq!(net.dropped.count, 3);
        let mut got = [0u8; 16];
        assert_eq!(
            net_end.read(&mut got).unwrap_err().kind(),
            ErrorKind::WouldBlock,
            "nothing reached the network"
        );
    }

    #[test]
    fn receives_into_guest_buffers_and_waits_for_more() {
        let (mut net, mut net_end, m, mut queues) = fixture();
        net_end.write_all(&frame(b"first")).unwrap();
        net_end.write_all(&frame(b"second")).unwrap();
        // One buffer posted: the first frame lands, the second waits.
        offer(&m, 0, 0, &[(0x8000, 1526, true)]);
        assert!(net.process_host_event(&mut queues, &m));
        assert_eq!(used_len(&m, 0), (VNET_HDR_LEN + 5) as u32);
        let mut hdr = [0u8; VNET_HDR_LEN + 5];
        m.read_slice(&mut hdr, GuestAddress(0x8000)).unwrap();
        assert_eq!(&hdr[10..12], &1u16.to_le_bytes(), "num_buffers");
        assert_eq!(&hdr[VNET_HDR_LEN..], b"first");
        assert!(net.rx_pending.is_some());
        // The guest posts another buffer and notifies the RX queue.
        offer(&m, 1, 1, &[(0x9000, 1526, true)]);
        assert!(net.process_queue(RXQ, &mut queues, &m));
        let mut second = [0u8; 6];
        m.read_slice(&mut second, GuestAddress(0x9000 + VNET_HDR_LEN as u64))
            .unwrap();
        assert_eq!(&second, b"second");
        assert!(net.rx_pending.is_none());
    }

    #[test]
    fn a_frame_too_big_for_its_buffer_is_dropped() {
        let (mut net, mut net_end, m, mut queues) = fixture();
        net_end.write_all(&frame(&[7u8; 1000])).unwrap();
        offer(&m, 0, 0, &[(0x8000, 100, true)]);
        assert!(net.process_host_event(&mut queues, &m));
        assert_eq!(used_len(&m, 0), 0);
        assert_eq!(net.dropped.count, 1);
    }

    #[test]
    fn config_space_is_the_mac() {
        let (dev_end, _net_end) = Net::socketpair().unwrap();
        let net = Net::new(dev_end, mac_for(0x0102_0304)).unwrap();
        let mut mac = [0u8; 6];
        net.read_config(0, &mut mac);
        assert_eq!(mac, [0x06, 0x5c, 1, 2, 3, 4]);
        let mut past = [0xffu8; 4];
        net.read_config(6, &mut past);
        assert_eq!(past, [0; 4]);
    }

    #[test]
    fn tap_names_are_checked() {
        for bad in ["", "a-name-longer-than-15", "a/b", "a b"] {
            assert_eq!(
                open_tap(bad).unwrap_err().kind(),
                ErrorKind::InvalidInput,
                "{bad:?}"
            );
        }
    }
}
