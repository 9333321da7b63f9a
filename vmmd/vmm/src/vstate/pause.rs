//! Pausing a running VM: every vCPU leaves `KVM_RUN` and parks until resumed.
//!
//! # Design
//! A [`PauseGate`] is shared by the vCPU threads and the worker's control
//! thread. Each vCPU passes through [`PauseGate::checkpoint`] before every
//! `KVM_RUN`. [`PauseGate::pause`] raises the flag, then kicks the vCPU
//! threads out of `KVM_RUN` with [`KICK_SIGNAL`] (a no-op handler installed
//! without `SA_RESTART`, so the ioctl returns `EINTR`) until all of them
//! are parked. The kick repeats every millisecond, which closes the race of
//! a vCPU that checked the flag just before it was raised and entered
//! `KVM_RUN` just after the kick: the next kick finds it there. Device
//! work goes on while paused (queues the guest filled before are served),
//! as in Firecracker; the guest sees only lost time.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The signal that kicks a vCPU out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

/// Installs the no-op handler for [`kick_signal`]; call once per process,
/// before any vCPU thread runs.
pub fn install_kick_handler() -> std::io::Result<()> {
    extern "C" fn on_kick(_: libc::c_int) {}
    // SAFETY: a zeroed sigaction is a valid starting value; the handler is
    // an `extern "C"` function that touches nothing, so it is async-signal
    // safe, and SA_RESTART is left out on purpose.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_kick as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[derive(Debug, Default)]
struct GateState {
    paused: bool,
    parked: usize,
}

/// Shared pause state of one VM's vCPUs.
#[derive(Debug, Default)]
pub struct PauseGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

impl PauseGate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called by a vCPU thread before each `KVM_RUN`: parks while paused.
    pub fn checkpoint(&self) {
        let mut s = self.lock();
        if !s.paused {
            return;
        }
        s.parked += 1;
        self.changed.notify_all();
        while s.paused {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.parked -= 1;
    }

    /// Stops all `vcpus` (kicked through `threads`, their pthread ids);
    /// returns once every one is parked, or an error after `timeout`.
    pub fn pause(&self, threads: &[libc::pthread_t], timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        s.paused = true;
        while s.parked < threads.len() {
            if Instant::now() >= deadline {
                let parked = s.parked;
                s.paused = false;
                self.changed.notify_all();
                return Err(format!(
                    "only {parked} of {} vCPUs stopped within {timeout:?}",
                    threads.len()
                ));
            }
            for t in threads {
                // SAFETY: `t` is the id of a vCPU thread of this process,
                // which stays alive (joinable, never detached) while the
                // worker runs; the signal has a handler installed.
                unsafe {
                    libc::pthread_kill(*t, kick_signal());
                }
            }
            s = self
                .changed
                .wait_timeout(s, Duration::from_millis(1))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    /// Lets the parked vCPUs run again.
    pub fn resume(&self) {
        self.lock().paused = false;
        self.changed.notify_all();
    }

    /// Whether the VM is paused (or being paused).
    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::thread::JoinHandleExt;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// Threads standing in for vCPUs: a checkpoint, then a blocking call
    /// that only a kick interrupts (as `KVM_RUN` in a halted guest).
    #[test]
    fn pause_parks_every_thread_and_resume_releases_them() {
        install_kick_handler().unwrap();
        let gate = Arc::new(PauseGate::default());
        let progress = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let handles: Vec<_> = (0..3)
            .map(|_| {
                let (gate, progress, stop) = (gate.clone(), progress.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        gate.checkpoint();
                        progress.fetch_add(1, Ordering::SeqCst);
                        // Blocks for up to 10 s unless a signal interrupts it.
                        let ts = libc::timespec {
                            tv_sec: 10,
                            tv_nsec: 0,
                        };
                        // SAFETY: nanosleep with valid pointers.
                        unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
                    }
                })
            })
            .collect();
        let threads: Vec<libc::pthread_t> = handles.iter().map(|h| h.as_pthread_t()).collect();
        std::thread::sleep(Duration::from_millis(50));
        gate.pause(&threads, Duration::from_secs(5)).unwrap();
        assert!(gate.is_paused());
        let at_pause = progress.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            progress.load(Ordering::SeqCst),
            at_pause,
            "a parked thread ran"
        );
        gate.resume();
        let t0 = Instant::now();
        while progress.load(Ordering::SeqCst) < at_pause + 3 {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "threads did not resume"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        // Pause again (the kick has to find them inside the blocking call).
        gate.pause(&threads, Duration::from_secs(5)).unwrap();
        stop.store(true, Ordering::SeqCst);
        gate.resume();
        // Kick until each has left its sleep and seen `stop`.
        while handles.iter().any(|h| !h.is_finished()) {
            for h in handles.iter().filter(|h| !h.is_finished()) {
                // SAFETY: as in `pause`: the threads are alive until joined.
                unsafe { libc::pthread_kill(h.as_pthread_t(), kick_signal()) };
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        for h in handles {
            h.join().unwrap();
        }
    }

    #[test]
    fn a_pause_that_cannot_complete_times_out_and_leaves_the_vm_running() {
        let gate = PauseGate::default();
        // A "vCPU" that never reaches a checkpoint: this thread itself.
        // SAFETY: pthread_self is always valid.
        let me = unsafe { libc::pthread_self() };
        install_kick_handler().unwrap();
        let err = gate.pause(&[me], Duration::from_millis(20)).unwrap_err();
        assert!(err.contains("only 0 of 1 vCPUs"), "{err}");
        assert!(!gate.is_paused());
    }
}
