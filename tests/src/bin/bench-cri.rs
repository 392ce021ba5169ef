//! Benchmark of a CRI runtime over its socket: any runtime (vmpod serve,
//! containerd, ...), driven the way a kubelet drives it.
//!
//! Usage:
//!   bench-cri --socket PATH --handler NAME --image REF --iterations N
//!             [--warmup W] [--idle-pods M] [--settle-secs S] [--log-dir DIR]
//!             [--cgroup-parent PREFIX] [--daemon-pid PID] [--max-failures K]
//!             [--json]
//!   bench-cri --socket PATH --cleanup
//!
//! Latency: W warm-up iterations (reported apart, default 2), then N
//! measured ones, each: RunPodSandbox; CreateContainer + StartContainer of
//! `sleep 3600`; ExecSync of `echo hi` (exit 0 and output checked);
//! StopContainer (timeout 0: `sleep` as its namespace's PID 1 ignores
//! SIGTERM, so every runtime goes straight to SIGKILL), StopPodSandbox,
//! RemovePodSandbox. A failed iteration (or idle pod) is reported with its
//! error, its pod removed, and another one run in its place; more than K
//! failures (default 0) end the run with the error.
//!
//! Memory: M pods with one sleeping container each, left to settle for S
//! seconds, then (a) the sum of the PSS (`/proc/PID/smaps_rollup`) of the
//! pods' processes, per pod, and (b) the drop of MemAvailable per pod
//! against the mean of the levels before the pods started and after they
//! were removed (a steady drift of the rest of the machine cancels out).
//! A process belongs to a pod when its command line or its cgroup path
//! names the first 16 characters of the pod's sandbox ID, or when it
//! descends from such a process. That finds containerd's shim (`-id <ID>`)
//! and under it the pause and container processes; vmpod's agent
//! (`--state-dir .../sandboxes/<ID>/agent`) and its containers (cgroup
//! `/vmpod/<ID>/...`), and the QEMU, vhost-device-vsock and log-pump
//! processes of a pod (they name its socket dir `<state>/s/<ID[..16]>/`).
//!
//! Every pod carries the label `vmpod-bench=1`; `--cleanup` stops and removes
//! all such pods (the bench script runs it when anything failed).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::{Channel, Endpoint};

/// The label on every pod this benchmark makes.
const LABEL: &str = "vmpod-bench";
/// How long RunPodSandbox may take (a VM pod under TCG boots a kernel).
const RUN_POD_TIMEOUT: Duration = Duration::from_secs(180);
/// How long any other call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// ExecSync's own timeout, in seconds (the runtime enforces it).
const EXEC_TIMEOUT_SECS: i64 = 10;

type Cri = RuntimeServiceClient<Channel>;

#[derive(Debug)]
struct Args {
    socket: PathBuf,
    handler: String,
    image: String,
    iterations: usize,
    warmup: usize,
    idle_pods: usize,
    settle: Duration,
    log_dir: Option<PathBuf>,
    cgroup_parent: Option<String>,
    daemon_pid: Option<i32>,
    max_failures: usize,
    json: bool,
    cleanup: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        socket: PathBuf::new(),
        handler: String::new(),
        image: String::new(),
        iterations: 50,
        warmup: 2,
        idle_pods: 10,
        settle: Duration::from_secs(10),
        log_dir: None,
        cgroup_parent: None,
        daemon_pid: None,
        max_failures: 0,
        json: false,
        cleanup: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| anyhow!("{flag} needs a value"));
        match flag.as_str() {
            "--socket" => args.socket = value()?.into(),
            "--handler" => args.handler = value()?,
            "--image" => args.image = value()?,
            "--iterations" => args.iterations = value()?.parse().context("--iterations")?,
            "--warmup" => args.warmup = value()?.parse().context("--warmup")?,
            "--idle-pods" => args.idle_pods = value()?.parse().context("--idle-pods")?,
            "--settle-secs" => {
                args.settle = Duration::from_secs(value()?.parse().context("--settle-secs")?)
            }
            "--log-dir" => args.log_dir = Some(value()?.into()),
            "--cgroup-parent" => args.cgroup_parent = Some(value()?),
            "--daemon-pid" => args.daemon_pid = Some(value()?.parse().context("--daemon-pid")?),
            "--max-failures" => args.max_failures = value()?.parse().context("--max-failures")?,
            "--json" => args.json = true,
            "--cleanup" => args.cleanup = true,
            other => bail!("unknown argument {other:?} (see the module docs for usage)"),
        }
    }
    ensure!(!args.socket.as_os_str().is_empty(), "--socket is required");
    if !args.cleanup {
        ensure!(!args.image.is_empty(), "--image is required");
        ensure!(args.iterations > 0, "--iterations must be at least 1");
    }
    Ok(args)
}

