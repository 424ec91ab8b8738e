//! Guest kernel images: recognising the format, finding the kvmerge payload note, and loading
//! kernel + initrd into a VM's RAM with linux-loader.

use std::io::{Cursor, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::{self, Cmdline};
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{KernelLoader, bzimage::BzImage, elf::Elf};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::{self, EntryMode, layout};

/// Owner name and type of the ELF note that marks a kvmerge payload (guest-images/payload/PROTOCOL.md).
const PAYLOAD_NOTE_NAME: &[u8] = b"kvmerge\0";
const PAYLOAD_NOTE_TYPE: u32 = 0x4b4d_0001;
/// The 64-bit entry point of a bzImage sits 0x200 bytes into the protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

const ELF_MAGIC: &[u8] = b"\x7fELF";
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;

/// The largest kernel file kvmerge reads. Real kernels are 5-100 MiB (a debug vmlinux with
/// symbols can reach a few hundred); the bound keeps a wrong path (a disk image, /dev/zero) from
/// filling the host's memory before anything is checked.
pub const MAX_KERNEL_SIZE: u64 = 512 << 20;
/// The largest initrd kvmerge reads. It must also fit in each guest's RAM (checked per VM);
/// the Linux boot protocol keeps initrds below 4 GiB, and each distinct file is held in
/// kvmerge's memory for the whole build, so 1 GiB is the hard cap.
pub const MAX_INITRD_SIZE: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path} is {kind}, not a regular file: give the path of a regular file")]
    NotRegular {
        what: &'static str,
        path: PathBuf,
        kind: &'static str,
    },
    #[error(
        "{what} {path} is {size} bytes; kvmerge reads at most {max} for a {what} \
         (is this the right file?)"
    )]
    TooLarge {
        what: &'static str,
        path: PathBuf,
        size: u64,
        max: String,
    },
    #[error(
        "kernel {path} needs {need} of guest RAM ({why}), more than --memory {have}: raise --memory"
    )]
    NeedsMoreRam {
        path: PathBuf,
        need: String,
        have: String,
        why: &'static str,
    },
    #[error("kernel {path}: {what}; kvmerge boots only well-formed images")]
    BadImage { path: PathBuf, what: String },
    #[error("kernel {0} is empty")]
    Empty(PathBuf),
    #[error(
        "kernel {path} is {what}: kvmerge boots an x86_64 bzImage or a 64-bit x86_64 ELF (vmlinux or payload)"
    )]
    Format { path: PathBuf, what: &'static str },
    #[error("kernel {path} could not be loaded into guest RAM: {source}")]
    Load {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("initrd {path} ({size} bytes) does not fit in guest RAM: {source}; raise --memory")]
    InitrdTooBig {
        path: PathBuf,
        size: u64,
        #[source]
        source: arch::Error,
    },
    #[error("cannot copy the initrd into guest RAM")]
    InitrdCopy(#[source] vm_memory::GuestMemoryError),
    #[error("kernel command line is {len} bytes; this kernel's boot protocol allows at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("kernel command line: {0}; use printable ASCII only")]
    CmdlineInvalid(&'static str),
}

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    BzImage,
    Elf,
}

/// A kernel file read once and shared by every VM that boots it.
pub struct KernelImage {
    path: PathBuf,
    bytes: Vec<u8>,
    format: Format,
    mode: EntryMode,
}

/// Where a loaded kernel starts and what the boot protocol needs from it.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    pub entry: GuestAddress,
    /// First byte past the loaded image.
    pub end: u64,
    pub setup_header: Option<setup_header>,
    pub mode: EntryMode,
}

