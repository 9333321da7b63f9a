//! Any descriptor chain as a virtio-blk request: parsed and executed
//! against an in-memory disk, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    steelcup_vmm::fuzz::block_request(data);
});
