//! `/etc/steelcup/registries.toml`: credentials and plain-HTTP registries
//! for vmmd's pulls (written by init's provisioning from a machine config,
//! docs/provisioning.md; or by hand).
//!
//! ```toml
//! [[registry]]
//! host = "registry.example.com:5000"
//! username = "fleet"
//! password = "..."
//! insecure = false
//! ```
//!
//! # Design
//! A workload's image names its registry (`HOST[:PORT]/REPO:TAG`); the
//! entry whose `host` is that registry gives the pull its basic
//! credentials (a bearer token is fetched with them when the registry
//! asks). `insecure = true` adds the host to the plain-HTTP list, as
//! `--insecure-registry` does.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

/// Where vmmd reads it by default.
pub const DEFAULT_PATH: &str = "/etc/steelcup/registries.toml";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    registry: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    host: String,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    insecure: bool,
}

/// A registries file vmmd cannot use: where, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {why}", path.display())]
pub struct RegistriesError {
    pub path: std::path::PathBuf,
    pub why: String,
}

/// What the file says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registries {
    /// Registries reached over plain HTTP.
    pub insecure: Vec<String>,
    /// Basic credentials by registry host.
    pub credentials: BTreeMap<String, (String, String)>,
}

impl Registries {
    /// Parses the file's text; errors name `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, RegistriesError> {
        let bad = |why: String| RegistriesError {
            path: path.to_path_buf(),
            why,
        };
        let f: File = toml::from_str(text).map_err(|e| bad(e.message().to_string()))?;
        let mut r = Registries::default();
        for e in f.registry {
            if e.insecure {
                r.insecure.push(e.host.clone());
            }
            match (e.username, e.password) {
                (Some(u), Some(p)) => {
                    r.credentials.insert(e.host, (u, p));
                }
                (None, None) => {}
                _ => {
                    return Err(bad(format!(
                        "registry {}: username and password go together",
                        e.host
                    )))
                }
            }
        }
        Ok(r)
    }

    /// Reads `path`; a missing file is no registries.
    pub fn load(path: &Path) -> Result<Self, RegistriesError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(path, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(RegistriesError {
                path: path.to_path_buf(),
                why: e.to_string(),
            }),
        }
    }

    /// The credentials for the registry `image` names, if any.
    pub fn credentials_for(&self, image: &str) -> Option<(String, String)> {
        self.credentials.get(&registry_of(image)?).cloned()
    }
}

/// `cup login`'s credentials, by registry, kept in one file on the
/// machine's state partition (mode 0600, written whole and renamed into
/// place). They go before registries.toml's for the same registry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Logins {
    path: Option<std::path::PathBuf>,
    by_registry: BTreeMap<String, (String, String)>,
}

#[derive(Debug, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    username: String,
    password: String,
}

/// The file under vmmd's state directory.
pub const LOGINS_FILE: &str = "registry-logins.json";

impl Logins {
    /// Reads `path` (a missing file: no logins; a bad one is said, and
    /// left for the operator).
    pub fn load(path: &Path) -> Logins {
        let by_registry = match std::fs::read(path) {
            Ok(bytes) => match serde_json::from_slice::<BTreeMap<String, Login>>(&bytes) {
                Ok(m) => m
                    .into_iter()
                    .map(|(r, l)| (r, (l.username, l.password)))
                    .collect(),
                Err(e) => {
                    tracing::error!(
                        "{}: {e}; no logins until it is fixed or removed",
                        path.display()
                    );
                    BTreeMap::new()
                }
            },
            Err(_) => BTreeMap::new(),
        };
        Logins {
            path: Some(path.to_path_buf()),
            by_registry,
        }
    }

    pub fn get(&self, registry: &str) -> Option<(String, String)> {
        self.by_registry.get(registry).cloned()
    }

    pub fn registries(&self) -> impl Iterator<Item = &String> {
        self.by_registry.keys()
    }

    /// Keeps credentials for `registry` (written before it answers).
    pub fn set(&mut self, registry: &str, user: &str, password: &str) -> std::io::Result<()> {
        let mut next = self.by_registry.clone();
        next.insert(
            registry.to_string(),
            (user.to_string(), password.to_string()),
        );
        self.write(&next)?;
        self.by_registry = next;
        Ok(())
    }

    /// Forgets `registry`'s; whether there were any.
    pub fn remove(&mut self, registry: &str) -> std::io::Result<bool> {
        let mut next = self.by_registry.clone();
        if next.remove(registry).is_none() {
            return Ok(false);
        }
        self.write(&next)?;
        self.by_registry = next;
        Ok(true)
    }

