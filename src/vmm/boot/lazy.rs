//! Loading the guest's software while the guest already runs.
//!
//! A fresh boot's VMM time went mostly to copying the kernel's segments and the initramfs into
//! guest RAM: every 4 KiB of the copy faults in a page of anonymous memory (about 7 of the 10 ms
//! from VM start to the first guest instruction on the development host). Instead, the page-aligned
//! part of each such read is registered with a userfaultfd (missing-page mode) and filled by a
//! thread of its own (`UFFDIO_COPY`, in steps, from the file) from the guest's first fault on (its
//! entry point is on such a page), while the guest runs. A page the guest (or the VMM) touches
//! before the thread got to it waits for that page only: the thread serves faults before it goes on.
//!
//! Guest RAM stays anonymous memory throughout (never a mapping of the files), so nothing done to
//! the files afterwards can reach the guest or fault the VMM; what the guest sees is the files'
//! contents read within the first milliseconds of the boot (a file truncated meanwhile reads as
//! zeros past its new end).
//!
//! Where a userfaultfd cannot be had (unprivileged processes on hosts that do not allow them, or a
//! seccomp filter without the call, as `ember serve`'s), or a read is not page-aligned in both the
//! file and memory, the reader copies as before. The few ioctls are declared here (linux/userfaultfd.h):
//! the `userfaultfd` crate generates its bindings with bindgen at build time, which needs libclang.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, ReadVolatile, VolatileMemoryError, VolatileSlice};

use crate::memory::{GuestMemory, PAGE_SIZE};

const PAGE: usize = PAGE_SIZE as usize;
/// Reads shorter than this are copied: loading them later would not save anything.
const MIN_LAZY: usize = 64 << 10;
/// How much the loader thread fills per step (it looks for faults between steps).
const STEP: usize = 128 << 10;
/// How long the loader thread waits for the guest to start before it fills anyway.
const IDLE_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

mod uffd {
    //! linux/userfaultfd.h, the parts used here.
    use vmm_sys_util::{ioctl_ior_nr, ioctl_iowr_nr};

    pub const API: u64 = 0xaa;
    pub const REGISTER_MODE_MISSING: u64 = 1;
    pub const EVENT_PAGEFAULT: u8 = 0x12;
    /// Bit of `Register::ioctls`: UFFDIO_COPY is available on the range.
    pub const IOCTL_COPY: u64 = 1 << 0x03;

    #[repr(C)]
    #[derive(Default)]
    pub struct Api {
        pub api: u64,
        pub features: u64,
        pub ioctls: u64,
    }

    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    pub struct Range {
        pub start: u64,
        pub len: u64,
    }

    #[repr(C)]
    #[derive(Default)]
    pub struct Register {
        pub range: Range,
        pub mode: u64,
        pub ioctls: u64,
    }

    #[repr(C)]
    #[derive(Default)]
    pub struct Copy {
        pub dst: u64,
        pub src: u64,
        pub len: u64,
        pub mode: u64,
        pub copy: i64,
    }

    /// `struct uffd_msg` (32 bytes): the event, then for a page fault its flags and address.
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    pub struct Msg {
        pub event: u8,
        pub reserved: [u8; 7],
        pub flags: u64,
        pub address: u64,
        pub feat: u64,
    }

    const UFFDIO: u32 = 0xaa;
    ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3f, Api);
    ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, Register);
    ioctl_ior_nr!(UFFDIO_WAKE, UFFDIO, 0x02, Range);
    ioctl_iowr_nr!(UFFDIO_COPY, UFFDIO, 0x03, Copy);
}

/// A stretch of guest RAM (host address, length) still to be filled from `file` at `offset`.
struct Pending {
    at: usize,
    len: usize,
    file: Arc<File>,
    offset: u64,
}

/// Collects what a fresh boot reads into guest RAM and fills it in the background.
pub struct Loader {
    /// None: everything is copied when read.
    uffd: Option<OwnedFd>,
    /// Host ranges (start, length) of guest RAM: nothing else is ever registered.
    ram: Vec<(usize, usize)>,
    /// What was copied at once (host ranges): a later read over it is copied too, as filling
    /// never overwrites a page that is there.
    copied: Vec<(usize, usize)>,
    pending: Vec<Pending>,
    mem: GuestMemory,
}

