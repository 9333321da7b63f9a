//! Remote administration without SSH: `cup --remote HOST:PORT` speaks to a
//! machine's APIs over mutual TLS (docs/remote.md).
//!
//! # Design
//! `vmmd admin` (a service unit the machine config installs) listens on a
//! TCP port with TLS. A client must present a certificate signed by the
//! machine's client CA; the server presents its own, which the client
//! checks against the CA it was given. After the handshake the client names
//! what it wants in one line, and the gateway answers `ok` and then relays
//! bytes both ways to the local Unix socket:
//!
//! - `init`: init's API (`org.steelcup.Init1`, `RUN_DIR/init.sock`);
//! - `vmmd`: vmmd's API (`org.steelcup.Vmm1`, `RUN_DIR/vmmd.sock`);
//! - `vsock NAME`: workload NAME's vsock socket, for `cup run`/`exec`/
//!   `attach` stdio;
//! - `stream NAME`: one of vmmd's one-use transfer sockets (`cup save`,
//!   `cup load`; [`crate::transfer`]);
//! - `upload BYTES`: a file streamed to the machine (`cup --remote ...
//!   update FILE|URL`): after `ok` the client sends exactly BYTES (at most
//!   [`MAX_UPLOAD`]), the gateway writes them to a new file in its upload
//!   directory (the one before is removed) and answers `done PATH`.
//!
//! Anything else gets `error: ...` and the connection is closed. So the
//! APIs are the same D-Bus peer-to-peer protocol as on the machine, and
//! every cup verb works remotely; cup bridges the TLS stream to one end of
//! a Unix socket pair and runs its usual client on the other end.
//!
//! # Limitations
//! There is no per-client authorisation beyond the CA (every client the CA
//! signed is an administrator).

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

/// The files of a TLS directory.
pub const SERVER_CERT: &str = "server.crt";
pub const SERVER_KEY: &str = "server.key";
pub const CLIENT_CA: &str = "client-ca.crt";
pub const CA: &str = "ca.crt";
pub const CLIENT_CERT: &str = "client.crt";
pub const CLIENT_KEY: &str = "client.key";
/// How long connecting, the TLS handshake and the gateway's answer may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The port the gateway listens on by default.
pub const DEFAULT_PORT: u16 = 7443;

/// The largest file `upload` takes (an OS slot image is far smaller).
pub const MAX_UPLOAD: u64 = 1 << 30;

/// Where the gateway keeps an upload by default (on the state partition).
pub const DEFAULT_UPLOAD_DIR: &str = "/var/lib/steelcup/uploads";

