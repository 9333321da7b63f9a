//! `cup apply FILE|DIR...`: the unit files read here and sent whole; the
//! machine checks them against its own set.

use crate::error::{usage, CupError};
use std::path::Path;

/// `(NAME.toml, text)` of each file given, and of each `*.toml` in each
/// directory given (not its drop-in directories: a drop-in is applied as
/// part of a machine config).
pub fn read_files(paths: &[std::path::PathBuf]) -> Result<Vec<(String, String)>, CupError> {
    if paths.is_empty() {
        return Err(usage!(
            "apply needs unit files or directories, like `cup apply web.toml`"
        ));
    }
    let mut files = Vec::new();
    for p in paths {
        let p = p.as_path();
        if p.is_dir() {
            let rd = std::fs::read_dir(p).map_err(CupError::file("read", p))?;
            let mut found: Vec<_> = rd
                .flatten()
                .map(|e| e.path())
                .filter(|f| f.is_file() && f.extension().is_some_and(|e| e == "toml"))
                .collect();
            found.sort();
            if found.is_empty() {
                return Err(usage!("{}: no NAME.toml files in it", p.display()));
            }
            for f in found {
                files.push(read_one(&f)?);
            }
        } else {
            files.push(read_one(p)?);
        }
    }
    Ok(files)
}

fn read_one(p: &Path) -> Result<(String, String), CupError> {
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".toml"))
        .ok_or_else(|| usage!("{}: a unit file is NAME.toml", p.display()))?;
    let text = steelcup_units::read_unit_file(p)
        .map_err(|e| usage!("{}", steelcup_sys::error_chain(&e)))?;
    Ok((name, text))
}
