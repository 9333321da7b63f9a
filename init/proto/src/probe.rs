//! Health probes run inside a guest: vmmd asks vminit over its control
//! port ([`crate::control::GuestRequest::Probe`]) and vminit answers done or
//! failed and why once the probe is done.
//!
//! # Design
//! The probe runs where the workload is, on the guest's loopback, so a
//! workload without a network is probed the same way (as Docker runs a
//! health check inside the container). A command probe is not here: vmmd
//! runs it through the exec port like `cup exec`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// A probe of a port on the guest's loopback (sent in a
/// [`crate::control::GuestRequest::Probe`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Probe {
    /// A connection is accepted.
    Tcp(u16),
    /// `GET path` answers 2xx or 3xx.
    Http(u16, String),
}

/// The longest status line read from an HTTP answer.
const MAX_STATUS_LINE: usize = 512;

impl Probe {
    /// Refuses what no probe may be: port 0, an HTTP path that does not
    /// start with `/`, holds a space or control byte, or is over 1 KiB.
    pub fn check(&self) -> Result<(), String> {
        let (port, path) = match self {
            Probe::Tcp(p) => (*p, None),
            Probe::Http(p, path) => (*p, Some(path)),
        };
        if port == 0 {
            return Err("a probe needs a port".into());
        }
        match path {
            Some(p) if !p.starts_with('/') || p.len() > 1024 => Err(format!(
                "{p:?}: an HTTP probe's path starts with / and has at most 1024 bytes"
            )),
            Some(p) if p.bytes().any(|b| b <= b' ' || b == 0x7f) => Err(format!(
                "{p:?}: no spaces or control bytes in a probe's path"
            )),
            _ => Ok(()),
        }
    }

    /// Runs the probe against 127.0.0.1, all of it within `timeout`.
    pub fn run(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let (port, path) = match self {
            Probe::Tcp(p) => (*p, None),
            Probe::Http(p, path) => (*p, Some(path)),
        };
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut s = TcpStream::connect_timeout(&addr, timeout)
            .map_err(|e| format!("connect to port {port}: {e}"))?;
        let Some(path) = path else {
            return Ok(());
        };
        let left = || {
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        };
        s.set_write_timeout(Some(left()))
            .map_err(|e| e.to_string())?;
        // One write: a server may answer and close before reading it all.
        let request = format!(
            "GET {path} HTTP/1.0\r\nHost: localhost:{port}\r\nUser-Agent: steelcup-health\r\nConnection: close\r\n\r\n"
        );
        s.write_all(request.as_bytes())
            .map_err(|e| format!("send the request: {e}"))?;
        let mut line = Vec::new();
        let mut buf = [0u8; 256];
        while !line.contains(&b'\n') && line.len() < MAX_STATUS_LINE {
            s.set_read_timeout(Some(left()))
                .map_err(|e| e.to_string())?;
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => line.extend_from_slice(&buf[..n]),
                Err(e) => return Err(format!("read the answer: {e}")),
            }
        }
        let line = String::from_utf8_lossy(&line);
        let status = line.lines().next().unwrap_or_default();
        let code = status
            .strip_prefix("HTTP/")
            .and_then(|r| r.split(' ').nth(1))
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| format!("not an HTTP answer: {:?}", truncate(status)))?;
        if (200..400).contains(&code) {
            Ok(())
        } else {
            Err(format!("GET {path} answered {}", truncate(status)))
        }
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(80) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// Serves one connection with `answer`.
    fn server(answer: &'static [u8]) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            if let Ok((mut c, _)) = l.accept() {
                // The whole request (to its blank line), then the answer.
                let mut req = Vec::new();
                let mut b = [0u8; 256];
                while !req.ends_with(b"\r\n\r\n") {
                    match c.read(&mut b) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&b[..n]),
                    }
                }
                let _ = c.write_all(answer);
            }
        });
        port
    }

    #[test]
    fn http_probe_reads_the_status() {
        let t = Duration::from_secs(3);
        let ok = server(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(Probe::Http(ok, "/".into()).run(t), Ok(()));
        let redirect = server(b"HTTP/1.0 302 Found\r\n\r\n");
        assert_eq!(Probe::Http(redirect, "/".into()).run(t), Ok(()));
        let broken = server(b"HTTP/1.1 503 Service Unavailable\r\n\r\n");
        let e = Probe::Http(broken, "/h".into()).run(t).unwrap_err();
        assert!(e.contains("503") && e.contains("/h"), "{e}");
        let garbage = server(b"SSH-2.0-OpenSSH\r\n");
        let e = Probe::Http(garbage, "/".into()).run(t).unwrap_err();
        assert!(e.contains("not an HTTP answer"), "{e}");
    }

    #[test]
    fn tcp_probe_needs_a_listener() {
        let t = Duration::from_secs(3);
        let open = server(b"");
        assert_eq!(Probe::Tcp(open).run(t), Ok(()));
        // A port nobody listens on (bound, then closed).
        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = Probe::Tcp(closed).run(t).unwrap_err();
        assert!(e.contains(&format!("port {closed}")), "{e}");
    }

    #[test]
    fn a_silent_server_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let _keep = std::thread::spawn(move || {
            let c = l.accept();
            std::thread::sleep(Duration::from_secs(3));
            drop(c);
        });
        let t = Instant::now();
        let e = Probe::Http(port, "/".into())
            .run(Duration::from_secs(1))
            .unwrap_err();
        assert!(t.elapsed() < Duration::from_millis(2500), "{e}");
        assert!(e.contains("read the answer"), "{e}");
    }
}
