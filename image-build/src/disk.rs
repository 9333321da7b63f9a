//! The disk image: what is flashed onto a server (`dd` of `disk.img`) or
//! booted in QEMU (`disk.qcow2`), with two OS slots for A/B updates.
//!
//! # Layout
//! GPT (512-byte sectors, partitions on 1 MiB boundaries):
//!
//! | # | label | type | content |
//! |---|---|---|---|
//! | 1 | `steelcup-esp` | EFI system | FAT32: GRUB as `EFI/BOOT/BOOTX64.EFI`, its `grub.cfg` and `grubenv` in `EFI/steelcup` |
//! | 2 | `steelcup-a` | Linux data | FAT32: slot A, [`SLOT_FILES`] |
//! | 3 | `steelcup-b` | Linux data | FAT32: slot B, the same files (or empty) |
//! | 4 | `steelcup-state` | Linux filesystem | blank; init formats it and grows it to the disk's end on first boot |
//!
//! An OS slot is one unified kernel image (`steelcup.efi`: systemd's EFI
//! stub with the host kernel, the initramfs, the command line and an
//! os-release as PE sections, so it can be signed as one file), its
//! `SHA256SUMS` and a `manifest.json`. GRUB picks the slot: the first in
//! `ORDER` with tries left, one try spent per boot (init's health gate puts
//! them back); it checks the slot's hash with `hashsum` before it
//! chainloads the image, and a slot that fails the check or runs out of
//! tries is passed over for the next. See docs/disk-image.md.
//!
//! Everything is written in process (GPT by the `gpt` crate, FAT by
//! `fatfs` with its fixed 1980 timestamps), with identifiers derived from
//! the content, so the same inputs give the same bytes.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{Cursor, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;
/// Partition sizes.
pub const ESP_BYTES: u64 = 64 * MIB;
pub const SLOT_BYTES: u64 = 64 * MIB;
pub const STATE_BYTES: u64 = 16 * MIB;
/// The files of an OS slot.
/// (A signed slot also has `manifest.sig`, the update key's signature of
/// `manifest.json`.)
pub const SLOT_FILES: [&str; 3] = ["steelcup.efi", "SHA256SUMS", "manifest.json"];
/// How many boots a slot gets before GRUB passes it over (init's health
/// gate sets them back after a good boot).
pub const TRIES: u32 = steelcup_os::slots::TRIES;

/// Where the boot pieces come from on the build machine (Debian's
/// grub-efi-amd64-bin and systemd-boot-efi).
pub const GRUB_MODULES_DIR: &str = "/usr/lib/grub/x86_64-efi";
pub const EFI_STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";

/// GRUB's modules, built into its one EFI binary (nothing is loaded from
/// the disk but its config and environment).
const GRUB_MODULES: &[&str] = &[
    "part_gpt",
    "fat",
    "chain",
    "loadenv",
    "test",
    "echo",
    "regexp",
    "hashsum",
    "gcry_sha256",
    "normal",
    "sleep",
    "reboot",
    "halt",
];

/// The boot script: slot choice by order and tries, the hash check, the
/// chainload; `grubenv` holds ORDER, A_TRIES, B_TRIES and BOOTED.
pub const GRUB_CFG: &str = r#"# steelcup boot: the first slot in ORDER with tries left, after its hash check.
set timeout=0
regexp --set=1:disk '^([^,]*),' "$root"
set ORDER="A B"
set A_TRIES=0
set B_TRIES=0
load_env --file $prefix/grubenv ORDER A_TRIES B_TRIES
for SLOT in $ORDER; do
  if [ "$SLOT" = A ]; then TRIES=$A_TRIES; DEV="($disk,gpt2)"; else TRIES=$B_TRIES; DEV="($disk,gpt3)"; fi
  if [ "$TRIES" = 3 ]; then LEFT=2; elif [ "$TRIES" = 2 ]; then LEFT=1; elif [ "$TRIES" = 1 ]; then LEFT=0; else
    echo "steelcup: slot $SLOT has no tries left"
    continue
  fi
  if [ "$SLOT" = A ]; then A_TRIES=$LEFT; else B_TRIES=$LEFT; fi
  BOOTED=$SLOT
  save_env --file $prefix/grubenv A_TRIES B_TRIES BOOTED
  echo "steelcup: booting slot $SLOT ($LEFT tries left after this one)"
  if hashsum --hash sha256 --check $DEV/SHA256SUMS --prefix $DEV/; then
    chainloader $DEV/steelcup.efi
    boot
  fi
  echo "steelcup: slot $SLOT failed its hash check; passed over"
  if [ "$SLOT" = A ]; then A_TRIES=0; else B_TRIES=0; fi
  save_env --file $prefix/grubenv A_TRIES B_TRIES
