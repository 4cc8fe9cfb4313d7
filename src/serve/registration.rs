//! Registrations and their versions: register (the template made in the background, a bounded
//! number of boots at once), a new version made beside the serving one and switched to, delete;
//! shared layers and ember's runtime layers.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::backend::TemplateJob;
use super::error::{Error, ErrorKind};
use super::function::Function;
use super::images::ImageError;
use super::layers::LayerInfo;
use super::model::{check_name, FunctionInfo, FunctionSpec, FunctionState};
use super::supervisor::{Supervisor, NETWORK_WAIT};
use crate::config::DriveConfig;
use crate::isolation::network::NetworkError;
use crate::sys::Locked;

/// Templates booting at once (each is a guest boot: minutes of emulated guest kernel on some
/// hosts); more registrations wait their turn in `creating`.
pub(super) const MAX_TEMPLATE_BOOTS: usize = 2;

/// A template boot that has run this long stops holding one of those slots.
pub(super) const SLOW_BOOT: Duration = Duration::from_secs(60);

/// The functions whose registration (or new version) names layer `name`.
pub(super) fn users_of<'a>(functions: impl IntoIterator<Item = &'a Arc<Function>>, name: &str) -> Vec<String> {
    let mut users: Vec<String> =
        functions.into_iter().filter(|f| f.spec.layers.iter().any(|l| l == name)).map(|f| f.name.clone()).collect();
    users.dedup();
    users
}

/// A template made for a function: the template, whether it is a new one (in `template.next`
/// for a new version), and the digest of its code layer.
pub(super) type Made = (Option<Arc<crate::template::Template>>, bool, Option<String>);

/// The layer ember's `python3` runtime needs (built by scripts/build-python-layer.sh).
pub const PYTHON_LAYER: &str = "python3";

