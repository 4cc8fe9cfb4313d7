//! `ember worker`: the process that runs one function's clones for the daemon. It reads its setup
//! (the template's state, its memory as a sealed memfd, how to jail itself), confines itself, then
//! restores, runs and destroys clones as the supervisor asks and reports those that end on their
//! own. Pool bookkeeping, leases and invocations stay with the supervisor, which maps each clone's
//! mailbox itself.

use std::collections::HashMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;

use super::protocol::{self, FromWorker, Received, Setup, Task, ToWorker, WORKER_FD};
use crate::config::VmConfig;
use crate::snapshot::{MemoryFile, SnapshotPaths};
use crate::template::MakeOptions;
use crate::template::Template;
use crate::vmm::persist::SnapshotState;
use crate::vmm::shell::{ShellMaker, VmShell};
use crate::vmm::{Channels, RunOptions, RunningVm};

/// How often the worker looks for clones that ended on their own.
const SWEEP: Duration = Duration::from_millis(50);
/// VM shells a serving worker keeps made ahead (each: a KVM VM with its vCPUs, tens of KiB of
/// kernel memory, and reserved but unpopulated address space).
const SHELLS_AHEAD: usize = 2;

/// Runs the worker on descriptor 3 until the supervisor closes its end (or, making a template,
/// until it is made).
pub fn run() -> Result<(), String> {
    // SAFETY: descriptor 3 is the socket the launcher handed this process, owned by nothing else.
    let sock = unsafe { UnixDatagram::from_raw_fd(WORKER_FD) };
    // SAFETY: F_SETFD on our own descriptor.
    unsafe { libc::fcntl(WORKER_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
    let (setup, fds) = match protocol::recv::<ToWorker>(&sock).map_err(|e| format!("setup: {e}"))? {
        Received::Message(ToWorker::Setup(s), fds) => (s, fds),
        Received::Message(..) => return Err("the first message was not a setup".into()),
        _ => return Err("the supervisor went away before the setup".into()),
    };
    let fail = |error: String| {
        let _ = protocol::send(&sock, &FromWorker::SetupFailed { error: error.clone() }, None);
        error
    };
    hostile::arm(&setup.function);
    match &setup.task {
        Task::Serve { state } => {
            let template = prepare_serve(&setup, state, fds).map_err(fail)?;
            protocol::send(&sock, &FromWorker::Ready, None).map_err(|e| format!("socket: {e}"))?;
            serve(&sock, &template, Path::new(&setup.run_dir));
        }
        Task::Make { vm, timeout_s } => {
            let images = prepare_make(&setup, fds).map_err(fail)?;
            protocol::send(&sock, &FromWorker::Ready, None).map_err(|e| format!("socket: {e}"))?;
            // Made in this worker's own directory; what the supervisor keeps of it goes back
            // over the socket as descriptors (it never reads a directory a worker could write).
            let dir = Path::new(&setup.run_dir).join("template");
            let sent = match make(vm, &dir, *timeout_s, &images).and_then(|ready_s| made(&dir, ready_s)) {
                Ok((reply, files)) => {
                    use std::os::fd::AsRawFd;
                    let fds: Vec<_> = files.iter().map(|f| f.as_raw_fd()).collect();
                    protocol::send_fds(&sock, &reply, &fds)
                }
                Err(error) => protocol::send(&sock, &FromWorker::MakeFailed { error }, None),
            };
            sent.map_err(|e| format!("socket: {e}"))?;
            hostile::linger(&dir);
        }
    }
    Ok(())
}

/// Opens what must be opened with rights, confines the process.
fn confine(setup: &Setup) -> Result<(), String> {
    crate::vmm::kvm().map_err(|e| e.to_string())?;
    crate::vmm::vcpu::install_kick_handler().map_err(|e| e.to_string())?;
    match &setup.jail {
        Some(j) => super::jail::enter(j, setup.max_files)?,
        None => super::jail::confine_unjailed(setup.max_files)?,
    }
    let filter = crate::seccomp::worker_filter(std::process::id()).map_err(|e| format!("seccomp: {e}"))?;
    crate::seccomp::apply(&filter).map_err(|e| format!("seccomp: {e}"))?;
    tracing::debug!(function = %setup.function, "worker confined");
    Ok(())
}

/// Confines the process, then decodes the template to serve (a state no longer decoded with the
/// rights the process starts with).
fn prepare_serve(setup: &Setup, state: &str, mut fds: Vec<OwnedFd>) -> Result<Template, String> {
    confine(setup)?;
    let memfd = fds.pop().filter(|_| fds.is_empty()).ok_or("expected the template's memory with the setup")?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(state).map_err(|e| format!("state: {e}"))?;
    let state = SnapshotState::decode(&bytes, Path::new("(setup)")).map_err(|e| e.to_string())?;
    let memory = MemoryFile::from_sealed(memfd.into(), state.machine.mem_bytes).map_err(|e| e.to_string())?;
    Ok(Template { paths: SnapshotPaths::new(PathBuf::from("/")), state, memory })
}

/// Copies the kernel and initramfs sent with the setup into memfds of this process (which it can
/// open again by path once it has dropped its rights, unlike the files they came from), then
/// confines the process. Returns the memfds (kernel, initramfs) and the TAP of the guest's network
/// card, when it has one.
fn prepare_make(setup: &Setup, mut fds: Vec<OwnedFd>) -> Result<MakeImages, String> {
    let tap = if fds.len() == 3 { fds.pop() } else { None };
    let [kernel, initramfs]: [OwnedFd; 2] =
        fds.try_into().map_err(|_| "expected the kernel and the initramfs with the setup".to_string())?;
    let copy = |from: OwnedFd, name: &std::ffi::CStr| -> Result<std::fs::File, String> {
        let mut to = crate::sys::memfd(name, false).map_err(|e| format!("memfd: {e}"))?;
        let mut from = std::fs::File::from(from);
        std::io::copy(&mut from, &mut to).map_err(|e| format!("{name:?}: {e}"))?;
        Ok(to)
    };
    let images = MakeImages { kernel: copy(kernel, c"kernel")?, initramfs: copy(initramfs, c"initramfs")?, tap };
    confine(setup)?;
    Ok(images)
}

/// What a template boot gets with its setup.
struct MakeImages {
    kernel: std::fs::File,
    initramfs: std::fs::File,
    tap: Option<OwnedFd>,
}

/// Boots `vm` from the copied images and makes its template in `dir`.
fn make(vm: &VmConfig, dir: &Path, timeout_s: f64, images: &MakeImages) -> Result<f64, String> {
    use std::os::fd::AsRawFd;
    let fd_path = |f: &std::fs::File| PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()));
    let mut opened = vm.clone();
    opened.boot_source.kernel_image_path = fd_path(&images.kernel);
    opened.boot_source.initrd_path = Some(fd_path(&images.initramfs));
    let timeout = Duration::try_from_secs_f64(timeout_s).map_err(|e| format!("timeout: {e}"))?;
    let taps = match &images.tap {
        Some(t) => vec![std::sync::Arc::new(t.try_clone().map_err(|e| format!("TAP: {e}"))?)],
        None => Vec::new(),
    };
    let opts = MakeOptions { timeout, channels: Channels { taps, ..Default::default() }, ..Default::default() };
    let made = Template::make(&opened, dir, opts).map_err(|e| e.to_string())?;
    Ok(made.ready.as_secs_f64())
}