done
echo "steelcup: no slot can boot; rebooting in 10 s"
sleep 10
reboot
"#;

/// A GRUB environment block with `vars` (init reads and writes the same
/// block: [`steelcup_os::slots`]).
pub fn grubenv(vars: &BTreeMap<&str, String>) -> Result<Vec<u8>> {
    let vars = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    steelcup_os::slots::encode_env(&vars).map_err(anyhow::Error::msg)
}

/// What goes into one OS slot.
#[derive(Debug, Clone)]
pub struct Slot {
    pub uki: Vec<u8>,
    pub manifest: serde_json::Value,
    /// The Ed25519 signature of the manifest's bytes (hex), once signed.
    pub signature: Option<String>,
}

impl Slot {
    /// The slot's files as (path, bytes) for [`fat`].
    pub fn named_files(&self) -> Result<Vec<(String, Vec<u8>)>> {
        Ok(self
            .files()?
            .into_iter()
            .map(|(n, d)| (n.to_string(), d))
            .collect())
    }

    /// `manifest.json` as written in the slot (and signed).
    pub fn manifest_bytes(&self) -> Result<Vec<u8>> {
        Ok((serde_json::to_string_pretty(&self.manifest)? + "\n").into_bytes())
    }

    /// Signs the manifest with the update key `key` (init checks it with
    /// the public key, `steelcup_os::update`).
    pub fn sign(&mut self, key: &ed25519_dalek::SigningKey) -> Result<()> {
        use ed25519_dalek::Signer;
        let sig = key.sign(&self.manifest_bytes()?);
        self.signature = Some(hex::encode(sig.to_bytes()) + "\n");
        Ok(())
    }

    /// The slot's files by name.
    pub fn files(&self) -> Result<Vec<(&'static str, Vec<u8>)>> {
        let sums = format!("{}  steelcup.efi\n", hex::encode(Sha256::digest(&self.uki)));
        let mut files = vec![
            ("steelcup.efi", self.uki.clone()),
            ("SHA256SUMS", sums.into_bytes()),
            ("manifest.json", self.manifest_bytes()?),
        ];
        if let Some(s) = &self.signature {
            files.push((steelcup_os::update::SIGNATURE, s.clone().into_bytes()));
        }
        Ok(files)
    }
}

