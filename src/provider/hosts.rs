//! Several libvirt hosts in one mount (`-c URI` given more than once).
//!
//! Each URI gets its own [`LibvirtProvider`](super::libvirt::LibvirtProvider) wrapped in a
//! [`HostProvider`], which names its instances `<domain>@<host>` and keeps a host that does
//! not answer from failing the rest of the mount: its instances are left out of the listing,
//! a path under one of them is `EIO`, and it comes back by itself on a later access.
//!
//! Bounds: a connection is opened by a [`Dialer`] (one attempt in flight per host, callers
//! wait at most its timeout), and an open remote connection has libvirt keepalive, so a call
//! on a host that went silent fails within about `interval × (count + 1)` seconds.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::{LaunchInfo, ObjectInfo, Owner, Provider, SnapshotInfo};
use crate::error::{Error, Result};
use crate::image::hostfile::{with_opener, Opener};
use crate::image::BlockImage;
use crate::libvirt::Connect;
use crate::namespace::registry::lock;

/// The `<host>` of instance names for a libvirt URI: its host part without user and port,
/// `local` for a URI without one (`qemu:///system`).
pub fn host_of(uri: &str) -> Result<String> {
    let Some((_, rest)) = uri.split_once("://") else {
        return Err(Error::Invalid(format!(
            "libvirt URI {uri:?}: expected DRIVER[+TRANSPORT]://[HOST]/PATH"
        )));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        host_port.split(':').next().unwrap_or("")
    };
    if host.is_empty() {
        return Ok("local".to_string());
    }
    if host.contains(['@', '/']) || host.starts_with('.') {
        return Err(Error::Invalid(format!(
            "libvirt URI {uri:?}: host {host:?} cannot be part of a file name"
        )));
    }
    Ok(host.to_ascii_lowercase())
}

/// `(host, uri)` for each URI; two URIs naming the same host are refused.
pub fn hosts_of(uris: &[String]) -> Result<Vec<(String, String)>> {
    let mut out: Vec<(String, String)> = Vec::new();
    for u in uris {
        let h = host_of(u)?;
        if let Some((_, other)) = out.iter().find(|(x, _)| *x == h) {
            return Err(Error::Invalid(format!(
                "libvirt URIs {other} and {u} name the same host {h:?}: instances are named \
                 <domain>@<host>, so each host may be given once"
            )));
        }
        out.push((h, u.clone()));
    }
    Ok(out)
}

/// How long a connection attempt may keep callers waiting, and the keepalive of the result.
#[derive(Clone, Copy, Debug)]
pub struct DialLimits {
    pub timeout: Duration,
    /// After a failed attempt, callers get its error at once for this long (a silent host
    /// would otherwise cost every `ls` the whole timeout).
    pub retry_after: Duration,
    pub keepalive_interval: i32,
    pub keepalive_count: u32,
}

impl Default for DialLimits {
    fn default() -> Self {
        DialLimits {
            timeout: Duration::from_secs(5),
            retry_after: Duration::from_secs(3),
            keepalive_interval: 2,
            keepalive_count: 2,
        }
    }
}

#[derive(Default)]
struct DialState {
    /// Number of the latest attempt.
    gen: u64,
    in_flight: bool,
    /// The latest finished attempt: its number, when it finished, what it gave.
    last: Option<(u64, Instant, std::result::Result<Connect, String>)>,
}

/// Opens connections to one URI with a bound on how long callers wait. `virConnectOpen`
/// itself cannot be cancelled (a TCP connect to a silent host takes minutes), so it runs on
/// a thread of its own; at most one such thread per URI exists at a time, and callers that
/// arrive meanwhile wait for the same attempt.
pub struct Dialer {
    uri: String,
    limits: DialLimits,
    slot: Arc<(Mutex<DialState>, Condvar)>,
}

impl Dialer {
    pub fn new(uri: &str, limits: DialLimits) -> Dialer {
        Dialer {
            uri: uri.to_string(),
            limits,
            slot: Arc::new((Mutex::new(DialState::default()), Condvar::new())),
        }
    }

    fn unanswered(&self, why: &str) -> Error {
        Error::Backend(format!("libvirt at {} does not answer: {why}", self.uri))
    }

