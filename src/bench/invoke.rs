//! `ember bench invoke`: the round trip of a no-op invocation on a warm clone, per channel
//! (mailbox polled, mailbox with the response doorbell, vsock), with the guest's CPU split, and
//! the cost of waking an idle clone.

use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

use super::{ms, BenchError, Summary, TableReport};
use crate::channel::mailbox::CallOptions;
use crate::channel::vsock::AgentConnection;
use crate::serve::invoke::INVOKE_SPIN;
use crate::template::Template;
use crate::vmm::{Channels, RunOptions, RunningVm};

/// What `ember bench invoke` measures.
pub struct InvokeBench {
    /// Invocations per mailbox mode.
    pub calls: usize,
    /// Invocations over vsock (each crosses the guest kernel).
    pub vsock_calls: usize,
    /// Invocations of a clone whose agent has gone idle (each waits for the agent to park).
    pub idle_calls: usize,
    pub timeout: Duration,
}

/// Connects to the agent over vsock, retrying while its listener is not up yet (a fresh clone
/// starts it after reseeding).
pub(super) fn connect_agent(sock: &Path, timeout: Duration) -> Result<AgentConnection, String> {
    let deadline = Instant::now() + timeout.max(Duration::from_secs(60));
    loop {
        match AgentConnection::connect(sock, timeout) {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() >= deadline => return Err(e.to_string()),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// The guest's CPU ticks (user+nice, kernel incl. interrupts, idle), from the agent's `cpu-stat`.
fn guest_cpu(vm: &RunningVm, timeout: Duration) -> Result<[u64; 3], String> {
    let opts = CallOptions { timeout, ..Default::default() };
    let r = vm.invoke("cpu-stat", b"", opts).map_err(|e| e.to_string())?;
    let v: Vec<u64> = String::from_utf8_lossy(&r.payload).split_whitespace().filter_map(|w| w.parse().ok()).collect();
    match v[..] {
        [user, nice, system, idle, iowait, irq, softirq] => Ok([user + nice, system + irq + softirq, idle + iowait]),
        _ => Err(format!("cpu-stat answered {:?}", String::from_utf8_lossy(&r.payload))),
    }
}

/// Restores a serving clone of the snapshot in `dir` and times invocations on each channel.
pub fn invoke(dir: &Path, b: &InvokeBench) -> Result<TableReport, BenchError> {
    let template = Template::open(dir)?;
    let scratch = std::env::temp_dir().join(format!("ember-bench-invoke-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|e| BenchError::Failed(format!("{}: {e}", scratch.display())))?;
    let sock = scratch.join("vsock");
    let channels = Channels { serve: true, vsock: Some(sock.clone()), ..Default::default() };
    let vm = template.restore(1, &channels, Box::new(std::io::sink())).and_then(|vm| vm.start(RunOptions::default()));
    let report = vm.map_err(BenchError::from).and_then(|vm| invoke_channels(vm, &sock, b));
    let _ = std::fs::remove_dir_all(&scratch);
    report
}

/// Which way `ember bench invoke` calls the agent.
#[derive(Clone, Copy)]
enum Channel {
    MailboxPolled,
    MailboxDoorbell,
    /// The doorbell asked for, the host polling first as the daemon's invoke does
    /// ([`INVOKE_SPIN`]); `true`: the agent rings every time (the baseline: no
    /// FLAG_RING_IF_WAITING).
    MailboxSpinThenDoorbell(bool),
    Vsock,
}

fn invoke_channels(vm: RunningVm, sock: &Path, b: &InvokeBench) -> Result<TableReport, BenchError> {
    let failed = |what: &str, e: &dyn fmt::Display| BenchError::Failed(format!("{what}: {e}"));
    // The first call waits for the clone to take its seed and start serving.
    let t = Instant::now();
    vm.invoke("echo", b"", CallOptions { timeout: b.timeout.max(Duration::from_secs(60)), ..Default::default() })
        .map_err(|e| failed("the clone never answered", &e))?;
    let mut rows = vec![(
        "restore -> first answer (1 run, includes reseeding)".to_string(),
        Summary::of(&[ms(t.elapsed()) * 1e3]),
    )];
    let mut notes = Vec::new();
    let us = |d: Duration| d.as_secs_f64() * 1e6;

    let channels = [
        Channel::MailboxPolled,
        Channel::MailboxDoorbell,
        Channel::Vsock,
        Channel::MailboxSpinThenDoorbell(false),
        Channel::MailboxSpinThenDoorbell(true),
    ];
    let spin_us = INVOKE_SPIN.as_micros();
    for channel in channels {
        let (label, calls) = match channel {
            Channel::MailboxPolled => ("mailbox, host polls the response".to_string(), b.calls),
            Channel::MailboxDoorbell => ("mailbox, response doorbell (exit)".to_string(), b.calls),
            Channel::MailboxSpinThenDoorbell(always) => {
                let rings = if always { "every time" } else { "only if it sleeps" };
                (format!("mailbox, doorbell asked, host polls {spin_us} us first, agent rings {rings}"), b.calls)
            }
            Channel::Vsock => ("vsock (one connection, kept open)".to_string(), b.vsock_calls),
        };
        let label = label.as_str();
        let mut conn = match channel {
            Channel::Vsock => Some(connect_agent(sock, b.timeout).map_err(|e| failed("vsock", &e))?),
            _ => None,
        };
        let opts = CallOptions {
            timeout: b.timeout,
            doorbell: !matches!(channel, Channel::MailboxPolled),
            spin: match channel {
                Channel::MailboxSpinThenDoorbell(_) => INVOKE_SPIN,
                _ => Duration::ZERO,
            },
            ring_always: matches!(channel, Channel::MailboxSpinThenDoorbell(true)),
            ..Default::default()
        };
        let before = guest_cpu(&vm, b.timeout).map_err(|e| failed("cpu-stat", &e))?;
        let rung = vm.mailbox().responses_rung();
        let mut v = Vec::with_capacity(calls);
        for _ in 0..calls {
            let t = Instant::now();
            let r = match &mut conn {
                Some(c) => c.call("echo", b"").map_err(|e| failed(label, &e))?,
                None => vm.invoke("echo", b"", opts).map_err(|e| failed(label, &e))?,
            };
            v.push(us(t.elapsed()));
            if r.status != ember_abi::Status::Ok {
                return Err(failed(label, &r.status.describe()));
            }
        }
        let rung = vm.mailbox().responses_rung() - rung;
        let after = guest_cpu(&vm, b.timeout).map_err(|e| failed("cpu-stat", &e))?;
        let d: Vec<u64> = (0..3).map(|i| after[i].saturating_sub(before[i])).collect();
        let total = (d[0] + d[1] + d[2]).max(1);
        notes.push(format!(
            "{label}: guest CPU during the run: {:.1}% user, {:.1}% kernel (incl. interrupts), {:.1}% idle ({} ticks); \
             {rung} response doorbells in {calls} calls",
            100.0 * d[0] as f64 / total as f64,
            100.0 * d[1] as f64 / total as f64,
            100.0 * d[2] as f64 / total as f64,
            total
        ));
        rows.push((label.to_string(), Summary::of(&v)));
    }

    if b.idle_calls > 0 {
        // The agent parks the vCPU host-side after 100 ms without a request; the next request
        // wakes it.
        let opts = CallOptions { timeout: b.timeout, ..Default::default() };
        let mut v = Vec::with_capacity(b.idle_calls);
        for _ in 0..b.idle_calls {
            std::thread::sleep(Duration::from_millis(150));
            let t = Instant::now();
            vm.invoke("echo", b"", opts).map_err(|e| failed("idle clone", &e))?;
            v.push(us(t.elapsed()));
        }
        rows.push(("mailbox, clone idle 150 ms (vCPU parked host-side)".to_string(), Summary::of(&v)));
    }
    let p50 = |i: usize| rows.get(i).and_then(|r| r.1.as_ref()).map(|s| s.p50).unwrap_or(f64::NAN);
    notes.push(format!(
        "doorbell / polled (p50): {:.1}x; vsock / polled: {:.0}x; polling first, the agent ringing every time / only \
         for a sleeping caller (p50): {:.1}x",
        p50(2) / p50(1),
        p50(3) / p50(1),
        p50(5) / p50(4)
    ));
    vm.stop("measured");
    Ok(TableReport {
        title: "ember bench invoke: round trip of a no-op invocation (echo, empty payload) on a warm clone".into(),
        heading: "round trip (us)",
        width: 58,
        rows,
        notes,
    })
}
