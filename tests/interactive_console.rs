//! Host-KVM tier: the interactive console. kvmerge runs on a pseudo-terminal (stdin, stdout and
//! stderr all the slave, which is also its controlling terminal, as in a shell), puts it in raw
//! mode, forwards keystrokes to the payload guest's UART (`then=console`,
//! guest-images/payload/PROTOCOL.md) and restores the terminal at the end.

mod common;

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Bound for anything that should happen promptly (boot, an echo, an exit).
const LIMIT: Duration = Duration::from_secs(30);
/// How long to keep reading after kvmerge exited, for output still in the pty's buffers.
const DRAIN: Duration = Duration::from_secs(1);
const BANNER: &str = "kvmerge: console attached; press Ctrl-A x to quit";

// ---- Pseudo-terminal plumbing ----

/// Both ends of a pseudo-terminal, close-on-exec: the child gets the slave only as its stdio.
struct Pty {
    master: File,
    slave: OwnedFd,
}

impl Pty {
    fn open() -> Pty {
        let (mut master, mut slave): (RawFd, RawFd) = (-1, -1);
        // SAFETY: the out-pointers are valid; a null name, termios and winsize ask for defaults.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty: {}", io::Error::last_os_error());
        // SAFETY: openpty returned two fresh descriptors that nothing else owns.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        set_fd_flag(
            master.as_raw_fd(),
            libc::F_GETFD,
            libc::F_SETFD,
            libc::FD_CLOEXEC,
        );
        set_fd_flag(
            slave.as_raw_fd(),
            libc::F_GETFD,
            libc::F_SETFD,
            libc::FD_CLOEXEC,
        );
        set_fd_flag(
            master.as_raw_fd(),
            libc::F_GETFL,
            libc::F_SETFL,
            libc::O_NONBLOCK,
        );
        Pty {
            master: File::from(master),
            slave,
        }
    }

    fn slave_stdio(&self) -> Stdio {
        Stdio::from(
            self.slave
                .try_clone()
                .expect("cannot duplicate the pty slave"),
        )
    }
}

/// Sets `flag` in the descriptor flags (F_GETFD/F_SETFD) or status flags (F_GETFL/F_SETFL).
fn set_fd_flag(fd: RawFd, get: libc::c_int, set: libc::c_int, flag: libc::c_int) {
    // SAFETY: fcntl on an open descriptor with a get command and no third argument.
    let old = unsafe { libc::fcntl(fd, get) };
    assert!(old >= 0, "fcntl: {}", io::Error::last_os_error());
    // SAFETY: as above, with a set command and an int argument.
    let rc = unsafe { libc::fcntl(fd, set, old | flag) };
    assert!(rc >= 0, "fcntl: {}", io::Error::last_os_error());
}

/// The terminal settings of `fd`.
fn termios(fd: RawFd) -> libc::termios {
    // SAFETY: termios is plain data; tcgetattr overwrites it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a valid termios to write into.
    let rc = unsafe { libc::tcgetattr(fd, &mut t) };
    assert_eq!(rc, 0, "tcgetattr: {}", io::Error::last_os_error());
    t
}

