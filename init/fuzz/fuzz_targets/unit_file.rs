//! Any bytes as a unit file (and as its own drop-in): never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    steelcup_units::fuzz_one(data);
});