async fn connect(socket: &Path) -> anyhow::Result<Cri> {
    let path = socket.to_path_buf();
    let endpoint = Endpoint::from_static("http://cri").connect_timeout(Duration::from_secs(10));
    let channel =
        endpoint.connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }));
    let channel = tokio::time::timeout(Duration::from_secs(15), channel)
        .await
        .map_err(|_| anyhow!("connecting to {} timed out", socket.display()))?
        .with_context(|| format!("connecting to {}", socket.display()))?;
    Ok(RuntimeServiceClient::new(channel))
}

/// Runs one CRI call with a deadline (also sent to the server as
/// grpc-timeout); the error names the call.
async fn call<T>(
    what: &str,
    limit: Duration,
    fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(limit, fut).await {
        Err(_) => bail!("{what} did not answer within {limit:?}"),
        Ok(Err(status)) => bail!("{what}: {:?}: {}", status.code(), status.message()),
        Ok(Ok(resp)) => Ok(resp.into_inner()),
    }
}

fn request<T>(msg: T, limit: Duration) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(limit);
    req
}

/// What differs between the pods of one run.
struct PodNames {
    /// Unique per bench process, so pods of an earlier run never collide.
    tag: String,
}

impl PodNames {
    fn new() -> PodNames {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        PodNames {
            tag: format!("{}-{now}", std::process::id()),
        }
    }

    fn name(&self, kind: &str, i: usize) -> String {
        format!("bench-{kind}-{i}")
    }

    fn uid(&self, kind: &str, i: usize) -> String {
        format!("{}-{kind}-{i}", self.tag)
    }
}

fn namespaces() -> Option<NamespaceOption> {
    // What a kubelet sends for a pod without shareProcessNamespace.
    Some(NamespaceOption {
        network: NamespaceMode::Pod as i32,
        pid: NamespaceMode::Container as i32,
        ipc: NamespaceMode::Pod as i32,
        ..Default::default()
    })
}

