//! See `vmmd::fuzz::api_bodies`: never a panic, whatever the bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vmmd::fuzz::api_bodies(data);
});
