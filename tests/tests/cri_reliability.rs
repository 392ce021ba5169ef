//! Sandboxes that survive real workloads (issue 12): what a node sees when
//! one pod misbehaves. Every scenario on host pods and VM pods (QEMU TCG).
//! Needs root, QEMU and vhost-device-vsock.

use std::time::Duration;

use k8s_cri::v1::*;
use vmpod_tests::cri::*;

vmpod_tests::on_both_backends!(a_hung_sandbox_does_not_stall_the_nodes_stats);

/// The process that is the sandbox: the host agent, or the VM's QEMU.
async fn sandbox_pid(cri: &mut Cri, pod: &str) -> i32 {
    let info = cri
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod.into(),
            verbose: true,
        })
        .await
        .expect("PodSandboxStatus")
        .into_inner()
        .info;
    let verbose: serde_json::Value = serde_json::from_str(&info["info"]).expect("verbose JSON");
    verbose["pid"].as_i64().expect("the sandbox's pid") as i32
}

/// One frozen sandbox (SIGSTOP: its agent never answers) leaves the node's
/// ListContainerStats and ListPodSandboxStats answering in time, with every
/// other pod in them; it only drops out itself. Agents are asked in
/// parallel, each with a short deadline.
async fn a_hung_sandbox_does_not_stall_the_nodes_stats(b: Backend) {
    let d = Daemon::on(b, "");
    let mut cri = d.client().await;
    let healthy = run_pod(&mut cri, pod_config(&d, "healthy", &[])).await;
    let hung = run_pod(&mut cri, pod_config(&d, "hung", &[])).await;
    let mut containers = Vec::new();
    for pod in [&healthy, &hung] {
        let c = run_container(
            &mut cri,
            pod,
            container_config("c", &["sleep", "1000"], &[]),
        )
        .await;
        containers.push(c);
    }
    let pid = sandbox_pid(&mut cri, &hung).await;
    // SAFETY: kill(2) takes plain integers; the PID is the test pod's.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);

    // The kubelet's own deadline for these calls is minutes; a node whose
    // stats wait for its slowest pod is a node whose pods all look dead.
    let mut req = tonic::Request::new(ListContainerStatsRequest::default());
    req.set_timeout(Duration::from_secs(10));
    let stats = cri
        .list_container_stats(req)
        .await
        .expect("ListContainerStats with a frozen pod")
        .into_inner()
        .stats;
    let ids: Vec<String> = stats
        .iter()
        .filter_map(|s| s.attributes.as_ref().map(|a| a.id.clone()))
        .collect();
    assert!(ids.contains(&containers[0]), "{ids:?}");
    assert!(!ids.contains(&containers[1]), "{ids:?}");
    let mut req = tonic::Request::new(ListPodSandboxStatsRequest::default());
    req.set_timeout(Duration::from_secs(10));
    let pods = cri
        .list_pod_sandbox_stats(req)
        .await
        .expect("ListPodSandboxStats with a frozen pod")
        .into_inner()
        .stats;
    let healthy_stats = pods
        .iter()
        .find(|p| p.attributes.as_ref().is_some_and(|a| a.id == healthy))
        .expect("the healthy pod's stats");
    let linux = healthy_stats.linux.as_ref().expect("linux stats");
    assert_eq!(linux.containers.len(), 1, "{linux:?}");

    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    for pod in [&healthy, &hung] {
        stop_remove_pod(&mut cri, pod).await;
    }
    assert_no_leaks(&d, &[healthy, hung]);
}
