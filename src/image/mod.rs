//! Layer images: user input turned into content-addressed, read-only EROFS images.
//!
//! [`Store::build`] takes one of
//!
//! - a directory on the host: its tree (regular files, directories, symlinks) is copied; symlinks
//!   are never followed while walking, and sockets, fifos and device nodes are refused;
//! - a tar archive, plain or gzip-compressed (told by the magic bytes `1f 8b`), or a zip archive
//!   (`PK`; stored or deflated entries: files, directories and symlinks with their Unix modes,
//!   0644/0755 when the archive has none);
//! - an OCI image layout directory (it has `oci-layout` and `index.json`): `index.json` -> the first
//!   manifest (through an image index: its first linux/amd64 manifest, or else its first) -> the
//!   manifest's layers in order, each blob checked against its sha256 digest;
//! - a `docker save` tarball (a tar with a top-level `manifest.json`): the first image's `Layers` in
//!   order. A tarball holding an OCI layout (`oci-layout` and `index.json`) is read as one.
//!
//! The layers of an OCI or docker image are applied in order onto one staging tree, honouring
//! whiteouts (`.wh.NAME` deletes what lower layers put at NAME, `.wh..wh..opq` empties its
//! directory of lower layers' content), so the result is one flattened layer image. `mkfs.erofs`
//! (erofs-utils) then builds the image from the staging tree, deterministically: fixed timestamps,
//! a fixed UUID, every file owned by root, no xattrs.
//!
//! Input is never trusted: entries with absolute paths or `..` components, device nodes and fifos,
//! hard links to anything but a file extracted earlier from the same archive, and relative symlinks
//! whose target climbs out of the root are refused; extraction never follows a symlink on the host
//! (every parent of an entry must be a real directory, and whatever sits at an entry's path is
//! replaced, never written through); sizes, counts and path lengths are capped by [`Limits`].
//! Permission bits are kept less setuid and setgid (`mode & 0o1777`); owners are dropped.
//!
//! The store (see [`Store`]) keeps `layers/<sha256-hex>.erofs`, named by the sha256 of the image's
//! bytes, and `inputs/<input-digest-hex>` records mapping an input to the layer built from it, so
//! the same input is built once.
//!
//! [`import_archive_bytes`] is the archive path on its own (no store, no `mkfs.erofs`) for fuzzing.

mod archive;
mod layout;
mod stage;
mod store;
mod tarball;
#[cfg(test)]
mod tests;
mod zipfile;

use std::path::{Path, PathBuf};

pub use store::{Built, Layer, Store};

/// Caps on what one build may read and write; exceeding any is [`ImageError::Limit`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of file content written into the staging tree, all layers together.
    pub max_total_bytes: u64,
    /// Archive entries (or directory entries of a host directory), all layers together.
    pub max_entries: u64,
    /// Bytes of one entry's path, or of one symlink's target.
    pub max_path_len: usize,
    /// Bytes of an input file, of a decompressed outer archive, or of one blob.
    pub max_archive_bytes: u64,
    /// Bytes of one JSON document (`index.json`, a manifest, `manifest.json`) or pax header.
    pub max_json_bytes: u64,
    /// Layers of one image.
    pub max_layers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_total_bytes: 4 << 30,
            max_entries: 1_000_000,
            max_path_len: 4096,
            max_archive_bytes: 8 << 30,
            max_json_bytes: 1 << 20,
            max_layers: 256,
        }
    }
}

/// Why a build, or a store operation, failed. Every message is one line.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A file system operation failed.
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    /// An entry of the input is unsafe or of a kind an image cannot hold.
    #[error("refused entry {entry}: {reason}")]
    Refused { entry: String, reason: String },
    /// The input exceeds one of the [`Limits`].
    #[error("input exceeds the limit on {what} ({limit})")]
    Limit { what: &'static str, limit: u64 },
    /// A tar stream, a JSON document or an image layout is not what it should be.
    #[error("malformed {what}: {reason}")]
    Malformed { what: String, reason: String },
    /// A blob's bytes do not hash to the digest that names it.
    #[error("blob {digest} does not match its digest (its bytes hash to sha256:{actual})")]
    DigestMismatch { digest: String, actual: String },
    /// Something well-formed that ember does not handle (zstd layers, sha512 digests, ...).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A layer digest given to the store is not `sha256:<64 lowercase hex>` or `<64 lowercase hex>`.
    #[error("not a layer digest: \"{0}\" (expected sha256:<64 lowercase hex digits>)")]
    BadDigest(String),
    /// The store has no layer with this digest.
    #[error("no layer {0} in the store")]
    NotFound(String),
    /// The input changed while it was being built.
    #[error("{0} changed while it was being built")]
    SourceChanged(PathBuf),
    /// `mkfs.erofs` could not be run.
    #[error("{0} was not found: install erofs-utils (it provides mkfs.erofs)")]
    MkfsMissing(PathBuf),
    /// `mkfs.erofs` failed.
    #[error("mkfs.erofs failed: {0}")]
    Mkfs(String),
    /// An error while applying one layer of an image.
    #[error("layer {index} ({digest}): {source}")]
    InLayer { index: usize, digest: String, source: Box<ImageError> },
}

impl ImageError {
    pub(crate) fn io(context: impl std::fmt::Display, source: std::io::Error) -> Self {
        ImageError::Io { context: context.to_string(), source }
    }

    pub(crate) fn malformed(what: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        ImageError::Malformed { what: what.into(), reason: reason.to_string() }
    }

    pub(crate) fn refused(entry: impl Into<String>, reason: impl Into<String>) -> Self {
        ImageError::Refused { entry: entry.into(), reason: reason.into() }
    }
}

/// Applies an archive held in memory to the directory `staging` (created if missing; it must not
/// be a symlink), as [`Store::build`] applies an archive file: a tar, plain or gzip-compressed; a
/// `docker save` tarball or a tarball holding an OCI layout is flattened layer by layer, honouring
/// whiteouts. Nothing is written outside `staging`, and no symlink is followed. A gzip archive is
/// decompressed in memory (up to `limits.max_archive_bytes`). On error, `staging` may hold part of
/// the input. This is the path a fuzz target drives; it does not run `mkfs.erofs`.
pub fn import_archive_bytes(bytes: &[u8], staging: &Path, limits: &Limits) -> Result<(), ImageError> {
    match std::fs::symlink_metadata(staging) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(ImageError::malformed("staging directory", format!("{} is not a directory", staging.display())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir(staging).map_err(|e| ImageError::io(staging.display(), e))?
        }
        Err(e) => return Err(ImageError::io(staging.display(), e)),
    }
    let mut stager = stage::Stager::new(staging, limits)?;
    archive::import(&tarball::Backing::Slice(bytes), tarball::Scratch::Memory, &mut stager, limits)?;
    stager.finish()
}

/// The 64 hex digits of `digest` (`sha256:<hex>` or `<hex>`), checked before any path is made of it.
pub(crate) fn digest_hex(digest: &str) -> Result<&str, ImageError> {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    if is_hex64(hex) {
        Ok(hex)
    } else {
        Err(ImageError::BadDigest(shown(digest.as_bytes())))
    }
}

pub(crate) fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `raw` (a path from the input) for an error message: lossy UTF-8, escaped, at most 200 chars.
pub(crate) fn shown(raw: &[u8]) -> String {
    let s = String::from_utf8_lossy(raw);
    let mut out: String = s.chars().take(200).flat_map(char::escape_debug).collect();
    if s.chars().count() > 200 {
        out.push_str("...");
    }
    out
}
