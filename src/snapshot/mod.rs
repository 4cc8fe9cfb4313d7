//! Snapshots on disk, as bytes: nothing here knows what a VM is.
//!
//! A snapshot is a directory with a `state` file ([`format`](mod@format): header, serde-encoded state,
//! checksum), a `memory` file ([`memory_file`]: guest RAM, sparse, mapped copy-on-write by every
//! clone and never written to) and, optionally, a `working-set` ([`working_set`]). What the state
//! holds is the VM's business (`vmm::persist`); making and opening whole templates is
//! `template`'s.

pub mod format;
pub mod memory_file;
pub mod working_set;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use thiserror::Error;

pub use format::{FORMAT_VERSION, MAGIC};
pub use memory_file::MemoryFile;

pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";
/// A state file is a few tens of KiB; anything far larger is not one of ours.
pub const MAX_STATE_LEN: u64 = 64 << 20;

#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error("{}: {}", .0.display(), .1)]
    Io(PathBuf, std::io::Error),
    #[error("{}: not an ember snapshot (bad magic)", .0.display())]
    BadMagic(PathBuf),
    #[error("{}: snapshot format version {} is not supported (this ember reads version {FORMAT_VERSION})", .0.display(), .1)]
    Version(PathBuf, u32),
    #[error("{}: the file is truncated", .0.display())]
    Truncated(PathBuf),
    #[error("{}: checksum mismatch (the file is corrupt)", .0.display())]
    Checksum(PathBuf),
    #[error("{}: cannot decode the state: {}", .0.display(), .1)]
    Decode(PathBuf, String),
    #[error("cannot encode the state: {0}")]
    Encode(String),
    #[error("{}: is {actual} bytes, the snapshot's guest has {expected} bytes of RAM", .path.display())]
    MemorySize { path: PathBuf, expected: u64, actual: u64 },
    #[error("cannot map {}: {}", .0.display(), .1)]
    Map(PathBuf, String),
    #[error("the snapshot is inconsistent: {0}")]
    Inconsistent(String),
}

pub(crate) fn io_err(path: &Path) -> impl Fn(std::io::Error) -> SnapshotError + '_ {
    move |e| SnapshotError::Io(path.to_path_buf(), e)
}

/// A snapshot directory's two files.
#[derive(Clone, Debug)]
pub struct SnapshotPaths {
    pub dir: PathBuf,
}

impl SnapshotPaths {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }
    pub fn memory(&self) -> PathBuf {
        self.dir.join(MEMORY_FILE)
    }
    pub fn working_set(&self) -> PathBuf {
        self.dir.join(working_set::WORKING_SET_FILE)
    }
}

/// Reads a whole small file (a state file, a working set), refusing anything that is not a regular
/// file or is larger than `limit` before reading it: a huge file or a link to a device never
/// exhausts memory.
pub fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, SnapshotError> {
    let f = std::fs::File::open(path).map_err(io_err(path))?;
    let meta = f.metadata().map_err(io_err(path))?;
    if !meta.is_file() {
        return Err(SnapshotError::Decode(path.to_path_buf(), "not a regular file".into()));
    }
    if meta.len() > limit {
        return Err(SnapshotError::Decode(path.to_path_buf(), format!("{} bytes is too large", meta.len())));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    f.take(limit + 1).read_to_end(&mut bytes).map_err(io_err(path))?;
    if bytes.len() as u64 > limit {
        return Err(SnapshotError::Decode(path.to_path_buf(), "the file grew past its limit".into()));
    }
    Ok(bytes)
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, synced, renamed into place,
/// and the directory synced, so that a crash leaves either the old file or the new one. The
/// temporary file is always a new one: whatever had its name (a file a crash left, a symlink
/// someone planted) is removed first, never written through.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let written = (|| {
        let mut f = new_temp_file(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(SnapshotError::Io(tmp, e));
    }
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    sync_dir(dir)
}

/// A new file (0600) at `tmp`, a temporary name: whatever had that name (a file a crash left, a
/// symlink someone planted) is removed first, never opened or written through.
pub(crate) fn new_temp_file(tmp: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    crate::sys::private_file().write(true).create_new(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(tmp)
}

/// Makes a directory's entries (renames, new files) durable.
pub fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_atomic_write_never_writes_through_what_has_its_names() {
        let d = tempfile::tempdir().unwrap();
        let outside = d.path().join("outside");
        std::fs::write(&outside, b"not yours").unwrap();
        let dir = d.path().join("dir");
        std::fs::create_dir(&dir).unwrap();
        // Symlinks planted under the temporary name and under the name itself.
        std::os::unix::fs::symlink(&outside, dir.join(".version.tmp")).unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("version")).unwrap();
        write_atomic(&dir.join("version"), b"v2").unwrap();
        assert_eq!(std::fs::read(&outside).unwrap(), b"not yours");
        assert_eq!(std::fs::read(dir.join("version")).unwrap(), b"v2");
        assert!(!std::fs::symlink_metadata(dir.join("version")).unwrap().file_type().is_symlink());
        assert!(!dir.join(".version.tmp").exists());
        // A file a crash left under the temporary name is replaced, not reused.
        std::fs::write(dir.join(".spec.tmp"), b"left over, longer than the new content").unwrap();
        write_atomic(&dir.join("spec"), b"new").unwrap();
        assert_eq!(std::fs::read(dir.join("spec")).unwrap(), b"new");
    }
}
