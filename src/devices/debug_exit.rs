//! The debug-exit port: a guest ends its own VM with an exit code of its choosing, which is how
//! CI guests report a verdict without a network or a disk.

/// The port QEMU's isa-debug-exit also uses by default, so existing test guests need no change of
/// port (the value is used as-is here, not QEMU's `(v << 1) | 1`).
pub const PORT: u16 = 0xf4;

/// A 1-byte or 4-byte write of `v` means exit code `v`; other widths are ignored.
pub fn decode(data: &[u8]) -> Option<u32> {
    match *data {
        [b] => Some(u32::from(b)),
        [a, b, c, d] => Some(u32::from_le_bytes([a, b, c, d])),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths() {
        assert_eq!(decode(&[3]), Some(3));
        assert_eq!(decode(&0x1234_5678u32.to_le_bytes()), Some(0x1234_5678));
        assert_eq!(decode(&[1, 2]), None);
        assert_eq!(decode(&[]), None);
    }
}
