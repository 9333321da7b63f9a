//! The machine itself, as an operator looks at it: `cup dmesg`, `cup
//! health`, `cup support-bundle`.

use crate::cli::DmesgArgs;
use crate::error::CupError;
use steelcup_api::init1::Init1Proxy;
use steelcup_api::vmm1::Vmm1ClientProxy;

/// How often `cup dmesg -w` asks for new records.
const FOLLOW_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// A record of `KernelLog` as dmesg prints it.
fn kernel_line(r: &(u64, u64, u8, String)) -> String {
    steelcup_os::kmsg::format(&steelcup_os::kmsg::Record {
        seq: r.0,
        micros: r.1,
        level: r.2,
        text: r.3.clone(),
    })
}

/// `cup dmesg [-w] [-n N] [-l LEVELS]`.
pub fn dmesg(p: &Init1Proxy<'static>, a: &DmesgArgs) -> Result<u8, CupError> {
    let shown = |r: &(u64, u64, u8, String)| a.level.is_empty() || a.level.contains(&r.2);
    let print = |records: &[(u64, u64, u8, String)]| {
        for r in records.iter().filter(|r| shown(r)) {
            println!("{}", kernel_line(r));
        }
    };
    let (records, mut next) = p.kernel_log(0, steelcup_os::kmsg::MAX_RECORDS as u32)?;
    let kept: Vec<_> = records.into_iter().filter(|r| shown(r)).collect();
    let from = kept
        .len()
        .saturating_sub(a.tail.map_or(usize::MAX, |n| n as usize));
    print(&kept[from..]);
    if !a.follow {
        return Ok(0);
    }
    loop {
        std::thread::sleep(FOLLOW_EVERY);
        let (records, n) = p.kernel_log(next, steelcup_os::kmsg::MAX_RECORDS as u32)?;
        print(&records);
        next = n;
    }
}

/// How a subsystem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
}

impl Verdict {
    fn word(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        }
    }
}

/// One line of `cup health`.
#[derive(Debug, Clone)]
pub struct Check {
    pub what: &'static str,
    pub verdict: Verdict,
    pub said: String,
}

fn check(what: &'static str, verdict: Verdict, said: String) -> Check {
    Check {
        what,
        verdict,
        said,
    }
}

