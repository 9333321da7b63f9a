//! Kernel modules: `modules.dep` parsing, dependency resolution, loading.
//!
//! # Design
//! `modules.dep` (depmod's format: `path: dep-path dep-path ...`, paths
//! relative to `/lib/modules/$(uname -r)`) is parsed into a map from module
//! name (`kvm-amd` and `kvm_amd` are the same module) to file and direct
//! dependencies. [`load_order`] walks the dependencies depth-first so every
//! module is loaded after what it needs; [`load`] calls `finit_module` on each.
//!
//! Coldplug: every device the kernel found has a `modalias` file under
//! `/sys/devices`; [`coldplug_matches`] matches them against the glob
//! patterns of `modules.alias` (as udev and modprobe do), so the drivers for
//! the machine's NICs and disks load without a list per machine.
//!
//! # Limitations
//! Compressed modules (`.ko.xz`, `.ko.zst`) are not decompressed; steelcup's
//! image ships them uncompressed. Hotplug after boot is not handled.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use steelcup_sys::{self as sys, SysError};

/// Errors resolving or loading modules.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("no module named {0:?} in modules.dep")]
    Unknown(String),
    #[error("cannot read {path}")]
    ReadDep {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Sys(#[from] SysError),
}

/// One module: its file (relative to the modules directory) and its direct deps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleEntry {
    pub path: String,
    pub deps: Vec<String>,
}

/// The module database of one kernel.
#[derive(Debug, Clone, Default)]
pub struct ModuleDb {
    pub entries: BTreeMap<String, ModuleEntry>,
}

pub use steelcup_os::module_name;

impl ModuleDb {
    /// Parses the text of a `modules.dep`. Malformed lines are skipped.
    pub fn parse(text: &str) -> Self {
        let mut entries = BTreeMap::new();
        for line in text.lines() {
            let Some((path, deps)) = line.split_once(':') else {
                continue;
            };
            let path = path.trim();
            if path.is_empty() {
                continue;
            }
            let deps = deps.split_whitespace().map(module_name).collect();
            entries.insert(
                module_name(path),
                ModuleEntry {
                    path: path.to_string(),
                    deps,
                },
            );
        }
        ModuleDb { entries }
    }

    /// The modules to load for `name`, dependencies first, `name` last.
    pub fn load_order(&self, name: &str) -> Result<Vec<String>, ModuleError> {
        let mut out = Vec::new();
        let mut seen = BTreeSet::new();
        self.visit(&name.replace('-', "_"), &mut seen, &mut out)?;
        Ok(out)
    }

    fn visit(
        &self,
        name: &str,
        seen: &mut BTreeSet<String>,
        out: &mut Vec<String>,
    ) -> Result<(), ModuleError> {
        if !seen.insert(name.to_string()) {
            return Ok(());
        }
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| ModuleError::Unknown(name.to_string()))?;
        for dep in &entry.deps {
            self.visit(dep, seen, out)?;
        }
        out.push(name.to_string());
        Ok(())
    }
}

/// The running kernel's module directory, `/lib/modules/$(uname -r)`.
pub fn running_kernel_dir() -> PathBuf {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    Path::new("/lib/modules").join(release)
}

/// Loads `name` and its dependencies from `dir`; returns the modules newly loaded.
/// A module built into the kernel (`/sys/module/NAME` exists, no entry in
/// modules.dep) counts as loaded.
pub fn load(dir: &Path, db: &ModuleDb, name: &str) -> Result<Vec<String>, ModuleError> {
    let name = name.replace('-', "_");
    if !db.entries.contains_key(&name) && Path::new("/sys/module").join(&name).exists() {
        return Ok(Vec::new());
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let mut loaded = Vec::new();
    for m in db.load_order(&name)? {
        let entry = &db.entries[&m];
        let params = cmdline_params(&cmdline, &m);
        if !params.is_empty() {
            tracing::info!("module {m}: parameters from the kernel command line: {params}");
        }
        if sys::finit_module(&dir.join(&entry.path), &params)? {
            loaded.push(m);
        }
    }
    Ok(loaded)
}

/// The parameters the kernel command line gives `module` (normalized, `_`
/// for `-`), as modprobe passes them: every `MODULE.PARAM[=VALUE]` word,
/// space-separated (`kvm_amd.nested=1 kvm-amd.avic=1`). A value may be
/// quoted to hold spaces.
pub fn cmdline_params(cmdline: &str, module: &str) -> String {
    let mut words = Vec::new();
    let (mut word, mut quoted) = (String::new(), false);
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                word.push(c);
            }
            c if c.is_whitespace() && !quoted => words.push(std::mem::take(&mut word)),
            c => word.push(c),
        }
    }
    words.push(word);
    words
        .iter()
        .filter_map(|w| {
            let (name, param) = w.split_once('.')?;
            let key = param.split('=').next().unwrap_or_default();
            (name.replace('-', "_") == module && !key.is_empty()).then_some(param)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Reads `dir/modules.dep`.
pub fn read_db(dir: &Path) -> Result<ModuleDb, ModuleError> {
    let path = dir.join("modules.dep");
    std::fs::read_to_string(&path)
        .map(|t| ModuleDb::parse(&t))
        .map_err(|source| ModuleError::ReadDep { path, source })
}

/// `modules.alias`: (pattern, module) pairs; bad patterns are skipped.
pub fn parse_aliases(text: &str) -> Vec<(glob::Pattern, String)> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            if it.next()? != "alias" {
                return None;
            }
            let pattern = glob::Pattern::new(it.next()?).ok()?;
            Some((pattern, it.next()?.replace('-', "_")))
        })
        .collect()
}