    /// A new connection, or the reason there is none (`EIO`) within the timeout.
    pub fn dial(&self) -> Result<Connect> {
        let (m, cv) = &*self.slot;
        let mut g = lock(m);
        if !g.in_flight {
            match g.last.take() {
                // A late success of an attempt whose callers gave up: use it.
                Some((_, _, Ok(c))) if c.is_alive().unwrap_or(false) => return Ok(c),
                Some((n, at, Err(e))) if at.elapsed() < self.limits.retry_after => {
                    let err = self.unanswered(&e);
                    g.last = Some((n, at, Err(e)));
                    return Err(err);
                }
                _ => {}
            }
            g.gen += 1;
            g.in_flight = true;
            let (gen, uri, limits, slot) =
                (g.gen, self.uri.clone(), self.limits, self.slot.clone());
            let spawned = std::thread::Builder::new()
                .name("libvirt-dial".into())
                .spawn(move || {
                    let r = Connect::open(Some(&uri))
                        .and_then(|c| {
                            c.set_keep_alive(limits.keepalive_interval, limits.keepalive_count)?;
                            Ok(c)
                        })
                        .map_err(|e| e.message().to_string());
                    let (m, cv) = &*slot;
                    let mut g = lock(m);
                    g.in_flight = false;
                    g.last = Some((gen, Instant::now(), r));
                    cv.notify_all();
                });
            if let Err(e) = spawned {
                g.in_flight = false;
                return Err(self.unanswered(&format!("cannot start a thread: {e}")));
            }
        }
        let gen = g.gen;
        let deadline = Instant::now() + self.limits.timeout;
        loop {
            match &g.last {
                Some((n, _, Ok(c))) if *n == gen => return Ok(c.clone()),
                Some((n, _, Err(e))) if *n == gen => return Err(self.unanswered(e)),
                _ => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.unanswered(&format!(
                    "no connection within {:.1} s",
                    self.limits.timeout.as_secs_f64()
                )));
            }
            g = cv
                .wait_timeout(g, left)
                .map_or_else(|e| e.into_inner().0, |r| r.0);
        }
    }
}

/// Makes the opener of a remote host's files (see [`crate::image::hostfile::with_opener`]).
pub type FilesOf = Arc<dyn Fn() -> Result<Opener> + Send + Sync>;

/// One host's provider, its instances named `<domain>@<host>`.
pub struct HostProvider {
    host: String,
    uri: String,
    suffix: String,
    inner: Arc<dyn Provider>,
    /// For a remote host: every call of `inner` opens image files through this.
    files: Option<FilesOf>,
    /// Why the host is not answering (None: it answered last time).
    down: Mutex<Option<String>>,
}

impl HostProvider {
    pub fn new(
        host: &str,
        uri: &str,
        inner: Arc<dyn Provider>,
        files: Option<FilesOf>,
    ) -> HostProvider {
        HostProvider {
            host: host.to_string(),
            uri: uri.to_string(),
            suffix: format!("@{host}"),
            inner,
            files,
            down: Mutex::new(None),
        }
    }

    fn is_local(&self) -> bool {
        self.host == "local"
    }

    /// Log the change of state once per outage, not once per access.
    fn observe<T>(&self, r: &Result<T>) {
        let mut d = lock(&self.down);
        match (r, d.is_some()) {
            (Ok(_), true) => {
                info!(host = %self.host, uri = %self.uri, "libvirt host answers again");
                *d = None;
            }
            (Err(e @ Error::Backend(_)), false) => {
                warn!(host = %self.host, uri = %self.uri, error = %e,
                      "libvirt host does not answer: its instances are left out until it does");
                *d = Some(e.to_string());
            }
            _ => {}
        }
    }

    fn domain<'a>(&self, name: &'a str) -> Option<&'a str> {
        name.strip_suffix(self.suffix.as_str())
            .filter(|d| !d.is_empty())
    }

    fn inner_owner(&self, owner: &Owner) -> Result<Owner> {
        match owner {
            Owner::Instance(n) => self
                .domain(n)
                .map(|d| Owner::Instance(d.to_string()))
                .ok_or_else(|| Error::NotFound(owner.to_string())),
            v => Ok(v.clone()),
        }
    }

    /// Run `f` on the inner provider, noting whether the host answered.
    fn call<T>(&self, f: impl FnOnce(&dyn Provider) -> Result<T>) -> Result<T> {
        let r = match &self.files {
            None => f(self.inner.as_ref()),
            Some(files) => files().and_then(|o| with_opener(o, || f(self.inner.as_ref()))),
        };
        self.observe(&r);
        r
    }
}

