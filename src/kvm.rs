//! The host's KVM: opening /dev/kvm, checking what kvmerge relies on, and what kind of KVM it is.

use std::path::Path;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};

/// KVM_GET_API_VERSION has been 12 since Linux 2.6.22; anything else is not the KVM we know.
const KVM_API_VERSION: i32 = 12;

/// Every capability the VMM uses, with the name shown when one is missing.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::SetIdentityMapAddr, "KVM_CAP_SET_IDENTITY_MAP_ADDR"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::MpState, "KVM_CAP_MP_STATE"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "/dev/kvm does not exist: load the KVM module (modprobe kvm_intel or kvm_amd) or run on a host with KVM"
    )]
    Missing,
    #[error("/dev/kvm is not accessible ({0}): run as root or add your user to the 'kvm' group")]
    NotPermitted(#[source] std::io::Error),
    #[error("cannot open /dev/kvm")]
    Open(#[source] std::io::Error),
    #[error("/dev/kvm speaks KVM API version {0}, kvmerge needs {KVM_API_VERSION}")]
    ApiVersion(i32),
    #[error("this host's KVM lacks {0}, which kvmerge needs")]
    MissingCap(&'static str),
    #[error("KVM_GET_SUPPORTED_CPUID failed")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Which KVM implementation backs /dev/kvm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// Intel VMX or AMD SVM: runs any x86_64 guest.
    Hardware,
    /// kvm_pvm (pagetable-based virtual machine): guest ring 0 is emulated, so it runs payload guests
    /// but not stock Linux kernels.
    Pvm,
}

/// An opened, checked /dev/kvm shared by every VM of the process.
pub struct Host {
    kvm: Kvm,
    flavor: Flavor,
    supported_cpuid: CpuId,
    max_vcpus: usize,
}

impl Host {
    /// Opens /dev/kvm and checks the API version and every capability kvmerge uses.
    pub fn open() -> Result<Host> {
        let kvm = Kvm::new().map_err(|e| {
            let io = std::io::Error::from_raw_os_error(e.errno());
            match e.errno() {
                libc::ENOENT | libc::ENXIO | libc::ENODEV => Error::Missing,
                libc::EACCES | libc::EPERM => Error::NotPermitted(io),
                _ => Error::Open(io),
            }
        })?;
        let version = kvm.get_api_version();
        if version != KVM_API_VERSION {
            return Err(Error::ApiVersion(version));
        }
        if let Some((_, name)) = REQUIRED_CAPS
            .iter()
            .find(|(cap, _)| !kvm.check_extension(*cap))
        {
            return Err(Error::MissingCap(name));
        }
        let mut supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::SupportedCpuid)?;
        if kvm.check_extension(Cap::TscDeadlineTimer) {
            advertise_tsc_deadline(&mut supported_cpuid);
        }
        let max_vcpus = kvm.get_max_vcpus();
        Ok(Host {
            kvm,
            flavor: detect_flavor(Path::new("/sys/module"), Path::new("/proc/cpuinfo")),
            supported_cpuid,
            max_vcpus,
        })
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }

    /// The most vCPUs KVM allows in one VM.
    pub fn max_vcpus(&self) -> usize {
        self.max_vcpus
    }
}

/// CPUID.1:ECX bit 24: the LAPIC timer's TSC-deadline mode.
const CPUID_1_ECX_TSC_DEADLINE: u32 = 1 << 24;

/// The in-kernel LAPIC emulates the TSC-deadline timer, but KVM_GET_SUPPORTED_CPUID does not list
/// it (it is a property of the emulated APIC, not of the host CPU). Without it Linux calibrates
/// the APIC timer against the PIT at boot, which costs a noticeable part of a tiny guest's boot.
fn advertise_tsc_deadline(cpuid: &mut CpuId) {
    for entry in cpuid.as_mut_slice() {
        if entry.function == 1 && entry.index == 0 {
            entry.ecx |= CPUID_1_ECX_TSC_DEADLINE;
        }
    }
}

/// kvm_pvm registers as its own module; a hardware KVM host advertises vmx or svm to its own kernel.
fn detect_flavor(sys_module: &Path, cpuinfo: &Path) -> Flavor {
    if !sys_module.join("kvm_pvm").exists() {
        return Flavor::Hardware;
    }
    let flags = std::fs::read_to_string(cpuinfo).unwrap_or_default();
    let has_hw_virt = flags
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    // With both loaded, /dev/kvm belongs to whichever module claimed it first; only a host
    // without vmx/svm is certainly PVM.
    if has_hw_virt {
        Flavor::Hardware
    } else {
        Flavor::Pvm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(pvm_module: bool, flags: &str) -> (std::path::PathBuf, Flavor) {
        let dir = std::env::temp_dir().join(format!(
            "kvmerge-flavor-{}-{pvm_module}-{}",
            std::process::id(),
            flags.len()
        ));
        std::fs::create_dir_all(dir.join("module")).unwrap();
        if pvm_module {
            std::fs::create_dir_all(dir.join("module/kvm_pvm")).unwrap();
        }
        std::fs::write(
            dir.join("cpuinfo"),
            format!("processor\t: 0\nflags\t\t: {flags}\n"),
        )
        .unwrap();
        let flavor = detect_flavor(&dir.join("module"), &dir.join("cpuinfo"));
        (dir, flavor)
    }

    #[test]
    fn tsc_deadline_is_advertised_in_leaf_1_only() {
        let mut cpuid = CpuId::new(2).unwrap();
        cpuid.as_mut_slice()[0].function = 1;
        cpuid.as_mut_slice()[1].function = 7;
        advertise_tsc_deadline(&mut cpuid);
        assert_eq!(cpuid.as_slice()[0].ecx, CPUID_1_ECX_TSC_DEADLINE);
        assert_eq!(cpuid.as_slice()[1].ecx, 0);
    }

    #[test]
    fn flavors() {
        for (pvm, flags, want) in [
            (true, "fpu sse2 lm", Flavor::Pvm),
            (true, "fpu vmx lm", Flavor::Hardware),
            (false, "fpu svm lm", Flavor::Hardware),
            (false, "fpu lm", Flavor::Hardware),
        ] {
            let (dir, got) = fixture(pvm, flags);
            std::fs::remove_dir_all(dir).unwrap();
            assert_eq!(got, want, "pvm module {pvm}, flags {flags}");
        }
    }
}
