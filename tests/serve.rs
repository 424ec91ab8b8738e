//! `kvmerge serve` and `kvmerge vm` against a real server process over its socket, with payload
//! guests on the host's KVM: every API call and its error paths, VMs added while others run,
//! clients that leave mid-wait, and the host put back on every way out (shutdown, signals,
//! SIGKILL repaired by the next start).

mod common;
#[path = "ksm_common/mod.rs"]
mod ksm_common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use kvmerge::serve::http;
use serde_json::{Value, json};

/// How long a test waits for any one event.
const LIMIT: Duration = Duration::from_secs(120);

/// A `kvmerge serve` child with its own socket and KSM run directory, stopped at drop.
struct Server {
    child: Running,
    socket: PathBuf,
    run_dir: PathBuf,
    stderr: PathBuf,
}

impl Server {
    fn start(dir: &Path, args: &[&str]) -> Server {
        let socket = dir.join("api.sock");
        let run_dir = dir.join("run");
        let stderr = dir.join("serve.err");
        let child = kvmerge()
            .arg("-v")
            .arg("serve")
            .arg("--api-socket")
            .arg(&socket)
            .args(args)
            .env("KVMERGE_RUN_DIR", &run_dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let server = Server {
            child: Running(child),
            socket,
            run_dir,
            stderr,
        };
        server.wait_until_serving();
        server
    }

    /// Until the socket answers (or the server has exited, which fails the test).
    fn wait_until_serving(&self) {
        let deadline = Instant::now() + LIMIT;
        loop {
            if http::call(&self.socket, "GET", "/v1/vms", None, Some(LIMIT)).is_ok() {
                return;
            }
            if let Ok(Some(status)) = self.child.0.try_wait_ref() {
                panic!("the server exited ({status:?}): {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "the server never answered: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// One call; the status and the JSON body (Null when the body is not JSON).
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let bytes = body.map(|b| b.to_string().into_bytes());
        let r = http::call(&self.socket, method, path, bytes.as_deref(), Some(LIMIT))
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", self.log()));
        (
            r.status,
            serde_json::from_slice(&r.body).unwrap_or(Value::Null),
        )
    }

    fn raw(&self, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
        let r = http::call(&self.socket, method, path, Some(body), Some(LIMIT)).unwrap();
        (
            r.status,
            serde_json::from_slice(&r.body).unwrap_or(Value::Null),
        )
    }

    fn create(&self, body: Value) -> Vec<String> {
        let (status, v) = self.call("POST", "/v1/vms", Some(body));
        assert_eq!(status, 201, "{v}\n{}", self.log());
        v["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_str().unwrap().to_string())
            .collect()
    }

    fn vm_cli(&self, args: &[&str]) -> Outcome {
        let mut cmd = kvmerge();
        cmd.arg("vm")
            .arg("--api-socket")
            .arg(&self.socket)
            .args(args);
        run_with_limit(cmd, LIMIT)
    }

    /// `POST /v1/shutdown` and the server's exit status.
    fn shutdown(mut self) -> (Option<i32>, String) {
        let (status, _) = self.call("POST", "/v1/shutdown", None);
        assert_eq!(status, 200);
        let code = wait_exit(&mut self.child, LIMIT);
        (code, self.log())
    }

    /// A gauge of `/metrics` without labels.
    fn gauge(&self, name: &str) -> f64 {
        let r = http::call(&self.socket, "GET", "/metrics", None, Some(LIMIT)).unwrap();
        let text = String::from_utf8(r.body).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    }

    /// `wait` calls under way.
    fn waits(&self) -> f64 {
        self.gauge("kvmerge_api_waits")
    }
}

trait TryWaitRef {
    fn try_wait_ref(&self) -> std::io::Result<Option<std::process::ExitStatus>>;
}

impl TryWaitRef for std::process::Child {
    /// Whether the child has exited, without reaping it (so Running's drop still can).
    fn try_wait_ref(&self) -> std::io::Result<Option<std::process::ExitStatus>> {
        // SAFETY: siginfo_t is plain data; waitid fills it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid with WNOWAIT on our own child; `info` is a valid siginfo_t.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                self.id(),
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: filled by waitid when a child changed state; pid 0 otherwise.
        let pid = unsafe { info.si_pid() };
        Ok((pid != 0).then(|| std::os::unix::process::ExitStatusExt::from_raw(0)))
    }
}

fn wait_exit(child: &mut Running, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            return status.code();
        }
        assert!(
            Instant::now() < deadline,
            "the server did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + LIMIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A payload VM that fills `mib` MiB, says so (its ready marker) and idles until stopped. Every
/// page of the fill differs from the others (KSM's max_page_sharing would otherwise fill its
/// shared pages with one VM's copies first), and is the same in every such VM.
fn idle_vm(name: &str, mib: u32) -> Value {
    json!({
        "name": name,
        "kernel": payload(),
        "memory": "32M",
        "cmdline": format!("fill={mib} patterns={} then=idle", mib * 256),
        "ready": "^PAYLOAD-FILLED",
    })
}

fn ksm_knobs() -> Vec<(String, String)> {
    ksm_common::knobs()
}

#[test]
fn every_call_works_against_a_real_server() {
    if !kvm_available() {
        return;
    }
    let _ksm = ksm_common::serial();
    let before = ksm_knobs();
    let dir = TempDir::new("serve-calls");
    let server = Server::start(dir.path(), &[]);
    // Owner-only socket.
    let mode = std::fs::metadata(&server.socket).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );

    // Create two, one at a time; the second through the client.
    assert_eq!(server.create(idle_vm("a", 4)), ["a"]);
    let console = dir.path().join("{id}.log");
    let out = server.vm_cli(&[
        "create",
        "--kernel",
        payload().to_str().unwrap(),
        "--memory",
        "32M",
        "--cmdline",
        "fill=4 patterns=4 then=idle",
        "--count",
        "2",
        "--name",
        "web",
        "--ready",
        "^PAYLOAD-FILLED",
        "--console",
        console.to_str().unwrap(),
        "--wait-ready",
    ]);
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    assert_eq!(out.stdout, "web-0\nweb-1\n");
    // Ready means the guest printed its marker; the console file gets it from its writer thread.
    wait_until("the ready marker in the console file", || {
        std::fs::read_to_string(dir.path().join("web-1.log"))
            .is_ok_and(|log| log.lines().any(|l| l.starts_with("PAYLOAD-FILLED")))
    });

    // wait?for=ready, info and list.
    let (status, info) = server.call("GET", "/v1/vms/a/wait?for=ready", None);
    assert_eq!(status, 200);
    assert_eq!(info["state"], "running", "{info}");
    assert!(info["ready_ms"].as_f64().unwrap() >= info["started_ms"].as_f64().unwrap());
    assert_eq!(info["config"]["memory_mib"], 32.0);
    let (status, list) = server.call("GET", "/v1/vms", None);
    assert_eq!(status, 200);
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a", "web-0", "web-1"]);

    // Pause and resume.
    let (status, v) = server.call("POST", "/v1/vms/web-0/pause", None);
    assert_eq!((status, v["state"].as_str()), (200, Some("paused")), "{v}");
    let out = server.vm_cli(&["info", "web-0"]);
    assert!(out.stdout.contains("paused"), "{}", out.dump());
    let (status, v) = server.call("POST", "/v1/vms/web-0/resume", None);
    assert_eq!((status, v["state"].as_str()), (200, Some("running")), "{v}");

    // Stop: a clean end; the VM stays listed until removed.
    let (status, v) = server.call("POST", "/v1/vms/web-0/stop", None);
    assert_eq!(status, 200);
    assert_eq!(v["state"], "exited");
    assert_eq!(v["exit"]["success"], true);
    assert_eq!(v["exit"]["reason"], "stopped on request");
    let out = server.vm_cli(&["wait", "web-0"]);
    assert_eq!(out.code(), Some(0), "{}", out.dump());
    assert_eq!(out.stdout, "web-0: stopped on request\n");

    // A VM that exits by itself: wait answers with its status, the client exits with it.
    let ids = server.create(json!({
        "kernel": payload(),
        "memory": "16M",
        "cmdline": "fill=2 then=exit:7",
    }));
    let out = server.vm_cli(&["wait", &ids[0]]);
    assert_eq!(out.code(), Some(7), "{}", out.dump());

    // Stats and metrics, the latter through a Prometheus parser.
    wait_until("the merge thread to account the running VMs", || {
        let (_, s) = server.call("GET", "/v1/stats", None);
        s["vms_running"] == 2 && s["resident_mib"].as_f64().unwrap_or(0.0) > 0.0
    });
    let r = http::call(&server.socket, "GET", "/metrics", None, Some(LIMIT)).unwrap();
    assert_eq!(r.status, 200);
    let text = String::from_utf8(r.body).unwrap();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    let value = |name: &str, label: Option<(&str, &str)>| -> f64 {
        let s = scrape
            .samples
            .iter()
            .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .unwrap_or_else(|| panic!("no sample {name} {label:?} in\n{text}"));
        match s.value {
            prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => panic!("{name}: not a number"),
        }
    };
    assert_eq!(value("kvmerge_vms", Some(("state", "running"))), 2.0);
    assert_eq!(value("kvmerge_vms", Some(("state", "exited"))), 2.0);
    assert_eq!(value("kvmerge_vms_created_total", None), 4.0);
    assert!(value("kvmerge_vm_resident_bytes", Some(("vm", "a"))) > 0.0);
    assert!(value("kvmerge_guest_ram_bytes", None) >= f64::from(64u32 << 20));

    // Delete: stops a running VM, then forgets it.
    let (status, v) = server.call("DELETE", "/v1/vms/web-1", None);
    assert_eq!((status, v["state"].as_str()), (200, Some("exited")), "{v}");
    let (status, _) = server.call("GET", "/v1/vms/web-1", None);
    assert_eq!(status, 404);
    let out = server.vm_cli(&["rm", "web-0"]);
    assert_eq!(out.code(), Some(0), "{}", out.dump());

    // Shutdown: the last running VM is stopped, the socket goes, the knobs come back.
    let socket = server.socket.clone();
    let (code, log) = server.shutdown();
    assert_eq!(code, Some(0), "{log}");
    assert!(!socket.exists(), "the socket is removed");
    assert!(!PathBuf::from(format!("{}.lock", socket.display())).exists());
    assert_eq!(ksm_knobs(), before, "{log}");
}

#[test]
fn bad_requests_get_an_error_that_says_what_is_wrong_and_leave_nothing_behind() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("serve-bad");
    let server = Server::start(
        dir.path(),
        &["--memory-limit", "96M", "--ksm-policy", "kernel"],
    );
    let kernel = payload();
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        ("POST", "/v1/vms", b"{not json".to_vec(), 400, "not JSON"),
        ("POST", "/v1/vms", b"[1,2]".to_vec(), 400, "one JSON object"),
        ("POST", "/v1/vms", b"{}".to_vec(), 400, "no kernel"),
        (
            "POST",
            "/v1/vms",
            json!({"kernel": kernel, "colour": "red"})
                .to_string()
                .into_bytes(),
            400,
            "colour",
        ),
        (
            "POST",
            "/v1/vms",
            json!({"kernel": "/nonexistent/kernel", "memory": "16M"})
                .to_string()
                .into_bytes(),
            400,
            "/nonexistent/kernel",
        ),
        (
            "POST",
            "/v1/vms",
            json!({"kernel": "relative/kernel"})
                .to_string()
                .into_bytes(),
            400,
            "absolute",
        ),
        (
            "POST",
            "/v1/vms",
            json!({"kernel": kernel, "memory": -5})
                .to_string()
                .into_bytes(),
            400,
            "memory:",
        ),
        (
            "POST",
            "/v1/vms",
            json!({"kernel": kernel, "memory": "lots"})
                .to_string()
                .into_bytes(),
            400,
            "memory:",
        ),
        (
            "POST",
            "/v1/vms",
            json!({"kernel": kernel, "vcpus": 0})
                .to_string()
                .into_bytes(),
            400,
            "vcpus:",
        ),
        (
            "POST",
            "/v1/vms",
            json!({"kernel": kernel, "vcpus": "two"})
                .to_string()
                .into_bytes(),
            400,
            "vcpus:",
        ),
        (
            "POST",
            "/v1/vms",
            json!({"kernel": kernel, "count": 1e9})
                .to_string()
                .into_bytes(),
            400,
            "count:",
        ),
        (
            "POST",
            "/v1/vms",
            json!({"kernel": kernel, "dedup": "maybe"})
                .to_string()
                .into_bytes(),
            400,
            "dedup:",
        ),
        (
            "POST",
            "/v1/vms",
            json!({"kernel": kernel, "count": 0})
                .to_string()
                .into_bytes(),
            400,
            "count:",
        ),
        (
            "POST",
            "/v1/vms",
            json!({"kernel": kernel, "name": "a/b"})
                .to_string()
                .into_bytes(),
            400,
            "name",
        ),
        (
            "POST",
            "/v1/vms",
            json!({"kernel": kernel, "ready": "("})
                .to_string()
                .into_bytes(),
            400,
            "regular expression",
        ),
        (
            "POST",
            "/v1/vms",
            json!({"kernel": kernel, "timeout": "soon"})
                .to_string()
                .into_bytes(),
            400,
            "duration",
        ),
        (
            "POST",
            "/v1/vms",
            json!({"kernel": kernel, "count": 2, "console": "/tmp/x.log"})
                .to_string()
                .into_bytes(),
            400,
            "{id}",
        ),
        (
            "POST",
            "/v1/vms",
            json!({"kernel": kernel, "memory": "64M", "count": 2})
                .to_string()
                .into_bytes(),
            409,
            "--memory-limit",
        ),
        (
            "POST",
            "/v1/vms",
            json!({"kernel": kernel, "memory": "16M", "console": "/nonexistent-dir/c.log"})
                .to_string()
                .into_bytes(),
            400,
            "console",
        ),
        ("GET", "/v1/vms/nosuchvm", Vec::new(), 404, "nosuchvm"),
        (
            "POST",
            "/v1/vms/nosuchvm/pause",
            Vec::new(),
            404,
            "nosuchvm",
        ),
        ("GET", "/v1/vms/nosuchvm/wait", Vec::new(), 404, "nosuchvm"),
        ("DELETE", "/v1/vms/nosuchvm", Vec::new(), 404, "nosuchvm"),
        ("GET", "/v1/nothing", Vec::new(), 404, "no such path"),
        ("GET", "/v1/vms/..%2f..", Vec::new(), 404, "VM"),
        ("PUT", "/v1/vms", Vec::new(), 405, "GET or POST"),
        ("GET", "/v1/shutdown", Vec::new(), 405, "POST"),
        (
            "GET",
            "/v1/vms/a/wait?for=lunch",
            Vec::new(),
            400,
            "for=ready",
        ),
    ];
    for (method, path, body, want, says) in &cases {
        let (status, v) = server.raw(method, path, body);
        assert_eq!(
            status,
            *want,
            "{method} {path} {}: {v}",
            String::from_utf8_lossy(body)
        );
        let msg = v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error text: {v}"));
        assert!(
            msg.contains(says),
            "{method} {path}: '{msg}' should mention '{says}'"
        );
        assert!(!msg.contains('\n'), "one line: {msg}");
    }
    // Nothing half-created stays behind: no VM, and the whole limit is still there.
    let (_, list) = server.call("GET", "/v1/vms", None);
    assert_eq!(list, json!([]), "{list}");
    let ids = server.create(json!({"kernel": kernel, "memory": "96M", "cmdline": "then=idle"}));
    // Failed creates gave their indexes back: default names do not skip numbers.
    assert_eq!(ids, ["vm0"]);
    // Name taken, over the limit now, and trust groups across the server.
    let (status, v) = server.call(
        "POST",
        "/v1/vms",
        Some(json!({"kernel": kernel, "memory": "16M", "name": ids[0]})),
    );
    assert_eq!(status, 409, "{v}");
    let (status, v) = server.call(
        "POST",
        "/v1/vms",
        Some(json!({"kernel": kernel, "memory": "16M"})),
    );
    assert_eq!(status, 409, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("--memory-limit"),
        "{v}"
    );
    // A raw request that is not HTTP, and one whose body is cut short.
    let mut s = std::os::unix::net::UnixStream::connect(&server.socket).unwrap();
    std::io::Write::write_all(&mut s, b"HELLO\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    std::io::Read::read_to_end(&mut s, &mut answer).unwrap();
    assert_eq!(http::parse_response(&answer).unwrap().status, 400);
    // The client: one line, non-zero.
    let out = server.vm_cli(&["info", "ghost"]);
    assert_eq!(out.code(), Some(1), "{}", out.dump());
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.dump());
    let out = server.vm_cli(&["pause", "../x"]);
    assert_eq!(out.code(), Some(2), "{}", out.dump());
    let (code, log) = server.shutdown();
    assert_eq!(code, Some(0), "{log}");
}

#[test]
fn trust_groups_apply_across_the_whole_server() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("serve-groups");
    let server = Server::start(dir.path(), &["--ksm-policy", "kernel"]);
    let vm = |group: &str, dedup: &str| json!({"kernel": payload(), "memory": "16M", "cmdline": "then=idle", "group": group, "dedup": dedup});
    server.create(vm("blue", "full"));
    let (status, v) = server.call("POST", "/v1/vms", Some(vm("red", "full")));
    assert_eq!(status, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("trust groups"), "{v}");
    // Another group may use zero-page reclaim only.
    server.create(vm("red", "zero"));
    let (code, log) = server.shutdown();
    assert_eq!(code, Some(0), "{log}");
}

#[test]
fn a_second_server_on_the_same_socket_is_refused_and_a_killed_ones_socket_is_replaced() {
    if !kvm_available() {
        return;
    }
    let _ksm = ksm_common::serial();
    let before = ksm_knobs();
    let dir = TempDir::new("serve-socket");
    let server = Server::start(dir.path(), &[]);
    server.create(idle_vm("a", 2));
    let mut second = kvmerge();
    second
        .arg("serve")
        .arg("--api-socket")
        .arg(&server.socket)
        .env("KVMERGE_RUN_DIR", dir.path().join("run2"));
    let out = run_with_limit(second, LIMIT);
    assert_eq!(out.code(), Some(2), "{}", out.dump());
    assert!(
        out.stderr.contains("another kvmerge serve"),
        "{}",
        out.dump()
    );
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.dump());
    // The first one is untouched.
    let (status, _) = server.call("GET", "/v1/vms/a", None);
    assert_eq!(status, 200);

    // A socket another program listens on is not replaced either.
    let theirs = dir.path().join("theirs.sock");
    let listener = std::os::unix::net::UnixListener::bind(&theirs).unwrap();
    let mut cmd = kvmerge();
    cmd.arg("serve").arg("--api-socket").arg(&theirs);
    let out = run_with_limit(cmd, LIMIT);
    assert_eq!(out.code(), Some(2), "{}", out.dump());
    assert!(
        out.stderr.contains("another program is listening"),
        "{}",
        out.dump()
    );
    assert!(theirs.exists());
    drop(listener);

    // Paths that are not sockets are not replaced.
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, "keep me").unwrap();
    let mut cmd = kvmerge();
    cmd.arg("serve").arg("--api-socket").arg(&file);
    let out = run_with_limit(cmd, LIMIT);
    assert_eq!(out.code(), Some(2), "{}", out.dump());
    assert!(out.stderr.contains("is not a socket"), "{}", out.dump());
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");