impl Provider for HostProvider {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    /// Storage pools of the local host only: a remote pool's directory is not on this machine.
    fn pools(&self) -> Result<Vec<String>> {
        if !self.is_local() {
            return Ok(Vec::new());
        }
        self.call(|p| p.pools()).or_else(|_| Ok(Vec::new()))
    }

    fn volumes(&self, pool: &str) -> Result<Vec<String>> {
        self.call(|p| p.volumes(pool))
    }

    /// Never an error: a host that does not answer has no instances for now.
    fn instances(&self) -> Result<Vec<String>> {
        match self.call(|p| p.instances()) {
            Ok(v) => Ok(v
                .into_iter()
                .map(|d| format!("{d}{}", self.suffix))
                .collect()),
            Err(_) => Ok(Vec::new()),
        }
    }

    fn unavailable(&self, owner: &Owner) -> Option<Error> {
        let Owner::Instance(n) = owner else {
            return None;
        };
        self.domain(n)?;
        // Ask again (bounded by the dialer): the host may be back.
        self.call(|p| p.instances()).err()
    }

    fn info(&self, owner: &Owner) -> Result<ObjectInfo> {
        let o = self.inner_owner(owner)?;
        let mut i = self.call(|p| p.info(&o))?;
        if let Owner::Instance(_) = owner {
            if let Some(m) = i.json.as_object_mut() {
                m.insert("host".into(), self.host.clone().into());
                m.insert("uri".into(), self.uri.clone().into());
            }
        }
        Ok(i)
    }

    fn storage_keys(&self, owner: &Owner) -> Result<Vec<String>> {
        let inner = self.inner_owner(owner)?;
        let keys = self.call(|p| p.storage_keys(&inner))?;
        if self.is_local() {
            return Ok(keys);
        }
        // Another host's files are not this host's: only RBD names are shared.
        Ok(keys
            .into_iter()
            .map(|k| {
                if k.starts_with("file:") {
                    format!("{}:{k}", self.host)
                } else {
                    k
                }
            })
            .collect())
    }

    fn snapshots(&self, owner: &Owner) -> Result<Vec<SnapshotInfo>> {
        let o = self.inner_owner(owner)?;
        self.call(|p| p.snapshots(&o))
    }

    fn create_snapshot(&self, owner: &Owner, name: &str) -> Result<()> {
        let o = self.inner_owner(owner)?;
        self.call(|p| p.create_snapshot(&o, name))
    }

    fn delete_snapshot(&self, owner: &Owner, name: &str) -> Result<()> {
        let o = self.inner_owner(owner)?;
        self.call(|p| p.delete_snapshot(&o, name))
    }

    fn rename_snapshot(&self, owner: &Owner, from: &str, to: &str) -> Result<()> {
        let o = self.inner_owner(owner)?;
        self.call(|p| p.rename_snapshot(&o, from, to))
    }

    fn open_disk(
        &self,
        owner: &Owner,
        snap: &SnapshotInfo,
        target: &str,
    ) -> Result<Arc<dyn BlockImage>> {
        let o = self.inner_owner(owner)?;
        self.call(|p| p.open_disk(&o, snap, target))
    }

    fn records_lineage(&self, owner: &Owner) -> bool {
        self.inner_owner(owner)
            .is_ok_and(|o| self.inner.records_lineage(&o))
    }

    fn check_revert(&self, owner: &Owner, snap: &SnapshotInfo) -> Result<()> {
        let o = self.inner_owner(owner)?;
        self.call(|p| p.check_revert(&o, snap))
    }

    fn revert_snapshot(&self, owner: &Owner, snap: &SnapshotInfo) -> Result<()> {
        let o = self.inner_owner(owner)?;
        self.call(|p| p.revert_snapshot(&o, snap))
    }

    fn keep_before_revert(&self, owner: &Owner, target: &SnapshotInfo, name: &str) -> Result<()> {
        let o = self.inner_owner(owner)?;
        self.call(|p| p.keep_before_revert(&o, target, name))
    }

    fn reverted_to(&self, owner: &Owner, snap: &SnapshotInfo) -> Result<Option<bool>> {
        let o = self.inner_owner(owner)?;
        self.call(|p| p.reverted_to(&o, snap))
    }

    fn settings(&self, owner: &Owner) -> Result<Vec<(String, String)>> {
        let o = self.inner_owner(owner)?;
        self.call(|p| p.settings(&o))
    }

