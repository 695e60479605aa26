//! Memory snapshots of instances (`user.snapfs.memory=on`): libvirt external snapshots that
//! also save the guest's CPU and memory state to a file beside the disks' new overlays.
//!
//! The snapshot is live (`VIR_DOMAIN_SNAPSHOT_CREATE_LIVE`): QEMU migrates the RAM to the file
//! while the guest runs, pauses it only for the last dirty pages and the switch of the disks to
//! their overlays, and resumes it. No quiesce is needed: the saved RAM holds the filesystems'
//! state (page cache, journals in flight) as of the same instant as the disks.
//!
//! The state file is `<domain>.<snapshot>.memory.state` in the first disk's directory; it is
//! libvirt's, and reverting to the snapshot restores the guest running from it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use tracing::{info, warn};

use super::{lv_err, state_name, xml, LibvirtProvider};
use crate::error::Result;
use crate::libvirt::{sys, Domain};
use crate::provider::Owner;

impl LibvirtProvider {
    /// An external snapshot `name` of the running `dom` with its memory state in `state` (a
    /// path that does not exist yet); on failure nothing of it is left.
    pub(super) fn create_memory_snapshot(
        &self,
        dom: &Domain,
        owner: &Owner,
        name: &str,
        overlays: &[(String, PathBuf)],
        excluded: &[String],
        state: &Path,
    ) -> Result<()> {
        info!(%owner, snapshot = %name, state = %state.display(),
            "memory snapshot: the guest keeps running while its memory is saved; no quiesce needed (the saved RAM holds the filesystems' state)");
        let (before, _) = state_name(dom)?;
        let req = xml::snapshot_request(name, false, overlays, excluded, Some(state))?;
        let flags = sys::VIR_DOMAIN_SNAPSHOT_CREATE_LIVE | sys::VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC;
        let started = Instant::now();
        let res = dom.create_snapshot_xml(&req, flags);
        let ms = started.elapsed().as_millis() as u64;
        // libvirt resumes the guest itself; should a failure leave it paused, resume it: a
        // snapshot never leaves a running guest stopped.
        if before == "running" && state_name(dom).is_ok_and(|(s, _)| s == "paused") {
            warn!(%owner, snapshot = %name, "guest left paused after the memory snapshot: resuming it");
            if let Err(e) = dom.resume() {
                warn!(%owner, error = %e.message(), "cannot resume the guest");
            }
        }
        if let Err(e) = res {
            remove_state(state);
            return Err(lv_err(
                format!("creating memory snapshot {name} of {owner}"),
                e,
            ));
        }
        let bytes = std::fs::metadata(state).map(|m| m.len()).unwrap_or(0);
        info!(%owner, snapshot = %name, ms, memory_bytes = bytes, "external memory snapshot created");
        Ok(())
    }

    /// After libvirt deleted a memory snapshot: its state file, should libvirt have left it.
    /// Only a file snapfs named (`….memory.state`): another tool's state file is its own.
    pub(super) fn remove_memory_state(owner: &Owner, name: &str, state: Option<&Path>) {
        let Some(state) = state.filter(|s| ours(s)) else {
            return;
        };
        if std::fs::symlink_metadata(state).is_ok() {
            info!(%owner, snapshot = %name, state = %state.display(), "removing the deleted snapshot's memory state");
            remove_state(state);
        }
    }
}

/// Whether `state` is named as snapfs names memory state files.
fn ours(state: &Path) -> bool {
    state
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(".memory.state") || n.contains(".memory-"))
}

fn remove_state(state: &Path) {
    match std::fs::remove_file(state) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!(state = %state.display(), error = %e, "cannot remove a memory state file"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_state_files_are_ours() {
        assert!(ours(Path::new("/img/web.s1.memory.state")));
        assert!(ours(Path::new("/img/web.s1.memory-2.state")));
        assert!(!ours(Path::new("/img/web.s1.vda.qcow2")));
        assert!(!ours(Path::new("/var/lib/nova/instances/x/memory.save")));
    }
}