    // SIGKILL: socket and KSM journal left behind; the next server on the path takes over.
    let Server {
        mut child,
        socket,
        run_dir,
        ..
    } = server;
    wait_until("the server to steer KSM", || {
        run_dir.join("ksm.json").exists()
    });
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    assert!(socket.exists(), "SIGKILL cannot remove the socket");
    let next = Server::start(dir.path(), &[]);
    assert!(
        next.log()
            .contains("removed the socket a killed kvmerge serve left"),
        "{}",
        next.log()
    );
    let (code, log) = next.shutdown();
    assert_eq!(code, Some(0), "{log}");
    assert!(!socket.exists());
    assert_eq!(ksm_knobs(), before, "{log}");
}

#[test]
fn a_client_that_leaves_mid_wait_costs_the_server_nothing() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("serve-leave");
    let server = Server::start(dir.path(), &["--ksm-policy", "kernel"]);
    server.create(idle_vm("a", 2));
    let mut waiters = Vec::new();
    for _ in 0..8 {
        let mut cmd = kvmerge();
        cmd.arg("vm")
            .arg("--api-socket")
            .arg(&server.socket)
            .args(["wait", "a"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        waiters.push(Running(cmd.spawn().unwrap()));
    }
    wait_until("a connection thread per waiting client", || {
        server.waits() == 8.0
    });
    for mut w in waiters {
        w.0.kill().unwrap();
        w.0.wait().unwrap();
    }
    // Their connection threads notice and end, though the VM still runs; only the scrape's own
    // connection is left.
    wait_until(
        "the connection threads of the killed clients to end",
        || server.waits() == 0.0 && server.gauge("kvmerge_api_connections") == 1.0,
    );
    let (_, v) = server.call("GET", "/v1/vms/a", None);
    assert_eq!(v["state"], "running", "{v}");
    // A wait that stays is answered when the VM stops.
    let socket = server.socket.clone();
    let waiter = std::thread::spawn(move || {
        http::call(&socket, "GET", "/v1/vms/a/wait", None, None).unwrap()
    });
    wait_until("the remaining waiter to connect", || server.waits() == 1.0);
    let (status, _) = server.call("POST", "/v1/vms/a/stop", None);
    assert_eq!(status, 200);
    let r = waiter.join().unwrap();
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        (r.status, v["exit"]["reason"].as_str()),
        (200, Some("stopped on request"))
    );
    let (code, log) = server.shutdown();
    assert_eq!(code, Some(0), "{log}");
}