    fn set_setting(&self, owner: &Owner, name: &str, value: Option<&str>) -> Result<()> {
        let o = self.inner_owner(owner)?;
        self.call(|p| p.set_setting(&o, name, value))
    }

    fn launches(&self) -> Result<Vec<LaunchInfo>> {
        let v = self.call(|p| p.launches()).unwrap_or_default();
        Ok(v.into_iter()
            .map(|l| LaunchInfo {
                name: format!("{}{}", l.name, self.suffix),
                instance: format!("{}{}", l.instance, self.suffix),
                snapshot: l.snapshot,
            })
            .collect())
    }

    /// On the host of the source instance; `<new>` or `<new>@<that host>` both name
    /// `<new>@<host>`.
    fn launch(&self, new: &str, instance: &str, snapshot: &str) -> Result<()> {
        let src = self
            .domain(instance)
            .ok_or_else(|| Error::NotFound(format!("instance {instance}")))?;
        let new = if new.contains('@') {
            self.domain(new).ok_or_else(|| {
                Error::NotSupported(format!(
                    "launch {new}: a snapshot of {instance} launches on host {} only",
                    self.host
                ))
            })?
        } else {
            new
        };
        self.call(|p| p.launch(new, src, snapshot))
    }

    fn forget_launch(&self, name: &str) -> Result<()> {
        let n = self
            .domain(name)
            .ok_or_else(|| Error::NotFound(format!("launch {name}")))?;
        self.call(|p| p.forget_launch(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_from_uris() {
        assert_eq!(host_of("qemu:///system").unwrap(), "local");
        assert_eq!(host_of("test:///default").unwrap(), "local");
        assert_eq!(
            host_of("qemu+tcp://10.213.0.2/system").unwrap(),
            "10.213.0.2"
        );
        assert_eq!(
            host_of("qemu+ssh://root@Hv7.example.com:2222/system?keyfile=/k").unwrap(),
            "hv7.example.com"
        );
        assert_eq!(
            host_of("qemu+tcp://[fd00::5]:16509/system").unwrap(),
            "fd00::5"
        );
        assert!(host_of("qemu").is_err());
        let two = hosts_of(&["qemu:///system".into(), "qemu+tcp://h1/system".into()]).unwrap();
        assert_eq!(two[0].0, "local");
        assert_eq!(two[1].0, "h1");
        let e = hosts_of(&[
            "qemu+tcp://h1/system".into(),
            "qemu+ssh://u@h1/system".into(),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("same host"), "{e}");
        assert!(hosts_of(&["qemu:///system".into(), "qemu:///session".into()]).is_err());
    }

    #[test]
    fn names_carry_the_host() {
        let mem = Arc::new(crate::provider::memory::MemoryProvider::default());
        let h = HostProvider::new("h1", "test://h1/", mem, None);
        assert_eq!(h.domain("web@h1"), Some("web"));
        assert_eq!(h.domain("a@b@h1"), Some("a@b"));
        assert_eq!(h.domain("web@h2"), None);
        assert_eq!(h.domain("@h1"), None);
        assert!(h.inner_owner(&Owner::Instance("web".into())).is_err());
    }

    #[test]
    fn operations_reach_the_host_under_its_own_names() {
        let mem = Arc::new(crate::provider::memory::MemoryProvider::default());
        mem.add_instance("web", &[("vda", vec![7u8; 4096])]);
        let h = HostProvider::new("h1", "test://h1/", mem.clone(), None);
        assert_eq!(h.instances().unwrap(), ["web@h1"]);
        let web = Owner::Instance("web@h1".into());
        h.create_snapshot(&web, "s1").unwrap();
        let snaps = h.snapshots(&web).unwrap();
        assert_eq!(snaps.len(), 1);
        let img = h.open_disk(&web, &snaps[0], "vda").unwrap();
        let mut b = [0u8; 16];
        img.read_at(&mut b, 100).unwrap();
        assert_eq!(b, [7u8; 16]);
        assert!(h.unavailable(&web).is_none());
        assert!(h.unavailable(&Owner::Instance("web@h2".into())).is_none());
        let e = h
            .create_snapshot(&Owner::Instance("web".into()), "s2")
            .unwrap_err();
        assert_eq!(e.errno(), libc::ENOENT);
        // Launch on the same host: `<new>` and `<new>@h1` both name the domain `<new>`.
        h.launch("c1", "web@h1", "s1").unwrap();
        h.launch("c2@h1", "web@h1", "s1").unwrap();
        let e = h.launch("c3@h9", "web@h1", "s1").unwrap_err();
        assert_eq!(e.errno(), libc::ENOTSUP);
        let l = h.launches().unwrap();
        let names: Vec<(&str, &str)> = l
            .iter()
            .map(|l| (l.name.as_str(), l.instance.as_str()))
            .collect();
        assert_eq!(names, [("c1@h1", "web@h1"), ("c2@h1", "web@h1")]);
        assert!(h.instances().unwrap().contains(&"c2@h1".to_string()));
        h.forget_launch("c1@h1").unwrap();
        assert_eq!(h.launches().unwrap().len(), 1);
        // Volumes of a remote host are not shown (their directories are not here).
        mem.add_volume("p", "v", vec![0; 512]);
        assert!(h.pools().unwrap().is_empty());
    }

    /// A host whose every call fails as an unreachable libvirtd does.
    struct Down;

    impl Provider for Down {
        fn kind(&self) -> &'static str {
            "libvirt"
        }
        fn instances(&self) -> Result<Vec<String>> {
            Err(Error::Backend("libvirt at x does not answer".into()))
        }
        fn info(&self, _: &Owner) -> Result<ObjectInfo> {
            Err(Error::Backend("libvirt at x does not answer".into()))
        }
        fn snapshots(&self, _: &Owner) -> Result<Vec<SnapshotInfo>> {
            Err(Error::Backend("libvirt at x does not answer".into()))
        }
        fn create_snapshot(&self, _: &Owner, _: &str) -> Result<()> {
            Err(Error::Backend("libvirt at x does not answer".into()))
        }
        fn delete_snapshot(&self, _: &Owner, _: &str) -> Result<()> {
            Err(Error::Backend("libvirt at x does not answer".into()))
        }
        fn open_disk(&self, _: &Owner, _: &SnapshotInfo, _: &str) -> Result<Arc<dyn BlockImage>> {
            Err(Error::Backend("libvirt at x does not answer".into()))
        }
    }

    #[test]
    fn a_host_that_does_not_answer_lists_nothing_and_is_eio() {
        let h = HostProvider::new("h2", "qemu+tcp://h2/system", Arc::new(Down), None);
        assert!(h.instances().unwrap().is_empty());
        assert!(lock(&h.down).is_some());
        let e = h.unavailable(&Owner::Instance("web@h2".into())).unwrap();
        assert_eq!(e.errno(), libc::EIO);
        assert!(h.unavailable(&Owner::Instance("web@h3".into())).is_none());
        let e = h.info(&Owner::Instance("web@h2".into())).unwrap_err();
        assert_eq!(e.errno(), libc::EIO);
        // The registry: the rest of the mount lists, the host's instance is EIO, not ENOENT.
        let mem = Arc::new(crate::provider::memory::MemoryProvider::default());
        mem.add_instance("db", &[("vda", vec![0u8; 512])]);
        let up = Arc::new(HostProvider::new("local", "qemu:///system", mem, None));
        let reg = crate::namespace::registry::Registry::new(
            vec![up, Arc::new(h)],
            Duration::from_millis(0),
        );
        let names: Vec<String> = reg
            .instances()
            .unwrap()
            .iter()
            .map(|(n, _)| n.clone())
            .collect();
        assert_eq!(names, ["db@local"]);
        let e = reg
            .provider(&Owner::Instance("web@h2".into()))
            .err()
            .unwrap();
        assert_eq!(e.errno(), libc::EIO);
        let e = reg
            .provider(&Owner::Instance("web@local".into()))
            .err()
            .unwrap();
        assert_eq!(e.errno(), libc::ENOENT);
    }

    #[test]
    fn a_dead_uri_fails_within_the_timeout_and_is_retried() {
        // A port nothing listens on: refused at once; the error is kept for retry_after.
        let d = Dialer::new(
            "qemu+tcp://127.0.0.1:1/system",
            DialLimits {
                retry_after: Duration::from_secs(3600),
                ..DialLimits::default()
            },
        );
        let e = d.dial().err().unwrap();
        assert_eq!(e.errno(), libc::EIO, "{e}");
        let again = d.dial().err().unwrap();
        assert_eq!(again.to_string(), e.to_string());
    }
}
