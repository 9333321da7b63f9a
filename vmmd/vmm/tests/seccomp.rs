//! The worker's seccomp filter, applied in a forked child on this host: the
//! calls a running VM makes pass; a forbidden one kills the process.

#![allow(clippy::unwrap_used)] // tests fail by panicking

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult};

/// One fork at a time (see [`seccomp_filter`]).
static FORK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Forks a child that installs the worker filter, writes a byte (allowed),
/// then runs `forbidden`; returns how the child ended.
fn in_filtered_child(forbidden: fn()) -> WaitStatus {
    let _one = FORK.lock().unwrap_or_else(|p| p.into_inner());
    let program = steelcup_vmm::jail::seccomp::filter().unwrap();
    let (r, w) = nix::unistd::pipe().unwrap();
    // SAFETY: the child only calls async-signal-safe functions (prctl and
    // seccomp inside apply_filter on a program built before the fork, write,
    // the forbidden syscall, _exit).
    match unsafe { fork() }.unwrap() {
        ForkResult::Child => {
            if seccompiler::apply_filter(&program).is_err() {
                // SAFETY: ends the forked child at once; no Rust state is used after.
                unsafe { libc::_exit(90) };
            }
            let fd = std::os::fd::AsRawFd::as_raw_fd(&w);
            // SAFETY: a write of one byte from a static buffer to our pipe.
            if unsafe { libc::write(fd, b"x".as_ptr().cast(), 1) } != 1 {
                // SAFETY: ends the forked child at once; no Rust state is used after.
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

/// Like [`in_filtered_child`], with the filter built for the child's own
/// pid (the `tgkill` rule names the process): the parent builds it after
/// the fork and sends its instructions over a pipe into a buffer the child
/// allocated before.
fn in_child_with_own_filter(call: fn() -> bool) -> WaitStatus {
    let _one = FORK.lock().unwrap_or_else(|p| p.into_inner());
    let len = steelcup_vmm::jail::seccomp::filter().unwrap().len();
    let mut buf: Vec<libc::sock_filter> = vec![
        libc::sock_filter {
            code: 0,
            jt: 0,
            jf: 0,
            k: 0
        };
        len
    ];
    let bytes = len * std::mem::size_of::<libc::sock_filter>();
    let (r, w) = nix::unistd::pipe().unwrap();
    // SAFETY: the child only reads a pipe into memory it owns, calls prctl
    // and seccomp, the call under test, and _exit.
    match unsafe { fork() }.unwrap() {
        ForkResult::Child => {
            let fd = std::os::fd::AsRawFd::as_raw_fd(&r);
            let mut got = 0;
            while got < bytes {
                // SAFETY: reads into the child's own buffer, within its size.
                let n = unsafe {
                    libc::read(
                        fd,
                        buf.as_mut_ptr().cast::<u8>().add(got).cast(),
                        bytes - got,
                    )
                };
                if n <= 0 {
                    // SAFETY: ends the forked child at once; no Rust state is used after.
                    unsafe { libc::_exit(92) };
                }
                got += n as usize;
            }
            let prog = libc::sock_fprog {
                len: len as u16,
                filter: buf.as_mut_ptr(),
            };
            // SAFETY: prctl and seccomp with a valid program.
            unsafe {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                if libc::syscall(libc::SYS_seccomp, 1, 0, &prog as *const libc::sock_fprog) != 0 {
                    libc::_exit(90);
                }
            }
            let ok = call();
            // SAFETY: _exit is allowed (exit_group).
            unsafe { libc::_exit(if ok { 0 } else { 1 }) }
        }
        ForkResult::Parent { child } => {
            drop(r);
            let program = steelcup_vmm::jail::seccomp::filter_for(child.as_raw() as u32).unwrap();
            assert_eq!(program.len(), len);
            // SAFETY: sock_filter is plain data; the slice covers the vector.
            let raw = unsafe { std::slice::from_raw_parts(program.as_ptr().cast::<u8>(), bytes) };
            nix::unistd::write(&w, raw).unwrap();
            drop(w);
            waitpid(child, None).unwrap()
        }
    }
}

fn kicking_its_own_vcpu_threads_passes() {
    // tgkill(own pid, own main thread, 0): the pause kick, minus the signal.
    // SAFETY: tgkill with signal 0 to this process's own thread.
    let status = in_child_with_own_filter(|| unsafe {
        libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::getpid(), 0) == 0
    });
    assert_eq!(status, WaitStatus::Exited(status.pid().unwrap(), 0));
}

fn signalling_another_process_kills_the_worker() {
    // SAFETY: tgkill with signal 0 to PID 1; the child dies at the call.
    let status = in_child_with_own_filter(|| unsafe {
        libc::syscall(libc::SYS_tgkill, 1, 1, 0);
        true
    });
    assert!(killed_by_sigsys(status), "{status:?}");
}

fn killed_by_sigsys(status: WaitStatus) -> bool {
    matches!(
        status,
        WaitStatus::Signaled(_, nix::sys::signal::Signal::SIGSYS, _)
    )
}

fn allowed_calls_pass() {
    let status = in_filtered_child(|| {});
    assert_eq!(status, WaitStatus::Exited(status.pid().unwrap(), 0));
}

fn a_network_socket_kills_the_worker() {
    // SAFETY: socket(2) with constant arguments; the child dies at the call.
    let status = in_filtered_child(|| unsafe {
        libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
    });
    assert!(killed_by_sigsys(status), "{status:?}");
}

fn an_ioctl_other_than_kvm_run_kills_the_worker() {
    // SAFETY: an ioctl on stdin; the child dies at the call.
    let status = in_filtered_child(|| unsafe {
        libc::ioctl(0, libc::FIONREAD, std::ptr::null_mut::<libc::c_int>());
    });
    assert!(killed_by_sigsys(status), "{status:?}");
}

fn opening_a_file_kills_the_worker() {
    // SAFETY: openat(2) of a constant path; the child dies at the call.
    let status = in_filtered_child(|| unsafe {
        libc::openat(libc::AT_FDCWD, c"/etc/passwd".as_ptr(), libc::O_RDONLY);
    });
    assert!(killed_by_sigsys(status), "{status:?}");
}

fn the_calls_vsock_makes_pass() {
    let _one = FORK.lock().unwrap_or_else(|p| p.into_inner());
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    let dir = std::env::temp_dir().join(format!("steelcup-seccomp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("vm.sock");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let mut client = UnixStream::connect(&path).unwrap();
    client.write_all(b"CONNECT 1\n").unwrap();
    let program = steelcup_vmm::jail::seccomp::filter().unwrap();
    // SAFETY: the child runs the calls under test and _exits; the parent
    // only waits.
    match unsafe { fork() }.unwrap() {
        ForkResult::Child => {
            if seccompiler::apply_filter(&program).is_err() {
                // SAFETY: ends the forked child at once; no Rust state is used after.
                unsafe { libc::_exit(90) };
            }
            let (mut s, _) = listener.accept().unwrap();
            s.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 16];
            let _ = s.read(&mut buf);
            let _ = s.write(b"OK 1\n");
            let _ = s.shutdown(std::net::Shutdown::Write);
            let again = UnixStream::connect(&path).unwrap();
            drop(again);
            // SAFETY: ends the forked child at once; no Rust state is used after.
            unsafe { libc::_exit(0) }
        }
        ForkResult::Parent { child } => {
            let status = waitpid(child, None).unwrap();
            assert_eq!(status, WaitStatus::Exited(child, 0), "{status:?}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The worker's control thread receives a warm VM's root image on its
/// control socket (`recvmsg` with `SCM_RIGHTS`) and virtio-blk reads it.
fn a_disk_image_received_on_the_control_socket_is_read() {
    use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
    use std::os::fd::AsRawFd;
    let _one = FORK.lock().unwrap_or_else(|p| p.into_inner());
    let (vmmd, worker) = std::os::unix::net::UnixStream::pair().unwrap();
    let image = std::fs::File::open("/proc/self/exe").unwrap();
    let line = b"attach root 4096\n";
    sendmsg::<()>(
        vmmd.as_raw_fd(),
        &[std::io::IoSlice::new(line)],
        &[ControlMessage::ScmRights(&[image.as_raw_fd()])],
        MsgFlags::empty(),
        None,
    )
    .unwrap();
    drop(image);
    let program = steelcup_vmm::jail::seccomp::filter().unwrap();
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 2]);
    // SAFETY: the child runs the calls under test and _exits; the parent
    // only waits.
    match unsafe { fork() }.unwrap() {
        ForkResult::Child => {
            if seccompiler::apply_filter(&program).is_err() {
                // SAFETY: ends the forked child at once; no Rust state is used after.
                unsafe { libc::_exit(90) };
            }
            let mut buf = [0u8; 64];
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let Ok(msg) = recvmsg::<()>(
                worker.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) else {
                // SAFETY: ends the forked child at once; no Rust state is used after.
                unsafe { libc::_exit(91) }
            };
            let mut fd = -1;
            for c in msg.cmsgs().into_iter().flatten() {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    fd = fds[0];
                }
            }
            let mut head = [0u8; 4];
            let iov = libc::iovec {
                iov_base: head.as_mut_ptr().cast(),
                iov_len: 4,
            };
            // SAFETY: preadv (as virtio-blk reads) of 4 bytes into our
            // buffer from the received fd.
            let n = unsafe { libc::preadv(fd, &iov, 1, 0) };
            let code = if n == 4 && head == *b"\x7fELF" { 0 } else { 92 };
            // SAFETY: ends the forked child at once; no Rust state is used after.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            let status = waitpid(child, None).unwrap();
            assert_eq!(status, WaitStatus::Exited(child, 0), "{status:?}");
        }
    }
}

/// Forks a child with a second thread (started before the filter, as the
/// worker's are), filters every thread, then runs `work` on the second
/// thread and `then` on the first; returns how the child ended.
fn in_filtered_threads(work: fn() -> bool, then: fn()) -> WaitStatus {
    let _one = FORK.lock().unwrap_or_else(|p| p.into_inner());
    let program = steelcup_vmm::jail::seccomp::filter().unwrap();
    // SAFETY: the child spawns a thread, filters every thread, runs the
    // calls under test and _exits; the parent only waits.
    match unsafe { fork() }.unwrap() {
        ForkResult::Child => {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
            let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
            let t = std::thread::spawn(move || {
                let _ = ready_tx.send(());
                let _ = go_rx.recv();
                work()
            });
            let _ = ready_rx.recv();
            // Let the thread finish its own start-up calls.
            std::thread::sleep(std::time::Duration::from_millis(50));
            if seccompiler::apply_filter_all_threads(&program).is_err() {
                // SAFETY: ends the forked child at once; no Rust state is used after.
                unsafe { libc::_exit(90) };
            }
            let _ = go_tx.send(());
            if !t.join().unwrap_or(false) {
                // SAFETY: ends the forked child at once; no Rust state is used after.
                unsafe { libc::_exit(91) };
            }
            then();
            // SAFETY: ends the forked child at once; no Rust state is used after.
            unsafe { libc::_exit(0) }
        }
        ForkResult::Parent { child } => waitpid(child, None).unwrap(),
    }
}

fn allocating_on_another_thread_passes() {
    let status = in_filtered_threads(
        || {
            // Enough to grow this thread's malloc arena several times.
            let keep: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8; 96 << 10]).collect();
            keep.len() == 64
        },
        || {},
    );
    assert_eq!(status, WaitStatus::Exited(status.pid().unwrap(), 0));
}

fn making_memory_executable_kills_the_worker() {
    let status = in_filtered_threads(
        || true,
        || {
            let page = vec![0u8; 8192];
            let addr = ((page.as_ptr() as usize + 4095) & !4095) as *mut libc::c_void;
            // SAFETY: mprotect of a page inside our own buffer; the child
            // dies at the call.
            unsafe { libc::mprotect(addr, 4096, libc::PROT_READ | libc::PROT_EXEC) };
        },
    );
    assert!(killed_by_sigsys(status), "{status:?}");
}

/// Every case in one test, one after another: a child forked while other
/// test threads run inherits their half-done allocator state, and a filtered
/// child would then die for calls that are not the ones under test. (The
/// real worker is a freshly exec'd process and never has that problem.)
#[test]
fn seccomp_filter() {
    allowed_calls_pass();
    a_network_socket_kills_the_worker();
    an_ioctl_other_than_kvm_run_kills_the_worker();
    opening_a_file_kills_the_worker();
    the_calls_vsock_makes_pass();
    a_disk_image_received_on_the_control_socket_is_read();
    allocating_on_another_thread_passes();
    making_memory_executable_kills_the_worker();
    kicking_its_own_vcpu_threads_passes();
    signalling_another_process_kills_the_worker();
}
