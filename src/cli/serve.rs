//! `ember serve`: the pool supervisor and its Unix-socket API.

use std::path::PathBuf;
use std::process::ExitCode;

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
    ember::serve::run(&args.socket, &dir, &args.images)?;
    Ok(ExitCode::SUCCESS)
}
