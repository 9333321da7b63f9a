//! vmmd's `org.steelcup.Vmm1` driven by a standard D-Bus client from
//! Debian's packages (`dbus-send`), on a daemon started for the test with
//! no workloads (no KVM needed): every answer and every typed error as any
//! D-Bus client sees them, and a hostile call that leaves the daemon up.

#![allow(clippy::unwrap_used)] // tests fail by panicking

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn dbus_send() -> Option<PathBuf> {
    let found = ["/usr/bin/dbus-send", "/bin/dbus-send"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    if found.is_none() {
        assert!(
            std::env::var_os("STEELCUP_REQUIRE_TOOLS").is_none(),
            "dbus-send is missing (Debian package dbus-bin)"
        );
        eprintln!("SKIP: dbus-send (Debian package dbus-bin) is not installed; `cargo xtask test` installs it");
    }
    found
}

struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
    /// A loopback port vmmd takes as a plain-HTTP registry (for `cup
    /// login`'s check: see [`serve_registry_auth`]).
    registry: std::net::TcpListener,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Calls `method` with `dbus-send`: (succeeded, its output).
    fn call(&self, dbus_send: &Path, method: &str, args: &[&str]) -> (bool, String) {
        let addr = format!(
            "--peer=unix:path={}",
            self.dir.path().join("vmmd.sock").display()
        );
        let out = Command::new(dbus_send)
            .args([addr.as_str(), "--print-reply", "/org/steelcup/Vmm1"])
            .arg(format!("org.steelcup.Vmm1.{method}"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }
}

fn start() -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("units")).unwrap();
    // vmmd says READY=1 (sd_notify) once its API is served.
    let notify = std::os::unix::net::UnixDatagram::bind(dir.path().join("notify")).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let registry = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_vmmd"))
        .env("NOTIFY_SOCKET", dir.path().join("notify"))
        .arg("--insecure-registry")
        .arg(registry.local_addr().unwrap().to_string())
        .arg("--units")
        .arg(dir.path().join("units"))
        .arg("--state")
        .arg(dir.path().join("state"))
        .arg("--run-dir")
        .arg(dir.path().join("run"))
        .arg("--api-socket")
        .arg(dir.path().join("vmmd.sock"))
        // No workload network: this test makes no VMs, and must not touch
        // the machine's links or firewall.
        .args(["--network", "none"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 64];
    let n = notify.recv(&mut buf).expect("vmmd did not say it is ready");
    assert_eq!(&buf[..n], b"READY=1");
    assert!(
        dir.path().join("vmmd.sock").exists(),
        "ready before the API socket exists"
    );
    Daemon {
        child,
        dir,
        registry,
    }
}

/// Answers the distribution API's credentials check on `listener` as a
/// registry with basic authentication does: `GET /v2/` is 200 with the
/// `Authorization` of fleet:s3cret, else 401 with a `Basic` challenge.
/// (The real registry's answers are checked in image_store.rs, against
/// docker-registry.)
fn serve_registry_auth(listener: std::net::TcpListener) {
    use std::io::{BufRead, Write};
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut r = std::io::BufReader::new(conn.try_clone().unwrap());
            let mut authorized = false;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                // base64("fleet:s3cret")
                authorized |= lower.starts_with("authorization:")
                    && line.trim_end().ends_with("Basic ZmxlZXQ6czNjcmV0");
            }
            let answer = if authorized {
                "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
            } else {
                "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"test\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            };
            let _ = conn.write_all(answer.as_bytes());
        }
    });
}

