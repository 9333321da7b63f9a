//! virtio-vsock with its host side on Unix sockets: how vmmd talks to a
//! guest (vminit's control port) without any networking.
//!
//! # Design
//! Firecracker's convention, so its tools and habits carry over:
//! - host → guest: a host process connects to the VM's socket `uds` and
//!   writes `CONNECT PORT\n`; the device sends the guest a connection request
//!   for PORT and, once the guest accepts, answers `OK LOCAL_PORT\n`; from
//!   then on the Unix stream carries the connection's bytes.
//! - guest → host: a guest connecting to host (CID 2) port P reaches the
//!   Unix socket `{uds}_P`, if something listens there.
//!
//! The device keeps its host sockets in its own epoll set (edge-triggered),
//! which the device thread watches. Flow control is virtio-vsock's credit:
//! the guest may have at most [`BUF_ALLOC`] bytes in flight to a host socket,
//! which bounds what the device buffers per connection; host data goes to the
//! guest only as far as the guest's credit allows. Everything the guest sends
//! is untrusted: a packet for the wrong CID, an unknown operation, data past
//! its credit or a header cut short gets a reset, never a panic.

use super::VirtioDevice;
use crate::devices::Refusals;
use std::collections::{BTreeMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// The host's context id.
pub const HOST_CID: u64 = 2;
/// Bytes of a packet header.
pub const HDR_LEN: usize = 44;
/// Receive buffer the device advertises per connection (its credit).
pub const BUF_ALLOC: u32 = 256 << 10;
/// The most connections a VM may have open.
pub const MAX_CONNS: usize = 256;
/// The largest payload the device accepts in one packet.
pub const MAX_PKT_DATA: u32 = 64 << 10;
/// Host ports the device picks for host-initiated connections start here.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
const QUEUE_SIZE: u16 = 256;
const RXQ: usize = 0;
const TXQ: usize = 1;

const TYPE_STREAM: u16 = 1;
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;
/// SHUTDOWN flags: the sender will receive / send no more.
const SHUT_RCV: u32 = 1;
const SHUT_SEND: u32 = 2;

/// A virtio-vsock packet header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn parse(b: &[u8; HDR_LEN]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A host client that has not yet said `CONNECT PORT`.
    AwaitingConnect,
    /// Asked the guest; waiting for its RESPONSE.
    Connecting,
    Established,
}

struct Conn {
    stream: UnixStream,
    state: State,
    /// The host side's port and the guest's.
    local_port: u32,
    peer_port: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    tx_cnt: u32,
    /// Bytes from the guest written to the host socket.
    fwd_cnt: u32,
    fwd_cnt_told: u32,
    /// Guest data not yet written to the host socket (at most BUF_ALLOC).
    pending: VecDeque<u8>,
    /// The `CONNECT` line as it arrives.
    line: Vec<u8>,
    /// The host socket may have data (edge-triggered: until WouldBlock).
    readable: bool,
    /// The guest will send no more: shut the host socket's write side once
    /// `pending` is flushed.
    guest_done_sending: bool,
    /// The host socket reached EOF and the guest was told (once).
    host_closed: bool,
}

impl Conn {
    fn new(stream: UnixStream, state: State, local_port: u32, peer_port: u32) -> Self {
        Conn {
            stream,
            state,
            local_port,
            peer_port,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_told: 0,
            pending: VecDeque::new(),
            line: Vec::new(),
            readable: false,
            guest_done_sending: false,
            host_closed: false,
        }
    }

    /// The guest can take data the host socket may have.
    fn has_data_for_guest(&self) -> bool {
        self.state == State::Established
            && self.readable
            && !self.host_closed
            && self.peer_credit() > 0
    }

