//! Pod networking through CNI (the Container Network Interface, spec 1.0.0;
//! 0.4.0 and 0.3.x network configurations work too).
//!
//! As containerd does: the network is the config named by `[cni] network`,
//! else the first `.conflist`/`.conf`/`.json` file in `conf_dir` by file
//! name. RunPodSandbox runs ADD for each plugin of the list in order, each
//! getting the previous plugin's result as `prevResult`; teardown runs DEL in
//! reverse order with the final result. What DEL needs (the network config
//! and the result) is persisted in the sandbox record, so a restarted daemon
//! still tears down what an earlier one set up, even if the config files
//! have changed since.
//!
//! Every plugin call has a timeout and bounded output; a failing plugin's
//! JSON error (`code`, `msg`, `details`) becomes the error message.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long one plugin call may take (IPAM plugins may wait for a lock).
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(30);
/// The most a plugin may print on stdout (a result or an error).
const MAX_OUTPUT: u64 = 1 << 20;
/// The most of a plugin's stderr kept for an error message.
const MAX_STDERR: u64 = 8 << 10;
/// The largest network configuration file read.
const MAX_CONFIG: u64 = 1 << 20;
/// Config versions whose ADD result this module understands.
const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The interface name inside the pod, as every CRI runtime uses.
pub const POD_IFNAME: &str = "eth0";

/// Errors from CNI configuration and plugin calls.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("no network configuration in {0}")]
    NoConfig(PathBuf),
    #[error("no network named {name:?} in {dir}")]
    NoSuchNetwork { name: String, dir: PathBuf },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid network configuration {path}: {what}")]
    InvalidConfig { path: PathBuf, what: String },
    #[error("port {0} of a port mapping is not in 1..=65535")]
    BadPortMapping(i32),
    #[error("CNI plugin {0:?} not found in the bin dirs")]
    PluginNotFound(String),
    #[error("running CNI plugin {plugin} ({command})")]
    Spawn {
        plugin: PathBuf,
        command: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("CNI plugin {plugin} ({command}) did not finish within {timeout:?}")]
    Timeout {
        plugin: String,
        command: &'static str,
        timeout: Duration,
    },
    #[error("CNI plugin {plugin} ({command}) failed: {message}")]
    Plugin {
        plugin: String,
        command: &'static str,
        message: String,
    },
    #[error("CNI plugin {plugin} ({command}) printed an invalid result: {what}")]
    BadResult {
        plugin: String,
        command: &'static str,
        what: String,
    },
}

/// A network configuration list, as loaded (a single-plugin `.conf` is
/// turned into a list of one). Serialized into the sandbox record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NetworkList {
    pub name: String,
    pub cni_version: String,
    /// Each plugin's configuration object, as in the file.
    pub plugins: Vec<Value>,
    /// The file it came from.
    pub source: PathBuf,
}

