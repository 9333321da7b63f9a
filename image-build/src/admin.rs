//! Certificates for remote administration (`cup --remote`, docs/remote.md):
//! a CA, a server certificate for the machines and a client certificate
//! for the administrator, as `cargo xtask admin-certs` writes them.

use anyhow::{Context, Result};
use std::path::Path;

/// Writes into `dir`: `ca.crt` and `ca.key` (keep the key off the
/// machines), the machines' `server.crt` and `server.key` (valid for
/// `names`: host names or IP addresses by which cup reaches them),
/// cup's `client.crt` and `client.key`, and `machine-admin.toml`, the
/// `[admin]` section of a machine config with them filled in.
pub fn certs(dir: &Path, names: &[String]) -> Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    std::fs::create_dir_all(dir)?;
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "steelcup administration CA");
    let ca_cert = ca.self_signed(&ca_key)?;
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca, ca_key);
    let server_key = KeyPair::generate()?;
    let mut server = CertificateParams::new(names.to_vec()).context("server names")?;
    server
        .distinguished_name
        .push(DnType::CommonName, "steelcup machine");
    let server_cert = server.signed_by(&server_key, &issuer)?;
    let client_key = KeyPair::generate()?;
    let mut client = CertificateParams::new(Vec::<String>::new())?;
    client
        .distinguished_name
        .push(DnType::CommonName, "steelcup administrator");
    let client_cert = client.signed_by(&client_key, &issuer)?;
    let write = |name: &str, text: &str, mode: u32| -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let p = dir.join(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&p)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .with_context(|| format!("write {}", p.display()))
    };
    write("ca.crt", &ca_cert.pem(), 0o644)?;
    write("ca.key", &ca_key_pem, 0o600)?;
    write("server.crt", &server_cert.pem(), 0o644)?;
    write("server.key", &server_key.serialize_pem(), 0o600)?;
    write("client.crt", &client_cert.pem(), 0o644)?;
    write("client.key", &client_key.serialize_pem(), 0o600)?;
    write(
        "machine-admin.toml",
        &format!(
            "# The [admin] section of a machine config (docs/provisioning.md):\n\
             # cup --remote reaches the machine with client.crt and client.key.\n\
             [admin]\nlisten = \"0.0.0.0:7443\"\nserver-cert = '''\n{}'''\nserver-key = '''\n{}'''\nclient-ca = '''\n{}'''\n",
            server_cert.pem(),
            server_key.serialize_pem(),
            ca_cert.pem()
        ),
        0o600,
    )?;
    Ok(())
}
