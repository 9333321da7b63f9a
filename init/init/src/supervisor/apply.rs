//! `cup apply`: unit files sent over the API, checked against the whole
//! set as it would be, then installed and applied like a reload (only the
//! difference changes). A bad file changes nothing and names its error.
//! `cup unit rm` and `cup unit cat` are here too.
//!
//! Applied files are written into the units directory and, on a machine
//! with a state partition, kept in [`Options::applied_dir`]
//! (`/var/lib/steelcup/units`): init installs them again at every boot,
//! after the image's and the machine config's units, so they outlive
//! reboots and OS updates.

use super::*;

/// The most files one apply takes.
pub const MAX_FILES: usize = 64;

/// Where applied units are kept on a machine with a state partition.
pub const APPLIED_DIR: &str = "/var/lib/steelcup/units";

impl Supervisor {
    /// Checks `files` (`NAME.toml`, text) against the units as they are;
    /// unless `dry_run`, installs them and reloads. The summary says what
    /// changes (or would).
    pub fn apply_files(
        &mut self,
        files: &[(String, String)],
        dry_run: bool,
    ) -> Result<ReloadSummary, ApiError> {
        if files.is_empty() {
            return Err(ApiError::Refused("no unit files to apply".into()));
        }
        if files.len() > MAX_FILES {
            return Err(ApiError::Refused(format!(
                "{} files; one apply takes at most {MAX_FILES}",
                files.len()
            )));
        }
        let mut names = Vec::new();
        for (file, text) in files {
            let name = file.strip_suffix(".toml").unwrap_or_default();
            if !units::valid_name(name) {
                return Err(ApiError::Refused(format!(
                    "{file:?}: a unit file is NAME.toml, NAME a valid unit name"
                )));
            }
            if text.len() as u64 > units::MAX_UNIT_FILE {
                return Err(ApiError::Refused(format!(
                    "{file}: more than {} bytes",
                    units::MAX_UNIT_FILE
                )));
            }
            if names.contains(&name) {
                return Err(ApiError::Refused(format!("{file} is given twice")));
            }
            names.push(name);
        }
        // The set as it would be: the units directory with these files in
        // it, read the way a reload reads it (drop-ins included).
        let staging = self.opts.run_dir.join("apply.staging");
        let _ = std::fs::remove_dir_all(&staging);
        let staged = stage(&self.opts.units_dir, &staging, files);
        let result = staged.and_then(|()| {
            let (after, errors) = units::load_dir(&staging);
            let (before, was) = units::load_dir(&self.opts.units_dir);
            // Errors named by where the files go, not the staging copy.
            let (from, to) = (
                staging.display().to_string(),
                self.opts.units_dir.display().to_string(),
            );
            let was: Vec<String> = was.iter().map(|e| steelcup_sys::error_chain(e)).collect();
            let errors: Vec<String> = errors
                .iter()
                .map(|e| steelcup_sys::error_chain(e).replace(&from, &to))
                .filter(|e| !was.contains(e))
                .collect();
            check(&before, &after, &errors)?;
            Ok(diff(&names, &before, &after))
        });
        let _ = std::fs::remove_dir_all(&staging);
        let summary = result?;
        if dry_run {
            return Ok(summary);
        }
        for (file, text) in files {
            write_atomic(&self.opts.units_dir.join(file), text)?;
            if let Some(dir) = &self.opts.applied_dir {
                // Kept for the next boots; the unit runs now either way.
                if let Err(e) = std::fs::create_dir_all(dir)
                    .map_err(ApiError::io(dir))
                    .and_then(|()| write_atomic(&dir.join(file), text))
                {
                    tracing::warn!("apply: {e}; {file} is not kept across reboots");
                }
            }
        }
        tracing::info!("apply: {}", names.join(", "));
        Ok(self.reload())
    }

    /// `cup unit rm NAME`: an applied unit's file removed (from the units
    /// directory and from the kept ones), then a reload.
    pub fn remove_unit(&mut self, name: &str) -> Result<ReloadSummary, ApiError> {
        if !units::valid_name(name) {
            return Err(ApiError::NoSuchUnit(name.to_string()));
        }
        let file = format!("{name}.toml");
        let kept = self.opts.applied_dir.as_ref().map(|d| d.join(&file));
        let path = self.opts.units_dir.join(&file);
        if !path.is_file() {
            return Err(ApiError::NoSuchUnit(name.to_string()));
        }
        let applied = kept.as_ref().is_some_and(|k| k.is_file());
        if self.opts.applied_dir.is_some() && !applied {
            return Err(ApiError::Refused(format!(
                "unit {name} comes with the image or the machine config, not from `cup apply`; it comes back at the next boot (change the machine config instead)"
            )));
        }
        if let Some(k) = kept.filter(|k| k.is_file()) {
            std::fs::remove_file(&k).map_err(ApiError::io(&k))?;
        }
        std::fs::remove_file(&path).map_err(ApiError::io(&path))?;
        tracing::info!("unit rm: {name}");
        Ok(self.reload())
    }

