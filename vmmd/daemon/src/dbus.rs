//! The D-Bus adapter of vmmd's API (`org.steelcup.Vmm1`): decodes each
//! method into a [`steelcup_api::vmm1::Action`] and forwards it to the
//! daemon's loop with a one-shot reply channel; it decides nothing.

use std::path::Path;
use std::sync::mpsc;
use steelcup_api::vmm1::*;

/// A request from the API to the daemon's loop.
#[derive(Debug)]
pub struct Request {
    pub action: Action,
    pub reply: futures_channel::oneshot::Sender<Result<Reply, ApiError>>,
}

/// D-Bus errors: `org.steelcup.Vmm1.Error.NoSuchVm`, ...
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.steelcup.Vmm1.Error")]
pub enum Vmm1Error {
    #[zbus(error)]
    ZBus(zbus::Error),
    NoSuchVm(String),
    Refused(String),
    ShuttingDown(String),
    Internal(String),
}

impl From<ApiError> for Vmm1Error {
    fn from(e: ApiError) -> Self {
        let msg = e.to_string();
        match e {
            ApiError::NoSuchVm(_) => Vmm1Error::NoSuchVm(msg),
            ApiError::Refused(_) => Vmm1Error::Refused(msg),
            ApiError::ShuttingDown => Vmm1Error::ShuttingDown(msg),
        }
    }
}

/// The interface object served on every connection.
#[derive(Debug, Clone)]
struct Vmm1 {
    requests: mpsc::Sender<Request>,
}

impl Vmm1 {
    async fn call(&self, action: Action) -> Result<Reply, Vmm1Error> {
        let (reply, answer) = futures_channel::oneshot::channel();
        self.requests
            .send(Request { action, reply })
            .map_err(|_| Vmm1Error::from(ApiError::ShuttingDown))?;
        match answer.await {
            Ok(r) => r.map_err(Vmm1Error::from),
            Err(_) => Err(ApiError::ShuttingDown.into()),
        }
    }
}

#[zbus::interface(name = "org.steelcup.Vmm1")]
impl Vmm1 {
    /// Every workload: (name, state, last outcome, pid, runs, vcpus, memory
    /// MiB, address).
    async fn list(&self) -> Result<Vec<VmInfo>, Vmm1Error> {
        match self.call(Action::List).await? {
            Reply::Vms(v) => Ok(v),
            r => Err(Vmm1Error::Internal(format!("unexpected reply {r:?}"))),
        }
    }

    /// Stops the workload's vCPUs; its memory and devices stay.
    async fn pause(&self, name: String) -> Result<(), Vmm1Error> {
        self.call(Action::Pause(name)).await.map(|_| ())
    }

    /// Lets a paused workload's vCPUs run again.
    async fn resume(&self, name: String) -> Result<(), Vmm1Error> {
        self.call(Action::Resume(name)).await.map(|_| ())
    }

    /// Asks the guest to stop (then kills it after 5 s); answers once the
    /// VM has ended. It is not restarted.
    async fn stop(&self, name: String) -> Result<(), Vmm1Error> {
        self.call(Action::Stop(name, None)).await.map(|_| ())
    }

    /// As `stop`, with `seconds` (at most an hour) before the worker is
    /// killed (`cup stop -t`).
    async fn stop_within(&self, name: String, seconds: u32) -> Result<(), Vmm1Error> {
        if seconds > 3600 {
            return Err(ApiError::Refused(format!("stop within {seconds} s: at most 3600")).into());
        }
        self.call(Action::Stop(name, Some(seconds)))
            .await
            .map(|_| ())
    }

    /// Starts a workload that is not running.
    async fn start(&self, name: String) -> Result<(), Vmm1Error> {
        self.call(Action::Start(name)).await.map(|_| ())
    }

