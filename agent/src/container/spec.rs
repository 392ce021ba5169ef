//! Builds a container's OCI runtime spec (config.json) from a
//! CreateContainer or ExecProcess request.
//!
//! Namespaces, the way Kubernetes pods expect them: the network, IPC and
//! (when asked) PID namespaces are the pod's — the agent's own; every
//! container gets its own mount, UTS and cgroup namespaces. /dev/shm is the
//! pod's (IPC is shared), resolv.conf and hostname come from SetupSandbox.

use std::path::Path;

use serde_json::{Value, json};
use vmpod_proto::v1::{CreateContainerRequest, Mount, Process, Resources};

use super::user::Identity;

/// What is wrong with a request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("the process has no args")]
    NoArgs,
    #[error("environment entry {0:?} is not KEY=VALUE")]
    BadEnv(String),
    #[error("mount destination {0:?} must be an absolute path without '..'")]
    BadMountDestination(String),
    #[error("mount type {0:?} is not supported (bind or tmpfs)")]
    BadMountType(String),
    #[error("unknown capability {0:?}")]
    BadCapability(String),
    #[error("unknown rlimit {0:?}")]
    BadRlimit(String),
    #[error("sysctl {0:?} is not a valid key")]
    BadSysctl(String),
    #[error("the working directory {0:?} must be absolute")]
    BadCwd(String),
    #[error("the seccomp profile is not valid JSON: {0}")]
    BadSeccomp(String),
    #[error("the generated spec does not parse: {0}")]
    Invalid(String),
}

/// Host-side facts the spec refers to.
#[derive(Clone, Debug)]
pub struct SpecContext<'a> {
    /// cgroup path prefix, e.g. `/vmpod`.
    pub cgroup_parent: &'a str,
    /// The pod's hostname (used when the request gives none).
    pub hostname: &'a str,
    /// Files SetupSandbox wrote, bind-mounted into every container.
    pub resolv_conf: Option<&'a Path>,
    pub etc_hostname: Option<&'a Path>,
    /// The pod's shared /dev/shm.
    pub shm: Option<&'a Path>,
    /// The agent's capability bounding set (a mask by capability number):
    /// a privileged container gets every capability the agent has, as with
    /// containerd, not ones it could never hold.
    pub bounding_caps: u64,
}

/// The agent's bounding set, from /proc/self/status (`CapBnd`).
pub fn own_bounding_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapBnd:").map(str::trim).map(str::to_string))
        })
        .and_then(|hex| u64::from_str_radix(&hex, 16).ok())
        .unwrap_or(u64::MAX)
}

/// Every capability Linux 6.1 knows, indexed by capability number.
pub const ALL_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// containerd's default set for unprivileged containers.
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Paths hidden from unprivileged containers unless the request names its own.
pub const DEFAULT_MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Paths read-only for unprivileged containers unless the request names its own.
pub const DEFAULT_READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Syscalls the RuntimeDefault profile refuses with EPERM: kernel modules
/// and kexec, mounts and namespace changes, clocks, swap, keyrings, BPF and
/// perf, cross-process memory access, NUMA policy. Everything else is
/// allowed. (All exist on x86-64, so libseccomp resolves every name.)
const RUNTIME_DEFAULT_DENIED: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_mempolicy",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mbind",
    "mount",
    "move_mount",
    "move_pages",
    "name_to_handle_at",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "quotactl",
    "reboot",
    "request_key",
    "set_mempolicy",
    "setns",
    "settimeofday",
    "swapoff",
    "swapon",
    "umount2",
    "unshare",
    "userfaultfd",
];

/// The RuntimeDefault seccomp profile as an OCI LinuxSeccomp object.
pub fn runtime_default_seccomp() -> Value {
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [{ "names": RUNTIME_DEFAULT_DENIED, "action": "SCMP_ACT_ERRNO", "errnoRet": 1 }],
    })
}

