//! `state`: the state partition, mounted at `/var`.
//!
//! # Design
//! A steelcup disk (docs/disk-image.md) carries a partition whose GPT name
//! is `steelcup-state`. At boot init finds it by that name among the
//! kernel's partitions (`PARTNAME` in sysfs), and:
//! - if it holds an ext4 filesystem, mounts it at `/var`;
//! - if it is blank (the first boot of a flashed disk), first grows it to
//!   the end of the disk (a new GPT for the disk's real size, written in
//!   place, the kernel told with `BLKPG_RESIZE_PARTITION`), then formats
//!   it ext4 (`mke2fs`, label `steelcup-state`) and mounts it;
//! - if it holds anything else, leaves it untouched and says so: nothing
//!   on a disk init does not recognise is ever overwritten.
//!
//! Without a state partition (a PXE boot, `cargo xtask run`) `/var` is the
//! initramfs's own, in memory, and nothing in it survives a reboot. Two
//! disks that both carry one are refused the same way (which one is the
//! machine's own cannot be told).
//!
//! `/var` holds the image store, the VMs' volumes, logs and leases
//! (`/var/lib/steelcup`, `/var/log/steelcup`): the state phase runs before
//! any unit starts.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The GPT partition names of a steelcup disk.
pub const STATE_LABEL: &str = "steelcup-state";
pub const ESP_LABEL: &str = "steelcup-esp";
/// Where the state partition is mounted.
pub const VAR: &str = "/var";
/// Where init looks for `mke2fs` (e2fsprogs, shipped in the image).
pub const MKE2FS: &str = "/usr/sbin/mke2fs";

/// A partition the kernel knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// Its device node, `/dev/vda4`.
    pub dev: PathBuf,
    /// Its disk's device node, `/dev/vda`.
    pub disk: PathBuf,
    /// Its number on the disk (GPT entry, from 1).
    pub number: u32,
    /// Its GPT name.
    pub label: String,
}

/// Reads `KEY=VALUE` lines of a sysfs `uevent` file.
fn uevent_value<'a>(uevent: &'a str, key: &str) -> Option<&'a str> {
    uevent
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

/// The partitions under `class_block` (`/sys/class/block`) that carry a
/// GPT name.
pub fn partitions(class_block: &Path) -> Vec<Partition> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(class_block) else {
        return out;
    };
    for e in entries.flatten() {
        let path = e.path();
        let Ok(uevent) = std::fs::read_to_string(path.join("uevent")) else {
            continue;
        };
        if uevent_value(&uevent, "DEVTYPE") != Some("partition") {
            continue;
        }
        let (Some(name), Some(label), Some(number)) = (
            uevent_value(&uevent, "DEVNAME"),
            uevent_value(&uevent, "PARTNAME"),
            uevent_value(&uevent, "PARTN").and_then(|n| n.parse().ok()),
        ) else {
            continue;
        };
        // /sys/class/block/vda4 -> .../block/vda/vda4: the disk is the parent.
        let Some(disk) = std::fs::canonicalize(&path)
            .ok()
            .and_then(|p| Some(p.parent()?.file_name()?.to_string_lossy().into_owned()))
        else {
            continue;
        };
        out.push(Partition {
            dev: Path::new("/dev").join(name),
            disk: Path::new("/dev").join(disk),
            number,
            label: label.to_string(),
        });
    }
    out.sort_by(|a, b| a.dev.cmp(&b.dev));
    out
}

