//! The command line: `snapfs mount|unmount`, the mount(8) helper form
//! (`mount.fuse.snapfs SOURCE DIR -o OPTIONS`, what `mount -t fuse.snapfs` and fstab run), and
//! the man pages and shell completions generated from the same definitions.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, CommandFactory, Parser, Subcommand};

/// snapfs: VM snapshots as plain files and directories.
#[derive(Parser, Debug)]
#[command(name = "snapfs", version, about, long_about = None, after_help = EXAMPLES)]
pub struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub cmd: Cmd,
}

const EXAMPLES: &str = "Examples:
  snapfs mount --images /var/lib/libvirt/images /mnt/snap
  ls /mnt/snap/volumes/images/web.qcow2/.snapshots/
  mkdir /mnt/snap/volumes/images/web.qcow2/.snapshots/before-upgrade
  cp --sparse=always /mnt/snap/volumes/images/web.qcow2/.snapshots/before-upgrade/disk.raw /backup/
  rmdir /mnt/snap/volumes/images/web.qcow2/.snapshots/before-upgrade
  snapfs mount --libvirt /mnt/snap          (instances = domains of qemu:///system)
  snapfs mount -c qemu:///system /mnt/snap  (the same, virsh's way)
  mkdir /mnt/snap/instances/web/.snapshots/pre-upgrade
  ln -s ../instances/web/.snapshots/pre-upgrade /mnt/snap/launch/web-copy
  snapfs mount --libvirt --ceph /etc/ceph/ceph.conf --pool volumes --flatten-on-launch /mnt/snap
                                            (RBD volumes; domains on RBD disks: RBD snapshots,
                                             launch by clone, flattened in the background)
  mount -t fuse.snapfs snapfs /mnt/snap -o images=/var/lib/libvirt/images,libvirt,allow_other
  snapfs unmount /mnt/snap                  (or umount /mnt/snap)";

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Mount the snapshot tree. Returns once the mount is ready (unless --foreground).
    Mount(Box<MountArgs>),
    /// Unmount a snapfs mount and let its daemon exit.
    Unmount {
        /// Detach even if the mount is busy.
        #[arg(long)]
        lazy: bool,
        mountpoint: PathBuf,
    },
    /// Write the man pages and shell completions (for packaging).
    #[command(hide = true)]
    GenerateAssets {
        /// Directory to write man/ and completions/ into.
        out: PathBuf,
    },
}

