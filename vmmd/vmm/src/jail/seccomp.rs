//! The worker's seccomp filter: the syscalls a running VM needs, and no more.
//!
//! # Design
//! The list below is data, reviewed line by line: each syscall says why the
//! worker needs it once the VM is built. Everything set up before (opening
//! /dev/kvm, creating the VM, vCPUs, memory, irqfds, threads) happens before
//! the filter is installed; after it, `ioctl` is allowed only with
//! `KVM_RUN` (and `KVM_REINJECT_CONTROL`, which the control thread makes
//! once while the guest starts, `FIONBIO` for vsock's new host
//! connections, and the six requests virtio-net on vhost-net makes when
//! the guest's driver starts or resets it, listed with why in
//! [`crate::devices::virtio::vhost_net::runtime_ioctls`]) and `socket`
//! only for Unix sockets. Any other call kills the whole worker process (and
//! only it: vmmd and the other VMs run on). The filter is installed on every thread
//! at once (TSYNC) while the vCPU threads wait on a barrier, so no guest
//! instruction runs unfiltered.

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};
use std::collections::BTreeMap;

/// `KVM_RUN` (`_IO(KVMIO, 0x80)`).
pub const KVM_RUN: u64 = 0xae80;
/// `FIONBIO`: vsock making a new host connection non-blocking.
pub const FIONBIO: u64 = 0x5421;

/// Syscalls a running worker makes, and why.
pub const ALLOWED: &[(i64, &str)] = &[
    (
        libc::SYS_read,
        "read: draining ioeventfds on the device thread, rare std I/O paths",
    ),
    (
        libc::SYS_write,
        "write: guest serial output to stdout, irqfd eventfd writes, the report on stderr",
    ),
    (
        libc::SYS_futex,
        "futex: the device bus mutex, the vCPU stop channel, the start barrier",
    ),
    (libc::SYS_sched_yield, "sched_yield: lock contention"),
    (libc::SYS_mmap, "mmap: the allocator"),
    (libc::SYS_munmap, "munmap: the allocator"),
    (libc::SYS_mremap, "mremap: the allocator growing a buffer"),
    (libc::SYS_brk, "brk: the allocator"),
    (libc::SYS_madvise, "madvise: the allocator returning memory"),
    (
        libc::SYS_rt_sigreturn,
        "rt_sigreturn: returning from a signal handler",
    ),
    (
        libc::SYS_rt_sigprocmask,
        "rt_sigprocmask: std at thread exit",
    ),
    (
        libc::SYS_sigaltstack,
        "sigaltstack: std tearing down a thread's signal stack",
    ),
    (
        libc::SYS_clock_gettime,
        "clock_gettime: the log rate limiter when the vDSO is not used",
    ),
    (
        libc::SYS_close,
        "close: the control thread's VM descriptor once PIT replay is off, descriptors at exit",
    ),
    (
        libc::SYS_epoll_wait,
        "epoll_wait: the device thread waiting for queue notifications",
    ),
    (
        libc::SYS_epoll_pwait,
        "epoll_pwait: the same, where libc implements epoll_wait with it",
    ),
    (
        libc::SYS_preadv,
        "preadv: virtio-blk reads straight into the guest's buffers",
    ),
    (
        libc::SYS_pwritev,
        "pwritev: virtio-blk writes straight from the guest's buffers",
    ),
    (
        libc::SYS_fallocate,
        "fallocate: virtio-blk discard and write-zeroes on a writable disk",
    ),
    (libc::SYS_fdatasync, "fdatasync: virtio-blk flush"),
    (
        libc::SYS_io_uring_enter,
        "io_uring_enter: virtio-blk submitting requests to its ring (set up before the filter) and waiting for them on reset",
    ),
    (
        libc::SYS_epoll_ctl,
        "epoll_ctl: vsock adding and removing its host connections",
    ),
    (
        libc::SYS_accept4,
        "accept4: vsock accepting a host client on the VM's socket",
    ),
    (
        libc::SYS_connect,
        "connect: vsock connecting a guest to {uds}_PORT",
    ),
    (
        libc::SYS_recvfrom,
        "recvfrom: vsock reading a host connection (std reads sockets with recv)",
    ),
    (
        libc::SYS_sendto,
        "sendto: vsock writing a host connection (std sends with MSG_NOSIGNAL)",
    ),
    (
        libc::SYS_shutdown,
        "shutdown: vsock passing on a guest's half-close",
    ),
    (
        libc::SYS_getpid,
        "getpid: pthread_kill naming this process when pausing vCPUs",
    ),
    (
        libc::SYS_recvmsg,
        "recvmsg: vmmd's control commands on stdin, a warm VM's root image passed with `attach`",
    ),
    (libc::SYS_exit, "exit: a vCPU thread ending"),
    (libc::SYS_exit_group, "exit_group: the worker ending"),
];

