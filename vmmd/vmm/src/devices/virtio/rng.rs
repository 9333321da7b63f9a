//! virtio-rng: the guest's entropy source, fed from the host's
//! `/dev/urandom` (opened when the device is made, before the worker's
//! seccomp filter).

use super::VirtioDevice;
use std::io::Read;
use vm_memory::{Bytes, GuestMemoryMmap};

/// At most this many bytes per request, whatever the guest asks.
pub const MAX_REQUEST: u32 = 64 * 1024;

/// The entropy device.
pub struct Rng {
    source: Box<dyn Read + Send>,
    /// Bytes handed to the guest.
    pub served: u64,
}

impl std::fmt::Debug for Rng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rng")
            .field("served", &self.served)
            .finish_non_exhaustive()
    }
}

impl Rng {
    /// An entropy device reading the host's `/dev/urandom`.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self::with_source(Box::new(std::fs::File::open(
            "/dev/urandom",
        )?)))
    }

    /// An entropy device reading `source` (tests use a fixed pattern).
    pub fn with_source(source: Box<dyn Read + Send>) -> Self {
        Rng { source, served: 0 }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        4
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[256]
    }

    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [virtio_queue::Queue],
        mem: &GuestMemoryMmap,
    ) -> bool {
        let Some(queue) = queues.get_mut(index) else {
            return false;
        };
        let mut buf = vec![0u8; 4096];
        super::serve_chains(queue, mem, |chain| {
            let mut written: u32 = 0;
            for desc in chain.writable() {
                let mut left = desc.len().min(MAX_REQUEST - written);
                let mut addr = desc.addr();
                while left > 0 {
                    let n = (left as usize).min(buf.len());
                    if self.source.read_exact(&mut buf[..n]).is_err() {
                        break;
                    }
                    if mem.write_slice(&buf[..n], addr).is_err() {
                        // Outside guest memory: stop filling this request.
                        left = 0;
                        break;
                    }
                    addr = vm_memory::GuestAddress(addr.0.wrapping_add(n as u64));
                    left -= n as u32;
                    written += n as u32;
                }
                if written >= MAX_REQUEST {
                    break;
                }
            }
            self.served += u64::from(written);
            written
        })
    }
}
