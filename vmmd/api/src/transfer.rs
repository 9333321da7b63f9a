//! Bulk data to and from vmmd: `cup save` and `cup load` stream image
//! archives this way, locally and through the admin gateway alike.
//!
//! # Design
//! A D-Bus call (`Save`, `Load`) answers with the path of a one-use Unix
//! socket vmmd made for the transfer (under `RUN_DIR/vmmd/streams/`). The
//! client connects to it (or, with `cup --remote`, asks the gateway for
//! `stream NAME`) and the bytes go in frames:
//!
//! | frame | meaning |
//! |---|---|
//! | `u32` length 1..=[`MAX_FRAME`], then the bytes | data |
//! | `u32` 0 | the end: everything was sent |
//! | `u32` [`FAILED`], `u32` length ≤ [`MAX_MESSAGE`], UTF-8 | the sender failed; why |
//!
//! (lengths little-endian). So a sender that fails halfway is never
//! mistaken for a short archive, and a connection that drops is an error,
//! not an end. For `Load` the client sends the archive this way and vmmd
//! answers in the same frames (a JSON list of what was loaded).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// The largest data frame.
pub const MAX_FRAME: usize = 1 << 20;
/// The length that marks a failure.
pub const FAILED: u32 = u32::MAX;
/// The longest failure message.
pub const MAX_MESSAGE: usize = 4096;
/// Where vmmd makes its transfer sockets, under its run directory.
pub const STREAMS_DIR: &str = "streams";

/// Writes data in frames, buffered to [`MAX_FRAME`]; [`Framed::finish`]
/// or [`Framed::fail`] ends it.
#[derive(Debug)]
pub struct Framed<W: Write> {
    inner: W,
    buf: Vec<u8>,
}

impl<W: Write> Framed<W> {
    pub fn new(inner: W) -> Framed<W> {
        Framed {
            inner,
            buf: Vec::with_capacity(MAX_FRAME),
        }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.inner
            .write_all(&(self.buf.len() as u32).to_le_bytes())?;
        self.inner.write_all(&self.buf)?;
        self.buf.clear();
        Ok(())
    }

    /// Sends what is buffered and the end mark; the writer back.
    pub fn finish(mut self) -> io::Result<W> {
        self.send()?;
        self.inner.write_all(&0u32.to_le_bytes())?;
        self.inner.flush()?;
        Ok(self.inner)
    }

    /// Drops what is buffered and says why the data stops here.
    pub fn fail(mut self, why: &str) -> io::Result<W> {
        let mut end = why.len().min(MAX_MESSAGE);
        while !why.is_char_boundary(end) {
            end -= 1;
        }
        self.inner.write_all(&FAILED.to_le_bytes())?;
        self.inner.write_all(&(end as u32).to_le_bytes())?;
        self.inner.write_all(&why.as_bytes()[..end])?;
        self.inner.flush()?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for Framed<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(MAX_FRAME - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == MAX_FRAME {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()?;
        self.inner.flush()
    }
}

/// Reads framed data as a plain stream: end of file at the end mark; the
/// sender's failure, a bad frame or a dropped connection is an error.
#[derive(Debug)]
pub struct Unframed<R: Read> {
    inner: R,
    left: usize,
    ended: bool,
}

impl<R: Read> Unframed<R> {
    pub fn new(inner: R) -> Unframed<R> {
        Unframed {
            inner,
            left: 0,
            ended: false,
        }
    }

    /// The reader back, once the end mark was read.
    pub fn into_inner(self) -> R {
        self.inner
    }

    fn u32(&mut self) -> io::Result<u32> {
        let mut b = [0u8; 4];
        self.inner.read_exact(&mut b).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the connection ended before the transfer did",
            ),
            _ => e,
        })?;
        Ok(u32::from_le_bytes(b))
    }
}

impl<R: Read> Read for Unframed<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.ended || out.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            match self.u32()? {
                0 => {
                    self.ended = true;
                    return Ok(0);
                }
                FAILED => {
                    let len = self.u32()? as usize;
                    if len > MAX_MESSAGE {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("a failure message of {len} bytes"),
                        ));
                    }
                    let mut why = vec![0u8; len];
                    self.inner.read_exact(&mut why)?;
                    self.ended = true;
                    return Err(io::Error::other(String::from_utf8_lossy(&why).into_owned()));
                }
                n if n as usize > MAX_FRAME => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("a frame of {n} bytes (at most {MAX_FRAME})"),
                    ))
                }
                n => self.left = n as usize,
            }
        }
        let want = out.len().min(self.left);
        let n = self.inner.read(&mut out[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the connection ended inside a frame",
            ));
        }
        self.left -= n;
        Ok(n)
    }
}

/// Connects to the transfer socket vmmd answered with (through the admin
/// gateway with `cup --remote`).
pub fn connect(socket: &Path) -> Result<UnixStream, crate::ClientError> {
    let name = socket.file_stem().unwrap_or_default().to_string_lossy();
    match crate::remote_stream(&format!("stream {name}")) {
        Some(remote) => Ok(remote?.0),
        None => UnixStream::connect(socket).map_err(|source| crate::ClientError::Vsock {
            path: socket.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(data: &[u8]) -> Vec<u8> {
        let mut w = Framed::new(Vec::new());
        // Odd-sized writes cross frame boundaries.
        for part in data.chunks(MAX_FRAME / 3 + 7) {
            w.write_all(part).unwrap();
        }
        w.finish().unwrap()
    }

    #[test]
    fn data_comes_back_whole_across_frames() {
        let data: Vec<u8> = (0..(MAX_FRAME * 2 + 12345))
            .map(|i| (i % 251) as u8)
            .collect();
        let wire = framed(&data);
        let mut back = Vec::new();
        Unframed::new(&wire[..]).read_to_end(&mut back).unwrap();
        assert_eq!(back, data);
        // The reader stops at the end mark: what follows is the stream's.
        let mut wire = framed(b"archive");
        wire.extend_from_slice(b"answer");
        let mut r = Unframed::new(&wire[..]);
        let mut back = Vec::new();
        r.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"archive");
        let mut rest = Vec::new();
        r.into_inner().read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"answer");
    }

    #[test]
    fn a_failure_or_a_cut_is_an_error_not_an_end() {
        let mut w = Framed::new(Vec::new());
        w.write_all(b"half an archive").unwrap();
        w.flush().unwrap();
        let wire = w.fail("blob sha256:ab: No such file or directory").unwrap();
        let mut back = Vec::new();
        let e = Unframed::new(&wire[..]).read_to_end(&mut back).unwrap_err();
        assert!(e.to_string().contains("No such file"), "{e}");

        let wire = framed(b"a whole archive");
        for cut in [0, 2, 5, wire.len() - 1] {
            let mut back = Vec::new();
            let e = Unframed::new(&wire[..cut])
                .read_to_end(&mut back)
                .unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "cut at {cut}");
        }
        // A length past the bound is refused before anything is allocated.
        let mut wire = (MAX_FRAME as u32 + 1).to_le_bytes().to_vec();
        wire.extend_from_slice(&[0; 16]);
        let e = Unframed::new(&wire[..])
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
