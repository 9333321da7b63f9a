//! The guest control protocol: what vmmd asks a guest's vminit over vsock,
//! and what vminit answers.
//!
//! # Design
//! One request per connection, one JSON line each way: vmmd connects to
//! the guest's [`CONTROL_PORT`] (or, for a warm VM, the pool port) and
//! writes a [`GuestRequest`]; vminit checks it ([`GuestRequest::check`])
//! and writes a [`GuestAnswer`]. Both sides compile against these types,
//! so a request the other side cannot read fails the build, not a guest.
//!
//! # Limitations
//! A request line is at most [`MAX_REQUEST`] bytes; a claim carries the
//! whole guest config, so it has its own, larger bound on the pool port.

use crate::guest::GuestConfig;
use crate::probe::Probe;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The vsock port vminit answers control requests on.
pub const CONTROL_PORT: u32 = 1024;

/// The longest request line vminit reads on [`CONTROL_PORT`].
pub const MAX_REQUEST: u64 = 2048;

/// The longest health probe timeout.
pub const MAX_PROBE_SECS: u64 = 600;

/// A request from vmmd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "kebab-case", deny_unknown_fields)]
pub enum GuestRequest {
    // Empty struct variants, not unit ones, so an unknown field is
    // refused (serde lets a unit variant of a tagged enum ignore them).
    /// SIGTERM to the workload's process group; vmmd kills the VM if it
    /// does not end in time.
    Stop {},
    /// Signal `signal` to the workload's process group.
    Kill { signal: i32 },
    /// Is vminit there? (A warm VM, waiting in the pool.)
    Ping {},
    /// A health probe, run on the guest's loopback within `timeout_secs`.
    Probe { probe: Probe, timeout_secs: u64 },
    /// A warm VM's workload config: the VM becomes this workload.
    Claim { config: Box<GuestConfig> },
    /// The guest's processes (`cup top`), answered with
    /// [`GuestAnswer::Processes`].
    Processes {},
}

/// vminit's answer to a [`GuestRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "kebab-case", deny_unknown_fields)]
pub enum GuestAnswer {
    /// The request was carried out (stop asked, signal sent, pong, the
    /// probe passed, the claim taken).
    Done {},
    /// The health probe ran and failed.
    Failed { reason: String },
    /// The request was not understood or not allowed here.
    Refused { reason: String },
    /// The answer to [`GuestRequest::Processes`].
    Processes {
        processes: Vec<crate::processes::GuestProcess>,
    },
}

impl GuestRequest {
    /// A probe request with `timeout` (whole seconds, at least one).
    pub fn probe(probe: Probe, timeout: Duration) -> GuestRequest {
        GuestRequest::Probe {
            probe,
            timeout_secs: timeout.as_secs().clamp(1, MAX_PROBE_SECS),
        }
    }

    /// The request as it goes on the wire: JSON and a newline.
    pub fn line(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_default();
        s.push('\n');
        s
    }

    /// Reads a request line and checks what serde cannot: a signal number
    /// in range, a probe's port, path and timeout.
    pub fn parse(line: &str) -> Result<GuestRequest, String> {
        let r: GuestRequest =
            serde_json::from_str(line.trim_end()).map_err(|e| format!("not a request: {e}"))?;
        r.check()?;
        Ok(r)
    }

    /// See [`GuestRequest::parse`].
    pub fn check(&self) -> Result<(), String> {
        match self {
            GuestRequest::Kill { signal } if !(1..=64).contains(signal) => {
                Err(format!("{signal} is not a signal"))
            }
            GuestRequest::Probe {
                probe,
                timeout_secs,
            } => {
                if !(1..=MAX_PROBE_SECS).contains(timeout_secs) {
                    return Err(format!(
                        "a probe's timeout is 1 to {MAX_PROBE_SECS} s, not {timeout_secs}"
                    ));
                }
                probe.check()
            }
            GuestRequest::Claim { config } if config.pool => {
                Err("a claim must not be a pool config".into())
            }
            _ => Ok(()),
        }
    }
}

