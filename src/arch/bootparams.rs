//! Linux `boot_params` (the zero page), the e820 map, the command line, and where the initrd
//! may go. Payloads read the same zero page, so it is written in both entry modes.
//!
//! Reference: Documentation/arch/x86/boot.rst in the Linux tree.

use linux_loader::loader::bootparam::{LOADED_HIGH, boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, ZERO_PAGE_START};
use super::{Error, Result, SystemConfig};
use crate::config::PAGE_SIZE;

/// `boot_flag`: the 0xAA55 boot-sector signature.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `header`: "HdrS".
const HDRS_MAGIC: u32 = 0x5372_6448;
/// Protocol version of a header made up for an ELF kernel: 2.15, the one whose fields we fill.
/// Everything we leave zero means "not provided" in it.
const ELF_BOOT_PROTOCOL: u16 = 0x020f;
/// `type_of_loader`: a loader without an assigned ID.
const LOADER_UNDEFINED: u8 = 0xff;

/// Linux `COMMAND_LINE_SIZE` on x86 is 2048 bytes including the NUL.
const ELF_CMDLINE_MAX: usize = 2047;
/// Before protocol 2.06 the limit was fixed.
const LEGACY_CMDLINE_MAX: usize = 255;
/// `initrd_addr_max` before protocol 2.03 defined the field.
const LEGACY_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// The longest command line (bytes, without the NUL) the kernel accepts: the header's
/// `cmdline_size` for a bzImage of protocol 2.06 or later, 255 for older ones, and 2047
/// (`COMMAND_LINE_SIZE` - 1) for an ELF kernel. Never more than the area reserved for it.
pub fn max_cmdline_len(setup_header: Option<&setup_header>) -> usize {
    let max = match setup_header {
        None => ELF_CMDLINE_MAX,
        Some(hdr) if hdr.version >= 0x0206 => hdr.cmdline_size as usize,
        Some(_) => LEGACY_CMDLINE_MAX,
    };
    max.min(CMDLINE_MAX_SIZE as usize - 1)
}

/// The highest page-aligned address at which an initrd of `size` bytes lies entirely in the
/// first RAM region, above the kernel and below the header's `initrd_addr_max`.
///
/// For a bzImage the kernel's footprint is known from its header (where the decompressor runs
/// and how much memory it needs). An ELF kernel gives no such information, so only high memory
/// below [`HIMEM_START`] is excluded: the caller must check the result against the end of the
/// loaded ELF image.
pub fn initrd_load_addr(
    mem: &GuestMemoryMmap<()>,
    setup_header: Option<&setup_header>,
    size: u64,
) -> Result<GuestAddress> {
    let ram_end = mem
        .iter()
        .find(|r| r.start_addr() == GuestAddress(0))
        .map(|r| r.len())
        .ok_or(Error::LowRamMissing)?;
    let top = match setup_header.map(initrd_addr_max) {
        Some(max) => ram_end.min(max.saturating_add(1)),
        None => ram_end,
    };
    // A header may put the kernel's end anywhere (pref_address is 64-bit); past the last page,
    // nothing fits above it.
    let floor = kernel_end(setup_header)
        .checked_next_multiple_of(PAGE_SIZE)
        .unwrap_or(u64::MAX);
    let available = top.saturating_sub(floor);
    match top.checked_sub(size).map(|start| start & !(PAGE_SIZE - 1)) {
        Some(start) if start >= floor => Ok(GuestAddress(start)),
        _ => Err(Error::InitrdDoesNotFit { size, available }),
    }
}

/// The highest address the initrd may occupy, per the kernel's header.
fn initrd_addr_max(hdr: &setup_header) -> u64 {
    if hdr.version >= 0x0203 {
        u64::from(hdr.initrd_addr_max)
    } else {
        LEGACY_INITRD_ADDR_MAX
    }
}

/// End of the memory the kernel uses before it has looked at the initrd.
fn kernel_end(hdr: Option<&setup_header>) -> u64 {
    let Some(hdr) = hdr else {
        return HIMEM_START;
    };
    let load = u64::from(hdr.code32_start);
    let mut end = load + u64::from(hdr.syssize) * 16;
    if hdr.version >= 0x020a {
        // The decompressor runs at the load address rounded up to kernel_alignment, but never
        // below pref_address (LOAD_PHYSICAL_ADDR), and needs init_size bytes from there.
        let align = u64::from(hdr.kernel_alignment);
        let aligned = if align.is_power_of_two() {
            align_up(load, align)
        } else {
            load
        };
        end = end.max(
            aligned
                .max(hdr.pref_address)
                .saturating_add(u64::from(hdr.init_size)),
        );
    }
    end.max(HIMEM_START)
}

fn align_up(value: u64, align: u64) -> u64 {
    value.next_multiple_of(align)
}

