//! ember-agent: PID 1 of ember's guest initramfs.
//!
//! It brings the guest up: mounts /dev, /proc and /sys, signals the boot timer, proves that user
//! space works (console writes, reading /proc/uptime, fork + exec of itself), seeds the kernel RNG
//! from ember's control page, starts the image's function runtime (functions.rs), maps the mailbox,
//! prints its marker line and rings the "ready" doorbell: the snapshot point. In a clone restored
//! from a snapshot taken there it goes on from that point: it reseeds the RNG with the clone's own
//! seed and prints `EMBER_CLONE id=N random=...`. Then, when the host asks for it (the control
//! page's serve flag), it serves invocations on the mailbox for ever; otherwise it powers off.
//!
//! At any time, Ctrl+Alt+Del on the VM's keyboard (the host's `SendCtrlAltDel`) reboots the guest
//! (keyboard.rs).
//!
//! The kernel passes unknown `key=value` command-line parameters to init as environment variables:
//! - `ember_exit=panic`: exit instead of powering off (the kernel then panics: a guest-crash test).
//! - `ember_exit=reboot`: reboot (i8042 reset) instead of powering off.
//! - `ember_net=ADDR/PREFIX[,GATEWAY]`: configure eth0 (net.rs).

use std::fs;
use std::io::{self, Write};
use std::process::Command;

mod control;
mod devmem;
mod functions;
mod keyboard;
mod layers;
mod mailbox;
mod managed;
mod net;
mod storm;
mod tsc;
mod vsock;
mod vsock_socket;

/// The boot timer: writing this byte at this guest-physical address marks "user space is up".
const BOOT_TIMER_ADDR: libc::off_t = 0xd000_0000;
const BOOT_TIMER_MAGIC: u8 = 123;
/// The marker the host looks for on the console.
const MARKER: &str = "EMBER_GUEST_READY";
/// What a clone prints after a restore, with its clone id.
const CLONE_MARKER: &str = "EMBER_CLONE";
const CHILD_ARG: &str = "--ember-child";
/// Runs the example runtime of ember's test image instead of the agent.
const EXAMPLE_RUNTIME_ARG: &str = "--example-runtime";
/// Runs the example code layer's runtime (`files`) instead of the agent.
const FILES_RUNTIME_ARG: &str = "--files-runtime";
const CHILD_EXIT_CODE: i32 = 42;

/// The program name under which the agent is the example of ember's `exec` runtime.
const EXEC_EXAMPLE_NAME: &str = "ember-exec-example";

fn main() {
    let argv0 = std::env::args().next().unwrap_or_default();
    if argv0.rsplit('/').next() == Some(EXEC_EXAMPLE_NAME) {
        if let Err(e) = functions::exec_example() {
            eprintln!("exec example: {e}");
            std::process::exit(1);
        }
        std::process::exit(0);
    }
    match std::env::args().nth(1).as_deref() {
        Some(CHILD_ARG) => {
            println!("ember-agent: child pid {} running", std::process::id());
            std::process::exit(CHILD_EXIT_CODE);
        }
        Some(arg @ (EXAMPLE_RUNTIME_ARG | FILES_RUNTIME_ARG)) => {
            let r = if arg == EXAMPLE_RUNTIME_ARG { functions::example_runtime() } else { functions::files_runtime() };
            if let Err(e) = r {
                eprintln!("example runtime: {e}");
                std::process::exit(1);
            }
            std::process::exit(0);
        }
        _ => {}
    }
    if let Err(e) = init() {
        eprintln!("ember-agent: error: {e}");
    }
    let action = std::env::var("ember_exit").unwrap_or_default();
    match action.as_str() {
        "panic" => {
            println!("ember-agent: exiting as PID 1 (ember_exit=panic)");
            std::process::exit(1);
        }
        "reboot" => shutdown(libc::RB_AUTOBOOT),
        _ => shutdown(libc::RB_POWER_OFF),
    }
}

/// Waits until what was written to standard output has left the serial port (nothing to wait for
/// when it is not a terminal).
fn drain_console() {
    // SAFETY: tcdrain only reads the descriptor number; an invalid or non-terminal one is an error.
    let _ = unsafe { libc::tcdrain(libc::STDOUT_FILENO) };
}

