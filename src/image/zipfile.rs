//! Zip archives (what Python functions are usually shipped as): read without trusting them, each
//! entry applied by the [`Stager`] as a tar entry is (the same checks on names, sizes and links).

use std::io::Read;

use super::stage::Stager;
use super::tarball::Backing;
use super::{ImageError, Limits};

/// A zip file's first bytes: a local file header, or the end record of an empty archive.
pub(crate) fn is_zip(head: &[u8]) -> bool {
    head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06")
}

/// The longest symlink target a zip entry may hold.
const MAX_LINK: u64 = 4096;
const S_IFMT: u32 = 0o170_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;

fn malformed(e: impl std::fmt::Display) -> ImageError {
    ImageError::malformed("zip archive", e.to_string())
}

/// Applies every entry of the zip archive in `backing`.
pub(crate) fn apply_zip(backing: &Backing<'_>, stager: &mut Stager<'_>, limits: &Limits) -> Result<(), ImageError> {
    let mut zip = zip::ZipArchive::new(backing.all()).map_err(malformed)?;
    if zip.len() as u64 > limits.max_entries {
        return Err(ImageError::Limit { what: "archive entries", limit: limits.max_entries });
    }
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(malformed)?;
        stager.count_entry()?;
        let rel = stager.rel_path(entry.name_raw())?;
        // Archives made without Unix modes (on Windows, say) get the usual ones.
        let mode = entry.unix_mode().unwrap_or(0);
        let kind = match mode & S_IFMT {
            0 if entry.is_dir() => S_IFDIR,
            0 => S_IFREG,
            k => k,
        };
        let perm = mode & 0o7777;
        match kind {
            S_IFDIR => stager.put_dir(&rel, if perm == 0 { 0o755 } else { perm })?,
            S_IFREG => stager.put_file(&rel, if perm == 0 { 0o644 } else { perm }, &mut entry)?,
            S_IFLNK => {
                let mut target = Vec::new();
                (&mut entry).take(MAX_LINK + 1).read_to_end(&mut target).map_err(malformed)?;
                if target.len() as u64 > MAX_LINK {
                    return Err(ImageError::refused(
                        rel.display().to_string(),
                        "a symlink target longer than 4096 bytes",
                    ));
                }
                stager.put_symlink(&rel, &target)?;
            }
            other => {
                return Err(ImageError::refused(
                    rel.display().to_string(),
                    format!("a zip entry of file type {other:#o}"),
                ));
            }
        }
    }
    Ok(())
}
