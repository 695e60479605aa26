//! LVM snapshots of block-device disks (`--lvm-snapshots`, issue 16).
//!
//! When every data disk of a domain is an LVM logical volume (Nova's lvm image backend,
//! Cinder's LVM volumes on the same host), the store snapshot can be LVM's own snapshot
//! instead of a copy: the guest is frozen (or, with no freeze and several LVs, its vCPUs
//! paused), `lvcreate -s` runs on every LV, then the guest is thawed. A thin LV gets a thin
//! snapshot (`lvcreate -s -k n -n NAME VG/LV`: no size, activated at once); a thick LV a
//! classic copy-on-write one whose size is `--lvm-cow-size` (`-L <bytes>b`). The snapshot
//! device `/dev/VG/NAME` is then the disk's bytes; rmdir is `lvremove -f VG/NAME`.
//!
//! The LVM tools are run through [`LvmRunner`], so the command lines and the ordering
//! (freeze, every lvcreate, thaw; thaw on every error path, then the snapshots made so far
//! removed) are unit-tested with a fake runner: the machines this was written on have no
//! device-mapper in the kernel (`dmsetup version` fails).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::{info, warn};

use super::freeze::Frozen;
use super::rbd::Paused;
use super::store::{Meta, MetaDisk};
use super::LibvirtProvider;
use crate::error::{Error, Result};
use crate::libvirt::Domain;
use crate::provider::Owner;

/// Runs an LVM (or device-mapper) tool.
pub trait LvmRunner: Send + Sync {
    /// `cmd args…`: its stdout, or an error naming the command and its stderr.
    fn run(&self, cmd: &str, args: &[String]) -> Result<String>;
}

/// The real tools, from `PATH`, with a C locale (their output is parsed).
pub struct SystemLvm;

