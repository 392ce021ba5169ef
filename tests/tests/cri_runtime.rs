//! The CRI server end to end, every scenario on both sandbox backends: the
//! host backend (the agent as a host process in fresh namespaces) and the VM
//! backend (hypervisor `qemu` under TCG, the agent as PID 1 of a real Linux
//! guest, vsock through `vhost-device-vsock`). A real `vmpod serve`, the
//! demo busybox image, driven with the `k8s-cri` client as the kubelet
//! would. Needs root (namespaces, loop devices, cgroups) and, for `vm`,
//! QEMU and vhost-device-vsock.

use std::collections::HashMap;
use std::time::Duration;

use k8s_cri::v1::*;
use tonic::Code;
use vmpod_tests::cri::*;

vmpod_tests::on_both_backends!(
    a_killed_log_pump_is_replaced_and_the_log_goes_on,
    pod_and_container_lifecycle_with_logs_and_exec,
    exit_codes_reasons_oom_and_containers_after_exit,
    filters_and_events,
    error_codes,
    host_network_only_where_allowed,
    restart_readopts_running_pods,
    long_lines_are_split_into_partial_records,
    twenty_pods_at_once,
    create_remove_cycles_leak_nothing,
    graceful_shutdown_leaves_pods_running,
    vmpod_run_prints_output_and_exit_code,
    a_dead_sandbox_makes_the_pod_notready_and_stop_cleans_up,
    a_chatty_container_survives_a_restart_and_keeps_logging,
    security_contexts_are_honoured_or_refused,
    host_pid_and_ipc_where_allowed,
    the_kubelets_cgroup_parent_holds_the_pod,
    writable_layers_live_on_disk,
);

