//! x86_64 direct kernel boot: loads an ELF `vmlinux` (PVH entry when its note is present, else the
//! 64-bit Linux entry) or a bzImage, the initrd and command line, and writes the zero page or PVH
//! start info, the E820 map and the MP table.

pub mod layout;
pub mod mptable;
pub mod params;
pub mod regs;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::{
    self, BzImage, Elf, KernelLoader, KernelLoaderResult, PvhBootCapability,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::vstate::memory::low_ram_end;
use layout::*;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("kernel file {path} cannot be opened: {source}")]
    KernelOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel file {0} is not an ELF vmlinux or a bzImage")]
    NotKernel(PathBuf),
    #[error("cannot load kernel {path}: {source}")]
    Load {
        path: PathBuf,
        #[source]
        source: loader::Error,
    },
    #[error("guest memory ({mem_mib} MiB) is too small for the {what} ({need:#x} bytes needed)")]
    TooSmall {
        what: &'static str,
        mem_mib: u32,
        need: u64,
    },
    #[error("initrd {path} cannot be read: {source}")]
    Initrd {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("cannot write boot data to guest memory: {0}")]
    Write(#[source] vm_memory::GuestMemoryError),
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
}

/// How the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPoint {
    /// 32-bit protected mode at the PVH entry, `rbx` = `hvm_start_info`.
    Pvh(u64),
    /// 64-bit long mode, `rsi` = zero page (ELF without PVH note, or bzImage's `startup_64`).
    Linux64(u64),
}

pub struct BootSpec<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub mem_mib: u32,
    pub vcpus: u8,
}

/// Where the initrd landed.
#[derive(Debug, Clone, Copy)]
pub struct InitrdInfo {
    pub addr: u64,
    pub size: u64,
}

const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];

/// End address (exclusive) of the highest `PT_LOAD` segment of an ELF64 image.
fn elf_load_end(f: &mut File) -> std::io::Result<u64> {
    let mut eh = [0u8; 64];
    f.seek(SeekFrom::Start(0))?;
    f.read_exact(&mut eh)?;
    let phoff = u64::from_le_bytes(eh[32..40].try_into().unwrap_or_default());
    let phentsize = u16::from_le_bytes([eh[54], eh[55]]) as u64;
    let phnum = u16::from_le_bytes([eh[56], eh[57]]) as u64;
    let mut end = 0u64;
    for i in 0..phnum.min(256) {
        let mut ph = [0u8; 56];
        f.seek(SeekFrom::Start(phoff + i * phentsize))?;
        f.read_exact(&mut ph)?;
        if u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) == 1 {
            let paddr = u64::from_le_bytes(ph[24..32].try_into().unwrap_or_default());
            let memsz = u64::from_le_bytes(ph[40..48].try_into().unwrap_or_default());
            end = end.max(paddr.saturating_add(memsz));
        }
    }
    Ok(end)
}