fn pod_config(args: &Args, names: &PodNames, kind: &str, i: usize) -> PodSandboxConfig {
    let name = names.name(kind, i);
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.clone(),
            uid: names.uid(kind, i),
            namespace: "bench".into(),
            attempt: 0,
        }),
        hostname: name.clone(),
        log_directory: args
            .log_dir
            .as_ref()
            .map(|d| d.join(names.uid(kind, i)).display().to_string())
            .unwrap_or_default(),
        labels: [(LABEL.to_string(), "1".to_string())].into(),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: args
                .cgroup_parent
                .as_ref()
                .map(|p| format!("{p}/{}", names.uid(kind, i)))
                .unwrap_or_default(),
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: namespaces(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn container_config(args: &Args) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "sleep".into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: args.image.clone(),
            ..Default::default()
        }),
        command: vec!["sleep".into(), "3600".into()],
        log_path: if args.log_dir.is_some() {
            "sleep/0.log".into()
        } else {
            String::new()
        },
        labels: [(LABEL.to_string(), "1".to_string())].into(),
        linux: Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                namespace_options: namespaces(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The kubelet's part around a pod's life that is not a CRI call: the pod's
/// log directory before, the log directory and the pod cgroup after.
fn prepare_host_dirs(config: &PodSandboxConfig) -> anyhow::Result<()> {
    if !config.log_directory.is_empty() {
        let dir = Path::new(&config.log_directory).join("sleep");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(())
}

fn remove_host_dirs(config: &PodSandboxConfig) {
    if !config.log_directory.is_empty() {
        let _ = std::fs::remove_dir_all(&config.log_directory);
    }
    let parent = config
        .linux
        .as_ref()
        .map(|l| l.cgroup_parent.trim_start_matches('/'))
        .unwrap_or_default();
    if parent.is_empty() {
        return;
    }
    // Every v1 hierarchy and the v2 root: rmdir only succeeds on an empty
    // cgroup, which is what the runtime left after RemovePodSandbox.
    let mut roots = vec![PathBuf::from("/sys/fs/cgroup")];
    if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
        roots.extend(entries.flatten().map(|e| e.path()));
    }
    for root in roots {
        let _ = std::fs::remove_dir(root.join(parent));
    }
}

/// One pod with one running `sleep` container.
struct Pod {
    id: String,
    container: String,
    config: PodSandboxConfig,
}

/// Per-operation times of one iteration.
#[derive(Clone, Debug, Default)]
struct Times {
    run_pod: Duration,
    create: Duration,
    start: Duration,
    exec: Duration,
    stop_container: Duration,
    stop_pod: Duration,
    remove_pod: Duration,
}

/// How to get one operation's time from an iteration's times.
type Op = fn(&Times) -> Duration;

/// The operations reported, in order.
const OPS: &[(&str, Op)] = &[
    ("RunPodSandbox", |t| t.run_pod),
    ("CreateContainer", |t| t.create),
    ("StartContainer", |t| t.start),
    ("CreateContainer+StartContainer", |t| t.create + t.start),
    ("ExecSync", |t| t.exec),
    ("StopContainer", |t| t.stop_container),
    ("StopPodSandbox", |t| t.stop_pod),
    ("RemovePodSandbox", |t| t.remove_pod),
    ("StopContainer+StopPodSandbox+RemovePodSandbox", |t| {
        t.stop_container + t.stop_pod + t.remove_pod
    }),
    ("whole iteration", |t| {
        t.run_pod + t.create + t.start + t.exec + t.stop_container + t.stop_pod + t.remove_pod
    }),
];

struct Bench {
    cri: Cri,
    args: Args,
    names: PodNames,
    /// Pods made and not yet removed, torn down when a step fails.
    live: BTreeMap<String, PodSandboxConfig>,
    /// Failed attempts so far (what and why), reported; more than
    /// `--max-failures` ends the run.
    failures: Vec<serde_json::Value>,
}

impl Bench {
    /// RunPodSandbox, then CreateContainer + StartContainer; times each.
    async fn start_pod(&mut self, kind: &str, i: usize, t: &mut Times) -> anyhow::Result<Pod> {
        let config = pod_config(&self.args, &self.names, kind, i);
        prepare_host_dirs(&config)?;
        let started = Instant::now();
        let id = call(
            "RunPodSandbox",
            RUN_POD_TIMEOUT,
            self.cri.run_pod_sandbox(request(
                RunPodSandboxRequest {
                    config: Some(config.clone()),
                    runtime_handler: self.args.handler.clone(),
                },
                RUN_POD_TIMEOUT,
            )),
        )
        .await?
        .pod_sandbox_id;
        t.run_pod = started.elapsed();
        ensure!(id.len() >= 16, "RunPodSandbox returned a short ID {id:?}");
        self.live.insert(id.clone(), config.clone());

        let started = Instant::now();
        let container = call(
            "CreateContainer",
            CALL_TIMEOUT,
            self.cri.create_container(request(
                CreateContainerRequest {
                    pod_sandbox_id: id.clone(),
                    config: Some(container_config(&self.args)),
                    sandbox_config: Some(config.clone()),
                },
                CALL_TIMEOUT,
            )),
        )
        .await?
        .container_id;
        t.create = started.elapsed();

        let started = Instant::now();
        call(
            "StartContainer",
            CALL_TIMEOUT,
            self.cri.start_container(request(
                StartContainerRequest {
                    container_id: container.clone(),
                },
                CALL_TIMEOUT,
            )),
        )
        .await?;
        t.start = started.elapsed();
        Ok(Pod {
            id,
            container,
            config,
        })
    }

    /// ExecSync of `echo hi`; checks exit code and output.
    async fn exec(&mut self, pod: &Pod, t: &mut Times) -> anyhow::Result<()> {
        let limit = Duration::from_secs(EXEC_TIMEOUT_SECS as u64) + CALL_TIMEOUT;
        let started = Instant::now();
        let resp = call(
            "ExecSync",
            limit,
            self.cri.exec_sync(request(
                ExecSyncRequest {
                    container_id: pod.container.clone(),
                    cmd: vec!["echo".into(), "hi".into()],
                    timeout: EXEC_TIMEOUT_SECS,
                },
                limit,
            )),
        )
        .await?;
        t.exec = started.elapsed();
        ensure!(
            resp.exit_code == 0 && resp.stdout == b"hi\n",
            "ExecSync of `echo hi`: exit {}, stdout {:?}, stderr {:?}",
            resp.exit_code,
            String::from_utf8_lossy(&resp.stdout),
            String::from_utf8_lossy(&resp.stderr)
        );
        Ok(())
    }

    /// StopContainer, StopPodSandbox, RemovePodSandbox; times each.
    async fn teardown(&mut self, pod: &Pod, t: &mut Times) -> anyhow::Result<()> {
        let started = Instant::now();
        call(
            "StopContainer",
            CALL_TIMEOUT,
            self.cri.stop_container(request(
                StopContainerRequest {
                    container_id: pod.container.clone(),
                    timeout: 0,
                },
                CALL_TIMEOUT,
            )),
        )
        .await?;
        t.stop_container = started.elapsed();
        self.remove(&pod.id, t).await?;
        remove_host_dirs(&pod.config);
        Ok(())
    }

    /// StopPodSandbox + RemovePodSandbox of one pod.
    async fn remove(&mut self, id: &str, t: &mut Times) -> anyhow::Result<()> {
        let started = Instant::now();
        call(
            "StopPodSandbox",
            CALL_TIMEOUT,
            self.cri.stop_pod_sandbox(request(
                StopPodSandboxRequest {
                    pod_sandbox_id: id.into(),
                },
                CALL_TIMEOUT,
            )),
        )
        .await?;
        t.stop_pod = started.elapsed();
        let started = Instant::now();
        call(
            "RemovePodSandbox",
            CALL_TIMEOUT,
            self.cri.remove_pod_sandbox(request(
                RemovePodSandboxRequest {
                    pod_sandbox_id: id.into(),
                },
                CALL_TIMEOUT,
            )),
        )
        .await?;
        t.remove_pod = started.elapsed();
        self.live.remove(id);
        Ok(())
    }

    /// One measured (or warm-up) iteration.
    async fn iteration(&mut self, kind: &str, i: usize) -> anyhow::Result<Times> {
        let mut t = Times::default();
        let pod = self.start_pod(kind, i, &mut t).await?;
        self.exec(&pod, &mut t).await?;
        self.teardown(&pod, &mut t).await?;
        Ok(t)
    }

    /// Records a failed attempt and removes what it left; the error again
    /// once there were more failures than allowed.
    async fn failed(
        &mut self,
        what: String,
        err: anyhow::Error,
        keep: &BTreeSet<String>,
    ) -> anyhow::Result<()> {
        eprintln!("bench-cri: {what} failed: {err:#}");
        self.failures
            .push(serde_json::json!({ "what": what, "error": format!("{err:#}") }));
        self.remove_live_except(keep).await;
        if self.failures.len() > self.args.max_failures {
            return Err(err.context(format!(
                "{what} ({} failures, --max-failures {})",
                self.failures.len(),
                self.args.max_failures
            )));
        }
        Ok(())
    }

    /// Best effort: stops and removes every pod still live but those in
    /// `keep`.
    async fn remove_live_except(&mut self, keep: &BTreeSet<String>) {
        let live: Vec<(String, PodSandboxConfig)> = self
            .live
            .iter()
            .filter(|(id, _)| !keep.contains(*id))
            .map(|(id, c)| (id.clone(), c.clone()))
            .collect();
        for (id, config) in live {
            self.live.remove(&id);
            if let Err(e) = self.remove(&id, &mut Times::default()).await {
                eprintln!("bench-cri: cleaning up pod {id}: {e:#}");
            }
            remove_host_dirs(&config);
        }
    }

    /// The idle-pod memory measurement.
    async fn idle_memory(&mut self) -> anyhow::Result<serde_json::Value> {
        let m = self.args.idle_pods;
        let daemon_before = self.args.daemon_pid.and_then(pss_kib);
        let avail_before = mem_available_kib().await?;
        let started = Instant::now();
        let mut pods = Vec::with_capacity(m);
        let mut attempt = 0;
        while pods.len() < m {
            attempt += 1;
            match self.start_pod("idle", attempt, &mut Times::default()).await {
                Ok(pod) => pods.push(pod),
                Err(e) => {
                    let keep = pods.iter().map(|p: &Pod| p.id.clone()).collect();
                    self.failed(format!("idle pod {attempt}"), e, &keep).await?;
                }
            }
        }
        let start_secs = started.elapsed().as_secs_f64();
        tokio::time::sleep(self.args.settle).await;

        let table = process_table();
        let mut total_pss = 0u64;
        let mut processes = 0usize;
        let mut by_comm: BTreeMap<String, u64> = BTreeMap::new();
        let mut seen = BTreeSet::new();
        for pod in &pods {
            let pids = pod_processes(&table, &pod.id);
            ensure!(
                !pids.is_empty(),
                "found no process of pod {} (by command line, cgroup or ancestry)",
                pod.id
            );
            for pid in pids {
                // A process must count for one pod only.
                ensure!(seen.insert(pid), "process {pid} matches two pods");
                let Some(pss) = pss_kib(pid) else { continue };
                total_pss += pss;
                processes += 1;
                let comm = table.get(&pid).map(|p| p.comm.clone()).unwrap_or_default();
                *by_comm.entry(comm).or_default() += pss;
            }
        }
        let avail_after = mem_available_kib().await?;
        let daemon_after = self.args.daemon_pid.and_then(pss_kib);

        let started = Instant::now();
        for pod in &pods {
            let mut t = Times::default();
            self.teardown(pod, &mut t).await?;
        }
        let teardown_secs = started.elapsed().as_secs_f64();
        // The machine is shared: the mean of the levels before and after
        // the pods is the baseline, so a steady drift cancels out.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let avail_end = mem_available_kib().await?;
        let baseline = (avail_before as f64 + avail_end as f64) / 2.0;

        let per_pod = |kib: u64| kib as f64 / m as f64;
        Ok(serde_json::json!({
            "pods": m,
            "settle_secs": self.args.settle.as_secs(),
            "start_all_secs": start_secs,
            "teardown_all_secs": teardown_secs,
            "processes_per_pod": processes as f64 / m as f64,
            "pss_kib_per_pod": per_pod(total_pss),
            "pss_kib_per_pod_by_process": by_comm
                .iter()
                .map(|(c, k)| (c.clone(), serde_json::json!(per_pod(*k))))
                .collect::<serde_json::Map<_, _>>(),
            "memavailable_drop_kib_per_pod": (baseline - avail_after as f64) / m as f64,
            "memavailable_kib_before_during_after": [avail_before, avail_after, avail_end],
            "daemon_pss_kib_before": daemon_before,
            "daemon_pss_kib_after": daemon_after,
        }))
    }
}

/// Stops and removes every pod labelled by this benchmark.
async fn cleanup(cri: &mut Cri) -> anyhow::Result<usize> {
    let pods = call(
        "ListPodSandbox",
        CALL_TIMEOUT,
        cri.list_pod_sandbox(request(
            ListPodSandboxRequest {
                filter: Some(PodSandboxFilter {
                    label_selector: [(LABEL.to_string(), "1".to_string())].into(),
                    ..Default::default()
                }),
            },
            CALL_TIMEOUT,
        )),
    )
    .await?
    .items;
    for pod in &pods {
        for (what, res) in [
            (
                "StopPodSandbox",
                call(
                    "StopPodSandbox",
                    CALL_TIMEOUT,
                    cri.stop_pod_sandbox(request(
                        StopPodSandboxRequest {
                            pod_sandbox_id: pod.id.clone(),
                        },
                        CALL_TIMEOUT,
                    )),
                )
                .await
                .map(drop),
            ),
            (
                "RemovePodSandbox",
                call(
                    "RemovePodSandbox",
                    CALL_TIMEOUT,
                    cri.remove_pod_sandbox(request(
                        RemovePodSandboxRequest {
                            pod_sandbox_id: pod.id.clone(),
                        },
                        CALL_TIMEOUT,
                    )),
                )
                .await
                .map(drop),
            ),
        ] {
            if let Err(e) = res {
                eprintln!("bench-cri --cleanup: {what} {}: {e:#}", pod.id);
            }
        }
    }
    Ok(pods.len())
}

// --- processes and memory ---

struct Proc {
    ppid: i32,
    comm: String,
    /// Command line, NULs as spaces, plus the cgroup file.
    names: String,
}

/// Every process now: parent, name, command line and cgroups.
fn process_table() -> HashMap<i32, Proc> {
    let mut table = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return table;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // comm may hold spaces and parentheses: it ends at the last ')'.
        let Some((head, tail)) = stat.rsplit_once(')') else {
            continue;
        };
        let comm = head.split_once('(').map(|(_, c)| c).unwrap_or_default();
        let Some(ppid) = tail.split_whitespace().nth(1).and_then(|p| p.parse().ok()) else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cgroup = std::fs::read_to_string(e.path().join("cgroup")).unwrap_or_default();
        table.insert(
            pid,
            Proc {
                ppid,
                comm: comm.to_string(),
                names: format!(
                    "{} {cgroup}",
                    String::from_utf8_lossy(&cmdline).replace('\0', " ")
                ),
            },
        );
    }
    table
}