async fn pod_and_container_lifecycle_with_logs_and_exec(b: Backend) {
    let d = Daemon::on(b, "");
    let mut cri = d.client().await;
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&d.socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o660,
        "the CRI socket is for root and the kubelet's group"
    );

    let version = cri
        .version(VersionRequest::default())
        .await
        .expect("Version")
        .into_inner();
    assert_eq!(
        (
            version.runtime_name.as_str(),
            version.runtime_api_version.as_str()
        ),
        ("vmpod", "v1")
    );
    let st = cri
        .status(StatusRequest::default())
        .await
        .expect("Status")
        .into_inner();
    let conditions = st.status.expect("status").conditions;
    assert!(conditions.iter().all(|c| c.status), "{conditions:?}");

    let pod = run_pod(&mut cri, pod_config(&d, "web", &[])).await;
    let pst = cri
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: true,
        })
        .await
        .expect("PodSandboxStatus")
        .into_inner();
    let s = pst.status.expect("status");
    assert_eq!(s.state, PodSandboxState::SandboxReady as i32);
    assert!(s.created_at > 0);
    assert_eq!(s.metadata.expect("metadata").name, "web");
    let ns = s
        .linux
        .and_then(|l| l.namespaces)
        .and_then(|n| n.options)
        .expect("namespaces");
    assert_eq!(ns.network, NamespaceMode::Pod as i32);
    let verbose = &pst.info["info"];
    match b {
        Backend::Host => assert!(verbose.contains("\"netns\":\"/"), "{verbose}"),
        Backend::Vm => assert!(verbose.contains("\"kind\":\"qemu\""), "{verbose}"),
    }

    // The image's cmd is `sh`; the request's command replaces it.
    let c = create(
        &mut cri,
        &pod,
        container_config(
            "main",
            &["sh", "-c"],
            &["trap '' TERM; echo hello; echo oops >&2; hostname; cat /etc/resolv.conf; while :; do sleep 1; done"],
        ),
    )
    .await;
    assert_eq!(
        status(&mut cri, &c).await.state,
        ContainerState::ContainerCreated as i32
    );
    start(&mut cri, &c).await;
    let st = status(&mut cri, &c).await;
    assert_eq!(st.state, ContainerState::ContainerRunning as i32);
    assert!(st.started_at >= st.created_at && st.created_at > 0);
    assert_eq!(st.image.as_ref().map(|i| i.image.as_str()), Some(BUSYBOX));
    let log = d.log_root().join("web/main/0.log");
    assert_eq!(st.log_path, log.display().to_string());

    // hello, oops, the hostname and three resolv.conf lines.
    let lines = log_lines(&log, 6).await;
    let mut saw = HashMap::new();
    for line in &lines {
        let (ts, stream, tag, msg) = parse_record(line);
        assert!(
            ts.ends_with('Z') && ts.contains('T') && ts.contains('.'),
            "{line}"
        );
        assert_eq!(tag, "F", "{line}");
        saw.insert(msg.to_string(), stream.to_string());
    }
    assert_eq!(
        saw.get("hello").map(String::as_str),
        Some("stdout"),
        "{lines:?}"
    );
    assert_eq!(
        saw.get("oops").map(String::as_str),
        Some("stderr"),
        "{lines:?}"
    );
    let lines = log_lines(&log, 5).await;
    assert!(
        lines.iter().any(|l| l.ends_with(" web-host")),
        "hostname from the pod: {lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.ends_with("nameserver 10.0.0.53")),
        "DNS from the pod: {lines:?}"
    );

    let r = exec(
        &mut cri,
        &c,
        &["sh", "-c", "echo out; echo err >&2; exit 7"],
        10,
    )
    .await
    .expect("ExecSync");
    assert_eq!(
        (r.exit_code, r.stdout.as_slice(), r.stderr.as_slice()),
        (7, &b"out\n"[..], &b"err\n"[..])
    );
    // The container's env reaches execs (PATH from the image).
    let r = exec(&mut cri, &c, &["sh", "-c", "echo $PATH"], 10)
        .await
        .expect("ExecSync");
    assert!(String::from_utf8_lossy(&r.stdout).contains("/bin"), "{r:?}");
    let timed_out = exec(&mut cri, &c, &["sleep", "30"], 1).await;
    assert_eq!(
        timed_out.expect_err("must time out").code(),
        Code::DeadlineExceeded
    );

    let stats = cri
        .container_stats(ContainerStatsRequest {
            container_id: c.clone(),
        })
        .await
        .expect("ContainerStats")
        .into_inner()
        .stats
        .expect("stats");
    let container_ws = stats
        .memory
        .and_then(|m| m.working_set_bytes)
        .map(|v| v.value)
        .unwrap_or(0);
    assert!(container_ws > 0);
    let pod_stats = cri
        .pod_sandbox_stats(PodSandboxStatsRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .expect("PodSandboxStats")
        .into_inner()
        .stats
        .and_then(|s| s.linux)
        .expect("linux pod stats");
    assert_eq!(pod_stats.containers.len(), 1);
    // The pod's figures are its cgroup on the node: its container and
    // more (the agent, the log pump; a VM pod's whole VM).
    let pod_ws = pod_stats
        .memory
        .and_then(|m| m.working_set_bytes)
        .map(|v| v.value)
        .unwrap_or(0);
    assert!(
        pod_ws >= container_ws,
        "pod {pod_ws} < container {container_ws}"
    );
    if b == Backend::Vm {
        assert!(
            pod_ws >= 32 << 20,
            "a VM pod's memory is its VM's, not {pod_ws} bytes"
        );
    }
    assert!(
        pod_stats
            .cpu
            .and_then(|c| c.usage_core_nano_seconds)
            .is_some_and(|v| v.value > 0)
    );
    let listed = cri
        .list_container_stats(ListContainerStatsRequest::default())
        .await
        .expect("ListContainerStats")
        .into_inner()
        .stats;
    assert_eq!(listed.len(), 1);
    let listed = cri
        .list_pod_sandbox_stats(ListPodSandboxStatsRequest::default())
        .await
        .expect("ListPodSandboxStats")
        .into_inner()
        .stats;
    assert_eq!(listed.len(), 1);
    cri.update_container_resources(UpdateContainerResourcesRequest {
        container_id: c.clone(),
        linux: Some(LinuxContainerResources {
            memory_limit_in_bytes: 64 << 20,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .expect("UpdateContainerResources");

    // Rotation: move the file away, reopen, new output lands in a new file.
    let rotated = log.with_extension("log.1");
    std::fs::rename(&log, &rotated).expect("rotate");
    cri.reopen_container_log(ReopenContainerLogRequest {
        container_id: c.clone(),
    })
    .await
    .expect("ReopenContainerLog");
    assert!(log.exists(), "ReopenContainerLog recreates the file");

    // The shell ignores SIGTERM: the timeout ends in SIGKILL.
    cri.stop_container(StopContainerRequest {
        container_id: c.clone(),
        timeout: 1,
    })
    .await
    .expect("StopContainer");
    let st = wait_exited(&mut cri, &c).await;
    assert_eq!((st.exit_code, st.reason.as_str()), (137, "Error"));
    assert!(st.finished_at >= st.started_at);
    cri.stop_container(StopContainerRequest {
        container_id: c.clone(),
        timeout: 1,
    })
    .await
    .expect("StopContainer is idempotent");

    cri.remove_container(RemoveContainerRequest {
        container_id: c.clone(),
    })
    .await
    .expect("RemoveContainer");
    cri.remove_container(RemoveContainerRequest {
        container_id: c.clone(),
    })
    .await
    .expect("RemoveContainer is idempotent");
    assert_eq!(
        cri.container_status(ContainerStatusRequest {
            container_id: c.clone(),
            verbose: false
        })
        .await
        .expect_err("gone")
        .code(),
        Code::NotFound
    );

    stop_remove_pod(&mut cri, &pod).await;
    stop_remove_pod(&mut cri, &pod).await; // idempotent
    let items = cri
        .list_pod_sandbox(ListPodSandboxRequest::default())
        .await
        .expect("ListPodSandbox")
        .into_inner()
        .items;
    assert!(items.is_empty(), "{items:?}");
    assert_no_leaks(&d, &[pod]);
}

async fn exit_codes_reasons_oom_and_containers_after_exit(b: Backend) {
    let d = Daemon::on(b, "");
    let mut cri = d.client().await;
    let pod = run_pod(&mut cri, pod_config(&d, "jobs", &[])).await;

    let ok = create(&mut cri, &pod, container_config("ok", &["true"], &[])).await;
    let bad = create(
        &mut cri,
        &pod,
        container_config("bad", &["sh", "-c", "exit 3"], &[]),
    )
    .await;
    start(&mut cri, &ok).await;
    start(&mut cri, &bad).await;
    let s = wait_exited(&mut cri, &ok).await;
    assert_eq!((s.exit_code, s.reason.as_str()), (0, "Completed"));
    let s = wait_exited(&mut cri, &bad).await;
    assert_eq!((s.exit_code, s.reason.as_str()), (3, "Error"));
    assert_eq!(
        cri.start_container(StartContainerRequest {
            container_id: bad.clone()
        })
        .await
        .expect_err("an exited container cannot start again")
        .code(),
        Code::FailedPrecondition
    );

    let mut hog = container_config("hog", &["tail", "-c", "150000000", "/dev/zero"], &[]);
    hog.linux = Some(LinuxContainerConfig {
        resources: Some(LinuxContainerResources {
            memory_limit_in_bytes: 16 << 20,
            ..Default::default()
        }),
        ..Default::default()
    });
    let hog = run_container(&mut cri, &pod, hog).await;
    let s = wait_exited(&mut cri, &hog).await;
    assert_eq!((s.exit_code, s.reason.as_str()), (137, "OOMKilled"));

    // After others exited and one was removed, a new container still runs
    // in the same pod, next to a second one.
    cri.remove_container(RemoveContainerRequest {
        container_id: ok.clone(),
    })
    .await
    .expect("remove");
    let a = create(
        &mut cri,
        &pod,
        container_config("a", &["sleep", "1000"], &[]),
    )
    .await;
    let b = create(
        &mut cri,
        &pod,
        container_config("b", &["sleep", "1000"], &[]),
    )
    .await;
    start(&mut cri, &a).await;
    start(&mut cri, &b).await;
    // Both share the pod's network namespace, each its own PID namespace.
    let ra = exec(&mut cri, &a, &["readlink", "/proc/self/ns/net"], 10)
        .await
        .expect("exec a");
    let rb = exec(&mut cri, &b, &["readlink", "/proc/self/ns/net"], 10)
        .await
        .expect("exec b");
    assert_eq!(ra.stdout, rb.stdout);
    assert!(!ra.stdout.is_empty());

    // Removing the pod removes its containers, running ones included.
    stop_remove_pod(&mut cri, &pod).await;
    let left = cri
        .list_containers(ListContainersRequest::default())
        .await
        .expect("ListContainers")
        .into_inner()
        .containers;
    assert!(left.is_empty(), "{left:?}");
    assert_no_leaks(&d, &[pod]);
}

async fn filters_and_events(b: Backend) {
    let d = Daemon::on(b, "");
    let mut cri = d.client().await;
    let mut events = cri
        .get_container_events(GetEventsRequest::default())
        .await
        .expect("GetContainerEvents")
        .into_inner();

    let p1 = run_pod(&mut cri, pod_config(&d, "one", &[("tier", "front")])).await;
    let p2 = run_pod(&mut cri, pod_config(&d, "two", &[("tier", "back")])).await;
    let c1 = create(
        &mut cri,
        &p1,
        container_config("x", &["sleep", "1000"], &[]),
    )
    .await;
    let c2 = create(
        &mut cri,
        &p2,
        container_config("y", &["sleep", "1000"], &[]),
    )
    .await;
    start(&mut cri, &c1).await;

    let ev = tokio::time::timeout(Duration::from_secs(10), events.message())
        .await
        .expect("an event in time")
        .expect("event stream")
        .expect("an event");
    assert_eq!(
        (ev.container_id.as_str(), ev.container_event_type),
        (
            c1.as_str(),
            ContainerEventType::ContainerCreatedEvent as i32
        )
    );

    let lister = cri.clone();
    let pods = |f: PodSandboxFilter| {
        let mut cri = lister.clone();
        async move {
            cri.list_pod_sandbox(ListPodSandboxRequest { filter: Some(f) })
                .await
                .expect("ListPodSandbox")
                .into_inner()
                .items
                .into_iter()
                .map(|p| p.id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        pods(PodSandboxFilter {
            label_selector: [("tier".to_string(), "back".to_string())].into(),
            ..Default::default()
        })
        .await,
        vec![p2.clone()]
    );
    assert_eq!(
        pods(PodSandboxFilter {
            id: p1[..12].to_string(),
            ..Default::default()
        })
        .await,
        vec![p1.clone()]
    );

    let containers = |f: ContainerFilter| {
        let mut cri = lister.clone();
        async move {
            cri.list_containers(ListContainersRequest { filter: Some(f) })
                .await
                .expect("ListContainers")
                .into_inner()
                .containers
                .into_iter()
                .map(|c| c.id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        containers(ContainerFilter {
            pod_sandbox_id: p2.clone(),
            ..Default::default()
        })
        .await,
        vec![c2.clone()]
    );
    assert_eq!(
        containers(ContainerFilter {
            state: Some(ContainerStateValue {
                state: ContainerState::ContainerRunning as i32
            }),
            ..Default::default()
        })
        .await,
        vec![c1.clone()]
    );
    assert_eq!(
        containers(ContainerFilter {
            label_selector: [("app".to_string(), "y".to_string())].into(),
            ..Default::default()
        })
        .await,
        vec![c2.clone()]
    );
    assert_eq!(
        containers(ContainerFilter {
            id: c1.clone(),
            ..Default::default()
        })
        .await,
        vec![c1.clone()]
    );

    cri.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: p1.clone(),
    })
    .await
    .expect("stop");
    assert_eq!(
        pods(PodSandboxFilter {
            state: Some(PodSandboxStateValue {
                state: PodSandboxState::SandboxNotready as i32
            }),
            ..Default::default()
        })
        .await,
        vec![p1.clone()]
    );
    // The running container of a stopped pod is exited.
    assert_eq!(
        status(&mut cri, &c1).await.state,
        ContainerState::ContainerExited as i32
    );
    stop_remove_pod(&mut cri, &p1).await;
    stop_remove_pod(&mut cri, &p2).await;
    assert_no_leaks(&d, &[p1, p2]);
}

async fn error_codes(b: Backend) {
    let d = Daemon::on(b, "");
    let mut cri = d.client().await;

    assert_eq!(
        code(cri.run_pod_sandbox(RunPodSandboxRequest::default()).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            cri.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(pod_config(&d, "h", &[])),
                runtime_handler: "nope".into()
            })
            .await
        ),
        Code::NotFound
    );
    // Isolation is never downgraded: host network needs the config's consent.
    let mut hostnet = pod_config(&d, "hostnet", &[]);
    hostnet.linux = Some(LinuxPodSandboxConfig {
        security_context: Some(LinuxSandboxSecurityContext {
            namespace_options: Some(NamespaceOption {
                network: NamespaceMode::Node as i32,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    assert_eq!(
        code(
            cri.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(hostnet.clone()),
                runtime_handler: String::new()
            })
            .await
        ),
        Code::FailedPrecondition
    );
    let mut privileged = pod_config(&d, "priv", &[]);
    privileged.linux = Some(LinuxPodSandboxConfig {
        security_context: Some(LinuxSandboxSecurityContext {
            privileged: true,
            ..Default::default()
        }),
        ..Default::default()
    });
    // Privileged host pods need the config's consent too; a privileged VM
    // pod is privileged inside its guest only (cri_conformance.rs).
    if b == Backend::Host {
        assert_eq!(
            code(
                cri.run_pod_sandbox(RunPodSandboxRequest {
                    config: Some(privileged),
                    runtime_handler: String::new()
                })
                .await
            ),
            Code::FailedPrecondition
        );
    }
    // A VM bigger than the handler allows is refused before anything starts.
    let mut huge = pod_config(&d, "v", &[]);
    huge.linux = Some(LinuxPodSandboxConfig {
        resources: Some(LinuxContainerResources {
            cpu_quota: 1000 * 100_000,
            cpu_period: 100_000,
            ..Default::default()
        }),
        ..Default::default()
    });
    assert_eq!(
        code(
            cri.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(huge),
                runtime_handler: "vmpod".into()
            })
            .await
        ),
        Code::InvalidArgument
    );

    assert_eq!(
        code(
            cri.container_status(ContainerStatusRequest {
                container_id: "f00".into(),
                verbose: false
            })
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            cri.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: "f00".into(),
                verbose: false
            })
            .await
        ),
        Code::NotFound
    );
    cri.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: "f00".into(),
    })
    .await
    .expect("stopping an unknown pod is fine");
    cri.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: "f00".into(),
    })
    .await
    .expect("removing an unknown pod is fine");

    let pod = run_pod(&mut cri, pod_config(&d, "errs", &[])).await;
    assert_eq!(
        code(
            cri.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(pod_config(&d, "errs", &[])),
                runtime_handler: String::new()
            })
            .await
        ),
        Code::AlreadyExists
    );
    let mut missing_image = container_config("m", &["true"], &[]);
    missing_image.image = Some(ImageSpec {
        image: "localhost/none:1".into(),
        ..Default::default()
    });
    assert_eq!(
        code(
            cri.create_container(CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(missing_image),
                sandbox_config: None
            })
            .await
        ),
        Code::NotFound
    );
    let mut escape = container_config("e", &["true"], &[]);
    escape.log_path = "../../etc/x.log".into();
    assert_eq!(
        code(
            cri.create_container(CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(escape),
                sandbox_config: None
            })
            .await
        ),
        Code::InvalidArgument
    );
    let c = create(&mut cri, &pod, container_config("dup", &["true"], &[])).await;
    assert_eq!(
        code(
            cri.create_container(CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(container_config("dup", &["true"], &[])),
                sandbox_config: None
            })
            .await
        ),
        Code::AlreadyExists
    );
    assert_eq!(
        code(
            cri.exec_sync(ExecSyncRequest {
                container_id: c.clone(),
                cmd: vec!["true".into()],
                timeout: 5
            })
            .await
        ),
        Code::FailedPrecondition,
        "exec in a container that is not running"
    );
    assert_eq!(
        code(
            cri.exec(ExecRequest {
                container_id: c.clone(),
                cmd: vec!["sh".into()],
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument,
        "an exec with none of stdin, stdout and stderr"
    );
    assert_eq!(
        code(
            cri.exec(ExecRequest {
                container_id: c.clone(),
                cmd: vec!["sh".into()],
                stdout: true,
                ..Default::default()
            })
            .await
        ),
        Code::FailedPrecondition,
        "an exec in a container that is not running"
    );
    cri.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .expect("stop");
    assert_eq!(
        code(
            cri.create_container(CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(container_config("late", &["true"], &[])),
                sandbox_config: None
            })
            .await
        ),
        Code::FailedPrecondition,
        "no new containers in a stopped pod"
    );
    stop_remove_pod(&mut cri, &pod).await;
    assert_no_leaks(&d, &[pod]);
}

/// The config allows host network to host sandboxes only: a VM pod that
/// asks for it is refused, never silently given its own network.
async fn host_network_only_where_allowed(b: Backend) {
    let d = Daemon::on(b, "[host]\nallow_host_network = true\n");
    let mut cri = d.client().await;
    let config = pod_with_namespaces(
        &d,
        "hostnet",
        NamespaceOption {
            network: NamespaceMode::Node as i32,
            ..Default::default()
        },
    );
    if b == Backend::Vm {
        return assert_refused_on_vm(&d, &mut cri, config).await;
    }
    let pod = run_pod(&mut cri, config).await;
    let c = run_container(
        &mut cri,
        &pod,
        container_config("n", &["sleep", "1000"], &[]),
    )
    .await;
    let r = exec(&mut cri, &c, &["readlink", "/proc/self/ns/net"], 10)
        .await
        .expect("exec");
    let host = std::fs::read_link("/proc/self/ns/net").expect("our netns");
    assert_eq!(
        String::from_utf8_lossy(&r.stdout).trim(),
        host.display().to_string()
    );
    stop_remove_pod(&mut cri, &pod).await;
    assert_no_leaks(&d, &[pod]);
}

async fn restart_readopts_running_pods(b: Backend) {
    let mut d = Daemon::on(b, "");
    let mut cri = d.client().await;
    let pod = run_pod(&mut cri, pod_config(&d, "survivor", &[("keep", "yes")])).await;
    let c = run_container(
        &mut cri,
        &pod,
        container_config("s", &["sleep", "1000"], &[]),
    )
    .await;
    let done = run_container(
        &mut cri,
        &pod,
        container_config("d", &["sh", "-c", "exit 4"], &[]),
    )
    .await;
    wait_exited(&mut cri, &done).await;

    d.kill9_and_restart();
    let mut cri = d.client().await;
    let items = cri
        .list_pod_sandbox(ListPodSandboxRequest::default())
        .await
        .expect("ListPodSandbox")
        .into_inner()
        .items;
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(
        (items[0].id.as_str(), items[0].state),
        (pod.as_str(), PodSandboxState::SandboxReady as i32)
    );
    assert_eq!(
        status(&mut cri, &c).await.state,
        ContainerState::ContainerRunning as i32
    );
    let s = status(&mut cri, &done).await;
    assert_eq!(
        (s.state, s.exit_code),
        (ContainerState::ContainerExited as i32, 4)
    );
    let r = exec(&mut cri, &c, &["echo", "still here"], 10)
        .await
        .expect("ExecSync after restart");
    assert_eq!(r.stdout, b"still here\n");

    // The adopted container's exit is still noticed.
    cri.stop_container(StopContainerRequest {
        container_id: c.clone(),
        timeout: 0,
    })
    .await
    .expect("StopContainer");
    assert_eq!(wait_exited(&mut cri, &c).await.exit_code, 137);
    stop_remove_pod(&mut cri, &pod).await;
    assert_no_leaks(&d, &[pod]);
}

async fn long_lines_are_split_into_partial_records(b: Backend) {
    let d = Daemon::on(b, "");
    let mut cri = d.client().await;
    let pod = run_pod(&mut cri, pod_config(&d, "long", &[])).await;
    // 40000 'a's then a newline: P (16384) + P (16384) + F (7232).
    let c = create(
        &mut cri,
        &pod,
        container_config(
            "l",
            &["sh", "-c", "head -c 40000 /dev/zero | tr '\\0' a; echo"],
            &[],
        ),
    )
    .await;
    start(&mut cri, &c).await;
    wait_exited(&mut cri, &c).await;
    let lines = log_lines(&d.log_root().join("long/l/0.log"), 3).await;
    let parsed: Vec<(&str, usize)> = lines
        .iter()
        .map(|l| {
            let (_, _, tag, msg) = parse_record(l);
            (tag, msg.len())
        })
        .collect();
    assert_eq!(
        parsed,
        [("P", 16384), ("P", 16384), ("F", 40000 - 2 * 16384)]
    );
    stop_remove_pod(&mut cri, &pod).await;
    assert_no_leaks(&d, &[pod]);
}

async fn twenty_pods_at_once(b: Backend) {
    let d = Daemon::on(b, "");
    let cri = d.client().await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut cri = cri.clone();
        let config = pod_config(&d, &format!("many{i}"), &[]);
        tasks.push(tokio::spawn(async move {
            let pod = run_pod(&mut cri, config).await;
            let c = run_container(
                &mut cri,
                &pod,
                container_config("c", &["sleep", "1000"], &[]),
            )
            .await;
            let r = exec(&mut cri, &c, &["hostname"], 30).await.expect("exec");
            (pod, String::from_utf8_lossy(&r.stdout).trim().to_string())
        }));
    }
    let mut pods = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let (pod, hostname) = t.await.expect("task");
        assert_eq!(
            hostname,
            format!("many{i}-host"),
            "each pod has its own UTS namespace"
        );
        pods.push(pod);
    }
    let mut cri = d.client().await;
    let listed = cri
        .list_pod_sandbox(ListPodSandboxRequest::default())
        .await
        .expect("list")
        .into_inner()
        .items;
    assert_eq!(listed.len(), 20);
    let mut removals = Vec::new();
    for pod in &pods {
        let mut cri = cri.clone();
        let pod = pod.clone();
        removals.push(tokio::spawn(async move {
            stop_remove_pod(&mut cri, &pod).await
        }));
    }
    for r in removals {
        r.await.expect("removal");
    }
    assert_no_leaks(&d, &pods);
}