impl NetworkList {
    /// Parses a `.conflist` (with `plugins`) or a single-plugin `.conf`.
    pub fn parse(path: &Path, text: &str) -> Result<NetworkList, CniError> {
        let invalid = |what: String| CniError::InvalidConfig {
            path: path.to_path_buf(),
            what,
        };
        let v: Value = serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let obj = v
            .as_object()
            .ok_or_else(|| invalid("not a JSON object".into()))?;
        let name = obj
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| invalid("no \"name\"".into()))?
            .to_string();
        let cni_version = obj
            .get("cniVersion")
            .and_then(Value::as_str)
            .unwrap_or("0.3.0")
            .to_string();
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(invalid(format!(
                "cniVersion {cni_version:?} is not supported (only {})",
                SUPPORTED_VERSIONS.join(", ")
            )));
        }
        if obj.get("disabled").and_then(Value::as_bool) == Some(true) {
            return Err(invalid("the network is disabled".into()));
        }
        let plugins = match obj.get("plugins") {
            Some(Value::Array(list)) => list.clone(),
            Some(_) => return Err(invalid("\"plugins\" is not a list".into())),
            None => vec![v.clone()],
        };
        if plugins.is_empty() {
            return Err(invalid("no plugins".into()));
        }
        for p in &plugins {
            let kind = p.get("type").and_then(Value::as_str).unwrap_or_default();
            if !valid_plugin_type(kind) {
                return Err(invalid(format!("invalid plugin type {kind:?}")));
            }
        }
        Ok(NetworkList {
            name,
            cni_version,
            plugins,
            source: path.to_path_buf(),
        })
    }

    /// Plugin `i`'s stdin: its object plus the list's name and version and,
    /// when there is one, the previous result.
    /// Plugin `i`'s stdin: its config with the list's name and version, the
    /// previous result, and the runtime config of the capabilities it
    /// declares (CNI conventions; containerd sets `portMappings`).
    fn plugin_config(
        &self,
        i: usize,
        prev: Option<&Value>,
        pod: &PodRef,
    ) -> Result<Vec<u8>, CniError> {
        let mut conf = self.plugins.get(i).cloned().unwrap_or(Value::Null);
        if let Some(obj) = conf.as_object_mut() {
            obj.insert("name".into(), Value::String(self.name.clone()));
            obj.insert("cniVersion".into(), Value::String(self.cni_version.clone()));
            let wants_ports = obj
                .get("capabilities")
                .and_then(|c| c.get("portMappings"))
                .and_then(Value::as_bool)
                .unwrap_or(false);
            if wants_ports && !pod.port_mappings.is_empty() {
                let runtime = obj
                    .entry("runtimeConfig")
                    .or_insert_with(|| Value::Object(Default::default()));
                if let Some(runtime) = runtime.as_object_mut() {
                    runtime.insert("portMappings".into(), serde_json::json!(pod.port_mappings));
                }
            }
            match prev {
                Some(p) => {
                    obj.insert("prevResult".into(), p.clone());
                }
                None => {
                    obj.remove("prevResult");
                }
            }
        }
        serde_json::to_vec(&conf).map_err(|e| CniError::InvalidConfig {
            path: self.source.clone(),
            what: e.to_string(),
        })
    }

    fn plugin_type(&self, i: usize) -> String {
        self.plugins
            .get(i)
            .and_then(|p| p.get("type"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    }
}

/// A plugin type is a file name in a bin dir, nothing else.
fn valid_plugin_type(t: &str) -> bool {
    !t.is_empty() && t != "." && t != ".." && !t.contains('/') && !t.contains('\0')
}

/// The candidates in `dir`: config files sorted by name.
fn config_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.is_file()
                        && p.extension()
                            .is_some_and(|x| x == "conflist" || x == "conf" || x == "json")
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// Selects the network: the one named `name`, else the first file that
/// parses (by file name), as containerd does.
pub fn load_network(dir: &Path, name: Option<&str>) -> Result<NetworkList, CniError> {
    let mut first_error = None;
    for path in config_files(dir) {
        let parsed = read_bounded(&path).and_then(|text| NetworkList::parse(&path, &text));
        match parsed {
            Ok(net) if name.is_none_or(|n| n == net.name) => return Ok(net),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "skipping a CNI config");
                first_error.get_or_insert(e);
            }
        }
    }
    match (name, first_error) {
        (Some(n), _) => Err(CniError::NoSuchNetwork {
            name: n.to_string(),
            dir: dir.to_path_buf(),
        }),
        (None, Some(e)) => Err(e),
        (None, None) => Err(CniError::NoConfig(dir.to_path_buf())),
    }
}

fn read_bounded(path: &Path) -> Result<String, CniError> {
    let err = |source| CniError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(err)?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(file, MAX_CONFIG + 1), &mut text)
        .map_err(err)?;
    if text.len() as u64 > MAX_CONFIG {
        return Err(CniError::InvalidConfig {
            path: path.to_path_buf(),
            what: format!("larger than {MAX_CONFIG} bytes"),
        });
    }
    Ok(text)
}

/// What identifies the state of the conf dir: file names, sizes, mtimes.
type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

fn fingerprint(dir: &Path) -> (Option<SystemTime>, Fingerprint) {
    let dir_mtime = std::fs::metadata(dir).and_then(|m| m.modified()).ok();
    let files = config_files(dir)
        .into_iter()
        .map(|p| {
            let meta = std::fs::metadata(&p).ok();
            let len = meta.as_ref().map_or(0, |m| m.len());
            let mtime = meta.and_then(|m| m.modified().ok());
            (p, len, mtime)
        })
        .collect();
    (dir_mtime, files)
}

/// The daemon's view of the node's CNI configuration: re-read only when the
/// conf dir or one of its config files changed (a few stat calls otherwise).
#[derive(Debug)]
pub struct Cni {
    pub conf_dir: PathBuf,
    pub bin_dirs: Vec<PathBuf>,
    pub network: Option<String>,
    #[allow(clippy::type_complexity)]
    cache: Mutex<
        Option<(
            (Option<SystemTime>, Fingerprint),
            Result<NetworkList, String>,
        )>,
    >,
}

