//! `cup save` and `cup load`: image archives over one-use transfer
//! sockets (`steelcup_api::transfer`).
//!
//! # Design
//! The API call makes a socket under `RUN_DIR/streams/` (mode 0600, in a
//! directory only root reads) and answers its path at once; a thread of its
//! own accepts one client there within [`ACCEPT_WITHIN`], then the socket
//! file goes. The loop never waits on a transfer. Names are checked before
//! the socket is made, so `cup save NOSUCH` fails as the call returns.
//! Reading and writing the store happen on the transfer's thread, as a
//! pull's do; an archive is read into the store before any name is given,
//! so a load cut short leaves only blobs the next prune takes.
//!
//! # Limitations
//! A prune during a load can take blobs the load has put but not yet
//! named; the load then fails naming the blob, and can be repeated.

use super::*;
use crate::image::archive::{self, Archive};
use crate::image::store::{Digest, Store};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicU64, Ordering};
use steelcup_api::transfer::{Framed, Unframed, STREAMS_DIR};
use steelcup_api::vmm1::Loaded;

/// How long a transfer socket waits for its client.
const ACCEPT_WITHIN: Duration = Duration::from_secs(60);
/// How long one read or write of a transfer may stall.
const STALL: Duration = Duration::from_secs(120);
/// What may follow a tar's end inside a load (its padding).
const MAX_TRAILER: u64 = 1 << 20;

static NEXT: AtomicU64 = AtomicU64::new(1);

/// A new transfer socket, listening.
fn transfer_socket(opts: &Options, kind: &str) -> Result<(UnixListener, PathBuf), ApiError> {
    let refused = |what: &str, p: &Path, e: std::io::Error| {
        ApiError::Refused(format!("{what} {}: {e}", p.display()))
    };
    let dir = opts.run_dir.join(STREAMS_DIR);
    std::fs::create_dir_all(&dir).map_err(|e| refused("create", &dir, e))?;
    let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
    // Unique while vmmd runs, and across its restarts (the directory is
    // root's alone, so the name need not be secret).
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let name = format!("{kind}-{}-{nanos:x}", NEXT.fetch_add(1, Ordering::Relaxed));
    let path = dir.join(format!("{name}.sock"));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|e| refused("listen on", &path, e))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| refused("restrict", &path, e))?;
    Ok((listener, path))
}

/// The one client of `listener`, if it comes in time; the socket file is
/// gone either way.
fn accept_one(listener: UnixListener, path: &Path) -> Option<UnixStream> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let ready = {
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        let ms =
            PollTimeout::try_from(ACCEPT_WITHIN.as_millis() as i32).unwrap_or(PollTimeout::MAX);
        matches!(poll(&mut fds, ms), Ok(n) if n > 0)
    };
    let _ = std::fs::remove_file(path);
    if !ready {
        tracing::warn!("{}: no client came; dropped", path.display());
        return None;
    }
    let conn = listener.accept().ok()?.0;
    let _ = conn.set_read_timeout(Some(STALL));
    let _ = conn.set_write_timeout(Some(STALL));
    Some(conn)
}

fn spawn(kind: &str, path: &Path, work: impl FnOnce() + Send + 'static) -> Result<(), ApiError> {
    std::thread::Builder::new()
        .name(kind.into())
        .spawn(work)
        .map(|_| ())
        .map_err(|e| {
            let _ = std::fs::remove_file(path);
            ApiError::Refused(format!("start the {kind}: {e}"))
        })
}