/// Open fds of a process.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

async fn create_remove_cycles_leak_nothing(b: Backend) {
    let d = Daemon::on(b, "");
    let mut cri = d.client().await;
    let mut pods = Vec::new();
    let cycle = |i: usize| {
        let mut cri = cri.clone();
        let config = pod_config(&d, &format!("cycle{i}"), &[]);
        async move {
            let pod = run_pod(&mut cri, config).await;
            let c = run_container(&mut cri, &pod, container_config("c", &["echo", "x"], &[])).await;
            wait_exited(&mut cri, &c).await;
            cri.remove_container(RemoveContainerRequest { container_id: c })
                .await
                .expect("remove");
            stop_remove_pod(&mut cri, &pod).await;
            pod
        }
    };
    for i in 0..5 {
        pods.push(cycle(i).await);
    }
    let fds = fd_count(d.pid());
    for i in 5..200 {
        pods.push(cycle(i).await);
    }
    let after = fd_count(d.pid());
    // A few fds come and go with gRPC connections; a leak grows with the
    // 195 cycles.
    assert!(
        after <= fds + 4,
        "the daemon's fds grew from {fds} to {after}"
    );
    assert_no_leaks(&d, &pods);
    let items = cri
        .list_pod_sandbox(ListPodSandboxRequest::default())
        .await
        .expect("list")
        .into_inner()
        .items;
    assert!(items.is_empty());
}

