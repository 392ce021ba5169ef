//! The CRI server end to end on the VM backend: hypervisor `qemu` under TCG
//! (this machine's KVM cannot boot a stock guest), vsock through
//! `vhost-device-vsock`, the demo image as a virtio-blk disk. One pod VM
//! carries the whole scenario, including a daemon kill -9 and re-adoption,
//! because every boot costs seconds under TCG.

use std::time::Duration;

use k8s_cri::v1::*;
use tonic::Code;
use vmpod::hypervisor::qemu::VhostVsock;
use vmpod_tests::cri::*;
use vmpod_tests::require_program;

async fn run_vm_pod(cri: &mut Cri, config: PodSandboxConfig) -> String {
    cri.run_pod_sandbox(RunPodSandboxRequest {
        config: Some(config),
        runtime_handler: "vm".into(),
    })
    .await
    .unwrap_or_else(|s| panic!("RunPodSandbox on the vm handler: {s:?}"))
    .into_inner()
    .pod_sandbox_id
}

#[tokio::test(flavor = "multi_thread")]
async fn vm_pod_lifecycle_logs_exec_and_restart() {
    require_program("qemu-system-x86_64", "qemu-system-x86");
    assert!(
        VhostVsock::binary().is_file(),
        "vhost-device-vsock is not installed: `cargo install vhost-device-vsock --locked` (scripts/install-deps does)"
    );
    let mut d = Daemon::start("");
    let mut cri = d.client().await;
    let pod = run_vm_pod(&mut cri, pod_config(&d, "vmweb", &[])).await;
    let st = cri
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: true,
        })
        .await
        .expect("PodSandboxStatus")
        .into_inner();
    assert_eq!(
        st.status.as_ref().map(|s| s.state),
        Some(PodSandboxState::SandboxReady as i32)
    );
    assert!(
        st.info["info"].contains("\"backend\":\"vm\""),
        "{:?}",
        st.info
    );

    let c = create(
        &mut cri,
        &pod,
        container_config(
            "main",
            &["sh", "-c"],
            &["echo hello; echo oops >&2; hostname; uname -r; while :; do sleep 1; done"],
        ),
    )
    .await;
    start(&mut cri, &c).await;
    let log = d.log_root().join("vmweb/main/0.log");
    let lines = log_lines(&log, 4).await;
    let msgs: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| {
            let (_, stream, _, msg) = parse_record(l);
            (stream, msg)
        })
        .collect();
    assert!(msgs.contains(&("stdout", "hello")), "{lines:?}");
    assert!(msgs.contains(&("stderr", "oops")), "{lines:?}");
    assert!(msgs.contains(&("stdout", "vmweb-host")), "{lines:?}");
    // The container runs on the guest kernel, not the host's.
    let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    assert!(
        !msgs.contains(&("stdout", host_release.trim())),
        "the container must see the guest kernel: {lines:?}"
    );

    let r = exec(&mut cri, &c, &["sh", "-c", "echo in-vm; exit 5"], 30)
        .await
        .expect("ExecSync");
    assert_eq!((r.exit_code, r.stdout.as_slice()), (5, &b"in-vm\n"[..]));
    assert_eq!(
        exec(&mut cri, &c, &["sleep", "60"], 2)
            .await
            .expect_err("must time out")
            .code(),
        Code::DeadlineExceeded
    );

    // Mounts need virtio-fs in a VM: refused, not ignored.
    let mut with_mount = container_config("vol", &["true"], &[]);
    with_mount.mounts.push(Mount {
        container_path: "/data".into(),
        host_path: d.dir.path().display().to_string(),
        ..Default::default()
    });
    assert_eq!(
        code(
            cri.create_container(CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(with_mount),
                sandbox_config: None,
            })
            .await
        ),
        Code::Unimplemented
    );

    // The daemon dies; the VM does not, and the new daemon adopts it.
    d.kill9_and_restart();
    let mut cri = d.client().await;
    assert_eq!(
        status(&mut cri, &c).await.state,
        ContainerState::ContainerRunning as i32
    );
    let r = exec(&mut cri, &c, &["echo", "adopted"], 30)
        .await
        .expect("ExecSync after restart");
    assert_eq!(r.stdout, b"adopted\n");

    cri.stop_container(StopContainerRequest {
        container_id: c.clone(),
        timeout: 1,
    })
    .await
    .expect("StopContainer");
    // The shell dies of the SIGTERM (the host suite covers the escalation
    // to SIGKILL).
    let s = wait_exited(&mut cri, &c).await;
    assert_eq!(s.exit_code, 143, "{s:?}");
    // A new container in the same VM after the first one exited.
    let c2 = create(
        &mut cri,
        &pod,
        container_config("second", &["sleep", "1000"], &[]),
    )
    .await;
    start(&mut cri, &c2).await;
    let r = exec(&mut cri, &c2, &["true"], 30)
        .await
        .expect("exec in c2");
    assert_eq!(r.exit_code, 0);

    stop_remove_pod(&mut cri, &pod).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_no_leaks(&d, &[pod]);
}

#[tokio::test(flavor = "multi_thread")]
async fn vmpod_run_in_a_vm() {
    require_program("qemu-system-x86_64", "qemu-system-x86");
    let d = Daemon::start("");
    let out = tokio::process::Command::new(vmpod_binary())
        .arg("run")
        .arg("--socket")
        .arg(&d.socket)
        .arg("--log-root")
        .arg(d.log_root())
        .arg("--runtime-handler")
        .arg("vm")
        .arg("--timeout")
        .arg("120")
        .arg(BUSYBOX)
        .args(["--", "sh", "-c", "echo from-the-guest; exit 2"])
        .output()
        .await
        .expect("running vmpod run");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(out.stdout, b"from-the-guest\n");
    assert_no_leaks(&d, &[]);
}
