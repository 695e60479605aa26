use std::ffi::OsString;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use snapfs::cli::{Cli, Cmd, MountArgs};
use snapfs::daemon::{self, MountConfig};

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
        .with_writer(|| snapfs::logfile::LogWriter)
        .with_ansi(ansi)
        .init();
}

fn main() -> ExitCode {
    // A guest filesystem worker (`__restore-worker`): sandboxed before anything else runs.
    snapfs::restore::worker::run_if_worker();
    // As mount(8)'s helper (mount.fuse.snapfs) the arguments are translated to `snapfs mount`.
    let args = match snapfs::cli::effective_args(std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("snapfs: {e:#}");
            // mount(8)'s convention for a usage error.
            return ExitCode::from(1);
        }
    };
    let cli = Cli::parse_from(&args);
    // A mount without --foreground forks a daemon that logs to a file: no colours there.
    let detaches = matches!(&cli.cmd, Cmd::Mount(m) if !m.foreground);
    init_logging(
        cli.verbose,
        !detaches && std::io::IsTerminal::is_terminal(&std::io::stderr()),
    );
    let res = match cli.cmd {
        Cmd::Unmount { lazy, mountpoint } => daemon::unmount_path(&mountpoint, lazy),
        Cmd::Mount(m) => mount(*m, args),
        Cmd::GenerateAssets { out } => snapfs::cli::generate_assets(&out),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("snapfs: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn mount(m: MountArgs, args: Vec<OsString>) -> anyhow::Result<()> {
    let libvirt = m.libvirt_uri()?;
    let libvirt_hosts = match m.libvirt_uris()? {
        several if several.len() > 1 => several,
        _ => Vec::new(),
    };
    let log = m
        .log_file
        .clone()
        .unwrap_or_else(|| m.state_dir.join("snapfs.log"));
    let ready = if !m.foreground {
        // Detach (fork; or re-run ourselves with the same arguments) and wait for READY.
        let args: Vec<OsString> = args.into_iter().skip(1).collect();
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
    if ready.is_some() {
        // A detached daemon (forked, or re-executed with --ready-fd): its output is the log file.
        snapfs::logfile::rotate_at(&log, m.log_max_mb.saturating_mul(1 << 20));
    }
    let (block_cache_bytes, answers_bytes) = m.cache_budgets();
    snapfs::restore::worker::configure(snapfs::restore::worker::WorkerConfig {
        enabled: m.restore_worker == "on",
        uid: m.restore_worker_uid,
        mem_mb: m.restore_worker_mem_mb,
        cpu_secs: m.restore_worker_cpu_s,
        test_hooks: m.restore_worker_test_hooks,
        cache_bytes: answers_bytes,
    });
    let cfg = MountConfig {
        mountpoint: m.mountpoint,
        images: m.images,
        allow_other: m.allow_other,
        state_dir: m.state_dir,
        threads: m.threads,
        cache_bytes: block_cache_bytes,
        ttl: Duration::from_millis(m.list_ttl_ms),
        read_ahead_kb: m.read_ahead_kb,
        readdirplus: m.readdirplus,
        libvirt,
        libvirt_hosts,
        read_only: m.read_only,
        revert_keep: m.revert_keep == "yes",
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
        managed: m.cloud.managed_policy()?,
        snapshot_method: m.cloud.snapshot_method,
        store: m.cloud.store,
        store_pool: m.cloud.store_pool,
        managed_rbd: m.cloud.managed_rbd,
        lvm_snapshots: m.cloud.lvm_snapshots,
        lvm_cow_size: m.cloud.lvm_cow_size,
    };
    daemon::serve(cfg, ready)
}
