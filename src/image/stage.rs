//! The staging tree: entries applied one at a time, each checked, never through a symlink.
//!
//! Every entry's path is relative and made of normal components only. Before an entry is created,
//! each of its parents inside the staging root is checked with `symlink_metadata`: a missing one is
//! created as a directory, a symlink or a non-directory is refused. Whatever already sits at the
//! entry's own path is removed first (a directory is kept for a directory entry), so nothing is
//! ever written through a symlink or a hard link. Directories stay 0700 while entries go into them;
//! their modes are set by [`Stager::finish`].

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use super::{shown, ImageError, Limits};

/// The permission bits an image keeps: setuid and setgid are dropped, the sticky bit kept.
pub(crate) const MODE_MASK: u32 = 0o1777;

/// Mode of a directory an entry needs but the input does not list.
const IMPLICIT_DIR_MODE: u32 = 0o755;

pub(crate) struct Stager<'l> {
    root: PathBuf,
    limits: &'l Limits,
    bytes: u64,
    entries: u64,
    /// Final modes of directories, set by `finish` (children before parents).
    dir_modes: BTreeMap<PathBuf, u32>,
    /// Paths the current layer put, and their ancestors: whiteouts hide only lower layers' content.
    layer_paths: HashSet<PathBuf>,
    /// Regular files the current layer put: the only targets a hard link may name.
    layer_files: HashSet<PathBuf>,
    /// Not root: `mkfs.erofs` must still read every file and enter every directory, so the owner
    /// keeps read (and search) permission. All files are root's in the image, and root's access
    /// does not depend on these bits.
    owner_readable: bool,
}

impl<'l> Stager<'l> {
    /// A stager over `root`, an existing directory (not a symlink) that only this stager writes.
    pub(crate) fn new(root: &Path, limits: &'l Limits) -> Result<Self, ImageError> {
        let m = fs::symlink_metadata(root).map_err(|e| ImageError::io(root.display(), e))?;
        if !m.is_dir() {
            return Err(ImageError::malformed("staging directory", format!("{} is not a directory", root.display())));
        }
        let mut dir_modes = BTreeMap::new();
        dir_modes.insert(PathBuf::new(), IMPLICIT_DIR_MODE);
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        Ok(Stager {
            root: root.to_path_buf(),
            limits,
            bytes: 0,
            entries: 0,
            dir_modes,
            layer_paths: HashSet::new(),
            layer_files: HashSet::new(),
            owner_readable: euid != 0,
        })
    }

    /// Starts a layer: whiteouts and hard links from now on see only what this layer puts.
    pub(crate) fn begin_layer(&mut self) {
        self.layer_paths.clear();
        self.layer_files.clear();
    }