/// Options of `snapfs mount`; each long option is also an fstab option (`name=value`, or
/// `name` for a flag), see [`mount_helper_args`].
#[derive(Args, Debug)]
#[command(
    after_help = "Every long option is also accepted as a mount(8)/fstab option: \
--images DIR as images=DIR, a flag such as --allow-other as allow_other or allow-other."
)]
pub struct MountArgs {
    /// A directory of disk images (*.qcow2, *.raw, *.img): pool `basename DIR`. Repeatable.
    #[arg(
        long = "images",
        value_name = "DIR",
        help_heading = "Image directories"
    )]
    pub images: Vec<PathBuf>,

    /// Instances from libvirt: `--libvirt` (qemu:///system) or `--libvirt=URI` (with `=`:
    /// a word after a bare --libvirt is never taken as its URI).
    #[arg(long, value_name = "URI", num_args = 0..=1, require_equals = true,
          default_missing_value = "qemu:///system", help_heading = "libvirt")]
    pub libvirt: Option<String>,
    /// Instances from the libvirt at URI, as virsh's -c: implies --libvirt. Repeatable: with
    /// several URIs (one per host) instances are named DOMAIN@HOST (HOST: the URI's host,
    /// `local` for none).
    #[arg(
        short = 'c',
        long = "connect",
        value_name = "URI",
        help_heading = "libvirt"
    )]
    pub connect: Vec<String>,
    /// Guest filesystem freeze for instance snapshots: require, prefer or off.
    #[arg(
        long,
        value_name = "POLICY",
        default_value = "prefer",
        help_heading = "libvirt"
    )]
    pub quiesce: crate::provider::libvirt::Quiesce,
    /// Seconds to wait for the guest agent to freeze.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 10.0,
        help_heading = "libvirt"
    )]
    pub freeze_timeout: f64,
    /// After launching from an RBD-backed snapshot, flatten the clones in the background
    /// (like Nova), so the snapshot can be deleted once that finishes.
    #[arg(long, help_heading = "libvirt")]
    pub flatten_on_launch: bool,
    #[command(flatten)]
    pub cloud: CloudArgs,

    /// A Ceph cluster's configuration file: serve RBD images of each --pool as volumes.
    #[arg(long = "ceph", value_name = "CEPH_CONF", help_heading = "Ceph RBD")]
    pub ceph: Option<PathBuf>,
    /// Ceph client id to connect as (client.ID); its keyring is found through CEPH_CONF.
    #[arg(
        long = "ceph-id",
        value_name = "ID",
        default_value = "admin",
        help_heading = "Ceph RBD"
    )]
    pub ceph_id: String,
    /// A Ceph pool whose RBD images become volumes/POOL/IMAGE. Repeatable; needs --ceph.
    #[arg(
        long = "pool",
        value_name = "POOL",
        requires = "ceph",
        help_heading = "Ceph RBD"
    )]
    pub pools: Vec<String>,
    /// Bound of every Ceph operation (and of the connection at start-up), in seconds: a read
    /// of an unreachable cluster fails with EIO after this long.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 10,
        help_heading = "Ceph RBD"
    )]
    pub ceph_timeout: u64,
    /// MiB read ahead (in flight, in object-sized chunks) for a sequential reader of an RBD
    /// snapshot; 0 turns it off. Chunks wait in a cache of their own (4× this, at least 64 MiB).
    #[arg(
        long,
        value_name = "MIB",
        default_value_t = 32,
        help_heading = "Ceph RBD"
    )]
    pub ceph_read_ahead_mb: u64,
    /// Read RBD snapshots through the kernel page cache, as other files: faster for readers
    /// of less than 32 KiB at a time, but every byte is copied twice and stays cached.
    /// By default RBD disks are opened with direct I/O (one copy, into the reader's buffer).
    #[arg(long, help_heading = "Ceph RBD")]
    pub ceph_page_cache: bool,

    /// Stay in the foreground and log to stderr (what a systemd unit runs).
    #[arg(long, help_heading = "Mount")]
    pub foreground: bool,
    /// Let other users in (the kernel then checks modes: default_permissions).
    #[arg(long, help_heading = "Mount")]
    pub allow_other: bool,
    /// Refuse every change (mkdir, rmdir, rename, ln -s, rm) with EROFS: read snapshots only.
    /// The fstab option `ro` means this.
    #[arg(long, help_heading = "Mount")]
    pub read_only: bool,
    /// Before a revert (a link renamed onto `current`), keep the state being discarded as
    /// snapshot `before-revert-<time>`: yes or no.
    #[arg(long, value_name = "YES|NO", default_value = "yes", value_parser = ["yes", "no"], help_heading = "Mount")]
    pub revert_keep: String,
    /// Where the daemon keeps its state and log.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/lib/snapfs",
        help_heading = "Mount"
    )]
    pub state_dir: PathBuf,
    /// Log file of a background daemon [default: STATE_DIR/snapfs.log].
    #[arg(long, value_name = "FILE", help_heading = "Mount")]
    pub log_file: Option<PathBuf>,
    /// Cap of a background daemon's log, in MiB: FILE and its one rotated copy FILE.1 together.
    #[arg(long, value_name = "MIB", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..), help_heading = "Mount")]
    pub log_max_mb: u64,

    /// Read guest filesystems (`files/`) in an unprivileged, sandboxed worker process per
    /// volume (seccomp, no_new_privs, RLIMIT_AS/CPU, its own uid): on or off (in the daemon).
    #[arg(long, value_name = "ON|OFF", default_value = "on", value_parser = ["on", "off"], help_heading = "Guest files")]
    pub restore_worker: String,
    /// The uid (and gid) restore workers run as.
    #[arg(long, value_name = "UID", default_value_t = 65534, value_parser = clap::value_parser!(u32).range(1..), help_heading = "Guest files")]
    pub restore_worker_uid: u32,
    /// Memory a restore worker may map beyond what it starts with (RLIMIT_AS), in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 512, value_parser = clap::value_parser!(u64).range(8..), help_heading = "Guest files")]
    pub restore_worker_mem_mb: u64,
    /// CPU seconds a restore worker may use before it is ended (RLIMIT_CPU; a new one starts).
    #[arg(long, value_name = "SECONDS", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..), help_heading = "Guest files")]
    pub restore_worker_cpu_s: u64,
    /// Bytes the daemon keeps of all restore workers' answers (attributes, file maps, listings,
    /// lookups read ahead), all volumes together, in MiB; past it the volume holding the most
    /// drops its least recently used entries first [default: a third of --cache-mb, 16 of
    /// the 48].
    #[arg(long, value_name = "MIB", help_heading = "Guest files")]
    pub restore_worker_cache_mb: Option<usize>,
    /// Internal, for tests: lookups of `.snapfs-worker-try-open` / `.snapfs-worker-hang` in a
    /// guest directory make its worker call open(2) / hang.
    #[arg(long, hide = true)]
    pub restore_worker_test_hooks: bool,

    /// Let the kernel ask for attributes with the names of a listing (READDIRPLUS, adaptive):
    /// `ls -l`, `du` and rsync's scan of guest trees then need no lookup per file (about a
    /// quarter faster), while a plain `find` pays about a sixth more. Off by default.
    #[arg(long, help_heading = "Performance")]
    pub readdirplus: bool,
    /// FUSE worker threads. One volume's requests take at most all but one of them at once
    /// (docs/image-readers.md, "Neighbours").
    #[arg(long, default_value_t = 4, help_heading = "Performance")]
    pub threads: usize,
    /// Budget of the daemon's caches, in MiB: two thirds for the metadata and
    /// decompressed-cluster cache of disks, a third for the restore workers' answers (unless
    /// --restore-worker-cache-mb gives theirs). The daemon's memory stays within it plus a
    /// fixed overhead (docs/restore.md, "The daemon's memory, holder by holder").
    #[arg(
        long,
        value_name = "MIB",
        default_value_t = 48,
        help_heading = "Performance"
    )]
    pub cache_mb: usize,
    /// How long listings from backends are trusted, in milliseconds.
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 1000,
        help_heading = "Performance"
    )]
    pub list_ttl_ms: u64,
    /// Kernel read-ahead of the mount, in KiB (the size of FUSE read requests).
    #[arg(
        long,
        value_name = "KIB",
        default_value_t = 1024,
        help_heading = "Performance"
    )]
    pub read_ahead_kb: u32,

    /// Internal: descriptor on which a background daemon reports readiness.
    #[arg(long, hide = true)]
    pub ready_fd: Option<i32>,
    /// Where to mount the tree.
    pub mountpoint: PathBuf,
}

