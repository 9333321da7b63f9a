//! The OS slots A and B of a steelcup disk (docs/disk-image.md): which one
//! booted, and the health gate's verdict on it.
//!
//! # Design
//! GRUB and init share one GRUB environment block, `EFI/steelcup/grubenv`
//! on the EFI system partition: `ORDER` (the slots in order of preference),
//! `A_TRIES` and `B_TRIES` (boots left; GRUB spends one per boot) and
//! `BOOTED` (the slot GRUB chose). init reads it at boot and writes it when
//! the health gate passes: the booted slot gets its [`TRIES`] back and goes
//! first in `ORDER`. When the gate fails and the other slot still has tries,
//! init reboots, so a bad slot runs out of tries and GRUB goes back to the
//! other by itself; with no other slot to go to, the machine stays up as it
//! is (rebooting would not help).
//!
//! The block is read and written with `fatfs` on the partition's device,
//! never mounted, and rewritten in place at its 1024 bytes (as GRUB's own
//! `save_env` does), so a power cut leaves the old or the new block.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The environment block's path on the ESP.
pub const ENV_PATH: &str = "EFI/steelcup/grubenv";
/// Boots a good slot has.
pub const TRIES: u32 = 3;
/// The slots, by the name GRUB knows them by.
pub const SLOTS: [&str; 2] = ["A", "B"];
/// A GRUB environment block's size.
pub const ENV_BYTES: usize = 1024;

/// A GRUB environment block (1024 bytes, `#`-padded) holding `vars`.
pub fn encode_env(vars: &BTreeMap<String, String>) -> Result<Vec<u8>, String> {
    let mut s = String::from("# GRUB Environment Block\n");
    for (k, v) in vars {
        s.push_str(&format!("{k}={v}\n"));
    }
    if s.len() > ENV_BYTES {
        return Err(format!(
            "grubenv: {} bytes of variables, more than a block",
            s.len()
        ));
    }
    let mut b = s.into_bytes();
    b.resize(ENV_BYTES, b'#');
    Ok(b)
}

/// The variables of a GRUB environment block (`KEY=VALUE` lines).
pub fn parse_env(block: &[u8]) -> BTreeMap<String, String> {
    String::from_utf8_lossy(block)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The slots' state as GRUB left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootEnv {
    pub vars: BTreeMap<String, String>,
}

impl BootEnv {
    /// The slot GRUB booted.
    pub fn booted(&self) -> Option<&'static str> {
        let b = self.vars.get("BOOTED")?;
        SLOTS.into_iter().find(|s| s == b)
    }

    /// The slots in order of preference.
    pub fn order(&self) -> Vec<String> {
        self.vars
            .get("ORDER")
            .map(|o| {
                o.split_whitespace()
                    .filter(|s| SLOTS.contains(s))
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Boots `slot` has left.
    pub fn tries(&self, slot: &str) -> u32 {
        self.vars
            .get(&format!("{slot}_TRIES"))
            .and_then(|t| t.parse().ok())
            .unwrap_or(0)
    }

    /// The slot that was preferred, when GRUB booted another: an update
    /// that did not come up (or a slot that failed its check) was passed
    /// over.
    pub fn passed_over(&self) -> Option<String> {
        let first = self.order().into_iter().next()?;
        (Some(first.as_str()) != self.booted()).then_some(first)
    }

    /// Another slot than the booted one with tries left: where a reboot
    /// would go.
    pub fn fallback(&self) -> Option<&'static str> {
        let booted = self.booted();
        SLOTS
            .into_iter()
            .find(|s| Some(*s) != booted && self.tries(s) > 0)
    }

    /// The booted slot is good: its tries back, first in ORDER (the other
    /// after it). False when no slot is known to have booted.
    pub fn mark_good(&mut self) -> bool {
        let Some(booted) = self.booted() else {
            return false;
        };
        self.boot_next(booted, TRIES);
        true
    }

    /// The booted slot has passed a health gate: first in ORDER with all
    /// its tries (what [`BootEnv::mark_good`] leaves).
    pub fn is_good(&self) -> bool {
        self.booted().is_some_and(|b| {
            self.order().first().map(String::as_str) == Some(b) && self.tries(b) == TRIES
        })
    }

    /// The slot that is not the booted one.
    pub fn other(&self) -> Option<&'static str> {
        let booted = self.booted()?;
        SLOTS.into_iter().find(|s| *s != booted)
    }

    /// `slot` boots next, `tries` times (the other slot after it).
    pub fn boot_next(&mut self, slot: &str, tries: u32) {
        self.vars.insert(format!("{slot}_TRIES"), tries.to_string());
        let mut order = vec![slot.to_string()];
        order.extend(SLOTS.iter().filter(|s| **s != slot).map(|s| s.to_string()));
        self.vars.insert("ORDER".into(), order.join(" "));
    }

    /// `slot` is never chosen (its content is being replaced).
    pub fn disable(&mut self, slot: &str) {
        self.vars.insert(format!("{slot}_TRIES"), "0".into());
    }

    /// One line for the console and `cup update --status`.
    pub fn describe(&self) -> String {
        let slots: Vec<String> = SLOTS
            .iter()
            .map(|s| format!("{s}: {} tries", self.tries(s)))
            .collect();
        format!(
            "booted slot {}; order {}; {}",
            self.booted().unwrap_or("?"),
            self.order().join(" "),
            slots.join(", ")
        )
    }
}

