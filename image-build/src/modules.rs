//! Host kernel modules: find them, read their dependencies from each
//! module's `.modinfo` section, and compute the closure to ship. This is
//! what depmod does, for the few modules steelcup ships.

use anyhow::{anyhow, bail, Context, Result};
use object::{Object, ObjectSection};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module in the closure.
#[derive(Debug, Clone)]
pub struct Shipped {
    /// Path relative to the modules directory (`kernel/...ko`).
    pub path: String,
    /// Every module it depends on, directly or not.
    pub all_deps: BTreeSet<String>,
}

/// Every module file of one kernel, by module name.
#[derive(Debug)]
pub struct ModuleIndex {
    root: PathBuf,
    paths: BTreeMap<String, String>,
    builtin: BTreeSet<String>,
}

impl ModuleIndex {
    pub fn scan(root: &Path) -> Result<Self> {
        let mut paths = BTreeMap::new();
        let mut stack = vec![root.join("kernel")];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
                let e = e?;
                let p = e.path();
                if e.file_type()?.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "ko") {
                    let rel = p.strip_prefix(root)?.to_string_lossy().into_owned();
                    paths.insert(steelcup_os::module_name(&rel), rel);
                }
            }
        }
        let builtin = std::fs::read_to_string(root.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .map(steelcup_os::module_name)
            .collect();
        Ok(ModuleIndex {
            root: root.to_path_buf(),
            paths,
            builtin,
        })
    }

    /// Direct dependencies from the module's `.modinfo` (`depends=a,b`).
    pub fn depends(&self, name: &str) -> Result<Vec<String>> {
        let rel = &self.paths[name];
        let data = std::fs::read(self.root.join(rel)).with_context(|| format!("read {rel}"))?;
        modinfo_depends(&data).with_context(|| format!("module {rel}"))
    }

    /// The modules to ship for `wanted`, each with all its dependencies.
    /// Modules built into the kernel are skipped; unknown ones are errors.
    pub fn closure(&self, wanted: &[String]) -> Result<BTreeMap<String, Shipped>> {
        let mut direct: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut todo: Vec<String> = wanted.iter().map(|w| w.replace('-', "_")).collect();
        while let Some(n) = todo.pop() {
            if direct.contains_key(&n) || self.builtin.contains(&n) {
                continue;
            }
            if !self.paths.contains_key(&n) {
                bail!(
                    "module {n:?} is neither in {} nor built in",
                    self.root.display()
                );
            }
            let deps = self.depends(&n)?;
            todo.extend(deps.iter().cloned());
            direct.insert(n, deps);
        }
        let mut out = BTreeMap::new();
        for n in direct.keys() {
            let mut all = BTreeSet::new();
            let mut stack = direct[n].clone();
            while let Some(d) = stack.pop() {
                if direct.contains_key(&d) && all.insert(d.clone()) {
                    stack.extend(direct[&d].iter().cloned());
                }
            }
            out.insert(
                n.clone(),
                Shipped {
                    path: self.paths[n].clone(),
                    all_deps: all,
                },
            );
        }
        Ok(out)
    }
}

/// Every value of `key=` in an ELF module's `.modinfo` section.
pub fn modinfo(data: &[u8], key: &str) -> Result<Vec<String>> {
    let file = object::File::parse(data).map_err(|e| anyhow!("not an ELF module: {e}"))?;
    let section = file
        .section_by_name(".modinfo")
        .ok_or_else(|| anyhow!("no .modinfo section"))?;
    let info = section.data().map_err(|e| anyhow!(".modinfo: {e}"))?;
    let prefix = format!("{key}=");
    Ok(info
        .split(|b| *b == 0)
        .filter_map(|kv| kv.strip_prefix(prefix.as_bytes()))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect())
}

/// Reads `depends=` from an ELF module's `.modinfo` section.
pub fn modinfo_depends(data: &[u8]) -> Result<Vec<String>> {
    Ok(modinfo(data, "depends")?
        .iter()
        .flat_map(|v| {
            v.split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.replace('-', "_"))
                .collect::<Vec<_>>()
        })
        .collect())
}

impl ModuleIndex {
    /// `modules.alias` lines (`alias PATTERN NAME`) for `names`, sorted.
    pub fn aliases(&self, names: &[&String]) -> Result<String> {
        let mut lines = Vec::new();
        for n in names {
            let rel = &self.paths[n.as_str()];
            let data = std::fs::read(self.root.join(rel)).with_context(|| format!("read {rel}"))?;
            for a in modinfo(&data, "alias").with_context(|| format!("module {rel}"))? {
                lines.push(format!("alias {a} {n}"));
            }
        }
        lines.sort();
        Ok(lines.join("\n") + "\n")
    }
}
