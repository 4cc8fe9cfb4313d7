//! Shared layers by name (`PUT /layers/{name}`) and functions' code layers, over the image store
//! (`image::Store`: EROFS images named by their digest, one host file per digest however many
//! functions use it). Under the state directory:
//!
//! ```text
//! layers/<name>.json            a named layer: {"digest", "source"}; immutable once made
//! functions/<name>/code.digest  the digests of a function's code layers, one per line (the
//!                               serving version's, and a new version's while it is made)
//! images/                       the store
//! ```
//!
//! A layer's image leaves the store only when nothing names it any more: no named layer and no
//! function's code. Building, recording and collecting are serialized by one lock, so a layer
//! just built is recorded before any collection can see it unreferenced.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::model::{check_name, Error};
use crate::image::{Built, ImageError, Layer, Limits, Store};
use crate::snapshot;
use crate::sys::{private_dir, Locked};

const CODE_DIGEST: &str = "code.digest";

/// A named layer as saved.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    digest: String,
    /// What it was built from, as the client named it.
    source: PathBuf,
}

/// What `GET /layers/{name}` answers.
#[derive(Debug, Serialize)]
pub struct LayerInfo {
    pub name: String,
    pub digest: String,
    pub size: u64,
    pub source: PathBuf,
    /// The functions whose registration names it.
    pub users: Vec<String>,
}

pub struct Layers {
    names: PathBuf,
    functions: PathBuf,
    store: Store,
    builder: Builder,
    lock: Mutex<()>,
}

/// A build the builder thread carries out.
struct Job {
    source: PathBuf,
    /// Where in the image the source's tree goes (empty: at its root).
    prefix: PathBuf,
    reply: std::sync::mpsc::Sender<Result<Built, ImageError>>,
}

/// The thread that builds layers (unpacking archives, running `mkfs.erofs`). `ember serve` starts
/// it before it confines itself, and confines it with its own filter
/// ([`crate::seccomp::builder_filter`]): it is the one thread of the daemon that may start a
/// process; every other (the API, the vCPUs, the devices) may not.
pub struct Builder {
    jobs: Mutex<std::sync::mpsc::Sender<Job>>,
}

impl Builder {
    /// Starts the builder over the store in `store_dir`, confined with `filter`.
    pub fn spawn(store_dir: &Path, filter: Option<seccompiler::BpfProgram>) -> std::io::Result<Self> {
        let store = Store::open(store_dir)?;
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new().name("layer-builder".into()).spawn(move || {
            if let Some(f) = filter {
                if let Err(e) = crate::seccomp::apply(&f) {
                    tracing::error!("layer builder: cannot apply the seccomp filter: {e}");
                    return;
                }
            }
            let limits = Limits::default();
            for job in rx {
                let _ = job.reply.send(store.build_at(&job.source, &job.prefix, &limits));
            }
        })?;
        Ok(Self { jobs: Mutex::new(tx) })
    }

    fn build(&self, source: &Path) -> Result<Built, ImageError> {
        self.build_at(source, Path::new(""))
    }

    fn build_at(&self, source: &Path, prefix: &Path) -> Result<Built, ImageError> {
        let (reply, answer) = std::sync::mpsc::channel();
        let gone = || ImageError::Io {
            context: "the layer builder".into(),
            source: std::io::Error::other("its thread has stopped"),
        };
        let job = Job { source: source.to_path_buf(), prefix: prefix.to_path_buf(), reply };
        self.jobs.locked().send(job).map_err(|_| gone())?;
        answer.recv().map_err(|_| gone())?
    }
}

fn build_refusal(e: ImageError) -> Error {
    match e {
        ImageError::Io { .. } | ImageError::Mkfs(_) | ImageError::MkfsMissing(_) => Error::internal(e.to_string()),
        _ => Error::bad_request(e.to_string()),
    }
}

impl Layers {
    /// Where the store of `state_dir` is (for [`Builder::spawn`]).
    pub fn store_dir(state_dir: &Path) -> PathBuf {
        state_dir.join("images")
    }

