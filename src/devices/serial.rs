//! COM1: vm-superio's 8250 UART writing to the guest's console sink, interrupting through an irqfd.

use std::sync::Arc;

use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::console::ConsoleSink;

pub type SerialPort = Serial<InterruptTrigger, InputDrained, ConsoleSink>;

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

/// Tells the control loop that the guest has read every queued input byte, so the next chunk of
/// console input can be fed (the UART's receive FIFO holds only 64 bytes).
pub struct InputDrained(pub Arc<EventFd>);

impl SerialEvents for InputDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Err(e) = self.0.write(1) {
            log::warn!("cannot signal console input flow: {e}");
        }
    }
}

/// The UART of one VM. `drained` is signalled whenever its receive FIFO empties.
pub fn new_serial(irq: EventFd, drained: Arc<EventFd>, console: ConsoleSink) -> SerialPort {
    Serial::with_events(InterruptTrigger::new(irq), InputDrained(drained), console)
}
