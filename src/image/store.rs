//! The layer store: content-addressed EROFS images and the record of which input built which.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use sha2::{Digest, Sha256};

use super::archive;
use super::layout::{self, HostLayout};
use super::stage::{remove_tree, Stager, MODE_MASK};
use super::tarball::{Backing, Scratch};
use super::{digest_hex, hex, is_hex64, ImageError, Limits};

/// Starts every input digest: names the input's kind and the version of ember's rules for
/// turning input into a tree, so a change of rules never reuses an old record.
const INPUT_TAG: &[u8] = b"ember-image-input/1 ";

/// The fixed UUID every image gets (with fixed timestamps: the same tree gives the same bytes).
const UUID: &str = "00000000-0000-0000-0000-000000000000";

/// A layer image in the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layer {
    /// `sha256:<hex>`: the sha256 of the image file's bytes.
    pub digest: String,
    /// `<store>/layers/<hex>.erofs`, read-only (0444).
    pub path: PathBuf,
    /// The image's size in bytes.
    pub size: u64,
}

/// What [`Store::build`] made.
#[derive(Clone, Debug)]
pub struct Built {
    pub layer: Layer,
    /// The input was built before: its layer came from the store's record, nothing was extracted.
    pub cached: bool,
    /// Wall-clock seconds the call took (hashing the input included).
    pub seconds: f64,
}

/// A directory of layer images:
///
/// ```text
/// <dir>/layers/<sha256-hex>.erofs   a layer image (0444), named by the sha256 of its bytes
/// <dir>/inputs/<sha256-hex>         "sha256:<layer hex>": the layer built from the input with this digest
/// <dir>/tmp/                        one directory per build in progress (cleaned by open)
/// <dir>/lock                        builds hold it shared; open cleans tmp/ only when none does
/// ```
///
/// Directories are 0700, files 0600 except the images. An input's digest is the sha256 of a tag
/// naming its kind and ember's format version, followed by, for a file, its bytes; for a
/// directory, a canonical walk of it (relative paths in sorted order, each with its type,
/// permission bits, symlink target and file content, lengths prefixed).
pub struct Store {
    dir: PathBuf,
    mkfs: PathBuf,
}

enum Source {
    Dir,
    OciDir,
    File(fs::Metadata),
}

impl Store {
    /// Opens (creating it, 0700) the store at `dir` (made absolute, so layer paths are) and removes
    /// what builds that are no longer running left in `tmp/`.
    pub fn open(dir: &Path) -> io::Result<Store> {
        let dir = &std::path::absolute(dir)?;
        crate::sys::private_dir(dir)?;
        for sub in ["layers", "inputs", "tmp"] {
            crate::sys::private_dir(&dir.join(sub))?;
        }
        let store = Store { dir: dir.to_path_buf(), mkfs: PathBuf::from("mkfs.erofs") };
        let lock = store.lock_file()?;
        if flock(&lock, libc::LOCK_EX | libc::LOCK_NB).is_ok() {
            let tmp = dir.join("tmp");
            for e in fs::read_dir(&tmp)? {
                remove_tree(&e?.path())?;
            }
            flock(&lock, libc::LOCK_UN)?;
        }
        Ok(store)
    }