#[test]
fn a_client_that_half_closes_still_gets_its_answer_and_waits_are_bounded() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("serve-halfclose");
    let socket = dir.path().join("api.sock");
    let mut cmd = kvmerge();
    cmd.arg("serve")
        .arg("--api-socket")
        .arg(&socket)
        .args(["--ksm-policy", "kernel"])
        .env("KVMERGE_API_MAX_WAITS", "3")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = Running(cmd.spawn().unwrap());
    wait_until("the server to answer", || {
        http::call(&socket, "GET", "/v1/vms", None, Some(LIMIT)).is_ok()
    });
    let (status, _) = {
        let r = http::call(
            &socket,
            "POST",
            "/v1/vms",
            Some(idle_vm("a", 2).to_string().as_bytes()),
            Some(LIMIT),
        )
        .unwrap();
        (r.status, ())
    };
    assert_eq!(status, 201);
    // Three waits, each from a client that shut down its sending side after the request (as
    // `nc -N` and socat do): they are clients still, and get their answers.
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
                s.write_all(b"GET /v1/vms/a/wait HTTP/1.1\r\nHost: x\r\n\r\n")
                    .unwrap();
                s.shutdown(std::net::Shutdown::Write).unwrap();
                let mut answer = Vec::new();
                s.read_to_end(&mut answer).unwrap();
                http::parse_response(&answer).unwrap()
            })
        })
        .collect();
    // The fourth wait is over the limit (3 here): refused at once, while stop still gets through.
    wait_until("three waits under way", || {
        let r = http::call(&socket, "GET", "/metrics", None, Some(LIMIT)).unwrap();
        String::from_utf8_lossy(&r.body).contains("\nkvmerge_api_waits 3\n")
    });
    let r = http::call(&socket, "GET", "/v1/vms/a/wait", None, Some(LIMIT)).unwrap();
    assert_eq!(r.status, 503);
    assert!(String::from_utf8_lossy(&r.body).contains("more than 3 waits at once"));
    let r = http::call(&socket, "POST", "/v1/vms/a/stop", None, Some(LIMIT)).unwrap();
    assert_eq!(r.status, 200);
    for w in waiters {
        let r = w.join().unwrap();
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            (r.status, v["exit"]["reason"].as_str()),
            (200, Some("stopped on request"))
        );
    }
    let r = http::call(&socket, "POST", "/v1/shutdown", None, Some(LIMIT)).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(wait_exit(&mut child, LIMIT), Some(0));
}

