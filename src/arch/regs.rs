//! vCPU register state at entry: MSRs, FPU, general-purpose and special registers, LAPIC.

use std::os::raw::c_char;

use kvm_bindings::{Msrs, kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::GuestAddress;

use super::gdt::{self, GDT_LIMIT};
use super::layout::{BOOT_GDT_START, BOOT_STACK, PML4_START, ZERO_PAGE_START};
use super::{EntryMode, Error, Result, kvm_error};

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const MISC_ENABLE_FAST_STRING: u64 = 1 << 0;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_TYPE_WRITE_BACK: u64 = 6;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_MP: u64 = 1 << 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const X86_CR4_OSFXSR: u64 = 1 << 9;
const X86_CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Bit 1 of RFLAGS is reserved and always set; everything else clear, interrupts included.
const RFLAGS_RESERVED: u64 = 1 << 1;
/// I/O privilege level 3: ring-3 code may use `in`/`out` without consulting the TSS bitmap.
/// Payloads get both this and an all-permitting bitmap, because CPUs disagree on which one they
/// honour: kvm_pvm ignores IOPL and checks only the bitmap, while QEMU's TCG (the nested lab's L1
/// CPU) only reads the bitmap of an available (type 9) TSS, never the busy one KVM loads.
const RFLAGS_IOPL3: u64 = 3 << 12;

/// x87 control word after FNINIT: all exceptions masked, 64-bit precision, round to nearest.
const FPU_FCW_DEFAULT: u16 = 0x37f;
/// MXCSR at reset: all SSE exceptions masked.
const MXCSR_DEFAULT: u32 = 0x1f80;

/// Offset of the LVT LINT0 register in the LAPIC register page.
pub const APIC_LVT0: usize = 0x350;
/// Offset of the LVT LINT1 register in the LAPIC register page.
pub const APIC_LVT1: usize = 0x360;
const APIC_DELIVERY_MODE_MASK: u32 = 0x700;
const APIC_MODE_NMI: u32 = 0x4 << 8;
const APIC_MODE_EXTINT: u32 = 0x7 << 8;

/// The MSRs set at boot. The TSC is left alone: KVM synchronises the vCPUs' TSCs when they are
/// created, and writing it per vCPU at different moments would undo that.
fn boot_msrs() -> Vec<kvm_msr_entry> {
    let msr = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        // No SYSENTER or SYSCALL targets until the guest installs its own.
        msr(MSR_IA32_SYSENTER_CS, 0),
        msr(MSR_IA32_SYSENTER_ESP, 0),
        msr(MSR_IA32_SYSENTER_EIP, 0),
        msr(MSR_STAR, 0),
        msr(MSR_LSTAR, 0),
        msr(MSR_CSTAR, 0),
        msr(MSR_KERNEL_GS_BASE, 0),
        msr(MSR_SYSCALL_MASK, 0),
        // Firmware enables fast string operations; Linux expects them.
        msr(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        // No variable MTRRs: all memory write-back, as firmware would leave RAM.
        msr(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRITE_BACK),
    ]
}

/// Sets the boot MSRs, failing on the first one KVM rejects.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<()> {
    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(Error::MsrList)?;
    let written = vcpu.set_msrs(&msrs).map_err(kvm_error("KVM_SET_MSRS"))?;
    // KVM stops at the first MSR it refuses and returns how many it set.
    match entries.get(written) {
        Some(rejected) => Err(Error::MsrRejected(rejected.index)),
        None => Ok(()),
    }
}

/// Sets the x87/SSE state FNINIT and reset would leave.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<()> {
    let fpu = kvm_fpu {
        fcw: FPU_FCW_DEFAULT,
        mxcsr: MXCSR_DEFAULT,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_error("KVM_SET_FPU"))
}

/// General-purpose registers at entry.
fn boot_regs(entry: GuestAddress, index: u8, mode: EntryMode) -> kvm_regs {
    let regs = kvm_regs {
        rip: entry.0,
        rsi: ZERO_PAGE_START,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    };
    match mode {
        EntryMode::Linux => kvm_regs {
            rsp: BOOT_STACK,
            rbp: BOOT_STACK,
            ..regs
        },
        // The payload sets up its own stack (RSP 0).
        EntryMode::Payload => kvm_regs {
            rdi: u64::from(index),
            rflags: RFLAGS_RESERVED | RFLAGS_IOPL3,
            ..regs
        },
    }
}

/// Sets the general-purpose registers of a vCPU that starts at `entry`.
pub fn setup_regs(vcpu: &VcpuFd, entry: GuestAddress, index: u8, mode: EntryMode) -> Result<()> {
    vcpu.set_regs(&boot_regs(entry, index, mode))
        .map_err(kvm_error("KVM_SET_REGS"))
}

/// Puts `sregs` in 64-bit mode on the boot GDT and page tables: ring 0 for Linux, ring 3 for
/// payloads. Fields not named here (APIC base, LDT, CR2, CR8) keep the values KVM gave them.
fn boot_sregs(sregs: &mut kvm_sregs, mode: EntryMode) {
    let (code, data) = match mode {
        EntryMode::Linux => (gdt::KERNEL_CODE, gdt::KERNEL_DATA),
        EntryMode::Payload => (gdt::USER_CODE, gdt::USER_DATA),
    };
    sregs.cs = gdt::segment(code);
    let data = gdt::segment(data);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = gdt::segment(gdt::TSS);

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = GDT_LIMIT;
    // Empty IDT: until the guest installs one, any exception escalates to a triple fault,
    // which ends the VM instead of running garbage handlers.
    sregs.idt.base = 0;
    sregs.idt.limit = 0;

    // MP with NE: x87 errors are reported as #MF, the native way. Reset's CD/NW (caches off)
    // are dropped.
    sregs.cr0 = X86_CR0_PE | X86_CR0_MP | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG;
    sregs.cr3 = PML4_START;
    // SSE usable from the first instruction, as payloads need. Linux writes its own CR4 at
    // once, so the same value serves both modes.
    sregs.cr4 = X86_CR4_PAE | X86_CR4_OSFXSR | X86_CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
}

