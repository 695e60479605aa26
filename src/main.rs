use std::ffi::OsString;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use snapfs::daemon::{self, MountConfig};

/// snapfs: VM snapshots as plain files and directories.
#[derive(Parser)]
#[command(version, about, long_about = None, after_help = EXAMPLES)]
struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    cmd: Cmd,
}

const EXAMPLES: &str = "Examples:
  snapfs mount --images /var/lib/libvirt/images /mnt/snap
  ls /mnt/snap/volumes/images/web.qcow2/.snapshots/
  mkdir /mnt/snap/volumes/images/web.qcow2/.snapshots/before-upgrade
  cp --sparse=always /mnt/snap/volumes/images/web.qcow2/.snapshots/before-upgrade/disk.raw /backup/
  rmdir /mnt/snap/volumes/images/web.qcow2/.snapshots/before-upgrade
  snapfs mount --libvirt /mnt/snap          (instances = domains of qemu:///system)
  mkdir /mnt/snap/instances/web/.snapshots/pre-upgrade
  ln -s ../instances/web/.snapshots/pre-upgrade /mnt/snap/launch/web-copy
  snapfs mount --libvirt --ceph /etc/ceph/ceph.conf --pool volumes --flatten-on-launch /mnt/snap
                                            (RBD volumes; domains on RBD disks: RBD snapshots,
                                             launch by clone, flattened in the background)
  snapfs unmount /mnt/snap";

#[derive(Subcommand)]
enum Cmd {
    /// Mount the snapshot tree. Returns once the mount is ready (unless --foreground).
    Mount(Box<MountArgs>),
    /// Unmount a snapfs mount and let its daemon exit.
    Unmount {
        /// Detach even if the mount is busy.
        #[arg(long)]
        lazy: bool,
        mountpoint: PathBuf,
    },
}

#[derive(Args)]
struct MountArgs {
    /// A directory of disk images (*.qcow2, *.raw, *.img): pool `basename DIR`. Repeatable.
    #[arg(long = "images", value_name = "DIR")]
    images: Vec<PathBuf>,
    /// Instances from libvirt: `--libvirt` (qemu:///system) or `--libvirt=URI`.
    #[arg(long, value_name = "URI", num_args = 0..=1, require_equals = true, default_missing_value = "qemu:///system")]
    libvirt: Option<String>,
    /// Guest filesystem freeze for instance snapshots: require, prefer or off.
    #[arg(long, value_name = "POLICY", default_value = "prefer")]
    quiesce: snapfs::provider::libvirt::Quiesce,
    /// Seconds to wait for the guest agent to freeze.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    freeze_timeout: f64,
    /// A Ceph cluster's configuration file: serve RBD images of each --pool as volumes.
    #[arg(long = "ceph", value_name = "CEPH_CONF")]
    ceph: Option<PathBuf>,
    /// Ceph client id to connect as (client.ID); its keyring is found through CEPH_CONF.
    #[arg(long = "ceph-id", value_name = "ID", default_value = "admin")]
    ceph_id: String,
    /// A Ceph pool whose RBD images become volumes/POOL/IMAGE. Repeatable; needs --ceph.
    #[arg(long = "pool", value_name = "POOL", requires = "ceph")]
    pools: Vec<String>,
    /// Bound of every Ceph operation (and of the connection at start-up), in seconds: a read
    /// of an unreachable cluster fails with EIO after this long.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    ceph_timeout: u64,
    /// MiB read ahead (in flight, in object-sized chunks) for a sequential reader of an RBD
    /// snapshot; 0 turns it off. Chunks wait in a cache of their own (4× this, at least 64 MiB).
    #[arg(long, value_name = "MIB", default_value_t = 32)]
    ceph_read_ahead_mb: u64,
    /// After launching from an RBD-backed snapshot, flatten the clones in the background
    /// (like Nova), so the snapshot can be deleted once that finishes.
    #[arg(long)]
    flatten_on_launch: bool,
    /// Read RBD snapshots through the kernel page cache, as other files: faster for readers
    /// of less than 32 KiB at a time, but every byte is copied twice and stays cached.
    /// By default RBD disks are opened with direct I/O (one copy, into the reader's buffer).
    #[arg(long)]
    ceph_page_cache: bool,
    #[command(flatten)]
    cloud: CloudArgs,
    /// Stay in the foreground and log to stderr.
    #[arg(long)]
    foreground: bool,
    /// Let other users in (the kernel then checks modes: default_permissions).
    #[arg(long)]
    allow_other: bool,
    /// Where the daemon keeps its state and log.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/snapfs")]
    state_dir: PathBuf,
    /// Log file of a background daemon [default: STATE_DIR/snapfs.log].
    #[arg(long, value_name = "FILE")]
    log_file: Option<PathBuf>,
    /// Let the kernel ask for attributes with the names of a listing (READDIRPLUS, adaptive):
    /// `ls -l`, `du` and rsync's scan of guest trees then need no lookup per file (about a
    /// quarter faster), while a plain `find` pays about a sixth more. Off by default.
    #[arg(long)]
    readdirplus: bool,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Budget of the metadata and decompressed-cluster cache, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 32)]
    cache_mb: usize,
    /// How long listings from backends are trusted, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    list_ttl_ms: u64,
    /// Kernel read-ahead of the mount, in KiB (the size of FUSE read requests).
    #[arg(long, value_name = "KIB", default_value_t = 1024)]
    read_ahead_kb: u32,
    /// Internal: descriptor on which a background daemon reports readiness.
    #[arg(long, hide = true)]
    ready_fd: Option<i32>,
    mountpoint: PathBuf,
}