/// What went wrong reaching a machine remotely, or serving it.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("{}", path.display())]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{}: no certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}", path.display())]
    Certificate {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{}", path.display())]
    Verifier {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("TLS set-up")]
    Tls(#[source] rustls::Error),
    #[error("unknown target {0:?}: init, vmmd or vsock NAME")]
    UnknownTarget(String),
    #[error("start the runtime")]
    Runtime(#[source] std::io::Error),
    #[error("listen on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no TLS handshake within 10 s")]
    HandshakeTimeout,
    #[error("TLS")]
    Handshake(#[source] std::io::Error),
    #[error("no request within 10 s")]
    RequestTimeout,
    #[error("read the request")]
    ReadRequest(#[source] std::io::Error),
    #[error("{}", path.display())]
    Local {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("relay")]
    Relay(#[source] std::io::Error),
    #[error("{host}: not a host name or address")]
    HostName {
        host: String,
        #[source]
        source: rustls::pki_types::InvalidDnsNameError,
    },
    #[error("connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS with {addr}")]
    TlsWith {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr} closed the connection (is this client's certificate signed by the machine's client CA?)")]
    Closed { addr: String },
    #[error("{addr}: {said}")]
    Refused { addr: String, said: String },
    #[error("the remote connection ended")]
    Ended,
    #[error("upload {0:?}: not a size of at most {MAX_UPLOAD} bytes")]
    UploadSize(String),
    #[error("upload into {}", path.display())]
    Upload {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the upload ended after {got} of {want} bytes")]
    UploadShort { got: u64, want: u64 },
    #[error("{addr} did not answer within {secs} s")]
    Timeout { addr: String, secs: u64 },
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, RemoteError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|source| RemoteError::Pem {
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(RemoteError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, RemoteError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| RemoteError::Pem {
        path: path.to_path_buf(),
        source,
    })
}

fn roots(path: &Path) -> Result<rustls::RootCertStore, RemoteError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(path)? {
        roots.add(c).map_err(|source| RemoteError::Certificate {
            path: path.to_path_buf(),
            source,
        })?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The gateway's TLS setup from `dir` (server.crt, server.key,
/// client-ca.crt): clients must present a certificate the CA signed.
pub fn server_config(dir: &Path) -> Result<rustls::ServerConfig, RemoteError> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(&dir.join(CLIENT_CA))?),
        provider(),
    )
    .build()
    .map_err(|source| RemoteError::Verifier {
        path: dir.join(CLIENT_CA),
        source,
    })?;
    rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(RemoteError::Tls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&dir.join(SERVER_CERT))?, key(&dir.join(SERVER_KEY))?)
        .map_err(|source| RemoteError::Certificate {
            path: dir.join(SERVER_CERT),
            source,
        })
}

/// Where a request line leads on the machine, or why it is refused.
pub fn target(run_dir: &Path, line: &str) -> Result<PathBuf, RemoteError> {
    match line.split_once(' ') {
        None if line == "init" => Ok(run_dir.join(crate::init1::SOCKET)),
        None if line == "vmmd" => Ok(run_dir.join("vmmd.sock")),
        // vmmd keeps its VMs' sockets in its own run directory,
        // `RUN_DIR/vmmd/vsock` (`vmmd::daemon::DEFAULT_RUN_DIR`).
        Some(("vsock", name)) if steelcup_units::valid_name(name) => Ok(run_dir
            .join("vmmd")
            .join("vsock")
            .join(format!("{name}.sock"))),
        // A one-use transfer socket of vmmd's (`cup save`, `cup load`).
        Some(("stream", name)) if steelcup_units::valid_name(name) => Ok(run_dir
            .join("vmmd")
            .join(crate::transfer::STREAMS_DIR)
            .join(format!("{name}.sock"))),
        _ => Err(RemoteError::UnknownTarget(line.chars().take(64).collect())),
    }
}

/// `vmmd admin --listen ADDR --tls-dir DIR [--run-dir DIR]`: serves until
/// killed.
pub fn serve(
    listen: &str,
    tls_dir: &Path,
    run_dir: &Path,
    upload_dir: &Path,
) -> Result<(), RemoteError> {
    let config = Arc::new(server_config(tls_dir)?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(RemoteError::Runtime)?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|source| RemoteError::Listen {
                addr: listen.to_string(),
                source,
            })?;
        tracing::info!(
            "admin: cup --remote on {} (mutual TLS, clients signed by {})",
            listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            tls_dir.join(CLIENT_CA).display()
        );
        serve_on(
            listener,
            config,
            run_dir.to_path_buf(),
            upload_dir.to_path_buf(),
        )
        .await;
        Ok(())
    })
}

/// Accepts connections on `listener` forever.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
    run_dir: PathBuf,
    upload_dir: PathBuf,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            continue;
        };
        let (acceptor, run_dir) = (acceptor.clone(), run_dir.clone());
        let upload_dir = upload_dir.clone();
        tokio::spawn(async move {
            if let Err(e) = relay(acceptor, tcp, &run_dir, &upload_dir).await {
                tracing::warn!("admin: {peer}: {}", steelcup_sys::error_chain(&e));
            }
        });
    }
}

