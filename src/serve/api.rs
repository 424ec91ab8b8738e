//! The API threads of `kvmerge serve`: an acceptor, and one thread per connection that reads one
//! request, turns it into an [`Op`] for the control loop and writes its answer. Every body is
//! JSON but `GET /metrics` (Prometheus text). Paths:
//!
//! | call | op |
//! | --- | --- |
//! | `POST /v1/vms` | create (body: one VM, the keys of a fleet file's `[[vm]]` table, plus `console`, `ready`, `timeout`) |
//! | `GET /v1/vms`, `GET /v1/vms/{id}` | list, info |
//! | `POST /v1/vms/{id}/pause`, `/resume`, `/stop` | lifecycle |
//! | `DELETE /v1/vms/{id}` | stop if needed, destroy and forget |
//! | `GET /v1/vms/{id}/wait`, `?for=ready` | until the VM ends (or its ready marker) |
//! | `GET /v1/stats`, `GET /metrics` | figures |
//! | `POST /v1/shutdown` | stop every VM, restore the host, exit |

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use regex::Regex;
use serde_json::{Map, Value};

use super::http::{self, ReadError, Request};
use super::{Body, Inbox, NewVm, Op, Reply, valid_name};

/// Most `wait` calls answered at once; beyond, a wait gets 503. Each is a thread (and a socket)
/// until its VM ends or its client leaves. (Test hook: `KVMERGE_API_MAX_WAITS=N` lowers it.)
pub const MAX_WAITS: usize = 1024;

fn max_waits() -> usize {
    std::env::var("KVMERGE_API_MAX_WAITS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n <= MAX_WAITS)
        .unwrap_or(MAX_WAITS)
}
/// Connections served at once beyond the waits: the other calls (stop, delete, shutdown) still
/// get through when [`MAX_WAITS`] clients wait. Beyond, a connection gets 503 at once.
pub const MAX_OTHER_CONNECTIONS: usize = 256;
/// How often a connection whose answer is not ready looks whether its client is still there.
const CLIENT_CHECK: Duration = Duration::from_millis(200);

pub(super) struct ApiThreads {
    acceptor: Option<JoinHandle<()>>,
    listener: UnixListener,
    active: Arc<Counts>,
}

/// Connections under way, and of them the waits (shown in `/metrics`).
#[derive(Default)]
pub(super) struct Counts {
    pub active: AtomicUsize,
    pub waits: AtomicUsize,
    max_waits: usize,
}

pub(super) fn start(
    listener: UnixListener,
    inbox: Inbox,
    stopping: Arc<AtomicBool>,
) -> std::io::Result<ApiThreads> {
    let counts = Arc::new(Counts {
        max_waits: max_waits(),
        ..Counts::default()
    });
    let counted = counts.clone();
    let accepting = listener.try_clone()?;
    let acceptor = std::thread::Builder::new()
        .name("kvmerge-api".into())
        .spawn(move || {
            // Answers must not wait for a round of hundreds of busy vCPU threads (see
            // crate::sched); connection threads inherit the raise.
            // Best effort, and for good: the filter below forbids setting it back.
            std::mem::forget(crate::sched::Raised::this_thread(
                crate::sched::RESPONSIVE,
                "the API",
            ));
            if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Api) {
                log::error!("{e}; the API is not served");
                return;
            }
            accept_loop(&accepting, &inbox, &stopping, &counted);
        })?;
    Ok(ApiThreads {
        acceptor: Some(acceptor),
        listener,
        active: counts,
    })
}

impl ApiThreads {
    pub(super) fn counts(&self) -> Arc<Counts> {
        self.active.clone()
    }

