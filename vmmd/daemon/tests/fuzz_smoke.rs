//! Every test run plays the fuzz targets (`steelcup_vmm::fuzz` for the
//! devices, `vmmd::fuzz` for layers and OCI JSON) with seeded random inputs
//! and with inputs shaped like a real driver's, so a parser that panics on
//! hostile bytes fails here even without a fuzzing session. `cargo fuzz`
//! in `vmmd/fuzz/` runs the same targets under libFuzzer.

#![allow(clippy::unwrap_used)] // tests fail by panicking

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
    rounds(0x5eed_0001, 3000, 2048, steelcup_vmm::fuzz::virtio_mmio);
}

#[test]
fn virtio_mmio_survives_forged_rings_behind_a_proper_handshake() {
    // Device byte, then "set up queue 0 with 256 entries at 0x1000/0x2000/
    // 0x3000", then random memory writes into those rings and notifies.
    let mut r = Rand(0x5eed_0002);
    for round in 0..2000u64 {
        let mut input = vec![round as u8, 6, 0, 0, 1, 0x00, 0x10, 0x00, 0x20, 0x00, 0x30];
        if round % 2 == 1 {
            // Queue 1 too (at 0x4000/0x5000/0x6000): a device that needs
            // both queues (net on vhost-net) starts.
            input.extend([6, 1, 0, 1, 0x00, 0x40, 0x00, 0x50, 0x00, 0x60]);
        }
        for _ in 0..(r.next() % 24) {
            if r.next().is_multiple_of(3) {
                input.extend([3, (r.next() % 2) as u8]);
            } else {
                // A write of up to 64 bytes into the first 16 KiB.
                let addr = (r.next() % 0x4000) as u16;
                let len = (r.next() % 64) as u8;
                input.extend([2, addr as u8, (addr >> 8) as u8, len]);
                input.extend((0..len).map(|_| r.next() as u8));
            }
        }
        steelcup_vmm::fuzz::virtio_mmio(&input);
    }
}

#[test]
fn block_requests_survive_random_chains() {
    rounds(0x5eed_0003, 3000, 512, steelcup_vmm::fuzz::block_request);
}

#[test]
fn vsock_survives_random_packets() {
    rounds(0x5eed_0004, 3000, 1024, steelcup_vmm::fuzz::vsock_packet);
}

/// A small valid layer to mutate: directories, files, a symlink, a hard
/// link and whiteouts.
fn seed_layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, ty: tar::EntryType, data: &[u8], link: &str| {
        let mut h = tar::Header::new_gnu();
        h.set_path(path).unwrap();
        h.set_entry_type(ty);
        h.set_size(data.len() as u64);
        h.set_mode(0o755);
        if !link.is_empty() {
            h.set_link_name(link).unwrap();
        }
        h.set_cksum();
        b.append(&h, data).unwrap();
    };
    add("etc/", tar::EntryType::Directory, b"", "");
    add(
        "etc/passwd",
        tar::EntryType::Regular,
        b"root:x:0:0::/:/bin/sh\n",
        "",
    );
    add("l", tar::EntryType::Symlink, b"", "/etc");
    add("l/x", tar::EntryType::Regular, &[7; 5000], "");
    add("h", tar::EntryType::Link, b"", "etc/passwd");
    add("etc/.wh.passwd", tar::EntryType::Regular, b"", "");
    add("etc/.wh..wh..opq", tar::EntryType::Regular, b"", "");
    b.into_inner().unwrap()
}

#[test]
fn the_layer_applier_survives_random_and_mutated_tars() {
    rounds(0x5eed_0010, 500, 4096, vmmd::fuzz::layer_tar);
    let seed = seed_layer();
    vmmd::fuzz::layer_tar(&seed);
    let mut r = Rand(0x5eed_0011);
    for _ in 0..1500 {
        let mut t = seed.clone();
        for _ in 0..(1 + r.next() % 8) {
            let at = (r.next() as usize) % t.len();
            t[at] = r.next() as u8;
        }
        if r.next().is_multiple_of(4) {
            t.truncate((r.next() as usize) % t.len());
        }
        vmmd::fuzz::layer_tar(&t);
    }
}

