//! OCI image layouts and `docker save` tarballs: from the index to the layers, each blob checked.

use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tar::Archive;

use super::stage::{self, Stager};
use super::tarball::{self, apply_tar, check_stream_headers, Members, Scratch};
use super::{hex, is_hex64, ImageError, Limits};

/// An open file of a layout and its length.
pub(crate) type Opened<'a> = (Box<dyn Read + 'a>, u64);

/// Where an image layout's files come from: a host directory or the members of a tarball.
pub(crate) trait Layout {
    /// The file at `rel` (a safe relative path) and its length; `None` when there is none.
    fn open(&self, rel: &Path) -> Result<Option<Opened<'_>>, ImageError>;
}

/// An OCI layout directory on the host (the user's own; its blobs are checked by digest), held
/// open: each of its files is opened beneath it, never through a symlink.
pub(crate) struct HostLayout {
    dir: std::os::fd::OwnedFd,
    shown: PathBuf,
}

impl HostLayout {
    pub(crate) fn open(path: &Path) -> Result<Self, ImageError> {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| ImageError::io(path.display(), e))?;
        Ok(Self { dir: dir.into(), shown: path.to_path_buf() })
    }
}

impl Layout for HostLayout {
    fn open(&self, rel: &Path) -> Result<Option<Opened<'_>>, ImageError> {
        let shown = self.shown.join(rel);
        let f = match crate::sys::open_beneath(&self.dir, rel, libc::O_RDONLY | libc::O_NONBLOCK) {
            Ok(f) => std::fs::File::from(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) || e.raw_os_error() == Some(libc::EXDEV) => {
                return Err(ImageError::malformed(
                    "image layout",
                    format!("{} is a symlink or leads out of the layout: not followed", shown.display()),
                ))
            }
            Err(e) => return Err(ImageError::io(shown.display(), e)),
        };
        let m = f.metadata().map_err(|e| ImageError::io(shown.display(), e))?;
        if !m.is_file() {
            return Ok(None);
        }
        Ok(Some((Box::new(f), m.len())))
    }
}

#[derive(Deserialize)]
struct OciLayoutFile {
    #[serde(rename = "imageLayoutVersion")]
    _version: String,
}

#[derive(Deserialize, Clone)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    digest: String,
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize, Clone)]
struct Platform {
    #[serde(default)]
    architecture: Option<String>,
    #[serde(default)]
    os: Option<String>,
}

/// An image index or an image manifest: which one is told by its fields.
#[derive(Deserialize)]
struct IndexOrManifest {
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

#[derive(Deserialize)]
struct DockerImage {
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

fn missing(what: &str) -> ImageError {
    ImageError::malformed("image layout", format!("{what} is missing"))
}

/// Reads the small JSON document at `rel` (at most `max_json_bytes`).
fn read_json(layout: &dyn Layout, rel: &str, limits: &Limits) -> Result<Vec<u8>, ImageError> {
    let (r, len) = layout.open(Path::new(rel))?.ok_or_else(|| missing(rel))?;
    if len > limits.max_json_bytes {
        return Err(ImageError::Limit { what: "JSON document size", limit: limits.max_json_bytes });
    }
    let mut v = Vec::new();
    r.take(limits.max_json_bytes + 1).read_to_end(&mut v).map_err(|e| ImageError::io(rel, e))?;
    if v.len() as u64 > limits.max_json_bytes {
        return Err(ImageError::Limit { what: "JSON document size", limit: limits.max_json_bytes });
    }
    Ok(v)
}

fn parse<'a, T: Deserialize<'a>>(bytes: &'a [u8], what: &str) -> Result<T, ImageError> {
    serde_json::from_slice(bytes).map_err(|e| ImageError::malformed(what, e))
}

/// The layout path of the blob `digest` names (`sha256:<64 lowercase hex>` only).
fn blob_path(digest: &str) -> Result<(PathBuf, &str), ImageError> {
    let Some((alg, hexpart)) = digest.split_once(':') else {
        return Err(ImageError::malformed(
            "descriptor",
            format!("digest \"{}\" has no algorithm", super::shown(digest.as_bytes())),
        ));
    };
    if alg != "sha256" {
        return Err(ImageError::Unsupported(format!("digest algorithm \"{}\"", super::shown(alg.as_bytes()))));
    }
    if !is_hex64(hexpart) {
        return Err(ImageError::malformed(
            "descriptor",
            format!("digest \"{}\" is not 64 lowercase hex digits", super::shown(digest.as_bytes())),
        ));
    }
    Ok((Path::new("blobs/sha256").join(hexpart), hexpart))
}

/// Reads a small blob (a manifest or an index) and checks its size and digest.
fn read_blob_json(layout: &dyn Layout, d: &Descriptor, limits: &Limits) -> Result<Vec<u8>, ImageError> {
    let (path, want) = blob_path(&d.digest)?;
    if d.size > limits.max_json_bytes {
        return Err(ImageError::Limit { what: "JSON document size", limit: limits.max_json_bytes });
    }
    let bytes = read_json(layout, path.to_str().unwrap_or_default(), limits)?;
    if bytes.len() as u64 != d.size {
        return Err(ImageError::malformed(
            format!("blob {}", d.digest),
            format!("it is {} bytes, its descriptor says {}", bytes.len(), d.size),
        ));
    }
    let actual = hex(&Sha256::digest(&bytes));
    if actual != want {
        return Err(ImageError::DigestMismatch { digest: d.digest.clone(), actual });
    }
    Ok(bytes)
}

/// A reader that hashes what passes through it, and keeps a copy of it.
struct Hashing<'c, R> {
    inner: R,
    hasher: Sha256,
    n: u64,
    copy: &'c mut BlobCopy,
}

impl<R: Read> Read for Hashing<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.copy.write_all(&buf[..n])?;
        self.n += n as u64;
        Ok(n)
    }
}