    /// Uses `mkfs` (a path, or a name looked up in `PATH`) instead of `mkfs.erofs`.
    pub fn with_mkfs(mut self, mkfs: impl Into<PathBuf>) -> Self {
        self.mkfs = mkfs.into();
        self
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock_file(&self) -> io::Result<File> {
        crate::sys::private_file().read(true).write(true).create(true).truncate(false).open(self.dir.join("lock"))
    }

    fn layer_path(&self, hex: &str) -> PathBuf {
        self.dir.join("layers").join(format!("{hex}.erofs"))
    }

    /// Builds the layer for `source` (a directory, a tar or gzip tar, an OCI layout directory, a
    /// `docker save` tarball; see the module docs), or returns the one built before from the same
    /// input (`cached`).
    pub fn build(&self, source: &Path, limits: &Limits) -> Result<Built, ImageError> {
        self.build_at(source, Path::new(""), limits)
    }

    /// [`Store::build`], with the source's tree placed under `prefix` (a relative path such as
    /// `var/task`; its directories are 0755) instead of at the image's root.
    pub fn build_at(&self, source: &Path, prefix: &Path, limits: &Limits) -> Result<Built, ImageError> {
        let start = Instant::now();
        let kind = classify(source)?;
        let plain = prefix.as_os_str().is_empty();
        if !plain && !prefix.components().all(|c| matches!(c, std::path::Component::Normal(_))) {
            return Err(ImageError::malformed(
                "layer prefix",
                format!("{} is not a plain relative path", prefix.display()),
            ));
        }
        let source_input = input_digest(source, &kind, limits)?;
        let mut input = source_input.clone();
        if !plain {
            let mut h = Sha256::new();
            h.update(source_input.as_bytes());
            h.update(b"\nprefix ");
            h.update(prefix.as_os_str().as_encoded_bytes());
            input = hex(&h.finalize());
        }
        let lock = self.lock_file().map_err(|e| ImageError::io(self.dir.join("lock").display(), e))?;
        flock(&lock, libc::LOCK_SH).map_err(|e| ImageError::io(self.dir.join("lock").display(), e))?;
        if let Some(layer) = self.recorded(&input) {
            return Ok(Built { layer, cached: true, seconds: start.elapsed().as_secs_f64() });
        }
        let work = WorkDir::new(&self.dir.join("tmp"))?;
        let top = work.0.join("root");
        let staging = top.join(prefix);
        fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(&staging)
            .map_err(|e| ImageError::io(staging.display(), e))?;
        let mut stager = Stager::new(&staging, limits)?;
        match kind {
            Source::Dir => {
                let mut h = Sha256::new();
                h.update(INPUT_TAG);
                h.update(b"dir\n");
                walk(source, limits, limits.max_total_bytes, &mut h, |rel, v| match v {
                    Visit::Dir(mode) => stager.put_dir(rel, mode),
                    Visit::File(mode, r) => stager.put_file(rel, mode, r),
                    Visit::Symlink(target) => stager.put_symlink(rel, target),
                })?;
                if hex(&h.finalize()) != source_input {
                    return Err(ImageError::SourceChanged(source.to_path_buf()));
                }
            }
            Source::OciDir => {
                layout::apply_oci(&HostLayout::open(source)?, &mut stager, limits, &Scratch::Dir(&work.0))?
            }
            Source::File(before) => {
                let f = File::open(source).map_err(|e| ImageError::io(source.display(), e))?;
                let now = f.metadata().map_err(|e| ImageError::io(source.display(), e))?;
                let len = now.len();
                archive::import(&Backing::File(f, len), Scratch::Dir(&work.0), &mut stager, limits)?;
                let after = fs::metadata(source).map_err(|e| ImageError::io(source.display(), e))?;
                let same = |a: &fs::Metadata, b: &fs::Metadata| {
                    (a.dev(), a.ino(), a.len(), a.mtime(), a.mtime_nsec())
                        == (b.dev(), b.ino(), b.len(), b.mtime(), b.mtime_nsec())
                };
                if !same(&before, &now) || !same(&now, &after) {
                    return Err(ImageError::SourceChanged(source.to_path_buf()));
                }
            }
        }
        stager.finish()?;
        let mut dir = staging.clone();
        while dir != top {
            dir.pop();
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
                .map_err(|e| ImageError::io(dir.display(), e))?;
        }
        let image = work.0.join("image.erofs");
        self.mkfs(&top, &image)?;
        let layer = self.keep(&image)?;
        self.record(&input, &layer.digest, &work.0)?;
        Ok(Built { layer, cached: false, seconds: start.elapsed().as_secs_f64() })
    }

    /// Runs `mkfs.erofs` over `staging`, deterministically.
    fn mkfs(&self, staging: &Path, image: &Path) -> Result<(), ImageError> {
        let out = Command::new(&self.mkfs)
            .args(["--quiet", "-x-1", "-T0", &format!("-U{UUID}"), "--all-root"])
            .arg(image)
            .arg(staging)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => ImageError::MkfsMissing(self.mkfs.clone()),
                _ => ImageError::io(self.mkfs.display(), e),
            })?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let last = stderr.lines().map(str::trim).rfind(|l| !l.is_empty()).unwrap_or_default();
            let last: String = last.chars().take(300).collect();
            return Err(ImageError::Mkfs(if last.is_empty() {
                out.status.to_string()
            } else {
                format!("{last} ({})", out.status)
            }));
        }
        Ok(())
    }

    /// Hashes the finished `image`, makes it read-only and durable, and links it in as
    /// `layers/<hex>.erofs` (an image already there under that name is kept).
    fn keep(&self, image: &Path) -> Result<Layer, ImageError> {
        let io_err = |e| ImageError::io(image.display(), e);
        let mut f = File::open(image).map_err(io_err)?;
        let mut h = Sha256::new();
        let size = io::copy(&mut f, &mut HashWriter(&mut h)).map_err(io_err)?;
        let hex = hex(&h.finalize());
        f.set_permissions(fs::Permissions::from_mode(0o444)).map_err(io_err)?;
        f.sync_all().map_err(io_err)?;
        let path = self.layer_path(&hex);
        match fs::hard_link(image, &path) {
            Ok(()) => sync_dir(&self.dir.join("layers"))?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(ImageError::io(path.display(), e)),
        }
        Ok(Layer { digest: format!("sha256:{hex}"), path, size })
    }

    /// Records (atomically) that the input `input` built the layer `digest`.
    fn record(&self, input: &str, digest: &str, work: &Path) -> Result<(), ImageError> {
        let tmp = work.join("input-record");
        let io_err = |e| ImageError::io(tmp.display(), e);
        let mut f = crate::sys::private_file().write(true).create_new(true).open(&tmp).map_err(io_err)?;
        f.write_all(format!("{digest}\n").as_bytes()).map_err(io_err)?;
        f.sync_all().map_err(io_err)?;
        let dest = self.dir.join("inputs").join(input);
        fs::rename(&tmp, &dest).map_err(|e| ImageError::io(dest.display(), e))?;
        sync_dir(&self.dir.join("inputs"))
    }

    /// The layer recorded for the input digest `input`, if the record and the layer both exist.
    fn recorded(&self, input: &str) -> Option<Layer> {
        let digest = read_record(&self.dir.join("inputs").join(input))?;
        self.get(&digest)
    }

    /// The layer `digest` (`sha256:<hex>` or `<hex>`), if the store has it.
    pub fn get(&self, digest: &str) -> Option<Layer> {
        let hex = digest_hex(digest).ok()?;
        let path = self.layer_path(hex);
        let m = fs::symlink_metadata(&path).ok().filter(|m| m.is_file())?;
        Some(Layer { digest: format!("sha256:{hex}"), path, size: m.len() })
    }

    /// Every layer in the store, by digest.
    pub fn list(&self) -> io::Result<Vec<Layer>> {
        let mut layers = Vec::new();
        for e in fs::read_dir(self.dir.join("layers"))? {
            let name = e?.file_name();
            let Some(hex) = name.to_str().and_then(|n| n.strip_suffix(".erofs")).filter(|h| is_hex64(h)) else {
                continue;
            };
            layers.extend(self.get(hex));
        }
        layers.sort_by(|a, b| a.digest.cmp(&b.digest));
        Ok(layers)
    }

    /// Removes the layer `digest` (`sha256:<hex>` or `<hex>`) and every input record naming it.
    pub fn remove(&self, digest: &str) -> Result<(), ImageError> {
        let hex = digest_hex(digest)?;
        let layer = self.get(hex).ok_or_else(|| ImageError::NotFound(format!("sha256:{hex}")))?;
        let inputs = self.dir.join("inputs");
        for e in fs::read_dir(&inputs).map_err(|e| ImageError::io(inputs.display(), e))? {
            let path = e.map_err(|e| ImageError::io(inputs.display(), e))?.path();
            if read_record(&path).as_deref() == Some(layer.digest.as_str()) {
                fs::remove_file(&path).map_err(|e| ImageError::io(path.display(), e))?;
            }
        }
        fs::remove_file(&layer.path).map_err(|e| ImageError::io(layer.path.display(), e))?;
        sync_dir(&self.dir.join("layers"))
    }
}

