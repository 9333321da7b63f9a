//! A DHCPv4 client: DISCOVER, OFFER, REQUEST, ACK, then renewal at T1.
//!
//! # Design
//! A UDP socket on port 68 bound to the interface (SO_BINDTODEVICE) with the
//! broadcast flag set in every request, so servers answer by broadcast, which
//! reaches the socket before the interface has an address (no raw sockets).
//! The wire format is `dhcproto`'s. Replies are checked against the
//! transaction id and our hardware address; anything else is ignored.

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Encodable};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};
use steelcup_sys as sys;

/// What a server granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub server: Ipv4Addr,
    pub lease_secs: u32,
    /// NTP servers (option 42), for the time-sync unit.
    pub ntp: Vec<Ipv4Addr>,
}

fn prefix_of(mask: Ipv4Addr) -> u8 {
    u32::from(mask).leading_ones() as u8
}

/// A request of `kind` from `mac` with transaction `xid`.
pub fn request(
    kind: MessageType,
    xid: u32,
    mac: [u8; 6],
    requested: Option<(Ipv4Addr, Ipv4Addr)>,
) -> Message {
    let mut m = Message::new_with_id(
        xid,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &mac,
    );
    m.set_opcode(Opcode::BootRequest);
    m.set_flags(Flags::default().set_broadcast());
    let opts = m.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    let mut client_id = vec![1u8];
    client_id.extend_from_slice(&mac);
    opts.insert(DhcpOption::ClientIdentifier(client_id));
    opts.insert(DhcpOption::ParameterRequestList(vec![
        OptionCode::SubnetMask,
        OptionCode::Router,
        OptionCode::DomainNameServer,
        OptionCode::AddressLeaseTime,
        OptionCode::NtpServers,
    ]));
    if let Some((addr, server)) = requested {
        opts.insert(DhcpOption::RequestedIpAddress(addr));
        opts.insert(DhcpOption::ServerIdentifier(server));
    }
    m
}

/// A reply for our `xid` and `mac` of `kind`, as a lease; `None` otherwise.
pub fn parse_reply(bytes: &[u8], xid: u32, mac: [u8; 6], kind: MessageType) -> Option<Lease> {
    let m = Message::from_bytes(bytes).ok()?;
    if m.opcode() != Opcode::BootReply || m.xid() != xid || m.chaddr().get(..6) != Some(&mac[..]) {
        return None;
    }
    if m.opts().msg_type() != Some(kind) {
        return None;
    }
    let mut lease = Lease {
        address: m.yiaddr(),
        prefix: 24,
        router: None,
        dns: Vec::new(),
        server: m.siaddr(),
        lease_secs: 3600,
        ntp: Vec::new(),
    };
    for (_, opt) in m.opts().iter() {
        match opt {
            DhcpOption::SubnetMask(mask) => lease.prefix = prefix_of(*mask),
            DhcpOption::Router(r) => lease.router = r.first().copied(),
            DhcpOption::DomainNameServer(d) => lease.dns = d.clone(),
            DhcpOption::ServerIdentifier(s) => lease.server = *s,
            DhcpOption::AddressLeaseTime(t) => lease.lease_secs = *t,
            DhcpOption::NtpServers(n) => lease.ntp = n.clone(),
            _ => {}
        }
    }
    (!lease.address.is_unspecified()).then_some(lease)
}

fn socket(iface: &str) -> std::io::Result<UdpSocket> {
    use nix::sys::socket::{
        bind, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn,
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    setsockopt(&fd, sockopt::Broadcast, &true)?;
    setsockopt(&fd, sockopt::BindToDevice, &std::ffi::OsString::from(iface))?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::new(0, 0, 0, 0, 68),
    )?;
    Ok(UdpSocket::from(fd))
}

fn xid() -> u32 {
    let mut b = [0u8; 4];
    let _ = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b));
    u32::from_ne_bytes(b) ^ std::process::id()
}

/// Sends `msg` until a reply of `kind` arrives, retrying with backoff.
fn exchange(
    sock: &UdpSocket,
    msg: &Message,
    mac: [u8; 6],
    kind: MessageType,
    tries: u32,
) -> Option<Lease> {
    let bytes = msg.to_vec().ok()?;
    let dest = SocketAddrV4::new(Ipv4Addr::BROADCAST, 67);
    let mut wait = Duration::from_secs(1);
    let mut buf = [0u8; 1500];
    for _ in 0..tries {
        let _ = sock.send_to(&bytes, dest);
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            let _ = sock.set_read_timeout(Some(
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            ));
            match sock.recv_from(&mut buf) {
                Ok((n, _)) => {
                    if let Some(l) = parse_reply(&buf[..n], msg.xid(), mac, kind) {
                        return Some(l);
                    }
                    if parse_reply(&buf[..n], msg.xid(), mac, MessageType::Nak).is_some() {
                        return None;
                    }
                }
                Err(_) => break,
            }
        }
        wait = (wait * 2).min(Duration::from_secs(8));
    }
    None
}

fn apply(iface: &str, lease: &Lease) -> Result<(), sys::NetError> {
    sys::set_ipv4(iface, lease.address, lease.prefix)?;
    if let Some(r) = lease.router {
        sys::add_default_route(iface, r)?;
    }
    super::write_resolv_conf(&lease.dns);
    steelcup_os::time::write_dhcp_servers(&lease.ntp);
    Ok(())
}

