//! cup's OS verbs: `cup update SOURCE`, `cup update --status`, `cup
//! rollback` (init's `Update`, `UpdateStatus` and `Rollback`; the design is
//! in [`steelcup_os::update`]).
//!
//! # Design
//! init takes the update file by its path on the host. A URL (`http://`,
//! `https://`) is fetched by cup first, into the run directory (memory, on
//! the appliance), and removed when init is done with it; PID 1 never
//! speaks HTTP.

use crate::error::CupError;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use steelcup_api::init1::Init1Proxy;
use steelcup_os::update::Status;

/// The largest update cup fetches (the slot partitions are 64 MiB as
/// built; init checks the real size).
const MAX_DOWNLOAD: u64 = 1 << 30;

/// A downloaded update file, removed when dropped.
#[derive(Debug)]
struct Download(PathBuf);

impl Drop for Download {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Fetches `url` into a new file in `dir`, with progress on stderr.
fn download(url: &str, dir: &Path) -> Result<Download, CupError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    std::fs::create_dir_all(dir).map_err(CupError::file("create", dir))?;
    let path = dir.join(format!("update-{}.img", std::process::id()));
    let file = Download(path.clone());
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(CupError::file("create", &path))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CupError::file("start the download into", &path))?;
    let tty = std::io::stderr().is_terminal();
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .build()
            .map_err(|e| download_err(url, &e))?;
        let mut resp = client
            .get(url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| download_err(url, &e))?;
        let total = resp.content_length();
        if total.is_some_and(|t| t > MAX_DOWNLOAD) {
            return Err(CupError::Download {
                url: url.to_string(),
                why: format!("{} bytes is not an OS slot", total.unwrap_or(0)),
            });
        }
        let mut done = 0u64;
        eprintln!("cup: fetching {url}");
        while let Some(chunk) = resp.chunk().await.map_err(|e| download_err(url, &e))? {
            done += chunk.len() as u64;
            if done > MAX_DOWNLOAD {
                return Err(CupError::Download {
                    url: url.to_string(),
                    why: format!("more than {MAX_DOWNLOAD} bytes; not an OS slot"),
                });
            }
            out.write_all(&chunk)
                .map_err(CupError::file("write", &path))?;
            if tty {
                let of = total.map(|t| format!(" of {:.1} MB", t as f64 / 1e6));
                eprint!(
                    "\r  {:.1} MB{}   ",
                    done as f64 / 1e6,
                    of.unwrap_or_default()
                );
            }
        }
        if tty {
            eprintln!();
        }
        if total.is_some_and(|t| t != done) {
            return Err(CupError::Download {
                url: url.to_string(),
                why: format!(
                    "the connection ended after {done} of {} bytes",
                    total.unwrap_or(0)
                ),
            });
        }
        eprintln!("cup: fetched {:.1} MB", done as f64 / 1e6);
        Ok(())
    })?;
    out.sync_all().map_err(CupError::file("sync", &path))?;
    Ok(file)
}

fn download_err(url: &str, e: &reqwest::Error) -> CupError {
    CupError::Download {
        url: url.to_string(),
        why: steelcup_sys::error_chain(e),
    }
}

/// `cup update --status [--format json]`.
pub fn status(p: &Init1Proxy<'static>, json: bool) -> Result<u8, CupError> {
    let st = p.update_status()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        print!("{}", describe(&st));
    }
    Ok(0)
}

/// `cup update SOURCE [--no-reboot]`.
pub fn update(
    p: &Init1Proxy<'static>,
    source: &str,
    reboot: bool,
    run_dir: &Path,
) -> Result<u8, CupError> {
    let fetched;
    let path = if source.starts_with("http://") || source.starts_with("https://") {
        // For another machine the file is only passed through here.
        let dir = match steelcup_api::remote::REMOTE.get() {
            Some(_) => std::env::temp_dir(),
            None => run_dir.to_path_buf(),
        };
        fetched = download(source, &dir)?;
        fetched.0.clone()
    } else {
        std::fs::canonicalize(source).map_err(CupError::file("read", Path::new(source)))?
    };
    // Another machine reads no file of this one: the update is streamed to
    // it first, through its admin gateway.
    let path = match steelcup_api::remote::REMOTE.get() {
        None => path,
        Some(remote) => {
            let mut f = std::fs::File::open(&path).map_err(CupError::file("read", &path))?;
            let len = f.metadata().map_err(CupError::file("read", &path))?.len();
            eprintln!(
                "cup: sending {} ({:.1} MB) to {}",
                path.display(),
                len as f64 / 1e6,
                remote.addr
            );
            remote
                .upload(&mut f, len)
                .map_err(|e| steelcup_api::ClientError::Remote(Box::new(e)))?
        }
    };
    eprintln!("cup: writing the update into the slot that is not running, then checking it");
    let answer = p.update(&path.to_string_lossy(), reboot)?;
    Ok(boots_next(answer, reboot))
}

