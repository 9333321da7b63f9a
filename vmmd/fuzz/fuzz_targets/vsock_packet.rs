//! Any run of guest vsock packets: never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vmmd::fuzz::vsock_packet(data);
});