/// Writes `cmdline` and its NUL at [`CMDLINE_START`], after checking it against the kernel's
/// limit.
pub fn write_cmdline(
    mem: &GuestMemoryMmap<()>,
    cmdline: &[u8],
    setup_header: Option<&setup_header>,
) -> Result<()> {
    if cmdline.contains(&0) {
        return Err(Error::CmdlineHasNul);
    }
    let max = max_cmdline_len(setup_header);
    if cmdline.len() > max {
        return Err(Error::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    let write = |bytes: &[u8], addr: u64| {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|source| Error::WriteMemory {
                what: "command line",
                source,
            })
    };
    write(cmdline, CMDLINE_START)?;
    write(&[0], CMDLINE_START + cmdline.len() as u64)
}

/// The e820 map for the given RAM regions (sorted, the first starting at 0): usable RAM except
/// the EBDA and the legacy VGA/ROM area, which are reserved.
pub fn e820_map(regions: &[(GuestAddress, u64)]) -> Result<Vec<boot_e820_entry>> {
    let entry = |addr: u64, end: u64, kind: u32| boot_e820_entry {
        addr,
        size: end - addr,
        r#type: kind,
    };
    let (first, rest) = regions.split_first().ok_or(Error::LowRamMissing)?;
    let (GuestAddress(0), low_size) = *first else {
        return Err(Error::LowRamMissing);
    };
    if low_size <= HIMEM_START {
        return Err(Error::LowRamMissing);
    }
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(EBDA_START, HIMEM_START, E820_RESERVED),
        entry(HIMEM_START, low_size, E820_RAM),
    ];
    map.extend(
        rest.iter()
            .map(|&(start, size)| entry(start.0, start.0 + size, E820_RAM)),
    );
    Ok(map)
}

/// A setup header for a kernel that has none (ELF vmlinux, payloads).
fn elf_setup_header() -> setup_header {
    setup_header {
        boot_flag: BOOT_FLAG_MAGIC,
        header: HDRS_MAGIC,
        version: ELF_BOOT_PROTOCOL,
        // The kernel runs from high memory. CAN_USE_HEAP is left clear: it is about the
        // real-mode setup code's heap, which the 64-bit entry skips.
        loadflags: LOADED_HIGH,
        cmdline_size: ELF_CMDLINE_MAX as u32,
        ..Default::default()
    }
}

