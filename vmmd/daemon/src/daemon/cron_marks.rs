//! The last due time each scheduled unit fired, kept in
//! `STATE/cron.json` (on the state partition on a disk install), so a
//! vmmd that starts again catches up a run missed meanwhile once, and
//! never repeats one (see `crate::reconcile::cron`).

use super::*;
use chrono::{DateTime, Utc};

/// The longest file read back.
const MAX_FILE: u64 = 1 << 20;

fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("cron.json")
}

/// The marks a previous vmmd kept (none when there is no readable file).
pub(super) fn load(state_dir: &Path) -> BTreeMap<String, DateTime<Utc>> {
    let p = path(state_dir);
    let read = std::fs::File::open(&p).and_then(|f| {
        let mut text = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_FILE), &mut text)?;
        Ok(text)
    });
    match read {
        Ok(text) => serde_json::from_slice(&text).unwrap_or_else(|e| {
            tracing::warn!(
                "{}: {e}; scheduled units start without their last runs",
                p.display()
            );
            BTreeMap::new()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(e) => {
            tracing::warn!("{}: {e}", p.display());
            BTreeMap::new()
        }
    }
}

/// Keeps `marks` (written beside, then renamed over the file).
pub(super) fn save(state_dir: &Path, marks: &BTreeMap<String, DateTime<Utc>>) {
    let (p, tmp) = (path(state_dir), state_dir.join(".cron.json.new"));
    let written = std::fs::create_dir_all(state_dir)
        .and_then(|()| std::fs::write(&tmp, serde_json::to_vec_pretty(marks).unwrap_or_default()))
        .and_then(|()| std::fs::rename(&tmp, &p));
    if let Err(e) = written {
        tracing::warn!(
            "cannot keep the scheduled units' last runs in {}: {e}",
            p.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_survive_a_restart_and_a_bad_file_loses_only_them() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).is_empty());
        let at = "2026-12-07T21:05:00Z".parse::<DateTime<Utc>>().unwrap();
        let marks = BTreeMap::from([("backup".to_string(), at)]);
        save(dir.path(), &marks);
        assert_eq!(load(dir.path()), marks);
        std::fs::write(dir.path().join("cron.json"), b"{not json").unwrap();
        assert!(load(dir.path()).is_empty());
    }
}
