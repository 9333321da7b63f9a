//! The kernel's log as `cup dmesg` shows it, read from `/dev/kmsg`.
//!
//! # Design
//! Each `read(2)` of `/dev/kmsg` returns one record, `PRI,SEQ,USEC,FLAGS;
//! TEXT` and continuation lines (` KEY=VALUE`, dropped here). A fresh open
//! starts at the oldest record the kernel still holds, so a read is a
//! scan of the ring (hundreds of KiB at most) keeping the records from a
//! sequence number on: `since` from the previous answer's `next` follows
//! the log without repeats. Records the kernel overwrote while we read
//! (`EPIPE`) are skipped; the scan ends where the ring does (`EAGAIN`).

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Where the kernel's log is read.
pub const KMSG: &str = "/dev/kmsg";
/// The most records one read returns.
pub const MAX_RECORDS: usize = 10_000;
/// Longer record texts are cut (the kernel's own are at most 1 KiB).
const MAX_TEXT: usize = 4096;

/// One record of the kernel's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The kernel's sequence number.
    pub seq: u64,
    /// Microseconds since boot (CLOCK_MONOTONIC).
    pub micros: u64,
    /// syslog level: 0 emergency .. 7 debug.
    pub level: u8,
    pub text: String,
}

/// Parses one record as `/dev/kmsg` gives it.
pub fn parse(record: &[u8]) -> Option<Record> {
    let text = String::from_utf8_lossy(record);
    let (head, body) = text.split_once(';')?;
    let mut fields = head.split(',');
    let pri: u32 = fields.next()?.parse().ok()?;
    let seq: u64 = fields.next()?.parse().ok()?;
    let micros: u64 = fields.next()?.parse().ok()?;
    let line = body.split('\n').next().unwrap_or_default();
    let mut end = line.len().min(MAX_TEXT);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    Some(Record {
        seq,
        micros,
        level: (pri & 7) as u8,
        text: line[..end].to_string(),
    })
}

/// The last `max` records (at most [`MAX_RECORDS`]) with a sequence
/// number of at least `since`, and the number to ask from next time.
pub fn read(path: &Path, since: u64, max: usize) -> std::io::Result<(Vec<Record>, u64)> {
    let max = max.min(MAX_RECORDS);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let mut out = std::collections::VecDeque::new();
    let mut next = since;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let Some(r) = parse(&buf[..n]) else { continue };
                next = next.max(r.seq + 1);
                if r.seq >= since {
                    if out.len() == max {
                        out.pop_front();
                    }
                    if max > 0 {
                        out.push_back(r);
                    }
                }
            }
            // Overwritten while we read: the next read goes on after it.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok((out.into(), next))
}

/// `[    5.123456] text`, as dmesg prints a record.
pub fn format(r: &Record) -> String {
    format!(
        "[{:5}.{:06}] {}",
        r.micros / 1_000_000,
        r.micros % 1_000_000,
        r.text
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_as_the_kernel_writes_them() {
        let r = parse(b"6,339,5140900,-;NET: Registered protocol family 10\n SUBSYSTEM=net\n DEVICE=+net:lo\n")
            .unwrap();
        assert_eq!(
            r,
            Record {
                seq: 339,
                micros: 5_140_900,
                level: 6,
                text: "NET: Registered protocol family 10".into()
            }
        );
        assert_eq!(
            format(&r),
            "[    5.140900] NET: Registered protocol family 10"
        );
        // Facility bits above the level (a user-space writer's, 14 = user.info).
        assert_eq!(parse(b"14,2,3,c;init: hello\n").unwrap().level, 6);
        // A semicolon in the text stays in the text.
        assert_eq!(parse(b"4,1,2,-;a;b\n").unwrap().text, "a;b");
        for bad in [&b"no header"[..], b"x,1,2,-;t", b"6,1;t", b""] {
            assert_eq!(parse(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
        let long = format!("6,1,2,-;{}\n", "é".repeat(MAX_TEXT));
        assert!(parse(long.as_bytes()).unwrap().text.len() <= MAX_TEXT);
    }

    #[test]
    fn reads_the_machines_log_from_a_sequence_number_on() {
        let p = Path::new(KMSG);
        let Ok((all, next)) = read(p, 0, MAX_RECORDS) else {
            eprintln!("SKIP: {KMSG} cannot be read here (not root, or no such device); the QEMU quick-start test reads the appliance's");
            return;
        };
        if all.is_empty() {
            eprintln!("SKIP: {KMSG} holds no record here");
            return;
        }
        assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
        assert!(next > all.last().unwrap().seq);
        let last = all.last().unwrap().seq;
        let (tail, _) = read(p, 0, 2).unwrap();
        assert!(tail.len() <= 2 && tail.last().unwrap().seq >= last);
        let (from, _) = read(p, last, MAX_RECORDS).unwrap();
        assert!(from.first().is_some_and(|r| r.seq == last), "{from:?}");
    }
}
