//! Contexts, like docker's and talosctl's: one name per machine cup talks
//! to — this machine's own sockets (`local`), the appliance `cargo xtask
//! run` boots, a server by address — and which one plain `cup` uses.
//!
//! They live in `contexts.toml` in cup's config directory
//! (`$STEELCUP_CONFIG_DIR`, else `$XDG_CONFIG_HOME/steelcup`, else
//! `~/.config/steelcup`):
//!
//! ```toml
//! current = "appliance"
//!
//! [context.appliance]
//! description = "the appliance `cargo xtask run` boots"
//! remote = "127.0.0.1:17443"
//! tls-dir = "/root/.config/steelcup/appliance"
//! made-by = "cargo xtask run"
//! ```
//!
//! What cup talks to, first match wins: `--remote`/`-H` (or
//! `$STEELCUP_REMOTE`), `--context NAME` (or `$STEELCUP_CONTEXT`), the
//! file's `current`, else `local`.

use crate::cli::ContextCommand;
use crate::error::{usage, CupError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The context that is always there: this machine's own sockets.
pub const LOCAL: &str = "local";

/// The file, as it is kept.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Contexts {
    /// The context plain `cup` uses (none: `local`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    #[serde(default, rename = "context")]
    pub contexts: BTreeMap<String, Context>,
}

/// One machine.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Context {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// `HOST[:PORT]` of the machine's admin gateway (`vmmd admin`); none:
    /// this machine's sockets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
    /// `ca.crt`, `client.crt` and `client.key` for `remote`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<PathBuf>,
    /// The command that makes the certificates, for the error when they
    /// are missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub made_by: Option<String>,
}

/// What a command talks to, once flags, environment and file are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// This machine's sockets.
    Local,
    /// Another machine over mutual TLS.
    Remote {
        addr: String,
        tls_dir: PathBuf,
        /// The context it came from, if any (for errors).
        context: Option<String>,
        made_by: Option<String>,
    },
}

/// The longest contexts file cup reads.
const MAX_FILE: u64 = 1 << 20;

/// cup's config directory.
pub fn config_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("STEELCUP_CONFIG_DIR").filter(|d| !d.is_empty()) {
        return d.into();
    }
    if let Some(d) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        return Path::new(&d).join("steelcup");
    }
    Path::new(&std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".config/steelcup")
}

/// The TLS directory `--remote` uses without `--tls-dir`.
pub fn default_tls_dir() -> PathBuf {
    config_dir().join("tls")
}

impl Contexts {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("contexts.toml")
    }

    /// Reads the file in `dir`; none there is no contexts.
    pub fn load(dir: &Path) -> Result<Contexts, CupError> {
        use std::io::Read;
        let path = Self::path(dir);
        let mut text = String::new();
        match std::fs::File::open(&path) {
            Ok(f) => {
                f.take(MAX_FILE + 1)
                    .read_to_string(&mut text)
                    .map_err(CupError::file("read", &path))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Contexts::default()),
            Err(e) => return Err(CupError::file("read", &path)(e)),
        }
        if text.len() as u64 > MAX_FILE {
            return Err(usage!("{}: more than {MAX_FILE} bytes", path.display()));
        }
        let c: Contexts = toml::from_str(&text).map_err(|e| {
            usage!(
                "{}: {} (fix it, or remove it to start again)",
                path.display(),
                e.message()
            )
        })?;
        if c.contexts.contains_key(LOCAL) {
            return Err(usage!(
                "{}: context {LOCAL:?} is built in; name yours otherwise",
                path.display()
            ));
        }
        Ok(c)
    }

    /// Writes the file in `dir` (a new file renamed over the old one).
    pub fn save(&self, dir: &Path) -> Result<(), CupError> {
        std::fs::create_dir_all(dir).map_err(CupError::file("create", dir))?;
        let path = Self::path(dir);
        let tmp = dir.join(".contexts.toml.new");
        let text = toml::to_string(self).map_err(|e| usage!("contexts: {e}"))?;
        std::fs::write(&tmp, text).map_err(CupError::file("write", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(CupError::file("write", &path))
    }

    /// The context `name` (`local` is always there).
    pub fn get(&self, name: &str) -> Result<Context, CupError> {
        if name == LOCAL {
            return Ok(Context {
                description: "this machine's own sockets".into(),
                ..Context::default()
            });
        }
        self.contexts.get(name).cloned().ok_or_else(|| {
            let known: Vec<&str> = std::iter::once(LOCAL)
                .chain(self.contexts.keys().map(String::as_str))
                .collect();
            usage!(
                "no context named {name:?} (there are: {})",
                known.join(", ")
            )
        })
    }

    /// The current context's name.
    pub fn current(&self) -> &str {
        self.current.as_deref().unwrap_or(LOCAL)
    }
}

/// Checks a context's name: letters, digits, `-`, `_`, `.`; 1 to 64.
pub fn check_name(name: &str) -> Result<(), CupError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(usage!(
            "context name {name:?}: 1 to 64 letters, digits, '-', '_' or '.'"
        ))
    }
}

