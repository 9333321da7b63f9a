//! `cup logs`: a workload's or a unit's lines, with Docker's `--tail`,
//! `--since`, `--until`, `-t` and `-f`. Both logs are read the same way,
//! through [`Source`]; every line carries the time init or vmmd got it.

use crate::cli::LogsArgs;
use crate::error::CupError;
use std::io::Write;
use std::time::Duration;
use steelcup_api::vmm1::TimedLine;

/// Where lines come from: the last `n`, or the ones from a cursor on;
/// with the cursor to go on from and whether more may come.
pub trait Source {
    fn tail(&self, n: u32) -> Result<(Vec<TimedLine>, u64, bool), CupError>;
    fn read(&self, cursor: u64) -> Result<(Vec<TimedLine>, u64, bool), CupError>;
}

/// The most lines init and vmmd answer at once (their rings hold fewer).
const ALL: u32 = 10_000;

/// Prints what `a` asks for from `src` to `out`.
pub fn show(src: &dyn Source, a: &LogsArgs, out: &mut dyn Write) -> Result<u8, CupError> {
    let windowed = a.since.is_some() || a.until.is_some();
    let inside =
        |micros: u64| a.since.is_none_or(|s| micros >= s) && a.until.is_none_or(|u| micros <= u);
    let mut print = |lines: &[TimedLine]| {
        for (_, micros, text) in lines.iter().filter(|(_, m, _)| inside(*m)) {
            let _ = if a.timestamps {
                writeln!(out, "{} {text}", stamp(*micros))
            } else {
                writeln!(out, "{text}")
            };
        }
        let _ = out.flush();
    };
    // A window is cut from the whole ring, then the last N of it kept.
    let (lines, mut cursor, _) = src.tail(if windowed { ALL } else { a.tail })?;
    let kept: Vec<TimedLine> = lines.into_iter().filter(|(_, m, _)| inside(*m)).collect();
    let skip = kept.len().saturating_sub(a.tail as usize);
    print(&kept[skip..]);
    if !a.follow {
        return Ok(0);
    }
    loop {
        if a.until.is_some_and(|u| steelcup_os::logs::now_micros() > u) {
            return Ok(0);
        }
        let (more, next, running) = src.read(cursor)?;
        if more.is_empty() {
            if !running {
                return Ok(0);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        print(&more);
        cursor = next;
    }
}

/// A line's time as `-t` prints it: RFC 3339, UTC, microseconds.
pub fn stamp(micros: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_micros(micros);
    humantime::format_rfc3339_micros(t).to_string()
}

/// `--since`/`--until` as Docker reads them: RFC 3339 (`2026-12-07T10:00:00Z`,
/// the zone optional: UTC), Unix seconds (`1765101600.5`), or a duration
/// ago (`10m`, `1h30m`); in microseconds since the Unix epoch.
pub fn parse_time(s: &str) -> Result<u64, String> {
    let now = steelcup_os::logs::now_micros();
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(now.saturating_sub(d.as_micros() as u64));
    }
    if let Ok(secs) = s.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Ok((secs * 1e6) as u64);
        }
    }
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return t
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .map_err(|_| format!("{s}: before 1970"));
    }
    Err(format!(
        "{s}: a time (2026-12-07T10:00:00Z), Unix seconds, or a duration ago (10m, 1h30m)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// A log of lines at 1 s, 2 s, ... 5 s, then one more line per read
    /// while it runs.
    struct Fake {
        lines: RefCell<Vec<TimedLine>>,
        reads: RefCell<u32>,
    }

    impl Source for Fake {
        fn tail(&self, n: u32) -> Result<(Vec<TimedLine>, u64, bool), CupError> {
            let l = self.lines.borrow();
            let skip = l.len().saturating_sub(n as usize);
            Ok((l[skip..].to_vec(), l.len() as u64, true))
        }
        fn read(&self, cursor: u64) -> Result<(Vec<TimedLine>, u64, bool), CupError> {
            let mut r = self.reads.borrow_mut();
            *r += 1;
            if *r >= 3 {
                return Ok((vec![], cursor, false));
            }
            let seq = cursor;
            let line = (seq, (seq + 1) * 1_000_000, format!("line {}", seq + 1));
            Ok((vec![line], seq + 1, true))
        }
    }

    fn fake() -> Fake {
        Fake {
            lines: RefCell::new(
                (0..5)
                    .map(|i| (i, (i + 1) * 1_000_000, format!("line {}", i + 1)))
                    .collect(),
            ),
            reads: RefCell::new(0),
        }
    }

    #[test]
    fn times_as_docker_writes_them() {
        assert_eq!(parse_time("1765101600.5"), Ok(1_765_101_600_500_000));
        assert_eq!(
            parse_time("2026-12-07T10:00:00Z"),
            Ok(1_796_637_600_000_000)
        );
        assert_eq!(parse_time("2026-12-07 10:00:00"), Ok(1_796_637_600_000_000));
        let ago = parse_time("1h30m").unwrap();
        let now = steelcup_os::logs::now_micros();
        assert!((now - ago).abs_diff(5_400_000_000) < 5_000_000);
        assert!(parse_time("yesterday")
            .unwrap_err()
            .contains("a duration ago"));
        assert!(parse_time("-5").is_err());
        assert_eq!(stamp(1_796_637_600_000_001), "2026-12-07T10:00:00.000001Z");
    }

    #[test]
    fn a_window_then_its_tail_then_following_until_it_ends() {
        let f = fake();
        let args = |since: Option<u64>, until: Option<u64>, tail: u32, follow: bool| LogsArgs {
            unit: None,
            follow,
            tail,
            since,
            until,
            timestamps: true,
            name: Some("w".into()),
        };
        let run = |a: LogsArgs| {
            let mut out = Vec::new();
            assert_eq!(show(&f, &a, &mut out).unwrap(), 0);
            String::from_utf8(out).unwrap()
        };
        // Lines at 2 s, 3 s and 4 s are inside; the last 2 of them kept.
        assert_eq!(
            run(args(Some(2_000_000), Some(4_000_000), 2, false)),
            "1970-01-01T00:00:03.000000Z line 3\n1970-01-01T00:00:04.000000Z line 4\n"
        );
        assert_eq!(*f.reads.borrow(), 0, "no follow: no read");
        let mut a = args(None, None, 1, true);
        a.timestamps = false;
        assert_eq!(run(a), "line 5\nline 6\nline 7\n");
        assert_eq!(
            *f.reads.borrow(),
            3,
            "followed until the source said it ended"
        );
    }
}
