//! Tests of the image module: no KVM. Those that run `mkfs.erofs` say so and pass when it is
//! missing.

use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::layout::{apply_oci, HostLayout};
use super::stage::{escapes, rel_path, Stager};
use super::tarball::Scratch;
use super::*;

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--help").output().is_ok()
}

fn mkfs_or_skip(test: &str) -> bool {
    let ok = have("mkfs.erofs");
    if !ok {
        eprintln!("{test}: skipped: mkfs.erofs is not installed (erofs-utils)");
    }
    ok
}

/// One tar member, written with raw header fields so that hostile names survive.
enum E<'a> {
    File(&'a str, &'a [u8]),
    Mode(&'a str, u32, &'a [u8]),
    Dir(&'a str),
    Sym(&'a str, &'a str),
    Hard(&'a str, &'a str),
    Char(&'a str),
    Fifo(&'a str),
}

fn tar_of(entries: &[E<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        let (name, link, kind, mode, data): (&str, &str, tar::EntryType, u32, &[u8]) = match e {
            E::File(n, d) => (n, "", tar::EntryType::Regular, 0o644, d),
            E::Mode(n, m, d) => (n, "", tar::EntryType::Regular, *m, d),
            E::Dir(n) => (n, "", tar::EntryType::Directory, 0o755, b""),
            E::Sym(n, t) => (n, t, tar::EntryType::Symlink, 0o777, b""),
            E::Hard(n, t) => (n, t, tar::EntryType::Link, 0o644, b""),
            E::Char(n) => (n, "", tar::EntryType::Char, 0o644, b""),
            E::Fifo(n) => (n, "", tar::EntryType::Fifo, 0o644, b""),
        };
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut g = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    g.write_all(bytes).unwrap();
    g.finish().unwrap()
}

fn sha(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// A scratch directory holding `staging` (to import into) and `outside` (never to be touched).
struct Jail {
    _dir: tempfile::TempDir,
    root: PathBuf,
    staging: PathBuf,
    outside: PathBuf,
}

impl Jail {
    fn new() -> Jail {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let staging = root.join("staging");
        let outside = root.join("outside");
        fs::create_dir(&staging).unwrap();
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("canary"), b"canary").unwrap();
        Jail { _dir: dir, root, staging, outside }
    }

    fn import(&self, bytes: &[u8], limits: &Limits) -> Result<(), ImageError> {
        import_archive_bytes(bytes, &self.staging, limits)
    }

    /// Nothing appeared, or changed, outside `staging`.
    fn untouched(&self) {
        let mut names: Vec<_> = fs::read_dir(&self.root).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, ["outside", "staging"]);
        let names: Vec<_> = fs::read_dir(&self.outside).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["canary"]);
        assert_eq!(fs::read(self.outside.join("canary")).unwrap(), b"canary");
    }

    fn at(&self, rel: &str) -> PathBuf {
        self.staging.join(rel)
    }
}

/// A tree under `dir`: a file, an executable in a subdirectory, a symlink, an empty directory.
fn sample_tree(dir: &Path, reverse: bool) {
    fs::create_dir_all(dir).unwrap();
    let mut steps: Vec<Box<dyn Fn() + '_>> = vec![
        Box::new(|| fs::write(dir.join("hello"), b"hello world\n").unwrap()),
        Box::new(|| {
            fs::create_dir_all(dir.join("sub")).unwrap();
            fs::write(dir.join("sub/run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
            fs::set_permissions(dir.join("sub/run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        }),
        Box::new(|| symlink("hello", dir.join("link")).unwrap()),
        Box::new(|| fs::create_dir_all(dir.join("empty")).unwrap()),
    ];
    if reverse {
        steps.reverse();
    }
    for s in steps {
        s();
    }
}

fn erofs_magic_ok(path: &Path) -> bool {
    let b = fs::read(path).unwrap();
    b.len() >= 1028 && b[1024..1028] == 0xE0F5_E1E2u32.to_le_bytes()
}

/// Checks an image with fsck.erofs, extracting it to compare with what went in; None if missing.
fn extract(image: &Path) -> Option<tempfile::TempDir> {
    if !have("fsck.erofs") {
        return None;
    }
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("x");
    let st = Command::new("fsck.erofs")
        .arg(format!("--extract={}", dest.display()))
        .arg("--preserve-perms")
        .arg(image)
        .output()
        .unwrap();
    assert!(st.status.success(), "fsck.erofs: {}", String::from_utf8_lossy(&st.stderr));
    Some(out)
}

#[test]
fn paths_are_normalized_and_unsafe_ones_refused() {
    let l = Limits::default();
    assert_eq!(rel_path(b"./a//b/./c", &l).unwrap(), Path::new("a/b/c"));
    assert_eq!(rel_path(b"./", &l).unwrap(), Path::new(""));
    assert!(matches!(rel_path(b"/etc/passwd", &l), Err(ImageError::Refused { .. })));
    assert!(matches!(rel_path(b"a/../../b", &l), Err(ImageError::Refused { .. })));
    assert!(matches!(rel_path(b"..", &l), Err(ImageError::Refused { .. })));
    assert!(matches!(rel_path(&vec![b'a'; 5000], &l), Err(ImageError::Limit { .. })));
    assert!(!escapes(Path::new("a/b"), b"../c"));
    assert!(escapes(Path::new("a/b"), b"../../c"));
    assert!(escapes(Path::new("a/b"), b"../../../etc"));
    assert!(!escapes(Path::new("a/b"), b"/etc/passwd"));
    assert!(escapes(Path::new("l"), b"x/../../y"));
    assert!(!escapes(Path::new("l"), b"x/../y"));
}

#[test]
fn digests_are_checked_before_any_path_is_made() {
    let h = "a".repeat(64);
    assert_eq!(digest_hex(&format!("sha256:{h}")).unwrap(), h);
    assert_eq!(digest_hex(&h).unwrap(), h);
    for bad in ["", "sha256:", "sha512:aa", &"A".repeat(64), &format!("../{}", "a".repeat(61)), &"a".repeat(63)] {
        assert!(matches!(digest_hex(bad), Err(ImageError::BadDigest(_))), "{bad}");
    }
}

#[test]
fn plain_tar_applies_files_dirs_links_and_modes() {
    let j = Jail::new();
    let t = tar_of(&[
        E::Dir("./"),
        E::Dir("./etc/"),
        E::File("./etc/hostname", b"ember\n"),
        E::Mode("./bin/tool", 0o6755, b"\x7fELF"),
        E::Mode("./tmp/sticky", 0o1777, b""),
        E::Sym("./etc/alias", "hostname"),
        E::Sym("./abs", "/etc/hostname"),
        E::Hard("./etc/hard", "./etc/hostname"),
        E::File("./.wh.literal", b"kept in a plain tar"),
    ]);
    j.import(&t, &Limits::default()).unwrap();
    assert_eq!(fs::read(j.at("etc/hostname")).unwrap(), b"ember\n");
    assert_eq!(fs::read_link(j.at("etc/alias")).unwrap(), Path::new("hostname"));
    assert_eq!(fs::read_link(j.at("abs")).unwrap(), Path::new("/etc/hostname"));
    assert_eq!(fs::metadata(j.at("etc/hard")).unwrap().ino(), fs::metadata(j.at("etc/hostname")).unwrap().ino());
    // setuid and setgid dropped; the sticky bit kept.
    assert_eq!(fs::metadata(j.at("bin/tool")).unwrap().mode() & 0o7777, 0o755);
    assert_eq!(fs::metadata(j.at("tmp/sticky")).unwrap().mode() & 0o7777, 0o1777);
    assert_eq!(fs::metadata(j.at("bin")).unwrap().mode() & 0o7777, 0o755);
    assert_eq!(fs::metadata(&j.staging).unwrap().mode() & 0o7777, 0o755);
    assert!(j.at(".wh.literal").exists());
    j.untouched();
}

#[test]
fn gzip_tar_applies_like_the_plain_one() {
    let t = tar_of(&[E::Dir("d/"), E::File("d/f", b"x")]);
    let (a, b) = (Jail::new(), Jail::new());
    a.import(&t, &Limits::default()).unwrap();
    b.import(&gzip(&t), &Limits::default()).unwrap();
    assert_eq!(fs::read(a.at("d/f")).unwrap(), b"x");
    assert_eq!(fs::read(b.at("d/f")).unwrap(), b"x");
}

#[test]
fn unsafe_entries_are_refused_and_nothing_escapes() {
    let refused: &[(&str, Vec<u8>)] = &[
        ("dotdot", tar_of(&[E::File("../evil", b"x")])),
        ("dotdot inside", tar_of(&[E::File("a/../../evil", b"x")])),
        ("absolute", tar_of(&[E::File("/evil", b"x")])),
        ("char device", tar_of(&[E::Char("dev/null")])),
        ("fifo", tar_of(&[E::Fifo("pipe")])),
        ("escaping symlink", tar_of(&[E::Sym("a/b", "../../../etc")])),
        ("hard link to absolute", tar_of(&[E::Hard("h", "/etc/passwd")])),
        ("hard link to nothing earlier", tar_of(&[E::Hard("h", "later"), E::File("later", b"x")])),
        ("hard link through dotdot", tar_of(&[E::Hard("h", "../outside/canary")])),
        ("hard link to a symlink", tar_of(&[E::Sym("s", "/etc/passwd"), E::Hard("h", "s")])),
        ("root as a symlink", tar_of(&[E::Sym(".", "x")])),
    ];
    for (what, t) in refused {
        let j = Jail::new();
        let e = j.import(t, &Limits::default()).expect_err(what);
        assert!(matches!(e, ImageError::Refused { .. }), "{what}: {e}");
        j.untouched();
    }
}

#[test]
fn nothing_is_written_through_a_symlink() {
    // A symlink to a directory outside, then an entry "inside" it: refused.
    let j = Jail::new();
    let out = j.outside.to_str().unwrap().to_string();
    let t = tar_of(&[E::Sym("link", &out), E::File("link/x", b"owned")]);
    let e = j.import(&t, &Limits::default()).unwrap_err();
    assert!(e.to_string().contains("symlink"), "{e}");
    j.untouched();

    // A symlink at the entry's own path is replaced, not written through.
    let j = Jail::new();
    let canary = j.outside.join("canary");
    let t = tar_of(&[E::Sym("f", canary.to_str().unwrap()), E::File("f", b"owned")]);
    j.import(&t, &Limits::default()).unwrap();
    assert_eq!(fs::read(j.at("f")).unwrap(), b"owned");
    assert!(!fs::symlink_metadata(j.at("f")).unwrap().file_type().is_symlink());
    j.untouched();

    // The same with symlinks already in the staging directory (relative and absolute).
    let j = Jail::new();
    symlink("../outside", j.at("rel")).unwrap();
    symlink(&j.outside, j.at("abs")).unwrap();
    symlink(j.outside.join("canary"), j.at("file")).unwrap();
    for t in [
        tar_of(&[E::File("rel/x", b"owned")]),
        tar_of(&[E::File("abs/x", b"owned")]),
        tar_of(&[E::Dir("abs/sub/")]),
        tar_of(&[E::Sym("abs/s", "x")]),
    ] {
        assert!(matches!(j.import(&t, &Limits::default()), Err(ImageError::Refused { .. })));
    }
    j.import(&tar_of(&[E::File("file", b"owned"), E::Dir("abs/")]), &Limits::default()).unwrap();
    assert_eq!(fs::read(j.at("file")).unwrap(), b"owned");
    assert!(fs::symlink_metadata(j.at("abs")).unwrap().is_dir());
    j.untouched();
}

#[test]
fn limits_are_enforced() {
    let big = vec![7u8; 100];
    let t = tar_of(&[E::File("a", &big)]);
    let small = Limits { max_total_bytes: 10, ..Limits::default() };
    let j = Jail::new();
    assert!(matches!(j.import(&t, &small), Err(ImageError::Limit { what: "total extracted bytes", .. })));
    assert!(matches!(j.import(&gzip(&t), &small), Err(ImageError::Limit { .. })));
    let archive = Limits { max_archive_bytes: 1024, ..Limits::default() };
    assert!(matches!(j.import(&t, &archive), Err(ImageError::Limit { what: "archive size", .. })));
    let gz = gzip(&tar_of(&[E::File("zeros", &vec![0u8; 1 << 20])]));
    assert!(matches!(j.import(&gz, &archive), Err(ImageError::Limit { what: "archive size", .. })));
    let few = Limits { max_entries: 2, ..Limits::default() };
    let t = tar_of(&[E::Dir("a/"), E::Dir("b/"), E::Dir("c/")]);
    assert!(matches!(j.import(&t, &few), Err(ImageError::Limit { what: "entries", .. })));
    let short = Limits { max_path_len: 8, ..Limits::default() };
    let t = tar_of(&[E::File("a/very/long/path", b"")]);
    assert!(matches!(j.import(&t, &short), Err(ImageError::Limit { what: "path length", .. })));
    // A GNU long name bigger than a path may be is refused before it is read into memory.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(0);
    b.append_data(&mut h, "x".repeat(300), &b""[..]).unwrap();
    let t = b.into_inner().unwrap();
    assert!(matches!(j.import(&t, &Limits { max_path_len: 200, ..Limits::default() }), Err(ImageError::Limit { .. })));
    j.untouched();
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    let mut rng = crate::sys::TestRng::new(7);
    let good = tar_of(&[E::Dir("d/"), E::File("d/f", b"hello"), E::Sym("d/l", "f")]);
    for _ in 0..300 {
        let j = Jail::new();
        let input = rng.mutate(&good);
        let _ = j.import(&input, &Limits::default());
        let _ = j.import(&gzip(&input), &Limits::default());
        let _ = j.import(&rng.bytes(2048), &Limits::default());
        j.untouched();
    }
}

/// An OCI layout under `dir` with `layers` (tar bytes, gzip-compressed when the flag says so),
/// reached through an image index whose first manifest is for another platform.
fn oci_layout(dir: &Path, layers: &[(Vec<u8>, bool)]) {
    fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    let put = |bytes: &[u8]| -> (String, usize) {
        let h = sha(bytes);
        fs::write(dir.join("blobs/sha256").join(&h), bytes).unwrap();
        (format!("sha256:{h}"), bytes.len())
    };
    let (cfg, cfg_len) = put(b"{}");
    let descs: Vec<_> = layers
        .iter()
        .map(|(t, gz)| {
            let (bytes, mt) = if *gz {
                (gzip(t), "application/vnd.oci.image.layer.v1.tar+gzip")
            } else {
                (t.clone(), "application/vnd.oci.image.layer.v1.tar")
            };
            let (d, n) = put(&bytes);
            serde_json::json!({"mediaType": mt, "digest": d, "size": n})
        })
        .collect();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg, "size": cfg_len},
        "layers": descs,
    });
    let (m, m_len) = put(manifest.to_string().as_bytes());
    let other = serde_json::json!({"schemaVersion": 2, "layers": [{"digest": format!("sha256:{}", "0".repeat(64)), "size": 1}]});
    let (o, o_len) = put(other.to_string().as_bytes());
    let image_index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": o, "size": o_len,
             "platform": {"architecture": "arm64", "os": "linux"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": m, "size": m_len,
             "platform": {"architecture": "amd64", "os": "linux"}},
        ],
    });
    let (i, i_len) = put(image_index.to_string().as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.index.v1+json", "digest": i, "size": i_len}],
    });
    fs::write(dir.join("index.json"), index.to_string()).unwrap();
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