#[test]
fn a_standard_dbus_client_drives_vmm1() {
    let Some(dbus_send) = dbus_send() else { return };
    let mut d = start();
    let call = |method: &str, args: &[&str]| d.call(&dbus_send, method, args);
    let (ok, out) = call("List", &[]);
    assert!(ok && out.contains("array ["), "{out}");
    let (ok, out) = call("Images", &[]);
    assert!(ok && out.contains("array ["), "{out}");
    let (ok, out) = call("Pulls", &[]);
    assert!(ok && out.contains("array ["), "{out}");
    let (ok, out) = call("Prune", &[]);
    assert!(ok && out.contains("removed 0 blobs"), "{out}");

    // Typed errors.
    let (ok, out) = call("Pause", &["string:ghost"]);
    assert!(
        !ok && out.contains("org.steelcup.Vmm1.Error.NoSuchVm") && out.contains("ghost"),
        "{out}"
    );
    let (ok, out) = call("Remove", &["string:ghost"]);
    assert!(
        !ok && out.contains("org.steelcup.Vmm1.Error.NoSuchVm"),
        "{out}"
    );
    let (ok, out) = call("Run", &["string:{\"image\":\"oci:/x\",\"bogus\":1}"]);
    assert!(
        !ok && out.contains("org.steelcup.Vmm1.Error.Refused") && out.contains("bogus"),
        "{out}"
    );
    let (ok, out) = call("Run", &["string:not json"]);
    assert!(!ok && out.contains("Refused"), "{out}");
    let (ok, out) = call("Pull", &["string:oci:/nonexistent:latest"]);
    assert!(
        !ok && out.contains("Refused") && out.contains("/nonexistent/index.json"),
        "{out}"
    );
    let (ok, out) = call("RemoveImage", &["string:nothing"]);
    assert!(!ok && out.contains("no image named"), "{out}");
    // Wrong argument types and unknown methods are the bus's errors.
    let (ok, out) = call("Pause", &["uint32:7"]);
    assert!(!ok, "{out}");
    let (ok, out) = call("Explode", &[]);
    assert!(!ok && out.contains("UnknownMethod"), "{out}");

    // A workload made through the API, listed, refused twice, removed.
    let (ok, out) = call(
        "Run",
        &["string:{\"image\":\"oci:/nonexistent:latest\",\"name\":\"web\"}"],
    );
    assert!(ok && out.contains("\"web\""), "{out}");
    let (ok, out) = call(
        "Run",
        &["string:{\"image\":\"oci:/nonexistent:latest\",\"name\":\"web\"}"],
    );
    assert!(!ok && out.contains("exists"), "{out}");
    let t = Instant::now();
    loop {
        let (_, out) = call("List", &[]);
        if out.contains("image failed") {
            assert!(
                out.contains("\"web\"") && out.contains("\"ended\""),
                "{out}"
            );
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the failed pull is not reported: {out}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (ok, out) = call("Remove", &["string:web"]);
    assert!(ok, "{out}");
    let (_, out) = call("List", &[]);
    assert!(!out.contains("\"web\""), "{out}");

    // Still serving after all that; SIGTERM ends it cleanly.
    assert!(call("List", &[]).0);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let t = Instant::now();
    loop {
        if let Some(status) = d.child.try_wait().unwrap() {
            assert!(status.success(), "vmmd exited with {status}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "vmmd did not exit on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGHUP (init's `reload-signal` for vmmd) re-reads the unit files: a
/// new unit with `replicas = 2` gets two workloads, scaling down drops
/// one, a removed unit's go. The VMs cannot boot here (the unit names a
/// kernel that does not exist), which is reported and retried.
#[test]
fn sighup_applies_changed_units() {
    let Some(dbus_send) = dbus_send() else { return };
    let d = start();
    let call = |method: &str, args: &[&str]| d.call(&dbus_send, method, args).1;
    let hup = || {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(d.child.id() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap()
    };
    let until = |what: &str, f: &dyn Fn(&str) -> bool| {
        let t = Instant::now();
        loop {
            let out = call("List", &[]);
            if f(&out) {
                return out;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "{what}: {out}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let unit = |replicas: u32| {
        format!(
            "[microvm]\ncmd = [\"/bin/true\"]\nkernel = \"/nonexistent/vmlinuz\"\nrestart = \"always\"\nreplicas = {replicas}\n"
        )
    };
    // Every state change is a WorkloadChanged signal.
    let (events, seen) = std::sync::mpsc::channel();
    let socket = d.dir.path().join("vmmd.sock");
    std::thread::spawn(move || {
        let p = steelcup_api::vmm1::connect(&socket).unwrap();
        let changes = p.receive_workload_changed().unwrap();
        let _ = events.send("subscribed".into());
        for s in changes {
            let a = s.args().unwrap();
            let _ = events.send(format!("{} {}", a.name, a.state));
        }
    });
    assert_eq!(
        seen.recv_timeout(Duration::from_secs(10)).as_deref(),
        Ok("subscribed")
    );
    let file = d.dir.path().join("units/web.toml");
    std::fs::write(&file, unit(2)).unwrap();
    hup();
    until("two replicas, their failure shown", &|o| {
        o.contains("\"web.1\"") && o.contains("\"web.2\"") && o.contains("/nonexistent/vmlinuz")
    });
    // cup finds vmmd at -H / --host=unix:... (cup is its own crate; `cargo
    // test --workspace` builds it beside vmmd).
    let sock = d.dir.path().join("vmmd.sock");
    let cup = cup_binary("cup's -H check");
    for flag in [
        vec!["-H".to_string(), sock.display().to_string()],
        vec![format!("--host=unix:{}", sock.display())],
    ] {
        let Some(cup) = &cup else { break };
        let out = Command::new(cup)
            .args(&flag)
            .args(["ps", "-a"])
            .env_remove("STEELCUP_VMMD_SOCKET")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("web.2"),
            "{flag:?}: {text}"
        );
    }
    if let Some(cup) = &cup {
        scripts_read_cup_as_they_read_docker(cup, &sock);
        let reg = d.registry.local_addr().unwrap().to_string();
        serve_registry_auth(d.registry.try_clone().unwrap());
        logins_are_kept_on_the_machine(cup, &sock, &d.dir.path().join("state"), &reg);
    }
    let out = call("Tail", &["string:web.1", "uint32:10"]);
    assert!(out.contains("array ["), "{out}");
    let out = call("Tail", &["string:ghost", "uint32:10"]);
    assert!(out.contains("Error.NoSuchVm"), "{out}");

    std::fs::write(&file, unit(1)).unwrap();
    hup();
    until("one replica", &|o| {
        o.contains("\"web.1\"") && !o.contains("\"web.2\"")
    });
    std::fs::remove_file(&file).unwrap();
    hup();
    until("no workload", &|o| !o.contains("\"web"));
    let mut got = Vec::new();
    while !got.contains(&"web.1 removed".to_string()) {
        match seen.recv_timeout(Duration::from_secs(10)) {
            Ok(e) => got.push(e),
            Err(_) => panic!("no \"web.1 removed\" signal; got {got:?}"),
        }
    }
    for e in ["web.1 running", "web.2 running", "web.2 removed"] {
        assert!(got.contains(&e.to_string()), "{e:?} not signalled: {got:?}");
    }
}

/// `cup login` tries the credentials with the registry (`reg`), keeps them
/// in vmmd's state (root's alone) only if it took them, and `cup logout`
/// forgets them, as Docker says it.
fn logins_are_kept_on_the_machine(cup: &Path, sock: &Path, state: &Path, reg: &str) {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let run = |args: &[&str], stdin: &str| {
        let mut child = Command::new(cup)
            .arg("-H")
            .arg(sock)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let file = state.join("registry-logins.json");
    let (code, out) = run(
        &["login", "-u", "fleet", "--password-stdin", reg],
        "wrong\n",
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("incorrect username or password"), "{out}");
    assert!(!file.exists() || !std::fs::read_to_string(&file).unwrap().contains("fleet"));
    // A registry no one answers at is an error too, not a login.
    let (code, out) = run(
        &["login", "-u", "fleet", "--password-stdin", "127.0.0.1:1"],
        "s3cret\n",
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("cannot reach 127.0.0.1:1"), "{out}");
    let (code, out) = run(
        &["login", "-u", "fleet", "--password-stdin", reg],
        "s3cret\n",
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("Login Succeeded"), "{out}");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("fleet") && text.contains("s3cret"), "{text}");
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Without a terminal or --password-stdin: told how, nothing kept.
    let (code, out) = run(&["login", "-u", "x", "other.example.com"], "");
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("--password-stdin"), "{out}");
    let (code, out) = run(&["logout", reg], "");
    assert_eq!(
        (code, out.trim()),
        (
            Some(0),
            format!("Removing login credentials for {reg}").as_str()
        )
    );
    let (_, out) = run(&["logout", reg], "");
    assert_eq!(out.trim(), format!("Not logged in to {reg}"));
    assert!(!std::fs::read_to_string(&file).unwrap().contains("s3cret"));
}

/// `cup` with Docker's scripting flags against the daemon: names only with
/// `-q`, one JSON object per line, templates, filters, inspect -f, and
/// several names per verb. Flags are refused before anything connects.
fn scripts_read_cup_as_they_read_docker(cup: &Path, sock: &Path) {
    let cup_out = |args: &[&str]| {
        let out = Command::new(cup)
            .arg("-H")
            .arg(sock)
            .args(args)
            .env_remove("STEELCUP_VMMD_SOCKET")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = cup_out(&["ps", "-aq"]);
    assert_eq!((code, out.as_str()), (Some(0), "web.1\nweb.2\n"), "{err}");
    let (_, out, _) = cup_out(&["ps", "-aq", "--filter", "name=b.2"]);
    assert_eq!(out, "web.2\n");
    let (_, out, _) = cup_out(&["ps", "-a", "--format", "{{.Names}}:{{.CPUs}}:{{.Memory}}"]);
    assert_eq!(out, "web.1:1:128MiB\nweb.2:1:128MiB\n");
    let (_, out, _) = cup_out(&["ps", "-a", "--format", "json"]);
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert_eq!(rows[1]["Names"], "web.2");
    let (code, out, err) = cup_out(&[
        "inspect",
        "-f",
        "{{.Name}} {{.State.Running}} {{json .Config.Cmd}}",
        "web.1",
        "web.2",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out,
        "web.1 false [\"/bin/true\"]\nweb.2 false [\"/bin/true\"]\n"
    );
    let (code, _, err) = cup_out(&["inspect", "-f", "{{.State.Nope}}", "web.1"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("no field .State.Nope"), "{err}");
    // Several names: each done is printed; a missing one fails alone.
    let (code, out, err) = cup_out(&["stop", "-t", "0", "web.1", "ghost", "web.2"]);
    assert_eq!((code, out.as_str()), (Some(1), "web.1\nweb.2\n"), "{err}");
    assert!(err.contains("ghost"), "{err}");
    // rename: a cup run workload that has ended (its image cannot be
    // found) takes another name; a unit's cannot.
    let (code, out, err) = cup_out(&[
        "run",
        "-d",
        "--name",
        "lost",
        "oci-archive:/nonexistent/img.tar:latest",
    ]);
    assert_eq!((code, out.as_str()), (Some(0), "lost\n"), "{err}");
    let t = Instant::now();
    while cup_out(&[
        "ps",
        "-q",
        "--filter",
        "status=exited",
        "--filter",
        "name=lost",
    ])
    .1 != "lost\n"
    {
        assert!(t.elapsed() < Duration::from_secs(10), "lost never ended");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, _, err) = cup_out(&["rename", "lost", "found"]);
    assert_eq!(code, Some(0), "{err}");
    let (_, out, _) = cup_out(&["ps", "-aq", "--filter", "name=found"]);
    assert_eq!(out, "found\n");
    let (code, _, err) = cup_out(&["rename", "web.1", "other"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("its unit's"), "{err}");
    let (code, _, err) = cup_out(&["rm", "found"]);
    assert_eq!(code, Some(0), "{err}");
    // Checked before connecting: no socket is needed to be told.
    for (args, says) in [
        (
            vec!["ps", "--filter", "color=red"],
            "name, label, status and ancestor",
        ),
        (vec!["stop", "-t", "soon", "web.1"], "soon"),
        (vec!["run", "-m", "12x", "img"], "512m"),
    ] {
        let out = Command::new(cup)
            .args(["-H", "/nonexistent/vmmd.sock"])
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(says) && !err.contains("cannot reach"),
            "{args:?}: {err}"
        );
        assert_ne!(out.status.code(), Some(0));
    }
}

/// cup, built beside vmmd by `cargo test --workspace`; None (said, for
/// `what`) when it is not there.
fn cup_binary(what: &str) -> Option<PathBuf> {
    let cup = Path::new(env!("CARGO_BIN_EXE_vmmd")).with_file_name("cup");
    if cup.exists() {
        return Some(cup);
    }
    assert!(
        std::env::var_os("STEELCUP_REQUIRE_TOOLS").is_none(),
        "{} is missing: run the tests with --workspace",
        cup.display()
    );
    eprintln!(
        "SKIP: {what}: {} is not built (cargo test --workspace builds it)",
        cup.display()
    );
    None
}

/// A tar of `entries` (path, bytes), as an image archive holds them.
fn tar_of(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in entries {
        let mut h = tar::Header::new_ustar();
        h.set_path(path).unwrap();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

fn sha256(b: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// An OCI archive of one small image named `name`: (archive, layer digest).
fn oci_archive(name: &str, text: &str) -> (Vec<u8>, String) {
    let layer = tar_of(&[("hello".into(), text.as_bytes().to_vec())]);
    let ld = sha256(&layer);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/hello"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{ld}")]},
    }))
    .unwrap();
    let cd = sha256(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{cd}"), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": format!("sha256:{ld}"), "size": layer.len()}],
    }))
    .unwrap();
    let md = sha256(&manifest);
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": format!("sha256:{md}"), "size": manifest.len(),
                       "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": "1"}}],
    }))
    .unwrap();
    let archive = tar_of(&[
        (
            "oci-layout".into(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
        ),
        ("index.json".into(), index),
        (format!("blobs/sha256/{ld}"), layer),
        (format!("blobs/sha256/{cd}"), config),
        (format!("blobs/sha256/{md}"), manifest),
    ]);
    (archive, ld)
}

