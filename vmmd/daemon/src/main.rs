//! `vmmd`: steelcup's VMM daemon. `vmmd [--units DIR] [--kernel PATH]
//! [--initramfs PATH] [--state DIR] [--warm-pool vcpus=N,memory=SIZE,count=N]
//! [--network none | bridge=NAME,subnet=CIDR,mtu=N,domain=NAME]`
//! runs the daemon; `vmmd worker NAME` is
//! the per-VM worker process the daemon starts (config on stdin; NAME only
//! shows in `ps`); `vmmd image …` works the image store (see
//! [`vmmd::image::cli`]).

use std::path::PathBuf;

fn main() {
    let mut args = std::env::args().skip(1);
    let first = args.next();
    if first.as_deref() == Some("worker") {
        std::process::exit(steelcup_vmm::worker::main());
    }
    if first.as_deref() == Some("bench") {
        let rest: Vec<String> = args.collect();
        std::process::exit(vmmd::bench::main(&rest));
    }
    if first.as_deref() == Some("bench-start") {
        let rest: Vec<String> = args.collect();
        std::process::exit(vmmd::bench_start::main(&rest));
    }
    if first.as_deref() == Some("image") {
        let rest: Vec<String> = args.collect();
        std::process::exit(vmmd::image::cli::main(&rest));
    }
    if first.as_deref() == Some("admin") {
        steelcup_os::logging::init_logging();
        let rest: Vec<String> = args.collect();
        std::process::exit(admin(&rest));
    }
    if first.as_deref() == Some("selftest") {
        std::process::exit(steelcup_vmm::selftest::main());
    }
    steelcup_os::logging::init_logging();
    let mut opts = vmmd::daemon::default_options(&PathBuf::from("/etc/steelcup/units"));
    let mut registries = PathBuf::from(vmmd::image::registries::DEFAULT_PATH);
    let mut next = first;
    while let Some(a) = next {
        let mut value = |flag: &str| {
            args.next().map(PathBuf::from).unwrap_or_else(|| {
                eprintln!("vmmd: {flag} needs a path");
                std::process::exit(2)
            })
        };
        match a.as_str() {
            "--units" => opts.units = value("--units"),
            "--kernel" => opts.kernel = value("--kernel"),
            "--initramfs" => opts.initramfs = value("--initramfs"),
            "--state" => opts.state_dir = value("--state"),
            "--run-dir" => opts.run_dir = value("--run-dir"),
            "--api-socket" => opts.api_socket = value("--api-socket"),
            "--warm-pool" => {
                let v = value("--warm-pool").display().to_string();
                match vmmd::pool::PoolSpec::try_from(v.as_str()) {
                    Ok(p) => opts.warm_pool.push(p),
                    Err(e) => {
                        eprintln!("vmmd: --warm-pool: {e}");
                        std::process::exit(2);
                    }
                }
            }
            "--network" => {
                let v = value("--network").display().to_string();
                match vmmd::net::NetOptions::parse(&v) {
                    Ok(n) => opts.network = n,
                    Err(e) => {
                        eprintln!("vmmd: --network {v:?}: {e}");
                        std::process::exit(2);
                    }
                }
            }
            "--registries" => registries = value("--registries"),
            "--insecure-registry" => opts
                .insecure_registries
                .push(value("--insecure-registry").display().to_string()),
            "-h" | "--help" => {
                println!("usage: vmmd [--units DIR] [--kernel PATH] [--initramfs PATH] [--state DIR] [--run-dir DIR] [--api-socket PATH] [--insecure-registry HOST[:PORT]]... [--registries FILE] [--warm-pool vcpus=N,memory=SIZE,count=N]... [--network none | bridge=NAME,subnet=CIDR,mtu=N,domain=NAME]\n       vmmd worker NAME (started by vmmd; VM config as JSON on stdin)\n       vmmd image pull SOURCE | ls | rootfs NAME | rm NAME | gc (the image store)\n       vmmd admin [--listen ADDR] [--tls-dir DIR] [--run-dir DIR] (cup --remote's gateway: the APIs over mutual TLS)\n       vmmd selftest (a tiny guest checks KVM and exit handling)\n       vmmd bench [--rounds N] [--memory MIB] [--qemu PATH] (this VMM beside QEMU microvm)\n       vmmd bench-start [--rounds N] [--parallel N] IMAGE [CMD...] (cup run cold vs from the warm pool, on a running host)");
                return;
            }
            other => {
                eprintln!("vmmd: unknown argument {other:?}; see --help");
                std::process::exit(2);
            }
        }
        next = args.next();
    }
    // Each API client and each VM's worker is a few descriptors.
    steelcup_sys::raise_nofile(65536);
    // Credentials and plain-HTTP registries (docs/provisioning.md); a bad
    // file is said and pulls go on without it. Read again on SIGHUP.
    opts.registries = vmmd::daemon::load_registries(&registries);
    opts.registries_file = Some(registries);
    opts.logins = vmmd::image::registries::Logins::load(
        &opts.state_dir.join(vmmd::image::registries::LOGINS_FILE),
    );
    if let Err(e) = vmmd::daemon::run(opts) {
        tracing::error!("fatal: {}", steelcup_sys::error_chain(&e));
        std::process::exit(1);
    }
}

/// `vmmd admin [--listen ADDR] [--tls-dir DIR] [--run-dir DIR]
/// [--upload-dir DIR]`: cup
/// --remote's gateway (docs/remote.md).
fn admin(args: &[String]) -> i32 {
    let mut listen = format!("0.0.0.0:{}", steelcup_api::remote::DEFAULT_PORT);
    let mut tls_dir = PathBuf::from("/etc/steelcup/admin");
    let mut run_dir = PathBuf::from("/run/steelcup");
    let mut upload_dir = PathBuf::from(steelcup_api::remote::DEFAULT_UPLOAD_DIR);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let Some(v) = it.next() else {
            eprintln!("vmmd admin: {a} needs a value");
            return 2;
        };
        match a.as_str() {
            "--listen" => listen = v.clone(),
            "--tls-dir" => tls_dir = v.into(),
            "--run-dir" => run_dir = v.into(),
            "--upload-dir" => upload_dir = v.into(),
            other => {
                eprintln!("vmmd admin: unknown argument {other:?}");
                return 2;
            }
        }
    }
    match steelcup_api::remote::serve(&listen, &tls_dir, &run_dir, &upload_dir) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("admin: {}", steelcup_sys::error_chain(&e));
            1
        }
    }
}