/// What the flags and environment ask for, before the file is read.
#[derive(Debug, Default, Clone)]
pub struct Asked {
    pub remote: Option<String>,
    pub tls_dir: Option<PathBuf>,
    pub context: Option<String>,
}

impl Asked {
    /// From `$STEELCUP_REMOTE`, `$STEELCUP_TLS_DIR`, `$STEELCUP_CONTEXT`
    /// (flags set later override them).
    pub fn from_env() -> Asked {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Asked {
            remote: var("STEELCUP_REMOTE"),
            tls_dir: var("STEELCUP_TLS_DIR").map(PathBuf::from),
            context: var("STEELCUP_CONTEXT"),
        }
    }

    /// What cup talks to.
    pub fn resolve(&self, dir: &Path) -> Result<Target, CupError> {
        if let Some(addr) = &self.remote {
            return Ok(Target::Remote {
                addr: addr.clone(),
                tls_dir: self.tls_dir.clone().unwrap_or_else(default_tls_dir),
                context: None,
                made_by: None,
            });
        }
        let file = Contexts::load(dir)?;
        let name = self.context.as_deref().unwrap_or(file.current());
        let c = file.get(name)?;
        Ok(match c.remote {
            None => Target::Local,
            Some(addr) => Target::Remote {
                addr,
                tls_dir: self
                    .tls_dir
                    .clone()
                    .or(c.tls_dir)
                    .unwrap_or_else(default_tls_dir),
                context: Some(name.to_string()),
                made_by: c.made_by,
            },
        })
    }
}

impl Target {
    /// The TLS files a remote target needs, each there; else which is
    /// missing and what makes it.
    pub fn check_files(&self) -> Result<(), CupError> {
        let Target::Remote {
            tls_dir,
            context,
            made_by,
            addr,
        } = self
        else {
            return Ok(());
        };
        for f in ["ca.crt", "client.crt", "client.key"] {
            let p = tls_dir.join(f);
            if !p.is_file() {
                let whose = match context {
                    Some(c) => format!("context {c:?} ({addr})"),
                    None => format!("--remote {addr}"),
                };
                let make = match made_by {
                    Some(cmd) => format!("`{cmd}` makes it"),
                    None => format!(
                        "`cargo xtask admin-certs {} HOST` makes the certificates (docs/remote.md)",
                        tls_dir.display()
                    ),
                };
                return Err(usage!("{whose}: no {}; {make}", p.display()));
            }
        }
        Ok(())
    }
}

