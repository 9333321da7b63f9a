//! The machine itself, as an operator looks at it: `cup dmesg`.

use crate::cli::DmesgArgs;
use crate::error::CupError;
use steelcup_api::init1::Init1Proxy;

/// How often `cup dmesg -w` asks for new records.
const FOLLOW_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// `cup dmesg [-w] [-n N] [-l LEVELS]`.
pub fn dmesg(p: &Init1Proxy<'static>, a: &DmesgArgs) -> Result<u8, CupError> {
    let shown = |r: &(u64, u64, u8, String)| a.level.is_empty() || a.level.contains(&r.2);
    let print = |records: &[(u64, u64, u8, String)]| {
        for r in records.iter().filter(|r| shown(r)) {
            println!("[{:5}.{:06}] {}", r.1 / 1_000_000, r.1 % 1_000_000, r.3);
        }
    };
    let (records, mut next) = p.kernel_log(0, steelcup_os::kmsg::MAX_RECORDS as u32)?;
    let kept: Vec<_> = records.into_iter().filter(|r| shown(r)).collect();
    let from = kept
        .len()
        .saturating_sub(a.tail.map_or(usize::MAX, |n| n as usize));
    print(&kept[from..]);
    if !a.follow {
        return Ok(0);
    }
    loop {
        std::thread::sleep(FOLLOW_EVERY);
        let (records, n) = p.kernel_log(next, steelcup_os::kmsg::MAX_RECORDS as u32)?;
        print(&records);
        next = n;
    }
}
