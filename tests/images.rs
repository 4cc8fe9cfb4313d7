//! Functions that bring their own files, on real guests: layers built by `ember image build` and
//! by the daemon (`PUT /layers/{name}`), mounted by the guest agent over virtio-blk and stacked
//! with overlayfs; two functions sharing one layer file; a clone's writes private to it; a
//! restore refused when a drive changed; a drive that is not a filesystem failing the boot with
//! the guest's reason.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::api::{assert_error, http, http_bytes, invoke, json_of, wait_ready, Server};
use serde_json::json;

/// The example code layer's tree (scripts/build-initramfs.sh writes it).
fn example_code(test: &str) -> Option<PathBuf> {
    let dir = common::repo().join("images/examples/files");
    if dir.join("bin/ember-files").exists() {
        return Some(dir);
    }
    let why = format!("{} is missing (run scripts/build-initramfs.sh)", dir.display());
    assert!(!common::kvm_required(), "{test}: {why}, and EMBER_REQUIRE_KVM=1");
    eprintln!("SKIPPED {test}: {why}");
    None
}

/// A data tree for a shared layer: a greeting and 400 kB of numbered lines (a response the
/// mailbox carries whole).
fn data_tree(dir: &Path) {
    std::fs::create_dir_all(dir.join("share/data")).unwrap();
    std::fs::write(dir.join("share/data/greeting.txt"), "hello from the shared layer\n").unwrap();
    let lines: String = (0..50_000).map(|i| format!("{i:07}\n")).collect();
    std::fs::write(dir.join("share/data/numbers.txt"), lines).unwrap();
}

fn build_layer(state: &Path, source: &Path) -> (String, PathBuf) {
    let out = common::ember(&["image", "build", source.to_str().unwrap(), "--state-dir", state.to_str().unwrap()]);
    let text = common::text(&out.stdout);
    assert!(out.status.success(), "{text}{}", common::text(&out.stderr));
    let digest = text.split_whitespace().next().unwrap().to_string();
    assert!(digest.starts_with("sha256:"), "{text}");
    let path = text.split_whitespace().find(|w| w.ends_with(".erofs")).map(PathBuf::from).unwrap();
    (digest, path)
}