/// Opens the FAT filesystem on `esp` (a partition device or an image).
fn open_fat(esp: &Path, write: bool) -> Result<fatfs::FileSystem<std::fs::File>, String> {
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(esp)
        .map_err(|e| format!("open {}: {e}", esp.display()))?;
    fatfs::FileSystem::new(dev, fatfs::FsOptions::new())
        .map_err(|e| format!("{}: not a FAT filesystem: {e}", esp.display()))
}

/// Reads the boot environment from the ESP at `esp`.
pub fn read_env(esp: &Path) -> Result<BootEnv, String> {
    let fs = open_fat(esp, false)?;
    let mut block = Vec::new();
    fs.root_dir()
        .open_file(ENV_PATH)
        .and_then(|mut f| f.read_to_end(&mut block))
        .map_err(|e| format!("{}: {ENV_PATH}: {e}", esp.display()))?;
    Ok(BootEnv {
        vars: parse_env(&block),
    })
}

/// Writes `env` over the block on the ESP at `esp`, in place.
pub fn write_env(esp: &Path, env: &BootEnv) -> Result<(), String> {
    let block = encode_env(&env.vars)?;
    let fs = open_fat(esp, true)?;
    {
        let mut f = fs
            .root_dir()
            .open_file(ENV_PATH)
            .map_err(|e| format!("{}: {ENV_PATH}: {e}", esp.display()))?;
        let len = f
            .seek(SeekFrom::End(0))
            .map_err(|e| format!("{ENV_PATH}: {e}"))?;
        if len != ENV_BYTES as u64 {
            // GRUB writes the block's sectors where they are: it must not move.
            return Err(format!(
                "{}: {ENV_PATH} is {len} bytes, not a {ENV_BYTES}-byte block",
                esp.display()
            ));
        }
        f.seek(SeekFrom::Start(0))
            .and_then(|_| f.write_all(&block))
            .and_then(|_| f.flush())
            .map_err(|e| format!("{}: write {ENV_PATH}: {e}", esp.display()))?;
    }
    fs.unmount()
        .map_err(|e| format!("{}: {e}", esp.display()))?;
    // The block reaches the disk before anything is said of it.
    std::fs::File::open(esp)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("sync {}: {e}", esp.display()))
}

/// Serialises the read-modify-write of the block: the health gate and
/// `cup update` / `cup rollback` run on different threads.
static ENV_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Reads the block on the ESP at `esp`, lets `change` edit it and writes
/// it back in place, all under one lock; returns the block as written.
pub fn modify_env(
    esp: &Path,
    change: impl FnOnce(&mut BootEnv) -> Result<(), String>,
) -> Result<BootEnv, String> {
    let _held = ENV_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let mut env = read_env(esp)?;
    change(&mut env)?;
    write_env(esp, &env)?;
    Ok(env)
}

/// Where this boot came from: the ESP and what GRUB left in it.
#[derive(Debug, Clone)]
pub struct Booted {
    pub esp: PathBuf,
    pub env: BootEnv,
}

impl Booted {
    /// The boot environment of this machine's steelcup disk (the ESP named
    /// `steelcup-esp`); None when it did not boot from one (PXE, QEMU's
    /// `-kernel`).
    pub fn probe(parts: &[crate::state::Partition]) -> Result<Option<Booted>, String> {
        let Some(esp) = crate::state::find(parts, crate::state::ESP_LABEL)? else {
            return Ok(None);
        };
        let env = read_env(&esp.dev)?;
        Ok(Some(Booted { esp: esp.dev, env }))
    }

