//! Templates: a guest booted once to its agent's "ready", snapshotted there, and opened again to
//! restore any number of clones. The one place where templates are made (boot -> run paused on
//! ready -> wait -> pause -> snapshot -> stop -> record the working set) and opened, for the CLI,
//! the daemon, the benchmarks and the tests alike.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::config::VmConfig;
use crate::devices::serial::ConsoleOut;
use crate::snapshot::working_set::WorkingSet;
use crate::snapshot::{MemoryFile, SnapshotError, SnapshotPaths};
use crate::vmm::exit::VmExit;
use crate::vmm::persist::SnapshotState;
use crate::vmm::shell::{ShellSpec, VmShell};
use crate::vmm::vcpu_state::VcpuState;
use crate::vmm::{Channels, RunOptions, Vm, VmError};

/// How long the clone that records a template's working set runs (it usually ends sooner: without
/// `serve`, the guest agent powers off after the restore).
pub const WORKING_SET_WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum TemplateError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The guest ended, or the time ran out, before its agent signalled ready: no snapshot taken.
    /// With the agent's own reason when it printed one.
    #[error("the guest never signalled ready, no snapshot taken ({exit}){}", reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default())]
    NeverReady { exit: VmExit, reason: Option<String> },
}

/// A console that keeps the last [`ConsoleTail::KEEP`] bytes the guest printed: a failed boot's
/// reason, in the guest's words, without keeping (or printing) a whole boot log.
#[derive(Clone, Default)]
pub struct ConsoleTail(std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<u8>>>);

impl ConsoleTail {
    pub const KEEP: usize = 16 << 10;

    /// The last line the guest agent printed about an error, if any.
    pub fn agent_error(&self) -> Option<String> {
        use crate::sys::Locked;
        let bytes: Vec<u8> = self.0.locked().iter().copied().collect();
        let text = String::from_utf8_lossy(&bytes);
        text.lines().rev().find(|l| l.contains("ember-agent: error")).map(|l| l.trim().chars().take(1000).collect())
    }
}

impl std::io::Write for ConsoleTail {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        use crate::sys::Locked;
        let mut q = self.0.locked();
        let kept = &b[b.len().saturating_sub(Self::KEEP)..];
        let over = (q.len() + kept.len()).saturating_sub(Self::KEEP);
        q.drain(..over);
        q.extend(kept);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// How to make a template.
pub struct MakeOptions {
    /// The template VM's channels (its agent serves after "ready" if they ask for it; clones get
    /// their own).
    pub channels: Channels,
    pub console: ConsoleOut,
    /// Bytes read from this fd go to the guest console while it boots.
    pub console_input: Option<OwnedFd>,
    /// Confine the vCPU threads with seccomp.
    pub seccomp: bool,
    /// How long the guest may take to signal ready.
    pub timeout: Duration,
    /// Record the working set (one clone runs after the snapshot).
    pub working_set: bool,
    /// Anchors the boot timeline.
    pub process_start: Instant,
}

impl Default for MakeOptions {
    fn default() -> Self {
        Self {
            channels: Channels::default(),
            console: Box::new(std::io::sink()),
            console_input: None,
            seccomp: true,
            timeout: Duration::from_secs(600),
            working_set: true,
            process_start: Instant::now(),
        }
    }
}

/// A template just made, with what making it took.
pub struct Made {
    pub template: Template,
    /// VM start -> the agent's ready doorbell (the boot).
    pub ready: Duration,
    pub pause: Duration,
    pub save: Duration,
    pub working_set: Option<WorkingSet>,
}

/// An opened template: its files checked, its state decoded, its memory file open for mapping.
///
/// Restoring a clone of a template that `ember run --snapshot` or [`Template::make`] wrote, and
/// invoking its agent through the mailbox:
///
/// ```no_run
/// use ember::channel::mailbox::CallOptions;
/// use ember::template::Template;
/// use ember::vmm::{Channels, RunOptions};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let template = Template::open(std::path::Path::new("/var/lib/ember/templates/hello"))?;
/// // Clone 1 of the template: its own mailbox, its agent serving; the console discarded.
/// let channels = Channels { serve: true, ..Default::default() };
/// let vm = template.restore(1, &channels, Box::new(std::io::sink()))?.start(RunOptions::default())?;
/// let answer = vm.invoke("echo", b"hi", CallOptions::default())?;
/// assert_eq!(answer.payload, b"hi");
/// vm.stop("done");
/// # Ok(())
/// # }
/// ```
pub struct Template {
    pub paths: SnapshotPaths,
    pub state: SnapshotState,
    pub memory: MemoryFile,
}

impl Template {
    /// Opens the template in `dir`: reads and checks its state file, opens its memory file.
    pub fn open(dir: &Path) -> Result<Self, SnapshotError> {
        let paths = SnapshotPaths::new(dir);
        let state = SnapshotState::read(&paths)?;
        let memory = MemoryFile::open(&paths.memory(), state.machine.mem_bytes)?;
        Ok(Self { paths, state, memory })
    }

