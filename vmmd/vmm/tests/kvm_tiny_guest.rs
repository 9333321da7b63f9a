//! The tiny hand-written guest on this host's KVM. Runs where KVM is real
//! (vmx/svm in /proc/cpuinfo); elsewhere it says so and returns. The same
//! check runs inside the booted appliance in qemu-tests (`vmmd selftest`),
//! where KVM always is real.

#![allow(clippy::unwrap_used)] // tests fail by panicking

#[test]
fn tiny_guest_exits_as_expected() {
    if !steelcup_vmm::selftest::kvm_usable() {
        eprintln!(
            "skipped: KVM is not usable here (no vmx/svm in /proc/cpuinfo); \
             qemu-tests runs this guest inside the appliance instead"
        );
        return;
    }
    let (seen, clone) = steelcup_vmm::selftest::run_with_snapshot().unwrap();
    assert_eq!(seen.len(), 6);
    assert_eq!(clone, seen[3..], "the clone made the original's last exits");
    steelcup_vmm::selftest::vm_state_round_trip().unwrap();
}