    /// `cup unit cat NAME`: the unit's file and its drop-ins, as read.
    pub fn cat_unit(&self, name: &str) -> Result<String, ApiError> {
        if !units::valid_name(name) {
            return Err(ApiError::NoSuchUnit(name.to_string()));
        }
        let path = self.opts.units_dir.join(format!("{name}.toml"));
        let mut out = format!("# {}\n", path.display());
        out.push_str(
            &units::read_unit_file(&path).map_err(|_| ApiError::NoSuchUnit(name.to_string()))?,
        );
        let dropins = self.opts.units_dir.join(format!("{name}.toml.d"));
        if let Ok(rd) = std::fs::read_dir(&dropins) {
            let mut files: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
            files.sort();
            for f in files
                .iter()
                .filter(|f| f.extension().is_some_and(|e| e == "toml"))
            {
                if let Ok(text) = units::read_unit_file(f) {
                    out.push_str(&format!("\n# {}\n{text}", f.display()));
                }
            }
        }
        Ok(out)
    }
}

/// Installs the kept applied units of `applied` into `units_dir` (at boot,
/// before the units are read); how many.
pub fn install_applied(applied: &Path, units_dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(applied) else {
        return 0;
    };
    let mut n = 0;
    for e in rd.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".toml") || !p.is_file() {
            continue;
        }
        match units::read_unit_file(&p).map(|text| write_atomic(&units_dir.join(&name), &text)) {
            Ok(Ok(())) => n += 1,
            Ok(Err(e)) => tracing::error!("applied unit {name}: {e}"),
            Err(e) => tracing::error!("applied unit {name}: {}", steelcup_sys::error_chain(&e)),
        }
    }
    n
}

/// Copies the unit files of `from` (and their drop-in directories) into a
/// new `to`, then writes `files` there.
fn stage(from: &Path, to: &Path, files: &[(String, String)]) -> Result<(), ApiError> {
    std::fs::create_dir_all(to).map_err(ApiError::io(to))?;
    if let Ok(rd) = std::fs::read_dir(from) {
        for e in rd.flatten() {
            let p = e.path();
            let dest = to.join(e.file_name());
            if p.is_dir() {
                std::fs::create_dir_all(&dest).map_err(ApiError::io(&dest))?;
                for d in std::fs::read_dir(&p).into_iter().flatten().flatten() {
                    if d.path().is_file() {
                        let _ = std::fs::copy(d.path(), dest.join(d.file_name()));
                    }
                }
            } else if p.is_file() {
                std::fs::copy(&p, &dest).map_err(ApiError::io(&dest))?;
            }
        }
    }
    for (file, text) in files {
        let p = to.join(file);
        std::fs::write(&p, text).map_err(ApiError::io(&p))?;
    }
    Ok(())
}

/// Refuses the apply when it brings new `errors` (a file that does not
/// read), or the set as it would be refuses a unit the set as it is does
/// not.
fn check(before: &[Unit], after: &[Unit], errors: &[String]) -> Result<(), ApiError> {
    if !errors.is_empty() {
        return Err(ApiError::Refused(format!(
            "nothing applied: {}",
            errors.join("; ")
        )));
    }
    let was = graph::plan(before).refused;
    let new: Vec<String> = graph::plan(after)
        .refused
        .into_iter()
        .filter(|(n, _)| !was.contains_key(n))
        .map(|(n, why)| format!("unit {n} would be refused: {why}"))
        .collect();
    if !new.is_empty() {
        return Err(ApiError::Refused(format!(
            "nothing applied: {}",
            new.join("; ")
        )));
    }
    Ok(())
}

/// What applying `names` changes: new units start, changed ones restart.
fn diff(names: &[&str], before: &[Unit], after: &[Unit]) -> ReloadSummary {
    let mut s = ReloadSummary::default();
    for n in names {
        let old = before.iter().find(|u| u.name == *n);
        let new = after.iter().find(|u| u.name == *n);
        match (old, new) {
            (None, Some(_)) => s.started.push(n.to_string()),
            (Some(o), Some(u)) if o != u => s.restarted.push(n.to_string()),
            _ => {}
        }
    }
    s
}