    /// Boots `config`, runs it until its agent signals ready (paused at that very instruction),
    /// snapshots it into `dir` and stops it; then, if asked, records the working set from one
    /// clone's run into `dir` too.
    pub fn make(config: &VmConfig, dir: &Path, opts: MakeOptions) -> Result<Made, TemplateError> {
        let start = Instant::now();
        // The console goes where the caller wants it, and its tail is kept for a failure's reason.
        let tail = ConsoleTail::default();
        let console: ConsoleOut = Box::new(Tee(opts.console, tail.clone()));
        let vm = Vm::boot(config, &opts.channels, console, opts.process_start)?;
        let options = RunOptions {
            seccomp: opts.seccomp,
            console_input: opts.console_input,
            pause_on_ready: true,
            ..Default::default()
        };
        let running = vm.start(options)?;
        if !running.wait_ready(opts.timeout) {
            let outcome = match running.exit() {
                Some(_) => running.wait(Some(Duration::ZERO)),
                None => running.stop(&format!("timed out after {:.1} s", opts.timeout.as_secs_f64())),
            };
            return Err(TemplateError::NeverReady { exit: outcome.exit, reason: tail.agent_error() });
        }
        let ready = start.elapsed();
        let t = Instant::now();
        running.pause()?;
        let pause = t.elapsed();
        running.snapshot(dir)?;
        let save = t.elapsed() - pause;
        running.stop("template taken");
        tracing::info!(
            "template written to {} (ready after {:.1} s; pause {:.3} ms, save {:.3} ms)",
            dir.display(),
            ready.as_secs_f64(),
            pause.as_secs_f64() * 1e3,
            save.as_secs_f64() * 1e3
        );
        let template = Self::open(dir)?;
        if template.timer_was_due() {
            tracing::info!(
                "the guest's timer was due when the template was saved: each clone takes that interrupt \
                 (its kernel's tick) before anything else"
            );
        }
        let working_set = match opts.working_set {
            true => {
                // The clone gets the boot's network card back (the booted VM has stopped).
                let channels = Channels { taps: opts.channels.taps.clone(), ..Default::default() };
                let ws = template.record_working_set_with(WORKING_SET_WINDOW, &channels)?;
                ws.save(&template.paths.working_set())?;
                tracing::info!(
                    "working set recorded: {} pages read, {} pages written",
                    ws.read_pages(),
                    ws.written_pages()
                );
                Some(ws)
            }
            false => None,
        };
        Ok(Made { template, ready, pause, save, working_set })
    }

    /// A new clone of the template, ready to start: `clone_id` (1 and up) is what its guest reads
    /// from its control page, with fresh seed material.
    pub fn restore(&self, clone_id: u64, channels: &Channels, console: ConsoleOut) -> Result<Vm, VmError> {
        Vm::restore(&self.state, &self.memory, clone_id, channels, console)
    }

    /// [`Template::restore`] into `shell`, a VM made ahead for this template (see
    /// [`crate::vmm::shell`]); one is made now when none is given or it does not fit.
    pub fn restore_in(
        &self,
        shell: Option<VmShell>,
        clone_id: u64,
        channels: &Channels,
        console: ConsoleOut,
    ) -> Result<Vm, VmError> {
        Vm::restore_in(shell, &self.state, &self.memory, clone_id, channels, console)
    }

    /// Whether a vCPU's timer (the guest kernel's tick) was due when the template was saved: each
    /// clone then takes that interrupt before anything else.
    pub fn timer_was_due(&self) -> bool {
        self.state.vcpus.iter().any(VcpuState::timer_was_due)
    }

    /// What a VM shell must be made with to take this template's clones (its memory mapped
    /// when the shell is made, when the file can be opened again).
    pub fn shell_spec(&self) -> ShellSpec {
        let memory = self.memory.try_clone().ok().map(std::sync::Arc::new);
        ShellSpec { memory, ..ShellSpec::of(&self.state) }
    }

    /// The template with its memory held in a sealed copy (see [`MemoryFile::sealed`]): what a
    /// long-running process that restores clones for a long time (`ember serve`) keeps, so that
    /// nothing done to the files on disk can fault it.
    pub fn sealed(self) -> Result<Self, SnapshotError> {
        let memory = self.memory.sealed()?;
        Ok(Self { memory, ..self })
    }

    /// The recorded working set, if the template has one.
    pub fn working_set(&self) -> Result<Option<WorkingSet>, SnapshotError> {
        WorkingSet::load(&self.paths.working_set(), self.state.machine.mem_bytes)
    }

    /// Records the template's working set: restores one clone (console off), lets it run until
    /// its guest ends it or `window` passes, and reads which pages it read and wrote.
    pub fn record_working_set(&self, window: Duration) -> Result<WorkingSet, VmError> {
        self.record_working_set_with(window, &Channels::default())
    }

    /// [`Template::record_working_set`] with the clone's `channels` (its TAPs).
    pub fn record_working_set_with(&self, window: Duration, channels: &Channels) -> Result<WorkingSet, VmError> {
        let vm = self.restore(1, channels, Box::new(std::io::sink()))?.start(RunOptions::default())?;
        let _ = vm.poll(window);
        vm.pause().or_else(|e| if matches!(e, VmError::Ended(_)) { Ok(()) } else { Err(e) })?;
        let ws = vm.record_working_set().map_err(VmError::WorkingSet)?;
        vm.stop("working set recorded");
        Ok(ws)
    }
}

/// Writes to both.
struct Tee(ConsoleOut, ConsoleTail);

impl std::io::Write for Tee {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let _ = self.1.write(b);
        self.0.write(b)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn the_console_tail_is_bounded_and_finds_the_agents_reason() {
        let mut t = ConsoleTail::default();
        for _ in 0..10_000 {
            t.write_all(b"[    1.0] some kernel line\n").unwrap();
        }
        assert_eq!(t.agent_error(), None);
        t.write_all(b"ember-agent: error: layer \"l0\" (/dev/vda): mount erofs: Invalid argument\n").unwrap();
        t.write_all(&[b'x'; 100]).unwrap();
        assert!(t.agent_error().unwrap().contains("mount erofs"));
        t.write_all(&vec![b'y'; 100_000]).unwrap();
        assert_eq!(t.0.lock().unwrap().len(), ConsoleTail::KEEP);
        assert_eq!(t.agent_error(), None);
    }
}
