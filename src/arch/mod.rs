//! x86_64 boot setup: everything written into guest memory and vCPU state before the first
//! instruction runs.
//!
//! Two entry modes share one guest-physical layout ([`layout`]): the Linux 64-bit boot protocol
//! and the kvmerge payload protocol (guest-images/payload/PROTOCOL.md). The VMM calls
//! [`configure_system`] once per VM after loading the kernel (and initrd, placed with
//! [`initrd_load_addr`]), then [`configure_vcpu`] for every vCPU.

pub mod bootparams;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod paging;
pub mod regs;

use kvm_bindings::{CpuId, KVM_MP_STATE_RUNNABLE, kvm_mp_state};
use kvm_ioctls::VcpuFd;
use linux_loader::loader::bootparam::setup_header;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap, GuestMemoryRegion,
};

pub use bootparams::{initrd_load_addr, max_cmdline_len};

use layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Errors of the x86_64 boot setup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing one of the boot structures into guest memory failed.
    #[error("cannot write the {what} into guest memory")]
    WriteMemory {
        /// Which structure.
        what: &'static str,
        /// The cause.
        #[source]
        source: GuestMemoryError,
    },
    /// Guest RAM does not cover the fixed low-memory layout.
    #[error("guest RAM must start at address 0 and extend beyond 1 MiB")]
    LowRamMissing,
    /// The command line is longer than the kernel accepts.
    #[error("kernel command line is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong {
        /// Length without the NUL.
        len: usize,
        /// Longest allowed, without the NUL.
        max: usize,
    },
    /// The command line contains a NUL byte, which would end it early.
    #[error("kernel command line contains a NUL byte")]
    CmdlineHasNul,
    /// No room for the initrd in the first RAM region.
    #[error("initrd of {size} bytes does not fit: {available} bytes of low RAM are usable for it")]
    InitrdDoesNotFit {
        /// Size of the initrd.
        size: u64,
        /// Bytes between the kernel and the highest address the kernel accepts.
        available: u64,
    },
    /// The vCPU count is zero or above what the MP table can describe.
    #[error("{0} vCPUs requested; between 1 and {max} are supported", max = mptable::MAX_VCPUS)]
    VcpuCount(u8),
    /// A vCPU index not below the vCPU count.
    #[error("vCPU index {index} is out of range for {num_vcpus} vCPUs")]
    VcpuIndex {
        /// The index.
        index: u8,
        /// The vCPU count.
        num_vcpus: u8,
    },
    /// The entry point is not in guest RAM.
    #[error("entry point {0:#x} is outside guest RAM")]
    EntryOutsideRam(u64),
    /// The per-vCPU CPUID table has no room for the topology leaves.
    #[error("CPUID table is full")]
    CpuidFull(#[source] vmm_sys_util::fam::Error),
    /// The MSR list could not be built.
    #[error("cannot build the MSR list")]
    MsrList(#[source] vmm_sys_util::fam::Error),
    /// KVM accepted only part of the boot MSRs.
    #[error("KVM rejected MSR {0:#x}")]
    MsrRejected(u32),
    /// A vCPU ioctl failed.
    #[error("{op} failed")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Result of the x86_64 boot setup.
pub type Result<T> = std::result::Result<T, Error>;

/// How the vCPUs are started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// Linux 64-bit boot protocol: ring 0, RSI = boot_params, RSP = [`layout::BOOT_STACK`].
    /// BSP only; APs wait for INIT/SIPI.
    Linux,
    /// kvmerge payload protocol (PROTOCOL.md): ring 3, every vCPU started at the entry,
    /// RDI = vCPU index.
    Payload,
}

/// Where `mem_size` bytes of RAM go in guest-physical space: below the MMIO gap, and the rest
/// above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(GuestAddress, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), mem_size - MMIO_GAP_START),
        ]
    }
}

/// What [`configure_system`] needs to know about the guest.
#[derive(Clone, Copy, Debug)]
pub struct SystemConfig<'a> {
    /// Kernel command line, without the terminating NUL.
    pub cmdline: &'a [u8],
    /// Guest address and size of an initrd already loaded into guest memory.
    pub initrd: Option<(GuestAddress, u64)>,
    /// The setup header of a bzImage; `None` for an ELF kernel or payload.
    pub setup_header: Option<setup_header>,
    /// Number of vCPUs.
    pub num_vcpus: u8,
}

