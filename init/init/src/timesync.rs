//! `init time-sync`: the `time-sync` unit, which keeps the clock right
//! from NTP servers.
//!
//! # Design
//! An SNTP client (RFC 5905's client side, by `rsntp`) asks the servers
//! of `/etc/steelcup/time.toml` (the machine config's `[time]`; without
//! it, those a DHCP server offered, else public pools) in order until one
//! answers. The first answer steps
//! the clock (`clock_settime`) and so does any later one off by more than
//! [`STEP_LIMIT`]; smaller offsets are slewed (`adjtime`), so the clock
//! never jumps while things run. After each answer the kernel's clock is
//! marked synchronized with the answer's error bound (`adjtimex`: what
//! `cup health` reads), and after a step the hardware clock (RTC) is set,
//! so the next boot starts near the right time. Answers are asked for
//! every [`POLL_MIN`], doubling to [`POLL_MAX`] while the clock stays
//! close; failures are retried from 2 s, doubling.
//!
//! The unit is `ready = "notify"`: `READY=1` goes out at the first answer,
//! or after `wait` seconds without one, so units with `after =
//! ["time-sync"]` start with the right time when a server can give it and
//! an offline machine still boots. What happened last is in
//! `/run/steelcup/time.json`.

use std::time::{Duration, Instant};
use steelcup_os::time::{TimeConfig, TimeState, CONFIG, DHCP_SERVERS, STATE};

/// Offsets beyond this step the clock; smaller ones are slewed.
pub const STEP_LIMIT: f64 = 0.128;
const POLL_MIN: Duration = Duration::from_secs(64);
const POLL_MAX: Duration = Duration::from_secs(1024);
const RETRY_MAX: Duration = Duration::from_secs(64);
/// How long one server may take to answer.
const QUERY_TIMEOUT: Duration = Duration::from_secs(3);

/// What went wrong asking a server or setting the clock.
#[derive(Debug, thiserror::Error)]
pub enum TimeError {
    #[error("{server}: {source}")]
    Query {
        server: String,
        source: rsntp::SynchronizationError,
    },
    /// A clock call failed: what it was for, and the system's error.
    #[error("{what}: {source}")]
    Clock {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("the time has no calendar date")]
    NoDate,
}

fn clock_err(what: &'static str) -> impl Fn(nix::errno::Errno) -> TimeError {
    move |e| TimeError::Clock {
        what,
        source: e.into(),
    }
}

fn last_os_error(what: &'static str) -> TimeError {
    TimeError::Clock {
        what,
        source: std::io::Error::last_os_error(),
    }
}

/// One answer: how far off the clock is (seconds; positive: behind) and
/// the round trip.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub offset: f64,
    pub delay: f64,
}

/// Asks `server` (`HOST[:PORT]`, port 123 if none).
pub fn query(server: &str) -> Result<Sample, TimeError> {
    let mut client = rsntp::SntpClient::new();
    client.set_timeout(QUERY_TIMEOUT);
    let addr = if server.contains(':') && !server.ends_with(']') {
        server.to_string()
    } else {
        format!("{server}:123")
    };
    let r = client
        .synchronize(addr.as_str())
        .map_err(|source| TimeError::Query {
            server: server.to_string(),
            source,
        })?;
    Ok(Sample {
        offset: r.clock_offset().as_secs_f64(),
        delay: r.round_trip_delay().as_secs_f64(),
    })
}

fn now_realtime() -> Result<libc::timespec, TimeError> {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME)
        .map(|t| *t.as_ref())
        .map_err(clock_err("read the clock"))
}

/// Moves the clock by `offset` seconds at once.
fn step(offset: f64) -> Result<(), TimeError> {
    let now = now_realtime()?;
    let ns = now.tv_sec as i128 * 1_000_000_000 + now.tv_nsec as i128 + (offset * 1e9) as i128;
    let t = nix::sys::time::TimeSpec::new(
        (ns.div_euclid(1_000_000_000)) as libc::time_t,
        (ns.rem_euclid(1_000_000_000)) as libc::c_long,
    );
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, t)
        .map_err(clock_err("set the clock"))
}

/// Has the kernel move the clock by `offset` seconds gradually.
fn slew(offset: f64) -> Result<(), TimeError> {
    let micros = (offset * 1e6) as i64;
    let delta = libc::timeval {
        tv_sec: micros.div_euclid(1_000_000) as libc::time_t,
        tv_usec: micros.rem_euclid(1_000_000) as libc::suseconds_t,
    };
    // SAFETY: adjtime reads `delta` and writes nothing (a null old delta).
    match unsafe { libc::adjtime(&delta, std::ptr::null_mut()) } {
        0 => Ok(()),
        _ => Err(last_os_error("slew the clock")),
    }
}