/// Cloud-managed domains and the copy snapshot method (docs/libvirt.md).
#[derive(Args)]
struct CloudArgs {
    /// Which domains are cloud-managed: auto (Nova, CloudStack, oVirt by the detection table,
    /// plus --managed-match), never, always. Managed domains are snapshotted by copy.
    #[arg(
        long,
        value_name = "MODE",
        default_value = "auto",
        help_heading = "libvirt"
    )]
    managed: snapfs::provider::libvirt::managed::ManagedMode,
    /// Domains whose name matches this regular expression are managed too (unanchored).
    #[arg(long, value_name = "REGEX", help_heading = "libvirt")]
    managed_match: Option<String>,
    /// How mkdir snapshots an instance: auto (copy for managed domains, external for the
    /// others), external (libvirt external snapshot: the domain switches to an overlay), copy
    /// (a copy into the store; nothing on the domain changes).
    #[arg(
        long,
        value_name = "METHOD",
        default_value = "auto",
        help_heading = "libvirt"
    )]
    snapshot_method: snapfs::provider::libvirt::SnapshotMethod,
    /// Where copy snapshots are kept [default: STATE_DIR/store].
    #[arg(long, value_name = "DIR", help_heading = "libvirt")]
    store: Option<PathBuf>,
}

fn init_logging(verbose: u8, ansi: bool) {
    let default = match verbose {
        0 => "snapfs=info,fuser=error",
        1 => "snapfs=info,fuser=warn",
        2 => "snapfs=debug,fuser=info",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A mount without --foreground forks a daemon that logs to a file: no colours there.
    let detaches = matches!(&cli.cmd, Cmd::Mount(m) if !m.foreground);
    init_logging(
        cli.verbose,
        !detaches && std::io::IsTerminal::is_terminal(&std::io::stderr()),
    );
    let res = match cli.cmd {
        Cmd::Unmount { lazy, mountpoint } => daemon::unmount_path(&mountpoint, lazy),
        Cmd::Mount(m) => mount(*m),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("snapfs: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn mount(m: MountArgs) -> anyhow::Result<()> {
    let ready = if !m.foreground {
        // Detach (fork; or re-run ourselves with the same arguments) and wait for READY.
        let args: Vec<OsString> = std::env::args_os().skip(1).collect();
        let log = m
            .log_file
            .clone()
            .unwrap_or_else(|| m.state_dir.join("snapfs.log"));
        match daemon::fork_daemon(args, &log)? {
            daemon::Forked::Parent => return Ok(()),
            daemon::Forked::Child(fd) => Some(fd),
        }
    } else {
        match m.ready_fd {
            // SAFETY: the parent passed us this descriptor for our exclusive use.
            Some(fd) if fd >= 0 => Some(unsafe { OwnedFd::from_raw_fd(fd) }),
            _ => None,
        }
    };
    let cfg = MountConfig {
        mountpoint: m.mountpoint,
        images: m.images,
        allow_other: m.allow_other,
        state_dir: m.state_dir,
        threads: m.threads,
        cache_bytes: m.cache_mb.saturating_mul(1 << 20),
        ttl: Duration::from_millis(m.list_ttl_ms),
        read_ahead_kb: m.read_ahead_kb,
        readdirplus: m.readdirplus,
        libvirt: m.libvirt,
        quiesce: m.quiesce,
        freeze_timeout: Duration::try_from_secs_f64(m.freeze_timeout)
            .map_err(|e| anyhow::anyhow!("--freeze-timeout {}: {e}", m.freeze_timeout))?,
        rbd: m.ceph.map(|conf| snapfs::provider::rbd::RbdConfig {
            conf,
            id: m.ceph_id,
            pools: m.pools,
            op_timeout: Duration::from_secs(m.ceph_timeout.max(1)),
            connect_timeout: Duration::from_secs(m.ceph_timeout.max(1)),
            read_ahead: m.ceph_read_ahead_mb << 20,
            page_cache: m.ceph_page_cache,
        }),
        flatten_on_launch: m.flatten_on_launch,
        managed: snapfs::provider::libvirt::managed::ManagedPolicy::new(
            m.cloud.managed,
            m.cloud.managed_match.as_deref(),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?,
        snapshot_method: m.cloud.snapshot_method,
        store: m.cloud.store,
    };
    daemon::serve(cfg, ready)
}