/// Writes the VM-wide boot structures: GDT and TSS, identity page tables, command line,
/// boot_params and MP table.
pub fn configure_system(mem: &GuestMemoryMmap<()>, cfg: &SystemConfig) -> Result<()> {
    mptable::check_vcpu_count(cfg.num_vcpus)?;
    gdt::write_gdt(mem)?;
    gdt::write_tss(mem)?;
    paging::setup_identity_map(mem)?;
    bootparams::write_cmdline(mem, cfg.cmdline, cfg.setup_header.as_ref())?;
    let regions: Vec<_> = mem.iter().map(|r| (r.start_addr(), r.len())).collect();
    let params = bootparams::build_boot_params(cfg, &regions)?;
    bootparams::write_boot_params(mem, &params)?;
    mptable::setup_mptable(mem, cfg.num_vcpus)
}

/// Sets up one vCPU: CPUID, MSRs, FPU, registers, special registers, LAPIC.
///
/// The vCPU must have been created with id `index`: KVM derives the LAPIC ID from it, and
/// CPUID, the MP table and the payload's RDI all assume they agree. In [`EntryMode::Linux`] the
/// APs keep their reset registers so the guest can start them with INIT/SIPI (the in-kernel
/// irqchip holds them in wait-for-SIPI until then); in [`EntryMode::Payload`] every vCPU is
/// made runnable at the entry point.
pub fn configure_vcpu(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap<()>,
    supported_cpuid: &CpuId,
    index: u8,
    num_vcpus: u8,
    entry: GuestAddress,
    mode: EntryMode,
) -> Result<()> {
    mptable::check_vcpu_count(num_vcpus)?;
    if index >= num_vcpus {
        return Err(Error::VcpuIndex { index, num_vcpus });
    }
    if !mem.address_in_range(entry) {
        return Err(Error::EntryOutsideRam(entry.0));
    }

    let mut cpuid = supported_cpuid.clone();
    cpuid::filter_cpuid(&mut cpuid, index, num_vcpus)?;
    // First: KVM validates EFER.LME, and some MSRs, against the guest's CPUID.
    vcpu.set_cpuid2(&cpuid)
        .map_err(kvm_error("KVM_SET_CPUID2"))?;
    regs::setup_msrs(vcpu)?;
    regs::setup_fpu(vcpu)?;
    if mode == EntryMode::Payload || index == 0 {
        regs::setup_regs(vcpu, entry, index, mode)?;
        regs::setup_sregs(vcpu, mode)?;
    }
    regs::setup_lapic(vcpu)?;
    if mode == EntryMode::Payload {
        vcpu.set_mp_state(kvm_mp_state {
            mp_state: KVM_MP_STATE_RUNNABLE,
        })
        .map_err(kvm_error("KVM_SET_MP_STATE"))?;
    }
    Ok(())
}