impl LvmRunner for SystemLvm {
    fn run(&self, cmd: &str, args: &[String]) -> Result<String> {
        let out = Command::new(cmd)
            .args(args)
            .env("LC_ALL", "C")
            // lvm warns about file descriptors it inherits (the FUSE device among them).
            .env("LVM_SUPPRESS_FD_WARNINGS", "1")
            .output()
            .map_err(|e| Error::Backend(format!("running {cmd}: {e}")))?;
        if !out.status.success() {
            return Err(Error::Backend(format!(
                "{cmd} {}: {} ({})",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim(),
                out.status
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Whether device-mapper works here (`dmsetup version` succeeds).
pub fn device_mapper_available(runner: &dyn LvmRunner) -> bool {
    runner.run("dmsetup", &["version".to_string()]).is_ok()
}

/// A logical volume `VG/LV`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LvRef {
    pub vg: String,
    pub lv: String,
}

impl LvRef {
    pub fn spec(&self) -> String {
        format!("{}/{}", self.vg, self.lv)
    }

    /// The device LVM makes for it.
    pub fn device(&self) -> PathBuf {
        PathBuf::from("/dev").join(&self.vg).join(&self.lv)
    }
}

/// A disk to snapshot: its target, its LV, and whether the LV is thin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub target: String,
    pub lv: LvRef,
    pub thin: bool,
}

/// Whether `lv` is a thin volume: the first letter of its `lv_attr` is `V`.
pub fn is_thin(runner: &dyn LvmRunner, lv: &LvRef) -> Result<bool> {
    let attr = runner.run(
        "lvs",
        &[
            "--noheadings".into(),
            "-o".into(),
            "lv_attr".into(),
            lv.spec(),
        ],
    )?;
    let attr = attr.trim();
    if attr.is_empty() {
        return Err(Error::NotFound(format!("logical volume {}", lv.spec())));
    }
    Ok(attr.starts_with('V'))
}

/// The name of snapshot `id` of LV `lv`: `<lv>.snapfs.<id>` (only LVM's name characters,
/// the origin's part bounded so the whole stays well under LVM's 127).
pub fn snapshot_name(lv: &str, id: &str) -> String {
    let clean = |s: &str, max: usize| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "+_.-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .take(max)
            .collect()
    };
    let mut origin = clean(lv, 60);
    if origin.starts_with('-') || origin.is_empty() {
        origin.insert(0, 'l');
    }
    format!("{origin}.snapfs.{}", clean(id, 40))
}

/// `lvcreate`'s arguments for snapshot `name` of `o`: thin → a thin snapshot, activated
/// (`-k n`: thin snapshots are skipped at activation by default); thick → a copy-on-write
/// snapshot of `cow_size` bytes, which a thick LV cannot do without.
pub fn lvcreate_args(o: &Origin, name: &str, cow_size: Option<u64>) -> Result<Vec<String>> {
    let mut a = vec!["-s".to_string()];
    if o.thin {
        a.extend(["-k".into(), "n".into()]);
    } else {
        let Some(size) = cow_size else {
            return Err(Error::Invalid(format!(
                "disk {} is the thick LV {}: an LVM snapshot of it needs --lvm-cow-size (the space its changes may take)",
                o.target,
                o.lv.spec()
            )));
        };
        a.extend(["-L".into(), format!("{size}b")]);
    }
    a.extend(["-n".into(), name.to_string(), o.lv.spec()]);
    Ok(a)
}

/// `lvremove`'s arguments for `snap`.
pub fn lvremove_args(snap: &LvRef) -> Vec<String> {
    vec!["-f".into(), snap.spec()]
}

/// Remove LV snapshots; each failure logged, the first returned.
pub fn remove_all(runner: &dyn LvmRunner, snaps: &[LvRef]) -> Result<()> {
    let mut first = None;
    for s in snaps {
        if let Err(e) = runner.run("lvremove", &lvremove_args(s)) {
            warn!(lv = %s.spec(), error = %e, "cannot remove an LVM snapshot");
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

/// Remove LV snapshots that may be gone already (a restart after a kill): an LV LVM does
/// not find counts as removed.
pub fn remove_present(runner: &dyn LvmRunner, snaps: &[LvRef]) -> Result<()> {
    let mut first = None;
    for s in snaps {
        match runner.run("lvremove", &lvremove_args(s)) {
            Ok(_) => {}
            Err(e) if e.to_string().contains("Failed to find logical volume") => {}
            Err(e) => {
                warn!(lv = %s.spec(), error = %e, "cannot remove an LVM snapshot");
                first.get_or_insert(e);
            }
        }
    }
    first.map_or(Ok(()), Err)
}

/// What [`snapshot_all`] made: per origin (same order), its snapshot.
#[derive(Debug)]
pub struct Taken {
    pub snaps: Vec<LvRef>,
    /// `hold` called → its guard dropped.
    pub held_ms: u64,
}

/// One point in time of every origin: every command line is made first (a thick LV without
/// a cow size fails before anything happens), then `hold()` (the freeze, or the pause; its
/// guard releases on drop), `lvcreate` on each, the guard dropped, and only then, if an
/// `lvcreate` failed, the snapshots already made removed. The guard is dropped on every
/// way out, so a guest is never left frozen or paused by an error here.
pub fn snapshot_all<G>(
    runner: &dyn LvmRunner,
    origins: &[Origin],
    id: &str,
    cow_size: Option<u64>,
    hold: impl FnOnce() -> Result<G>,
) -> Result<Taken> {
    let mut planned = Vec::new();
    for o in origins {
        let name = snapshot_name(&o.lv.lv, id);
        let args = lvcreate_args(o, &name, cow_size)?;
        planned.push((
            LvRef {
                vg: o.lv.vg.clone(),
                lv: name,
            },
            args,
        ));
    }
    let started = Instant::now();
    let guard = hold()?;
    let mut made = Vec::new();
    let mut failed = None;
    for (snap, args) in &planned {
        match runner.run("lvcreate", args) {
            Ok(_) => made.push(snap.clone()),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    drop(guard);
    let held_ms = started.elapsed().as_millis() as u64;
    if let Some(e) = failed {
        let _ = remove_all(runner, &made);
        return Err(e);
    }
    Ok(Taken {
        snaps: made,
        held_ms,
    })
}

/// The freeze (or the pause) around the lvcreates: released on drop, the thaw's outcome
/// logged (the freezer keeps retrying a failed thaw).
struct Held<'a> {
    owner: &'a Owner,
    frozen: Option<Frozen>,
    paused: Option<Paused<'a>>,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        drop(self.paused.take());
        if let Some(f) = self.frozen.take() {
            if let Err(e) = f.thaw() {
                warn!(owner = %self.owner, error = %e, "thaw after the LVM snapshots failed (snapfs keeps retrying)");
            }
        }
    }
}

/// The LVM snapshots of a failed mkdir, removed unless disarmed.
struct Undo<'a> {
    runner: &'a dyn LvmRunner,
    snaps: Vec<LvRef>,
}

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        if let Err(e) = remove_all(self.runner, &self.snaps) {
            warn!(error = %e, "LVM snapshots of a failed mkdir left (the next start removes them)");
        }
    }
}

impl LibvirtProvider {
    /// `--lvm-snapshots`: the data disks as `(target, VG/LV)` when every one is an LVM
    /// logical volume of this host, else None (the copy method takes the domain).
    pub(super) fn lvm_origins(&self, def: &super::xml::DomainXml) -> Option<Vec<(String, LvRef)>> {
        if !self.opts.lvm_snapshots {
            return None;
        }
        let mut out = Vec::new();
        for d in def.disks.iter().filter(|d| d.is_data_disk()) {
            if !super::is_block_device(&d.source) {
                return None;
            }
            let (vg, lv) = super::lvm_of(d.source.file()?)?;
            out.push((d.target.clone(), LvRef { vg, lv }));
        }
        (!out.is_empty()).then_some(out)
    }

    /// mkdir by LVM snapshots: every LV's snapshot at one instant (freeze, or a pause of a
    /// running guest with several LVs and no freeze), recorded in the store like a copy.
    pub(super) fn create_lvm_snapshot(
        &self,
        dom: &Domain,
        owner: &Owner,
        name: &str,
        managed_by: Option<Value>,
        lvs: &[(String, LvRef)],
    ) -> Result<()> {
        let runner: &dyn LvmRunner = &SystemLvm;
        let store = self.store()?;
        let started = Instant::now();
        let (dom_name, uuid, _busy) = store.start_snapshot(dom, owner, name)?;
        let mut origins = Vec::new();
        for (target, lv) in lvs {
            origins.push(Origin {
                target: target.clone(),
                lv: lv.clone(),
                thin: is_thin(runner, lv)?,
            });
        }
        let part = store.begin(&uuid, &dom_name)?;
        let planned: Vec<LvRef> = origins
            .iter()
            .map(|o| LvRef {
                vg: o.lv.vg.clone(),
                lv: snapshot_name(&o.lv.lv, part.id()),
            })
            .collect();
        part.record_lvm(&planned)?;
        let active = dom.is_active().unwrap_or(false);
        let running = dom
            .info()
            .is_ok_and(|i| i.state.known() == Some(crate::libvirt::DomainState::Running));
        let mut quiesced = false;
        let taken = snapshot_all(runner, &origins, part.id(), self.opts.lvm_cow_size, || {
            let frozen = self.quiesce(dom, &uuid, &dom_name, owner, active)?;
            quiesced = frozen.is_some();
            let paused = if !quiesced && running && origins.len() > 1 {
                Some(Paused::start(dom, &self.opts.state_dir, &uuid, &dom_name)?)
            } else {
                None
            };
            Ok(Held {
                owner,
                frozen,
                paused,
            })
        })?;
        let stall_ms = quiesced.then_some(taken.held_ms);
        info!(%owner, snapshot = %name, quiesced, stall_ms, lvs = taken.snaps.len(), "LVM snapshot of every disk taken");
        let mut undo = Undo {
            runner,
            snaps: taken.snaps.clone(),
        };
        let mut disks = Vec::new();
        for (o, snap) in origins.iter().zip(&taken.snaps) {
            let img = crate::image::open(
                &snap.device(),
                Some(crate::image::Format::Raw),
                None,
                &self.cache,
            )?;
            disks.push(MetaDisk {
                target: o.target.clone(),
                file: String::new(),
                format: "raw".into(),
                size: img.size(),
                source: o.lv.device().display().to_string(),
                rbd: None,
                lvm: Some(snap.clone()),
            });
        }
        let meta = Meta {
            name: name.to_string(),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
            quiesced,
            method: "lvm-snapshot".into(),
            via: "lvcreate".into(),
            domain: dom_name,
            uuid,
            disks,
            stall_ms,
            copy_ms: started.elapsed().as_millis() as u64,
            managed_by,
        };
        let snap = part.commit(&meta)?;
        undo.snaps.clear();
        info!(%owner, snapshot = %name, quiesced, stall_ms, dir = %snap.dir.display(), "LVM store snapshot complete");
        Ok(())
    }

    /// rmdir of a store snapshot held by LVM snapshots: hidden, each LV snapshot removed
    /// (on failure the directory comes back), then gone.
    pub(super) fn delete_store_lvm(
        &self,
        owner: &Owner,
        snap: &super::store::StoreSnap,
    ) -> Result<()> {
        let store = self.store()?;
        let lvs: Vec<LvRef> = snap
            .meta
            .disks
            .iter()
            .filter_map(|d| d.lvm.clone())
            .collect();
        let hidden = store.hide(snap)?;
        if let Err(e) = remove_present(&SystemLvm, &lvs) {
            if let Err(e2) = store.unhide(&hidden, snap) {
                warn!(%owner, error = %e2, "cannot restore a store snapshot whose removal failed (the next start finishes the removal)");
            }
            return Err(e);
        }
        super::store::Store::purge(&hidden)?;
        info!(%owner, snapshot = %snap.meta.name, "LVM store snapshot removed");
        Ok(())
    }
}

/// A size as lvcreate's `-L` takes it: a number with an optional unit `b`, `k`, `m` (the
/// default, as for lvcreate), `g`, `t` (powers of 1024, either case); bytes.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: a size such as 512M or 2G"))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "b" => 0,
        "k" => 10,
        "" | "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(format!("{s:?}: unknown unit (b, k, m, g, t)")),
    };
    let bytes = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?}: too large"))?;
    if bytes == 0 {
        return Err(format!("{s:?}: must be more than 0"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Records every command (and the hold and its release) in order; `lvcreate` fails on
    /// the call whose number is `fail_create` (1-based).
    #[derive(Default)]
    struct Fake {
        log: Arc<Mutex<Vec<String>>>,
        fail_create: Option<usize>,
        thin_attr: &'static str,
    }

    impl LvmRunner for Fake {
        fn run(&self, cmd: &str, args: &[String]) -> Result<String> {
            let mut log = self.log.lock().unwrap();
            log.push(format!("{cmd} {}", args.join(" ")));
            let creates = log.iter().filter(|l| l.starts_with("lvcreate")).count();
            match cmd {
                "lvcreate" if Some(creates) == self.fail_create => {
                    Err(Error::Backend("lvcreate: Insufficient free space".into()))
                }
                "lvs" => Ok(format!("  {}\n", self.thin_attr)),
                "dmsetup" => Err(Error::Backend("no device-mapper".into())),
                _ => Ok(String::new()),
            }
        }
    }

    /// A freeze whose release is logged.
    struct Hold(Arc<Mutex<Vec<String>>>);

    impl Drop for Hold {
        fn drop(&mut self) {
            self.0.lock().unwrap().push("thaw".into());
        }
    }

    fn origins() -> Vec<Origin> {
        vec![
            Origin {
                target: "vda".into(),
                lv: LvRef {
                    vg: "nova".into(),
                    lv: "5d2f_disk".into(),
                },
                thin: true,
            },
            Origin {
                target: "vdb".into(),
                lv: LvRef {
                    vg: "cinder".into(),
                    lv: "volume-1".into(),
                },
                thin: false,
            },
        ]
    }

    fn take(fake: &Fake, cow: Option<u64>) -> Result<Taken> {
        let log = fake.log.clone();
        snapshot_all(fake, &origins(), "ab-1-0", cow, || {
            log.lock().unwrap().push("freeze".into());
            Ok(Hold(log.clone()))
        })
    }

    #[test]
    fn command_lines() {
        let o = &origins();
        assert_eq!(
            lvcreate_args(&o[0], "n1", None).unwrap(),
            ["-s", "-k", "n", "-n", "n1", "nova/5d2f_disk"]
        );
        assert_eq!(
            lvcreate_args(&o[1], "n2", Some(64 << 20)).unwrap(),
            ["-s", "-L", "67108864b", "-n", "n2", "cinder/volume-1"]
        );
        let e = lvcreate_args(&o[1], "n2", None).unwrap_err();
        assert!(e.to_string().contains("--lvm-cow-size"), "{e}");
        assert_eq!(
            lvremove_args(&LvRef {
                vg: "v".into(),
                lv: "s".into()
            }),
            ["-f", "v/s"]
        );
        assert_eq!(
            snapshot_name("volume-1", "ab-1-0"),
            "volume-1.snapfs.ab-1-0"
        );
        assert_eq!(snapshot_name("-x y", "1"), "l-x_y.snapfs.1");
        assert!(snapshot_name(&"a".repeat(300), "1").len() < 127);
        assert_eq!(
            LvRef {
                vg: "nova".into(),
                lv: "x".into()
            }
            .device(),
            PathBuf::from("/dev/nova/x")
        );
    }

    #[test]
    fn freeze_then_every_lvcreate_then_thaw() {
        let fake = Fake::default();
        let t = take(&fake, Some(32 << 20)).unwrap();
        assert_eq!(
            *fake.log.lock().unwrap(),
            [
                "freeze",
                "lvcreate -s -k n -n 5d2f_disk.snapfs.ab-1-0 nova/5d2f_disk",
                "lvcreate -s -L 33554432b -n volume-1.snapfs.ab-1-0 cinder/volume-1",
                "thaw",
            ]
        );
        assert_eq!(
            t.snaps,
            [
                LvRef {
                    vg: "nova".into(),
                    lv: "5d2f_disk.snapfs.ab-1-0".into()
                },
                LvRef {
                    vg: "cinder".into(),
                    lv: "volume-1.snapfs.ab-1-0".into()
                }
            ]
        );
    }

    #[test]
    fn a_failed_lvcreate_thaws_first_then_removes_what_was_made() {
        let fake = Fake {
            fail_create: Some(2),
            ..Fake::default()
        };
        let e = take(&fake, Some(32 << 20)).unwrap_err();
        assert!(e.to_string().contains("Insufficient"), "{e}");
        assert_eq!(
            *fake.log.lock().unwrap(),
            [
                "freeze",
                "lvcreate -s -k n -n 5d2f_disk.snapfs.ab-1-0 nova/5d2f_disk",
                "lvcreate -s -L 33554432b -n volume-1.snapfs.ab-1-0 cinder/volume-1",
                "thaw",
                "lvremove -f nova/5d2f_disk.snapfs.ab-1-0",
            ]
        );
        // The first lvcreate failing: thawed, nothing to remove.
        let fake = Fake {
            fail_create: Some(1),
            ..Fake::default()
        };
        assert!(take(&fake, Some(1 << 20)).is_err());
        assert_eq!(
            *fake.log.lock().unwrap(),
            [
                "freeze",
                "lvcreate -s -k n -n 5d2f_disk.snapfs.ab-1-0 nova/5d2f_disk",
                "thaw"
            ]
        );
    }

    #[test]
    fn a_thick_lv_without_cow_size_fails_before_the_freeze() {
        let fake = Fake::default();
        let e = take(&fake, None).unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e}");
        assert!(
            fake.log.lock().unwrap().is_empty(),
            "nothing ran, no freeze"
        );
    }

    #[test]
    fn a_failed_hold_runs_nothing() {
        let fake = Fake::default();
        let r = snapshot_all(&fake, &origins(), "1", Some(1 << 20), || {
            Err::<(), _>(Error::TimedOut("agent".into()))
        });
        assert!(matches!(r, Err(Error::TimedOut(_))));
        assert!(fake.log.lock().unwrap().is_empty());
    }

    #[test]
    fn thin_detection_and_device_mapper_probe() {
        let lv = LvRef {
            vg: "v".into(),
            lv: "l".into(),
        };
        let thin = Fake {
            thin_attr: "Vwi-aotz--",
            ..Fake::default()
        };
        assert!(is_thin(&thin, &lv).unwrap());
        assert_eq!(
            *thin.log.lock().unwrap(),
            ["lvs --noheadings -o lv_attr v/l"]
        );
        let thick = Fake {
            thin_attr: "-wi-ao----",
            ..Fake::default()
        };
        assert!(!is_thin(&thick, &lv).unwrap());
        let gone = Fake::default();
        assert!(matches!(is_thin(&gone, &lv), Err(Error::NotFound(_))));
        assert!(!device_mapper_available(&gone));
    }

    #[test]
    fn removal_after_a_restart_skips_what_is_gone() {
        struct Gone(Mutex<Vec<String>>);
        impl LvmRunner for Gone {
            fn run(&self, cmd: &str, args: &[String]) -> Result<String> {
                self.0
                    .lock()
                    .unwrap()
                    .push(format!("{cmd} {}", args.join(" ")));
                match args.last().map(String::as_str) {
                    Some("v/gone") => Err(Error::Backend(
                        "lvremove -f v/gone: Failed to find logical volume \"v/gone\"".into(),
                    )),
                    Some("v/busy") => Err(Error::Backend(
                        "lvremove -f v/busy: Logical volume v/busy in use.".into(),
                    )),
                    _ => Ok(String::new()),
                }
            }
        }
        let lv = |n: &str| LvRef {
            vg: "v".into(),
            lv: n.into(),
        };
        let r = Gone(Mutex::new(Vec::new()));
        assert!(remove_present(&r, &[lv("gone"), lv("there")]).is_ok());
        let e = remove_present(&r, &[lv("busy"), lv("there")]).unwrap_err();
        assert!(e.to_string().contains("in use"), "{e}");
        // Every one is tried, the failure reported.
        assert_eq!(
            *r.0.lock().unwrap(),
            [
                "lvremove -f v/gone",
                "lvremove -f v/there",
                "lvremove -f v/busy",
                "lvremove -f v/there"
            ]
        );
        assert!(remove_all(&r, &[lv("gone")]).is_err());
    }

    #[test]
    fn a_store_snapshot_on_lvm_reads_the_snapshot_device() {
        use super::super::store::StoreSnap;
        let snap = StoreSnap {
            id: "1".into(),
            dir: PathBuf::from("/store/u/1"),
            meta: Meta {
                name: "s1".into(),
                created: 0,
                quiesced: true,
                method: "lvm-snapshot".into(),
                via: "lvcreate".into(),
                domain: "d".into(),
                uuid: "u".into(),
                disks: vec![MetaDisk {
                    target: "vdb".into(),
                    file: String::new(),
                    format: "raw".into(),
                    size: 1 << 30,
                    source: "/dev/cinder/volume-1".into(),
                    rbd: None,
                    lvm: Some(LvRef {
                        vg: "cinder".into(),
                        lv: "volume-1.snapfs.1".into(),
                    }),
                }],
                stall_ms: Some(5),
                copy_ms: 9,
                managed_by: None,
            },
        };
        // Committed to a store like any snapshot (no file of its own to sync), then listed.
        let t = tempfile::tempdir().unwrap();
        let store = super::super::store::Store::new(t.path()).unwrap();
        let part = store.begin("u", "d").unwrap();
        part.record_lvm(&[snap.meta.disks[0].lvm.clone().unwrap()])
            .unwrap();
        part.commit(&snap.meta).unwrap();
        let listed = store.list("u");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].meta.disks[0].lvm, snap.meta.disks[0].lvm);
        let (p, f) = snap.disk_path("vdb").unwrap();
        assert_eq!(p, PathBuf::from("/dev/cinder/volume-1.snapfs.1"));
        assert_eq!(f, crate::image::Format::Raw);
        let j = snap.info().json;
        assert_eq!(j["method"], "lvm-snapshot");
        assert_eq!(j["disks"][0]["kind"], "lvm");
        assert_eq!(j["disks"][0]["lv"], "cinder/volume-1.snapfs.1");
        // meta.json round trip keeps the LV (and a copy's meta.json without one still reads).
        let back: Meta = serde_json::from_str(&serde_json::to_string(&snap.meta).unwrap()).unwrap();
        assert_eq!(back.disks[0].lvm, snap.meta.disks[0].lvm);
        let old = r#"{"target":"vda","file":"vda.raw","format":"raw","size":1,"source":"/x"}"#;
        assert!(serde_json::from_str::<MetaDisk>(old).unwrap().lvm.is_none());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("100"), Ok(100 << 20));
        assert_eq!(parse_size("4096b"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("1x").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