/// What the first pass over a layer blob read, for the second pass to apply: exactly the bytes
/// that were hashed and checked, whatever happens to the blob's file meanwhile. In memory, or an
/// unnamed file (O_TMPFILE) in the scratch directory.
enum BlobCopy {
    Memory(Vec<u8>),
    File(std::fs::File),
}

impl BlobCopy {
    fn new(scratch: &Scratch<'_>) -> Result<Self, ImageError> {
        use std::os::unix::fs::OpenOptionsExt;
        match scratch {
            Scratch::Memory => Ok(Self::Memory(Vec::new())),
            Scratch::Dir(d) => std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .mode(0o600)
                .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
                .open(d)
                .map(Self::File)
                .map_err(|e| ImageError::io(d.display(), e)),
        }
    }

    fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        match self {
            Self::Memory(v) => {
                v.extend_from_slice(b);
                Ok(())
            }
            Self::File(f) => io::Write::write_all(f, b),
        }
    }

    /// The copy, from its start.
    fn reader(self) -> io::Result<Box<dyn Read>> {
        match self {
            Self::Memory(v) => Ok(Box::new(io::Cursor::new(v))),
            Self::File(mut f) => {
                io::Seek::rewind(&mut f)?;
                Ok(Box::new(f))
            }
        }
    }
}

/// A layer blob to apply: where it is, and what its descriptor says about it, if anything.
struct LayerRef<'a> {
    path: PathBuf,
    digest: Option<&'a str>,
    size: Option<u64>,
    media_type: Option<&'a str>,
}

/// Checks a layer blob (its digest, when known, and its tar headers), then applies it: the blob
/// is read once, and what is applied is the copy of what was checked (see [`BlobCopy`]).
fn apply_layer(
    layout: &dyn Layout,
    l: &LayerRef<'_>,
    stager: &mut Stager<'_>,
    limits: &Limits,
    scratch: &Scratch<'_>,
) -> Result<(), ImageError> {
    let name = l.path.display().to_string();
    if l.media_type.is_some_and(|m| m.contains("zstd")) {
        return Err(ImageError::Unsupported(format!("zstd-compressed layer ({})", l.media_type.unwrap_or_default())));
    }
    let (r, len) = layout.open(&l.path)?.ok_or_else(|| missing(&format!("blob {name}")))?;
    if len > limits.max_archive_bytes {
        return Err(ImageError::Limit { what: "blob size", limit: limits.max_archive_bytes });
    }
    if let Some(size) = l.size.filter(|s| *s != len) {
        return Err(ImageError::malformed(
            format!("blob {name}"),
            format!("it is {len} bytes, its descriptor says {size}"),
        ));
    }
    let mut copy = BlobCopy::new(scratch)?;
    // First pass: the digest over every byte, and the tar headers within the limits.
    let mut r = BufReader::new(Hashing { inner: r.take(len), hasher: Sha256::new(), n: 0, copy: &mut copy });
    let head = tarball::peek(&mut r).map_err(|e| ImageError::io(&name, e))?;
    if tarball::is_zstd(&head) {
        return Err(ImageError::Unsupported(format!("zstd-compressed layer {name}")));
    }
    let gzip = tarball::is_gzip(&head);
    let checked = if gzip {
        check_stream_headers(Archive::new(flate2::bufread::GzDecoder::new(&mut r)), limits)
    } else {
        check_stream_headers(Archive::new(&mut r), limits)
    };
    // A blob that is not what its digest names is reported as such, whatever its bytes hold.
    io::copy(&mut r, &mut io::sink()).map_err(|e| ImageError::io(&name, e))?;
    let h = r.into_inner();
    if h.n != len {
        return Err(ImageError::malformed(format!("blob {name}"), "it was cut short while being read"));
    }
    if let Some(want) = l.digest {
        let actual = hex(&h.hasher.finalize());
        let (_, want_hex) = blob_path(want)?;
        if actual != want_hex {
            return Err(ImageError::DigestMismatch { digest: want.to_string(), actual });
        }
    }
    checked?;
    // Second pass: the entries, from the copy of what was checked.
    let r = BufReader::new(copy.reader().map_err(|e| ImageError::io(&name, e))?);
    if gzip {
        apply_tar(flate2::bufread::GzDecoder::new(r), stager, true)
    } else {
        apply_tar(r, stager, true)
    }
}

