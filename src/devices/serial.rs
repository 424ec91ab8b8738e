//! COM1: vm-superio's 8250 UART writing to the guest's console sink, interrupting through an irqfd.

use vm_superio::{Serial, Trigger, serial::NoEvents};
use vmm_sys_util::eventfd::EventFd;

use crate::console::ConsoleSink;

pub type SerialPort = Serial<InterruptTrigger, NoEvents, ConsoleSink>;

/// Raises the UART's IRQ line by signalling an eventfd that KVM injects as GSI 4.
pub struct InterruptTrigger(EventFd);

impl InterruptTrigger {
    pub fn new(evt: EventFd) -> InterruptTrigger {
        InterruptTrigger(evt)
    }
}

impl Trigger for InterruptTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
