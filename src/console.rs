//! Where a guest's serial output goes: prefixed lines on stdout, a raw interactive stream, a log
//! file, or nowhere; and the `--expect` matcher that watches every line on the way.
//!
//! The vCPU thread that emulates the UART only assembles lines, matches them against `--expect`
//! and copies them into the guest's bounded [`Lane`]; writer threads (one for stdout, one for log
//! files) do the writing. A sink that stops reading therefore never stalls a vCPU or the control
//! loop: that guest's output is dropped, counted and marked instead (see `output`), and matching
//! still sees every line, since it happens before the buffer.

use std::fs::File;
use std::io::{self, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::output::{LANE_CAPACITY, Lane, LaneSpec, Marker, Sink, Writer};

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
    /// Signalled on the first match (`kvmerge serve`'s ready marker wakes its control loop).
    notify: Option<Arc<vmm_sys_util::eventfd::EventFd>>,
}

impl Expect {
    pub fn new(pattern: Arc<Regex>) -> Expect {
        Expect {
            pattern,
            matched: Arc::new(AtomicBool::new(false)),
            notify: None,
        }
    }

    /// A matcher that also signals `notify` when it first matches.
    pub fn notifying(pattern: Arc<Regex>, notify: Arc<vmm_sys_util::eventfd::EventFd>) -> Expect {
        Expect {
            notify: Some(notify),
            ..Expect::new(pattern)
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
            if let Some(notify) = &self.notify {
                let _ = notify.write(1);
            }
        }
    }
}

/// The serial port's writer: a byte stream in, lines (or raw bytes) into the guest's lane.
pub struct ConsoleSink {
    mode: Mode,
    lane: Option<Lane>,
    line: Vec<u8>,
    /// The line as it goes out (prefix + body + newline), reused.
    out: Vec<u8>,
    expect: Option<Expect>,
    /// The sink's own writer thread, for a sink made by [`ConsoleSink::new`].
    _writer: Option<Writer>,
}

enum Mode {
    Lines { prefix: String },
    Raw,
    Discard,
}

impl ConsoleSink {
    fn with_lane(mode: Mode, lane: Option<Lane>, expect: Option<Expect>) -> ConsoleSink {
        ConsoleSink {
            mode,
            lane,
            line: Vec::with_capacity(128),
            out: Vec::with_capacity(128),
            expect,
            _writer: None,
        }
    }

    /// A sink that only matches `--expect` (unit tests, `--console none`).
    pub fn discard(expect: Option<Expect>) -> ConsoleSink {
        ConsoleSink::with_lane(Mode::Discard, None, expect)
    }

    /// A stand-alone sink with its own writer thread (a fleet shares writers through
    /// [`Consoles::start`]). If no thread can be started, output is discarded (and still matched).
    pub fn new(output: Output, expect: Option<Expect>) -> ConsoleSink {
        if let Output::Discard = output {
            return ConsoleSink::discard(expect);
        }
        match Consoles::start(vec![("console".into(), output, expect.clone())]) {
            Ok((mut consoles, mut sinks)) => match sinks.pop() {
                Some(mut sink) => {
                    sink._writer = consoles.writers.pop();
                    sink
                }
                None => ConsoleSink::discard(expect),
            },
            Err(e) => {
                log::warn!("cannot start a console writer ({e}); discarding console output");
                ConsoleSink::discard(expect)
            }
        }
    }

    /// Ends the buffered line: matches it and queues it for output.
    fn emit_line(&mut self) {
        let mut body: &[u8] = &self.line;
        if let Some(stripped) = body.strip_suffix(b"\n") {
            body = stripped;
        }
        let body = body.strip_suffix(b"\r").unwrap_or(body);
        if let Some(expect) = &self.expect {
            expect.check(body);
        }
        if let (Mode::Lines { prefix }, Some(lane)) = (&self.mode, &self.lane) {
            self.out.clear();
            self.out.extend_from_slice(prefix.as_bytes());
            self.out.extend_from_slice(body);
            self.out.push(b'\n');
            lane.push(&self.out);
        }
        self.line.clear();
    }

    /// Emits a partial last line, if any. Call when the guest has ended.
    pub fn finish(&mut self) -> io::Result<()> {
        if !self.line.is_empty() {
            self.emit_line();
        }
        Ok(())
    }
}

impl Write for ConsoleSink {
    /// Never blocks: output that does not fit in the lane is dropped and counted there.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let (Mode::Raw, Some(lane)) = (&self.mode, &self.lane) {
            lane.push(buf);
        }
        for &b in buf {
            self.line.push(b);
            if b == b'\n' || self.line.len() >= MAX_LINE {
                self.emit_line();
            }
        }
        Ok(buf.len())
    }

    /// The writer threads write as soon as bytes are queued: nothing to do.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The writer threads of a fleet's consoles and each guest's lane.
pub struct Consoles {
    writers: Vec<Writer>,
    lanes: Vec<Option<Lane>>,
}