impl Loader {
    /// A loader for `mem` (fresh, untouched guest RAM): lazy when this process may have a
    /// userfaultfd, copying otherwise.
    pub fn new(mem: &GuestMemory) -> Self {
        let ram = mem.iter().map(|r| (r.as_ptr() as usize, r.len() as usize)).collect();
        Self { uffd: open_uffd(), ram, copied: Vec::new(), pending: Vec::new(), mem: mem.clone() }
    }

    /// A loader that copies everything when it is read.
    #[cfg(test)]
    pub fn copying(mem: &GuestMemory) -> Self {
        Self { uffd: None, ..Self::new(mem) }
    }

    /// A reader of `file` (from its current position) for [`vm_memory`] reads into guest RAM (as
    /// `linux-loader` and the initramfs loader make).
    pub fn reader<'a>(&'a mut self, file: &'a mut File) -> std::io::Result<LazyReader<'a>> {
        let len = file.metadata()?.len();
        Ok(LazyReader { loader: self, shared: None, file, len })
    }

    fn in_ram(&self, start: usize, len: usize) -> bool {
        self.ram.iter().any(|&(s, l)| start >= s && start.checked_add(len).is_some_and(|e| e <= s + l))
    }

    fn overlaps_copied(&self, start: usize, len: usize) -> bool {
        self.copied.iter().any(|&(s, l)| start < s + l && s < start + len)
    }

    /// How many bytes are left to be filled in the background.
    #[cfg(test)]
    pub fn pending_bytes(&self) -> usize {
        self.pending.iter().map(|p| p.len).sum()
    }

    /// Registers what is pending with the userfaultfd and starts the thread that fills it
    /// (confined with seccomp when `confine`). When the ranges cannot be registered or the thread
    /// cannot start, they are filled now, before this returns. The thread keeps guest RAM mapped
    /// until it is done; its handle is returned.
    pub fn start(self, confine: bool) -> std::io::Result<Option<std::thread::JoinHandle<()>>> {
        let Self { uffd, pending, mem, .. } = self;
        let Some(uffd) = uffd.filter(|_| !pending.is_empty()) else {
            return Ok(None);
        };
        let uffd_fd = uffd.as_raw_fd();
        // Later reads win where two overlap: they are filled first, and filling never
        // overwrites a page that is there already.
        let fill =
            Fill { uffd: Some(uffd), pending: pending.into_iter().rev().collect(), buf: vec![0u8; STEP], _mem: mem };
        if let Err(e) = fill.register() {
            tracing::debug!("boot-load: cannot register guest RAM with the userfaultfd ({e}); copying");
            return fill.copy_all().map(|()| None);
        }
        let filter = match confine {
            true => Some(crate::seccomp::loader_filter(uffd_fd).map_err(std::io::Error::other)?),
            false => None,
        };
        // The thread is handed the work once it runs; if it cannot start (or is gone before it
        // takes it), this thread does the work.
        let (tx, rx) = std::sync::mpsc::channel::<Fill>();
        let spawned = std::thread::Builder::new().name("boot-load".into()).spawn(move || {
            if let Some(f) = &filter {
                if let Err(e) = crate::seccomp::apply(f) {
                    tracing::error!("boot-load: cannot apply the seccomp filter: {e}");
                }
            }
            if let Ok(mut fill) = rx.recv() {
                fill.run();
            }
        });
        match spawned {
            Ok(t) => match tx.send(fill) {
                Ok(()) => Ok(Some(t)),
                Err(std::sync::mpsc::SendError(fill)) => fill.copy_all().map(|()| None),
            },
            Err(e) => {
                tracing::warn!("boot-load: cannot start the thread ({e}); copying");
                fill.copy_all().map(|()| None)
            }
        }
    }
}

/// Creates a userfaultfd (non-blocking) and does the API handshake; None when this process may not.
fn open_uffd() -> Option<OwnedFd> {
    // SAFETY: the userfaultfd syscall takes flags only; a non-negative result is a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut api = uffd::Api { api: uffd::API, ..Default::default() };
    // SAFETY: UFFDIO_API on our userfaultfd with a struct of the size the ioctl number encodes.
    let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(&fd, uffd::UFFDIO_API(), &mut api) };
    (rc == 0).then_some(fd)
}

