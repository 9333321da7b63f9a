//! The workloads' DNS server, on the host's bridge address, port 53 (UDP).
//!
//! A name of a workload (`web`, `web.1`) or of a unit, bare or under the
//! network's domain (`web.steelcup.internal`), answers with the addresses
//! of its running VMs (a unit: its ready replicas). A unit's `aliases`
//! (a Compose service's name) answer only a VM that shares one of its
//! network scopes, and come before the machine-wide names for it. Every other query goes
//! as it is to the host's resolvers (`/etc/resolv.conf`, read on each
//! query: DHCP may change it) and their answer comes back as it is.
//!
//! # Limitations
//! UDP only (no TCP fallback for large answers); A records only for our
//! names (AAAA and other types of them answer with no records).

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{rdata::A, RData, Record, RecordType};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// What the server answers from, shared with the network that fills it.
pub type Records = Arc<RwLock<Names>>;

/// Names (lower case, no trailing dot) and their addresses.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Names {
    /// Every running VM by its name, every unit by its ready replicas.
    pub global: BTreeMap<String, Vec<Ipv4Addr>>,
    /// Per network scope: an alias and the ready VMs that have it.
    pub scoped: BTreeMap<String, BTreeMap<String, Vec<Ipv4Addr>>>,
    /// Each VM's address and its scopes (whose aliases it sees).
    pub scopes_of: BTreeMap<Ipv4Addr, Vec<String>>,
}

impl Names {
    /// The addresses `name` has for a query from `from`: an alias of one
    /// of the asker's scopes first, else a machine-wide name.
    pub fn lookup(&self, name: &str, from: Option<Ipv4Addr>) -> Option<Vec<Ipv4Addr>> {
        let scopes = from.and_then(|ip| self.scopes_of.get(&ip));
        let mut aliased: Vec<Ipv4Addr> = scopes
            .into_iter()
            .flatten()
            .filter_map(|s| self.scoped.get(s)?.get(name))
            .flatten()
            .copied()
            .collect();
        if !aliased.is_empty() {
            aliased.sort();
            aliased.dedup();
            return Some(aliased);
        }
        self.global.get(name).cloned()
    }
}

/// How long our answers may be cached: VMs come and go.
const TTL: u32 = 5;
/// Forwarded queries in flight at most; more are answered SERVFAIL.
const MAX_FORWARDS: usize = 64;
/// How long an upstream resolver has to answer.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);

/// The server's settings.
#[derive(Debug, Clone)]
pub struct Server {
    pub records: Records,
    /// The network's domain, like `steelcup.internal`.
    pub domain: String,
    /// Where the upstream resolvers are listed.
    pub resolv_conf: PathBuf,
}

/// What to do with one query.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// Send these bytes back.
    Reply(Vec<u8>),
    /// Not one of ours: forward it upstream.
    Forward,
    /// Not a DNS query at all: drop it.
    Drop,
}

impl Server {
    /// Answers `query` (sent from `from`) from the records, or says to
    /// forward it.
    pub fn answer(&self, query: &[u8], from: Option<Ipv4Addr>) -> Answer {
        let Ok(msg) = Message::from_vec(query) else {
            return Answer::Drop;
        };
        if msg.metadata.message_type != MessageType::Query {
            return Answer::Drop;
        }
        let reply = |code: ResponseCode, answers: Vec<Record>| {
            let mut r = Message::response(msg.metadata.id, msg.metadata.op_code);
            r.metadata.recursion_desired = msg.metadata.recursion_desired;
            r.metadata.recursion_available = true;
            r.metadata.authoritative = true;
            r.metadata.response_code = code;
            r.add_queries(msg.queries.clone());
            r.add_answers(answers);
            r.to_vec().map(Answer::Reply).unwrap_or(Answer::Drop)
        };
        let [q] = msg.queries.as_slice() else {
            return reply(ResponseCode::FormErr, vec![]);
        };
        if msg.metadata.op_code != OpCode::Query {
            return reply(ResponseCode::NotImp, vec![]);
        }
        let name = q.name().to_ascii().to_ascii_lowercase();
        let name = name.trim_end_matches('.');
        let suffix = format!(".{}", self.domain);
        let bare = name.strip_suffix(suffix.as_str()).unwrap_or(name);
        let records = self.records.read().unwrap_or_else(|p| p.into_inner());
        match records.lookup(bare, from) {
            Some(ips) => {
                let answers = match q.query_type() {
                    RecordType::A => ips
                        .into_iter()
                        .map(|ip| Record::from_rdata(q.name().clone(), TTL, RData::A(A(ip))))
                        .collect(),
                    _ => vec![],
                };
                reply(ResponseCode::NoError, answers)
            }
            // Under our domain but no such workload: it does not exist.
            None if name.ends_with(suffix.as_str()) || name == self.domain => {
                reply(ResponseCode::NXDomain, vec![])
            }
            None => Answer::Forward,
        }
    }