fn init() -> io::Result<()> {
    mount("devtmpfs", "/dev", "devtmpfs")?;
    mount("proc", "/proc", "proc")?;
    mount("sysfs", "/sys", "sysfs")?;
    keyboard::watch(|| shutdown(libc::RB_AUTOBOOT));
    boot_timer()?;

    let uptime = fs::read_to_string("/proc/uptime")?;
    let uptime = uptime.split_whitespace().next().unwrap_or("?").to_owned();

    // fork + exec + wait: a child that is this same binary.
    let status = Command::new("/init").arg(CHILD_ARG).status()?;
    if status.code() != Some(CHILD_EXIT_CODE) {
        return Err(io::Error::other(format!("child exited with {status}, expected {CHILD_EXIT_CODE}")));
    }

    // Everything a clone needs to serve is set up before the snapshot point: the function's root
    // from its layers (if it has any: a failure ends the boot, and the host reports it) and its
    // runtime.
    // Fresh seed material from the host: the CRNG is ready at once instead of after seconds of
    // timer-jitter entropy gathering (emulated kernel work on some hosts). Before the runtime
    // starts: an interpreter asks for random bytes as it starts.
    let control = control::ControlPage::map()?;
    // Opened once: a clone reseeds through the template's descriptor (no path lookup after the
    // snapshot point).
    let urandom = match &control {
        Some(c) => {
            let f = control::open_urandom()?;
            control::seed_kernel_rng(&f, &c.seed())?;
            Some(f)
        }
        None => None,
    };
    // The network (when the command line gives one), before the runtime: it may connect at start.
    if let Some(what) = net::configure()? {
        println!("ember-agent: network {what}");
    }
    let root = layers::mount_root()?;
    let functions = std::sync::Arc::new(std::sync::Mutex::new(functions::Functions::start(root.as_deref())?));
    let mut mailbox = mailbox::Mailbox::map()?;
    tsc::calibrate();
    let mut out = io::stdout().lock();
    // Without a control page (another VMM) the CRNG may not be ready: take what it has.
    let flags = if control.is_some() { libc::GRND_NONBLOCK } else { libc::GRND_INSECURE };
    writeln!(out, "{MARKER} uptime={uptime} child_exit={CHILD_EXIT_CODE} random={}", random_hex(flags)?)?;
    out.flush()?;
    drop(out);
    // A console write returns once the line is in the serial driver's buffer, which the UART
    // sends later: the marker leaves the guest before the snapshot point, not in its clones.
    drain_console();

    let (Some(c), Some(urandom)) = (control, urandom) else { return Ok(()) };
    // The vsock listener starts before the snapshot point: a clone that serves finds it listening
    // (starting a thread and a socket is guest-kernel work, emulated on some hosts); one that does
    // not serve powers off.
    vsock::start(functions.clone())?;

    // The snapshot point. A VM that ember snapshots here is stopped; its clones go on from here.
    c.ring_ready();
    let clone_id = c.clone_id();
    if clone_id != 0 {
        // A clone's clocks go on from the snapshot's: the wall clock is set to the host's now.
        control::set_realtime(c.realtime_ns())?;
        // A clone: its own seed, so that it shares no future randomness with its siblings.
        control::seed_kernel_rng(&urandom, &c.seed())?;
        // The runtime reseeds what it derived from randomness before the snapshot.
        functions.lock().unwrap_or_else(|p| p.into_inner()).restored(clone_id);
        if !c.quiet() {
            let mut out = io::stdout().lock();
            writeln!(out, "{CLONE_MARKER} id={clone_id} random={}", random_hex(libc::GRND_NONBLOCK)?)?;
            out.flush()?;
        }
    }
    if !c.serve() {
        return Ok(());
    }
    match &mut mailbox {
        Some(m) => m.serve(&c, &functions),
        None => Err(io::Error::other("asked to serve, but the VM has no mailbox")),
    }
}

/// 16 bytes from getrandom(2), in hex.
fn random_hex(flags: libc::c_uint) -> io::Result<String> {
    let mut random = [0u8; 16];
    // SAFETY: getrandom writes at most `random.len()` bytes into the buffer we own.
    let n = unsafe { libc::getrandom(random.as_mut_ptr().cast(), random.len(), flags) };
    if n != random.len() as isize {
        return Err(io::Error::other(format!("getrandom: {}", io::Error::last_os_error())));
    }
    Ok(random.iter().map(|b| format!("{b:02x}")).collect())
}

fn mount(source: &str, target: &str, fstype: &str) -> io::Result<()> {
    layers::mount(source, target, fstype, 0, None)
}

/// Writes the boot-timer byte through /dev/mem.
fn boot_timer() -> io::Result<()> {
    devmem::PhysPage::map(BOOT_TIMER_ADDR)?.write(0, BOOT_TIMER_MAGIC);
    Ok(())
}

fn shutdown(how: libc::c_int) -> ! {
    // SAFETY: sync and reboot take no pointers; as PID 1 we may reboot.
    unsafe {
        libc::sync();
        libc::reboot(how);
    }
    // reboot() only returns on failure.
    eprintln!("ember-agent: reboot failed: {}", io::Error::last_os_error());
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
