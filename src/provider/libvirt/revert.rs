//! Revert of an instance to one of its snapshots (the `current` link's switch), and the rules
//! that refuse one before anything is changed.
//!
//! libvirt (9.9 and later) reverts external snapshots itself: the domain gets new overlays on
//! the snapshot's images, the overlays that held the discarded state are removed, and its
//! snapshot metadata stays consistent for later deletes. snapfs keeps that discarded state
//! first as `before-revert-…` (the namespace takes it), so nothing is lost.
//!
//! | snapshot | shut-off domain | running domain |
//! | --- | --- | --- |
//! | libvirt, disk only | libvirt revert, stays shut off | `EBUSY`: shut it off first |
//! | libvirt, with memory | libvirt revert, running again from that memory | the same |
//! | libvirt, with memory, state file gone | `EINVAL` | `EINVAL` |
//! | cloud-managed domain | `EPERM`: the cloud owns the live state | `EPERM` |
//! | RBD record (RBD-backed domain) | `rbd_snap_rollback` of every disk, stays shut off; `EBUSY` while another client has a disk open | `EBUSY`: shut it off first |
//! | copy in snapfs's store | `ENOTSUP` (launch it instead) | `ENOTSUP` |
//! | libvirt, qcow2 internal (made by others) | libvirt revert (`qemu-img snapshot -a`) | with memory (savevm): the same; disk only: `EBUSY` |
//!
//! Before a revert to an internal snapshot, the state being discarded is kept as an internal
//! snapshot too ([`LibvirtProvider::keep_internal`]): an external overlay on top would leave
//! libvirt reverting the disks' internal snapshot in an image (the overlay) that lacks it.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::{lv_err, state_name, LibvirtProvider};
use crate::error::{Error, Result};
use crate::libvirt::{sys, Domain, DomainSnapshot};
use crate::provider::{Owner, SnapshotInfo};

/// libvirt names a reverted disk's new overlay `<image>.<unix seconds>`: two reverts of the
/// same disk within one second collide ("already exists"), so a revert is tried again once the
/// second has passed.
const REVERT_TRIES: usize = 3;

/// How long the start-up waits for a job libvirt runs on a domain (a revert a killed daemon
/// asked for) before it leaves the revert's intent for the next start.
const REVERT_JOB_WAIT: Duration = Duration::from_secs(300);

/// What the cloud's own tool for a revert is, for the refusal's message.
fn cloud_command(system: &str) -> &'static str {
    match system {
        "nova" => {
            "`openstack server rebuild --image <snapshot image>` (Nova's own snapshots are images)"
        }
        "cloudstack" => "CloudStack's revertToVMSnapshot (or the instance's Revert button)",
        "ovirt" => "the engine's snapshot preview and commit",
        _ => "the tool that manages this domain",
    }
}

impl LibvirtProvider {
    /// The libvirt snapshot `snap` of `dom` and whether it holds memory, or why it cannot be
    /// reverted (`ENOTSUP` for snapfs's copies and RBD records; `EPERM` on managed domains).
    fn revertible(
        &self,
        dom: &Domain,
        owner: &Owner,
        snap: &SnapshotInfo,
    ) -> Result<(DomainSnapshot, bool)> {
        self.refuse_managed(dom, owner, snap)?;
        let Ok(ls) = Domain::lookup_snapshot_by_name(dom, &snap.name, 0) else {
            return Err(Error::NotSupported(format!(
                "snapshot {} of {owner} is a copy in snapfs's store, which cannot become the live disk: launch it instead (ln -s … launch/<new>)",
                snap.name
            )));
        };
        let sx = Self::snapshot_xml(&ls)?;
        // libvirt would fail only after the state being discarded was kept: refuse first.
        if let Some(f) = sx.memory_file.as_ref().filter(|_| sx.memory == "external") {
            if std::fs::symlink_metadata(f).is_err() {
                warn!(%owner, snapshot = %snap.name, state = %f.display(), "revert refused: the memory state file is gone");
                return Err(Error::Invalid(format!(
                    "the memory state of snapshot {} of {owner} ({}) is gone: the guest cannot be resumed from it",
                    snap.name,
                    f.display()
                )));
            }
        }
        Ok((ls, sx.memory != "no"))
    }

    /// `EPERM` on a cloud-managed domain: the cloud owns its live state.
    fn refuse_managed(&self, dom: &Domain, owner: &Owner, snap: &SnapshotInfo) -> Result<()> {
        if let Some(m) = self.managed_by(dom)? {
            let system = m["system"].as_str().unwrap_or("unknown");
            warn!(%owner, snapshot = %snap.name, managed_by = %system,
                "revert refused: the cloud owns this domain's live state; use {}", cloud_command(system));
            return Err(Error::NotPermitted(format!(
                "{owner} is managed by {system}: revert it with {}",
                cloud_command(system)
            )));
        }
        Ok(())
    }

    /// The RBD record `snap` stands for, when it is one (its id says so, the record confirms).
    fn rbd_record_of(
        dom: &Domain,
        snap: &SnapshotInfo,
    ) -> Result<Option<super::xml::RbdSnapRecord>> {
        if !snap.id.starts_with("rbd:") {
            return Ok(None);
        }
        Self::rbd_record(dom, &snap.name)
    }