/// Cloud-managed domains and the copy snapshot method (docs/libvirt.md).
#[derive(Args, Debug)]
pub struct CloudArgs {
    /// Which domains are cloud-managed: auto (Nova, CloudStack, oVirt by the detection table,
    /// plus --managed-match), never, always. Managed domains are snapshotted by copy.
    #[arg(
        long,
        value_name = "MODE",
        default_value = "auto",
        help_heading = "libvirt"
    )]
    pub managed: crate::provider::libvirt::managed::ManagedMode,
    /// Domains whose name matches this regular expression are managed too (unanchored).
    #[arg(long, value_name = "REGEX", help_heading = "libvirt")]
    pub managed_match: Option<String>,
    /// How mkdir snapshots an instance: auto (copy for managed domains, external for the
    /// others), external (libvirt external snapshot: the domain switches to an overlay), copy
    /// (a copy into the store; nothing on the domain changes).
    #[arg(
        long,
        value_name = "METHOD",
        default_value = "auto",
        help_heading = "libvirt"
    )]
    pub snapshot_method: crate::provider::libvirt::SnapshotMethod,
    /// Where copy snapshots are kept [default: STATE_DIR/store].
    #[arg(long, value_name = "DIR", help_heading = "libvirt")]
    pub store: Option<PathBuf>,
    /// Copies of RBD disks go to RBD namespace `snapfs` of this Ceph pool (snap, clone,
    /// flatten; the snapshot on the cloud's image is removed again). Needs --ceph. Without
    /// it, RBD disks of running domains are copied into --store.
    #[arg(long, value_name = "POOL", help_heading = "libvirt")]
    pub store_pool: Option<String>,
    /// RBD disks under the copy method: copy (default), or keep-snapshot (leave an RBD
    /// snapshot on the cloud's image instead of a copy; breaks Nova's instance delete).
    #[arg(
        long,
        value_name = "MODE",
        default_value = "copy",
        help_heading = "libvirt"
    )]
    pub managed_rbd: crate::provider::libvirt::ManagedRbd,
    /// Block-device disks that are LVM logical volumes: take LVM snapshots (`lvcreate -s`,
    /// the guest frozen around all of them) instead of copying them. Needs device-mapper.
    #[arg(long, help_heading = "libvirt")]
    pub lvm_snapshots: bool,
    /// Copy-on-write space of an LVM snapshot of a thick LV (lvcreate -L; e.g. 1G; unit m
    /// when none). Thin LVs need none.
    #[arg(long, value_name = "SIZE", value_parser = crate::provider::libvirt::parse_lvm_size, help_heading = "libvirt")]
    pub lvm_cow_size: Option<u64>,
}