/// Builds the unified kernel image with `objcopy` from systemd's stub.
pub fn uki(
    vmlinuz: &Path,
    initramfs: &Path,
    cmdline: &str,
    version: &str,
    work: &Path,
) -> Result<Vec<u8>> {
    std::fs::create_dir_all(work)?;
    let osrel = work.join("os-release");
    std::fs::write(
        &osrel,
        format!("NAME=steelcup\nID=steelcup\nPRETTY_NAME=\"steelcup {version}\"\nVERSION_ID={version}\n"),
    )?;
    let cmd = work.join("cmdline");
    std::fs::write(&cmd, cmdline)?;
    let out = work.join("steelcup.efi");
    // The stub's own sections end well below 0x20000 (systemd 252); the
    // kernel and initramfs go at 32 and 48 MiB, as systemd documents.
    let kernel_len = std::fs::metadata(vmlinuz)?.len();
    if kernel_len > 16 * MIB {
        bail!("the kernel ({kernel_len} bytes) does not fit below the initramfs at 48 MiB");
    }
    let status = Command::new("objcopy")
        .arg("--add-section")
        .arg(format!(".osrel={}", osrel.display()))
        .args(["--change-section-vma", ".osrel=0x20000"])
        .arg("--add-section")
        .arg(format!(".cmdline={}", cmd.display()))
        .args(["--change-section-vma", ".cmdline=0x30000"])
        .arg("--add-section")
        .arg(format!(".linux={}", vmlinuz.display()))
        .args(["--change-section-vma", ".linux=0x2000000"])
        .arg("--add-section")
        .arg(format!(".initrd={}", initramfs.display()))
        .args(["--change-section-vma", ".initrd=0x3000000"])
        .arg(EFI_STUB)
        .arg(&out)
        .status()
        .context("run objcopy (binutils)")?;
    if !status.success() {
        bail!("objcopy of the unified kernel image: {status}");
    }
    let mut image = std::fs::read(&out)?;
    reproducible_pe(&mut image)?;
    Ok(image)
}

/// objcopy stamps a PE image with the time it ran (and a checksum over
/// it; binutils 2.40 has no way to turn that off): the stamp becomes 0
/// and the checksum is computed again, so the same inputs give the same
/// image.
pub fn reproducible_pe(image: &mut [u8]) -> Result<()> {
    let at = |o: usize| -> Result<u32> {
        Ok(u32::from_le_bytes(
            image
                .get(o..o + 4)
                .context("a PE image shorter than its headers")?
                .try_into()?,
        ))
    };
    let pe = at(0x3c)? as usize;
    if image.get(pe..pe + 4) != Some(b"PE\0\0".as_slice()) {
        bail!("not a PE image (no PE signature at {pe:#x})");
    }
    // COFF header: TimeDateStamp at 8; the optional header (24 on) has
    // its CheckSum at 64 in both PE32 and PE32+.
    let stamp = pe + 8;
    let sum = pe + 24 + 64;
    at(sum)?;
    image[stamp..stamp + 4].copy_from_slice(&0u32.to_le_bytes());
    let checksum = pe_checksum(image, sum);
    image[sum..sum + 4].copy_from_slice(&checksum.to_le_bytes());
    Ok(())
}