    /// Stops accepting and gives the connections under way until `within` to finish.
    pub(super) fn finish(mut self, within: Duration) {
        // SAFETY: shutdown on our own listening socket: accept(2) in the acceptor returns EINVAL.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(acceptor) = self.acceptor.take() {
            if !crate::seccomp::parked(crate::seccomp::ThreadKind::Api) {
                let _ = acceptor.join();
            }
        }
        let deadline = Instant::now() + within;
        while self.active.active.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn accept_loop(
    listener: &UnixListener,
    inbox: &Inbox,
    stopping: &Arc<AtomicBool>,
    counts: &Arc<Counts>,
) {
    let active = &counts.active;
    loop {
        let mut stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => match e.raw_os_error() {
                Some(libc::EINTR | libc::ECONNABORTED) => continue,
                Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS) => {
                    log::warn!("API: cannot accept a connection ({e}); retrying");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                // The listener was shut down: the server is ending.
                _ => return,
            },
        };
        if stopping.load(Ordering::Relaxed) {
            refuse(&mut stream, 503, "the server is shutting down");
            continue;
        }
        if active.fetch_add(1, Ordering::AcqRel) >= MAX_WAITS + MAX_OTHER_CONNECTIONS {
            active.fetch_sub(1, Ordering::AcqRel);
            refuse(
                &mut stream,
                503,
                &format!(
                    "more than {} connections at once; retry later",
                    MAX_WAITS + MAX_OTHER_CONNECTIONS
                ),
            );
            continue;
        }
        let inbox = inbox.clone();
        let counts = counts.clone();
        let spawned = std::thread::Builder::new()
            .name("kvmerge-api-conn".into())
            .spawn(move || {
                serve_connection(stream, &inbox, &counts);
                counts.active.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            active.fetch_sub(1, Ordering::AcqRel);
            log::warn!("API: cannot start a connection thread: {e}");
        }
    }
}

/// An answer written from the acceptor: bounded, so a client that does not read cannot hold it.
fn refuse(stream: &mut UnixStream, status: u16, message: &str) {
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    let body = serde_json::json!({ "error": message }).to_string();
    let _ = http::write_response(stream, status, "application/json", body.as_bytes());
}

fn serve_connection(mut stream: UnixStream, inbox: &Inbox, counts: &Counts) {
    let waits = &counts.waits;
    let reply = match http::read_request(&mut stream) {
        Ok(req) => match route(&req) {
            Ok(op @ Op::Wait { .. }) => {
                let room = waits.fetch_add(1, Ordering::AcqRel) < counts.max_waits;
                let reply = if room {
                    wait_for_answer(&stream, inbox, op)
                } else {
                    Some(Reply::error(
                        503,
                        format!("more than {} waits at once; retry later", counts.max_waits),
                    ))
                };
                waits.fetch_sub(1, Ordering::AcqRel);
                reply
            }
            Ok(op) => wait_for_answer(&stream, inbox, op),
            Err(reply) => Some(reply),
        },
        Err(ReadError::Gone) => None,
        Err(ReadError::Answer(status, message)) => Some(Reply::error(status, message)),
    };
    let Some(reply) = reply else {
        return;
    };
    // A client that stops reading is not waited for long.
    let _ = stream.set_write_timeout(Some(http::REQUEST_DEADLINE));
    let (content_type, body) = match reply.body {
        Body::Json(v) => ("application/json", format!("{v}\n").into_bytes()),
        Body::Text(t) => ("text/plain; version=0.0.4; charset=utf-8", t.into_bytes()),
    };
    let _ = http::write_response(&mut stream, reply.status, content_type, &body);
}

/// Posts `op` and waits for its answer; None when the client went away meanwhile (its answer,
/// when it comes, is dropped).
fn wait_for_answer(stream: &UnixStream, inbox: &Inbox, op: Op) -> Option<Reply> {
    let (answer, gone) = inbox.post(op);
    loop {
        match answer.recv_timeout(CLIENT_CHECK) {
            Ok(reply) => return Some(reply),
            Err(RecvTimeoutError::Disconnected) => {
                return Some(Reply::error(503, "the server is shutting down"));
            }
            Err(RecvTimeoutError::Timeout) => {
                if client_gone(stream) {
                    log::debug!("API: a client left before its answer");
                    gone.store(true, Ordering::Relaxed);
                    return None;
                }
            }
        }
    }
}

/// Whether the peer has closed its socket. A client that only shut down its sending side
/// (`nc -N`, socat) still reads the answer: for a Unix stream socket that is POLLRDHUP alone,
/// while a closed peer gives POLLHUP.
fn client_gone(stream: &UnixStream) -> bool {
    let mut fd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    // SAFETY: one pollfd of our own; no wait.
    let n = unsafe { libc::poll(&mut fd, 1, 0) };
    n > 0 && fd.revents & (libc::POLLHUP | libc::POLLERR) != 0
}

/// Maps a request to its op, or answers it here (unknown path, wrong method, bad body).
pub(crate) fn route(req: &Request) -> Result<Op, Reply> {
    let segments: Vec<&str> = req.path.trim_end_matches('/').split('/').skip(1).collect();
    let method = req.method.as_str();
    let wrong_method = |allowed: &str| {
        Err(Reply::error(
            405,
            format!("{method} is not allowed on {}: use {allowed}", req.path),
        ))
    };
    let no_query = || match &req.query {
        Some(q) if !q.is_empty() => Err(Reply::error(
            400,
            format!("{} takes no query parameters (got '{q}')", req.path),
        )),
        _ => Ok(()),
    };
    match segments.as_slice() {
        ["metrics"] => match method {
            "GET" => no_query().map(|()| Op::Metrics),
            _ => wrong_method("GET"),
        },
        ["v1", "stats"] => match method {
            "GET" => no_query().map(|()| Op::Stats),
            _ => wrong_method("GET"),
        },
        ["v1", "shutdown"] => match method {
            "POST" | "PUT" => no_query().map(|()| Op::Shutdown),
            _ => wrong_method("POST"),
        },
        ["v1", "vms"] => match method {
            "GET" => no_query().map(|()| Op::List),
            "POST" => {
                no_query()?;
                create_body(&req.body).map(Op::Create)
            }
            _ => wrong_method("GET or POST"),
        },
        ["v1", "vms", id] => {
            let id = vm_id(id)?;
            match method {
                "GET" => no_query().map(|()| Op::Info(id)),
                "DELETE" => no_query().map(|()| Op::Delete(id)),
                _ => wrong_method("GET or DELETE"),
            }
        }
        ["v1", "vms", id, action] => {
            let id = vm_id(id)?;
            match (*action, method) {
                ("pause", "POST") => no_query().map(|()| Op::Pause(id)),
                ("resume", "POST") => no_query().map(|()| Op::Resume(id)),
                ("stop", "POST") => no_query().map(|()| Op::Stop(id)),
                ("wait", "GET") => {
                    let ready = match req.query.as_deref() {
                        None | Some("") | Some("for=end") => false,
                        Some("for=ready") => true,
                        Some(q) => {
                            return Err(Reply::error(
                                400,
                                format!(
                                    "wait takes ?for=end (the default) or ?for=ready, not '{q}'"
                                ),
                            ));
                        }
                    };
                    Ok(Op::Wait { id, ready })
                }
                ("pause" | "resume" | "stop", _) => wrong_method("POST"),
                ("wait", _) => wrong_method("GET"),
                _ => Err(not_found(&req.path)),
            }
        }
        _ => Err(not_found(&req.path)),
    }
}

fn not_found(path: &str) -> Reply {
    Reply::error(
        404,
        format!(
            "no such path: {} (the API: /v1/vms, /v1/vms/ID, /v1/vms/ID/{{pause,resume,stop,wait}}, \
             /v1/stats, /v1/shutdown, /metrics)",
            path.escape_debug()
        ),
    )
}

fn vm_id(raw: &str) -> Result<String, Reply> {
    if valid_name(raw) {
        Ok(raw.to_string())
    } else {
        Err(Reply::error(
            404,
            format!(
                "no VM '{}' on this server: VM ids are letters, digits, '_', '.', '-'",
                raw.escape_debug()
            ),
        ))
    }
}

/// The VMs a create body describes.
pub(crate) fn create_body(body: &[u8]) -> Result<Vec<NewVm>, Reply> {
    let bad = |m: String| Reply::error(400, m);
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        bad(format!(
            "the body is not JSON ({e}); send one object, e.g. {{\"kernel\": \"/path/to/kernel\"}}"
        ))
    })?;
    let Value::Object(mut map) = value else {
        return Err(bad(
            "the body must be one JSON object, e.g. {\"kernel\": \"/path/to/kernel\"}".into(),
        ));
    };
    let console = take_string(&mut map, "console")?;
    let ready = take_string(&mut map, "ready")?;
    let timeout = match map.remove("timeout") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => {
            Some(crate::config::parse_duration(&s).map_err(|e| bad(e.to_string()))?)
        }
        Some(Value::Number(n)) => Some(
            n.as_f64()
                .filter(|s| {
                    s.is_finite() && *s > 0.0 && *s <= crate::config::MAX_TIMEOUT.as_secs_f64()
                })
                .map(Duration::from_secs_f64)
                .ok_or_else(|| bad(format!("timeout {n}: give seconds above 0, at most a year")))?,
        ),
        Some(other) => return Err(bad(format!("timeout {other}: give e.g. \"30s\" or 30"))),
    };
    if timeout.is_some_and(|t| t.is_zero() || t > crate::config::MAX_TIMEOUT) {
        return Err(bad(
            "timeout: give a duration above 0 and at most a year".into()
        ));
    }
    let (name, count, cfg) = crate::fleet::vm_from_json(Value::Object(map)).map_err(bad)?;
    if let Some(name) = &name {
        if !valid_name(name) {
            return Err(bad(format!(
                "name '{}': use 1 to 63 letters, digits, '_', '.' or '-', starting with a letter or digit",
                name.escape_debug()
            )));
        }
        if count > 1 && !valid_name(&format!("{name}-{}", count - 1)) {
            return Err(bad(format!(
                "name '{name}' is too long for count {count}: the VMs are named {name}-0 ..."
            )));
        }
    }
    let ready = match ready {
        Some(r) => Some(Arc::new(Regex::new(&r).map_err(|e| {
            bad(format!(
                "ready: not a valid regular expression: {}",
                one_line(&e.to_string())
            ))
        })?)),
        None => None,
    };
    let console = match console {
        Some(c) if !std::path::Path::new(&c).is_absolute() => {
            return Err(bad(format!(
                "console '{}' is not an absolute path (the server does not know the client's working directory)",
                c.escape_debug()
            )));
        }
        Some(c) if count > 1 && !c.contains("{id}") => {
            return Err(bad(format!(
                "console '{}': with count {count}, put {{id}} in the path so that each VM gets its own file",
                c.escape_debug()
            )));
        }
        other => other,
    };
    Ok((0..count)
        .map(|_| NewVm {
            name: name.clone(),
            cfg: cfg.clone(),
            console: console.clone().map(Into::into),
            ready: ready.clone(),
            timeout,
        })
        .collect())
}

fn take_string(map: &mut Map<String, Value>, key: &str) -> Result<Option<String>, Reply> {
    match map.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s)),
        Some(other) => Err(Reply::error(
            400,
            format!("{key}: expected a non-empty string, got {other}"),
        )),
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