impl KernelImage {
    /// Reads and recognises a kernel file.
    pub fn open(path: &Path) -> Result<KernelImage> {
        let bytes = read_regular_file("kernel", path, MAX_KERNEL_SIZE)?;
        let (format, mode) = identify(path, &bytes)?;
        Ok(KernelImage {
            path: path.to_path_buf(),
            bytes,
            format,
            mode,
        })
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// Payload guests carry the kvmerge note; everything else is booted as Linux.
    pub fn mode(&self) -> EntryMode {
        self.mode
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The longest command line this kernel accepts.
    pub fn max_cmdline_len(&self) -> usize {
        arch::max_cmdline_len(self.bzimage_header().as_ref())
    }

    /// Checks a command line against this kernel's boot protocol limit, with linux-loader's
    /// `Cmdline` (its capacity counts the terminating NUL).
    pub fn check_cmdline(&self, line: &str) -> Result<()> {
        let max = self.max_cmdline_len();
        let mut checked = Cmdline::new(max + 1).map_err(|_| Error::CmdlineInvalid("empty"))?;
        checked.insert_str(line).map_err(|e| match e {
            cmdline::Error::TooLarge => Error::CmdlineTooLong {
                len: line.len(),
                max,
            },
            cmdline::Error::NullTerminator => Error::CmdlineNul,
            _ if line.contains('\0') => Error::CmdlineNul,
            _ => Error::CmdlineInvalid("it holds a character that is not printable ASCII"),
        })
    }

    /// The least guest RAM this kernel can be loaded into, and what sets it: the end of its
    /// highest ELF segment (or its entry point), or for a bzImage the load address plus the
    /// memory its setup header says the kernel needs while it decompresses (`init_size`).
    pub fn min_memory(&self) -> (u64, &'static str) {
        match self.format {
            Format::Elf => (
                elf_extent(&self.bytes).map_or(0, |e| e.end),
                "where its ELF segments end",
            ),
            Format::BzImage => (
                layout::HIMEM_START + self.bzimage_header().map_or(0, |h| u64::from(h.init_size)),
                "load address plus the setup header's init_size",
            ),
        }
    }

    /// Refuses guest RAM of `memory` bytes that cannot hold this kernel, before any VM exists.
    pub fn check_fits(&self, memory: u64) -> Result<()> {
        let (need, why) = self.min_memory();
        // Below 4 GiB the kernel loads into the first RAM region, which ends at the MMIO gap.
        let low_ram = memory.min(layout::MMIO_GAP_START);
        if need > low_ram {
            return Err(Error::NeedsMoreRam {
                path: self.path.clone(),
                need: crate::config::format_size(need.div_ceil(1 << 20) << 20),
                have: crate::config::format_size(memory),
                why,
            });
        }
        Ok(())
    }

    fn bzimage_header(&self) -> Option<setup_header> {
        if self.format != Format::BzImage {
            return None;
        }
        let mut hdr = setup_header::default();
        let raw = self
            .bytes
            .get(0x1f1..0x1f1 + std::mem::size_of::<setup_header>())?;
        // SAFETY: setup_header is plain old data (ByteValued); `raw` has exactly its size.
        unsafe {
            std::ptr::copy_nonoverlapping(
                raw.as_ptr(),
                (&mut hdr as *mut setup_header).cast::<u8>(),
                raw.len(),
            )
        };
        Some(hdr)
    }

    /// Loads the kernel into `mem`.
    pub fn load(&self, mem: &GuestMemoryMmap<()>) -> Result<LoadedKernel> {
        let load_err = |source| Error::Load {
            path: self.path.clone(),
            source,
        };
        let mut image = Cursor::new(self.bytes.as_slice());
        let himem = Some(GuestAddress(layout::HIMEM_START));
        match self.format {
            Format::BzImage => {
                let res = BzImage::load(mem, None, &mut image, himem).map_err(load_err)?;
                Ok(LoadedKernel {
                    entry: res.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
                    end: res.kernel_end,
                    setup_header: res.setup_header,
                    mode: self.mode,
                })
            }
            Format::Elf => {
                let res = Elf::load(mem, None, &mut image, himem).map_err(load_err)?;
                Ok(LoadedKernel {
                    entry: res.kernel_load,
                    end: res.kernel_end,
                    setup_header: None,
                    mode: self.mode,
                })
            }
        }
    }
}

/// An initrd file read once and shared by every VM that boots it.
pub struct InitrdImage {
    path: PathBuf,
    bytes: Vec<u8>,
}

impl InitrdImage {
    pub fn open(path: &Path) -> Result<InitrdImage> {
        Ok(InitrdImage {
            path: path.to_path_buf(),
            bytes: read_regular_file("initrd", path, MAX_INITRD_SIZE)?,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Copies the initrd to the address the boot protocol allows; returns (address, size).
    pub fn load(
        &self,
        mem: &GuestMemoryMmap<()>,
        kernel: &LoadedKernel,
    ) -> Result<(GuestAddress, u64)> {
        let too_big = |source| Error::InitrdTooBig {
            path: self.path.clone(),
            size: self.len(),
            source,
        };
        let addr = arch::initrd_load_addr(mem, kernel.setup_header.as_ref(), self.len())
            .map_err(too_big)?;
        // A bzImage header bounds the kernel for initrd_load_addr; an ELF image is bounded here.
        if addr.0 < kernel.end {
            let top = addr.0 + self.len();
            return Err(too_big(arch::Error::InitrdDoesNotFit {
                size: self.len(),
                available: top.saturating_sub(kernel.end),
            }));
        }
        mem.write_slice(&self.bytes, addr)
            .map_err(Error::InitrdCopy)?;
        Ok((addr, self.len()))
    }
}

/// Reads a whole file that must be a regular file of at most `max` bytes. It is opened with
/// O_NONBLOCK, so a FIFO or a device cannot block open(2); fstat on the open descriptor then
/// refuses anything that is not a regular file (no exceptions: a kernel, initrd or fleet file
/// behind a pipe or a device would have no size to check), and at most `max` + 1 bytes are ever
/// read, so a file that grows while it is read is still bounded.
pub fn read_regular_file(what: &'static str, path: &Path, max: u64) -> Result<Vec<u8>> {
    let read_err = |source| Error::Read {
        what,
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let kind = if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() {
            "a character device"
        } else if kind.is_block_device() {
            "a block device"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "a special file"
        };
        return Err(Error::NotRegular {
            what,
            path: path.to_path_buf(),
            kind,
        });
    }
    let too_large = |size| Error::TooLarge {
        what,
        path: path.to_path_buf(),
        size,
        max: crate::config::format_size(max),
    };
    if meta.len() > max {
        return Err(too_large(meta.len()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > max {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// Recognises the image format from its headers, before anything is loaded.
fn identify(path: &Path, bytes: &[u8]) -> Result<(Format, EntryMode)> {
    let format_err = |what| Error::Format {
        path: path.to_path_buf(),
        what,
    };
    if bytes.is_empty() {
        return Err(Error::Empty(path.to_path_buf()));
    }
    if bytes.starts_with(ELF_MAGIC) {
        if bytes.len() < 64 {
            return Err(format_err("a truncated ELF file"));
        }
        if bytes[4] != ELFCLASS64 {
            return Err(format_err("a 32-bit ELF file"));
        }
        if bytes[5] != ELFDATA2LSB || u16_at(bytes, 18) != Some(EM_X86_64) {
            return Err(format_err("an ELF file for another architecture"));
        }
        let extent = elf_extent(bytes).map_err(format_err)?;
        if extent.segments == 0 {
            return Err(format_err("an ELF file without loadable segments"));
        }
        if !extent.entry_in_segment {
            return Err(Error::BadImage {
                path: path.to_path_buf(),
                what: format!(
                    "its entry point {:#x} lies outside its loadable segments",
                    extent.entry
                ),
            });
        }
        let mode = if has_payload_note(bytes) {
            EntryMode::Payload
        } else {
            EntryMode::Linux
        };
        return Ok((Format::Elf, mode));
    }
    // Linux boot protocol: boot sector signature at 0x1fe, "HdrS" at 0x202.
    if bytes.get(0x1fe..0x200) == Some(&[0x55, 0xaa]) && bytes.get(0x202..0x206) == Some(b"HdrS") {
        // The real-mode setup (setup_sects sectors after the boot sector; 0 means 4), then the
        // protected-mode kernel of `syssize` 16-byte units.
        let setup_sects = match bytes[0x1f1] {
            0 => 4,
            n => u64::from(n),
        };
        let syssize = u32_at(bytes, 0x1f4).map_or(0, u64::from);
        if (bytes.len() as u64) < (setup_sects + 1) * 512 + syssize * 16 || syssize == 0 {
            return Err(format_err("a truncated bzImage"));
        }
        return Ok((Format::BzImage, EntryMode::Linux));
    }
    Err(format_err("neither a bzImage nor an ELF file"))
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(off..off.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(off..off.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// What the program headers of a 64-bit ELF say about where it loads.
#[derive(Debug, Default)]
struct ElfExtent {
    /// First guest-physical byte past every loadable segment.
    end: u64,
    entry: u64,
    entry_in_segment: bool,
    segments: usize,
}

/// Checks that the program header table and every segment's file bytes lie inside the file
/// (otherwise the file is truncated), and finds where the loadable segments end.
fn elf_extent(elf: &[u8]) -> std::result::Result<ElfExtent, &'static str> {
    const TRUNCATED: &str = "a truncated ELF file";
    let (Some(entry), Some(phoff), Some(phentsize), Some(phnum)) = (
        u64_at(elf, 24),
        u64_at(elf, 32),
        u16_at(elf, 54),
        u16_at(elf, 56),
    ) else {
        return Err(TRUNCATED);
    };
    if usize::from(phentsize) < 56 {
        return Err("an ELF file with malformed program headers");
    }
    let table_end = u64::from(phentsize)
        .checked_mul(u64::from(phnum))
        .and_then(|n| n.checked_add(phoff));
    if table_end.is_none_or(|end| end > elf.len() as u64) {
        return Err(TRUNCATED);
    }
    let mut extent = ElfExtent {
        entry,
        ..ElfExtent::default()
    };
    for i in 0..usize::from(phnum) {
        let ph = phoff as usize + i * usize::from(phentsize);
        let field = |off| u64_at(elf, ph + off).unwrap_or(0);
        let p_type = u32_at(elf, ph).unwrap_or(0);
        let (offset, paddr, filesz, memsz) = (field(8), field(24), field(32), field(40));
        if p_type != PT_LOAD && p_type != PT_NOTE {
            continue;
        }
        if offset
            .checked_add(filesz)
            .is_none_or(|end| end > elf.len() as u64)
        {
            return Err(TRUNCATED);
        }
        if p_type == PT_LOAD {
            if filesz > memsz {
                return Err("an ELF file with a segment larger in the file than in memory");
            }
            let Some(end) = paddr.checked_add(memsz) else {
                return Err("an ELF file with a segment past the end of the address space");
            };
            extent.segments += 1;
            extent.end = extent.end.max(end);
            extent.entry_in_segment |= (paddr..end).contains(&entry);
        }
    }
    Ok(extent)
}

/// Walks the PT_NOTE segments of a 64-bit ELF looking for the kvmerge payload note.
fn has_payload_note(elf: &[u8]) -> bool {
    let (Some(phoff), Some(phentsize), Some(phnum)) =
        (u64_at(elf, 32), u16_at(elf, 54), u16_at(elf, 56))
    else {
        return false;
    };
    (0..usize::from(phnum)).any(|i| {
        let Some(ph) = (phoff as usize).checked_add(i * usize::from(phentsize)) else {
            return false;
        };
        if u32_at(elf, ph) != Some(PT_NOTE) {
            return false;
        }
        match (u64_at(elf, ph + 8), u64_at(elf, ph + 32)) {
            (Some(off), Some(size)) => {
                let (off, size) = (off as usize, size as usize);
                off.checked_add(size)
                    .and_then(|end| elf.get(off..end))
                    .is_some_and(notes_contain_payload)
            }
            _ => false,
        }
    })
}

fn notes_contain_payload(mut notes: &[u8]) -> bool {
    let align4 = |n: usize| n.div_ceil(4) * 4;
    while notes.len() >= 12 {
        let namesz = u32_at(notes, 0).unwrap_or(0) as usize;
        let descsz = u32_at(notes, 4).unwrap_or(0) as usize;
        let ntype = u32_at(notes, 8).unwrap_or(0);
        let name_end = 12 + namesz;
        if notes.get(12..name_end) == Some(PAYLOAD_NOTE_NAME) && ntype == PAYLOAD_NOTE_TYPE {
            return true;
        }
        let next = 12 + align4(namesz) + align4(descsz);
        match notes.get(next..) {
            Some(rest) => notes = rest,
            None => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal 64-bit x86_64 ELF: one PT_LOAD of 4 KiB at 2 MiB holding the entry point, and
    /// one PT_NOTE holding `note`.
    fn elf_with_note(note: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 64 + 2 * 56];
        b[..4].copy_from_slice(ELF_MAGIC);
        b[4] = ELFCLASS64;
        b[5] = ELFDATA2LSB;
        b[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        b[24..32].copy_from_slice(&0x20_0000u64.to_le_bytes()); // e_entry
        b[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        b[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        b[56..58].copy_from_slice(&2u16.to_le_bytes()); // e_phnum
        let load = 64;
        b[load..load + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        b[load + 24..load + 32].copy_from_slice(&0x20_0000u64.to_le_bytes()); // p_paddr
        b[load + 40..load + 48].copy_from_slice(&0x1000u64.to_le_bytes()); // p_memsz
        let ph = 64 + 56;
        b[ph..ph + 4].copy_from_slice(&PT_NOTE.to_le_bytes());
        b[ph + 8..ph + 16].copy_from_slice(&176u64.to_le_bytes()); // p_offset
        b[ph + 32..ph + 40].copy_from_slice(&(note.len() as u64).to_le_bytes()); // p_filesz
        b.extend_from_slice(note);
        b
    }

    fn note(name: &[u8], ntype: u32) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(name.len() as u32).to_le_bytes());
        n.extend_from_slice(&4u32.to_le_bytes());
        n.extend_from_slice(&ntype.to_le_bytes());
        n.extend_from_slice(name);
        n.resize(n.len().div_ceil(4) * 4, 0);
        n.extend_from_slice(&1u32.to_le_bytes());
        n
    }

    #[test]
    fn recognises_formats() {
        let p = Path::new("k");
        let payload = elf_with_note(
            &[
                note(b"Xen\0", 18),
                note(PAYLOAD_NOTE_NAME, PAYLOAD_NOTE_TYPE),
            ]
            .concat(),
        );
        assert_eq!(
            identify(p, &payload).unwrap(),
            (Format::Elf, EntryMode::Payload)
        );
        let linux = elf_with_note(&note(b"Xen\0", 18));
        assert_eq!(
            identify(p, &linux).unwrap(),
            (Format::Elf, EntryMode::Linux)
        );
        let mut bz = vec![0u8; 5 * 512 + 0x100];
        bz[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x1f4..0x1f8].copy_from_slice(&0x10u32.to_le_bytes()); // syssize: 256 bytes
        assert_eq!(
            identify(p, &bz).unwrap(),
            (Format::BzImage, EntryMode::Linux)
        );
        bz.truncate(5 * 512 + 0xff);
        assert!(matches!(
            identify(p, &bz),
            Err(Error::Format {
                what: "a truncated bzImage",
                ..
            })
        ));
    }

    #[test]
    fn elf_structure_is_checked_before_loading() {
        let p = Path::new("k");
        let good = elf_with_note(&note(PAYLOAD_NOTE_NAME, PAYLOAD_NOTE_TYPE));
        assert_eq!(elf_extent(&good).unwrap().end, 0x20_1000);
        // A payload cut inside its note is truncated, not "a Linux kernel".
        match identify(p, &good[..good.len() - 4]) {
            Err(Error::Format { what, .. }) => assert_eq!(what, "a truncated ELF file"),
            other => panic!("{other:?}"),
        }
        let mut outside = good.clone();
        outside[24..32].copy_from_slice(&0x4000_0000u64.to_le_bytes());
        assert!(matches!(identify(p, &outside), Err(Error::BadImage { .. })));
        let mut huge = good.clone();
        huge[64 + 40..64 + 48].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(identify(p, &huge), Err(Error::Format { .. })));
        let image = KernelImage {
            path: p.into(),
            bytes: good,
            format: Format::Elf,
            mode: EntryMode::Payload,
        };
        assert!(image.check_fits(4 << 20).is_ok());
        let err = image.check_fits(2 << 20).unwrap_err().to_string();
        assert!(
            err.contains("needs 3 MiB") && err.contains("raise --memory"),
            "{err}"
        );
    }

    #[test]
    fn command_lines_are_checked_by_linux_loader() {
        let image = KernelImage {
            path: "k".into(),
            bytes: elf_with_note(&[]),
            format: Format::Elf,
            mode: EntryMode::Payload,
        };
        assert!(image.check_cmdline("console=ttyS0 fill=1").is_ok());
        assert!(image.check_cmdline(&"x".repeat(2047)).is_ok());
        assert!(matches!(
            image.check_cmdline(&"x".repeat(2048)),
            Err(Error::CmdlineTooLong {
                len: 2048,
                max: 2047
            })
        ));
        assert!(matches!(
            image.check_cmdline("a\0b"),
            Err(Error::CmdlineNul)
        ));
        assert!(matches!(
            image.check_cmdline("caf\u{e9}"),
            Err(Error::CmdlineInvalid(_))
        ));
    }

    #[test]
    fn only_bounded_regular_files_are_read() {
        let dir = std::env::temp_dir().join(format!("kvmerge-loader-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Opening a FIFO with no writer would block forever without O_NONBLOCK.
        assert!(matches!(
            read_regular_file("kernel", &fifo, 100),
            Err(Error::NotRegular { kind: "a FIFO", .. })
        ));
        assert!(matches!(
            read_regular_file("kernel", Path::new("/dev/zero"), 100),
            Err(Error::NotRegular {
                kind: "a character device",
                ..
            })
        ));
        let file = dir.join("f");
        std::fs::write(&file, [1u8; 101]).unwrap();
        assert!(matches!(
            read_regular_file("kernel", &file, 100),
            Err(Error::TooLarge { size: 101, .. })
        ));
        assert_eq!(read_regular_file("kernel", &file, 101).unwrap().len(), 101);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rejects_garbage() {
        let p = Path::new("k");
        assert!(matches!(identify(p, b""), Err(Error::Empty(_))));
        let mut elf32 = elf_with_note(&[]);
        elf32[4] = 1;
        let mut arm = elf_with_note(&[]);
        arm[18] = 183;
        for (bytes, what) in [
            (&b"\x7fELF\x02"[..], "a truncated ELF file"),
            (&elf32[..], "a 32-bit ELF file"),
            (&arm[..], "an ELF file for another architecture"),
            (&[0x4du8; 4096][..], "neither a bzImage nor an ELF file"),
        ] {
            match identify(p, bytes) {
                Err(Error::Format { what: w, .. }) => assert_eq!(w, what),
                other => panic!("expected format error {what}, got {other:?}"),
            }
        }
    }

    #[test]
    fn note_parser_survives_bad_sizes() {
        let mut n = note(PAYLOAD_NOTE_NAME, PAYLOAD_NOTE_TYPE);
        n[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(!notes_contain_payload(&n));
        let mut elf = elf_with_note(&note(PAYLOAD_NOTE_NAME, PAYLOAD_NOTE_TYPE));
        elf[152..160].copy_from_slice(&u64::MAX.to_le_bytes()); // the note's p_filesz
        assert!(!has_payload_note(&elf));
        // Found by tests/fuzz (loader): a program header table at the top of the address space
        // overflowed the offset arithmetic of the field readers.
        let mut elf = elf_with_note(&note(PAYLOAD_NOTE_NAME, PAYLOAD_NOTE_TYPE));
        elf[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(!has_payload_note(&elf));
        assert_eq!(u32_at(&elf, usize::MAX - 1), None);
    }
}