impl GuestAnswer {
    /// The answer as it goes on the wire: JSON and a newline.
    pub fn line(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_default();
        s.push('\n');
        s
    }

    /// Reads an answer line; Ok for [`GuestAnswer::Done`], why not
    /// otherwise.
    pub fn parse(line: &str) -> Result<(), AnswerError> {
        match serde_json::from_str::<GuestAnswer>(line.trim_end()) {
            Ok(GuestAnswer::Done {}) => Ok(()),
            Ok(GuestAnswer::Failed { reason }) => Err(AnswerError::Failed(reason)),
            Ok(GuestAnswer::Refused { reason }) => Err(AnswerError::Refused(reason)),
            Ok(GuestAnswer::Processes { .. }) => Err(AnswerError::Refused(
                "a process list where done or not was asked".into(),
            )),
            Err(e) => Err(AnswerError::Garbled(e)),
        }
    }
}

/// A guest's answer other than done.
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    /// vminit tried and failed (a probe that failed says why).
    #[error("{0}")]
    Failed(String),
    /// vminit would not do it (a bad request, a claim of a VM that is no
    /// pool VM).
    #[error("refused: {0}")]
    Refused(String),
    #[error("an answer that is not one: {0}")]
    Garbled(serde_json::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_bad_ones_are_refused() {
        let t = Duration::from_secs(3);
        for r in [
            GuestRequest::Stop {},
            GuestRequest::Ping {},
            GuestRequest::Kill { signal: 15 },
            GuestRequest::probe(Probe::Tcp(80), t),
            GuestRequest::probe(Probe::Http(8080, "/healthz?x=1".into()), t),
        ] {
            let line = r.line();
            assert_eq!(line.matches('\n').count(), 1, "{line}");
            assert_eq!(GuestRequest::parse(&line), Ok(r));
        }
        for bad in [
            r#"{"request":"stop","now":true}"#,
            r#"{"request":"reboot"}"#,
            r#"{"request":"kill","signal":0}"#,
            r#"{"request":"kill","signal":65}"#,
            r#"{"request":"kill"}"#,
            r#"{"request":"probe","probe":{"tcp":0},"timeout_secs":3}"#,
            r#"{"request":"probe","probe":{"tcp":80},"timeout_secs":0}"#,
            r#"{"request":"probe","probe":{"tcp":80},"timeout_secs":601}"#,
            r#"{"request":"probe","probe":{"tcp":70000},"timeout_secs":3}"#,
            r#"{"request":"probe","probe":{"http":[80,"nope"]},"timeout_secs":3}"#,
            r#"{"request":"probe","probe":{"udp":53},"timeout_secs":3}"#,
            "stop",
            "",
        ] {
            assert!(GuestRequest::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_long_probe_timeout_is_capped_and_a_short_one_raised() {
        let r = GuestRequest::probe(Probe::Tcp(80), Duration::from_secs(3600));
        assert!(r.check().is_ok());
        let r = GuestRequest::probe(Probe::Tcp(80), Duration::from_millis(10));
        assert_eq!(
            r,
            GuestRequest::Probe {
                probe: Probe::Tcp(80),
                timeout_secs: 1
            }
        );
    }

    #[test]
    fn answers_say_done_or_why_not() {
        assert!(GuestAnswer::parse(&GuestAnswer::Done {}.line()).is_ok());
        let failed = GuestAnswer::Failed {
            reason: "connect to port 80: refused".into(),
        };
        assert!(matches!(
            GuestAnswer::parse(&failed.line()),
            Err(AnswerError::Failed(r)) if r == "connect to port 80: refused"
        ));
        let refused = GuestAnswer::Refused {
            reason: "not a pool VM".into(),
        };
        assert_eq!(
            GuestAnswer::parse(&refused.line()).unwrap_err().to_string(),
            "refused: not a pool VM"
        );
        assert!(matches!(
            GuestAnswer::parse("pong"),
            Err(AnswerError::Garbled(_))
        ));
    }
}
