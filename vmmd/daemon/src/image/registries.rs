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
