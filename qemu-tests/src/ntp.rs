//! An NTP server on this machine for an appliance to set its clock from:
//! Debian's chronyd, started with a config of its own on a free UDP port
//! of 127.0.0.1 (the appliance reaches it at 10.0.2.2 through QEMU's user
//! network). It serves its local clock (`local stratum 8`) and never
//! touches this machine's (`-x`).

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// A running chronyd, stopped on drop.
#[derive(Debug)]
pub struct Chrony {
    child: Child,
    dir: PathBuf,
    pub port: u16,
}

impl Drop for Chrony {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Where chronyd is, if Debian's chrony is installed.
pub fn chronyd() -> Option<PathBuf> {
    ["/usr/sbin/chronyd", "/sbin/chronyd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

impl Chrony {
    pub fn start() -> Result<Chrony> {
        let exe = chronyd().context("chronyd is not installed (Debian package chrony)")?;
        let port = std::net::UdpSocket::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir = std::env::temp_dir().join(format!("steelcup-chrony-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let conf = dir.join("chrony.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\ncmdport 0\nbindaddress 127.0.0.1\nlocal stratum 8\nallow 127.0.0.1\npidfile {0}/chronyd.pid\ndriftfile {0}/drift\n",
                dir.display()
            ),
        )?;
        let mut child = Command::new(exe)
            .arg("-f")
            .arg(&conf)
            .args(["-d", "-x"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start chronyd")?;
        // Serving once an SNTP request is answered.
        let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
        sock.set_read_timeout(Some(std::time::Duration::from_millis(200)))?;
        for _ in 0..50 {
            let mut request = [0u8; 48];
            request[0] = 0x23; // version 4, client
            let _ = sock.send_to(&request, ("127.0.0.1", port));
            let mut buf = [0u8; 128];
            if matches!(sock.recv_from(&mut buf), Ok((n, _)) if n >= 48) {
                return Ok(Chrony { child, dir, port });
            }
            if let Ok(Some(status)) = child.try_wait() {
                bail!("chronyd exited: {status}");
            }
        }
        let _ = child.kill();
        bail!("chronyd did not answer on 127.0.0.1:{port}")
    }
}
