//! From an image reference in a unit to what a VM of it needs: the shared
//! root image and the process the image config describes.
//!
//! # Design
//! [`prepare`] finds the image in the store (pulling it when it is not
//! there), builds its root image once, and reads its config. [`Process::merge`]
//! then applies the workload's overrides the way `docker run` does: a
//! command given by the workload replaces the image's `Cmd` and keeps its
//! `Entrypoint`; the workload's environment wins over the image's.

use super::source::{self, PullOptions};
use super::store::Store;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What the image config says to run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Process {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<(String, String)>,
    pub workdir: Option<String>,
    pub user: Option<String>,
}

/// A prepared image: its root image and process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub rootfs: PathBuf,
    pub digest: String,
    pub process: Process,
}

/// The merged process of a workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merged {
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
}

impl Process {
    /// Reads the process part of an image config.
    pub fn from_config(config: &oci_spec::image::ImageConfiguration) -> Process {
        let Some(c) = config.config() else {
            return Process::default();
        };
        let env = c
            .env()
            .iter()
            .flatten()
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (kv.clone(), String::new()),
            })
            .collect();
        Process {
            entrypoint: c.entrypoint().clone().unwrap_or_default(),
            cmd: c.cmd().clone().unwrap_or_default(),
            env,
            workdir: c.working_dir().clone().filter(|w| !w.is_empty()),
            user: c.user().clone().filter(|u| !u.is_empty()),
        }
    }

    /// Applies a workload's overrides as `docker run` does: its command
    /// replaces `Cmd`; its `entrypoint` replaces `Entrypoint` and drops
    /// the image's `Cmd`; its environment wins; its `workdir` and `user`
    /// replace the image's. An error when nothing is left to run.
    pub fn merge(&self, w: &steelcup_units::MicrovmSection) -> Result<Merged, NothingToRun> {
        let (entrypoint, image_cmd) = match &w.entrypoint {
            Some(e) => (e, &Vec::new()),
            None => (&self.entrypoint, &self.cmd),
        };
        let mut argv = entrypoint.clone();
        argv.extend(
            if w.cmd.is_empty() {
                image_cmd.iter()
            } else {
                w.cmd.iter()
            }
            .cloned(),
        );
        if argv.is_empty() {
            return Err(NothingToRun);
        }
        let mut merged: BTreeMap<String, String> = self.env.iter().cloned().collect();
        merged.extend(w.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok(Merged {
            argv,
            env: merged,
            workdir: w.workdir.clone().or_else(|| self.workdir.clone()),
            user: w.user.clone().or_else(|| self.user.clone()),
        })
    }
}

/// A workload with nothing to run.
#[derive(Debug, thiserror::Error)]
#[error("the image has no Entrypoint or Cmd and the workload gives no command")]
pub struct NothingToRun;

/// Where a root image is built.
#[derive(Debug, Clone)]
pub enum Builder {
    /// In this process (tests, `vmmd image rootfs`).
    InProcess,
    /// In a child process (`EXE image --store DIR rootfs DIGEST`) whose
    /// address space is capped at `memory` bytes and which is killed after
    /// `timeout`: a hostile layer that gets past the build's own caps
    /// fails that child, never vmmd, and never holds up the next image's
    /// preparation for longer than `timeout`.
    Child {
        exe: PathBuf,
        memory: u64,
        timeout: std::time::Duration,
    },
}

/// vmmd's own builds: 1 GiB of address space (the build's caps keep a
/// tree well under it), 10 minutes.
pub fn child_builder() -> Builder {
    Builder::Child {
        exe: std::env::current_exe().unwrap_or_else(|_| "/usr/bin/vmmd".into()),
        memory: 1 << 30,
        timeout: std::time::Duration::from_secs(600),
    }
}

