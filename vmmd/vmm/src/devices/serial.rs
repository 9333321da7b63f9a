//! The serial console: a 16550 UART from vm-superio whose interrupt is an
//! irqfd and whose output goes to a writer (the worker's stdout).

use std::io::Write;
use std::sync::{Arc, Mutex};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// The serial port's interrupt: a write to the eventfd KVM raises as GSI 4.
#[derive(Debug)]
pub struct IrqTrigger(pub Option<EventFd>);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), std::io::Error> {
        match &self.0 {
            Some(evt) => evt.write(1),
            None => Ok(()),
        }
    }
}

/// Where guest output goes.
pub type Output = Box<dyn Write + Send>;

/// The console UART.
pub struct SerialConsole {
    uart: Serial<IrqTrigger, vm_superio::serial::NoEvents, Output>,
}

impl SerialConsole {
    pub fn new(irq: Option<EventFd>, out: Output) -> Self {
        SerialConsole {
            uart: Serial::new(IrqTrigger(irq), out),
        }
    }

    /// A console writing into a shared buffer, for tests.
    pub fn for_test() -> (Self, Arc<Mutex<Vec<u8>>>) {
        #[derive(Clone)]
        struct Shared(Arc<Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0
                    .lock()
                    .map_err(|_| std::io::ErrorKind::Other)?
                    .extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Arc::new(Mutex::new(Vec::new()));
        (Self::new(None, Box::new(Shared(buf.clone()))), buf)
    }

    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    pub fn write(&mut self, offset: u8, value: u8) {
        // An error here is the output writer failing (vmmd gone); the guest
        // must not notice, so it is dropped.
        let _ = self.uart.write(offset, value);
    }
}

impl std::fmt::Debug for SerialConsole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialConsole").finish_non_exhaustive()
    }
}