/// Sets the special registers for long mode.
pub fn setup_sregs(vcpu: &VcpuFd, mode: EntryMode) -> Result<()> {
    let mut sregs = vcpu.get_sregs().map_err(kvm_error("KVM_GET_SREGS"))?;
    boot_sregs(&mut sregs, mode);
    vcpu.set_sregs(&sregs).map_err(kvm_error("KVM_SET_SREGS"))
}

/// Reads a 32-bit LAPIC register.
pub fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let mut bytes = [0u8; 4];
    for (dst, &src) in bytes.iter_mut().zip(&lapic.regs[offset..offset + 4]) {
        *dst = src as u8;
    }
    u32::from_le_bytes(bytes)
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (dst, src) in lapic.regs[offset..offset + 4]
        .iter_mut()
        .zip(value.to_le_bytes())
    {
        *dst = src as c_char;
    }
}

/// LINT0 delivers ExtINT (the PIC) and LINT1 NMI, as the MP table says. Only the delivery mode
/// changes: KVM's reset leaves LINT0 unmasked on the BSP alone, so PIC interrupts reach exactly
/// one CPU until the guest programs its APICs (virtual-wire mode).
fn boot_lapic(lapic: &mut kvm_lapic_state) {
    for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let value = lapic_reg(lapic, offset);
        set_lapic_reg(lapic, offset, (value & !APIC_DELIVERY_MODE_MASK) | mode);
    }
}

/// Sets the LINT pins' delivery modes. Needs the in-kernel irqchip.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<()> {
    let mut lapic = vcpu.get_lapic().map_err(kvm_error("KVM_GET_LAPIC"))?;
    boot_lapic(&mut lapic);
    vcpu.set_lapic(&lapic).map_err(kvm_error("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msr_list() {
        let msrs = boot_msrs();
        let get = |index| msrs.iter().find(|m| m.index == index).map(|m| m.data);
        assert_eq!(get(MSR_IA32_MISC_ENABLE), Some(1));
        assert_eq!(get(MSR_MTRR_DEF_TYPE), Some(0x806));
        assert_eq!(get(MSR_LSTAR), Some(0));
        // The TSC (0x10) is not written.
        assert_eq!(get(0x10), None);
        assert_eq!(msrs.len(), 10);
    }

    #[test]
    fn linux_regs() {
        let regs = boot_regs(GuestAddress(0x100_0000), 0, EntryMode::Linux);
        assert_eq!(regs.rip, 0x100_0000);
        assert_eq!(regs.rsi, 0x7000);
        assert_eq!((regs.rsp, regs.rbp), (0x8ff0, 0x8ff0));
        assert_eq!(regs.rflags, 2);
        assert_eq!(regs.rdi, 0);
    }

    #[test]
    fn payload_regs() {
        let regs = boot_regs(GuestAddress(0x20_0000), 3, EntryMode::Payload);
        assert_eq!((regs.rip, regs.rdi, regs.rsi), (0x20_0000, 3, 0x7000));
        assert_eq!((regs.rsp, regs.rbp, regs.rflags), (0, 0, 0x3002));
    }

    #[test]
    fn long_mode_sregs() {
        for (mode, cs, ss, dpl) in [
            (EntryMode::Linux, 0x10, 0x18, 0),
            (EntryMode::Payload, 0x23, 0x2b, 3),
        ] {
            let mut sregs = kvm_sregs {
                apic_base: 0xfee0_0900,
                ..Default::default()
            };
            boot_sregs(&mut sregs, mode);
            assert_eq!((sregs.cs.selector, sregs.cs.dpl, sregs.cs.l), (cs, dpl, 1));
            for seg in [sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss] {
                assert_eq!((seg.selector, seg.dpl, seg.present), (ss, dpl, 1));
            }
            assert_eq!((sregs.tr.selector, sregs.tr.type_), (0x30, 0xb));
            assert_eq!((sregs.gdt.base, sregs.gdt.limit), (0x500, 63));
            assert_eq!((sregs.idt.base, sregs.idt.limit), (0, 0));
            assert_eq!(sregs.cr0, 0x8000_0033);
            assert_eq!(sregs.cr3, 0x9000);
            assert_eq!(sregs.cr4, 0x620);
            assert_eq!(sregs.efer, 0x500);
            assert_eq!(sregs.apic_base, 0xfee0_0900);
        }
    }

    #[test]
    fn lint_delivery_modes() {
        let mut lapic = kvm_lapic_state::default();
        // Masked, as KVM resets an AP.
        set_lapic_reg(&mut lapic, APIC_LVT0, 0x1_0000);
        set_lapic_reg(&mut lapic, APIC_LVT1, 0x1_0000);
        set_lapic_reg(&mut lapic, 0x370, 0xdead_beef);
        boot_lapic(&mut lapic);
        assert_eq!(lapic_reg(&lapic, APIC_LVT0), 0x1_0700);
        assert_eq!(lapic_reg(&lapic, APIC_LVT1), 0x1_0400);
        assert_eq!(lapic_reg(&lapic, 0x370), 0xdead_beef);
    }
}