/// Every subsystem's line: host, units, vmmd, network, time, disk, update.
pub fn checks(
    p: &Init1Proxy<'static>,
    vmmd: &Result<Vmm1ClientProxy<'static>, CupError>,
) -> Vec<Check> {
    let mut out = Vec::new();
    let host = match p.host_status() {
        Ok(h) => h,
        Err(e) => {
            out.push(check(
                "host",
                Verdict::Fail,
                format!("init did not answer: {e}"),
            ));
            return out;
        }
    };
    let mem_free = host.memory_available as f64 / host.memory_total.max(1) as f64;
    out.push(check(
        "host",
        if mem_free < 0.05 {
            Verdict::Warn
        } else {
            Verdict::Ok
        },
        format!(
            "{} (Linux {}), up {}, load {}, memory {} of {} available",
            host.hostname,
            host.kernel,
            humantime::format_duration(std::time::Duration::from_secs(host.uptime_secs)),
            host.load
                .iter()
                .map(|l| format!("{l:.2}"))
                .collect::<Vec<_>>()
                .join(" "),
            steelcup_api::human(host.memory_available),
            steelcup_api::human(host.memory_total)
        ),
    ));
    match p.list_units() {
        Ok(units) => {
            let failed: Vec<String> = units
                .iter()
                .filter(|u| u.state == "failed" || u.state == "refused")
                .map(|u| format!("{} ({})", u.name, u.reason))
                .collect();
            let running = units.iter().filter(|u| u.state == "running").count();
            out.push(match failed.is_empty() {
                true => check(
                    "units",
                    Verdict::Ok,
                    format!("{running} running, none failed"),
                ),
                false => check(
                    "units",
                    Verdict::Fail,
                    format!("{running} running; failed: {}", failed.join(", ")),
                ),
            });
        }
        Err(e) => out.push(check("units", Verdict::Fail, e.to_string())),
    }
    let vms = match vmmd {
        Ok(v) => v.list().map_err(CupError::from),
        Err(e) => Err(CupError::Usage(e.to_string())),
    };
    match vms {
        Ok(vms) => {
            let running = vms.iter().filter(|v| v.state == "running").count();
            let troubled: Vec<String> = vms
                .iter()
                .filter(|v| {
                    v.health == "unhealthy"
                        || v.state == "waiting"
                        || (v.state == "ended" && !v.unit.is_empty() && v.exit_code != 0)
                })
                .map(|v| match v.last_outcome.is_empty() {
                    true => format!("{} ({})", v.name, v.state),
                    false => format!("{} ({}: {})", v.name, v.state, v.last_outcome),
                })
                .collect();
            out.push(match troubled.is_empty() {
                true => check(
                    "vmmd",
                    Verdict::Ok,
                    format!("{running} microVMs running of {}", vms.len()),
                ),
                false => check(
                    "vmmd",
                    Verdict::Warn,
                    format!("{running} microVMs running; {}", troubled.join(", ")),
                ),
            });
        }
        Err(e) => out.push(check("vmmd", Verdict::Fail, format!("not reachable: {e}"))),
    }
    // Links with an address beyond link-local (a workload's tap has only
    // that); the workload bridge (vmmd's `steelcup0`) is not a way out.
    let links: Vec<String> = host
        .interfaces
        .iter()
        .filter(|i| i.name != "lo" && i.state != "down" && !i.name.starts_with("steelcup"))
        .filter_map(|i| {
            let routable: Vec<&str> = i
                .addresses
                .iter()
                .map(String::as_str)
                .filter(|a| !a.starts_with("fe80:"))
                .collect();
            (!routable.is_empty()).then(|| format!("{} {} {}", i.name, i.state, routable.join(" ")))
        })
        .collect();
    out.push(match links.is_empty() {
        true => check(
            "network",
            Verdict::Fail,
            "no link is up with an address (only loopback)".into(),
        ),
        false => check("network", Verdict::Ok, links.join("; ")),
    });
    let ago = host.now_unix.saturating_sub(host.time_last_sync_unix);
    let clock = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(host.now_unix),
    );
    // The hardware clock, which time sync sets after a step (the next
    // boot starts from it).
    let clock = match host.rtc_unix {
        0 => format!("no hardware clock; clock {clock}"),
        rtc => match rtc.abs_diff(host.now_unix) {
            0..=2 => format!("hardware clock in step; clock {clock}"),
            off => format!(
                "hardware clock {off} s {}; clock {clock}",
                if rtc < host.now_unix {
                    "behind"
                } else {
                    "ahead"
                }
            ),
        },
    };
    out.push(match (host.clock_synchronized, host.time_server.is_empty()) {
        (true, false) => check(
            "time",
            Verdict::Ok,
            format!(
                "synchronized to {}: {:+.1} ms off at its last answer, {ago}s ago (maximum error {} ms); {clock}",
                host.time_server,
                host.time_offset_ms,
                host.clock_max_error_us / 1000
            ),
        ),
        (true, true) => check(
            "time",
            Verdict::Ok,
            format!(
                "synchronized (maximum error {} ms); {clock}",
                host.clock_max_error_us / 1000
            ),
        ),
        (false, _) => check(
            "time",
            Verdict::Warn,
            match host.time_error.is_empty() {
                true => format!(
                    "not synchronized: no NTP server has answered (the time-sync unit); {clock}"
                ),
                false => format!("not synchronized: {}; {clock}", host.time_error),
            },
        ),
    });
    let free = host.var_available as f64 / host.var_total.max(1) as f64;
    let where_ = match host.var_persistent {
        true => "on the state partition",
        false => "in memory (no state partition: nothing is kept across a reboot)",
    };
    out.push(check(
        "disk",
        match free {
            f if f < 0.02 => Verdict::Fail,
            f if f < 0.10 => Verdict::Warn,
            _ => Verdict::Ok,
        },
        format!(
            "/var {where_}: {} free of {}",
            steelcup_api::human(host.var_available),
            steelcup_api::human(host.var_total)
        ),
    ));
    out.push(match p.update_status() {
        Ok(st) if !st.passed_over.is_empty() => check(
            "update",
            Verdict::Warn,
            format!(
                "slot {}: rolled back, slot {} did not come up",
                st.booted, st.passed_over
            ),
        ),
        Ok(st) if !st.good => check(
            "update",
            Verdict::Warn,
            format!("slot {}: health gate not passed yet", st.booted),
        ),
        Ok(st) => check(
            "update",
            Verdict::Ok,
            format!("slot {}, passed its health gate", st.booted),
        ),
        Err(e) => check(
            "update",
            Verdict::Ok,
            format!("no A/B slots ({})", crate::error::CupError::from(e)),
        ),
    });
    out
}