async fn graceful_shutdown_leaves_pods_running(b: Backend) {
    let mut d = Daemon::on(b, "");
    let mut cri = d.client().await;
    let pod = run_pod(&mut cri, pod_config(&d, "calm", &[])).await;
    let c = run_container(
        &mut cri,
        &pod,
        container_config("c", &["sleep", "1000"], &[]),
    )
    .await;
    d.terminate_and_restart();
    let mut cri = d.client().await;
    let r = exec(&mut cri, &c, &["echo", "alive"], 10)
        .await
        .expect("exec after SIGTERM restart");
    assert_eq!(r.stdout, b"alive\n");
    stop_remove_pod(&mut cri, &pod).await;
    assert_no_leaks(&d, &[pod]);
}

async fn vmpod_run_prints_output_and_exit_code(b: Backend) {
    let d = Daemon::on(b, "");
    let out = d
        .vmpod_run(
            b.handler(),
            120,
            BUSYBOX,
            &["sh", "-c", "echo hi; echo err >&2; exit 3"],
        )
        .await;
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(out.stdout, b"hi\n");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("err"),
        "{out:?}"
    );
    let mut cri = d.client().await;
    let items = cri
        .list_pod_sandbox(ListPodSandboxRequest::default())
        .await
        .expect("list")
        .into_inner()
        .items;
    assert!(items.is_empty(), "vmpod run removes its pod: {items:?}");
    assert_no_leaks(&d, &[]);
}