/// The PE checksum: 16-bit words summed with end-around carry (the
/// checksum field itself left out), plus the file's length.
fn pe_checksum(image: &[u8], field: usize) -> u32 {
    let mut sum: u64 = 0;
    for (i, pair) in image.chunks(2).enumerate() {
        let off = i * 2;
        if off == field || off == field + 2 {
            continue;
        }
        sum += u64::from(u16::from_le_bytes([
            pair[0],
            pair.get(1).copied().unwrap_or(0),
        ]));
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum = (sum & 0xffff) + (sum >> 16);
    (sum as u32).wrapping_add(image.len() as u32)
}

/// GRUB as one EFI binary with [`GRUB_MODULES`] built in; its prefix is
/// `/EFI/steelcup` on the partition it was loaded from (the ESP).
pub fn grub_efi(work: &Path) -> Result<Vec<u8>> {
    std::fs::create_dir_all(work)?;
    let out = work.join("BOOTX64.EFI");
    let status = Command::new("grub-mkimage")
        .args([
            "-O",
            "x86_64-efi",
            "-p",
            "/EFI/steelcup",
            "-d",
            GRUB_MODULES_DIR,
        ])
        .arg("-o")
        .arg(&out)
        .args(GRUB_MODULES)
        .status()
        .context("run grub-mkimage (grub-common)")?;
    if !status.success() {
        bail!("grub-mkimage: {status}");
    }
    Ok(std::fs::read(&out)?)
}

/// A FAT32 filesystem of `bytes` holding `files` (paths with `/`).
pub fn fat(bytes: u64, label: &str, files: &[(String, Vec<u8>)]) -> Result<Vec<u8>> {
    let mut name = [b' '; 11];
    for (d, s) in name.iter_mut().zip(label.to_ascii_uppercase().bytes()) {
        *d = s;
    }
    let mut img = Cursor::new(vec![0u8; bytes as usize]);
    // The volume ID from the label: the same inputs, the same bytes.
    let id = u32::from_le_bytes(Sha256::digest(label.as_bytes())[..4].try_into()?);
    fatfs::format_volume(
        &mut img,
        fatfs::FormatVolumeOptions::new()
            .fat_type(fatfs::FatType::Fat32)
            .bytes_per_cluster(512)
            .volume_label(name)
            .volume_id(id),
    )
    .with_context(|| format!("format {label}"))?;
    img.seek(SeekFrom::Start(0))?;
    {
        let fs = fatfs::FileSystem::new(&mut img, fatfs::FsOptions::new())?;
        for (path, data) in files {
            let root = fs.root_dir();
            let mut dir = root.clone();
            let parts: Vec<&str> = path.split('/').collect();
            for d in &parts[..parts.len() - 1] {
                dir = match dir.open_dir(d) {
                    Ok(d) => d,
                    Err(_) => dir.create_dir(d)?,
                };
            }
            let mut f = dir.create_file(parts[parts.len() - 1])?;
            f.truncate()?;
            f.write_all(data)
                .with_context(|| format!("{label}: write {path}"))?;
        }
        fs.unmount()?;
    }
    Ok(img.into_inner())
}

/// A GUID from `what` (the disk, a partition) and the slot's content:
/// stable for the same inputs; shaped as an RFC 4122 version 4 UUID.
fn uuid_of(what: &str, salt: &[u8]) -> uuid::Uuid {
    let mut h = Sha256::new();
    h.update(what.as_bytes());
    h.update(salt);
    let d = h.finalize();
    let mut b: [u8; 16] = d[..16].try_into().expect("16 bytes");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    uuid::Uuid::from_bytes(b)
}

/// The whole disk: the ESP with GRUB, slot A holding `slot`, slot B
/// empty, a blank state partition. Returns the raw image.
pub fn disk(esp_files: &[(String, Vec<u8>)], slot: &Slot) -> Result<Vec<u8>> {
    let slot_files = slot.named_files()?;
    let salt = Sha256::digest(&slot.uki);
    let esp = fat(ESP_BYTES, "STEELCUP", esp_files)?;
    let a = fat(SLOT_BYTES, "STEELCUP_A", &slot_files)?;
    let b = fat(SLOT_BYTES, "STEELCUP_B", &[])?;
    let parts: [(&str, gpt::partition_types::Type, u64, Option<&[u8]>); 4] = [
        (
            "steelcup-esp",
            gpt::partition_types::EFI,
            ESP_BYTES,
            Some(&esp),
        ),
        (
            "steelcup-a",
            gpt::partition_types::LINUX_FS,
            SLOT_BYTES,
            Some(&a),
        ),
        (
            "steelcup-b",
            gpt::partition_types::LINUX_FS,
            SLOT_BYTES,
            Some(&b),
        ),
        (
            "steelcup-state",
            gpt::partition_types::LINUX_FS,
            STATE_BYTES,
            None,
        ),
    ];
    // 1 MiB before the first partition (protective MBR, GPT header and
    // table) and 1 MiB after the last (the backup table).
    let total = MIB + parts.iter().map(|p| p.2).sum::<u64>() + MIB;
    let mut dev = Cursor::new(vec![0u8; total as usize]);
    let sectors = u32::try_from(total / SECTOR - 1).unwrap_or(u32::MAX);
    gpt::mbr::ProtectiveMBR::with_lb_size(sectors)
        .overwrite_lba0(&mut dev)
        .context("protective MBR")?;
    let mut g = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
        .create_from_device(&mut dev, Some(uuid_of("disk", &salt)))
        .context("GPT")?;
    let mut table = BTreeMap::new();
    let mut lba = MIB / SECTOR;
    let mut offsets = Vec::new();
    for (i, (name, ty, bytes, data)) in parts.iter().enumerate() {
        let len = bytes / SECTOR;
        table.insert(
            i as u32 + 1,
            gpt::partition::Partition {
                part_type_guid: ty.clone(),
                part_guid: uuid_of(name, &salt),
                first_lba: lba,
                last_lba: lba + len - 1,
                flags: 0,
                name: name.to_string(),
            },
        );
        offsets.push((lba * SECTOR, *data));
        lba += len;
    }
    g.update_partitions(table).context("GPT partitions")?;
    g.write().context("write the GPT")?;
    let mut raw = dev.into_inner();
    for (off, data) in offsets {
        if let Some(d) = data {
            raw[off as usize..off as usize + d.len()].copy_from_slice(d);
        }
    }
    Ok(raw)
}

/// The OS slot for a kernel, initramfs and command line: its unified
/// kernel image and manifest. The version is the first 12 hex digits of
/// the SHA-256 of the three inputs.
pub fn slot(vmlinuz: &Path, initramfs: &Path, cmdline: &str, work: &Path) -> Result<Slot> {
    let kernel = std::fs::read(vmlinuz)?;
    let initrd = std::fs::read(initramfs)?;
    let mut h = Sha256::new();
    h.update(&kernel);
    h.update(&initrd);
    h.update(cmdline.as_bytes());
    let version = hex::encode(&h.finalize()[..6]);
    let uki = uki(vmlinuz, initramfs, cmdline, &version, work)?;
    let manifest = serde_json::json!({
        "version": version,
        "uki_sha256": hex::encode(Sha256::digest(&uki)),
        "uki_bytes": uki.len(),
        "cmdline": cmdline,
    });
    Ok(Slot {
        uki,
        manifest,
        signature: None,
    })
}

/// The update file for `slot`: the slot partition's FAT filesystem, what
/// `cup update` writes into the slot that is not running.
pub fn slot_image(slot: &Slot) -> Result<Vec<u8>> {
    fat(SLOT_BYTES, "STEELCUP_A", &slot.named_files()?)
}

/// An update key pair: the signing key (32 bytes of seed, hex) for the
/// build machine, the public key (hex) for the servers (image-build's
/// `[host] update-key`, or a machine config's `update-key`).
pub fn new_update_key() -> Result<(String, String)> {
    let mut seed = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut seed)?;
    let key = ed25519_dalek::SigningKey::from_bytes(&seed);
    Ok((
        hex::encode(seed),
        hex::encode(key.verifying_key().to_bytes()),
    ))
}