/// The layer digest an input record holds, if it is a well-formed record.
fn read_record(path: &Path) -> Option<String> {
    if !path.file_name().and_then(|n| n.to_str()).is_some_and(is_hex64) {
        return None;
    }
    let f = fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path).ok()?;
    let mut s = String::new();
    f.take(128).read_to_string(&mut s).ok()?;
    let digest = s.trim();
    digest_hex(digest).ok().map(|h| format!("sha256:{h}"))
}

fn classify(source: &Path) -> Result<Source, ImageError> {
    let m = fs::metadata(source).map_err(|e| ImageError::io(source.display(), e))?;
    if m.is_dir() {
        let is_file = |n: &str| fs::metadata(source.join(n)).is_ok_and(|m| m.is_file());
        Ok(if is_file("oci-layout") && is_file("index.json") { Source::OciDir } else { Source::Dir })
    } else if m.is_file() {
        Ok(Source::File(m))
    } else {
        Err(ImageError::Unsupported(format!("{} is neither a directory nor a regular file", source.display())))
    }
}

/// The input digest of `source` (hex), see [`Store`].
fn input_digest(source: &Path, kind: &Source, limits: &Limits) -> Result<String, ImageError> {
    let mut h = Sha256::new();
    h.update(INPUT_TAG);
    match kind {
        Source::Dir => {
            h.update(b"dir\n");
            walk(source, limits, limits.max_total_bytes, &mut h, |_, _| Ok(()))?;
        }
        Source::OciDir => {
            h.update(b"oci\n");
            walk(source, limits, limits.max_archive_bytes, &mut h, |_, _| Ok(()))?;
        }
        Source::File(m) => {
            if m.len() > limits.max_archive_bytes {
                return Err(ImageError::Limit { what: "archive size", limit: limits.max_archive_bytes });
            }
            h.update(b"file\n");
            let f = File::open(source).map_err(|e| ImageError::io(source.display(), e))?;
            io::copy(&mut f.take(limits.max_archive_bytes), &mut HashWriter(&mut h))
                .map_err(|e| ImageError::io(source.display(), e))?;
        }
    }
    Ok(hex(&h.finalize()))
}