/// The modules whose aliases match any of `modaliases`.
pub fn coldplug_matches(
    aliases: &[(glob::Pattern, String)],
    modaliases: &[String],
) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for m in modaliases {
        for (p, name) in aliases {
            if p.matches(m) {
                out.insert(name.clone());
            }
        }
    }
    out
}

/// Every `modalias` under `root` (normally `/sys/devices`), without
/// following symlinks.
pub fn read_modaliases(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() && e.file_name() == "modalias" {
                if let Ok(v) = std::fs::read_to_string(e.path()) {
                    let v = v.trim();
                    if !v.is_empty() {
                        out.push(v.to_string());
                    }
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The KVM module for this CPU: `kvm_amd` with `svm`, `kvm_intel` with `vmx`.
pub fn kvm_module_for(cpuinfo: &str) -> Option<&'static str> {
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .map(|l| l.split_whitespace().collect::<BTreeSet<_>>())
        .unwrap_or_default();
    if flags.contains("svm") {
        Some("kvm_amd")
    } else if flags.contains("vmx") {
        Some("kvm_intel")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "kernel/arch/x86/kvm/kvm-amd.ko: kernel/arch/x86/kvm/kvm.ko kernel/drivers/crypto/ccp/ccp.ko kernel/virt/lib/irqbypass.ko
kernel/arch/x86/kvm/kvm.ko: kernel/virt/lib/irqbypass.ko
kernel/drivers/crypto/ccp/ccp.ko:
kernel/virt/lib/irqbypass.ko:
garbage line
kernel/drivers/input/evdev.ko:
";

    #[test]
    fn resolves_dependencies_first() {
        let db = ModuleDb::parse(DEP);
        let order = db.load_order("kvm-amd").unwrap();
        let cmdline = "BOOT_IMAGE=/vmlinuz kvm_amd.npt=0 kvm-amd.nested=1 kvm.x=\"a b\" kvm_amd. root=/dev/vda1 kvm_amdx.y=2\n";
        assert_eq!(cmdline_params(cmdline, "kvm_amd"), "npt=0 nested=1");
        assert_eq!(cmdline_params(cmdline, "kvm"), "x=\"a b\"");
        assert_eq!(cmdline_params(cmdline, "ccp"), "");
        assert_eq!(order.last().unwrap(), "kvm_amd");
        let pos = |n: &str| order.iter().position(|x| x == n).unwrap();
        assert!(pos("irqbypass") < pos("kvm"));
        assert!(pos("kvm") < pos("kvm_amd"));
        assert!(pos("ccp") < pos("kvm_amd"));
        assert_eq!(order.len(), 4, "{order:?}");
    }

    #[test]
    fn unknown_module_is_an_error() {
        let db = ModuleDb::parse(DEP);
        assert!(matches!(
            db.load_order("nope"),
            Err(ModuleError::Unknown(_))
        ));
    }

    #[test]
    fn dependency_cycle_terminates() {
        let db = ModuleDb::parse("a.ko: b.ko\nb.ko: a.ko\n");
        assert_eq!(db.load_order("a").unwrap(), ["b", "a"]);
    }

    #[test]
    fn coldplug_matches_device_aliases() {
        let aliases = parse_aliases(
            "# comment\nalias pci:v00008086d0000100Esv*sd*bc*sc*i* e1000\nalias pci:v00001AF4d00001005sv*sd*bc*sc*i* virtio-rng\nalias virtio:d00000004v* virtio_rng\nalias [bad e1000\nnot an alias line\n",
        );
        assert_eq!(aliases.len(), 3);
        let found = coldplug_matches(
            &aliases,
            &[
                "pci:v00008086d0000100Esv00001AF4sd00001100bc02sc00i00".to_string(),
                "virtio:d00000004v00001AF4".to_string(),
                "pci:v0000DEADd0000BEEFsv0sd0bc0sc0i0".to_string(),
            ],
        );
        assert_eq!(
            found.into_iter().collect::<Vec<_>>(),
            ["e1000", "virtio_rng"]
        );
    }

    #[test]
    fn picks_the_kvm_module_for_the_cpu() {
        assert_eq!(
            kvm_module_for("flags\t: fpu vme svm npt\n"),
            Some("kvm_amd")
        );
        assert_eq!(kvm_module_for("flags\t: fpu vmx ept\n"), Some("kvm_intel"));
        assert_eq!(kvm_module_for("flags\t: fpu sse2\n"), None);
    }
}