async fn a_dead_sandbox_makes_the_pod_notready_and_stop_cleans_up(b: Backend) {
    let d = Daemon::on(b, "");
    let mut cri = d.client().await;
    let pod = run_pod(&mut cri, pod_config(&d, "doomed", &[])).await;
    let c = run_container(
        &mut cri,
        &pod,
        container_config("c", &["sleep", "1000"], &[]),
    )
    .await;
    let info = cri
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: true,
        })
        .await
        .expect("status")
        .into_inner()
        .info;
    let verbose: serde_json::Value = serde_json::from_str(&info["info"]).expect("verbose JSON");
    let pid = verbose["pid"].as_i64().expect("the sandbox's pid") as i32;
    // The host agent, or the VM's QEMU: either way the sandbox is gone.
    // SAFETY: kill(2) takes plain integers; the PID is the test pod's.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    // The monitor notices on its own: the persisted record turns NotReady
    // with no CRI call in between.
    let record = d
        .state_dir()
        .join("sandboxes")
        .join(&pod)
        .join("sandbox.json");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&record).unwrap_or_default();
        let state = serde_json::from_str::<serde_json::Value>(&text)
            .map(|v| v["state"].clone())
            .unwrap_or_default();
        if state == "NotReady" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the sandbox monitor did not mark the pod NOTREADY: {text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let state = cri
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: pod.clone(),
                verbose: false,
            })
            .await
            .expect("status")
            .into_inner()
            .status
            .expect("status")
            .state;
        if state == PodSandboxState::SandboxNotready as i32 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the pod stayed READY");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The container the dead agent left behind is killed by StopPodSandbox
    // (through the pod's cgroups) and nothing is left.
    let s = wait_exited(&mut cri, &c).await;
    assert_eq!(s.reason, "Unknown", "{s:?}");
    stop_remove_pod(&mut cri, &pod).await;
    assert_no_leaks(&d, &[pod]);
}

/// Regression: a daemon restart used to drop the agent output streams,
/// which closed the container's stdout pipe, and the next write killed the
/// container with SIGPIPE. Logs must keep flowing across restarts.
async fn a_chatty_container_survives_a_restart_and_keeps_logging(b: Backend) {
    let mut d = Daemon::on(b, "");
    let mut cri = d.client().await;
    let pod = run_pod(&mut cri, pod_config(&d, "chatty", &[])).await;
    let c = create(
        &mut cri,
        &pod,
        container_config(
            "c",
            &[
                "sh",
                "-c",
                "i=0; while :; do i=$((i+1)); echo tick$i; sleep 0.1; done",
            ],
            &[],
        ),
    )
    .await;
    start(&mut cri, &c).await;
    let log = d.log_root().join("chatty/c/0.log");
    log_lines(&log, 2).await;
    d.kill9_and_restart();
    let mut cri = d.client().await;
    let before = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .count();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        status(&mut cri, &c).await.state,
        ContainerState::ContainerRunning as i32,
        "the container must survive the daemon's restart"
    );
    log_lines(&log, before + 3).await;
    stop_remove_pod(&mut cri, &pod).await;
    assert_no_leaks(&d, &[pod]);
}

/// A pod config with these namespace options.
fn pod_with_namespaces(d: &Daemon, name: &str, ns: NamespaceOption) -> PodSandboxConfig {
    let mut config = pod_config(d, name, &[]);
    config.linux = Some(LinuxPodSandboxConfig {
        security_context: Some(LinuxSandboxSecurityContext {
            namespace_options: Some(ns),
            ..Default::default()
        }),
        ..Default::default()
    });
    config
}

/// A VM pod asking for a node namespace is refused, and leaves nothing.
async fn assert_refused_on_vm(d: &Daemon, cri: &mut Cri, config: PodSandboxConfig) {
    let refused = cri
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: String::new(),
        })
        .await;
    assert_eq!(code(refused), Code::FailedPrecondition);
    assert_no_leaks(d, &[]);
}