/// Acquires a lease on `iface` and keeps it renewed. Never returns.
pub fn run(iface: &str, mac: [u8; 6]) {
    let sock = match socket(iface) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("network: {iface}: DHCP socket: {e}");
            return;
        }
    };
    let mut current: Option<Lease> = None;
    loop {
        let id = xid();
        let lease = match &current {
            // Renewing: ask the same server for the same address.
            Some(l) => exchange(
                &sock,
                &request(MessageType::Request, id, mac, Some((l.address, l.server))),
                mac,
                MessageType::Ack,
                4,
            ),
            None => exchange(
                &sock,
                &request(MessageType::Discover, id, mac, None),
                mac,
                MessageType::Offer,
                6,
            )
            .and_then(|offer| {
                let req = request(
                    MessageType::Request,
                    id,
                    mac,
                    Some((offer.address, offer.server)),
                );
                exchange(&sock, &req, mac, MessageType::Ack, 4)
            }),
        };
        match lease {
            Some(l) => {
                if current.as_ref() != Some(&l) {
                    match apply(iface, &l) {
                        Ok(()) => tracing::info!(
                            "network: {iface} {}/{} via DHCP (server {}, router {}, lease {}s)",
                            l.address,
                            l.prefix,
                            l.server,
                            l.router
                                .map(|r| r.to_string())
                                .unwrap_or_else(|| "none".into()),
                            l.lease_secs
                        ),
                        Err(e) => tracing::error!("network: {}", steelcup_sys::error_chain(&e)),
                    }
                }
                let t1 = Duration::from_secs(u64::from(l.lease_secs / 2).max(30));
                current = Some(l);
                std::thread::sleep(t1);
            }
            None => {
                if current.is_some() {
                    tracing::warn!("network: {iface}: lease renewal failed; starting over");
                } else {
                    tracing::warn!("network: {iface}: no DHCP answer; retrying in 30s");
                }
                current = None;
                std::thread::sleep(Duration::from_secs(30));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    fn reply(kind: MessageType, xid: u32, mac: [u8; 6]) -> Vec<u8> {
        let mut m = Message::new_with_id(
            xid,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::new(10, 0, 2, 15),
            Ipv4Addr::new(10, 0, 2, 2),
            Ipv4Addr::UNSPECIFIED,
            &mac,
        );
        m.set_opcode(Opcode::BootReply);
        let o = m.opts_mut();
        o.insert(DhcpOption::MessageType(kind));
        o.insert(DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)));
        o.insert(DhcpOption::Router(vec![Ipv4Addr::new(10, 0, 2, 2)]));
        o.insert(DhcpOption::DomainNameServer(vec![Ipv4Addr::new(
            10, 0, 2, 3,
        )]));
        o.insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 0, 2, 2)));
        o.insert(DhcpOption::AddressLeaseTime(86400));
        o.insert(DhcpOption::NtpServers(vec![Ipv4Addr::new(10, 0, 2, 4)]));
        m.to_vec().unwrap()
    }

    #[test]
    fn requests_are_broadcast_with_our_identity() {
        let m = request(
            MessageType::Request,
            7,
            MAC,
            Some((Ipv4Addr::new(10, 0, 2, 15), Ipv4Addr::new(10, 0, 2, 2))),
        );
        let back = Message::from_bytes(&m.to_vec().unwrap()).unwrap();
        assert!(back.flags().broadcast());
        assert_eq!(back.xid(), 7);
        assert_eq!(&back.chaddr()[..6], &MAC);
        assert_eq!(back.opts().msg_type(), Some(MessageType::Request));
        assert!(
            matches!(back.opts().get(OptionCode::ParameterRequestList), Some(DhcpOption::ParameterRequestList(l)) if l.contains(&OptionCode::NtpServers)),
            "NTP servers (option 42) are asked for"
        );
        assert!(
            matches!(back.opts().get(OptionCode::RequestedIpAddress), Some(DhcpOption::RequestedIpAddress(a)) if *a == Ipv4Addr::new(10, 0, 2, 15))
        );
    }

    #[test]
    fn replies_become_leases_only_when_they_are_ours() {
        let l = parse_reply(
            &reply(MessageType::Offer, 9, MAC),
            9,
            MAC,
            MessageType::Offer,
        )
        .unwrap();
        assert_eq!(
            l,
            Lease {
                address: Ipv4Addr::new(10, 0, 2, 15),
                prefix: 24,
                router: Some(Ipv4Addr::new(10, 0, 2, 2)),
                dns: vec![Ipv4Addr::new(10, 0, 2, 3)],
                server: Ipv4Addr::new(10, 0, 2, 2),
                lease_secs: 86400,
                ntp: vec![Ipv4Addr::new(10, 0, 2, 4)],
            }
        );
        assert!(
            parse_reply(
                &reply(MessageType::Offer, 9, MAC),
                10,
                MAC,
                MessageType::Offer
            )
            .is_none(),
            "other xid"
        );
        assert!(
            parse_reply(
                &reply(MessageType::Offer, 9, [1; 6]),
                9,
                MAC,
                MessageType::Offer
            )
            .is_none(),
            "other client"
        );
        assert!(
            parse_reply(&reply(MessageType::Ack, 9, MAC), 9, MAC, MessageType::Offer).is_none(),
            "other kind"
        );
        assert!(parse_reply(b"garbage", 9, MAC, MessageType::Offer).is_none());
        assert!(parse_reply(&[], 9, MAC, MessageType::Offer).is_none());
    }

    #[test]
    fn masks_to_prefixes() {
        assert_eq!(prefix_of(Ipv4Addr::new(255, 255, 255, 0)), 24);
        assert_eq!(prefix_of(Ipv4Addr::new(255, 255, 0, 0)), 16);
        assert_eq!(prefix_of(Ipv4Addr::new(0, 0, 0, 0)), 0);
    }
}
