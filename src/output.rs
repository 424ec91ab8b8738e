//! Output that never blocks the thread producing it.
//!
//! Guest consoles, `--stats` and kvmerge's own messages on stderr go through [`Lane`]s: bounded
//! byte buffers that a [`Writer`] thread drains into their sink (stdout, stderr, a file, a pipe).
//! A producer (a vCPU thread, the control loop) only copies bytes into a buffer under a short
//! lock; no lock is held across a write to a sink. When a sink stops reading (a pipe nobody reads,
//! a terminal paused with Ctrl-S), only its writer thread waits: what does not fit in a lane's
//! buffer is dropped and counted, and once the sink reads again a marker line says how much was
//! lost. A sink that fails (closed pipe, full disk) is given up: its lane discards from then on.
//! At the end, writers get a bounded time to drain and are then abandoned: a thread stuck in a
//! write dies with the process.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use crate::sync::lock;

/// Buffer of one lane: enough for bursts of console output without holding much memory per guest.
pub const LANE_CAPACITY: usize = 64 * 1024;

/// Where a lane's bytes go.
pub enum Sink {
    Stdout,
    Stderr,
    File(File),
}

impl Sink {
    fn fd(&self) -> RawFd {
        match self {
            Sink::Stdout => libc::STDOUT_FILENO,
            Sink::Stderr => libc::STDERR_FILENO,
            Sink::File(f) => f.as_raw_fd(),
        }
    }
}

/// How a lane reports bytes it had to drop.
#[derive(Clone, Debug)]
pub enum Marker {
    /// A line `[kvmerge: LABEL: N bytes of WHAT dropped: the output is not being read]` in the
    /// stream, where the bytes are missing.
    Line {
        label: Option<String>,
        what: &'static str,
    },
    /// Nothing in the stream (JSON lines would no longer parse); the count is still kept.
    Silent,
}

impl Marker {
    fn text(&self, dropped: u64) -> Option<String> {
        match self {
            Marker::Line { label, what } => Some(format!(
                "[kvmerge: {}{dropped} bytes of {what} dropped: the output is not being read]\n",
                label.as_ref().map(|l| format!("{l}: ")).unwrap_or_default()
            )),
            Marker::Silent => None,
        }
    }
}

/// One lane of a writer: its sink, how big its buffer is, how it reports drops.
pub struct LaneSpec {
    pub sink: Sink,
    pub capacity: usize,
    pub marker: Marker,
    /// Names the lane in the warning when its sink fails.
    pub name: String,
}

struct LaneState {
    buf: Vec<u8>,
    /// Dropped since the writer last took the buffer; nothing is queued until it has.
    dropped_since: u64,
    dropped_total: u64,
    /// The sink failed: discard everything.
    failed: bool,
}

struct LaneInner {
    capacity: usize,
    state: Mutex<LaneState>,
    /// Bytes queued so far, and bytes the writer has finished with (written, or discarded after
    /// the sink failed): equal when everything queued is out.
    queued: AtomicU64,
    settled: AtomicU64,
}

/// Wakes a writer thread: `pending` avoids a wake-up per byte, the mutex orders it with the
/// writer's check so that no wake-up is lost.
struct Wake {
    pending: AtomicBool,
    closing: Mutex<bool>,
    cond: Condvar,
}

impl Wake {
    fn notify(&self) {
        if !self.pending.swap(true, Ordering::SeqCst) {
            let _closing = lock(&self.closing);
            self.cond.notify_one();
        }
    }
}

/// The producer side of one bounded buffer. Never blocks on the sink.
#[derive(Clone)]
pub struct Lane {
    inner: Arc<LaneInner>,
    wake: Arc<Wake>,
}