/// Builds the filter: [`ALLOWED`] plus `ioctl` with `KVM_RUN`,
/// `KVM_REINJECT_CONTROL` (PIT tick replay off, see
/// [`crate::vstate::vm::stop_pit_replay`]; it touches only this VM) or `FIONBIO`,
/// `socket` for `AF_UNIX` and `tgkill` within this process; anything else
/// kills the process. Build it in the process that installs it (the
/// `tgkill` rule names this process).
pub fn filter() -> Result<BpfProgram, seccompiler::BackendError> {
    filter_for(std::process::id())
}

/// The filter for process `pid` (tests build it for a forked child).
pub fn filter_for(pid: u32) -> Result<BpfProgram, seccompiler::BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|(nr, _)| (*nr, vec![])).collect();
    // Allowed when argument `arg` compares with `value` by `op`.
    let when =
        |arg: u8, op: SeccompCmpOp, value: u64| -> Result<SeccompRule, seccompiler::BackendError> {
            SeccompRule::new(vec![SeccompCondition::new(
                arg,
                SeccompCmpArgLen::Dword,
                op,
                value,
            )?])
        };
    let eq = |arg: u8, value: u64| when(arg, SeccompCmpOp::Eq, value);
    let mut ioctls = vec![
        eq(1, KVM_RUN)?,
        eq(1, crate::vstate::vm::KVM_REINJECT_CONTROL)?,
        eq(1, FIONBIO)?,
    ];
    // virtio-net on vhost-net, when the guest's driver starts or resets
    // the device: each request with why in `runtime_ioctls`.
    for (request, _) in crate::devices::virtio::vhost_net::runtime_ioctls() {
        ioctls.push(eq(1, request)?);
    }
    rules.insert(libc::SYS_ioctl, ioctls);
    // fcntl: only descriptor and status flags (std checks a new socket's
    // close-on-exec flag).
    rules.insert(
        libc::SYS_fcntl,
        [libc::F_GETFD, libc::F_SETFD, libc::F_GETFL, libc::F_SETFL]
            .into_iter()
            .map(|cmd| eq(1, cmd as u64))
            .collect::<Result<Vec<_>, _>>()?,
    );
    // mprotect: glibc grows a thread's malloc arena with it (the device
    // thread's buffers); never to make memory executable.
    rules.insert(
        libc::SYS_mprotect,
        vec![when(2, SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64), 0)?],
    );
    // socket: only Unix sockets, for vsock connecting a guest to a host
    // listener (`{uds}_PORT`); no network sockets.
    rules.insert(libc::SYS_socket, vec![eq(0, libc::AF_UNIX as u64)?]);
    // tgkill: kicking this process's own vCPU threads out of KVM_RUN to
    // pause the VM; never a signal to another process.
    rules.insert(libc::SYS_tgkill, vec![eq(0, u64::from(pid))?]);
    SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        seccompiler::TargetArch::x86_64,
    )?
    .try_into()
}

/// Installs `program` on every thread of the process.
pub fn apply_all_threads(program: &BpfProgram) -> Result<(), seccompiler::Error> {
    seccompiler::apply_filter_all_threads(program)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_list_has_no_duplicates_and_every_entry_says_why() {
        let mut seen = std::collections::BTreeSet::new();
        for (nr, why) in super::ALLOWED {
            assert!(seen.insert(*nr), "syscall {nr} listed twice");
            assert!(
                why.contains(": ") && why.len() > 10,
                "{why:?} does not say why"
            );
        }
        assert!(
            !seen.contains(&libc::SYS_ioctl),
            "ioctl is allowed only with the requests `filter_for` names"
        );
        assert!(super::filter().is_ok());
    }
}
