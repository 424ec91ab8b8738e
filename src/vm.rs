//! One guest: its KVM VM, RAM, devices and vCPU threads, built by a fixed recipe and driven
//! through a checked lifecycle (Created → Running ⇄ Paused → Stopped).

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::{self, EntryMode, SystemConfig, layout};
use crate::config::VmConfig;
use crate::console::ConsoleSink;
use crate::devices::i8042::I8042;
use crate::devices::{self, Devices, serial};
use crate::kvm::Host;
use crate::loader::{self, InitrdImage, KernelImage};
use crate::memory::{self, GuestRam};
use crate::vcpu::{self, Command, Gate, State, VcpuHandle, VmEnd};

/// How long a vCPU may take to acknowledge a command before the VMM gives up on it.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("KVM_CREATE_VM failed")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("{step} failed")]
    Kvm {
        step: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error(transparent)]
    Memory(#[from] memory::Error),
    #[error(transparent)]
    Loader(#[from] loader::Error),
    #[error("boot setup failed")]
    Arch(#[from] arch::Error),
    #[error(transparent)]
    Vcpu(#[from] vcpu::Error),
    #[error("cannot {action} a VM that is {state:?}")]
    Transition {
        action: &'static str,
        state: Lifecycle,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifecycle {
    Created,
    Running,
    Paused,
    /// vCPU threads were told to exit; not yet collected.
    Stopping,
    Stopped,
}

/// The part of a VM its vCPU threads share.
pub struct VmShared {
    name: String,
    devices: Devices,
    end: OnceLock<(VmEnd, Instant)>,
    /// Tells the control loop that some VM ended.
    notify: Arc<EventFd>,
}

impl VmShared {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn devices(&self) -> &Devices {
        &self.devices
    }

    /// Records why the VM ended, unless an earlier reason is already recorded; wakes the control
    /// loop. Returns whether this call decided the outcome.
    pub fn end(&self, why: VmEnd) -> bool {
        let decided = self.end.set((why, Instant::now())).is_ok();
        if decided {
            if let Err(e) = self.notify.write(1) {
                log::error!("{}: cannot notify the control loop: {e}", self.name);
            }
        }
        decided
    }

    pub fn outcome(&self) -> Option<&(VmEnd, Instant)> {
        self.end.get()
    }
}

/// How a VM talks to the rest of the process.
pub struct VmIo {
    /// Where the guest's serial output goes.
    pub console: ConsoleSink,
    /// Signalled when the VM ends.
    pub notify: Arc<EventFd>,
    /// Signalled when the guest has read all queued console input.
    pub input_drained: Arc<EventFd>,
}

/// Everything a VM is built from that is shared across the fleet.
pub struct BootSources<'a> {
    pub kernel: &'a KernelImage,
    pub initrd: Option<&'a InitrdImage>,
}

pub struct Vm {
    index: usize,
    shared: Arc<VmShared>,
    // Field order is drop order: vCPU threads go first (Drop stops them), then the VM fd, then
    // guest RAM (which the merge thread may still hold a reference to).
    control: Arc<VmControl>,
    _vm_fd: VmFd,
    ram: Arc<GuestRam>,
    created: Instant,
}

impl Vm {
    /// Builds a VM in the Created state: RAM → VM fd → irqchip/PIT → memslots → devices → kernel →
    /// boot structures → vCPUs (threads started, paused).
    pub fn build(
        host: &Host,
        index: usize,
        cfg: &VmConfig,
        sources: &BootSources,
        io: VmIo,
    ) -> Result<Vm> {
        let created = Instant::now();
        let name = format!("vm{index}");
        let ram = Arc::new(GuestRam::new(
            &name,
            &arch::ram_regions(cfg.memory),
            cfg.dedup,
        )?);
        let vm_fd = host.kvm().create_vm().map_err(Error::CreateVm)?;
        create_platform(&vm_fd)?;
        register_memory(&vm_fd, &ram)?;

        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        vm_fd
            .register_irqfd(&serial_irq, devices::SERIAL_IRQ)
            .map_err(|source| Error::Kvm {
                step: "KVM_IRQFD (serial)",
                source,
            })?;
        let kbd_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        vm_fd
            .register_irqfd(&kbd_irq, devices::I8042_IRQ)
            .map_err(|source| Error::Kvm {
                step: "KVM_IRQFD (i8042)",
                source,
            })?;
        let serial = serial::new_serial(serial_irq, io.input_drained, io.console);
        let shared = Arc::new(VmShared {
            name,
            devices: Devices::new(serial, I8042::new(kbd_irq)),
            end: OnceLock::new(),
            notify: io.notify,
        });

        let mem = ram.memory();
        let cmdline = cfg.cmdline_for(index);
        let kernel = sources.kernel.load(mem)?;
        let initrd = match sources.initrd {
            Some(initrd) if !initrd.is_empty() => Some(initrd.load(mem, &kernel)?),
            _ => None,
        };
        arch::configure_system(
            mem,
            &SystemConfig {
                cmdline: cmdline.as_bytes(),
                initrd,
                setup_header: kernel.setup_header,
                num_vcpus: cfg.vcpus,
            },
        )?;

        let mut vcpus = Vec::with_capacity(usize::from(cfg.vcpus));
        let gate = Arc::new(Gate::new(usize::from(cfg.vcpus)));
        for i in 0..cfg.vcpus {
            let fd = vm_fd
                .create_vcpu(u64::from(i))
                .map_err(|source| Error::Kvm {
                    step: "KVM_CREATE_VCPU",
                    source,
                })?;
            arch::configure_vcpu(
                &fd,
                mem,
                host.supported_cpuid(),
                i,
                cfg.vcpus,
                kernel.entry,
                kernel.mode,
            )?;
            vcpus.push(VcpuHandle::spawn(fd, i, shared.clone(), gate.clone())?);
        }
        if kernel.mode == EntryMode::Payload {
            log::debug!(
                "{}: payload guest, entering ring 3 at {:#x}",
                shared.name,
                kernel.entry.0
            );
        }
        let name_for_control = shared.name.clone();
        Ok(Vm {
            index,
            shared,
            control: Arc::new(VmControl::new(name_for_control, vcpus, gate)),
            _vm_fd: vm_fd,
            ram,
            created,
        })
    }

    pub fn index(&self) -> usize {
        self.index
    }

    pub fn name(&self) -> &str {
        self.shared.name()
    }

    pub fn state(&self) -> Lifecycle {
        self.control.state()
    }

    pub fn shared(&self) -> &Arc<VmShared> {
        &self.shared
    }

    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// When the build started: the reference point for boot timings.
    pub fn created(&self) -> Instant {
        self.created
    }

    /// Why and when the VM ended, once it has.
    pub fn outcome(&self) -> Option<&(VmEnd, Instant)> {
        self.shared.outcome()
    }

    /// The handle other threads (the merge thread) use to pause this VM.
    pub fn control(&self) -> &Arc<VmControl> {
        &self.control
    }

    pub fn vcpu_tids(&self) -> Vec<i32> {
        self.control.vcpu_tids()
    }

    /// Created or Paused → Running.
    pub fn resume(&self) -> Result<()> {
        self.control.resume()
    }

    /// Running → Paused: every vCPU is out of the guest when this returns.
    pub fn pause(&self) -> Result<()> {
        self.control.pause()
    }

    /// Asks every vCPU thread to exit without waiting; `finish_stop` collects them.
    pub fn request_stop(&self) {
        self.control.request_stop();
    }

    /// Waits (bounded) for the vCPU threads to exit, joins them and flushes the console.
    pub fn finish_stop(&self) {
        if self.control.finish_stop() {
            self.shared.devices().finish_console();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.request_stop();
        self.finish_stop();
    }
}

/// A VM's vCPU threads and lifecycle, shared between the control loop (start, stop) and the merge
/// thread (holds around zero-page reclaim). One lock orders every command and hold: each command
/// is posted to all vCPUs and acknowledged by all before the next one is posted; a hold goes
/// through the VM's [`Gate`] and needs no acknowledgement from vCPUs outside the guest.
pub struct VmControl {
    name: String,
    inner: Mutex<ControlInner>,
    gate: Arc<Gate>,
}

struct ControlInner {
    vcpus: Vec<VcpuHandle>,
    state: Lifecycle,
}

impl VmControl {
    fn new(name: String, vcpus: Vec<VcpuHandle>, gate: Arc<Gate>) -> VmControl {
        VmControl {
            name,
            inner: Mutex::new(ControlInner {
                vcpus,
                state: Lifecycle::Created,
            }),
            gate,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ControlInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self) -> Lifecycle {
        self.lock().state
    }

    pub fn vcpu_tids(&self) -> Vec<i32> {
        self.lock().vcpus.iter().map(VcpuHandle::tid).collect()
    }

    pub fn resume(&self) -> Result<()> {
        let mut inner = self.lock();
        inner.transition(
            "start",
            &[Lifecycle::Created, Lifecycle::Paused],
            Command::Run,
        )?;
        inner.state = Lifecycle::Running;
        Ok(())
    }

    pub fn pause(&self) -> Result<()> {
        let mut inner = self.lock();
        inner.transition("pause", &[Lifecycle::Running], Command::Pause)?;
        inner.state = Lifecycle::Paused;
        Ok(())
    }

    /// Runs `f` while no vCPU of a running VM is inside the guest, then lets them run again.
    /// Returns `f`'s result and how long the vCPUs were held (from the request to the release, so
    /// including the wait for vCPUs to leave the guest), or None when the VM is not running (not
    /// started yet, paused by someone else, or stopping).
    pub fn with_paused<T>(&self, f: impl FnOnce() -> T) -> Result<Option<(T, Duration)>> {
        let inner = self.lock();
        if inner.state != Lifecycle::Running {
            return Ok(None);
        }
        let start = Instant::now();
        let held = self.gate.hold(
            |i| inner.vcpus.get(i).map_or((), VcpuHandle::kick),
            ACK_TIMEOUT,
        )?;
        let value = f();
        drop(held);
        Ok(Some((value, start.elapsed())))
    }

    /// Asks every vCPU thread to exit without waiting for them.
    pub fn request_stop(&self) {
        let mut inner = self.lock();
        if matches!(inner.state, Lifecycle::Stopping | Lifecycle::Stopped) {
            return;
        }
        for vcpu in &inner.vcpus {
            vcpu.post(Command::Exit);
        }
        inner.state = Lifecycle::Stopping;
    }

    /// Collects the vCPU threads after `request_stop` (bounded wait per thread). Returns whether
    /// this call stopped the VM (false when it already was stopped).
    pub fn finish_stop(&self) -> bool {
        let mut inner = self.lock();
        match inner.state {
            Lifecycle::Stopped => return false,
            Lifecycle::Stopping => {}
            _ => {
                for vcpu in &inner.vcpus {
                    vcpu.post(Command::Exit);
                }
            }
        }
        for vcpu in inner.vcpus.drain(..) {
            let acked = loop {
                match vcpu.wait_ack(Command::Exit, ACK_TIMEOUT) {
                    Ok(State::Exited) => break true,
                    // Acks of earlier commands still in flight.
                    Ok(_) => continue,
                    Err(e) => {
                        log::error!("{}: {e}", self.name);
                        break false;
                    }
                }
            };
            vcpu.join(acked);
        }
        inner.state = Lifecycle::Stopped;
        true
    }
}

impl ControlInner {
    /// Posts `command` to every vCPU, then waits for every acknowledgement.
    fn transition(
        &mut self,
        action: &'static str,
        from: &[Lifecycle],
        command: Command,
    ) -> Result<()> {
        if !from.contains(&self.state) {
            return Err(Error::Transition {
                action,
                state: self.state,
            });
        }
        for vcpu in &self.vcpus {
            vcpu.post(command);
        }
        for vcpu in &self.vcpus {
            vcpu.wait_ack(command, ACK_TIMEOUT)?;
        }
        Ok(())
    }
}

/// In-kernel interrupt controllers and timer, plus the two pages KVM needs for its own use on
/// Intel hosts (real-mode TSS and EPT identity map), placed inside the MMIO gap.
fn create_platform(vm: &VmFd) -> Result<()> {
    let step = |step| move |source| Error::Kvm { step, source };
    vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_START)
        .map_err(step("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.set_tss_address(layout::KVM_TSS_START as usize)
        .map_err(step("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip().map_err(step("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(step("KVM_CREATE_PIT2"))?;
    Ok(())
}

fn register_memory(vm: &VmFd, ram: &GuestRam) -> Result<()> {
    for (slot, region) in ram.memory().iter().enumerate() {
        let host = ram
            .memory()
            .get_host_address(region.start_addr())
            .map_err(|e| Error::Memory(memory::Error::Layout(e.to_string())))?;
        let mem_region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the host range belongs to `ram`, which every owner of this VM fd keeps alive
        // at least as long as the VM (field order in `Vm`).
        unsafe { vm.set_user_memory_region(mem_region) }.map_err(|source| Error::Kvm {
            step: "KVM_SET_USER_MEMORY_REGION",
            source,
        })?;
    }
    Ok(())
}
