//! Snapshots and clones of a real guest: the guest is booted once per test binary up to its agent's
//! "ready" doorbell and snapshotted there (the template); every test restores clones of it.

mod common;

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{ember, text, Capture};
use ember::snapshot;
use ember::template::Template;
use ember::vmm::exit::VmExit;
use ember::vmm::{Channels, RunOptions};

const CLONE_TIMEOUT: Duration = Duration::from_secs(120);

fn file_hash(path: &Path) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::fs::read(path).unwrap().hash(&mut h);
    h.finish()
}

/// The `random=` value of the clone's marker line, checking its id.
fn clone_random(console: &str, id: u64) -> String {
    let line = console.lines().find(|l| l.contains("EMBER_CLONE")).unwrap_or_else(|| panic!("no marker:\n{console}"));
    assert!(line.contains(&format!("EMBER_CLONE id={id} ")), "clone {id}: {line}");
    line.split("random=").nth(1).expect("random").trim().to_string()
}

#[test]
fn eight_concurrent_clones_continue_from_the_snapshot_with_their_own_id_and_entropy() {
    let _one = common::one_at_a_time();
    let Some(dir) = common::template("eight_concurrent_clones") else { return };
    let template = Template::open(dir).unwrap();
    let before = file_hash(&template.paths.memory());
    let mut clones = Vec::new();
    for id in 1..=8u64 {
        let cap = Capture::default();
        let vm = template.restore(id, &Channels::default(), Box::new(cap.clone())).expect("restore");
        clones.push((id, cap, vm.start(RunOptions::default()).expect("start")));
    }
    let mut randoms = HashSet::new();
    for (id, cap, vm) in clones {
        let out = vm.wait(Some(CLONE_TIMEOUT));
        let console = cap.text();
        assert_eq!(out.exit, VmExit::PowerOff, "clone {id}:\n{console}");
        // It went on from the snapshot point: nothing of the boot is printed again.
        assert!(!console.contains("Run /init"), "clone {id} booted again:\n{console}");
        assert!(randoms.insert(clone_random(&console, id)), "clone {id} repeats a sibling's random bytes");
        assert!(out.timeline.first_io.is_some());
    }
    // A clone whose console the host discards (`quiet`) is told so and prints no line of its own.
    let cap = Capture::default();
    let quiet = Channels { quiet: true, ..Default::default() };
    let vm = template.restore(9, &quiet, Box::new(cap.clone())).expect("restore");
    let out = vm.start(RunOptions::default()).expect("start").wait(Some(CLONE_TIMEOUT));
    assert_eq!(out.exit, VmExit::PowerOff, "quiet clone:\n{}", cap.text());
    assert!(!cap.text().contains("EMBER_CLONE"), "a quiet clone printed its marker:\n{}", cap.text());
    // The clones' writes went to their private copies, never to the memory file.
    assert_eq!(file_hash(&template.paths.memory()), before, "the snapshot's memory file changed");
}

#[test]
fn a_snapshot_of_a_clone_restores_too() {
    let _one = common::one_at_a_time();
    let Some(dir) = common::template("a_snapshot_of_a_clone_restores_too") else { return };
    let template = Template::open(dir).unwrap();
    let vm = template.restore(1, &Channels::default(), Box::new(std::io::sink())).unwrap();
    let vm = vm.start(RunOptions { start_paused: true, ..Default::default() }).unwrap();
    vm.pause().unwrap();
    let second = common::scratch("of-a-clone");
    vm.snapshot(&second).unwrap();
    vm.stop("snapshot taken");

    let template = Template::open(&second).unwrap();
    let cap = Capture::default();
    let vm = template.restore(9, &Channels::default(), Box::new(cap.clone())).unwrap();
    let out = vm.start(RunOptions::default()).unwrap().wait(Some(CLONE_TIMEOUT));
    assert_eq!(out.exit, VmExit::PowerOff, "{}", cap.text());
    clone_random(&cap.text(), 9);
}

