//! Every test run plays the fuzz targets (see `vmmd::fuzz`) with seeded
//! random inputs and with inputs shaped like a real driver's, so a parser
//! that panics on hostile bytes fails here even without a fuzzing session.
//! `cargo xtask fuzz` runs the same targets under libFuzzer.

/// xorshift64*: a fixed seed gives the same rounds on every machine.
struct Rand(u64);

impl Rand {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = (self.next() as usize) % max;
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn rounds(seed: u64, n: usize, max: usize, target: fn(&[u8])) {
    let mut r = Rand(seed);
    for _ in 0..n {
        target(&r.bytes(max));
    }
}

#[test]
fn virtio_mmio_survives_random_drivers() {
    rounds(0x5eed_0001, 3000, 2048, vmmd::fuzz::virtio_mmio);
}

#[test]
fn virtio_mmio_survives_forged_rings_behind_a_proper_handshake() {
    // Device byte, then "set up queue 0 with 256 entries at 0x1000/0x2000/
    // 0x3000", then random memory writes into those rings and notifies.
    let mut r = Rand(0x5eed_0002);
    for round in 0..2000u64 {
        let mut input = vec![round as u8, 6, 0, 0, 1, 0x00, 0x10, 0x00, 0x20, 0x00, 0x30];
        for _ in 0..(r.next() % 24) {
            if r.next() % 3 == 0 {
                input.extend([3, (r.next() % 2) as u8]);
            } else {
                // A write of up to 64 bytes into the first 16 KiB.
                let addr = (r.next() % 0x4000) as u16;
                let len = (r.next() % 64) as u8;
                input.extend([2, addr as u8, (addr >> 8) as u8, len]);
                input.extend((0..len).map(|_| r.next() as u8));
            }
        }
        vmmd::fuzz::virtio_mmio(&input);
    }
}

#[test]
fn block_requests_survive_random_chains() {
    rounds(0x5eed_0003, 3000, 512, vmmd::fuzz::block_request);
}

#[test]
fn vsock_survives_random_packets() {
    rounds(0x5eed_0004, 3000, 1024, vmmd::fuzz::vsock_packet);
}
