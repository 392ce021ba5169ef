//! Containers through the agent API, run twice: against the agent as a host
//! process (rootfs: the demo erofs image on a loop device) and as PID 1 of
//! a real Linux guest under QEMU TCG (rootfs: the same image as a virtio-blk
//! disk, found by its serial), over hybrid vsock.
//!
//! Every scenario asserts what a user would see break: exit codes, output,
//! signals, exec with and without a terminal, stdin, OOM, seccomp,
//! capabilities, read-only roots, masked paths, users, stats and limits.

use std::time::Duration;

use tonic::Code;
use tonic::transport::Channel;
use vmpod_proto::v1::agent_client::AgentClient;
use vmpod_proto::v1::read_output_request::Stream;
use vmpod_proto::v1::*;
use vmpod_tests::sandbox::{Backend, Sandbox};

type Agent = AgentClient<Channel>;

fn process(args: &[&str]) -> Process {
    Process {
        args: args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn container(sandbox: &Sandbox, id: &str, args: &[&str]) -> CreateContainerRequest {
    CreateContainerRequest {
        container_id: id.into(),
        rootfs: Some(Rootfs {
            source: sandbox.image_source.clone(),
            ..Default::default()
        }),
        process: Some(process(args)),
        ..Default::default()
    }
}

async fn run(agent: &mut Agent, req: CreateContainerRequest) {
    let id = req.container_id.clone();
    agent
        .create_container(req)
        .await
        .unwrap_or_else(|s| panic!("create {id}: {s:?}"));
    agent
        .start_container(StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap_or_else(|s| panic!("start {id}: {s:?}"));
}

async fn output(agent: &mut Agent, id: &str, exec_id: &str, stream: Stream) -> String {
    let req = ReadOutputRequest {
        container_id: id.into(),
        exec_id: exec_id.into(),
        stream: stream as i32,
    };
    let mut s = agent
        .read_output(req)
        .await
        .expect("ReadOutput")
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = s.message().await.expect("output chunk") {
        out.extend(chunk.data);
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn wait(agent: &mut Agent, id: &str, exec_id: &str) -> WaitProcessResponse {
    let mut req = tonic::Request::new(WaitProcessRequest {
        container_id: id.into(),
        exec_id: exec_id.into(),
    });
    req.set_timeout(Duration::from_secs(60));
    agent
        .wait_process(req)
        .await
        .unwrap_or_else(|s| panic!("wait {id}/{exec_id}: {s:?}"))
        .into_inner()
}

/// Runs a container to completion: (exit code, stdout, stderr).
async fn run_to_end(agent: &mut Agent, req: CreateContainerRequest) -> (i32, String, String) {
    let id = req.container_id.clone();
    run(agent, req).await;
    let stdout = output(agent, &id, "", Stream::Stdout).await;
    let stderr = output(agent, &id, "", Stream::Stderr).await;
    let exit = wait(agent, &id, "").await;
    agent
        .remove_container(RemoveContainerRequest { container_id: id })
        .await
        .expect("remove");
    (exit.exit_code, stdout, stderr)
}

/// The error code of a call that must fail.
fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    r.expect_err("the call must fail").code()
}

async fn exec(agent: &mut Agent, id: &str, exec_id: &str, p: Process) {
    let req = ExecProcessRequest {
        container_id: id.into(),
        exec_id: exec_id.into(),
        process: Some(p),
    };
    agent
        .exec_process(req)
        .await
        .unwrap_or_else(|s| panic!("exec {exec_id}: {s:?}"));
}

async fn lifecycle_output_exit_and_errors(backend: Backend) {
    let sandbox = Sandbox::start(backend);
    let mut agent = sandbox.client().await;

    run(
        &mut agent,
        container(
            &sandbox,
            "c1",
            &["sh", "-c", "echo out; echo err >&2; exit 3"],
        ),
    )
    .await;
    assert_eq!(output(&mut agent, "c1", "", Stream::Stdout).await, "out\n");
    assert_eq!(output(&mut agent, "c1", "", Stream::Stderr).await, "err\n");
    let exit = wait(&mut agent, "c1", "").await;
    assert_eq!(
        (exit.exit_code, exit.signal, exit.oom_killed),
        (3, 0, false)
    );
    assert!(exit.exited_at > 0);

    assert_eq!(
        code(
            agent
                .create_container(container(&sandbox, "c1", &["true"]))
                .await
        ),
        Code::AlreadyExists
    );
    assert_eq!(
        code(
            agent
                .start_container(StartContainerRequest {
                    container_id: "c1".into()
                })
                .await
        ),
        Code::FailedPrecondition
    );
    let missing = WaitProcessRequest {
        container_id: "nope".into(),
        exec_id: String::new(),
    };
    assert_eq!(code(agent.wait_process(missing).await), Code::NotFound);
    assert_eq!(
        code(
            agent
                .create_container(container(&sandbox, "../escape", &["true"]))
                .await
        ),
        Code::InvalidArgument
    );
    let mut no_args = container(&sandbox, "c9", &[]);
    no_args.process.as_mut().unwrap().args.clear();
    assert_eq!(
        code(agent.create_container(no_args).await),
        Code::InvalidArgument
    );
    let mut bad_user = container(&sandbox, "c8", &["true"]);
    bad_user.process.as_mut().unwrap().user = Some(User {
        username: "ghost".into(),
        ..Default::default()
    });
    assert_eq!(
        code(agent.create_container(bad_user).await),
        Code::InvalidArgument
    );

    agent
        .remove_container(RemoveContainerRequest {
            container_id: "c1".into(),
        })
        .await
        .expect("remove");
    assert_eq!(
        code(
            agent
                .remove_container(RemoveContainerRequest {
                    container_id: "c1".into()
                })
                .await
        ),
        Code::NotFound
    );
    // A new container in the pod after the others are gone.
    let (code2, out, _) =
        run_to_end(&mut agent, container(&sandbox, "c1", &["echo", "again"])).await;
    assert_eq!((code2, out.as_str()), (0, "again\n"));
}

async fn signals_exec_tty_and_stdin(backend: Backend) {
    let sandbox = Sandbox::start(backend);
    let mut agent = sandbox.client().await;
    run(&mut agent, container(&sandbox, "main", &["sleep", "1000"])).await;

    exec(
        &mut agent,
        "main",
        "e1",
        process(&["sh", "-c", "echo hi; id -u"]),
    )
    .await;
    assert_eq!(
        output(&mut agent, "main", "e1", Stream::Stdout).await,
        "hi\n0\n"
    );
    assert_eq!(wait(&mut agent, "main", "e1").await.exit_code, 0);

    let mut cat = process(&["cat"]);
    cat.stdin = true;
    exec(&mut agent, "main", "e2", cat).await;
    let chunks = vec![StdinChunk {
        container_id: "main".into(),
        exec_id: "e2".into(),
        data: b"hello\n".to_vec(),
    }];
    let written = agent
        .write_stdin(tokio_stream::iter(chunks))
        .await
        .expect("WriteStdin")
        .into_inner();
    assert_eq!(written.written, 6);
    agent
        .close_stdin(CloseStdinRequest {
            container_id: "main".into(),
            exec_id: "e2".into(),
        })
        .await
        .expect("CloseStdin");
    assert_eq!(
        output(&mut agent, "main", "e2", Stream::Stdout).await,
        "hello\n"
    );
    assert_eq!(wait(&mut agent, "main", "e2").await.exit_code, 0);

    let mut shell = process(&["sh"]);
    shell.terminal = true;
    shell.stdin = true;
    exec(&mut agent, "main", "t1", shell).await;
    agent
        .resize_tty(ResizeTtyRequest {
            container_id: "main".into(),
            exec_id: "t1".into(),
            rows: 40,
            cols: 100,
        })
        .await
        .expect("ResizeTty");
    let chunks = vec![StdinChunk {
        container_id: "main".into(),
        exec_id: "t1".into(),
        data: b"stty size; tty; exit 7\n".to_vec(),
    }];
    agent
        .write_stdin(tokio_stream::iter(chunks))
        .await
        .expect("WriteStdin");
    let tty_out = output(&mut agent, "main", "t1", Stream::Stdout).await;
    assert!(
        tty_out.contains("40 100"),
        "terminal size not applied: {tty_out:?}"
    );
    assert!(tty_out.contains("/dev/pts/"), "not a terminal: {tty_out:?}");
    assert_eq!(wait(&mut agent, "main", "t1").await.exit_code, 7);

    // The main process is PID 1 of its PID namespace: the kernel delivers
    // it only signals it handles (as for any pod), and SIGKILL.
    run(
        &mut agent,
        container(
            &sandbox,
            "trap",
            &["sh", "-c", "trap 'exit 42' TERM; while :; do sleep 1; done"],
        ),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    agent
        .signal_process(SignalProcessRequest {
            container_id: "trap".into(),
            exec_id: String::new(),
            signal: 15,
        })
        .await
        .expect("SignalProcess");
    assert_eq!(
        wait(&mut agent, "trap", "").await.exit_code,
        42,
        "SIGTERM reached the handler"
    );
    agent
        .signal_process(SignalProcessRequest {
            container_id: "main".into(),
            exec_id: String::new(),
            signal: 9,
        })
        .await
        .expect("SignalProcess");
    let exit = wait(&mut agent, "main", "").await;
    assert_eq!((exit.exit_code, exit.signal), (137, 9));
    let bad = SignalProcessRequest {
        container_id: "main".into(),
        exec_id: String::new(),
        signal: 999,
    };
    assert_eq!(code(agent.signal_process(bad).await), Code::InvalidArgument);
    let late = ExecProcessRequest {
        container_id: "main".into(),
        exec_id: "late".into(),
        process: Some(process(&["true"])),
    };
    assert_eq!(
        agent.exec_process(late).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    agent
        .remove_container(RemoveContainerRequest {
            container_id: "main".into(),
        })
        .await
        .expect("remove");
}

async fn oom_kill_is_reported(backend: Backend) {
    let sandbox = Sandbox::start(backend);
    let mut agent = sandbox.client().await;
    // tail keeps the last N bytes of an endless stream: it grows until the
    // cgroup's limit kills it.
    let mut req = container(&sandbox, "hog", &["tail", "-c", "150000000", "/dev/zero"]);
    req.resources = Some(Resources {
        memory_limit: 16 << 20,
        ..Default::default()
    });
    run(&mut agent, req).await;
    let exit = wait(&mut agent, "hog", "").await;
    assert_eq!(
        (exit.exit_code, exit.signal, exit.oom_killed),
        (137, 9, true)
    );
    let stats = agent
        .stats(StatsRequest {
            container_id: "hog".into(),
        })
        .await
        .expect("Stats")
        .into_inner();
    assert!(stats.oom_kills >= 1);
    agent
        .remove_container(RemoveContainerRequest {
            container_id: "hog".into(),
        })
        .await
        .expect("remove");
}

async fn security_settings_are_enforced(backend: Backend) {
    let sandbox = Sandbox::start(backend);
    let mut agent = sandbox.client().await;
    let with = |id: &str, args: &[&str], sec: Security| {
        let mut req = container(&sandbox, id, args);
        req.security = Some(sec);
        req
    };

    // A seccomp profile really blocks: mkdir fails with EPERM under it, works without.
    let no_mkdir = r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_X86_64"],
        "syscalls":[{"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO","errnoRet":1}]}"#;
    let (code, _, err) = run_to_end(
        &mut agent,
        with(
            "sc1",
            &["mkdir", "/tmp/x"],
            Security {
                seccomp_json: no_mkdir.into(),
                ..Default::default()
            },
        ),
    )
    .await;
    assert_eq!(code, 1, "mkdir must fail under the profile: {err}");
    assert!(err.contains("Operation not permitted"), "{err}");
    let (code, _, err) =
        run_to_end(&mut agent, container(&sandbox, "sc2", &["mkdir", "/tmp/x"])).await;
    assert_eq!(code, 0, "mkdir without a profile: {err}");
    let (code, _, err) = run_to_end(
        &mut agent,
        with(
            "sc3",
            &["unshare", "-U", "true"],
            Security {
                seccomp_runtime_default: true,
                ..Default::default()
            },
        ),
    )
    .await;
    assert_eq!(code, 1, "RuntimeDefault must refuse unshare: {err}");
    assert!(err.contains("Operation not permitted"), "{err}");

    // Capabilities: the default set (docker/containerd's 0xa80425fb), or exactly what is asked.
    let cap_eff = "grep CapEff /proc/self/status";
    let (_, out, _) = run_to_end(
        &mut agent,
        container(&sandbox, "cap1", &["sh", "-c", cap_eff]),
    )
    .await;
    assert_eq!(
        out.split_whitespace().last(),
        Some("00000000a80425fb"),
        "{out}"
    );
    let only_net_admin = Security {
        capabilities: vec!["CAP_NET_ADMIN".into()],
        ..Default::default()
    };
    let (_, out, _) = run_to_end(
        &mut agent,
        with("cap2", &["sh", "-c", cap_eff], only_net_admin),
    )
    .await;
    assert_eq!(
        out.split_whitespace().last(),
        Some("0000000000001000"),
        "{out}"
    );

    // Read-only root file system.
    let ro = Security {
        readonly_rootfs: true,
        ..Default::default()
    };
    let (code, _, err) = run_to_end(&mut agent, with("ro", &["touch", "/x"], ro)).await;
    assert_eq!(code, 1);
    assert!(err.contains("Read-only file system"), "{err}");

    // Masked paths read as empty; a privileged container sees them.
    let count = "cat /proc/timer_list | wc -c";
    let (_, out, _) = run_to_end(
        &mut agent,
        container(&sandbox, "mask1", &["sh", "-c", count]),
    )
    .await;
    assert_eq!(out.trim(), "0", "/proc/timer_list must be masked");
    let privileged = Security {
        privileged: true,
        ..Default::default()
    };
    let (_, out, _) = run_to_end(&mut agent, with("mask2", &["sh", "-c", count], privileged)).await;
    assert!(out.trim().parse::<u64>().unwrap() > 0, "{out}");

    // Users by name (from the image's /etc/passwd and /etc/group) and by number.
    let mut named = container(&sandbox, "u1", &["id"]);
    named.process.as_mut().unwrap().user = Some(User {
        username: "nobody".into(),
        ..Default::default()
    });
    let (_, out, _) = run_to_end(&mut agent, named).await;
    for part in ["uid=65534(nobody)", "gid=65534(nogroup)", "100(users)"] {
        assert!(out.contains(part), "{part} missing in {out:?}");
    }
    let mut numeric = container(&sandbox, "u2", &["sh", "-c", "id -u; id -g; id -G"]);
    numeric.process.as_mut().unwrap().user = Some(User {
        uid: 1234,
        gid: Some(99),
        additional_gids: vec![7],
        ..Default::default()
    });
    let (_, out, _) = run_to_end(&mut agent, numeric).await;
    assert_eq!(
        out.lines().collect::<Vec<_>>()[..2],
        ["1234", "99"],
        "{out}"
    );
    assert!(
        out.lines()
            .nth(2)
            .unwrap_or("")
            .split_whitespace()
            .any(|g| g == "7"),
        "{out}"
    );
}

async fn stats_and_updates(backend: Backend) {
    let sandbox = Sandbox::start(backend);
    let mut agent = sandbox.client().await;
    let mut req = container(
        &sandbox,
        "busy",
        &[
            "sh",
            "-c",
            "dd if=/dev/zero of=/big bs=1M count=5 2>/dev/null; while :; do :; done",
        ],
    );
    req.resources = Some(Resources {
        memory_limit: 64 << 20,
        ..Default::default()
    });
    run(&mut agent, req).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let first = agent
        .stats(StatsRequest {
            container_id: "busy".into(),
        })
        .await
        .expect("Stats")
        .into_inner();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let second = agent
        .stats(StatsRequest {
            container_id: "busy".into(),
        })
        .await
        .expect("Stats")
        .into_inner();
    assert!(
        second.cpu_usage_ns > first.cpu_usage_ns,
        "CPU use must grow under load: {first:?} {second:?}"
    );
    assert!(
        second.memory_working_set_bytes > 0 && second.pids >= 1,
        "{second:?}"
    );
    assert!(
        second.writable_bytes_used >= 5 << 20,
        "the 5 MiB file lives in the writable layer: {second:?}"
    );
    assert!(second.timestamp > first.timestamp);

    let update = UpdateContainerRequest {
        container_id: "busy".into(),
        resources: Some(Resources {
            memory_limit: 32 << 20,
            ..Default::default()
        }),
    };
    agent
        .update_container(update)
        .await
        .expect("UpdateContainer");
    let limit_file = match backend {
        Backend::QemuTcg => "/sys/fs/cgroup/memory.max",
        Backend::Host => "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    };
    exec(&mut agent, "busy", "look", process(&["cat", limit_file])).await;
    assert_eq!(
        output(&mut agent, "busy", "look", Stream::Stdout)
            .await
            .trim(),
        (32u64 << 20).to_string()
    );
    agent
        .remove_container(RemoveContainerRequest {
            container_id: "busy".into(),
        })
        .await
        .expect("remove");
}

async fn sandbox_settings_namespaces_and_mounts(backend: Backend) {
    let sandbox = Sandbox::start(backend);
    let mut agent = sandbox.client().await;
    let setup = SetupSandboxRequest {
        hostname: "pod-x".into(),
        dns_servers: vec!["10.0.0.10".into()],
        dns_searches: vec!["svc.cluster.local".into()],
        dns_options: vec!["ndots:5".into()],
        // IPC-namespaced: the pod's own (the host agent unshares IPC).
        sysctls: [("kernel.shm_rmid_forced".to_string(), "1".to_string())].into(),
        ..Default::default()
    };
    agent.setup_sandbox(setup).await.expect("SetupSandbox");
    let bad = SetupSandboxRequest {
        sysctls: [("kernel.panic".to_string(), "1".to_string())].into(),
        ..Default::default()
    };
    assert_eq!(
        code(agent.setup_sandbox(bad).await),
        Code::InvalidArgument,
        "host-wide sysctls are refused"
    );

    let show = "hostname; cat /etc/resolv.conf; cat /proc/sys/kernel/shm_rmid_forced";
    let (code0, out, err) =
        run_to_end(&mut agent, container(&sandbox, "s1", &["sh", "-c", show])).await;
    assert_eq!(code0, 0, "{err}");
    assert_eq!(
        out, "pod-x\nnameserver 10.0.0.10\nsearch svc.cluster.local\noptions ndots:5\n1\n",
        "the pod's hostname, DNS and sysctls reach the container"
    );

    // PID namespace: the container's own (it is PID 1 there), or the pod's.
    let (_, own, _) = run_to_end(
        &mut agent,
        container(&sandbox, "p1", &["sh", "-c", "echo $$"]),
    )
    .await;
    assert_eq!(own.trim(), "1");
    let mut shared = container(&sandbox, "p2", &["sh", "-c", "echo $$"]);
    shared.security = Some(Security {
        share_pod_pid_namespace: true,
        ..Default::default()
    });
    let (_, pid, _) = run_to_end(&mut agent, shared).await;
    assert_ne!(
        pid.trim(),
        "1",
        "a shared PID namespace is the pod's, where the agent's side runs too"
    );

    // Mounts: a tmpfs, and a bind mount of a directory of the sandbox.
    let sandbox_files = match backend {
        Backend::Host => sandbox.path().join("state/sandbox").display().to_string(),
        Backend::QemuTcg => "/run/vmpod-agent/sandbox".to_string(),
    };
    let mut mounts = container(
        &sandbox,
        "m1",
        &[
            "sh",
            "-c",
            "grep ' /data ' /proc/mounts; cat /pod/resolv.conf; touch /pod/x",
        ],
    );
    mounts.mounts = vec![
        Mount {
            destination: "/data".into(),
            r#type: "tmpfs".into(),
            ..Default::default()
        },
        Mount {
            destination: "/pod".into(),
            source: sandbox_files,
            r#type: "bind".into(),
            options: vec!["ro".into()],
        },
    ];
    let (code1, out, err) = run_to_end(&mut agent, mounts).await;
    assert!(out.starts_with("tmpfs /data tmpfs"), "{out}");
    assert!(out.contains("nameserver 10.0.0.10"), "{out}");
    assert_eq!(code1, 1, "the bind mount is read-only");
    assert!(err.contains("Read-only file system"), "{err}");
}

async fn writable_layer_on_a_scratch_disk(backend: Backend) {
    let sandbox = Sandbox::start(backend);
    let mut agent = sandbox.client().await;
    // 20 MiB would not fit the 1 MiB tmpfs `writable_bytes` asks for: it
    // lands on the scratch disk's ext4 instead.
    let mut req = container(
        &sandbox,
        "scratch",
        &[
            "sh",
            "-c",
            "dd if=/dev/zero of=/big bs=1M count=20 2>&1 && ls -l /big",
        ],
    );
    req.rootfs.as_mut().unwrap().scratch_source = sandbox.scratch_source.clone();
    req.rootfs.as_mut().unwrap().writable_bytes = 1 << 20;
    let (code0, out, err) = run_to_end(&mut agent, req).await;
    assert_eq!(code0, 0, "{out}{err}");
    assert!(out.contains("20971520"), "{out}");

    // The same on the tmpfs layer fails: the limit is real.
    let mut req = container(
        &sandbox,
        "tmpfs",
        &["sh", "-c", "dd if=/dev/zero of=/big bs=1M count=20"],
    );
    req.rootfs.as_mut().unwrap().writable_bytes = 1 << 20;
    let (code1, _, err) = run_to_end(&mut agent, req).await;
    assert_ne!(code1, 0, "a 1 MiB writable layer took 20 MiB: {err}");
}

async fn a_new_output_reader_takes_over_without_losing_bytes(backend: Backend) {
    let sandbox = Sandbox::start(backend);
    let mut agent = sandbox.client().await;
    let count = "i=0; while [ $i -lt 40 ]; do echo $i; i=$((i+1)); sleep 0.05; done";
    run(
        &mut agent,
        container(&sandbox, "talk", &["sh", "-c", count]),
    )
    .await;
    let req = || ReadOutputRequest {
        container_id: "talk".into(),
        exec_id: String::new(),
        stream: Stream::Stdout as i32,
    };

    // The first reader reads a little and stays attached (as a daemon that
    // died without hanging up would).
    let mut first = agent
        .read_output(req())
        .await
        .expect("first reader")
        .into_inner();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("3\n") {
        seen.extend(
            first
                .message()
                .await
                .expect("chunk")
                .expect("more output")
                .data,
        );
    }
    // A second reader takes over at once.
    let mut second = sandbox.client().await;
    let mut rest = second
        .read_output(req())
        .await
        .expect("a new reader takes over")
        .into_inner();
    while let Some(chunk) = first.message().await.ok().flatten() {
        seen.extend(chunk.data);
    }
    while let Some(chunk) = rest.message().await.expect("chunk") {
        seen.extend(chunk.data);
    }
    let expected: String = (0..40).map(|i| format!("{i}\n")).collect();
    assert_eq!(
        String::from_utf8_lossy(&seen),
        expected,
        "every line exactly once, in order, across the two readers"
    );
    assert_eq!(wait(&mut agent, "talk", "").await.exit_code, 0);
    agent
        .remove_container(RemoveContainerRequest {
            container_id: "talk".into(),
        })
        .await
        .expect("remove");
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use super::*;

            #[tokio::test]
            async fn host() {
                super::$name(Backend::Host).await;
            }

            #[tokio::test]
            async fn qemu_tcg() {
                super::$name(Backend::QemuTcg).await;
            }
        }
    )*};
}

on_both_backends!(
    lifecycle_output_exit_and_errors,
    signals_exec_tty_and_stdin,
    oom_kill_is_reported,
    security_settings_are_enforced,
    stats_and_updates,
    sandbox_settings_namespaces_and_mounts,
    writable_layer_on_a_scratch_disk,
    a_new_output_reader_takes_over_without_losing_bytes,
);