    /// Bytes the guest can still take from this connection.
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    /// Writes what it can of `pending` to the host socket.
    fn flush(&mut self) -> std::io::Result<()> {
        while !self.pending.is_empty() {
            let (a, _) = self.pending.as_slices();
            match self.stream.write(a) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.pending.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.guest_done_sending {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Ok(())
    }
}

/// The vsock device.
pub struct Vsock {
    cid: u64,
    uds: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: BTreeMap<u64, Conn>,
    next_id: u64,
    next_local_port: u32,
    /// Control packets waiting for a guest receive buffer.
    control: VecDeque<Header>,
    /// Host data on its way into a guest receive buffer.
    rx_buf: Vec<u8>,
    /// Packets from the guest that were refused.
    pub refusals: Refusals,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("cid", &self.cid)
            .field("uds", &self.uds)
            .field("conns", &self.conns.len())
            .finish_non_exhaustive()
    }
}

const LISTENER: u64 = 0;

impl Vsock {
    /// A device for guest `cid` listening on `uds` (replacing a stale socket).
    pub fn new(cid: u32, uds: &Path) -> std::io::Result<Self> {
        if cid < 3 {
            return Err(std::io::Error::new(
                ErrorKind::InvalidInput,
                format!("guest CID {cid} is reserved (use 3 or more)"),
            ));
        }
        let _ = std::fs::remove_file(uds);
        let listener = UnixListener::bind(uds)?;
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER),
        )?;
        Ok(Vsock {
            cid: u64::from(cid),
            uds: uds.to_path_buf(),
            listener,
            epoll,
            conns: BTreeMap::new(),
            next_id: 1,
            next_local_port: FIRST_LOCAL_PORT,
            control: VecDeque::new(),
            rx_buf: vec![0; MAX_PKT_DATA as usize],
            refusals: Refusals::new("virtio-vsock"),
        })
    }

    fn refuse(&mut self, why: &dyn std::fmt::Display) {
        self.refusals.note(why);
    }

    fn add_conn(&mut self, conn: Conn) -> Option<u64> {
        if self.conns.len() >= MAX_CONNS {
            self.refuse(&"too many connections; refusing another");
            return None;
        }
        let id = self.next_id;
        self.next_id += 1;
        let events =
            EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED | EventSet::READ_HANG_UP;
        if conn.stream.set_nonblocking(true).is_err()
            || self
                .epoll
                .ctl(
                    ControlOperation::Add,
                    conn.stream.as_raw_fd(),
                    EpollEvent::new(events, id),
                )
                .is_err()
        {
            return None;
        }
        self.conns.insert(id, conn);
        Some(id)
    }

    fn find(&self, local_port: u32, peer_port: u32) -> Option<u64> {
        self.conns
            .iter()
            .find(|(_, c)| {
                c.state != State::AwaitingConnect
                    && c.local_port == local_port
                    && c.peer_port == peer_port
            })
            .map(|(id, _)| *id)
    }

    fn reset_for(&mut self, h: &Header) {
        if h.op == OP_RST {
            return;
        }
        self.control.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: h.dst_port,
            dst_port: h.src_port,
            kind: TYPE_STREAM,
            op: OP_RST,
            ..Default::default()
        });
    }

    fn close(&mut self, id: u64, tell_guest: bool) {
        if let Some(c) = self.conns.remove(&id) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            if tell_guest && c.state != State::AwaitingConnect {
                let rst = reply(self.cid, &c, OP_RST);
                self.control.push_back(rst);
            }
        }
    }

    /// Handles one packet the guest sent.
    pub fn handle_guest_packet(&mut self, h: &Header, payload: &[u8]) {
        if h.src_cid != self.cid || h.dst_cid != HOST_CID || h.kind != TYPE_STREAM {
            self.refuse(&format_args!(
                "packet {} -> {} of type {} refused",
                h.src_cid, h.dst_cid, h.kind
            ));
            self.reset_for(h);
            return;
        }
        let found = self.find(h.dst_port, h.src_port);
        if let Some(id) = found {
            if let Some(c) = self.conns.get_mut(&id) {
                c.peer_buf_alloc = h.buf_alloc;
                c.peer_fwd_cnt = h.fwd_cnt;
            }
        }
        match (h.op, found) {
            (OP_REQUEST, None) => self.guest_connects(h),
            (OP_RESPONSE, Some(id)) => {
                let Some(c) = self.conns.get_mut(&id) else {
                    return;
                };
                if c.state != State::Connecting {
                    self.close(id, true);
                    return;
                }
                c.state = State::Established;
                let ok = format!("OK {}\n", c.local_port);
                c.pending.extend(ok.as_bytes());
                // The OK line is ours, not guest data: keep fwd_cnt honest.
                c.fwd_cnt = c.fwd_cnt.wrapping_sub(ok.len() as u32);
                if c.flush().is_err() {
                    self.close(id, true);
                }
            }
            (OP_RW, Some(id)) => {
                let Some(c) = self.conns.get_mut(&id) else {
                    return;
                };
                if c.state != State::Established
                    || c.pending.len() + payload.len() > BUF_ALLOC as usize
                {
                    self.refuse(&"data past the connection's credit");
                    self.close(id, true);
                    return;
                }
                c.pending.extend(payload);
                if c.flush().is_err() {
                    self.close(id, true);
                    return;
                }
                self.maybe_credit_update(id);
            }
            (OP_SHUTDOWN, Some(id)) => {
                let Some(c) = self.conns.get_mut(&id) else {
                    return;
                };
                if h.flags & SHUT_SEND != 0 {
                    c.guest_done_sending = true;
                    let _ = c.flush();
                }
                if h.flags & (SHUT_SEND | SHUT_RCV) == SHUT_SEND | SHUT_RCV {
                    self.close(id, true);
                }
            }
            (OP_RST, Some(id)) => self.close(id, false),
            (OP_CREDIT_REQUEST, Some(id)) => {
                if let Some(c) = self.conns.get(&id) {
                    let up = reply(self.cid, c, OP_CREDIT_UPDATE);
                    self.control.push_back(up);
                }
            }
            (OP_CREDIT_UPDATE, Some(_)) => {}
            (OP_RST, None) => {}
            (op, _) => {
                self.refuse(&format_args!(
                    "operation {op} for port {} -> {} refused",
                    h.src_port, h.dst_port
                ));
                self.reset_for(h);
            }
        }
    }

    fn maybe_credit_update(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if c.fwd_cnt.wrapping_sub(c.fwd_cnt_told) >= BUF_ALLOC / 4 {
            c.fwd_cnt_told = c.fwd_cnt;
            let up = Header {
                src_cid: HOST_CID,
                dst_cid: self.cid,
                src_port: c.local_port,
                dst_port: c.peer_port,
                kind: TYPE_STREAM,
                op: OP_CREDIT_UPDATE,
                buf_alloc: BUF_ALLOC,
                fwd_cnt: c.fwd_cnt,
                ..Default::default()
            };
            self.control.push_back(up);
        }
    }

    /// The guest connects to host port `h.dst_port`: `{uds}_PORT`.
    fn guest_connects(&mut self, h: &Header) {
        let path = PathBuf::from(format!("{}_{}", self.uds.display(), h.dst_port));
        let Ok(stream) = UnixStream::connect(&path) else {
            self.reset_for(h);
            return;
        };
        let mut c = Conn::new(stream, State::Established, h.dst_port, h.src_port);
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        let response = reply(self.cid, &c, OP_RESPONSE);
        match self.add_conn(c) {
            Some(_) => self.control.push_back(response),
            None => self.reset_for(h),
        }
    }

    /// Drains the device's epoll set: new host clients, their CONNECT lines,
    /// readable and writable sockets.
    fn poll_host(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            if n == 0 {
                return;
            }
            for ev in &events[..n] {
                let id = ev.data();
                if id == LISTENER {
                    self.accept_all();
                    continue;
                }
                let set = ev.event_set();
                let Some(c) = self.conns.get_mut(&id) else {
                    continue;
                };
                if set.contains(EventSet::OUT) && c.flush().is_err() {
                    self.close(id, true);
                    continue;
                }
                if set.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP) {
                    c.readable = true;
                    if c.state == State::AwaitingConnect {
                        self.read_connect_line(id);
                    }
                }
                self.maybe_credit_update(id);
            }
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    let _ = self.add_conn(Conn::new(stream, State::AwaitingConnect, 0, 0));
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Reads a host client's `CONNECT PORT\n` and asks the guest.
    fn read_connect_line(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let mut byte = [0u8; 1];
        // Byte by byte, so nothing after the line is consumed here.
        loop {
            match c.stream.read(&mut byte) {
                Ok(0) => {
                    self.close(id, false);
                    return;
                }
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) if c.line.len() < 32 => c.line.push(byte[0]),
                Ok(_) => {
                    self.close(id, false);
                    return;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    c.readable = false;
                    return;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.close(id, false);
                    return;
                }
            }
        }
        let line = String::from_utf8_lossy(&c.line).trim().to_string();
        let Some(port) = line
            .strip_prefix("CONNECT ")
            .and_then(|p| p.trim().parse::<u32>().ok())
        else {
            let _ = c.stream.write_all(b"ERROR expected CONNECT PORT\n");
            self.close(id, false);
            return;
        };
        c.state = State::Connecting;
        c.peer_port = port;
        c.local_port = self.next_local_port;
        self.next_local_port = self.next_local_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
        let request = reply(self.cid, c, OP_REQUEST);
        self.control.push_back(request);
    }

    /// Fills guest receive buffers: control packets first, then data from
    /// readable host sockets within the guest's credit. True if any was used.
    fn fill_rx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        // The payload buffer lives with the device: this runs on every
        // notification and host event.
        let mut buf = std::mem::take(&mut self.rx_buf);
        let used = self.fill_rx_with(&mut buf, queue, mem);
        self.rx_buf = buf;
        used
    }

    fn fill_rx_with(&mut self, buf: &mut [u8], queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        loop {
            let have_data = self.conns.values().any(Conn::has_data_for_guest);
            if self.control.is_empty() && !have_data {
                return used;
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                return used;
            };
            let head = chain.head_index();
            let bufs: Vec<(GuestAddress, u32)> = chain
                .filter(|d| d.is_write_only())
                .map(|d| (d.addr(), d.len()))
                .collect();
            let room: u64 = bufs.iter().map(|(_, l)| u64::from(*l)).sum();
            if room < HDR_LEN as u64 {
                // Useless buffer: hand it back empty.
                let _ = queue.add_used(mem, head, 0);
                used = true;
                continue;
            }
            let packet = if let Some(h) = self.control.pop_front() {
                Some((h, 0))
            } else {
                self.read_host_data(buf, (room - HDR_LEN as u64) as u32)
            };
            let Some((h, n)) = packet else {
                queue.go_to_previous_position();
                return used;
            };
            let written = super::write_chain(mem, &bufs, &h.bytes(), &buf[..n]);
            if queue.add_used(mem, head, written).is_err() {
                return used;
            }
            used = true;
        }
    }

    /// Reads up to `room` bytes from some readable connection into `buf`.
    fn read_host_data(&mut self, buf: &mut [u8], room: u32) -> Option<(Header, usize)> {
        let ids: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.has_data_for_guest())
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let Some(c) = self.conns.get_mut(&id) else {
                continue;
            };
            let want = room.min(c.peer_credit()).min(buf.len() as u32) as usize;
            match c.stream.read(&mut buf[..want]) {
                Ok(0) => {
                    // The host side closed: tell the guest, then forget it
                    // when the guest resets.
                    c.readable = false;
                    c.host_closed = true;
                    let mut h = reply(self.cid, c, OP_SHUTDOWN);
                    h.flags = SHUT_RCV | SHUT_SEND;
                    return Some((h, 0));
                }
                Ok(n) => {
                    c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                    let mut h = reply(self.cid, c, OP_RW);
                    h.len = n as u32;
                    return Some((h, n));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => c.readable = false,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    c.readable = false;
                    self.close(id, true);
                }
            }
        }
        None
    }

    /// Reads the guest's packets from the transmit queue.
    fn drain_tx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut bytes = Vec::new();
        super::serve_chains(queue, mem, |chain| {
            let max = HDR_LEN + MAX_PKT_DATA as usize;
            match super::read_chain(chain, mem, &mut bytes, max).map(|_| parse_packet(&bytes)) {
                Ok(Some((h, payload))) => self.handle_guest_packet(&h, payload),
                Ok(None) => self.refuse(&"malformed packet from the guest"),
                Err(why) => self.refuse(&why),
            }
            0
        })
    }
}