/// What a made template is handed back as: `Made`, with the state file's bytes, the memory in a
/// sealed memfd and the working set's bytes (when one was recorded), in that order.
fn made(dir: &Path, ready_s: f64) -> Result<(FromWorker, Vec<std::fs::File>), String> {
    let paths = SnapshotPaths::new(dir);
    let bytes_in_memfd = |name: &std::ffi::CStr, bytes: &[u8]| -> Result<std::fs::File, String> {
        use std::io::Write;
        let mut f = crate::sys::memfd(name, false).map_err(|e| format!("memfd: {e}"))?;
        f.write_all(bytes).map_err(|e| format!("memfd: {e}"))?;
        Ok(f)
    };
    let template = Template::open(dir).map_err(|e| e.to_string())?;
    let mut state = std::fs::read(paths.state()).map_err(|e| format!("state: {e}"))?;
    let working_set = match std::fs::read(paths.working_set()) {
        Ok(ws) => Some(ws),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("working set: {e}")),
    };
    hostile::made(dir, &mut state);
    let mut files = vec![
        bytes_in_memfd(c"state", &state)?,
        template.memory.sealed().map_err(|e| e.to_string())?.file().try_clone().map_err(|e| e.to_string())?,
    ];
    if let Some(ws) = &working_set {
        files.push(bytes_in_memfd(c"working-set", ws)?);
    }
    Ok((FromWorker::Made { ready_s, working_set: working_set.is_some() }, files))
}

