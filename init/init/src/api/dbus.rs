//! The D-Bus adapter: `org.steelcup.Init1` on a peer-to-peer socket.
//!
//! # Design
//! init listens on `RUN_DIR/init.sock` (mode 0600: root only) and speaks
//! D-Bus peer to peer on each connection (no bus daemon on the host): any
//! D-Bus client that can talk to a peer address works, e.g.
//! `dbus-send --peer=unix:path=/run/steelcup/init.sock ...`. Each method
//! decodes its arguments into an [`Action`], sends it to the supervisor's
//! loop through [`Control`], and awaits the answer; logs are read from the
//! shared log store directly. `UnitChanged(name, state)` is emitted on every
//! connection for every state change.

use super::{Action, ApiError, ReloadSummary, Reply, Request, UnitInfo, INTERFACE, PATH};
use nix::sys::eventfd::{EfdFlags, EventFd};
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use steelcup_api::bus::{accept_p2p, bind_private};
use steelcup_os::logs::LogStore;
use zbus::object_server::SignalEmitter;

/// Errors as D-Bus sees them: `org.steelcup.Init1.Error.NoSuchUnit`, ...
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.steelcup.Init1.Error")]
pub enum Init1Error {
    #[zbus(error)]
    ZBus(zbus::Error),
    NoSuchUnit(String),
    NotAService(String),
    Refused(String),
    ShuttingDown(String),
    /// An update, rollback or slot status refused (why in the message).
    Update(String),
    Internal(String),
}

impl From<ApiError> for Init1Error {
    fn from(e: ApiError) -> Self {
        let msg = e.to_string();
        match e {
            ApiError::NoSuchUnit(_) => Init1Error::NoSuchUnit(msg),
            ApiError::NotAService(_) => Init1Error::NotAService(msg),
            ApiError::Refused(_) => Init1Error::Refused(msg),
            ApiError::ShuttingDown => Init1Error::ShuttingDown(msg),
            ApiError::Update(_) => Init1Error::Update(msg),
        }
    }
}

/// The supervisor's end of the API: requests and the eventfd that wakes its loop.
#[derive(Debug)]
pub struct Control {
    pub requests: mpsc::Receiver<Request>,
    pub wake: Arc<EventFd>,
}

impl Control {
    /// Clears the wake-up counter.
    pub fn drain_wake(&self) {
        let _ = self.wake.read();
    }
}

/// The API's end: sends actions and awaits answers.
#[derive(Debug, Clone)]
pub struct Handle {
    tx: mpsc::Sender<Request>,
    wake: Arc<EventFd>,
}

/// A connected pair.
pub fn channel() -> std::io::Result<(Handle, Control)> {
    let wake = Arc::new(
        EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
            .map_err(std::io::Error::from)?,
    );
    let (tx, rx) = mpsc::channel();
    Ok((
        Handle {
            tx,
            wake: wake.clone(),
        },
        Control { requests: rx, wake },
    ))
}

impl Handle {
    /// Sends `action` and waits for the supervisor's answer.
    pub async fn call(&self, action: Action) -> Result<Reply, Init1Error> {
        let (reply, answer) = futures_channel::oneshot::channel();
        self.tx
            .send(Request { action, reply })
            .map_err(|_| Init1Error::ShuttingDown("init is shutting down".into()))?;
        let _ = self.wake.write(1);
        match answer.await {
            Ok(r) => r.map_err(Init1Error::from),
            Err(_) => Err(Init1Error::ShuttingDown("init is shutting down".into())),
        }
    }
}

/// The interface object served on every connection.
#[derive(Debug, Clone)]
pub struct Init1 {
    handle: Handle,
    logs: Arc<LogStore>,
    slots: Option<super::slots::Slots>,
}

