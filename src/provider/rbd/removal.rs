//! Removal records of RBD snapshots (chaos finding F2, docs/testing.md).
//!
//! `rbd_snap_remove` is several steps: librbd first moves the snapshot to the trash
//! namespace, then releases its snap id, then drops it from the image header. A daemon killed
//! in between leaves a trash snapshot that keeps its data and that nobody lists. So before
//! the call, `<state-dir>/rbd-removals/<image id>.<snap id>.json` names the pool, namespace,
//! image (name and id) and snap id (written and synced); it goes once the removal returned.
//! At the next start each record is looked at, in the background (a dead client's watch can
//! hold the image's exclusive lock for ~30 s, chaos finding F3):
//! - the image is gone, or another image has its name (another id): nothing is touched;
//! - the snap id is gone: the removal had finished;
//! - it is still a user snapshot: the removal had not started, the snapshot stays (the
//!   `rmdir` did not succeed for its caller);
//! - it is in the trash namespace: `rbd_snap_remove_by_id` finishes the removal. Only that
//!   id of that image: other trash snapshots (a snapshot deleted while clone-v2 children use
//!   it, another tool's) are never touched.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::RbdAccess;
use crate::ceph::{Image, Pool, SnapState};
use crate::error::{Error, IoContext, Result};

const DIR: &str = "rbd-removals";
/// `RBD_SNAP_NAMESPACE_TYPE_TRASH`.
const TRASH: u32 = 2;
/// How long a start keeps trying to finish what a killed daemon left.
const RETRY: Duration = Duration::from_secs(300);
const PAUSE: Duration = Duration::from_secs(3);
/// Test hook: after the record, move the snapshot to the trash (librbd's first step) and
/// sleep this many ms, so a test can kill the daemon inside the removal.
const TEST_PAUSE_ENV: &str = "SNAPFS_TEST_PAUSE_IN_RBD_SNAP_REMOVE_MS";

/// Where records go; unset (no records) until [`recover`] ran.
static RECORDS: OnceLock<PathBuf> = OnceLock::new();

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    pool: String,
    namespace: String,
    image: String,
    image_id: String,
    snap_id: u64,
    snap: String,
}

/// A removal in progress, recorded.
pub(super) struct Pending {
    path: PathBuf,
    rec: Record,
}

/// Record the removal of snapshot `name` of `img` (image `image` of `pool`). Without a
/// record the removal is refused: a kill during it would leave an orphan nobody knows of.
pub(super) fn begin(pool: &Pool, image: &str, img: &Image, name: &str) -> Result<Option<Pending>> {
    let Some(dir) = RECORDS.get() else {
        return Ok(None);
    };
    let rec = Record {
        pool: pool.name.clone(),
        namespace: pool.namespace.clone(),
        image: image.to_string(),
        image_id: img.id()?,
        snap_id: img.snap_id(name)?,
        snap: name.to_string(),
    };
    std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
    let file = format!("{}.{}.json", rec.image_id, rec.snap_id);
    let body = serde_json::to_vec_pretty(&rec)
        .map_err(|e| Error::Backend(format!("encoding a removal record: {e}")))?;
    crate::provider::libvirt::freeze::write_record_file(dir, &file, &body)?;
    Ok(Some(Pending {
        path: dir.join(file),
        rec,
    }))
}

impl Pending {
    /// The removal returned (`ok` or not): the record goes unless the snapshot is left
    /// half-removed (in the trash namespace), which the next start finishes.
    pub(super) fn end(self, img: &Image, ok: bool) {
        let keep = !ok
            && match img
                .header_oid()
                .and_then(|h| img.snap_state(&h, self.rec.snap_id))
            {
                Ok(SnapState::User | SnapState::Gone) => false,
                Ok(SnapState::Other(t)) => {
                    warn!(image = %self.rec.image, snap = %self.rec.snap, namespace = t, "a failed removal left the snapshot half-removed: the next start finishes it");
                    true
                }
                Err(e) => {
                    warn!(image = %self.rec.image, snap = %self.rec.snap, error = %e, "after a failed removal the snapshot's state is unknown: the next start looks again");
                    true
                }
            };
        if !keep {
            if let Err(e) = std::fs::remove_file(&self.path) {
                warn!(path = %self.path.display(), error = %e, "cannot remove a removal record");
            }
        }
    }
}