/// One client: the handshake, its request, then bytes both ways.
async fn relay(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    run_dir: &Path,
    upload_dir: &Path,
) -> Result<(), RemoteError> {
    let handshake = tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp));
    let tls = handshake
        .await
        .map_err(|_| RemoteError::HandshakeTimeout)?
        .map_err(RemoteError::Handshake)?;
    let mut tls = tokio::io::BufReader::new(tls);
    let mut line = String::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        (&mut tls).take(256).read_line(&mut line).await
    });
    read.await
        .map_err(|_| RemoteError::RequestTimeout)?
        .map_err(RemoteError::ReadRequest)?;
    let line = line.trim_end();
    if let Some(size) = line.strip_prefix("upload ") {
        let done = receive_upload(&mut tls, size, upload_dir).await;
        let answer = match &done {
            Ok(path) => format!("done {}\n", path.display()),
            Err(e) => format!("error: {}\n", steelcup_sys::error_chain(e)),
        };
        let _ = tls.write_all(answer.as_bytes()).await;
        let _ = tls.flush().await;
        return done.map(|path| tracing::info!("admin: received {}", path.display()));
    }
    let path = match target(run_dir, line) {
        Ok(p) => p,
        Err(e) => {
            let _ = tls.write_all(format!("error: {e}\n").as_bytes()).await;
            return Err(e);
        }
    };
    let mut local = match tokio::net::UnixStream::connect(&path).await {
        Ok(s) => s,
        Err(source) => {
            let e = RemoteError::Local { path, source };
            let said = steelcup_sys::error_chain(&e);
            let _ = tls.write_all(format!("error: {said}\n").as_bytes()).await;
            return Err(e);
        }
    };
    tls.write_all(b"ok\n").await.map_err(RemoteError::Relay)?;
    tls.flush().await.map_err(RemoteError::Relay)?;
    tracing::debug!("admin: relaying to {}", path.display());
    let _ = tokio::io::copy_bidirectional(&mut tls, &mut local).await;
    Ok(())
}

/// `upload SIZE`: exactly SIZE bytes from `tls` into a new file in
/// `dir` (the upload before is removed first: the directory holds one).
async fn receive_upload<S>(
    tls: &mut tokio::io::BufReader<S>,
    size: &str,
    dir: &Path,
) -> Result<PathBuf, RemoteError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let want: u64 = size
        .parse()
        .ok()
        .filter(|n| (1..=MAX_UPLOAD).contains(n))
        .ok_or_else(|| RemoteError::UploadSize(size.chars().take(32).collect()))?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RemoteError::Upload { path, source }
    };
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let path = dir.join(format!("upload-{stamp}.img"));
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io(&path))?
    };
    let mut file = tokio::fs::File::from_std(file);
    tls.write_all(b"ok\n").await.map_err(RemoteError::Relay)?;
    tls.flush().await.map_err(RemoteError::Relay)?;
    let copied = tokio::io::copy(&mut tls.take(want), &mut file).await;
    let result = match copied {
        Ok(got) if got == want => file.sync_all().await.map_err(io(&path)),
        Ok(got) => Err(RemoteError::UploadShort { got, want }),
        Err(source) => Err(RemoteError::Upload {
            path: path.clone(),
            source,
        }),
    };
    match result {
        Ok(()) => Ok(path),
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            Err(e)
        }
    }
}

/// Where cup reaches a remote machine, and with what.
#[derive(Debug, Clone)]
pub struct Remote {
    /// `HOST:PORT` (or `HOST`, port [`DEFAULT_PORT`]).
    pub addr: String,
    /// ca.crt (checks the server), client.crt and client.key.
    pub tls_dir: PathBuf,
}

/// Set once by cup (`--remote`): every API and stdio connection goes
/// there.
pub static REMOTE: std::sync::OnceLock<Remote> = std::sync::OnceLock::new();