impl Init1 {
    /// Executes a slot action on a thread of its own and, if asked, reboots
    /// through the supervisor (units stopped in order).
    async fn slot_action(&self, action: Action, reboot: bool) -> Result<Reply, Init1Error> {
        let slots = self.slots.clone();
        let reply = off_thread(move || super::slots::execute(slots.as_ref(), action)).await??;
        if reboot {
            self.handle.call(Action::Reboot).await?;
        }
        Ok(reply)
    }
}

/// Runs `f` on a thread of its own (disk I/O that may take seconds) and
/// awaits its answer, so the connection's executor is never held.
async fn off_thread<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Init1Error> {
    let (tx, rx) = futures_channel::oneshot::channel();
    std::thread::Builder::new()
        .name("api-slots".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| Init1Error::Internal(format!("start the slot thread: {e}")))?;
    rx.await
        .map_err(|_| Init1Error::Internal("the slot thread ended without an answer".into()))
}

fn unexpected(r: Reply) -> Init1Error {
    Init1Error::Internal(format!("unexpected reply {r:?}"))
}

#[zbus::interface(name = "org.steelcup.Init1")]
impl Init1 {
    /// Every unit: (name, kind, state, reason, pid, restarts, last exit, description).
    async fn list_units(&self) -> Result<Vec<UnitInfo>, Init1Error> {
        match self.handle.call(Action::ListUnits).await? {
            Reply::Units(mut units) => {
                let dropped: std::collections::BTreeMap<String, u64> =
                    self.logs.dropped_bytes().into_iter().collect();
                for u in &mut units {
                    u.log_bytes_dropped = dropped.get(&u.name).copied().unwrap_or(0);
                }
                Ok(units)
            }
            r => Err(unexpected(r)),
        }
    }

    async fn status(&self, name: String) -> Result<UnitInfo, Init1Error> {
        match self.handle.call(Action::Status(name)).await? {
            Reply::Unit(u) => Ok(u),
            r => Err(unexpected(r)),
        }
    }

    async fn start(&self, name: String) -> Result<(), Init1Error> {
        self.handle.call(Action::Start(name)).await.map(|_| ())
    }

    async fn stop(&self, name: String) -> Result<(), Init1Error> {
        self.handle.call(Action::Stop(name)).await.map(|_| ())
    }

    async fn restart(&self, name: String) -> Result<(), Init1Error> {
        self.handle.call(Action::Restart(name)).await.map(|_| ())
    }

    /// Re-reads the unit files and applies the difference.
    async fn reload(&self) -> Result<ReloadSummary, Init1Error> {
        match self.handle.call(Action::Reload).await? {
            Reply::Reloaded(s) => Ok(s),
            r => Err(unexpected(r)),
        }
    }

    /// Installs unit files (`NAME.toml`, text), checked against the whole
    /// set first (a bad one changes nothing), then reloads; with
    /// `dry_run`, only says what would change.
    async fn apply(
        &self,
        files: Vec<(String, String)>,
        dry_run: bool,
    ) -> Result<ReloadSummary, Init1Error> {
        match self.handle.call(Action::Apply { files, dry_run }).await? {
            Reply::Reloaded(s) => Ok(s),
            r => Err(unexpected(r)),
        }
    }

    /// Removes a unit `cup apply` installed, then reloads.
    async fn remove_unit(&self, name: String) -> Result<ReloadSummary, Init1Error> {
        match self.handle.call(Action::RemoveUnit(name)).await? {
            Reply::Reloaded(s) => Ok(s),
            r => Err(unexpected(r)),
        }
    }

    /// A unit's file and its drop-ins, as init reads them.
    async fn cat_unit(&self, name: String) -> Result<String, Init1Error> {
        match self.handle.call(Action::CatUnit(name)).await? {
            Reply::Text(t) => Ok(t),
            r => Err(unexpected(r)),
        }
    }

    /// Checks a machine config whole and, unless `dry_run`, applies it
    /// live: (files changed, those that need a reboot, the units' reload).
    async fn machine_apply(
        &self,
        text: String,
        dry_run: bool,
    ) -> Result<(Vec<String>, Vec<String>, ReloadSummary), Init1Error> {
        match self
            .handle
            .call(Action::MachineApply { text, dry_run })
            .await?
        {
            Reply::MachineChanged(c) => Ok((c.changed, c.needs_reboot, c.units)),
            r => Err(unexpected(r)),
        }
    }