#[test]
fn functions_run_from_shared_layers_and_their_own_code() {
    if !common::kvm_usable("images_serve") {
        return;
    }
    let Some((kernel, initrd)) = common::images("images_serve") else { return };
    let Some(code) = example_code("images_serve") else { return };
    let dir = common::scratch("images-serve");
    let sources = dir.join("sources");
    data_tree(&sources.join("data"));
    let mut srv = Server::start_with_images(&dir, std::slice::from_ref(&sources));
    // The daemon provides ember's python3 layer itself (in the background) when the image
    // directory has its tree: it is counted with the test's own layers below.
    let python = common::repo().join("images/layers/python3/usr/bin/python3").exists();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while python && !http(&srv.socket, "GET", "/layers", None).1.contains("\"python3\"") {
        assert!(std::time::Instant::now() < deadline, "the python3 layer was never provided");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let provided = usize::from(python);
    let s = srv.socket.clone();

    // A shared layer from a directory beneath an image directory; again: the same content.
    let (code_, body) = http(&s, "PUT", "/layers/data", Some(&json!({"path": sources.join("data")}).to_string()));
    assert_eq!(code_, 201, "{body}");
    let layer = json_of(&body);
    assert!(layer["digest"].as_str().unwrap().starts_with("sha256:"), "{body}");
    let (code_, again) = http(&s, "PUT", "/layers/data", Some(&json!({"path": sources.join("data")}).to_string()));
    assert_eq!((code_, json_of(&again)["digest"].clone()), (200, layer["digest"].clone()), "{again}");
    // Bad layer requests change nothing.
    assert_error(http(&s, "PUT", "/layers/x", Some(r#"{"path": "/etc"}"#)), 403, "not in an image directory");
    assert_error(http(&s, "PUT", "/layers/x", Some(&json!({"path": sources.join("nope")}).to_string())), 404, "");
    assert_error(http(&s, "PUT", "/layers/x", Some(r#"{"path": 1}"#)), 400, "bad JSON");
    assert_error(http(&s, "PUT", "/layers/Bad%20Name", Some(r#"{"path": "x"}"#)), 400, "bad name");
    let (c, _, b) = http_bytes(&s, "PUT", "/layers/junk", "application/x-tar", b"not a tar archive at all");
    assert_eq!(c, 400, "{}", String::from_utf8_lossy(&b));
    assert_error(http(&s, "GET", "/layers/junk", None), 404, "no layer");
    // An archive uploaded as the body; an archive escaping its root is refused.
    let (c, _, b) = http_bytes(&s, "PUT", "/layers/up", "application/x-tar", &tar_of(&[("etc/up.txt", b"up\n")]));
    let up = json_of(&String::from_utf8_lossy(&b));
    assert_eq!((c, up["source"].as_str()), (201, Some("(uploaded archive)")), "{up}");
    let (c, _, b) = http_bytes(&s, "PUT", "/layers/evil", "application/x-tar", &tar_of(&[("../../etc/x", b"x")]));
    assert_eq!(c, 400, "{}", String::from_utf8_lossy(&b));
    assert_eq!(http(&s, "DELETE", "/layers/up", None).0, 204);

    // Two functions on the same shared layer, each with the example code layer on top.
    for name in ["reader", "writer"] {
        let spec = json!({
            "kernel": kernel, "initramfs": initrd, "handler": "files", "layers": ["data"], "code": code,
            "pool": {"min_ready": 1, "max": 4}
        });
        let (c, body) = http(&s, "PUT", &format!("/functions/{name}"), Some(&spec.to_string()));
        assert_eq!(c, 202, "{body}");
    }
    let missing = json!({"kernel": kernel, "initramfs": initrd, "layers": ["nope"]});
    assert_error(http(&s, "PUT", "/functions/ghost", Some(&missing.to_string())), 404, "no layer");
    assert_error(http(&s, "GET", "/functions/ghost", None), 404, "no function");
    let outside = json!({"kernel": kernel, "initramfs": initrd, "code": "/etc"});
    assert_error(http(&s, "PUT", "/functions/ghost", Some(&outside.to_string())), 403, "not in an image directory");
    wait_ready(&s, "reader", 1);
    wait_ready(&s, "writer", 1);

    // The handler lives in the code layer and reads the shared layer's files.
    let r = invoke(&s, "reader", r#"{"payload": "read /share/data/greeting.txt"}"#);
    assert_eq!(r["payload"], "hello from the shared layer\n", "{r}");
    let r = invoke(&s, "writer", r#"{"payload": "read /share/data/numbers.txt"}"#);
    let numbers = r["payload"].as_str().unwrap();
    assert_eq!((numbers.len(), &numbers[numbers.len() - 8..]), (400_000, "0049999\n"));
    let r = invoke(&s, "reader", r#"{"payload": "ls /"}"#);
    assert!(r["payload"].as_str().unwrap().contains("share"), "{r}");

    // A clone's writes to its root (even over a shared layer's file) are its own: its siblings and
    // the next clone see the layer as it was.
    let (c, body) = http(&s, "POST", "/functions/writer/acquire", None);
    assert_eq!(c, 200, "{body}");
    let h = json_of(&body);
    let mailbox = ember::channel::mailbox::Mailbox::open(Path::new(h["mailbox"].as_str().unwrap())).unwrap();
    let opts =
        || ember::channel::mailbox::CallOptions { timeout: std::time::Duration::from_secs(120), ..Default::default() };
    let call = |p: &str| String::from_utf8(mailbox.call("files", p.as_bytes(), opts()).unwrap().payload).unwrap();
    assert_eq!(call("write /share/data/greeting.txt changed"), "wrote 7 bytes");
    assert_eq!(call("write /note.txt mine"), "wrote 4 bytes");
    assert_eq!(call("read /share/data/greeting.txt"), "changed");
    assert_eq!(call("read /note.txt"), "mine");
    for _ in 0..2 {
        let r = invoke(&s, "writer", r#"{"payload": "read /share/data/greeting.txt"}"#);
        assert_eq!(r["payload"], "hello from the shared layer\n", "{r}");
        let r = invoke(&s, "writer", r#"{"payload": "read /note.txt"}"#);
        assert_eq!(r["ok"], false, "another clone saw this clone's file: {r}");
    }
    let release = json!({"lease": h["lease"]}).to_string();
    assert_eq!(http(&s, "POST", &format!("/vms/{}/release", h["id"]), Some(&release)).0, 200);

    // One host file per layer, whatever uses it: the two functions' clones read the same files.
    let images = std::fs::read_dir(dir.join("state/images/layers")).unwrap().count();
    assert_eq!(images, 2 + provided, "one data layer and one code layer, shared by both functions");
    let info = json_of(&http(&s, "GET", "/layers/data", None).1);
    assert_eq!(info["users"], json!(["reader", "writer"]), "{info}");
    let list = json_of(&http(&s, "GET", "/layers", None).1);
    assert_eq!(list["layers"].as_array().unwrap().len(), 1 + provided, "{list}");

    // A layer in use cannot be deleted; once its users are gone it can, and its image goes.
    assert_error(http(&s, "DELETE", "/layers/data", None), 409, "used by reader, writer");
    assert_eq!(http(&s, "DELETE", "/functions/reader", None).0, 204);
    assert_error(http(&s, "DELETE", "/layers/data", None), 409, "used by writer");
    assert_eq!(http(&s, "DELETE", "/functions/writer", None).0, 204);
    assert_eq!(http(&s, "DELETE", "/layers/data", None).0, 204);
    assert_error(http(&s, "DELETE", "/layers/data", None), 404, "no layer");
    let left = std::fs::read_dir(dir.join("state/images/layers")).unwrap().count();
    assert_eq!(left, provided, "images nothing references are removed");
    assert_eq!(srv.signal(libc::SIGTERM).code(), Some(0));
}

/// `ember run --snapshot-on-ready` with drives; the snapshot's path to its drives.
fn snapshot_with_layers(dir: &Path, drives: &[(&Path, &str)]) -> std::process::Output {
    let (kernel, initrd) = common::images("images_snapshot").unwrap();
    let ids: Vec<&str> = drives.iter().map(|d| d.1).collect();
    let cmdline = format!("{} ember_layers={}", ember::config::default_cmdline(), ids.join(","));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ember"));
    cmd.args(["run", "--kernel", kernel.to_str().unwrap(), "--initrd", initrd.to_str().unwrap()]).args([
        "--cmdline",
        &cmdline,
        "--timeout",
        "600",
        "--snapshot-on-ready",
        dir.join("snap").to_str().unwrap(),
    ]);
    for (path, id) in drives {
        cmd.args(["--drive", &format!("{},ro,id={id}", path.display())]);
    }
    cmd.output().unwrap()
}

#[test]
fn a_restore_is_refused_once_a_drive_changed() {
    if !common::kvm_usable("images_snapshot") || common::images("images_snapshot").is_none() {
        return;
    }
    let Some(code) = example_code("images_snapshot") else { return };
    let dir = common::scratch("images-snapshot");
    let state = dir.join("state");
    let (_, code_layer) = build_layer(&state, &code);
    // A private copy: this test changes it.
    let layer = dir.join("code.erofs");
    std::fs::copy(&code_layer, &layer).unwrap();
    let out = snapshot_with_layers(&dir, &[(&layer, "code")]);
    let console = common::text(&out.stdout);
    assert!(out.status.success(), "{console}{}", common::text(&out.stderr));
    assert!(console.contains("root from 1 layer(s): code"), "{console}");

    // The unchanged drive restores.
    let restore = || common::ember(&["restore", "--snapshot", dir.join("snap").to_str().unwrap(), "--timeout", "120"]);
    let out = restore();
    assert!(out.status.success(), "{}{}", common::text(&out.stdout), common::text(&out.stderr));
    assert!(common::text(&out.stdout).contains("EMBER_CLONE id=1"));

    // Modified in place (same size, same inode): refused, in one line.
    let f = std::fs::OpenOptions::new().write(true).open(&layer).unwrap();
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5)).unwrap();
    drop(f);
    let out = restore();
    let err = common::text(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("drive \"code\"") && err.contains("changed since the snapshot: it was modified"), "{err}");
    assert!(!common::text(&out.stdout).contains("EMBER_CLONE"), "a clone ran on a changed drive");
    // Gone: refused too.
    std::fs::remove_file(&layer).unwrap();
    let err = common::text(&restore().stderr);
    assert!(err.contains("code.erofs") && err.contains("No such file"), "{err}");
}

#[test]
fn a_drive_that_is_not_a_filesystem_fails_the_boot_with_the_guests_reason() {
    if !common::kvm_usable("images_snapshot") || common::images("images_snapshot").is_none() {
        return;
    }
    let dir = common::scratch("images-garbage");
    let garbage = dir.join("garbage.img");
    std::fs::write(&garbage, vec![0x5au8; 1 << 20]).unwrap();
    let out = snapshot_with_layers(&dir, &[(&garbage, "junk")]);
    let err = common::text(&out.stderr);
    assert!(!out.status.success(), "{}", common::text(&out.stdout));
    assert!(err.contains("never signalled ready") && err.contains("layer \"junk\" (/dev/vda)"), "{err}");
    assert!(!dir.join("snap/state").exists(), "no snapshot of a failed boot");
}

#[test]
fn image_build_is_content_addressed_and_takes_oci_images() {
    let dir = common::scratch("images-build");
    let state = dir.join("state");
    if Command::new("mkfs.erofs").arg("--help").output().is_err() {
        assert!(!common::kvm_required(), "mkfs.erofs is missing (install erofs-utils)");
        eprintln!("SKIPPED image_build: mkfs.erofs is missing");
        return;
    }
    data_tree(&dir.join("a"));
    data_tree(&dir.join("b"));
    let (d1, p1) = build_layer(&state, &dir.join("a"));
    let (d2, p2) = build_layer(&state, &dir.join("b"));
    assert_eq!((d1.clone(), p1), (d2, p2), "the same tree twice is one layer");
    let out =
        common::ember(&["image", "build", dir.join("a").to_str().unwrap(), "--state-dir", state.to_str().unwrap()]);
    assert!(common::text(&out.stdout).contains("cached"), "{}", common::text(&out.stdout));

    // An OCI image layout in a tarball (as `docker save` and skopeo write them): the upper layer
    // deletes a file of the lower one with a whiteout.
    let oci = dir.join("image.tar");
    oci_tarball(&oci);
    let (d3, p3) = build_layer(&state, &oci);
    assert_ne!(d3, d1);
    // The image itself (dump.erofs comes with mkfs.erofs in erofs-utils).
    let out = Command::new("dump.erofs").args(["--ls", "--path=/etc"]).arg(&p3).output().unwrap();
    let ls = common::text(&out.stdout);
    assert!(out.status.success() && ls.contains("kept") && !ls.contains("gone"), "{ls}");
    let ls = common::ember(&["image", "ls", "--state-dir", state.to_str().unwrap()]);
    let ls = common::text(&ls.stdout);
    assert!(ls.contains(&d1) && ls.contains(&d3), "{ls}");
    let rm = common::ember(&["image", "rm", &d3, "--state-dir", state.to_str().unwrap()]);
    assert!(rm.status.success(), "{}", common::text(&rm.stderr));
    let bad = common::ember(&["image", "build", "/nonexistent/tree", "--state-dir", state.to_str().unwrap()]);
    assert!(!bad.status.success());
    assert!(common::text(&bad.stderr).starts_with("ember: error:"), "{}", common::text(&bad.stderr));
}

/// A tar of regular files (names written as given, `..` included).
fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

/// Writes a tar of an OCI image layout: two layers, the second deleting `etc/gone` with a whiteout.
fn oci_tarball(path: &Path) {
    use sha2::{Digest, Sha256};
    let hex = |b: &[u8]| format!("{:x}", Sha256::digest(b));
    let lower = tar_of(&[("etc/kept", b"kept\n"), ("etc/gone", b"gone\n")]);
    let upper = tar_of(&[("etc/.wh.gone", b"")]);
    let config = br#"{"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}"#.to_vec();
    let layer = |b: &[u8]| json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": format!("sha256:{}", hex(b)), "size": b.len()});
    let manifest = json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{}", hex(&config)), "size": config.len()},
        "layers": [layer(&lower), layer(&upper)]
    })
    .to_string()
    .into_bytes();
    let index = json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": format!("sha256:{}", hex(&manifest)), "size": manifest.len()}]})
    .to_string();
    let blob = |b: &[u8]| format!("blobs/sha256/{}", hex(b));
    let files: Vec<(String, Vec<u8>)> = vec![
        ("oci-layout".into(), br#"{"imageLayoutVersion": "1.0.0"}"#.to_vec()),
        ("index.json".into(), index.into_bytes()),
        (blob(&manifest), manifest.clone()),
        (blob(&config), config.clone()),
        (blob(&lower), lower.clone()),
        (blob(&upper), upper.clone()),
    ];
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
    std::fs::write(path, tar_of(&refs)).unwrap();
}
