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

/// How long a vCPU may take to acknowledge a command, or to leave the guest for a pause, before
/// the VMM gives up on it. Also the whole VM's budget in `finish_stop`.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a short hold ([`VmControl::with_paused`]) waits for vCPUs to leave the guest before
/// it gives up (its work is skipped, not failed).
pub const HOLD_TIMEOUT: Duration = Duration::from_millis(250);

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
    // guest RAM (unmapped when the last reference goes: vCPU threads and the merge thread hold
    // one too).
    control: Arc<VmControl>,
    /// None once [`Vm::dismantle`] has let KVM destroy the VM.
    vm_fd: Option<VmFd>,
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
        Vm::build_named(host, index, format!("vm{index}"), cfg, sources, io)
    }

    /// [`Vm::build`] with a name of the caller's (`kvmerge serve`'s VMs are named by their users).
    pub fn build_named(
        host: &Host,
        index: usize,
        name: String,
        cfg: &VmConfig,
        sources: &BootSources,
        io: VmIo,
    ) -> Result<Vm> {
        let created = Instant::now();
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
            vcpus.push(VcpuHandle::spawn(
                fd,
                i,
                shared.clone(),
                ram.clone(),
                gate.clone(),
            )?);
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
            vm_fd: Some(vm_fd),
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

    /// Created → Running without waiting (see [`VmControl::start`]).
    pub fn start(&self) -> Result<StartTicket> {
        self.control.start()
    }

    /// See [`VmControl::confirm_start`].
    pub fn confirm_start(&self, ticket: &StartTicket, deadline: Instant) -> Result<()> {
        self.control.confirm_start(ticket, deadline)
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

    /// Waits (bounded by [`ACK_TIMEOUT`]) for the vCPU threads to exit, joins them and flushes
    /// the console.
    pub fn finish_stop(&self) {
        self.finish_stop_by(Instant::now() + ACK_TIMEOUT);
    }

    /// As [`Vm::finish_stop`], waiting at most until `deadline` for all vCPUs together: stopping
    /// many VMs is `request_stop` on each, then `finish_stop_by` on each with one deadline.
    pub fn finish_stop_by(&self, deadline: Instant) {
        if self.control.finish_stop_by(deadline) {
            self.shared.devices().finish_console();
        }
    }
}

impl Vm {
    /// Stops the VM for the end of a fleet and lets KVM destroy it, but keeps its vCPU threads
    /// (waiting, out of KVM) and its guest RAM for `drop`. Dropping every VM of a fleet after
    /// dismantling all of them makes the threads' ends and the unmapping of guest RAM run with no
    /// VM left whose MMU notifier they would call into (see [`vcpu::Remains`]).
    pub fn dismantle(&mut self) {
        if let Some(remains) = self.control.park_by(Instant::now() + ACK_TIMEOUT) {
            // As after any stop: the vCPU threads are done with the console.
            self.shared.devices().finish_console();
            // kvm_run unmapped and vCPU fds closed; with the VM fd, KVM's last reference goes.
            drop(remains);
        }
        self.vm_fd = None;
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.request_stop();
        self.finish_stop();
    }
}

/// A VM's vCPU threads and lifecycle, shared between the control loop (start, pause, stop) and
/// the merge thread (short holds around zero-page reclaim). Every pause is a hold on the VM's
/// [`Gate`] and every command is numbered and acknowledged (the protocol: [`crate::vcpu`]). The
/// lifecycle lock is held only to check and change the state, never while waiting for vCPUs.
pub struct VmControl {
    name: String,
    gate: Arc<Gate>,
    vcpus: Vec<VcpuHandle>,
    inner: Mutex<ControlInner>,
}

struct ControlInner {
    state: Lifecycle,
    /// Numbers of the Exit commands posted by `request_stop`, per vCPU.
    exits: Vec<u64>,
    /// A `finish_stop` is collecting the threads.
    collecting: bool,
    /// `park_by` took the threads' VcpuFds; per vCPU, whether it acknowledged its exit. The
    /// threads wait for `finish_stop` to release and join them.
    parked: Option<Vec<bool>>,
}

impl VmControl {
    fn new(name: String, vcpus: Vec<VcpuHandle>, gate: Arc<Gate>) -> VmControl {
        VmControl {
            name,
            gate,
            vcpus,
            inner: Mutex::new(ControlInner {
                state: Lifecycle::Created,
                exits: Vec::new(),
                collecting: false,
                parked: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ControlInner> {
        crate::sync::lock(&self.inner)
    }

    pub fn state(&self) -> Lifecycle {
        self.lock().state
    }

    pub fn vcpu_tids(&self) -> Vec<i32> {
        self.vcpus.iter().map(VcpuHandle::tid).collect()
    }

    fn kick(&self) -> impl FnMut(usize) + '_ {
        |i| {
            if let Some(vcpu) = self.vcpus.get(i) {
                vcpu.kick();
            }
        }
    }

    /// Created → Running (every vCPU thread acknowledges Start), or Paused → Running (the
    /// lifecycle hold is lowered).
    pub fn resume(&self) -> Result<()> {
        let mut inner = self.lock();
        match inner.state {
            Lifecycle::Paused => {
                inner.state = Lifecycle::Running;
                self.gate.lower();
                Ok(())
            }
            Lifecycle::Created => {
                let ticket = Self::post_start(&self.vcpus, &mut inner);
                drop(inner);
                self.confirm_start(&ticket, Instant::now() + ACK_TIMEOUT)
            }
            state => Err(Error::Transition {
                action: "start",
                state,
            }),
        }
    }

    /// Created → Running without waiting for the vCPU threads: posts Start to each and returns
    /// what [`VmControl::confirm_start`] waits for. A fleet posts Start to every VM first and then
    /// confirms: on a host already busy with the guests started first, a new vCPU thread may wait
    /// long for its first time slice, and waiting for each VM in turn would add those waits up.
    pub fn start(&self) -> Result<StartTicket> {
        let mut inner = self.lock();
        if inner.state != Lifecycle::Created {
            return Err(Error::Transition {
                action: "start",
                state: inner.state,
            });
        }
        Ok(Self::post_start(&self.vcpus, &mut inner))
    }

    fn post_start(vcpus: &[VcpuHandle], inner: &mut ControlInner) -> StartTicket {
        let seqs = vcpus.iter().map(|v| v.post(Command::Start)).collect();
        inner.state = Lifecycle::Running;
        StartTicket(seqs)
    }

    /// Waits until every vCPU thread has acknowledged the Start of `ticket`, at most until
    /// `deadline` ([`Error::NoAck`] then; waiting again with the same ticket is fine).
    pub fn confirm_start(&self, ticket: &StartTicket, deadline: Instant) -> Result<()> {
        for (vcpu, &seq) in self.vcpus.iter().zip(&ticket.0) {
            vcpu.wait_ack(Command::Start, seq, deadline)?;
        }
        Ok(())
    }

    /// Running → Paused: every vCPU is out of the guest when this returns Ok, and stays out
    /// until `resume`. On error (a vCPU did not leave the guest) the VM is running again.
    pub fn pause(&self) -> Result<()> {
        let mut inner = self.lock();
        if inner.state != Lifecycle::Running {
            return Err(Error::Transition {
                action: "pause",
                state: inner.state,
            });
        }
        self.gate.raise();
        inner.state = Lifecycle::Paused;
        drop(inner);
        if let Err(e) = self.gate.wait_out(self.kick(), ACK_TIMEOUT) {
            let mut inner = self.lock();
            // Unless someone else has moved the VM on meanwhile (resumed it, or stopped it).
            if inner.state == Lifecycle::Paused {
                inner.state = Lifecycle::Running;
                self.gate.lower();
            }
            return Err(e.into());
        }
        Ok(())
    }

    /// Runs `f` while no vCPU of a running VM is inside the guest, then lets them run again.
    /// Returns `f`'s result and how long the vCPUs were held (from the request to the release, so
    /// including the wait for vCPUs to leave the guest), or None when the VM is not running (not
    /// started yet, paused, or stopping). Fails when a vCPU did not leave within
    /// [`HOLD_TIMEOUT`] (`f` is not run then).
    pub fn with_paused<T>(&self, f: impl FnOnce() -> T) -> Result<Option<(T, Duration)>> {
        let inner = self.lock();
        if inner.state != Lifecycle::Running {
            return Ok(None);
        }
        let start = Instant::now();
        self.gate.raise();
        drop(inner);
        // Lowered on every way out, a panic in `f` included.
        let _release = Lower(&self.gate);
        // vCPUs that stay inside after their kick are boosted until they are out (RtBoost).
        let mut boosted = Vec::new();
        let straggler = |i: usize| {
            boosted.extend(
                self.vcpus
                    .get(i)
                    .and_then(|v| vcpu::RtBoost::thread(v.tid())),
            )
        };
        let out = self
            .gate
            .wait_out_with(self.kick(), straggler, HOLD_TIMEOUT);
        drop(boosted);
        out?;
        let value = f();
        drop(_release);
        Ok(Some((value, start.elapsed())))
    }

    /// Asks every vCPU thread to exit without waiting for them.
    pub fn request_stop(&self) {
        let mut inner = self.lock();
        self.post_exit(&mut inner);
    }

    fn post_exit(&self, inner: &mut ControlInner) {
        if matches!(inner.state, Lifecycle::Stopping | Lifecycle::Stopped) {
            return;
        }
        inner.exits = self.vcpus.iter().map(|v| v.post(Command::Exit)).collect();
        inner.state = Lifecycle::Stopping;
    }

    /// Collects the vCPU threads after `request_stop`, waiting for all of them at most until
    /// `deadline` (without holding the lifecycle lock); a thread that has not acknowledged
    /// its exit by then is left behind, detached. Returns whether this call stopped the VM
    /// (false when it already was stopped, another call is collecting, or `park_by` stopped it
    /// and this call only ended the parked threads).
    pub fn finish_stop_by(&self, deadline: Instant) -> bool {
        let mut inner = self.lock();
        if inner.state == Lifecycle::Stopped || inner.collecting {
            return false;
        }
        if let Some(acked) = inner.parked.take() {
            // `park_by` collected them already; only their ends are left.
            inner.collecting = true;
            drop(inner);
            for (vcpu, acked) in self.vcpus.iter().zip(acked) {
                vcpu.join(acked);
            }
            let mut inner = self.lock();
            inner.state = Lifecycle::Stopped;
            inner.collecting = false;
            return false;
        }
        self.post_exit(&mut inner);
        inner.collecting = true;
        let exits = inner.exits.clone();
        drop(inner);
        for (vcpu, seq) in self.vcpus.iter().zip(exits) {
            let acked = self.wait_exit(vcpu, seq, deadline);
            drop(vcpu.take_remains());
            vcpu.join(acked);
        }
        let mut inner = self.lock();
        inner.state = Lifecycle::Stopped;
        inner.collecting = false;
        true
    }

    fn wait_exit(&self, vcpu: &VcpuHandle, seq: u64, deadline: Instant) -> bool {
        match vcpu.wait_ack(Command::Exit, seq, deadline) {
            Ok(state) => state == State::Exited,
            Err(e) => {
                log::error!("{}: {e}", self.name);
                false
            }
        }
    }

    /// The first half of a stop for the end of a fleet: tells the vCPU threads to exit, waits
    /// (until `deadline`) for them to acknowledge, and returns what they handed over (their
    /// VcpuFds and guest RAM references, see [`vcpu::Remains`]) while the threads themselves
    /// wait. `finish_stop` then lets them end and joins them. Returns None when the VM is
    /// stopped, parked or being collected already.
    pub fn park_by(&self, deadline: Instant) -> Option<Vec<vcpu::Remains>> {
        let mut inner = self.lock();
        if inner.state == Lifecycle::Stopped || inner.collecting || inner.parked.is_some() {
            return None;
        }
        self.post_exit(&mut inner);
        inner.collecting = true;
        let exits = inner.exits.clone();
        drop(inner);
        let mut remains = Vec::new();
        let mut acked = Vec::with_capacity(self.vcpus.len());
        for (vcpu, seq) in self.vcpus.iter().zip(exits) {
            acked.push(self.wait_exit(vcpu, seq, deadline));
            remains.extend(vcpu.take_remains());
        }
        let mut inner = self.lock();
        inner.parked = Some(acked);
        inner.collecting = false;
        Some(remains)
    }

    /// [`VmControl::finish_stop_by`] with [`ACK_TIMEOUT`] from now.
    pub fn finish_stop(&self) -> bool {
        self.finish_stop_by(Instant::now() + ACK_TIMEOUT)
    }
}

/// The Start commands posted by [`VmControl::start`], one number per vCPU.
pub struct StartTicket(Vec<u64>);

/// Lowers a raised hold when dropped.
struct Lower<'a>(&'a Gate);

impl Drop for Lower<'_> {
    fn drop(&mut self) {
        self.0.lower();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DedupMode;
    use crate::memory::tests::mapped;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc::{self, Receiver, Sender};
    use vm_memory::GuestAddress;

    /// A fake vCPU thread: acknowledges Start and Exit; with `stuck`, it enters the guest after
    /// Start and stays there, deaf to kicks, until `stuck` says otherwise (a long exit).
    fn fake_vcpu(
        gate: &Arc<Gate>,
        index: u8,
        stuck: Option<Receiver<()>>,
        ram: Option<Arc<GuestRam>>,
    ) -> VcpuHandle {
        VcpuHandle::spawn_with(
            format!("fake-vcpu{index}"),
            index,
            gate.clone(),
            move |mut port| {
                let _ram = ram;
                loop {
                    match port.next_command() {
                        Some(Command::Start) => {
                            port.ack(State::Running);
                            if let Some(stuck) = &stuck {
                                assert!(port.enter());
                                let _ = stuck.recv();
                                port.leave();
                            }
                        }
                        Some(Command::Exit) => {
                            port.ack(State::Exited);
                            return;
                        }
                        None => port.wait_command(None),
                    }
                }
            },
        )
        .unwrap()
    }

    /// A VM of fake vCPUs; `stuck` of them stay in the guest until their sender says so.
    fn fake_vm(
        name: &str,
        vcpus: u8,
        stuck: u8,
        ram: &Arc<GuestRam>,
    ) -> (VmControl, Vec<Sender<()>>) {
        let gate = Arc::new(Gate::new(usize::from(vcpus)));
        let mut release = Vec::new();
        let handles = (0..vcpus)
            .map(|i| {
                let stuck = (i < stuck).then(|| {
                    let (tx, rx) = mpsc::channel();
                    release.push(tx);
                    rx
                });
                fake_vcpu(&gate, i, stuck, Some(ram.clone()))
            })
            .collect();
        (VmControl::new(name.into(), handles, gate), release)
    }

    fn small_ram(name: &str) -> Arc<GuestRam> {
        Arc::new(GuestRam::new(name, &[(GuestAddress(0), 1 << 20)], DedupMode::Off).unwrap())
    }

    #[test]
    fn a_stuck_vcpu_fails_holds_cleanly_and_stops_do_not_hold_the_lock() {
        let ram = small_ram("unit-stuck-lock");
        let (control, release) = fake_vm("unit", 2, 1, &ram);
        let control = Arc::new(control);
        control.resume().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !control.gate.is_inside(0) {
            assert!(Instant::now() < deadline, "the stuck vCPU never entered");
            std::thread::yield_now();
        }
        // A hold cannot get the stuck vCPU out: it fails, and is released.
        let err = control.with_paused(|| ()).err().unwrap();
        assert!(
            matches!(err, Error::Vcpu(vcpu::Error::NoHold { index: 0, .. })),
            "{err}"
        );
        assert_eq!(control.state(), Lifecycle::Running);
        assert_eq!(control.gate.holds.load(Ordering::SeqCst), 0);
        // A stop waits for it (long deadline) without holding the lifecycle lock.
        let done = Arc::new(AtomicBool::new(false));
        let stopper = {
            let (control, done) = (control.clone(), done.clone());
            std::thread::spawn(move || {
                let stopped = control.finish_stop_by(Instant::now() + Duration::from_secs(120));
                done.store(true, Ordering::SeqCst);
                stopped
            })
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while control.state() != Lifecycle::Stopping {
            assert!(Instant::now() < deadline, "the stop never started");
            std::thread::yield_now();
        }
        // These would block behind the stop (until its deadline) if it held the lock.
        assert!(control.with_paused(|| ()).unwrap().is_none());
        assert_eq!(control.state(), Lifecycle::Stopping);
        assert!(
            !done.load(Ordering::SeqCst),
            "the stop ended before the vCPU left"
        );
        assert!(
            !control.finish_stop(),
            "a second stop does not collect again"
        );
        // The long exit ends; the vCPU sees its Exit and the stop completes.
        release[0].send(()).unwrap();
        assert!(stopper.join().unwrap());
        assert_eq!(control.state(), Lifecycle::Stopped);
    }

    #[test]
    fn a_vcpu_that_does_not_exit_is_left_behind_with_its_memory_mapped() {
        let ram = small_ram("unit-stuck-ram");
        let addr = ram.host_range().0;
        let (control, release) = fake_vm("unit", 4, 4, &ram);
        control.resume().unwrap();
        drop(ram);
        // One deadline for all four vCPUs, not one per vCPU.
        let start = Instant::now();
        assert!(control.finish_stop_by(Instant::now() + Duration::from_millis(500)));
        let took = start.elapsed();
        assert!(
            took < Duration::from_secs(2),
            "took {took:?}: a deadline per vCPU"
        );
        assert_eq!(control.state(), Lifecycle::Stopped);
        // The stuck threads live on, detached, and keep guest RAM mapped.
        assert!(mapped("unit-stuck-ram", addr));
        drop(control);
        assert!(mapped("unit-stuck-ram", addr));
        // When the last of them ends, the mapping goes.
        drop(release);
        let deadline = Instant::now() + Duration::from_secs(60);
        while mapped("unit-stuck-ram", addr) {
            assert!(Instant::now() < deadline, "guest RAM never unmapped");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn lifecycle_pause_is_a_hold() {
        let ram = small_ram("unit-pause");
        let (control, _release) = fake_vm("unit", 2, 0, &ram);
        assert!(matches!(
            control.pause(),
            Err(Error::Transition {
                action: "pause",
                state: Lifecycle::Created
            })
        ));
        control.resume().unwrap();
        control.pause().unwrap();
        assert_eq!(control.gate.holds.load(Ordering::SeqCst), 1);
        assert!(control.with_paused(|| ()).unwrap().is_none());
        control.resume().unwrap();
        assert_eq!(control.gate.holds.load(Ordering::SeqCst), 0);
        let (v, _) = control.with_paused(|| 7).unwrap().unwrap();
        assert_eq!(v, 7);
        assert_eq!(control.gate.holds.load(Ordering::SeqCst), 0);
        // Stopping a paused VM: the Exit commands reach vCPUs waiting at the gate.
        control.pause().unwrap();
        assert!(control.finish_stop());
        assert_eq!(control.state(), Lifecycle::Stopped);
    }
}
