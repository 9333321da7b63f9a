//! `cup update`, `cup rollback` and `cup update --status`: a new OS written
//! into the slot that is not running, checked, and booted once.
//!
//! # Design
//! An update file is an OS slot's FAT filesystem as image-build makes it
//! (`slot.img`: the unified kernel image `steelcup.efi`, `SHA256SUMS` and
//! `manifest.json`; docs/disk-image.md). Applying it:
//!
//! 1. the booted slot must have passed its health gate (first in `ORDER`
//!    with all its tries): the other slot is its fallback until then, and
//!    is not overwritten;
//! 2. the file is read into memory (at most the slot partition's size) and
//!    checked there: a FAT filesystem holding the three files, the image's
//!    SHA-256 equal to the manifest's and to `SHA256SUMS`'s, its size the
//!    manifest's. The bytes checked are the bytes written;
//! 3. the other slot loses its tries (`grubenv`, synced) before a byte of it
//!    changes, so a slot half written (power cut, QEMU killed) is never
//!    chosen;
//! 4. the bytes go onto the slot's partition, synced, and the slot is
//!    checked again as written (read back through the device);
//! 5. the slot goes first in `ORDER` with one try; init then reboots.
//!
//! GRUB boots the new slot once. Its health gate gives it all its tries
//! and keeps it first; if the gate fails, init reboots and GRUB, the one
//! try spent, boots the old slot again by itself. `cup rollback` puts the
//! other slot first with one try, after checking that it holds an OS.
//!
//! With an update key (`/etc/steelcup/update.pub`, an Ed25519 public key
//! baked into the image or set by the machine config), step 2 also
//! requires `manifest.sig`, the key's signature of `manifest.json`: the
//! manifest names the image's hash, so the signature covers the whole slot.
//!
//! # Limitations
//! The update file is read whole into init's memory (64 MiB as built) so
//! that what was checked is what is written. Without an update key, the
//! hash proves the slot intact but not who built it.

use crate::slots::{self, BootEnv, SLOTS};
use crate::state::{self, Partition};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{Cursor, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use zbus::zvariant::Type;

/// The GPT names of the two OS slots, by the name GRUB knows them by.
pub const SLOT_LABELS: [(&str, &str); 2] = [("A", "steelcup-a"), ("B", "steelcup-b")];
/// The files of a slot.
pub const UKI: &str = "steelcup.efi";
pub const SUMS: &str = "SHA256SUMS";
pub const MANIFEST: &str = "manifest.json";
/// The Ed25519 signature of `manifest.json` (hex), in a signed slot.
pub const SIGNATURE: &str = "manifest.sig";
/// The machine's update key (an Ed25519 public key, hex): with it, only
/// updates signed by its private key are taken.
pub const KEY_PATH: &str = "/etc/steelcup/update.pub";

/// Why an update, a rollback or a status read was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpdateError {
    #[error(
        "this machine did not boot from a steelcup disk (PXE or a direct boot): it has no OS slots"
    )]
    NoDisk,
    #[error("the steelcup disk: {0}")]
    Disk(String),
    #[error("{file}: {what}")]
    BadImage { file: String, what: String },
    #[error("slot {slot} has not passed its health gate yet ({env}); slot {other} is its fallback until then")]
    NotGood {
        slot: String,
        other: String,
        env: String,
    },
    #[error("an update or rollback is already running")]
    Busy,
    #[error("slot {slot} holds no OS to roll back to: {why}")]
    NothingToRollBackTo { slot: String, why: String },
    #[error("write slot {slot} ({dev}): {what}")]
    Write {
        slot: String,
        dev: String,
        what: String,
    },
}

/// A steelcup disk's boot partitions: the ESP (with `grubenv`) and the
/// two slots' partitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub esp: PathBuf,
    /// (GRUB's name, partition device), A then B.
    pub slots: Vec<(&'static str, PathBuf)>,
}