    /// Counts one input entry against `max_entries`.
    pub(crate) fn count_entry(&mut self) -> Result<(), ImageError> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(ImageError::Limit { what: "entries", limit: self.limits.max_entries });
        }
        Ok(())
    }

    /// The safe relative path of an entry named `raw` in the input (empty for the root): `./`
    /// prefixes and repeated slashes are fine; absolute paths, `..` and NUL bytes are refused.
    pub(crate) fn rel_path(&self, raw: &[u8]) -> Result<PathBuf, ImageError> {
        rel_path(raw, self.limits)
    }

    fn full(&self, rel: &Path) -> PathBuf {
        self.root.join(rel)
    }

    /// Checks that every parent of `rel` is a real directory inside the root. Missing ones are
    /// created when `create` (as implicit directories of this layer); without `create`, a missing
    /// one gives `Ok(false)`. A symlink or a non-directory is refused (`entry` names the entry).
    fn parents(&mut self, rel: &Path, create: bool, entry: &str) -> Result<bool, ImageError> {
        let mut prefix = PathBuf::new();
        let mut parts: Vec<_> = rel.components().collect();
        parts.pop();
        for c in parts {
            prefix.push(c);
            let full = self.full(&prefix);
            match fs::symlink_metadata(&full) {
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(ImageError::refused(
                        entry,
                        format!(
                            "its parent {} is a symlink (extraction never follows one)",
                            shown(prefix.as_os_str().as_bytes())
                        ),
                    ))
                }
                Ok(_) => {
                    return Err(ImageError::refused(
                        entry,
                        format!("its parent {} is not a directory", shown(prefix.as_os_str().as_bytes())),
                    ))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !create {
                        return Ok(false);
                    }
                    fs::DirBuilder::new().mode(0o700).create(&full).map_err(|e| ImageError::io(full.display(), e))?;
                    self.dir_modes.insert(prefix.clone(), IMPLICIT_DIR_MODE);
                }
                Err(e) => return Err(ImageError::io(full.display(), e)),
            }
        }
        Ok(true)
    }

    /// Removes whatever sits at `rel` (parents already checked), keeping a directory when
    /// `keep_dir`; returns whether a directory was kept.
    fn clear(&mut self, rel: &Path, keep_dir: bool) -> Result<bool, ImageError> {
        let full = self.full(rel);
        match fs::symlink_metadata(&full) {
            Ok(m) if m.is_dir() => {
                if keep_dir {
                    return Ok(true);
                }
                remove_tree(&full).map_err(|e| ImageError::io(full.display(), e))?;
                self.forget_dirs(rel);
            }
            Ok(_) => fs::remove_file(&full).map_err(|e| ImageError::io(full.display(), e))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(ImageError::io(full.display(), e)),
        }
        Ok(false)
    }

    /// Drops the recorded modes of `rel` and everything under it (removed from the tree).
    fn forget_dirs(&mut self, rel: &Path) {
        let gone: Vec<PathBuf> = self
            .dir_modes
            .range(rel.to_path_buf()..)
            .take_while(|(p, _)| p.starts_with(rel))
            .map(|(p, _)| p.clone())
            .collect();
        for p in gone {
            self.dir_modes.remove(&p);
        }
    }

    /// Records that this layer put `rel` (and so its ancestors).
    fn mark(&mut self, rel: &Path) {
        let mut p = Some(rel);
        while let Some(q) = p {
            if q.as_os_str().is_empty() || !self.layer_paths.insert(q.to_path_buf()) {
                break;
            }
            p = q.parent();
        }
    }

    fn named(rel: &Path) -> String {
        shown(rel.as_os_str().as_bytes())
    }

    /// A directory entry: created if missing (an existing directory is kept with its content).
    pub(crate) fn put_dir(&mut self, rel: &Path, mode: u32) -> Result<(), ImageError> {
        if !rel.as_os_str().is_empty() {
            let entry = Self::named(rel);
            self.parents(rel, true, &entry)?;
            if !self.clear(rel, true)? {
                let full = self.full(rel);
                fs::DirBuilder::new().mode(0o700).create(&full).map_err(|e| ImageError::io(full.display(), e))?;
            }
            self.mark(rel);
        }
        self.dir_modes.insert(rel.to_path_buf(), mode & MODE_MASK);
        Ok(())
    }

    /// A regular file with the bytes `content` gives (all of them, within the byte limit).
    pub(crate) fn put_file(&mut self, rel: &Path, mode: u32, content: &mut dyn Read) -> Result<(), ImageError> {
        let entry = Self::named(rel);
        if rel.as_os_str().is_empty() {
            return Err(ImageError::refused("/", "the root must be a directory"));
        }
        self.parents(rel, true, &entry)?;
        self.clear(rel, false)?;
        let full = self.full(rel);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&full)
            .map_err(|e| ImageError::io(full.display(), e))?;
        let budget = self.limits.max_total_bytes.saturating_sub(self.bytes);
        let n = io::copy(&mut content.take(budget.saturating_add(1)), &mut f).map_err(|e| ImageError::io(&entry, e))?;
        if n > budget {
            return Err(ImageError::Limit { what: "total extracted bytes", limit: self.limits.max_total_bytes });
        }
        self.bytes += n;
        let mut mode = mode & MODE_MASK;
        if self.owner_readable {
            mode |= 0o400;
        }
        f.set_permissions(fs::Permissions::from_mode(mode)).map_err(|e| ImageError::io(full.display(), e))?;
        self.mark(rel);
        self.layer_files.insert(rel.to_path_buf());
        Ok(())
    }

    /// A symlink to `target` (bytes as in the input). Absolute targets are fine (they resolve in
    /// the guest's root); a relative one that climbs out of the root is refused.
    pub(crate) fn put_symlink(&mut self, rel: &Path, target: &[u8]) -> Result<(), ImageError> {
        let entry = Self::named(rel);
        if rel.as_os_str().is_empty() {
            return Err(ImageError::refused("/", "the root must be a directory"));
        }
        if target.is_empty() {
            return Err(ImageError::refused(entry, "symlink with an empty target"));
        }
        if target.len() > self.limits.max_path_len {
            return Err(ImageError::Limit { what: "path length", limit: self.limits.max_path_len as u64 });
        }
        if target.contains(&0) {
            return Err(ImageError::refused(entry, "symlink target contains a NUL byte"));
        }
        if escapes(rel, target) {
            return Err(ImageError::refused(entry, format!("symlink target {} leaves the root", shown(target))));
        }
        self.parents(rel, true, &entry)?;
        self.clear(rel, false)?;
        let full = self.full(rel);
        std::os::unix::fs::symlink(OsStr::from_bytes(target), &full).map_err(|e| ImageError::io(full.display(), e))?;
        self.mark(rel);
        Ok(())
    }

    /// A hard link to `target`, a regular file this layer put earlier (checked again on disk).
    pub(crate) fn put_hardlink(&mut self, rel: &Path, target: &Path) -> Result<(), ImageError> {
        let entry = Self::named(rel);
        if rel.as_os_str().is_empty() {
            return Err(ImageError::refused("/", "the root must be a directory"));
        }
        let not_earlier = || {
            ImageError::refused(
                &entry,
                format!("hard link target {} is not a file extracted earlier from this archive", Self::named(target)),
            )
        };
        if !self.layer_files.contains(target) || !self.parents(target, false, &entry)? {
            return Err(not_earlier());
        }
        let target_full = self.full(target);
        match fs::symlink_metadata(&target_full) {
            Ok(m) if m.is_file() => {}
            _ => return Err(not_earlier()),
        }
        if rel == target {
            return Ok(());
        }
        self.parents(rel, true, &entry)?;
        self.clear(rel, false)?;
        let full = self.full(rel);
        // linkat without AT_SYMLINK_FOLLOW: the target (a regular file, checked) is not followed.
        fs::hard_link(&target_full, &full).map_err(|e| ImageError::io(full.display(), e))?;
        self.mark(rel);
        self.layer_files.insert(rel.to_path_buf());
        Ok(())
    }

    /// A whiteout `dir/.wh.NAME`: removes what lower layers put at `dir/NAME`.
    pub(crate) fn whiteout(&mut self, dir: &Path, name: &[u8]) -> Result<(), ImageError> {
        let rel = dir.join(OsStr::from_bytes(name));
        let entry = format!("{}/.wh.{}", Self::named(dir), shown(name));
        if name.is_empty() || name == b"." || name == b".." {
            return Err(ImageError::refused(entry, "whiteout of an invalid name"));
        }
        if self.layer_paths.contains(&rel) || !self.parents(&rel, false, &entry)? {
            return Ok(());
        }
        self.clear(&rel, false)?;
        Ok(())
    }

    /// An opaque marker `dir/.wh..wh..opq`: empties `dir` of lower layers' content.
    pub(crate) fn opaque(&mut self, dir: &Path) -> Result<(), ImageError> {
        let entry = format!("{}/.wh..wh..opq", Self::named(dir));
        let marker = dir.join(".wh..wh..opq");
        self.parents(&marker, true, &entry)?;
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            let full = self.full(&d);
            let mut names = Vec::new();
            for e in fs::read_dir(&full).map_err(|e| ImageError::io(full.display(), e))? {
                names.push(e.map_err(|e| ImageError::io(full.display(), e))?.file_name());
            }
            for n in names {
                let child = d.join(&n);
                if !self.layer_paths.contains(&child) {
                    self.clear(&child, false)?;
                } else if fs::symlink_metadata(self.full(&child)).is_ok_and(|m| m.is_dir()) {
                    stack.push(child);
                }
            }
        }
        self.mark(dir);
        Ok(())
    }

    /// Sets every directory's mode (children first), each checked to be a real directory again.
    pub(crate) fn finish(mut self) -> Result<(), ImageError> {
        let dirs = std::mem::take(&mut self.dir_modes);
        for (rel, mode) in dirs.into_iter().rev() {
            let entry = Self::named(&rel);
            if !rel.as_os_str().is_empty() && !self.parents(&rel, false, &entry)? {
                continue;
            }
            let full = self.full(&rel);
            if !fs::symlink_metadata(&full).is_ok_and(|m| m.is_dir()) {
                continue;
            }
            let mode = if self.owner_readable { mode | 0o500 } else { mode };
            fs::set_permissions(&full, fs::Permissions::from_mode(mode))
                .map_err(|e| ImageError::io(full.display(), e))?;
        }
        Ok(())
    }
}