/// A reader of one file into guest RAM: what lands on whole pages of guest RAM is left to the
/// loader, the rest is copied.
pub struct LazyReader<'a> {
    loader: &'a mut Loader,
    /// The file, shared with the loader's pending ranges once one is.
    shared: Option<Arc<File>>,
    file: &'a mut File,
    len: u64,
}

impl LazyReader<'_> {
    fn shared(&mut self) -> std::io::Result<Arc<File>> {
        if let Some(f) = &self.shared {
            return Ok(f.clone());
        }
        let f = Arc::new(self.file.try_clone()?);
        self.shared = Some(f.clone());
        Ok(f)
    }
}

impl Read for LazyReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }
}

impl Seek for LazyReader<'_> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.file.seek(pos)
    }
}

impl ReadVolatile for LazyReader<'_> {
    fn read_volatile<B: BitmapSlice>(&mut self, buf: &mut VolatileSlice<B>) -> Result<usize, VolatileMemoryError> {
        let pos = self.file.stream_position().map_err(VolatileMemoryError::IOError)?;
        let want = buf.len().min(self.len.saturating_sub(pos) as usize);
        let start = buf.ptr_guard_mut().as_ptr() as usize;
        // The page-aligned middle of the destination, and the file offset that lands on it.
        let first = start.next_multiple_of(PAGE);
        let end = (start + want) / PAGE * PAGE;
        let congruent = start % PAGE == (pos % PAGE as u64) as usize;
        let lazy = self.loader.uffd.is_some()
            && congruent
            && end > first
            && end - first >= MIN_LAZY
            && self.loader.in_ram(start, want)
            && !self.loader.overlaps_copied(first, end - first);
        if !lazy {
            let n = self.file.read_volatile(buf)?;
            self.loader.copied.push((start, n));
            return Ok(n);
        }
        let file = self.shared().map_err(VolatileMemoryError::IOError)?;
        // The unaligned head and tail are copied now.
        let head = first - start;
        self.file.read_exact_volatile(&mut buf.subslice(0, head)?)?;
        self.file.seek(SeekFrom::Start(pos + (end - start) as u64)).map_err(VolatileMemoryError::IOError)?;
        self.file.read_exact_volatile(&mut buf.subslice(end - start, want - (end - start))?)?;
        self.loader.copied.extend([(start, head), (end, start + want - end)]);
        self.loader.pending.push(Pending { at: first, len: end - first, file, offset: pos + head as u64 });
        buf.bitmap().mark_dirty(0, want);
        Ok(want)
    }
}

/// The loader thread's work: the pending ranges (next last), filled step by step.
struct Fill {
    /// Taken (closed, which unregisters every range) before copying without it.
    uffd: Option<OwnedFd>,
    pending: Vec<Pending>,
    buf: Vec<u8>,
    /// Keeps guest RAM mapped while it is filled.
    _mem: GuestMemory,
}

impl Fill {
    fn register(&self) -> std::io::Result<()> {
        let Some(fd) = &self.uffd else { return Err(std::io::Error::other("no userfaultfd")) };
        for p in &self.pending {
            let mut r = uffd::Register {
                range: uffd::Range { start: p.at as u64, len: p.len as u64 },
                mode: uffd::REGISTER_MODE_MISSING,
                ioctls: 0,
            };
            // SAFETY: UFFDIO_REGISTER on our userfaultfd; the range is guest RAM (checked when it
            // was read: private anonymous memory), whose missing pages this Fill will fill.
            let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(fd, uffd::UFFDIO_REGISTER(), &mut r) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if r.ioctls & uffd::IOCTL_COPY == 0 {
                return Err(std::io::Error::other("UFFDIO_COPY is not available on guest RAM"));
            }
        }
        Ok(())
    }

    /// Copies every pending range with plain writes, the userfaultfd closed first (which
    /// unregisters every range).
    fn copy_all(mut self) -> std::io::Result<()> {
        self.uffd = None;
        while let Some(p) = self.pending.pop() {
            // SAFETY: `p` is guest RAM that `mem` keeps mapped, and nothing else refers to it
            // yet (the VM has not run); plain writes of the file's bytes.
            let dst = unsafe { std::slice::from_raw_parts_mut(p.at as *mut u8, p.len) };
            read_full(&p.file, dst, p.offset)?;
        }
        Ok(())
    }