/// `cup health [--format json]`: one line per subsystem (or one JSON
/// object per line: `subsystem`, `verdict`, `detail`); exit 1 if any
/// failed.
pub fn health(
    p: &Init1Proxy<'static>,
    vmmd: Result<Vmm1ClientProxy<'static>, CupError>,
    json: bool,
) -> Result<u8, CupError> {
    let checks = checks(p, &vmmd);
    match json {
        true => print!("{}", health_json(&checks)),
        false => print!("{}", health_text(&checks)),
    }
    Ok(u8::from(checks.iter().any(|c| c.verdict == Verdict::Fail)))
}

fn health_json(checks: &[Check]) -> String {
    checks
        .iter()
        .map(|c| {
            serde_json::json!({
                "subsystem": c.what,
                "verdict": c.verdict.word().to_lowercase(),
                "detail": c.said,
            })
            .to_string()
                + "\n"
        })
        .collect()
}

fn health_text(checks: &[Check]) -> String {
    checks
        .iter()
        .map(|c| format!("{:<8} {:<4}  {}\n", c.what, c.verdict.word(), c.said))
        .collect()
}

/// One row of `cup top`: kind, name, CPU time (µs), memory (bytes).
type Usage = (&'static str, String, u64, u64);

/// Every unit's and microVM's CPU time and memory now.
fn usage(
    p: &Init1Proxy<'static>,
    vmmd: &Result<Vmm1ClientProxy<'static>, CupError>,
) -> Result<Vec<Usage>, CupError> {
    let mut rows: Vec<Usage> = p
        .usage()?
        .into_iter()
        .map(|(n, cpu, mem)| ("unit", n, cpu, mem))
        .collect();
    if let Ok(v) = vmmd {
        rows.extend(
            v.stats()?
                .into_iter()
                .map(|s| ("microvm", s.name, s.cpu_usec, s.memory_bytes)),
        );
    }
    Ok(rows)
}

/// `cup top` without a name: the host's units and microVMs by CPU (over
/// one second) and memory, busiest first.
pub fn top(
    p: &Init1Proxy<'static>,
    vmmd: Result<Vmm1ClientProxy<'static>, CupError>,
) -> Result<u8, CupError> {
    let before = usage(p, &vmmd)?;
    let t0 = std::time::Instant::now();
    std::thread::sleep(std::time::Duration::from_secs(1));
    let after = usage(p, &vmmd)?;
    let elapsed = t0.elapsed().as_micros().max(1) as f64;
    let mut rows: Vec<(f64, Usage)> = after
        .into_iter()
        .map(|row| {
            let was = before
                .iter()
                .find(|b| b.0 == row.0 && b.1 == row.1)
                .map_or(row.2, |b| b.2);
            (row.2.saturating_sub(was) as f64 / elapsed * 100.0, row)
        })
        .collect();
    rows.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1 .3.cmp(&a.1 .3)));
    if let Ok(h) = p.host_status() {
        println!(
            "{}: load {}, memory {} of {} available{}",
            h.hostname,
            h.load
                .iter()
                .map(|l| format!("{l:.2}"))
                .collect::<Vec<_>>()
                .join(" "),
            steelcup_api::human(h.memory_available),
            steelcup_api::human(h.memory_total),
            match &vmmd {
                Ok(_) => String::new(),
                Err(e) => format!(" (no microVMs: {e})"),
            }
        );
    }
    println!(
        "{:<8} {:<24} {:>6} {:>10}",
        "KIND", "NAME", "CPU %", "MEMORY"
    );
    for (cpu, (kind, name, _, mem)) in rows {
        println!(
            "{kind:<8} {name:<24} {cpu:>6.1} {:>10}",
            steelcup_api::human(mem)
        );
    }
    Ok(0)
}

/// Key names whose values a support bundle never carries.
const SECRET_WORDS: [&str; 8] = [
    "password",
    "passwd",
    "secret",
    "token",
    "credential",
    "private",
    "apikey",
    "api_key",
];

fn secret_name(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    SECRET_WORDS.iter().any(|w| n.contains(w))
        || n == "key"
        || n.ends_with("_key")
        || n.ends_with("-key")
}