const RLIMITS: &[&str] = &[
    "RLIMIT_AS",
    "RLIMIT_CORE",
    "RLIMIT_CPU",
    "RLIMIT_DATA",
    "RLIMIT_FSIZE",
    "RLIMIT_LOCKS",
    "RLIMIT_MEMLOCK",
    "RLIMIT_MSGQUEUE",
    "RLIMIT_NICE",
    "RLIMIT_NOFILE",
    "RLIMIT_NPROC",
    "RLIMIT_RSS",
    "RLIMIT_RTPRIO",
    "RLIMIT_RTTIME",
    "RLIMIT_SIGPENDING",
    "RLIMIT_STACK",
];

fn clean_absolute(path: &str) -> bool {
    path.starts_with('/') && !path.split('/').any(|c| c == "..") && !path.contains('\0')
}

/// The OCI `process` object for a request's process.
pub fn process(
    p: &Process,
    identity: &Identity,
    capabilities: &[String],
    no_new_privs: bool,
    rlimits: &Value,
) -> Result<Value, SpecError> {
    if p.args.is_empty() {
        return Err(SpecError::NoArgs);
    }
    if let Some(bad) = p
        .env
        .iter()
        .find(|e| !e.contains('=') || e.starts_with('='))
    {
        return Err(SpecError::BadEnv(bad.clone()));
    }
    let cwd = if p.cwd.is_empty() {
        "/"
    } else {
        p.cwd.as_str()
    };
    if !cwd.starts_with('/') {
        return Err(SpecError::BadCwd(cwd.into()));
    }
    let mut env = p.env.clone();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    }
    if p.terminal && !env.iter().any(|e| e.starts_with("TERM=")) {
        env.push("TERM=xterm".into());
    }
    let mut process = json!({
        "terminal": p.terminal,
        "user": { "uid": identity.uid, "gid": identity.gid, "additionalGids": identity.additional_gids },
        "args": p.args,
        "env": env,
        "cwd": cwd,
        "capabilities": {
            "bounding": capabilities, "effective": capabilities, "permitted": capabilities,
            "inheritable": [], "ambient": [],
        },
        "rlimits": rlimits,
    });
    // Only when true: libcontainer loads seccomp before dropping
    // capabilities (as it must without no_new_privs) only when the field is
    // absent; an explicit false makes the load fail.
    if no_new_privs {
        process["noNewPrivileges"] = json!(true);
    }
    // The first size the client sent, set on the terminal before the
    // process runs (runc's consoleSize); ResizeTty changes it later.
    if p.terminal && p.console_rows > 0 && p.console_cols > 0 {
        process["consoleSize"] = json!({
            "height": p.console_rows.min(u32::from(u16::MAX)),
            "width": p.console_cols.min(u32::from(u16::MAX)),
        });
    }
    Ok(process)
}

fn capabilities(req: &CreateContainerRequest, bounding: u64) -> Result<Vec<String>, SpecError> {
    let sec = req.security.clone().unwrap_or_default();
    if sec.privileged {
        return Ok(ALL_CAPABILITIES
            .iter()
            .enumerate()
            .filter(|(bit, _)| bounding & (1u64 << bit) != 0)
            .map(|(_, c)| c.to_string())
            .collect());
    }
    let mut caps = Vec::new();
    if sec.capabilities.is_empty() {
        caps.extend(DEFAULT_CAPABILITIES.iter().map(|c| c.to_string()));
    } else {
        for cap in &sec.capabilities {
            let name = cap_name(cap)?;
            if !caps.contains(&name) {
                caps.push(name);
            }
        }
    }
    // containerd's order, so that e.g. add ALL + drop CHOWN is all but
    // CHOWN, and drop ALL + add NET_ADMIN is exactly NET_ADMIN.
    let is_all = |c: &String| c.eq_ignore_ascii_case("ALL");
    if sec.add_capabilities.iter().any(is_all) {
        caps = ALL_CAPABILITIES
            .iter()
            .enumerate()
            .filter(|(bit, _)| bounding & (1u64 << bit) != 0)
            .map(|(_, c)| c.to_string())
            .collect();
    }
    if sec.drop_capabilities.iter().any(is_all) {
        caps.clear();
    }
    for cap in sec.add_capabilities.iter().filter(|c| !is_all(c)) {
        let name = cap_name(cap)?;
        if !caps.contains(&name) {
            caps.push(name);
        }
    }
    for cap in sec.drop_capabilities.iter().filter(|c| !is_all(c)) {
        let name = cap_name(cap)?;
        caps.retain(|c| *c != name);
    }
    Ok(caps)
}

