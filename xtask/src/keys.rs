//! `cargo xtask update-key` and `cargo xtask admin-certs`: the keys and
//! certificates for signed updates and remote administration.

use crate::*;

/// `cargo xtask update-key DIR`: a new update key pair in DIR,
/// `update.key` (the signing key: keep it on the build machine) and
/// `update.pub` (for `[host] update-key` or a machine config).
pub(crate) fn update_key(dir: Option<&str>) -> Result<()> {
    let dir = Path::new(dir.context("update-key needs the directory to write the key pair into")?);
    std::fs::create_dir_all(dir)?;
    let (seed, public) = image_build::disk::new_update_key()?;
    let key = dir.join("update.key");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key)
            .with_context(|| {
                format!("create {} (an old key is never overwritten)", key.display())
            })?;
        f.write_all(format!("{seed}\n").as_bytes())?;
    }
    std::fs::write(dir.join("update.pub"), format!("{public}\n"))?;
    eprintln!(
        "update key: {} (signing key, keep it secret) and {} (public: {public})",
        key.display(),
        dir.join("update.pub").display()
    );
    Ok(())
}

/// `cargo xtask admin-certs DIR HOST...`: certificates for `cup
/// --remote` (docs/remote.md): the machines' valid for each HOST (a name
/// or an address), cup's, their CA, and the `[admin]` section of a
/// machine config.
pub(crate) fn admin_certs(args: &[String]) -> Result<()> {
    let (dir, names) = args
        .split_first()
        .context("admin-certs needs a directory and the host names or addresses of the machines")?;
    if names.is_empty() {
        bail!("admin-certs needs the host names or addresses cup reaches the machines by");
    }
    image_build::admin::certs(Path::new(dir), names)?;
    eprintln!(
        "admin certificates in {dir}: put machine-admin.toml's [admin] into the machine config; \
         cup --remote HOST --tls-dir {dir} uses ca.crt, client.crt and client.key"
    );
    Ok(())
}

/// The signing key `cargo xtask disk` signs the OS slot with:
/// `$STEELCUP_UPDATE_SIGNING_KEY`, a file from `cargo xtask update-key`.
pub(crate) fn signing_key() -> Result<Option<ed25519_dalek::SigningKey>> {
    std::env::var_os("STEELCUP_UPDATE_SIGNING_KEY")
        .map(|p| image_build::disk::read_signing_key(Path::new(&p)))
        .transpose()
}
