//! `cup system df` and `cup system prune`: what the machine's images,
//! workloads and volumes hold, and taking back what nothing uses — as
//! `docker system` does for a host.

use crate::error::CupError;
use std::collections::BTreeSet;
use steelcup_api::human;
use steelcup_api::vmm1::{ImageInfo, VmInfo, Vmm1ClientProxy, VolumeInfo, WorkloadState};

/// One line of `df`: total, active, bytes, reclaimable bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    pub kind: &'static str,
    pub total: usize,
    pub active: usize,
    pub size: u64,
    pub reclaimable: u64,
}

/// The images a workload names (so neither `-a` nor a prune takes them).
fn used_images(vms: &[VmInfo]) -> BTreeSet<&str> {
    vms.iter()
        .map(|v| v.image.as_str())
        .filter(|i| !i.is_empty())
        .collect()
}

fn ended(v: &VmInfo) -> bool {
    v.state() == Some(WorkloadState::Ended)
}

/// `df`'s lines from what vmmd lists.
pub fn usage(images: &[ImageInfo], vms: &[VmInfo], vols: &[VolumeInfo]) -> Vec<Usage> {
    let used = used_images(vms);
    let sum = |it: &mut dyn Iterator<Item = u64>| it.sum::<u64>();
    vec![
        Usage {
            kind: "Images",
            total: images.len(),
            active: images
                .iter()
                .filter(|i| used.contains(i.name.as_str()))
                .count(),
            size: sum(&mut images.iter().map(|i| i.size)),
            reclaimable: sum(&mut images
                .iter()
                .filter(|i| !used.contains(i.name.as_str()))
                .map(|i| i.size)),
        },
        Usage {
            kind: "Workloads",
            total: vms.len(),
            active: vms.iter().filter(|v| !ended(v)).count(),
            // Guest memory of those that run: what they hold of the host.
            size: sum(&mut vms
                .iter()
                .filter(|v| !ended(v))
                .map(|v| u64::from(v.memory_mib) << 20)),
            reclaimable: 0,
        },
        Usage {
            kind: "Volumes",
            total: vols.len(),
            active: vols.iter().filter(|v| !v.used_by.is_empty()).count(),
            size: sum(&mut vols.iter().map(|v| v.allocated)),
            reclaimable: sum(&mut vols
                .iter()
                .filter(|v| v.used_by.is_empty() && !v.name.contains('/'))
                .map(|v| v.allocated)),
        },
    ]
}

pub fn df(p: &Vmm1ClientProxy<'static>) -> Result<u8, CupError> {
    let lines = usage(&p.images()?, &p.list()?, &p.volumes()?);
    println!(
        "{:<12} {:>7} {:>7} {:>11} {:>18}",
        "TYPE", "TOTAL", "ACTIVE", "SIZE", "RECLAIMABLE"
    );
    for u in lines {
        let pct = (u.reclaimable * 100).checked_div(u.size).unwrap_or(0);
        println!(
            "{:<12} {:>7} {:>7} {:>11} {:>18}",
            u.kind,
            u.total,
            u.active,
            human(u.size),
            format!("{} ({pct}%)", human(u.reclaimable))
        );
    }
    Ok(0)
}

/// `cup system prune [-a] [--volumes]`: ended `cup run` workloads (a
/// unit's stay: its file brings it back), then with `-a` the names of
/// images no workload uses, then the store's unused blobs and root
/// images, then with `--volumes` the named volumes nothing names.
pub fn prune(p: &Vmm1ClientProxy<'static>, all: bool, volumes: bool) -> Result<u8, CupError> {
    let vms = p.list()?;
    let mut removed = 0;
    for v in vms.iter().filter(|v| ended(v) && v.unit.is_empty()) {
        match p.remove(&v.name) {
            Ok(()) => {
                println!("removed workload {}", v.name);
                removed += 1;
            }
            Err(e) => eprintln!("cup: {}", CupError::from(e)),
        }
    }
    if all {
        let vms = p.list()?;
        let used = used_images(&vms);
        for i in p.images()? {
            if !used.contains(i.name.as_str()) && p.remove_image(&i.name).is_ok() {
                println!("untagged {}", i.name);
            }
        }
    }
    println!("{}", p.prune()?);
    if volumes {
        for v in p.prune_volumes()?.lines() {
            println!("removed volume {v}");
        }
    }
    println!("{removed} workloads removed");
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn df_counts_what_is_used_and_what_is_not() {
        let img = |name: &str, size| ImageInfo {
            name: name.into(),
            digest: "sha256:00".into(),
            size,
            rootfs: true,
        };
        let vm = |name: &str, state: &str, image: &str| VmInfo {
            name: name.into(),
            state: state.into(),
            last_outcome: String::new(),
            exit_code: -1,
            health: String::new(),
            unit: String::new(),
            pid: 0,
            runs: 1,
            vcpus: 1,
            memory_mib: 128,
            address: String::new(),
            image: image.into(),
            labels: Default::default(),
        };
        let vol = |name: &str, used: bool| VolumeInfo {
            name: name.into(),
            path: String::new(),
            size: 1 << 30,
            allocated: 10 << 20,
            used_by: if used { vec!["w".into()] } else { vec![] },
        };
        let u = usage(
            &[img("nginx:1", 1000), img("old:1", 300)],
            &[vm("web", "running", "nginx:1"), vm("job", "ended", "")],
            &[
                vol("data", true),
                vol("spare", false),
                vol("unit/db", false),
            ],
        );
        assert_eq!(
            (u[0].total, u[0].active, u[0].size, u[0].reclaimable),
            (2, 1, 1300, 300)
        );
        assert_eq!((u[1].total, u[1].active, u[1].size), (2, 1, 128 << 20));
        // A unit's unused volume is not reclaimed by a prune.
        assert_eq!(
            (u[2].total, u[2].active, u[2].size, u[2].reclaimable),
            (3, 1, 30 << 20, 10 << 20)
        );
    }
}
