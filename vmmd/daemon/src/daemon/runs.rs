//! `cup run` workloads with a restart policy (`--restart always` or
//! `on-failure`, not `--rm`) outlive vmmd, as docker's restart policies
//! do: their run spec is kept in `STATE/runs/NAME.json` (on the state
//! partition on a disk install) until `cup rm`, and a vmmd that starts
//! runs them again.

use super::*;

/// Where the kept run specs are.
fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("runs")
}

/// The most kept runs read back (each a small JSON file).
const MAX_KEPT: usize = 1024;
/// The longest kept spec read back.
const MAX_SPEC: u64 = 256 * 1024;

/// Whether a run of `spec` is kept.
pub(super) fn kept(spec: &vmm1::RunSpec) -> bool {
    spec.restart != units::Restart::No && !spec.rm
}

/// Keeps workload `name`'s run spec (detached: nobody is attached when
/// it runs again).
pub(super) fn keep(state_dir: &Path, name: &str, spec: &vmm1::RunSpec) {
    let mut spec = spec.clone();
    spec.name = Some(name.to_string());
    (spec.attach, spec.tty) = (false, false);
    let d = dir(state_dir);
    let path = d.join(format!("{name}.json"));
    let tmp = d.join(format!(".{name}.json.new"));
    let written = std::fs::create_dir_all(&d)
        .and_then(|()| std::fs::write(&tmp, serde_json::to_vec_pretty(&spec).unwrap_or_default()))
        .and_then(|()| std::fs::rename(&tmp, &path));
    match written {
        Ok(()) => tracing::info!(
            "workload {name}: restart {:?}: kept in {} for vmmd's next start",
            spec.restart,
            path.display()
        ),
        Err(e) => tracing::warn!(
            "workload {name}: cannot keep its run spec in {}: {e}; it does not outlive vmmd",
            path.display()
        ),
    }
}

/// Workload `name`'s kept run spec, if it has one, is `to`'s from now on.
pub(super) fn rename(state_dir: &Path, name: &str, to: &str) {
    let path = dir(state_dir).join(format!("{name}.json"));
    let Ok(text) = std::fs::read(&path) else {
        return;
    };
    if let Ok(spec) = serde_json::from_slice::<vmm1::RunSpec>(&text) {
        keep(state_dir, to, &spec);
        let _ = std::fs::remove_file(path);
    }
}

/// Forgets workload `name`'s kept run spec, if it has one.
pub(super) fn forget(state_dir: &Path, name: &str) {
    let _ = std::fs::remove_file(dir(state_dir).join(format!("{name}.json")));
}

/// The kept run specs, by name; a file that does not read is logged and
/// left for the operator.
pub(super) fn load(state_dir: &Path) -> Vec<vmm1::RunSpec> {
    use std::io::Read;
    let Ok(rd) = std::fs::read_dir(dir(state_dir)) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "json")
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    files.truncate(MAX_KEPT);
    let mut specs = Vec::new();
    for p in files {
        let mut text = Vec::new();
        let read = std::fs::File::open(&p)
            .and_then(|f| f.take(MAX_SPEC + 1).read_to_end(&mut text))
            .map_err(|e| e.to_string())
            .and_then(|n| {
                if n as u64 > MAX_SPEC {
                    Err(format!("more than {MAX_SPEC} bytes"))
                } else {
                    serde_json::from_slice::<vmm1::RunSpec>(&text).map_err(|e| e.to_string())
                }
            });
        let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned());
        match read {
            Ok(spec) if spec.name == stem && kept(&spec) => specs.push(spec),
            Ok(_) => tracing::error!(
                "{}: not a kept run (its name must be its file's, with a restart policy); left alone",
                p.display()
            ),
            Err(e) => tracing::error!("{}: {e}; left alone", p.display()),
        }
    }
    specs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_with_a_restart_policy_are_kept_until_forgotten() {
        let d = tempfile::tempdir().unwrap();
        let spec = vmm1::RunSpec {
            image: "busybox:latest".into(),
            restart: units::Restart::Always,
            attach: true,
            ..Default::default()
        };
        assert!(kept(&spec));
        assert!(!kept(&vmm1::RunSpec {
            rm: true,
            ..spec.clone()
        }));
        assert!(!kept(&vmm1::RunSpec::default()));
        keep(d.path(), "web", &spec);
        let back = load(d.path());
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].name.as_deref(), Some("web"));
        assert!(!back[0].attach, "a run started again is detached");
        // A file whose name is not its spec's, or that is not JSON, stays
        // where it is and is not run.
        std::fs::write(
            d.path().join("runs/other.json"),
            serde_json::to_vec(&back[0]).unwrap(),
        )
        .unwrap();
        std::fs::write(d.path().join("runs/bad.json"), "{").unwrap();
        assert_eq!(load(d.path()).len(), 1);
        forget(d.path(), "web");
        assert!(load(d.path()).is_empty());
        assert!(d.path().join("runs/bad.json").exists());
    }
}
