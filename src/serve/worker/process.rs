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

use super::launcher::WORKER_FD;
use super::protocol::{self, FromWorker, Received, Setup, Task, ToWorker};
use crate::config::DriveConfig;
use crate::serve::model::FunctionSpec;
use crate::snapshot::{MemoryFile, SnapshotPaths};
use crate::template::MakeOptions;
use crate::template::Template;
use crate::vmm::persist::SnapshotState;
use crate::vmm::shell::{ShellMaker, ShellSpec, VmShell};
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
    match &setup.task {
        Task::Serve { state } => {
            let template = prepare_serve(&setup, state, fds).map_err(fail)?;
            protocol::send(&sock, &FromWorker::Ready, None).map_err(|e| format!("socket: {e}"))?;
            serve(&sock, &template, Path::new(&setup.run_dir));
        }
        Task::Make { spec, drives, dir, timeout_s } => {
            let images = prepare_make(&setup, fds).map_err(fail)?;
            protocol::send(&sock, &FromWorker::Ready, None).map_err(|e| format!("socket: {e}"))?;
            let reply = match make(spec, drives, Path::new(dir), *timeout_s, &images) {
                Ok(ready_s) => FromWorker::Made { ready_s },
                Err(error) => FromWorker::MakeFailed { error },
            };
            protocol::send(&sock, &reply, None).map_err(|e| format!("socket: {e}"))?;
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
    let filter = crate::seccomp::daemon_filter().map_err(|e| format!("seccomp: {e}"))?;
    crate::seccomp::apply(&filter).map_err(|e| format!("seccomp: {e}"))?;
    tracing::debug!(function = %setup.function, "worker confined");
    Ok(())
}

/// Decodes the template to serve, then confines the process.
fn prepare_serve(setup: &Setup, state: &str, mut fds: Vec<OwnedFd>) -> Result<Template, String> {
    let memfd = fds.pop().filter(|_| fds.is_empty()).ok_or("expected the template's memory with the setup")?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(state).map_err(|e| format!("state: {e}"))?;
    let state = SnapshotState::decode(&bytes, Path::new("(setup)")).map_err(|e| e.to_string())?;
    let memory = MemoryFile::from_sealed(memfd.into(), state.machine.mem_bytes).map_err(|e| e.to_string())?;
    confine(setup)?;
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
        // SAFETY: the name is NUL-terminated; a non-negative result is a new fd that we own.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(format!("memfd: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just created and nothing else owns it.
        let mut to = unsafe { std::fs::File::from_raw_fd(fd) };
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

/// Boots `spec`'s guest from the copied images and makes its template in `dir`.
fn make(
    spec: &FunctionSpec,
    drives: &[DriveConfig],
    dir: &Path,
    timeout_s: f64,
    images: &MakeImages,
) -> Result<f64, String> {
    use std::os::fd::AsRawFd;
    let fd_path = |f: &std::fs::File| PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()));
    let opened =
        FunctionSpec { kernel: fd_path(&images.kernel), initramfs: fd_path(&images.initramfs), ..spec.clone() };
    let timeout = Duration::try_from_secs_f64(timeout_s).map_err(|e| format!("timeout: {e}"))?;
    let taps = match &images.tap {
        Some(t) => vec![std::sync::Arc::new(t.try_clone().map_err(|e| format!("TAP: {e}"))?)],
        None => Vec::new(),
    };
    let opts = MakeOptions { timeout, channels: Channels { taps, ..Default::default() }, ..Default::default() };
    let made = Template::make(&opened.vm_config_with_drives(drives.to_vec()), dir, opts).map_err(|e| e.to_string())?;
    Ok(made.ready.as_secs_f64())
}

fn serve(sock: &UnixDatagram, template: &Template, run_dir: &Path) {
    let _ = protocol::set_recv_timeout(sock, SWEEP);
    let mut vms: HashMap<u64, RunningVm> = HashMap::new();
    // VMs made ahead for the next restores, on a thread of their own (without it, each restore
    // makes its VM itself).
    // Their mailboxes made in the run directory, where a restore names them.
    let spec = ShellSpec { mailbox_dir: Some(run_dir.to_path_buf()), ..template.shell_spec() };
    let shells = ShellMaker::start(spec, SHELLS_AHEAD)
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
                let shell = shells.as_ref().and_then(ShellMaker::take);
                let reply = match restore(template, shell, run_dir, id, fds) {
                    Ok(vm) => {
                        vms.insert(id, vm);
                        FromWorker::Restored { id }
                    }
                    Err(error) => FromWorker::Failed { id, error },
                };
                if protocol::send(sock, &reply, None).is_err() {
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
        mailbox: Some(run_dir.join(format!("{id}.mailbox"))),
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