    /// Runs an image as a new workload; `spec` is a JSON [`RunSpec`].
    /// Answers the workload's name at once (the image is pulled and the VM
    /// booted after).
    async fn run(&self, spec: String) -> Result<String, Vmm1Error> {
        let spec: RunSpec = serde_json::from_str(&spec)
            .map_err(|e| Vmm1Error::from(ApiError::Refused(format!("run spec: {e}"))))?;
        self.text(Action::Run(Box::new(spec))).await
    }

    /// The Unix socket of a workload's vsock device (`CONNECT PORT`).
    async fn socket(&self, name: String) -> Result<String, Vmm1Error> {
        self.text(Action::Socket(name)).await
    }

    /// Forgets a workload that is not running.
    async fn remove(&self, name: String) -> Result<(), Vmm1Error> {
        self.call(Action::Remove(name)).await.map(|_| ())
    }

    /// Pulls an image into the store; answers its name and manifest digest.
    async fn pull(&self, source: String) -> Result<(String, String), Vmm1Error> {
        match self.call(Action::Pull(source)).await? {
            Reply::Pulled { name, digest } => Ok((name, digest)),
            r => Err(Vmm1Error::Internal(format!("unexpected reply {r:?}"))),
        }
    }

    /// The images in the store: (name, digest, size, root image built).
    async fn images(&self) -> Result<Vec<ImageInfo>, Vmm1Error> {
        match self.call(Action::Images).await? {
            Reply::Images(v) => Ok(v),
            r => Err(Vmm1Error::Internal(format!("unexpected reply {r:?}"))),
        }
    }

    /// Forgets an image's name (its blobs go with the next prune).
    async fn remove_image(&self, name: String) -> Result<(), Vmm1Error> {
        self.call(Action::RemoveImage(name)).await.map(|_| ())
    }

    /// An image in the store as JSON: Docker's `Id`, `RepoTags`,
    /// `RepoDigests`, `Created`, `Config`, `Architecture`, `Os`, `Size`,
    /// `RootFS`, and its root image.
    async fn inspect_image(&self, name: String) -> Result<String, Vmm1Error> {
        self.text(Action::InspectImage(name)).await
    }

    /// Names image `source` also `target` (a registry reference, kept as
    /// the store spells it); answers that name.
    async fn tag_image(&self, source: String, target: String) -> Result<String, Vmm1Error> {
        self.text(Action::TagImage(source, target)).await
    }

    /// Images as one OCI archive (with Docker's `manifest.json` too):
    /// answers a one-use transfer socket that sends it, framed
    /// (`steelcup_api::transfer`). Unknown names are refused here.
    async fn save(&self, names: Vec<String>) -> Result<String, Vmm1Error> {
        self.text(Action::Save(names)).await
    }

    /// Images from an OCI or `docker save` archive: answers a one-use
    /// transfer socket that takes the archive, framed, and answers a JSON
    /// list of the images loaded (`Loaded`) or why none were.
    async fn load(&self) -> Result<String, Vmm1Error> {
        self.text(Action::Load).await
    }

    /// Pulls in flight (by `Pull` or for a unit): (source, blob digest,
    /// bytes done, bytes in the blob). `cup pull` draws its progress bar
    /// from this.
    async fn pulls(&self) -> Result<Vec<PullInfo>, Vmm1Error> {
        match self.call(Action::Pulls).await? {
            Reply::Pulls(v) => Ok(v),
            r => Err(Vmm1Error::Internal(format!("unexpected reply {r:?}"))),
        }
    }

    /// Every running VM's counters (CPU µs, memory, tasks, network and
    /// disk bytes), for `cup stats`.
    async fn stats(&self) -> Result<Vec<VmStats>, Vmm1Error> {
        match self.call(Action::Stats).await? {
            Reply::Stats(v) => Ok(v),
            r => Err(Vmm1Error::Internal(format!("unexpected reply {r:?}"))),
        }
    }

