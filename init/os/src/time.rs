//! Time sync's settings and what it last did, shared by the `time-sync`
//! unit (init), provisioning (the machine config's `[time]`) and `cup
//! health`.
//!
//! ```toml
//! # /etc/steelcup/time.toml
//! servers = ["ntp.example.com", "10.0.0.1:123"]
//! wait = 10
//! ```

use serde::{Deserialize, Serialize};
use std::path::Path;

/// Where the machine config installs the settings.
pub const CONFIG: &str = "/etc/steelcup/time.toml";
/// Where the `time-sync` unit says what it last did.
pub const STATE: &str = "/run/steelcup/time.json";
/// The NTP servers a DHCP server offered (option 42), one per line.
pub const DHCP_SERVERS: &str = "/run/steelcup/dhcp-ntp-servers";
/// The servers asked when none are configured.
pub const DEFAULT_SERVERS: [&str; 2] = ["pool.ntp.org", "time.cloudflare.com"];
/// How long units after `time-sync` wait for a first answer by default.
pub const DEFAULT_WAIT_SECS: u32 = 10;
/// The most servers a config names.
pub const MAX_SERVERS: usize = 8;

/// `[time]` of a machine config, and `time.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeConfig {
    /// NTP servers, `HOST[:PORT]` (port 123 if none); empty: time sync off.
    pub servers: Vec<String>,
    /// Seconds units after `time-sync` wait for a first answer before they
    /// start anyway (an offline machine still boots).
    #[serde(default = "default_wait")]
    pub wait: u32,
}

fn default_wait() -> u32 {
    DEFAULT_WAIT_SECS
}

impl Default for TimeConfig {
    fn default() -> TimeConfig {
        TimeConfig {
            servers: DEFAULT_SERVERS.iter().map(|s| s.to_string()).collect(),
            wait: DEFAULT_WAIT_SECS,
        }
    }
}

/// What is wrong with time sync's settings.
#[derive(Debug, thiserror::Error)]
pub enum TimeConfigError {
    #[error("{0:?}: an NTP server is HOST[:PORT]")]
    Server(String),
    #[error("{0} servers: at most {MAX_SERVERS}")]
    TooManyServers(usize),
    #[error("wait = {0}: at most 600 seconds")]
    Wait(u32),
    #[error("{}: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Parse {
        path: std::path::PathBuf,
        source: toml::de::Error,
    },
    #[error("{}: {source}", path.display())]
    Invalid {
        path: std::path::PathBuf,
        source: Box<TimeConfigError>,
    },
}

/// Checks one `HOST[:PORT]`.
pub fn check_server(s: &str) -> Result<(), TimeConfigError> {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') || h.starts_with('[') => (h, Some(p)),
        _ => (s, None),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && (host.parse::<std::net::IpAddr>().is_ok()
            || host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-'));
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
    if host_ok && port_ok {
        Ok(())
    } else {
        Err(TimeConfigError::Server(s.to_string()))
    }
}

impl TimeConfig {
    pub fn check(&self) -> Result<(), TimeConfigError> {
        if self.servers.len() > MAX_SERVERS {
            return Err(TimeConfigError::TooManyServers(self.servers.len()));
        }
        if self.wait > 600 {
            return Err(TimeConfigError::Wait(self.wait));
        }
        self.servers.iter().try_for_each(|s| check_server(s))
    }

    /// The settings at `path`; where there is no file, the servers DHCP
    /// offered (`dhcp`), else the defaults.
    pub fn load(path: &Path, dhcp: &Path) -> Result<TimeConfig, TimeConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let c: TimeConfig =
                    toml::from_str(&text).map_err(|source| TimeConfigError::Parse {
                        path: path.to_path_buf(),
                        source,
                    })?;
                c.check().map_err(|e| TimeConfigError::Invalid {
                    path: path.to_path_buf(),
                    source: Box::new(e),
                })?;
                Ok(c)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let offered: Vec<String> = std::fs::read_to_string(dhcp)
                    .unwrap_or_default()
                    .lines()
                    .map(str::trim)
                    .filter(|l| check_server(l).is_ok())
                    .take(MAX_SERVERS)
                    .map(str::to_string)
                    .collect();
                Ok(match offered.is_empty() {
                    true => TimeConfig::default(),
                    false => TimeConfig {
                        servers: offered,
                        wait: DEFAULT_WAIT_SECS,
                    },
                })
            }
            Err(source) => Err(TimeConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }
}

/// Records the NTP servers of a DHCP lease (none: the file goes).
pub fn write_dhcp_servers(servers: &[std::net::Ipv4Addr]) {
    let path = Path::new(DHCP_SERVERS);
    if servers.is_empty() {
        let _ = std::fs::remove_file(path);
        return;
    }
    if let Some(d) = path.parent() {
        let _ = std::fs::create_dir_all(d);
    }
    let text: String = servers.iter().map(|s| format!("{s}\n")).collect();
    let _ = std::fs::write(path, text);
}

/// What time sync last did (`STATE`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TimeState {
    /// A server answered and the clock was set from it.
    pub synchronized: bool,
    /// The server of the last answer.
    pub server: String,
    /// How far off the clock was at the last answer, milliseconds
    /// (positive: it was behind).
    pub offset_ms: f64,
    /// The answer's round trip, milliseconds.
    pub delay_ms: f64,
    /// When (Unix seconds) the last answer came.
    pub last_sync_unix: u64,
    /// The clock was stepped (not slewed) this many times.
    pub steps: u32,
    /// Why the last attempt failed; empty after an answer.
    pub error: String,
}

impl TimeState {
    /// What `path` says, if it says it.
    pub fn load(path: &Path) -> Option<TimeState> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_are_host_and_port() {
        for ok in [
            "pool.ntp.org",
            "10.0.2.2:11123",
            "[fd00::1]:123",
            "fd00::1",
            "ntp-1.example.com",
        ] {
            assert!(check_server(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "host:0", "host:x", "ex ample:1", "http://x"] {
            assert!(check_server(bad).is_err(), "{bad}");
        }
        let c: TimeConfig = toml::from_str("servers = [\"10.0.2.2:11123\"]").unwrap();
        assert_eq!(c.wait, DEFAULT_WAIT_SECS);
        assert!(toml::from_str::<TimeConfig>("servers = []\nbogus = 1").is_err());
        let none = Path::new("/nonexistent/x");
        assert_eq!(TimeConfig::load(none, none).unwrap(), TimeConfig::default());
        // No config: the servers DHCP offered, if any.
        let dir = std::env::temp_dir().join(format!("steelcup-time-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("dhcp"), "10.0.0.1\nnot a server\n10.0.0.2\n").unwrap();
        let c = TimeConfig::load(none, &dir.join("dhcp")).unwrap();
        assert_eq!(c.servers, ["10.0.0.1", "10.0.0.2"]);
        // A config wins over DHCP.
        std::fs::write(dir.join("time.toml"), "servers = []\n").unwrap();
        let c = TimeConfig::load(&dir.join("time.toml"), &dir.join("dhcp")).unwrap();
        assert!(c.servers.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