/// Runs in the child between fork and exec: a new session whose controlling terminal is stdin
/// (the pty slave), with the child in its foreground process group. Without this, Ctrl-C could
/// never raise SIGINT and the Ctrl-C test would prove nothing.
fn become_session_leader() -> io::Result<()> {
    // SAFETY: setsid takes no arguments and is async-signal-safe.
    if unsafe { libc::setsid() } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TIOCSCTTY on stdin takes an int argument (0: do not steal); async-signal-safe.
    if unsafe { libc::ioctl(libc::STDIN_FILENO, libc::TIOCSCTTY, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits up to `timeout` for the master to become readable.
fn poll_readable(fd: RawFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
    // SAFETY: one valid pollfd, for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n > 0 && pfd.revents & libc::POLLIN != 0
}

// ---- A kvmerge run on a pty ----

/// `kvmerge run` of the payload guest with the pty slave as its terminal; the test types into
/// and reads from the master.
struct Console {
    pty: Pty,
    child: Running,
    output: Vec<u8>,
    /// kvmerge's status and when the test noticed it, once it exited.
    exit: Option<(ExitStatus, Instant)>,
}

impl Console {
    fn spawn_env(pty: Pty, cmdline: &str, env: &[(&str, &str)]) -> Console {
        let mut cmd = kvmerge();
        cmd.envs(env.iter().copied());
        cmd.arg("run")
            .arg("--kernel")
            .arg(payload())
            .args(["--memory", "16M", "--cmdline", cmdline])
            // These tests are about the console: no KSM steering, so no line from this or another
            // kvmerge of the suite about who steers KSM lands in the middle of guest output.
            .args(["--ksm-policy", "kernel"])
            .stdin(pty.slave_stdio())
            .stdout(pty.slave_stdio())
            .stderr(pty.slave_stdio());
        // SAFETY: the hook makes only async-signal-safe system calls (see become_session_leader).
        unsafe { cmd.pre_exec(become_session_leader) };
        let child = Running(cmd.spawn().expect("cannot start kvmerge"));
        Console {
            pty,
            child,
            output: Vec::new(),
            exit: None,
        }
    }

    fn slave_termios(&self) -> libc::termios {
        termios(self.pty.slave.as_raw_fd())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.output).into_owned()
    }

    /// Everything seen so far, for assertion messages.
    fn dump(&self) -> String {
        format!(
            "status {:?}\n--- terminal ---\n{}",
            self.exit.map(|(s, _)| s),
            self.text()
        )
    }

    /// Reads what the master has within `timeout` and notes whether kvmerge has exited.
    fn pump(&mut self, timeout: Duration) {
        if poll_readable(self.pty.master.as_raw_fd(), timeout) {
            let mut buf = [0u8; 4096];
            match self.pty.master.read(&mut buf) {
                Ok(n) => self.output.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("reading the pty master: {e}\n{}", self.dump()),
            }
        }
        if self.exit.is_none() {
            if let Some(status) = self.child.0.try_wait().expect("waitpid") {
                self.exit = Some((status, Instant::now()));
            }
        }
    }

    /// Reads until `found` holds for the output, failing after `within`, or once kvmerge has
    /// exited and its last output had time to arrive.
    fn wait_for(&mut self, what: &str, within: Duration, found: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + within;
        loop {
            if found(&self.text()) {
                return;
            }
            if let Some((status, at)) = self.exit {
                assert!(
                    at.elapsed() < DRAIN,
                    "kvmerge exited ({status}) without printing {what}\n{}",
                    self.dump()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {within:?}\n{}",
                self.dump()
            );
            self.pump(Duration::from_millis(10));
        }
    }

    /// Waits for `needle` anywhere in the output.
    fn expect(&mut self, needle: &str) {
        self.wait_for(&format!("{needle:?}"), LIMIT, |t| t.contains(needle));
    }

    /// Waits for a whole output line equal to `line` (the terminal turns "\n" into "\r\n").
    fn expect_line(&mut self, line: &str) {
        self.wait_for(&format!("line {line:?}"), LIMIT, |t| {
            t.lines().any(|l| l.trim_end_matches('\r') == line)
        });
    }

    /// Types `bytes` on the terminal.
    fn send(&mut self, bytes: &[u8]) {
        self.pty
            .master
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("writing the pty master: {e}\n{}", self.dump()));
    }

    /// Waits for kvmerge to exit, at most `within`, reading its output meanwhile.
    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some((status, _)) = self.exit {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "kvmerge did not exit within {within:?}\n{}",
                self.dump()
            );
            self.pump(Duration::from_millis(5));
        }
    }

    /// Starts kvmerge on `pty` and waits until the guest waits for input (kvmerge prints its
    /// banner once raw mode is on, before the guest starts).
    fn attach(pty: Pty, cmdline: &str) -> Console {
        Console::attach_env(pty, cmdline, &[])
    }

    fn attach_env(pty: Pty, cmdline: &str, env: &[(&str, &str)]) -> Console {
        let mut c = Console::spawn_env(pty, cmdline, env);
        c.expect(BANNER);
        c.expect_line("PAYLOAD-CONSOLE");
        c
    }
}

// ---- Tests ----

#[test]
fn typed_lines_reach_the_guest() {
    if !kvm_available() {
        return;
    }
    let mut c = Console::attach(Pty::open(), "then=console");
    c.send(b"hello\r");
    c.expect_line("PAYLOAD-GOT hello");
    assert_eq!(
        c.text().matches("hello").count(),
        1,
        "raw mode: the terminal must not echo what was typed\n{}",
        c.dump()
    );

    c.send(b"exit 7\r");
    c.expect_line("PAYLOAD-GOT exit 7");
    let status = c.wait_exit(LIMIT);
    assert_eq!(
        status.code(),
        Some(1),
        "guest exit code 7 is a failure\n{}",
        c.dump()
    );
    c.expect_line("kvmerge: vm0: exited with code 7");
}