impl CloudArgs {
    /// `--managed` with `--managed-match`, the regular expression compiled.
    pub fn managed_policy(
        &self,
    ) -> anyhow::Result<crate::provider::libvirt::managed::ManagedPolicy> {
        crate::provider::libvirt::managed::ManagedPolicy::new(
            self.managed,
            self.managed_match.as_deref(),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))
    }
}

impl MountArgs {
    /// (block cache, restore workers' answers), in bytes: the blocks get two thirds of
    /// `--cache-mb`, the answers the other third, or `--restore-worker-cache-mb` when given.
    pub fn cache_budgets(&self) -> (usize, usize) {
        let total = self.cache_mb.saturating_mul(1 << 20);
        let answers = match self.restore_worker_cache_mb {
            Some(a) => a.saturating_mul(1 << 20),
            None => total / 3,
        };
        (total - total / 3, answers)
    }

    /// The one libvirt URI of this mount, from --libvirt and -c/--connect (None: no libvirt
    /// or several, see [`libvirt_uris`](Self::libvirt_uris)).
    pub fn libvirt_uri(&self) -> anyhow::Result<Option<String>> {
        let uris = self.libvirt_uris()?;
        Ok(match uris.as_slice() {
            [one] => Some(one.clone()),
            _ => None,
        })
    }