/// Reads a signing key written by [`new_update_key`].
pub fn read_signing_key(path: &Path) -> Result<ed25519_dalek::SigningKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("read the update signing key {}", path.display()))?;
    let seed: [u8; 32] = hex::decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .with_context(|| format!("{}: not 64 hex digits", path.display()))?;
    Ok(ed25519_dalek::SigningKey::from_bytes(&seed))
}

/// A zstd initramfs with `files` (path, mode, content) laid over it: a
/// second, uncompressed cpio archive after the first, on a 4-byte
/// boundary (the kernel unpacks the archives in turn, and a later file
/// replaces an earlier one). For test builds that differ from a built
/// image in a file or two.
pub fn overlay_initramfs(initramfs: &[u8], files: &[(&str, u32, Vec<u8>)]) -> Result<Vec<u8>> {
    let mut t = crate::tree::Tree::default();
    for (path, mode, data) in files {
        t.file(path, *mode, data.clone())?;
    }
    let mut out = initramfs.to_vec();
    out.resize(out.len().next_multiple_of(4), 0);
    out.extend(t.to_cpio()?);
    Ok(out)
}

/// Builds `disk.img`, `disk.qcow2` and the update file `slot.img` (slot
/// A's filesystem alone: what `cup update` writes into the other slot)
/// into `out`, the slot signed with `signer` if given; returns the slot's
/// manifest.
pub fn build(
    vmlinuz: &Path,
    initramfs: &Path,
    cmdline: &str,
    out: &Path,
    signer: Option<&ed25519_dalek::SigningKey>,
) -> Result<serde_json::Value> {
    let work = out.join("disk-work");
    let mut slot = slot(vmlinuz, initramfs, cmdline, &work)?;
    if let Some(key) = signer {
        slot.sign(key)?;
    }
    let manifest = slot.manifest.clone();
    let env = grubenv(&BTreeMap::from([
        ("ORDER", "A B".to_string()),
        ("A_TRIES", TRIES.to_string()),
        ("B_TRIES", "0".to_string()),
    ]))?;
    let esp_files = vec![
        ("EFI/BOOT/BOOTX64.EFI".to_string(), grub_efi(&work)?),
        (
            "EFI/steelcup/grub.cfg".to_string(),
            GRUB_CFG.as_bytes().to_vec(),
        ),
        ("EFI/steelcup/grubenv".to_string(), env),
    ];
    let raw = disk(&esp_files, &slot)?;
    write(&out.join("slot.img"), &slot_image(&slot)?)?;
    let img = out.join("disk.img");
    write(&img, &raw)?;
    let qcow = out.join("disk.qcow2");
    let status = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&img)
        .arg(&qcow)
        .status()
        .context("run qemu-img (qemu-utils)")?;
    if !status.success() {
        bail!("qemu-img convert: {status}");
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(manifest)
}

