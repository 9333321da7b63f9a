//! The worker's seccomp filter, applied in a forked child on this host: the
//! calls a running VM makes pass; a forbidden one kills the process.

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult};

/// Forks a child that installs the worker filter, writes a byte (allowed),
/// then runs `forbidden`; returns how the child ended.
fn in_filtered_child(forbidden: fn()) -> WaitStatus {
    let program = vmmd::jail::seccomp::filter().unwrap();
    let (r, w) = nix::unistd::pipe().unwrap();
    // SAFETY: the child only calls async-signal-safe functions (prctl and
    // seccomp inside apply_filter on a program built before the fork, write,
    // the forbidden syscall, _exit).
    match unsafe { fork() }.unwrap() {
        ForkResult::Child => {
            if seccompiler::apply_filter(&program).is_err() {
                unsafe { libc::_exit(90) };
            }
            let fd = std::os::fd::AsRawFd::as_raw_fd(&w);
            // SAFETY: a write of one byte from a static buffer to our pipe.
            if unsafe { libc::write(fd, b"x".as_ptr().cast(), 1) } != 1 {
                unsafe { libc::_exit(91) };
            }
            forbidden();
            // SAFETY: _exit is async-signal-safe and allowed (exit_group).
            unsafe { libc::_exit(0) }
        }
        ForkResult::Parent { child } => {
            drop(w);
            let status = waitpid(child, None).unwrap();
            let mut b = [0u8; 1];
            assert_eq!(
                nix::unistd::read(&r, &mut b).unwrap(),
                1,
                "the allowed write must go through"
            );
            status
        }
    }
}

fn killed_by_sigsys(status: WaitStatus) -> bool {
    matches!(
        status,
        WaitStatus::Signaled(_, nix::sys::signal::Signal::SIGSYS, _)
    )
}

#[test]
fn allowed_calls_pass() {
    let status = in_filtered_child(|| {});
    assert_eq!(status, WaitStatus::Exited(status.pid().unwrap(), 0));
}

#[test]
fn a_network_socket_kills_the_worker() {
    // SAFETY: socket(2) with constant arguments; the child dies at the call.
    let status = in_filtered_child(|| unsafe {
        libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
    });
    assert!(killed_by_sigsys(status), "{status:?}");
}

#[test]
fn an_ioctl_other_than_kvm_run_kills_the_worker() {
    // SAFETY: an ioctl on stdin; the child dies at the call.
    let status = in_filtered_child(|| unsafe {
        libc::ioctl(0, libc::FIONREAD, std::ptr::null_mut::<libc::c_int>());
    });
    assert!(killed_by_sigsys(status), "{status:?}");
}

#[test]
fn opening_a_file_kills_the_worker() {
    // SAFETY: openat(2) of a constant path; the child dies at the call.
    let status = in_filtered_child(|| unsafe {
        libc::openat(libc::AT_FDCWD, c"/etc/passwd".as_ptr(), libc::O_RDONLY);
    });
    assert!(killed_by_sigsys(status), "{status:?}");
}