impl Disk {
    /// The disk this machine booted from: the ESP named `steelcup-esp` and
    /// the slot partitions on the same disk.
    pub fn probe(parts: &[Partition]) -> Result<Disk, UpdateError> {
        let esp = state::find(parts, state::ESP_LABEL)
            .map_err(UpdateError::Disk)?
            .ok_or(UpdateError::NoDisk)?;
        let mut slots = Vec::new();
        for (name, label) in SLOT_LABELS {
            let part = parts
                .iter()
                .find(|p| p.label == label && p.disk == esp.disk)
                .ok_or_else(|| {
                    UpdateError::Disk(format!(
                        "{} has no partition named {label} (slot {name})",
                        esp.disk.display()
                    ))
                })?;
            slots.push((name, part.dev.clone()));
        }
        Ok(Disk {
            esp: esp.dev,
            slots,
        })
    }

    /// The device of slot `name`.
    pub fn slot_dev(&self, name: &str) -> Result<&Path, UpdateError> {
        self.slots
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, d)| d.as_path())
            .ok_or_else(|| UpdateError::Disk(format!("no slot {name}")))
    }

    fn env(&self) -> Result<BootEnv, UpdateError> {
        slots::read_env(&self.esp).map_err(UpdateError::Disk)
    }
}

/// What a slot's `manifest.json` says (image-build writes it). Unknown
/// fields are allowed: a newer build's manifest may carry more, and an
/// older OS must still take it as an update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: String,
    pub uki_sha256: String,
    pub uki_bytes: u64,
    #[serde(default)]
    pub cmdline: String,
}

/// The FAT filesystem on `io`, read only.
pub(crate) fn open_fat<T: Read + Seek>(io: T) -> Result<fatfs::FileSystem<ReadOnly<T>>, String> {
    fatfs::FileSystem::new(
        ReadOnly(io),
        fatfs::FsOptions::new().update_accessed_date(false),
    )
    .map_err(|e| format!("not a FAT filesystem: {e}"))
}

/// Reads the whole file `name` of `fs`, at most `limit` bytes.
pub(crate) fn read_file<T: Read + Seek>(
    fs: &fatfs::FileSystem<ReadOnly<T>>,
    name: &str,
    limit: u64,
) -> Result<Vec<u8>, String> {
    let f = fs
        .root_dir()
        .open_file(name)
        .map_err(|e| format!("no {name}: {e}"))?;
    let mut out = Vec::new();
    f.take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("read {name}: {e}"))?;
    if out.len() as u64 > limit {
        return Err(format!("{name} is larger than {limit} bytes"));
    }
    Ok(out)
}

/// A reader fatfs can take (it asks for a writer's type); any write it
/// tries fails.
pub(crate) struct ReadOnly<T>(T);

impl<T: Read> Read for ReadOnly<T> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl<T: Seek> Seek for ReadOnly<T> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.0.seek(pos)
    }
}

impl<T> Write for ReadOnly<T> {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::other("read-only"))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Parses an Ed25519 public key written as 64 hex digits.
pub fn parse_key(text: &str) -> Result<ed25519_dalek::VerifyingKey, String> {
    let bytes = unhex(text.trim()).ok_or("not 64 hex digits")?;
    let bytes: [u8; 32] = bytes.try_into().map_err(|_| "not 64 hex digits")?;
    ed25519_dalek::VerifyingKey::from_bytes(&bytes).map_err(|e| format!("not an Ed25519 key: {e}"))
}