struct HashWriter<'h>(&'h mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One entry of a host directory, as [`walk`] hands it over.
enum Visit<'a> {
    Dir(u32),
    File(u32, &'a mut dyn Read),
    Symlink(&'a [u8]),
}

/// A reader that hashes what passes through it into a borrowed hasher.
struct HashInto<'h, R> {
    inner: R,
    hasher: &'h mut Sha256,
    n: u64,
}

impl<R: Read> Read for HashInto<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.n += n as u64;
        Ok(n)
    }
}

fn framed(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

/// Walks the tree under `root` in canonical order (depth first, each directory's children sorted
/// by name bytes), never following a symlink, feeding each entry to `h` and then to `visit`.
/// Sockets, fifos and device nodes are refused; `max_bytes` caps the file content.
fn walk(
    root: &Path,
    limits: &Limits,
    max_bytes: u64,
    h: &mut Sha256,
    mut visit: impl FnMut(&Path, Visit<'_>) -> Result<(), ImageError>,
) -> Result<(), ImageError> {
    let children = |rel: &Path| -> Result<Vec<PathBuf>, ImageError> {
        let dir = root.join(rel);
        let mut names = Vec::new();
        for e in fs::read_dir(&dir).map_err(|e| ImageError::io(dir.display(), e))? {
            names.push(e.map_err(|e| ImageError::io(dir.display(), e))?.file_name());
        }
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        Ok(names.into_iter().rev().map(|n| rel.join(n)).collect())
    };
    let mut stack = children(Path::new(""))?;
    let (mut entries, mut bytes) = (0u64, 0u64);
    while let Some(rel) = stack.pop() {
        entries += 1;
        if entries > limits.max_entries {
            return Err(ImageError::Limit { what: "entries", limit: limits.max_entries });
        }
        let name = rel.as_os_str().as_bytes();
        if name.len() > limits.max_path_len {
            return Err(ImageError::Limit { what: "path length", limit: limits.max_path_len as u64 });
        }
        let full = root.join(&rel);
        let m = fs::symlink_metadata(&full).map_err(|e| ImageError::io(full.display(), e))?;
        let mode = m.permissions().mode() & MODE_MASK;
        let t = m.file_type();
        if t.is_dir() {
            h.update(b"d");
            framed(h, name);
            h.update(mode.to_le_bytes());
            visit(&rel, Visit::Dir(mode))?;
            stack.extend(children(&rel)?);
        } else if t.is_file() {
            let size = m.len();
            bytes = bytes.saturating_add(size);
            if bytes > max_bytes {
                return Err(ImageError::Limit { what: "total extracted bytes", limit: max_bytes });
            }
            h.update(b"f");
            framed(h, name);
            h.update(mode.to_le_bytes());
            h.update(size.to_le_bytes());
            let f = fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(&full)
                .map_err(|e| ImageError::io(full.display(), e))?;
            if !f.metadata().is_ok_and(|m| m.is_file()) {
                return Err(ImageError::SourceChanged(full));
            }
            let mut r = HashInto { inner: f.take(size), hasher: h, n: 0 };
            visit(&rel, Visit::File(mode, &mut r))?;
            io::copy(&mut r, &mut io::sink()).map_err(|e| ImageError::io(full.display(), e))?;
            if r.n != size {
                return Err(ImageError::SourceChanged(full));
            }
        } else if t.is_symlink() {
            let target = fs::read_link(&full).map_err(|e| ImageError::io(full.display(), e))?;
            let target = target.as_os_str().as_bytes();
            h.update(b"l");
            framed(h, name);
            framed(h, target);
            visit(&rel, Visit::Symlink(target))?;
        } else {
            return Err(ImageError::refused(
                super::shown(name),
                "sockets, fifos and device nodes cannot be copied into an image",
            ));
        }
    }
    Ok(())
}

/// A build's own directory under `tmp/`, removed when dropped.
struct WorkDir(PathBuf);

impl WorkDir {
    fn new(tmp: &Path) -> Result<Self, ImageError> {
        loop {
            let mut r = [0u8; 8];
            crate::sys::getrandom(&mut r).map_err(|e| ImageError::io("getrandom", e))?;
            let path = tmp.join(format!("build-{}-{}", std::process::id(), hex(&r)));
            match fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(WorkDir(path)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(ImageError::io(path.display(), e)),
            }
        }
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Err(e) = remove_tree(&self.0) {
            tracing::warn!("cannot remove {}: {e}", self.0.display());
        }
    }
}

fn flock(f: &File, op: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: flock on an fd `f` keeps open; it touches no memory of ours.
        if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn sync_dir(dir: &Path) -> Result<(), ImageError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| ImageError::io(dir.display(), e))
}