/// A header from the host side of `c` to guest `cid`.
fn reply(cid: u64, c: &Conn, op: u16) -> Header {
    Header {
        src_cid: HOST_CID,
        dst_cid: cid,
        src_port: c.local_port,
        dst_port: c.peer_port,
        len: 0,
        kind: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: BUF_ALLOC,
        fwd_cnt: c.fwd_cnt,
    }
}

/// Splits the bytes of a transmitted chain into a header and its payload;
/// `None` if the header is cut short or the payload is not all there.
pub fn parse_packet(bytes: &[u8]) -> Option<(Header, &[u8])> {
    let hdr: &[u8; HDR_LEN] = bytes.get(..HDR_LEN)?.try_into().ok()?;
    let h = Header::parse(hdr);
    if h.len > MAX_PKT_DATA {
        return None;
    }
    let payload = bytes.get(HDR_LEN..HDR_LEN + h.len as usize)?;
    Some((h, payload))
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        19
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        if index == TXQ {
            if let Some(q) = queues.get_mut(TXQ) {
                used |= self.drain_tx(q, mem);
            }
        }
        // New receive buffers, or replies the guest's packets caused.
        if let Some(q) = queues.get_mut(RXQ) {
            used |= self.fill_rx(q, mem);
        }
        used
    }

    fn host_event_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn process_host_event(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        self.poll_host();
        match queues.get_mut(RXQ) {
            Some(q) => self.fill_rx(q, mem),
            None => false,
        }
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uds(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("steelcup-vsock-{}-{name}", std::process::id()))
    }

    fn guest_hdr(op: u16, src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            kind: TYPE_STREAM,
            op,
            buf_alloc: 64 << 10,
            ..Default::default()
        }
    }

    #[test]
    fn header_round_trips() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1024,
            dst_port: 99,
            len: 5,
            kind: 1,
            op: OP_RW,
            flags: 3,
            buf_alloc: 7,
            fwd_cnt: 9,
        };
        assert_eq!(Header::parse(&h.bytes()), h);
        let mut bytes = h.bytes().to_vec();
        bytes.extend_from_slice(b"hello");
        let (p, payload) = parse_packet(&bytes).unwrap();
        assert_eq!((p, payload), (h, &b"hello"[..]));
        // Cut short, or claiming more than it carries, or too much.
        assert!(parse_packet(&bytes[..40]).is_none());
        assert!(parse_packet(&bytes[..47]).is_none());
        let mut huge = h;
        huge.len = u32::MAX;
        assert!(parse_packet(&huge.bytes()).is_none());
    }

    #[test]
    fn host_connect_reaches_the_guest_and_data_flows_both_ways() {
        let path = uds("h2g");
        let mut dev = Vsock::new(3, &path).unwrap();
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"CONNECT 1024\n").unwrap();
        dev.poll_host();
        let req = dev.control.pop_front().expect("a request to the guest");
        assert_eq!((req.op, req.dst_port, req.dst_cid), (OP_REQUEST, 1024, 3));
        // The guest accepts.
        let mut resp = guest_hdr(OP_RESPONSE, 1024, req.src_port);
        dev.handle_guest_packet(&resp, &[]);
        let mut line = [0u8; 64];
        let n = client.read(&mut line).unwrap();
        assert_eq!(
            std::str::from_utf8(&line[..n]).unwrap(),
            format!("OK {}\n", req.src_port)
        );
        // Guest -> host.
        resp.op = OP_RW;
        resp.len = 4;
        dev.handle_guest_packet(&resp, b"ping");
        let n = client.read(&mut line).unwrap();
        assert_eq!(&line[..n], b"ping");
        // Host -> guest, within the guest's credit.
        client.write_all(b"pong").unwrap();
        dev.poll_host();
        let mut buf = vec![0u8; 1024];
        let (h, n) = dev.read_host_data(&mut buf, 1024).unwrap();
        assert_eq!((h.op, h.len, &buf[..n]), (OP_RW, 4, &b"pong"[..]));
        // The host hangs up: the guest is told.
        drop(client);
        dev.poll_host();
        let (h, _) = dev.read_host_data(&mut buf, 1024).unwrap();
        assert_eq!((h.op, h.flags), (OP_SHUTDOWN, 3));
        // Told once, however often the closed socket shows up as readable.
        for c in dev.conns.values_mut() {
            c.readable = true;
        }
        assert!(dev.read_host_data(&mut buf, 1024).is_none());
        dev.handle_guest_packet(&guest_hdr(OP_RST, 1024, req.src_port), &[]);
        assert!(dev.conns.is_empty());
    }

    #[test]
    fn guest_connect_reaches_a_host_listener() {
        let path = uds("g2h");
        let listener = UnixListener::bind(format!("{}_5000", path.display())).unwrap();
        let mut dev = Vsock::new(3, &path).unwrap();
        dev.handle_guest_packet(&guest_hdr(OP_REQUEST, 777, 5000), &[]);
        assert_eq!(dev.control.pop_front().unwrap().op, OP_RESPONSE);
        let (mut s, _) = listener.accept().unwrap();
        let mut h = guest_hdr(OP_RW, 777, 5000);
        h.len = 2;
        dev.handle_guest_packet(&h, b"hi");
        let mut got = [0u8; 2];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");
        // Nobody listens on port 5001: reset.
        dev.handle_guest_packet(&guest_hdr(OP_REQUEST, 778, 5001), &[]);
        assert_eq!(dev.control.pop_front().unwrap().op, OP_RST);
        let _ = std::fs::remove_file(format!("{}_5000", path.display()));
    }

    #[test]
    fn hostile_packets_are_reset_not_obeyed() {
        let path = uds("hostile");
        let listener = UnixListener::bind(format!("{}_6000", path.display())).unwrap();
        let mut dev = Vsock::new(3, &path).unwrap();
        // Wrong source CID (spoofing another VM), wrong type, unknown op.
        let mut spoof = guest_hdr(OP_REQUEST, 1, 6000);
        spoof.src_cid = 4;
        dev.handle_guest_packet(&spoof, &[]);
        let mut dgram = guest_hdr(OP_REQUEST, 1, 6000);
        dgram.kind = 2;
        dev.handle_guest_packet(&dgram, &[]);
        dev.handle_guest_packet(&guest_hdr(99, 1, 6000), &[]);
        // Data for a connection that does not exist.
        dev.handle_guest_packet(&guest_hdr(OP_RW, 1, 6000), b"x");
        assert!(dev.conns.is_empty());
        assert!(dev.control.iter().all(|h| h.op == OP_RST));
        assert_eq!(dev.control.len(), 4);
        // More data than the credit we gave: the connection is reset.
        dev.control.clear();
        dev.handle_guest_packet(&guest_hdr(OP_REQUEST, 2, 6000), &[]);
        let (_s, _) = listener.accept().unwrap();
        let big = vec![0u8; MAX_PKT_DATA as usize];
        let mut h = guest_hdr(OP_RW, 2, 6000);
        h.len = MAX_PKT_DATA;
        // _s is never read: its socket buffer fills, then our credit runs out.
        for _ in 0..64 {
            dev.handle_guest_packet(&h, &big);
            if dev.conns.is_empty() {
                break;
            }
        }
        assert!(dev.conns.is_empty(), "over-credit data must reset");
        assert!(dev.refusals.count >= 4);
        let _ = std::fs::remove_file(format!("{}_6000", path.display()));
    }

    #[test]
    fn a_bad_connect_line_is_refused() {
        let path = uds("badline");
        let mut dev = Vsock::new(3, &path).unwrap();
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"HELLO\n").unwrap();
        dev.poll_host();
        let mut reply = String::new();
        client.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("ERROR"), "{reply}");
        assert!(dev.control.is_empty() && dev.conns.is_empty());
        assert!(Vsock::new(2, &uds("cid2")).is_err());
    }
}
