//! Reading unit files: a file and its drop-ins parsed as layered TOML
//! (later layers win, table by table), then checked whole (`validate`),
//! with errors that name the file, the line and the field; and a
//! directory of them, the good kept and the bad reported.

use super::*;

/// Parses one layer (the unit file or a drop-in) into a TOML table, checking
/// it against the schema on its own so an error names this file and line.
fn parse_layer(path: &Path, text: &str) -> Result<toml::Table, UnitError> {
    let located = |e: toml::de::Error| {
        let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
        UnitError::Parse {
            path: path.to_path_buf(),
            line,
            column,
            message: e.message().trim().to_string(),
        }
    };
    let _: UnitFile = toml::from_str(text).map_err(located)?;
    toml::from_str(text).map_err(located)
}

/// Merges `top` into `base`: tables merge key by key, anything else is replaced.
fn merge(base: &mut toml::Table, top: toml::Table) {
    for (k, v) in top {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(t)) => merge(b, t),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Parses a unit from its file and drop-ins (`(path, text)`, applied in
/// order, later wins).
pub fn parse_layered(
    path: &Path,
    text: &str,
    dropins: &[(PathBuf, String)],
) -> Result<Unit, UnitError> {
    let mut table = parse_layer(path, text)?;
    for (p, t) in dropins {
        merge(&mut table, parse_layer(p, t)?);
    }
    let file: UnitFile = table
        .try_into()
        .map_err(|e: toml::de::Error| UnitError::invalid(path, e.message().trim().to_string()))?;
    validate(path, file)
}

/// Parses one unit from its text; `path` names it in errors and gives its name.
pub fn parse(path: &Path, text: &str) -> Result<Unit, UnitError> {
    parse_layered(path, text, &[])
}

fn validate(path: &Path, file: UnitFile) -> Result<Unit, UnitError> {
    let name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_string();
    if !valid_name(&name) {
        return Err(UnitError::invalid(
            path,
            format!("{name:?} is not a valid unit name (lowercase letters, digits, '.', '_', '-')"),
        ));
    }
    for dep in file
        .unit
        .after
        .iter()
        .chain(&file.unit.requires)
        .chain(&file.unit.wants)
    {
        if !valid_name(dep) {
            return Err(UnitError::invalid(
                path,
                format!("[unit]: {dep:?} is not a valid unit name"),
            ));
        }
    }
    let kind = match (file.service, file.microvm) {
        (Some(s), None) => {
            match s.exec.first() {
                None => {
                    return Err(UnitError::invalid(
                        path,
                        "[service] exec: must not be empty",
                    ))
                }
                Some(p) if !p.starts_with('/') => {
                    return Err(UnitError::invalid(
                        path,
                        format!("[service] exec: {p:?} must be an absolute path"),
                    ))
                }
                _ => {}
            }
            if parse_signal(&s.stop_signal).is_none() {
                return Err(UnitError::invalid(
                    path,
                    format!("[service] stop-signal: {:?} is not a signal", s.stop_signal),
                ));
            }
            if let Some(r) = s
                .reload_signal
                .as_deref()
                .filter(|r| parse_signal(r).is_none())
            {
                return Err(UnitError::invalid(
                    path,
                    format!("[service] reload-signal: {r:?} is not a signal"),
                ));
            }
            if let Some(c) = s.cpu_max {
                if !(c > 0.0 && c <= 1024.0) {
                    return Err(UnitError::invalid(
                        path,
                        format!("[service] cpu-max: {c} must be between 0 and 1024 CPUs"),
                    ));
                }
            }
            if s.workdir.as_ref().is_some_and(|w| !w.is_absolute()) {
                return Err(UnitError::invalid(
                    path,
                    "[service] workdir: must be an absolute path",
                ));
            }
            UnitKind::Service(s)
        }
        (None, Some(m)) => {
            if m.vcpus == 0 || m.vcpus > 32 {
                return Err(UnitError::invalid(
                    path,
                    format!("[microvm] vcpus: {} is out of range 1..=32", m.vcpus),
                ));
            }
            if m.memory.0 < (16 << 20) || m.memory.0 % (1 << 20) != 0 || m.memory.0 > (256 << 30) {
                return Err(UnitError::invalid(
                    path,
                    format!(
                        "[microvm] memory: {} must be whole MiB between 16MiB and 256GiB",
                        m.memory
                    ),
                ));
            }
            if m.volumes.len() > MAX_VOLUMES {
                return Err(UnitError::invalid(
                    path,
                    format!("[microvm] volumes: at most {MAX_VOLUMES}"),
                ));
            }
            if m.replicas > MAX_REPLICAS {
                return Err(UnitError::invalid(
                    path,
                    format!(
                        "[microvm] replicas: {} is more than {MAX_REPLICAS}",
                        m.replicas
                    ),
                ));
            }
            if let Err(e) = m.check_network() {
                return Err(UnitError::invalid(path, format!("[microvm] {e}")));
            }
            if let Err(e) = m.check_process() {
                return Err(UnitError::invalid(path, format!("[microvm] {e}")));
            }
            if let Err(e) = crate::check_labels(&m.labels) {
                return Err(UnitError::invalid(path, format!("[microvm] labels: {e}")));
            }
            if let Some(Err(e)) = m.health.as_ref().map(HealthCheck::check) {
                return Err(UnitError::invalid(path, format!("[microvm.health] {e}")));
            }
            if let Err(e) = steelcup_proto::guest::check_rlimits(&m.rlimits) {
                return Err(UnitError::invalid(path, format!("[microvm] rlimits: {e}")));
            }
            let mut names = std::collections::BTreeSet::new();
            for v in &m.volumes {
                let ok_name = !v.name.is_empty()
                    && v.name.len() <= 64
                    && v.name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
                if !ok_name {
                    return Err(UnitError::invalid(
                        path,
                        format!(
                            "[microvm] volumes: name {:?} must be 1-64 letters, digits, '-' or '_'",
                            v.name
                        ),
                    ));
                }
                if !names.insert(v.name.as_str()) {
                    return Err(UnitError::invalid(
                        path,
                        format!("[microvm] volumes: name {:?} is used twice", v.name),
                    ));
                }
                if !v.mount.is_absolute() || v.mount == Path::new("/") {
                    return Err(UnitError::invalid(
                        path,
                        format!(
                            "[microvm] volumes: mount {} must be an absolute path other than /",
                            v.mount.display()
                        ),
                    ));
                }
                if v.size.0 < (1 << 20) || v.size.0 % (1 << 20) != 0 {
                    return Err(UnitError::invalid(
                        path,
                        format!(
                            "[microvm] volumes: size {} of {:?} must be whole MiB, at least 1MiB",
                            v.size, v.name
                        ),
                    ));
                }
            }
            if m.root.as_ref().is_some_and(|r| !r.is_absolute()) {
                return Err(UnitError::invalid(
                    path,
                    "[microvm] root: must be an absolute path",
                ));
            }
            if m.cmd.is_empty() && m.image.is_none() {
                return Err(UnitError::invalid(
                    path,
                    "[microvm] cmd: must not be empty when no image gives a default",
                ));
            }
            UnitKind::Microvm(m)
        }
        (Some(_), Some(_)) => {
            return Err(UnitError::invalid(
                path,
                "has both [service] and [microvm]; a unit is one or the other",
            ))
        }
        (None, None) => {
            return Err(UnitError::invalid(
                path,
                "has neither [service] nor [microvm]",
            ))
        }
    };
    Ok(Unit {
        name,
        path: path.to_path_buf(),
        unit: file.unit,
        kind,
    })
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, column)
}

/// The most a unit file or drop-in may hold.
pub const MAX_UNIT_FILE: u64 = 256 * 1024;

/// Reads the unit file or drop-in at `path`: a regular file (a FIFO, a
/// device or a link to one named `*.toml` is refused without waiting on
/// it) of at most [`MAX_UNIT_FILE`] bytes.
pub fn read_unit_file(path: &Path) -> Result<String, UnitError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let read = |source| UnitError::Read {
        path: path.to_path_buf(),
        source,
    };
    // Non-blocking: opening a FIFO for reading would wait for a writer.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(read)?;
    // Checked on what was opened, so a file swapped in meanwhile is too.
    if !f.metadata().map_err(read)?.is_file() {
        return Err(UnitError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let mut bytes = Vec::new();
    f.take(MAX_UNIT_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(read)?;
    if bytes.len() as u64 > MAX_UNIT_FILE {
        return Err(UnitError::TooLarge {
            path: path.to_path_buf(),
            max: MAX_UNIT_FILE,
        });
    }
    String::from_utf8(bytes).map_err(|_| {
        read(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not UTF-8 text",
        ))
    })
}

/// The drop-ins of unit file `path`: `NAME.d/*.toml` beside it, by name.
fn dropins(path: &Path) -> Result<Vec<(PathBuf, String)>, UnitError> {
    let mut dir = path.as_os_str().to_owned();
    dir = dir.to_string_lossy().trim_end_matches(".toml").into();
    dir.push(".d");
    let dir = PathBuf::from(dir);
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Ok(Vec::new());
    };
    let mut paths: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| read_unit_file(&p).map(|t| (p, t)))
        .collect()
}

