//! Legacy port-I/O devices of one VM and the dispatch from a vCPU's I/O exit to them.

pub mod debug_exit;
pub mod i8042;
pub mod serial;

use std::sync::Mutex;

use crate::devices::i8042::{I8042, Request};
use crate::devices::serial::SerialPort;
use crate::vcpu::VmEnd;

use crate::sync::lock;

/// COM1.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
pub const SERIAL_PORT_LEN: u16 = 8;
pub const SERIAL_IRQ: u32 = 4;
pub const I8042_IRQ: u32 = 1;
/// i8042 data and command ports.
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// Payload idle port: the vCPU thread blocks briefly instead of the guest spinning.
pub const IDLE_PORT: u16 = 0xf5;

/// The port-I/O devices of one VM, shared by its vCPU threads.
pub struct Devices {
    serial: Mutex<SerialPort>,
    i8042: Mutex<I8042>,
}

impl Devices {
    pub fn new(serial: SerialPort, i8042: I8042) -> Devices {
        Devices {
            serial: Mutex::new(serial),
            i8042: Mutex::new(i8042),
        }
    }

    /// Handles an `in` from the guest. Unclaimed ports read as all ones, like an empty ISA bus.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        match port {
            p if serial_offset(p).is_some() && data.len() == 1 => {
                data[0] = lock(&self.serial).read(serial_offset(p).unwrap_or(0));
            }
            I8042_DATA_PORT | I8042_COMMAND_PORT if data.len() == 1 => {
                data[0] = lock(&self.i8042).read((port - I8042_DATA_PORT) as u8);
            }
            _ => data.fill(0xff),
        }
    }

    /// Handles an `out` from the guest; returns why the VM ends when the write ends it.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> Option<VmEnd> {
        match port {
            p if serial_offset(p).is_some() && data.len() == 1 => {
                if let Err(e) = lock(&self.serial).write(serial_offset(p).unwrap_or(0), data[0]) {
                    log::warn!("serial write failed: {e:?}");
                }
                None
            }
            I8042_DATA_PORT | I8042_COMMAND_PORT if data.len() == 1 => {
                match lock(&self.i8042).write((port - I8042_DATA_PORT) as u8, data[0]) {
                    Request::Reset => Some(VmEnd::Reset),
                    Request::None => None,
                }
            }
            debug_exit::PORT => debug_exit::decode(data).map(VmEnd::Exit),
            _ => {
                log::trace!("unclaimed port write {port:#x} <- {data:?}");
                None
            }
        }
    }

    /// Queues host input for the guest's serial port; returns how many bytes fit in its FIFO.
    pub fn serial_input(&self, bytes: &[u8]) -> usize {
        let mut serial = lock(&self.serial);
        let room = serial.fifo_capacity();
        let n = bytes.len().min(room);
        if n == 0 {
            return 0;
        }
        serial.enqueue_raw_bytes(&bytes[..n]).unwrap_or(0)
    }

    /// Queues the guest's last partial console line once it has ended (no I/O: the console's
    /// writer thread writes it).
    pub fn finish_console(&self) {
        if let Err(e) = lock(&self.serial).writer_mut().finish() {
            log::warn!("console output failed: {e}");
        }
    }
}

fn serial_offset(port: u16) -> Option<u8> {
    (SERIAL_PORT_BASE..SERIAL_PORT_BASE + SERIAL_PORT_LEN)
        .contains(&port)
        .then(|| (port - SERIAL_PORT_BASE) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::ConsoleSink;
    use crate::devices::serial::new_serial;
    use std::sync::Arc;
    use vmm_sys_util::eventfd::EventFd;

    fn devices() -> Devices {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let drained = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let sink = ConsoleSink::discard(None);
        let kbd_irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        Devices::new(new_serial(evt, drained, sink), I8042::new(kbd_irq))
    }

    #[test]
    fn debug_exit_and_reset_end_the_vm() {
        let d = devices();
        assert_eq!(d.pio_write(debug_exit::PORT, &[7]), Some(VmEnd::Exit(7)));
        assert_eq!(
            d.pio_write(debug_exit::PORT, &300u32.to_le_bytes()),
            Some(VmEnd::Exit(300))
        );
        assert_eq!(d.pio_write(I8042_COMMAND_PORT, &[0xd1]), None);
        assert_eq!(d.pio_write(I8042_COMMAND_PORT, &[0xfe]), Some(VmEnd::Reset));
        assert_eq!(d.pio_write(0x80, &[1]), None);
    }

    #[test]
    fn unclaimed_ports_float_high() {
        let d = devices();
        let mut buf = [0u8; 4];
        d.pio_read(0xcfc, &mut buf);
        assert_eq!(buf, [0xff; 4]);
        // The UART's line status register reports an empty transmitter.
        let mut lsr = [0u8];
        d.pio_read(SERIAL_PORT_BASE + 5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }

    #[test]
    fn serial_input_takes_what_fits() {
        let d = devices();
        let input = vec![b'a'; 100];
        let taken = d.serial_input(&input);
        assert!(
            taken > 0 && taken < input.len(),
            "the FIFO is smaller than 100 bytes"
        );
        assert_eq!(d.serial_input(&input), 0, "a full FIFO takes nothing more");
        let mut byte = [0u8];
        d.pio_read(SERIAL_PORT_BASE, &mut byte);
        assert_eq!(byte[0], b'a');
        assert_eq!(d.serial_input(b"bc"), 1);
    }
}
