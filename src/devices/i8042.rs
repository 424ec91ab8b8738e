//! The i8042 keyboard controller, as far as guests need it: the reset line (how Linux reboots
//! without ACPI) and enough of the controller protocol that Linux's probe completes at once.
//!
//! vm-superio's i8042 implements only the reset command and reads every register as 0. Linux then
//! waits for a controller-command byte that never arrives (about a second per boot, on the boot
//! critical path). This model answers the controller commands Linux's probe uses, has no AUX
//! (mouse) port, and acknowledges keyboard commands with no keyboard behind them.

use std::collections::VecDeque;

use vmm_sys_util::eventfd::EventFd;

/// Status register bits.
const STATUS_OUTPUT_FULL: u8 = 1 << 0;
const STATUS_SYSTEM_FLAG: u8 = 1 << 2;
const STATUS_LAST_WAS_COMMAND: u8 = 1 << 3;
const STATUS_NOT_INHIBITED: u8 = 1 << 4;

/// Controller command byte ("CTR") bits.
const CTR_KBD_INTERRUPT: u8 = 1 << 0;
const CTR_SYSTEM_FLAG: u8 = 1 << 2;
const CTR_AUX_DISABLED: u8 = 1 << 5;
const CTR_TRANSLATE: u8 = 1 << 6;

/// Controller commands (written to the command port).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KBD: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_AUX_LOOPBACK: u8 = 0xd3;
const CMD_PULSE_RESET: u8 = 0xfe;

const SELF_TEST_OK: u8 = 0x55;
const PORT_TEST_OK: u8 = 0x00;
/// An AUX port test result meaning "clock line stuck low": there is no mouse port.
const AUX_PORT_ABSENT: u8 = 0x01;
/// Answer to an AUX loopback byte: anything but the byte itself means "no AUX port".
const NO_AUX_ECHO: u8 = 0xff;
/// What a PS/2 keyboard answers to any command byte.
const KBD_ACK: u8 = 0xfa;
/// Output port: bit 0 is the reset line (active low), bit 1 the A20 gate.
const OUTPUT_PORT_DEFAULT: u8 = 0x03;

/// Which port an access targets, relative to 0x60.
pub const DATA_OFFSET: u8 = 0;
pub const COMMAND_OFFSET: u8 = 4;

pub struct I8042 {
    ctr: u8,
    output: VecDeque<u8>,
    /// A command whose parameter byte is expected on the data port.
    awaiting_data: Option<u8>,
    last_was_command: bool,
    /// Keyboard interrupt (IRQ 1), raised when keyboard data is queued.
    irq: EventFd,
}

/// What the guest asked for with a write.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    None,
    Reset,
}

impl I8042 {
    pub fn new(irq: EventFd) -> I8042 {
        I8042 {
            ctr: CTR_KBD_INTERRUPT | CTR_SYSTEM_FLAG | CTR_AUX_DISABLED | CTR_TRANSLATE,
            output: VecDeque::new(),
            awaiting_data: None,
            last_was_command: false,
            irq,
        }
    }

    pub fn read(&mut self, offset: u8) -> u8 {
        match offset {
            DATA_OFFSET => self.output.pop_front().unwrap_or(0),
            COMMAND_OFFSET => {
                let mut status = STATUS_SYSTEM_FLAG | STATUS_NOT_INHIBITED;
                if !self.output.is_empty() {
                    status |= STATUS_OUTPUT_FULL;
                }
                if self.last_was_command {
                    status |= STATUS_LAST_WAS_COMMAND;
                }
                status
            }
            _ => 0xff,
        }
    }

    pub fn write(&mut self, offset: u8, value: u8) -> Request {
        match offset {
            COMMAND_OFFSET => {
                self.last_was_command = true;
                self.command(value)
            }
            DATA_OFFSET => {
                self.last_was_command = false;
                match self.awaiting_data.take() {
                    Some(CMD_WRITE_CTR) => self.ctr = value,
                    Some(CMD_AUX_LOOPBACK) => self.reply(NO_AUX_ECHO),
                    // Bit 0 low pulls the CPU's reset line.
                    Some(CMD_WRITE_OUTPUT_PORT) if value & 1 == 0 => return Request::Reset,
                    Some(_) => {}
                    // A byte for the keyboard: acknowledge it as a keyboard would.
                    None => self.reply_from_keyboard(KBD_ACK),
                }
                Request::None
            }
            _ => Request::None,
        }
    }

