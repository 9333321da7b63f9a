//! Per-unit logs: a bounded ring in memory, rotated files under a log
//! directory when one is writable, and an echo to the console.
//!
//! # Design
//! Every line gets a sequence number per unit, so a reader can follow a log
//! with a cursor (`read(unit, since)`) and never sees a line twice, and the
//! wall-clock time it arrived (`read_timed`, `tail_timed`: `cup logs -t
//! --since --until`). The ring
//! keeps at most [`RING_LINES`] lines and [`RING_BYTES`] bytes; files rotate
//! at [`FILE_BYTES`] keeping [`FILE_KEEP`] old ones; lines are cut at
//! [`MAX_LINE`] bytes. The console echo is rate-limited per unit (a unit that
//! floods must not stall the serial console); what it drops is counted and
//! reported, and still reaches the ring and the file. The echo itself goes
//! through a bounded queue to a writer thread: a serial console at 115200
//! baud drains about 11 KB/s, and a blocked console must never block the
//! capture of every service's output (their pipes would fill and stall
//! them). When the queue is full, lines are dropped from the console only,
//! and the count is reported once the console catches up.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const RING_LINES: usize = 2000;
pub const RING_BYTES: usize = 256 * 1024;
pub const FILE_BYTES: u64 = 1024 * 1024;
pub const FILE_KEEP: usize = 3;
pub const MAX_LINE: usize = 16 * 1024;
const CONSOLE_BURST: u32 = 200;
const CONSOLE_PERIOD: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct RotatingFile {
    path: PathBuf,
    file: std::fs::File,
    size: u64,
}

impl RotatingFile {
    fn open(path: PathBuf) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        let size = file.metadata()?.len();
        Ok(RotatingFile { path, file, size })
    }

    fn write_line(&mut self, line: &str) -> std::io::Result<()> {
        if self.size + line.len() as u64 + 1 > FILE_BYTES {
            self.rotate()?;
        }
        self.file.write_all(line.as_bytes())?;
        self.file.write_all(b"\n")?;
        self.size += line.len() as u64 + 1;
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        for i in (1..FILE_KEEP).rev() {
            let from = rotated(&self.path, i);
            if from.exists() {
                std::fs::rename(&from, rotated(&self.path, i + 1))?;
            }
        }
        std::fs::rename(&self.path, rotated(&self.path, 1))?;
        *self = RotatingFile::open(self.path.clone())?;
        Ok(())
    }
}

fn rotated(path: &Path, i: usize) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{i}"));
    PathBuf::from(s)
}

#[derive(Debug, Default)]
struct UnitLog {
    ring: VecDeque<Line>,
    bytes: usize,
    next: u64,
    file: Option<RotatingFile>,
    window: Option<Instant>,
    echoed: u32,
    suppressed: u64,
    /// Bytes lost: cut from overlong lines, or let go from the ring with
    /// no file to keep them.
    dropped: u64,
}

/// One line: its sequence number, when it arrived (microseconds since the
/// Unix epoch) and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub seq: u64,
    pub micros: u64,
    pub text: String,
}

impl Line {
    fn untimed(&self) -> (u64, String) {
        (self.seq, self.text.clone())
    }
}

/// Now, in microseconds since the Unix epoch.
pub fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Lines queued for the console at most; beyond that they are dropped there.
const CONSOLE_QUEUE: usize = 1024;