fn two_layers() -> Vec<(Vec<u8>, bool)> {
    let lower = tar_of(&[
        E::Dir("a/"),
        E::File("a/keep", b"keep"),
        E::File("a/gone", b"gone"),
        E::Dir("gonedir/"),
        E::File("gonedir/x", b"x"),
        E::Dir("opq/"),
        E::File("opq/old", b"old"),
        E::Dir("opq/sub/"),
        E::File("opq/sub/old2", b"old2"),
        E::File("replaced", b"lower"),
    ]);
    let upper = tar_of(&[
        E::Dir("a/"),
        E::File("a/.wh.gone", b""),
        E::File(".wh.gonedir", b""),
        E::Dir("opq/"),
        E::File("opq/new", b"new"),
        E::File("opq/.wh..wh..opq", b""),
        E::File("replaced", b"upper"),
        E::File(".wh.never-there", b""),
    ]);
    vec![(lower, false), (upper, true)]
}

/// The flattened tree of [`two_layers`]: whiteouts applied, the opaque directory emptied of
/// lower content but keeping the upper layer's (written before its marker).
fn check_flattened(root: &Path) {
    assert_eq!(fs::read(root.join("a/keep")).unwrap(), b"keep");
    assert!(!root.join("a/gone").exists());
    assert!(!root.join("a/.wh.gone").exists());
    assert!(!root.join("gonedir").exists());
    assert!(!root.join(".wh.gonedir").exists());
    let mut opq: Vec<_> = fs::read_dir(root.join("opq")).unwrap().map(|e| e.unwrap().file_name()).collect();
    opq.sort();
    assert_eq!(opq, ["new"]);
    assert_eq!(fs::read(root.join("replaced")).unwrap(), b"upper");
}

