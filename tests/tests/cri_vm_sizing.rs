//! A pod VM's size comes from its handler plus the pod's own limits
//! (`PodSandboxConfig.linux.resources`), as Kata sizes its VMs. Checked from
//! inside the guest on the hypervisor that boots Linux on this machine: QEMU
//! with TCG (the `vm` handler of the test harness). The `vmpod` hypervisor
//! gets the same size (see `cri_vmpod.rs`, which reads it from the VMM's
//! config and the guest's memory map).

use k8s_cri::v1::*;
use tonic::Code;
use vmpod::hypervisor::qemu::VhostVsock;
use vmpod_tests::cri::*;
use vmpod_tests::require_program;

#[tokio::test(flavor = "multi_thread")]
async fn a_qemu_pod_vm_is_sized_by_the_pods_limits() {
    require_program("qemu-system-x86_64", "qemu-system-x86");
    assert!(
        VhostVsock::binary().is_file(),
        "vhost-device-vsock is not installed: `cargo install vhost-device-vsock --locked` (scripts/install-deps does)"
    );
    let d = Daemon::start("");
    let mut cri = d.client().await;
    let mut config = pod_config(&d, "sized", &[]);
    // 1.5 CPUs and 128 MiB on top of the handler's 1 vCPU and 256 MiB.
    config.linux = Some(LinuxPodSandboxConfig {
        resources: Some(LinuxContainerResources {
            cpu_quota: 150_000,
            cpu_period: 100_000,
            memory_limit_in_bytes: 128 << 20,
            ..Default::default()
        }),
        ..Default::default()
    });
    let pod = cri
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: "vm".into(),
        })
        .await
        .unwrap_or_else(|s| panic!("RunPodSandbox: {s:?}"))
        .into_inner()
        .pod_sandbox_id;
    let c = create(
        &mut cri,
        &pod,
        container_config(
            "probe",
            &["sh", "-c"],
            &["grep -c ^processor /proc/cpuinfo; grep MemTotal /proc/meminfo"],
        ),
    )
    .await;
    start(&mut cri, &c).await;
    let st = wait_exited(&mut cri, &c).await;
    assert_eq!(st.exit_code, 0, "{st:?}");
    let lines = log_lines(&d.log_root().join("sized/probe/0.log"), 2).await;
    let out: Vec<&str> = lines.iter().map(|l| parse_record(l).3).collect();
    assert_eq!(out[0], "3", "1 + ⌈1.5⌉ vCPUs: {out:?}");
    let kib: u64 = out[1]
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal in {out:?}"));
    // 384 MiB of RAM minus what the kernel keeps for itself.
    assert!(
        (300 << 10..=384 << 10).contains(&kib),
        "MemTotal {kib} kB for 256 + 128 MiB"
    );
    stop_remove_pod(&mut cri, &pod).await;

    // Beyond the handler's maximum: refused before anything starts.
    let mut huge = pod_config(&d, "huge", &[]);
    huge.linux = Some(LinuxPodSandboxConfig {
        resources: Some(LinuxContainerResources {
            memory_limit_in_bytes: 1 << 50,
            ..Default::default()
        }),
        ..Default::default()
    });
    assert_eq!(
        code(
            cri.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(huge),
                runtime_handler: "vm".into(),
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert_no_leaks(&d, &[pod]);
}