    /// The applied machine config, its secrets left out.
    async fn machine_show(&self) -> Result<String, Init1Error> {
        match self.handle.call(Action::MachineShow).await? {
            Reply::Text(t) => Ok(t),
            r => Err(unexpected(r)),
        }
    }

    /// Marks the state partition to be wiped, then reboots: the machine
    /// comes back as on its first boot. `confirm` must be
    /// `wipe-all-data`.
    async fn machine_reset(&self, confirm: String) -> Result<(), Init1Error> {
        if confirm != "wipe-all-data" {
            return Err(Init1Error::Refused(
                "a reset wipes /var: confirm with \"wipe-all-data\"".into(),
            ));
        }
        self.handle.call(Action::MachineReset).await?;
        self.handle.call(Action::Reboot).await?;
        Ok(())
    }

    /// Lines of a unit's log with sequence number >= `since` (at most `max`),
    /// and the cursor to continue from: call again with it to follow.
    async fn logs(
        &self,
        name: String,
        since: u64,
        max: u32,
    ) -> Result<(Vec<(u64, String)>, u64), Init1Error> {
        Ok(self.logs.read(&name, since, max.min(10_000) as usize))
    }

    /// The last `lines` lines of a unit's log and the cursor after them.
    async fn tail(
        &self,
        name: String,
        lines: u32,
    ) -> Result<(Vec<(u64, String)>, u64), Init1Error> {
        // A unit that does not exist is an error, not an empty log (`cup
        // logs --unit NOSUCH`); following (`logs`) does not ask again.
        self.handle.call(Action::Status(name.clone())).await?;
        Ok(self.logs.tail(&name, lines.min(10_000) as usize))
    }

    /// As `Logs`, each line as (sequence number, microseconds since the
    /// Unix epoch when init got it, text).
    async fn logs_timed(
        &self,
        name: String,
        since: u64,
        max: u32,
    ) -> Result<(Vec<(u64, u64, String)>, u64), Init1Error> {
        let (lines, next) = self.logs.read_timed(&name, since, max.min(10_000) as usize);
        Ok((timed(lines), next))
    }

    /// As `Tail`, each line with its time (see `LogsTimed`).
    async fn tail_timed(
        &self,
        name: String,
        lines: u32,
    ) -> Result<(Vec<(u64, u64, String)>, u64), Init1Error> {
        self.handle.call(Action::Status(name.clone())).await?;
        let (lines, next) = self.logs.tail_timed(&name, lines.min(10_000) as usize);
        Ok((timed(lines), next))
    }

    /// The kernel's log (`cup dmesg`): the last `max` records (at most
    /// 10000) whose sequence number is at least `since`, each (sequence,
    /// microseconds since boot, syslog level, text), and the number to
    /// ask from next to follow it.
    async fn kernel_log(
        &self,
        since: u64,
        max: u32,
    ) -> Result<(Vec<(u64, u64, u8, String)>, u64), Init1Error> {
        let path = std::path::Path::new(steelcup_os::kmsg::KMSG);
        let (records, next) =
            off_thread(move || steelcup_os::kmsg::read(path, since, max as usize))
                .await?
                .map_err(|e| Init1Error::Refused(format!("{}: {e}", path.display())))?;
        Ok((
            records
                .into_iter()
                .map(|r| (r.seq, r.micros, r.level, r.text))
                .collect(),
            next,
        ))
    }

    /// Each running service: (unit, CPU time µs, memory bytes), from its
    /// cgroup (`cup top`).
    async fn usage(&self) -> Result<Vec<(String, u64, u64)>, Init1Error> {
        match self.handle.call(Action::Usage).await? {
            Reply::Usage(v) => Ok(v),
            r => Err(unexpected(r)),
        }
    }

