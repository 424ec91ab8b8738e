//! Where a guest's serial output goes: prefixed lines on stdout, a raw interactive stream, a log
//! file, or nowhere; and the `--expect` matcher that watches every line on the way.

use std::fs::File;
use std::io::{self, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use regex::Regex;

/// Longest line kept for matching and prefixing; longer lines are emitted in pieces.
const MAX_LINE: usize = 4096;

pub enum Output {
    /// Complete lines on stdout, each starting with `prefix` (may be empty).
    Lines { prefix: String },
    /// Bytes to stdout as they arrive (interactive console).
    Raw,
    /// Lines to a per-guest log file.
    File(File),
    /// Discarded (still matched against `--expect`).
    Discard,
}

/// The `--expect` state of one guest, shared with the run's bookkeeping.
#[derive(Clone)]
pub struct Expect {
    pattern: Arc<Regex>,
    matched: Arc<AtomicBool>,
}

impl Expect {
    pub fn new(pattern: Arc<Regex>) -> Expect {
        Expect {
            pattern,
            matched: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn matched(&self) -> bool {
        self.matched.load(Ordering::Acquire)
    }

    pub fn pattern(&self) -> &str {
        self.pattern.as_str()
    }

    fn check(&self, line: &[u8]) {
        if !self.matched() && self.pattern.is_match(&String::from_utf8_lossy(line)) {
            self.matched.store(true, Ordering::Release);
        }
    }
}

/// The serial port's writer: a byte stream in, lines out.
pub struct ConsoleSink {
    output: Output,
    line: Vec<u8>,
    expect: Option<Expect>,
}

impl ConsoleSink {
    pub fn new(output: Output, expect: Option<Expect>) -> ConsoleSink {
        ConsoleSink {
            output,
            line: Vec::with_capacity(128),
            expect,
        }
    }

    /// Writes the buffered line out. An output that fails (stdout closed, disk full) is reported
    /// once and then discarded, so a guest can never stall on its console.
    fn emit_line(&mut self) -> io::Result<()> {
        if let Err(e) = self.write_line() {
            log::warn!("console output failed ({e}); discarding the rest of this guest's output");
            self.output = Output::Discard;
        }
        self.line.clear();
        Ok(())
    }

    fn write_line(&mut self) -> io::Result<()> {
        let mut body: &[u8] = &self.line;
        if let Some(stripped) = body.strip_suffix(b"\n") {
            body = stripped;
        }
        let body = body.strip_suffix(b"\r").unwrap_or(body);
        if let Some(expect) = &self.expect {
            expect.check(body);
        }
        match &mut self.output {
            Output::Lines { prefix } => {
                // One locked write per line keeps lines of different guests whole.
                let mut out = io::stdout().lock();
                out.write_all(prefix.as_bytes())?;
                out.write_all(body)?;
                out.write_all(b"\n")?;
            }
            Output::File(f) => {
                f.write_all(body)?;
                f.write_all(b"\n")?;
            }
            Output::Raw | Output::Discard => {}
        }
        Ok(())
    }

    /// Emits a partial last line, if any. Call when the guest has ended.
    pub fn finish(&mut self) -> io::Result<()> {
        if !self.line.is_empty() {
            self.emit_line()?;
        }
        Ok(())
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Output::Raw = self.output {
            let mut out = io::stdout().lock();
            if let Err(e) = out.write_all(buf).and_then(|()| out.flush()) {
                log::warn!(
                    "console output failed ({e}); discarding the rest of this guest's output"
                );
                self.output = Output::Discard;
            }
        }
        for &b in buf {
            self.line.push(b);
            if b == b'\n' || self.line.len() >= MAX_LINE {
                self.emit_line()?;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let result = match &mut self.output {
            Output::File(f) => f.flush(),
            Output::Raw | Output::Lines { .. } => io::stdout().flush(),
            Output::Discard => Ok(()),
        };
        if let Err(e) = result {
            log::warn!("console output failed ({e}); discarding the rest of this guest's output");
            self.output = Output::Discard;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_output_is_line_based_and_matches() {
        let path = std::env::temp_dir().join(format!("kvmerge-console-{}.log", std::process::id()));
        let file = File::create(&path).unwrap();
        let expect = Expect::new(Arc::new(Regex::new("^READY [0-9]+$").unwrap()));
        let mut sink = ConsoleSink::new(Output::File(file), Some(expect.clone()));
        sink.write_all(b"boot\r\nREA").unwrap();
        assert!(!expect.matched());
        sink.write_all(b"DY 42\nsecond").unwrap();
        assert!(expect.matched());
        sink.finish().unwrap();
        drop(sink);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "boot\nREADY 42\nsecond\n"
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn partial_line_matches_at_finish() {
        let expect = Expect::new(Arc::new(Regex::new("tail").unwrap()));
        let mut sink = ConsoleSink::new(Output::Discard, Some(expect.clone()));
        sink.write_all(b"no newline tail").unwrap();
        assert!(!expect.matched());
        sink.finish().unwrap();
        assert!(expect.matched());
    }

    #[test]
    fn long_lines_are_split() {
        let expect = Expect::new(Arc::new(Regex::new("^x+$").unwrap()));
        let mut sink = ConsoleSink::new(Output::Discard, Some(expect.clone()));
        sink.write_all(&vec![b'x'; MAX_LINE * 2 + 1]).unwrap();
        assert!(expect.matched());
        assert_eq!(sink.line.len(), 1);
    }
}
