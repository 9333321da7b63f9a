//! Workload volumes: the disk files under the state directory, made
//! sparse at their size and formatted ext4 once.

use super::*;

/// Where `cup run -v NAME:...` volumes live under `volumes/`, shared by
/// every `cup run` that names them (not a unit name: those start with a
/// letter or digit).
pub const NAMED_VOLUMES: &str = "_named";

/// The size of a named volume vmmd creates.
pub const NAMED_VOLUME_SIZE: u64 = 1 << 30;

/// The disk of named volume `v` of a `cup run` workload.
pub(super) fn named_volume(v: steelcup_api::vmm1::NamedVolume) -> steelcup_units::VolumeSpec {
    steelcup_units::VolumeSpec {
        name: v.name,
        size: units::MemSize(NAMED_VOLUME_SIZE),
        mount: v.mount,
        read_only: v.read_only,
    }
}

/// The disk file of volume `volume` of workload `unit`, created empty
/// (sparse) at its size if it does not exist yet. An existing disk is kept
/// as it is: its data outlives any change to the unit.
pub fn ensure_volume(
    state_dir: &Path,
    unit: &str,
    volume: &steelcup_units::VolumeSpec,
) -> Result<PathBuf, VmError> {
    let dir = state_dir.join("volumes").join(unit);
    let path = dir.join(format!("{}.img", volume.name));
    if path.exists() {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir).map_err(VmError::file("create", &dir))?;
    // Create under a temporary name and rename, so a crash never leaves a
    // disk of the wrong size behind.
    let tmp = dir.join(format!(".{}.img.new", volume.name));
    let f = std::fs::File::create(&tmp).map_err(VmError::file("create", &tmp))?;
    f.set_len(volume.size.0)
        .map_err(VmError::file("size", &tmp))?;
    drop(f);
    let formatted = format_volume(&tmp).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    std::fs::rename(&tmp, &path).map_err(VmError::file("create", &path))?;
    let whose = match unit {
        NAMED_VOLUMES => "cup run".to_string(),
        unit => format!("workload {unit}"),
    };
    tracing::info!(
        "{whose}: created volume {} ({}) at {}{}",
        volume.name,
        volume.size,
        path.display(),
        if formatted { ", ext4" } else { "" }
    );
    Ok(path)
}

/// Where vmmd looks for e2fsprogs' mke2fs (the appliance ships it).
pub(super) const MKE2FS_PATHS: [&str; 3] = ["/usr/sbin/mke2fs", "/sbin/mke2fs", "/usr/bin/mke2fs"];

/// Formats a new, sparse volume file as ext4 on the host, when mke2fs is
/// there: with nothing to zero on a new file (`assume_storage_prezeroed`:
/// the inode tables are taken as zeroed, so the file stays sparse and
/// neither mke2fs nor the guest kernel writes them), it takes
/// milliseconds, where the guest's busybox mke2fs writes every inode
/// table through the VM's disk. Without mke2fs (false), vminit formats the
/// blank disk on first use.
pub(super) fn format_volume(file: &Path) -> Result<bool, VmError> {
    let Some(mke2fs) = MKE2FS_PATHS.iter().map(Path::new).find(|p| p.exists()) else {
        return Ok(false);
    };
    let out = std::process::Command::new(mke2fs)
        .args([
            "-q",
            "-F",
            "-t",
            "ext4",
            "-m",
            "0",
            // No journal, as the guest's own format had none: a VM ends by
            // a reset without unmounting (after a sync), and a journal
            // left open cannot be replayed when the disk is next attached
            // read-only.
            "-O",
            "^has_journal",
            "-E",
            "assume_storage_prezeroed=1,nodiscard",
        ])
        .arg(file)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| VmError::Spawn {
            program: mke2fs.to_path_buf(),
            source,
        })?;
    if !out.status.success() {
        return Err(VmError::Format {
            file: file.to_path_buf(),
            status: out.status,
            said: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(true)
}
