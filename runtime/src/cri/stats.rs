//! ContainerStats, ListContainerStats, PodSandboxStats, ListPodSandboxStats
//! from the agent's cgroup figures.

use k8s_cri::v1::{
    ContainerAttributes, ContainerMetadata, ContainerStats, ContainerStatsRequest,
    ContainerStatsResponse, CpuUsage, FilesystemIdentifier, FilesystemUsage, LinuxPodSandboxStats,
    ListContainerStatsRequest, ListContainerStatsResponse, ListPodSandboxStatsRequest,
    ListPodSandboxStatsResponse, MemoryUsage, PodSandboxAttributes, PodSandboxMetadata,
    PodSandboxStats, PodSandboxStatsRequest, PodSandboxStatsResponse, UInt64Value,
};
use vmpod_proto::v1 as agent;

use super::store::{ContainerRecord, ContainerState};
use super::{Cri, CriError, labels_match, lock};

/// How long one agent gets to answer a stats call: one hung VM must not
/// stall the node's stats (the kubelet asks every few seconds).
const STATS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// Agents asked at once by the List calls.
const STATS_PARALLEL: usize = 16;

impl Cri {
    async fn stats_of(&self, rec: &ContainerRecord) -> Result<ContainerStats, CriError> {
        let attributes = Some(ContainerAttributes {
            id: rec.id.clone(),
            metadata: Some(ContainerMetadata {
                name: rec.name.clone(),
                attempt: rec.attempt,
            }),
            labels: rec.labels.clone().into_iter().collect(),
            annotations: rec.annotations.clone().into_iter().collect(),
        });
        if rec.state != ContainerState::Running {
            return Ok(ContainerStats {
                attributes,
                ..Default::default()
            });
        }
        let mut req = tonic::Request::new(agent::StatsRequest {
            container_id: rec.id.clone(),
        });
        req.set_timeout(STATS_TIMEOUT);
        let s = self
            .sandbox(&rec.sandbox_id)?
            .agent()?
            .stats(req)
            .await
            .map_err(CriError::agent("Stats"))?
            .into_inner();
        let v = |value| Some(UInt64Value { value });
        Ok(ContainerStats {
            attributes,
            cpu: Some(CpuUsage {
                timestamp: s.timestamp,
                usage_core_nano_seconds: v(s.cpu_usage_ns),
                ..Default::default()
            }),
            memory: Some(MemoryUsage {
                timestamp: s.timestamp,
                working_set_bytes: v(s.memory_working_set_bytes),
                usage_bytes: v(s.memory_usage_bytes),
                ..Default::default()
            }),
            writable_layer: Some(FilesystemUsage {
                timestamp: s.timestamp,
                fs_id: Some(FilesystemIdentifier {
                    mountpoint: String::from("/"),
                }),
                used_bytes: v(s.writable_bytes_used),
                inodes_used: v(s.writable_inodes_used),
            }),
            ..Default::default()
        })
    }

    pub(super) async fn container_stats(
        &self,
        req: ContainerStatsRequest,
    ) -> Result<ContainerStatsResponse, CriError> {
        let rec = self.container(&req.container_id)?.rec();
        Ok(ContainerStatsResponse {
            stats: Some(self.stats_of(&rec).await?),
        })
    }

    pub(super) async fn list_container_stats(
        &self,
        req: ListContainerStatsRequest,
    ) -> Result<ListContainerStatsResponse, CriError> {
        let filter = req.filter.unwrap_or_default();
        let recs: Vec<ContainerRecord> = lock(&self.containers)
            .values()
            .map(|c| c.rec())
            .filter(|r| filter.id.is_empty() || r.id.starts_with(&filter.id))
            .filter(|r| {
                filter.pod_sandbox_id.is_empty() || r.sandbox_id.starts_with(&filter.pod_sandbox_id)
            })
            .filter(|r| labels_match(&r.labels, &filter.label_selector))
            .collect();
        // In parallel; a container that exits between listing and
        // sampling, or whose agent does not answer in time, is left out,
        // not an error of the whole call.
        let mut stats = Vec::new();
        for chunk in recs.chunks(STATS_PARALLEL) {
            let got = futures_util::future::join_all(chunk.iter().map(|r| self.stats_of(r))).await;
            stats.extend(got.into_iter().flatten());
        }
        Ok(ListContainerStatsResponse { stats })
    }