/// The update key at `path` (see [`KEY_PATH`]); None when there is none.
pub fn load_key(path: &Path) -> Result<Option<ed25519_dalek::VerifyingKey>, UpdateError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_key(&text)
            .map(Some)
            .map_err(|e| UpdateError::Disk(format!("the update key {}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(UpdateError::Disk(format!(
            "the update key {}: {e}",
            path.display()
        ))),
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Checks the slot filesystem on `io` (an update file in memory, or a slot
/// partition), reading only: the three files, the image's hash and size as
/// the manifest and `SHA256SUMS` say, and with `key`, the manifest's
/// signature. Returns the manifest.
pub fn check_slot<T: Read + Seek>(
    io: T,
    key: Option<&ed25519_dalek::VerifyingKey>,
) -> Result<Manifest, String> {
    let fs = open_fat(io)?;
    let manifest_bytes = read_file(&fs, MANIFEST, 64 << 10)?;
    if let Some(key) = key {
        // The manifest names the image's hash: signing it signs the slot.
        let sig = read_file(&fs, SIGNATURE, 1024).map_err(|_| {
            format!("{MANIFEST} is not signed (no {SIGNATURE}), and this machine takes only updates signed by its update key")
        })?;
        let sig = String::from_utf8(sig)
            .ok()
            .and_then(|s| unhex(s.trim()))
            .and_then(|b| <[u8; 64]>::try_from(b).ok())
            .ok_or_else(|| format!("{SIGNATURE} is not 128 hex digits"))?;
        use ed25519_dalek::Verifier;
        key.verify(&manifest_bytes, &ed25519_dalek::Signature::from_bytes(&sig))
            .map_err(|_| {
                format!("{SIGNATURE} is not a signature of {MANIFEST} by this machine's update key")
            })?;
    }
    let manifest: Manifest =
        serde_json::from_slice(&manifest_bytes).map_err(|e| format!("{MANIFEST}: {e}"))?;
    let version_ok = !manifest.version.is_empty()
        && manifest.version.len() <= 64
        && manifest
            .version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b));
    if !version_ok {
        return Err(format!(
            "{MANIFEST}: version {:?} is not 1-64 letters, digits and ._-+",
            manifest.version
        ));
    }
    let sums = String::from_utf8(read_file(&fs, SUMS, 64 << 10)?)
        .map_err(|_| format!("{SUMS} is not text"))?;
    let listed = sums
        .lines()
        .find_map(|l| {
            let (hash, name) = l.split_once("  ")?;
            (name == UKI).then(|| hash.to_string())
        })
        .ok_or_else(|| format!("{SUMS} does not list {UKI}"))?;
    let mut uki = fs
        .root_dir()
        .open_file(UKI)
        .map_err(|e| format!("no {UKI}: {e}"))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = uki.read(&mut buf).map_err(|e| format!("read {UKI}: {e}"))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        len += n as u64;
    }
    let hash = hex(&h.finalize());
    if hash != manifest.uki_sha256 {
        return Err(format!(
            "{UKI} has SHA-256 {hash}, the manifest says {}",
            manifest.uki_sha256
        ));
    }
    if hash != listed {
        return Err(format!("{UKI} has SHA-256 {hash}, {SUMS} says {listed}"));
    }
    if len != manifest.uki_bytes {
        return Err(format!(
            "{UKI} is {len} bytes, the manifest says {}",
            manifest.uki_bytes
        ));
    }
    Ok(manifest)
}

/// Lower-case hex of `bytes` (hashes, keys, signatures).
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The slot partition `dev`, checked as it is now.
pub fn check_partition(dev: &Path) -> Result<Manifest, String> {
    let f = std::fs::File::open(dev).map_err(|e| format!("open {}: {e}", dev.display()))?;
    check_slot(f, None)
}

/// The disks (by ESP) an update or rollback is running on: one at a time.
static BUSY: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Holds `esp`'s place in [`BUSY`] until dropped.
struct Busy(PathBuf);

impl Busy {
    fn take(esp: &Path) -> Result<Busy, UpdateError> {
        let mut list = BUSY.lock().unwrap_or_else(|p| p.into_inner());
        if list.iter().any(|e| e == esp) {
            return Err(UpdateError::Busy);
        }
        list.push(esp.to_path_buf());
        Ok(Busy(esp.to_path_buf()))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        BUSY.lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|e| *e != self.0);
    }
}

/// An update or rollback done: `slot` holding `version` boots next, once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub slot: String,
    pub version: String,
    /// The slot that stays the fallback.
    pub fallback: String,
}