    /// Every libvirt URI of this mount, each once, in the order given (-c before --libvirt);
    /// two naming the same host are refused.
    pub fn libvirt_uris(&self) -> anyhow::Result<Vec<String>> {
        let mut uris: Vec<String> = Vec::new();
        for u in self.connect.iter().chain(self.libvirt.as_ref()) {
            if !uris.contains(u) {
                uris.push(u.clone());
            }
        }
        if uris.len() > 1 {
            crate::provider::hosts::hosts_of(&uris).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        Ok(uris)
    }
}

/// The program names under which we act as mount(8)'s helper.
const HELPER_NAMES: [&str; 2] = ["mount.fuse.snapfs", "mount.snapfs"];

/// Mount options that mount(8), fstab and systemd use and that mean nothing to snapfs.
fn ignored_mount_option(name: &str) -> bool {
    const IGNORED: &[&str] = &[
        "rw",
        "defaults",
        "auto",
        "noauto",
        "nofail",
        "_netdev",
        "user",
        "users",
        "nouser",
        "owner",
        "group",
        "exec",
        "noexec",
        "suid",
        "nosuid",
        "dev",
        "nodev",
        "sync",
        "async",
        "atime",
        "noatime",
        "relatime",
        "norelatime",
        "strictatime",
        "nostrictatime",
        "diratime",
        "nodiratime",
        "lazytime",
        "nolazytime",
        "loud",
        "silent",
        "comment",
        "_rnetdev",
        "nosymfollow",
    ];
    IGNORED.contains(&name) || name.starts_with("x-") || name.starts_with("X-")
}

/// The arguments `snapfs …` stands for, given how it was started: unchanged, unless it runs
/// as mount(8)'s helper (`mount.fuse.snapfs SOURCE DIR [-o OPTS] [-n] [-s] [-f] [-v]`).
pub fn effective_args(args: Vec<OsString>) -> anyhow::Result<Vec<OsString>> {
    let argv0 = args.first().map(Path::new).and_then(Path::file_name);
    match argv0.and_then(OsStr::to_str) {
        Some(name) if HELPER_NAMES.contains(&name) => mount_helper_args(&args[1..]),
        _ => Ok(args),
    }
}

/// Translate mount(8)'s helper call into `snapfs mount …`. SOURCE is a label (`snapfs`), or an
/// absolute directory, which is then an `--images` directory. Every `-o` option is a long
/// option of `snapfs mount` (`name=value`, bare `name` for a flag or for --libvirt's default),
/// `ro` is --read-only, and the options mount(8) and systemd use are ignored. Anything else is
/// an error that names it.
pub fn mount_helper_args(args: &[OsString]) -> anyhow::Result<Vec<OsString>> {
    let mut positional = Vec::new();
    let mut opts = Vec::new();
    let mut fake = false;
    let mut verbose = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("-o") => {
                let o = it.next().context("-o needs a list of options")?;
                opts.push(
                    o.to_str()
                        .context("mount options are not UTF-8")?
                        .to_string(),
                );
            }
            Some(s) if s.starts_with("-o") && s.len() > 2 => opts.push(s[2..].to_string()),
            Some("-t") | Some("-N") => {
                it.next();
            }
            Some("-n") | Some("-s") => {}
            Some("-f") => fake = true,
            Some("-v") => verbose = true,
            Some(s) if s.starts_with('-') && s.len() > 1 => bail!("unknown mount helper flag {s}"),
            _ => positional.push(a.clone()),
        }
    }
    let [source, mountpoint] = positional.as_slice() else {
        bail!("usage: mount.fuse.snapfs SOURCE MOUNTPOINT [-o OPTIONS]");
    };
    let mut out: Vec<OsString> = vec!["snapfs".into()];
    if verbose {
        out.push("-v".into());
    }
    out.push("mount".into());
    let src = Path::new(source);
    if src.is_absolute() && src.is_dir() {
        out.push("--images".into());
        out.push(source.clone());
    }
    let cli = Cli::command();
    let mount = cli
        .find_subcommand("mount")
        .context("the mount subcommand is missing")?;
    for opt in opts
        .iter()
        .flat_map(|o| o.split(','))
        .filter(|o| !o.is_empty())
    {
        let (name, value) = match opt.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (opt, None),
        };
        if ignored_mount_option(name) {
            continue;
        }
        if name == "ro" {
            out.push("--read-only".into());
            continue;
        }
        let long = name.replace('_', "-");
        let arg = mount
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && !a.is_hide_set())
            .with_context(|| format!("unknown mount option `{name}` (see snapfs mount --help)"))?;
        let takes_value = arg.get_action().takes_values();
        let optional_value = arg.get_num_args().is_some_and(|n| n.min_values() == 0);
        match (value, takes_value) {
            (Some(v), true) => out.push(format!("--{long}={v}").into()),
            (None, true) if optional_value => out.push(format!("--{long}").into()),
            (None, true) => bail!("mount option `{name}` needs a value ({name}=…)"),
            (None, false) => out.push(format!("--{long}").into()),
            (Some(_), false) => bail!("mount option `{name}` is a flag and takes no value"),
        }
    }
    if fake {
        // mount -f: do everything but the mount; the options were checked above.
        return Ok(vec!["snapfs".into(), "--version".into()]);
    }
    out.push(mountpoint.clone());
    Ok(out)
}

