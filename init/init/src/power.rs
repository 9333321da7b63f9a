//! The power button: pressing it (or QEMU's `system_powerdown`) powers the
//! machine off in order, as on any server OS.
//!
//! # Design
//! A thread watches `/dev/input/event*` (ACPI `button` + `evdev` modules) for
//! `KEY_POWER` and sends SIGPWR to PID 1, whose main loop turns it into an
//! orderly power-off. New event devices are picked up as they appear.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

const EV_KEY: u16 = 1;
const KEY_POWER: u16 = 116;
/// `struct input_event` on x86_64: timeval (16), type (2), code (2), value (4).
const EVENT_SIZE: usize = 24;

/// Starts watching for the power button.
pub fn watch() {
    let spawned = std::thread::Builder::new()
        .name("power-button".into())
        .spawn(|| {
            let mut watched = BTreeSet::new();
            loop {
                if let Ok(rd) = std::fs::read_dir("/dev/input") {
                    for e in rd.flatten() {
                        let path = e.path();
                        let is_event = path
                            .file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with("event"));
                        if is_event && watched.insert(path.clone()) {
                            watch_device(path);
                        }
                    }
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("power button: cannot start watcher: {e}");
    }
}

fn watch_device(path: PathBuf) {
    let _ = std::thread::Builder::new()
        .name("power-button-dev".into())
        .spawn(move || {
            let Ok(mut f) = std::fs::File::open(&path) else {
                return;
            };
            let mut buf = [0u8; EVENT_SIZE];
            while f.read_exact(&mut buf).is_ok() {
                let kind = u16::from_ne_bytes([buf[16], buf[17]]);
                let code = u16::from_ne_bytes([buf[18], buf[19]]);
                let value = i32::from_ne_bytes([buf[20], buf[21], buf[22], buf[23]]);
                if is_power_press(kind, code, value) {
                    tracing::info!("power button pressed ({})", path.display());
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::this(),
                        nix::sys::signal::Signal::SIGPWR,
                    );
                }
            }
        });
}

fn is_power_press(kind: u16, code: u16, value: i32) -> bool {
    kind == EV_KEY && code == KEY_POWER && value == 1
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_a_power_key_press_counts() {
        assert!(super::is_power_press(1, 116, 1));
        assert!(!super::is_power_press(1, 116, 0));
        assert!(!super::is_power_press(1, 30, 1));
        assert!(!super::is_power_press(0, 116, 1));
    }
}
