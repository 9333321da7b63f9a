//! A registry on this machine for the QEMU tests: Debian's
//! docker-registry on 127.0.0.1, an image pushed into it by skopeo. The
//! appliance reaches it at 10.0.2.2 (this machine on QEMU's user network).

use anyhow::{bail, Context, Result};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The registry's port on this machine; the units name it (10.0.2.2 is
/// this machine as QEMU's user network shows it to the appliance).
pub const PORT: u16 = 15055;

/// The registry as the appliance names it.
pub const FROM_APPLIANCE: &str = "10.0.2.2:15055";

/// The nginx image, as the appliance names it.
pub const NGINX: &str = "10.0.2.2:15055/steelcup-test/nginx:latest";

/// docker-registry on 127.0.0.1:15055, stopped (and its data removed) on drop.
#[derive(Debug)]
pub struct Registry {
    child: Child,
    dir: std::path::PathBuf,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Registry {
    /// A registry holding the nginx OCI layout `image` as
    /// `steelcup-test/nginx:latest`.
    pub fn with_nginx(image: &str) -> Result<Registry> {
        let dir = std::env::temp_dir().join(format!("steelcup-registry-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{PORT}\n",
                dir.join("data").display()
            ),
        )?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start docker-registry (Debian's docker-registry package)")?;
        let reg = Registry { child, dir };
        let mut up = false;
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", PORT)).is_ok() {
                up = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !up {
            bail!("docker-registry did not listen on 127.0.0.1:{PORT}");
        }
        let out = Command::new("skopeo")
            .args(["copy", "--dest-tls-verify=false"])
            .arg(format!("oci:{image}"))
            .arg(format!(
                "docker://127.0.0.1:{PORT}/steelcup-test/nginx:latest"
            ))
            .output()
            .context("run skopeo")?;
        if !out.status.success() {
            bail!(
                "skopeo copy {image}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(reg)
    }
}