/// The processes of the pod with sandbox ID `id` (see the module docs).
fn pod_processes(table: &HashMap<i32, Proc>, id: &str) -> BTreeSet<i32> {
    let me = std::process::id() as i32;
    let key = id.get(..16).unwrap_or(id);
    let mut found: BTreeSet<i32> = table
        .iter()
        .filter(|(pid, p)| **pid != me && p.names.contains(key))
        .map(|(pid, _)| *pid)
        .collect();
    // Descendants, to a fixed point (the table is a snapshot: no cycles
    // beyond PID reuse, which a bounded loop survives).
    for _ in 0..64 {
        let more: Vec<i32> = table
            .iter()
            .filter(|(pid, p)| found.contains(&p.ppid) && !found.contains(pid))
            .map(|(pid, _)| *pid)
            .collect();
        if more.is_empty() {
            break;
        }
        found.extend(more);
    }
    found
}

/// A process's proportional set size, in KiB (None for kernel threads and
/// processes that ended).
fn pss_kib(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// MemAvailable in KiB, the mean of five samples 200 ms apart.
async fn mem_available_kib() -> anyhow::Result<u64> {
    let mut sum = 0u64;
    for i in 0..5 {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let text = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
        let kib = text
            .lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .ok_or_else(|| anyhow!("no MemAvailable in /proc/meminfo"))?;
        sum += kib;
    }
    Ok(sum / 5)
}

// --- statistics and output ---

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn stats(samples: &[Times]) -> Vec<serde_json::Value> {
    OPS.iter()
        .map(|(name, get)| {
            let mut v: Vec<Duration> = samples.iter().map(get).collect();
            v.sort();
            serde_json::json!({
                "op": name,
                "n": v.len(),
                "min_ms": ms(v[0]),
                "p50_ms": ms(percentile(&v, 0.5)),
                "p90_ms": ms(percentile(&v, 0.9)),
                "max_ms": ms(v[v.len() - 1]),
            })
        })
        .collect()
}

fn warmup_json(samples: &[Times]) -> Vec<serde_json::Value> {
    samples
        .iter()
        .map(|t| {
            OPS.iter()
                .map(|(name, get)| (name.to_string(), serde_json::json!(ms(get(t)))))
                .collect::<serde_json::Map<_, _>>()
                .into()
        })
        .collect()
}

fn print_text(report: &serde_json::Value) {
    let r = &report["runtime"];
    println!(
        "runtime {} {} (CRI {}), handler {:?}, image {}",
        r["name"].as_str().unwrap_or("?"),
        r["version"].as_str().unwrap_or("?"),
        r["api_version"].as_str().unwrap_or("?"),
        report["handler"].as_str().unwrap_or(""),
        report["image"].as_str().unwrap_or("?"),
    );
    if let Some(warm) = report["warmup"].as_array() {
        for (i, w) in warm.iter().enumerate() {
            let ops: Vec<String> = OPS
                .iter()
                .map(|(n, _)| format!("{n} {} ms", w[n]))
                .collect();
            println!("warm-up {}: {}", i + 1, ops.join(", "));
        }
    }
    if let Some(failures) = report["failures"].as_array() {
        for f in failures {
            println!("FAILED {}: {}", f["what"], f["error"]);
        }
    }
    if let Some(ops) = report["latency"].as_array() {
        for o in ops {
            println!(
                "{}: n={} min {} ms, p50 {} ms, p90 {} ms, max {} ms",
                o["op"].as_str().unwrap_or("?"),
                o["n"],
                o["min_ms"],
                o["p50_ms"],
                o["p90_ms"],
                o["max_ms"]
            );
        }
    }
    let idle = &report["idle"];
    if idle.is_object() {
        println!(
            "idle pods: {} (settled {} s; started in {:.1} s, removed in {:.1} s)",
            idle["pods"],
            idle["settle_secs"],
            idle["start_all_secs"].as_f64().unwrap_or(0.0),
            idle["teardown_all_secs"].as_f64().unwrap_or(0.0)
        );
        println!(
            "  PSS per pod {:.0} KiB over {} processes per pod; MemAvailable drop per pod {:.0} KiB",
            idle["pss_kib_per_pod"].as_f64().unwrap_or(0.0),
            idle["processes_per_pod"],
            idle["memavailable_drop_kib_per_pod"]
                .as_f64()
                .unwrap_or(0.0)
        );
        if let Some(by) = idle["pss_kib_per_pod_by_process"].as_object() {
            for (comm, kib) in by {
                println!("    {comm}: {:.0} KiB per pod", kib.as_f64().unwrap_or(0.0));
            }
        }
        println!(
            "  daemon PSS before/after: {} / {} KiB",
            idle["daemon_pss_kib_before"], idle["daemon_pss_kib_after"]
        );
    }
}

async fn run(bench: &mut Bench) -> anyhow::Result<serde_json::Value> {
    let version = call(
        "Version",
        CALL_TIMEOUT,
        bench
            .cri
            .version(request(VersionRequest::default(), CALL_TIMEOUT)),
    )
    .await?;
    // A failed attempt (see --max-failures) is reported, not measured;
    // the loops go on until they have their count of good iterations.
    let mut warmup = Vec::new();
    let mut samples = Vec::with_capacity(bench.args.iterations);
    let mut attempt = 0;
    while samples.len() < bench.args.iterations {
        attempt += 1;
        let warm = warmup.len() < bench.args.warmup;
        match bench
            .iteration(if warm { "warm" } else { "it" }, attempt)
            .await
        {
            Ok(t) if warm => warmup.push(t),
            Ok(t) => samples.push(t),
            Err(e) => {
                bench
                    .failed(format!("iteration {attempt}"), e, &BTreeSet::new())
                    .await?
            }
        }
    }
    let idle = if bench.args.idle_pods > 0 {
        bench.idle_memory().await?
    } else {
        serde_json::Value::Null
    };
    Ok(serde_json::json!({
        "runtime": {
            "name": version.runtime_name,
            "version": version.runtime_version,
            "api_version": version.runtime_api_version,
        },
        "handler": bench.args.handler,
        "image": bench.args.image,
        "iterations": bench.args.iterations,
        "failures": bench.failures,
        "warmup": warmup_json(&warmup),
        "latency": stats(&samples),
        "idle": idle,
    }))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let mut cri = connect(&args.socket).await?;
    if args.cleanup {
        let n = cleanup(&mut cri).await?;
        eprintln!("bench-cri --cleanup: {n} pods removed");
        return Ok(());
    }
    let mut bench = Bench {
        cri,
        args,
        names: PodNames::new(),
        live: BTreeMap::new(),
        failures: Vec::new(),
    };
    let result = run(&mut bench).await;
    // Whatever failed, no pod of ours stays behind.
    bench.remove_live_except(&BTreeSet::new()).await;
    let report = result?;
    if bench.args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report);
    }
    Ok(())
}