/// `text` with what could be a secret taken out: PEM private key blocks,
/// and the values of `KEY = value`, `KEY=value` and `"KEY": "value"`
/// whose key names a secret (password, token, ...).
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_key = false;
    for line in text.split_inclusive('\n') {
        if line.contains("-----BEGIN") && line.contains("PRIVATE KEY") {
            in_key = true;
            out.push_str("(private key not included)\n");
        }
        if in_key {
            if line.contains("-----END") {
                in_key = false;
            }
            continue;
        }
        out.push_str(&redact_line(line));
    }
    out
}

fn redact_line(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    // Each `=` or `:` with a secret-naming word just before it: what
    // follows, up to the end of that value, goes.
    while let Some(at) = rest.find(['=', ':']) {
        let (before, after) = rest.split_at(at);
        let key: String = before
            .trim_end()
            .trim_end_matches('"')
            .chars()
            .rev()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-' || *c == '.')
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        out.push_str(before);
        out.push_str(&after[..1]);
        let after = &after[1..];
        if !key.is_empty() && secret_name(key.rsplit('.').next().unwrap_or(&key)) {
            let value_start = after.len() - after.trim_start().len();
            let v = &after[value_start..];
            // A quoted value keeps its quotes, so JSON and TOML stay so.
            let (end, instead) = match v.strip_prefix('"') {
                Some(q) => (q.find('"').map_or(v.len(), |e| e + 2), "\"(redacted)\""),
                None => (
                    v.find([' ', ',', '\n', '}', ']', ';', '&', '"'])
                        .unwrap_or(v.len()),
                    "(redacted)",
                ),
            };
            out.push_str(&after[..value_start]);
            out.push_str(instead);
            rest = &v[end..];
        } else {
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
}

/// Collects the bundle's files: (path in the tar, text); what could not
/// be collected goes to `errors.txt`.
fn bundle_files(
    p: &Init1Proxy<'static>,
    vmmd: Result<Vmm1ClientProxy<'static>, CupError>,
) -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    let checks = checks(p, &vmmd);
    files.push(("health.txt".into(), health_text(&checks)));
    files.push((
        "versions.txt".into(),
        format!("cup {}\n", env!("CARGO_PKG_VERSION")),
    ));
    let mut note = |what: &str, e: &dyn std::fmt::Display| errors.push(format!("{what}: {e}"));
    match p.host_status() {
        Ok(h) => files.push(("host.json".into(), json(&h))),
        Err(e) => note("host status", &e),
    }
    match p.update_status() {
        Ok(st) => files.push(("update.txt".into(), crate::update::describe(&st))),
        Err(e) => note("update status", &e),
    }
    match p.machine_show() {
        Ok(t) => files.push(("machine.toml".into(), t)),
        Err(e) => note("machine config", &e),
    }
    match p.kernel_log(0, steelcup_os::kmsg::MAX_RECORDS as u32) {
        Ok((records, _)) => files.push((
            "dmesg.txt".into(),
            records.iter().map(|r| kernel_line(r) + "\n").collect(),
        )),
        Err(e) => note("kernel log", &e),
    }
    let stamped = |lines: &[(u64, u64, String)]| -> String {
        lines
            .iter()
            .map(|(_, t, l)| format!("{} {l}\n", crate::logs::stamp(*t)))
            .collect()
    };
    match p.list_units() {
        Ok(units) => {
            files.push(("units.json".into(), json(&units)));
            for u in &units {
                match p.cat_unit(&u.name) {
                    Ok(t) => files.push((format!("units/{}.toml", u.name), t)),
                    Err(e) => note(&format!("unit {} file", u.name), &e),
                }
                if u.kind == "service" {
                    match p.tail_timed(&u.name, 5000) {
                        Ok((lines, _)) => {
                            files.push((format!("units/{}.log", u.name), stamped(&lines)))
                        }
                        Err(e) => note(&format!("unit {} log", u.name), &e),
                    }
                }
            }
        }
        Err(e) => note("units", &e),
    }
    match vmmd {
        Ok(v) => {
            match v.list() {
                Ok(vms) => {
                    files.push(("workloads.json".into(), json(&vms)));
                    for vm in &vms {
                        match v.inspect(&vm.name) {
                            Ok(t) => files.push((format!("workloads/{}.json", vm.name), t)),
                            Err(e) => note(&format!("workload {}", vm.name), &e),
                        }
                        match v.tail_timed(&vm.name, 5000) {
                            Ok((lines, _, _)) => {
                                files.push((format!("workloads/{}.log", vm.name), stamped(&lines)))
                            }
                            Err(e) => note(&format!("workload {} log", vm.name), &e),
                        }
                    }
                }
                Err(e) => note("workloads", &e),
            }
            match v.images() {
                Ok(i) => files.push(("images.json".into(), json(&i))),
                Err(e) => note("images", &e),
            }
            match v.volumes() {
                Ok(i) => files.push(("volumes.json".into(), json(&i))),
                Err(e) => note("volumes", &e),
            }
        }
        Err(e) => note("vmmd", &e),
    }
    files.push((
        "errors.txt".into(),
        errors.iter().map(|e| format!("{e}\n")).collect(),
    ));
    files
        .into_iter()
        .map(|(path, text)| (path, redact(&text)))
        .collect()
}

/// `cup support-bundle [-o FILE]`: one `.tar.gz` of what a bug report
/// needs, secrets taken out; prints its path.
pub fn support_bundle(
    p: &Init1Proxy<'static>,
    vmmd: Result<Vmm1ClientProxy<'static>, CupError>,
    output: Option<&std::path::Path>,
) -> Result<u8, CupError> {
    let files = bundle_files(p, vmmd);
    let host = p.host_status().map(|h| h.hostname).unwrap_or_default();
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .replace([':', '-'], "");
    let name = format!(
        "steelcup-support-{}-{now}",
        if host.is_empty() { "machine" } else { &host }
    );
    let path = output
        .map(std::path::Path::to_path_buf)
        .unwrap_or_else(|| std::path::PathBuf::from(format!("{name}.tar.gz")));
    let f = std::fs::File::create(&path).map_err(CupError::file("create", &path))?;
    let gz = flate2::write::GzEncoder::new(f, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    let mtime = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for (file, text) in &files {
        let mut h = tar::Header::new_gnu();
        h.set_size(text.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(mtime);
        h.set_cksum();
        tar.append_data(&mut h, format!("{name}/{file}"), text.as_bytes())
            .map_err(CupError::file("write", &path))?;
    }
    tar.into_inner()
        .and_then(|gz| gz.finish())
        .and_then(|f| f.sync_all())
        .map_err(CupError::file("write", &path))?;
    eprintln!("cup: {} files, secrets taken out", files.len());
    println!("{}", path.display());
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_taken_out_and_the_rest_kept() {
        let text = r#"hostname = "node-17"
password = "s3cret value"
[admin]
server-key = """
-----BEGIN PRIVATE KEY-----
MIIEvQIBADANBgkqhkiG9w0BAQEFAASC
-----END PRIVATE KEY-----
"""
{"env": ["API_TOKEN=abc123", "MODE=prod"], "user": "bob", "registry_password": "pw"}
12:30:01 GET https://registry.local:5000/v2/ token=xyz&scope=pull
monkey: 1
"#;
        let out = redact(text);
        for gone in ["s3cret", "MIIEvQ", "abc123", "\"pw\"", "xyz"] {
            assert!(!out.contains(gone), "{gone} left in:\n{out}");
        }
        for kept in [
            "hostname = \"node-17\"",
            "(private key not included)",
            "\"API_TOKEN=(redacted)\", \"MODE=prod\"",
            "\"user\": \"bob\"",
            "12:30:01 GET https://registry.local:5000/v2/",
            "&scope=pull",
            "monkey: 1",
        ] {
            assert!(out.contains(kept), "{kept} missing from:\n{out}");
        }
        // The JSON stays JSON.
        let line = out.lines().find(|l| l.starts_with('{')).unwrap();
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["user"], "bob");
    }

    #[test]
    fn health_lines_line_up() {
        let text = health_text(&[
            check("units", Verdict::Ok, "3 running, none failed".into()),
            check("time", Verdict::Warn, "not synchronized".into()),
            check("vmmd", Verdict::Fail, "not reachable".into()),
        ]);
        assert_eq!(
            text,
            "units    ok    3 running, none failed\ntime     warn  not synchronized\nvmmd     FAIL  not reachable\n"
        );
        let json = health_json(&[check("vmmd", Verdict::Fail, "not reachable".into())]);
        let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
        assert_eq!(v["subsystem"], "vmmd");
        assert_eq!(v["verdict"], "fail");
        assert_eq!(v["detail"], "not reachable");
    }
}
