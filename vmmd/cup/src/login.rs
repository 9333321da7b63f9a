//! `cup login` and `cup logout`: registry credentials kept on the machine
//! (by vmmd, mode 0600 on its state partition) for the pulls it makes, as
//! `docker login` keeps them for a host's.

use crate::error::{usage, CupError};
use std::io::{BufRead, IsTerminal, Write};
use steelcup_api::vmm1::Vmm1ClientProxy;

pub struct LoginArgs {
    pub registry: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub password_stdin: bool,
}

pub fn login(p: &Vmm1ClientProxy<'static>, a: LoginArgs) -> Result<u8, CupError> {
    let registry = a.registry.unwrap_or_else(|| "docker.io".into());
    let stdin = std::io::stdin();
    let (user, password) = match (a.username, a.password, a.password_stdin) {
        (Some(u), Some(pw), false) => {
            eprintln!(
                "WARNING! Using --password on the command line is insecure: use --password-stdin."
            );
            (u, pw)
        }
        (Some(u), None, true) => {
            let mut line = String::new();
            stdin
                .lock()
                .read_line(&mut line)
                .map_err(|e| usage!("reading the password on stdin: {e}"))?;
            (u, line.trim_end_matches(['\r', '\n']).to_string())
        }
        (None, _, true) => return Err(usage!("--password-stdin needs --username")),
        (u, None, false) if stdin.is_terminal() => {
            let u = match u {
                Some(u) => u,
                None => prompt("Username: ", true)?,
            };
            (u, prompt("Password: ", false)?)
        }
        _ => {
            return Err(usage!(
                "give the password with --password-stdin (or run cup login at a terminal)"
            ))
        }
    };
    let kept = p.login(&registry, &user, &password)?;
    println!("Login Succeeded: the machine's pulls from {kept} use it (kept on the machine, readable by root only)");
    Ok(0)
}

pub fn logout(p: &Vmm1ClientProxy<'static>, registry: Option<String>) -> Result<u8, CupError> {
    let registry = registry.unwrap_or_else(|| "docker.io".into());
    match p.logout(&registry)?.as_str() {
        "" => println!("Not logged in to {registry}"),
        r => println!("Removing login credentials for {r}"),
    }
    Ok(0)
}

/// Reads a line at the terminal; the password without echo.
fn prompt(what: &str, echo: bool) -> Result<String, CupError> {
    use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
    eprint!("{what}");
    let _ = std::io::stderr().flush();
    let stdin = std::io::stdin();
    let saved = tcgetattr(&stdin).ok();
    if let (false, Some(t)) = (echo, &saved) {
        let mut quiet = t.clone();
        quiet.local_flags.remove(LocalFlags::ECHO);
        let _ = tcsetattr(&stdin, SetArg::TCSANOW, &quiet);
    }
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    if let (false, Some(t)) = (echo, &saved) {
        let _ = tcsetattr(&stdin, SetArg::TCSANOW, t);
        eprintln!();
    }
    read.map_err(|e| usage!("reading {what}{e}"))?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}
