//! One thread reads every service's stdout and stderr (epoll over the pipes)
//! and feeds whole lines to the log store.
//!
//! # Design
//! Pipes are non-blocking and level-triggered; each ready pipe gets one read
//! of up to 64 KiB per round, so a flooding service cannot starve the others.
//! Lines longer than [`MAX_LINE`] are cut. At end of file the last partial
//! line is flushed and the pipe closed. One thread for all services keeps
//! init's footprint flat however many units there are.

use super::logs::{LogStore, MAX_LINE};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

#[derive(Debug)]
struct Stream {
    unit: String,
    fd: OwnedFd,
    buf: Vec<u8>,
}

/// The capture thread's shared state.
#[derive(Debug)]
pub struct Capture {
    epoll: Epoll,
    streams: Mutex<HashMap<RawFd, Stream>>,
    logs: Arc<LogStore>,
}

impl Capture {
    /// Starts the capture thread.
    pub fn start(logs: Arc<LogStore>) -> std::io::Result<Arc<Self>> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(std::io::Error::from)?;
        let cap = Arc::new(Capture {
            epoll,
            streams: Mutex::new(HashMap::new()),
            logs,
        });
        let worker = cap.clone();
        std::thread::Builder::new()
            .name("capture".into())
            .spawn(move || worker.run())?;
        Ok(cap)
    }

    /// Captures `fd` (a pipe's read end) as `unit`'s output.
    pub fn add(&self, unit: &str, fd: OwnedFd) {
        let raw = fd.as_raw_fd();
        let _ = nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        );
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        if self
            .epoll
            .add(&fd, EpollEvent::new(EpollFlags::EPOLLIN, raw as u64))
            .is_ok()
        {
            streams.insert(
                raw,
                Stream {
                    unit: unit.to_string(),
                    fd,
                    buf: Vec::new(),
                },
            );
        }
    }

    fn run(&self) {
        let mut events = vec![EpollEvent::empty(); 64];
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let n = match self.epoll.wait(&mut events, EpollTimeout::NONE) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return,
            };
            let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
            for ev in &events[..n] {
                let raw = ev.data() as RawFd;
                let Some(s) = streams.get_mut(&raw) else {
                    continue;
                };
                match nix::unistd::read(&s.fd, &mut chunk) {
                    Ok(0) => {
                        if !s.buf.is_empty() {
                            let rest = std::mem::take(&mut s.buf);
                            self.logs.push(
                                &s.unit,
                                String::from_utf8_lossy(&rest).trim_end_matches('\r'),
                            );
                        }
                        let _ = self.epoll.delete(&s.fd);
                        streams.remove(&raw);
                    }
                    Ok(k) => {
                        s.buf.extend_from_slice(&chunk[..k]);
                        flush_lines(&self.logs, &s.unit, &mut s.buf);
                    }
                    Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => {}
                    Err(_) => {
                        let _ = self.epoll.delete(&s.fd);
                        streams.remove(&raw);
                    }
                }
            }
        }
    }
}

/// Pushes every complete line of `buf` (and cuts over-long ones), keeping the
/// unfinished rest.
fn flush_lines(logs: &LogStore, unit: &str, buf: &mut Vec<u8>) {
    let mut start = 0;
    while let Some(i) = buf[start..].iter().position(|b| *b == b'\n') {
        let line = &buf[start..start + i];
        logs.push(unit, String::from_utf8_lossy(line).trim_end_matches('\r'));
        start += i + 1;
    }
    while buf.len() - start >= MAX_LINE {
        logs.push(
            unit,
            &String::from_utf8_lossy(&buf[start..start + MAX_LINE]),
        );
        start += MAX_LINE;
    }
    buf.drain(..start);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_lines_keeps_the_rest_and_cuts_long_ones() {
        let logs = LogStore::new(None, false);
        let mut buf = b"one\r\ntwo\nthr".to_vec();
        flush_lines(&logs, "u", &mut buf);
        assert_eq!(buf, b"thr");
        buf.extend(vec![b'x'; MAX_LINE * 2 + 5]);
        flush_lines(&logs, "u", &mut buf);
        assert_eq!(buf.len(), 8);
        let (lines, _) = logs.read("u", 0, 10);
        assert_eq!(lines[0].1, "one");
        assert_eq!(lines[1].1, "two");
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[2].1.len(), MAX_LINE);
    }

    #[test]
    fn reads_pipes_to_the_end() {
        let logs = Arc::new(LogStore::new(None, false));
        let cap = Capture::start(logs.clone()).unwrap();
        let (r, w) = steelcup_sys::pipe().unwrap();
        cap.add("p", r);
        let mut f = std::fs::File::from(w);
        std::io::Write::write_all(&mut f, b"a\nb\nno newline").unwrap();
        drop(f);
        let t0 = std::time::Instant::now();
        while logs.tail("p", 10).0.len() < 3 {
            assert!(t0.elapsed().as_secs() < 5, "{:?}", logs.tail("p", 10));
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let lines: Vec<String> = logs.tail("p", 10).0.into_iter().map(|(_, l)| l).collect();
        assert_eq!(lines, ["a", "b", "no newline"]);
    }
}
