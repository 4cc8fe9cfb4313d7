//! `ember image`: build, list and remove read-only EROFS layer images.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use ember::image::{ImageError, Limits, Store};

#[derive(Subcommand)]
pub(crate) enum ImageCommand {
    /// Build a layer image from SOURCE and print `<digest> <size> bytes <built in X s | cached>
    /// <path>`.
    ///
    /// SOURCE is a directory, a tar archive (plain or gzip), a zip archive, an OCI image layout directory, or a
    /// `docker save` tarball; an image's layers are flattened into one. The image is named by the
    /// sha256 of its bytes; building the same input again returns the stored one. Unsafe entries
    /// (absolute or `..` paths, device nodes, symlinks leaving the root) are refused. Needs
    /// mkfs.erofs (erofs-utils).
    Build(BuildArgs),
    /// List the stored layer images: digest, size in bytes, path.
    Ls(StoreArgs),
    /// Remove a stored layer image (by `sha256:<hex>` or `<hex>`).
    Rm(RmArgs),
}

#[derive(Args)]
pub(crate) struct StoreArgs {
    /// ember's state directory; images are kept in its `images/` (default: $XDG_STATE_HOME/ember
    /// or ~/.local/state/ember, as for `ember serve`).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

#[derive(Args)]
pub(crate) struct BuildArgs {
    /// A directory, a tar or tar.gz, a zip, an OCI image layout directory, or a `docker save`
    /// tarball.
    #[arg(value_name = "SOURCE")]
    source: PathBuf,
    /// Place the source's tree under this directory of the image (e.g. `var/task`, where ember's
    /// runtimes find a function's code) instead of at its root.
    #[arg(long, value_name = "DIR")]
    prefix: Option<PathBuf>,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Args)]
pub(crate) struct RmArgs {
    /// The layer's digest: `sha256:<hex>` or `<hex>`.
    #[arg(value_name = "DIGEST")]
    digest: String,
    #[command(flatten)]
    store: StoreArgs,
}

/// The same default as `ember serve --state-dir`.
fn default_state_dir() -> Result<PathBuf, String> {
    if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join("ember"));
    }
    let home = std::env::var_os("HOME").ok_or("HOME is not set; give --state-dir")?;
    Ok(PathBuf::from(home).join(".local/state/ember"))
}

impl StoreArgs {
    fn open(&self) -> Result<Store, String> {
        let state = self.state_dir.clone().map(Ok).unwrap_or_else(default_state_dir)?;
        let dir = state.join("images");
        Store::open(&dir).map_err(|e| format!("cannot open the image store {}: {e}", dir.display()))
    }
}

pub(crate) fn image(command: ImageCommand) -> Result<ExitCode, String> {
    match command {
        ImageCommand::Build(args) => {
            let store = args.store.open()?;
            let prefix = args.prefix.unwrap_or_default();
            let built =
                store.build_at(&args.source, &prefix, &Limits::default()).map_err(|e| source_error(&args.source, e))?;
            let how = if built.cached { "cached".to_string() } else { format!("built in {:.2} s", built.seconds) };
            println!("{} {} bytes {how} {}", built.layer.digest, built.layer.size, built.layer.path.display());
        }
        ImageCommand::Ls(args) => {
            let store = args.open()?;
            let layers = store.list().map_err(|e| format!("cannot list {}: {e}", store.dir().display()))?;
            for l in layers {
                println!("{} {} {}", l.digest, l.size, l.path.display());
            }
        }
        ImageCommand::Rm(args) => args.store.open()?.remove(&args.digest).map_err(|e| e.to_string())?,
    }
    Ok(ExitCode::SUCCESS)
}

fn source_error(source: &Path, e: ImageError) -> String {
    match e {
        // The source itself cannot be read: its name once is enough.
        ImageError::Io { context, source: err } if Path::new(&context) == source => {
            format!("cannot build an image from {context}: {err}")
        }
        e => format!("cannot build an image from {}: {e}", source.display()),
    }
}
