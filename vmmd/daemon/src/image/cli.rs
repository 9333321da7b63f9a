//! `vmmd image …`: the image store from the command line, on the host
//! itself (the same store vmmd uses, `/var/lib/steelcup` by default).
//!
//! ```text
//! vmmd image pull SOURCE [--insecure HOST[:PORT]]... [--user USER:PASSWORD]
//! vmmd image ls
//! vmmd image rootfs NAME        build (if needed) and print the root image
//! vmmd image rm NAME
//! vmmd image gc
//! ```
//! `--store DIR` picks another store. Credentials may also come from
//! `STEELCUP_REGISTRY_AUTH=USER:PASSWORD`.

use super::source::{self, PullOptions};
use super::store::{Store, StoreError};
use super::workload::PrepareError;
use std::io::Write;
use std::path::PathBuf;

fn usage() -> i32 {
    eprintln!(
        "usage: vmmd image [--store DIR] pull SOURCE [--insecure HOST[:PORT]]... [--user USER:PASSWORD]\n       vmmd image [--store DIR] ls | rootfs NAME | rm NAME | gc"
    );
    2
}

/// Runs `vmmd image ARGS`; returns the exit code.
pub fn main(args: &[String]) -> i32 {
    let mut store_dir = PathBuf::from(crate::daemon::DEFAULT_STATE_DIR);
    let mut opts = PullOptions::default();
    if let Ok(a) = std::env::var("STEELCUP_REGISTRY_AUTH") {
        if let Some((u, p)) = a.split_once(':') {
            opts.credentials = Some((u.to_string(), p.to_string()));
        }
    }
    let mut words = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--store" => match it.next() {
                Some(v) => store_dir = PathBuf::from(v),
                None => return usage(),
            },
            "--insecure" => match it.next() {
                Some(v) => opts.insecure.push(v.clone()),
                None => return usage(),
            },
            "--user" => match it.next().and_then(|v| v.split_once(':')) {
                Some((u, p)) => opts.credentials = Some((u.to_string(), p.to_string())),
                None => return usage(),
            },
            _ => words.push(a.as_str()),
        }
    }
    let store = match Store::open(&store_dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vmmd image: {e}");
            return 1;
        }
    };
    let result: Result<(), PrepareError> = match words.as_slice() {
        ["pull", src] => pull(&store, src, &opts),
        ["ls"] => store.list().map_err(PrepareError::from).map(|list| {
            println!("{:<60} {:<20} {:>10} ROOTFS", "NAME", "DIGEST", "SIZE");
            for i in list {
                println!(
                    "{:<60} {:<20} {:>10} {}",
                    i.name,
                    &i.digest[..19.min(i.digest.len())],
                    human(i.size),
                    if i.rootfs { "built" } else { "-" }
                );
            }
        }),
        ["rootfs", name] => rootfs(&store, name),
        ["rm", name] => match store.untag(name) {
            Ok(true) => Ok(()),
            Ok(false) => Err(StoreError::UnknownImage(name.to_string()).into()),
            Err(e) => Err(e.into()),
        },
        ["gc"] => store.gc().map_err(PrepareError::from).map(|r| {
            println!(
                "removed {} blobs, {} root images, {} temporary files ({})",
                r.blobs,
                r.rootfs,
                r.tmp,
                human(r.bytes)
            );
        }),
        _ => return usage(),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("vmmd image: {e}");
            1
        }
    }
}

fn pull(store: &Store, src: &str, opts: &PullOptions) -> Result<(), PrepareError> {
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last = std::time::Instant::now();
    let mut report = |p: source::Progress| {
        let finished = p.done == p.total;
        if tty && (finished || last.elapsed().as_millis() > 100) {
            last = std::time::Instant::now();
            let width = 30;
            let filled = (p.done * width as u64)
                .checked_div(p.total)
                .map_or(width, |f| f as usize);
            let _ = write!(
                std::io::stderr(),
                "\r{} [{}{}] {}/{}{}",
                &p.digest[..19.min(p.digest.len())],
                "#".repeat(filled),
                " ".repeat(width - filled),
                human(p.done),
                human(p.total),
                if finished { "\n" } else { "" }
            );
        }
    };
    let (name, digest) = source::pull(store, src, opts, &mut report)?;
    println!("{name} {digest}");
    Ok(())
}

fn rootfs(store: &Store, name: &str) -> Result<(), PrepareError> {
    let d = store.resolve(name)?;
    let image = store.image(&d)?;
    let started = std::time::Instant::now();
    let path = store.rootfs(&image)?;
    println!("{}", path.display());
    eprintln!("({} ms)", started.elapsed().as_millis());
    Ok(())
}

pub use steelcup_api::human;