fn in_layer(index: usize, digest: &str) -> impl FnOnce(ImageError) -> ImageError + '_ {
    move |e| ImageError::InLayer { index, digest: digest.to_string(), source: Box::new(e) }
}

/// Applies the image an OCI layout holds (`oci-layout`, `index.json`, `blobs/sha256/...`).
pub(crate) fn apply_oci(
    layout: &dyn Layout,
    stager: &mut Stager<'_>,
    limits: &Limits,
    scratch: &Scratch<'_>,
) -> Result<(), ImageError> {
    let _: OciLayoutFile = parse(&read_json(layout, "oci-layout", limits)?, "oci-layout")?;
    let index: IndexOrManifest = parse(&read_json(layout, "index.json", limits)?, "index.json")?;
    let mut manifests =
        index.manifests.ok_or_else(|| ImageError::malformed("index.json", "missing field `manifests`"))?;
    let mut first = true;
    // An index may point at an index; a few levels are plenty.
    for _ in 0..8 {
        let d = if first {
            manifests.first()
        } else {
            let linux_amd64 = |d: &&Descriptor| {
                d.platform.as_ref().is_some_and(|p| {
                    p.os.as_deref() == Some("linux") && matches!(p.architecture.as_deref(), Some("amd64"))
                })
            };
            manifests.iter().find(linux_amd64).or(manifests.first())
        }
        .cloned()
        .ok_or_else(|| ImageError::malformed("image index", "it lists no manifests"))?;
        first = false;
        let what = format!("manifest {}", d.digest);
        let m: IndexOrManifest = parse(&read_blob_json(layout, &d, limits)?, &what)?;
        if let Some(next) = m.manifests {
            manifests = next;
            continue;
        }
        let layers = m.layers.ok_or_else(|| ImageError::malformed(what, "missing field `layers`"))?;
        if layers.len() > limits.max_layers {
            return Err(ImageError::Limit { what: "layers", limit: limits.max_layers as u64 });
        }
        for (i, l) in layers.iter().enumerate() {
            let (path, _) = blob_path(&l.digest).map_err(in_layer(i, &l.digest))?;
            let r = LayerRef { path, digest: Some(&l.digest), size: Some(l.size), media_type: l.media_type.as_deref() };
            apply_layer(layout, &r, stager, limits, scratch).map_err(in_layer(i, &l.digest))?;
        }
        return Ok(());
    }
    Err(ImageError::malformed("image index", "image indexes nest too deeply"))
}

/// Applies the first image of a `docker save` tarball (`manifest.json` and its `Layers`).
pub(crate) fn apply_docker(
    layout: &dyn Layout,
    stager: &mut Stager<'_>,
    limits: &Limits,
    scratch: &Scratch<'_>,
) -> Result<(), ImageError> {
    let images: Vec<DockerImage> = parse(&read_json(layout, "manifest.json", limits)?, "manifest.json")?;
    let image = images.first().ok_or_else(|| ImageError::malformed("manifest.json", "it lists no images"))?;
    if image.layers.len() > limits.max_layers {
        return Err(ImageError::Limit { what: "layers", limit: limits.max_layers as u64 });
    }
    for (i, name) in image.layers.iter().enumerate() {
        let path = stage::rel_path(name.as_bytes(), limits)
            .map_err(|e| ImageError::malformed("manifest.json", format!("layer path: {e}")))?;
        // Newer docker writes layers as OCI blobs: their names are their digests.
        let digest = match path.strip_prefix("blobs/sha256").ok().and_then(|p| p.to_str()) {
            Some(h) if is_hex64(h) => Some(format!("sha256:{h}")),
            _ => None,
        };
        let r = LayerRef { path, digest: digest.as_deref(), size: None, media_type: None };
        let shown = super::shown(name.as_bytes());
        apply_layer(layout, &r, stager, limits, scratch).map_err(in_layer(i, &shown))?;
    }
    Ok(())
}

impl Layout for Members<'_> {
    fn open(&self, rel: &Path) -> Result<Option<Opened<'_>>, ImageError> {
        Ok(self.resolve(rel).map(|(offset, len)| (Box::new(self.backing.range(offset, len)) as Box<dyn Read>, len)))
    }
}
