//! Fuzz entry points: everything a guest can write, driven from bytes.
//!
//! # Design
//! Each target takes arbitrary bytes and plays them as a hostile guest
//! would: [`virtio_mmio`] interprets them as a stream of driver operations
//! (register writes and reads on a virtio-mmio transport, writes anywhere in
//! guest memory, which forges descriptor tables and rings, queue
//! notifications) against a real device model — block over an in-memory
//! disk, vsock, rng, net (over a socket pair) or net on vhost-net (its
//! kernel side a checker of what the device hands it); [`block_request`] and
//! [`vsock_packet`] feed one
//! request straight to a parser. None may panic, whatever the bytes.
//!
//! The same functions back the libFuzzer targets in `fuzz/` (coverage
//! guided: `cargo fuzz run virtio_mmio` from `vmmd/fuzz/`, see its
//! Cargo.toml) and the seeded random rounds of
//! `vmmd/daemon/tests/fuzz_smoke.rs`, so every test run plays a few thousand
//! hostile guests.

use crate::devices::serial::IrqTrigger;
use crate::devices::virtio::block::{self, Block, Segment};
use crate::devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY};
use crate::devices::virtio::net::{self, Net};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vhost_net::{self, Datapath, VhostNet};
use crate::devices::virtio::vsock::{self, Vsock, HDR_LEN};
use crate::devices::virtio::VirtioDevice;
use std::path::PathBuf;
use vhost::VringConfigData;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory of the fuzzed VM: small, so random addresses often land.
pub const MEM_BYTES: u64 = 0x1_0000;
/// The in-memory disk behind the block target.
const DISK_BYTES: u64 = 64 << 10;

/// Reads fields off the input; runs dry as zeros.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        head
    }
    fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }
    fn u16(&mut self) -> u16 {
        u16::from(self.u8()) | (u16::from(self.u8()) << 8)
    }
    fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | (u32::from(self.u16()) << 16)
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_BYTES as usize)])
        .expect("guest memory for fuzzing")
}

fn disk(read_only: bool) -> Block {
    let file = memfd("steelcup-fuzz-disk");
    file.set_len(DISK_BYTES).expect("size the fuzz disk");
    Block::from_file(file, DISK_BYTES, read_only, "fuzz").expect("fuzz disk")
}

fn memfd(name: &str) -> std::fs::File {
    let name = std::ffi::CString::new(name).expect("no NUL");
    // SAFETY: memfd_create with a valid C string; the fd is owned below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh descriptor nothing else owns.
    unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }
}

/// A Unix socket path for one vsock device, unique among live ones.
fn vsock_path() -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!(
        "steelcup-fuzz-vsock-{}-{n}.sock",
        std::process::id()
    ))
}

/// virtio-net on vhost-net with the kernel replaced by a checker: every
/// ring the device hands over must lie in guest memory, features must be
/// ones vhost-net carries out, and the tap is attached only to queues
/// whose rings were set (a panic is a finding).
struct Checker {
    mem: GuestMemoryMmap,
    running: [bool; 2],
}

impl Datapath for Checker {
    fn ring_features(&self) -> u64 {
        vhost_net::LINUX_VHOST_NET_FEATURES
    }
    fn set_features(&mut self, features: u64) -> Result<(), String> {
        assert_eq!(features & !vhost_net::LINUX_VHOST_NET_FEATURES, 0);
        self.running = [false; 2];
        Ok(())
    }
    fn set_vring(&mut self, index: usize, ring: &VringConfigData) -> Result<(), String> {
        assert!(index < 2, "queue {index}");
        if let Err(e) = vhost_net::check_ring(ring, &self.mem) {
            panic!("an unchecked ring reached the kernel: {e}");
        }
        self.running[index] = true;
        Ok(())
    }
    fn set_backend(&mut self, index: usize, on: bool) -> Result<(), String> {
        assert!(
            !on || self.running[index],
            "a tap on queue {index} without rings"
        );
        Ok(())
    }
    fn set_offloads(&mut self, tun_flags: u32) -> Result<(), String> {
        assert_eq!(tun_flags & !0x0f, 0, "offloads {tun_flags:#x}");
        Ok(())
    }
}

/// Which device sits behind the fuzzed transport (the first input byte),
/// and for net the network's end of its socket pair (kept open for the run).
fn device(selector: u8, mem: &GuestMemoryMmap) -> (Box<dyn VirtioDevice>, Option<std::fs::File>) {
    match selector % 6 {
        0 => (Box::new(disk(false)), None),
        1 => (Box::new(disk(true)), None),
        2 => (
            Box::new(Rng::with_source(Box::new(std::io::repeat(0x5a)))),
            None,
        ),
        3 => (
            Box::new(Vsock::new(3, &vsock_path()).expect("vsock for fuzzing")),
            None,
        ),
        5 => (
            Box::new(VhostNet::new(
                Checker {
                    mem: mem.clone(),
                    running: [false; 2],
                },
                net::mac_for(8),
            )),
            None,
        ),
        _ => {
            // A frame waits on the network's end, so RX has work too.
            let (dev_end, mut net_end) = Net::socketpair().expect("socket pair for fuzzing");
            let mut frame = vec![0u8; net::VNET_HDR_LEN];
            frame.extend_from_slice(&[0xab; 60]);
            let _ = std::io::Write::write_all(&mut net_end, &frame);
            let dev = Net::new(dev_end, net::mac_for(7)).expect("net for fuzzing");
            (Box::new(dev), Some(net_end))
        }
    }
}