/// `net_admin`, `NET_ADMIN` or `CAP_NET_ADMIN` → `CAP_NET_ADMIN`, if the
/// kernel knows it.
fn cap_name(cap: &str) -> Result<String, SpecError> {
    let upper = cap.to_uppercase();
    let name = if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    };
    if !ALL_CAPABILITIES.contains(&name.as_str()) {
        return Err(SpecError::BadCapability(cap.to_string()));
    }
    Ok(name)
}

fn rlimits(req: &CreateContainerRequest) -> Result<Value, SpecError> {
    let sec = req.security.clone().unwrap_or_default();
    let mut out = Vec::new();
    for r in &sec.rlimits {
        if !RLIMITS.contains(&r.r#type.as_str()) {
            return Err(SpecError::BadRlimit(r.r#type.clone()));
        }
        out.push(json!({ "type": r.r#type, "soft": r.soft, "hard": r.hard }));
    }
    Ok(Value::Array(out))
}

fn user_mount(m: &Mount) -> Result<Value, SpecError> {
    if !clean_absolute(&m.destination) {
        return Err(SpecError::BadMountDestination(m.destination.clone()));
    }
    match m.r#type.as_str() {
        "bind" | "" => {
            let mut options = vec!["rbind".to_string()];
            options.extend(
                m.options
                    .iter()
                    .filter(|o| *o != "bind" && *o != "rbind")
                    .cloned(),
            );
            Ok(
                json!({ "destination": m.destination, "type": "bind", "source": m.source, "options": options }),
            )
        }
        "tmpfs" => {
            let mut options = vec!["nosuid".to_string(), "nodev".to_string()];
            options.extend(m.options.iter().cloned());
            Ok(
                json!({ "destination": m.destination, "type": "tmpfs", "source": "tmpfs", "options": options }),
            )
        }
        other => Err(SpecError::BadMountType(other.into())),
    }
}

/// At most this many devices go into a privileged container's spec.
const MAX_DEVICES: usize = 4096;

/// The character and block devices under `dev` as OCI `linux.devices`
/// entries (runc's HostDevices): not the per-container mounts (pts, shm,
/// mqueue), nor console and ptmx, which libcontainer sets up itself.
pub fn visible_devices(dev: &Path) -> Vec<Value> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    const SKIP: &[&str] = &["pts", "shm", "fd", "mqueue", "hugepages", "console", "ptmx"];
    let mut out = Vec::new();
    let mut stack = vec![(dev.to_path_buf(), 0)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if depth == 0 && SKIP.iter().any(|s| name == *s) {
                continue;
            }
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            let kind = meta.file_type();
            let typ = if kind.is_char_device() {
                "c"
            } else if kind.is_block_device() {
                "b"
            } else {
                if kind.is_dir() && depth < 3 {
                    stack.push((path, depth + 1));
                }
                continue;
            };
            if out.len() >= MAX_DEVICES {
                return out;
            }
            let rdev = meta.rdev();
            out.push(json!({
                "path": path,
                "type": typ,
                "major": nix::sys::stat::major(rdev),
                "minor": nix::sys::stat::minor(rdev),
                "fileMode": meta.mode() & 0o7777,
                "uid": meta.uid(),
                "gid": meta.gid(),
            }));
        }
    }
    out
}

/// cgroup v2 values from CRI resources (the kubelet speaks CPU shares).
pub fn resources(r: &Resources) -> Value {
    let mut out = serde_json::Map::new();
    let mut cpu = serde_json::Map::new();
    if r.cpu_shares > 0 {
        cpu.insert("shares".into(), json!(r.cpu_shares));
    }
    if r.cpu_quota > 0 {
        cpu.insert("quota".into(), json!(r.cpu_quota));
    }
    if r.cpu_period > 0 {
        cpu.insert("period".into(), json!(r.cpu_period));
    }
    if !cpu.is_empty() {
        out.insert("cpu".into(), Value::Object(cpu));
    }
    if r.memory_limit > 0 {
        out.insert("memory".into(), json!({ "limit": r.memory_limit }));
    }
    if r.pids_limit > 0 {
        out.insert("pids".into(), json!({ "limit": r.pids_limit }));
    }
    Value::Object(out)
}

/// The whole config.json for a container whose rootfs is `rootfs` (relative
/// to the bundle).
pub fn build(
    req: &CreateContainerRequest,
    identity: &Identity,
    ctx: &SpecContext<'_>,
) -> Result<Value, SpecError> {
    let sec = req.security.clone().unwrap_or_default();
    let default_process = Process::default();
    let p = req.process.as_ref().unwrap_or(&default_process);
    let caps = capabilities(req, ctx.bounding_caps)?;
    let process = process(p, identity, &caps, sec.no_new_privileges, &rlimits(req)?)?;

    let sys_options = if sec.privileged {
        vec!["nosuid", "noexec", "nodev"]
    } else {
        vec!["nosuid", "noexec", "nodev", "ro"]
    };
    let mut mounts = vec![
        json!({ "destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"] }),
        json!({ "destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] }),
        json!({ "destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"] }),
        json!({ "destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"] }),
        json!({ "destination": "/sys", "type": "sysfs", "source": "sysfs", "options": sys_options }),
        json!({ "destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", if sec.privileged { "rw" } else { "ro" }] }),
    ];
    match ctx.shm {
        Some(shm) => mounts.push(json!({ "destination": "/dev/shm", "type": "bind", "source": shm, "options": ["rbind", "nosuid", "nodev", "noexec"] })),
        None => mounts.push(json!({ "destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] })),
    }
    let user_destinations: Vec<&str> = req.mounts.iter().map(|m| m.destination.as_str()).collect();
    for (dest, file) in [
        ("/etc/resolv.conf", ctx.resolv_conf),
        ("/etc/hostname", ctx.etc_hostname),
    ] {
        if let Some(file) = file.filter(|_| !user_destinations.contains(&dest)) {
            mounts.push(json!({ "destination": dest, "type": "bind", "source": file, "options": ["rbind", "rprivate"] }));
        }
    }
    for m in &req.mounts {
        mounts.push(user_mount(m)?);
    }

    let mut namespaces = vec![
        json!({"type": "mount"}),
        json!({"type": "uts"}),
        json!({"type": "cgroup"}),
    ];
    if !sec.share_pod_pid_namespace {
        namespaces.push(json!({"type": "pid"}));
    }
    for key in req.sysctls.keys() {
        if key.is_empty() || key.contains('/') || key.contains("..") || key.starts_with('.') {
            return Err(SpecError::BadSysctl(key.clone()));
        }
    }
    let mut linux = json!({
        "namespaces": namespaces,
        "cgroupsPath": format!("{}/{}", ctx.cgroup_parent.trim_end_matches('/'), req.container_id),
        "resources": resources(&req.resources.unwrap_or_default()),
        "sysctl": req.sysctls,
    });
    // Mount propagation as runc: a Bidirectional (rshared) mount needs a
    // shared root, HostToContainer (rslave) a slave one (libcontainer's
    // default); pivot_root still works, libcontainer makes the rootfs's
    // parent private.
    let wants = |o: &str| req.mounts.iter().any(|m| m.options.iter().any(|x| x == o));
    if wants("rshared") {
        linux["rootfsPropagation"] = json!("shared");
    } else if wants("rslave") {
        linux["rootfsPropagation"] = json!("slave");
    }
    if sec.privileged {
        // As runc/containerd: every device the agent sees, usable. In a VM
        // these are the guest's devices (the VM stays the boundary); a
        // privileged host pod (allowed only by the node's policy) gets the
        // node's, as with containerd.
        linux["devices"] = json!(visible_devices(Path::new("/dev")));
        linux["resources"]["devices"] = json!([{ "allow": true, "access": "rwm" }]);
    }
    if !sec.privileged {
        let masked: Vec<&str> = if sec.masked_paths.is_empty() {
            DEFAULT_MASKED_PATHS.to_vec()
        } else {
            sec.masked_paths.iter().map(String::as_str).collect()
        };
        let readonly: Vec<&str> = if sec.readonly_paths.is_empty() {
            DEFAULT_READONLY_PATHS.to_vec()
        } else {
            sec.readonly_paths.iter().map(String::as_str).collect()
        };
        linux["maskedPaths"] = json!(masked);
        linux["readonlyPaths"] = json!(readonly);
        if !sec.seccomp_json.is_empty() {
            let profile: Value = serde_json::from_str(&sec.seccomp_json)
                .map_err(|e| SpecError::BadSeccomp(e.to_string()))?;
            linux["seccomp"] = profile;
        } else if sec.seccomp_runtime_default {
            linux["seccomp"] = runtime_default_seccomp();
        }
    }
    let hostname = if req.hostname.is_empty() {
        ctx.hostname
    } else {
        req.hostname.as_str()
    };
    let spec = json!({
        "ociVersion": "1.0.2",
        "process": process,
        "root": { "path": "rootfs", "readonly": sec.readonly_rootfs },
        "hostname": hostname,
        "mounts": mounts,
        "linux": linux,
    });
    // Round-trip through the typed spec: what libcontainer reads must parse.
    serde_json::from_value::<oci_spec::runtime::Spec>(spec.clone())
        .map_err(|e| SpecError::Invalid(e.to_string()))?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmpod_proto::v1::{Rlimit, Security};

    fn identity() -> Identity {
        Identity {
            uid: 33,
            gid: 33,
            additional_gids: vec![50],
        }
    }

    fn ctx() -> SpecContext<'static> {
        SpecContext {
            cgroup_parent: "/vmpod",
            hostname: "pod-a",
            resolv_conf: Some(Path::new("/run/s/resolv.conf")),
            etc_hostname: None,
            shm: Some(Path::new("/run/s/shm")),
            bounding_caps: u64::MAX,
        }
    }

    fn request() -> CreateContainerRequest {
        CreateContainerRequest {
            container_id: "c1".into(),
            process: Some(Process {
                args: vec!["sh".into(), "-c".into(), "true".into()],
                env: vec!["A=1".into()],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_match_what_kubernetes_users_expect() {
        let spec = build(&request(), &identity(), &ctx()).unwrap();
        assert_eq!(
            spec["process"]["user"],
            json!({"uid": 33, "gid": 33, "additionalGids": [50]})
        );
        assert_eq!(spec["process"]["cwd"], "/");
        assert!(
            spec["process"]["env"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e.as_str().unwrap().starts_with("PATH="))
        );
        assert_eq!(
            spec["process"]["capabilities"]["bounding"]
                .as_array()
                .unwrap()
                .len(),
            DEFAULT_CAPABILITIES.len()
        );
        assert_eq!(spec["hostname"], "pod-a");
        assert_eq!(spec["linux"]["cgroupsPath"], "/vmpod/c1");
        let ns: Vec<&str> = spec["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(
            ns,
            ["mount", "uts", "cgroup", "pid"],
            "network and IPC stay the pod's"
        );
        assert_eq!(
            spec["linux"]["maskedPaths"].as_array().unwrap().len(),
            DEFAULT_MASKED_PATHS.len()
        );
        assert!(spec["linux"].get("seccomp").is_none());
        assert!(
            spec["process"].get("noNewPrivileges").is_none(),
            "absent, not false: see process()"
        );
        let mounts = spec["mounts"].as_array().unwrap();
        assert!(
            mounts
                .iter()
                .any(|m| m["destination"] == "/etc/resolv.conf"
                    && m["source"] == "/run/s/resolv.conf")
        );
        assert!(
            mounts
                .iter()
                .any(|m| m["destination"] == "/dev/shm" && m["source"] == "/run/s/shm")
        );
    }

    #[test]
    fn visible_devices_are_the_device_nodes_under_dev() {
        let devices = visible_devices(Path::new("/dev"));
        let null = devices
            .iter()
            .find(|d| d["path"] == "/dev/null")
            .expect("/dev/null is listed");
        assert_eq!(
            (&null["type"], &null["major"], &null["minor"]),
            (&json!("c"), &json!(1), &json!(3))
        );
        assert!(
            devices.iter().all(|d| {
                let p = d["path"].as_str().unwrap_or("");
                !p.starts_with("/dev/pts/") && p != "/dev/ptmx" && p != "/dev/console"
            }),
            "{devices:?}"
        );
    }

    #[test]
    fn privileged_gets_every_capability_and_no_masks_or_seccomp() {
        let mut req = request();
        req.security = Some(Security {
            privileged: true,
            seccomp_runtime_default: true,
            ..Default::default()
        });
        let spec = build(&req, &identity(), &ctx()).unwrap();
        assert_eq!(
            spec["process"]["capabilities"]["effective"]
                .as_array()
                .unwrap()
                .len(),
            ALL_CAPABILITIES.len()
        );
        assert!(spec["linux"].get("maskedPaths").is_none());
        assert!(spec["linux"].get("seccomp").is_none());
        assert!(
            spec["linux"]["devices"]
                .as_array()
                .unwrap()
                .iter()
                .any(|d| d["path"] == "/dev/null")
        );
        assert_eq!(
            spec["linux"]["resources"]["devices"],
            json!([{ "allow": true, "access": "rwm" }])
        );

        // Without CAP_SYS_RESOURCE (24) in the agent's bounding set.
        let mut limited = ctx();
        limited.bounding_caps = !(1 << 24);
        let spec = build(&req, &identity(), &limited).unwrap();
        let caps = spec["process"]["capabilities"]["effective"]
            .as_array()
            .unwrap();
        assert_eq!(caps.len(), ALL_CAPABILITIES.len() - 1);
        assert!(!caps.contains(&json!("CAP_SYS_RESOURCE")));
    }

    #[test]
    fn capability_table_is_indexed_by_number() {
        assert_eq!(ALL_CAPABILITIES[0], "CAP_CHOWN");
        assert_eq!(ALL_CAPABILITIES[21], "CAP_SYS_ADMIN");
        assert_eq!(ALL_CAPABILITIES[24], "CAP_SYS_RESOURCE");
        assert_eq!(ALL_CAPABILITIES[40], "CAP_CHECKPOINT_RESTORE");
        assert!(own_bounding_caps() != 0);
    }

    #[test]
    fn security_settings_reach_the_spec() {
        let mut req = request();
        req.security = Some(Security {
            capabilities: vec!["net_admin".into(), "CAP_KILL".into()],
            no_new_privileges: true,
            readonly_rootfs: true,
            seccomp_runtime_default: true,
            share_pod_pid_namespace: true,
            rlimits: vec![Rlimit {
                r#type: "RLIMIT_NOFILE".into(),
                soft: 10,
                hard: 20,
            }],
            ..Default::default()
        });
        req.resources = Some(Resources {
            memory_limit: 64 << 20,
            pids_limit: 10,
            cpu_quota: 50_000,
            cpu_period: 100_000,
            cpu_shares: 512,
        });
        let spec = build(&req, &identity(), &ctx()).unwrap();
        assert_eq!(
            spec["process"]["capabilities"]["bounding"],
            json!(["CAP_NET_ADMIN", "CAP_KILL"])
        );
        assert_eq!(spec["process"]["noNewPrivileges"], true);
        assert_eq!(spec["root"]["readonly"], true);
        assert_eq!(spec["process"]["rlimits"][0]["hard"], 20);
        assert_eq!(spec["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ALLOW");
        assert!(
            spec["linux"]["seccomp"]["syscalls"][0]["names"]
                .as_array()
                .unwrap()
                .contains(&json!("mount"))
        );
        let ns: Vec<&str> = spec["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert!(!ns.contains(&"pid"));
        assert_eq!(spec["linux"]["resources"]["memory"]["limit"], 64 << 20);
        assert_eq!(spec["linux"]["resources"]["pids"]["limit"], 10);
        assert_eq!(spec["linux"]["resources"]["cpu"]["quota"], 50_000);
    }

    #[test]
    fn capabilities_are_added_and_dropped_in_containerds_order() {
        let caps = |add: &[&str], drop: &[&str]| {
            let mut req = request();
            req.security = Some(Security {
                add_capabilities: add.iter().map(|s| s.to_string()).collect(),
                drop_capabilities: drop.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            });
            build(&req, &identity(), &ctx())
                .map(|spec| spec["process"]["capabilities"]["effective"].clone())
        };
        let with = caps(&["NET_ADMIN"], &["chown", "CAP_KILL"]).unwrap();
        let with: Vec<&str> = with
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert!(with.contains(&"CAP_NET_ADMIN") && with.contains(&"CAP_SETUID"));
        assert!(!with.contains(&"CAP_CHOWN") && !with.contains(&"CAP_KILL"));
        assert_eq!(with.len(), DEFAULT_CAPABILITIES.len() - 1);
        assert_eq!(
            caps(&["SYS_TIME"], &["ALL"]).unwrap(),
            json!(["CAP_SYS_TIME"])
        );
        assert_eq!(caps(&[], &["ALL"]).unwrap(), json!([]));
        let all = caps(&["ALL"], &["SYS_ADMIN"]).unwrap();
        let all = all.as_array().unwrap();
        assert!(all.len() > DEFAULT_CAPABILITIES.len());
        assert!(!all.contains(&json!("CAP_SYS_ADMIN")));
        assert!(matches!(
            caps(&["MAKE_COFFEE"], &[]),
            Err(SpecError::BadCapability(_))
        ));
    }

    #[test]
    fn bad_requests_are_refused_with_a_reason() {
        let mut req = request();
        req.process.as_mut().unwrap().args.clear();
        assert_eq!(build(&req, &identity(), &ctx()), Err(SpecError::NoArgs));
        let mut req = request();
        req.process.as_mut().unwrap().env.push("NOEQUALS".into());
        assert!(matches!(
            build(&req, &identity(), &ctx()),
            Err(SpecError::BadEnv(_))
        ));
        for dest in ["relative", "/a/../../etc", ""] {
            let mut req = request();
            req.mounts.push(Mount {
                destination: dest.into(),
                source: "/x".into(),
                r#type: "bind".into(),
                options: vec![],
            });
            assert!(
                matches!(
                    build(&req, &identity(), &ctx()),
                    Err(SpecError::BadMountDestination(_))
                ),
                "{dest}"
            );
        }
        let mut req = request();
        req.mounts.push(Mount {
            destination: "/d".into(),
            source: "/x".into(),
            r#type: "nfs".into(),
            options: vec![],
        });
        assert!(matches!(
            build(&req, &identity(), &ctx()),
            Err(SpecError::BadMountType(_))
        ));
        let mut req = request();
        req.security = Some(Security {
            capabilities: vec!["CAP_MAKE_COFFEE".into()],
            ..Default::default()
        });
        assert!(matches!(
            build(&req, &identity(), &ctx()),
            Err(SpecError::BadCapability(_))
        ));
        let mut req = request();
        req.security = Some(Security {
            seccomp_json: "{not json".into(),
            ..Default::default()
        });
        assert!(matches!(
            build(&req, &identity(), &ctx()),
            Err(SpecError::BadSeccomp(_))
        ));
        let mut req = request();
        req.sysctls.insert("../../etc".into(), "1".into());
        assert!(matches!(
            build(&req, &identity(), &ctx()),
            Err(SpecError::BadSysctl(_))
        ));
    }
}
