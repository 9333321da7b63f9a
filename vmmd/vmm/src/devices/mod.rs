//! Emulated devices on the port-I/O bus.
//!
//! # Design
//! [`Bus`] routes each port access to the device that owns the port:
//! the 16550 serial console at 0x3f8 (vm-superio, interrupts through an
//! irqfd on GSI 4), the i8042 controller at 0x60/0x64 (only its reset line:
//! that is how a Linux guest with `reboot=k` ends the VM) and the steelcup
//! status port at [`STATUS_PORT`]. Everything the guest does is untrusted: an
//! access to a port nobody owns reads as all ones, is otherwise ignored, and
//! is logged at a bounded rate.

pub mod event_loop;
pub mod serial;
pub mod virtio;

use std::time::{Duration, Instant};
use steelcup_proto::guest::{ExitStatus, STARTED, STATUS_PORT};

/// When vminit said the workload runs (CLOCK_MONOTONIC ns; 0 until then):
/// the worker holds one VM.
pub static WORKLOAD_STARTED_NS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// What a device write asks of the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmAction {
    /// The i8042 reset line: the guest rebooted.
    Reset,
    /// vminit reported the workload's exit status: the VM is done.
    Exit,
}

const SERIAL_BASE: u16 = 0x3f8;
const I8042_DATA: u16 = 0x60;
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// The port-I/O bus of one VM.
pub struct Bus {
    pub serial: serial::SerialConsole,
    /// virtio-mmio devices by base address.
    pub mmio: Vec<(u64, virtio::SharedTransport)>,
    /// The last exit status vminit reported.
    pub status: Option<ExitStatus>,
    /// A value on the status port that vminit would never write.
    pub bad_status_writes: u64,
    limiter: RateLimiter,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl Bus {
    pub fn new(serial: serial::SerialConsole) -> Self {
        Bus {
            serial,
            mmio: Vec::new(),
            status: None,
            bad_status_writes: 0,
            limiter: RateLimiter::new(10, Duration::from_secs(1)),
        }
    }

    /// A guest `in` instruction.
    pub fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        match port {
            SERIAL_BASE..=0x3ff if data.len() == 1 => {
                data[0] = self.serial.read((port - SERIAL_BASE) as u8);
            }
            // i8042 status: input and output buffers empty.
            I8042_COMMAND | I8042_DATA => data.fill(0),
            _ => {
                data.fill(0xff);
                if !(0x80..=0x8f).contains(&port) {
                    self.unhandled("port read", u64::from(port));
                }
            }
        }
    }

    /// A guest `out` instruction.
    pub fn pio_write(&mut self, port: u16, data: &[u8]) -> Option<VmAction> {
        match port {
            SERIAL_BASE..=0x3ff if data.len() == 1 => {
                self.serial.write((port - SERIAL_BASE) as u8, data[0]);
                None
            }
            I8042_COMMAND if data == [I8042_RESET] => Some(VmAction::Reset),
            I8042_COMMAND | I8042_DATA => None,
            STATUS_PORT if data.len() == 4 => {
                let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                if value == STARTED {
                    // The first time only: a guest cannot move its boot.
                    let now = crate::worker::monotonic_ns();
                    let _ = WORKLOAD_STARTED_NS.compare_exchange(
                        0,
                        now,
                        std::sync::atomic::Ordering::Relaxed,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    return None;
                }
                match ExitStatus::decode(value) {
                    Some(s) => {
                        self.status = Some(s);
                        Some(VmAction::Exit)
                    }
                    None => {
                        self.bad_status_writes += 1;
                        self.unhandled("malformed status write", u64::from(value));
                        None
                    }
                }
            }
            // Port 0x80 is the POST-code/delay port; writes to it are normal.
            0x80..=0x8f => None,
            _ => {
                self.unhandled("port write", u64::from(port));
                None
            }
        }
    }

    fn mmio_device(&self, addr: u64, len: usize) -> Option<(u64, virtio::SharedTransport)> {
        self.mmio.iter().find_map(|(base, t)| {
            let off = addr.checked_sub(*base)?;
            (off.checked_add(len as u64)? <= virtio::mmio::MMIO_SIZE).then(|| (off, t.clone()))
        })
    }

    /// A guest read from MMIO space: a virtio device's window, or all ones.
    pub fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        match self.mmio_device(addr, data.len()) {
            Some((off, t)) => virtio::lock(&t).read(off, data),
            None => {
                data.fill(0xff);
                self.unhandled("MMIO read", addr);
            }
        }
    }

    /// A guest write to MMIO space.
    pub fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        match self.mmio_device(addr, data.len()) {
            Some((off, t)) => virtio::lock(&t).write(off, data),
            None => self.unhandled("MMIO write", addr),
        }
    }

    /// Logs an access no device handles, at a bounded rate.
    pub fn unhandled(&mut self, what: &str, addr: u64) {
        if self.limiter.allow() {
            tracing::debug!("guest {what} at {addr:#x} ignored");
        }
    }
}

