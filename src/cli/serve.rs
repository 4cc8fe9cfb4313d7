//! `ember serve`: the pool supervisor and its Unix-socket API.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::builder::TypedValueParser as _;
use clap::Args;

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// The Unix socket to serve on.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Where registrations, templates and clones' channels live (default: $XDG_STATE_HOME/ember or
    /// ~/.local/state/ember).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// A directory registrations may take their kernel and initramfs from (repeatable): a
    /// registration names a file in one by absolute path or relative to it; nothing outside, and
    /// no symlink, is ever opened. Without one, every registration is refused.
    #[arg(long = "images", value_name = "DIR")]
    images: Vec<PathBuf>,
    /// Where clones run: `jail` (a worker process per function, jailed: namespaces, its own root
    /// and uid, no capabilities, a cgroup; needs root), `process` (a worker process per function,
    /// not jailed), `none` (in the daemon itself). Default: `jail` as root, else `process`.
    #[arg(long, value_name = "MODE")]
    isolation: Option<Isolation>,
    /// The first of the 65536 uids (and gids) jailed workers run as, each its own: none may be an
    /// account's, a group's or inside a subordinate id range of /etc/subuid or /etc/subgid
    /// (checked at start).
    #[arg(long, value_name = "UID", default_value_t = ember::serve::worker::DEFAULT_UID_BASE)]
    worker_uid_base: u32,
    /// How networked clones' public egress leaves this host: `masquerade` (with the host's own
    /// address), or `routed` (with each clone's own transit address in 10.199.0.0/16, which the
    /// network beyond this host routes back here). A function's `egress_ip` applies either way.
    #[arg(long, value_name = "MODE", default_value = "masquerade")]
    egress_nat: EgressNat,
    /// Threads that serve the HTTP API (what may take long goes to a blocking pool; lean-protocol
    /// connections have threads of their own). One answers a request soonest: with more, each
    /// request also wakes another to look for work.
    #[arg(long, value_name = "N", default_value_t = ember::serve::DEFAULT_API_THREADS,
          value_parser = clap::value_parser!(u16).range(1..=64).map(usize::from))]
    api_threads: usize,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum EgressNat {
    Masquerade,
    Routed,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum Isolation {
    Jail,
    Process,
    None,
}

impl Isolation {
    pub(crate) fn resolve(mode: Option<Self>) -> Result<ember::serve::worker::Isolation, String> {
        use ember::serve::worker::Isolation as I;
        Ok(match mode {
            None => I::default_for_this_user(),
            Some(Self::Jail) if I::default_for_this_user() != I::Jail => {
                return Err("--isolation jail needs root (to create namespaces, mount and change uids)".into())
            }
            Some(Self::Jail) => I::Jail,
            Some(Self::Process) => I::Process,
            Some(Self::None) => I::None,
        })
    }
}

fn default_state_dir() -> Result<PathBuf, String> {
    if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join("ember"));
    }
    let home = std::env::var_os("HOME").ok_or("HOME is not set; give --state-dir")?;
    Ok(PathBuf::from(home).join(".local/state/ember"))
}

pub(crate) fn serve(args: ServeArgs) -> Result<ExitCode, String> {
    let dir = args.state_dir.map(Ok).unwrap_or_else(default_state_dir)?;
    let isolation = Isolation::resolve(args.isolation)?;
    let masquerade = matches!(args.egress_nat, EgressNat::Masquerade);
    ember::serve::run(&args.socket, &dir, &args.images, isolation, args.worker_uid_base, masquerade, args.api_threads)?;
    Ok(ExitCode::SUCCESS)
}