/// The one partition named `label`; None without one; an error naming
/// them when there are several.
pub fn find(parts: &[Partition], label: &str) -> Result<Option<Partition>, String> {
    let found: Vec<&Partition> = parts.iter().filter(|p| p.label == label).collect();
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some((*one).clone())),
        many => Err(format!(
            "{} partitions are named {label} ({}); not choosing one",
            many.len(),
            many.iter()
                .map(|p| p.dev.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// What a partition holds, from its first 64 KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// An ext2/3/4 superblock (magic 0xEF53 at byte 1080).
    Ext4,
    /// Nothing but zeros.
    Blank,
    /// Something else.
    Other,
}

/// How many bytes [`classify`] looks at.
pub const HEAD_BYTES: usize = 64 * 1024;

pub fn classify(head: &[u8]) -> Content {
    if head.len() >= 1082 && head[1080..1082] == [0x53, 0xef] {
        Content::Ext4
    } else if head.iter().all(|&b| b == 0) {
        Content::Blank
    } else {
        Content::Other
    }
}

/// What the state phase did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// No state partition: /var is in memory.
    None,
    /// Mounted the filesystem that was there.
    Mounted(PathBuf),
    /// First boot: grown from/to (bytes, None: not grown), formatted, mounted.
    Formatted {
        dev: PathBuf,
        grown: Option<(u64, u64)>,
    },
}

/// `cup machine reset` leaves this on the state partition: the next boot
/// formats the partition again (a first boot: provisioning runs again).
pub const RESET_MARKER: &str = "/var/lib/steelcup/reset-requested";

/// True when `/var` is the state partition (not the memory of a machine
/// booted without one).
pub fn var_is_persistent() -> bool {
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|m| {
        m.lines()
            .any(|l| l.split_whitespace().nth(4) == Some(VAR) && l.contains(" - ext4 "))
    })
}

/// The `state` phase: find, (grow and format,) mount. An error leaves /var
/// in memory and the disk as it was found. A reset asked for by `cup
/// machine reset` formats the partition again.
pub fn mount_state(parts: &[Partition]) -> Result<Outcome, String> {
    let Some(part) = find(parts, STATE_LABEL)? else {
        return Ok(Outcome::None);
    };
    let dev = &part.dev;
    let mut head = vec![0u8; HEAD_BYTES];
    std::fs::File::open(dev)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(|e| format!("read {}: {e}", dev.display()))?;
    let outcome = match classify(&head) {
        Content::Ext4 => Outcome::Mounted(dev.clone()),
        Content::Other => {
            return Err(format!(
                "{} ({STATE_LABEL}) holds something that is not ext4 and not blank; it is left untouched",
                dev.display()
            ))
        }
        Content::Blank => {
            tracing::info!("state: {} is blank: growing and formatting it", dev.display());
            let grown = match grow_last_partition(&part.disk, part.number) {
                Ok(g) => g,
                // Formatting what is there is still better than no /var.
                Err(e) => {
                    tracing::warn!("state: growing {}: {e}; formatted as it is", dev.display());
                    None
                }
            };
            format_ext4(dev)?;
            Outcome::Formatted {
                dev: dev.clone(),
                grown,
            }
        }
    };
    let flags = nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV;
    let mount = || {
        steelcup_sys::mount(&dev.to_string_lossy(), Path::new(VAR), "ext4", flags, None)
            .map_err(|e| steelcup_sys::error_chain(&e))
    };
    mount()?;
    if Path::new(RESET_MARKER).exists() {
        tracing::warn!(
            "state: cup machine reset asked for a wipe: formatting {} again",
            dev.display()
        );
        nix::mount::umount(VAR).map_err(|e| format!("unmount {VAR}: {e}"))?;
        format_ext4(dev)?;
        mount()?;
        return Ok(Outcome::Formatted {
            dev: dev.clone(),
            grown: None,
        });
    }
    Ok(outcome)
}