#[test]
fn clones_get_a_pit_only_when_their_template_may_use_it() {
    let _one = common::one_at_a_time();
    let Some(dir) = common::template("clones_get_a_pit_only_when_their_template_may_use_it") else { return };
    let mut template = Template::open(dir).unwrap();
    // ember's guest takes its clock events from the local APIC: it stops the PIT at boot and
    // masks its interrupt, so the template's clones are made without one.
    assert!(!template.state.vm.pit_in_use(), "{:?}", template.state.vm.pit);
    let saved = format!("{:?}", template.state.vm.pit);
    // Restores clone `id`, snapshots it before it runs, then lets it run to its end: whether it
    // had a PIT (KVM's answer) and the PIT state its snapshot saved.
    let run = |template: &Template, id: u64| {
        let cap = Capture::default();
        let vm = template.restore(id, &Channels::default(), Box::new(cap.clone())).unwrap();
        let vm = vm.start(RunOptions { start_paused: true, ..Default::default() }).unwrap();
        let has_pit = vm.has_pit();
        vm.pause().unwrap();
        let snap = common::scratch(&format!("pit-{id}"));
        vm.snapshot(&snap).unwrap();
        vm.resume();
        let out = vm.wait(Some(CLONE_TIMEOUT));
        assert_eq!(out.exit, VmExit::PowerOff, "clone {id}:\n{}", cap.text());
        clone_random(&cap.text(), id);
        (has_pit, Template::open(&snap).unwrap().state.vm.pit)
    };
    let (has_pit, pit) = run(&template, 1);
    assert!(!has_pit, "a clone of a template whose guest left its PIT unused has one");
    // Its own snapshot keeps the template's PIT state, as KVM would have kept it.
    assert_eq!(format!("{pit:?}"), saved);
    // A guest that may still use its PIT (here: channel 2's gate on, as while calibrating)
    // keeps it in its clones, with its state.
    template.state.vm.pit.channels[2].gate = 1;
    assert!(template.state.vm.pit_in_use());
    let (has_pit, pit) = run(&template, 2);
    assert!(has_pit, "a clone of a template whose guest may use its PIT has none");
    assert_eq!(pit.channels[2].gate, 1, "{pit:?}");
}