/// Marks the kernel's clock synchronized, to within `error` seconds.
fn mark_synchronized(error: f64) -> Result<(), TimeError> {
    // SAFETY: timex is plain integers, for which all zeroes is a value.
    let mut t: libc::timex = unsafe { std::mem::zeroed() };
    // SAFETY: with modes 0 adjtimex only fills in the struct it is given.
    if unsafe { libc::adjtimex(&mut t) } < 0 {
        return Err(last_os_error("read the clock's state"));
    }
    let micros = ((error * 1e6) as libc::c_long).clamp(1, 16_000_000);
    t.modes = libc::ADJ_STATUS | libc::ADJ_MAXERROR | libc::ADJ_ESTERROR;
    t.status &= !libc::STA_UNSYNC;
    t.maxerror = micros;
    t.esterror = micros;
    // SAFETY: as above; the modes say which fields the kernel takes.
    match unsafe { libc::adjtimex(&mut t) } {
        r if r >= 0 => Ok(()),
        _ => Err(last_os_error("mark the clock synchronized")),
    }
}

/// `struct rtc_time` of `<linux/rtc.h>` (as `struct tm`'s first nine).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct RtcTime {
    tm_sec: libc::c_int,
    tm_min: libc::c_int,
    tm_hour: libc::c_int,
    tm_mday: libc::c_int,
    tm_mon: libc::c_int,
    tm_year: libc::c_int,
    tm_wday: libc::c_int,
    tm_yday: libc::c_int,
    tm_isdst: libc::c_int,
}

nix::ioctl_write_ptr!(rtc_set_time, b'p', 0x0a, RtcTime);

