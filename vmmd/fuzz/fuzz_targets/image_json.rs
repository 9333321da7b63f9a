//! See `vmmd::fuzz::image_json`: never a panic, whatever the bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vmmd::fuzz::image_json(data);
});
