//! An archive imported into a staging directory (tar, gzip tar, `docker save` or OCI-layout
//! tarball): errors, never panics, and nothing outside the staging directory is created, changed
//! or reached through a symlink, not even through symlinks already in the staging directory.
#![no_main]

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ember::image::{import_archive_bytes, Limits};
use libfuzzer_sys::fuzz_target;

fn base() -> &'static PathBuf {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| std::env::temp_dir().join(format!("ember-fuzz-image-{}", std::process::id())))
}

/// Removes `dir` whatever modes the import left on its directories.
fn remove(dir: &Path) {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let _ = fs::set_permissions(&d, fs::Permissions::from_mode(0o700));
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
    }
    let _ = fs::remove_dir_all(dir);
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<_> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

fuzz_target!(|data: &[u8]| {
    let base = base();
    remove(base);
    let staging = base.join("staging");
    let outside = base.join("outside");
    fs::create_dir_all(&staging).unwrap();
    fs::create_dir(&outside).unwrap();
    fs::set_permissions(&outside, fs::Permissions::from_mode(0o755)).unwrap();
    let canary = outside.join("canary");
    fs::write(&canary, b"canary").unwrap();
    fs::set_permissions(&canary, fs::Permissions::from_mode(0o644)).unwrap();
    // Symlinks out of the staging directory that an archive may name but must not go through.
    symlink("../outside", staging.join("rel")).unwrap();
    symlink(&outside, staging.join("abs")).unwrap();
    symlink(&canary, staging.join("file")).unwrap();

    let limits = Limits {
        max_total_bytes: 1 << 20,
        max_entries: 1000,
        max_path_len: 1024,
        max_archive_bytes: 4 << 20,
        max_json_bytes: 64 << 10,
        max_layers: 8,
    };
    let _ = import_archive_bytes(data, &staging, &limits);

    assert_eq!(names(base), ["outside", "staging"], "something was created beside the staging directory");
    assert_eq!(names(&outside), ["canary"], "something was created through a symlink");
    assert_eq!(fs::read(&canary).unwrap(), b"canary", "a file was written through a symlink");
    let mode = |p: &Path| fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&outside), 0o755, "a directory's mode was set through a symlink");
    assert_eq!(mode(&canary), 0o644, "a file's mode was set through a symlink");
});
