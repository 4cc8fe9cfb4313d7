//! A cgroup per worker: its memory (the guest pages its clones write, its own heap), its tasks and,
//! when asked, its CPU time are capped, all clones of the function together. cgroup v2 when the
//! host has its controllers (under `/sys/fs/cgroup/ember-<id>`), else cgroup v1's memory, pids and
//! cpu hierarchies (under the daemon's own cgroup in each). `<id>` names the daemon's state
//! directory, so a restarted daemon finds and removes what a killed one left.

use std::path::{Path, PathBuf};

/// What one worker may use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CgroupLimits {
    pub memory_bytes: u64,
    pub pids: u64,
    /// CPUs' worth of time per period, if capped.
    pub cpus: Option<f64>,
}

const V2_ROOT: &str = "/sys/fs/cgroup";
const V1_CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];
const CPU_PERIOD_US: u64 = 100_000;

/// Where a daemon's worker cgroups go.
#[derive(Debug, Clone)]
pub enum CgroupBase {
    V2(PathBuf),
    /// One directory per controller: (controller, directory).
    V1(Vec<(&'static str, PathBuf)>),
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value).map_err(|e| format!("{}: {e}", path.display()))
}

impl CgroupBase {
    /// Finds (and creates) the base for the daemon whose state directory is named by `id`; None
    /// when this host has no usable cgroup controllers (or this process may not use them).
    pub fn open(id: &str) -> Result<Self, String> {
        let name = format!("ember-{id}");
        if Path::new(V2_ROOT).join("cgroup.controllers").exists() {
            let base = Path::new(V2_ROOT).join(&name);
            // The root may hand controllers down (it is exempt from "no internal processes").
            for c in ["+memory", "+pids", "+cpu"] {
                let _ = write(&Path::new(V2_ROOT).join("cgroup.subtree_control"), c);
            }
            std::fs::create_dir_all(&base).map_err(|e| format!("{}: {e}", base.display()))?;
            write(&base.join("cgroup.subtree_control"), "+memory +pids")?;
            let _ = write(&base.join("cgroup.subtree_control"), "+cpu");
            return Ok(Self::V2(base));
        }
        let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| format!("/proc/self/cgroup: {e}"))?;
        // This process's own cgroup in `controller`'s hierarchy (relative to its mount).
        let own_path = |controller: &str| -> String {
            own.lines()
                .filter_map(|l| {
                    let mut f = l.splitn(3, ':').skip(1);
                    f.next().zip(f.next())
                })
                .find(|(ctrls, _)| ctrls.split(',').any(|x| x == controller))
                .map(|(_, p)| p.trim_start_matches('/').to_string())
                .unwrap_or_default()
        };
        let mut dirs = Vec::new();
        for c in V1_CONTROLLERS {
            let mount = Path::new(V2_ROOT).join(c);
            if !mount.join("cgroup.procs").exists() {
                return Err(format!("no cgroup v1 {c} hierarchy at {}", mount.display()));
            }
            let base = mount.join(own_path(c)).join(&name);
            std::fs::create_dir_all(&base).map_err(|e| format!("{}: {e}", base.display()))?;
            dirs.push((c, base));
        }
        // CPU time is cpuacct's: a hierarchy of its own on some hosts, mounted with cpu on others
        // (then its files are in the cpu directory).
        let (cpu, cpuacct) = (Path::new(V2_ROOT).join("cpu"), Path::new(V2_ROOT).join("cpuacct"));
        if cpuacct.join("cgroup.procs").exists() && cpu.canonicalize().ok() != cpuacct.canonicalize().ok() {
            let base = cpuacct.join(own_path("cpuacct")).join(&name);
            if std::fs::create_dir_all(&base).is_ok() {
                dirs.push(("cpuacct", base));
            }
        }
        Ok(Self::V1(dirs))
    }

