//! `ember bench layers`: what functions that bring their own files cost. In one run, on the same
//! host and guest:
//!
//! - image build: time and size of a data layer of `--layer-mib` MiB and of the example code
//!   layer, and of building the same input again (cached);
//! - restore -> first answer of a function whose code is in a layer, against one whose code is in
//!   the initramfs (the baseline), over `--runs` clones each;
//! - virtio-blk reads in a guest (sequential throughput, direct 4 KiB random-read latency) against
//!   the same layer file read on the host;
//! - host memory for `--clones` clones of two functions sharing the data layer, held at once, and
//!   for `--readers` more that each read all of it: the layer file is one host file (one copy in
//!   the host page cache), but each clone's guest page cache holds what it read in the clone's own
//!   (private) memory.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::restore::private_kib;
use super::{ms, BenchError, Summary, TableReport};
use crate::channel::mailbox::CallOptions;
use crate::config::{DriveConfig, VmConfig};
use crate::image::{Limits, Store};
use crate::template::{MakeOptions, Template};
use crate::vmm::{Channels, RunOptions, RunningVm};

/// What `ember bench layers` measures.
pub struct LayersBench {
    /// The example code layer's tree (images/examples/files).
    pub code: PathBuf,
    pub layer_mib: u64,
    pub runs: usize,
    pub clones: usize,
    /// Of those clones, how many read the whole data layer.
    pub readers: usize,
    pub random_reads: usize,
    pub timeout: Duration,
}

fn failed(what: &str, e: impl std::fmt::Display) -> BenchError {
    BenchError::Failed(format!("{what}: {e}"))
}

/// Writes `mib` MiB of pseudo-random (incompressible) bytes to `path`.
fn data_file(path: &Path, mib: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for chunk in block.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&block)?;
    }
    f.flush()
}

/// A serving clone of `t`.
pub(super) fn clone_of(t: &Template, id: u64) -> Result<RunningVm, BenchError> {
    let channels = Channels { serve: true, ..Default::default() };
    Ok(t.restore(id, &channels, Box::new(std::io::sink()))?.start(RunOptions::default())?)
}

pub(super) fn call(vm: &RunningVm, function: &str, payload: &str, timeout: Duration) -> Result<String, BenchError> {
    let r = vm
        .invoke(function, payload.as_bytes(), CallOptions { timeout, ..Default::default() })
        .map_err(|e| failed(&format!("{function} {payload}"), e))?;
    let text = String::from_utf8_lossy(&r.payload).into_owned();
    if r.status != ember_abi::Status::Ok {
        return Err(failed(&format!("{function} {payload}"), text));
    }
    Ok(text)
}

/// `key=value` from a `readbench` answer.
fn field(text: &str, key: &str) -> Option<f64> {
    text.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// The same reads on the host, of `path`: sequential MB/s (page cache as it is) and direct 4 KiB
/// random-read latencies in microseconds.
fn host_reads(path: &Path, n: usize) -> std::io::Result<(f64, Summary)> {
    use std::io::Read;
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let (t, mut total) = (Instant::now(), 0u64);
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        total += k as u64;
    }
    let mbps = total as f64 / 1e6 / t.elapsed().as_secs_f64();
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path)?;
    let blocks = (f.metadata()?.len() / 4096).max(1);
    let mut raw = vec![0u8; 8192];
    let off = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[off..off + 4096];
    let mut lat = Vec::with_capacity(n);
    for i in 0..n as u64 {
        let block = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) % blocks;
        let t = Instant::now();
        f.read_at(buf, block * 4096)?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok((mbps, Summary::of(&lat).ok_or_else(|| std::io::Error::other("no reads"))?))
}