/// Loads the kernel and returns its entry point and the end of the loaded image.
fn load_kernel(
    mem: &GuestMemoryMmap,
    spec: &BootSpec,
) -> Result<(EntryPoint, Option<KernelLoaderResult>, u64), BootError> {
    let path = spec.kernel;
    let open_err = |source| BootError::KernelOpen {
        path: path.to_owned(),
        source,
    };
    let mut f = File::open(path).map_err(open_err)?;
    let mut magic = [0u8; 4];
    let is_elf = f.read_exact(&mut magic).is_ok() && magic == ELF_MAGIC;
    let ram_end = low_ram_end(mem);
    let too_small = |need| BootError::TooSmall {
        what: "kernel",
        mem_mib: spec.mem_mib,
        need,
    };
    let load_err = |source| BootError::Load {
        path: path.to_owned(),
        source,
    };
    if is_elf {
        let end = elf_load_end(&mut f).map_err(|_| BootError::NotKernel(path.to_owned()))?;
        if end > ram_end {
            return Err(too_small(end));
        }
        let r = Elf::load(mem, None, &mut f, Some(GuestAddress(HIGH_MEMORY_START)))
            .map_err(load_err)?;
        let entry = match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(a) => EntryPoint::Pvh(a.0),
            _ => EntryPoint::Linux64(r.kernel_load.0),
        };
        return Ok((entry, None, r.kernel_end));
    }
    // bzImage: the protected-mode part loads at 1 MiB and decompresses in place, needing
    // `init_size` bytes there (boot protocol >= 2.10), or at least its own size.
    let size = f.metadata().map_err(open_err)?.len();
    let mut hdr = [0u8; 0x270];
    let init_size = match f
        .seek(SeekFrom::Start(0))
        .and_then(|_| f.read_exact(&mut hdr))
    {
        Ok(())
            if &hdr[0x202..0x206] == b"HdrS"
                && u16::from_le_bytes([hdr[0x206], hdr[0x207]]) >= 0x20a =>
        {
            u64::from(u32::from_le_bytes([
                hdr[0x260], hdr[0x261], hdr[0x262], hdr[0x263],
            ]))
        }
        _ => 0,
    };
    let need = HIGH_MEMORY_START + size.max(init_size);
    if need > ram_end {
        return Err(too_small(need));
    }
    match BzImage::load(mem, None, &mut f, Some(GuestAddress(HIGH_MEMORY_START))) {
        Ok(r) => Ok((
            EntryPoint::Linux64(r.kernel_load.0 + 0x200),
            Some(r),
            r.kernel_end,
        )),
        Err(loader::Error::Bzimage(_)) => Err(BootError::NotKernel(path.to_owned())),
        Err(e) => Err(load_err(e)),
    }
}

/// Places the initrd page-aligned at the top of low RAM (below `INITRD_ADDR_MAX`).
fn load_initrd(
    mem: &GuestMemoryMmap,
    spec: &BootSpec,
    path: &Path,
    kernel_end: u64,
) -> Result<InitrdInfo, BootError> {
    let err = |source| BootError::Initrd {
        path: path.to_owned(),
        source,
    };
    let mut f = File::open(path).map_err(err)?;
    let size = f.metadata().map_err(err)?.len();
    let top = low_ram_end(mem).min(INITRD_ADDR_MAX);
    let addr = top.checked_sub(size).map(|a| a & !0xfff);
    let addr = match addr {
        Some(a) if a >= kernel_end.max(HIGH_MEMORY_START) => a,
        _ => {
            return Err(BootError::TooSmall {
                what: "kernel and initrd",
                mem_mib: spec.mem_mib,
                need: kernel_end.max(HIGH_MEMORY_START) + size,
            });
        }
    };
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(BootError::Write)?;
    Ok(InitrdInfo { addr, size })
}

/// Loads everything and writes the boot structures; returns the boot vCPU's entry point.
pub fn load(mem: &GuestMemoryMmap, spec: &BootSpec) -> Result<EntryPoint, BootError> {
    let (entry, bz, kernel_end) = load_kernel(mem, spec)?;
    let initrd = match spec.initrd {
        Some(p) => Some(load_initrd(mem, spec, p, kernel_end)?),
        None => None,
    };
    let mut cmd = spec.cmdline.as_bytes().to_vec();
    if cmd.len() >= CMDLINE_MAX_SIZE {
        return Err(BootError::Cmdline(format!(
            "longer than {} bytes",
            CMDLINE_MAX_SIZE - 1
        )));
    }
    cmd.push(0);
    mem.write_slice(&cmd, GuestAddress(CMDLINE_START))
        .map_err(BootError::Write)?;
    regs::write_boot_tables(mem)?;
    mptable::setup(mem, spec.vcpus)?;
    match entry {
        EntryPoint::Pvh(_) => params::write_pvh_start_info(mem, initrd)?,
        EntryPoint::Linux64(_) => params::write_zero_page(
            mem,
            bz.and_then(|r| r.setup_header),
            cmd.len() as u32,
            initrd,
        )?,
    }
    Ok(entry)
}