/// A hostile driver against a virtio-mmio transport: the first byte picks
/// the device, the rest is a stream of operations.
pub fn virtio_mmio(data: &[u8]) {
    let mut input = Input(data);
    let mem = memory();
    let (dev, _network) = device(input.u8(), &mem);
    let mut t = MmioTransport::new(dev, mem.clone(), IrqTrigger(None));
    let mut steps = 0;
    while !input.is_empty() && steps < 4096 {
        steps += 1;

        match input.u8() % 7 {
            // A register write of any width at any offset in the window.
            0 => {
                let offset = u64::from(input.u16() & 0x1ff);
                let width = [1, 2, 4, 8][usize::from(input.u8() % 4)];
                let value = input.bytes(width).to_vec();
                t.write(offset, &value);
            }
            1 => {
                let offset = u64::from(input.u16() & 0x1ff);
                let mut buf = vec![0u8; [1, 2, 4, 8][usize::from(input.u8() % 4)]];
                t.read(offset, &mut buf);
            }
            // Guest memory: descriptors, rings, request headers, data.
            2 => {
                let addr = u64::from(input.u16());
                let len = usize::from(input.u8());
                let bytes = input.bytes(len).to_vec();
                let _ = mem.write_slice(&bytes, GuestAddress(addr));
            }
            3 => t.notify(usize::from(input.u8() % 4)),
            4 => t.write(QUEUE_NOTIFY, &u32::from(input.u8() % 4).to_le_bytes()),
            5 => t.host_event(),
            // A driver that sets a queue up the way Linux does, with rings
            // wherever the input says: gets the fuzzer past the handshake.
            _ => set_up_queue(&mut t, &mut input),
        }
    }
}

fn set_up_queue(t: &mut MmioTransport, input: &mut Input<'_>) {
    let mut w = |off: u64, v: u32| t.write(off, &v.to_le_bytes());
    let queue = u32::from(input.u8() % 3);
    let size = u32::from(input.u16() % 512);
    let (desc, avail, used) = (
        u32::from(input.u16()),
        u32::from(input.u16()),
        u32::from(input.u16()),
    );
    w(0x70, 1 | 2);
    w(0x24, 1);
    w(0x20, 1); // VIRTIO_F_VERSION_1
    w(0x70, 1 | 2 | 8);
    w(0x30, queue);
    w(0x38, size);
    w(0x80, desc);
    w(0x84, 0);
    w(0x90, avail);
    w(0x94, 0);
    w(0xa0, used);
    w(0xa4, 0);
    w(0x44, 1);
    w(0x70, 1 | 2 | 8 | 4);
}

/// One block request: the input is a chain of segments (address, length,
/// direction) and the guest memory they point into.
pub fn block_request(data: &[u8]) {
    let mut input = Input(data);
    let mem = memory();
    let mut chain = Vec::new();
    for _ in 0..(input.u8() % 8) {
        chain.push(Segment {
            addr: GuestAddress(u64::from(input.u32()) % (2 * MEM_BYTES)),
            len: input.u32() % 0x2_0000,
            write: input.u8() & 1 == 1,
        });
    }
    let _ = mem.write_slice(input.bytes(MEM_BYTES as usize), GuestAddress(0));
    let mut dev = disk(data.first().is_some_and(|b| b & 0x80 != 0));
    if let Ok(req) = block::parse(&chain, &mem) {
        let (status, written) = dev.execute(&req, &mem);
        assert!(
            status <= block::S_UNSUPP,
            "status {status} is not a virtio-blk status"
        );
        assert!(
            u64::from(written) <= block::MAX_REQUEST_BYTES + block::ID_BYTES as u64 + 1,
            "wrote {written} bytes for one request"
        );
    }
}

/// A run of guest vsock packets (header and payload) against one device.
pub fn vsock_packet(data: &[u8]) {
    let mut dev = match Vsock::new(3, &vsock_path()) {
        Ok(d) => d,
        Err(e) => panic!("vsock for fuzzing: {e}"),
    };
    let mut input = Input(data);
    while !input.is_empty() {
        let len = usize::from(input.u16()) % (HDR_LEN + 512);
        let packet = input.bytes(len).to_vec();
        if let Some((header, payload)) = vsock::parse_packet(&packet) {
            dev.handle_guest_packet(&header, payload);
        }
    }
}