/// Every security field is honoured or refused, never dropped: capability
/// add/drop, Localhost seccomp profiles, the pod's own PID namespace, TTYs;
/// AppArmor profiles, SELinux labels and host devices are refused.
async fn security_contexts_are_honoured_or_refused(b: Backend) {
    let d = Daemon::on(b, "");
    let mut cri = d.client().await;
    let pod = run_pod(
        &mut cri,
        pod_with_namespaces(
            &d,
            "secure",
            NamespaceOption {
                pid: NamespaceMode::Pod as i32,
                ..Default::default()
            },
        ),
    )
    .await;

    let caps = with_security(container_config("caps", &["sleep", "1000"], &[]), |sc| {
        sc.capabilities = Some(Capability {
            add_capabilities: vec!["NET_ADMIN".into()],
            drop_capabilities: vec!["ALL".into()],
            add_ambient_capabilities: vec![],
        });
        sc.namespace_options = Some(NamespaceOption {
            pid: NamespaceMode::Pod as i32,
            ..Default::default()
        });
    });
    let caps = run_container(&mut cri, &pod, caps).await;
    let r = exec(
        &mut cri,
        &caps,
        &["grep", "CapEff", "/proc/self/status"],
        10,
    )
    .await
    .expect("exec");
    assert_eq!(
        String::from_utf8_lossy(&r.stdout).split_whitespace().nth(1),
        Some("0000000000001000"),
        "exactly CAP_NET_ADMIN: {r:?}"
    );

    // The pod's PID namespace holds the pod, not the node: the sleeping
    // container is visible from a second one, the daemon is not.
    let peek = with_security(container_config("peek", &["sleep", "1000"], &[]), |sc| {
        sc.namespace_options = Some(NamespaceOption {
            pid: NamespaceMode::Pod as i32,
            ..Default::default()
        });
    });
    let peek = run_container(&mut cri, &pod, peek).await;
    let r = exec(
        &mut cri,
        &peek,
        &[
            "sh",
            "-c",
            "cat /proc/[0-9]*/cmdline | tr '\\0' ' '; echo; ls /proc | grep -c '^[0-9]'",
        ],
        10,
    )
    .await
    .expect("exec");
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(out.contains("sleep 1000"), "{out}");
    // The agent is in there (as a pause process would be); the daemon and
    // the rest of the node are not. (A VM pod's namespace is the guest's,
    // kernel threads included.)
    assert!(
        !out.contains("vmpod serve"),
        "the node's processes leak into the pod: {out}"
    );
    if b == Backend::Host {
        let count: usize = out
            .lines()
            .last()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(999);
        assert!(
            count < 10,
            "{count} processes in the pod's PID namespace: {out}"
        );
    }

    // A Localhost seccomp profile from the node's disk.
    let profile = d.dir.path().join("no-mkdir.json");
    std::fs::write(
        &profile,
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO"}]}"#,
    )
    .expect("profile");
    let confined = with_security(
        container_config(
            "confined",
            &["sh", "-c", "mkdir /tmp/x && echo made || echo refused"],
            &[],
        ),
        |sc| {
            sc.seccomp = Some(SecurityProfile {
                profile_type: security_profile::ProfileType::Localhost as i32,
                localhost_ref: profile.display().to_string(),
            })
        },
    );
    let confined = run_container(&mut cri, &pod, confined).await;
    wait_exited(&mut cri, &confined).await;
    let lines = log_lines(&d.log_root().join("secure/confined/0.log"), 2).await;
    assert!(
        lines.iter().any(|l| l.ends_with(" stdout F refused")),
        "{lines:?}"
    );

    // A TTY container: its output is the terminal's, logged as stdout.
    let mut tty = container_config("tty", &["sh", "-c", "tty; echo on-a-tty"], &[]);
    tty.tty = true;
    tty.stdin = true;
    let tty = run_container(&mut cri, &pod, tty).await;
    wait_exited(&mut cri, &tty).await;
    let lines = log_lines(&d.log_root().join("secure/tty/0.log"), 2).await;
    assert!(
        lines.iter().any(|l| l.contains(" stdout F /dev/pts/")),
        "{lines:?}"
    );
    assert!(lines.iter().any(|l| l.contains("on-a-tty")), "{lines:?}");

    let refused = [
        with_security(container_config("aa", &["true"], &[]), |sc| {
            sc.apparmor = Some(SecurityProfile {
                profile_type: security_profile::ProfileType::Localhost as i32,
                localhost_ref: "k8s-nginx".into(),
            })
        }),
        with_security(container_config("se", &["true"], &[]), |sc| {
            sc.selinux_options = Some(SeLinuxOption {
                level: "s0:c1,c2".into(),
                ..Default::default()
            })
        }),
        with_security(container_config("amb", &["true"], &[]), |sc| {
            sc.capabilities = Some(Capability {
                add_ambient_capabilities: vec!["NET_RAW".into()],
                ..Default::default()
            })
        }),
        ContainerConfig {
            devices: vec![Device {
                container_path: "/dev/kvm".into(),
                host_path: "/dev/kvm".into(),
                permissions: "rw".into(),
            }],
            ..container_config("dev", &["true"], &[])
        },
    ];
    for config in refused {
        let name = config.metadata.as_ref().map(|m| m.name.clone());
        let r = cri
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(config),
                sandbox_config: None,
            })
            .await;
        assert_eq!(code(r), Code::Unimplemented, "{name:?}");
    }
    stop_remove_pod(&mut cri, &pod).await;
    assert_no_leaks(&d, &[pod]);
}

/// hostPID and hostIPC pods, where the config allows them (host backend
/// only): the node's namespaces, visibly.
async fn host_pid_and_ipc_where_allowed(b: Backend) {
    let d = Daemon::on(b, "[host]\nallow_host_pid = true\nallow_host_ipc = true\n");
    let mut cri = d.client().await;
    let config = pod_with_namespaces(
        &d,
        "hostpid",
        NamespaceOption {
            pid: NamespaceMode::Node as i32,
            ipc: NamespaceMode::Node as i32,
            ..Default::default()
        },
    );
    if b == Backend::Vm {
        return assert_refused_on_vm(&d, &mut cri, config).await;
    }
    let pod = run_pod(&mut cri, config).await;
    let c = with_security(container_config("c", &["sleep", "1000"], &[]), |sc| {
        sc.namespace_options = Some(NamespaceOption {
            pid: NamespaceMode::Node as i32,
            ipc: NamespaceMode::Node as i32,
            ..Default::default()
        });
    });
    let c = run_container(&mut cri, &pod, c).await;
    let r = exec(
        &mut cri,
        &c,
        &[
            "sh",
            "-c",
            "readlink /proc/self/ns/pid; readlink /proc/self/ns/ipc",
        ],
        10,
    )
    .await
    .expect("exec");
    let ours = format!(
        "{}\n{}\n",
        std::fs::read_link("/proc/self/ns/pid")
            .expect("pid ns")
            .display(),
        std::fs::read_link("/proc/self/ns/ipc")
            .expect("ipc ns")
            .display()
    );
    assert_eq!(String::from_utf8_lossy(&r.stdout), ours);
    stop_remove_pod(&mut cri, &pod).await;
    assert_no_leaks(&d, &[pod]);
}

/// PIDs in a cgroup of the memory hierarchy and below it.
fn pids_under(cgroup: &std::path::Path) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(text) = std::fs::read_to_string(cgroup.join("cgroup.procs")) {
        out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(entries) = std::fs::read_dir(cgroup) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                out.extend(pids_under(&e.path()));
            }
        }
    }
    out
}