/// Builds the zero page: the kernel's header (or one made up for ELF kernels) completed with
/// what the loader owns: loader type, command line, initrd and the e820 map.
pub fn build_boot_params(
    cfg: &SystemConfig,
    regions: &[(GuestAddress, u64)],
) -> Result<boot_params> {
    let mut params = boot_params {
        // A bzImage's header is kept whole: the decompressor reads kernel_alignment and
        // init_size back from boot_params.
        hdr: cfg.setup_header.unwrap_or_else(elf_setup_header),
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_UNDEFINED;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.ext_cmd_line_ptr = (CMDLINE_START >> 32) as u32;
    if let Some((GuestAddress(addr), size)) = cfg.initrd {
        // 64-bit kernels combine these with the ext_ fields, so an initrd may sit above 4 GiB.
        params.hdr.ramdisk_image = addr as u32;
        params.ext_ramdisk_image = (addr >> 32) as u32;
        params.hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }

    let map = e820_map(regions)?;
    // At most 2 + number of regions entries: far below E820_MAX_ENTRIES_ZEROPAGE.
    params.e820_entries = map.len() as u8;
    for (i, entry) in map.into_iter().enumerate() {
        params.e820_table[i] = entry;
    }
    Ok(params)
}

/// Writes the zero page at [`ZERO_PAGE_START`].
pub fn write_boot_params(mem: &GuestMemoryMmap<()>, params: &boot_params) -> Result<()> {
    mem.write_obj(*params, GuestAddress(ZERO_PAGE_START))
        .map_err(|source| Error::WriteMemory {
            what: "boot_params",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::super::ram_regions;
    use super::*;
    use linux_loader::loader::bootparam::XLF_KERNEL_64;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn e820(mem_size: u64) -> Vec<(u64, u64, u32)> {
        e820_map(&ram_regions(mem_size))
            .unwrap()
            .into_iter()
            .map(|e| (e.addr, e.size, e.r#type))
            .collect()
    }

    fn memory(size: u64) -> GuestMemoryMmap<()> {
        let ranges: Vec<_> = ram_regions(size)
            .into_iter()
            .map(|(addr, len)| (addr, len as usize))
            .collect();
        GuestMemoryMmap::from_ranges(&ranges).unwrap()
    }

    fn config(cmdline: &[u8]) -> SystemConfig<'_> {
        SystemConfig {
            cmdline,
            initrd: None,
            setup_header: None,
            num_vcpus: 1,
        }
    }

    /// A header as a 64-bit bzImage of protocol 2.15 carries it.
    fn bzimage_header() -> setup_header {
        setup_header {
            setup_sects: 27,
            syssize: 0x8000,
            boot_flag: BOOT_FLAG_MAGIC,
            header: HDRS_MAGIC,
            version: 0x020f,
            loadflags: LOADED_HIGH,
            code32_start: HIMEM_START as u32,
            initrd_addr_max: 0x7fff_ffff,
            kernel_alignment: 0x20_0000,
            relocatable_kernel: 1,
            xloadflags: XLF_KERNEL_64,
            cmdline_size: 0x7ff,
            pref_address: 0x100_0000,
            init_size: 0x200_0000,
            ..Default::default()
        }
    }

    #[test]
    fn e820_for_16_mib() {
        assert_eq!(
            e820(16 * MIB),
            vec![
                (0, 0x9fc00, E820_RAM),
                (0x9fc00, 0x60400, E820_RESERVED),
                (MIB, 15 * MIB, E820_RAM),
            ]
        );
    }

    #[test]
    fn e820_for_3_gib() {
        assert_eq!(e820(3 * GIB)[2], (MIB, 3 * GIB - MIB, E820_RAM));
        assert_eq!(e820(3 * GIB).len(), 3);
    }

    #[test]
    fn e820_for_5_gib() {
        let map = e820(5 * GIB);
        assert_eq!(map.len(), 4);
        assert_eq!(map[2], (MIB, 3 * GIB - MIB, E820_RAM));
        assert_eq!(map[3], (4 * GIB, 2 * GIB, E820_RAM));
    }

    #[test]
    fn e820_needs_low_ram() {
        assert!(matches!(
            e820_map(&[(GuestAddress(0), MIB)]),
            Err(Error::LowRamMissing)
        ));
        assert!(matches!(
            e820_map(&[(GuestAddress(MIB), 16 * MIB)]),
            Err(Error::LowRamMissing)
        ));
        assert!(matches!(e820_map(&[]), Err(Error::LowRamMissing)));
    }

    #[test]
    fn elf_header_and_cmdline_pointer() {
        let params = build_boot_params(&config(b"console=ttyS0"), &ram_regions(64 * MIB)).unwrap();
        let hdr = params.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.version }, 0x020f);
        assert_eq!(hdr.type_of_loader, 0xff);
        assert_eq!(hdr.loadflags, LOADED_HIGH);
        assert_eq!({ hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ hdr.cmdline_size }, 2047);
        assert_eq!({ params.ext_cmd_line_ptr }, 0);
        assert_eq!(({ hdr.ramdisk_image }, { hdr.ramdisk_size }), (0, 0));
        assert_eq!(params.e820_entries, 3);
        let last = params.e820_table[2];
        assert_eq!(({ last.addr }, { last.size }), (MIB, 63 * MIB));
    }

    #[test]
    fn initrd_fields() {
        let cfg = SystemConfig {
            initrd: Some((GuestAddress(0x3f00_0000), 0x12_3456)),
            ..config(b"")
        };
        let params = build_boot_params(&cfg, &ram_regions(GIB)).unwrap();
        assert_eq!({ params.hdr.ramdisk_image }, 0x3f00_0000);
        assert_eq!({ params.hdr.ramdisk_size }, 0x12_3456);
        assert_eq!(
            ({ params.ext_ramdisk_image }, { params.ext_ramdisk_size }),
            (0, 0)
        );

        let cfg = SystemConfig {
            initrd: Some((GuestAddress(0x1_2345_6000), 0x1_0000_2000)),
            ..config(b"")
        };
        let params = build_boot_params(&cfg, &ram_regions(8 * GIB)).unwrap();
        assert_eq!({ params.hdr.ramdisk_image }, 0x2345_6000);
        assert_eq!({ params.ext_ramdisk_image }, 1);
        assert_eq!({ params.hdr.ramdisk_size }, 0x2000);
        assert_eq!({ params.ext_ramdisk_size }, 1);
    }

    #[test]
    fn bzimage_header_is_preserved() {
        let cfg = SystemConfig {
            setup_header: Some(bzimage_header()),
            ..config(b"root=/dev/vda")
        };
        let hdr = build_boot_params(&cfg, &ram_regions(64 * MIB)).unwrap().hdr;
        let orig = bzimage_header();
        assert_eq!(hdr.setup_sects, 27);
        assert_eq!({ hdr.version }, 0x020f);
        assert_eq!({ hdr.kernel_alignment }, 0x20_0000);
        assert_eq!({ hdr.init_size }, 0x200_0000);
        assert_eq!({ hdr.pref_address }, 0x100_0000);
        assert_eq!({ hdr.xloadflags }, XLF_KERNEL_64);
        assert_eq!({ hdr.cmdline_size }, 0x7ff);
        assert_eq!({ hdr.code32_start }, { orig.code32_start });
        assert_eq!(hdr.loadflags, LOADED_HIGH);
        // Loader-owned fields are filled in.
        assert_eq!(hdr.type_of_loader, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, 0x20000);
    }

    #[test]
    fn cmdline_limits() {
        assert_eq!(max_cmdline_len(None), 2047);
        let mut hdr = bzimage_header();
        assert_eq!(max_cmdline_len(Some(&hdr)), 0x7ff);
        hdr.cmdline_size = u32::MAX;
        assert_eq!(max_cmdline_len(Some(&hdr)), CMDLINE_MAX_SIZE as usize - 1);
        hdr.version = 0x0205;
        assert_eq!(max_cmdline_len(Some(&hdr)), 255);
    }

    #[test]
    fn cmdline_is_written_with_nul() {
        let mem = memory(2 * MIB);
        mem.write_slice(&[0xaa; 16], GuestAddress(CMDLINE_START))
            .unwrap();
        write_cmdline(&mem, b"quiet", None).unwrap();
        let mut buf = [0u8; 7];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&buf, b"quiet\0\xaa");

        assert!(matches!(
            write_cmdline(&mem, b"a\0b", None),
            Err(Error::CmdlineHasNul)
        ));
        let mut old = bzimage_header();
        old.version = 0x0204;
        assert!(matches!(
            write_cmdline(&mem, &[b'x'; 256], Some(&old)),
            Err(Error::CmdlineTooLong { len: 256, max: 255 })
        ));
    }

    #[test]
    fn boot_params_land_in_the_zero_page() {
        let mem = memory(2 * MIB);
        let params = build_boot_params(&config(b""), &ram_regions(2 * MIB)).unwrap();
        write_boot_params(&mem, &params).unwrap();
        let magic: u32 = mem.read_obj(GuestAddress(ZERO_PAGE_START + 0x202)).unwrap();
        assert_eq!(magic, HDRS_MAGIC);
        let entries: u8 = mem.read_obj(GuestAddress(ZERO_PAGE_START + 0x1e8)).unwrap();
        assert_eq!(entries, 3);
        let cmdline_ptr: u32 = mem.read_obj(GuestAddress(ZERO_PAGE_START + 0x228)).unwrap();
        assert_eq!(cmdline_ptr, 0x20000);
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram() {
        let mem = memory(64 * MIB);
        assert_eq!(
            initrd_load_addr(&mem, None, 0x1234).unwrap(),
            GuestAddress(64 * MIB - 0x2000)
        );
        assert_eq!(
            initrd_load_addr(&mem, None, 63 * MIB).unwrap(),
            GuestAddress(MIB)
        );
        assert!(matches!(
            initrd_load_addr(&mem, None, 63 * MIB + 1),
            Err(Error::InitrdDoesNotFit { available, .. }) if available == 63 * MIB
        ));

        // A bzImage decompresses at pref_address (16 MiB) into init_size (32 MiB).
        let hdr = bzimage_header();
        assert_eq!(
            initrd_load_addr(&mem, Some(&hdr), 16 * MIB).unwrap(),
            GuestAddress(48 * MIB)
        );
        assert!(matches!(
            initrd_load_addr(&mem, Some(&hdr), 16 * MIB + 1),
            Err(Error::InitrdDoesNotFit { available, .. }) if available == 16 * MIB
        ));
    }

    #[test]
    fn initrd_above_a_kernel_that_ends_past_the_address_space_does_not_fit() {
        // Found by tests/fuzz (loader): rounding the kernel's end up to a page overflowed.
        let mem = memory(64 * MIB);
        let mut hdr = bzimage_header();
        hdr.pref_address = u64::MAX - 0x10;
        assert!(matches!(
            initrd_load_addr(&mem, Some(&hdr), 0x1000),
            Err(Error::InitrdDoesNotFit { available: 0, .. })
        ));
    }

    #[test]
    fn initrd_respects_initrd_addr_max() {
        let mem = memory(3 * GIB);
        assert_eq!(
            initrd_load_addr(&mem, None, 4 * MIB).unwrap(),
            GuestAddress(3 * GIB - 4 * MIB)
        );
        let mut hdr = bzimage_header();
        assert_eq!(
            initrd_load_addr(&mem, Some(&hdr), 4 * MIB).unwrap(),
            GuestAddress(2 * GIB - 4 * MIB)
        );
        hdr.version = 0x0202;
        assert_eq!(
            initrd_load_addr(&mem, Some(&hdr), 4 * MIB).unwrap(),
            GuestAddress(0x3800_0000 - 4 * MIB)
        );
    }
}
