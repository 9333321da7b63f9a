//! Published ports: `[HOST_IP:]HOST:GUEST[/tcp|udp]`, as `docker run -p`
//! takes them (`ports = [...]` in a `[microvm]` unit, `cup run -p`).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::net::Ipv4Addr;

/// A transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// One published port: connections to `host_port` on the host (on
/// `host_ip` only, when given) reach `guest_port` in the workload's VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortSpec {
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub guest_port: u16,
    pub protocol: Protocol,
}

impl PortSpec {
    /// Parses `[HOST_IP:]HOST:GUEST[/tcp|udp]`; the error names the part
    /// that is wrong.
    pub fn parse(s: &str) -> Result<PortSpec, String> {
        let whole = |why: &str| format!("port {s:?}: {why} (HOST:GUEST[/tcp|udp], like 8080:80)");
        let (ports, protocol) = match s.rsplit_once('/') {
            None => (s, Protocol::Tcp),
            Some((p, "tcp")) => (p, Protocol::Tcp),
            Some((p, "udp")) => (p, Protocol::Udp),
            Some((_, other)) => {
                return Err(whole(&format!("protocol {other:?} is not tcp or udp")))
            }
        };
        let parts: Vec<&str> = ports.split(':').collect();
        let (host_ip, host, guest) = match parts.as_slice() {
            [host, guest] => (None, *host, *guest),
            [ip, host, guest] => {
                let ip: Ipv4Addr = ip
                    .parse()
                    .map_err(|_| whole(&format!("{ip:?} is not an IPv4 address")))?;
                (Some(ip), *host, *guest)
            }
            _ => return Err(whole("give both the host and the guest port")),
        };
        let port = |p: &str, which: &str| -> Result<u16, String> {
            match p.parse::<u16>() {
                Ok(0) | Err(_) => Err(whole(&format!("{which} port {p:?} is not 1 to 65535"))),
                Ok(n) => Ok(n),
            }
        };
        Ok(PortSpec {
            host_ip,
            host_port: port(host, "host")?,
            guest_port: port(guest, "guest")?,
            protocol,
        })
    }

    /// Whether two publications want the same host port (a port on every
    /// address clashes with the same port on any one address).
    pub fn clashes(&self, other: &PortSpec) -> bool {
        self.protocol == other.protocol
            && self.host_port == other.host_port
            && (self.host_ip.is_none() || other.host_ip.is_none() || self.host_ip == other.host_ip)
    }
}

impl std::fmt::Display for PortSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(ip) = self.host_ip {
            write!(f, "{ip}:")?;
        }
        write!(
            f,
            "{}:{}/{}",
            self.host_port,
            self.guest_port,
            self.protocol.name()
        )
    }
}

impl Serialize for PortSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for PortSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        PortSpec::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The first two of `ports` that want the same host port, if any.
pub fn first_clash(ports: &[PortSpec]) -> Option<(PortSpec, PortSpec)> {
    ports.iter().enumerate().find_map(|(i, a)| {
        ports[i + 1..]
            .iter()
            .find(|b| a.clashes(b))
            .map(|b| (*a, *b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_forms_parse() {
        let p = PortSpec::parse("8080:80").unwrap();
        assert_eq!(
            p,
            PortSpec {
                host_ip: None,
                host_port: 8080,
                guest_port: 80,
                protocol: Protocol::Tcp
            }
        );
        assert_eq!(p.to_string(), "8080:80/tcp");
        let p = PortSpec::parse("127.0.0.1:5353:53/udp").unwrap();
        assert_eq!(p.host_ip, Some(Ipv4Addr::LOCALHOST));
        assert_eq!((p.host_port, p.guest_port), (5353, 53));
        assert_eq!(p.protocol, Protocol::Udp);
        assert_eq!(PortSpec::parse(&p.to_string()).unwrap(), p);
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        for (bad, says) in [
            ("80", "give both"),
            ("8080:80/sctp", "protocol \"sctp\""),
            ("0:80", "host port \"0\""),
            ("8080:70000", "guest port \"70000\""),
            ("8080:http", "guest port \"http\""),
            ("::1:8080:80", "give both"),
            ("300.1.1.1:8080:80", "not an IPv4 address"),
            ("", "give both"),
        ] {
            let e = PortSpec::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
            assert!(e.contains("HOST:GUEST"), "{e}");
        }
    }

    #[test]
    fn clashes_are_per_protocol_and_address() {
        let p = |s| PortSpec::parse(s).unwrap();
        assert!(p("8080:80").clashes(&p("8080:81")));
        assert!(p("8080:80").clashes(&p("127.0.0.1:8080:80")));
        assert!(!p("8080:80").clashes(&p("8080:80/udp")));
        assert!(!p("10.0.0.1:8080:80").clashes(&p("10.0.0.2:8080:80")));
        assert_eq!(
            first_clash(&[p("1:1"), p("2:2"), p("2:3")]),
            Some((p("2:2"), p("2:3")))
        );
        assert_eq!(first_clash(&[p("1:1"), p("1:1/udp")]), None);
    }

    #[test]
    fn serde_uses_the_text_form() {
        #[derive(Deserialize, Serialize)]
        struct T {
            ports: Vec<PortSpec>,
        }
        let t: T = toml::from_str("ports = [\"8080:80/tcp\"]").unwrap();
        assert_eq!(t.ports[0].host_port, 8080);
        let e = toml::from_str::<T>("ports = [\"8080\"]")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("give both"), "{e}");
    }
}
