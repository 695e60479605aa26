//! Freezing guest filesystems without ever leaving a guest frozen.
//!
//! - A record `<state-dir>/frozen/<domain-uuid>` is written (and synced) BEFORE the freeze is
//!   sent, and removed only once the guest is known thawed (a thaw succeeded, or
//!   `guest-fsfreeze-status` said `thawed`). A daemon killed in between leaves the record;
//!   [`Freezer::recover`] at the next start thaws the guest.
//! - The freeze runs in its own thread with a deadline. When the deadline passes first, the
//!   caller goes on (timeout), and that thread, once libvirt returns, makes sure the guest
//!   ends up thawed: a late freeze (an agent that was hung and then resumes) is undone.
//! - [`Frozen`] thaws on drop, so every path out of a snapshot (error, panic) thaws.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::libvirt::Connect;
use crate::libvirt::Domain;
use tracing::{debug, info, warn};

use super::agent::{self, FreezeStatus};
use crate::error::{Error, IoContext, Result};
use crate::namespace::registry::lock;

/// How long an agent status query may take.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a background watcher keeps trying to reach an agent to confirm a thaw.
const WATCH_FOR: Duration = Duration::from_secs(30 * 60);
const WATCH_EVERY: Duration = Duration::from_secs(2);

#[derive(serde::Serialize, serde::Deserialize, Debug)]
struct Record {
    domain: String,
    uuid: String,
    pid: u32,
    since: String,
}

/// Freeze records and the guests whose thaw is still being chased in the background.
pub struct Freezer {
    dir: PathBuf,
    /// Domain UUIDs with an unresolved freeze (a watcher is on them): no new freeze until done.
    unresolved: Mutex<HashSet<String>>,
}

/// What a freeze attempt came to.
pub enum FreezeOutcome {
    Frozen(Frozen),
    /// The agent answered with an error (or is not connected); the guest is not frozen.
    Failed(Error),
    /// No answer within the deadline; a background thread makes sure the guest ends thawed.
    TimedOut,
}

enum Slot {
    Waiting,
    Abandoned,
    Done(Result<u32>),
}

impl Freezer {
    pub fn new(state_dir: &Path) -> Result<Arc<Freezer>> {
        let dir = state_dir.join("frozen");
        std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        Ok(Arc::new(Freezer {
            dir,
            unresolved: Mutex::new(HashSet::new()),
        }))
    }

    fn record_path(&self, uuid: &str) -> PathBuf {
        self.dir.join(uuid)
    }

    fn write_record(&self, uuid: &str, domain: &str) -> Result<()> {
        let rec = Record {
            domain: domain.to_string(),
            uuid: uuid.to_string(),
            pid: std::process::id(),
            since: crate::provider::rfc3339(SystemTime::now()),
        };
        // The record must be durable before the freeze is sent.
        write_record_file(
            &self.dir,
            uuid,
            &serde_json::to_vec(&rec).unwrap_or_default(),
        )
    }

