//! `vminit`: PID 1 inside every steelcup microVM.
//!
//! Mounts the basics, reads the workload's configuration that vmmd put in the
//! initramfs, runs the workload with the console as its stdio, reaps every
//! process, and when the workload ends reports its exit status to the VMM on
//! the status port and resets the VM.

use nix::mount::MsFlags;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use steelcup_init::guest::{ExitStatus, GuestConfig, CONFIG_PATH, STATUS_PORT};
use steelcup_init::sys;

fn mounts() -> Result<(), sys::SysError> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    sys::mount("proc", Path::new("/proc"), "proc", nosuid, None)?;
    sys::mount("sysfs", Path::new("/sys"), "sysfs", nosuid, None)?;
    sys::mount(
        "devtmpfs",
        Path::new("/dev"),
        "devtmpfs",
        MsFlags::MS_NOSUID,
        None,
    )?;
    sys::mount(
        "devpts",
        Path::new("/dev/pts"),
        "devpts",
        MsFlags::MS_NOSUID,
        Some("ptmxmode=0666"),
    )?;
    sys::mount(
        "tmpfs",
        Path::new("/run"),
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None,
    )?;
    sys::mount(
        "tmpfs",
        Path::new("/tmp"),
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        None,
    )?;
    Ok(())
}

fn fail(msg: &str, errno: i32) -> ExitStatus {
    eprintln!("vminit: {msg}");
    ExitStatus::StartFailed {
        errno: u8::try_from(errno).unwrap_or(u8::MAX),
    }
}

fn run() -> ExitStatus {
    if let Err(e) = mounts() {
        return fail(&format!("{e}: {}", e_source(&e)), libc::EIO);
    }
    let config: GuestConfig = match std::fs::read(CONFIG_PATH) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(c) => c,
            Err(e) => return fail(&format!("{CONFIG_PATH}: {e}"), libc::EINVAL),
        },
        Err(e) => {
            return fail(
                &format!("{CONFIG_PATH}: {e}"),
                e.raw_os_error().unwrap_or(libc::EIO),
            )
        }
    };
    if let Some(h) = &config.hostname {
        let _ = sys::set_hostname(h);
    }
    let _ = sys::link_up("lo");
    let Some(program) = config.cmd.first() else {
        return fail("no command to run", libc::EINVAL);
    };
    let mut cmd = Command::new(program);
    cmd.args(&config.cmd[1..])
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .envs(&config.env)
        .process_group(0);
    if let Some(dir) = &config.workdir {
        cmd.current_dir(dir);
    }
    let main = match cmd.spawn() {
        Ok(child) => Pid::from_raw(child.id() as i32),
        Err(e) => {
            return fail(
                &format!("cannot run {program}: {e}"),
                e.raw_os_error().unwrap_or(libc::ENOENT),
            )
        }
    };
    // Reap everything; the workload's own exit decides the VM's status.
    loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == main => {
                return ExitStatus::Exited { code: code as u8 }
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == main => {
                return ExitStatus::Killed { signal: sig as u8 }
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return fail(&format!("waitpid: {e}"), e as i32),
        }
    }
}

fn e_source(e: &dyn std::error::Error) -> String {
    e.source().map(|s| s.to_string()).unwrap_or_default()
}

fn main() {
    if !sys::is_pid1() {
        eprintln!("vminit: must run as PID 1 inside a steelcup microVM");
        std::process::exit(2);
    }
    let status = std::panic::catch_unwind(run).unwrap_or(ExitStatus::StartFailed { errno: 0 });
    // Give the rest of the guest's processes a moment, then end them.
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(20));
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    nix::unistd::sync();
    // The VMM ends the VM on this write; the reset below is the fallback.
    if let Err(e) = sys::outl(STATUS_PORT, status.encode()) {
        eprintln!("vminit: cannot report exit status: {e}: {}", e_source(&e));
    }
    let _ = sys::power(sys::PowerAction::Reboot);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