#[test]
fn ctrl_a_x_quits() {
    if !kvm_available() {
        return;
    }
    let pty = Pty::open();
    let before = termios(pty.slave.as_raw_fd());
    let mut c = Console::attach(pty, "then=console");

    let sent = Instant::now();
    c.send(b"\x01x");
    let status = c.wait_exit(Duration::from_secs(2));
    let took = sent.elapsed();
    assert_eq!(
        status.code(),
        Some(130),
        "quitting from the console is an interrupt (took {took:?})\n{}",
        c.dump()
    );
    c.expect("stopped from the console");
    assert_eq!(
        c.slave_termios().c_lflag,
        before.c_lflag,
        "terminal not restored after Ctrl-A x\n{}",
        c.dump()
    );
}

#[test]
fn terminal_is_raw_during_the_run_and_restored_after() {
    if !kvm_available() {
        return;
    }
    let pty = Pty::open();
    let before = termios(pty.slave.as_raw_fd());
    let cooked = libc::ICANON | libc::ECHO | libc::ISIG;
    assert_eq!(before.c_lflag & cooked, cooked, "a fresh pty starts cooked");
    let mut c = Console::attach(pty, "then=console");

    // The guest is now waiting for input with kvmerge attached.
    let during = c.slave_termios();
    assert_eq!(during.c_lflag & libc::ICANON, 0, "ICANON on while attached");
    assert_eq!(during.c_lflag & libc::ECHO, 0, "ECHO on while attached");
    assert_eq!(during.c_lflag & libc::ISIG, 0, "ISIG on while attached");

    c.send(b"quit\r");
    c.expect_line("PAYLOAD-GOT quit");
    let status = c.wait_exit(LIMIT);
    assert_eq!(status.code(), Some(0), "{}", c.dump());

    let after = c.slave_termios();
    assert_eq!(after.c_lflag, before.c_lflag, "c_lflag not restored");
    assert_eq!(after.c_iflag, before.c_iflag, "c_iflag not restored");
    assert_eq!(after.c_oflag, before.c_oflag, "c_oflag not restored");
    assert_eq!(after.c_cflag, before.c_cflag, "c_cflag not restored");
    assert_eq!(after.c_cc, before.c_cc, "c_cc not restored");
}

#[test]
fn ctrl_c_goes_to_the_guest() {
    if !kvm_available() {
        return;
    }
    let mut c = Console::attach(Pty::open(), "then=console");
    // With ISIG on, this would SIGINT kvmerge (the pty is its controlling terminal).
    c.send(b"\x03");
    c.send(b"\rquit\r");
    c.expect_line("PAYLOAD-GOT \\x03");
    c.expect_line("PAYLOAD-GOT quit");
    let status = c.wait_exit(LIMIT);
    assert_eq!(status.code(), Some(0), "{}", c.dump());
    assert!(
        !c.text().contains("stopped by signal"),
        "Ctrl-C reached kvmerge\n{}",
        c.dump()
    );
}

#[test]
fn pasted_input_longer_than_the_uart_fifo_arrives_whole() {
    if !kvm_available() {
        return;
    }
    let mut c = Console::attach(Pty::open(), "then=console");
    // 200 bytes in one write: three times the UART's 64-byte receive FIFO.
    let line: String = (0..200)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    c.send(format!("{line}\rquit\r").as_bytes());
    c.expect_line(&format!("PAYLOAD-GOT {line}"));
    let status = c.wait_exit(LIMIT);
    assert_eq!(status.code(), Some(0), "{}", c.dump());
}

/// The terminal's line discipline flags are back to `before` within `LIMIT`.
fn wait_restored(c: &mut Console, before: &libc::termios, what: &str) {
    let deadline = Instant::now() + LIMIT;
    while c.slave_termios().c_lflag != before.c_lflag {
        assert!(
            Instant::now() < deadline,
            "terminal not restored: {what}\n{}",
            c.dump()
        );
        c.pump(Duration::from_millis(20));
    }
    assert_eq!(c.slave_termios().c_iflag, before.c_iflag, "{what}: c_iflag");
}