/// Maps a failed ioctl to [`Error::Kvm`].
fn kvm_error(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { op, source }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_userspace_memory_region};
    use kvm_ioctls::{Kvm, VcpuExit, VmFd};
    use vm_memory::Bytes;

    #[test]
    fn ram_regions_split_around_the_gap() {
        assert_eq!(ram_regions(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        assert_eq!(
            ram_regions(MMIO_GAP_START),
            vec![(GuestAddress(0), MMIO_GAP_START)]
        );
        assert_eq!(
            ram_regions(5 << 30),
            vec![(GuestAddress(0), 3 << 30), (GuestAddress(4 << 30), 2 << 30)]
        );
    }

    #[test]
    fn configure_system_checks_its_inputs() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let cfg = SystemConfig {
            cmdline: b"console=ttyS0",
            initrd: None,
            setup_header: None,
            num_vcpus: 0,
        };
        assert!(matches!(
            configure_system(&mem, &cfg),
            Err(Error::VcpuCount(0))
        ));
        let cfg = SystemConfig {
            num_vcpus: mptable::MAX_VCPUS + 1,
            ..cfg
        };
        assert!(matches!(
            configure_system(&mem, &cfg),
            Err(Error::VcpuCount(_))
        ));
        let long = vec![b'a'; 2048];
        let cfg = SystemConfig {
            cmdline: &long,
            num_vcpus: 1,
            ..cfg
        };
        assert!(matches!(
            configure_system(&mem, &cfg),
            Err(Error::CmdlineTooLong {
                len: 2048,
                max: 2047
            })
        ));

        let small = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
        let cfg = SystemConfig {
            cmdline: b"",
            ..cfg
        };
        assert!(matches!(
            configure_system(&small, &cfg),
            Err(Error::LowRamMissing)
        ));
    }

    /// A VM with an in-kernel irqchip and `mem` registered, or `None` (after saying why) when
    /// /dev/kvm is unusable and `KVMERGE_REQUIRE_KVM=1` is not set.
    fn kvm_vm(test: &str, mem: &GuestMemoryMmap<()>) -> Option<(Kvm, VmFd)> {
        let kvm = match Kvm::new() {
            Ok(kvm) => kvm,
            Err(e) => {
                if std::env::var("KVMERGE_REQUIRE_KVM").as_deref() == Ok("1") {
                    panic!("{test}: /dev/kvm is required but cannot be opened: {e}");
                }
                eprintln!("skipping {test}: cannot open /dev/kvm: {e}");
                return None;
            }
        };
        let vm = kvm.create_vm().unwrap();
        vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_START)
            .unwrap();
        vm.set_tss_address(layout::KVM_TSS_START as usize).unwrap();
        vm.create_irq_chip().unwrap();
        for (slot, region) in mem.iter().enumerate() {
            let host = mem.get_host_address(region.start_addr()).unwrap();
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: the mapping belongs to `mem`, which outlives the VM in every test.
            unsafe { vm.set_user_memory_region(region) }.unwrap();
        }
        Some((kvm, vm))
    }

    /// Runs the vCPU to its next port write and returns (port, data).
    fn next_out(vcpu: &mut kvm_ioctls::VcpuFd) -> (u16, Vec<u8>) {
        match vcpu.run().unwrap() {
            VcpuExit::IoOut(port, data) => (port, data.to_vec()),
            other => panic!("unexpected exit {other:?}"),
        }
    }

    const ENTRY: u64 = 0x20_0000;
    /// Reports the CPL, RDI, then the "HdrS" magic read through RSI. (The CPL rather than CS:
    /// kvm_pvm runs ring 3 on the host's own user selectors.)
    const PROBE: &[u8] = &[
        0x8c, 0xc8, // mov eax, cs
        0x24, 0x03, // and al, 3
        0xe6, 0xf4, // out 0xf4, al
        0x89, 0xf8, // mov eax, edi
        0xe6, 0xf4, // out 0xf4, al
        0x8b, 0x86, 0x02, 0x02, 0x00, 0x00, // mov eax, [rsi + 0x202]
        0xe7, 0xf4, // out 0xf4, eax
    ];

    fn booted_memory(num_vcpus: u8) -> GuestMemoryMmap<()> {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let cfg = SystemConfig {
            cmdline: b"console=ttyS0",
            initrd: None,
            setup_header: None,
            num_vcpus,
        };
        configure_system(&mem, &cfg).unwrap();
        mem.write_slice(PROBE, GuestAddress(ENTRY)).unwrap();
        mem
    }

    #[test]
    fn payload_vcpus_start_in_ring3() {
        let mem = booted_memory(2);
        let Some((kvm, vm)) = kvm_vm("payload_vcpus_start_in_ring3", &mem) else {
            return;
        };
        let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        for index in 0..2u8 {
            let mut vcpu = vm.create_vcpu(u64::from(index)).unwrap();
            configure_vcpu(
                &vcpu,
                &mem,
                &supported,
                index,
                2,
                GuestAddress(ENTRY),
                EntryMode::Payload,
            )
            .unwrap();

            let sregs = vcpu.get_sregs().unwrap();
            assert_eq!(sregs.cs, gdt::segment(gdt::USER_CODE));
            assert_eq!(sregs.ss, gdt::segment(gdt::USER_DATA));
            assert_eq!(sregs.tr, gdt::segment(gdt::TSS));
            assert_eq!(sregs.cr3, layout::PML4_START);
            assert_eq!(
                (sregs.gdt.base, sregs.gdt.limit),
                (layout::BOOT_GDT_START, gdt::GDT_LIMIT)
            );
            let regs = vcpu.get_regs().unwrap();
            assert_eq!((regs.rip, regs.rdi, regs.rsp), (ENTRY, u64::from(index), 0));
            let cpuid = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
            let leaf1 = cpuid.as_slice().iter().find(|e| e.function == 1).unwrap();
            assert_eq!(leaf1.ebx >> 24, u32::from(index));
            assert_eq!(vcpu.get_mp_state().unwrap().mp_state, KVM_MP_STATE_RUNNABLE);

            assert_eq!(next_out(&mut vcpu), (0xf4, vec![3]));
            assert_eq!(next_out(&mut vcpu), (0xf4, vec![index]));
            assert_eq!(next_out(&mut vcpu), (0xf4, b"HdrS".to_vec()));
        }
    }

    #[test]
    fn linux_bsp_starts_in_ring0_and_aps_wait() {
        let mem = booted_memory(2);
        let Some((kvm, vm)) = kvm_vm("linux_bsp_starts_in_ring0_and_aps_wait", &mem) else {
            return;
        };
        let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        let mut bsp = vm.create_vcpu(0).unwrap();
        let ap = vm.create_vcpu(1).unwrap();
        let ap_reset_sregs = ap.get_sregs().unwrap();
        let ap_reset_regs = ap.get_regs().unwrap();
        for (vcpu, index) in [(&bsp, 0), (&ap, 1)] {
            configure_vcpu(
                vcpu,
                &mem,
                &supported,
                index,
                2,
                GuestAddress(ENTRY),
                EntryMode::Linux,
            )
            .unwrap();
        }

        let sregs = bsp.get_sregs().unwrap();
        assert_eq!(sregs.cs, gdt::segment(gdt::KERNEL_CODE));
        assert_eq!(sregs.ds, gdt::segment(gdt::KERNEL_DATA));
        assert_eq!(sregs.tr, gdt::segment(gdt::TSS));
        let regs = bsp.get_regs().unwrap();
        assert_eq!(
            (regs.rip, regs.rsi, regs.rsp),
            (ENTRY, layout::ZERO_PAGE_START, layout::BOOT_STACK)
        );

        // The AP keeps its reset state and waits for INIT/SIPI.
        assert_eq!(ap.get_sregs().unwrap().cs, ap_reset_sregs.cs);
        assert_eq!(ap.get_regs().unwrap().rip, ap_reset_regs.rip);
        assert_ne!(ap.get_mp_state().unwrap().mp_state, KVM_MP_STATE_RUNNABLE);
        let lapic = ap.get_lapic().unwrap();
        assert_eq!(regs::lapic_reg(&lapic, regs::APIC_LVT1) & 0x700, 0x400);

        assert_eq!(next_out(&mut bsp), (0xf4, vec![0]));
        assert_eq!(next_out(&mut bsp), (0xf4, vec![0]));
        assert_eq!(next_out(&mut bsp), (0xf4, b"HdrS".to_vec()));
    }

    #[test]
    fn configure_vcpu_checks_its_inputs() {
        let mem = booted_memory(1);
        let Some((kvm, vm)) = kvm_vm("configure_vcpu_checks_its_inputs", &mem) else {
            return;
        };
        let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let configure = |index, num_vcpus, entry| {
            configure_vcpu(
                &vcpu,
                &mem,
                &supported,
                index,
                num_vcpus,
                GuestAddress(entry),
                EntryMode::Payload,
            )
        };
        assert!(matches!(
            configure(1, 1, ENTRY),
            Err(Error::VcpuIndex { .. })
        ));
        assert!(matches!(configure(0, 0, ENTRY), Err(Error::VcpuCount(0))));
        assert!(matches!(
            configure(0, 1, 1 << 30),
            Err(Error::EntryOutsideRam(_))
        ));
    }
}
