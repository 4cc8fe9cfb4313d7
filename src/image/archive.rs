//! An archive of any kind ember takes (a plain or gzip tar, a zip, a `docker save` or OCI-layout
//! tarball), told apart by its first bytes and its members, applied into a stager.

use std::io::Read;

use super::layout;
use super::stage::Stager;
use super::tarball::{apply_tar, check_headers, gunzip, is_gzip, is_zstd, Backing, Kind, Members, Scratch};
use super::{ImageError, Limits};
use tar::Archive;

/// Applies an archive (plain or gzip tar; a `docker save` or OCI-layout tarball is flattened)
/// into `stager`. Does not call [`Stager::finish`].
pub(crate) fn import(
    backing: &Backing<'_>,
    scratch: Scratch<'_>,
    stager: &mut Stager<'_>,
    limits: &Limits,
) -> Result<(), ImageError> {
    if backing.len() > limits.max_archive_bytes {
        return Err(ImageError::Limit { what: "archive size", limit: limits.max_archive_bytes });
    }
    let mut head = [0u8; 4];
    let n = backing.all().read(&mut head).map_err(|e| ImageError::io("reading the input", e))?;
    let head = &head[..n];
    if super::zipfile::is_zip(head) {
        return super::zipfile::apply_zip(backing, stager, limits);
    }
    if is_zstd(head) {
        return Err(ImageError::Unsupported("zstd-compressed archives (decompress it, or use gzip)".into()));
    }
    let plain;
    let tar = if is_gzip(head) {
        plain = gunzip(backing, &scratch, limits)?;
        &plain
    } else {
        backing
    };
    check_headers(Archive::new(tar.all()), limits)?;
    let kind = Members::index(tar, limits, false)?.kind();
    match kind {
        Kind::Plain => apply_tar(tar.all(), stager, false),
        Kind::Oci => layout::apply_oci(&Members::index(tar, limits, true)?, stager, limits, &scratch),
        Kind::Docker => layout::apply_docker(&Members::index(tar, limits, true)?, stager, limits, &scratch),
    }
}
