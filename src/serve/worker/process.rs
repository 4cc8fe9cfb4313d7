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
use super::protocol::{self, FromWorker, Received, Setup, ToWorker};
use crate::snapshot::{MemoryFile, SnapshotPaths};
use crate::template::Template;
use crate::vmm::persist::SnapshotState;
use crate::vmm::{Channels, RunOptions, RunningVm};

/// How often the worker looks for clones that ended on their own.
const SWEEP: Duration = Duration::from_millis(50);

/// Runs the worker on descriptor 3 until the supervisor closes its end.
pub fn run() -> Result<(), String> {
    // SAFETY: descriptor 3 is the socket the launcher handed this process, owned by nothing else.
    let sock = unsafe { UnixDatagram::from_raw_fd(WORKER_FD) };
    // SAFETY: F_SETFD on our own descriptor.
    unsafe { libc::fcntl(WORKER_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
    let (setup, memfd) = match protocol::recv::<ToWorker>(&sock).map_err(|e| format!("setup: {e}"))? {
        Received::Message(ToWorker::Setup(s), Some(fd)) => (s, fd),
        Received::Message(..) => return Err("the first message was not a setup with the template's memory".into()),
        _ => return Err("the supervisor went away before the setup".into()),
    };
    let template = match prepare(&setup, memfd) {
        Ok(t) => t,
        Err(error) => {
            let _ = protocol::send(&sock, &FromWorker::SetupFailed { error: error.clone() }, None);
            return Err(error);
        }
    };
    protocol::send(&sock, &FromWorker::Ready, None).map_err(|e| format!("socket: {e}"))?;
    serve(&sock, &template, Path::new(&setup.run_dir));
    Ok(())
}

/// Decodes the template, opens what must be opened with rights, confines the process.
fn prepare(setup: &Setup, memfd: OwnedFd) -> Result<Template, String> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(&setup.state).map_err(|e| format!("state: {e}"))?;
    let state = SnapshotState::decode(&bytes, Path::new("(setup)")).map_err(|e| e.to_string())?;
    let memory = MemoryFile::from_sealed(memfd.into(), state.machine.mem_bytes).map_err(|e| e.to_string())?;
    crate::vmm::kvm().map_err(|e| e.to_string())?;
    crate::vmm::vcpu::install_kick_handler().map_err(|e| e.to_string())?;
    match &setup.jail {
        Some(j) => super::jail::enter(j, setup.max_files)?,
        None => super::jail::confine_unjailed(setup.max_files)?,
    }
    let filter = crate::seccomp::daemon_filter().map_err(|e| format!("seccomp: {e}"))?;
    crate::seccomp::apply(&filter).map_err(|e| format!("seccomp: {e}"))?;
    tracing::debug!(function = %setup.function, "worker ready");
    Ok(Template { paths: SnapshotPaths::new(PathBuf::from("/")), state, memory })
}

fn serve(sock: &UnixDatagram, template: &Template, run_dir: &Path) {
    let _ = protocol::set_recv_timeout(sock, SWEEP);
    let mut vms: HashMap<u64, RunningVm> = HashMap::new();
    loop {
        match protocol::recv::<ToWorker>(sock) {
            Ok(Received::Message(ToWorker::Restore { id }, _)) => {
                let reply = match restore(template, run_dir, id) {
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
                    vm.stop("destroyed");
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
                let why = vm.wait(Some(Duration::ZERO)).exit.to_string();
                if protocol::send(sock, &FromWorker::Exited { id, why }, None).is_err() {
                    break;
                }
            }
        }
    }
    for (_, vm) in vms.drain() {
        vm.stop("the supervisor went away");
    }
}

fn restore(template: &Template, run_dir: &Path, id: u64) -> Result<RunningVm, String> {
    let channels = Channels {
        mailbox: Some(run_dir.join(format!("{id}.mailbox"))),
        vsock: Some(run_dir.join(format!("{id}.vsock"))),
        serve: true,
        ..Default::default()
    };
    template
        .restore(id, &channels, Box::new(std::io::sink()))
        .and_then(|vm| vm.start(RunOptions::default()))
        .map_err(|e| format!("restore: {e}"))
}