    /// vmmd's own counters (warm pool, pulls, store, outcomes, logs), for
    /// `cup metrics`.
    async fn counters(&self) -> Result<VmmdCounters, Vmm1Error> {
        match self.call(Action::Counters).await? {
            Reply::Counters(c) => Ok(*c),
            r => Err(Vmm1Error::Internal(format!("unexpected reply {r:?}"))),
        }
    }

    /// The scheduled units and their last runs, for `cup cron ls`.
    async fn cron(&self) -> Result<Vec<CronInfo>, Vmm1Error> {
        match self.call(Action::Cron).await? {
            Reply::Cron(v) => Ok(v),
            r => Err(Vmm1Error::Internal(format!("unexpected reply {r:?}"))),
        }
    }

    /// Gives workload `name` (a `cup run` one, not running) the name `to`.
    async fn rename(&self, name: String, to: String) -> Result<(), Vmm1Error> {
        self.call(Action::Rename(name, to)).await.map(|_| ())
    }

    /// Keeps credentials for `registry` on the machine (mode 0600) for its
    /// pulls; answers the registry as kept (`docker.io` for Docker Hub).
    async fn login(
        &self,
        registry: String,
        user: String,
        password: String,
    ) -> Result<String, Vmm1Error> {
        self.text(Action::Login(registry, user, password)).await
    }

    /// Forgets `registry`'s credentials; answers the registry, or nothing
    /// when there were none.
    async fn logout(&self, registry: String) -> Result<String, Vmm1Error> {
        self.text(Action::Logout(registry)).await
    }

    /// Every volume: (name, disk file, size, bytes allocated, workloads
    /// that name it).
    async fn volumes(&self) -> Result<Vec<VolumeInfo>, Vmm1Error> {
        match self.call(Action::Volumes).await? {
            Reply::Volumes(v) => Ok(v),
            r => Err(Vmm1Error::Internal(format!("unexpected reply {r:?}"))),
        }
    }

    /// Makes named volume `name` of `size` bytes (kept if it exists);
    /// answers its disk file.
    async fn create_volume(&self, name: String, size: u64) -> Result<String, Vmm1Error> {
        self.text(Action::CreateVolume(name, size)).await
    }

    /// Deletes a volume no workload names.
    async fn remove_volume(&self, name: String) -> Result<(), Vmm1Error> {
        self.call(Action::RemoveVolume(name)).await.map(|_| ())
    }

    /// Deletes every named volume no workload names; answers their names,
    /// one per line.
    async fn prune_volumes(&self) -> Result<String, Vmm1Error> {
        self.text(Action::PruneVolumes).await
    }

    /// Sends signal `signal` (a number, like 9) to the workload's process
    /// group inside its VM; answers once the guest has it.
    async fn kill(&self, name: String, signal: i32) -> Result<(), Vmm1Error> {
        self.call(Action::Kill(name, signal)).await.map(|_| ())
    }

    /// A workload as JSON: its spec, image, state, pid, runs, address,
    /// last outcome and vsock socket.
    async fn inspect(&self, name: String) -> Result<String, Vmm1Error> {
        self.text(Action::Inspect(name)).await
    }

    /// The last `lines` lines of a workload's console output: (lines as
    /// (sequence number, text), cursor after them, still running).
    async fn tail(
        &self,
        name: String,
        lines: u32,
    ) -> Result<(Vec<(u64, String)>, u64, bool), Vmm1Error> {
        let (lines, next, running) = self.logs_of(name, None, lines).await?;
        Ok((untimed(lines), next, running))
    }

    /// As `Tail`, each line as (sequence number, microseconds since the
    /// Unix epoch when vmmd got it, text).
    async fn tail_timed(
        &self,
        name: String,
        lines: u32,
    ) -> Result<(Vec<TimedLine>, u64, bool), Vmm1Error> {
        self.logs_of(name, None, lines).await
    }