#[test]
fn manifest_and_config_parsing_survive_random_and_mutated_json() {
    rounds(0x5eed_0012, 1000, 512, vmmd::fuzz::image_json);
    let seeds: [&[u8]; 2] = [
        br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":2},"layers":[]}"#,
        br#"{"architecture":"amd64","os":"linux","config":{"Env":["A=b"],"Entrypoint":["/x"],"Cmd":["y"],"User":"1:2"},"rootfs":{"type":"layers","diff_ids":[]}}"#,
    ];
    let mut r = Rand(0x5eed_0013);
    for seed in seeds {
        vmmd::fuzz::image_json(seed);
        for _ in 0..1000 {
            let mut t = seed.to_vec();
            for _ in 0..(1 + r.next() % 4) {
                let at = (r.next() as usize) % t.len();
                t[at] = b"{}[]\":,0a-9 "[(r.next() % 12) as usize];
            }
            vmmd::fuzz::image_json(&t);
        }
    }
}

#[test]
fn api_bodies_survive_random_and_mutated_input() {
    rounds(0x5eed_0020, 2000, 512, vmmd::fuzz::api_bodies);
    let seeds: [&[u8]; 6] = [
        br#"{"image":"busybox:latest","cmd":["sh"],"memory":"128MiB","ports":["8080:80"],"volumes":["data:/data:ro"],"restart":"always"}"#,
        br#"{"request":"probe","probe":{"http":[8080,"/healthz"]},"timeout_secs":3}"#,
        br#"{"message":"report","report":{"outcome":{"exited":{"code":3}},"run_ms":10}}"#,
        b"127.0.0.1:8080:80/udp",
        b"bridge=br0,subnet=10.5.0.0/24,mtu=1400,domain=lab",
        b"vcpus=2,memory=1GiB,count=3",
    ];
    let mut r = Rand(0x5eed_0021);
    for seed in seeds {
        vmmd::fuzz::api_bodies(seed);
        for _ in 0..1000 {
            let mut t = seed.to_vec();
            for _ in 0..(1 + r.next() % 4) {
                let at = (r.next() as usize) % t.len();
                t[at] = b"{}[]\":,0a-9 /=."[(r.next() % 15) as usize];
            }
            vmmd::fuzz::api_bodies(&t);
        }
    }
}

/// Every input a fuzzing session found to crash a target (kept in
/// `init/fuzz/regressions/TARGET/` and `vmmd/fuzz/regressions/TARGET/` by
/// `cargo xtask fuzz`) runs through it again on every test run.
#[test]
fn fuzz_regressions_stay_fixed() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let targets: [(&str, &str, fn(&[u8])); 7] = [
        ("vmmd", "virtio_mmio", steelcup_vmm::fuzz::virtio_mmio),
        ("vmmd", "block_request", steelcup_vmm::fuzz::block_request),
        ("vmmd", "vsock_packet", steelcup_vmm::fuzz::vsock_packet),
        ("vmmd", "layer_tar", vmmd::fuzz::layer_tar),
        ("vmmd", "image_json", vmmd::fuzz::image_json),
        ("vmmd", "api_bodies", vmmd::fuzz::api_bodies),
        ("init", "unit_file", steelcup_units::fuzz_one),
    ];
    let mut n = 0;
    for (dir, name, target) in targets {
        let kept = root.join(dir).join("fuzz/regressions").join(name);
        for e in std::fs::read_dir(kept).into_iter().flatten().flatten() {
            target(&std::fs::read(e.path()).unwrap());
            n += 1;
        }
    }
    println!("{n} regression inputs replayed");
}