    fn write(&self, m: &BTreeMap<String, (String, String)>) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let Some(path) = &self.path else {
            return Ok(());
        };
        let file: BTreeMap<&String, Login> = m
            .iter()
            .map(|(r, (u, p))| {
                (
                    r,
                    Login {
                        username: u.clone(),
                        password: p.clone(),
                    },
                )
            })
            .collect();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("json.new");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(&file).unwrap_or_default())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }
}

/// The registry an image is pulled from, as logins name it: its host, or
/// `docker.io` for a name without one; None for a local source.
pub fn login_key(image: &str) -> Option<String> {
    if ["oci:", "oci-archive:", "docker-archive:"]
        .iter()
        .any(|p| image.starts_with(p))
    {
        return None;
    }
    Some(registry_of(image).unwrap_or_else(|| "docker.io".into()))
}

/// Checks a registry as `cup login` names it: `HOST[:PORT]` (Docker Hub's
/// other names are `docker.io`).
pub fn login_registry(r: &str) -> Result<String, String> {
    let r = r.trim_end_matches('/');
    let r = match r {
        "" | "index.docker.io" | "registry-1.docker.io" | "https://index.docker.io/v1" => {
            "docker.io"
        }
        other => other,
    };
    let ok = r.len() <= 255
        && !r.contains("://")
        && !r.contains('/')
        && r.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
    if ok {
        Ok(r.to_string())
    } else {
        Err(format!(
            "{r:?}: a registry is HOST[:PORT], like registry.example.com:5000"
        ))
    }
}

/// The registry host of an image reference (`HOST[:PORT]/REPO[:TAG]`),
/// or None for a local source (`oci:`, `oci-archive:`, `docker-archive:`)
/// or a name without a registry (Docker Hub's).
pub fn registry_of(image: &str) -> Option<String> {
    if ["oci:", "oci-archive:", "docker-archive:"]
        .iter()
        .any(|p| image.starts_with(p))
    {
        return None;
    }
    let (first, _) = image.split_once('/')?;
    (first.contains('.') || first.contains(':') || first == "localhost").then(|| first.to_string())
}

#[cfg(test)]
mod login_tests {
    use super::*;

    #[test]
    fn logins_are_kept_private_and_go_to_their_registry() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOGINS_FILE);
        let mut l = Logins::load(&path);
        l.set("registry.example.com:5000", "fleet", "s3cret")
            .unwrap();
        l.set("docker.io", "me", "pat").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = Logins::load(&path);
        assert_eq!(again.get("docker.io"), Some(("me".into(), "pat".into())));
        let key = login_key("registry.example.com:5000/web:1").unwrap();
        assert_eq!(again.get(&key).unwrap().0, "fleet");
        assert_eq!(login_key("nginx:alpine").as_deref(), Some("docker.io"));
        assert_eq!(login_key("oci-archive:/x.tar"), None);
        let mut l = again;
        assert!(l.remove("docker.io").unwrap());
        assert!(!l.remove("docker.io").unwrap());
        assert_eq!(Logins::load(&path).get("docker.io"), None);
        assert_eq!(login_registry("index.docker.io").unwrap(), "docker.io");
        assert!(login_registry("https://evil/x").is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_go_to_the_registry_an_image_names() {
        let r = Registries::parse(
            Path::new("registries.toml"),
            r#"
[[registry]]
host = "registry.example.com:5000"
username = "fleet"
password = "s3cret"

[[registry]]
host = "10.0.2.2:15055"
insecure = true
"#,
        )
        .unwrap();
        assert_eq!(r.insecure, ["10.0.2.2:15055"]);
        assert_eq!(
            r.credentials_for("registry.example.com:5000/web:1.4"),
            Some(("fleet".into(), "s3cret".into()))
        );
        assert_eq!(r.credentials_for("10.0.2.2:15055/nginx:latest"), None);
        assert_eq!(r.credentials_for("oci-archive:/x.tar:latest"), None);
        assert_eq!(r.credentials_for("busybox:latest"), None);
        assert_eq!(registry_of("localhost/x"), Some("localhost".into()));
    }

    #[test]
    fn a_bad_file_says_where() {
        let e = Registries::parse(
            Path::new("/etc/r.toml"),
            "[[registry]]\nhost = \"x\"\nuser = \"u\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("/etc/r.toml: unknown field `user`"), "{e}");
        let e = Registries::parse(
            Path::new("r.toml"),
            "[[registry]]\nhost = \"x\"\nusername = \"u\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("go together"), "{e}");
        assert_eq!(
            Registries::load(Path::new("/nonexistent/registries.toml")).unwrap(),
            Registries::default()
        );
    }
}