impl Remote {
    /// `host:port` with the default port when none is given.
    fn host_port(&self) -> (String, String) {
        match self.addr.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && !h.ends_with(':') => {
                (h.trim_matches(['[', ']']).to_string(), format!("{h}:{p}"))
            }
            _ => (
                self.addr.trim_matches(['[', ']']).to_string(),
                format!("{}:{DEFAULT_PORT}", self.addr),
            ),
        }
    }

    fn client_config(&self) -> Result<rustls::ClientConfig, RemoteError> {
        let d = &self.tls_dir;
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(RemoteError::Tls)?
            .with_root_certificates(roots(&d.join(CA))?)
            .with_client_auth_cert(certs(&d.join(CLIENT_CERT))?, key(&d.join(CLIENT_KEY))?)
            .map_err(|source| RemoteError::Certificate {
                path: d.join(CLIENT_CERT),
                source,
            })
    }

    /// Streams `len` bytes of `data` to the machine (`upload`); the path
    /// of the file they are in there.
    pub fn upload(&self, data: &mut dyn std::io::Read, len: u64) -> Result<PathBuf, RemoteError> {
        use std::io::{BufRead, Write};
        let mut s = self.open(&format!("upload {len}"))?;
        let sent = std::io::copy(&mut std::io::Read::take(data, len), &mut s)
            .map_err(RemoteError::Relay)?;
        s.flush().map_err(RemoteError::Relay)?;
        if sent != len {
            return Err(RemoteError::UploadShort {
                got: sent,
                want: len,
            });
        }
        let mut answer = String::new();
        std::io::BufReader::new(std::io::Read::take(s, 4096))
            .read_line(&mut answer)
            .map_err(RemoteError::Relay)?;
        let addr = self.addr.clone();
        match answer.trim_end() {
            a if a.starts_with("done ") => Ok(PathBuf::from(&a["done ".len()..])),
            "" => Err(RemoteError::Closed { addr }),
            other => Err(RemoteError::Refused {
                addr,
                said: other.strip_prefix("error: ").unwrap_or(other).to_string(),
            }),
        }
    }

    /// A stream to `target` (`init`, `vmmd`, `vsock NAME`) on the remote
    /// machine: one end of a Unix socket pair whose other end a thread
    /// relays over the TLS connection.
    pub fn open(&self, target: &str) -> Result<UnixStream, RemoteError> {
        let config = Arc::new(self.client_config()?);
        let (host, addr) = self.host_port();
        let name = ServerName::try_from(host.clone()).map_err(|source| RemoteError::HostName {
            host: host.clone(),
            source,
        })?;
        let (ours, theirs) = UnixStream::pair().map_err(RemoteError::Relay)?;
        let (tx, rx) = std::sync::mpsc::channel::<Result<(), RemoteError>>();
        let request = format!("{target}\n");
        let addr_shown = addr.clone();
        std::thread::Builder::new()
            .name("remote".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(RemoteError::Runtime(e)));
                        return;
                    }
                };
                rt.block_on(async move {
                    let setup = async {
                        let tcp =
                            tokio::net::TcpStream::connect(&addr)
                                .await
                                .map_err(|source| RemoteError::Connect {
                                    addr: addr.clone(),
                                    source,
                                })?;
                        let tls_err = |source| RemoteError::TlsWith {
                            addr: addr.clone(),
                            source,
                        };
                        let tls = tokio_rustls::TlsConnector::from(config)
                            .connect(name, tcp)
                            .await
                            .map_err(tls_err)?;
                        let mut tls = tokio::io::BufReader::new(tls);
                        tls.write_all(request.as_bytes()).await.map_err(tls_err)?;
                        tls.flush().await.map_err(tls_err)?;
                        let mut answer = String::new();
                        (&mut tls)
                            .take(1024)
                            .read_line(&mut answer)
                            .await
                            .map_err(tls_err)?;
                        match answer.trim_end() {
                            "ok" => Ok(tls),
                            "" => Err(RemoteError::Closed { addr: addr.clone() }),
                            other => Err(RemoteError::Refused {
                                addr: addr.clone(),
                                said: other.strip_prefix("error: ").unwrap_or(other).to_string(),
                            }),
                        }
                    };
                    // A machine that accepts the connection (QEMU's port
                    // forwarding always does) but never answers is an
                    // error, not a wait without end.
                    let answered = tokio::time::timeout(CONNECT_TIMEOUT, setup).await;
                    let mut tls = match answered {
                        Ok(Ok(t)) => t,
                        Ok(Err(e)) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                        Err(_) => {
                            let _ = tx.send(Err(RemoteError::Timeout {
                                addr: addr_shown,
                                secs: CONNECT_TIMEOUT.as_secs(),
                            }));
                            return;
                        }
                    };
                    let local = theirs
                        .set_nonblocking(true)
                        .and_then(|_| tokio::net::UnixStream::from_std(theirs));
                    let mut local = match local {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = tx.send(Err(RemoteError::Relay(e)));
                            return;
                        }
                    };
                    let _ = tx.send(Ok(()));
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut local).await;
                });
            })
            .map_err(RemoteError::Relay)?;
        rx.recv().map_err(|_| RemoteError::Ended)??;
        Ok(ours)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A CA, a server certificate for 127.0.0.1 and a client certificate,
    /// in the layout of a TLS directory; and a client of another CA.
    fn certs_in(dir: &Path) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let server_key = KeyPair::generate().unwrap();
        let server = CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&server_key, &issuer)
            .unwrap();
        let client_key = KeyPair::generate().unwrap();
        let client = CertificateParams::new(vec!["admin".to_string()])
            .unwrap()
            .signed_by(&client_key, &issuer)
            .unwrap();
        let w = |n: &str, s: String| std::fs::write(dir.join(n), s).unwrap();
        w(SERVER_CERT, server.pem());
        w(SERVER_KEY, server_key.serialize_pem());
        w(CLIENT_CA, ca_cert.pem());
        w(CA, ca_cert.pem());
        w(CLIENT_CERT, client.pem());
        w(CLIENT_KEY, client_key.serialize_pem());
    }

    #[test]
    fn a_client_the_ca_signed_reaches_the_local_sockets_and_others_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join("tls");
        let run = dir.path().join("run");
        std::fs::create_dir_all(&tls).unwrap();
        std::fs::create_dir_all(run.join("vmmd/vsock")).unwrap();
        certs_in(&tls);
        // init's socket: an echo server.
        let init = std::os::unix::net::UnixListener::bind(run.join("init.sock")).unwrap();
        std::thread::spawn(move || {
            for s in init.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut s = s;
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let config = Arc::new(server_config(&tls).unwrap());
        let rt = tokio::runtime::Runtime::new().unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        rt.spawn(serve_on(listener, config, run.clone(), run.join("uploads")));

        let remote = Remote {
            addr: format!("127.0.0.1:{port}"),
            tls_dir: tls.clone(),
        };
        let mut s = remote.open("init").unwrap();
        s.write_all(b"hello init").unwrap();
        let mut back = [0u8; 10];
        s.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"hello init");

        let e = remote.open("/etc/shadow").unwrap_err().to_string();
        assert!(e.contains("unknown target \"/etc/shadow\""), "{e}");
        let e = remote.open("vsock ../init").unwrap_err().to_string();
        assert!(e.contains("unknown target"), "{e}");
        let e = remote.open("vmmd").unwrap_err().to_string();
        assert!(e.contains("vmmd.sock"), "{e}");

        // A file streamed to the machine lands whole in its upload
        // directory, which keeps only the last one; a size out of bounds
        // or a short stream leaves nothing.
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let first = remote.upload(&mut &data[..], data.len() as u64).unwrap();
        assert_eq!(std::fs::read(&first).unwrap(), data);
        let second = remote.upload(&mut &data[..10], 10).unwrap();
        assert!(!first.exists(), "the upload before is removed");
        assert_eq!(std::fs::read(&second).unwrap(), &data[..10]);
        let e = remote
            .upload(&mut &data[..], MAX_UPLOAD + 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a size"), "{e}");
        let e = remote.upload(&mut &data[..5], 6).unwrap_err().to_string();
        assert!(e.contains("5 of 6"), "{e}");
        // The gateway sees the stream end after the client gave up.
        let t = std::time::Instant::now();
        let left = loop {
            let left: Vec<_> = std::fs::read_dir(run.join("uploads")).unwrap().collect();
            if left.is_empty() || t.elapsed() > std::time::Duration::from_secs(10) {
                break left;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert!(left.is_empty(), "{left:?}");

        // A client of another CA is turned away.
        let other = dir.path().join("other");
        std::fs::create_dir_all(&other).unwrap();
        certs_in(&other);
        std::fs::copy(tls.join(CA), other.join(CA)).unwrap();
        let stranger = Remote {
            addr: format!("127.0.0.1:{port}"),
            tls_dir: other,
        };
        assert!(stranger.open("init").is_err());
        assert_eq!(
            target(&run, "vsock web.1").unwrap(),
            run.join("vmmd/vsock/web.1.sock")
        );
        assert_eq!(
            target(&run, "stream load-7").unwrap(),
            run.join("vmmd/streams/load-7.sock")
        );
        assert!(target(&run, "stream ../vsock/web").is_err());
    }
}