/// The size of `dev` in bytes (a partition, or a file in the tests).
fn size_of(dev: &Path) -> Result<u64, String> {
    std::fs::File::open(dev)
        .and_then(|mut f| f.seek(SeekFrom::End(0)))
        .map_err(|e| format!("size of {}: {e}", dev.display()))
}

/// Reads the update file at `source` (a regular file or a block device),
/// at most `limit` bytes.
pub fn read_source(source: &Path, limit: u64) -> Result<Vec<u8>, UpdateError> {
    let bad = |what: String| UpdateError::BadImage {
        file: source.display().to_string(),
        what,
    };
    let f = std::fs::File::open(source).map_err(|e| bad(format!("open: {e}")))?;
    let meta = f.metadata().map_err(|e| bad(e.to_string()))?;
    use std::os::unix::fs::FileTypeExt;
    if !(meta.is_file() || meta.file_type().is_block_device()) {
        return Err(bad("not a regular file or a block device".into()));
    }
    let mut data = Vec::new();
    f.take(limit + 1)
        .read_to_end(&mut data)
        .map_err(|e| bad(format!("read: {e}")))?;
    if data.len() as u64 > limit {
        return Err(bad(format!(
            "larger than the slot partition ({limit} bytes)"
        )));
    }
    if data.is_empty() {
        return Err(bad("empty".into()));
    }
    Ok(data)
}

/// Applies the update file at `source` to `disk` (see the module's
/// design): the other slot written, checked and set to boot once. With
/// `key`, the file must be signed by it.
pub fn apply(
    disk: &Disk,
    source: &Path,
    key: Option<&ed25519_dalek::VerifyingKey>,
) -> Result<Applied, UpdateError> {
    let _held = Busy::take(&disk.esp)?;
    let env = disk.env()?;
    let (booted, target) = booted_and_other(&env)?;
    if !env.is_good() {
        return Err(UpdateError::NotGood {
            slot: booted.into(),
            other: target.into(),
            env: env.describe(),
        });
    }
    let dev = disk.slot_dev(target)?.to_path_buf();
    let write_err = |what: String| UpdateError::Write {
        slot: target.into(),
        dev: dev.display().to_string(),
        what,
    };
    let limit = size_of(&dev).map_err(write_err)?;
    let data = read_source(source, limit)?;
    let manifest =
        check_slot(Cursor::new(&data[..]), key).map_err(|what| UpdateError::BadImage {
            file: source.display().to_string(),
            what,
        })?;
    tracing::info!(
        "update: {} holds version {} ({} bytes, image SHA-256 {}{}); writing it into slot {target} ({})",
        source.display(),
        manifest.version,
        data.len(),
        manifest.uki_sha256,
        if key.is_some() {
            ", signed by this machine's update key"
        } else {
            ""
        },
        dev.display()
    );
    // Never chosen while it is being written.
    slots::modify_env(&disk.esp, |e| {
        e.disable(target);
        Ok(())
    })
    .map_err(UpdateError::Disk)?;
    write_slot(&dev, &data).map_err(write_err)?;
    drop(data);
    let written = check_partition(&dev).map_err(|e| write_err(format!("as written: {e}")))?;
    if written.uki_sha256 != manifest.uki_sha256 {
        return Err(write_err(format!(
            "as written it holds image {}, not {}",
            written.uki_sha256, manifest.uki_sha256
        )));
    }
    boot_once(disk, target, booted, manifest, "update: slot {slot} holds")
}

/// `target`, holding `manifest`'s OS, goes first in ORDER with one try;
/// says so (`what` names the slot as `{slot}`).
fn boot_once(
    disk: &Disk,
    target: &str,
    booted: &str,
    manifest: Manifest,
    what: &str,
) -> Result<Applied, UpdateError> {
    let env = slots::modify_env(&disk.esp, |e| {
        e.boot_next(target, 1);
        Ok(())
    })
    .map_err(UpdateError::Disk)?;
    tracing::info!(
        "{} version {} and boots next, once; slot {booted} stays the fallback ({})",
        what.replace("{slot}", target),
        manifest.version,
        env.describe()
    );
    Ok(Applied {
        slot: target.into(),
        version: manifest.version,
        fallback: booted.into(),
    })
}

