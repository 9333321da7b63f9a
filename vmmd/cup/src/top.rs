//! `cup top NAME`: the processes inside a running microVM, as `docker
//! top` lists a container's. The host cannot see a guest's process table:
//! cup asks the guest's vminit over vsock (its control port), which reads
//! its own `/proc`.

use crate::error::CupError;
use std::io::{BufRead, BufReader, Read, Write};
use std::time::Duration;
use steelcup_api::vmm1::Vmm1ClientProxy;
use steelcup_proto::control::{GuestAnswer, GuestRequest, CONTROL_PORT};
use steelcup_proto::processes::{GuestProcess, MAX_ANSWER};

pub fn top(p: &Vmm1ClientProxy<'static>, name: &str) -> Result<u8, CupError> {
    let uds = p.socket(name)?;
    let fail = |why: String| CupError::Workload {
        name: name.to_string(),
        why,
    };
    let mut conn = steelcup_api::attach::connect(std::path::Path::new(&uds), CONTROL_PORT)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .and_then(|()| conn.write_all(GuestRequest::Processes {}.line().as_bytes()))
        .map_err(|e| fail(format!("asking its guest for processes: {e}")))?;
    let mut line = String::new();
    BufReader::new(conn.take(MAX_ANSWER))
        .read_line(&mut line)
        .map_err(|e| fail(format!("no answer from its guest: {e}")))?;
    match serde_json::from_str::<GuestAnswer>(line.trim_end()) {
        Ok(GuestAnswer::Processes { processes }) => {
            print!("{}", table(&processes));
            Ok(0)
        }
        Ok(GuestAnswer::Refused { reason } | GuestAnswer::Failed { reason }) => Err(fail(reason)),
        Ok(other) => Err(fail(format!("its guest answered {other:?}"))),
        Err(e) if line.is_empty() => Err(fail(format!("its guest closed the connection ({e})"))),
        Err(e) => Err(fail(format!("an answer cup cannot read: {e}"))),
    }
}

/// `ps -ef`'s columns that a guest can tell: UID PID PPID STAT RSS TIME CMD.
fn table(ps: &[GuestProcess]) -> String {
    let mut out = format!(
        "{:<6} {:>7} {:>7} {:<4} {:>9} {:>9}  CMD\n",
        "UID", "PID", "PPID", "STAT", "RSS", "TIME"
    );
    for p in ps {
        let secs = p.cpu_centis / 100;
        out.push_str(&format!(
            "{:<6} {:>7} {:>7} {:<4} {:>8}K {:>3}:{:02}:{:02}  {}\n",
            p.uid,
            p.pid,
            p.ppid,
            p.state,
            p.rss_kib,
            secs / 3600,
            secs / 60 % 60,
            secs % 60,
            p.cmd
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_table_like_ps() {
        let t = table(&[GuestProcess {
            pid: 1,
            ppid: 0,
            uid: 0,
            cpu_centis: 366_100,
            rss_kib: 1234,
            state: "S".into(),
            cmd: "/init".into(),
        }]);
        let mut lines = t.lines();
        assert!(lines.next().unwrap().starts_with("UID"));
        assert_eq!(
            lines.next().unwrap().split_whitespace().collect::<Vec<_>>(),
            ["0", "1", "0", "S", "1234K", "1:01:01", "/init"]
        );
    }
}
