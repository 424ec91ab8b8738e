//! Overcommit: admission refuses fleets the host or the memory cgroup cannot hold, and at run
//! time kvmerge sheds the guest that frees most instead of being ended by the OOM killer. The
//! run-time tests make their own cgroup (v2, or the v1 memory/pids controller where that is what
//! the host mounts), put kvmerge in it, and remove it on every way out.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const LIMIT: Duration = Duration::from_secs(240);

/// A cgroup made for one test: a child of this process's own cgroup (v1), or of the v2 root
/// (v2 forbids processes in inner cgroups). Removed on drop, with the v2 root's
/// subtree_control restored when the test had to enable the controller there.
struct TestCgroup {
    dir: PathBuf,
    restore_subtree: Option<(PathBuf, String)>,
}

impl TestCgroup {
    /// `controller` is "memory" or "pids". Returns why not when this host cannot make one.
    fn new(controller: &str, tag: &str) -> Result<TestCgroup, String> {
        // SAFETY: getuid has no preconditions.
        if unsafe { libc::getuid() } != 0 {
            return Err("needs root to create a cgroup".into());
        }
        let name = format!("kvmerge-test-{tag}-{}", std::process::id());
        let unified = unified_mount();
        if let Some(root) = &unified {
            let controllers =
                std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            if controllers.split_whitespace().any(|c| c == controller) {
                let subtree_file = root.join("cgroup.subtree_control");
                let before = std::fs::read_to_string(&subtree_file).unwrap_or_default();
                let mut restore = None;
                if !before.split_whitespace().any(|c| c == controller) {
                    std::fs::write(&subtree_file, format!("+{controller}"))
                        .map_err(|e| format!("cannot enable {controller} in the v2 root: {e}"))?;
                    restore = Some((subtree_file, format!("-{controller}")));
                }
                let dir = root.join(&name);
                let made = TestCgroup {
                    dir: dir.clone(),
                    restore_subtree: restore,
                };
                std::fs::create_dir(&dir).map_err(|e| format!("cannot create {dir:?}: {e}"))?;
                return Ok(made);
            }
        }
        // cgroup v1: the controller's own hierarchy, under this process's cgroup in it.
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                let mut f = l.splitn(3, ':');
                let (_, list, path) = (f.next()?, f.next()?, f.next()?);
                list.split(',')
                    .any(|c| c == controller)
                    .then(|| path.to_string())
            })
            .ok_or_else(|| format!("no {controller} cgroup controller on this host"))?;
        let mount = Path::new("/sys/fs/cgroup").join(controller);
        if !mount.join("cgroup.procs").exists() {
            return Err(format!("the v1 {controller} hierarchy is not at {mount:?}"));
        }
        let dir = mount.join(own.trim_start_matches('/')).join(&name);
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {dir:?}: {e}"))?;
        Ok(TestCgroup {
            dir,
            restore_subtree: None,
        })
    }

    fn v2(&self) -> bool {
        self.dir.join("cgroup.controllers").exists()
    }

    fn set(&self, v2_file: &str, v1_file: &str, value: &str) {
        let file = if self.v2() { v2_file } else { v1_file };
        std::fs::write(self.dir.join(file), value)
            .unwrap_or_else(|e| panic!("cannot write {value} to {file}: {e}"));
    }

    /// kvmerge with ARGS, started inside this cgroup by a shell that moves itself in and execs.
    fn kvmerge(&self, args: &[&str]) -> Command {
        let mut script = format!(
            "echo $$ > '{}/cgroup.procs' && exec '{}'",
            self.dir.display(),
            env!("CARGO_BIN_EXE_kvmerge")
        );
        for a in args {
            script.push_str(&format!(" '{a}'"));
        }
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script);
        cmd.stdin(std::process::Stdio::null());
        cmd
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // The processes have exited; the kernel may take a moment to let the group go.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some((file, value)) = &self.restore_subtree {
            let _ = std::fs::write(file, value);
        }
    }
}

fn unified_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        if !post.starts_with("cgroup2 ") {
            return None;
        }
        pre.split(' ').nth(4).map(PathBuf::from)
    })
}

fn skip(why: &str) -> bool {
    if std::env::var("KVMERGE_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("KVMERGE_REQUIRE_KVM=1 but {why}");
    }
    eprintln!("SKIPPED: {why}");
    true
}

/// Output of a running child, collected by reader threads.
struct Streams {
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Streams {
    fn attach(child: &mut std::process::Child) -> Streams {
        let collect = |mut pipe: Box<dyn Read + Send>| {
            let text = Arc::new(Mutex::new(String::new()));
            let sink = text.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sink.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
            text
        };
        Streams {
            stdout: collect(Box::new(child.stdout.take().unwrap())),
            stderr: collect(Box::new(child.stderr.take().unwrap())),
        }
    }

    fn dump(&self) -> String {
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout.lock().unwrap(),
            self.stderr.lock().unwrap()
        )
    }
}