/// `mke2fs -t ext4` on `dev`, with the state label. The journal stays: the
/// state partition is the host's, and hosts lose power.
fn format_ext4(dev: &Path) -> Result<(), String> {
    let out = std::process::Command::new(MKE2FS)
        .args([
            "-q",
            "-F",
            "-t",
            "ext4",
            "-L",
            STATE_LABEL,
            "-E",
            "nodiscard",
        ])
        .arg(dev)
        // Nobody answers a question at boot: one asked is an error.
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("run {MKE2FS}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "mke2fs {}: {}: {}",
            dev.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// A 1 MiB boundary in sectors of `lb` bytes.
fn align(lb: u64) -> u64 {
    (1 << 20) / lb
}

/// A partition table with its last partition grown (LBAs).
#[derive(Debug)]
pub struct Grown<D> {
    pub table: gpt::GptDisk<D>,
    pub first: u64,
    pub old_last: u64,
    pub last: u64,
}

/// The disk's GPT, partition `number` (the last on the disk) reaching the
/// disk's end (on a 1 MiB boundary), the backup header at the real end:
/// the partition's first LBA and its old and new last LBA, or None when it
/// already does.
/// `dev` is the whole disk (a file in the tests).
pub fn grown_table<D: Read + Write + Seek + std::fmt::Debug>(
    dev: D,
    lb: gpt::disk::LogicalBlockSize,
    number: u32,
) -> Result<Option<Grown<D>>, String> {
    let old = gpt::GptConfig::new()
        .writable(false)
        .logical_block_size(lb)
        .open_from_device(dev)
        .map_err(|e| format!("read the GPT: {e}"))?;
    let parts = old.partitions().clone();
    let me = parts
        .get(&number)
        .ok_or_else(|| format!("no GPT entry {number}"))?
        .clone();
    if parts
        .values()
        .any(|p| p.is_used() && p.first_lba > me.first_lba)
    {
        return Err(format!("partition {number} is not the last on the disk"));
    }
    let guid = *old.guid();
    let mut dev = old.take_device();
    let size = dev
        .seek(SeekFrom::End(0))
        .map_err(|e| format!("disk size: {e}"))?;
    let lbs = lb.as_u64();
    let mut new = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(lb)
        .create_from_device(dev, Some(guid))
        .map_err(|e| format!("a GPT for {size} bytes: {e}"))?;
    let last_usable = new.header().last_usable;
    let a = align(lbs);
    let last = (last_usable + 1) / a * a - 1;
    if last <= me.last_lba {
        return Ok(None);
    }
    let mut table = parts;
    if let Some(p) = table.get_mut(&number) {
        p.last_lba = last;
    }
    new.update_partitions(table)
        .map_err(|e| format!("the grown partition table: {e}"))?;
    Ok(Some(Grown {
        table: new,
        first: me.first_lba,
        old_last: me.last_lba,
        last,
    }))
}

/// Grows partition `number` of `disk` to the end of the disk; tells the
/// kernel. Returns the old and new sizes in bytes.
fn grow_last_partition(disk: &Path, number: u32) -> Result<Option<(u64, u64)>, String> {
    let name = disk.file_name().unwrap_or_default().to_string_lossy();
    let lb_bytes: u64 =
        std::fs::read_to_string(format!("/sys/block/{name}/queue/logical_block_size"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(512);
    let lb = gpt::disk::LogicalBlockSize::try_from(lb_bytes)
        .map_err(|e| format!("{lb_bytes}-byte sectors: {e}"))?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)
        .map_err(|e| format!("open {}: {e}", disk.display()))?;
    let Some(Grown {
        table,
        first,
        old_last,
        last,
    }) = grown_table(file, lb, number)?
    else {
        return Ok(None);
    };
    let mut file = table.write().map_err(|e| format!("write the GPT: {e}"))?;
    let size = file.seek(SeekFrom::End(0)).map_err(|e| e.to_string())?;
    let sectors = u32::try_from(size / lb_bytes - 1).unwrap_or(u32::MAX);
    gpt::mbr::ProtectiveMBR::with_lb_size(sectors)
        .overwrite_lba0(&mut file)
        .map_err(|e| format!("protective MBR: {e}"))?;
    file.sync_all()
        .map_err(|e| format!("sync {}: {e}", disk.display()))?;
    let start = first * lb_bytes;
    let length = (last + 1 - first) * lb_bytes;
    blkpg_resize(&file, number, start, length)
        .map_err(|e| format!("tell the kernel partition {number} grew: {e}"))?;
    Ok(Some(((old_last + 1 - first) * lb_bytes, length)))
}

#[repr(C)]
struct BlkpgPartition {
    start: i64,
    length: i64,
    pno: libc::c_int,
    devname: [u8; 64],
    volname: [u8; 64],
}

#[repr(C)]
struct BlkpgIoctlArg {
    op: libc::c_int,
    flags: libc::c_int,
    datalen: libc::c_int,
    data: *mut libc::c_void,
}

/// `ioctl(BLKPG, BLKPG_RESIZE_PARTITION)`: partition `pno` of the disk
/// open as `disk` now spans `length` bytes from `start`.
fn blkpg_resize(disk: &std::fs::File, pno: u32, start: u64, length: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    const BLKPG: libc::c_ulong = 0x1269;
    const BLKPG_RESIZE_PARTITION: libc::c_int = 3;
    let mut part = BlkpgPartition {
        start: start as i64,
        length: length as i64,
        pno: pno as libc::c_int,
        devname: [0; 64],
        volname: [0; 64],
    };
    let arg = BlkpgIoctlArg {
        op: BLKPG_RESIZE_PARTITION,
        flags: 0,
        datalen: std::mem::size_of::<BlkpgPartition>() as libc::c_int,
        data: (&mut part as *mut BlkpgPartition).cast(),
    };
    // SAFETY: BLKPG reads `arg` and the partition it points to, both alive
    // for the call.
    let r = unsafe { libc::ioctl(disk.as_raw_fd(), BLKPG, &arg) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Says what the state phase did, on the console.
pub fn report(outcome: &Result<Outcome, String>) {
    match outcome {
        Ok(Outcome::None) => tracing::info!(
            "state: no {STATE_LABEL} partition; /var is in memory and nothing in it survives a reboot"
        ),
        Ok(Outcome::Mounted(dev)) => {
            tracing::info!("state: {} mounted at {VAR}", dev.display())
        }
        Ok(Outcome::Formatted { dev, grown }) => tracing::info!(
            "state: first boot: {} {}formatted ext4 and mounted at {VAR}",
            dev.display(),
            match grown {
                Some((from, to)) => format!("grown from {} to {} MiB, ", from >> 20, to >> 20),
                None => String::new(),
            }
        ),
        Err(e) => tracing::error!("state: {e}; /var is in memory"),
    }
}

/// Before power-off or reboot, with every unit stopped: /var remounted
/// read-only, so the state partition is clean however the power goes.
pub fn settle() {
    use nix::mount::MsFlags;
    let on_state = std::fs::read_to_string("/proc/self/mounts")
        .map(|m| m.lines().any(|l| l.split_whitespace().nth(1) == Some(VAR)))
        .unwrap_or(false);
    if !on_state {
        return;
    }
    match nix::mount::mount(
        None::<&str>,
        VAR,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    ) {
        Ok(()) => tracing::info!("state: {VAR} remounted read-only"),
        // init's own log files are still open: synced with the rest.
        Err(nix::errno::Errno::EBUSY) => {}
        Err(e) => tracing::warn!("state: remount {VAR} read-only: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn contents_are_told_apart() {
        let mut head = vec![0u8; HEAD_BYTES];
        assert_eq!(classify(&head), Content::Blank);
        head[1080] = 0x53;
        head[1081] = 0xef;
        assert_eq!(classify(&head), Content::Ext4);
        head[1081] = 0;
        assert_eq!(classify(&head), Content::Other);
    }

    #[test]
    fn one_partition_per_name_or_an_error_naming_them() {
        let p = |dev: &str, label: &str| Partition {
            dev: dev.into(),
            disk: "/dev/vda".into(),
            number: 4,
            label: label.into(),
        };
        let parts = [p("/dev/vda1", ESP_LABEL), p("/dev/vda4", STATE_LABEL)];
        assert_eq!(find(&parts, STATE_LABEL).unwrap(), Some(parts[1].clone()));
        assert_eq!(find(&parts[..1], STATE_LABEL).unwrap(), None);
        let two = [p("/dev/vda4", STATE_LABEL), p("/dev/vdb4", STATE_LABEL)];
        let e = find(&two, STATE_LABEL).unwrap_err();
        assert!(e.contains("/dev/vda4, /dev/vdb4"), "{e}");
    }

    #[test]
    fn uevent_values_are_read() {
        let u = "MAJOR=254\nMINOR=4\nDEVNAME=vda4\nDEVTYPE=partition\nPARTN=4\nPARTNAME=steelcup-state\n";
        assert_eq!(uevent_value(u, "PARTNAME"), Some("steelcup-state"));
        assert_eq!(uevent_value(u, "PARTN"), Some("4"));
        assert_eq!(uevent_value(u, "PART"), None);
    }

    /// A disk of `total` bytes whose GPT (made for `made` bytes) has three
    /// partitions, the last one small.
    fn disk(made: u64, total: u64) -> Vec<u8> {
        let mib = 1u64 << 20;
        let mut dev = Cursor::new(vec![0u8; made as usize]);
        let mut g = gpt::GptConfig::new()
            .writable(true)
            .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
            .create_from_device(&mut dev, None)
            .unwrap();
        for (i, name) in ["steelcup-esp", "steelcup-a", STATE_LABEL]
            .iter()
            .enumerate()
        {
            g.add_partition_at(
                name,
                i as u32 + 1,
                (1 + 2 * i as u64) * mib / 512,
                2 * mib / 512,
                gpt::partition_types::LINUX_FS,
                0,
            )
            .unwrap();
        }
        g.write().unwrap();
        let mut raw = dev.into_inner();
        raw.resize(total as usize, 0);
        raw
    }

    #[test]
    fn the_last_partition_grows_to_the_end_of_a_bigger_disk() {
        let mib = 1u64 << 20;
        let raw = disk(8 * mib, 64 * mib);
        let lb = gpt::disk::LogicalBlockSize::Lb512;
        let Grown {
            table,
            first,
            old_last,
            last,
        } = grown_table(Cursor::new(raw), lb, 3).unwrap().unwrap();
        assert_eq!(first, 5 * mib / 512);
        assert_eq!(old_last, 7 * mib / 512 - 1, "2 MiB as made");
        // The end of the disk less the backup table, down to 1 MiB.
        assert_eq!(last, 63 * mib / 512 - 1);
        let raw = table.write().unwrap().into_inner();
        let g = gpt::GptConfig::new()
            .writable(false)
            .logical_block_size(lb)
            .open_from_device(Cursor::new(raw.clone()))
            .unwrap();
        // Both headers valid, the backup at the disk's last sector.
        assert_eq!(g.primary_header().unwrap().backup_lba, 64 * mib / 512 - 1);
        assert!(g.backup_header().is_ok());
        let names: Vec<(String, u64, u64)> = g
            .partitions()
            .values()
            .map(|p| (p.name.clone(), p.first_lba, p.last_lba))
            .collect();
        assert_eq!(names[2], (STATE_LABEL.to_string(), first, last));
        assert_eq!(names[0].1, mib / 512, "the others are as they were");
        // Grown once: nothing more to do.
        assert!(grown_table(Cursor::new(raw), lb, 3).unwrap().is_none());
    }

    #[test]
    fn only_the_last_partition_grows() {
        let mib = 1u64 << 20;
        let raw = disk(8 * mib, 64 * mib);
        let lb = gpt::disk::LogicalBlockSize::Lb512;
        let e = grown_table(Cursor::new(raw), lb, 2).err().unwrap();
        assert!(e.contains("not the last"), "{e}");
    }
}