/// Writes `data` at the start of `dev` and syncs it.
fn write_slot(dev: &Path, data: &[u8]) -> Result<(), String> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(dev)
        .map_err(|e| format!("open: {e}"))?;
    for chunk in data.chunks(4 << 20) {
        f.write_all(chunk).map_err(|e| format!("write: {e}"))?;
    }
    f.sync_all().map_err(|e| format!("sync: {e}"))
}

/// The booted slot and the other one.
fn booted_and_other(env: &BootEnv) -> Result<(&'static str, &'static str), UpdateError> {
    match (env.booted(), env.other()) {
        (Some(b), Some(o)) => Ok((b, o)),
        _ => Err(UpdateError::Disk(format!(
            "grubenv does not say which slot booted ({})",
            env.describe()
        ))),
    }
}

/// Puts the other slot first, with one try, once it checks.
pub fn rollback(disk: &Disk) -> Result<Applied, UpdateError> {
    let _held = Busy::take(&disk.esp)?;
    let env = disk.env()?;
    let (booted, target) = booted_and_other(&env)?;
    let dev = disk.slot_dev(target)?;
    let manifest = check_partition(dev).map_err(|why| UpdateError::NothingToRollBackTo {
        slot: target.into(),
        why,
    })?;
    boot_once(
        disk,
        target,
        booted,
        manifest,
        "rollback: slot {slot} holds",
    )
}

/// One slot as `cup update --status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct SlotInfo {
    /// `A` or `B`.
    pub name: String,
    /// The manifest's version; empty when the slot holds no OS that checks.
    pub version: String,
    /// Boots GRUB will still give it.
    pub tries: u32,
    pub booted: bool,
    /// Why it does not check (empty slot, bad hash); empty when it does.
    pub problem: String,
}

/// The slots as they are now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct Status {
    /// The slot this boot came from.
    pub booted: String,
    /// The slots in GRUB's order of preference: the first with tries left
    /// boots next.
    pub order: Vec<String>,
    /// The booted slot has passed its health gate.
    pub good: bool,
    /// A slot that was first but did not come up in this boot (a
    /// rollback); empty if none.
    pub passed_over: String,
    pub slots: Vec<SlotInfo>,
}