    /// A pod's stats: its containers' figures and their sums (the pod has
    /// no cgroup of its own on the host yet).
    async fn pod_stats_of(&self, id: &str) -> Result<PodSandboxStats, CriError> {
        let rec = self.sandbox(id)?.rec();
        let running: Vec<ContainerRecord> = self
            .containers_of(&rec.id)
            .iter()
            .map(|c| c.rec())
            .filter(|r| r.state == ContainerState::Running)
            .collect();
        let mut containers = Vec::new();
        for chunk in running.chunks(STATS_PARALLEL) {
            let got = futures_util::future::join_all(chunk.iter().map(|r| self.stats_of(r))).await;
            containers.extend(got.into_iter().flatten());
        }
        let now = super::now_ns();
        // The pod's cgroup on the host when it can be read (what the pod
        // costs the node: a VM's memory, the agent, the pumps); otherwise
        // the sum of its containers.
        if let Some(u) = crate::sandbox::cgroups::usage(&rec.cgroup_parent) {
            let v = |value| Some(UInt64Value { value });
            return Ok(self.pod_stats(
                &rec,
                CpuUsage {
                    timestamp: now,
                    usage_core_nano_seconds: v(u.cpu_ns),
                    ..Default::default()
                },
                MemoryUsage {
                    timestamp: now,
                    working_set_bytes: v(u.working_set_bytes),
                    usage_bytes: v(u.memory_bytes),
                    ..Default::default()
                },
                containers,
            ));
        }
        let sum = |f: &dyn Fn(&ContainerStats) -> Option<u64>| {
            Some(UInt64Value {
                value: containers.iter().filter_map(f).sum(),
            })
        };
        let cpu = CpuUsage {
            timestamp: now,
            usage_core_nano_seconds: sum(&|c| {
                c.cpu
                    .as_ref()?
                    .usage_core_nano_seconds
                    .as_ref()
                    .map(|v| v.value)
            }),
            ..Default::default()
        };
        // The backend's own processes on top: a host pod's agent, outside
        // its containers' cgroups; a VM, whose resident memory holds its
        // containers' (so the larger of the two, not the sum).
        let overhead = rec
            .backend
            .as_ref()
            .map(|b| (b.is_vm(), b.overhead_bytes()));
        let with_overhead = |containers: Option<UInt64Value>| {
            let value = containers.map(|v| v.value).unwrap_or(0);
            Some(UInt64Value {
                value: match overhead {
                    Some((true, vm)) => value.max(vm),
                    Some((false, agent)) => value + agent,
                    None => value,
                },
            })
        };
        let memory = MemoryUsage {
            timestamp: now,
            working_set_bytes: with_overhead(sum(&|c| {
                c.memory
                    .as_ref()?
                    .working_set_bytes
                    .as_ref()
                    .map(|v| v.value)
            })),
            usage_bytes: with_overhead(sum(&|c| {
                c.memory.as_ref()?.usage_bytes.as_ref().map(|v| v.value)
            })),
            ..Default::default()
        };
        Ok(self.pod_stats(&rec, cpu, memory, containers))
    }

    fn pod_stats(
        &self,
        rec: &super::store::SandboxRecord,
        cpu: CpuUsage,
        memory: MemoryUsage,
        containers: Vec<ContainerStats>,
    ) -> PodSandboxStats {
        PodSandboxStats {
            attributes: Some(PodSandboxAttributes {
                id: rec.id.clone(),
                metadata: Some(PodSandboxMetadata {
                    name: rec.name.clone(),
                    uid: rec.uid.clone(),
                    namespace: rec.namespace.clone(),
                    attempt: rec.attempt,
                }),
                labels: rec.labels.clone().into_iter().collect(),
                annotations: rec.annotations.clone().into_iter().collect(),
            }),
            linux: Some(LinuxPodSandboxStats {
                cpu: Some(cpu),
                memory: Some(memory),
                containers,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    pub(super) async fn pod_sandbox_stats(
        &self,
        req: PodSandboxStatsRequest,
    ) -> Result<PodSandboxStatsResponse, CriError> {
        Ok(PodSandboxStatsResponse {
            stats: Some(self.pod_stats_of(&req.pod_sandbox_id).await?),
        })
    }

    pub(super) async fn list_pod_sandbox_stats(
        &self,
        req: ListPodSandboxStatsRequest,
    ) -> Result<ListPodSandboxStatsResponse, CriError> {
        let filter = req.filter.unwrap_or_default();
        let ids: Vec<String> = lock(&self.sandboxes)
            .values()
            .map(|s| s.rec())
            .filter(|r| filter.id.is_empty() || r.id.starts_with(&filter.id))
            .filter(|r| labels_match(&r.labels, &filter.label_selector))
            .map(|r| r.id)
            .collect();
        // In parallel; a pod removed meanwhile is not an error of the call.
        let mut stats = Vec::new();
        for chunk in ids.chunks(STATS_PARALLEL) {
            let got =
                futures_util::future::join_all(chunk.iter().map(|id| self.pod_stats_of(id))).await;
            stats.extend(got.into_iter().flatten());
        }
        Ok(ListPodSandboxStatsResponse { stats })
    }
}
