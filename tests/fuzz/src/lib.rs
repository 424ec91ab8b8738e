//! Helpers shared by the fuzz targets in `targets/`: inputs as in-memory files, and a reader
//! that cuts an input into the fields a target needs.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

/// An anonymous in-memory file (memfd) holding `bytes` at `offset`, `len` bytes long in all
/// (sparse: the rest reads as zeros).
pub fn memfd_at(bytes: &[u8], offset: u64, len: u64) -> File {
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it creates a new descriptor.
    let fd = unsafe { libc::memfd_create(c"kvmerge-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len.max(offset + bytes.len() as u64))
        .expect("memfd set_len");
    file.write_all_at(bytes, offset).expect("memfd write");
    file
}

/// A memfd holding exactly `bytes`.
pub fn memfd(bytes: &[u8]) -> File {
    memfd_at(bytes, 0, 0)
}

/// A path that opens `file` again (`/proc/self/fd/N`), for APIs that take a path: a memfd is a
/// regular file, as kvmerge requires of its inputs.
pub fn fd_path(file: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// Cuts an input into fields; reads past the end give zeros, so every input is usable.
pub struct Fields<'a> {
    data: &'a [u8],
}

impl<'a> Fields<'a> {
    pub fn new(data: &'a [u8]) -> Fields<'a> {
        Fields { data }
    }

    pub fn u8(&mut self) -> u8 {
        let (first, rest) = self.data.split_first().unwrap_or((&0, &[]));
        self.data = rest;
        *first
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn u64(&mut self) -> u64 {
        let mut b = [0; 8];
        b.iter_mut().for_each(|b| *b = self.u8());
        u64::from_le_bytes(b)
    }

    /// The next `len` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, len: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(len.min(self.data.len()));
        self.data = rest;
        head
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
}

/// kvmerge's promise for bad input: the message is one line.
pub fn assert_one_line(message: &str) {
    assert!(
        !message.contains(['\n', '\r']),
        "error message spans lines: {message:?}"
    );
}
