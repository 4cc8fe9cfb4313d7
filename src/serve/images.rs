//! Where a registration's kernel and initramfs may come from: only the image directories the
//! daemon was started with (`ember serve --images DIR`). A path is opened beneath its directory
//! with openat2 (RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS), so neither `..` nor a symlink leads out
//! of it, and the guest is booted from that very open file (through /proc/self/fd), so a file
//! swapped after the check is never the one booted: a client cannot make the daemon hand a host
//! file it can read (a secret passed as the "initramfs") to a guest.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

/// Why an image cannot be used.
#[derive(Debug, PartialEq, Eq)]
pub enum ImageError {
    /// The daemon may not boot that file: outside every image directory, through `..` or a
    /// symlink, not a regular file, or no image directory at all.
    NotAllowed(String),
    /// There is no such file in the image directories.
    NotFound(String),
}

impl std::fmt::Display for ImageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (ImageError::NotAllowed(m) | ImageError::NotFound(m)) = self;
        f.write_str(m)
    }
}

/// The image directories, each held open.
pub struct ImageDirs {
    dirs: Vec<(PathBuf, OwnedFd)>,
}

/// An image opened beneath an image directory; the guest boots from this open file.
pub struct ImageFile {
    fd: OwnedFd,
}

impl ImageFile {
    /// The open file's descriptor (for handing it to a worker).
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }

    /// A path that names this open file (and no other) while it stays open.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }
}

impl ImageDirs {
    /// Opens the image directories (each must exist).
    pub fn open(dirs: &[PathBuf]) -> Result<Self, String> {
        let dirs = dirs
            .iter()
            .map(|d| {
                let dir = std::fs::canonicalize(d).map_err(|e| format!("image directory {}: {e}", d.display()))?;
                let file = std::fs::File::open(&dir).map_err(|e| format!("image directory {}: {e}", d.display()))?;
                if !file.metadata().map(|m| m.is_dir()).unwrap_or(false) {
                    return Err(format!("image directory {} is not a directory", d.display()));
                }
                Ok((dir, OwnedFd::from(file)))
            })
            .collect::<Result<_, String>>()?;
        Ok(Self { dirs })
    }

    /// The directories, as given (canonical).
    pub fn dirs(&self) -> Vec<&Path> {
        self.dirs.iter().map(|(d, _)| d.as_path()).collect()
    }

    /// Opens `path`, which must name a regular file beneath one of the image directories: an
    /// absolute path inside one, or a path relative to one (the first that has it).
    pub fn open_image(&self, what: &str, path: &Path) -> Result<ImageFile, ImageError> {
        self.open_beneath_dirs(what, path, false)
    }

    /// Opens `path` as [`ImageDirs::open_image`] does, but a directory too: the source of a layer
    /// or of a function's code (a directory, a tar archive, an OCI image).
    pub fn open_source(&self, what: &str, path: &Path) -> Result<ImageFile, ImageError> {
        self.open_beneath_dirs(what, path, true)
    }

    fn open_beneath_dirs(&self, what: &str, path: &Path, dirs_too: bool) -> Result<ImageFile, ImageError> {
        use ImageError::{NotAllowed, NotFound};
        if self.dirs.is_empty() {
            return Err(NotAllowed(format!(
                "{what} {}: this daemon has no image directory (start it with --images DIR)",
                path.display()
            )));
        }
        if path.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(NotAllowed(format!("{what} {}: `..` is not allowed", path.display())));
        }
        let candidates: Vec<(&OwnedFd, &Path)> = match path.is_absolute() {
            true => self.dirs.iter().filter_map(|(d, fd)| Some((fd, path.strip_prefix(d).ok()?))).collect(),
            false => self.dirs.iter().map(|(_, fd)| (fd, path)).collect(),
        };
        if candidates.is_empty() {
            return Err(NotAllowed(format!(
                "{what} {} is not in an image directory ({})",
                path.display(),
                self.dirs().iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
            )));
        }
        let mut last = None;
        for (dir, rel) in candidates {
            match crate::sys::open_beneath(dir, rel, libc::O_RDONLY) {
                Ok(fd) => {
                    let file = std::fs::File::from(fd);
                    match file.metadata() {
                        Ok(m) if m.is_file() || (dirs_too && m.is_dir()) => {
                            return Ok(ImageFile { fd: OwnedFd::from(file) })
                        }
                        Ok(_) => {
                            let kind = if dirs_too { "a regular file or a directory" } else { "a regular file" };
                            return Err(NotAllowed(format!("{what} {} is not {kind}", path.display())));
                        }
                        Err(e) => last = Some(e),
                    }
                }
                Err(e) => last = Some(e),
            }
        }
        let path = path.display();
        Err(match last {
            Some(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                NotAllowed(format!("{what} {path}: a symlink (not followed in image directories)"))
            }
            Some(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                NotAllowed(format!("{what} {path}: outside its image directory"))
            }
            Some(e) if e.kind() == std::io::ErrorKind::NotFound => NotFound(format!("{what} {path}: {e}")),
            Some(e) => NotAllowed(format!("{what} {path}: {e}")),
            None => NotFound(format!("{what} {path}: not found")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_open_beneath_their_directory_only() {
        let root = tempfile::tempdir().unwrap();
        let images = root.path().join("images");
        std::fs::create_dir_all(images.join("sub")).unwrap();
        std::fs::write(images.join("vmlinux"), b"k").unwrap();
        std::fs::write(images.join("sub/initrd"), b"i").unwrap();
        std::fs::write(root.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(root.path().join("secret"), images.join("link")).unwrap();
        let dirs = ImageDirs::open(std::slice::from_ref(&images)).unwrap();
        let canon = std::fs::canonicalize(&images).unwrap();

        let f = dirs.open_image("kernel", &canon.join("vmlinux")).unwrap();
        assert_eq!(std::fs::read(f.path()).unwrap(), b"k");
        assert_eq!(std::fs::read(dirs.open_image("initramfs", Path::new("sub/initrd")).unwrap().path()).unwrap(), b"i");
        let e = |p: &Path| dirs.open_image("initramfs", p).err().unwrap().to_string();
        assert!(
            e(&root.path().join("secret")).contains("not in an image directory"),
            "{}",
            e(&root.path().join("secret"))
        );
        assert!(e(Path::new("../secret")).contains("`..`"));
        assert!(e(Path::new("link")).contains("symlink"), "{}", e(Path::new("link")));
        assert!(e(Path::new("sub")).contains("not a regular file"));
        let sub = dirs.open_source("code", Path::new("sub")).unwrap();
        assert!(std::fs::read_dir(sub.path()).unwrap().count() == 1);
        assert!(dirs.open_source("code", Path::new("link")).is_err());
        assert!(e(Path::new("missing")).contains("No such file"), "{}", e(Path::new("missing")));
        let none = ImageDirs::open(&[]).unwrap();
        assert!(none.open_image("kernel", Path::new("vmlinux")).err().unwrap().to_string().contains("--images"));
        assert!(matches!(dirs.open_image("kernel", Path::new("missing")), Err(ImageError::NotFound(_))));
        assert!(matches!(dirs.open_image("kernel", Path::new("link")), Err(ImageError::NotAllowed(_))));
        assert!(ImageDirs::open(&[root.path().join("nope")]).is_err());
    }
}