/// Four guests filling 384 MiB each with --dedup off (nothing merges), then idling, in a memory
/// cgroup of 1408 MiB: all four need about 1.5 GiB, three fit. Without the guard the OOM killer
/// ends kvmerge (exit 137, every guest lost). With it, one guest is shed with one line, the other
/// three finish their fill and keep running until SIGTERM ends the run (exit 143).
#[test]
fn memory_pressure_sheds_one_guest_and_the_rest_keep_running() {
    if !kvm_available() {
        return;
    }
    let cg = match TestCgroup::new("memory", "shed") {
        Ok(cg) => cg,
        Err(why) => {
            skip(&why);
            return;
        }
    };
    cg.set(
        "memory.max",
        "memory.limit_in_bytes",
        &(1408u64 << 20).to_string(),
    );
    if cg.v2() {
        // Guests must not be swapped out instead: the test is about running out.
        cg.set("memory.swap.max", "memory.swap.max", "0");
    }
    let payload = payload();
    let mut cmd = cg.kvmerge(&[
        "run",
        "--kernel",
        payload.to_str().unwrap(),
        "--count",
        "4",
        "--memory",
        "512M",
        "--dedup",
        "off",
        "--overcommit",
        "2",
        "--cmdline",
        "fill=384 then=idle",
    ]);
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut running = Running(child);
    let streams = Streams::attach(&mut running.0);
    // Wait (bounded) until one guest was shed and every other one has filled its RAM.
    let deadline = Instant::now() + LIMIT;
    let shed = loop {
        let err = streams.stderr.lock().unwrap().clone();
        let out = streams.stdout.lock().unwrap().clone();
        let shed: Vec<String> = err
            .lines()
            .filter(|l| l.contains("stopped to relieve memory pressure"))
            .filter_map(|l| l.split(": ").nth(2).map(str::to_string))
            .collect();
        let filled = (0..4)
            .filter(|i| {
                let name = format!("vm{i}");
                !shed.contains(&name) && out.contains(&format!("[{name}] PAYLOAD-FILLED sum="))
            })
            .count();
        if !shed.is_empty() && filled + shed.len() == 4 {
            break shed;
        }
        if let Some(status) = running.0.try_wait().unwrap() {
            panic!(
                "kvmerge ended before the test: {status:?} (137 = OOM-killed)\n{}",
                streams.dump()
            );
        }
        assert!(
            Instant::now() < deadline,
            "no guest shed, or the others did not fill, within {LIMIT:?}\n{}",
            streams.dump()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        shed.len() < 4,
        "not every guest is shed\n{}",
        streams.dump()
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(running.0.id() as i32, libc::SIGTERM) };
    let status = running.0.wait().unwrap();
    // Let the readers see the end of the streams.
    let deadline = Instant::now() + Duration::from_secs(30);
    while Arc::strong_count(&streams.stderr) > 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let err = streams.stderr.lock().unwrap().clone();
    assert_eq!(status.code(), Some(143), "{}", streams.dump());
    for name in &shed {
        assert!(
            err.contains(&format!(
                "kvmerge: {name}: stopped to relieve host memory pressure"
            )),
            "{name} ends with the shed reason\n{}",
            streams.dump()
        );
        let lines = err
            .lines()
            .filter(|l| l.contains(&format!("{name}: stopped to relieve memory pressure (")))
            .collect::<Vec<_>>();
        assert_eq!(
            lines.len(),
            1,
            "one line when it happens\n{}",
            streams.dump()
        );
        assert!(
            lines[0].contains("memory cgroup"),
            "says where: {}",
            lines[0]
        );
    }
    for i in 0..4 {
        let name = format!("vm{i}");
        if !shed.contains(&name) {
            assert!(
                err.contains(&format!("kvmerge: {name}: stopped by signal 15")),
                "{name} kept running until the end\n{}",
                streams.dump()
            );
        }
    }
}

/// Admission against the memory cgroup: a fleet larger than the cgroup's room is refused before
/// anything starts, and --overcommit admits it.
#[test]
fn fleet_larger_than_the_memory_cgroup_is_refused_up_front() {
    let cg = match TestCgroup::new("memory", "admit") {
        Ok(cg) => cg,
        Err(why) => {
            skip(&why);
            return;
        }
    };
    cg.set(
        "memory.max",
        "memory.limit_in_bytes",
        &(256u64 << 20).to_string(),
    );
    let payload = payload();
    let k = payload.to_str().unwrap();
    let out = run_with_limit(
        cg.kvmerge(&["run", "--kernel", k, "--count", "8", "--memory", "64M"]),
        LIMIT,
    );
    assert_eq!(out.code(), Some(2), "{}", out.dump());
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.dump());
    assert!(out.stdout.is_empty(), "nothing started\n{}", out.dump());
    assert!(
        out.stderr.contains("512 MiB") && out.stderr.contains("in memory cgroup"),
        "{}",
        out.dump()
    );
    assert!(out.stderr.contains("--overcommit"), "{}", out.dump());
    if !kvm_available() {
        return;
    }
    // The guests touch almost nothing: admitted with a ratio, they run and exit 0.
    let out = run_with_limit(
        cg.kvmerge(&[
            "run",
            "--kernel",
            k,
            "--count",
            "8",
            "--memory",
            "64M",
            "--overcommit",
            "4",
            "--cmdline",
            "then=exit:0",
            "--dedup",
            "off",
        ]),
        LIMIT,
    );
    assert_eq!(out.code(), Some(0), "{}", out.dump());
}

/// A thread limit (cgroup pids.max) the fleet does not fit in is refused clearly up front,
/// instead of a panic while the fleet is built.
#[test]
fn thread_limit_is_refused_up_front() {
    let cg = match TestCgroup::new("pids", "threads") {
        Ok(cg) => cg,
        Err(why) => {
            skip(&why);
            return;
        }
    };
    cg.set("pids.max", "pids.max", "24");
    let payload = payload();
    let out = run_with_limit(
        cg.kvmerge(&[
            "run",
            "--kernel",
            payload.to_str().unwrap(),
            "--count",
            "32",
            "--memory",
            "4M",
        ]),
        LIMIT,
    );
    assert_eq!(out.code(), Some(2), "{}", out.dump());
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.dump());
    assert!(!out.stderr.contains("panicked"), "{}", out.dump());
    assert!(
        out.stderr.contains("threads") && out.stderr.contains("pids.max"),
        "{}",
        out.dump()
    );
}
