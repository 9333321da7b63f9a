//! A process's standard streams over one byte stream (a vsock connection
//! between `cup` on the host and vminit in the guest).
//!
//! # Design
//! Frames: one kind byte, a 32-bit little-endian length, the payload (at
//! most [`MAX_FRAME`] bytes). The host sends [`STDIN`], [`STDIN_EOF`] and
//! [`RESIZE`]; the guest sends [`STDOUT`], [`STDERR`], then one [`EXIT`]
//! (the process's [`crate::guest::ExitStatus`] as JSON) or [`ERROR`] (it
//! could not start, with why). `cup exec` opens a connection to
//! [`EXEC_PORT`] and writes one [`ExecRequest`] as a JSON line first; `cup
//! run` connects to [`ATTACH_PORT`], where vminit waits for it before it
//! starts the workload, so no output is lost.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{self, Read, Write};

/// The vsock port of the workload's own stdio (`cup run`, attached).
pub const ATTACH_PORT: u32 = 1025;
/// The vsock port of `cup exec`.
pub const EXEC_PORT: u32 = 1026;

pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const EXIT: u8 = 3;
pub const STDIN_EOF: u8 = 4;
/// Payload: rows then columns, 16 bits each, little-endian.
pub const RESIZE: u8 = 5;
pub const ERROR: u8 = 6;

/// The largest payload of one frame.
pub const MAX_FRAME: usize = 64 << 10;
/// The longest exec request line.
pub const MAX_REQUEST: u64 = 64 << 10;

/// What `cup exec` asks vminit to run inside a workload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// argv; `argv[0]` is looked up in `PATH` if it has no `/`.
    pub argv: Vec<String>,
    /// Added to (and over) the workload's environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub workdir: Option<String>,
    /// As the image config's `User`; the workload's user when absent.
    #[serde(default)]
    pub user: Option<String>,
    /// A terminal: stdout and stderr become one stream.
    #[serde(default)]
    pub tty: bool,
    /// `cup exec -d`: start the process and answer at once (exit code 0
    /// once it runs); its output goes to the workload's console log.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub detach: bool,
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, kind: u8, payload: &[u8]) -> io::Result<()> {
    for chunk in payload
        .chunks(MAX_FRAME)
        .chain(payload.is_empty().then_some(&[][..]))
    {
        let mut head = [0u8; 5];
        head[0] = kind;
        head[1..].copy_from_slice(&(chunk.len() as u32).to_le_bytes());
        w.write_all(&head)?;
        w.write_all(chunk)?;
    }
    w.flush()
}