fn serve(sock: &UnixDatagram, template: &Template, run_dir: &Path) {
    let _ = protocol::set_recv_timeout(sock, SWEEP);
    let mut vms: HashMap<u64, RunningVm> = HashMap::new();
    // VMs made ahead for the next restores, on a thread of their own (without it, each restore
    // makes its VM itself).
    // Their mailboxes are anonymous memfds with their size sealed: each goes to the supervisor
    // as a descriptor, never as a file in a directory this process can write.
    let shells = ShellMaker::start(template.shell_spec(), SHELLS_AHEAD)
        .inspect_err(|e| tracing::warn!("worker: no VM shells made ahead: {e}"))
        .ok();
    // Clones are destroyed there, so that a restore asked for meanwhile does not wait for it; each
    // leaves its guest at once, before it waits there (a guest that went on running would take a
    // core from the clones being served).
    let reaper = crate::sys::Reaper::<RunningVm>::start("reaper");
    let reap = |vm: RunningVm, why: &str| {
        vm.request_stop(why);
        reaper.reap(vm);
    };
    loop {
        match protocol::recv::<ToWorker>(sock) {
            Ok(Received::Message(ToWorker::Restore { id }, fds)) => {
                hostile::restoring();
                let shell = shells.as_ref().and_then(ShellMaker::take);
                let sent = match restore(template, shell, run_dir, id, fds) {
                    Ok(vm) => {
                        use std::os::fd::AsRawFd;
                        // The clone's mailbox goes with the answer.
                        let mailbox = vm.mailbox();
                        vms.insert(id, vm);
                        hostile::mailbox(&mailbox, run_dir);
                        protocol::send(sock, &FromWorker::Restored { id }, Some(mailbox.fd().as_raw_fd()))
                    }
                    Err(error) => protocol::send(sock, &FromWorker::Failed { id, error }, None),
                };
                if sent.is_err() {
                    break;
                }
            }
            Ok(Received::Message(ToWorker::Stop { id }, _)) => {
                if let Some(vm) = vms.remove(&id) {
                    reap(vm, "destroyed");
                }
            }
            Ok(Received::Message(ToWorker::Setup(_), _)) => tracing::warn!("worker: a second setup, ignored"),
            Ok(Received::Nothing) => {}
            Ok(Received::Closed) => break,
            Err(e) => {
                tracing::error!("worker: {e}");
                break;
            }
        }
        let ended: Vec<u64> = vms.iter().filter(|(_, vm)| vm.exit().is_some()).map(|(id, _)| *id).collect();
        for id in ended {
            if let Some(vm) = vms.remove(&id) {
                let why = vm.exit().map(|e| e.to_string()).unwrap_or_default();
                reap(vm, &why);
                if protocol::send(sock, &FromWorker::Exited { id, why }, None).is_err() {
                    break;
                }
            }
        }
    }
    for (_, vm) in vms.drain() {
        reap(vm, "the supervisor went away");
    }
}

/// Restores clone `id`; `taps`: its network card's TAP, when the template has one.
fn restore(
    template: &Template,
    shell: Option<VmShell>,
    run_dir: &Path,
    id: u64,
    taps: Vec<OwnedFd>,
) -> Result<RunningVm, String> {
    let channels = Channels {
        vsock: Some(run_dir.join(format!("{id}.vsock"))),
        serve: true,
        quiet: true,
        taps: taps.into_iter().map(std::sync::Arc::new).collect(),
        ..Default::default()
    };
    template
        .restore_in(shell, id, &channels, Box::new(std::io::sink()))
        .and_then(|vm| vm.start(RunOptions::default()))
        .map_err(|e| format!("restore: {e}"))
}

