//! The guest agent through libvirt: ping, fsfreeze status, FS freeze/thaw.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use crate::libvirt::Domain;

use super::lv_err;
use crate::error::{Error, Result};
use crate::namespace::registry::lock;

/// Seconds for `virDomainQemuAgentCommand` (at least 1: 0 means "do not wait").
fn secs(t: Duration) -> i32 {
    t.as_secs().clamp(1, 3600) as i32
}

/// Send one agent command and return its `return` value.
pub fn command(dom: &Domain, cmd: &str, timeout: Duration) -> Result<serde_json::Value> {
    let out = dom
        .qemu_agent_command(cmd, secs(timeout), 0)
        .map_err(|e| lv_err(format!("guest agent {cmd}"), e))?;
    let v: serde_json::Value = serde_json::from_str(&out)
        .map_err(|e| Error::Backend(format!("guest agent {cmd}: bad reply {out:?}: {e}")))?;
    Ok(v.get("return").cloned().unwrap_or(serde_json::Value::Null))
}

/// Whether the agent answers a guest-ping within `deadline`. libvirt cannot wait less than a
/// second (and a hung agent costs it its sync timeout), so the ping runs in its own thread;
/// while one is still out for a domain, the agent counts as unreachable without a new one.
pub fn ping(dom: &Domain, uuid: &str, deadline: Duration) -> bool {
    static IN_FLIGHT: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    {
        let mut g = lock(&IN_FLIGHT);
        if !g.get_or_insert_with(HashSet::new).insert(uuid.to_string()) {
            return false;
        }
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let d = dom.clone();
    let id = uuid.to_string();
    let spawned = std::thread::Builder::new()
        .name("guest-ping".into())
        .spawn(move || {
            let ok = command(&d, r#"{"execute":"guest-ping"}"#, Duration::from_secs(1)).is_ok();
            if let Some(s) = lock(&IN_FLIGHT).as_mut() {
                s.remove(&id);
            }
            let _ = tx.send(ok);
        });
    if spawned.is_err() {
        if let Some(s) = lock(&IN_FLIGHT).as_mut() {
            s.remove(uuid);
        }
        return false;
    }
    rx.recv_timeout(deadline).unwrap_or(false)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FreezeStatus {
    Frozen,
    Thawed,
}

pub fn freeze_status(dom: &Domain, timeout: Duration) -> Result<FreezeStatus> {
    let v = command(dom, r#"{"execute":"guest-fsfreeze-status"}"#, timeout)?;
    match v.as_str() {
        Some("frozen") => Ok(FreezeStatus::Frozen),
        Some("thawed") => Ok(FreezeStatus::Thawed),
        _ => Err(Error::Backend(format!(
            "guest-fsfreeze-status answered {v}"
        ))),
    }
}

/// `virDomainFSFreeze` of every guest filesystem; the number frozen.
pub fn fs_freeze(dom: &Domain) -> Result<u32> {
    dom.fs_freeze()
        .map_err(|e| lv_err("freezing guest filesystems", e))
}

/// `virDomainFSThaw` of every guest filesystem; the number thawed.
pub fn fs_thaw(dom: &Domain) -> Result<u32> {
    dom.fs_thaw()
        .map_err(|e| lv_err("thawing guest filesystems", e))
}