fn write(path: &PathBuf, data: &[u8]) -> Result<()> {
    let mut f =
        std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    f.write_all(data)
        .with_context(|| format!("write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fat_holds_the_files_and_is_the_same_each_time() {
        let files = vec![
            ("EFI/steelcup/grubenv".to_string(), vec![b'#'; 1024]),
            ("top".to_string(), b"hello".to_vec()),
        ];
        let a = fat(40 * MIB, "STEELCUP", &files).unwrap();
        let b = fat(40 * MIB, "STEELCUP", &files).unwrap();
        assert_eq!(a, b, "the same inputs give the same bytes");
        let fs = fatfs::FileSystem::new(Cursor::new(a), fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.fat_type(), fatfs::FatType::Fat32);
        assert_eq!(fs.volume_label(), "STEELCUP");
        let mut s = String::new();
        std::io::Read::read_to_string(&mut fs.root_dir().open_file("top").unwrap(), &mut s)
            .unwrap();
        assert_eq!(s, "hello");
        let mut env = Vec::new();
        std::io::Read::read_to_end(
            &mut fs.root_dir().open_file("EFI/steelcup/grubenv").unwrap(),
            &mut env,
        )
        .unwrap();
        assert_eq!(env.len(), 1024);
    }

    #[test]
    fn objcopys_time_stamp_is_taken_out_of_the_unified_kernel_image() {
        // A PE image's headers: e_lfanew, the signature, a COFF header
        // with a time stamp, an optional header with a checksum.
        let image = |stamp: u32| {
            let mut b = vec![0u8; 0x200];
            b[..2].copy_from_slice(b"MZ");
            b[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
            b[0x80..0x84].copy_from_slice(b"PE\0\0");
            b[0x88..0x8c].copy_from_slice(&stamp.to_le_bytes());
            b[0x98..0x9a].copy_from_slice(&0x20bu16.to_le_bytes());
            b[0x1f0] = 7;
            b
        };
        let (mut a, mut b) = (image(1_796_534_935), image(1_796_534_937));
        reproducible_pe(&mut a).unwrap();
        reproducible_pe(&mut b).unwrap();
        assert_eq!(a, b);
        assert_eq!(&a[0x88..0x8c], &[0; 4]);
        // The checksum: the words (0x5a4d + 0x80 + 0x4550 + 0x20b + 7 with
        // carries folded) plus the length.
        let want = (0x5a4du32 + 0x80 + 0x4550 + 0x20b + 7) + 0x200;
        assert_eq!(
            u32::from_le_bytes(a[0x80 + 88..0x80 + 92].try_into().unwrap()),
            want
        );
        assert!(reproducible_pe(&mut [0u8; 16]).is_err());
    }

    #[test]
    fn a_signed_slot_checks_with_its_key_in_init() {
        let uki = b"MZ a kernel".to_vec();
        let mut slot = Slot {
            manifest: serde_json::json!({
                "version": "v1",
                "uki_sha256": hex::encode(Sha256::digest(&uki)),
                "uki_bytes": uki.len(),
            }),
            uki,
            signature: None,
        };
        let (seed, public) = new_update_key().unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("update.key"), &seed).unwrap();
        let key = read_signing_key(&dir.path().join("update.key")).unwrap();
        slot.sign(&key).unwrap();
        let img = slot_image(&slot).unwrap();
        let public = steelcup_os::update::parse_key(&public).unwrap();
        let m = steelcup_os::update::check_slot(Cursor::new(&img), Some(&public)).unwrap();
        assert_eq!(m.version, "v1");
        slot.signature = None;
        let img = slot_image(&slot).unwrap();
        assert!(steelcup_os::update::check_slot(Cursor::new(&img), Some(&public)).is_err());
        assert!(steelcup_os::update::check_slot(Cursor::new(&img), None).is_ok());
    }

    #[test]
    fn an_overlay_is_a_second_cpio_on_a_four_byte_boundary() {
        let base = zstd::bulk::compress(b"not really a cpio", 3).unwrap();
        let out = overlay_initramfs(&base, &[("etc/x.toml", 0o644, b"x = 1\n".to_vec())]).unwrap();
        assert_eq!(&out[..base.len()], &base[..]);
        let at = base.len().next_multiple_of(4);
        assert!(out[base.len()..at].iter().all(|b| *b == 0));
        assert_eq!(
            &out[at..at + 6],
            b"070701",
            "a newc header where the kernel looks"
        );
        let rest = String::from_utf8_lossy(&out[at..]);
        assert!(rest.contains("etc/x.toml\0") && rest.contains("x = 1\n"));
        assert!(rest.contains("TRAILER!!!"));
    }

    #[test]
    fn the_disk_has_the_four_partitions_and_the_slot_files() {
        let slot = Slot {
            uki: b"MZ not really a kernel".to_vec(),
            manifest: serde_json::json!({"version": "test"}),
            signature: None,
        };
        let esp = vec![(
            "EFI/steelcup/grub.cfg".to_string(),
            GRUB_CFG.as_bytes().to_vec(),
        )];
        let raw = disk(&esp, &slot).unwrap();
        assert_eq!(raw, disk(&esp, &slot).unwrap(), "reproducible");
        let g = gpt::GptConfig::new()
            .writable(false)
            .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
            .open_from_device(Cursor::new(raw.clone()))
            .unwrap();
        let parts: Vec<(String, u64)> = g
            .partitions()
            .values()
            .map(|p| (p.name.clone(), p.first_lba * SECTOR))
            .collect();
        assert_eq!(
            parts,
            vec![
                ("steelcup-esp".to_string(), MIB),
                ("steelcup-a".to_string(), MIB + ESP_BYTES),
                ("steelcup-b".to_string(), MIB + ESP_BYTES + SLOT_BYTES),
                (
                    "steelcup-state".to_string(),
                    MIB + ESP_BYTES + 2 * SLOT_BYTES
                ),
            ]
        );
        let a = &raw[(MIB + ESP_BYTES) as usize..(MIB + ESP_BYTES + SLOT_BYTES) as usize];
        let fs = fatfs::FileSystem::new(Cursor::new(a.to_vec()), fatfs::FsOptions::new()).unwrap();
        let mut sums = String::new();
        std::io::Read::read_to_string(
            &mut fs.root_dir().open_file("SHA256SUMS").unwrap(),
            &mut sums,
        )
        .unwrap();
        assert_eq!(
            sums,
            format!("{}  steelcup.efi\n", hex::encode(Sha256::digest(&slot.uki)))
        );
    }
}