/// A compromised worker, for tests: at each step, what an attacker in control of this process
/// would try against the supervisor (which must not follow any of it). Compiled only into debug
/// builds (the ones `cargo test` runs; never a release binary), and armed only by
/// `EMBER_TEST_HOSTILE_WORKER=TARGET` (a file outside the worker's directories, what the attacks
/// aim at) for a function named `hostile-links` (symlinks to TARGET planted under every name in
/// its template directory, kept up after `Made`; the clones' mailboxes truncated),
/// `hostile-drives` (its template's state names TARGET, through `..`, as a writable drive) or
/// `hostile-crash` (it dies at its first restore, before it serves).
#[cfg(debug_assertions)]
pub(super) use hostile::ENV as HOSTILE_ENV;

#[cfg(debug_assertions)]
mod hostile {
    use std::path::{Path, PathBuf};
    use std::sync::OnceLock;

    use crate::channel::mailbox::Mailbox;
    use crate::vmm::persist::SnapshotState;

    pub const ENV: &str = "EMBER_TEST_HOSTILE_WORKER";
    static ARMED: OnceLock<Option<(String, PathBuf)>> = OnceLock::new();

    pub fn arm(function: &str) {
        let armed = std::env::var_os(ENV)
            .filter(|_| function.starts_with("hostile-"))
            .map(|target| (function.trim_start_matches("hostile-").to_string(), PathBuf::from(target)));
        let _ = ARMED.set(armed);
    }

    fn target(attack: &str) -> Option<&'static Path> {
        ARMED.get()?.as_ref().filter(|(a, _)| a == attack).map(|(_, t)| t.as_path())
    }

    fn plant(dir: &Path, target: &Path) {
        for name in ["memory", "state", "working-set", "registration.json", "version"] {
            for name in [name.to_string(), format!(".{name}.tmp")] {
                let p = dir.join(name);
                let _ = std::fs::remove_file(&p);
                let _ = std::os::unix::fs::symlink(target, &p);
            }
        }
    }

    pub fn made(dir: &Path, state: &mut Vec<u8>) {
        if let Some(t) = target("links") {
            plant(dir, t);
        }
        if let Some(t) = target("drives") {
            // A path that starts lexically in the state directory and leads to the target.
            let mut path = dir.to_path_buf();
            for _ in dir.components().skip(1) {
                path.push("..");
            }
            path.push(t.strip_prefix("/").unwrap_or(t));
            if let Ok(mut s) = SnapshotState::decode(state, Path::new("(hostile)")) {
                s.devices.drives.push(crate::config::DriveConfig {
                    drive_id: "stolen".into(),
                    path_on_host: path,
                    is_root_device: false,
                    is_read_only: false,
                });
                if let Ok(bytes) = s.encode() {
                    *state = bytes;
                }
            }
        }
    }

    /// After `Made`: a compromised worker does not exit; it keeps its symlinks up in `dir`.
    pub fn linger(dir: &Path) {
        if ARMED.get().and_then(Option::as_ref).is_none() {
            return;
        }
        loop {
            if let Some(t) = target("links") {
                plant(dir, t);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// A worker that dies before it serves (`hostile-crash`): at its first restore.
    pub fn restoring() {
        if target("crash").is_some() {
            std::process::exit(3);
        }
    }

    /// After a restore (`hostile-links`): truncates the clone's mailbox, and fills its
    /// directory with as much as it can write.
    pub fn mailbox(m: &Mailbox, run_dir: &Path) {
        if target("links").is_some() {
            if let Ok(fd) = m.fd().try_clone_to_owned() {
                let f = std::fs::File::from(fd);
                let _ = f.set_len(0);
                let _ = f.set_len(4096);
            }
            if let Ok(mut f) = std::fs::File::create(run_dir.join("fill")) {
                use std::io::Write;
                let block = vec![0x5a_u8; 1 << 20];
                for _ in 0..64 {
                    if f.write_all(&block).is_err() {
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(not(debug_assertions))]
mod hostile {
    pub fn arm(_: &str) {}
    pub fn made(_: &std::path::Path, _: &mut Vec<u8>) {}
    pub fn linger(_: &std::path::Path) {}
    pub fn restoring() {}
    pub fn mailbox(_: &crate::channel::mailbox::Mailbox, _: &std::path::Path) {}
}
