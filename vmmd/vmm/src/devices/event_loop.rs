//! The device thread: virtio work off the vCPU threads.
//!
//! # Design
//! Each virtio queue has an ioeventfd KVM signals when the guest writes the
//! queue's index to the device's QueueNotify register: the notification
//! never leaves the kernel as a VM exit, and the vCPU goes straight back to
//! the guest. This thread waits on all of them with epoll (plus each
//! device's host-side descriptor, such as vsock's sockets) and runs the
//! device's queue processing under the transport's lock. Interrupts go back
//! through irqfds.

use super::virtio::{lock, SharedTransport};
use std::os::fd::{AsRawFd, RawFd};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

enum Source {
    Queue {
        transport: SharedTransport,
        queue: usize,
        evt: EventFd,
    },
    Host {
        transport: SharedTransport,
    },
}

/// The set of things the device thread waits on.
pub struct DeviceLoop {
    epoll: Epoll,
    sources: Vec<Source>,
}

impl std::fmt::Debug for DeviceLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceLoop")
            .field("sources", &self.sources.len())
            .finish()
    }
}

impl DeviceLoop {
    pub fn new() -> std::io::Result<Self> {
        Ok(DeviceLoop {
            epoll: Epoll::new()?,
            sources: Vec::new(),
        })
    }

    fn add(&mut self, fd: RawFd, source: Source) -> std::io::Result<()> {
        let token = self.sources.len() as u64;
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )?;
        self.sources.push(source);
        Ok(())
    }

    /// Runs queue `queue` of `transport` when `evt` fires.
    pub fn add_queue(
        &mut self,
        transport: SharedTransport,
        queue: usize,
        evt: EventFd,
    ) -> std::io::Result<()> {
        let fd = evt.as_raw_fd();
        self.add(
            fd,
            Source::Queue {
                transport,
                queue,
                evt,
            },
        )
    }

    /// Calls the device's host-side handler when `fd` is readable.
    pub fn add_host(&mut self, transport: SharedTransport, fd: RawFd) -> std::io::Result<()> {
        self.add(fd, Source::Host { transport })
    }

    /// Waits for and handles events; returns only if epoll itself fails.
    pub fn run(&self) -> std::io::Error {
        let mut events = vec![EpollEvent::default(); 32];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return e,
            };
            for ev in &events[..n] {
                self.handle(ev.data() as usize);
            }
        }
    }

    /// Handles one ready source (tests call it directly).
    pub fn handle(&self, token: usize) {
        match self.sources.get(token) {
            Some(Source::Queue {
                transport,
                queue,
                evt,
            }) => {
                let _ = evt.read();
                lock(transport).notify(*queue);
            }
            Some(Source::Host { transport }) => lock(transport).host_event(),
            None => {}
        }
    }
}
