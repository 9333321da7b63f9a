//! Talking to a guest's vminit over its vsock socket: control requests
//! (stop, kill, ping, claim) and health probes.

use super::*;

/// Runs a health check inside the VM behind `uds`.
pub(super) fn probe(uds: &Path, check: &HealthCheck) -> Result<(), ProbeFailure> {
    use steelcup_proto::probe::Probe;
    let timeout = Duration::from_secs(u64::from(check.timeout));
    let failed = |e: GuestError| ProbeFailure {
        message: steelcup_sys::error_chain(&e),
        unreachable: false,
    };
    let unreachable = |e: steelcup_api::ClientError| ProbeFailure {
        message: e.into(),
        unreachable: true,
    };
    let p = match (check.tcp, check.http) {
        (Some(port), _) => Probe::Tcp(port),
        (None, Some(port)) => Probe::Http(port, check.path.clone()),
        (None, None) => {
            let conn = steelcup_api::attach::connect(uds, steelcup_proto::stdio::EXEC_PORT)
                .map_err(unreachable)?;
            return probe_command(conn, &check.command, timeout).map_err(failed);
        }
    };
    let conn = steelcup_api::attach::connect(uds, CONTROL_PORT).map_err(unreachable)?;
    let request = GuestRequest::probe(p, timeout);
    request_on(conn, &request, timeout + Duration::from_secs(2)).map_err(failed)
}

/// Runs `argv` inside the VM as `cup exec` does; Ok when it exits 0.
pub(super) fn probe_command(
    conn: std::os::unix::net::UnixStream,
    argv: &[String],
    timeout: Duration,
) -> Result<(), GuestError> {
    use steelcup_proto::stdio::{read_frame, ExecRequest, EXIT, STDIN_EOF};
    let request = ExecRequest {
        argv: argv.to_vec(),
        env: BTreeMap::new(),
        workdir: None,
        user: None,
        tty: false,
        detach: false,
    };
    let mut conn = steelcup_api::attach::send_exec(conn, &request)?;
    conn.set_read_timeout(Some(timeout))
        .map_err(GuestError::io("set a read timeout"))?;
    let _ = steelcup_proto::stdio::write_frame(&mut conn, STDIN_EOF, b"");
    let deadline = Instant::now() + timeout;
    let mut r = BufReader::new(conn);
    loop {
        if Instant::now() > deadline {
            return Err(GuestError::TimedOut {
                argv: argv.to_vec(),
                secs: timeout.as_secs(),
            });
        }
        match read_frame(&mut r) {
            Ok(Some((EXIT, d))) => {
                let status: steelcup_proto::guest::ExitStatus =
                    serde_json::from_slice(&d).map_err(GuestError::BadStatus)?;
                return match steelcup_api::attach::exit_code(status) {
                    0 => Ok(()),
                    code => Err(GuestError::Exited {
                        argv: argv.to_vec(),
                        code: i32::from(code),
                    }),
                };
            }
            Ok(Some(_)) => {}
            Ok(None) => return Err(GuestError::Closed),
            Err(source) => {
                return Err(GuestError::Io {
                    what: "read the command's output",
                    source,
                })
            }
        }
    }
}

/// Asks workload `name`'s vminit, over its vsock socket `uds`, to stop,
/// and logs the answer.
pub(super) fn ask_to_stop(uds: &Path, name: &str) {
    match ask_guest(uds, CONTROL_PORT, &GuestRequest::Stop {}) {
        Ok(()) => tracing::info!("workload {name}: asked to stop; guest: stopping"),
        Err(e) => tracing::warn!("workload {name}: cannot ask the guest to stop: {e}"),
    }
}

/// The host side of workload `name`'s vsock device.
pub fn vsock_path(opts: &Options, name: &str) -> PathBuf {
    opts.run_dir.join("vsock").join(format!("{name}.sock"))
}

/// Sends `request` to a guest's vsock `port` through the VM's Unix socket
/// and reads vminit's answer: Ok when it carried the request out.
pub fn ask_guest(uds: &Path, port: u32, request: &GuestRequest) -> Result<(), GuestError> {
    let conn = steelcup_api::attach::connect(uds, port)?;
    request_on(conn, request, Duration::from_secs(2))
}

/// Sends `request` on a connection to the guest and reads its answer,
/// waiting up to `patience`.
pub(super) fn request_on(
    mut s: std::os::unix::net::UnixStream,
    request: &GuestRequest,
    patience: Duration,
) -> Result<(), GuestError> {
    s.set_read_timeout(Some(patience))
        .and_then(|()| s.set_write_timeout(Some(Duration::from_secs(2))))
        .map_err(GuestError::io("set the connection's timeouts"))?;
    s.write_all(request.line().as_bytes())
        .map_err(GuestError::io("send the request"))?;
    let mut line = String::new();
    BufReader::new(s.take(MAX_ANSWER))
        .read_line(&mut line)
        .map_err(GuestError::io("no answer from the guest"))?;
    if line.is_empty() {
        return Err(GuestError::Closed);
    }
    Ok(GuestAnswer::parse(&line)?)
}

/// The longest answer read from a guest (a failed probe's reason).
pub(super) const MAX_ANSWER: u64 = 4096;
