//! The OS slots' actions: `cup update`, `cup rollback`, `cup update
//! --status`, executed on the machine's disk.
//!
//! # Design
//! [`execute`] takes an [`Action`] for which [`Action::is_slot_work`] holds
//! and does the disk work in `steelcup_os::update`, blocking (reading and
//! writing a slot takes seconds): the D-Bus adapter calls it on a thread of
//! its own, so neither the supervisor's loop nor a connection waits on it,
//! and tests call it without a bus.

use super::{Action, ApiError, Reply};
use std::path::PathBuf;
use steelcup_os::update::{self, UpdateError};

/// Where the OS slots' actions find this machine's disk: set only for
/// init as PID 1 (a supervisor on a development machine has no slots).
#[derive(Debug, Clone)]
pub struct Slots {
    /// `/sys/class/block`, where the partitions are found by name.
    pub class_block: PathBuf,
    /// The slot GRUB passed over in this boot (a rollback), if any.
    pub passed_over: Option<String>,
    /// The update key: with one, only updates it signed are taken.
    pub key_file: PathBuf,
}

/// Executes a slot action on the machine's disk (`slots`: none when init
/// runs without OS slots).
pub fn execute(slots: Option<&Slots>, action: Action) -> Result<Reply, ApiError> {
    let slots = slots.ok_or(UpdateError::NoDisk)?;
    let disk = update::Disk::probe(&steelcup_os::state::partitions(&slots.class_block))?;
    match action {
        Action::Update { source } => {
            let key = update::load_key(&slots.key_file)?;
            let done = update::apply(&disk, &source, key.as_ref())?;
            Ok(Reply::Installed {
                slot: done.slot,
                version: done.version,
            })
        }
        Action::Rollback => {
            let done = update::rollback(&disk)?;
            Ok(Reply::Installed {
                slot: done.slot,
                version: done.version,
            })
        }
        Action::UpdateStatus => Ok(Reply::SlotStatus(update::status(
            &disk,
            slots.passed_over.clone(),
        )?)),
        other => Err(ApiError::Refused(format!(
            "{other:?} is not an action on the OS slots"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_slots_every_slot_action_is_refused_as_such() {
        for a in [
            Action::Update {
                source: "/tmp/slot.img".into(),
            },
            Action::Rollback,
            Action::UpdateStatus,
        ] {
            assert!(a.is_slot_work());
            assert_eq!(execute(None, a), Err(ApiError::Update(UpdateError::NoDisk)));
        }
    }

    #[test]
    fn a_machine_without_a_steelcup_disk_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let slots = Slots {
            class_block: dir.path().to_path_buf(),
            passed_over: None,
            key_file: dir.path().join("update.pub"),
        };
        let e = execute(Some(&slots), Action::UpdateStatus).unwrap_err();
        assert!(matches!(e, ApiError::Update(_)), "{e:?}");
    }

    #[test]
    fn supervision_is_not_slot_work() {
        assert!(!Action::Reboot.is_slot_work());
        assert_eq!(
            execute(None, Action::Reboot),
            Err(ApiError::Update(UpdateError::NoDisk))
        );
    }
}
