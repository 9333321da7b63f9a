//! cup's command line, declared once with clap: every verb's flags, their
//! help, `cup --version`, shell completions and man pages come from here.
//! Flags and their values are checked here, before anything connects.
//!
//! Spellings follow Docker's wherever Docker has the verb (`-q`, `-a`,
//! `--filter`, `--format`, `stop -t`, `-m 512m`, several names where
//! Docker takes several), so scripts port by replacing the word `docker`.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use steelcup_api::vmm1::NamedVolume;
use steelcup_units::ports::PortSpec;
use steelcup_units::{Cpus, MemSize, Network, Restart};

const AFTER_HELP: &str = "\
cup talks to the machine of its current context (`cup context ls`; `cargo
xtask run` adds and selects `appliance`), else this machine: init at
$STEELCUP_RUN_DIR/init.sock (default /run/steelcup) and vmmd at -H PATH,
else $STEELCUP_VMMD_SOCKET, else /run/steelcup/vmmd.sock. --context (or
$STEELCUP_CONTEXT) picks another context; --remote (or $STEELCUP_REMOTE)
another machine's admin gateway over mutual TLS, with ca.crt, client.crt and
client.key from --tls-dir, $STEELCUP_TLS_DIR or ~/.config/steelcup/tls.
See docs/cli.md and docs/remote.md.";

#[derive(Debug, Parser)]
#[command(
    name = "cup",
    version,
    about = "Run OCI images as microVMs and manage a steelcup machine",
    after_help = AFTER_HELP,
    max_term_width = 100,
    subcommand_required = true,
    arg_required_else_help = true
)]
pub struct Cli {
    /// vmmd's socket on this machine (`unix:PATH` too)
    #[arg(
        short = 'H',
        long = "host",
        global = true,
        value_name = "PATH",
        help_heading = "Machine"
    )]
    pub host: Option<String>,
    /// Another machine's admin gateway, over mutual TLS [env: STEELCUP_REMOTE]
    #[arg(
        long,
        global = true,
        value_name = "HOST[:PORT]",
        help_heading = "Machine"
    )]
    pub remote: Option<String>,
    /// ca.crt, client.crt and client.key for --remote [env: STEELCUP_TLS_DIR]
    #[arg(long, global = true, value_name = "DIR", help_heading = "Machine")]
    pub tls_dir: Option<PathBuf>,
    /// The context to talk to instead of the current one [env: STEELCUP_CONTEXT]
    #[arg(
        short = 'c',
        long,
        global = true,
        value_name = "NAME",
        help_heading = "Machine"
    )]
    pub context: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List microVM workloads (running ones; -a: every one)
    Ps(PsArgs),
    /// Run an image as a new microVM (attached: cup exits with its code)
    Run(Box<RunArgs>),
    /// Run a process inside a running workload
    Exec(ExecArgs),
    /// A workload's console output, or a unit's (--unit)
    Logs(LogsArgs),
    /// Follow a running workload's output until it ends (exit code = its)
    Attach(AttachArgs),
    /// Ask workloads to stop; killed after the grace (-t)
    Stop(StopArgs),
    /// Start workloads that are not running
    Start(Names),
    /// Stop workloads' vCPUs
    Pause(Names),
    /// Let paused workloads' vCPUs run again
    Unpause(Names),
    /// Send a signal (KILL unless given) to workloads' processes
    Kill(KillArgs),
    /// Forget ended workloads (-f: stop them first)
    Rm(RmArgs),
    /// What vmmd knows of workloads, as JSON (or -f TEMPLATE)
    Inspect(InspectArgs),
    /// Wait until workloads' runs end; print each exit code
    Wait(Names),
    /// A workload's published ports
    Port(PortArgs),
    /// CPU, memory, network and disk I/O of running microVMs, live
    Stats(StatsArgs),
    /// The processes inside a running microVM; without NAME, the host's units and microVMs by CPU and memory
    Top { name: Option<String> },
    /// Keep credentials for a registry on the machine, for its pulls (default docker.io)
    Login {
        #[arg(short, long)]
        username: Option<String>,
        /// Insecure: seen by other users' ps; use --password-stdin
        #[arg(short, long)]
        password: Option<String>,
        /// Read the password from stdin
        #[arg(long, conflicts_with = "password")]
        password_stdin: bool,
        /// HOST[:PORT]
        registry: Option<String>,
    },
    /// Forget a registry's credentials (default docker.io)
    Logout { registry: Option<String> },
    /// Give a workload (a cup run one, not running) another name
    Rename { name: String, new_name: String },
    /// Copy files between this machine and a running microVM (NAME:PATH), or - for a tar stream
    Cp {
        /// NAME:PATH, a local path, or -
        src: String,
        /// NAME:PATH, a local path, or -
        dst: String,
    },
    /// Workload state changes as they happen
    Events,
    /// Pull an image into the machine's store
    Pull(PullArgs),
    /// List the images in the store
    Images(ImagesArgs),
    /// Remove images from the store
    Rmi(Names),
    /// Another name for an image in the store
    Tag { source: String, target: String },
    /// Write images from the machine's store to an archive (OCI, with Docker's manifest.json)
    Save(SaveArgs),
    /// Bring images into the machine's store from an archive (docker save, skopeo, cup save)
    Load(LoadArgs),
    /// Manage images (ls, pull, rm, prune, inspect, tag, save, load)
    #[command(subcommand)]
    Image(ImageCommand),
    /// Manage volumes (ls, create, inspect, rm, prune)
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Run a Docker Compose project (compose.yaml) as units: up, down, ps, logs, exec, restart, pull, config
    Compose(ComposeArgs),
    /// Scheduled units (schedule = "..." in a unit): ls, and a unit's runs (history)
    #[command(subcommand)]
    Cron(CronCommand),
    /// The machine's disk use (df), and taking back what nothing uses (prune)
    #[command(subcommand)]
    System(SystemCommand),

    /// List units: name, kind, state, pid, restarts, last exit
    Units(FormatArg),
    /// One unit: status, start, stop, restart, cat, rm
    #[command(subcommand)]
    Unit(UnitCommand),
    /// Re-read unit files and apply the difference
    Reload,
    /// Send unit files (NAME.toml) to the machine: checked whole, then applied
    Apply(ApplyArgs),
    /// The machine config: apply, show, reset
    #[command(subcommand)]
    Machine(MachineCommand),
    /// The kernel's log (as dmesg prints it)
    Dmesg(DmesgArgs),
    /// One line per subsystem (host, units, vmmd, network, time, disk, update) and what is wrong
    Health(FormatArg),
    /// The machine's state in Prometheus' text format (host, units, microVMs)
    Metrics(MetricsArgs),
    /// One .tar.gz of logs, configs, state and versions for a bug report, secrets taken out
    SupportBundle {
        /// Write it here (default: steelcup-support-HOST-TIME.tar.gz in this directory)
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Stop every unit in order, then power off
    Poweroff,
    /// Stop every unit in order, then reboot
    Reboot,
    /// Check unit files as the host reads them (offline)
    Validate(ValidateArgs),
    /// Write a new OS into the slot not running and boot it once; or --status
    Update(UpdateArgs),
    /// Boot the other slot's OS next (once), if it holds one
    Rollback(RebootArg),

    /// The machines cup talks to, and which one it uses
    #[command(subcommand)]
    Context(ContextCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    Completion(CompletionArgs),
    /// cup's version
    Version,
    /// Write cup's man pages (cup.1, cup-run.1, ...) into DIR
    #[command(hide = true)]
    Man { dir: PathBuf },
}

/// One or more workload (or image) names.
#[derive(Debug, Args)]
pub struct Names {
    #[arg(required = true, value_name = "NAME")]
    pub names: Vec<String>,
}

#[derive(Debug, Args)]
pub struct FormatArg {
    /// `table` (the default), `json`, or a template like '{{.Name}}'
    #[arg(long, value_name = "FORMAT")]
    pub format: Option<String>,
}

#[derive(Debug, Args)]
pub struct PsArgs {
    /// Every workload, ended ones too
    #[arg(short, long)]
    pub all: bool,
    /// Only the names (one per line), for scripts
    #[arg(short, long)]
    pub quiet: bool,
    /// name=, label=KEY[=VALUE], status=, ancestor=IMAGE (repeatable)
    #[arg(short, long = "filter", value_name = "KEY=VALUE", value_parser = crate::view::Filter::parse)]
    pub filter: Vec<crate::view::Filter>,
    /// `table`, `json` (one object per line), or a template like '{{.Names}}\t{{.Status}}'
    #[arg(long, value_name = "FORMAT")]
    pub format: Option<String>,
    /// Do not shorten long fields
    #[arg(long)]
    pub no_trunc: bool,
}

/// `-h` is `--hostname`, as in `docker run`; help is `--help` alone.
#[derive(Debug, Args)]
#[command(disable_help_flag = true)]
pub struct RunArgs {
    /// Run in the background; print the workload's name
    #[arg(short, long)]
    pub detach: bool,
    /// Forget the workload once it has ended
    #[arg(long)]
    pub rm: bool,
    /// Keep stdin open and send it to the workload
    #[arg(short, long)]
    pub interactive: bool,
    /// A terminal for the workload
    #[arg(short, long)]
    pub tty: bool,
    /// The workload's name (default: run-N)
    #[arg(long)]
    pub name: Option<String>,
    /// An environment variable; NAME alone passes cup's own value
    #[arg(short, long = "env", value_name = "NAME[=VALUE]")]
    pub env: Vec<String>,
    /// A file of NAME=VALUE lines (# comments), as Docker reads it
    #[arg(long = "env-file", value_name = "FILE")]
    pub env_file: Vec<PathBuf>,
    /// A label, NAME=VALUE (or NAME)
    #[arg(short, long = "label", value_name = "NAME[=VALUE]")]
    pub label: Vec<String>,
    /// CPU time in CPUs, like 0.5 or 2: the VM gets that many vCPUs rounded up, and a CPU quota of exactly that
    #[arg(long, value_name = "N", value_parser = parse_cpus)]
    pub cpus: Option<Cpus>,
    /// Guest memory, as Docker writes it: 512m, 1g, 1.5g (16 MiB to 256 GiB, at most the machine's memory)
    #[arg(short, long, value_name = "SIZE", value_parser = parse_memory)]
    pub memory: Option<MemSize>,
    /// A resource limit, NAME=N or NAME=SOFT:HARD (the hard one is kept)
    #[arg(long, value_name = "NAME=N", value_parser = parse_ulimit)]
    pub ulimit: Vec<(String, u64)>,
    /// no, on-failure[:N] (at most N restarts), always or unless-stopped
    #[arg(long, value_name = "POLICY", value_parser = parse_restart)]
    pub restart: Option<(Restart, Option<u32>)>,
    /// A named volume, NAME:/PATH[:ro] (host paths are refused: a microVM shares no host filesystem)
    #[arg(short, long = "volume", value_name = "NAME:/PATH[:ro]", value_parser = parse_volume)]
    pub volume: Vec<NamedVolume>,
    /// Publish a port, [IP:]HOST:GUEST[/udp]
    #[arg(short, long = "publish", value_name = "[IP:]HOST:GUEST", value_parser = parse_port)]
    pub publish: Vec<PortSpec>,
    /// bridge (the default) or none
    #[arg(long, visible_alias = "net", value_name = "NETWORK", value_parser = parse_network)]
    pub network: Option<Network>,
    /// The working directory inside the guest (over the image's)
    #[arg(short, long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// Who the workload runs as: USER, UID, USER:GROUP or UID:GID (over the image's)
    #[arg(short, long, value_name = "USER")]
    pub user: Option<String>,
    /// Replaces the image's entrypoint and its default command ("" for none)
    #[arg(long, value_name = "PROGRAM")]
    pub entrypoint: Option<String>,
    /// The guest's hostname (default: the workload's name)
    #[arg(short = 'h', long, value_name = "NAME")]
    pub hostname: Option<String>,
    /// Mount the root filesystem read-only (volumes, /tmp and /run stay writable)
    #[arg(long)]
    pub read_only: bool,
    /// Run an init that reaps zombies and forwards signals: every microVM has one already (vminit, its PID 1)
    #[arg(long)]
    pub init: bool,
    /// A line for /etc/hosts, NAME:ADDRESS
    #[arg(long = "add-host", value_name = "NAME:ADDRESS", value_parser = parse_add_host)]
    pub add_host: Vec<(String, std::net::IpAddr)>,
    /// Run at these times instead of now, as a scheduled unit named --name: cron's five fields or @hourly, @daily...
    #[arg(
        long,
        value_name = "CRON",
        requires = "name",
        help_heading = "Schedule"
    )]
    pub schedule: Option<String>,
    /// The zone --schedule is read in (IANA name; default UTC)
    #[arg(
        long,
        value_name = "ZONE",
        requires = "schedule",
        help_heading = "Schedule"
    )]
    pub time_zone: Option<String>,
    /// A run due while the last still runs: allow, forbid (skip it) or replace
    #[arg(
        long,
        value_name = "POLICY",
        requires = "schedule",
        help_heading = "Schedule"
    )]
    pub concurrency: Option<String>,
    /// Stop a run still running after this many seconds
    #[arg(
        long,
        value_name = "SECONDS",
        requires = "schedule",
        help_heading = "Schedule"
    )]
    pub deadline: Option<u32>,
    /// Print help
    #[arg(long, action = clap::ArgAction::Help)]
    pub help: Option<bool>,
    /// The image, then the command and its arguments (everything after the image)
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "IMAGE [COMMAND [ARG...]]"
    )]
    pub image_and_command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Keep stdin open and send it to the process
    #[arg(short, long)]
    pub interactive: bool,
    /// A terminal for the process
    #[arg(short, long)]
    pub tty: bool,
    /// An environment variable; NAME alone passes cup's own value
    #[arg(short, long = "env", value_name = "NAME[=VALUE]")]
    pub env: Vec<String>,
    /// The working directory inside the guest
    #[arg(short, long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// The user (name or uid[:gid]) inside the guest
    #[arg(short, long, value_name = "USER")]
    pub user: Option<String>,
    /// Start the process and return at once; its output goes to the workload's log
    #[arg(short, long, conflicts_with_all = ["interactive", "tty"])]
    pub detach: bool,
    /// The workload
    pub name: String,
    /// The command and its arguments
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND [ARG...]"
    )]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// A unit's log instead of a workload's
    #[arg(short, long, value_name = "UNIT")]
    pub unit: Option<String>,
    /// Follow: new lines as they come (a workload's: until it has ended)
    #[arg(short, long)]
    pub follow: bool,
    /// How many lines from the end, or `all`
    #[arg(short = 'n', long = "tail", value_name = "N", default_value = "100", value_parser = parse_tail)]
    pub tail: u32,
    /// Only lines from this time on: 2026-12-07T10:00:00Z, Unix seconds, or a duration ago (10m, 1h30m)
    #[arg(long, value_name = "TIME", value_parser = crate::logs::parse_time)]
    pub since: Option<u64>,
    /// Only lines up to this time (as --since); with -f, follow until then
    #[arg(long, value_name = "TIME", value_parser = crate::logs::parse_time)]
    pub until: Option<u64>,
    /// Each line with the time it arrived (RFC 3339, UTC)
    #[arg(short, long)]
    pub timestamps: bool,
    /// The workload
    #[arg(required_unless_present = "unit", conflicts_with = "unit")]
    pub name: Option<String>,
}

#[derive(Debug, Args)]
pub struct AttachArgs {
    /// Ctrl-C detaches instead of going to the workload
    #[arg(long)]
    pub no_sig_proxy: bool,
    /// Pass signals to the workload (the default); --sig-proxy=false as --no-sig-proxy
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub sig_proxy: Option<bool>,
    pub name: String,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    /// Seconds the guest has to stop before it is killed (default 5)
    #[arg(short = 't', long = "time", visible_alias = "timeout", value_name = "SECONDS", value_parser = clap::value_parser!(u32).range(0..=3600))]
    pub time: Option<u32>,
    #[arg(required = true, value_name = "NAME")]
    pub names: Vec<String>,
}

#[derive(Debug, Args)]
pub struct KillArgs {
    /// The signal, by name (KILL, TERM, HUP) or number
    #[arg(short, long, value_name = "SIGNAL", default_value = "KILL", value_parser = parse_signal)]
    pub signal: i32,
    #[arg(required = true, value_name = "NAME")]
    pub names: Vec<String>,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    /// Stop running workloads first
    #[arg(short, long)]
    pub force: bool,
    #[arg(required = true, value_name = "NAME")]
    pub names: Vec<String>,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A template, like '{{.State.ExitCode}}' or '{{json .Config}}'
    #[arg(short, long, value_name = "TEMPLATE")]
    pub format: Option<String>,
    #[arg(required = true, value_name = "NAME")]
    pub names: Vec<String>,
}

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// One screen, then exit
    #[arg(long)]
    pub no_stream: bool,
    /// json (one object per line), table, or a template like '{{.Name}} {{.CPUPerc}}'
    #[arg(long, value_name = "FORMAT")]
    pub format: Option<String>,
    /// Only these workloads
    pub names: Vec<String>,
}

#[derive(Debug, Args)]
pub struct PortArgs {
    pub name: String,
    /// Only this guest port (PORT[/PROTO])
    pub port: Option<String>,
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// REGISTRY/REPO:TAG, oci:DIR:TAG, oci-archive:FILE:TAG or docker-archive:FILE
    pub image: String,
}

#[derive(Debug, Args)]
pub struct ImagesArgs {
    /// Only the names (one per line), for scripts
    #[arg(short, long)]
    pub quiet: bool,
    /// `table`, `json` (one object per line), or a template like '{{.Repository}}'
    #[arg(long, value_name = "FORMAT")]
    pub format: Option<String>,
    /// Do not shorten digests
    #[arg(long)]
    pub no_trunc: bool,
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// List the images in the store
    #[command(visible_alias = "list")]
    Ls(ImagesArgs),
    /// Pull an image into the store
    Pull(PullArgs),
    /// Remove images from the store
    #[command(visible_alias = "remove")]
    Rm(Names),
    /// Remove blobs and root images no image uses
    Prune,
    /// Images' manifests and configs, as JSON (or -f TEMPLATE)
    Inspect {
        #[arg(short, long, value_name = "TEMPLATE")]
        format: Option<String>,
        #[arg(required = true, value_name = "IMAGE")]
        names: Vec<String>,
    },
    /// Another name for an image in the store
    Tag { source: String, target: String },
    /// Write images from the machine's store to an archive
    Save(SaveArgs),
    /// Bring images into the machine's store from an archive
    Load(LoadArgs),
}

#[derive(Debug, Args)]
pub struct DmesgArgs {
    /// Go on printing new records as the kernel logs them
    #[arg(short = 'w', long, visible_short_alias = 'f', visible_alias = "follow")]
    pub follow: bool,
    /// Only the last N records
    #[arg(short = 'n', long, value_name = "N")]
    pub tail: Option<u32>,
    /// Only these levels: emerg, alert, crit, err, warn, notice, info, debug (comma-separated)
    #[arg(short, long, value_name = "LIST", value_delimiter = ',', value_parser = parse_level)]
    pub level: Vec<u8>,
}

#[derive(Debug, Args)]
pub struct MetricsArgs {
    /// Serve them over HTTP at ADDRESS:PORT (GET /metrics) until stopped
    #[arg(long, value_name = "ADDRESS:PORT")]
    pub listen: Option<String>,
    /// With --listen: mutual TLS, with server.crt, server.key and client-ca.crt from DIR
    #[arg(long, value_name = "DIR", requires = "listen")]
    pub tls_dir: Option<PathBuf>,
}

fn parse_level(s: &str) -> Result<u8, String> {
    const LEVELS: [&str; 8] = [
        "emerg", "alert", "crit", "err", "warn", "notice", "info", "debug",
    ];
    LEVELS
        .iter()
        .position(|l| *l == s)
        .map(|i| i as u8)
        .ok_or_else(|| format!("{s:?}: one of {}", LEVELS.join(", ")))
}

#[derive(Debug, Args)]
pub struct SaveArgs {
    /// Write to this file, not to standard output
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    #[arg(required = true, value_name = "IMAGE")]
    pub images: Vec<String>,
}

#[derive(Debug, Args)]
pub struct LoadArgs {
    /// Read from this file, not from standard input
    #[arg(short, long, value_name = "FILE")]
    pub input: Option<PathBuf>,
    /// Say nothing of what was loaded
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Debug, Subcommand)]
pub enum SystemCommand {
    /// Images, workloads and volumes: how many, how many in use, their size
    Df,
    /// Remove ended cup run workloads and unused store data
    Prune {
        /// Also untag images no workload uses
        #[arg(short, long)]
        all: bool,
        /// Also delete named volumes no workload names
        #[arg(long)]
        volumes: bool,
        /// Accepted for Docker's scripts (cup does not ask)
        #[arg(short, long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// List volumes: named ones (cup run -v NAME:/PATH) and units' (UNIT/NAME)
    #[command(visible_alias = "list")]
    Ls {
        /// Names only
        #[arg(short, long)]
        quiet: bool,
        /// table, json, or a template like '{{.Name}} {{.UsedBy}}'
        #[arg(long, value_name = "FORMAT")]
        format: Option<String>,
    },
    /// Make a named volume now (kept if it exists)
    Create {
        /// 1 GiB unless given, as Docker writes sizes: 512m, 10g
        #[arg(long, value_name = "SIZE", default_value = "1g", value_parser = parse_memory)]
        size: MemSize,
        /// Letters, digits, '-', '_' (a new hex name if none)
        name: Option<String>,
    },
    /// Volumes as JSON (or -f TEMPLATE)
    Inspect {
        #[arg(short, long, value_name = "TEMPLATE")]
        format: Option<String>,
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
    },
    /// Delete volumes no workload names (their data is gone)
    #[command(visible_alias = "remove")]
    Rm {
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
    },
    /// Delete every named volume no workload names
    Prune {
        /// Accepted for Docker's scripts (cup does not ask)
        #[arg(short, long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum CronCommand {
    /// The scheduled units: schedule, time zone, concurrency, next run, last run
    #[command(visible_alias = "list")]
    Ls {
        /// table, json, or a template like '{{.Unit}} {{.Next}}'
        #[arg(long, value_name = "FORMAT")]
        format: Option<String>,
    },
    /// A scheduled unit's last due times: each run's workload, exit code and outcome, and the skipped ones
    History {
        unit: String,
        /// table, json, or a template like '{{.Workload}} {{.ExitCode}}'
        #[arg(long, value_name = "FORMAT")]
        format: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum UnitCommand {
    /// A unit's state
    Status {
        name: String,
        #[command(flatten)]
        format: FormatArg,
    },
    Start {
        name: String,
    },
    Stop {
        name: String,
    },
    Restart {
        name: String,
    },
    /// The unit's file as the machine reads it
    Cat {
        name: String,
    },
    /// Remove a unit `cup apply` installed
    Rm {
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct ComposeArgs {
    /// A compose file (several merge in order); default: compose.yaml,
    /// compose.yml, docker-compose.yaml or docker-compose.yml here, and its
    /// override file
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// The project's name (default: the file's name:, else this directory's) [env: COMPOSE_PROJECT_NAME]
    #[arg(short = 'p', long = "project-name", value_name = "NAME")]
    pub project: Option<String>,
    /// Start services of this profile too [env: COMPOSE_PROFILES]
    #[arg(long = "profile", value_name = "NAME")]
    pub profiles: Vec<String>,
    #[command(subcommand)]
    pub command: ComposeCommand,
}

#[derive(Debug, Subcommand)]
pub enum ComposeCommand {
    /// Install the services as units and start them; a changed service is rolled, the rest left alone
    Up {
        /// Return once every service has started, instead of following their logs
        #[arg(short, long)]
        detach: bool,
        /// Wait for services with a healthcheck to be healthy too
        #[arg(long)]
        wait: bool,
        /// How long to wait for the services to start
        #[arg(long, value_name = "SECONDS", default_value = "600")]
        wait_timeout: u64,
        /// Say what would change, change nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Remove the project's units (their microVMs stop); -v: their volumes too
    Down {
        /// Remove the services' named volumes
        #[arg(short = 'v', long)]
        volumes: bool,
    },
    /// List the project's workloads
    Ps {
        #[arg(short, long)]
        all: bool,
        #[arg(short, long)]
        quiet: bool,
        #[arg(long, value_name = "FORMAT")]
        format: Option<String>,
    },
    /// The services' output, each line after its workload's name
    Logs {
        #[arg(short, long)]
        follow: bool,
        /// Lines from the end of each log
        #[arg(short = 'n', long = "tail", value_name = "N", default_value = "100", value_parser = parse_tail)]
        tail: u32,
        #[arg(short, long)]
        timestamps: bool,
        #[arg(value_name = "SERVICE")]
        services: Vec<String>,
    },
    /// Run a command in a service's running microVM (the first replica; --index N another)
    Exec {
        #[arg(short, long)]
        detach: bool,
        /// No terminal, even when stdin is one
        #[arg(short = 'T', long = "no-tty")]
        no_tty: bool,
        #[arg(short, long = "env", value_name = "NAME[=VALUE]")]
        env: Vec<String>,
        #[arg(short, long, value_name = "DIR")]
        workdir: Option<String>,
        #[arg(short, long, value_name = "USER")]
        user: Option<String>,
        #[arg(long, value_name = "N", default_value = "1")]
        index: usize,
        service: String,
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "COMMAND [ARG...]"
        )]
        command: Vec<String>,
    },
    /// Stop and start the services' microVMs
    Restart {
        #[arg(value_name = "SERVICE")]
        services: Vec<String>,
    },
    /// Pull the services' images
    Pull {
        #[arg(value_name = "SERVICE")]
        services: Vec<String>,
    },
    /// The resolved model (files merged, variables put in); --units: the unit files it makes
    Config {
        /// The units `up` installs, as files
        #[arg(long)]
        units: bool,
        /// The services' names only
        #[arg(long)]
        services: bool,
        /// Check only
        #[arg(short, long)]
        quiet: bool,
    },
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// Check only: say what would change
    #[arg(long)]
    pub dry_run: bool,
    #[arg(required = true, value_name = "FILE|DIR")]
    pub paths: Vec<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum MachineCommand {
    /// Check a machine config whole and apply it live where it can be
    Apply {
        #[arg(long)]
        dry_run: bool,
        file: PathBuf,
    },
    /// The applied machine config, without secrets
    Show,
    /// Wipe /var and provision the machine again at the next boot
    Reset {
        /// Confirms that every workload's volumes, images and logs go
        #[arg(long)]
        wipe_all_data: bool,
    },
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    #[arg(required = true, value_name = "UNIT-FILE|DIR")]
    pub paths: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RebootArg {
    /// Do not reboot now
    #[arg(long)]
    pub no_reboot: bool,
}

#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// The OS slots: which booted, what boots next, each slot's version
    #[arg(long, conflicts_with_all = ["source", "no_reboot"])]
    pub status: bool,
    /// With --status: `json`
    #[arg(long, value_name = "FORMAT", requires = "status")]
    pub format: Option<String>,
    #[command(flatten)]
    pub reboot: RebootArg,
    /// slot.img (from `cargo xtask disk`), as a file or an http(s) URL
    #[arg(required_unless_present = "status", value_name = "FILE|URL")]
    pub source: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum ContextCommand {
    /// The contexts; * marks the one in use
    #[command(visible_alias = "list")]
    Ls,
    /// Make a context the one plain cup talks to
    Use { name: String },
    /// A context, and whether its certificates are there
    Show { name: Option<String> },
    /// A machine by its admin gateway's address
    Add {
        name: String,
        #[arg(long, value_name = "HOST[:PORT]")]
        remote: String,
        #[arg(long, value_name = "DIR")]
        tls_dir: Option<PathBuf>,
        #[arg(long, default_value = "")]
        description: String,
        /// The command that makes its certificates (named when they are missing)
        #[arg(long, value_name = "COMMAND")]
        made_by: Option<String>,
    },
    /// Forget contexts
    #[command(visible_alias = "remove")]
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub struct CompletionArgs {
    pub shell: clap_complete::Shell,
}

impl Command {
    /// Whether the verb reaches no machine (so no context is read).
    pub fn offline(&self) -> bool {
        matches!(
            self,
            Command::Context(_)
                | Command::Validate(_)
                | Command::Version
                | Command::Completion(_)
                | Command::Man { .. }
                | Command::Compose(ComposeArgs {
                    command: ComposeCommand::Config { .. },
                    ..
                })
        )
    }
}

fn parse_cpus(s: &str) -> Result<Cpus, String> {
    let c: Cpus = s.parse()?;
    if c.whole() > 32 {
        return Err(format!("{s}: at most 32 CPUs"));
    }
    Ok(c)
}

/// `--add-host NAME:ADDRESS` (or `NAME=ADDRESS`, as newer Docker takes
/// it); an IPv6 address may be in brackets.
fn parse_add_host(s: &str) -> Result<(String, std::net::IpAddr), String> {
    let (name, addr) = s
        .split_once('=')
        .or_else(|| s.split_once(':'))
        .ok_or_else(|| format!("{s:?}: expected NAME:ADDRESS"))?;
    if !steelcup_units::valid_hostname(name) {
        return Err(format!(
            "{s:?}: {name:?} is not a host name (letters, digits, '-' and '.')"
        ));
    }
    let bare = addr.trim_start_matches('[').trim_end_matches(']');
    let ip = bare.parse().map_err(|_| {
        format!("{s:?}: {addr:?} is not an IP address (host-gateway is not offered)")
    })?;
    Ok((name.to_string(), ip))
}

fn parse_memory(s: &str) -> Result<MemSize, String> {
    MemSize::from_docker(s)
}

fn parse_ulimit(s: &str) -> Result<(String, u64), String> {
    let (n, val) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=N"))?;
    let hard = val.rsplit(':').next().unwrap_or(val);
    let n_val = hard
        .parse()
        .map_err(|_| format!("{s:?}: {hard:?} is not a number"))?;
    Ok((n.to_string(), n_val))
}

fn parse_restart(s: &str) -> Result<(Restart, Option<u32>), String> {
    match s {
        "no" => Ok((Restart::No, None)),
        "on-failure" => Ok((Restart::OnFailure, None)),
        "always" | "unless-stopped" => Ok((Restart::Always, None)),
        _ => match s.strip_prefix("on-failure:").map(str::parse::<u32>) {
            Some(Ok(n)) => Ok((Restart::OnFailure, Some(n))),
            Some(Err(_)) => Err(format!("{s}: on-failure:N takes a number of restarts")),
            None => Err(format!("{s}: no, on-failure[:N], always or unless-stopped")),
        },
    }
}

fn parse_volume(s: &str) -> Result<NamedVolume, String> {
    NamedVolume::try_from(s).map_err(|e| e.to_string())
}

fn parse_port(s: &str) -> Result<PortSpec, String> {
    PortSpec::parse(s).map_err(|e| e.to_string())
}

fn parse_network(s: &str) -> Result<Network, String> {
    match s {
        "bridge" | "default" => Ok(Network::Bridge),
        "none" => Ok(Network::None),
        _ => Err(format!("{s}: bridge or none")),
    }
}

fn parse_tail(s: &str) -> Result<u32, String> {
    match s {
        "all" => Ok(u32::MAX),
        _ => s
            .parse()
            .map_err(|_| format!("{s}: a number of lines, or all")),
    }
}

fn parse_signal(s: &str) -> Result<i32, String> {
    crate::workloads::parse_signal(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(line: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("cup").chain(line.split_whitespace()))
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_takes_everything_after_the_image_as_its_command() {
        let Command::Run(r) = parse("run -it --rm -m 512m --name web -e A=1 img sh -c --rm")
            .unwrap()
            .command
        else {
            panic!()
        };
        assert!(r.interactive && r.tty && r.rm);
        assert_eq!(r.memory, Some(MemSize(512 << 20)));
        assert_eq!(r.image_and_command, ["img", "sh", "-c", "--rm"]);
        let Command::Run(r) = parse("run --memory=1.5g img").unwrap().command else {
            panic!()
        };
        assert_eq!(r.memory, Some(MemSize(3 << 29)));
    }

    #[test]
    fn flags_are_checked_before_anything_connects() {
        for (line, says) in [
            ("run -m 12x img", "12x"),
            ("run --cpus 0 img", "0.001 to 255"),
            ("run --cpus 33 img", "at most 32"),
            ("run --add-host db img", "NAME:ADDRESS"),
            ("run --add-host db:host-gateway img", "not an IP address"),
            ("run --add-host bad_name:10.0.0.1 img", "not a host name"),
            ("exec -d -t web ls", "cannot be used"),
            ("run -p nope img", "--publish"),
            ("run -v /etc:/etc img", "--volume"),
            ("run --restart on-failure:x img", "number of restarts"),
            ("run --restart sometimes img", "on-failure[:N]"),
            ("stop -t five web", "five"),
            ("kill -s NOPE web", "not a signal"),
            ("ps --filter color=red", "color"),
            ("stop", "NAME"),
            ("logs", "NAME"),
            ("update", "FILE|URL"),
            ("update --status x", "cannot be used"),
        ] {
            let e = parse(line).unwrap_err().to_string();
            assert!(e.contains(says), "{line}: {e}");
        }
    }

    #[test]
    fn docker_spellings() {
        let Command::Stop(s) = parse("stop -t 0 a b").unwrap().command else {
            panic!()
        };
        assert_eq!((s.time, s.names), (Some(0), vec!["a".into(), "b".into()]));
        let Command::Ps(p) = parse("ps -aq --filter status=exited -f name=web")
            .unwrap()
            .command
        else {
            panic!()
        };
        assert!(p.all && p.quiet);
        assert_eq!(p.filter.len(), 2);
        let Command::Logs(l) = parse("logs -f --tail all web").unwrap().command else {
            panic!()
        };
        assert_eq!((l.follow, l.tail), (true, u32::MAX));
        let cli = parse("ps -H unix:/tmp/v.sock").unwrap();
        assert_eq!(cli.host.as_deref(), Some("unix:/tmp/v.sock"));
        let Command::Attach(a) = Cli::try_parse_from(["cup", "attach", "--sig-proxy=false", "w"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert_eq!(a.sig_proxy, Some(false));
    }

    #[test]
    fn run_takes_dockers_process_options() {
        let Command::Run(r) = parse(
            "run -w /srv -u 1000:1000 -h box --entrypoint /bin/sh --read-only --init --cpus 1.5 --add-host db:10.1.2.3 --add-host v6=[::1] img -c true",
        )
        .unwrap()
        .command
        else {
            panic!()
        };
        assert_eq!(r.workdir.as_deref(), Some("/srv"));
        assert_eq!(r.user.as_deref(), Some("1000:1000"));
        assert_eq!(r.hostname.as_deref(), Some("box"));
        assert_eq!(r.entrypoint.as_deref(), Some("/bin/sh"));
        assert!(r.read_only && r.init);
        let cpus = r.cpus.unwrap();
        assert_eq!((cpus.millis(), cpus.whole()), (1500, 2));
        assert_eq!(
            r.add_host,
            [
                ("db".to_string(), "10.1.2.3".parse().unwrap()),
                ("v6".to_string(), "::1".parse().unwrap())
            ]
        );
        assert_eq!(r.image_and_command, ["img", "-c", "true"]);
        let Command::Exec(e) = parse("exec -d web sh -c x").unwrap().command else {
            panic!()
        };
        assert!(e.detach);
        let Command::Run(r) = parse("run --restart on-failure:3 img").unwrap().command else {
            panic!()
        };
        assert_eq!(r.restart, Some((Restart::OnFailure, Some(3))));
    }

    #[test]
    fn help_and_version_are_not_errors() {
        for line in ["--help", "run --help", "--version", "help ps"] {
            let e = parse(line).unwrap_err();
            assert_eq!(e.exit_code(), 0, "{line}");
        }
    }
}

#[cfg(test)]
mod documented {
    use super::*;
    use clap::CommandFactory;

    /// docs/cli.md names every verb (`cup VERB`, or `cup GROUP VERB`) and
    /// every long flag cup takes.
    #[test]
    fn docs_cli_md_lists_every_verb_and_flag() {
        let doc = include_str!("../../../docs/cli.md");
        let mut missing = Vec::new();
        fn walk(c: &clap::Command, path: &str, doc: &str, missing: &mut Vec<String>) {
            for a in c.get_arguments() {
                if let Some(long) = a.get_long() {
                    // Either spelling will do (`-q` for `--quiet`).
                    let short = a.get_short().map(|s| format!("-{s}"));
                    let named = doc.contains(&format!("--{long}"))
                        || short.is_some_and(|s| doc.contains(&s));
                    if long != "help" && long != "version" && !named {
                        missing.push(format!("{path} --{long}"));
                    }
                }
            }
            for sub in c.get_subcommands() {
                if sub.is_hide_set() || sub.get_name() == "help" {
                    continue;
                }
                let name = sub.get_name();
                let p = format!("{path} {name}");
                // `cup unit start\|stop\|restart` names all three.
                let alternative = doc.lines().any(|l| {
                    l.contains(&format!("`{path} "))
                        && (l.contains(&format!("\\|{name}")) || l.contains(&format!("{name}\\|")))
                });
                let named =
                    doc.contains(&format!("`{p}")) || doc.contains(&format!("{p} ")) || alternative;
                if !named {
                    missing.push(p.clone());
                }
                walk(sub, &p, doc, missing);
            }
        }
        walk(&Cli::command(), "cup", doc, &mut missing);
        assert!(
            missing.is_empty(),
            "docs/cli.md does not mention: {missing:#?}"
        );
    }
}
