//! The supervisor's files, under its state directory:
//!
//! ```text
//! functions/<name>/spec.json     the registration, as accepted
//! functions/<name>/template/     the template snapshot (state, memory, working-set), with the
//!                                registration it was made for and its version
//! functions/<name>/template.next/ a new version's template while it is made
//! vms/<id>.mailbox, <id>.vsock   each live clone's channels (removed with the clone)
//! ```
//!
//! Every directory is 0700 and every file 0600: templates hold guest RAM, mailboxes every
//! tenant's payloads.

use std::path::{Path, PathBuf};

use super::images::ImageDirs;
use super::model::FunctionSpec;
use crate::config::DriveConfig;
use crate::snapshot::{self, MEMORY_FILE, STATE_FILE};
use crate::sys::private_dir;
use crate::template::{MakeOptions, Template};

const SPEC_FILE: &str = "spec.json";
/// In a template directory: the registration it was made for, and its version.
const MADE_FOR: &str = "registration.json";
const VERSION_FILE: &str = "version";

/// Why the state directory could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Snapshot(#[from] snapshot::SnapshotError),
    #[error("cannot encode the registration: {0}")]
    Encode(#[from] serde_json::Error),
    /// A saved template that does not serve this registration.
    #[error("{0}")]
    Stale(&'static str),
    /// An image the registration names cannot be opened.
    #[error("{0}")]
    Image(super::images::ImageError),
    /// The guest's boot failed.
    #[error("{0}")]
    Boot(String),
    /// The worker that booted it failed, or handed back what is not acceptable.
    #[error("{0}")]
    Worker(#[from] crate::isolation::worker::WorkerError),
}

impl From<super::images::ImageError> for RegistryError {
    fn from(e: super::images::ImageError) -> Self {
        Self::Image(e)
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RegistryError + '_ {
    move |source| RegistryError::Io { path: path.to_path_buf(), source }
}

/// The state directory's layout.
pub struct Registry {
    dir: PathBuf,
}

impl Registry {
    /// Opens (or creates) the state directory. Channels of clones from a previous run (a daemon
    /// killed with SIGKILL) are stale and go.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        let r = Self { dir: dir.to_path_buf() };
        private_dir(&r.dir)?;
        private_dir(&r.dir.join("functions"))?;
        let vms = r.dir.join("vms");
        let _ = std::fs::remove_dir_all(&vms);
        private_dir(&vms)?;
        Ok(r)
    }

    pub fn function_dir(&self, name: &str) -> PathBuf {
        self.dir.join("functions").join(name)
    }

    fn template_dir(&self, name: &str) -> PathBuf {
        self.function_dir(name).join("template")
    }

    fn next_template_dir(&self, name: &str) -> PathBuf {
        self.function_dir(name).join("template.next")
    }

    /// Records in a template directory what it was made for.
    fn label(dir: &Path, spec: &FunctionSpec, version: &str) -> Result<(), RegistryError> {
        let bytes = serde_json::to_vec_pretty(spec)?;
        snapshot::write_atomic(&dir.join(MADE_FOR), &bytes)?;
        Ok(snapshot::write_atomic(&dir.join(VERSION_FILE), version.as_bytes())?)
    }

    /// Makes the template made by [`Registry::make_template`] with `next` the function's own (the
    /// one before goes).
    pub fn promote(&self, name: &str) -> Result<(), RegistryError> {
        let (dir, next) = (self.template_dir(name), self.next_template_dir(name));
        let old = self.function_dir(name).join(".template.old");
        let _ = std::fs::remove_dir_all(&old);
        match std::fs::rename(&dir, &old) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&dir)(e)),
        }
        std::fs::rename(&next, &dir).map_err(io(&next))?;
        let _ = snapshot::sync_dir(&self.function_dir(name));
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }

    /// Records that the function's template now serves `spec` (a new registration that changed
    /// nothing the guest sees).
    pub fn relabel(&self, name: &str, spec: &FunctionSpec, version: &str) -> Result<(), RegistryError> {
        Self::label(&self.template_dir(name), spec, version)
    }

    /// Removes a new version's template that will not be used.
    pub fn discard_next(&self, name: &str) {
        let _ = std::fs::remove_dir_all(self.next_template_dir(name));
    }

    /// Records a template that has no files of its own (a backend that restores clones without
    /// one, the unit tests' stub) where [`Registry::make_template`] would have made it: its
    /// directory, labelled, so that versions are promoted and relabelled as for any other.
    pub fn record_template(
        &self,
        name: &str,
        spec: &FunctionSpec,
        version: &str,
        next: bool,
    ) -> Result<(), RegistryError> {
        let dir = if next { self.next_template_dir(name) } else { self.template_dir(name) };
        let _ = std::fs::remove_dir_all(&dir);
        private_dir(&dir).map_err(io(&dir))?;
        Self::label(&dir, spec, version)
    }

    /// Where clone `id`'s mailbox and vsock socket live.
    pub fn channels(&self, id: u64) -> (PathBuf, PathBuf) {
        let vms = self.dir.join("vms");
        (vms.join(format!("{id}.mailbox")), vms.join(format!("{id}.vsock")))
    }

    /// Saves a registration (atomically: a crash leaves the old one or the new one).
    pub fn save(&self, name: &str, spec: &FunctionSpec) -> Result<(), RegistryError> {
        let dir = self.function_dir(name);
        private_dir(&dir).map_err(io(&dir))?;
        let bytes = serde_json::to_vec_pretty(spec)?;
        snapshot::write_atomic(&dir.join(SPEC_FILE), &bytes)?;
        Ok(snapshot::sync_dir(&self.dir.join("functions"))?)
    }

    /// Every saved registration, by name, in name order; a registration that cannot be read is
    /// reported, not skipped silently.
    pub fn load(&self) -> std::io::Result<Vec<(String, Result<FunctionSpec, String>)>> {
        let mut names = Vec::new();
        for e in std::fs::read_dir(self.dir.join("functions"))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                // What a deletion or a write left behind when the daemon stopped in the middle.
                let _ = std::fs::remove_dir_all(e.path()).or_else(|_| std::fs::remove_file(e.path()));
            } else {
                names.push(name);
            }
        }
        names.sort();
        Ok(names
            .into_iter()
            .map(|name| {
                let path = self.function_dir(&name).join(SPEC_FILE);
                let spec = std::fs::read_to_string(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|s| serde_json::from_str::<FunctionSpec>(&s).map_err(|e| e.to_string()))
                    // Saved files can be edited or corrupted: a bad value is refused here, not
                    // met later by the scaling loop.
                    .and_then(|spec| spec.validate().map(|()| spec).map_err(|e| e.to_string()))
                    .map_err(|e| format!("{}: {e}", path.display()));
                (name, spec)
            })
            .collect())
    }

    /// Removes a function's files: first renamed out of the way in one step (a crash leaves
    /// either the registration or a tombstone that the next start removes), then deleted.
    pub fn remove(&self, name: &str) -> Result<(), RegistryError> {
        let dir = self.function_dir(name);
        let tomb = self.dir.join("functions").join(format!(".{name}.deleted"));
        let _ = std::fs::remove_dir_all(&tomb);
        std::fs::rename(&dir, &tomb).map_err(io(&dir))?;
        let _ = snapshot::sync_dir(&self.dir.join("functions"));
        std::fs::remove_dir_all(&tomb).map_err(io(&tomb))
    }

    /// Boots `spec`'s guest to its agent's "ready" and makes the function's template, labelled
    /// with `version` (anything there before is removed first); with `next`, a new version's, to
    /// be [promoted](Registry::promote). The kernel and initramfs are opened beneath `images` and
    /// booted from those open files.
    #[allow(clippy::too_many_arguments)]
    pub fn make_template(
        &self,
        name: &str,
        spec: &FunctionSpec,
        version: &str,
        drives: Vec<DriveConfig>,
        images: &ImageDirs,
        next: bool,
        workers: Option<&crate::isolation::worker::Workers>,
        net: Option<&crate::isolation::network::Slot>,
    ) -> Result<Template, RegistryError> {
        let kernel = images.open_image("kernel", &spec.kernel)?;
        let initramfs = images.open_image("initramfs", &spec.initramfs)?;
        let dir = if next { self.next_template_dir(name) } else { self.template_dir(name) };
        let _ = std::fs::remove_dir_all(&dir);
        match workers {
            // Booted in a worker of its own: the guest's first run never happens in the daemon.
            // What the worker handed back (checked) is written here by the daemon alone, and the
            // template served is the one checked, not one read back from disk.
            Some(w) => {
                let tap = net.map(|n| n.tap());
                let vm = spec.vm_config_with_drives(drives);
                let made = w.make_template(
                    name,
                    &vm,
                    spec.limits.cpus,
                    [kernel.fd(), initramfs.fd()],
                    tap,
                    spec.boot_timeout(),
                )?;
                let paths = snapshot::SnapshotPaths::new(&dir);
                let written = (|| {
                    private_dir(&dir).map_err(|e| snapshot::SnapshotError::Io(dir.clone(), e))?;
                    snapshot::write_atomic(&paths.state(), &made.state_bytes)?;
                    made.memory.save(&paths.memory())?;
                    if let Some(ws) = &made.working_set {
                        snapshot::write_atomic(&paths.working_set(), ws)?;
                    }
                    snapshot::sync_dir(&dir)
                })();
                written?;
                Self::label(&dir, spec, version)?;
                return Ok(Template { paths, state: made.state, memory: made.memory });
            }
            None => {
                let opened = FunctionSpec { kernel: kernel.path(), initramfs: initramfs.path(), ..spec.clone() };
                let taps = match net {
                    Some(n) => vec![std::sync::Arc::new(n.dup_tap().map_err(io(Path::new("(the TAP device)")))?)],
                    None => Vec::new(),
                };
                let channels = crate::vmm::Channels { taps, ..Default::default() };
                let opts = MakeOptions { timeout: spec.boot_timeout(), channels, ..Default::default() };
                Template::make(&opened.vm_config_with_drives(drives), &dir, opts)
                    .map_err(|e| RegistryError::Boot(e.to_string()))?;
            }
        }
        Self::label(&dir, spec, version)?;
        Ok(Template::open(&dir).and_then(Template::sealed)?)
    }

    /// The function's saved template, its memory held sealed (clones never map the file itself),
    /// and its version; refused when it was made for another registration than `spec`.
    pub fn open_template(&self, name: &str, spec: &FunctionSpec) -> Result<(Template, String), RegistryError> {
        let dir = self.template_dir(name);
        let made_for = std::fs::read(dir.join(MADE_FOR))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .ok_or(RegistryError::Stale("it does not say what it was made for"))?;
        if made_for != serde_json::to_value(spec)? {
            return Err(RegistryError::Stale("it was made for another registration"));
        }
        let version_file = dir.join(VERSION_FILE);
        let version = std::fs::read_to_string(&version_file).map_err(io(&version_file))?;
        let t = Template::open(&dir).and_then(Template::sealed)?;
        Ok((t, version.trim().to_string()))
    }

    /// Registers `name` with `spec` and an existing template (its files hard-linked, or copied
    /// across file systems), as if the daemon had made it: for benchmarks and tests that start a
    /// daemon without booting.
    pub fn install(&self, name: &str, spec: &FunctionSpec, template: &Path) -> Result<(), RegistryError> {
        let dir = self.template_dir(name);
        private_dir(&dir).map_err(io(&dir))?;
        for f in [STATE_FILE, MEMORY_FILE] {
            let (from, to) = (template.join(f), dir.join(f));
            std::fs::hard_link(&from, &to).or_else(|_| std::fs::copy(&from, &to).map(|_| ())).map_err(io(&from))?;
        }
        Self::label(&dir, spec, "installed")?;
        self.save(name, spec)
    }
}