impl Cni {
    pub fn new(conf_dir: PathBuf, bin_dirs: Vec<PathBuf>, network: Option<String>) -> Cni {
        Cni {
            conf_dir,
            bin_dirs,
            network,
            cache: Mutex::new(None),
        }
    }

    /// Whether the conf dir holds any config file at all (valid or not).
    pub fn has_config_files(&self) -> bool {
        !config_files(&self.conf_dir).is_empty()
    }

    /// The network pods join now, or why there is none.
    pub fn current(&self) -> Result<NetworkList, String> {
        let fp = fingerprint(&self.conf_dir);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((old, net)) = cache.as_ref()
            && *old == fp
        {
            return net.clone();
        }
        let net = load_network(&self.conf_dir, self.network.as_deref())
            .and_then(|net| {
                // A network whose plugins are missing is not ready either.
                for i in 0..net.plugins.len() {
                    find_plugin(&self.bin_dirs, &net.plugin_type(i))?;
                }
                Ok(net)
            })
            .map_err(|e| crate::error_chain(&e));
        *cache = Some((fp, net.clone()));
        net
    }
}

/// The first executable file named `kind` in the bin dirs.
pub fn find_plugin(bin_dirs: &[PathBuf], kind: &str) -> Result<PathBuf, CniError> {
    if !valid_plugin_type(kind) {
        return Err(CniError::PluginNotFound(kind.to_string()));
    }
    use std::os::unix::fs::PermissionsExt;
    bin_dirs
        .iter()
        .map(|d| d.join(kind))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .ok_or_else(|| CniError::PluginNotFound(kind.to_string()))
}

/// Who the pod is, for the plugins (CNI_ARGS as containerd sets them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    pub sandbox_id: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The pod's network namespace path.
    pub netns: PathBuf,
    /// hostPort mappings: the `portMappings` runtime config of plugins
    /// that declare that capability (portmap).
    #[serde(default)]
    pub port_mappings: Vec<PortMapping>,
}

/// One hostPort mapping in the shape of CNI's `portMappings` capability.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    /// "tcp", "udp" or "sctp".
    pub protocol: String,
    #[serde(rename = "hostIP", default, skip_serializing_if = "String::is_empty")]
    pub host_ip: String,
}

impl PortMapping {
    /// The CRI's mappings that CNI gets: those with a host port (as
    /// containerd); a port out of range is InvalidArgument.
    pub fn from_cri(ports: &[k8s_cri::v1::PortMapping]) -> Result<Vec<PortMapping>, CniError> {
        use k8s_cri::v1::Protocol;
        ports
            .iter()
            .filter(|p| p.host_port > 0)
            .map(|p| {
                let port = |v: i32| {
                    u16::try_from(v)
                        .ok()
                        .filter(|&v| v > 0)
                        .ok_or(CniError::BadPortMapping(v))
                };
                Ok(PortMapping {
                    host_port: port(p.host_port)?,
                    container_port: port(p.container_port)?,
                    protocol: match Protocol::try_from(p.protocol) {
                        Ok(Protocol::Udp) => "udp",
                        Ok(Protocol::Sctp) => "sctp",
                        _ => "tcp",
                    }
                    .into(),
                    host_ip: p.host_ip.clone(),
                })
            })
            .collect()
    }
}

/// What a pod's network needs to be torn down later; persisted in the
/// sandbox record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Attachment {
    pub network: NetworkList,
    pub pod: PodRef,
    /// The final ADD result (DEL's prevResult).
    pub result: Value,
}

/// The environment of one plugin call.
pub fn plugin_env(
    command: &'static str,
    pod: &PodRef,
    bin_dirs: &[PathBuf],
) -> Vec<(String, String)> {
    let path = bin_dirs
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
        pod.namespace, pod.name, pod.sandbox_id, pod.uid
    );
    vec![
        ("CNI_COMMAND".into(), command.into()),
        ("CNI_CONTAINERID".into(), pod.sandbox_id.clone()),
        ("CNI_NETNS".into(), pod.netns.display().to_string()),
        ("CNI_IFNAME".into(), POD_IFNAME.into()),
        ("CNI_PATH".into(), path),
        ("CNI_ARGS".into(), args),
    ]
}