pub fn layers(cfg: &VmConfig, b: &LayersBench) -> Result<TableReport, BenchError> {
    let scratch = std::env::temp_dir().join(format!("ember-bench-layers-{}", std::process::id()));
    let r = run(cfg, b, &scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    r
}

fn run(cfg: &VmConfig, b: &LayersBench, scratch: &Path) -> Result<TableReport, BenchError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |e: std::io::Error| failed(&what, e)
    };
    let mut rows: Vec<(String, Option<Summary>)> = Vec::new();
    let mut notes = Vec::new();

    // Image builds.
    let data = scratch.join("data");
    std::fs::create_dir_all(data.join("data")).map_err(io("scratch"))?;
    data_file(&data.join("data/blob.bin"), b.layer_mib).map_err(io("data file"))?;
    let store = Store::open(&scratch.join("images")).map_err(io("image store"))?;
    let limits = Limits::default();
    let built = store.build(&data, &limits).map_err(|e| failed("data layer", e))?;
    let again = store.build(&data, &limits).map_err(|e| failed("data layer", e))?;
    let code = store.build(&b.code, &limits).map_err(|e| failed("code layer", e))?;
    notes.push(format!(
        "image build: a {} MiB data tree -> {:.1} MiB EROFS image in {:.2} s (again, cached: {:.3} s); \
         the example code layer -> {:.1} MiB in {:.2} s",
        b.layer_mib,
        built.layer.size as f64 / (1 << 20) as f64,
        built.seconds,
        again.seconds,
        code.layer.size as f64 / (1 << 20) as f64,
        code.seconds
    ));

    // Three templates: code in the initramfs (the baseline), and two functions whose code and data
    // are layers (the same two layer files).
    let layers = vec![
        DriveConfig::read_only("l0", built.layer.path.clone()),
        DriveConfig::read_only("code", code.layer.path.clone()),
    ];
    let layered = cfg.clone().with_layers(layers);
    let mut make = |c: &VmConfig, name: &str| -> Result<Template, BenchError> {
        let opts = MakeOptions { working_set: false, timeout: b.timeout, ..Default::default() };
        let t = Instant::now();
        let made = Template::make(c, &scratch.join(name), opts)?;
        notes.push(format!("template {name}: booted to ready in {:.1} s", t.elapsed().as_secs_f64()));
        Ok(made.template)
    };
    // The baseline runs the same runtime (`files`, the agent binary) from the initramfs, so that
    // both answer the same request with the same program.
    let mut in_initramfs = cfg.clone();
    in_initramfs.boot_source.boot_args =
        Some(format!("{} EMBER_RUNTIME=\"files /init --files-runtime\"", cfg.cmdline()));
    let baseline = make(&in_initramfs, "initramfs")?;
    let first = make(&layered, "layers-a")?;
    let second = make(&layered, "layers-b")?;

    // Restore -> first answer, alternating so that both see the same host.
    let (mut base_ms, mut layer_ms) = (Vec::new(), Vec::new());
    for i in 0..b.runs {
        for (t, samples, function, payload) in [
            (&baseline, &mut base_ms, "files", "read /etc/ember/runtime"),
            (&first, &mut layer_ms, "files", "read /etc/ember/runtime"),
        ] {
            let start = Instant::now();
            let vm = clone_of(t, i as u64 + 1)?;
            call(&vm, function, payload, b.timeout)?;
            samples.push(ms(start.elapsed()));
            vm.stop("measured");
        }
    }
    let (base, layer) = (Summary::of(&base_ms), Summary::of(&layer_ms));
    rows.push(("restore -> first answer, code in the initramfs (ms)".into(), base.clone()));
    rows.push(("restore -> first answer, code in a layer (ms)".into(), layer.clone()));
    if let (Some(base), Some(layer)) = (base, layer) {
        notes.push(format!("code in a layer / in the initramfs, p50: {:.2}x", layer.p50 / base.p50));
    }

    // Reads: in a guest, through virtio-blk and EROFS, and on the host, of the layer image.
    let vm = clone_of(&first, 1_000)?;
    let seq = call(&vm, "files", "readbench /data/blob.bin seq", b.timeout)?;
    let rand = call(&vm, "files", &format!("readbench /data/blob.bin rand {}", b.random_reads), b.timeout)?;
    vm.stop("measured");
    let guest_mbps = match (field(&seq, "bytes"), field(&seq, "seconds")) {
        (Some(bytes), Some(s)) if s > 0.0 => bytes / 1e6 / s,
        _ => return Err(failed("readbench seq", seq)),
    };
    let (host_mbps, host_rand) = host_reads(&built.layer.path, b.random_reads).map_err(io("host reads"))?;
    notes.push(format!(
        "sequential read of {} MiB, 1 MiB reads: guest (virtio-blk, EROFS, cold guest page cache) {guest_mbps:.1} MB/s; \
         host (the layer image, page cache as it is) {host_mbps:.0} MB/s",
        b.layer_mib
    ));
    let guest_rand = match ["p50_us", "p90_us", "p99_us", "min_us", "max_us"].map(|k| field(&rand, k)) {
        [Some(p50), Some(p90), Some(p99), Some(min), Some(max)] => {
            Summary { n: b.random_reads, p50, p90, p99, min, max, samples: Vec::new() }
        }
        _ => return Err(failed("readbench rand", rand)),
    };
    rows.push(("guest 4 KiB direct random read (us)".into(), Some(guest_rand)));
    rows.push(("host 4 KiB direct random read, same file (us)".into(), Some(host_rand)));

    // Memory: clones of both functions held at once (restored, not started: a vCPU per clone on
    // this host's 2 cores would measure the scheduler), then clones of both that read the whole
    // data layer.
    let before = private_kib();
    let mut held = Vec::with_capacity(b.clones);
    for i in 0..b.clones {
        let t = if i % 2 == 0 { &first } else { &second };
        held.push(t.restore(
            2_000 + i as u64,
            &Channels { serve: true, ..Default::default() },
            Box::new(std::io::sink()),
        )?);
    }
    let restored = private_kib();
    let mut readers = Vec::with_capacity(b.readers);
    for i in 0..b.readers {
        readers.push(clone_of(if i % 2 == 0 { &first } else { &second }, 20_000 + i as u64)?);
    }
    let started = private_kib();
    let mut digest = None;
    for vm in &readers {
        let d = call(vm, "files", "sha256 /data/blob.bin", b.timeout)?;
        if digest.get_or_insert_with(|| d.clone()) != &d {
            return Err(failed("sha256", "two clones read different bytes from one layer"));
        }
    }
    let after = private_kib();
    for vm in readers {
        vm.stop("measured");
    }
    drop(held);
    let mib = |kib: u64, n: usize| kib as f64 / 1024.0 / n.max(1) as f64;
    notes.push(format!(
        "{} clones of 2 functions sharing one {:.1} MiB layer file (one host file, one copy in the host page cache), \
         held at once: {:.3} MiB private memory per clone; {} running clones (both functions) that then each read \
         the whole layer (same digest): +{:.1} MiB each for the read (the guest's page cache, private to the clone), \
         on top of {:.1} MiB each for starting",
        b.clones,
        built.layer.size as f64 / (1 << 20) as f64,
        mib(restored.saturating_sub(before), b.clones),
        b.readers,
        mib(after.saturating_sub(started), b.readers),
        mib(started.saturating_sub(restored), b.readers),
    ));
    Ok(TableReport {
        title: format!("ember bench layers: {} runs, {} MiB layer, {} clones", b.runs, b.layer_mib, b.clones),
        heading: "measure",
        width: 52,
        rows,
        notes,
    })
}
