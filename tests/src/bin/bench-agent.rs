//! Benchmark: container create+start latency and exec round trip through
//! the agent API, on the host backend (agent as a host process) or inside a
//! QEMU TCG guest over hybrid vsock.
//!
//! Usage: bench-agent [host|qemu-tcg] [iterations]   (run by bench/agent)

use std::time::{Duration, Instant};

use vmpod_proto::v1::*;
use vmpod_tests::sandbox::{Backend, Sandbox};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{what}: n={} min {:.1} ms, p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms",
        samples.len(),
        ms(samples[0]),
        ms(percentile(&samples, 0.5)),
        ms(percentile(&samples, 0.9)),
        ms(*samples.last().expect("samples")),
    );
}

fn process(args: &[&str]) -> Option<Process> {
    Some(Process {
        args: args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let backend = match args.next().as_deref() {
        None | Some("host") => Backend::Host,
        Some("qemu-tcg") => Backend::QemuTcg,
        Some(other) => panic!("unknown backend {other:?}: host or qemu-tcg"),
    };
    let n: usize = args
        .next()
        .map(|s| s.parse().expect("iterations"))
        .unwrap_or(50);
    let sandbox = Sandbox::start(backend);
    let mut agent = sandbox.client().await;
    let rootfs = Some(Rootfs {
        source: sandbox.image_source.clone(),
        ..Default::default()
    });

    let mut create_start = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("b{i}");
        let req = CreateContainerRequest {
            container_id: id.clone(),
            rootfs: rootfs.clone(),
            process: process(&["true"]),
            ..Default::default()
        };
        let t = Instant::now();
        agent.create_container(req).await.expect("create");
        agent
            .start_container(StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .expect("start");
        create_start.push(t.elapsed());
        agent
            .wait_process(WaitProcessRequest {
                container_id: id.clone(),
                exec_id: String::new(),
            })
            .await
            .expect("wait");
        agent
            .remove_container(RemoveContainerRequest { container_id: id })
            .await
            .expect("remove");
    }

    let req = CreateContainerRequest {
        container_id: "long".into(),
        rootfs,
        process: process(&["sleep", "100000"]),
        ..Default::default()
    };
    agent.create_container(req).await.expect("create");
    agent
        .start_container(StartContainerRequest {
            container_id: "long".into(),
        })
        .await
        .expect("start");
    let mut exec_rt = Vec::with_capacity(n);
    for i in 0..n {
        let exec_id = format!("e{i}");
        let t = Instant::now();
        let req = ExecProcessRequest {
            container_id: "long".into(),
            exec_id: exec_id.clone(),
            process: process(&["true"]),
        };
        agent.exec_process(req).await.expect("exec");
        agent
            .wait_process(WaitProcessRequest {
                container_id: "long".into(),
                exec_id,
            })
            .await
            .expect("wait");
        exec_rt.push(t.elapsed());
    }
    agent
        .remove_container(RemoveContainerRequest {
            container_id: "long".into(),
        })
        .await
        .expect("remove");

    println!("backend {backend:?}");
    report("container create+start", create_start);
    report(
        "exec round trip (ExecProcess + WaitProcess of `true`)",
        exec_rt,
    );
}