/// Allows `burst` events per `period`; the rest are counted and dropped.
#[derive(Debug)]
pub struct RateLimiter {
    burst: u32,
    period: Duration,
    window_start: Instant,
    used: u32,
    pub dropped: u64,
}

/// Guest input a device refused: counted, and logged at most 10 times a
/// second so a hostile guest cannot flood the host's log.
#[derive(Debug)]
pub struct Refusals {
    what: &'static str,
    pub count: u64,
    limiter: RateLimiter,
}

impl Refusals {
    /// `what` starts each log line (`virtio-blk: request refused`).
    pub fn new(what: &'static str) -> Self {
        Refusals {
            what,
            count: 0,
            limiter: RateLimiter::new(10, Duration::from_secs(1)),
        }
    }

    pub fn note(&mut self, why: &dyn std::fmt::Display) {
        self.count += 1;
        if self.limiter.allow() {
            tracing::warn!("{}: {why} ({} so far)", self.what, self.count);
        }
    }
}

impl RateLimiter {
    pub fn new(burst: u32, period: Duration) -> Self {
        RateLimiter {
            burst,
            period,
            window_start: Instant::now(),
            used: 0,
            dropped: 0,
        }
    }

    pub fn allow(&mut self) -> bool {
        let now = Instant::now();
        if now.duration_since(self.window_start) >= self.period {
            self.window_start = now;
            self.used = 0;
        }
        if self.used < self.burst {
            self.used += 1;
            true
        } else {
            self.dropped += 1;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bus() -> (Bus, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
        let (serial, out) = serial::SerialConsole::for_test();
        (Bus::new(serial), out)
    }

    #[test]
    fn status_port_records_what_vminit_writes() {
        let (mut b, _) = bus();
        let v = ExitStatus::Exited { code: 7 }.encode().to_le_bytes();
        assert_eq!(b.pio_write(STATUS_PORT, &v), Some(VmAction::Exit));
        assert_eq!(b.status, Some(ExitStatus::Exited { code: 7 }));
    }

    #[test]
    fn the_started_mark_notes_the_time_once_and_ends_nothing() {
        let (mut b, _) = bus();
        let before = crate::worker::monotonic_ns();
        assert_eq!(b.pio_write(STATUS_PORT, &STARTED.to_le_bytes()), None);
        let noted = WORKLOAD_STARTED_NS.load(std::sync::atomic::Ordering::Relaxed);
        assert!(noted >= before, "{noted} < {before}");
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert_eq!(b.pio_write(STATUS_PORT, &STARTED.to_le_bytes()), None);
        assert_eq!(
            WORKLOAD_STARTED_NS.load(std::sync::atomic::Ordering::Relaxed),
            noted
        );
        assert_eq!((b.status, b.bad_status_writes), (None, 0));
        assert_eq!(ExitStatus::decode(STARTED), None);
    }

    #[test]
    fn hostile_status_writes_are_ignored() {
        let (mut b, _) = bus();
        b.pio_write(STATUS_PORT, &0xdead_beefu32.to_le_bytes());
        b.pio_write(STATUS_PORT, &[1]);
        b.pio_write(STATUS_PORT, &[1, 2]);
        assert_eq!(b.status, None);
        assert_eq!(b.bad_status_writes, 1);
    }

    #[test]
    fn i8042_reset_ends_the_vm_and_nothing_else_does() {
        let (mut b, _) = bus();
        assert_eq!(b.pio_write(0x64, &[0xfe]), Some(VmAction::Reset));
        assert_eq!(b.pio_write(0x64, &[0xfe, 0]), None);
        assert_eq!(b.pio_write(0x64, &[0xd1]), None);
        assert_eq!(b.pio_write(0x60, &[0xfe]), None);
        let mut d = [0xaa];
        b.pio_read(0x64, &mut d);
        assert_eq!(d, [0]);
    }

    #[test]
    fn unknown_ports_read_all_ones() {
        let (mut b, _) = bus();
        let mut d = [0u8; 4];
        b.pio_read(0x1234, &mut d);
        assert_eq!(d, [0xff; 4]);
        for _ in 0..10_000 {
            b.pio_write(0x1234, &[1, 2, 3, 4]);
        }
        assert!(b.limiter.dropped > 9_000);
    }

    #[test]
    fn serial_output_reaches_the_writer() {
        let (mut b, out) = bus();
        for c in b"hi\n" {
            b.pio_write(0x3f8, &[*c]);
        }
        assert_eq!(out.lock().unwrap().as_slice(), b"hi\n");
        // Multi-byte accesses to the UART are ignored, not a panic.
        b.pio_write(0x3f8, &[1, 2]);
        let mut d = [0u8; 2];
        b.pio_read(0x3fd, &mut d);
    }

    #[test]
    fn rate_limiter_refills() {
        let mut r = RateLimiter::new(2, Duration::from_millis(20));
        assert!(r.allow() && r.allow());
        assert!(!r.allow());
        std::thread::sleep(Duration::from_millis(25));
        assert!(r.allow());
    }
}
