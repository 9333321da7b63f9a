//! Any run of guest vsock packets: never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    steelcup_vmm::fuzz::vsock_packet(data);
});
