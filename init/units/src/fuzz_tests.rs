//! The fuzz target's body over mutations of real unit files, on stable Rust
//! (cargo fuzz needs nightly features): bit flips, cuts, random bytes and
//! TOML tokens in random places, from a fixed seed so a failure reproduces.

use super::fuzz_one;

#[test]
fn parser_survives_mutated_input() {
    let seeds: Vec<&[u8]> = vec![
        include_bytes!("../../../configs/units/vmmd.toml"),
        include_bytes!("../../../configs/units/hello.toml"),
        b"[unit]\nafter=[\"a\"]\n[service]\nexec=[\"/x\"]\nmemory-max=\"1GiB\"\ncpu-max=0.5\nstop-signal=\"TERM\"\n[service.env]\nA=\"b\"\n",
    ];
    let tokens: &[&[u8]] = &[
        b"[",
        b"]",
        b"[[",
        b"=",
        b"\"",
        b"'''",
        b"\n",
        b"{",
        b"}",
        b",",
        b"1e999",
        b"nan",
        b"-0",
        b"\\u0000",
        b"[service]",
        b"[microvm]",
        b"memory=\"99999999999GiB\"",
        b"vcpus=256",
        b"cpu-max=-inf",
        b"stop-timeout=4294967296",
    ];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..20_000 {
        let mut data = seeds[(rand() % seeds.len() as u64) as usize].to_vec();
        for _ in 0..(1 + rand() % 4) {
            let pos = if data.is_empty() {
                0
            } else {
                (rand() % data.len() as u64) as usize
            };
            match rand() % 4 {
                0 if !data.is_empty() => data[pos] ^= 1 << (rand() % 8),
                1 => data.truncate(pos),
                2 => {
                    let t = tokens[(rand() % tokens.len() as u64) as usize];
                    data.splice(pos..pos, t.iter().copied());
                }
                _ => {
                    let b = (rand() % 256) as u8;
                    data.insert(pos, b);
                }
            }
        }
        fuzz_one(&data);
    }
}
