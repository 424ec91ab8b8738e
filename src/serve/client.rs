//! `kvmerge vm`: the command-line client of `kvmerge serve`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use super::http;
use crate::cli::{CreateArgs, VmAction, VmArgs};
use crate::config::DedupMode;

/// How long a call other than `wait` and `create` may take to be answered.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// What the command prints and exits with.
pub struct Outcome {
    pub stdout: String,
    /// One line for stderr, when the call failed.
    pub error: Option<String>,
    pub exit_code: u8,
}

impl Outcome {
    fn ok(stdout: String) -> Outcome {
        Outcome {
            stdout,
            error: None,
            exit_code: 0,
        }
    }

    fn failed(error: String, exit_code: u8) -> Outcome {
        Outcome {
            stdout: String::new(),
            error: Some(error),
            exit_code,
        }
    }
}

pub fn run(args: VmArgs) -> Outcome {
    let Some(socket) = args.api_socket.clone() else {
        return Outcome::failed(
            "give the server's socket: kvmerge vm --api-socket PATH ... (or set KVMERGE_API_SOCKET)"
                .into(),
            2,
        );
    };
    let json_out = args.json;
    let (method, target, body, timeout): (&str, String, Option<Value>, Option<Duration>) =
        match &args.action {
            VmAction::Create(c) => match create_body(c) {
                Ok(body) => ("POST", "/v1/vms".into(), Some(body), None),
                Err(e) => return Outcome::failed(e, 2),
            },
            VmAction::List => ("GET", "/v1/vms".into(), None, Some(CALL_TIMEOUT)),
            VmAction::Info { id } => ("GET", format!("/v1/vms/{id}"), None, Some(CALL_TIMEOUT)),
            VmAction::Pause { id } => (
                "POST",
                format!("/v1/vms/{id}/pause"),
                None,
                Some(CALL_TIMEOUT),
            ),
            VmAction::Resume { id } => (
                "POST",
                format!("/v1/vms/{id}/resume"),
                None,
                Some(CALL_TIMEOUT),
            ),
            VmAction::Stop { id } => (
                "POST",
                format!("/v1/vms/{id}/stop"),
                None,
                Some(CALL_TIMEOUT),
            ),
            VmAction::Rm { id } => ("DELETE", format!("/v1/vms/{id}"), None, Some(CALL_TIMEOUT)),
            VmAction::Wait { id, ready } => {
                let q = if *ready { "?for=ready" } else { "" };
                ("GET", format!("/v1/vms/{id}/wait{q}"), None, None)
            }
            VmAction::Stats => ("GET", "/v1/stats".into(), None, Some(CALL_TIMEOUT)),
            VmAction::Metrics => ("GET", "/metrics".into(), None, Some(CALL_TIMEOUT)),
            VmAction::Shutdown => ("POST", "/v1/shutdown".into(), None, None),
        };
    if let Some(id) = action_id(&args.action) {
        if !super::valid_name(id) {
            return Outcome::failed(
                format!(
                    "'{}' is not a VM id: ids are letters, digits, '_', '.', '-'",
                    id.escape_debug()
                ),
                2,
            );
        }
    }
    let response = match call(&socket, method, &target, body.as_ref(), timeout) {
        Ok(r) => r,
        Err(e) => return Outcome::failed(e, 1),
    };
    if !(200..300).contains(&response.status) {
        let message = serde_json::from_slice::<Value>(&response.body)
            .ok()
            .and_then(|v| v.get("error").and_then(Value::as_str).map(String::from))
            .unwrap_or_else(|| String::from_utf8_lossy(&response.body).trim().to_string());
        return Outcome::failed(format!("{message} (HTTP {})", response.status), 1);
    }
    if let VmAction::Metrics = args.action {
        return Outcome::ok(String::from_utf8_lossy(&response.body).into_owned());
    }
    let value: Value = match serde_json::from_slice(&response.body) {
        Ok(v) => v,
        Err(e) => return Outcome::failed(format!("the server's answer is not JSON: {e}"), 1),
    };
    // `create --wait-ready`: one wait per new VM.
    let value = match (&args.action, &value) {
        (VmAction::Create(c), v) if c.wait_ready => match wait_ready_all(&socket, v) {
            Ok(v) => v,
            Err(e) => return Outcome::failed(e, 1),
        },
        _ => value,
    };
    let exit_code = match &args.action {
        VmAction::Wait { ready: false, .. } => exit_status(&value),
        _ => 0,
    };
    let stdout = if json_out {
        format!(
            "{}\n",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        )
    } else {
        human(&args.action, &value)
    };
    Outcome {
        stdout,
        error: None,
        exit_code,
    }
}