    fn dirs(&self) -> Vec<PathBuf> {
        match self {
            Self::V2(d) => vec![d.clone()],
            Self::V1(ds) => ds.iter().map(|(_, d)| d.clone()).collect(),
        }
    }

    /// Removes the cgroups of workers that are gone (a daemon killed before it could), its own and
    /// those of other ember daemons' bases beside it that hold no process (and such bases once
    /// empty): those there now, retried in the background for a while (the kernel lets go of a
    /// dead worker's cgroup only once its VMs are torn down).
    pub fn remove_stale(&self) {
        let mut stale: Vec<PathBuf> = Vec::new();
        for base in self.dirs() {
            let own = base.file_name().map(|n| n.to_os_string());
            let parent = base.parent().map(Path::to_path_buf).unwrap_or_default();
            for b in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
                let name = b.file_name();
                if !name.to_string_lossy().starts_with("ember-") || !b.path().is_dir() {
                    continue;
                }
                for e in std::fs::read_dir(b.path()).into_iter().flatten().flatten() {
                    // Another daemon's cgroup with no process that is more than a minute old (not
                    // one it has just made for a worker about to join it).
                    let old = e
                        .metadata()
                        .and_then(|m| m.modified())
                        .is_ok_and(|t| t.elapsed().is_ok_and(|a| a.as_secs() > 60));
                    let idle = old
                        && std::fs::read_to_string(e.path().join("cgroup.procs")).is_ok_and(|p| p.trim().is_empty());
                    if e.file_type().is_ok_and(|t| t.is_dir()) && (Some(&name) == own.as_ref() || idle) {
                        stale.push(e.path());
                    }
                }
                if Some(&name) != own.as_ref() {
                    stale.push(b.path());
                }
            }
        }
        let mut left: Vec<PathBuf> = stale.into_iter().filter(|d| std::fs::remove_dir(d).is_err()).collect();
        // Other daemons' bases that still hold cgroups are theirs.
        left.retain(|d| self.dirs().iter().any(|b| d.starts_with(b)));
        if left.is_empty() {
            return;
        }
        let spawned = std::thread::Builder::new().name("cgroup-cleanup".into()).spawn(move || {
            for _ in 0..300 {
                std::thread::sleep(std::time::Duration::from_millis(100));
                left.retain(|d| d.exists() && std::fs::remove_dir(d).is_err());
                if left.is_empty() {
                    return;
                }
            }
            for d in left {
                tracing::warn!("cannot remove the stale cgroup {}", d.display());
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("cannot start the cgroup cleanup: {e}");
        }
    }

    /// Removes the bases (at shutdown, once every worker's cgroup has gone).
    pub fn remove(&self) {
        for d in self.dirs() {
            let _ = std::fs::remove_dir(d);
        }
    }

    /// Creates the cgroup `name` with `limits`.
    pub fn create(&self, name: &str, limits: &CgroupLimits) -> Result<Cgroup, String> {
        let controllers = match self {
            Self::V2(_) => Vec::new(),
            Self::V1(ds) => ds.iter().map(|(c, _)| *c).collect(),
        };
        let cg = Cgroup {
            dirs: self.dirs().iter().map(|d| d.join(name)).collect(),
            controllers,
            v2: matches!(self, Self::V2(_)),
        };
        for (d, base) in cg.dirs.iter().zip(self.dirs()) {
            // (Another daemon's sweep may have removed an empty base meanwhile.)
            let _ = std::fs::create_dir(&base);
            std::fs::create_dir(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        cg.set(limits).inspect_err(|_| cg.remove())?;
        Ok(cg)
    }
}

/// One worker's cgroup.
#[derive(Debug)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
    /// cgroup v1: each directory's controller.
    controllers: Vec<&'static str>,
    v2: bool,
}

impl Cgroup {
    fn dir(&self, controller: &str) -> &Path {
        self.try_dir(controller).unwrap_or(&self.dirs[0])
    }

    /// The directory of `controller` (v1), if the worker has one of its own.
    fn try_dir(&self, controller: &str) -> Option<&Path> {
        if self.v2 {
            return self.dirs.first().map(PathBuf::as_path);
        }
        self.controllers.iter().position(|c| *c == controller).map(|i| self.dirs[i].as_path())
    }

    fn set(&self, l: &CgroupLimits) -> Result<(), String> {
        let quota = l.cpus.map(|c| ((c * CPU_PERIOD_US as f64) as u64).max(1000));
        if self.v2 {
            let d = self.dir("memory");
            write(&d.join("memory.max"), &l.memory_bytes.to_string())?;
            let _ = write(&d.join("memory.swap.max"), "0");
            write(&d.join("pids.max"), &l.pids.to_string())?;
            if let Some(q) = quota {
                write(&d.join("cpu.max"), &format!("{q} {CPU_PERIOD_US}"))?;
            }
        } else {
            write(&self.dir("memory").join("memory.limit_in_bytes"), &l.memory_bytes.to_string())?;
            write(&self.dir("pids").join("pids.max"), &l.pids.to_string())?;
            if let Some(q) = quota {
                write(&self.dir("cpu").join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                write(&self.dir("cpu").join("cpu.cfs_quota_us"), &q.to_string())?;
            }
        }
        Ok(())
    }

    /// The `cgroup.procs` files a process writes to join.
    pub fn procs(&self) -> Vec<String> {
        self.dirs.iter().map(|d| d.join("cgroup.procs").display().to_string()).collect()
    }

    /// The memory cgroup's directory (reported by the API).
    pub fn path(&self) -> String {
        self.dir("memory").display().to_string()
    }

    /// Processes the kernel's OOM killer killed in this cgroup (its memory limit reached).
    pub fn oom_kills(&self) -> u64 {
        let file = if self.v2 { "memory.events" } else { "memory.oom_control" };
        std::fs::read_to_string(self.dir("memory").join(file))
            .ok()
            .and_then(|t| t.lines().find_map(|l| l.strip_prefix("oom_kill ").and_then(|n| n.trim().parse().ok())))
            .unwrap_or(0)
    }

    /// Periods in which the kernel throttled the worker for using up its CPU cap.
    /// CPU time the worker's processes used, so far, in microseconds.
    pub fn cpu_used_us(&self) -> Option<u64> {
        if self.v2 {
            std::fs::read_to_string(self.dir("cpu").join("cpu.stat"))
                .ok()?
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec ").and_then(|n| n.trim().parse().ok()))
        } else {
            // cgroup v1: cpuacct's count, in nanoseconds (in the cpu directory where the two are
            // mounted together).
            let dir = self.try_dir("cpuacct").or_else(|| self.try_dir("cpu"))?;
            let ns: u64 = std::fs::read_to_string(dir.join("cpuacct.usage")).ok()?.trim().parse().ok()?;
            Some(ns / 1000)
        }
    }

    /// Scheduler periods in which the CPU cap throttled the worker, so far.
    pub fn cpu_throttled(&self) -> Option<u64> {
        std::fs::read_to_string(self.dir("cpu").join("cpu.stat"))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("nr_throttled ").and_then(|n| n.trim().parse().ok()))
    }

    /// The memory limit as the kernel has it.
    pub fn memory_limit(&self) -> Option<u64> {
        let file = if self.v2 { "memory.max" } else { "memory.limit_in_bytes" };
        std::fs::read_to_string(self.dir("memory").join(file)).ok().and_then(|t| t.trim().parse().ok())
    }

    /// Removes the cgroup (once its processes are gone; a few tries while the kernel lets go).
    pub fn remove(&self) {
        for d in &self.dirs {
            for _ in 0..50 {
                match std::fs::remove_dir(d) {
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        std::thread::sleep(std::time::Duration::from_millis(10))
                    }
                    _ => break,
                }
            }
        }
    }
}