    /// The health gate passed: the booted slot is good.
    pub fn passed(&mut self) -> Result<(), String> {
        let esp = self.esp.clone();
        self.env = modify_env(&self.esp, |env| {
            if env.mark_good() {
                Ok(())
            } else {
                Err(format!(
                    "{}: {ENV_PATH} does not say which slot booted",
                    esp.display()
                ))
            }
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BootEnv {
        BootEnv {
            vars: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn the_block_is_one_padded_kib_and_reads_back() {
        let e = env(&[("ORDER", "B A"), ("B_TRIES", "1")]);
        let b = encode_env(&e.vars).unwrap();
        assert_eq!(b.len(), ENV_BYTES);
        assert!(b.starts_with(b"# GRUB Environment Block\nB_TRIES=1\nORDER=B A\n#"));
        assert_eq!(parse_env(&b), e.vars);
        let big = env(&[("K", &"x".repeat(1100))]);
        assert!(encode_env(&big.vars).is_err());
    }

    #[test]
    fn a_good_boot_gets_its_tries_back_and_goes_first() {
        // An update to B, booted once: B has spent its one try.
        let mut e = env(&[
            ("ORDER", "B A"),
            ("A_TRIES", "3"),
            ("B_TRIES", "0"),
            ("BOOTED", "B"),
        ]);
        assert_eq!(e.passed_over(), None);
        assert_eq!(e.fallback(), Some("A"));
        assert!(e.mark_good());
        assert_eq!(e.order(), vec!["B", "A"]);
        assert_eq!(e.tries("B"), TRIES);
        assert_eq!(e.tries("A"), 3);
    }

    #[test]
    fn a_rollback_is_seen_and_marking_good_makes_it_first() {
        // B ran out of tries; GRUB booted A.
        let mut e = env(&[
            ("ORDER", "B A"),
            ("A_TRIES", "2"),
            ("B_TRIES", "0"),
            ("BOOTED", "A"),
        ]);
        assert_eq!(e.passed_over().as_deref(), Some("B"));
        assert_eq!(e.fallback(), None, "B has no tries left");
        assert!(e.mark_good());
        assert_eq!(e.order(), vec!["A", "B"]);
        assert_eq!(e.tries("A"), TRIES);
        assert_eq!(
            e.describe(),
            "booted slot A; order A B; A: 3 tries, B: 0 tries"
        );
    }

    #[test]
    fn nothing_booted_is_not_marked() {
        let mut e = env(&[("ORDER", "A B"), ("BOOTED", "C")]);
        assert_eq!(e.booted(), None);
        assert!(!e.mark_good());
    }

    #[test]
    fn the_block_is_rewritten_in_place_on_a_fat_image() {
        // A FAT image as image-build makes the ESP: the block in EFI/steelcup.
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("esp.img");
        let before = env(&[
            ("ORDER", "A B"),
            ("A_TRIES", "2"),
            ("B_TRIES", "0"),
            ("BOOTED", "A"),
        ]);
        {
            let f = std::fs::File::create(&img).unwrap();
            f.set_len(40 << 20).unwrap();
            let mut f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&img)
                .unwrap();
            fatfs::format_volume(
                &mut f,
                fatfs::FormatVolumeOptions::new().fat_type(fatfs::FatType::Fat32),
            )
            .unwrap();
            f.seek(SeekFrom::Start(0)).unwrap();
            let fs = fatfs::FileSystem::new(f, fatfs::FsOptions::new()).unwrap();
            {
                let d = fs
                    .root_dir()
                    .create_dir("EFI")
                    .unwrap()
                    .create_dir("steelcup")
                    .unwrap();
                d.create_file("grubenv")
                    .unwrap()
                    .write_all(&encode_env(&before.vars).unwrap())
                    .unwrap();
            }
            fs.unmount().unwrap();
        }
        let raw_before = std::fs::read(&img).unwrap();
        let mut b = Booted {
            esp: img.clone(),
            env: read_env(&img).unwrap(),
        };
        assert_eq!(b.env, before);
        b.passed().unwrap();
        let after = read_env(&img).unwrap();
        assert_eq!(after.tries("A"), TRIES);
        assert_eq!(after.order(), vec!["A", "B"]);
        // Only the block's own bytes changed (the same sectors, as GRUB needs).
        let raw_after = std::fs::read(&img).unwrap();
        let changed: Vec<usize> = raw_before
            .iter()
            .zip(&raw_after)
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, _)| i)
            .collect();
        assert!(!changed.is_empty());
        assert!(
            changed.last().unwrap() - changed.first().unwrap() < ENV_BYTES,
            "bytes {}..{} changed",
            changed.first().unwrap(),
            changed.last().unwrap()
        );
    }
}