#[test]
fn ember_restore_runs_clones_from_the_command_line() {
    let _one = common::one_at_a_time();
    let Some(dir) = common::template("ember_restore_runs_clones_from_the_command_line") else { return };
    let restore = |args: &[&str]| ember(&[&["restore", "--snapshot", dir.to_str().unwrap()], args].concat());
    // Runs `args`, which must succeed with each of clones 1..=n's console lines prefixed and
    // seen once.
    let each_clone_once = |args: &[&str], n: u64| {
        let out = restore(args);
        let stdout = text(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{}\n{stdout}", text(&out.stderr));
        for id in 1..=n {
            assert_eq!(stdout.matches(&format!("[clone {id}] EMBER_CLONE id={id} ")).count(), 1, "{stdout}");
        }
    };
    each_clone_once(&["--clones", "2", "--timeout", "120"], 2);
    // Spread over processes: each clone once, the ids distinct across the processes.
    each_clone_once(&["--clones", "5", "--processes=2", "--timeout", "120"], 5);
    // One clone per process: still each line is its clone's.
    each_clone_once(&["--clones", "2", "--processes", "2", "--timeout", "120"], 2);
    // A clone that fails in one process: the exit status says so (4: stopped by the timeout).
    let out = restore(&["--clones", "2", "--processes", "2", "--serve", "--timeout", "0.5", "--console", "off"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr).matches("timed out").count(), 4, "{}", text(&out.stderr));
}

/// A fresh directory with the template's files for a test to damage: the state file copied, the
/// memory file hard-linked (tests replace it rather than change it).
fn copy_of(template: &Path, name: &str) -> PathBuf {
    let dir = common::scratch(name);
    std::fs::copy(template.join(snapshot::STATE_FILE), dir.join(snapshot::STATE_FILE)).unwrap();
    std::fs::hard_link(template.join(snapshot::MEMORY_FILE), dir.join(snapshot::MEMORY_FILE)).unwrap();
    dir
}

#[test]
fn bad_snapshots_are_refused_with_one_line() {
    let _one = common::one_at_a_time();
    let Some(tpl) = common::template("bad_snapshots_are_refused_with_one_line") else { return };
    let state_of = |d: &Path| d.join(snapshot::STATE_FILE);
    let mem_of = |d: &Path| d.join(snapshot::MEMORY_FILE);
    let good = std::fs::read(state_of(tpl)).unwrap();
    let mut cases: Vec<(PathBuf, &str)> = vec![(common::scratch("missing").join("nothing-here"), "No such file")];

    let d = copy_of(tpl, "magic");
    std::fs::write(state_of(&d), b"not a snapshot at all").unwrap();
    cases.push((d, "not an ember snapshot"));

    let d = copy_of(tpl, "version");
    let mut v = good.clone();
    v[8..12].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(state_of(&d), v).unwrap();
    cases.push((d, "format version 99 is not supported"));

    let d = copy_of(tpl, "checksum");
    let mut v = good.clone();
    let mid = v.len() / 2;
    v[mid] ^= 1;
    std::fs::write(state_of(&d), v).unwrap();
    cases.push((d, "checksum mismatch"));

    let d = copy_of(tpl, "truncated");
    std::fs::write(state_of(&d), &good[..good.len() - 9]).unwrap();
    cases.push((d, "truncated"));

    let d = copy_of(tpl, "memory-size");
    std::fs::remove_file(mem_of(&d)).unwrap();
    std::fs::write(mem_of(&d), [0u8; 4096]).unwrap();
    cases.push((d, "bytes of RAM"));

    let d = copy_of(tpl, "memory-missing");
    std::fs::remove_file(mem_of(&d)).unwrap();
    cases.push((d, "memory"));

    for (dir, want) in cases {
        let out = ember(&["restore", "--snapshot", dir.to_str().unwrap(), "--timeout", "30"]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{}: {stderr}", dir.display());
        assert!(stderr.contains(want), "{}: want {want:?}, got {stderr}", dir.display());
        assert_eq!(stderr.lines().filter(|l| l.starts_with("ember: error:")).count(), 1, "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn clones_leak_no_fds_or_threads() {
    let _one = common::one_at_a_time();
    let Some(dir) = common::template("clones_leak_no_fds_or_threads") else { return };
    let template = Template::open(dir).unwrap();
    // 300 create/destroy cycles here; EMBER_SOAK=1 runs 10,000 (a few minutes).
    let cycles = if std::env::var("EMBER_SOAK").is_ok_and(|v| v == "1") { 10_000 } else { 300 };
    let cycle = |id: u64| {
        let vm = template.restore(id, &Channels::default(), Box::new(std::io::sink())).unwrap();
        if id % 2 == 0 {
            // Restored, started and stopped at once; the others are dropped without running.
            vm.start(RunOptions::default()).unwrap().stop("test");
        }
    };
    // Warm up (lazily created process-wide state, the allocator's arenas), then count.
    (1..=50).for_each(cycle);
    let (fds, tasks) = common::fds_and_threads();
    let rss = common::rss_kib();
    (51..51 + cycles).for_each(cycle);
    // A joined thread leaves /proc/self/task a moment after its join returns: a leak is what does
    // not settle back.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while common::fds_and_threads() != (fds, tasks) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(common::fds_and_threads(), (fds, tasks), "fds or threads leaked");
    let grown = common::rss_kib().saturating_sub(rss);
    assert!(grown < 16 << 10, "{cycles} clone cycles grew the process by {grown} KiB");
}