/// The kubelet's cgroup parent holds the pod: host pods' containers, VM
/// pods' VM processes; gone after removal. A systemd slice is refused.
async fn the_kubelets_cgroup_parent_holds_the_pod(b: Backend) {
    let d = Daemon::on(b, "");
    let mut cri = d.client().await;
    let parent = format!(
        "/vmpod-test-kubepods-{}/pod-{}",
        b.handler(),
        std::process::id()
    );
    let mut config = pod_config(&d, "grouped", &[]);
    config.linux = Some(LinuxPodSandboxConfig {
        cgroup_parent: parent.clone(),
        ..Default::default()
    });
    let pod = run_pod(&mut cri, config).await;
    run_container(
        &mut cri,
        &pod,
        container_config("c", &["sleep", "1000"], &[]),
    )
    .await;
    let cgroup = std::path::Path::new("/sys/fs/cgroup/memory")
        .join(parent.trim_start_matches('/'))
        .join(&pod);
    let pids = pids_under(&cgroup);
    let cmdlines: Vec<String> = pids
        .iter()
        .map(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .unwrap_or_default()
        })
        .collect();
    match b {
        Backend::Host => assert!(
            cmdlines.iter().any(|c| c.starts_with("sleep 1000")),
            "the container is not in {}: {cmdlines:?}",
            cgroup.display()
        ),
        Backend::Vm => assert!(
            cmdlines.iter().any(|c| c.contains("qemu-system-x86_64")),
            "the VM is not in {}: {cmdlines:?}",
            cgroup.display()
        ),
    }
    stop_remove_pod(&mut cri, &pod).await;
    assert!(!cgroup.exists(), "{} left behind", cgroup.display());
    assert_no_leaks(&d, &[pod]);
    // The kubelet's own levels are the kubelet's to remove; the test's.
    let top = parent
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or_default();
    if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
        for h in hierarchies.flatten() {
            let _ = std::fs::remove_dir(h.path().join(parent.trim_start_matches('/')));
            let _ = std::fs::remove_dir(h.path().join(top));
        }
    }

    let mut slice = pod_config(&d, "sliced", &[]);
    slice.linux = Some(LinuxPodSandboxConfig {
        cgroup_parent: "kubepods-besteffort-pod1.slice".into(),
        ..Default::default()
    });
    let r = cri
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(slice),
            runtime_handler: String::new(),
        })
        .await;
    assert_eq!(code(r), Code::InvalidArgument);
}

/// Status is honest per handler: a handler whose guest kernel is missing
/// is reported (verbose info, RuntimeReady's message, runtime_handlers) and
/// its pods are refused with the reason before anything is made; the
/// default handler stays ready.
#[tokio::test(flavor = "multi_thread")]
async fn status_reports_each_handlers_readiness_and_refuses_unready_ones() {
    let d = Daemon::start(
        "[handlers.broken]\nbackend = \"vm\"\nhypervisor = \"qemu\"\naccel = \"tcg\"\n\
         kernel = \"/nonexistent/vmlinux\"\n",
    );
    let mut cri = d.client().await;
    let status = cri
        .status(StatusRequest { verbose: true })
        .await
        .expect("Status")
        .into_inner();
    let conditions = status.status.expect("a runtime status").conditions;
    let ready = conditions
        .iter()
        .find(|c| c.r#type == "RuntimeReady")
        .expect("RuntimeReady");
    assert!(
        ready.status,
        "the default (host) handler is ready: {ready:?}"
    );
    assert!(
        ready.message.contains("\"broken\"") && ready.message.contains("/nonexistent/vmlinux"),
        "{ready:?}"
    );
    let handlers: serde_json::Value =
        serde_json::from_str(&status.info["handlers"]).expect("handlers JSON");
    assert_eq!(handlers["broken"]["ready"], false, "{handlers}");
    assert_eq!(handlers["host"]["ready"], true, "{handlers}");
    let names: Vec<&str> = status
        .runtime_handlers
        .iter()
        .map(|h| h.name.as_str())
        .collect();
    for name in ["", "host", "vm", "broken"] {
        assert!(names.contains(&name), "{name:?} missing in {names:?}");
    }
    let err = cri
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(pod_config(&d, "broken", &[])),
            runtime_handler: "broken".into(),
        })
        .await
        .expect_err("a pod on an unready handler");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("/nonexistent/vmlinux"), "{err:?}");
    assert!(
        std::fs::read_dir(d.state_dir().join("sandboxes"))
            .map(|e| e.count() == 0)
            .unwrap_or(true),
        "nothing is made for a refused pod"
    );
}

/// The container's log pump, from its persisted record.
fn log_pump_of(d: &Daemon, pod: &str, c: &str) -> Option<i32> {
    let path = d
        .state_dir()
        .join("sandboxes")
        .join(pod)
        .join("containers")
        .join(format!("{c}.json"));
    let rec: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    rec["log_pump"][0].as_i64().map(|p| p as i32)
}

