//! `cup volume ls|create|inspect|rm|prune`: the machine's volumes (the
//! disks vmmd keeps for `cup run -v NAME:...` and for units' `volumes`),
//! as `docker volume` shows a host's.

use crate::cli::VolumeCommand;
use crate::error::{usage, CupError};
use crate::view;
use serde_json::{json, Value};
use steelcup_api::vmm1::{Vmm1ClientProxy, VolumeInfo};

pub fn volume(p: &Vmm1ClientProxy<'static>, c: VolumeCommand) -> Result<u8, CupError> {
    match c {
        VolumeCommand::Ls { quiet, format } => {
            let format = view::Format::parse(format.as_deref());
            let vols = p.volumes()?;
            if quiet {
                for v in &vols {
                    println!("{}", v.name);
                }
                return Ok(0);
            }
            let rows: Vec<Value> = vols.iter().map(row).collect();
            view::print_rows(&rows, &format, |rows| {
                println!("{:<32} {:>9} {:>9}  USED BY", "NAME", "SIZE", "ON DISK");
                for r in rows {
                    let f = |k: &str| r[k].as_str().unwrap_or_default().to_string();
                    println!(
                        "{:<32} {:>9} {:>9}  {}",
                        f("Name"),
                        f("Size"),
                        f("Allocated"),
                        match f("UsedBy").as_str() {
                            "" => "-".to_string(),
                            u => u.to_string(),
                        }
                    );
                }
            })?;
            Ok(0)
        }
        VolumeCommand::Create { name, size } => {
            let name = name.unwrap_or_else(fresh_name);
            p.create_volume(&name, size.0)?;
            println!("{name}");
            Ok(0)
        }
        VolumeCommand::Inspect { names, format } => {
            let vols = p.volumes()?;
            view::inspect_each(&names, format.as_deref(), |n| {
                vols.iter()
                    .find(|v| v.name == n)
                    .map(inspect)
                    .ok_or_else(|| usage!("no volume named {n:?}; see `cup volume ls`"))
            })
        }
        VolumeCommand::Rm { names } => {
            let mut failed = false;
            for n in &names {
                match p.remove_volume(n) {
                    Ok(()) => println!("{n}"),
                    Err(e) => {
                        eprintln!("cup: {}", CupError::from(e));
                        failed = true;
                    }
                }
            }
            Ok(u8::from(failed))
        }
        VolumeCommand::Prune { force: _ } => {
            let gone = p.prune_volumes()?;
            println!("Deleted Volumes:");
            print!("{gone}");
            println!("\nTotal: {} volumes", gone.lines().count());
            Ok(0)
        }
    }
}

/// A name for `cup volume create` without one, as Docker makes one: hex.
fn fresh_name() -> String {
    let mut b = [0u8; 8];
    let _ = getrandom(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

/// A volume's fields for `--format`.
fn row(v: &VolumeInfo) -> Value {
    json!({
        "Name": v.name,
        "Driver": "local",
        "Mountpoint": v.path,
        "Size": human(v.size),
        "Allocated": human(v.allocated),
        "UsedBy": v.used_by.join(","),
        "Scope": "local",
    })
}

/// `cup volume inspect`: Docker's keys, and ours.
fn inspect(v: &VolumeInfo) -> Value {
    json!({
        "Name": v.name,
        "Driver": "local",
        "Mountpoint": v.path,
        "Scope": "local",
        "Labels": {},
        "Options": {},
        "UsageData": { "Size": v.allocated, "RefCount": v.used_by.len() },
        "SizeBytes": v.size,
        "UsedBy": v.used_by,
    })
}

fn human(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1}GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1}MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1}KiB", n as f64 / 1024.0),
        n => format!("{n}B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_and_inspect_speak_dockers_keys() {
        let v = VolumeInfo {
            name: "data".into(),
            path: "/var/lib/steelcup/volumes/_named/data.img".into(),
            size: 1 << 30,
            allocated: 33 << 20,
            used_by: vec!["web".into(), "job".into()],
        };
        let r = row(&v);
        assert_eq!(r["Size"], "1.0GiB");
        assert_eq!(r["Allocated"], "33.0MiB");
        assert_eq!(r["UsedBy"], "web,job");
        let i = inspect(&v);
        assert_eq!(i["Mountpoint"], v.path);
        assert_eq!(i["UsageData"]["RefCount"], 2);
        assert_eq!(fresh_name().len(), 16);
    }
}
