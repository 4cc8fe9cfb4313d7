//! x86_64 boot: loading the kernel, initramfs and command line into guest memory, and the state the
//! vCPUs start in (registers, segments, page tables, FPU, MSRs, CPUID, MP table).

pub mod cpuid;
pub mod gdt;
pub mod lazy;
pub mod mptable;
pub mod msr;
pub mod params;
pub mod regs;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::{GuestMemory, CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, MMIO_GAP_START, PAGE_SIZE};
use params::InitrdLocation;

#[derive(Debug, Error)]
pub enum BootError {
    #[error("cannot read kernel {path}: {source}")]
    KernelRead { path: PathBuf, source: std::io::Error },
    #[error("kernel {0} is neither an ELF vmlinux nor a bzImage")]
    KernelFormat(PathBuf),
    #[error("cannot load kernel {path} into {mem_mib} MiB of guest memory: {reason}")]
    KernelLoad { path: PathBuf, mem_mib: u64, reason: String },
    #[error("cannot read initramfs {path}: {source}")]
    InitrdRead { path: PathBuf, source: std::io::Error },
    #[error("guest memory ({mem_mib} MiB) is too small for the kernel (ends at {kernel_end:#x}) and a {initrd_size}-byte initramfs")]
    NoRoomForInitrd { mem_mib: u64, kernel_end: u64, initrd_size: u64 },
    #[error("kernel command line is {len} bytes; the limit is {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    #[error("cannot write boot parameters: {0}")]
    Params(String),
    #[error("cannot write the MP table: {0}")]
    MpTable(String),
}

/// How the vCPUs enter the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// 32-bit protected mode, paging off, EBX = PVH start info (ELF vmlinux with a PVH note).
    Pvh(u64),
    /// 64-bit long mode, RSI = zero page (Linux 64-bit boot protocol).
    Linux64(u64),
}

/// The outcome of loading a kernel: where to start and what the boot parameters need.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    pub entry: EntryPoint,
    pub kernel_end: u64,
    pub header: Option<setup_header>,
}

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
const BZIMAGE_MAGIC: &[u8; 4] = b"HdrS";
/// A bzImage's 64-bit entry point is 0x200 bytes into the protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Reads 4 bytes at `offset`; None when the file is shorter.
fn magic_at(file: &mut File, offset: u64) -> std::io::Result<Option<[u8; 4]>> {
    let mut magic = [0u8; 4];
    file.seek(SeekFrom::Start(offset))?;
    match file.read_exact(&mut magic) {
        Ok(()) => Ok(Some(magic)),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

/// Some(true) for ELF, Some(false) for bzImage, None for neither.
fn detect_format(file: &mut File) -> std::io::Result<Option<bool>> {
    if magic_at(file, 0)?.as_ref() == Some(ELF_MAGIC) {
        return Ok(Some(true));
    }
    if magic_at(file, BZIMAGE_MAGIC_OFFSET)?.as_ref() == Some(BZIMAGE_MAGIC) {
        return Ok(Some(false));
    }
    Ok(None)
}

/// Loads an ELF vmlinux (PVH entry when it has the note, else the 64-bit entry) or a bzImage.
/// Its segments are read through `loader` (which may leave them to be filled later: [`lazy`]).
pub fn load_kernel(mem: &GuestMemory, path: &Path, loader: &mut lazy::Loader) -> Result<LoadedKernel, BootError> {
    let read_err = |source| BootError::KernelRead { path: path.to_owned(), source };
    let mut file = File::open(path).map_err(read_err)?;
    let is_elf = detect_format(&mut file).map_err(read_err)?.ok_or_else(|| BootError::KernelFormat(path.to_owned()))?;
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let mem_mib = mem.iter().map(|r| r.len()).sum::<u64>() >> 20;
    let load_err = |e: linux_loader::loader::Error| BootError::KernelLoad {
        path: path.to_owned(),
        mem_mib,
        reason: e.to_string(),
    };
    let mut file = loader.reader(&mut file).map_err(read_err)?;
    load_image(mem, &mut file, is_elf).map_err(load_err)
}

fn load_image(
    mem: &GuestMemory,
    file: &mut lazy::LazyReader,
    is_elf: bool,
) -> Result<LoadedKernel, linux_loader::loader::Error> {
    if is_elf {
        let r = Elf::load(mem, None, file, Some(GuestAddress(HIMEM_START)))?;
        let entry = match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(a) => EntryPoint::Pvh(a.0),
            // vmlinux's ELF entry is the physical address of startup_64.
            _ => EntryPoint::Linux64(r.kernel_load.0),
        };
        Ok(LoadedKernel { entry, kernel_end: r.kernel_end, header: r.setup_header })
    } else {
        let r = BzImage::load(mem, None, file, Some(GuestAddress(HIMEM_START)))?;
        Ok(LoadedKernel {
            entry: EntryPoint::Linux64(r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET),
            kernel_end: r.kernel_end,
            header: r.setup_header,
        })
    }
}

/// Loads the initramfs at the top of low RAM (below the MMIO gap), page-aligned, above the kernel
/// (read through `loader`).
pub fn load_initrd(
    mem: &GuestMemory,
    mem_bytes: u64,
    kernel_end: u64,
    path: &Path,
    loader: &mut lazy::Loader,
) -> Result<InitrdLocation, BootError> {
    let read_err = |source| BootError::InitrdRead { path: path.to_owned(), source };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let top = mem_bytes.min(MMIO_GAP_START);
    let no_room = || BootError::NoRoomForInitrd { mem_mib: mem_bytes >> 20, kernel_end, initrd_size: size };
    let addr = top.checked_sub(size).ok_or_else(no_room)? & !(PAGE_SIZE - 1);
    if addr < kernel_end.max(HIMEM_START) {
        return Err(no_room());
    }
    let mut file = loader.reader(&mut file).map_err(read_err)?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| read_err(std::io::Error::other(e.to_string())))?;
    Ok(InitrdLocation { addr, size })
}

/// Writes the NUL-terminated command line at CMDLINE_START.
pub fn load_command_line(mem: &GuestMemory, cmdline: &str) -> Result<usize, BootError> {
    if cmdline.len() + 1 > CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong { len: cmdline.len(), max: CMDLINE_MAX_SIZE - 1 });
    }
    let cl = linux_loader::cmdline::Cmdline::try_from(cmdline, CMDLINE_MAX_SIZE)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cl).map_err(|e| BootError::Cmdline(e.to_string()))?;
    Ok(cmdline.len() + 1)
}

/// Writes everything the kernel reads at entry besides itself: boot parameters and the MP table.
pub fn write_boot_parameters(
    mem: &GuestMemory,
    mem_bytes: u64,
    kernel: &LoadedKernel,
    cmdline_size: usize,
    initrd: Option<InitrdLocation>,
    vcpus: u8,
) -> Result<(), BootError> {
    let mp = mptable::build(EBDA_START, vcpus).map_err(|e| BootError::MpTable(e.to_string()))?;
    mem.write_slice(&mp, GuestAddress(EBDA_START)).map_err(|e| BootError::MpTable(e.to_string()))?;
    match kernel.entry {
        EntryPoint::Pvh(_) => params::write_pvh_start_info(mem, mem_bytes, initrd),
        EntryPoint::Linux64(_) => {
            let zp = params::zero_page(kernel.header, mem_bytes, cmdline_size, initrd);
            params::write_zero_page(mem, &zp)
        }
    }
    .map_err(|e| BootError::Params(e.to_string()))
}