/// `cup context ls|use|show|add|rm`.
pub fn command(c: ContextCommand, asked: &Asked) -> Result<u8, CupError> {
    let dir = config_dir();
    match c {
        ContextCommand::Ls => {
            let file = Contexts::load(&dir)?;
            let current = asked
                .context
                .clone()
                .unwrap_or_else(|| file.current().to_string());
            println!("{:<20} {:<30} DESCRIPTION", "NAME", "MACHINE");
            let local = file.get(LOCAL)?;
            for (name, c) in std::iter::once((LOCAL.to_string(), local)).chain(file.contexts) {
                let mark = if name == current { " *" } else { "" };
                println!(
                    "{:<20} {:<30} {}",
                    format!("{name}{mark}"),
                    c.remote.as_deref().unwrap_or("this machine"),
                    c.description
                );
            }
        }
        ContextCommand::Use { name } => {
            let mut file = Contexts::load(&dir)?;
            file.get(&name)?;
            file.current = (name != LOCAL).then(|| name.clone());
            file.save(&dir)?;
            println!("cup now talks to context {name:?}");
        }
        ContextCommand::Show { name } => {
            let file = Contexts::load(&dir)?;
            let name = match &name {
                None => asked.context.as_deref().unwrap_or(file.current()),
                Some(name) => name.as_str(),
            };
            let c = file.get(name)?;
            println!("name: {name}");
            if !c.description.is_empty() {
                println!("description: {}", c.description);
            }
            match &c.remote {
                None => println!("machine: this machine's sockets"),
                Some(addr) => {
                    let tls = c.tls_dir.clone().unwrap_or_else(default_tls_dir);
                    println!("machine: {addr} (mutual TLS)");
                    println!("tls-dir: {}", tls.display());
                    let target = Target::Remote {
                        addr: addr.clone(),
                        tls_dir: tls,
                        context: Some(name.to_string()),
                        made_by: c.made_by.clone(),
                    };
                    match target.check_files() {
                        Ok(()) => println!("certificates: present"),
                        Err(e) => println!("certificates: {e}"),
                    }
                }
            }
            println!("config: {}", Contexts::path(&dir).display());
        }
        ContextCommand::Add {
            name,
            remote,
            tls_dir,
            description,
            made_by,
        } => {
            check_name(&name)?;
            if name == LOCAL {
                return Err(usage!("context {LOCAL:?} is built in"));
            }
            let c = Context {
                description,
                remote: Some(remote),
                tls_dir: tls_dir.map(|d| std::path::absolute(&d).unwrap_or(d)),
                made_by,
            };
            let mut file = Contexts::load(&dir)?;
            file.contexts.insert(name.clone(), c);
            file.save(&dir)?;
            println!(
                "context {name:?} added; `cup context use {name}` makes it the one cup talks to"
            );
        }
        ContextCommand::Rm { names } => {
            let mut file = Contexts::load(&dir)?;
            for name in &names {
                if name == LOCAL {
                    return Err(usage!("context {LOCAL:?} is built in"));
                }
                if file.contexts.remove(name).is_none() {
                    file.get(name)?;
                }
                if file.current.as_deref() == Some(name) {
                    file.current = None;
                }
            }
            file.save(&dir)?;
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asked(context: Option<&str>) -> Asked {
        Asked {
            context: context.map(String::from),
            ..Asked::default()
        }
    }

    #[test]
    fn no_file_is_the_local_machine() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(asked(None).resolve(d.path()).unwrap(), Target::Local);
        let e = asked(Some("nope"))
            .resolve(d.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no context named \"nope\""), "{e}");
    }

    #[test]
    fn the_current_context_a_flag_and_remote_override_in_order() {
        let d = tempfile::tempdir().unwrap();
        let mut file = Contexts::default();
        file.contexts.insert(
            "appliance".into(),
            Context {
                remote: Some("127.0.0.1:17443".into()),
                tls_dir: Some("/certs/appliance".into()),
                made_by: Some("cargo xtask run".into()),
                ..Context::default()
            },
        );
        file.current = Some("appliance".into());
        file.save(d.path()).unwrap();
        assert_eq!(
            Contexts::load(d.path()).unwrap(),
            file,
            "read back as written"
        );
        let t = asked(None).resolve(d.path()).unwrap();
        assert_eq!(
            t,
            Target::Remote {
                addr: "127.0.0.1:17443".into(),
                tls_dir: "/certs/appliance".into(),
                context: Some("appliance".into()),
                made_by: Some("cargo xtask run".into()),
            }
        );
        let e = t.check_files().unwrap_err().to_string();
        assert!(
            e.contains("/certs/appliance/ca.crt") && e.contains("`cargo xtask run` makes it"),
            "{e}"
        );
        assert_eq!(
            asked(Some("local")).resolve(d.path()).unwrap(),
            Target::Local
        );
        let flag = Asked {
            remote: Some("10.1.2.3".into()),
            tls_dir: Some("/x".into()),
            context: Some("appliance".into()),
        };
        assert!(matches!(
            flag.resolve(d.path()).unwrap(),
            Target::Remote { addr, context: None, .. } if addr == "10.1.2.3"
        ));
    }

    #[test]
    fn a_bad_file_says_where_and_local_is_reserved() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(Contexts::path(d.path()), "current = 3\n").unwrap();
        let e = Contexts::load(d.path()).unwrap_err().to_string();
        assert!(e.contains("contexts.toml"), "{e}");
        std::fs::write(
            Contexts::path(d.path()),
            "[context.local]\nremote = \"x\"\n",
        )
        .unwrap();
        let e = Contexts::load(d.path()).unwrap_err().to_string();
        assert!(e.contains("built in"), "{e}");
        assert!(check_name("node-17.lab").is_ok());
        for bad in ["", ".hidden", "a/b", "a b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