/// Writes `text` to `path` through a temporary file renamed over it, so
/// a reader never sees half a file.
fn write_atomic(path: &Path, text: &str) -> Result<(), ApiError> {
    let tmp = path.with_extension("toml.new");
    std::fs::write(&tmp, text).map_err(ApiError::io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(ApiError::io(path))
}

impl ApiError {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ApiError + '_ {
        move |e| ApiError::Refused(format!("{}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(cmd: &str, requires: &[&str]) -> String {
        format!("[unit]\nrequires = {requires:?}\n[microvm]\ncmd = [\"/bin/sh\", \"-c\", {cmd:?}]\nrestart = \"no\"\n")
    }

    /// A supervisor of the microvm units in a fresh directory (microvm
    /// units start no process here: vmmd runs them), keeping applied
    /// files in `applied/`.
    fn sup(dir: &Path) -> Supervisor {
        let units = dir.join("units");
        std::fs::create_dir_all(&units).unwrap();
        std::fs::write(units.join("web.toml"), vm("echo web", &[])).unwrap();
        let (found, errors) = units::load_dir(&units);
        assert!(errors.is_empty(), "{errors:?}");
        let opts = Options {
            units_dir: units,
            applied_dir: Some(dir.join("applied")),
            machine_dir: None,
            etc_dir: dir.to_path_buf(),
            run_dir: dir.to_path_buf(),
            cgroup: None,
            pid1: false,
        };
        Supervisor::new(found, opts, Arc::new(LogStore::new(None, false)))
    }

    fn names(s: &Supervisor) -> Vec<String> {
        s.microvms.keys().cloned().collect()
    }

    #[test]
    fn apply_installs_what_checks_and_changes_only_the_difference() {
        let d = tempfile::tempdir().unwrap();
        let mut s = sup(d.path());
        let files = vec![
            ("db.toml".to_string(), vm("echo db", &[])),
            ("web.toml".to_string(), vm("echo web 2", &["db"])),
        ];
        // A dry run says what would change and changes nothing.
        let would = s.apply_files(&files, true).unwrap();
        assert_eq!(
            (would.started, would.restarted),
            (vec!["db".to_string()], vec!["web".to_string()])
        );
        assert_eq!(names(&s), ["web"]);
        assert!(!d.path().join("units/db.toml").exists());
        // Applied: installed, kept, and only the difference changes.
        let done = s.apply_files(&files, false).unwrap();
        assert_eq!(done.started, ["db"]);
        assert_eq!(done.restarted, ["web"]);
        assert_eq!(names(&s), ["db", "web"]);
        assert!(d.path().join("applied/db.toml").is_file());
        let again = s.apply_files(&files, false).unwrap();
        assert!(
            again.started.is_empty() && again.restarted.is_empty(),
            "{again:?}"
        );
        assert!(s.cat_unit("web").unwrap().contains("echo web 2"));
    }

    #[test]
    fn a_bad_file_changes_nothing_and_says_why() {
        let d = tempfile::tempdir().unwrap();
        let mut s = sup(d.path());
        let before = std::fs::read_to_string(d.path().join("units/web.toml")).unwrap();
        for (files, says) in [
            (
                vec![
                    ("ok.toml".to_string(), vm("echo ok", &[])),
                    ("web.toml".to_string(), "[microvm]\ncmd = 3\n".to_string()),
                ],
                "web.toml",
            ),
            (
                vec![("api.toml".to_string(), vm("echo api", &["nowhere"]))],
                "unit api would be refused: requires \"nowhere\"",
            ),
            (vec![("../x.toml".to_string(), vm("x", &[]))], "NAME.toml"),
            (
                vec![
                    ("a.toml".to_string(), vm("a", &[])),
                    ("a.toml".to_string(), vm("a", &[])),
                ],
                "twice",
            ),
            (vec![], "no unit files"),
        ] {
            let e = s.apply_files(&files, false).unwrap_err().to_string();
            assert!(e.contains(says), "{files:?}: {e}");
            assert!(!e.contains("apply.staging"), "{e}");
        }
        assert_eq!(names(&s), ["web"]);
        assert_eq!(
            std::fs::read_to_string(d.path().join("units/web.toml")).unwrap(),
            before
        );
        assert!(!d.path().join("units/ok.toml").exists());
        assert!(!d.path().join("applied").exists());
    }

    #[test]
    fn rm_takes_applied_units_only_and_boot_installs_the_kept_ones() {
        let d = tempfile::tempdir().unwrap();
        let mut s = sup(d.path());
        s.apply_files(&[("db.toml".to_string(), vm("echo db", &[]))], false)
            .unwrap();
        let e = s.remove_unit("web").unwrap_err().to_string();
        assert!(e.contains("machine config"), "{e}");
        assert!(matches!(
            s.remove_unit("nope"),
            Err(ApiError::NoSuchUnit(_))
        ));
        // A new boot: the units directory is the image's again.
        let fresh = d.path().join("fresh");
        std::fs::create_dir_all(&fresh).unwrap();
        assert_eq!(install_applied(&d.path().join("applied"), &fresh), 1);
        assert!(fresh.join("db.toml").is_file());
        let gone = s.remove_unit("db").unwrap();
        assert_eq!(gone.stopped, ["db"]);
        assert_eq!(names(&s), ["web"]);
        assert!(!d.path().join("applied/db.toml").exists());
    }
}