/// Sets the hardware clock (kept in UTC) to the system clock.
fn set_rtc() -> Result<(), TimeError> {
    let now = now_realtime()?;
    // SAFETY: tm is plain integers; gmtime_r fills it from `now.tv_sec`.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call.
    if unsafe { libc::gmtime_r(&now.tv_sec, &mut tm) }.is_null() {
        return Err(TimeError::NoDate);
    }
    let rtc = RtcTime {
        tm_sec: tm.tm_sec,
        tm_min: tm.tm_min,
        tm_hour: tm.tm_hour,
        tm_mday: tm.tm_mday,
        tm_mon: tm.tm_mon,
        tm_year: tm.tm_year,
        tm_wday: tm.tm_wday,
        tm_yday: tm.tm_yday,
        tm_isdst: 0,
    };
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/rtc0")
        .map_err(|source| TimeError::Clock {
            what: "open /dev/rtc0",
            source,
        })?;
    // SAFETY: RTC_SET_TIME reads one rtc_time, which lives for the call.
    unsafe { rtc_set_time(std::os::fd::AsRawFd::as_raw_fd(&f), &rtc) }
        .map(|_| ())
        .map_err(clock_err("set the hardware clock (/dev/rtc0)"))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn save(state: &TimeState) {
    let path = std::path::Path::new(STATE);
    if let Some(d) = path.parent() {
        let _ = std::fs::create_dir_all(d);
    }
    if let Ok(json) = serde_json::to_vec(state) {
        let tmp = path.with_extension("json.tmp");
        if std::fs::write(&tmp, json).is_ok() {
            let _ = std::fs::rename(&tmp, path);
        }
    }
}

/// Acts on one answer: steps or slews, marks the clock synchronized.
fn correct(sample: Sample, first: bool, state: &mut TimeState, server: &str) {
    let stepped = first || sample.offset.abs() >= STEP_LIMIT;
    let done = if stepped {
        step(sample.offset)
    } else {
        slew(sample.offset)
    };
    match done {
        Ok(()) if stepped => {
            state.steps += 1;
            tracing::info!(
                "time: stepped the clock by {:+.3}s from {server} (round trip {:.1} ms)",
                sample.offset,
                sample.delay * 1e3
            );
            if let Err(e) = set_rtc() {
                tracing::warn!("time: the hardware clock was not set: {e}");
            }
        }
        Ok(()) => tracing::debug!("time: slewing {:+.1} ms from {server}", sample.offset * 1e3),
        Err(e) => {
            tracing::error!("time: {e}");
            state.error = e.to_string();
            return;
        }
    }
    if let Err(e) = mark_synchronized(sample.delay / 2.0 + 0.001) {
        tracing::warn!("time: {e}");
    }
    state.synchronized = true;
    state.server = server.to_string();
    state.offset_ms = sample.offset * 1e3;
    state.delay_ms = sample.delay * 1e3;
    state.last_sync_unix = unix_now();
    state.error.clear();
}

/// The unit's main loop; returns only when time sync is off.
pub fn run() -> i32 {
    let config = match TimeConfig::load(
        std::path::Path::new(CONFIG),
        std::path::Path::new(DHCP_SERVERS),
    ) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("time: {e}");
            return 1;
        }
    };
    if config.servers.is_empty() {
        tracing::info!("time: no servers configured: time sync is off");
        steelcup_sys::notify_ready("time-sync");
        return 0;
    }
    tracing::info!("time: servers {}", config.servers.join(", "));
    let wait = Duration::from_secs(u64::from(config.wait));
    let started = Instant::now();
    let _ = std::thread::Builder::new()
        .name("time-wait".into())
        .spawn(move || {
            std::thread::sleep(wait);
            steelcup_sys::notify_ready("time-sync");
        });
    let mut state = TimeState::default();
    let (mut poll, mut retry) = (POLL_MIN, Duration::from_secs(2));
    loop {
        let mut answered = false;
        for server in &config.servers {
            match query(server) {
                Ok(sample) => {
                    let first = !state.synchronized;
                    correct(sample, first, &mut state, server);
                    // After a step, ask again: the offset kept is what
                    // is left (and the step is checked).
                    if state.synchronized && (first || sample.offset.abs() >= STEP_LIMIT) {
                        if let Ok(after) = query(server) {
                            correct(after, false, &mut state, server);
                        }
                    }
                    if first {
                        steelcup_sys::notify_ready("time-sync");
                        if started.elapsed() > wait {
                            tracing::info!(
                                "time: synchronized after {:.0}s",
                                started.elapsed().as_secs_f64()
                            );
                        }
                    }
                    // Close: ask less often; far: as often as at first.
                    poll = if sample.offset.abs() < 0.01 {
                        (poll * 2).min(POLL_MAX)
                    } else {
                        POLL_MIN
                    };
                    answered = true;
                    break;
                }
                Err(e) => {
                    tracing::debug!("time: {e}");
                    state.error = e.to_string();
                }
            }
        }
        save(&state);
        if answered {
            retry = Duration::from_secs(2);
            std::thread::sleep(poll);
        } else {
            if retry == Duration::from_secs(2) {
                tracing::warn!("time: no server answered ({}); trying again", state.error);
            }
            std::thread::sleep(retry);
            retry = (retry * 2).min(RETRY_MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A UDP server on loopback that answers one SNTP request as a server
    /// whose clock is `ahead` seconds ahead of ours.
    fn fake_server(ahead: f64) -> String {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let mut buf = [0u8; 128];
            let (n, from) = sock.recv_from(&mut buf).unwrap();
            assert!(n >= 48);
            let ntp_now = || {
                let d = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs_f64()
                    + ahead
                    + 2_208_988_800.0;
                let secs = d.floor();
                (((secs as u64) << 32) | ((d - secs) * 4_294_967_296.0) as u64).to_be_bytes()
            };
            let mut reply = [0u8; 48];
            reply[0] = 0x24; // no leap warning, version 4, server
            reply[1] = 2; // stratum
            reply[3] = 0xec; // precision
            reply[12..16].copy_from_slice(b"TEST");
            reply[16..24].copy_from_slice(&ntp_now()); // reference
            reply[24..32].copy_from_slice(&buf[40..48]); // origin: their transmit
            reply[32..40].copy_from_slice(&ntp_now()); // receive
            reply[40..48].copy_from_slice(&ntp_now()); // transmit
            sock.send_to(&reply, from).unwrap();
        });
        addr
    }

    #[test]
    fn an_answer_says_how_far_off_the_clock_is() {
        let s = query(&fake_server(3600.0)).unwrap();
        assert!((s.offset - 3600.0).abs() < 0.5, "{s:?}");
        assert!(s.delay >= 0.0 && s.delay < 1.0, "{s:?}");
        let s = query(&fake_server(-2.5)).unwrap();
        assert!((s.offset + 2.5).abs() < 0.5, "{s:?}");
        // Nobody there: an error naming the server, within the timeout.
        let t = Instant::now();
        let e = query("127.0.0.1:9").unwrap_err();
        assert!(
            matches!(&e, TimeError::Query { server, .. } if server == "127.0.0.1:9"),
            "{e}"
        );
        assert!(t.elapsed() < QUERY_TIMEOUT + Duration::from_secs(2));
    }
}