impl Consoles {
    /// Sets up one sink per guest, `outputs[i]` being guest i's, named `names[i]`: stdout lanes
    /// share one writer thread, log files another.
    pub fn start(
        outputs: Vec<(String, Output, Option<Expect>)>,
    ) -> io::Result<(Consoles, Vec<ConsoleSink>)> {
        let mut stdout_specs = Vec::new();
        let mut file_specs = Vec::new();
        // (mode, expect, which writer, index in that writer)
        let mut plan = Vec::with_capacity(outputs.len());
        for (name, output, expect) in outputs {
            let marker = Marker::Line {
                label: Some(name.clone()),
                what: "console output",
            };
            let spec = |sink| LaneSpec {
                sink,
                capacity: LANE_CAPACITY,
                marker: marker.clone(),
                name: format!("{name}: console"),
            };
            let (mode, slot) = match output {
                Output::Lines { prefix } => {
                    stdout_specs.push(spec(Sink::Stdout));
                    (Mode::Lines { prefix }, Some((0, stdout_specs.len() - 1)))
                }
                Output::Raw => {
                    stdout_specs.push(spec(Sink::Stdout));
                    (Mode::Raw, Some((0, stdout_specs.len() - 1)))
                }
                Output::File(file) => {
                    file_specs.push(spec(Sink::File(file)));
                    (
                        Mode::Lines {
                            prefix: String::new(),
                        },
                        Some((1, file_specs.len() - 1)),
                    )
                }
                Output::Discard => (Mode::Discard, None),
            };
            plan.push((mode, expect, slot));
        }
        let mut writers = Vec::new();
        let mut stdout_lanes = Vec::new();
        let mut file_lanes = Vec::new();
        if !stdout_specs.is_empty() {
            let (writer, lanes) = Writer::start("kvmerge-stdout", stdout_specs)?;
            writers.push(writer);
            stdout_lanes = lanes;
        }
        if !file_specs.is_empty() {
            let (writer, lanes) = Writer::start("kvmerge-consoles", file_specs)?;
            writers.push(writer);
            file_lanes = lanes;
        }
        let mut sinks = Vec::with_capacity(plan.len());
        let mut lanes = Vec::with_capacity(plan.len());
        for (mode, expect, slot) in plan {
            let lane = slot.map(|(writer, i)| {
                if writer == 0 {
                    stdout_lanes[i].clone()
                } else {
                    file_lanes[i].clone()
                }
            });
            lanes.push(lane.clone());
            sinks.push(ConsoleSink::with_lane(mode, lane, expect));
        }
        Ok((Consoles { writers, lanes }, sinks))
    }

    /// Bytes of guest `index`'s output dropped because its sink was not reading.
    pub fn dropped(&self, index: usize) -> u64 {
        self.lanes
            .get(index)
            .and_then(Option::as_ref)
            .map_or(0, Lane::dropped)
    }

    /// Writes out what is queued, for at most `within` in all; returns whether everything was
    /// written. What a stuck sink still holds then is abandoned.
    pub fn finish(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut all = true;
        for writer in std::mem::take(&mut self.writers) {
            all &= writer.finish(deadline.saturating_duration_since(Instant::now()));
        }
        all
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
        let (mut consoles, mut sinks) = Consoles::start(vec![(
            "vm0".into(),
            Output::File(file),
            Some(expect.clone()),
        )])
        .unwrap();
        let sink = &mut sinks[0];
        sink.write_all(b"boot\r\nREA").unwrap();
        assert!(!expect.matched());
        sink.write_all(b"DY 42\nsecond").unwrap();
        assert!(expect.matched());
        sink.finish().unwrap();
        drop(sinks);
        assert!(consoles.finish(Duration::from_secs(60)));
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "boot\nREADY 42\nsecond\n"
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn partial_line_matches_at_finish() {
        let expect = Expect::new(Arc::new(Regex::new("tail").unwrap()));
        let mut sink = ConsoleSink::discard(Some(expect.clone()));
        sink.write_all(b"no newline tail").unwrap();
        assert!(!expect.matched());
        sink.finish().unwrap();
        assert!(expect.matched());
    }

    #[test]
    fn long_lines_are_split() {
        let expect = Expect::new(Arc::new(Regex::new("^x+$").unwrap()));
        let mut sink = ConsoleSink::discard(Some(expect.clone()));
        sink.write_all(&vec![b'x'; MAX_LINE * 2 + 1]).unwrap();
        assert!(expect.matched());
        assert_eq!(sink.line.len(), 1);
    }

    /// A file that is never read from (a FIFO's pipe here) must not stall the UART's writer;
    /// `--expect` still sees every line, and the loss is counted.
    #[test]
    fn a_stuck_sink_drops_output_but_matching_sees_every_line() {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two descriptors we then own.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: fresh descriptors from pipe2.
        let (read, write) = unsafe {
            use std::os::fd::FromRawFd;
            (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1]))
        };
        let expect = Expect::new(Arc::new(Regex::new("^line 99999$").unwrap()));
        let (mut consoles, mut sinks) = Consoles::start(vec![(
            "vm3".into(),
            Output::File(write),
            Some(expect.clone()),
        )])
        .unwrap();
        let start = Instant::now();
        for i in 0..100_000 {
            write!(sinks[0], "line {i}\r\n").unwrap();
        }
        assert!(expect.matched(), "the last line was not matched");
        assert!(consoles.dropped(0) > 0, "nothing counted as dropped");
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the writer side blocked for {:?}",
            start.elapsed()
        );
        // The sink never reads: finishing gives up instead of hanging.
        assert!(!consoles.finish(Duration::from_millis(100)));
        drop(read);
    }
}