/// Runs every plugin's ADD in order; on error the caller tears down with
/// [`del`] (DEL is idempotent, so plugins that never ran are fine).
pub async fn add(
    bin_dirs: &[PathBuf],
    network: &NetworkList,
    pod: &PodRef,
) -> Result<Attachment, CniError> {
    let mut prev: Option<Value> = None;
    for i in 0..network.plugins.len() {
        let stdin = network.plugin_config(i, prev.as_ref(), pod)?;
        let kind = network.plugin_type(i);
        let out = exec_plugin(bin_dirs, &kind, "ADD", pod, &stdin).await?;
        let result: Value = serde_json::from_slice(&out).map_err(|e| CniError::BadResult {
            plugin: kind.clone(),
            command: "ADD",
            what: e.to_string(),
        })?;
        if !result.is_object() {
            return Err(CniError::BadResult {
                plugin: kind,
                command: "ADD",
                what: "not a JSON object".into(),
            });
        }
        prev = Some(result);
    }
    Ok(Attachment {
        network: network.clone(),
        pod: pod.clone(),
        result: prev.unwrap_or(Value::Null),
    })
}

/// Runs every plugin's DEL in reverse order. Every plugin is tried; the
/// first error is returned.
pub async fn del(bin_dirs: &[PathBuf], att: &Attachment) -> Result<(), CniError> {
    // Before 0.4.0 DEL got no prevResult.
    let prev = (att.network.cni_version.as_str() >= "0.4.0" && att.result.is_object())
        .then_some(&att.result);
    let mut first = None;
    for i in (0..att.network.plugins.len()).rev() {
        let kind = att.network.plugin_type(i);
        let r = match att.network.plugin_config(i, prev, &att.pod) {
            Ok(stdin) => exec_plugin(bin_dirs, &kind, "DEL", &att.pod, &stdin)
                .await
                .map(drop),
            Err(e) => Err(e),
        };
        if let Err(e) = r {
            tracing::warn!(sandbox = %att.pod.sandbox_id, error = %crate::error_chain(&e), "CNI DEL");
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

/// Runs one plugin with a timeout, its stdout and stderr bounded.
async fn exec_plugin(
    bin_dirs: &[PathBuf],
    kind: &str,
    command: &'static str,
    pod: &PodRef,
    stdin: &[u8],
) -> Result<Vec<u8>, CniError> {
    let binary = find_plugin(bin_dirs, kind)?;
    let spawn_err = |source| CniError::Spawn {
        plugin: binary.clone(),
        command,
        source,
    };
    let mut cmd = tokio::process::Command::new(&binary);
    cmd.env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .envs(plugin_env(command, pod, bin_dirs))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(spawn_err)?;
    let (Some(mut child_in), Some(child_out), Some(child_err)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(spawn_err(std::io::Error::other("no pipes")));
    };
    let run = async {
        let input = stdin.to_vec();
        let write = async move {
            // A plugin that exits without reading its config is its error.
            let _ = child_in.write_all(&input).await;
            drop(child_in);
        };
        let read_out = read_capped(child_out, MAX_OUTPUT + 1);
        let read_err = read_capped(child_err, MAX_STDERR);
        let ((), out, err) = tokio::join!(write, read_out, read_err);
        let (out, err) = (out?, err.unwrap_or_default());
        let status = child.wait().await?;
        Ok::<_, std::io::Error>((status, out, err))
    };
    let (status, out, err) = match tokio::time::timeout(PLUGIN_TIMEOUT, run).await {
        Ok(r) => r.map_err(spawn_err)?,
        // Dropping the future drops the child: kill_on_drop ends it.
        Err(_) => {
            return Err(CniError::Timeout {
                plugin: kind.to_string(),
                command,
                timeout: PLUGIN_TIMEOUT,
            });
        }
    };
    if out.len() as u64 > MAX_OUTPUT {
        return Err(CniError::BadResult {
            plugin: kind.to_string(),
            command,
            what: format!("more than {MAX_OUTPUT} bytes of output"),
        });
    }
    if !status.success() {
        return Err(CniError::Plugin {
            plugin: kind.to_string(),
            command,
            message: plugin_error(&out, &err, status),
        });
    }
    Ok(out)
}

/// Reads all of `r`, keeping the first `cap` bytes: a chatty plugin is
/// drained, never blocked on a full pipe.
async fn read_capped(
    mut r: impl tokio::io::AsyncRead + Unpin,
    cap: u64,
) -> std::io::Result<Vec<u8>> {
    let mut kept = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(kept);
        }
        let room = usize::try_from(cap)
            .unwrap_or(usize::MAX)
            .saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
    }
}

/// The message of a failed call: the plugin's JSON error when it printed
/// one, else its stderr.
pub fn plugin_error(stdout: &[u8], stderr: &[u8], status: std::process::ExitStatus) -> String {
    #[derive(Deserialize)]
    struct PluginError {
        code: Option<u64>,
        #[serde(default)]
        msg: String,
        #[serde(default)]
        details: String,
    }
    if let Ok(e) = serde_json::from_slice::<PluginError>(stdout)
        && !e.msg.is_empty()
    {
        let mut m = e.msg;
        if !e.details.is_empty() {
            m.push_str(&format!(": {}", e.details));
        }
        if let Some(code) = e.code {
            m.push_str(&format!(" (code {code})"));
        }
        return m;
    }
    let stderr = String::from_utf8_lossy(stderr);
    let stderr = stderr.trim();
    if stderr.is_empty() {
        format!("{status}")
    } else {
        format!("{status}: {stderr}")
    }
}

/// One IPv4 address of the pod, with its prefix length and gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodIp {
    pub address: std::net::IpAddr,
    pub prefix: u8,
    pub gateway: Option<std::net::IpAddr>,
}

