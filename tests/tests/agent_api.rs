//! The agent API end to end, once per backend: the agent as a host process
//! over a unix socket, and as PID 1 of a real Linux guest (QEMU microvm,
//! TCG) over hybrid vsock.

use std::time::Duration;

use vmpod_proto::v1::{HealthRequest, ShutdownRequest, VersionRequest, health_response};
use vmpod_tests::sandbox::{Backend, Sandbox};

async fn version_health_shutdown(backend: Backend) {
    let mut sandbox = Sandbox::start(backend);
    let mut agent = sandbox.client().await;

    let health = agent
        .health(HealthRequest {})
        .await
        .expect("Health")
        .into_inner();
    assert_eq!(health.status, health_response::Status::Serving as i32);

    let version = agent
        .version(VersionRequest {})
        .await
        .expect("Version")
        .into_inner();
    assert_eq!(version.api_version, "vmpod.agent.v1");
    assert_eq!(version.agent_version, env!("CARGO_PKG_VERSION"));
    match backend {
        Backend::Host => assert_eq!(version.mode, "host"),
        Backend::QemuTcg => {
            assert_eq!(version.mode, "guest");
            assert!(
                version.kernel_release.starts_with("6.1."),
                "guest kernel {}",
                version.kernel_release
            );
        }
    }

    agent.shutdown(ShutdownRequest {}).await.expect("Shutdown");
    assert!(
        sandbox.wait_ended(Duration::from_secs(60)),
        "the {backend:?} sandbox did not end cleanly after Shutdown\nconsole:\n{}",
        sandbox.console()
    );
}

#[tokio::test]
async fn host_agent_answers_and_shuts_down() {
    version_health_shutdown(Backend::Host).await;
}

#[tokio::test]
async fn guest_agent_answers_over_hybrid_vsock_and_ends_the_vm() {
    version_health_shutdown(Backend::QemuTcg).await;
}
