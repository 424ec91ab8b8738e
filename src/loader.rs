//! Guest kernel images: recognising the format, finding the kvmerge payload note, and loading
//! kernel + initrd into a VM's RAM with linux-loader.

use std::io::Cursor;
use std::path::{Path, PathBuf};

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
const PT_NOTE: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {0} is empty")]
    Empty(PathBuf),
    #[error(
        "kernel {path} is {what}: kvmerge boots an x86_64 bzImage or a 64-bit x86_64 ELF (vmlinux or payload)"
    )]
    Format { path: PathBuf, what: &'static str },
    #[error("kernel {path} could not be loaded ({source}); is the file truncated?")]
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
        let bytes = read_file("kernel", path)?;
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

    /// Checks a command line against this kernel's boot protocol limit.
    pub fn check_cmdline(&self, cmdline: &str) -> Result<()> {
        if cmdline.contains('\0') {
            return Err(Error::CmdlineNul);
        }
        let max = self.max_cmdline_len();
        if cmdline.len() > max {
            return Err(Error::CmdlineTooLong {
                len: cmdline.len(),
                max,
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
            bytes: read_file("initrd", path)?,
        })
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

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
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
        let mode = if has_payload_note(bytes) {
            EntryMode::Payload
        } else {
            EntryMode::Linux
        };
        return Ok((Format::Elf, mode));
    }
    // Linux boot protocol: boot sector signature at 0x1fe, "HdrS" at 0x202.
    if bytes.get(0x1fe..0x200) == Some(&[0x55, 0xaa]) && bytes.get(0x202..0x206) == Some(b"HdrS") {
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

    /// A minimal 64-bit x86_64 ELF header with one PT_NOTE program header holding `note`.
    fn elf_with_note(note: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 64 + 56];
        b[..4].copy_from_slice(ELF_MAGIC);
        b[4] = ELFCLASS64;
        b[5] = ELFDATA2LSB;
        b[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        b[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        b[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        b[64..68].copy_from_slice(&PT_NOTE.to_le_bytes());
        b[72..80].copy_from_slice(&120u64.to_le_bytes()); // p_offset
        b[96..104].copy_from_slice(&(note.len() as u64).to_le_bytes()); // p_filesz
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
        let mut bz = vec![0u8; 0x400];
        bz[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(
            identify(p, &bz).unwrap(),
            (Format::BzImage, EntryMode::Linux)
        );
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
        elf[96..104].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(!has_payload_note(&elf));
        // Found by tests/fuzz (loader): a program header table at the top of the address space
        // overflowed the offset arithmetic of the field readers.
        let mut elf = elf_with_note(&note(PAYLOAD_NOTE_NAME, PAYLOAD_NOTE_TYPE));
        elf[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(!has_payload_note(&elf));
        assert_eq!(u32_at(&elf, usize::MAX - 1), None);
    }
}