/// Reads one frame; `None` at a clean end of the stream.
pub fn read_frame(r: &mut impl Read) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head[..1]) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    r.read_exact(&mut head[1..])?;
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a {len}-byte frame"),
        ));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok(Some((head[0], payload)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_big_payloads_are_split() {
        let mut buf = Vec::new();
        write_frame(&mut buf, STDOUT, b"hello").unwrap();
        write_frame(&mut buf, STDIN_EOF, b"").unwrap();
        let big = vec![7u8; MAX_FRAME + 10];
        write_frame(&mut buf, STDERR, &big).unwrap();
        let mut r = &buf[..];
        assert_eq!(
            read_frame(&mut r).unwrap(),
            Some((STDOUT, b"hello".to_vec()))
        );
        assert_eq!(read_frame(&mut r).unwrap(), Some((STDIN_EOF, vec![])));
        assert_eq!(read_frame(&mut r).unwrap().unwrap().1.len(), MAX_FRAME);
        assert_eq!(read_frame(&mut r).unwrap().unwrap().1.len(), 10);
        assert_eq!(read_frame(&mut r).unwrap(), None);
    }

    #[test]
    fn oversized_and_truncated_frames_are_errors() {
        let mut bad = vec![STDOUT];
        bad.extend_from_slice(&(MAX_FRAME as u32 + 1).to_le_bytes());
        assert!(read_frame(&mut &bad[..]).is_err());
        assert!(read_frame(&mut &[STDOUT, 5, 0, 0, 0, b'h'][..]).is_err());
        assert!(read_frame(&mut &[STDOUT, 5][..]).is_err());
    }

    #[test]
    fn an_exec_refusal_sends_its_frames_and_closes_at_once() {
        let (guest, host) = std::os::unix::net::UnixStream::pair().unwrap();
        guest::refuse(
            std::fs::File::from(std::os::fd::OwnedFd::from(guest)),
            "cannot run x",
            2,
        );
        let mut r = io::BufReader::new(&host);
        assert_eq!(
            read_frame(&mut r).unwrap().unwrap(),
            (STDERR, b"cannot run x\n".to_vec())
        );
        let (kind, status) = read_frame(&mut r).unwrap().unwrap();
        assert_eq!(kind, EXIT);
        assert_eq!(
            serde_json::from_slice::<crate::guest::ExitStatus>(&status).unwrap(),
            crate::guest::ExitStatus::StartFailed { errno: 2 }
        );
        assert_eq!(read_frame(&mut r).unwrap(), None);
    }

    #[test]
    fn a_refusal_waits_for_the_host_to_close_after_its_frames() {
        let (guest, host) = std::os::unix::net::UnixStream::pair().unwrap();
        let t0 = std::time::Instant::now();
        let refused = std::thread::spawn(move || {
            guest::refuse_last(
                std::fs::File::from(std::os::fd::OwnedFd::from(guest)),
                "vminit: no",
                2,
            );
            t0.elapsed()
        });
        // The host reads both frames, then closes after a while.
        let mut r = io::BufReader::new(&host);
        assert_eq!(
            read_frame(&mut r).unwrap().unwrap(),
            (STDERR, b"vminit: no\n".to_vec())
        );
        assert_eq!(read_frame(&mut r).unwrap().unwrap().0, EXIT);
        std::thread::sleep(std::time::Duration::from_millis(300));
        drop(r);
        drop(host);
        let took = refused.join().unwrap();
        assert!(
            took >= std::time::Duration::from_millis(300)
                && took < std::time::Duration::from_secs(2),
            "{took:?}"
        );
    }
}

/// Guest side: a process whose standard streams are a connection.
pub mod guest {
    use super::*;
    use crate::guest::ExitStatus;
    use std::fs::File;
    use std::os::fd::{AsFd, AsRawFd, OwnedFd};
    use std::process::{Command, Stdio};
    use std::sync::{mpsc, Arc, Mutex};
    use std::time::Duration;

    /// A listening vsock socket on `port` (any CID).
    pub fn listen(port: u32) -> io::Result<OwnedFd> {
        use nix::sys::socket::{
            bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
        };
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
        listen(&fd, Backlog::new(8).unwrap_or(Backlog::MAXCONN))?;
        Ok(fd)
    }

    /// The next connection on `listener`; `None` after `timeout`.
    pub fn accept(listener: &OwnedFd, timeout: Option<Duration>) -> io::Result<Option<File>> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        if let Some(t) = timeout {
            let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
            let ms = PollTimeout::try_from(t.as_millis().min(i32::MAX as u128) as i32)
                .unwrap_or(PollTimeout::MAX);
            if poll(&mut fds, ms)? == 0 {
                return Ok(None);
            }
        }
        let fd = nix::sys::socket::accept4(
            listener.as_raw_fd(),
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )?;
        // SAFETY: accept4 returned a new descriptor that nothing else owns.
        Ok(Some(unsafe {
            <File as std::os::fd::FromRawFd>::from_raw_fd(fd)
        }))
    }

    /// A running process attached to a connection.
    #[derive(Debug)]
    pub struct Attached {
        pub pid: u32,
        writer: Arc<Mutex<File>>,
        outputs: mpsc::Receiver<()>,
        pending: usize,
    }

    fn pump(mut from: impl Read, writer: Arc<Mutex<File>>, kind: u8, done: mpsc::Sender<()>) {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
                    if write_frame(&mut *w, kind, &buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = done.send(());
    }

    /// Starts `cmd` with its standard streams on `conn` (a terminal when
    /// `tty`): frames from the host feed its stdin, its output goes back
    /// in frames.
    pub fn spawn(mut cmd: Command, conn: File, tty: bool) -> io::Result<Attached> {
        let writer = Arc::new(Mutex::new(conn.try_clone()?));
        let (done_tx, outputs) = mpsc::channel();
        let reader = conn;
        let mut terminal: Option<File> = None;
        let (pid, pending, stdin_sink): (u32, usize, Box<dyn Write + Send>) = if tty {
            let pty = nix::pty::openpty(None, None)?;
            let slave = File::from(pty.slave);
            cmd.stdin(Stdio::from(slave.try_clone()?))
                .stdout(Stdio::from(slave.try_clone()?))
                .stderr(Stdio::from(slave));
            steelcup_sys::new_session_with_tty(&mut cmd);
            let child = cmd.spawn()?;
            let master = File::from(pty.master);
            let out = master.try_clone()?;
            terminal = Some(master.try_clone()?);
            let w = writer.clone();
            let d = done_tx.clone();
            std::thread::spawn(move || pump(out, w, STDOUT, d));
            (child.id(), 1, Box::new(master))
        } else {
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = cmd.spawn()?;
            let (stdin, stdout, stderr) =
                (child.stdin.take(), child.stdout.take(), child.stderr.take());
            let mut n = 0;
            if let Some(o) = stdout {
                let (w, d) = (writer.clone(), done_tx.clone());
                std::thread::spawn(move || pump(o, w, STDOUT, d));
                n += 1;
            }
            if let Some(e) = stderr {
                let (w, d) = (writer.clone(), done_tx.clone());
                std::thread::spawn(move || pump(e, w, STDERR, d));
                n += 1;
            }
            let sink: Box<dyn Write + Send> = match stdin {
                Some(s) => Box::new(s),
                None => Box::new(io::sink()),
            };
            (child.id(), n, sink)
        };
        // The host's frames: stdin, its end, terminal size.
        std::thread::spawn(move || {
            let mut reader = io::BufReader::new(reader);
            let mut sink = Some(stdin_sink);
            while let Ok(Some((kind, data))) = read_frame(&mut reader) {
                match kind {
                    STDIN => {
                        if let Some(s) = sink.as_mut() {
                            if s.write_all(&data).and_then(|_| s.flush()).is_err() {
                                sink = None;
                            }
                        }
                    }
                    STDIN_EOF if tty => {
                        if let Some(s) = sink.as_mut() {
                            let _ = s.write_all(&[4]);
                        }
                    }
                    STDIN_EOF => sink = None,
                    RESIZE if data.len() == 4 => {
                        if let Some(t) = &terminal {
                            let rows = u16::from_le_bytes([data[0], data[1]]);
                            let cols = u16::from_le_bytes([data[2], data[3]]);
                            let _ = steelcup_sys::set_winsize(t, rows, cols);
                        }
                    }
                    _ => {}
                }
            }
        });
        Ok(Attached {
            pid,
            writer,
            outputs,
            pending,
        })
    }

    impl Attached {
        /// Sends the rest of the output (waiting up to two seconds for
        /// processes that still hold it), then the exit status.
        pub fn finish(self, status: ExitStatus) {
            for _ in 0..self.pending {
                if self.outputs.recv_timeout(Duration::from_secs(2)).is_err() {
                    break;
                }
            }
            let json = serde_json::to_vec(&status).unwrap_or_default();
            let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            let _ = write_frame(&mut *w, EXIT, &json);
            use nix::sys::socket::{shutdown, Shutdown};
            let _ = shutdown(w.as_raw_fd(), Shutdown::Both);
        }
    }

    /// How long the last frames may take to reach the host.
    const LINGER: Duration = Duration::from_secs(2);

    /// Waits up to `wait` for the host to close its side of `conn`: by
    /// then all that was written has left the guest. A VM that exits right
    /// after a write would otherwise lose what its vsock device had not yet
    /// passed to the host (the start failure's words, say). Our side stays
    /// open meanwhile: a guest connection half-closed (`shutdown` of its
    /// writes) while the host closed left the VM's vsock deaf to every
    /// later connection (seen on the 6.1 guest kernel in the QEMU tests).
    fn linger(conn: std::os::fd::BorrowedFd<'_>, wait: Duration) {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let deadline = std::time::Instant::now() + wait;
        // The peer's end of sending (nix names no POLLRDHUP).
        let rdhup = PollFlags::from_bits_retain(libc::POLLRDHUP);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return;
            }
            let mut fds = [PollFd::new(conn, rdhup)];
            let ms = PollTimeout::try_from(left.as_millis().min(i32::MAX as u128) as i32)
                .unwrap_or(PollTimeout::MAX);
            // The peer's end (or a hang-up or error, which poll always
            // reports), the deadline, or a failed poll: done; a signal:
            // wait on.
            if poll(&mut fds, ms) != Err(nix::errno::Errno::EINTR) {
                return;
            }
        }
    }

    /// Tells the host the process could not start: why on its stderr,
    /// then a start failure with `errno` as the exit status. For an exec:
    /// the VM goes on, so the frames reach the host after the connection
    /// is closed.
    pub fn refuse(mut conn: File, why: &str, errno: i32) {
        let _ = write_frame(&mut conn, STDERR, format!("{why}\n").as_bytes());
        let status = ExitStatus::StartFailed {
            errno: u8::try_from(errno).unwrap_or(u8::MAX),
        };
        let _ = write_frame(
            &mut conn,
            EXIT,
            &serde_json::to_vec(&status).unwrap_or_default(),
        );
    }

    /// [`refuse`] for the workload's own process, after which the VM ends:
    /// waits (at most [`LINGER`]) for the host to close, so the words are
    /// not lost with the VM.
    pub fn refuse_last(conn: File, why: &str, errno: i32) {
        let fd = conn.try_clone();
        refuse(conn, why, errno);
        if let Ok(fd) = fd {
            linger(fd.as_fd(), LINGER);
        }
    }
}
