//! See `vmmd::fuzz::layer_tar`: never a panic, whatever the bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vmmd::fuzz::layer_tar(data);
});
