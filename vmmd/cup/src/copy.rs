//! `cup cp`: files into and out of a running microVM, as `docker cp`
//! copies them: a tar stream over vsock through the guest's vminit (see
//! `steelcup_proto::copy`). What comes out of a guest is unpacked here
//! with every entry checked to land inside the destination: a hostile
//! guest cannot write outside it.

use crate::error::{usage, CupError};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use steelcup_api::vmm1::Vmm1ClientProxy;
use steelcup_proto::copy::{self, CopyRequest, COPY_PORT};
use steelcup_proto::guest::ExitStatus;
use steelcup_proto::stdio;

/// One side of a copy: here, or `NAME:PATH` in a workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    Local(PathBuf),
    /// `-`: a tar archive on stdin or stdout.
    Stream,
    Guest {
        name: String,
        path: String,
    },
}

impl End {
    /// As Docker reads it: `-`; a path that starts with `/` or `.` is
    /// local (so a local name with a `:` is written `./a:b`); else
    /// `NAME:PATH` is a workload's.
    pub fn parse(s: &str) -> End {
        if s == "-" {
            return End::Stream;
        }
        if !s.starts_with('/') && !s.starts_with('.') {
            if let Some((name, path)) = s.split_once(':') {
                return End::Guest {
                    name: name.to_string(),
                    path: path.to_string(),
                };
            }
        }
        End::Local(PathBuf::from(s))
    }
}

pub fn cp(p: &Vmm1ClientProxy<'static>, src: &str, dst: &str) -> Result<u8, CupError> {
    match (End::parse(src), End::parse(dst)) {
        (End::Guest { name, path }, to @ (End::Local(_) | End::Stream)) => {
            out_of(p, &name, &path, &to)
        }
        (from @ (End::Local(_) | End::Stream), End::Guest { name, path }) => {
            into(p, &from, &name, &path)
        }
        (End::Guest { .. }, End::Guest { .. }) => Err(usage!(
            "cp copies between this machine and a workload, not between two workloads"
        )),
        _ => Err(usage!(
            "cp needs a workload's path on one side: NAME:PATH (a local path with ':' is written ./a:b)"
        )),
    }
}

fn connect(
    p: &Vmm1ClientProxy<'static>,
    name: &str,
    path: &str,
    request: &CopyRequest,
) -> Result<UnixStream, CupError> {
    copy::check_guest_path(path).map_err(|e| usage!("{name}:{e}"))?;
    let uds = p.socket(name)?;
    let mut conn = steelcup_api::attach::connect(Path::new(&uds), COPY_PORT)?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    conn.write_all(&line).map_err(|e| CupError::Workload {
        name: name.to_string(),
        why: format!("sending the copy request: {e}"),
    })?;
    Ok(conn)
}

/// The guest's frames as a reader of the archive (`STDOUT` data); what
/// it said on `STDERR` and its `EXIT` status kept for after.
struct FromGuest {
    conn: UnixStream,
    buf: Vec<u8>,
    at: usize,
    said: String,
    status: Option<ExitStatus>,
}

impl Read for FromGuest {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.buf.len() {
            if self.status.is_some() {
                return Ok(0);
            }
            match stdio::read_frame(&mut self.conn)? {
                Some((stdio::STDOUT, data)) => (self.buf, self.at) = (data, 0),
                Some((stdio::STDERR, text)) => {
                    if self.said.len() < 64 << 10 {
                        self.said.push_str(&String::from_utf8_lossy(&text));
                    }
                }
                Some((stdio::EXIT, json)) => {
                    self.status = Some(
                        serde_json::from_slice(&json).unwrap_or(ExitStatus::Exited { code: 1 }),
                    )
                }
                Some(_) => {}
                None => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the guest closed the copy before its end",
                    ))
                }
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

impl FromGuest {
    /// Reads on to the guest's exit frame; Err with what it said unless 0.
    fn finish(mut self, name: &str) -> Result<(), CupError> {
        let mut sink = [0u8; 64 << 10];
        while self.status.is_none() {
            if self.read(&mut sink).map_err(|e| CupError::Workload {
                name: name.to_string(),
                why: e.to_string(),
            })? == 0
            {
                break;
            }
        }
        match self.status {
            Some(ExitStatus::Exited { code: 0 }) => Ok(()),
            _ => Err(CupError::Workload {
                name: name.to_string(),
                why: match self.said.trim() {
                    "" => "the copy failed in the guest".to_string(),
                    s => s.to_string(),
                },
            }),
        }
    }
}

/// `cup cp NAME:PATH DEST`.
fn out_of(p: &Vmm1ClientProxy<'static>, name: &str, path: &str, to: &End) -> Result<u8, CupError> {
    let conn = connect(p, name, path, &CopyRequest::Out { path: path.into() })?;
    let mut from = FromGuest {
        conn,
        buf: Vec::new(),
        at: 0,
        said: String::new(),
        status: None,
    };
    let placed = match to {
        End::Stream => std::io::copy(&mut from, &mut std::io::stdout().lock())
            .map(|_| ())
            .map_err(|e| CupError::Workload {
                name: name.into(),
                why: e.to_string(),
            }),
        End::Local(dest) => copy::place(&mut from, dest).map_err(|e| CupError::Workload {
            name: name.into(),
            why: steelcup_sys::error_chain(&e),
        }),
        End::Guest { .. } => unreachable!("checked by cp"),
    };
    // The guest's own failure (no such path) says more than a cut archive.
    if from.status.is_none() && placed.is_err() {
        let _ = from.conn.shutdown(std::net::Shutdown::Write);
    }
    let guest = from.finish(name);
    guest.and(placed).map(|_| 0)
}

/// `cup cp SRC NAME:PATH`.
fn into(p: &Vmm1ClientProxy<'static>, from: &End, name: &str, path: &str) -> Result<u8, CupError> {
    let conn = connect(p, name, path, &CopyRequest::In { path: path.into() })?;
    let mut frames = copy::FrameWriter {
        inner: conn.try_clone().map_err(|e| CupError::Workload {
            name: name.into(),
            why: e.to_string(),
        })?,
        kind: stdio::STDIN,
    };
    let sent = match from {
        End::Local(src) => {
            let top = copy::top_name(&std::path::absolute(src).unwrap_or_else(|_| src.clone()));
            copy::pack(src, &top, &mut frames)
                .map_err(|e| usage!("{}", steelcup_sys::error_chain(&e)))
        }
        End::Stream => std::io::copy(&mut std::io::stdin().lock(), &mut frames)
            .map(|_| ())
            .map_err(|e| usage!("reading the archive on stdin: {e}")),
        End::Guest { .. } => unreachable!("checked by cp"),
    };
    let _ = stdio::write_frame(&mut frames.inner, stdio::STDIN_EOF, b"");
    let reply = FromGuest {
        conn,
        buf: Vec::new(),
        at: 0,
        said: String::new(),
        status: None,
    };
    let guest = reply.finish(name);
    sent.and(guest).map(|_| 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends_read_as_dockers() {
        assert_eq!(
            End::parse("web:/etc/nginx"),
            End::Guest {
                name: "web".into(),
                path: "/etc/nginx".into()
            }
        );
        assert_eq!(End::parse("./a:b"), End::Local("./a:b".into()));
        assert_eq!(End::parse("/tmp/x"), End::Local("/tmp/x".into()));
        assert_eq!(End::parse("notes.txt"), End::Local("notes.txt".into()));
        assert_eq!(End::parse("-"), End::Stream);
    }
}