/// Reads the unit files `paths`, each with its drop-ins, as [`load_dir`]
/// reads a directory's (`cup validate FILE...`).
pub fn load_files(paths: &[PathBuf]) -> (Vec<Unit>, Vec<UnitError>) {
    let mut units = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        match read_unit_file(path)
            .and_then(|text| dropins(path).and_then(|d| parse_layered(path, &text, &d)))
        {
            Ok(u) => units.push(u),
            Err(e) => errors.push(e),
        }
    }
    (units, errors)
}

/// Reads every `*.toml` in `dir` with its drop-ins, sorted by name. Good
/// units and the errors of bad ones are returned side by side.
pub fn load_dir(dir: &Path) -> (Vec<Unit>, Vec<UnitError>) {
    let mut units = Vec::new();
    let mut errors = Vec::new();
    let mut paths: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect(),
        Err(source) => {
            errors.push(UnitError::Read {
                path: dir.to_path_buf(),
                source,
            });
            return (units, errors);
        }
    };
    paths.sort();
    for path in paths {
        match read_unit_file(&path) {
            Ok(text) => match dropins(&path).and_then(|d| parse_layered(&path, &text, &d)) {
                Ok(u) => units.push(u),
                Err(e) => errors.push(e),
            },
            Err(e) => errors.push(e),
        }
    }
    (units, errors)
}