/// See [`Stager::rel_path`].
pub(crate) fn rel_path(raw: &[u8], limits: &Limits) -> Result<PathBuf, ImageError> {
    if raw.len() > limits.max_path_len {
        return Err(ImageError::Limit { what: "path length", limit: limits.max_path_len as u64 });
    }
    if raw.contains(&0) {
        return Err(ImageError::refused(shown(raw), "the path contains a NUL byte"));
    }
    if raw.starts_with(b"/") {
        return Err(ImageError::refused(shown(raw), "absolute path"));
    }
    let mut rel = PathBuf::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(ImageError::refused(shown(raw), "the path has a `..` component")),
            c => rel.push(OsStr::from_bytes(c)),
        }
    }
    debug_assert!(rel.components().all(|c| matches!(c, Component::Normal(_))));
    Ok(rel)
}

/// Whether a symlink at `link` (relative to the root) pointing at the relative `target` climbs
/// out of the root, read lexically.
pub(crate) fn escapes(link: &Path, target: &[u8]) -> bool {
    if target.starts_with(b"/") {
        return false;
    }
    let mut depth = link.components().count().saturating_sub(1);
    for c in target.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                if depth == 0 {
                    return true;
                }
                depth -= 1;
            }
            _ => depth += 1,
        }
    }
    false
}

/// Removes `path` and everything under it without following symlinks, first giving the owner
/// full access to each directory (a tree may hold 0555 directories).
pub(crate) fn remove_tree(path: &Path) -> io::Result<()> {
    let m = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !m.is_dir() {
        return fs::remove_file(path);
    }
    let mut stack = vec![path.to_path_buf()];
    while let Some(d) = stack.pop() {
        // Best effort: a directory we cannot open is reported by remove_dir_all below.
        let _ = fs::set_permissions(&d, fs::Permissions::from_mode(0o700));
        if let Ok(rd) = fs::read_dir(&d) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
    }
    fs::remove_dir_all(path)
}