/// A log pump killed while its container runs is replaced: the container
/// does not block on a full pipe, and its log goes on (the agent hands the
/// new pump the output from where the old one stopped). Pumps live in the
/// pod's cgroup.
async fn a_killed_log_pump_is_replaced_and_the_log_goes_on(b: Backend) {
    let d = Daemon::on(b, "");
    let mut cri = d.client().await;
    let pod = run_pod(&mut cri, pod_config(&d, "pumped", &[])).await;
    let c = create(
        &mut cri,
        &pod,
        container_config(
            "chatty",
            &[
                "sh",
                "-c",
                "i=0; while true; do echo line $i; i=$((i+1)); sleep 0.05; done",
            ],
            &[],
        ),
    )
    .await;
    start(&mut cri, &c).await;
    let log = d.log_root().join("pumped/chatty/0.log");
    log_lines(&log, 5).await;
    let old = log_pump_of(&d, &pod, &c).expect("a log pump");
    let cgroup = std::fs::read_to_string(format!("/proc/{old}/cgroup")).expect("its cgroup");
    assert!(
        cgroup.contains(&pod),
        "the pump is outside the pod's cgroup: {cgroup}"
    );
    // SAFETY: kill(2) takes plain integers; the PID is the test's pump.
    assert_eq!(unsafe { libc::kill(old, libc::SIGKILL) }, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let new = loop {
        if let Some(p) = log_pump_of(&d, &pod, &c).filter(|&p| p != old) {
            break p;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no new pump: {}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let cgroup = std::fs::read_to_string(format!("/proc/{new}/cgroup")).expect("its cgroup");
    assert!(cgroup.contains(&pod), "{cgroup}");
    // Output written after the kill reaches the log. (What the killed pump
    // had read but not written is lost with it, as with a shim's death.)
    let last = |lines: &[String]| -> u64 {
        lines
            .iter()
            .filter_map(|l| l.rsplit("line ").next()?.parse().ok())
            .max()
            .unwrap_or(0)
    };
    let at_kill = last(
        &std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .map(String::from)
            .collect::<Vec<_>>(),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while last(&log_lines(&log, 1).await) < at_kill + 40 {
        assert!(
            std::time::Instant::now() < deadline,
            "the log stopped at {at_kill}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        status(&mut cri, &c).await.state,
        ContainerState::ContainerRunning as i32
    );
    stop_remove_pod(&mut cri, &pod).await;
    assert_no_leaks(&d, &[pod]);
}

/// A container's writable layer is a sparse ext4 file of the handler's
/// size in the sandbox dir (runtime/src/sandbox/scratch.rs), not a 64 MiB
/// tmpfs in (guest) RAM: 100 MiB written into / fits; ContainerStats'
/// writable_layer and ImageFsInfo's container_filesystems count it; a
/// handler with `writable_layer_mib = 32` runs out past 32 MiB; and
/// RemoveContainer deletes the file.
async fn writable_layers_live_on_disk(b: Backend) {
    let small = match b {
        Backend::Host => "[handlers.small]\nbackend = \"host\"\nwritable_layer_mib = 32\n".into(),
        Backend::Vm => format!(
            "[handlers.small]\nbackend = \"vm\"\nhypervisor = \"qemu\"\naccel = \"tcg\"\n\
             kernel = \"{}\"\ninitramfs = \"{}\"\nwritable_layer_mib = 32\n",
            vmpod_tests::artefact("vmlinux").display(),
            vmpod_tests::artefact("initramfs.cpio").display()
        ),
    };
    let d = Daemon::on(b, &small);
    let mut cri = d.client().await;
    let images = d.image_client().await;
    let pod = run_pod(&mut cri, pod_config(&d, "layers", &[])).await;
    let c = run_container(
        &mut cri,
        &pod,
        container_config("writer", &["sleep", "3600"], &[]),
    )
    .await;
    let file = d
        .state_dir()
        .join("sandboxes")
        .join(&pod)
        .join("scratch")
        .join(format!("{c}.ext4"));
    assert_eq!(
        std::fs::metadata(&file).expect("the layer's file").len(),
        10 << 30,
        "the default size"
    );
    let r = exec(
        &mut cri,
        &c,
        &[
            "sh",
            "-c",
            "dd if=/dev/zero of=/big bs=1M count=100 2>&1 && sync && ls -l /big",
        ],
        300,
    )
    .await
    .expect("ExecSync");
    let out = String::from_utf8_lossy(&r.stdout);
    assert_eq!(r.exit_code, 0, "{out}");
    assert!(out.contains("104857600"), "{out}");

    let stats = cri
        .container_stats(ContainerStatsRequest {
            container_id: c.clone(),
        })
        .await
        .expect("ContainerStats")
        .into_inner()
        .stats
        .expect("stats");
    let layer = stats.writable_layer.expect("writable_layer");
    let used = layer.used_bytes.expect("used_bytes").value;
    // The file and the directories above it; not the filesystem's own
    // metadata (inode tables of 10 GiB alone are 160 MiB).
    assert!(
        (100 << 20..110 << 20).contains(&used),
        "writable layer used_bytes {used}"
    );
    assert!(layer.inodes_used.expect("inodes_used").value >= 1);

    let fs_info = || {
        let mut images = images.clone();
        async move {
            images
                .image_fs_info(ImageFsInfoRequest {})
                .await
                .expect("ImageFsInfo")
                .into_inner()
        }
    };
    let info = fs_info().await;
    let fs = info
        .container_filesystems
        .first()
        .expect("container_filesystems");
    assert_eq!(
        fs.fs_id.as_ref().unwrap().mountpoint,
        d.state_dir().join("sandboxes").display().to_string()
    );
    let on_node = fs.used_bytes.as_ref().unwrap().value;
    assert!(on_node >= 100 << 20, "container_filesystems used {on_node}");
    assert_eq!(fs.inodes_used.as_ref().unwrap().value, 1);

    // A handler's smaller size is the container's limit.
    let small_pod = cri
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(pod_config(&d, "small-layers", &[])),
            runtime_handler: "small".into(),
        })
        .await
        .expect("RunPodSandbox small")
        .into_inner()
        .pod_sandbox_id;
    let s = run_container(
        &mut cri,
        &small_pod,
        container_config("writer", &["sleep", "3600"], &[]),
    )
    .await;
    let r = exec(
        &mut cri,
        &s,
        &["sh", "-c", "dd if=/dev/zero of=/big bs=1M count=64 2>&1"],
        300,
    )
    .await
    .expect("ExecSync");
    let out = String::from_utf8_lossy(&r.stdout);
    assert_ne!(r.exit_code, 0, "64 MiB fit a 32 MiB layer: {out}");
    assert!(out.contains("No space left on device"), "{out}");

    // RemoveContainer takes the file, and the node's count follows.
    cri.stop_container(StopContainerRequest {
        container_id: c.clone(),
        timeout: 0,
    })
    .await
    .expect("StopContainer");
    cri.remove_container(RemoveContainerRequest {
        container_id: c.clone(),
    })
    .await
    .expect("RemoveContainer");
    assert!(!file.exists(), "{} is left", file.display());
    let on_node = fs_info().await.container_filesystems[0]
        .used_bytes
        .as_ref()
        .unwrap()
        .value;
    assert!(on_node < 100 << 20, "container_filesystems used {on_node}");
    drop(images);
    stop_remove_pod(&mut cri, &small_pod).await;
    stop_remove_pod(&mut cri, &pod).await;
    assert_no_leaks(&d, &[pod, small_pod]);
}

/// An upgrade replaces the binary under the running daemon (a new file
/// renamed over the old, as dpkg does): the log pumps it starts afterwards
/// run the new binary, not the deleted image `/proc/self/exe` names (the
/// path is resolved once at start-up; VMMs are spawned the same way).
#[tokio::test]
async fn after_an_upgrade_new_pumps_run_the_new_binary() {
    use std::os::unix::fs::MetadataExt;
    let d = Daemon::from_copy("");
    let mut cri = d.client().await;
    let pod = run_pod(&mut cri, pod_config(&d, "upgrade", &[])).await;
    let exe_of = |pid: i32| {
        let link = std::fs::read_link(format!("/proc/{pid}/exe")).expect("its exe");
        let ino = std::fs::metadata(format!("/proc/{pid}/exe"))
            .expect("its exe")
            .ino();
        (link, ino)
    };
    let sleeping = |name| container_config(name, &["sleep", "3600"], &[]);
    let before = run_container(&mut cri, &pod, sleeping("before")).await;
    let (link, ino) = exe_of(log_pump_of(&d, &pod, &before).expect("a pump"));
    assert_eq!(link, d.binary());
    assert_eq!(ino, std::fs::metadata(d.binary()).unwrap().ino());

    let new = d.binary().with_extension("new");
    std::fs::copy(d.binary(), &new).expect("the new binary");
    std::fs::rename(&new, d.binary()).expect("renaming it into place");
    let new_ino = std::fs::metadata(d.binary()).unwrap().ino();
    assert_ne!(new_ino, ino);
    let (daemon_exe, _) = exe_of(d.pid() as i32);
    assert!(
        daemon_exe.display().to_string().ends_with(" (deleted)"),
        "the daemon should run the replaced image: {}",
        daemon_exe.display()
    );

    let after = run_container(&mut cri, &pod, sleeping("after")).await;
    let (link, ino) = exe_of(log_pump_of(&d, &pod, &after).expect("a pump"));
    assert_eq!(link, d.binary(), "the new pump runs a deleted image");
    assert_eq!(ino, new_ino);
    stop_remove_pod(&mut cri, &pod).await;
    assert_no_leaks(&d, &[pod]);
}
