//! The function's root filesystem, from its layers: read-only EROFS images on virtio-blk drives
//! (`ember_layers=ID,ID,...` on the kernel command line, bottom to top, each the drive id the host
//! gave it, which the guest reads as `/sys/block/vdX/serial`), stacked with overlayfs under a
//! writable upper directory on tmpfs. A clone's writes land in its own RAM (copy-on-write pages
//! of the template's), never on a drive, and are gone with the clone.
//!
//! The agent itself stays in the initramfs; the runtime is started chrooted into [`ROOT`].

use std::ffi::CString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Where the stacked root is mounted.
pub const ROOT: &str = "/rootfs";
/// The kernel command-line parameter (init's environment) that names the layers.
pub const LAYERS_ENV: &str = "ember_layers";
const LAYER_MOUNTS: &str = "/layers";
const SCRATCH: &str = "/scratch";
/// How many layers a function may stack (overlayfs allows up to 500; a VM has at most 19 drives).
const MAX_LAYERS: usize = 19;

/// Mounts the layers the command line names and stacks them at [`ROOT`]; `None` when it names
/// none (the initramfs is the function's root).
pub fn mount_root() -> io::Result<Option<PathBuf>> {
    let ids = match std::env::var(LAYERS_ENV) {
        Ok(v) if !v.trim().is_empty() => v,
        _ => return Ok(None),
    };
    let ids: Vec<&str> = ids.split(',').map(str::trim).collect();
    if ids.len() > MAX_LAYERS || ids.iter().any(|i| i.is_empty()) {
        return Err(io::Error::other(format!("{LAYERS_ENV}: expected 1 to {MAX_LAYERS} drive ids, got {ids:?}")));
    }
    let drives = drives_by_serial()?;
    let mut lower = Vec::with_capacity(ids.len());
    for (i, id) in ids.iter().enumerate() {
        let dev = drives
            .iter()
            .find(|(serial, _)| serial == id)
            .map(|(_, dev)| dev.clone())
            .ok_or_else(|| io::Error::other(format!("layer {id:?}: no drive with that id")))?;
        let target = format!("{LAYER_MOUNTS}/{i}");
        mount(&dev, &target, "erofs", libc::MS_RDONLY | libc::MS_NODEV, None)
            .map_err(|e| io::Error::other(format!("layer {id:?} ({dev}): {e}")))?;
        lower.push(target);
    }
    // The writable upper directory and overlayfs's work directory, in guest RAM.
    mount("tmpfs", SCRATCH, "tmpfs", libc::MS_NODEV, Some("mode=0755"))?;
    for d in ["upper", "work"] {
        fs::create_dir_all(Path::new(SCRATCH).join(d))?;
    }
    // overlayfs lists the topmost lower layer first.
    lower.reverse();
    let options = format!("lowerdir={},upperdir={SCRATCH}/upper,workdir={SCRATCH}/work", lower.join(":"));
    mount("overlay", ROOT, "overlay", libc::MS_NODEV, Some(&options))?;
    mount("proc", &format!("{ROOT}/proc"), "proc", 0, None)?;
    mount("sysfs", &format!("{ROOT}/sys"), "sysfs", 0, None)?;
    mount("/dev", &format!("{ROOT}/dev"), "", libc::MS_BIND, None)?;
    mount("tmpfs", &format!("{ROOT}/tmp"), "tmpfs", libc::MS_NODEV, Some("mode=1777"))?;
    println!("ember-agent: root from {} layer(s): {}", ids.len(), ids.join(" < "));
    Ok(Some(PathBuf::from(ROOT)))
}

/// Every virtio disk and its serial (the drive id), as `/dev/vdX`.
fn drives_by_serial() -> io::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for e in fs::read_dir("/sys/block")? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if !name.starts_with("vd") {
            continue;
        }
        let serial = fs::read_to_string(format!("/sys/block/{name}/serial")).unwrap_or_default();
        out.push((serial.trim_end_matches(['\0', '\n']).to_string(), format!("/dev/{name}")));
    }
    Ok(out)
}

/// mount(2), creating the target directory first.
pub fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: Option<&str>) -> io::Result<()> {
    fs::create_dir_all(target).map_err(|e| io::Error::other(format!("mkdir {target}: {e}")))?;
    let c = |s: &str| CString::new(s).map_err(io::Error::other);
    let (src, tgt, fst) = (c(source)?, c(target)?, c(fstype)?);
    let data = data.map(c).transpose()?;
    let data_ptr = data.as_ref().map_or(std::ptr::null(), |d| d.as_ptr().cast());
    // SAFETY: all pointers are valid NUL-terminated strings (or null for no data) that outlive
    // the call.
    let rc = unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), fst.as_ptr(), flags, data_ptr) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(io::Error::other(format!("mount {fstype} {source} on {target}: {e}")));
        }
    }
    Ok(())
}
