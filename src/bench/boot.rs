//! `ember bench boot`: where a fresh boot's time goes, from the VMM's setup to the guest's
//! user space.

use std::time::{Duration, Instant};

use super::{ms, BenchError, Summary, TableReport};
use crate::config::VmConfig;
use crate::devices::boot_timer::BootEvent;
use crate::vmm::{Channels, Vm};

/// Boots `cfg` `runs` times (console off) and summarises where the time went.
pub fn boot(cfg: &VmConfig, runs: usize, timeout: Duration) -> Result<TableReport, BenchError> {
    type Pick = fn(&BootEvent) -> f64;
    let mut first_insn = Vec::new();
    let mut setup = Vec::new();
    let mut kernel_start = Vec::new();
    let mut run_init = Vec::new();
    let mut timer = Vec::new();
    let mut timer_cpu = Vec::new();
    let mut failures = Vec::new();
    let since_vm: Pick = |e| ms(e.since_vm);
    for i in 0..runs {
        let start = Instant::now();
        let vm = Vm::boot(cfg, &Channels::default(), Box::new(std::io::sink()), start)?;
        let out = vm.run(Some(timeout))?;
        let t = out.timeline;
        if !out.exit.is_clean() {
            failures.push(format!("run {i}: {}", out.exit));
        }
        if let Some(e) = t.first_instruction {
            first_insn.push(ms(e.since_process));
            setup.push(since_vm(&e));
        }
        kernel_start.extend(t.kernel_start.as_ref().map(since_vm));
        run_init.extend(t.run_init.as_ref().map(since_vm));
        if let Some(e) = t.boot_timer {
            timer.push(since_vm(&e));
            timer_cpu.extend(e.cpu.map(ms));
        }
    }
    let rows = [
        ("boot start -> first guest instruction", &first_insn),
        ("VM start -> first guest instruction", &setup),
        ("VM start -> kernel start (port 0x80)", &kernel_start),
        ("VM start -> kernel runs init (port 0x80)", &run_init),
        ("VM start -> boot timer (guest user space)", &timer),
        ("CPU time (VMM + vCPUs) to boot timer", &timer_cpu),
    ];
    Ok(TableReport {
        title: format!("ember bench boot: {runs} runs, {} failed", failures.len()),
        heading: "milestone (ms)",
        width: 44,
        rows: rows.into_iter().map(|(name, v)| (name.to_string(), Summary::of(v))).collect(),
        notes: failures.into_iter().map(|f| format!("failure: {f}")).collect(),
    })
}