    /// Data disks of the domain now vs those of the snapshot: a revert across an attach or
    /// detach is refused (`EINVAL`), naming the difference.
    fn same_disks(dom: &Domain, owner: &Owner, snap: &SnapshotInfo) -> Result<()> {
        let now: BTreeSet<String> = Self::domain_xml(dom, 0)?
            .disks
            .iter()
            .filter(|d| d.is_data_disk())
            .map(|d| d.target.clone())
            .collect();
        let then: BTreeSet<String> = snap.disks.iter().map(|d| d.target.clone()).collect();
        if now != then {
            let added: Vec<_> = now.difference(&then).cloned().collect();
            let gone: Vec<_> = then.difference(&now).cloned().collect();
            warn!(%owner, snapshot = %snap.name, ?added, ?gone, "revert refused: the disk set changed since the snapshot");
            return Err(Error::Invalid(format!(
                "the disks of {owner} changed since snapshot {} (attached since: {added:?}; detached since: {gone:?})",
                snap.name
            )));
        }
        Ok(())
    }

    pub(super) fn check_instance_revert(&self, owner: &Owner, snap: &SnapshotInfo) -> Result<()> {
        let dom = self.domain(owner)?;
        if let Some(rec) = Self::rbd_record_of(&dom, snap)? {
            self.refuse_managed(&dom, owner, snap)?;
            Self::same_disks(&dom, owner, snap)?;
            return self.check_rbd_revert(&dom, owner, &rec);
        }
        let (_, memory) = self.revertible(&dom, owner, snap)?;
        let (state, active) = state_name(&dom)?;
        if active && !memory {
            return Err(Error::Busy(format!(
                "{owner} is {state} and snapshot {} holds no memory state: shut the instance off first",
                snap.name
            )));
        }
        Self::same_disks(&dom, owner, snap)
    }

    pub(super) fn revert_instance(&self, owner: &Owner, snap: &SnapshotInfo) -> Result<()> {
        let dom = self.domain(owner)?;
        if let Some(rec) = Self::rbd_record_of(&dom, snap)? {
            self.refuse_managed(&dom, owner, snap)?;
            return self.revert_rbd(&dom, owner, &rec);
        }
        let (ls, memory) = self.revertible(&dom, owner, snap)?;
        // A memory snapshot resumes the guest as it was; a disk-only one leaves it shut off.
        let flags = if memory {
            sys::VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING
        } else {
            0
        };
        let started = Instant::now();
        let mut tries = 0;
        loop {
            tries += 1;
            match ls.revert(flags) {
                Ok(()) => break,
                Err(e) if tries < REVERT_TRIES && e.message().contains("already exists") => {
                    info!(%owner, snapshot = %snap.name, "new overlay name taken within this second; trying again");
                    std::thread::sleep(Duration::from_millis(1100));
                }
                Err(e) => {
                    return Err(lv_err(
                        format!("reverting {owner} to snapshot {}", snap.name),
                        e,
                    ))
                }
            }
        }
        info!(%owner, snapshot = %snap.name, memory, ms = started.elapsed().as_millis() as u64, "libvirt reverted the instance");
        Ok(())
    }

    /// For a revert a killed daemon asked for: a libvirt snapshot is current (libvirt's own
    /// mark) once libvirt reverted to it; an RBD rollback ran in the daemon and may have
    /// stopped part way (None: do it again); store copies are never reverted.
    pub(super) fn instance_reverted_to(
        &self,
        owner: &Owner,
        snap: &SnapshotInfo,
    ) -> Result<Option<bool>> {
        let dom = self.domain(owner)?;
        if Self::rbd_record_of(&dom, snap)?.is_some() {
            return Ok(None);
        }
        let Ok(ls) = Domain::lookup_snapshot_by_name(&dom, &snap.name, 0) else {
            return Ok(Some(false));
        };
        // libvirtd finishes a revert it was asked for after the asking daemon died (seconds,
        // with memory): while the domain has a job, the answer is not known yet.
        let started = Instant::now();
        loop {
            let current = ls
                .is_current()
                .map_err(|e| lv_err(format!("is snapshot {} of {owner} current", snap.name), e))?;
            // An inactive domain has no job to ask about: an error counts as none.
            if current || !dom.has_job().unwrap_or(false) {
                return Ok(Some(current));
            }
            if started.elapsed() > REVERT_JOB_WAIT {
                return Err(Error::Busy(format!(
                    "{owner} still has a libvirt job after {}s: the revert to {} may be under way",
                    REVERT_JOB_WAIT.as_secs(),
                    snap.name
                )));
            }
            info!(%owner, snapshot = %snap.name, "libvirt still runs a job on the domain: waiting for it");
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The `before-revert-…` of a revert to an internal snapshot: an internal snapshot of the
    /// live state (libvirt's default kind: `qemu-img snapshot -c` of every disk of a shut-off
    /// domain, savevm of a running one, memory included). False when `target` is not an
    /// internal libvirt snapshot (the ordinary mkdir keeps the state then).
    pub(super) fn keep_internal(
        &self,
        owner: &Owner,
        target: &SnapshotInfo,
        name: &str,
    ) -> Result<bool> {
        let dom = self.domain(owner)?;
        let Ok(ls) = Domain::lookup_snapshot_by_name(&dom, &target.name, 0) else {
            return Ok(false);
        };
        let sx = Self::snapshot_xml(&ls)?;
        let internal = sx.disks.iter().any(|d| d.kind == "internal")
            && !sx.disks.iter().any(|d| d.kind == "external");
        if !internal {
            return Ok(false);
        }
        let req = format!(
            "<domainsnapshot><name>{}</name><description>snapfs: the state before a revert to {}</description></domainsnapshot>",
            super::xml::escape(name)?,
            super::xml::escape(&target.name)?
        );
        let started = Instant::now();
        dom.create_snapshot_xml(&req, 0)
            .map_err(|e| lv_err(format!("keeping {owner} as internal snapshot {name}"), e))?;
        info!(%owner, snapshot = %name, ms = started.elapsed().as_millis() as u64, "internal snapshot of the state being reverted");
        Ok(true)
    }
}
