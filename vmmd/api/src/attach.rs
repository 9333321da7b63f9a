//! The host side of a workload's stdio: `cup run` (attached) and `cup
//! exec` speak [`steelcup_proto::stdio`] frames over the VM's vsock device.
//!
//! # Design
//! vmmd names the VM's vsock socket; cup connects to it itself (`CONNECT
//! PORT`), so vmmd's loop never carries a byte of a workload's output.
//! stdin is copied in frames by a thread; output frames are written to
//! cup's stdout and stderr as they come; the exit frame gives cup's exit
//! code: the workload's code, 128 + a signal, 127 when its program was
//! not found and 126 when it could not be started otherwise.
//! With `-t` and a terminal, the terminal is raw for the session and its
//! size is sent.

use std::io::{BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};
use steelcup_proto::guest::ExitStatus;
use steelcup_proto::stdio::{self, read_frame, write_frame};

use crate::ClientError;

/// Connects to `port` inside the guest through its vsock socket `uds`.
pub fn connect(uds: &Path, port: u32) -> Result<UnixStream, ClientError> {
    // cup --remote: the same socket on the remote machine, by its
    // workload's name.
    let name = uds.file_stem().unwrap_or_default().to_string_lossy();
    let mut s = match crate::remote_stream(&format!("vsock {name}")) {
        Some(remote) => remote?.0,
        None => UnixStream::connect(uds).map_err(|source| ClientError::Vsock {
            path: uds.to_path_buf(),
            source,
        })?,
    };
    let io = |what| move |source| ClientError::Io { what, source };
    writeln!(s, "CONNECT {port}").map_err(io("write to the vsock socket"))?;
    // The answer is one line; read it byte by byte so nothing after it is
    // swallowed by a buffer.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(io("set a timeout"))?;
    while line.len() < 64 {
        match s.read(&mut b) {
            Ok(1) if b[0] == b'\n' => break,
            Ok(1) => line.push(b[0]),
            _ => return Err(ClientError::NotListening { port }),
        }
    }
    s.set_read_timeout(None).map_err(io("set a timeout"))?;
    if !line.starts_with(b"OK ") {
        return Err(ClientError::PortRefused {
            port,
            said: String::from_utf8_lossy(&line).into_owned(),
        });
    }
    Ok(s)
}

/// Connects to `port` of the VM whose vsock socket `socket()` names (None
/// while it has none yet; an error when it will never have one), trying
/// again for up to `patience`: the guest listens once it has booted.
pub fn connect_when_ready<E: From<ClientError>>(
    socket: &mut dyn FnMut() -> Result<Option<String>, E>,
    port: u32,
    patience: Duration,
) -> Result<UnixStream, E> {
    let t = Instant::now();
    let mut last = None;
    while t.elapsed() < patience {
        if let Some(uds) = socket()? {
            match connect(Path::new(&uds), port) {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(Box::new(e)),
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(ClientError::GaveUp {
        secs: patience.as_secs(),
        last,
    }
    .into())
}

/// A terminal put in raw mode, restored on drop.
struct RawTerminal(Option<nix::sys::termios::Termios>);

impl RawTerminal {
    fn new(tty: bool) -> RawTerminal {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        if !tty {
            return RawTerminal(None);
        }
        let stdin = std::io::stdin();
        let Ok(saved) = tcgetattr(&stdin) else {
            return RawTerminal(None);
        };
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        let _ = tcsetattr(&stdin, SetArg::TCSANOW, &raw);
        RawTerminal(Some(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                saved,
            );
        }
    }
}

/// cup's exit code for how the process ended.
pub fn exit_code(status: ExitStatus) -> u8 {
    match status {
        ExitStatus::Exited { code } => code,
        ExitStatus::Killed { signal } => 128u8.saturating_add(signal),
        // As a shell (and docker run) says: not found, or not runnable.
        ExitStatus::StartFailed { errno } if i32::from(errno) == libc::ENOENT => 127,
        ExitStatus::StartFailed { .. } => 126,
        ExitStatus::Rebooted | ExitStatus::PoweredOff => 0,
    }
}

/// Runs a session on `conn`: copies stdin in (when `stdin`), output out,
/// and returns the exit status (Err when the stream ends without one).
pub fn session(conn: UnixStream, stdin: bool, tty: bool) -> Result<ExitStatus, ClientError> {
    let local_tty = tty && std::io::IsTerminal::is_terminal(&std::io::stdin());
    let _raw = RawTerminal::new(local_tty);
    let mut writer = conn.try_clone().map_err(|source| ClientError::Io {
        what: "the guest's stream",
        source,
    })?;
    if local_tty {
        if let Some((rows, cols)) = steelcup_sys::window_size(&std::io::stdout()) {
            let mut p = rows.to_le_bytes().to_vec();
            p.extend_from_slice(&cols.to_le_bytes());
            let _ = write_frame(&mut writer, stdio::RESIZE, &p);
        }
    }
    if stdin {
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 16 << 10];
            let mut input = std::io::stdin().lock();
            loop {
                match input.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = write_frame(&mut writer, stdio::STDIN_EOF, b"");
                        return;
                    }
                    Ok(n) => {
                        if write_frame(&mut writer, stdio::STDIN, &buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    } else {
        let _ = write_frame(&mut writer, stdio::STDIN_EOF, b"");
    }
    let mut reader = BufReader::new(conn);
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
    loop {
        let frame = read_frame(&mut reader).map_err(|source| ClientError::Io {
            what: "the guest's stream",
            source,
        })?;
        match frame {
            None => return Err(ClientError::NoExitStatus),
            Some((stdio::STDOUT, d)) => {
                let _ = out.write_all(&d);
                let _ = out.flush();
            }
            Some((stdio::STDERR, d)) => {
                let _ = err.write_all(&d);
                let _ = err.flush();
            }
            Some((stdio::EXIT, d)) => {
                return serde_json::from_slice(&d).map_err(ClientError::BadExitStatus)
            }
            Some((stdio::ERROR, d)) => {
                return Err(ClientError::Guest(String::from_utf8_lossy(&d).into_owned()))
            }
            Some(_) => {}
        }
    }
}

/// Sends an exec request on a fresh connection to the exec port.
pub fn start_exec(uds: &Path, request: &stdio::ExecRequest) -> Result<UnixStream, ClientError> {
    send_exec(connect(uds, stdio::EXEC_PORT)?, request)
}

/// Sends an exec request on `conn`, a connection to the exec port.
pub fn send_exec(
    mut conn: UnixStream,
    request: &stdio::ExecRequest,
) -> Result<UnixStream, ClientError> {
    let mut line = serde_json::to_vec(request).unwrap_or_default();
    line.push(b'\n');
    conn.write_all(&line).map_err(|source| ClientError::Io {
        what: "send the request",
        source,
    })?;
    Ok(conn)
}
