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

/// Every volume on the machine (`cup volume ls`), by name: a named one's
/// (`cup run -v NAME:...`) is its name; a unit's is `UNIT/NAME` (another
/// replica's `UNIT/replica-K/NAME`). `workloads` say who uses each.
pub(super) fn list_volumes(
    state_dir: &Path,
    workloads: &BTreeMap<String, Workload>,
) -> Vec<vmm1::VolumeInfo> {
    let root = state_dir.join("volumes");
    let mut found = Vec::new();
    find_images(&root, &root, 0, &mut found);
    found
        .into_iter()
        .map(|(name, path)| {
            let meta = std::fs::metadata(&path).ok();
            use std::os::unix::fs::MetadataExt;
            vmm1::VolumeInfo {
                used_by: workloads
                    .iter()
                    .filter(|(_, w)| {
                        let key = w.volume_key();
                        w.spec
                            .volumes
                            .iter()
                            .any(|v| volume_name(&key, &v.name) == name)
                    })
                    .map(|(n, _)| n.clone())
                    .collect(),
                name,
                path: path.display().to_string(),
                size: meta.as_ref().map_or(0, |m| m.len()),
                allocated: meta.as_ref().map_or(0, |m| m.blocks() * 512),
            }
        })
        .collect()
}

/// The name `cup volume` shows for volume `volume` of volume key `key`.
fn volume_name(key: &str, volume: &str) -> String {
    match key {
        NAMED_VOLUMES => volume.to_string(),
        key => format!("{key}/{volume}"),
    }
}

/// The `*.img` files under `dir` (at most two levels down: `UNIT/` and
/// `UNIT/replica-K/`), named as [`volume_name`] names them.
fn find_images(root: &Path, dir: &Path, depth: u8, out: &mut Vec<(String, PathBuf)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let file = e.file_name().to_string_lossy().into_owned();
        if file.starts_with('.') && file != NAMED_VOLUMES {
            continue;
        }
        let Ok(kind) = e.file_type() else { continue };
        if kind.is_dir() && depth < 2 {
            find_images(root, &path, depth + 1, out);
        } else if kind.is_file() && depth > 0 {
            if let Some(stem) = file.strip_suffix(".img") {
                let key = path
                    .parent()
                    .and_then(|p| p.strip_prefix(root).ok())
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                out.push((volume_name(&key, stem), path));
            }
        }
    }
}

/// `cup volume create NAME [--size S]`: a named volume, made now (an
/// existing one is kept as it is, as Docker's create does).
pub(super) fn create_volume(state_dir: &Path, name: &str, size: u64) -> Result<String, ApiError> {
    steelcup_api::vmm1::NamedVolume::try_from(format!("{name}:/data").as_str())
        .map_err(|e| ApiError::Refused(format!("volume name {name:?}: {}", e.why)))?;
    if size < (1 << 20) || !size.is_multiple_of(1 << 20) || size > (1 << 40) {
        return Err(ApiError::Refused(format!(
            "volume size {size} bytes: whole MiB, 1 MiB to 1 TiB"
        )));
    }
    let spec = steelcup_units::VolumeSpec {
        name: name.to_string(),
        size: units::MemSize(size),
        mount: "/data".into(),
        read_only: false,
    };
    ensure_volume(state_dir, NAMED_VOLUMES, &spec)
        .map(|p| p.display().to_string())
        .map_err(|e| ApiError::Refused(steelcup_sys::error_chain(&e)))
}

/// `cup volume rm NAME`: its disk file deleted, unless a workload (running
/// or not) names it.
pub(super) fn remove_volume(
    state_dir: &Path,
    workloads: &BTreeMap<String, Workload>,
    name: &str,
) -> Result<(), ApiError> {
    let all = list_volumes(state_dir, workloads);
    let Some(v) = all.iter().find(|v| v.name == name) else {
        return Err(ApiError::Refused(format!(
            "no volume named {name:?}; see `cup volume ls`"
        )));
    };
    if !v.used_by.is_empty() {
        return Err(ApiError::Refused(format!(
            "volume {name:?} is in use by {}; `cup rm` {} first",
            v.used_by.join(", "),
            if v.used_by.len() == 1 { "it" } else { "them" }
        )));
    }
    std::fs::remove_file(&v.path)
        .map_err(|e| ApiError::Refused(format!("remove {}: {e}", v.path)))?;
    tracing::info!("volume {name}: removed ({})", v.path);
    Ok(())
}

/// `cup volume prune`: every named volume no workload names; a unit's
/// are left to `cup volume rm UNIT/NAME`. Answers what went.
pub(super) fn prune_volumes(
    state_dir: &Path,
    workloads: &BTreeMap<String, Workload>,
) -> Vec<String> {
    let mut gone = Vec::new();
    for v in list_volumes(state_dir, workloads) {
        if v.used_by.is_empty() && !v.name.contains('/') && std::fs::remove_file(&v.path).is_ok() {
            tracing::info!("volume {}: pruned ({})", v.name, v.path);
            gone.push(v.name);
        }
    }
    gone
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes_are_listed_created_refused_in_use_removed_and_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path();
        let now = Instant::now();
        // A unit's volume, on its disk as reconcile makes it.
        let data = steelcup_units::VolumeSpec {
            name: "data".into(),
            size: units::MemSize(8 << 20),
            mount: "/data".into(),
            read_only: false,
        };
        ensure_volume(state, "web", &data).unwrap();
        let mut web = Workload::new(
            MicrovmSection {
                volumes: vec![data.clone()],
                ..Default::default()
            },
            3,
            now,
        );
        web.unit = Some("web".into());
        let mut workloads = BTreeMap::from([("web".to_string(), web)]);
        for name in ["keep", "spare"] {
            create_volume(state, name, 16 << 20).unwrap();
        }
        // A cup run workload names `keep`.
        workloads.insert(
            "job".into(),
            Workload::new(
                MicrovmSection {
                    volumes: vec![steelcup_units::VolumeSpec {
                        name: "keep".into(),
                        ..data.clone()
                    }],
                    ..Default::default()
                },
                4,
                now,
            ),
        );
        let all = list_volumes(state, &workloads);
        let names: Vec<(&str, &[String], u64)> = all
            .iter()
            .map(|v| (v.name.as_str(), v.used_by.as_slice(), v.size))
            .collect();
        assert_eq!(
            names,
            [
                ("keep", &["job".to_string()][..], 16 << 20),
                ("spare", &[][..], 16 << 20),
                ("web/data", &["web".to_string()][..], 8 << 20),
            ]
        );
        // Made again: kept as it is.
        create_volume(state, "keep", 32 << 20).unwrap();
        assert_eq!(list_volumes(state, &workloads)[0].size, 16 << 20);
        for (name, size, says) in [("../x", 1 << 20, "volume name"), ("ok", 1000, "whole MiB")] {
            let e = create_volume(state, name, size).unwrap_err().to_string();
            assert!(e.contains(says), "{name}: {e}");
        }
        let e = remove_volume(state, &workloads, "keep")
            .unwrap_err()
            .to_string();
        assert!(e.contains("in use by job"), "{e}");
        let e = remove_volume(state, &workloads, "../../etc/passwd")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no volume named"), "{e}");
        // Prune: only unused named volumes.
        assert_eq!(prune_volumes(state, &workloads), ["spare"]);
        workloads.remove("job");
        workloads.remove("web");
        remove_volume(state, &workloads, "web/data").unwrap();
        assert_eq!(
            list_volumes(state, &workloads)
                .iter()
                .map(|v| v.name.as_str())
                .collect::<Vec<_>>(),
            ["keep"]
        );
    }
}