    /// The upstream resolvers (IPv4, port 53), in order.
    fn upstreams(&self) -> Vec<SocketAddr> {
        std::fs::read_to_string(&self.resolv_conf)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().strip_prefix("nameserver"))
            .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
            .filter(|a| !a.is_loopback())
            .map(|a| SocketAddr::from((a, 53)))
            .collect()
    }

    /// Serves on `socket` until it fails or `stop` is set (and the socket
    /// shut down, see [`stop`]).
    pub fn serve(self, socket: Arc<UdpSocket>, stop: Arc<AtomicBool>) {
        let in_flight = Arc::new(AtomicUsize::new(0));
        let mut buf = [0u8; 4096];
        loop {
            let received = socket.recv_from(&mut buf);
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let (n, from) = match received {
                Ok(r) => r,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("network: DNS server stopped: {e}");
                    return;
                }
            };
            let query = &buf[..n];
            let asker = match from.ip() {
                std::net::IpAddr::V4(ip) => Some(ip),
                std::net::IpAddr::V6(_) => None,
            };
            match self.answer(query, asker) {
                Answer::Reply(r) => {
                    let _ = socket.send_to(&r, from);
                }
                Answer::Drop => {}
                Answer::Forward => {
                    if in_flight.fetch_add(1, Ordering::SeqCst) >= MAX_FORWARDS {
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                        if let Some(r) = servfail(query) {
                            let _ = socket.send_to(&r, from);
                        }
                        continue;
                    }
                    let (out, count, query) = (socket.clone(), in_flight.clone(), query.to_vec());
                    let upstreams = self.upstreams();
                    let spawned = std::thread::Builder::new()
                        .name("dns-forward".into())
                        .spawn(move || {
                            let r = forward(&query, &upstreams).or_else(|| servfail(&query));
                            if let Some(r) = r {
                                let _ = out.send_to(&r, from);
                            }
                            count.fetch_sub(1, Ordering::SeqCst);
                        });
                    if spawned.is_err() {
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                    }
                }
            }
        }
    }
}

/// Ends a [`Server::serve`] on `socket`: sets `flag`, then shuts the
/// socket down so its blocked receive returns.
pub fn stop(socket: &UdpSocket, flag: &AtomicBool) {
    use std::os::fd::AsRawFd;
    flag.store(true, Ordering::SeqCst);
    // SAFETY: shutdown(2) on a socket this function borrows.
    unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_RDWR) };
}

/// A SERVFAIL answer to `query`.
fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    let msg = Message::from_vec(query).ok()?;
    let mut r = Message::error_msg(
        msg.metadata.id,
        msg.metadata.op_code,
        ResponseCode::ServFail,
    );
    r.add_queries(msg.queries);
    r.to_vec().ok()
}