/// One route of the result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRoute {
    pub dst: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
}

/// What a pod's interface looks like, from an ADD result.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodNetwork {
    /// The pod interface's MAC (`aa:bb:...`), when the result names it.
    pub mac: Option<String>,
    /// The pod's own addresses, in the result's order.
    pub ips: Vec<PodIp>,
    pub routes: Vec<PodRoute>,
}

/// Reads the pod's side out of an ADD result (0.3.x to 1.x: `ips` entries
/// point at `interfaces` by index). As containerd, the pod's addresses are
/// those of its eth0 in the sandbox: not a bridge's gateway address on the
/// host, not the loopback plugin's 127.0.0.1; an address that names no
/// interface counts unless it is a loopback one.
pub fn pod_network(result: &Value) -> PodNetwork {
    let interfaces = result
        .get("interfaces")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let is_pod_if = |i: usize| {
        interfaces.get(i).is_some_and(|iface| {
            iface.get("name").and_then(Value::as_str) == Some(POD_IFNAME)
                && iface
                    .get("sandbox")
                    .and_then(Value::as_str)
                    .is_some_and(|s| !s.is_empty())
        })
    };
    let mut net = PodNetwork {
        mac: interfaces
            .iter()
            .find(|iface| {
                iface.get("name").and_then(Value::as_str) == Some(POD_IFNAME)
                    && iface
                        .get("sandbox")
                        .and_then(Value::as_str)
                        .is_some_and(|s| !s.is_empty())
            })
            .and_then(|iface| iface.get("mac"))
            .and_then(Value::as_str)
            .filter(|m| valid_mac(m))
            .map(|m| m.to_ascii_lowercase()),
        ..Default::default()
    };
    for ip in result
        .get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some((addr, prefix)) = ip
            .get("address")
            .and_then(Value::as_str)
            .and_then(parse_cidr)
        else {
            continue;
        };
        let pod_owned = match ip.get("interface").and_then(Value::as_u64) {
            Some(idx) => is_pod_if(usize::try_from(idx).unwrap_or(usize::MAX)),
            None => !addr.is_loopback(),
        };
        if !pod_owned {
            continue;
        }
        let gateway = ip
            .get("gateway")
            .and_then(Value::as_str)
            .and_then(|g| g.parse().ok());
        net.ips.push(PodIp {
            address: addr,
            prefix,
            gateway,
        });
    }
    for r in result
        .get("routes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some((std::net::IpAddr::V4(dst), prefix)) =
            r.get("dst").and_then(Value::as_str).and_then(parse_cidr)
        else {
            continue;
        };
        let gateway = r
            .get("gw")
            .and_then(Value::as_str)
            .and_then(|g| g.parse().ok());
        net.routes.push(PodRoute {
            dst,
            prefix,
            gateway,
        });
    }
    net
}