/// The fault-injection hook of the tests ([`TEST_PAUSE_ENV`]); nothing when unset.
pub(super) fn test_pause(img: &Image, pending: Option<&Pending>) -> Result<()> {
    let (Some(p), Ok(ms)) = (pending, std::env::var(TEST_PAUSE_ENV)) else {
        return Ok(());
    };
    let ms: u64 = ms.parse().unwrap_or(0);
    img.snap_trash_add(p.rec.snap_id)?;
    warn!(image = %p.rec.image, snap = %p.rec.snap, ms, "test hook: snapshot moved to the trash, pausing inside the removal");
    std::thread::sleep(Duration::from_millis(ms));
    Ok(())
}

/// Record removals under `state_dir` from now on, and finish (in a background thread) the
/// ones a killed daemon left there.
pub(super) fn recover(access: Arc<RbdAccess>, state_dir: &Path) {
    let dir = RECORDS.get_or_init(|| state_dir.join(DIR)).clone();
    let mut left: Vec<(PathBuf, Record)> = Vec::new();
    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        match std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
        {
            Some(r) => left.push((path, r)),
            None => {
                warn!(path = %path.display(), "unreadable removal record ignored (left in place)");
            }
        }
    }
    if left.is_empty() {
        return;
    }
    info!(
        records = left.len(),
        "RBD snapshot removals of a previous daemon to finish"
    );
    let spawned = std::thread::Builder::new()
        .name("rbd-removals".into())
        .spawn(move || {
            let until = Instant::now() + RETRY;
            let mut first = true;
            while !left.is_empty() && Instant::now() < until {
                if !first {
                    std::thread::sleep(PAUSE);
                }
                left.retain(|(path, r)| match finish(&access, r) {
                    Ok(what) => {
                        info!(pool = %r.pool, image = %r.image, snap = %r.snap, snap_id = r.snap_id, "{what}");
                        if let Err(e) = std::fs::remove_file(path) {
                            warn!(path = %path.display(), error = %e, "cannot remove a removal record");
                        }
                        false
                    }
                    Err(e) => {
                        if first {
                            info!(image = %r.image, snap = %r.snap, error = %e, "interrupted RBD snapshot removal not finishable yet: retrying");
                        }
                        true
                    }
                });
                first = false;
            }
            for (path, _) in &left {
                warn!(path = %path.display(), "interrupted RBD snapshot removal still not finished: the next start retries");
            }
        });
    if let Err(e) = spawned {
        warn!(error = %e, "cannot start the RBD removal recovery thread: the next start retries");
    }
}

/// Finish one recorded removal; what was found, for the log.
fn finish(access: &RbdAccess, r: &Record) -> Result<&'static str> {
    let pool = access.pool_ns(&r.pool, &r.namespace)?;
    let img = match pool.open(&r.image, None, true) {
        Ok(i) => i,
        Err(Error::NotFound(_)) => return Ok("interrupted removal: the image is gone"),
        Err(e) => return Err(e),
    };
    if img.id()? != r.image_id {
        return Ok("interrupted removal: another image has that name now, not touched");
    }
    let header = img.header_oid()?;
    match img.snap_state(&header, r.snap_id)? {
        SnapState::Gone => Ok("interrupted removal had finished"),
        SnapState::User => Ok("interrupted removal had not started: the snapshot stays"),
        SnapState::Other(TRASH) => {
            img.snap_remove_by_id(r.snap_id)?;
            Ok("interrupted removal finished: the snapshot left in RBD's trash is removed")
        }
        SnapState::Other(_) => {
            Ok("interrupted removal: the snap id is in another namespace now, not touched")
        }
    }
}