/// `Save`: the named images, resolved now, sent as one archive.
pub(super) fn save(opts: &Options, names: Vec<String>) -> Result<Reply, ApiError> {
    if names.is_empty() {
        return Err(ApiError::Refused("name at least one image to save".into()));
    }
    let store = Store::open(&opts.state_dir)
        .map_err(|e| ApiError::Refused(steelcup_sys::error_chain(&e)))?;
    let mut images: Vec<(String, Digest)> = Vec::new();
    for name in names {
        let stored = store_name(&store, &name);
        let d = store
            .resolve(&stored)
            .map_err(|_| ApiError::Refused(format!("no image named {name:?}; see `cup images`")))?;
        images.push((stored, d));
    }
    let (listener, path) = transfer_socket(opts, "save")?;
    let shown = path.clone();
    spawn("save", &shown, move || {
        let Some(conn) = accept_one(listener, &path) else {
            return;
        };
        let mut out = Framed::new(std::io::BufWriter::new(conn));
        let sent = match archive::write(&store, &images, &mut out) {
            Ok(()) => out.finish().map(drop),
            Err(e) => out.fail(&steelcup_sys::error_chain(&e)).map(drop),
        };
        match sent {
            Ok(()) => tracing::info!(
                "saved {}",
                images
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Err(e) => tracing::warn!("save: the client went away: {e}"),
        }
    })?;
    Ok(Reply::Text(shown.display().to_string()))
}

/// `Load`: an archive read from the client into the store, every image in
/// it named as the archive names it (or by its digest), then the list.
pub(super) fn load(opts: &Options) -> Result<Reply, ApiError> {
    let store = Store::open(&opts.state_dir)
        .map_err(|e| ApiError::Refused(steelcup_sys::error_chain(&e)))?;
    let (listener, path) = transfer_socket(opts, "load")?;
    let shown = path.clone();
    spawn("load", &shown, move || {
        let Some(conn) = accept_one(listener, &path) else {
            return;
        };
        let Ok(answer_to) = conn.try_clone() else {
            return;
        };
        let loaded = load_from(&store, Unframed::new(std::io::BufReader::new(conn)));
        let mut answer = Framed::new(answer_to);
        let sent = match &loaded {
            Ok(list) => {
                let json = serde_json::to_vec(list).unwrap_or_default();
                answer
                    .write_all(&json)
                    .and_then(|()| answer.finish().map(drop))
            }
            Err(why) => answer.fail(why).map(drop),
        };
        match (loaded, sent) {
            (Ok(list), _) => {
                for l in list {
                    tracing::info!("loaded {} as {}", l.digest, l.names.join(", "));
                }
            }
            (Err(why), _) => tracing::warn!("load: {why}"),
        }
    })?;
    Ok(Reply::Text(shown.display().to_string()))
}

/// Reads an archive from `r` and names what it holds.
fn load_from<R: Read>(store: &Store, mut r: Unframed<R>) -> Result<Vec<Loaded>, String> {
    let what = Path::new("the archive sent");
    let archive = Archive::read(store, what, &mut r).map_err(|e| steelcup_sys::error_chain(&e))?;
    // The tar ends before the stream does (its padding); the rest must end
    // properly too, or the archive was cut.
    let rest = std::io::copy(&mut (&mut r).take(MAX_TRAILER + 1), &mut std::io::sink())
        .map_err(|e| format!("{}: {e}", what.display()))?;
    if rest > MAX_TRAILER {
        return Err(format!(
            "{}: more than {MAX_TRAILER} bytes after the archive's end",
            what.display()
        ));
    }
    let images = archive
        .images(store)
        .map_err(|e| steelcup_sys::error_chain(&e))?;
    let mut out = Vec::new();
    for (names, d) in images {
        // An image the archive gives no name keeps its digest as one, so
        // it stays in the store (Docker lists it as <none>).
        let kept = if names.is_empty() {
            vec![d.to_string()]
        } else {
            names.clone()
        };
        for n in &kept {
            store
                .tag(n, &d)
                .map_err(|e| steelcup_sys::error_chain(&e))?;
        }
        out.push(Loaded {
            names,
            digest: d.to_string(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use steelcup_api::transfer::Framed;

    #[test]
    fn a_load_cut_short_names_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // A tar whose stream ends without the end mark.
        let mut w = Framed::new(Vec::new());
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_path("index.json").unwrap();
        h.set_size(2);
        h.set_cksum();
        b.append(&h, &b"{}"[..]).unwrap();
        w.write_all(&b.into_inner().unwrap()).unwrap();
        w.flush().unwrap();
        let mut wire = w.finish().unwrap();
        wire.truncate(wire.len() - 4);
        let e = load_from(&store, Unframed::new(&wire[..])).unwrap_err();
        assert!(e.contains("ended"), "{e}");
        assert!(store.refs().unwrap().is_empty());
    }
}