#[test]
fn oci_layout_layers_flatten_with_whiteouts() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("oci");
    oci_layout(&layout, &two_layers());
    let j = Jail::new();
    let limits = Limits::default();
    let mut stager = Stager::new(&j.staging, &limits).unwrap();
    apply_oci(&HostLayout::open(&layout).unwrap(), &mut stager, &limits, &Scratch::Memory).unwrap();
    stager.finish().unwrap();
    check_flattened(&j.staging);
    j.untouched();

    // The same layout as a tarball (as `docker save` of Docker 25 or `skopeo copy oci-archive:`).
    let mut b = tar::Builder::new(Vec::new());
    b.append_dir_all(".", &layout).unwrap();
    let j = Jail::new();
    j.import(&b.into_inner().unwrap(), &limits).unwrap();
    check_flattened(&j.staging);
    j.untouched();
}

#[test]
fn an_oci_layouts_blobs_are_read_once_beneath_it_and_never_through_a_symlink() {
    use super::layout::{Layout, Opened};
    /// Counts how often each file of a layout is opened.
    struct Counting(HostLayout, std::cell::RefCell<std::collections::HashMap<PathBuf, u32>>);
    impl Layout for Counting {
        fn open(&self, rel: &Path) -> Result<Option<Opened<'_>>, ImageError> {
            *self.1.borrow_mut().entry(rel.to_path_buf()).or_default() += 1;
            self.0.open(rel)
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("oci");
    oci_layout(&layout, &two_layers());
    let limits = Limits::default();
    // Each blob is opened once: what is applied is what was hashed, whatever the file does after.
    for scratch in [Scratch::Memory, Scratch::Dir(dir.path())] {
        let j = Jail::new();
        let mut stager = Stager::new(&j.staging, &limits).unwrap();
        let counting = Counting(HostLayout::open(&layout).unwrap(), Default::default());
        apply_oci(&counting, &mut stager, &limits, &scratch).unwrap();
        stager.finish().unwrap();
        check_flattened(&j.staging);
        let opens = counting.1.into_inner();
        assert!(opens.values().all(|n| *n == 1), "{opens:?}");
    }
    // A blob that is a symlink (to a file outside, here) is refused, not followed.
    let outside = dir.path().join("outside.tar");
    let blobs: Vec<_> = fs::read_dir(layout.join("blobs/sha256")).unwrap().map(|e| e.unwrap().path()).collect();
    let layer = blobs.iter().find(|p| fs::read(p).unwrap().len() > 1024).unwrap();
    fs::rename(layer, &outside).unwrap();
    symlink(&outside, layer).unwrap();
    let j = Jail::new();
    let mut stager = Stager::new(&j.staging, &limits).unwrap();
    let e = apply_oci(&HostLayout::open(&layout).unwrap(), &mut stager, &limits, &Scratch::Memory).unwrap_err();
    assert!(e.to_string().contains("not followed"), "{e}");
    j.untouched();
}

#[test]
fn malformed_oci_layouts_are_refused_with_the_reason() {
    let limits = Limits::default();
    let run = |edit: &dyn Fn(&Path)| -> Result<(), ImageError> {
        let dir = tempfile::tempdir().unwrap();
        let layout = dir.path().join("oci");
        oci_layout(&layout, &two_layers());
        edit(&layout);
        let j = Jail::new();
        let mut stager = Stager::new(&j.staging, &limits).unwrap();
        let r = apply_oci(&HostLayout::open(&layout).unwrap(), &mut stager, &limits, &Scratch::Memory);
        j.untouched();
        r
    };
    run(&|_| {}).unwrap();
    let index = |l: &Path| fs::read_to_string(l.join("index.json")).unwrap();
    let e = run(&|l| fs::write(l.join("index.json"), b"{not json").unwrap()).unwrap_err();
    assert!(matches!(&e, ImageError::Malformed { what, .. } if what == "index.json"), "{e}");
    let e = run(&|l| fs::write(l.join("index.json"), br#"{"schemaVersion":2,"manifests":[{"size":3}]}"#).unwrap());
    assert!(e.unwrap_err().to_string().contains("missing field `digest`"));
    let e = run(&|l| fs::write(l.join("index.json"), br#"{"schemaVersion":2,"manifests":[]}"#).unwrap()).unwrap_err();
    assert!(e.to_string().contains("no manifests"), "{e}");
    let e = run(&|l| fs::remove_file(l.join("oci-layout")).unwrap()).unwrap_err();
    assert!(e.to_string().contains("oci-layout is missing"), "{e}");
    let e = run(&|l| fs::write(l.join("index.json"), index(l).replace("sha256:", "sha512:")).unwrap()).unwrap_err();
    assert!(matches!(e, ImageError::Unsupported(_)), "{e}");
    let e = run(&|l| fs::write(l.join("index.json"), index(l).replace("sha256:", "sha256:../")).unwrap()).unwrap_err();
    assert!(matches!(e, ImageError::Malformed { .. }), "{e}");

    // Every blob, tampered with (same size) and then missing. The config and the arm64 manifest
    // are never read; the image index, the amd64 manifest and both layers are.
    let blobs = |l: &Path| -> Vec<PathBuf> {
        let mut v: Vec<_> = fs::read_dir(l.join("blobs/sha256")).unwrap().map(|e| e.unwrap().path()).collect();
        v.sort();
        v
    };
    let dir = tempfile::tempdir().unwrap();
    oci_layout(dir.path(), &two_layers());
    let (mut tampered, mut missing) = (0, 0);
    for k in 0..blobs(dir.path()).len() {
        let r = run(&|l| {
            let p = &blobs(l)[k];
            let mut b = fs::read(p).unwrap();
            let last = b.len() - 1;
            b[last] ^= 1;
            fs::write(p, b).unwrap();
        });
        if let Err(e) = r {
            let inner = match &e {
                ImageError::InLayer { source, .. } => source,
                e => e,
            };
            assert!(matches!(inner, ImageError::DigestMismatch { .. }), "{e}");
            tampered += 1;
        }
        if let Err(e) = run(&|l| fs::remove_file(&blobs(l)[k]).unwrap()) {
            assert!(e.to_string().contains("is missing"), "{e}");
            missing += 1;
        }
    }
    assert_eq!((tampered, missing), (4, 4));
}

#[test]
fn docker_save_tarball_flattens_its_layers() {
    let layers = two_layers();
    let config = br#"{"rootfs":{"type":"layers"}}"#;
    let manifest =
        br#"[{"Config":"cfg.json","RepoTags":["t:1"],"Layers":["l1/layer.tar","l2/layer.tar","l3/layer.tar"]}]"#;
    let third = tar_of(&[E::File("a/third", b"3")]);
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, data).unwrap();
    };
    add("cfg.json", config);
    add("l1/layer.tar", &layers[0].0);
    add("l2/layer.tar", &gzip(&layers[1].0));
    add("real/layer.tar", &third);
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "l3/layer.tar", "../real/layer.tar").unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(manifest.len() as u64);
    h.set_mode(0o644);
    b.append_data(&mut h, "manifest.json", &manifest[..]).unwrap();
    let t = b.into_inner().unwrap();
    let j = Jail::new();
    j.import(&t, &Limits::default()).unwrap();
    check_flattened(&j.staging);
    assert_eq!(fs::read(j.at("a/third")).unwrap(), b"3");
    j.untouched();

    // A layer whose path leaves the archive, or is not there.
    for bad in [r#"[{"Layers":["../x.tar"]}]"#, r#"[{"Layers":["nope.tar"]}]"#, r#"[]"#, r#"{"Layers":[]}"#] {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(bad.len() as u64);
        b.append_data(&mut h, "manifest.json", bad.as_bytes()).unwrap();
        let j = Jail::new();
        let e = j.import(&b.into_inner().unwrap(), &Limits::default()).unwrap_err();
        assert!(e.to_string().contains("malformed"), "{bad}: {e}");
        j.untouched();
    }
}

#[test]
fn directory_input_with_a_fifo_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    sample_tree(&src, false);
    let fifo = std::ffi::CString::new(src.join("pipe").as_os_str().as_bytes()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path we own.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let store = Store::open(&dir.path().join("store")).unwrap();
    let e = store.build(&src, &Limits::default()).unwrap_err();
    assert!(matches!(&e, ImageError::Refused { entry, .. } if entry == "pipe"), "{e}");
}

#[test]
fn building_a_directory_twice_and_a_copy_of_it_gives_one_digest() {
    if !mkfs_or_skip("building_a_directory_twice_and_a_copy_of_it_gives_one_digest") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    sample_tree(&src, false);
    let store = Store::open(&dir.path().join("store")).unwrap();
    let first = store.build(&src, &Limits::default()).unwrap();
    assert!(!first.cached);
    let l = &first.layer;
    assert_eq!(l.path, dir.path().join(format!("store/layers/{}.erofs", l.digest.strip_prefix("sha256:").unwrap())));
    assert_eq!(l.digest, format!("sha256:{}", sha(&fs::read(&l.path).unwrap())));
    assert_eq!(l.size, fs::metadata(&l.path).unwrap().len());
    assert_eq!(fs::metadata(&l.path).unwrap().mode() & 0o777, 0o444);
    assert!(erofs_magic_ok(&l.path));
    assert_eq!(fs::read_dir(dir.path().join("store/tmp")).unwrap().count(), 0, "staging removed");
    let second = store.build(&src, &Limits::default()).unwrap();
    assert!(second.cached);
    assert_eq!(second.layer, first.layer);

    // A copy made in another order, built in another store: mkfs.erofs's output is the same.
    let copy = dir.path().join("copy");
    sample_tree(&copy, true);
    let other = Store::open(&dir.path().join("other")).unwrap();
    let third = other.build(&copy, &Limits::default()).unwrap();
    assert!(!third.cached);
    assert_eq!(third.layer.digest, first.layer.digest);

    // The image holds the tree.
    if let Some(x) = extract(&l.path) {
        let x = x.path().join("x");
        assert_eq!(fs::read(x.join("hello")).unwrap(), b"hello world\n");
        assert_eq!(fs::read_link(x.join("link")).unwrap(), Path::new("hello"));
        assert_eq!(fs::metadata(x.join("sub/run.sh")).unwrap().mode() & 0o777, 0o755);
        assert!(x.join("empty").is_dir());
    }

    // A changed tree is another input and another layer.
    fs::write(copy.join("hello"), b"changed").unwrap();
    let fourth = other.build(&copy, &Limits::default()).unwrap();
    assert!(!fourth.cached);
    assert_ne!(fourth.layer.digest, first.layer.digest);
}

#[test]
fn tar_gzip_tar_oci_and_empty_inputs_build() {
    if !mkfs_or_skip("tar_gzip_tar_oci_and_empty_inputs_build") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let limits = Limits::default();
    let t = tar_of(&[E::Dir("./"), E::Dir("./etc/"), E::File("./etc/hostname", b"ember\n"), E::Sym("./l", "etc")]);
    fs::write(dir.path().join("rootfs.tar"), &t).unwrap();
    fs::write(dir.path().join("rootfs.tar.gz"), gzip(&t)).unwrap();
    let a = store.build(&dir.path().join("rootfs.tar"), &limits).unwrap();
    let b = store.build(&dir.path().join("rootfs.tar.gz"), &limits).unwrap();
    assert!(!a.cached && !b.cached, "different inputs");
    assert_eq!(a.layer, b.layer, "the same tree");
    assert!(store.build(&dir.path().join("rootfs.tar.gz"), &limits).unwrap().cached);
    assert!(erofs_magic_ok(&a.layer.path));

    let oci = dir.path().join("oci");
    oci_layout(&oci, &two_layers());
    let o = store.build(&oci, &limits).unwrap();
    assert!(!o.cached);
    assert!(store.build(&oci, &limits).unwrap().cached);
    if let Some(x) = extract(&o.layer.path) {
        check_flattened(&x.path().join("x"));
    }

    let empty = dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let e = store.build(&empty, &limits).unwrap();
    assert!(erofs_magic_ok(&e.layer.path));
    let empty_tar = dir.path().join("empty.tar");
    fs::write(&empty_tar, tar::Builder::new(Vec::new()).into_inner().unwrap()).unwrap();
    assert_eq!(store.build(&empty_tar, &limits).unwrap().layer.digest, e.layer.digest);
    if have("fsck.erofs") {
        assert!(Command::new("fsck.erofs").arg(&e.layer.path).status().unwrap().success());
    }

    // A refused input leaves no staging behind, and no record.
    fs::write(dir.path().join("bad.tar"), tar_of(&[E::File("../x", b"")])).unwrap();
    assert!(store.build(&dir.path().join("bad.tar"), &limits).is_err());
    assert_eq!(fs::read_dir(dir.path().join("store/tmp")).unwrap().count(), 0);
    assert_eq!(store.list().unwrap().len(), 3);
}

#[test]
fn list_get_and_remove() {
    if !mkfs_or_skip("list_get_and_remove") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let limits = Limits::default();
    assert!(store.list().unwrap().is_empty());
    let (s1, s2) = (dir.path().join("s1"), dir.path().join("s2"));
    sample_tree(&s1, false);
    fs::create_dir(&s2).unwrap();
    fs::write(s2.join("only"), b"2").unwrap();
    let a = store.build(&s1, &limits).unwrap().layer;
    let b = store.build(&s2, &limits).unwrap().layer;
    let mut want = vec![a.clone(), b.clone()];
    want.sort_by(|x, y| x.digest.cmp(&y.digest));
    assert_eq!(store.list().unwrap(), want);
    let bare = a.digest.strip_prefix("sha256:").unwrap();
    assert_eq!(store.get(bare), Some(a.clone()));
    assert_eq!(store.get(&a.digest), Some(a.clone()));
    assert_eq!(store.get("sha256:../../etc/passwd"), None);
    assert!(matches!(store.remove("../x"), Err(ImageError::BadDigest(_))));
    assert!(matches!(store.remove(&"0".repeat(64)), Err(ImageError::NotFound(_))));
    store.remove(bare).unwrap();
    assert_eq!(store.list().unwrap(), vec![b.clone()]);
    assert_eq!(store.get(&a.digest), None);
    assert_eq!(fs::read_dir(dir.path().join("store/inputs")).unwrap().count(), 1, "a's record went with it");
    let again = store.build(&s1, &limits).unwrap();
    assert!(!again.cached);
    assert_eq!(again.layer, a);

    // Open cleans what dead builds left in tmp/.
    fs::create_dir_all(dir.path().join("store/tmp/build-1-dead/root/d")).unwrap();
    fs::set_permissions(dir.path().join("store/tmp/build-1-dead/root"), fs::Permissions::from_mode(0o555)).unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    assert_eq!(fs::read_dir(dir.path().join("store/tmp")).unwrap().count(), 0);
    assert_eq!(store.list().unwrap().len(), 2);
    assert_eq!(fs::metadata(dir.path().join("store")).unwrap().mode() & 0o777, 0o700);
}

#[test]
fn a_missing_mkfs_says_what_to_install() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap().with_mkfs("/nonexistent/mkfs.erofs");
    let src = dir.path().join("src");
    fs::create_dir(&src).unwrap();
    let e = store.build(&src, &Limits::default()).unwrap_err();
    assert!(matches!(e, ImageError::MkfsMissing(_)));
    assert!(e.to_string().contains("install erofs-utils"), "{e}");
}

#[test]
fn unreadable_modes_still_build() {
    if !mkfs_or_skip("unreadable_modes_still_build") {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let dir = tempfile::tempdir().unwrap();
    // "ro/" as a regular file with a trailing slash: an old-style directory entry.
    let t = tar_of(&[E::Mode("ro/", 0o555, b""), E::Mode("ro/secret", 0o000, b"s"), E::Mode("none/", 0o000, b"")]);
    fs::write(dir.path().join("t.tar"), t).unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let built = store.build(&dir.path().join("t.tar"), &Limits::default()).unwrap();
    assert!(erofs_magic_ok(&built.layer.path));
    assert_eq!(fs::read_dir(dir.path().join("store/tmp")).unwrap().count(), 0, "staging removed");
    if let Some(x) = extract(&built.layer.path).filter(|_| root) {
        let x = x.path().join("x");
        assert_eq!(fs::symlink_metadata(x.join("ro")).unwrap().mode() & 0o7777, 0o555);
        assert_eq!(fs::symlink_metadata(x.join("ro/secret")).unwrap().mode() & 0o7777, 0);
        assert_eq!(fs::symlink_metadata(x.join("none")).unwrap().mode() & 0o7777, 0);
    }
}

/// A zip archive of `(name, mode, content)` entries (`mode` with its file type; a symlink's
/// content is its target), deflated.
fn zip_of(entries: &[(&str, u32, &[u8])]) -> Vec<u8> {
    use zip::write::SimpleFileOptions;
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, mode, content) in entries {
        let opts = SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .unix_permissions(mode & 0o7777);
        match mode & 0o170_000 {
            0o040_000 => w.add_directory(*name, opts).unwrap(),
            0o120_000 => w.add_symlink(*name, std::str::from_utf8(content).unwrap(), opts).unwrap(),
            _ => {
                w.start_file(*name, opts).unwrap();
                w.write_all(content).unwrap();
            }
        }
    }
    w.finish().unwrap().into_inner()
}

#[test]
fn zip_applies_files_dirs_links_and_modes() {
    let j = Jail::new();
    let z = zip_of(&[
        ("app/", 0o040_755, b""),
        ("app/handler.py", 0o100_644, b"def handler(e, c):\n    return e\n"),
        ("bin/run", 0o104_755, b"#!/bin/sh\n"),
        ("app/link", 0o120_777, b"handler.py"),
        ("big.txt", 0o100_600, &[b'z'; 100_000]),
    ]);
    j.import(&z, &Limits::default()).unwrap();
    assert_eq!(fs::read(j.at("app/handler.py")).unwrap(), b"def handler(e, c):\n    return e\n");
    assert_eq!(fs::read_link(j.at("app/link")).unwrap(), Path::new("handler.py"));
    // setuid dropped, as from a tar.
    assert_eq!(fs::metadata(j.at("bin/run")).unwrap().mode() & 0o7777, 0o755);
    assert_eq!(fs::read(j.at("big.txt")).unwrap().len(), 100_000);
    j.untouched();
}

#[test]
fn unsafe_zip_entries_are_refused_and_bombs_stop_at_the_limit() {
    for (what, z) in [
        ("dotdot", zip_of(&[("../evil", 0o100_644, b"x")])),
        ("dotdot inside", zip_of(&[("a/../../evil", 0o100_644, b"x")])),
        ("absolute", zip_of(&[("/evil", 0o100_644, b"x")])),
        ("escaping symlink", zip_of(&[("a/b", 0o120_777, b"../../../etc")])),
    ] {
        let j = Jail::new();
        let e = j.import(&z, &Limits::default()).expect_err(what);
        assert!(matches!(e, ImageError::Refused { .. } | ImageError::Malformed { .. }), "{what}: {e}");
        j.untouched();
    }
    // 8 MiB of zeros deflate to a few KiB: the extracted-bytes limit stops it, not the archive size.
    let bomb = zip_of(&[("zeros", 0o100_644, &vec![0u8; 8 << 20])]);
    assert!(bomb.len() < 64 << 10);
    let j = Jail::new();
    let limits = Limits { max_total_bytes: 1 << 20, ..Limits::default() };
    let e = j.import(&bomb, &limits).unwrap_err();
    assert!(matches!(e, ImageError::Limit { .. }), "{e}");
    // Truncated and garbage archives are errors, not panics.
    let z = zip_of(&[("f", 0o100_644, b"content")]);
    for cut in [4, 20, z.len() / 2, z.len() - 1] {
        let _ = Jail::new().import(&z[..cut], &Limits::default());
    }
}