/// Reads the slots' state: grubenv and each slot's manifest, checked.
pub fn status(disk: &Disk, passed_over: Option<String>) -> Result<Status, UpdateError> {
    let env = disk.env()?;
    let slots = SLOTS
        .iter()
        .map(|name| {
            let (version, problem) = match disk
                .slot_dev(name)
                .map_err(|e| e.to_string())
                .and_then(check_partition)
            {
                Ok(m) => (m.version, String::new()),
                Err(e) => (String::new(), e),
            };
            SlotInfo {
                name: name.to_string(),
                version,
                tries: env.tries(name),
                booted: env.booted() == Some(*name),
                problem,
            }
        })
        .collect();
    Ok(Status {
        booted: env.booted().unwrap_or_default().to_string(),
        order: env.order(),
        good: env.is_good(),
        passed_over: passed_over.unwrap_or_default(),
        slots,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const MIB: u64 = 1 << 20;

    /// A FAT32 filesystem of `bytes` holding `files`.
    fn fat(bytes: u64, files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut img = Cursor::new(vec![0u8; bytes as usize]);
        fatfs::format_volume(
            &mut img,
            fatfs::FormatVolumeOptions::new()
                .fat_type(fatfs::FatType::Fat32)
                .bytes_per_cluster(512),
        )
        .unwrap();
        img.seek(SeekFrom::Start(0)).unwrap();
        {
            let fs = fatfs::FileSystem::new(&mut img, fatfs::FsOptions::new()).unwrap();
            for (path, data) in files {
                let mut dir = fs.root_dir();
                let parts: Vec<&str> = path.split('/').collect();
                for d in &parts[..parts.len() - 1] {
                    dir = dir.open_dir(d).or_else(|_| dir.create_dir(d)).unwrap();
                }
                dir.create_file(parts[parts.len() - 1])
                    .unwrap()
                    .write_all(data)
                    .unwrap();
            }
            fs.unmount().unwrap();
        }
        img.into_inner()
    }

    /// An update file as image-build makes one, for an image `uki`.
    fn slot_image(version: &str, uki: &[u8]) -> Vec<u8> {
        signed_slot_image(version, uki, None)
    }

    /// ... signed by `signer`.
    fn signed_slot_image(
        version: &str,
        uki: &[u8],
        signer: Option<&ed25519_dalek::SigningKey>,
    ) -> Vec<u8> {
        use ed25519_dalek::Signer;
        let hash = hex(&Sha256::digest(uki));
        let manifest = format!(
            r#"{{"version": "{version}", "uki_sha256": "{hash}", "uki_bytes": {}, "cmdline": "console=ttyS0"}}"#,
            uki.len()
        );
        let sums = format!("{hash}  {UKI}\n");
        let sig = signer.map(|k| hex(&k.sign(manifest.as_bytes()).to_bytes()));
        let mut files: Vec<(&str, &[u8])> = vec![
            (UKI, uki),
            (SUMS, sums.as_bytes()),
            (MANIFEST, manifest.as_bytes()),
        ];
        if let Some(s) = &sig {
            files.push((SIGNATURE, s.as_bytes()));
        }
        fat(34 * MIB, &files)
    }

    #[test]
    fn with_an_update_key_only_updates_it_signed_are_taken() {
        let signer = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let other = ed25519_dalek::SigningKey::from_bytes(&[8; 32]);
        let key = parse_key(&hex(&signer.verifying_key().to_bytes())).unwrap();
        let f = fixture(GOOD_A, &slot_image("one", b"MZ one"));
        let unsigned = update_file(&f, &slot_image("two", b"MZ two"));
        let e = apply(&f.disk, &unsigned, Some(&key))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("manifest.json is not signed (no manifest.sig)"),
            "{e}"
        );
        let forged = update_file(&f, &signed_slot_image("two", b"MZ two", Some(&other)));
        let e = apply(&f.disk, &forged, Some(&key)).unwrap_err().to_string();
        assert!(
            e.contains("is not a signature of manifest.json by this machine's update key"),
            "{e}"
        );
        assert!(
            check_partition(&f.disk.slots[1].1).is_err(),
            "slot B untouched"
        );
        let signed = update_file(&f, &signed_slot_image("two", b"MZ two", Some(&signer)));
        assert_eq!(apply(&f.disk, &signed, Some(&key)).unwrap().version, "two");
        // Keys are 64 hex digits of a valid point.
        assert!(parse_key("abc").is_err());
        assert!(parse_key(&"zz".repeat(32)).is_err());
        let dir = f.dir.path();
        std::fs::write(
            dir.join("update.pub"),
            hex(&signer.verifying_key().to_bytes()) + "\n",
        )
        .unwrap();
        assert_eq!(load_key(&dir.join("update.pub")).unwrap(), Some(key));
        assert_eq!(load_key(&dir.join("none.pub")).unwrap(), None);
    }

    /// A disk as files: an ESP with grubenv, slot A holding `a`, slot B
    /// empty, slot B's partition 40 MiB.
    struct Fixture {
        dir: tempfile::TempDir,
        disk: Disk,
    }

    fn fixture(env: &[(&str, &str)], a: &[u8]) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let vars: BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let block = slots::encode_env(&vars).unwrap();
        let esp = dir.path().join("esp");
        std::fs::write(&esp, fat(34 * MIB, &[(slots::ENV_PATH, &block)])).unwrap();
        let (pa, pb) = (dir.path().join("a"), dir.path().join("b"));
        let mut slot_a = a.to_vec();
        slot_a.resize(40 * MIB as usize, 0);
        std::fs::write(&pa, slot_a).unwrap();
        std::fs::write(&pb, vec![0u8; 40 * MIB as usize]).unwrap();
        Fixture {
            disk: Disk {
                esp,
                slots: vec![("A", pa), ("B", pb)],
            },
            dir,
        }
    }

    const GOOD_A: &[(&str, &str)] = &[
        ("ORDER", "A B"),
        ("A_TRIES", "3"),
        ("B_TRIES", "0"),
        ("BOOTED", "A"),
    ];

    fn update_file(f: &Fixture, data: &[u8]) -> PathBuf {
        let p = f.dir.path().join("update.img");
        std::fs::write(&p, data).unwrap();
        p
    }

    #[test]
    fn an_update_goes_into_the_other_slot_and_boots_next_once() {
        let f = fixture(GOOD_A, &slot_image("one", b"MZ kernel one"));
        let src = update_file(&f, &slot_image("two", b"MZ kernel two"));
        let done = apply(&f.disk, &src, None).unwrap();
        assert_eq!(
            done,
            Applied {
                slot: "B".into(),
                version: "two".into(),
                fallback: "A".into()
            }
        );
        let env = slots::read_env(&f.disk.esp).unwrap();
        assert_eq!(env.order(), vec!["B", "A"]);
        assert_eq!(env.tries("B"), 1, "the new slot boots once");
        assert_eq!(env.tries("A"), 3, "the old slot stays the fallback");
        assert_eq!(check_partition(&f.disk.slots[1].1).unwrap().version, "two");
        let st = status(&f.disk, None).unwrap();
        assert_eq!(st.booted, "A");
        assert!(!st.good, "A is no longer first");
        assert_eq!(st.slots[0].version, "one");
        assert_eq!(st.slots[1].version, "two");
        assert_eq!(st.slots[1].tries, 1);
    }

    #[test]
    fn a_corrupt_update_is_refused_and_the_other_slot_is_untouched() {
        let f = fixture(GOOD_A, &slot_image("one", b"MZ kernel one"));
        let before = std::fs::read(&f.disk.slots[1].1).unwrap();
        let env_before = std::fs::read(&f.disk.esp).unwrap();
        // One byte of the image flipped after the manifest was made.
        let mut bad = slot_image("two", b"MZ kernel two");
        let at = bad.windows(13).position(|w| w == b"MZ kernel two").unwrap();
        bad[at + 3] = b'X';
        let src = update_file(&f, &bad);
        let e = apply(&f.disk, &src, None).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("update.img"), "names the file: {msg}");
        assert!(
            msg.contains("steelcup.efi has SHA-256") && msg.contains("the manifest says"),
            "{msg}"
        );
        assert_eq!(std::fs::read(&f.disk.slots[1].1).unwrap(), before);
        assert_eq!(std::fs::read(&f.disk.esp).unwrap(), env_before);

        // Not a slot at all; too large for the slot.
        let src = update_file(&f, b"hello");
        assert!(apply(&f.disk, &src, None)
            .unwrap_err()
            .to_string()
            .contains("not a FAT filesystem"));
        let src = update_file(&f, &vec![0u8; 41 * MIB as usize]);
        assert!(apply(&f.disk, &src, None)
            .unwrap_err()
            .to_string()
            .contains("larger than the slot partition"));
        // A manifest whose version would be shown as something else.
        let src = update_file(&f, &slot_image("two three", b"MZ"));
        assert!(apply(&f.disk, &src, None)
            .unwrap_err()
            .to_string()
            .contains("version \"two three\" is not"));
        assert_eq!(std::fs::read(&f.disk.slots[1].1).unwrap(), before);
    }

    #[test]
    fn no_update_before_the_booted_slot_passed_its_gate() {
        // An update to B, booted once: B is not good yet, A is its fallback.
        let env = [
            ("ORDER", "B A"),
            ("A_TRIES", "3"),
            ("B_TRIES", "0"),
            ("BOOTED", "B"),
        ];
        let f = fixture(&env, &slot_image("one", b"MZ one"));
        let src = update_file(&f, &slot_image("two", b"MZ two"));
        let e = apply(&f.disk, &src, None).unwrap_err();
        assert!(
            matches!(&e, UpdateError::NotGood { slot, other, .. } if slot == "B" && other == "A"),
            "{e}"
        );
        assert_eq!(check_partition(&f.disk.slots[0].1).unwrap().version, "one");
    }

    #[test]
    fn a_slot_cut_off_while_written_is_never_chosen() {
        // The state after step 3 of an update that was then cut off: the
        // target slot disabled, half its bytes written.
        let f = fixture(GOOD_A, &slot_image("one", b"MZ one"));
        slots::modify_env(&f.disk.esp, |e| {
            e.disable("B");
            Ok(())
        })
        .unwrap();
        let img = slot_image("two", b"MZ two");
        write_slot(&f.disk.slots[1].1, &img[..64 << 10]).unwrap();
        let env = slots::read_env(&f.disk.esp).unwrap();
        assert_eq!(env.order()[0], "A");
        assert_eq!(env.tries("B"), 0);
        assert_eq!(env.fallback(), None);
        let st = status(&f.disk, None).unwrap();
        assert!(st.good);
        assert!(
            st.slots[1].problem.contains("no manifest.json"),
            "{:?}",
            st.slots[1]
        );
        // ... and a rollback to it is refused.
        assert!(matches!(
            rollback(&f.disk),
            Err(UpdateError::NothingToRollBackTo { .. })
        ));
    }

    #[test]
    fn a_rollback_needs_an_os_in_the_other_slot() {
        let f = fixture(GOOD_A, &slot_image("one", b"MZ one"));
        let e = rollback(&f.disk).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("slot B holds no OS to roll back to: not a FAT filesystem"),
            "{e}"
        );
        let src = update_file(&f, &slot_image("two", b"MZ two"));
        apply(&f.disk, &src, None).unwrap();
        // Booted into B, marked good, then rolled back to A.
        slots::modify_env(&f.disk.esp, |e| {
            e.vars.insert("BOOTED".into(), "B".into());
            assert!(e.mark_good());
            Ok(())
        })
        .unwrap();
        let done = rollback(&f.disk).unwrap();
        assert_eq!((done.slot.as_str(), done.version.as_str()), ("A", "one"));
        let env = slots::read_env(&f.disk.esp).unwrap();
        assert_eq!(env.order(), vec!["A", "B"]);
        assert_eq!((env.tries("A"), env.tries("B")), (1, slots::TRIES));
    }

    #[test]
    fn the_disk_is_found_by_its_partition_names() {
        let p = |dev: &str, disk: &str, label: &str| Partition {
            dev: dev.into(),
            disk: disk.into(),
            number: 1,
            label: label.into(),
        };
        let parts = [
            p("/dev/vda1", "/dev/vda", "steelcup-esp"),
            p("/dev/vda2", "/dev/vda", "steelcup-a"),
            p("/dev/vda3", "/dev/vda", "steelcup-b"),
            p("/dev/vdb3", "/dev/vdb", "steelcup-b"),
        ];
        let d = Disk::probe(&parts).unwrap();
        assert_eq!(d.esp, PathBuf::from("/dev/vda1"));
        assert_eq!(d.slot_dev("B").unwrap(), Path::new("/dev/vda3"));
        assert_eq!(Disk::probe(&parts[1..]).unwrap_err(), UpdateError::NoDisk);
        let e = Disk::probe(&[parts[0].clone(), parts[3].clone()]).unwrap_err();
        assert!(
            e.to_string().contains("no partition named steelcup-a"),
            "{e}"
        );
    }
}
