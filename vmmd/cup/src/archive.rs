//! `cup save` and `cup load`: image archives between this machine and the
//! store of the machine cup speaks to, as `docker save`/`docker load`.
//!
//! # Design
//! vmmd answers `Save`/`Load` with a one-use transfer socket
//! (`steelcup_api::transfer`); cup streams the archive through it in
//! frames, so a save that fails halfway is an error, not a short file.
//! `cup save -o FILE` writes `FILE` only when the archive came whole (it
//! is written beside it first); to standard output it streams, and a
//! failure is reported after what was written.

use crate::cli::{LoadArgs, SaveArgs};
use crate::error::{usage, CupError};
use std::io::{IsTerminal, Read, Write};
use std::path::Path;
use steelcup_api::transfer::{self, Framed, Unframed};
use steelcup_api::vmm1::{Loaded, Vmm1ClientProxy};

/// The longest answer to a load (a list of names).
const MAX_ANSWER: u64 = 1 << 20;

fn failed(what: &'static str) -> impl Fn(std::io::Error) -> CupError {
    move |e| CupError::Transfer {
        what,
        why: e.to_string(),
    }
}

/// `cup save [-o FILE] IMAGE...`.
pub fn save(p: &Vmm1ClientProxy<'static>, a: &SaveArgs) -> Result<u8, CupError> {
    if a.output.is_none() && std::io::stdout().is_terminal() {
        return Err(usage!(
            "save writes an archive, not text: give -o FILE or redirect standard output"
        ));
    }
    let names: Vec<&str> = a.images.iter().map(String::as_str).collect();
    let socket = p.save(&names)?;
    let conn = transfer::connect(Path::new(&socket))?;
    let mut from = Unframed::new(std::io::BufReader::new(conn));
    match &a.output {
        None => {
            let mut out = Progress::new(std::io::stdout().lock(), "saved");
            std::io::copy(&mut from, &mut out).map_err(failed("save"))?;
            drop(out.finish().map_err(failed("save"))?);
        }
        Some(path) => {
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            let part = dir.join(format!(
                ".{}.part-{}",
                path.file_name().unwrap_or_default().to_string_lossy(),
                std::process::id()
            ));
            let file = std::fs::File::create(&part).map_err(CupError::file("create", &part))?;
            let mut out = Progress::new(std::io::BufWriter::new(file), "saved");
            let written = std::io::copy(&mut from, &mut out)
                .map_err(failed("save"))
                .and_then(|_| out.finish().map_err(CupError::file("write", &part)))
                .and_then(|w| {
                    w.into_inner()
                        .map_err(|e| CupError::file("write", &part)(e.into_error()))?
                        .sync_all()
                        .map_err(CupError::file("write", &part))
                })
                .and_then(|()| std::fs::rename(&part, path).map_err(CupError::file("write", path)));
            if written.is_err() {
                let _ = std::fs::remove_file(&part);
            }
            written?;
        }
    }
    Ok(0)
}

/// `cup load [-i FILE] [-q]`.
pub fn load(p: &Vmm1ClientProxy<'static>, a: &LoadArgs) -> Result<u8, CupError> {
    let input: Box<dyn Read> = match &a.input {
        Some(path) => Box::new(std::fs::File::open(path).map_err(CupError::file("read", path))?),
        None if std::io::stdin().is_terminal() => {
            return Err(usage!(
                "load reads an archive: give -i FILE or pipe one in (cup load < image.tar)"
            ))
        }
        None => Box::new(std::io::stdin().lock()),
    };
    let socket = p.load()?;
    let conn = transfer::connect(Path::new(&socket))?;
    let answer_from = conn.try_clone().map_err(failed("load"))?;
    let mut to = Progress::new(Framed::new(std::io::BufWriter::new(conn)), "sent");
    let mut input = std::io::BufReader::with_capacity(1 << 20, input);
    let sent = std::io::copy(&mut input, &mut to)
        .and_then(|_| to.finish())
        .and_then(|framed| framed.finish())
        .and_then(|mut w| w.flush());
    // vmmd's answer says why it stopped reading, if it did: read it even
    // when sending failed.
    let mut answer = Vec::new();
    let read = Unframed::new(std::io::BufReader::new(answer_from))
        .take(MAX_ANSWER)
        .read_to_end(&mut answer);
    let loaded: Vec<Loaded> = match (read, sent) {
        (Ok(_), _) => serde_json::from_slice(&answer)?,
        // No answer came because the connection broke while sending: that
        // is the error to show.
        (Err(e), Err(send)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(failed("load")(send))
        }
        (Err(e), _) => return Err(failed("load")(e)),
    };
    if !a.quiet {
        for l in &loaded {
            if l.names.is_empty() {
                println!("Loaded image ID: {}", l.digest);
            }
            for n in &l.names {
                println!("Loaded image: {n}");
            }
        }
    }
    Ok(0)
}

/// Counts what goes through and, on a terminal, shows it on stderr.
struct Progress<W: Write> {
    inner: W,
    done: u64,
    shown: std::time::Instant,
    tty: bool,
    verb: &'static str,
}

impl<W: Write> Progress<W> {
    fn new(inner: W, verb: &'static str) -> Progress<W> {
        Progress {
            inner,
            done: 0,
            shown: std::time::Instant::now(),
            tty: std::io::stderr().is_terminal(),
            verb,
        }
    }

    /// Flushes, ends the progress line; the writer back.
    fn finish(mut self) -> std::io::Result<W> {
        self.inner.flush()?;
        if self.tty {
            eprintln!("\r{} {}   ", steelcup_api::human(self.done), self.verb);
        }
        Ok(self.inner)
    }
}

impl<W: Write> Write for Progress<W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(data)?;
        self.done += n as u64;
        if self.tty && self.shown.elapsed() > std::time::Duration::from_millis(200) {
            self.shown = std::time::Instant::now();
            eprint!("\r{} {}   ", steelcup_api::human(self.done), self.verb);
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