/// A function's version: a digest of its registration but the pool policy (the runtime, the
/// handler, the settings, the image paths) and of the images of its layers and code (their file
/// names in the store are their digests).
pub(super) fn version_of(spec: &FunctionSpec, drives: &[DriveConfig]) -> String {
    use sha2::{Digest, Sha256};
    let mut guest = serde_json::to_value(spec).unwrap_or_default();
    if let Some(o) = guest.as_object_mut() {
        o.remove("pool");
        o.remove("limits");
        // The guest sees whether it has a network card, not what its namespace lets through.
        if o.remove("network").is_some() {
            o.insert("network".into(), true.into());
        }
    }
    let mut h = Sha256::new();
    h.update(guest.to_string().as_bytes());
    for d in drives {
        h.update(b"\n");
        h.update(d.drive_id.as_bytes());
        h.update(b"=");
        h.update(d.path_on_host.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default());
    }
    h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// What an image that cannot be used is to the API's caller.
pub(super) fn image_refusal(e: ImageError) -> Error {
    match e {
        ImageError::NotAllowed(m) => Error::forbidden(m),
        ImageError::NotFound(m) => Error::not_found(m),
    }
}

/// What a network that cannot be set up is to the API's caller: the policy's fault, or the
/// daemon's.
pub(super) fn network_refusal(e: NetworkError) -> Error {
    if e.is_refusal() {
        Error::bad_request(e.to_string())
    } else {
        Error::internal(format!("network: {e}"))
    }
}

impl Supervisor {
    /// Registers a function: saves its spec, then boots its template in the background. A name
    /// registered already gets a new version (see the module's docs).
    pub fn register(self: &Arc<Self>, name: &str, mut spec: FunctionSpec) -> Result<FunctionInfo, Error> {
        check_name(name)?;
        // ember's Python runtime runs on its layer, at the bottom, unless the registration places it.
        if spec.known_runtime() == Some("python3") && !spec.layers.iter().any(|l| l == PYTHON_LAYER) {
            if self.layers.resolve(PYTHON_LAYER).is_err() {
                self.provide_runtime_layer(PYTHON_LAYER).map_err(|e| {
                    Error::bad_request(format!(
                        "runtime python3 needs the layer {PYTHON_LAYER:?}, and none could be made ({e}): build \
                         its tree with scripts/build-python-layer.sh (it writes images/layers/{PYTHON_LAYER}; \
                         start the daemon with --images images) or PUT /layers/{PYTHON_LAYER}"
                    ))
                })?;
            }
            spec.layers.insert(0, PYTHON_LAYER.to_string());
        }
        spec.validate()?;
        for (what, path) in [("kernel", &spec.kernel), ("initramfs", &spec.initramfs)] {
            self.images.open_image(what, path).map_err(image_refusal)?;
        }
        if let Some(code) = &spec.code {
            self.images.open_source("code", code).map_err(image_refusal)?;
        }
        if self.functions.locked().contains_key(name) {
            self.attach_network(name, &spec).map_err(network_refusal)?;
            return self.update(name, spec);
        }
        // The network first: a policy the host cannot carry refuses the registration, with
        // nothing half made.
        self.attach_network(name, &spec).map_err(network_refusal)?;
        let f = match self.insert(name, spec) {
            Ok(f) => f,
            Err(e) => {
                // (A conflict: a registration of this name won a race, and the network is its.)
                if e.kind() != ErrorKind::Conflict {
                    self.network.detach(name);
                }
                return Err(e);
            }
        };
        if let Err(e) = self.registry.save(name, &f.spec) {
            self.functions.locked().remove(name);
            self.network.detach(name);
            return Err(Error::internal(format!("cannot save the registration: {e}")));
        }
        self.spawn_template(f.clone(), false);
        Ok(f.info())
    }

    /// Sets up `spec`'s network policy for `name` (nothing for a function without one).
    pub(super) fn attach_network(&self, name: &str, spec: &FunctionSpec) -> Result<(), NetworkError> {
        let Some(policy) = &spec.network else { return Ok(()) };
        let spare = spec.pool.min_ready as usize + 2;
        self.network.attach(name, policy, spare)
    }

    /// Starts making a new version of a registered function; the current one keeps serving.
    pub(super) fn update(self: &Arc<Self>, name: &str, spec: FunctionSpec) -> Result<FunctionInfo, Error> {
        let current = self.function(name)?;
        if *current.state.locked() == FunctionState::Creating {
            return Err(Error::conflict(format!(
                "function {name:?} is still being created; wait until it is ready (or DELETE it)"
            )));
        }
        let new = {
            // Under the functions' lock, as for a registration: its layers cannot go meanwhile.
            let functions = self.functions.locked();
            let mut updates = self.updates.locked();
            if updates.get(name).is_some_and(|u| *u.state.locked() == FunctionState::Creating) {
                return Err(Error::conflict(format!("a new version of {name:?} is being made already")));
            }
            if !functions.contains_key(name) {
                return Err(Error::not_found(format!("no function {name:?}")));
            }
            for l in &spec.layers {
                self.layers.resolve(l)?;
            }
            let new = Arc::new(Function::new(name, spec));
            updates.insert(name.to_string(), new.clone());
            new
        };
        tracing::info!(function = %name, "making a new version");
        self.spawn_template(new, true);
        self.get(name)
    }

    /// Boots the function's guest to "ready" and snapshots it, on a thread of its own; for a new
    /// version (`update`) then switches to it.
    pub(super) fn spawn_template(self: &Arc<Self>, f: Arc<Function>, update: bool) {
        let sup = self.clone();
        let started = std::thread::Builder::new().name(format!("template-{}", f.name)).spawn(move || {
            // Wait for a boot slot; the function stays `creating` meanwhile. A boot that has taken
            // longer than SLOW_BOOT (a guest that never says ready, say) no longer holds its
            // slot: other tenants' boots go ahead.
            let t = {
                let mut boots = sup.template_boots.locked();
                loop {
                    let now = Instant::now();
                    if boots.iter().filter(|b| now.duration_since(**b) < SLOW_BOOT).count() < MAX_TEMPLATE_BOOTS {
                        break;
                    }
                    let (b, _) = sup
                        .template_boot_done
                        .wait_timeout(boots, Duration::from_secs(1))
                        .unwrap_or_else(|p| p.into_inner());
                    boots = b;
                }
                let t = Instant::now();
                boots.push(t);
                t
            };
            let result = sup.drives(&f).and_then(|d| {
                let version = version_of(&f.spec, &d);
                *f.version.locked() = Some(version.clone());
                let code = d
                    .iter()
                    .find(|d| d.drive_id == super::model::CODE_DRIVE)
                    .and_then(|d| d.path_on_host.file_stem())
                    .map(|s| format!("sha256:{}", s.to_string_lossy()));
                // A new registration that changes nothing the guest sees (the pool policy, say)
                // keeps the template it has.
                let current = if update { sup.functions.locked().get(&f.name).cloned() } else { None };
                // (A ready function has its template, where its backend uses one.)
                let same = |c: &Arc<Function>| {
                    c.version.locked().as_deref() == Some(version.as_str()) && *c.state.locked() == FunctionState::Ready
                };
                if let Some(cur) = current.filter(same) {
                    return Ok((cur.template(), false, code));
                }
                // A networked guest boots with its card on a prepared namespace's TAP, as its
                // clones will.
                let net = match &f.spec.network {
                    Some(_) => Some(sup.network.take(&f.name, NETWORK_WAIT).map_err(|e| e.to_string())?),
                    None => None,
                };
                let job = TemplateJob {
                    name: &f.name,
                    spec: &f.spec,
                    version: &version,
                    drives: d,
                    next: update,
                    registry: &sup.registry,
                    images: &sup.images,
                    net: net.as_ref(),
                };
                Ok((sup.backend.make_template(job).map_err(|e| e.to_string())?, update, code))
            });
            {
                let mut boots = sup.template_boots.locked();
                if let Some(i) = boots.iter().position(|b| *b == t) {
                    boots.swap_remove(i);
                }
            }
            sup.template_boot_done.notify_all();
            if update {
                sup.finish_update(f, result, t);
                return;
            }
            let result = result.map(|(t, _, _)| t);
            if f.deleted.load(Ordering::SeqCst) {
                // Deleted while it booted: what the boot wrote goes too, unless the name has been
                // registered again meanwhile (that boot replaces the template directory itself).
                if !sup.functions.locked().contains_key(&f.name) {
                    let _ = sup.registry.remove(&f.name);
                }
                return;
            }
            match result {
                Ok(template) => {
                    *f.template.locked() = template;
                    *f.state.locked() = FunctionState::Ready;
                    tracing::info!(function = %f.name, "template ready in {:.1} s", t.elapsed().as_secs_f64());
                }
                Err(e) => {
                    tracing::error!(function = %f.name, "cannot make the template: {e}");
                    *f.state.locked() = FunctionState::Failed(e);
                }
            }
        });
        if let Err(e) = started {
            tracing::error!("cannot start a template thread: {e}");
        }
    }

    /// The drives of `f`'s template: its shared layers, bottom to top, then its code, built now.
    pub(super) fn drives(&self, f: &Function) -> Result<Vec<DriveConfig>, String> {
        let ids = f.spec.drive_ids();
        let mut paths = Vec::with_capacity(ids.len());
        for l in &f.spec.layers {
            paths.push(self.layers.resolve(l).map_err(|e| e.to_string())?.path);
        }
        if let Some(code) = &f.spec.code {
            let source = self.images.open_source("code", code).map_err(|e| e.to_string())?;
            let prefix = Path::new(f.spec.code_prefix());
            paths.push(self.layers.build_code(&f.name, &source.path(), prefix)?.path);
        }
        Ok(ids.into_iter().zip(paths).map(|(id, path)| DriveConfig::read_only(id, path)).collect())
    }

    /// Switches `name` to its new version `new` once its template is made (`made`: the template,
    /// and whether it is a new one in `template.next`): the new pool is restored first, then the
    /// registration, the template and the map entry change in one step under the functions'
    /// lock, and the old version's idle clones go (busy ones when they come back).
    pub(super) fn finish_update(&self, new: Arc<Function>, made: Result<Made, String>, t: Instant) {
        let name = new.name.clone();
        let (template, fresh, code) = match made {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(function = %name, "the new version failed: {e}; the current one keeps serving");
                *new.state.locked() = FunctionState::Failed(e);
                self.registry.discard_next(&name);
                return;
            }
        };
        *new.template.locked() = template;
        // Clones of the new version before it takes over: the switch costs no cold start.
        let old = self.functions.locked().get(&name).cloned();
        let want = old.as_ref().map_or(0, |o| o.pool.locked().ready.len()).max(new.spec.pool.min_ready as usize).min(8);
        let mut prepared = Vec::new();
        for _ in 0..want {
            match self.restore_clone(&new) {
                Ok(c) => prepared.push(c),
                Err(e) => tracing::warn!(function = %name, "cannot prepare a clone of the new version: {e}"),
            }
        }
        let mut functions = self.functions.locked();
        let still_wanted = !new.deleted.load(Ordering::SeqCst)
            && self.updates.locked().get(&name).is_some_and(|u| Arc::ptr_eq(u, &new))
            && functions.contains_key(&name);
        if !still_wanted {
            drop(functions);
            self.registry.discard_next(&name);
            self.discard(prepared);
            return;
        }
        // A template kept from the current version is relabelled with the new registration (a
        // restart then finds them matching).
        let version = new.version.locked().clone().unwrap_or_default();
        let switched =
            (if fresh { self.registry.promote(&name) } else { self.registry.relabel(&name, &new.spec, &version) })
                .and_then(|()| self.registry.save(&name, &new.spec));
        if let Err(e) = switched {
            drop(functions);
            tracing::error!(function = %name, "cannot switch to the new version: {e}");
            *new.state.locked() = FunctionState::Failed(format!("cannot switch to it: {e}"));
            self.discard(prepared);
            return;
        }
        new.pool.locked().warming.extend(prepared);
        *new.state.locked() = FunctionState::Ready;
        let old = functions.insert(name.clone(), new.clone());
        self.updates.locked().remove(&name);
        drop(functions);
        if let Some(old) = old {
            old.deleted.store(true, Ordering::SeqCst);
            let idle = old.pool.locked().take_idle();
            self.discard(idle);
        }
        // The new version's code layer is now the function's only one.
        self.layers.keep_code(&name, code.as_deref());
        tracing::info!(
            function = %name,
            version = new.version.locked().as_deref().unwrap_or(""),
            "switched to the new version in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }

    /// Builds a layer from `source` (beneath an image directory) and names it.
    /// Builds ember's runtime layer `name` (the python3 one) from the tree setup wrote,
    /// `layers/NAME` in an image directory, unless a layer of that name exists.
    pub fn provide_runtime_layer(&self, name: &str) -> Result<(), Error> {
        if self.layers.resolve(name).is_ok() {
            return Ok(());
        }
        let (info, _) = self.put_layer(name, &Path::new("layers").join(name))?;
        tracing::info!(layer = %name, digest = %info.digest, "ember's runtime layer provided from its image directory");
        Ok(())
    }

    /// Provides ember's runtime layers that the image directories have trees for (see
    /// [`Supervisor::provide_runtime_layer`]), on a thread of its own: `GET /layers` lists them
    /// once built, and a registration that needs one first builds it itself.
    pub fn provide_runtime_layers(self: &Arc<Self>) {
        let sup = self.clone();
        let spawned = std::thread::Builder::new().name("runtime-layers".into()).spawn(move || {
            let tree = Path::new("layers").join(PYTHON_LAYER);
            if sup.images.open_source("layer", &tree).is_ok() {
                if let Err(e) = sup.provide_runtime_layer(PYTHON_LAYER) {
                    tracing::warn!(layer = PYTHON_LAYER, "cannot provide ember's runtime layer: {e}");
                }
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("cannot start the runtime layers' thread: {e}");
        }
    }

    pub fn put_layer(&self, name: &str, source: &Path) -> Result<(LayerInfo, bool), Error> {
        check_name(name)?;
        let opened = self.images.open_source("layer source", source).map_err(image_refusal)?;
        let (mut info, created) = self.layers.put(name, &opened.path(), source)?;
        info.users = self.layer_users(name);
        Ok((info, created))
    }

    /// Builds a layer from an uploaded archive (a tar, possibly gzip-compressed, or an OCI or
    /// `docker save` tarball) and names it.
    pub fn put_layer_upload(&self, name: &str, archive: &[u8]) -> Result<(LayerInfo, bool), Error> {
        check_name(name)?;
        let (mut info, created) = self.layers.put_upload(name, archive)?;
        info.users = self.layer_users(name);
        Ok((info, created))
    }

    pub(super) fn layer_users(&self, name: &str) -> Vec<String> {
        let functions = self.functions.locked();
        let updates = self.updates.locked();
        users_of(functions.values().chain(updates.values()), name)
    }

    pub fn get_layer(&self, name: &str) -> Result<LayerInfo, Error> {
        self.layers.get(name, self.layer_users(name))
    }

    pub fn list_layers(&self) -> Vec<LayerInfo> {
        self.layers.names().iter().filter_map(|n| self.get_layer(n).ok()).collect()
    }

    /// Deletes a layer no function uses.
    pub fn delete_layer(&self, name: &str) -> Result<(), Error> {
        // Under the functions' lock: no registration can start using it meanwhile.
        let functions = self.functions.locked();
        let users = users_of(functions.values().chain(self.updates.locked().values()), name);
        if !users.is_empty() {
            self.layers.resolve(name)?;
            return Err(Error::conflict(format!("layer {name:?} is used by {}", users.join(", "))));
        }
        self.layers.delete(name)
    }

    /// Unregisters a function: its ready clones go now, handed-out ones when released; its files go.
    pub fn delete(&self, name: &str) -> Result<(), Error> {
        let f = self.function(name)?;
        // The files first: if they cannot go, the function stays registered as it was.
        self.registry.remove(name).map_err(|e| Error::internal(e.to_string()))?;
        self.functions.locked().remove(name);
        if let Some(u) = self.updates.locked().remove(name) {
            u.deleted.store(true, Ordering::SeqCst);
        }
        // Its code layer goes with it, unless something else uses that image too.
        self.layers.collect();
        f.deleted.store(true, Ordering::SeqCst);
        let drained = f.pool.locked().take_idle();
        self.discard(drained);
        if f.spec.network.is_some() {
            self.network.detach(name);
        }
        // Its worker exits when its last clone is gone.
        f.worker.release();
        Ok(())
    }
}
