//! Host-KVM tier through the library: fleets built from a `Config` directly (heterogeneous guests
//! the command line cannot express yet) and the VM lifecycle.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use kvmerge::config::{Config, ConsoleMode, DedupMode, VmConfig};
use kvmerge::console::{ConsoleSink, Output};
use kvmerge::kvm::{Flavor, Host};
use kvmerge::loader::KernelImage;
use kvmerge::runner;
use kvmerge::vcpu::VmEnd;
use kvmerge::vm::{self, BootSources, Lifecycle, Vm, VmIo};
use vmm_sys_util::eventfd::EventFd;

fn payload_vm(cmdline: &str) -> VmConfig {
    VmConfig {
        kernel: payload(),
        initrd: None,
        cmdline: cmdline.to_string(),
        memory: 16 << 20,
        vcpus: 1,
        dedup: DedupMode::Full,
        group: kvmerge::config::DEFAULT_GROUP.into(),
    }
}

#[test]
fn one_crash_among_eight_ends_only_that_guest() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("crash");
    let mut vms: Vec<VmConfig> = (0..8).map(|_| payload_vm("fill=2 then=exit:0")).collect();
    vms[3] = payload_vm("fill=2 then=crash");
    let cfg = Config {
        console: ConsoleMode::Dir(dir.path().to_path_buf()),
        timeout: Some(Duration::from_secs(60)),
        ..Config::new(vms)
    };
    let report = runner::run(&cfg).expect("the run itself must succeed");
    assert_eq!(report.vms.len(), 8);
    for (i, vm) in report.vms.iter().enumerate() {
        let log = std::fs::read_to_string(dir.path().join(format!("vm{i}.log"))).unwrap();
        assert!(
            log.contains("PAYLOAD-FILLED"),
            "vm{i} ran to the end of its fill:\n{log}"
        );
        if i == 3 {
            assert_eq!(vm.end, VmEnd::TripleFault, "vm3: {vm:?}");
            assert_eq!(
                vm.failure_line().as_deref(),
                Some("vm3: crashed: triple fault")
            );
        } else {
            assert_eq!(vm.end, VmEnd::Exit(0), "vm{i}: {vm:?}\n{log}");
            assert!(vm.succeeded());
        }
    }
    assert!(!report.timed_out);
    assert_eq!(report.exit_code(), 1);
}

#[test]
fn lifecycle_transitions_are_checked() {
    if !kvm_available() {
        return;
    }
    let host = Host::open().unwrap();
    let kernel = KernelImage::open(&payload()).unwrap();
    let notify = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let sources = BootSources {
        kernel: &kernel,
        initrd: None,
    };
    let io = VmIo {
        console: ConsoleSink::new(Output::Discard, None),
        input_drained: notify.clone(),
        notify,
    };
    let vm = Vm::build(&host, 0, &payload_vm("then=idle"), &sources, io).unwrap();
    assert_eq!(vm.state(), Lifecycle::Created);
    assert!(matches!(
        vm.pause(),
        Err(vm::Error::Transition {
            action: "pause",
            state: Lifecycle::Created
        })
    ));
    vm.resume().unwrap();
    assert_eq!(vm.state(), Lifecycle::Running);
    assert!(matches!(vm.resume(), Err(vm::Error::Transition { .. })));
    // Pause and resume repeatedly while the guest idles: every command is acknowledged in time.
    for _ in 0..20 {
        let t = Instant::now();
        vm.pause().unwrap();
        assert!(t.elapsed() < vm::ACK_TIMEOUT);
        assert_eq!(vm.state(), Lifecycle::Paused);
        vm.resume().unwrap();
    }
    assert!(vm.outcome().is_none(), "an idle guest has not ended");

    // Another thread (the merge thread's role) pauses the VM around work of its own, repeatedly,
    // while this thread stops the VM: no command is lost and nothing hangs.
    let control = vm.control().clone();
    let (value, held) = control
        .with_paused(|| 42)
        .unwrap()
        .expect("a running VM pauses");
    assert_eq!(value, 42);
    assert!(held < vm::ACK_TIMEOUT, "paused for {held:?}");
    let pauser = std::thread::spawn(move || {
        let mut paused = 0;
        while let Ok(Some(_)) = control.with_paused(|| ()) {
            paused += 1;
        }
        paused
    });
    std::thread::sleep(Duration::from_millis(50));
    vm.request_stop();
    vm.finish_stop();
    assert_eq!(vm.state(), Lifecycle::Stopped);
    assert!(
        pauser.join().unwrap() > 0,
        "the pauser ran while the VM was running"
    );
    assert!(vm.control().with_paused(|| ()).unwrap().is_none());
    assert!(matches!(vm.resume(), Err(vm::Error::Transition { .. })));
}

/// CPU time of one of this process's threads, from /proc (schedstat, ns).
fn thread_cpu(tid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).unwrap();
    Duration::from_nanos(stat.split_whitespace().next().unwrap().parse().unwrap())
}