fn action_id(action: &VmAction) -> Option<&str> {
    match action {
        VmAction::Info { id }
        | VmAction::Pause { id }
        | VmAction::Resume { id }
        | VmAction::Stop { id }
        | VmAction::Rm { id }
        | VmAction::Wait { id, .. } => Some(id),
        _ => None,
    }
}

fn call(
    socket: &Path,
    method: &str,
    target: &str,
    body: Option<&Value>,
    timeout: Option<Duration>,
) -> Result<http::Response, String> {
    let bytes = body.map(|b| b.to_string().into_bytes());
    http::call(socket, method, target, bytes.as_deref(), timeout).map_err(|e| {
        match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => format!(
                "cannot reach a kvmerge serve at {} ({e}): is it running? (kvmerge serve --api-socket {})",
                socket.display(),
                socket.display()
            ),
            _ => format!("{} {target} on {}: {e}", method, socket.display()),
        }
    })
}

/// Paths absolute (the server has its own working directory).
fn absolute(p: &Path) -> Result<PathBuf, String> {
    std::path::absolute(p).map_err(|e| format!("{}: {e}", p.display()))
}

fn create_body(c: &CreateArgs) -> Result<Value, String> {
    let mut body = json!({ "kernel": absolute(&c.kernel)? });
    let obj = body.as_object_mut().expect("an object");
    if let Some(p) = &c.initrd {
        obj.insert("initrd".into(), json!(absolute(p)?));
    }
    if let Some(v) = &c.cmdline {
        obj.insert("cmdline".into(), json!(v));
    }
    if let Some(v) = c.memory {
        // Sizes in fleet files are strings with a unit (a bare number is MiB).
        obj.insert("memory".into(), json!(format!("{}K", v.div_ceil(1024))));
    }
    if let Some(v) = c.vcpus {
        obj.insert("vcpus".into(), json!(v));
    }
    if let Some(v) = c.count {
        obj.insert("count".into(), json!(v));
    }
    if let Some(v) = c.dedup {
        let name = match v {
            DedupMode::Full => "full",
            DedupMode::Zero => "zero",
            DedupMode::Off => "off",
        };
        obj.insert("dedup".into(), json!(name));
    }
    if let Some(v) = &c.group {
        obj.insert("group".into(), json!(v));
    }
    if let Some(v) = &c.name {
        obj.insert("name".into(), json!(v));
    }
    if let Some(p) = &c.console {
        obj.insert("console".into(), json!(absolute(p)?));
    }
    if let Some(v) = &c.ready {
        obj.insert("ready".into(), json!(v));
    }
    if let Some(t) = c.timeout {
        obj.insert("timeout".into(), json!(t.as_secs_f64()));
    }
    Ok(body)
}

fn wait_ready_all(socket: &Path, created: &Value) -> Result<Value, String> {
    let ids = created
        .get("ids")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut infos = Vec::with_capacity(ids.len());
    for id in ids.iter().filter_map(Value::as_str) {
        let r = call(
            socket,
            "GET",
            &format!("/v1/vms/{id}/wait?for=ready"),
            None,
            None,
        )?;
        infos.push(serde_json::from_slice::<Value>(&r.body).map_err(|e| e.to_string())?);
    }
    Ok(json!({ "id": created.get("id"), "ids": ids, "vms": infos }))
}

/// `wait`'s exit status: the guest's debug-exit code, 0 for another clean end, 1 otherwise.
fn exit_status(info: &Value) -> u8 {
    let exit = &info["exit"];
    match (exit["success"].as_bool(), exit["code"].as_u64()) {
        (_, Some(code)) => u8::try_from(code).unwrap_or(1),
        (Some(true), None) => 0,
        _ => 1,
    }
}