    /// Opens (or creates) the named layers and the store under `state_dir`, building with
    /// `builder`.
    pub fn open(state_dir: &Path, builder: Builder) -> std::io::Result<Self> {
        let names = state_dir.join("layers");
        private_dir(&names)?;
        // Uploads a stopped daemon left behind.
        for e in std::fs::read_dir(&names)?.flatten() {
            if e.file_name().to_string_lossy().starts_with(".upload-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let store = Store::open(&Self::store_dir(state_dir))?;
        Ok(Self { names, functions: state_dir.join("functions"), store, builder, lock: Mutex::new(()) })
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.names.join(format!("{name}.json"))
    }

    fn record(&self, name: &str) -> Result<Record, Error> {
        check_name(name)?;
        let path = self.record_path(name);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::not_found(format!("no layer {name:?}")))
            }
            Err(e) => return Err(Error::internal(format!("{}: {e}", path.display()))),
        };
        serde_json::from_str(&text).map_err(|e| Error::internal(format!("{}: {e}", path.display())))
    }

    /// The layer image a name stands for.
    pub fn resolve(&self, name: &str) -> Result<Layer, Error> {
        let r = self.record(name)?;
        self.store
            .get(&r.digest)
            .ok_or_else(|| Error::internal(format!("layer {name:?}: its image {} is missing from the store", r.digest)))
    }

    fn info(&self, name: &str, users: Vec<String>) -> Result<LayerInfo, Error> {
        let r = self.record(name)?;
        let layer = self.resolve(name)?;
        Ok(LayerInfo { name: name.to_string(), digest: r.digest, size: layer.size, source: r.source, users })
    }

    /// Builds `source` (an opened path) into the layer `name`; `shown` is the path as the client
    /// gave it. A name already bound to the same content is answered as it is (false: nothing
    /// made); bound to other content, refused: layers are immutable.
    pub fn put(&self, name: &str, source: &Path, shown: &Path) -> Result<(LayerInfo, bool), Error> {
        check_name(name)?;
        let _g = self.lock.locked();
        let built = self.builder.build(source).map_err(build_refusal)?;
        let digest = built.layer.digest.clone();
        if let Ok(existing) = self.record(name) {
            if existing.digest == digest {
                return Ok((self.info(name, Vec::new())?, false));
            }
            // What was just built may be referenced by nothing.
            self.collect_locked();
            return Err(Error::conflict(format!(
                "layer {name:?} exists with other content ({}); layers are immutable: DELETE it first or use a new name",
                existing.digest
            )));
        }
        let record = Record { digest, source: shown.to_path_buf() };
        let bytes = serde_json::to_vec_pretty(&record).map_err(|e| Error::internal(e.to_string()))?;
        snapshot::write_atomic(&self.record_path(name), &bytes)
            .and_then(|()| snapshot::sync_dir(&self.names))
            .map_err(|e| Error::internal(format!("cannot save layer {name:?}: {e}")))?;
        tracing::info!(layer = %name, digest = %record.digest, cached = built.cached, "layer ready");
        Ok((self.info(name, Vec::new())?, true))
    }

    /// Builds the uploaded `archive` into the layer `name` (as [`Layers::put`]).
    pub fn put_upload(&self, name: &str, archive: &[u8]) -> Result<(LayerInfo, bool), Error> {
        check_name(name)?;
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // A dot name: never a layer's record, and the next start's cleaning takes what a crash left.
        let path = self.names.join(format!(".upload-{}-{n}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = crate::sys::private_file().write(true).create_new(true).open(&path)?;
            std::io::Write::write_all(&mut f, archive)
        };
        let r = write()
            .map_err(|e| Error::internal(format!("cannot keep the upload: {e}")))
            .and_then(|()| self.put(name, &path, Path::new("(uploaded archive)")));
        let _ = std::fs::remove_file(&path);
        r
    }

    pub fn get(&self, name: &str, users: Vec<String>) -> Result<LayerInfo, Error> {
        self.info(name, users)
    }

    /// Every named layer, in name order.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.names)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".json").map(str::to_string))
            .filter(|n| check_name(n).is_ok())
            .collect();
        names.sort();
        names
    }

    /// Removes the named layer (the caller has checked that no function uses it); its image goes
    /// when nothing else references it.
    pub fn delete(&self, name: &str) -> Result<(), Error> {
        self.record(name)?;
        let _g = self.lock.locked();
        std::fs::remove_file(self.record_path(name))
            .map_err(|e| Error::internal(format!("cannot remove layer {name:?}: {e}")))?;
        let _ = snapshot::sync_dir(&self.names);
        self.collect_locked();
        Ok(())
    }

    /// Builds function `function`'s code from `source` (an opened path), its tree under `prefix`
    /// in the image, and records it as one of that function's (with the code layers it has now:
    /// the serving version keeps its own until [`Layers::keep_code`]).
    pub fn build_code(&self, function: &str, source: &Path, prefix: &Path) -> Result<Layer, String> {
        let _g = self.lock.locked();
        let built = self.builder.build_at(source, prefix).map_err(|e| format!("code: {e}"))?;
        let mut digests = self.code_digests(function);
        if !digests.contains(&built.layer.digest) {
            digests.push(built.layer.digest.clone());
        }
        self.record_code(function, &digests)?;
        Ok(built.layer)
    }

    /// Keeps only `digest` (or nothing) as function `function`'s code, once its version switched;
    /// images nothing references any more go.
    pub fn keep_code(&self, function: &str, digest: Option<&str>) {
        let _g = self.lock.locked();
        let keep: Vec<String> = digest.into_iter().map(str::to_string).collect();
        if let Err(e) = self.record_code(function, &keep) {
            tracing::warn!(function, "{e}");
        }
        self.collect_locked();
    }

    fn code_digests(&self, function: &str) -> Vec<String> {
        let text = std::fs::read_to_string(self.functions.join(function).join(CODE_DIGEST)).unwrap_or_default();
        text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect()
    }

    fn record_code(&self, function: &str, digests: &[String]) -> Result<(), String> {
        let dir = self.functions.join(function);
        private_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let text: String = digests.iter().map(|d| format!("{d}\n")).collect();
        snapshot::write_atomic(&dir.join(CODE_DIGEST), text.as_bytes())
            .map_err(|e| format!("cannot record the code layer: {e}"))
    }

    /// Removes every image of the store that neither a named layer nor a function's code
    /// references (after a function's files went).
    pub fn collect(&self) {
        let _g = self.lock.locked();
        self.collect_locked();
    }

    fn collect_locked(&self) {
        let mut used = BTreeSet::new();
        for name in self.names() {
            if let Ok(r) = self.record(&name) {
                used.insert(r.digest);
            }
        }
        for e in std::fs::read_dir(&self.functions).into_iter().flatten().flatten() {
            if let Ok(d) = std::fs::read_to_string(e.path().join(CODE_DIGEST)) {
                used.extend(d.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string));
            }
        }
        let Ok(all) = self.store.list() else { return };
        for layer in all {
            if !used.contains(&layer.digest) {
                match self.store.remove(&layer.digest) {
                    Ok(()) => tracing::info!(digest = %layer.digest, "unreferenced layer image removed"),
                    Err(e) => tracing::warn!(digest = %layer.digest, "cannot remove an unreferenced layer image: {e}"),
                }
            }
        }
    }
}