    fn remove_record(&self, uuid: &str) {
        let path = self.record_path(uuid);
        match std::fs::remove_file(&path) {
            Ok(()) => debug!(record = %path.display(), "freeze record removed"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(record = %path.display(), error = %e, "cannot remove freeze record"),
        }
    }

    /// Freeze every filesystem of `dom`, waiting at most `timeout`.
    pub fn freeze(
        self: &Arc<Self>,
        dom: &Domain,
        uuid: &str,
        name: &str,
        timeout: Duration,
    ) -> FreezeOutcome {
        if lock(&self.unresolved).contains(uuid) {
            return FreezeOutcome::Failed(Error::Busy(format!(
                "an earlier freeze of {name} is still unresolved (agent not answering)"
            )));
        }
        if let Err(e) = self.write_record(uuid, name) {
            return FreezeOutcome::Failed(e);
        }
        let slot = Arc::new((Mutex::new(Slot::Waiting), Condvar::new()));
        let started = Instant::now();
        let spawned = {
            let slot = slot.clone();
            let dom = dom.clone();
            let me = self.clone();
            let (uuid, name) = (uuid.to_string(), name.to_string());
            std::thread::Builder::new()
                .name(format!("freeze {name}"))
                .spawn(move || {
                    let res = agent::fs_freeze(&dom);
                    let mut s = lock(&slot.0);
                    if matches!(*s, Slot::Abandoned) {
                        drop(s);
                        warn!(domain = %name, ?res, "freeze returned after its deadline: making sure the guest is thawed");
                        me.settle(&dom, &uuid, &name, res.is_ok());
                    } else {
                        *s = Slot::Done(res);
                        slot.1.notify_all();
                    }
                })
        };
        if let Err(e) = spawned {
            self.remove_record(uuid);
            return FreezeOutcome::Failed(Error::io("starting the freeze thread", e));
        }
        let deadline = started + timeout;
        let mut s = lock(&slot.0);
        loop {
            if let Slot::Done(_) = *s {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                *s = Slot::Abandoned;
                lock(&self.unresolved).insert(uuid.to_string());
                warn!(domain = %name, ms = timeout.as_millis() as u64, "guest agent did not freeze within the timeout");
                return FreezeOutcome::TimedOut;
            }
            s = match slot.1.wait_timeout(s, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        let Slot::Done(res) = std::mem::replace(&mut *s, Slot::Done(Ok(0))) else {
            return FreezeOutcome::TimedOut;
        };
        drop(s);
        let ms = started.elapsed().as_millis() as u64;
        match res {
            Ok(n) => {
                info!(domain = %name, filesystems = n, ms, "guest frozen");
                FreezeOutcome::Frozen(Frozen {
                    freezer: self.clone(),
                    dom: dom.clone(),
                    uuid: uuid.to_string(),
                    name: name.to_string(),
                    done: false,
                    frozen_at: Instant::now(),
                })
            }
            Err(e) => {
                warn!(domain = %name, error = %e, ms, "guest agent could not freeze");
                // Normally nothing was frozen; make sure of it before dropping the record.
                self.clear_after_failed_freeze(dom, uuid, name, &e);
                FreezeOutcome::Failed(e)
            }
        }
    }

    fn clear_after_failed_freeze(
        self: &Arc<Self>,
        dom: &Domain,
        uuid: &str,
        name: &str,
        e: &Error,
    ) {
        let msg = e.to_string();
        // libvirt sent nothing to an agent that is not connected; an agent already in frozen
        // state was frozen by someone else, whose thaw it is.
        if msg.contains("not connected") || msg.contains("frozen state") {
            self.remove_record(uuid);
            return;
        }
        // The freeze may still land (a hung agent with a libvirt agent timeout has it queued):
        // check in the background, so the caller's deadline holds.
        self.watch(dom, uuid, name);
    }

    /// Thaw `dom` now; on failure hand it to a background watcher. Removes the record once
    /// the guest is known thawed.
    fn thaw_now(self: &Arc<Self>, dom: &Domain, uuid: &str, name: &str) -> Result<()> {
        let mut last = None;
        for wait in [0u64, 100, 500] {
            std::thread::sleep(Duration::from_millis(wait));
            match agent::fs_thaw(dom) {
                Ok(n) => {
                    debug!(domain = %name, filesystems = n, "guest thawed");
                    self.remove_record(uuid);
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
            if let Ok(FreezeStatus::Thawed) = agent::freeze_status(dom, Duration::from_secs(2)) {
                self.remove_record(uuid);
                return Ok(());
            }
        }
        let e = last.unwrap_or_else(|| Error::Backend("thaw failed".into()));
        warn!(domain = %name, error = %e, "thaw failed: retrying in the background");
        self.watch(dom, uuid, name);
        Err(e)
    }

    /// Keep checking in a background thread until the guest is thawed (or gone).
    fn watch(self: &Arc<Self>, dom: &Domain, uuid: &str, name: &str) {
        lock(&self.unresolved).insert(uuid.to_string());
        let me = self.clone();
        let dom = dom.clone();
        let (uuid, name) = (uuid.to_string(), name.to_string());
        let spawned = std::thread::Builder::new()
            .name(format!("thaw {name}"))
            .spawn(move || me.settle(&dom, &uuid, &name, false));
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start a thaw watcher; the record stays for the next start");
        }
    }

    /// Until the guest is known thawed: thaw it if it is (or may be) frozen. `thaw_first`
    /// when a freeze is known to have landed.
    fn settle(&self, dom: &Domain, uuid: &str, name: &str, thaw_first: bool) {
        lock(&self.unresolved).insert(uuid.to_string());
        let until = Instant::now() + WATCH_FOR;
        let thaw = |why: &str| match agent::fs_thaw(dom) {
            Ok(n) => {
                info!(domain = %name, filesystems = n, "{why}: guest thawed");
                true
            }
            Err(e) => {
                debug!(domain = %name, error = %e, "thaw attempt failed");
                false
            }
        };
        if thaw_first && thaw("freeze returned after its deadline") {
            self.remove_record(uuid);
            lock(&self.unresolved).remove(uuid);
            return;
        }
        let resolved = loop {
            // Shut off, or gone (a cloud's undefine, a transient domain destroyed): nothing
            // of it can be frozen; any other error: keep asking.
            let gone = match dom.is_active() {
                Ok(active) => !active,
                Err(e) => e.code().known() == Some(crate::libvirt::ErrorNumber::NoDomain),
            };
            if gone {
                info!(domain = %name, "domain no longer running: nothing left frozen");
                break true;
            }
            match agent::freeze_status(dom, STATUS_TIMEOUT) {
                Ok(FreezeStatus::Thawed) => break true,
                Ok(FreezeStatus::Frozen) => {
                    warn!(domain = %name, "late freeze: the guest froze after we gave up; thawing");
                    if thaw("late freeze undone") {
                        break true;
                    }
                }
                Err(e) => debug!(domain = %name, error = %e, "agent not answering yet"),
            }
            if Instant::now() >= until {
                break false;
            }
            std::thread::sleep(WATCH_EVERY);
        };
        if resolved {
            info!(domain = %name, "guest confirmed thawed; freeze record removed");
            self.remove_record(uuid);
        } else {
            warn!(domain = %name, "agent still unreachable: freeze record kept for the next start");
        }
        lock(&self.unresolved).remove(uuid);
    }

    /// At start-up: thaw every guest a previous daemon left frozen, per the records.
    pub fn recover(self: &Arc<Self>, conn: &Connect) -> Result<usize> {
        let entries =
            std::fs::read_dir(&self.dir).ctx(|| format!("listing {}", self.dir.display()))?;
        let mut n = 0;
        for e in entries.flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            if file.starts_with('.') {
                let _ = std::fs::remove_file(e.path());
                continue;
            }
            n += 1;
            let rec: Option<Record> = std::fs::read(e.path())
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            let name = rec.as_ref().map(|r| r.domain.clone()).unwrap_or_default();
            let dom = match conn.lookup_domain_by_uuid_string(&file) {
                Ok(d) => d,
                Err(err) => {
                    info!(uuid = %file, domain = %name, error = %err, "freeze record of a domain that no longer exists: removed");
                    self.remove_record(&file);
                    continue;
                }
            };
            let name = dom.name().unwrap_or(name);
            if !dom.is_active().unwrap_or(false) {
                info!(domain = %name, "freeze record of a domain that is not running: removed");
                self.remove_record(&file);
                continue;
            }
            match agent::freeze_status(&dom, STATUS_TIMEOUT) {
                Ok(FreezeStatus::Frozen) => {
                    warn!(domain = %name, "guest left frozen by a previous daemon: thawing");
                    match self.thaw_now(&dom, &file, &name) {
                        Ok(()) => info!(domain = %name, "guest thawed; freeze record removed"),
                        Err(err) => {
                            warn!(domain = %name, error = %err, "thaw failed; retrying in the background")
                        }
                    }
                }
                Ok(FreezeStatus::Thawed) => {
                    info!(domain = %name, "guest of a freeze record is thawed: record removed");
                    self.remove_record(&file);
                }
                Err(err) => {
                    warn!(domain = %name, error = %err, "agent not answering for a freeze record: retrying in the background");
                    self.watch(&dom, &file, &name);
                }
            }
        }
        Ok(n)
    }
}

/// Write `dir/name` durably (a temporary file synced, renamed into place, the directory
/// synced): a record that must survive the daemon before the guest is touched.
pub(crate) fn write_record_file(dir: &Path, name: &str, body: &[u8]) -> Result<()> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::File::create(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
    f.write_all(body)
        .and_then(|_| f.sync_all())
        .ctx(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).ctx(|| format!("renaming to {}", path.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// A frozen guest. Thaws on drop; [`Frozen::thaw`] reports the result.
pub struct Frozen {
    freezer: Arc<Freezer>,
    dom: Domain,
    uuid: String,
    name: String,
    done: bool,
    frozen_at: Instant,
}

impl Frozen {
    pub fn thaw(mut self) -> Result<()> {
        self.done = true;
        let res = self.freezer.thaw_now(&self.dom, &self.uuid, &self.name);
        info!(domain = %self.name, frozen_ms = self.frozen_at.elapsed().as_millis() as u64, ok = res.is_ok(), "thaw");
        res
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.done {
            warn!(domain = %self.name, "leaving a snapshot early: thawing the guest");
            let _ = self.freezer.thaw_now(&self.dom, &self.uuid, &self.name);
        }
    }
}