#[test]
fn a_panic_in_any_thread_restores_the_terminal() {
    if !kvm_available() {
        return;
    }
    let pty = Pty::open();
    let before = termios(pty.slave.as_raw_fd());
    // The merge thread panics on its third tick; the guest and kvmerge keep running.
    let mut c = Console::attach_env(
        pty,
        "then=console",
        &[("KVMERGE_INJECT_PANIC", "merge-thread")],
    );
    c.expect("injected panic");
    wait_restored(&mut c, &before, "after a panic in the merge thread");
    assert!(
        c.exit.is_none(),
        "kvmerge ended with the panic\n{}",
        c.dump()
    );
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(c.child.0.id() as i32, libc::SIGTERM) };
    let status = c.wait_exit(LIMIT);
    assert_eq!(status.code(), Some(143), "{}", c.dump());
    assert_eq!(c.slave_termios().c_lflag, before.c_lflag);
}

#[test]
fn sighup_ends_the_run_and_restores_the_terminal() {
    if !kvm_available() {
        return;
    }
    let pty = Pty::open();
    let before = termios(pty.slave.as_raw_fd());
    let mut c = Console::attach(pty, "then=console");
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(c.child.0.id() as i32, libc::SIGHUP) };
    let status = c.wait_exit(LIMIT);
    assert_eq!(status.code(), Some(128 + libc::SIGHUP), "{}", c.dump());
    wait_restored(&mut c, &before, "after SIGHUP");
}

/// A terminal whose output is suspended (Ctrl-S with IXON, or tcflow) makes every write to it
/// block. The guest's echo then waits in kvmerge's console writer, not in its vCPU or the
/// control loop: SIGTERM still ends the run promptly and restores the terminal.
#[test]
fn a_suspended_terminal_does_not_hold_a_stop() {
    if !kvm_available() {
        return;
    }
    let pty = Pty::open();
    let before = termios(pty.slave.as_raw_fd());
    let slave = pty.slave.as_raw_fd();
    let mut c = Console::attach(pty, "then=console");
    // SAFETY: tcflow on the pty slave we hold.
    assert_eq!(unsafe { libc::tcflow(slave, libc::TCOOFF) }, 0);
    for i in 0..50 {
        c.send(format!("line {i} that the guest echoes back\r").as_bytes());
    }
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(c.child.0.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = c.child.0.try_wait().expect("waitpid") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "kvmerge still running 15 s after SIGTERM with the terminal suspended"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    // SAFETY: as above; lets what was written out.
    unsafe { libc::tcflow(slave, libc::TCOON) };
    c.exit = Some((status, Instant::now()));
    assert_eq!(status.code(), Some(143), "{}", c.dump());
    wait_restored(&mut c, &before, "after SIGTERM with output suspended");
}

/// SIGKILL cannot be caught, so the terminal stays raw; the settings to put back were journaled
/// before the change, and the next kvmerge started on that terminal restores them (one line),
/// before it makes the terminal raw itself.
#[test]
fn a_terminal_left_raw_by_a_killed_kvmerge_is_repaired_by_the_next_one() {
    if !kvm_available() {
        return;
    }
    let run_dir = TempDir::new("terminal-journal");
    let env = [("KVMERGE_RUN_DIR", run_dir.path().to_str().unwrap())];
    let pty = Pty::open();
    let before = termios(pty.slave.as_raw_fd());
    let mut c = Console::attach_env(pty, "then=console", &env);
    c.child.0.kill().expect("SIGKILL");
    c.wait_exit(LIMIT);
    assert_ne!(
        c.slave_termios().c_lflag,
        before.c_lflag,
        "SIGKILL should have left the terminal raw: this test shows nothing"
    );
    let Console { pty, .. } = c;
    let mut next = Console::spawn_env(pty, "then=exit:0", &env);
    next.expect("restored the terminal settings that kvmerge (pid");
    let status = next.wait_exit(LIMIT);
    assert_eq!(status.code(), Some(0), "{}", next.dump());
    wait_restored(&mut next, &before, "by the next kvmerge on that terminal");
    let left: Vec<_> = std::fs::read_dir(run_dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("terminal-"))
        .collect();
    assert!(left.is_empty(), "journal left behind: {left:?}");
}