/// Says which slot boots next (init's answer) and what happens now.
fn boots_next((slot, version): (String, String), reboot: bool) -> u8 {
    println!("slot {slot} holds version {version} and boots next, once; the running slot stays the fallback");
    if reboot {
        println!("rebooting");
    } else {
        println!("reboot (cup reboot) to boot it");
    }
    0
}

/// `cup rollback [--no-reboot]`.
pub fn rollback(p: &Init1Proxy<'static>, reboot: bool) -> Result<u8, CupError> {
    let answer = p.rollback(reboot)?;
    Ok(boots_next(answer, reboot))
}

/// `cup update --status` as text.
pub fn describe(st: &Status) -> String {
    let mut s = format!(
        "booted: slot {}{}\n",
        if st.booted.is_empty() {
            "?"
        } else {
            &st.booted
        },
        if st.good {
            " (passed its health gate)"
        } else {
            " (health gate not passed yet)"
        }
    );
    let next = st
        .order
        .iter()
        .find(|o| st.slots.iter().any(|s| &s.name == *o && s.tries > 0));
    s.push_str(&format!(
        "next boot: slot {} (order {})\n",
        next.map_or("none", String::as_str),
        st.order.join(" ")
    ));
    if !st.passed_over.is_empty() {
        s.push_str(&format!(
            "rolled back: slot {} was first but did not come up\n",
            st.passed_over
        ));
    }
    s.push_str(&format!(
        "{:<5} {:<14} {:>5}  NOTE\n",
        "SLOT", "VERSION", "TRIES"
    ));
    for slot in &st.slots {
        let note = if slot.booted {
            "booted".to_string()
        } else if !slot.problem.is_empty() {
            format!("no OS: {}", slot.problem)
        } else if slot.tries == 0 {
            "no tries left: not booted (cup rollback gives it one)".to_string()
        } else {
            String::new()
        };
        s.push_str(&format!(
            "{:<5} {:<14} {:>5}  {}\n",
            slot.name,
            if slot.version.is_empty() {
                "-"
            } else {
                &slot.version
            },
            slot.tries,
            note
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use steelcup_os::update::SlotInfo;

    #[test]
    fn status_says_what_boots_next_and_what_each_slot_holds() {
        let st = Status {
            booted: "A".into(),
            order: vec!["B".into(), "A".into()],
            good: false,
            passed_over: "B".into(),
            slots: vec![
                SlotInfo {
                    name: "A".into(),
                    version: "1a2b3c4d5e6f".into(),
                    tries: 2,
                    booted: true,
                    problem: String::new(),
                },
                SlotInfo {
                    name: "B".into(),
                    version: String::new(),
                    tries: 0,
                    booted: false,
                    problem: "no manifest.json".into(),
                },
            ],
        };
        assert_eq!(
            describe(&st),
            "booted: slot A (health gate not passed yet)\n\
             next boot: slot A (order B A)\n\
             rolled back: slot B was first but did not come up\n\
             SLOT  VERSION        TRIES  NOTE\n\
             A     1a2b3c4d5e6f       2  booted\n\
             B     -                  0  no OS: no manifest.json\n"
        );
    }

    #[test]
    fn a_download_that_fails_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        // Nothing listens on port 1 of loopback.
        let e = download("http://127.0.0.1:1/slot.img", dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("http://127.0.0.1:1/slot.img: "), "{e}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_download_is_written_whole() {
        use std::io::{BufRead, BufReader};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let served = body.clone();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            while r.read_line(&mut line).unwrap() > 2 {
                line.clear();
            }
            write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                served.len()
            )
            .unwrap();
            s.write_all(&served).unwrap();
        });
        let dir = tempfile::tempdir().unwrap();
        let d = download(&format!("http://127.0.0.1:{port}/slot.img"), dir.path()).unwrap();
        assert_eq!(std::fs::read(&d.0).unwrap(), body);
        server.join().unwrap();
        let path = d.0.clone();
        drop(d);
        assert!(!path.exists(), "removed once init is done with it");
    }
}