#[test]
fn a_server_without_full_dedup_vms_leaves_the_host_ksm_alone() {
    if !kvm_available() {
        return;
    }
    let _ksm = ksm_common::serial();
    let before = ksm_knobs();
    let dir = TempDir::new("serve-noksm");
    let server = Server::start(dir.path(), &[]);
    for dedup in ["zero", "off"] {
        server.create(json!({"kernel": payload(), "memory": "16M", "cmdline": "fill=2 then=idle", "dedup": dedup}));
    }
    // The merge thread has ticked with both VMs (reclaim and accounting run for them).
    wait_until("the merge thread to account both VMs", || {
        let (_, s) = server.call("GET", "/v1/stats", None);
        s["vms_running"] == 2
    });
    assert_eq!(ksm_knobs(), before);
    assert!(
        !server.run_dir.join("ksm.json").exists(),
        "no KSM journal: nothing was changed"
    );
    let (code, log) = server.shutdown();
    assert_eq!(code, Some(0), "{log}");
}

#[test]
fn vm_timeouts_end_a_vm_as_a_failure() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("serve-timeout");
    let server = Server::start(dir.path(), &["--ksm-policy", "kernel"]);
    let ids = server.create(
        json!({"kernel": payload(), "memory": "16M", "cmdline": "then=idle", "timeout": "300ms"}),
    );
    let out = server.vm_cli(&["wait", &ids[0]]);
    assert_eq!(out.code(), Some(1), "{}", out.dump());
    assert!(out.stdout.contains("timed out"), "{}", out.dump());
    let (code, log) = server.shutdown();
    assert_eq!(code, Some(0), "{log}");
}