impl Lane {
    /// Queues `bytes` whole, or drops them (counted) when the buffer has no room for them or has
    /// dropped something the writer has not yet accounted for (so the marker lands where the gap
    /// is).
    pub fn push(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        {
            let mut s = lock(&self.inner.state);
            if s.failed {
                return;
            }
            if s.dropped_since > 0 || s.buf.len() + bytes.len() > self.inner.capacity {
                s.dropped_since += bytes.len() as u64;
                s.dropped_total += bytes.len() as u64;
                return;
            }
            s.buf.extend_from_slice(bytes);
            self.inner
                .queued
                .fetch_add(bytes.len() as u64, Ordering::SeqCst);
        }
        self.wake.notify();
    }

    /// Waits until everything queued in this lane before the call has been written (or given
    /// up because the sink failed), at most `within`. Returns whether it was.
    pub fn flush(&self, within: Duration) -> bool {
        let target = self.inner.queued.load(Ordering::SeqCst);
        let deadline = Instant::now() + within;
        loop {
            if self.inner.settled.load(Ordering::SeqCst) >= target {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Queues `bytes` only when nothing else waits in this lane, without counting a drop: for
    /// output that a newer version replaces anyway (the status line).
    pub fn push_if_idle(&self, bytes: &[u8]) -> bool {
        {
            let mut s = lock(&self.inner.state);
            if s.failed || s.dropped_since > 0 || !s.buf.is_empty() {
                return false;
            }
            let taken = &bytes[..bytes.len().min(self.inner.capacity)];
            s.buf.extend_from_slice(taken);
            self.inner
                .queued
                .fetch_add(taken.len() as u64, Ordering::SeqCst);
        }
        self.wake.notify();
        true
    }

    /// Bytes dropped so far because the sink was not reading.
    pub fn dropped(&self) -> u64 {
        lock(&self.inner.state).dropped_total
    }
}

/// A thread that drains its lanes into their sinks.
pub struct Writer {
    wake: Arc<Wake>,
    done: mpsc::Receiver<()>,
}

impl Writer {
    /// Starts a writer thread named `name` for `lanes`; returns their producer handles in order.
    pub fn start(name: &str, lanes: Vec<LaneSpec>) -> io::Result<(Writer, Vec<Lane>)> {
        let wake = Arc::new(Wake {
            pending: AtomicBool::new(false),
            closing: Mutex::new(false),
            cond: Condvar::new(),
        });
        let mut handles = Vec::with_capacity(lanes.len());
        let mut drains = Vec::with_capacity(lanes.len());
        for spec in lanes {
            let inner = Arc::new(LaneInner {
                capacity: spec.capacity,
                queued: AtomicU64::new(0),
                settled: AtomicU64::new(0),
                state: Mutex::new(LaneState {
                    buf: Vec::new(),
                    dropped_since: 0,
                    dropped_total: 0,
                    failed: false,
                }),
            });
            handles.push(Lane {
                inner: inner.clone(),
                wake: wake.clone(),
            });
            drains.push(Drain {
                inner,
                sink: spec.sink,
                marker: spec.marker,
                name: spec.name,
                spare: Vec::new(),
            });
        }
        let (done_tx, done) = mpsc::channel();
        let thread_wake = wake.clone();
        spawn_with_signals_blocked(name, move || {
            // A writer started before `seccomp::prepare` (the stderr writer, for an early line)
            // gets its filter at its first wake-up after it.
            let filtered = match crate::seccomp::install(crate::seccomp::ThreadKind::Io) {
                Ok(filtered) => filtered,
                Err(e) => {
                    log::error!("{e}");
                    return;
                }
            };
            run_writer(&thread_wake, &mut drains, filtered);
            let _ = done_tx.send(());
        })?;
        Ok((Writer { wake, done }, handles))
    }

    /// Lets the thread write what is queued for at most `within`, then ends it. Returns whether
    /// everything was written; if not, the thread is left behind (stuck in its sink) and dies with
    /// the process.
    pub fn finish(self, within: Duration) -> bool {
        self.close();
        self.done.recv_timeout(within).is_ok()
    }

    fn close(&self) {
        *lock(&self.wake.closing) = true;
        self.wake.cond.notify_one();
    }
}

impl Drop for Writer {
    /// Without [`Writer::finish`]: the thread drains in the background and ends; nobody waits.
    fn drop(&mut self) {
        self.close();
    }
}

/// The writer thread's side of a lane.
struct Drain {
    inner: Arc<LaneInner>,
    sink: Sink,
    marker: Marker,
    name: String,
    spare: Vec<u8>,
}

impl Drain {
    /// Writes what the lane holds; returns whether there was anything.
    fn drain(&mut self) -> bool {
        let dropped = {
            let mut s = lock(&self.inner.state);
            if s.buf.is_empty() && s.dropped_since == 0 {
                return false;
            }
            std::mem::swap(&mut s.buf, &mut self.spare);
            std::mem::take(&mut s.dropped_since)
        };
        let mut result = write_all(self.sink.fd(), &self.spare);
        let settled = self.spare.len() as u64;
        self.spare.clear();
        if result.is_ok() && dropped > 0 {
            if let Some(marker) = self.marker.text(dropped) {
                result = write_all(self.sink.fd(), marker.as_bytes());
            }
        }
        self.inner.settled.fetch_add(settled, Ordering::SeqCst);
        if let Err(e) = result {
            let mut s = lock(&self.inner.state);
            s.failed = true;
            let discarded = std::mem::take(&mut s.buf).len() as u64;
            self.inner.settled.fetch_add(discarded, Ordering::SeqCst);
            drop(s);
            if !matches!(self.sink, Sink::Stderr) {
                log::warn!("{}: output failed ({e}); discarding the rest", self.name);
            }
        }
        true
    }

    fn is_empty(&self) -> bool {
        let s = lock(&self.inner.state);
        s.buf.is_empty() && s.dropped_since == 0
    }
}

fn run_writer(wake: &Wake, drains: &mut [Drain], mut filtered: bool) {
    loop {
        let closing = {
            let mut closing = lock(&wake.closing);
            while !wake.pending.swap(false, Ordering::SeqCst) && !*closing {
                closing = wake.cond.wait(closing).unwrap_or_else(|p| p.into_inner());
            }
            *closing
        };
        if !filtered && crate::seccomp::prepared() {
            filtered = true;
            if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Io) {
                // Said straight to stderr: this thread is the one that would write a log line.
                // It goes on writing, without its filter.
                let line = format!("kvmerge: error: {e}\n");
                let _ = write_all(libc::STDERR_FILENO, line.as_bytes());
            }
        }
        for drain in drains.iter_mut() {
            drain.drain();
        }
        if closing && drains.iter().all(Drain::is_empty) {
            return;
        }
    }
}

/// write(2) until `buf` is out. Waits for room when the descriptor is non-blocking (another
/// process may have set O_NONBLOCK on a shared terminal or pipe).
fn write_all(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: writes from a live slice to a descriptor; the kernel reads at most `len` bytes.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => {
                    let mut pfd = libc::pollfd {
                        fd,
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut pfd, 1, 100) };
                    continue;
                }
                _ => return Err(err),
            }
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

/// Starts a thread with every signal blocked, so that signals meant for the control loop's
/// signalfd (and the vCPU kick) are never delivered to it, whenever it is started.
pub fn spawn_with_signals_blocked(
    name: &str,
    f: impl FnOnce() + Send + 'static,
) -> io::Result<std::thread::JoinHandle<()>> {
    // SAFETY: sigset_t is plain data, filled by sigfillset.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid sets; only this thread's mask changes, and it is put back below.
    unsafe {
        libc::sigfillset(&mut all);
        // Signals the kernel raises for this thread's own faults stay deliverable: blocked, they
        // would kill the process without their handlers (SIGSYS: the seccomp report).
        for sig in [
            libc::SIGSYS,
            libc::SIGSEGV,
            libc::SIGBUS,
            libc::SIGFPE,
            libc::SIGILL,
        ] {
            libc::sigdelset(&mut all, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
    }
    let result = std::thread::Builder::new().name(name.into()).spawn(f);
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    result
}

/// kvmerge's own stderr: one lane, started on first use.
struct Stderr {
    lane: Lane,
    writer: Mutex<Option<Writer>>,
}

static STDERR: OnceLock<Option<Stderr>> = OnceLock::new();

fn stderr() -> Option<&'static Stderr> {
    STDERR
        .get_or_init(|| {
            let spec = LaneSpec {
                sink: Sink::Stderr,
                capacity: LANE_CAPACITY,
                marker: Marker::Line {
                    label: None,
                    what: "kvmerge messages",
                },
                name: "stderr".into(),
            };
            let (writer, mut lanes) = Writer::start("kvmerge-stderr", vec![spec]).ok()?;
            Some(Stderr {
                lane: lanes.pop()?,
                writer: Mutex::new(Some(writer)),
            })
        })
        .as_ref()
}

/// Starts kvmerge's stderr writer now, from the calling thread. Call it before seccomp filters
/// are installed: a filtered thread (a console writer, say) may not start threads, so the writer
/// must not be started lazily from one of them.
pub fn start_stderr() {
    let _ = stderr();
}

/// Writes `text` and a newline to stderr without blocking and without failing: errors are
/// ignored (there is nowhere left to report them).
pub fn eprintln(text: &str) {
    let mut bytes = Vec::with_capacity(text.len() + 1);
    bytes.extend_from_slice(text.as_bytes());
    bytes.push(b'\n');
    eprint_bytes(&bytes);
}

/// Writes `bytes` to stderr without blocking and without failing.
pub fn eprint_bytes(bytes: &[u8]) {
    match stderr() {
        Some(stderr) => stderr.lane.push(bytes),
        // No writer thread (thread limit): write directly, still ignoring errors.
        None => {
            let _ = write_all(libc::STDERR_FILENO, bytes);
        }
    }
}

/// Waits (at most `within`) until what was written to stderr so far is out: for a line that
/// must be on the terminal before something else writes to it (the console banner, before the
/// guest starts). Returns whether it is.
pub fn flush_stderr(within: Duration) -> bool {
    match stderr() {
        Some(stderr) => stderr.lane.flush(within),
        None => true,
    }
}

/// Writes `bytes` to stderr only if nothing else is waiting to be written there.
pub fn eprint_if_idle(bytes: &[u8]) {
    if let Some(stderr) = stderr() {
        stderr.lane.push_if_idle(bytes);
    }
}

/// Lets queued stderr output out for at most `within`; messages queued later are not written.
/// Call once, right before the process exits.
pub fn finish_stderr(within: Duration) {
    let Some(Some(stderr)) = STDERR.get() else {
        return;
    };
    let deadline = Instant::now() + within;
    let writer = lock(&stderr.writer).take();
    if let Some(writer) = writer {
        writer.finish(deadline.saturating_duration_since(Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::FromRawFd;

    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two descriptors we then own.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: fresh descriptors from pipe2.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }

    fn spec(sink: Sink, capacity: usize) -> LaneSpec {
        LaneSpec {
            sink,
            capacity,
            marker: Marker::Line {
                label: Some("vm1".into()),
                what: "console output",
            },
            name: "vm1".into(),
        }
    }

    #[test]
    fn flush_waits_for_what_was_queued_and_is_bounded() {
        let (mut read, write) = pipe();
        let (writer, lanes) =
            Writer::start("test-writer", vec![spec(Sink::File(write), 1 << 20)]).unwrap();
        let lane = &lanes[0];
        lane.push(b"banner\n");
        assert!(
            lane.flush(Duration::from_secs(60)),
            "a sink that reads gets it"
        );
        let mut got = [0u8; 7];
        read.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"banner\n");
        // A sink that stops reading: more than the pipe holds stays queued, and flush gives up.
        let chunk = vec![b'y'; 64 << 10];
        for _ in 0..4 {
            lane.push(&chunk);
        }
        assert!(!lane.flush(Duration::from_millis(50)), "flush is bounded");
        let reader = std::thread::spawn(move || {
            let mut rest = Vec::new();
            read.read_to_end(&mut rest).unwrap();
            rest.len()
        });
        assert!(lane.flush(Duration::from_secs(60)), "out once read");
        assert!(writer.finish(Duration::from_secs(60)));
        drop(lanes);
        assert_eq!(reader.join().unwrap(), 4 * (64 << 10));
    }

    #[test]
    fn a_sink_that_does_not_read_never_blocks_the_producer() {
        let (mut read, write) = pipe();
        let (writer, lanes) = Writer::start("test-writer", vec![spec(Sink::File(write), 4096)])
            .expect("writer thread");
        let lane = &lanes[0];
        // Far more than the pipe (64 KiB) and the lane (4 KiB) hold: pushes must not block.
        // One push per line, as the console pushes them.
        let mut line = vec![b'x'; 1023];
        line.push(b'\n');
        let start = Instant::now();
        for _ in 0..2048 {
            lane.push(&line);
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "pushing took {:?}",
            start.elapsed()
        );
        assert!(lane.dropped() > 0, "nothing was dropped");
        // Once the pipe is read, the rest comes out, with the marker where the gap was.
        let reader = std::thread::spawn(move || {
            let mut text = Vec::new();
            read.read_to_end(&mut text).unwrap();
            text
        });
        lane.push(b"after\n");
        assert!(
            writer.finish(Duration::from_secs(60)),
            "writer did not drain"
        );
        drop(lanes);
        let text = String::from_utf8(reader.join().unwrap()).unwrap();
        let marker = format!(
            "[kvmerge: vm1: {} bytes of console output dropped: the output is not being read]",
            "\\d+"
        );
        let marker = regex::Regex::new(&marker).unwrap();
        assert!(marker.is_match(&text), "no marker in the output");
        let dropped_in_marker: u64 = regex::Regex::new(r"vm1: (\d+) bytes")
            .unwrap()
            .captures_iter(&text)
            .map(|c| c[1].parse::<u64>().unwrap())
            .sum();
        assert!(dropped_in_marker > 0);
        assert!(dropped_in_marker <= 2048 * 1024 + 6);
        // Whole pushes only: every line is complete.
        for l in text.lines() {
            assert!(
                l.len() == 1023 || l == "after" || marker.is_match(l),
                "{l:?}"
            );
        }
    }

    #[test]
    fn a_failed_sink_discards_and_the_writer_still_finishes() {
        let (read, write) = pipe();
        drop(read); // EPIPE (SIGPIPE is ignored in Rust programs)
        let (writer, lanes) =
            Writer::start("test-writer", vec![spec(Sink::File(write), 4096)]).unwrap();
        lanes[0].push(b"lost\n");
        lanes[0].push(b"lost too\n");
        assert!(writer.finish(Duration::from_secs(60)));
        lanes[0].push(b"discarded\n");
        assert_eq!(lanes[0].dropped(), 0, "a failed sink is not 'not reading'");
    }

    #[test]
    fn status_updates_wait_for_an_idle_lane() {
        let (mut read, write) = pipe();
        let (writer, lanes) =
            Writer::start("test-writer", vec![spec(Sink::File(write), 64)]).unwrap();
        assert!(lanes[0].push_if_idle(b"one"));
        assert!(writer.finish(Duration::from_secs(60)));
        drop(lanes);
        let mut text = String::new();
        read.read_to_string(&mut text).unwrap();
        assert_eq!(text, "one");
    }
}