    /// Waits for the guest's first fault (it starts on a page left here: its entry point), or
    /// [`IDLE_WAIT`]; then serves faults first and fills the next step, until everything is
    /// filled. (Filling while the VM is still being made would only slow that down.)
    fn run(&mut self) {
        if let Some(fd) = &self.uffd {
            let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one pollfd of ours; a timeout or an error just starts filling.
            unsafe { libc::poll(&mut p, 1, IDLE_WAIT.as_millis() as i32) };
        }
        let mut msgs = [uffd::Msg::default(); 16];
        loop {
            for at in self.faults(&mut msgs) {
                self.fill_around(at);
            }
            let Some(p) = self.pending.last_mut() else { break };
            let n = STEP.min(p.len);
            let (at, offset) = (p.at, p.offset);
            let file = p.file.clone();
            p.at += n;
            p.offset += n as u64;
            p.len -= n;
            if p.len == 0 {
                self.pending.pop();
            }
            self.fill(&file, at, n, offset);
        }
        // Closing the userfaultfd (when the thread ends) unregisters guest RAM.
    }

    /// The addresses of the page faults waiting now.
    fn faults(&self, msgs: &mut [uffd::Msg]) -> Vec<usize> {
        let Some(fd) = &self.uffd else { return Vec::new() };
        let size = std::mem::size_of_val(msgs);
        // SAFETY: reading whole `uffd_msg`s from our non-blocking userfaultfd into `msgs`.
        let n = unsafe { libc::read(fd.as_raw_fd(), msgs.as_mut_ptr().cast(), size) };
        if n <= 0 {
            return Vec::new();
        }
        let count = n as usize / std::mem::size_of::<uffd::Msg>();
        msgs[..count].iter().filter(|m| m.event == uffd::EVENT_PAGEFAULT).map(|m| m.address as usize).collect()
    }

    /// Fills the page at `at` (a fault's address) from whichever pending range holds it, and wakes
    /// whoever waits for it.
    fn fill_around(&mut self, at: usize) {
        let page = at / PAGE * PAGE;
        let hit = self.pending.iter().rev().find(|p| page >= p.at && page < p.at + p.len);
        if let Some(p) = hit {
            let (file, offset) = (p.file.clone(), p.offset + (page - p.at) as u64);
            self.fill(&file, page, PAGE, offset);
        }
        // Filled already (by a step, or by an earlier fault on the same page): wake the waiter.
        let range = uffd::Range { start: page as u64, len: PAGE as u64 };
        if let Some(fd) = &self.uffd {
            // SAFETY: UFFDIO_WAKE on our userfaultfd with a range of guest RAM.
            unsafe { vmm_sys_util::ioctl::ioctl_with_ref(fd, uffd::UFFDIO_WAKE(), &range) };
        }
    }

    /// Fills `len` bytes at `at` from `file` at `offset` (zeros past its end), skipping pages
    /// that are there already.
    fn fill(&mut self, file: &File, at: usize, len: usize, offset: u64) {
        let Some(fd) = &self.uffd else { return };
        let buf = &mut self.buf[..len];
        if let Err(e) = read_full(file, buf, offset) {
            tracing::warn!("boot-load: cannot read the guest's software: {e}; the guest sees zeros there");
            buf.fill(0);
        }
        let mut done = 0;
        while done < len {
            let mut c = uffd::Copy {
                dst: (at + done) as u64,
                src: buf[done..].as_ptr() as u64,
                len: (len - done) as u64,
                mode: 0,
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY on our userfaultfd, from our buffer into registered guest RAM
            // (it only ever fills pages that are missing).
            let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(fd, uffd::UFFDIO_COPY(), &mut c) };
            if rc == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            match (e.raw_os_error(), c.copy) {
                // Copied up to a page that is there already (EAGAIN), or that page first (EEXIST).
                (Some(libc::EAGAIN), n) if n > 0 => done += n as usize,
                (Some(libc::EEXIST), _) | (Some(libc::EAGAIN), _) => done += PAGE,
                _ => {
                    tracing::warn!("boot-load: UFFDIO_COPY: {e}");
                    break;
                }
            }
        }
    }
}