    /// As `Logs`, each line with its time (see `TailTimed`).
    async fn logs_timed(
        &self,
        name: String,
        since: u64,
        max: u32,
    ) -> Result<(Vec<TimedLine>, u64, bool), Vmm1Error> {
        self.logs_of(name, Some(since), max).await
    }

    /// A workload's console output from sequence number `since`, at most
    /// `max` lines: (lines, cursor to go on from, still running).
    async fn logs(
        &self,
        name: String,
        since: u64,
        max: u32,
    ) -> Result<(Vec<(u64, String)>, u64, bool), Vmm1Error> {
        let (lines, next, running) = self.logs_of(name, Some(since), max).await?;
        Ok((untimed(lines), next, running))
    }

    /// Emitted on every change of a workload's state, health or last
    /// outcome; state `removed` when vmmd forgets it. `exit_code` is the
    /// last run's (-1 while none ended).
    #[zbus(signal)]
    async fn workload_changed(
        emitter: &zbus::object_server::SignalEmitter<'_>,
        name: &str,
        state: &str,
        health: &str,
        last_outcome: &str,
        exit_code: i32,
    ) -> zbus::Result<()>;

    /// Removes what no image name reaches; answers what went.
    async fn prune(&self) -> Result<String, Vmm1Error> {
        self.text(Action::Prune).await
    }
}

fn untimed(lines: Vec<TimedLine>) -> Vec<(u64, String)> {
    lines
        .into_iter()
        .map(|(seq, _, text)| (seq, text))
        .collect()
}

impl Vmm1 {
    async fn logs_of(
        &self,
        name: String,
        since: Option<u64>,
        max: u32,
    ) -> Result<(Vec<TimedLine>, u64, bool), Vmm1Error> {
        match self.call(Action::Logs { name, since, max }).await? {
            Reply::Logs(lines, next, running) => Ok((lines, next, running)),
            r => Err(Vmm1Error::Internal(format!("unexpected reply {r:?}"))),
        }
    }

    async fn text(&self, action: Action) -> Result<String, Vmm1Error> {
        match self.call(action).await? {
            Reply::Text(t) => Ok(t),
            r => Err(Vmm1Error::Internal(format!("unexpected reply {r:?}"))),
        }
    }
}

/// A workload's state as `WorkloadChanged` tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub name: String,
    pub state: WorkloadState,
    /// `healthy`, `unhealthy`, `starting`; empty without a health check.
    pub health: String,
    pub outcome: Outcome,
}

/// Serves the API on `socket` (mode 0600), forwarding to `requests`;
/// what is sent on the returned channel goes out as `WorkloadChanged` to
/// every client.
pub fn serve(
    socket: &Path,
    requests: mpsc::Sender<Request>,
) -> std::io::Result<mpsc::Sender<Change>> {
    use steelcup_api::bus::{accept_p2p, bind_private};
    use zbus::object_server::SignalEmitter;
    let listener = bind_private(socket)?;
    let emit: steelcup_api::bus::Emit<Change> = std::sync::Arc::new(|conn, c: &Change| {
        SignalEmitter::new(conn.inner(), PATH).is_ok_and(|emitter| {
            zbus::block_on(Vmm1::workload_changed(
                &emitter,
                &c.name,
                c.state.as_str(),
                &c.health,
                &c.outcome.text,
                c.outcome.exit_code,
            ))
            .is_ok()
        })
    });
    let clients = accept_p2p(
        listener,
        PATH,
        move || Vmm1 {
            requests: requests.clone(),
        },
        emit,
    )?;
    // The main loop sends changes here; this thread queues them for each
    // client (never blocking on one).
    let (tx, rx) = mpsc::channel::<Change>();
    std::thread::Builder::new()
        .name("api-signals".into())
        .spawn(move || {
            for c in rx {
                clients.broadcast(&c);
            }
        })?;
    tracing::info!("API {INTERFACE} on {}", socket.display());
    Ok(tx)
}