/// `10.1.2.3/24` → (address, 24).
pub fn parse_cidr(s: &str) -> Option<(std::net::IpAddr, u8)> {
    let (addr, prefix) = s.split_once('/')?;
    let addr: std::net::IpAddr = addr.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (prefix <= max).then_some((addr, prefix))
}

fn valid_mac(m: &str) -> bool {
    let parts: Vec<&str> = m.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BRIDGE: &str = r#"{
      "cniVersion": "1.0.0", "name": "podnet",
      "plugins": [
        {"type": "bridge", "bridge": "cni0", "isGateway": true,
         "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/24"}]]}},
        {"type": "loopback"}
      ]
    }"#;

    /// A bridge plugin's 1.0.0 ADD result: the bridge, the host veth, the
    /// pod's eth0 (index 2), the pod address and the default route.
    const RESULT: &str = r#"{
      "cniVersion": "1.0.0",
      "interfaces": [
        {"name": "cni0", "mac": "6a:1f:00:00:00:01"},
        {"name": "veth1234", "mac": "6a:1f:00:00:00:02"},
        {"name": "eth0", "mac": "0A:58:0A:58:00:05", "sandbox": "/var/run/netns/x"}
      ],
      "ips": [{"address": "10.88.0.5/24", "gateway": "10.88.0.1", "interface": 2}],
      "routes": [{"dst": "0.0.0.0/0", "gw": "10.88.0.1"}, {"dst": "10.99.0.0/16"}],
      "dns": {}
    }"#;

    fn pod() -> PodRef {
        PodRef {
            sandbox_id: "abc".into(),
            namespace: "default".into(),
            name: "web".into(),
            uid: "u-1".into(),
            netns: "/run/ns/abc".into(),
            port_mappings: Vec::new(),
        }
    }

    #[test]
    fn port_mappings_reach_plugins_that_declare_the_capability() {
        let net = NetworkList::parse(
            Path::new("/x.conflist"),
            r#"{"cniVersion": "1.0.0", "name": "podnet", "plugins": [
                {"type": "bridge"},
                {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}
            ]}"#,
        )
        .unwrap();
        let cri = [
            k8s_cri::v1::PortMapping {
                protocol: k8s_cri::v1::Protocol::Udp as i32,
                container_port: 53,
                host_port: 5353,
                host_ip: "127.0.0.1".into(),
            },
            // No host port: not for CNI (as containerd).
            k8s_cri::v1::PortMapping {
                container_port: 80,
                ..Default::default()
            },
        ];
        let mut p = pod();
        p.port_mappings = PortMapping::from_cri(&cri).unwrap();
        let conf = |i| -> Value {
            serde_json::from_slice(&net.plugin_config(i, None, &p).unwrap()).unwrap()
        };
        assert!(conf(0).get("runtimeConfig").is_none());
        assert_eq!(
            conf(1)["runtimeConfig"]["portMappings"],
            serde_json::json!([{"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "127.0.0.1"}])
        );
        let bad = k8s_cri::v1::PortMapping {
            host_port: 70000,
            container_port: 80,
            ..Default::default()
        };
        assert!(matches!(
            PortMapping::from_cri(&[bad]),
            Err(CniError::BadPortMapping(70000))
        ));
    }

    #[test]
    fn parses_lists_and_single_plugin_configs() {
        let net = NetworkList::parse(Path::new("/x.conflist"), BRIDGE).unwrap();
        assert_eq!(net.name, "podnet");
        assert_eq!(net.plugins.len(), 2);
        assert_eq!(net.plugin_type(1), "loopback");
        let single = NetworkList::parse(
            Path::new("/x.conf"),
            r#"{"cniVersion": "0.4.0", "name": "one", "type": "ptp"}"#,
        )
        .unwrap();
        assert_eq!(single.plugins.len(), 1);
        assert_eq!(single.plugin_type(0), "ptp");
        for bad in [
            "[]",
            r#"{"cniVersion": "1.0.0", "plugins": [{"type": "bridge"}]}"#,
            r#"{"cniVersion": "9.9.9", "name": "n", "type": "bridge"}"#,
            r#"{"cniVersion": "1.0.0", "name": "n", "plugins": []}"#,
            r#"{"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "../../bin/sh"}]}"#,
            r#"{"cniVersion": "1.0.0", "name": "n", "disabled": true, "plugins": [{"type": "x"}]}"#,
        ] {
            assert!(NetworkList::parse(Path::new("/b"), bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn plugin_stdin_carries_name_version_and_prev_result() {
        let net = NetworkList::parse(Path::new("/x.conflist"), BRIDGE).unwrap();
        let first: Value =
            serde_json::from_slice(&net.plugin_config(0, None, &pod()).unwrap()).unwrap();
        assert_eq!(first["name"], "podnet");
        assert_eq!(first["cniVersion"], "1.0.0");
        assert_eq!(first["bridge"], "cni0");
        assert!(first.get("prevResult").is_none());
        let prev: Value = serde_json::from_str(RESULT).unwrap();
        let second: Value =
            serde_json::from_slice(&net.plugin_config(1, Some(&prev), &pod()).unwrap()).unwrap();
        assert_eq!(second["type"], "loopback");
        assert_eq!(second["prevResult"]["ips"][0]["address"], "10.88.0.5/24");
    }

    #[test]
    fn selects_by_name_or_first_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            load_network(dir.path(), None),
            Err(CniError::NoConfig(_))
        ));
        let conf = |name: &str| {
            format!(
                r#"{{"cniVersion": "1.0.0", "name": "{name}", "plugins": [{{"type": "loopback"}}]}}"#
            )
        };
        std::fs::write(dir.path().join("20-b.conflist"), conf("b")).unwrap();
        std::fs::write(dir.path().join("10-a.conf"), conf("a")).unwrap();
        std::fs::write(dir.path().join("05-broken.conflist"), "{").unwrap();
        std::fs::write(dir.path().join("00-ignored.txt"), conf("z")).unwrap();
        assert_eq!(load_network(dir.path(), None).unwrap().name, "a");
        assert_eq!(load_network(dir.path(), Some("b")).unwrap().name, "b");
        assert!(matches!(
            load_network(dir.path(), Some("c")),
            Err(CniError::NoSuchNetwork { .. })
        ));
    }

    #[test]
    fn status_view_follows_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let bins = tempfile::tempdir().unwrap();
        let cni = Cni::new(
            dir.path().to_path_buf(),
            vec![bins.path().to_path_buf()],
            None,
        );
        assert!(cni.current().is_err());
        std::fs::write(
            dir.path().join("10-n.conflist"),
            r#"{"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "loopback"}]}"#,
        )
        .unwrap();
        // The plugin is missing: not ready, and the message says why.
        let err = cni.current().unwrap_err();
        assert!(err.contains("loopback"), "{err}");
        use std::os::unix::fs::PermissionsExt;
        let plugin = bins.path().join("loopback");
        std::fs::write(&plugin, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Only the conf dir is watched; a new file there re-reads it.
        std::fs::write(dir.path().join("99-other.conf"), "{}").unwrap();
        assert_eq!(cni.current().unwrap().name, "n");
    }

    #[test]
    fn environment_is_what_plugins_and_containerd_expect() {
        let env = plugin_env(
            "ADD",
            &pod(),
            &["/opt/cni/bin".into(), "/usr/lib/cni".into()],
        );
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("CNI_COMMAND"), Some("ADD"));
        assert_eq!(get("CNI_CONTAINERID"), Some("abc"));
        assert_eq!(get("CNI_NETNS"), Some("/run/ns/abc"));
        assert_eq!(get("CNI_IFNAME"), Some("eth0"));
        assert_eq!(get("CNI_PATH"), Some("/opt/cni/bin:/usr/lib/cni"));
        assert_eq!(
            get("CNI_ARGS"),
            Some(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;\
                 K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1"
            )
        );
    }

    #[test]
    fn result_gives_the_pods_addresses_not_the_gateways() {
        let net = pod_network(&serde_json::from_str(RESULT).unwrap());
        assert_eq!(net.mac.as_deref(), Some("0a:58:0a:58:00:05"));
        assert_eq!(
            net.ips,
            vec![PodIp {
                address: "10.88.0.5".parse().unwrap(),
                prefix: 24,
                gateway: Some("10.88.0.1".parse().unwrap()),
            }]
        );
        assert_eq!(net.routes.len(), 2);
        assert_eq!(net.routes[0].prefix, 0);
        assert_eq!(net.routes[0].gateway, Some(Ipv4Addr::new(10, 88, 0, 1)));
        assert_eq!(net.routes[1].gateway, None);

        // An address on the host side (the bridge, index 0) is not the pod's;
        // 0.4.0 results carry a "version" field, which changes nothing.
        let v040 = serde_json::json!({
            "cniVersion": "0.4.0",
            "interfaces": [{"name": "cni0"}, {"name": "eth0", "sandbox": "/n"}],
            "ips": [
                {"version": "4", "address": "10.1.0.1/16", "interface": 0},
                {"version": "4", "address": "10.1.0.7/16", "interface": 1},
                {"version": "6", "address": "fd00::7/64", "interface": 1},
                {"version": "4", "address": "garbage", "interface": 1}
            ]
        });
        let net = pod_network(&v040);
        let addrs: Vec<String> = net.ips.iter().map(|i| i.address.to_string()).collect();
        assert_eq!(addrs, ["10.1.0.7", "fd00::7"]);
        assert_eq!(net.mac, None);

        // The loopback plugin's own result: lo's addresses are not the pod's.
        let lo = serde_json::json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "lo", "mac": "00:00:00:00:00:00", "sandbox": "/n"}],
            "ips": [
                {"interface": 0, "address": "127.0.0.1/8"},
                {"interface": 0, "address": "::1/128"}
            ]
        });
        assert_eq!(pod_network(&lo).ips, []);
        let unattached = serde_json::json!({
            "ips": [{"address": "127.0.0.1/8"}, {"address": "10.2.0.9/16"}]
        });
        assert_eq!(pod_network(&unattached).ips.len(), 1);
        assert_eq!(pod_network(&Value::Null), PodNetwork::default());
    }

    #[test]
    fn plugin_errors_are_read_from_their_json() {
        use std::os::unix::process::ExitStatusExt;
        let status = std::process::ExitStatus::from_raw(1 << 8);
        let msg = plugin_error(
            br#"{"cniVersion":"1.0.0","code":11,"msg":"failed to allocate","details":"range full"}"#,
            b"",
            status,
        );
        assert_eq!(msg, "failed to allocate: range full (code 11)");
        let msg = plugin_error(b"not json", b"boom\n", status);
        assert!(msg.ends_with(": boom"), "{msg}");
    }

    #[tokio::test]
    async fn add_chains_results_and_del_runs_in_reverse() {
        use std::os::unix::fs::PermissionsExt;
        let bins = tempfile::tempdir().unwrap();
        let log = bins.path().join("calls");
        // A fake plugin: logs its command and stdin, prints a result that
        // names itself, or fails with a CNI error for type "bad".
        for name in ["one", "two", "bad"] {
            let script = format!(
                "#!/bin/sh\nin=$(cat)\necho \"$CNI_COMMAND {name} $in\" >> {log}\n\
                 if [ {name} = bad ]; then echo '{{\"code\":7,\"msg\":\"nope\"}}'; exit 1; fi\n\
                 [ \"$CNI_COMMAND\" = ADD ] && echo '{{\"cniVersion\":\"1.0.0\",\"ips\":[],\"by\":\"{name}\"}}'\n\
                 exit 0\n",
                log = log.display()
            );
            let p = bins.path().join(name);
            std::fs::write(&p, script).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let bin_dirs = vec![bins.path().to_path_buf()];
        let net = NetworkList::parse(
            Path::new("/n"),
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"one"},{"type":"two"}]}"#,
        )
        .unwrap();
        let att = add(&bin_dirs, &net, &pod()).await.unwrap();
        assert_eq!(att.result["by"], "two");
        del(&bin_dirs, &att).await.unwrap();
        let calls = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<&str> = calls.lines().collect();
        assert_eq!(lines.len(), 4, "{calls}");
        assert!(lines[0].starts_with("ADD one ") && !lines[0].contains("prevResult"));
        assert!(lines[1].starts_with("ADD two ") && lines[1].contains(r#""by":"one""#));
        assert!(lines[2].starts_with("DEL two ") && lines[2].contains(r#""by":"two""#));
        assert!(lines[3].starts_with("DEL one "));

        let bad = NetworkList::parse(
            Path::new("/n"),
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"one"},{"type":"bad"}]}"#,
        )
        .unwrap();
        let err = add(&bin_dirs, &bad, &pod()).await.unwrap_err();
        assert!(err.to_string().contains("nope (code 7)"), "{err}");
        let missing = NetworkList::parse(
            Path::new("/n"),
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"absent"}]}"#,
        )
        .unwrap();
        assert!(matches!(
            add(&bin_dirs, &missing, &pod()).await,
            Err(CniError::PluginNotFound(_))
        ));
    }
}