/// Why an image could not be made ready to boot.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// The child process building the root image failed or ran out of
    /// time or memory.
    #[error("build the root image: {what}")]
    Build { what: String },
    #[error("{}", steelcup_sys::error_chain(.0))]
    Store(#[from] super::store::StoreError),
    #[error("{}", steelcup_sys::error_chain(.0))]
    Source(#[from] source::SourceError),
    #[error("spawn a thread: {0}")]
    Thread(std::io::Error),
}

/// Makes `image` ready to boot from the store at `store_dir`: pulled if
/// it is not there, its root image built.
pub fn prepare(
    store_dir: &Path,
    image: &str,
    opts: &PullOptions,
    progress: &mut dyn FnMut(source::Progress),
    builder: &Builder,
) -> Result<Prepared, PrepareError> {
    // One preparation at a time: two units of one image pull it and build
    // its root image once, not side by side.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let store = Store::open(store_dir)?;
    let name = source::Source::parse(image)?.name(image);
    let digest = match store.resolve(&name) {
        Ok(d) => d,
        Err(_) => {
            tracing::info!("image {image}: pulling");
            source::pull(&store, image, opts, progress)?.1
        }
    };
    let img = store.image(&digest)?;
    let started = std::time::Instant::now();
    let built = !store.rootfs_path(&img).is_file();
    let rootfs = match builder {
        Builder::InProcess => store.rootfs(&img)?,
        Builder::Child {
            exe,
            memory,
            timeout,
        } if built => build_in_child(store_dir, &digest.to_string(), exe, *memory, *timeout)
            .inspect_err(|_| {
                // A builder that died leaves its file; nothing else builds
                // now (one preparation at a time).
                store.remove_tmp(super::store::ROOTFS_TMP);
            })?,
        Builder::Child { .. } => store.rootfs_path(&img),
    };
    if built {
        tracing::info!(
            "image {image}: root image built in {} ms",
            started.elapsed().as_millis()
        );
    }
    Ok(Prepared {
        rootfs,
        digest: digest.to_string(),
        process: Process::from_config(&img.config),
    })
}

/// Builds image `digest`'s root image in a child process (see
/// [`Builder::Child`]); the path it printed.
fn build_in_child(
    store_dir: &Path,
    digest: &str,
    exe: &Path,
    memory: u64,
    timeout: std::time::Duration,
) -> Result<PathBuf, PrepareError> {
    use std::io::Read;
    let fail = |what: String| PrepareError::Build { what };
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("image")
        .arg("--store")
        .arg(store_dir)
        .args(["rootfs", digest])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    steelcup_sys::reset_signal_mask(&mut cmd);
    // SAFETY: prctl(2) and setrlimit(2) are async-signal-safe; nothing
    // else runs between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            // The build ends with vmmd.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            steelcup_sys::set_rlimit(libc::RLIMIT_AS as i32, memory)
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| fail(format!("start {}: {e}", exe.display())))?;
    // Its output, read beside it (bounded) so a full pipe never stalls it.
    let read = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            if let Some(r) = r {
                let _ = r.take(64 << 10).read_to_end(&mut out);
            }
            String::from_utf8_lossy(&out).into_owned()
        })
    };
    let stdout = read(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let stderr = read(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().map_err(|e| fail(e.to_string()))? {
            break st;
        }
        if t0.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Err(fail(format!("it took more than {} s", timeout.as_secs())));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let (out, err) = (
        stdout.join().unwrap_or_default(),
        stderr.join().unwrap_or_default(),
    );
    if !status.success() {
        let said = err
            .lines()
            .filter(|l| !l.starts_with('('))
            .collect::<Vec<_>>()
            .join("; ");
        let said = said.strip_prefix("vmmd image: ").unwrap_or(&said);
        return Err(fail(match status.signal_name() {
            Some(sig) => format!(
                "killed by {sig} (more than {} MiB of memory?){}",
                memory >> 20,
                if said.is_empty() {
                    String::new()
                } else {
                    format!(": {said}")
                }
            ),
            None => format!("{status}: {said}"),
        }));
    }
    let path = out.lines().next().unwrap_or_default().trim();
    if path.is_empty() {
        return Err(fail("the builder printed no path".into()));
    }
    Ok(PathBuf::from(path))
}

/// The name of the signal that ended a process, if one did.
trait SignalName {
    fn signal_name(&self) -> Option<String>;
}

impl SignalName for std::process::ExitStatus {
    fn signal_name(&self) -> Option<String> {
        use std::os::unix::process::ExitStatusExt;
        self.signal().map(|s| {
            nix::sys::signal::Signal::try_from(s)
                .map(|s| s.to_string())
                .unwrap_or_else(|_| format!("signal {s}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn workload_overrides_apply_like_docker_run() {
        let p = Process {
            entrypoint: v(&["/entry"]),
            cmd: v(&["default"]),
            env: vec![("PATH".into(), "/bin".into()), ("A".into(), "image".into())],
            workdir: Some("/work".into()),
            user: Some("app".into()),
        };
        let w = |f: &dyn Fn(&mut steelcup_units::MicrovmSection)| {
            let mut w = steelcup_units::MicrovmSection::default();
            f(&mut w);
            w
        };
        let m = p.merge(&w(&|_| {})).unwrap();
        assert_eq!(m.argv, v(&["/entry", "default"]));
        let m = p
            .merge(&w(&|w| {
                w.cmd = v(&["other", "arg"]);
                w.env = [("A".to_string(), "unit".to_string())].into();
            }))
            .unwrap();
        assert_eq!(
            m.argv,
            v(&["/entry", "other", "arg"]),
            "a command replaces Cmd, not Entrypoint"
        );
        assert_eq!(m.env["A"], "unit");
        assert_eq!(m.env["PATH"], "/bin");
        assert_eq!(
            (m.workdir.as_deref(), m.user.as_deref()),
            (Some("/work"), Some("app"))
        );
        // --entrypoint: the image's Cmd goes with its Entrypoint.
        let m = p
            .merge(&w(&|w| w.entrypoint = Some(v(&["/bin/sh"]))))
            .unwrap();
        assert_eq!(m.argv, v(&["/bin/sh"]));
        let m = p
            .merge(&w(&|w| {
                w.entrypoint = Some(v(&["/bin/sh"]));
                w.cmd = v(&["-c", "true"]);
                w.workdir = Some("/tmp".into());
                w.user = Some("0:0".into());
            }))
            .unwrap();
        assert_eq!(m.argv, v(&["/bin/sh", "-c", "true"]));
        assert_eq!(
            (m.workdir.as_deref(), m.user.as_deref()),
            (Some("/tmp"), Some("0:0"))
        );
        // --entrypoint "" with a command: the command alone.
        let m = p
            .merge(&w(&|w| {
                w.entrypoint = Some(vec![]);
                w.cmd = v(&["/bin/true"]);
            }))
            .unwrap();
        assert_eq!(m.argv, v(&["/bin/true"]));
        assert!(p.merge(&w(&|w| w.entrypoint = Some(vec![]))).is_err());
        assert!(Process::default()
            .merge(&w(&|_| {}))
            .unwrap_err()
            .to_string()
            .contains("no Entrypoint"));
    }

    #[test]
    fn the_process_comes_from_the_image_config() {
        let config: oci_spec::image::ImageConfiguration = serde_json::from_str(
            r#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin","EMPTY=","X=a=b"],"Cmd":["sh"],"WorkingDir":"/w","User":"1000:1000"},"rootfs":{"type":"layers","diff_ids":[]}}"#,
        )
        .unwrap();
        let p = Process::from_config(&config);
        assert_eq!(p.cmd, v(&["sh"]));
        assert_eq!(
            p.env,
            vec![
                ("PATH".into(), "/bin".into()),
                ("EMPTY".into(), "".into()),
                ("X".into(), "a=b".into())
            ]
        );
        assert_eq!(p.workdir.as_deref(), Some("/w"));
        assert_eq!(p.user.as_deref(), Some("1000:1000"));
    }
}