/// Asks each upstream in turn; the first answer with the query's id wins.
fn forward(query: &[u8], upstreams: &[SocketAddr]) -> Option<Vec<u8>> {
    let id = query.get(..2)?;
    for up in upstreams {
        let Ok(s) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) else {
            continue;
        };
        let _ = s.set_read_timeout(Some(UPSTREAM_TIMEOUT));
        if s.connect(up).is_err() || s.send(query).is_err() {
            continue;
        }
        let mut buf = vec![0u8; 4096];
        if let Ok(n) = s.recv(&mut buf) {
            if buf.get(..2) == Some(id) {
                buf.truncate(n);
                return Some(buf);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;
    use std::str::FromStr;

    fn server(resolv: PathBuf) -> Server {
        let records: Records = Default::default();
        records.write().unwrap().global.insert(
            "web".into(),
            vec![Ipv4Addr::new(10, 88, 0, 2), Ipv4Addr::new(10, 88, 0, 3)],
        );
        Server {
            records,
            domain: "steelcup.internal".into(),
            resolv_conf: resolv,
        }
    }

    fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_str(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    fn reply(a: Answer) -> Message {
        match a {
            Answer::Reply(r) => Message::from_vec(&r).unwrap(),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    fn addresses(m: &Message) -> Vec<Ipv4Addr> {
        m.answers
            .iter()
            .filter_map(|r| match r.data {
                RData::A(A(ip)) => Some(ip),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn workload_names_answer_bare_and_under_the_domain() {
        let s = server("/nonexistent".into());
        for name in ["web.", "WEB.steelcup.internal.", "web"] {
            let m = reply(s.answer(&query(name, RecordType::A), None));
            assert_eq!(m.metadata.response_code, ResponseCode::NoError);
            assert_eq!(
                addresses(&m),
                vec![Ipv4Addr::new(10, 88, 0, 2), Ipv4Addr::new(10, 88, 0, 3)],
                "{name}"
            );
        }
        // AAAA of ours: no records, no error (IPv4 only).
        let m = reply(s.answer(&query("web.", RecordType::AAAA), None));
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
        // Under our domain but unknown: NXDOMAIN, never forwarded.
        let m = reply(s.answer(&query("nope.steelcup.internal.", RecordType::A), None));
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    }

    #[test]
    fn aliases_answer_only_their_scopes_and_come_first() {
        let s = server("/nonexistent".into());
        let (web, db, other, db_b) = (
            Ipv4Addr::new(10, 88, 0, 2),
            Ipv4Addr::new(10, 88, 0, 4),
            Ipv4Addr::new(10, 88, 0, 9),
            Ipv4Addr::new(10, 88, 0, 7),
        );
        {
            let mut n = s.records.write().unwrap();
            n.global.insert("shop-db".into(), vec![db]);
            // A unit named "db" elsewhere on the machine.
            n.global.insert("db".into(), vec![other]);
            n.scoped
                .entry("shop_default".into())
                .or_default()
                .insert("db".into(), vec![db]);
            n.scoped
                .entry("blog_default".into())
                .or_default()
                .insert("db".into(), vec![db_b]);
            n.scopes_of.insert(web, vec!["shop_default".into()]);
        }
        let ask = |from| addresses(&reply(s.answer(&query("db.", RecordType::A), from)));
        assert_eq!(ask(Some(web)), vec![db], "shop's web finds shop's db");
        assert_eq!(
            ask(Some(other)),
            vec![other],
            "outside the scope: the unit db"
        );
        assert_eq!(ask(None), vec![other]);
        // Under the domain too.
        let m = reply(s.answer(&query("db.steelcup.internal.", RecordType::A), Some(web)));
        assert_eq!(addresses(&m), vec![db]);
    }

    #[test]
    fn other_names_go_upstream_and_garbage_is_dropped() {
        let s = server("/nonexistent".into());
        assert_eq!(
            s.answer(&query("deb.debian.org.", RecordType::A), None),
            Answer::Forward
        );
        assert_eq!(s.answer(b"\x00\x01garbage", None), Answer::Drop);
        assert_eq!(s.answer(&[], None), Answer::Drop);
    }

    #[test]
    fn forwarded_queries_come_back_from_the_resolver() {
        // A resolver on loopback that answers every query with 192.0.2.7.
        let up = UdpSocket::bind("127.0.0.1:0").unwrap();
        let up_addr = up.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            let (n, from) = up.recv_from(&mut buf).unwrap();
            let q = Message::from_vec(&buf[..n]).unwrap();
            let mut r = Message::response(q.metadata.id, OpCode::Query);
            r.add_queries(q.queries.clone());
            r.add_answer(Record::from_rdata(
                q.queries[0].name().clone(),
                60,
                RData::A(A(Ipv4Addr::new(192, 0, 2, 7))),
            ));
            up.send_to(&r.to_vec().unwrap(), from).unwrap();
        });
        let q = query("example.org.", RecordType::A);
        let r = forward(&q, &[up_addr]).expect("an answer");
        let m = Message::from_vec(&r).unwrap();
        assert_eq!(addresses(&m), vec![Ipv4Addr::new(192, 0, 2, 7)]);
        // No resolver answers: SERVFAIL for the query.
        let m = Message::from_vec(&servfail(&q).unwrap()).unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    }

    #[test]
    fn upstreams_come_from_resolv_conf() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("resolv.conf");
        std::fs::write(
            &p,
            "# x\nnameserver 10.0.2.3\nnameserver 127.0.0.53\nsearch lan\nnameserver ::1\n",
        )
        .unwrap();
        assert_eq!(
            server(p).upstreams(),
            vec![SocketAddr::from(([10, 0, 2, 3], 53))]
        );
    }
}
