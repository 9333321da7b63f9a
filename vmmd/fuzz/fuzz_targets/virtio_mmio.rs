//! A hostile virtio driver (register writes, forged rings, notifications)
//! against each device model: never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    steelcup_vmm::fuzz::virtio_mmio(data);
});