    /// The host now: name, kernel, uptime, load, memory, network links
    /// and addresses, `/var`, the clock (`cup health`).
    async fn host_status(&self) -> Result<steelcup_os::host::HostStatus, Init1Error> {
        off_thread(|| steelcup_os::host::status(std::path::Path::new(steelcup_os::state::VAR)))
            .await
    }

    async fn power_off(&self) -> Result<(), Init1Error> {
        self.handle.call(Action::PowerOff).await.map(|_| ())
    }

    async fn reboot(&self) -> Result<(), Init1Error> {
        self.handle.call(Action::Reboot).await.map(|_| ())
    }

    /// Writes the update file at `source` (a path on this host: a regular
    /// file or a block device holding a slot image) into the OS slot that
    /// is not running, checks it as written and makes it boot next, once;
    /// then reboots if `reboot`. Returns (slot, version).
    async fn update(&self, source: String, reboot: bool) -> Result<(String, String), Init1Error> {
        let action = Action::Update {
            source: source.into(),
        };
        match self.slot_action(action, reboot).await? {
            Reply::Installed { slot, version } => Ok((slot, version)),
            r => Err(unexpected(r)),
        }
    }

    /// Makes the other OS slot boot next, once, if it holds an OS that
    /// checks; then reboots if `reboot`. Returns (slot, version).
    async fn rollback(&self, reboot: bool) -> Result<(String, String), Init1Error> {
        match self.slot_action(Action::Rollback, reboot).await? {
            Reply::Installed { slot, version } => Ok((slot, version)),
            r => Err(unexpected(r)),
        }
    }

    /// The OS slots: which booted, GRUB's order and tries, each slot's
    /// version (checked).
    async fn update_status(&self) -> Result<steelcup_os::update::Status, Init1Error> {
        match self.slot_action(Action::UpdateStatus, false).await? {
            Reply::SlotStatus(s) => Ok(s),
            r => Err(unexpected(r)),
        }
    }

    /// Emitted on every unit state change.
    #[zbus(signal)]
    async fn unit_changed(emitter: &SignalEmitter<'_>, name: &str, state: &str)
        -> zbus::Result<()>;
}

/// Serves the API on `socket`; returns the observer that emits
/// `UnitChanged` for the supervisor to call on state changes.
pub fn serve(
    socket: &Path,
    handle: Handle,
    logs: Arc<LogStore>,
    slots: Option<super::slots::Slots>,
) -> std::io::Result<crate::supervisor::Observer> {
    let listener = bind_private(socket)?;
    let emit: steelcup_api::bus::Emit<(String, String)> = Arc::new(
        |c: &zbus::blocking::Connection, (name, state): &(String, String)| {
            SignalEmitter::new(c.inner(), PATH)
                .is_ok_and(|e| zbus::block_on(Init1::unit_changed(&e, name, state)).is_ok())
        },
    );
    let clients = accept_p2p(
        listener,
        PATH,
        move || Init1 {
            handle: handle.clone(),
            logs: logs.clone(),
            slots: slots.clone(),
        },
        emit,
    )?;
    let tx = Mutex::new(clients);
    tracing::info!("API {INTERFACE} on {}", socket.display());
    Ok(Box::new(
        move |name: &str, state: &crate::supervisor::State| {
            if let Ok(clients) = tx.lock() {
                clients.broadcast(&(name.to_string(), state.name().to_string()));
            }
        },
    ))
}

fn timed(lines: Vec<steelcup_os::logs::Line>) -> Vec<(u64, u64, String)> {
    lines
        .into_iter()
        .map(|l| (l.seq, l.micros, l.text))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_named_dbus_errors() {
        use zbus::DBusError;
        let e = Init1Error::from(ApiError::NoSuchUnit("x".into()));
        assert_eq!(e.name().as_str(), "org.steelcup.Init1.Error.NoSuchUnit");
        assert!(e.description().unwrap_or_default().contains("\"x\""));
    }
}