/// The console writer: a bounded queue and a thread that drains it.
#[derive(Debug)]
struct Console {
    tx: std::sync::mpsc::SyncSender<String>,
    dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Console {
    fn start() -> Option<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<String>(CONSOLE_QUEUE);
        let dropped = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = dropped.clone();
        std::thread::Builder::new()
            .name("console".into())
            .spawn(move || {
                for line in rx {
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "{line}");
                    let n = counter.swap(0, std::sync::atomic::Ordering::Relaxed);
                    if n > 0 {
                        let _ = writeln!(out, "[console] {n} lines dropped: the console could not keep up (they are in the units' logs)");
                    }
                    let _ = out.flush();
                }
            })
            .ok()?;
        Some(Console { tx, dropped })
    }

    fn send(&self, line: String) {
        if self.tx.try_send(line).is_err() {
            self.dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// All units' logs.
#[derive(Debug)]
pub struct LogStore {
    units: Mutex<BTreeMap<String, UnitLog>>,
    dir: Option<PathBuf>,
    console: Option<Console>,
}

impl LogStore {
    /// A store writing files into `dir` (if given and writable) and echoing
    /// to stdout (the console) if `echo`.
    pub fn new(dir: Option<PathBuf>, echo: bool) -> Self {
        let dir = dir.filter(|d| std::fs::create_dir_all(d).is_ok());
        LogStore {
            units: Mutex::new(BTreeMap::new()),
            dir,
            console: if echo { Console::start() } else { None },
        }
    }

    /// The directory holding the log files, if any.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Appends one line of `unit`'s output.
    pub fn push(&self, unit: &str, whole: &str) {
        let line = truncate(whole, MAX_LINE);
        let mut units = self.units.lock().unwrap_or_else(|p| p.into_inner());
        let log = units.entry(unit.to_string()).or_default();
        log.dropped += (whole.len() - line.len()) as u64;
        if log.file.is_none() {
            if let Some(dir) = &self.dir {
                log.file = RotatingFile::open(dir.join(format!("{unit}.log"))).ok();
            }
        }
        if let Some(f) = &mut log.file {
            if f.write_line(line).is_err() {
                log.file = None;
            }
        }
        log.bytes += line.len();
        log.ring.push_back(Line {
            seq: log.next,
            micros: now_micros(),
            text: line.to_string(),
        });
        log.next += 1;
        while log.ring.len() > RING_LINES || log.bytes > RING_BYTES {
            match log.ring.pop_front() {
                Some(l) => {
                    log.bytes -= l.text.len();
                    if log.file.is_none() {
                        log.dropped += l.text.len() as u64;
                    }
                }
                None => break,
            }
        }
        if let Some(console) = &self.console {
            let now = Instant::now();
            if log
                .window
                .is_none_or(|w| now.duration_since(w) >= CONSOLE_PERIOD)
            {
                if log.suppressed > 0 {
                    console.send(format!(
                        "[{unit}] ({} lines not shown on the console; see its log)",
                        log.suppressed
                    ));
                    log.suppressed = 0;
                }
                log.window = Some(now);
                log.echoed = 0;
            }
            if log.echoed < CONSOLE_BURST {
                log.echoed += 1;
                console.send(format!("[{unit}] {line}"));
            } else {
                log.suppressed += 1;
            }
        }
    }

    /// Lines of `unit` with sequence number `>= since`, at most `max`, and
    /// the cursor to continue from. Lines that fell out of the ring are skipped.
    pub fn read(&self, unit: &str, since: u64, max: usize) -> (Vec<(u64, String)>, u64) {
        let (lines, next) = self.read_timed(unit, since, max);
        (lines.iter().map(Line::untimed).collect(), next)
    }

    /// As [`Self::read`], each line with its time.
    pub fn read_timed(&self, unit: &str, since: u64, max: usize) -> (Vec<Line>, u64) {
        let units = self.units.lock().unwrap_or_else(|p| p.into_inner());
        let Some(log) = units.get(unit) else {
            return (Vec::new(), since);
        };
        let lines: Vec<Line> = log
            .ring
            .iter()
            .filter(|l| l.seq >= since)
            .take(max)
            .cloned()
            .collect();
        let next = lines.last().map(|l| l.seq + 1).unwrap_or(since);
        (lines, next)
    }

    /// The last `n` lines of `unit`, and the cursor after them.
    pub fn tail(&self, unit: &str, n: usize) -> (Vec<(u64, String)>, u64) {
        let (lines, next) = self.tail_timed(unit, n);
        (lines.iter().map(Line::untimed).collect(), next)
    }

    /// As [`Self::tail`], each line with its time.
    pub fn tail_timed(&self, unit: &str, n: usize) -> (Vec<Line>, u64) {
        let units = self.units.lock().unwrap_or_else(|p| p.into_inner());
        let Some(log) = units.get(unit) else {
            return (Vec::new(), 0);
        };
        let skip = log.ring.len().saturating_sub(n);
        (log.ring.iter().skip(skip).cloned().collect(), log.next)
    }

    /// Drops `unit`'s lines from memory (its files stay).
    pub fn forget(&self, unit: &str) {
        let mut units = self.units.lock().unwrap_or_else(|p| p.into_inner());
        units.remove(unit);
    }

    /// `unit`'s lines are `to`'s from now on (`cup rename`); its file is
    /// closed and the next line opens `to`'s.
    pub fn rename(&self, unit: &str, to: &str) {
        let mut units = self.units.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mut log) = units.remove(unit) {
            log.file = None;
            units.insert(to.to_string(), log);
        }
    }

    /// Bytes of each unit's output lost so far: cut from lines longer than
    /// [`MAX_LINE`], or let go from the ring with no log file to keep them.
    pub fn dropped_bytes(&self) -> Vec<(String, u64)> {
        let units = self.units.lock().unwrap_or_else(|p| p.into_inner());
        units.iter().map(|(u, l)| (u.clone(), l.dropped)).collect()
    }

    /// Bytes held in memory for `unit`.
    pub fn ring_bytes(&self, unit: &str) -> usize {
        let units = self.units.lock().unwrap_or_else(|p| p.into_inner());
        units.get(unit).map(|l| l.bytes).unwrap_or(0)
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("steelcup-logs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn ring_is_bounded_and_cursors_follow() {
        let s = LogStore::new(None, false);
        for i in 0..(RING_LINES + 500) {
            s.push("u", &format!("line {i}"));
        }
        let (all, next) = s.read("u", 0, usize::MAX);
        assert_eq!(all.len(), RING_LINES);
        assert_eq!(all[0].1, "line 500");
        assert_eq!(next, (RING_LINES + 500) as u64);
        s.push("u", "new");
        let (more, next2) = s.read("u", next, 10);
        assert_eq!(more, vec![(next, "new".to_string())]);
        assert_eq!(next2, next + 1);
        let (none, same) = s.read("u", next2, 10);
        assert!(none.is_empty());
        assert_eq!(same, next2);
        let (t, _) = s.tail("u", 2);
        assert_eq!(
            t.iter().map(|(_, l)| l.as_str()).collect::<Vec<_>>(),
            [format!("line {}", RING_LINES + 499).as_str(), "new"]
        );
    }

    #[test]
    fn long_lines_are_cut_and_bytes_bounded() {
        let s = LogStore::new(None, false);
        let big = "x".repeat(MAX_LINE * 4);
        for _ in 0..100 {
            s.push("u", &big);
        }
        assert!(s.ring_bytes("u") <= RING_BYTES);
        let (l, _) = s.read("u", 0, 1);
        assert_eq!(l[0].1.len(), MAX_LINE);
        assert_eq!(truncate("héllo", 2), "h");
        // Everything not in the ring was lost (no file): counted.
        let kept = s.ring_bytes("u") as u64;
        assert_eq!(
            s.dropped_bytes(),
            [("u".to_string(), 100 * big.len() as u64 - kept)]
        );
    }

    #[test]
    fn lines_a_file_keeps_are_not_dropped() {
        let s = LogStore::new(Some(tmp("kept")), false);
        for i in 0..(RING_LINES + 10) {
            s.push("u", &format!("line {i}"));
        }
        s.push("u", &"z".repeat(MAX_LINE + 5));
        assert_eq!(s.dropped_bytes(), [("u".to_string(), 5)]);
    }

    #[test]
    fn files_rotate() {
        let d = tmp("rotate");
        let s = LogStore::new(Some(d.clone()), false);
        let line = "y".repeat(1000);
        for _ in 0..(FILE_BYTES as usize * (FILE_KEEP + 2) / 1000) {
            s.push("svc", &line);
        }
        assert!(d.join("svc.log").exists());
        for i in 1..=FILE_KEEP {
            let p = rotated(&d.join("svc.log"), i);
            assert!(p.exists(), "{}", p.display());
            assert!(std::fs::metadata(&p).unwrap().len() <= FILE_BYTES);
        }
        assert!(!rotated(&d.join("svc.log"), FILE_KEEP + 1).exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn unknown_unit_reads_empty() {
        let s = LogStore::new(None, false);
        assert_eq!(s.read("nope", 5, 10), (Vec::new(), 5));
    }
}
