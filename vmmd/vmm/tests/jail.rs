//! The worker's mount-namespace jail, entered by a forked child on this
//! host: afterwards only the kept directory is there, writable, on a
//! read-only root. Needs root (CAP_SYS_ADMIN for a mount namespace) and a
//! root that is a mount point (not a chroot); says so and skips without. The appliance covers the same in
//! `qemu-tests/tests/microvms.rs` (a real worker's /proc/PID/root).

#![allow(clippy::unwrap_used)] // tests fail by panicking

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult};
use std::path::Path;

/// Exit codes of the child, one per check.
const CHECKS: &[&str] = &[
    "ok",
    "enter failed",
    "/etc/passwd is still visible",
    "the kept file is missing",
    "the kept directory is not writable",
    "the root is writable",
    "the host does not see what was written in the kept directory",
];

#[test]
fn the_jail_holds_only_the_kept_directory() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP: the mount-namespace jail needs root");
        return;
    }
    let base = std::env::temp_dir().join(format!("steelcup-jail-test-{}", std::process::id()));
    let (scratch, keep) = (base.join("scratch"), base.join("run/vsock"));
    std::fs::create_dir_all(&scratch).unwrap();
    std::fs::create_dir_all(&keep).unwrap();
    std::fs::write(keep.join("vm.sock_52"), b"listener").unwrap();

    // The child reports why the jail failed through a pipe (its stderr is
    // the test harness's capture, which a forked child cannot reach).
    let (r, w) = nix::unistd::pipe().unwrap();
    // SAFETY: the child runs the jail code and exits with _exit; the test
    // binary's other threads are idle while this single test forks.
    match unsafe { fork() }.unwrap() {
        ForkResult::Child => {
            drop(r);
            let code = child(&scratch, &keep, std::fs::File::from(w));
            // SAFETY: ends the child without running the parent's atexit.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            drop(w);
            let status = waitpid(child, None).unwrap();
            let mut why = String::new();
            let _ = std::io::Read::read_to_string(&mut std::fs::File::from(r), &mut why);
            let written = keep.join("from-inside");
            let seen = written.exists();
            let _ = std::fs::remove_dir_all(&base);
            match status {
                WaitStatus::Exited(_, 7) => {
                    eprintln!("SKIP: no mount-namespace jail here {why}: no CAP_SYS_ADMIN, or a chroot whose root is no mount point; qemu-tests/tests/microvms.rs checks a real worker's jail");
                }
                WaitStatus::Exited(_, 0) => assert!(seen, "{}", CHECKS[6]),
                WaitStatus::Exited(_, c) => {
                    panic!("{} {why}", CHECKS.get(c as usize).unwrap_or(&"?"))
                }
                other => panic!("child ended {other:?}"),
            }
        }
    }
}

fn child(scratch: &Path, keep: &Path, mut report: std::fs::File) -> i32 {
    if let Err(e) = steelcup_vmm::jail::mount::enter(scratch, keep) {
        let why = format!("({})", steelcup_vmm::worker::error_chain(&e));
        let _ = std::io::Write::write_all(&mut report, why.as_bytes());
        return if e.is_unsupported() { 7 } else { 1 };
    }
    if Path::new("/etc/passwd").exists() {
        return 2;
    }
    if std::fs::read(keep.join("vm.sock_52")).ok().as_deref() != Some(b"listener".as_slice()) {
        return 3;
    }
    if std::fs::write(keep.join("from-inside"), b"x").is_err() {
        return 4;
    }
    if std::fs::create_dir("/new-dir").is_ok() {
        return 5;
    }
    0
}