/// Write man pages (snapfs.1, snapfs-mount.1, snapfs-unmount.1) to `out/man` and completions
/// for bash, zsh and fish to `out/completions`.
pub fn generate_assets(out: &Path) -> anyhow::Result<()> {
    use clap_complete::Shell;
    let man = out.join("man");
    let comp = out.join("completions");
    for d in [&man, &comp] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let cmd = Cli::command();
    let write_page = |cmd: clap::Command, file: &str| -> anyhow::Result<()> {
        let mut buf = Vec::new();
        clap_mangen::Man::new(cmd).render(&mut buf)?;
        std::fs::write(man.join(file), buf).with_context(|| format!("writing {file}"))
    };
    write_page(cmd.clone(), "snapfs.1")?;
    let mut cmd_built = cmd.clone();
    cmd_built.build();
    for sub in cmd_built
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        let name = format!("snapfs-{}", sub.get_name());
        write_page(sub.clone().name(name.clone()), &format!("{name}.1"))?;
    }
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let mut c = cmd.clone();
        clap_complete::generate_to(shell, &mut c, "snapfs", &comp)
            .with_context(|| format!("{shell} completions"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn helper(args: &[&str]) -> anyhow::Result<Vec<String>> {
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        effective_args(args).map(|v| {
            v.into_iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        })
    }

    #[test]
    fn fstab_options_become_long_options() {
        let out = helper(&[
            "/sbin/mount.fuse.snapfs",
            "snapfs",
            "/mnt/snap",
            "-o",
            "rw,images=/a,images=/b,libvirt,allow_other,nofail,_netdev,x-systemd.automount,noauto,users,defaults,cache_mb=64",
        ])
        .unwrap();
        assert_eq!(
            out,
            [
                "snapfs",
                "mount",
                "--images=/a",
                "--images=/b",
                "--libvirt",
                "--allow-other",
                "--cache-mb=64",
                "/mnt/snap"
            ]
        );
        // The translated arguments parse as `snapfs mount` does.
        let cli = Cli::try_parse_from(&out).unwrap();
        let Cmd::Mount(m) = cli.cmd else {
            panic!("not a mount")
        };
        assert_eq!(m.images, [PathBuf::from("/a"), PathBuf::from("/b")]);
        assert_eq!(m.libvirt_uri().unwrap().as_deref(), Some("qemu:///system"));
        assert!(m.allow_other && !m.read_only);
        assert_eq!(m.cache_mb, 64);
    }

    /// One budget for the daemon's caches: `--cache-mb` is shared by the disks' block cache
    /// and the workers' answers unless the answers get their own budget.
    #[test]
    fn cache_mb_is_shared_unless_the_answers_get_their_own() {
        let mount = |args: &[&str]| {
            let mut v = vec!["snapfs", "mount"];
            v.extend_from_slice(args);
            v.push("/m");
            match Cli::try_parse_from(&v).unwrap().cmd {
                Cmd::Mount(m) => m.cache_budgets(),
                _ => panic!("not a mount"),
            }
        };
        // Defaults: 48 MiB, 32 of blocks (as before) and 16 of answers.
        assert_eq!(mount(&[]), (32 << 20, 16 << 20));
        assert_eq!(mount(&["--cache-mb=6"]), (4 << 20, 2 << 20));
        // An explicit answers' budget replaces their third.
        assert_eq!(
            mount(&["--cache-mb=6", "--restore-worker-cache-mb=8"]),
            (4 << 20, 8 << 20)
        );
        assert_eq!(mount(&["--cache-mb=0"]), (0, 0));
    }

    #[test]
    fn values_keep_their_equals_signs_and_ro_is_read_only() {
        let out = helper(&[
            "mount.fuse.snapfs",
            "snapfs",
            "/m",
            "-o",
            "ro,libvirt=qemu+ssh://h/system?keyfile=/k",
            "-n",
            "-v",
        ])
        .unwrap();
        assert_eq!(
            out,
            [
                "snapfs",
                "-v",
                "mount",
                "--read-only",
                "--libvirt=qemu+ssh://h/system?keyfile=/k",
                "/m"
            ]
        );
    }

    #[test]
    fn an_absolute_directory_as_source_is_an_images_directory() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().to_str().unwrap();
        let out = helper(&["mount.fuse.snapfs", src, "/m"]).unwrap();
        assert_eq!(out, ["snapfs", "mount", "--images", src, "/m"]);
    }

    #[test]
    fn unknown_or_malformed_options_are_named() {
        let err = helper(&[
            "mount.fuse.snapfs",
            "snapfs",
            "/m",
            "-o",
            "images=/a,bogus=1",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown mount option `bogus`"), "{err}");
        let err = helper(&["mount.fuse.snapfs", "snapfs", "/m", "-o", "images"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("`images` needs a value"), "{err}");
        let err = helper(&["mount.fuse.snapfs", "snapfs", "/m", "-o", "foreground=yes"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("is a flag"), "{err}");
        // Internal options are not mount options.
        let err = helper(&["mount.fuse.snapfs", "snapfs", "/m", "-o", "ready_fd=3"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown mount option `ready_fd`"), "{err}");
        assert!(helper(&["mount.fuse.snapfs", "snapfs"]).is_err());
    }

    #[test]
    fn a_bare_libvirt_never_takes_the_mountpoint_as_its_uri() {
        let cli = Cli::try_parse_from(["snapfs", "mount", "--libvirt", "/mnt/snap"]).unwrap();
        let Cmd::Mount(m) = cli.cmd else {
            panic!("not a mount")
        };
        assert_eq!(m.libvirt_uri().unwrap().as_deref(), Some("qemu:///system"));
        assert_eq!(m.mountpoint, PathBuf::from("/mnt/snap"));
    }

    #[test]
    fn connect_implies_libvirt_like_virsh() {
        for args in [
            &["snapfs", "mount", "-c", "qemu:///session", "/m"][..],
            &["snapfs", "mount", "--connect", "qemu:///session", "/m"][..],
            &[
                "snapfs",
                "mount",
                "--connect=qemu:///session",
                "--libvirt=qemu:///session",
                "/m",
            ][..],
        ] {
            let cli = Cli::try_parse_from(args).unwrap();
            let Cmd::Mount(m) = cli.cmd else {
                panic!("not a mount")
            };
            assert_eq!(m.libvirt_uri().unwrap().as_deref(), Some("qemu:///session"));
        }
        let cli = Cli::try_parse_from([
            "snapfs",
            "mount",
            "-c",
            "qemu:///a",
            "-c",
            "qemu+tcp://b/system",
            "/m",
        ])
        .unwrap();
        let Cmd::Mount(m) = cli.cmd else {
            panic!("not a mount")
        };
        assert_eq!(m.libvirt_uri().unwrap(), None);
        assert_eq!(
            m.libvirt_uris().unwrap(),
            ["qemu:///a", "qemu+tcp://b/system"]
        );
        let cli =
            Cli::try_parse_from(["snapfs", "mount", "-c", "qemu:///a", "--libvirt", "/m"]).unwrap();
        let Cmd::Mount(m) = cli.cmd else {
            panic!("not a mount")
        };
        let e = m.libvirt_uris().unwrap_err().to_string();
        assert!(e.contains("same host \"local\""), "{e}");
    }

    #[test]
    fn man_pages_and_completions_are_generated() {
        let dir = tempfile::tempdir().unwrap();
        generate_assets(dir.path()).unwrap();
        let page = std::fs::read_to_string(dir.path().join("man/snapfs-mount.1")).unwrap();
        assert!(
            page.contains("read\\-only") || page.contains("read-only"),
            "{page}"
        );
        for f in [
            "man/snapfs.1",
            "man/snapfs-unmount.1",
            "completions/snapfs.bash",
            "completions/_snapfs",
            "completions/snapfs.fish",
        ] {
            assert!(dir.path().join(f).is_file(), "{f} missing");
        }
        assert!(!dir.path().join("man/snapfs-generate-assets.1").exists());
    }
}