fn human(action: &VmAction, v: &Value) -> String {
    let id = v["id"].as_str().unwrap_or("?");
    match action {
        VmAction::Create(_) => v["ids"]
            .as_array()
            .map(|ids| {
                ids.iter()
                    .filter_map(Value::as_str)
                    .map(|s| format!("{s}\n"))
                    .collect()
            })
            .unwrap_or_default(),
        VmAction::List => {
            let mut out = format!(
                "{:<20} {:<8} {:>9} {:<5} {:>10} {:>10}  {}\n",
                "ID", "STATE", "MEMORY", "DEDUP", "RESIDENT", "SAVED", "EXIT"
            );
            for vm in v.as_array().into_iter().flatten() {
                out.push_str(&list_line(vm));
            }
            out
        }
        VmAction::Info { .. } => info_text(v),
        VmAction::Pause { .. } | VmAction::Resume { .. } => {
            format!("{id}: {}\n", v["state"].as_str().unwrap_or("?"))
        }
        VmAction::Stop { .. } | VmAction::Wait { .. } => {
            let reason = v["exit"]["reason"].as_str();
            match reason {
                Some(r) => format!("{id}: {r}\n"),
                None => format!("{id}: {}\n", v["state"].as_str().unwrap_or("?")),
            }
        }
        VmAction::Rm { .. } => format!("{id}: removed\n"),
        VmAction::Stats => format!(
            "{} VMs running, guest RAM {:.1} MiB, resident {:.1} MiB, saved {:.1} MiB (ksm {:.1}, zero {:.1}); ksmd {:.1}% CPU\n",
            v["vms_running"],
            f(&v["guest_ram_mib"]),
            f(&v["resident_mib"]),
            f(&v["saved_mib"]),
            f(&v["ksm_mib"]),
            f(&v["zero_mib"]),
            f(&v["ksmd_cpu_pct"])
        ),
        VmAction::Metrics => String::new(),
        VmAction::Shutdown => "the server has stopped every VM and restored the host\n".into(),
    }
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

fn list_line(vm: &Value) -> String {
    let mib = |v: &Value| format!("{:.1}M", f(v));
    let memory = f(&vm["config"]["memory_mib"]);
    let exit = vm["exit"]["reason"].as_str().unwrap_or("");
    format!(
        "{:<20} {:<8} {:>8.0}M {:<5} {:>10} {:>10}  {}\n",
        vm["id"].as_str().unwrap_or("?"),
        vm["state"].as_str().unwrap_or("?"),
        memory,
        vm["config"]["dedup"].as_str().unwrap_or("?"),
        mib(&vm["dedup"]["resident_mib"]),
        mib(&vm["dedup"]["saved_mib"]),
        exit
    )
}

fn info_text(v: &Value) -> String {
    let mut out = String::new();
    let mut line = |k: &str, val: String| out.push_str(&format!("{k:<10} {val}\n"));
    let c = &v["config"];
    line("id", v["id"].as_str().unwrap_or("?").into());
    line("state", v["state"].as_str().unwrap_or("?").into());
    line("kernel", c["kernel"].as_str().unwrap_or("").into());
    if let Some(i) = c["initrd"].as_str() {
        line("initrd", i.into());
    }
    line("cmdline", c["cmdline"].as_str().unwrap_or("").into());
    line(
        "memory",
        format!("{} MiB, {} vCPU(s)", f(&c["memory_mib"]), c["vcpus"]),
    );
    line(
        "dedup",
        format!(
            "{} (group {})",
            c["dedup"].as_str().unwrap_or("?"),
            c["group"].as_str().unwrap_or("?")
        ),
    );
    if let Some(ms) = v["started_ms"].as_f64() {
        line("started", format!("{ms:.1} ms after the create call"));
    }
    if let Some(ms) = v["ready_ms"].as_f64() {
        line("ready", format!("{ms:.1} ms after the create call"));
    }
    if let Some(r) = v["exit"]["reason"].as_str() {
        line("exit", r.into());
    }
    let d = &v["dedup"];
    if d.is_object() {
        line(
            "memory",
            format!(
                "resident {:.1} MiB, saved {:.1} MiB (ksm {:.1}, zero {:.1}, unique {:.1})",
                f(&d["resident_mib"]),
                f(&d["saved_mib"]),
                f(&d["ksm_mib"]),
                f(&d["zero_mib"]),
                f(&d["unique_mib"])
            ),
        );
    }
    out
}