/// `cup save` and `cup load` against the daemon: an archive loads under
/// its names, saves to a file `skopeo` reads as either transport, comes
/// back through stdin after the image was removed, and a `docker save`
/// layout (made by skopeo) loads too. A corrupt or cut archive is refused
/// naming why, and names nothing.
#[test]
fn images_travel_as_archives() {
    use std::io::Write;
    let d = start();
    let sock = d.dir.path().join("vmmd.sock");
    let Some(cup) = cup_binary("cup save and load") else {
        return;
    };
    let cup_in = |args: &[&str], stdin: Option<&[u8]>| {
        let mut child = Command::new(&cup)
            .arg("-H")
            .arg(&sock)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(data) = stdin {
            let mut w = child.stdin.take().unwrap();
            let _ = w.write_all(data);
        }
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let cup_out = |args: &[&str]| cup_in(args, None);
    let work = d.dir.path();
    let (archive, layer) = oci_archive("docker.io/library/hello:1", "hi from an archive\n");
    std::fs::write(work.join("src.tar"), &archive).unwrap();
    let src = work.join("src.tar").display().to_string();

    let (code, out, err) = cup_out(&["load", "-i", &src]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "Loaded image: docker.io/library/hello:1\n");
    let (_, out, _) = cup_out(&["images", "--format", "{{.Repository}}:{{.Tag}}"]);
    assert!(
        out.contains("docker.io/library/hello:1") || out.contains("hello:1"),
        "{out}"
    );
    // vmmd's counters (cup metrics): the loaded blobs take disk in the
    // store; nothing was pulled, no VM started.
    let counters = steelcup_api::vmm1::connect(&sock)
        .unwrap()
        .counters()
        .unwrap();
    assert!(counters.store_bytes > 0, "{counters:?}");
    assert_eq!(
        (
            counters.pool_hits,
            counters.pool_misses,
            counters.pulls.len()
        ),
        (0, 0, 0),
        "{counters:?}"
    );

    // Saved under its short name, to a file; twice gives the same bytes.
    let saved = work.join("saved.tar");
    let (code, _, err) = cup_out(&["save", "-o", &saved.display().to_string(), "hello:1"]);
    assert_eq!(code, Some(0), "{err}");
    let bytes = std::fs::read(&saved).unwrap();
    let (code, again, _) = cup_out(&["image", "save", "hello:1"]);
    assert_eq!(code, Some(0));
    assert_eq!(again.len(), bytes.len(), "stdout carries the same archive");
    let mut paths = Vec::new();
    for e in tar::Archive::new(&bytes[..]).entries().unwrap() {
        paths.push(e.unwrap().path().unwrap().display().to_string());
    }
    for want in [
        "oci-layout",
        "index.json",
        "manifest.json",
        &format!("blobs/sha256/{layer}"),
    ] {
        assert!(paths.iter().any(|p| p == want), "{want} not in {paths:?}");
    }
    if which("skopeo") {
        for transport in ["oci-archive", "docker-archive"] {
            let out = Command::new("skopeo")
                .args(["inspect", "--raw"])
                .arg(format!("{transport}:{}", saved.display()))
                .output()
                .unwrap();
            assert!(
                out.status.success() && String::from_utf8_lossy(&out.stdout).contains(&layer),
                "skopeo reads the saved archive as {transport}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // Docker's own layout (no index.json), as skopeo writes it.
        let docker = work.join("docker.tar");
        let out = Command::new("skopeo")
            .args(["copy", "--quiet"])
            .arg(format!("oci-archive:{}", saved.display()))
            .arg(format!("docker-archive:{}:team/app:2", docker.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (code, out, err) = cup_out(&["load", "-i", &docker.display().to_string()]);
        assert_eq!(
            (code, out.as_str()),
            (Some(0), "Loaded image: docker.io/team/app:2\n"),
            "{err}"
        );
    } else {
        assert!(
            std::env::var_os("STEELCUP_REQUIRE_TOOLS").is_none(),
            "skopeo is missing"
        );
        eprintln!("SKIP: skopeo's reading of a saved archive: skopeo is not installed");
    }

    // Removed and pruned, it comes back from stdin.
    let (code, _, err) = cup_out(&["rmi", "hello:1"]);
    assert_eq!(code, Some(0), "{err}");
    let (code, out, err) = cup_in(&["load"], Some(&bytes));
    assert_eq!(
        (code, out.as_str()),
        (Some(0), "Loaded image: docker.io/library/hello:1\n"),
        "{err}"
    );

    // Refused, naming why, and nothing named: an unknown image, a layer
    // with one byte changed, an archive cut in half, stdin with nothing.
    let (code, _, err) = cup_out(&["save", "-o", "/dev/null", "nosuch:1"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no image named \"nosuch:1\""), "{err}");
    let (_, before, _) = cup_out(&["images", "-q"]);
    // (A blob the store has already is not read again: this one is new.)
    let (mut bad, _) = oci_archive("docker.io/library/bad:1", "hi from elsewhere\n");
    let at = bad.windows(7).rposition(|w| w == b"hi from").unwrap();
    bad[at] ^= 1;
    let (code, _, err) = cup_in(&["load"], Some(&bad));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("sha256:"), "{err}");
    let (code, _, err) = cup_in(&["load"], Some(&bytes[..bytes.len() / 2]));
    assert_eq!(code, Some(1), "{err}");
    let (code, _, err) = cup_in(&["load"], Some(&[]));
    assert_eq!(code, Some(1), "{err}");
    let (_, after, _) = cup_out(&["images", "-q"]);
    assert_eq!(before, after);
    // Every transfer socket is gone.
    let left: Vec<_> = std::fs::read_dir(work.join("run/streams"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

fn which(tool: &str) -> bool {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .any(|d| d.join(tool).is_file())
}
