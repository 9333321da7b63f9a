//! `vmmd`: steelcup's VMM daemon. `vmmd [--units DIR] [--kernel PATH]
//! [--initramfs PATH] [--state DIR] [--warm-pool vcpus=N,memory=SIZE,count=N]
//! [--network none | bridge=NAME,subnet=CIDR,mtu=N,domain=NAME]`
//! runs the daemon; `vmmd worker NAME` is
//! the per-VM worker process the daemon starts (config on stdin; NAME only
//! shows in `ps`); `vmmd image …` works the image store (see
//! [`vmmd::image::cli`]).

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "vmmd",
    version,
    about = "steelcup's VMM daemon: each workload a microVM",
    args_conflicts_with_subcommands = true,
    max_term_width = 100
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    #[command(flatten)]
    daemon: DaemonArgs,
}

/// The daemon's settings (no subcommand).
#[derive(Debug, Args)]
struct DaemonArgs {
    /// Unit files
    #[arg(long, value_name = "DIR", default_value = "/etc/steelcup/units")]
    units: PathBuf,
    /// Default guest kernel
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Default guest initramfs (vminit as /init)
    #[arg(long, value_name = "PATH")]
    initramfs: Option<PathBuf>,
    /// State: the image store, volumes, kept runs, logins
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    /// Runtime files: vsock sockets
    #[arg(long, value_name = "DIR")]
    run_dir: Option<PathBuf>,
    /// The Vmm1 API socket
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// A registry pulled from over plain HTTP
    #[arg(long, value_name = "HOST[:PORT]")]
    insecure_registry: Vec<String>,
    /// Registry credentials and plain-HTTP registries (read again on SIGHUP)
    #[arg(long, value_name = "FILE", default_value = vmmd::image::registries::DEFAULT_PATH)]
    registries: PathBuf,
    /// VMs booted ahead of time, waiting for workloads of their size
    #[arg(long, value_name = "vcpus=N,memory=SIZE,count=N", value_parser = parse_pool)]
    warm_pool: Vec<vmmd::pool::PoolSpec>,
    /// The workload network: none, or bridge=NAME,subnet=CIDR,mtu=N,domain=NAME
    #[arg(long, value_name = "SPEC", value_parser = parse_network)]
    network: Option<NetworkArg>,
}

/// `--network`'s value: none is a value too.
#[derive(Debug, Clone)]
struct NetworkArg(Option<vmmd::net::NetOptions>);

fn parse_pool(s: &str) -> Result<vmmd::pool::PoolSpec, String> {
    vmmd::pool::PoolSpec::try_from(s).map_err(|e| e.to_string())
}