#[test]
fn vms_added_while_others_run_share_pages_with_them() {
    if !kvm_available() || !ksm_common::ksm_writable() {
        return;
    }
    let _ksm = ksm_common::serial();
    let before = ksm_knobs();
    let dir = TempDir::new("serve-share");
    let server = Server::start(dir.path(), &[]);
    server.create(idle_vm("first", 16));
    server.call("GET", "/v1/vms/first/wait?for=ready", None);
    // Added later, with the same content: KSM merges it with the first.
    server.create(idle_vm("later", 16));
    server.call("GET", "/v1/vms/later/wait?for=ready", None);
    wait_until("pages of the later VM shared with the first", || {
        let (_, v) = server.call("GET", "/v1/vms/later", None);
        v["dedup"]["shared_with_other_vms_mib"]
            .as_f64()
            .unwrap_or(0.0)
            >= 8.0
    });
    let (_, stats) = server.call("GET", "/v1/stats", None);
    assert!(stats["saved_mib"].as_f64().unwrap() >= 8.0, "{stats}");
    assert_eq!(stats["ksm_owned"], true, "{stats}");
    let (code, log) = server.shutdown();
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(ksm_knobs(), before, "{log}");
}

#[test]
fn a_signal_stops_every_vm_and_restores_the_host() {
    if !kvm_available() {
        return;
    }
    let _ksm = ksm_common::serial();
    let before = ksm_knobs();
    for (sig, code) in [
        (libc::SIGTERM, 143),
        (libc::SIGHUP, 129),
        (libc::SIGINT, 130),
    ] {
        let dir = TempDir::new("serve-signal");
        let mut server = Server::start(dir.path(), &[]);
        server.create(idle_vm("a", 4));
        let socket = server.socket.clone();
        let waiter =
            std::thread::spawn(move || http::call(&socket, "GET", "/v1/vms/a/wait", None, None));
        wait_until("the waiter to connect", || server.waits() == 1.0);
        // SAFETY: signalling our own child.
        unsafe { libc::kill(server.pid() as i32, sig) };
        let got = wait_exit(&mut server.child, LIMIT);
        assert_eq!(got, Some(code), "{}", server.log());
        assert!(!server.socket.exists());
        assert_eq!(ksm_knobs(), before, "{}", server.log());
        // The waiter got the VM's end: stopped by the signal.
        let r = waiter.join().unwrap().unwrap();
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            v["exit"]["reason"],
            format!("stopped by signal {sig}"),
            "{v}"
        );
    }
}