/// Reads `buf.len()` bytes at `offset`, zeros past the end of the file.
fn read_full(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf[done..].fill(0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::{Bytes, GuestAddress};

    fn file_of(bytes: &[u8]) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    fn pattern(n: usize, seed: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 4096 + seed) as u8).collect()
    }

    fn load(loader: &mut Loader, mem: &GuestMemory, f: &mut File, at: u64, offset: u64, n: usize) {
        f.seek(SeekFrom::Start(offset)).unwrap();
        let mut r = loader.reader(f).unwrap();
        mem.read_exact_volatile_from(GuestAddress(at), &mut r, n).unwrap();
    }

    fn ram(mem: &GuestMemory) -> Vec<u8> {
        let mut v = vec![0u8; 8 << 20];
        mem.read_slice(&mut v, GuestAddress(0)).unwrap();
        v
    }

    /// Loads two files the way a boot does (the second over part of the first; later reads win)
    /// into `mem` through `loader`, and starts it.
    fn boot_like(mut loader: Loader, mem: &GuestMemory, a: &mut File, b: &mut File) -> usize {
        // Page-congruent but not page-aligned: a head and tail copied around a lazy middle.
        load(&mut loader, mem, a, 0x20_0123, 0x123, (1 << 20) - 0x523);
        // Over the first one's lazy middle and its copied tail.
        load(&mut loader, mem, b, 0x2e_0000, 0, 256 << 10);
        // Not page-congruent: copied.
        load(&mut loader, mem, a, 0x40_0001, 0, 200 << 10);
        let pending = loader.pending_bytes();
        if let Some(t) = loader.start(true).unwrap() {
            // Reading guest RAM now faults into the loader thread or finds pages filled.
            let early = ram(mem);
            t.join().unwrap();
            assert_eq!(early, ram(mem));
        }
        pending
    }

    #[test]
    fn lazily_loaded_ram_equals_copied_ram_and_never_maps_the_files() {
        let (mut a, mut b) = (file_of(&pattern(1 << 20, 0)), file_of(&pattern(256 << 10, 99)));
        let lazy_mem = crate::memory::create_guest_memory(16 << 20).unwrap();
        let copied_mem = crate::memory::create_guest_memory(16 << 20).unwrap();
        let pending = boot_like(Loader::new(&lazy_mem), &lazy_mem, &mut a, &mut b);
        assert_eq!(boot_like(Loader::copying(&copied_mem), &copied_mem, &mut a, &mut b), 0);
        if open_uffd().is_some() {
            assert!(pending >= 512 << 10, "the aligned middles are left to the thread: {pending}");
        }
        let want = ram(&copied_mem);
        assert_eq!(want[0x2e_0000..0x2e_0010], pattern(16, 99)[..], "the later read won");
        assert_eq!(ram(&lazy_mem), want);
        // Guest RAM is anonymous memory: truncating the files changes nothing (and faults nothing).
        a.set_len(0).unwrap();
        b.set_len(0).unwrap();
        assert_eq!(ram(&lazy_mem), want);
    }

    #[test]
    fn small_or_misaligned_reads_are_copied() {
        let mut f = file_of(&pattern(512 << 10, 0));
        let mem = crate::memory::create_guest_memory(16 << 20).unwrap();
        let mut loader = Loader::new(&mem);
        load(&mut loader, &mem, &mut f, 0x20_0001, 0, 256 << 10);
        load(&mut loader, &mem, &mut f, 0x40_0000, 0, 16 << 10);
        assert_eq!(loader.pending_bytes(), 0);
        let mut v = vec![0u8; 256 << 10];
        mem.read_slice(&mut v, GuestAddress(0x20_0001)).unwrap();
        assert_eq!(v, pattern(256 << 10, 0));
    }

    #[test]
    fn a_file_shorter_than_the_read_is_an_error() {
        let mut f = file_of(&pattern(300 << 10, 0));
        let mem = crate::memory::create_guest_memory(16 << 20).unwrap();
        let mut loader = Loader::new(&mem);
        let mut r = loader.reader(&mut f).unwrap();
        assert!(mem.read_exact_volatile_from(GuestAddress(0x20_0000), &mut r, 400 << 10).is_err());
    }
}