/// Waits (generously bounded) until the vCPU thread has run `more` CPU time past `from`.
fn wait_for_cpu(tid: i32, from: Duration, more: Duration) -> Duration {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = thread_cpu(tid);
        if now >= from + more {
            return now;
        }
        assert!(Instant::now() < deadline, "the vCPU did not run: {now:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn pause_holds_a_busy_guest_and_resume_lets_it_go_on() {
    if !kvm_available() {
        return;
    }
    let host = Host::open().unwrap();
    let kernel = KernelImage::open(&payload()).unwrap();
    let notify = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let sources = BootSources {
        kernel: &kernel,
        initrd: None,
    };
    let io = VmIo {
        console: ConsoleSink::new(Output::Discard, None),
        input_drained: notify.clone(),
        notify,
    };
    // Rewrites its memory without a pause: always inside the guest.
    let cfg = payload_vm("fill=4 then=churn:16383:0");
    let vm = Vm::build(&host, 0, &cfg, &sources, io).unwrap();
    vm.resume().unwrap();
    let tid = vm.vcpu_tids()[0];
    let mut cpu = wait_for_cpu(tid, Duration::ZERO, Duration::from_millis(20));
    for round in 0..5 {
        vm.pause().unwrap();
        assert_eq!(vm.state(), Lifecycle::Paused);
        // While paused the vCPU thread waits at the gate: it uses no CPU, and short holds are
        // refused (the VM is not running).
        let paused_at = thread_cpu(tid);
        assert!(vm.control().with_paused(|| ()).unwrap().is_none());
        std::thread::sleep(Duration::from_millis(100));
        let used = thread_cpu(tid) - paused_at;
        assert!(
            used < Duration::from_millis(5),
            "round {round}: the paused vCPU ran for {used:?}"
        );
        vm.resume().unwrap();
        cpu = wait_for_cpu(tid, cpu.max(paused_at), Duration::from_millis(10));
    }
    assert!(vm.outcome().is_none(), "the guest is still churning");
    // Stopping a paused VM does not wait for a timeout: Exit reaches the vCPU at the gate.
    vm.pause().unwrap();
    let t = Instant::now();
    vm.request_stop();
    vm.finish_stop();
    assert_eq!(vm.state(), Lifecycle::Stopped);
    assert!(t.elapsed() < vm::ACK_TIMEOUT, "stop took {:?}", t.elapsed());
}

#[test]
fn pvm_refuses_linux_kernels_plainly() {
    if !kvm_available() {
        return;
    }
    if Host::open().unwrap().flavor() != Flavor::Pvm {
        eprintln!("SKIPPED: /dev/kvm is hardware KVM here; Linux guests are allowed");
        return;
    }
    // The payload without its kvmerge note is, as far as kvmerge can tell, a Linux vmlinux.
    let dir = TempDir::new("pvm");
    let vmlinux = dir.path().join("vmlinux");
    let status = std::process::Command::new("objcopy")
        .args(["--remove-section", ".note.kvmerge"])
        .arg(payload())
        .arg(&vmlinux)
        .status()
        .unwrap();
    assert!(status.success());
    let mut cmd = kvmerge();
    cmd.args(["run", "--memory", "16M", "--kernel"])
        .arg(&vmlinux);
    let out = run_with_limit(cmd, Duration::from_secs(30));
    assert_eq!(out.code(), Some(2), "{}", out.dump());
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.dump());
    assert!(
        out.stderr
            .contains("kvm_pvm, which cannot run stock Linux kernels"),
        "{}",
        out.dump()
    );
    assert!(
        out.stderr.contains("scripts/kvm-lab"),
        "points to the lab\n{}",
        out.dump()
    );
}

#[test]
fn fleet_file_boots_heterogeneous_guests() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("fleet-file");
    let fleet = dir.path().join("fleet.toml");
    std::fs::write(
        &fleet,
        format!(
            "[defaults]\nkernel = {:?}\nmemory = \"16M\"\n\n\
             [[vm]]\ncount = 2\ncmdline = \"echo=a{{index}} then=exit:0\"\n\n\
             [[vm]]\nvcpus = 2\ncmdline = \"echo=b{{index}} then=exit:0\"\n\n\
             [[vm]]\ndedup = \"zero\"\ngroup = \"other\"\ncmdline = \"echo=c{{index}} then=exit:5\"\n",
            payload()
        ),
    )
    .unwrap();
    let mut cmd = kvmerge();
    cmd.args(["run", "--fleet"]).arg(&fleet);
    let out = run_with_limit(cmd, Duration::from_secs(60));
    assert_eq!(out.code(), Some(1), "vm3 exits 5\n{}", out.dump());
    for line in [
        "[vm0] PAYLOAD-ECHO a0",
        "[vm1] PAYLOAD-ECHO a1",
        "[vm2] PAYLOAD-READY cpus=2",
        "[vm2] PAYLOAD-ECHO b2",
        "[vm3] PAYLOAD-ECHO c3",
    ] {
        assert!(
            out.stdout.lines().any(|l| l == line),
            "missing {line:?}\n{}",
            out.dump()
        );
    }
    // Without the line a kvmerge prints when another one (a test beside this one) steers KSM.
    let stderr: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.contains("steers host KSM"))
        .collect();
    assert_eq!(
        stderr.join("\n"),
        "kvmerge: vm3: exited with code 5",
        "{}",
        out.dump()
    );

    // Two trust groups may not both use KSM.
    std::fs::write(
        &fleet,
        format!(
            "[defaults]\nkernel = {:?}\nmemory = \"16M\"\n[[vm]]\ngroup = \"a\"\n[[vm]]\ngroup = \"b\"\n",
            payload()
        ),
    )
    .unwrap();
    let mut cmd = kvmerge();
    cmd.args(["run", "--fleet"]).arg(&fleet);
    let out = run_with_limit(cmd, Duration::from_secs(60));
    assert_eq!(out.code(), Some(2), "{}", out.dump());
    assert!(
        out.stderr.contains("one KSM pool per host"),
        "{}",
        out.dump()
    );
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.dump());
}