fn parse_network(s: &str) -> Result<NetworkArg, String> {
    vmmd::net::NetOptions::parse(s)
        .map(NetworkArg)
        .map_err(|e| e.to_string())
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// The per-VM worker (vmm-worker is the same; vmmd starts it)
    #[command(hide = true, disable_help_flag = true)]
    Worker {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The image store: pull SOURCE | ls | rootfs NAME | rm NAME | gc
    #[command(disable_help_flag = true)]
    Image {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// cup --remote's gateway: the APIs over mutual TLS
    Admin(AdminArgs),
    /// A tiny guest checks KVM and exit handling
    Selftest,
    /// This VMM beside QEMU microvm: [--rounds N] [--memory MIB] [--qemu PATH]
    #[command(disable_help_flag = true)]
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// cup run cold vs from the warm pool, on a running host: [--rounds N] [--parallel N] IMAGE [CMD...]
    #[command(disable_help_flag = true)]
    BenchStart {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Debug, Args)]
struct AdminArgs {
    /// Where the gateway listens
    #[arg(long, value_name = "ADDR", default_value_t = format!("0.0.0.0:{}", steelcup_api::remote::DEFAULT_PORT))]
    listen: String,
    /// The machine's certificate and key, and the clients' CA
    #[arg(long, value_name = "DIR", default_value = "/etc/steelcup/admin")]
    tls_dir: PathBuf,
    /// Where the API sockets are
    #[arg(long, value_name = "DIR", default_value = "/run/steelcup")]
    run_dir: PathBuf,
    /// Where `cup --remote update FILE` uploads go
    #[arg(long, value_name = "DIR", default_value = steelcup_api::remote::DEFAULT_UPLOAD_DIR)]
    upload_dir: PathBuf,
}

fn main() {
    let cli = Cli::parse();
    match cli.command {
        Some(Sub::Worker { .. }) => std::process::exit(steelcup_vmm::worker::main()),
        Some(Sub::Bench { args }) => std::process::exit(vmmd::bench::main(&args)),
        Some(Sub::BenchStart { args }) => std::process::exit(vmmd::bench_start::main(&args)),
        Some(Sub::Image { args }) => std::process::exit(vmmd::image::cli::main(&args)),
        Some(Sub::Admin(a)) => {
            steelcup_os::logging::init_logging();
            std::process::exit(admin(&a));
        }
        Some(Sub::Selftest) => std::process::exit(steelcup_vmm::selftest::main()),
        None => {}
    }
    steelcup_os::logging::init_logging();
    let d = cli.daemon;
    let mut opts = vmmd::daemon::default_options(&d.units);
    if let Some(k) = d.kernel {
        opts.kernel = k;
    }
    if let Some(i) = d.initramfs {
        opts.initramfs = i;
    }
    if let Some(s) = d.state {
        opts.state_dir = s;
    }
    if let Some(r) = d.run_dir {
        opts.run_dir = r;
    }
    if let Some(a) = d.api_socket {
        opts.api_socket = a;
    }
    opts.warm_pool.extend(d.warm_pool);
    opts.insecure_registries.extend(d.insecure_registry);
    if let Some(NetworkArg(n)) = d.network {
        opts.network = n;
    }
    // Each API client and each VM's worker is a few descriptors.
    steelcup_sys::raise_nofile(65536);
    // Credentials and plain-HTTP registries (docs/provisioning.md); a bad
    // file is said and pulls go on without it. Read again on SIGHUP.
    opts.registries = vmmd::daemon::load_registries(&d.registries);
    opts.registries_file = Some(d.registries);
    opts.logins = vmmd::image::registries::Logins::load(
        &opts.state_dir.join(vmmd::image::registries::LOGINS_FILE),
    );
    if let Err(e) = vmmd::daemon::run(opts) {
        tracing::error!("fatal: {}", steelcup_sys::error_chain(&e));
        std::process::exit(1);
    }
}

/// `vmmd admin`: cup --remote's gateway (docs/remote.md).
fn admin(a: &AdminArgs) -> i32 {
    match steelcup_api::remote::serve(&a.listen, &a.tls_dir, &a.run_dir, &a.upload_dir) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("admin: {}", steelcup_sys::error_chain(&e));
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent_and_reads_the_units_flags() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "vmmd",
            "--warm-pool",
            "vcpus=1,memory=128MiB,count=1",
            "--network=none",
            "--insecure-registry",
            "10.0.2.2:5000",
        ])
        .unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.daemon.warm_pool.len(), 1);
        assert!(matches!(cli.daemon.network, Some(NetworkArg(None))));
        let e = Cli::try_parse_from(["vmmd", "--warm-pool", "count=x"]).unwrap_err();
        assert!(e.to_string().contains("--warm-pool"), "{e}");
        let e = Cli::try_parse_from(["vmmd", "--bogus"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        // A tool's own flags pass through to it.
        let cli = Cli::try_parse_from(["vmmd", "image", "pull", "--user", "a:b", "x"]).unwrap();
        assert!(
            matches!(cli.command, Some(Sub::Image { args }) if args == ["pull", "--user", "a:b", "x"])
        );
        let cli =
            Cli::try_parse_from(["vmmd", "image", "--store", "/s", "rootfs", "sha256:00"]).unwrap();
        assert!(
            matches!(cli.command, Some(Sub::Image { args }) if args == ["--store", "/s", "rootfs", "sha256:00"])
        );
        let cli = Cli::try_parse_from(["vmmd", "bench", "--help"]).unwrap();
        assert!(matches!(cli.command, Some(Sub::Bench { args }) if args == ["--help"]));
        let cli = Cli::try_parse_from(["vmmd", "worker", "web"]).unwrap();
        assert!(matches!(cli.command, Some(Sub::Worker { .. })));
    }
}