    fn command(&mut self, cmd: u8) -> Request {
        match cmd {
            CMD_READ_CTR => self.reply(self.ctr),
            CMD_WRITE_CTR | CMD_WRITE_OUTPUT_PORT | CMD_AUX_LOOPBACK => {
                self.awaiting_data = Some(cmd)
            }
            CMD_SELF_TEST => self.reply(SELF_TEST_OK),
            CMD_TEST_KBD => self.reply(PORT_TEST_OK),
            CMD_TEST_AUX => self.reply(AUX_PORT_ABSENT),
            CMD_READ_OUTPUT_PORT => self.reply(OUTPUT_PORT_DEFAULT),
            CMD_DISABLE_AUX => self.ctr |= CTR_AUX_DISABLED,
            // There is no AUX port to enable: the bit stays set, which is how Linux tells.
            CMD_ENABLE_AUX | CMD_DISABLE_KBD | CMD_ENABLE_KBD => {}
            CMD_PULSE_RESET => return Request::Reset,
            other => log::trace!("i8042: ignoring controller command {other:#x}"),
        }
        Request::None
    }

    /// A controller reply: polled by the driver, no interrupt.
    fn reply(&mut self, byte: u8) {
        self.output.push_back(byte);
    }

    fn reply_from_keyboard(&mut self, byte: u8) {
        self.output.push_back(byte);
        if self.ctr & CTR_KBD_INTERRUPT != 0 {
            if let Err(e) = self.irq.write(1) {
                log::warn!("i8042: cannot raise IRQ 1: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn i8042() -> I8042 {
        I8042::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())
    }

    #[test]
    fn controller_command_byte_round_trips() {
        let mut d = i8042();
        assert_eq!(d.read(COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);
        d.write(COMMAND_OFFSET, CMD_READ_CTR);
        assert_ne!(d.read(COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);
        let ctr = d.read(DATA_OFFSET);
        assert_ne!(ctr & CTR_SYSTEM_FLAG, 0);
        assert_eq!(d.read(COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);
        d.write(COMMAND_OFFSET, CMD_WRITE_CTR);
        d.write(DATA_OFFSET, 0x65);
        d.write(COMMAND_OFFSET, CMD_READ_CTR);
        assert_eq!(d.read(DATA_OFFSET), 0x65);
    }

    #[test]
    fn probe_answers() {
        let mut d = i8042();
        for (cmd, answer) in [
            (CMD_SELF_TEST, SELF_TEST_OK),
            (CMD_TEST_KBD, 0),
            (CMD_TEST_AUX, 1),
        ] {
            d.write(COMMAND_OFFSET, cmd);
            assert_eq!(d.read(DATA_OFFSET), answer, "command {cmd:#x}");
        }
        // No AUX port: the loopback does not echo, and enabling it leaves the CTR saying disabled.
        d.write(COMMAND_OFFSET, CMD_AUX_LOOPBACK);
        d.write(DATA_OFFSET, 0x5a);
        assert_ne!(d.read(DATA_OFFSET), 0x5a);
        d.write(COMMAND_OFFSET, CMD_ENABLE_AUX);
        d.write(COMMAND_OFFSET, CMD_READ_CTR);
        assert_ne!(d.read(DATA_OFFSET) & CTR_AUX_DISABLED, 0);
    }

    #[test]
    fn keyboard_bytes_are_acknowledged_with_an_interrupt() {
        let mut d = i8042();
        assert_eq!(d.write(DATA_OFFSET, 0xf2), Request::None);
        assert_eq!(d.read(DATA_OFFSET), KBD_ACK);
        assert_eq!(d.irq.read().unwrap(), 1);
    }

    #[test]
    fn reset_paths() {
        let mut d = i8042();
        assert_eq!(d.write(COMMAND_OFFSET, CMD_PULSE_RESET), Request::Reset);
        d.write(COMMAND_OFFSET, CMD_WRITE_OUTPUT_PORT);
        assert_eq!(d.write(DATA_OFFSET, OUTPUT_PORT_DEFAULT), Request::None);
        d.write(COMMAND_OFFSET, CMD_WRITE_OUTPUT_PORT);
        assert_eq!(d.write(DATA_OFFSET, 0x02), Request::Reset);
    }
}
