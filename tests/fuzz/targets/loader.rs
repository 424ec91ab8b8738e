//! Kernel and initrd loading as `Vm::build` does it, minus KVM: format identification and the
//! payload ELF note (`KernelImage::open`), the command-line limit of the bzImage header, the
//! linux-loader ELF/bzImage load, the initrd placement, and the boot structures
//! (`arch::configure_system`), all into a small guest memory.
//!
//! Input: the kernel file, then a 4-byte trailer: memory size (low 3 bits) and vCPUs (high 5
//! bits), the initrd size in 64-byte units (u16), the command line length in 16-byte units. Real
//! kernels work as seeds with any trailer appended.

use std::sync::OnceLock;

use kvmerge::arch::{self, SystemConfig};
use kvmerge::loader::{InitrdImage, KernelImage};
use kvmerge_fuzz::{Fields, assert_one_line, fd_path, memfd, memfd_at};
use vm_memory::{GuestAddress, GuestMemoryMmap};

const MEMORY_MIB: [u64; 8] = [2, 3, 4, 8, 16, 64, 128, 256];

/// One guest memory per size, made once: loads only write to it, so earlier inputs' bytes left
/// in it change nothing.
fn memory(index: usize) -> &'static GuestMemoryMmap<()> {
    static MEMORIES: OnceLock<Vec<GuestMemoryMmap<()>>> = OnceLock::new();
    &MEMORIES.get_or_init(|| {
        MEMORY_MIB
            .iter()
            .map(|mib| {
                let ranges: Vec<(GuestAddress, usize)> = arch::ram_regions(mib << 20)
                    .into_iter()
                    .map(|(addr, len)| (addr, len as usize))
                    .collect();
                GuestMemoryMmap::from_ranges(&ranges).expect("guest memory")
            })
            .collect()
    })[index]
}

fn run(data: &[u8]) {
    let split = data.len().saturating_sub(4);
    let (kernel, trailer) = data.split_at(split);
    let mut t = Fields::new(trailer);
    let shape = t.u8();
    let initrd_len = u64::from(t.u16()) * 64;
    let cmdline_len = usize::from(t.u8()) * 16;
    let mem = memory(usize::from(shape & 7));
    let vcpus = (shape >> 3) + 1;

    let kernel_file = memfd(kernel);
    let image = match KernelImage::open(&fd_path(&kernel_file)) {
        Ok(image) => image,
        Err(e) => return assert_one_line(&e.to_string()),
    };
    let cmdline: String = "console=ttyS0 fill=1 "
        .chars()
        .cycle()
        .take(cmdline_len)
        .collect();
    if let Err(e) = image.check_cmdline(&cmdline) {
        return assert_one_line(&e.to_string());
    }
    let loaded = match image.load(mem) {
        Ok(loaded) => loaded,
        Err(e) => return assert_one_line(&e.to_string()),
    };
    let initrd = if initrd_len > 0 {
        let initrd_file = memfd_at(&[0x5a; 16], 0, initrd_len);
        let initrd = InitrdImage::open(&fd_path(&initrd_file)).expect("memfd initrd opens");
        match initrd.load(mem, &loaded) {
            Ok(placed) => Some(placed),
            Err(e) => return assert_one_line(&e.to_string()),
        }
    } else {
        None
    };
    let system = SystemConfig {
        cmdline: cmdline.as_bytes(),
        initrd,
        setup_header: loaded.setup_header,
        num_vcpus: vcpus,
    };
    if let Err(e) = arch::configure_system(mem, &system) {
        assert_one_line(&e.to_string());
    }
}

fn main() {
    afl::fuzz!(|data: &[u8]| run(data));
}
