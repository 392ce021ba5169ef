//! CreateContainer: the image config merged with the request the way
//! Kubernetes runtimes do it, then the agent prepares the container.

use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use k8s_cri::v1::{
    ContainerConfig, ContainerEventType, CreateContainerRequest, CreateContainerResponse,
};
use vmpod_proto::v1 as agent;

use super::image::ImageConfig;
use super::store::{
    ContainerRecord, ContainerState, ExecBase, MountRecord, SandboxState, StdioConfig,
};
use super::{Container, Cri, CriError, lock, new_id, now_ns};

impl Cri {
    pub(super) async fn create_container(
        &self,
        req: CreateContainerRequest,
    ) -> Result<CreateContainerResponse, CriError> {
        let config = req
            .config
            .ok_or_else(|| CriError::InvalidArgument("config is required".into()))?;
        let meta = config
            .metadata
            .clone()
            .ok_or_else(|| CriError::InvalidArgument("metadata is required".into()))?;
        if meta.name.is_empty() {
            return Err(CriError::InvalidArgument(
                "metadata.name is required".into(),
            ));
        }
        let image_ref = config
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .filter(|i| !i.is_empty())
            .ok_or_else(|| CriError::InvalidArgument("image is required".into()))?;
        let sandbox = self.sandbox(&req.pod_sandbox_id)?;
        let _op = sandbox.op.lock().await;
        let srec = sandbox.rec();
        if srec.state != SandboxState::Ready {
            return Err(CriError::FailedPrecondition(format!(
                "pod sandbox {} is not ready",
                srec.id
            )));
        }
        let taken = self.containers_of(&srec.id).iter().any(|c| {
            let r = lock(&c.rec);
            r.name == meta.name && r.attempt == meta.attempt
        });
        if taken {
            return Err(CriError::AlreadyExists(format!(
                "container {:?} attempt {} already exists in pod {}",
                meta.name, meta.attempt, srec.id
            )));
        }
        let image = self.images.resolve(&image_ref)?;
        let log_path = self.log_path(&srec.log_directory, &config.log_path)?;
        let mounts = mounts(&config, srec.is_vm())?;
        let security = config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.clone())
            .unwrap_or_default();
        // Privileged inside a VM is privileged inside the guest only; host
        // pods need the policy (see RunPodSandbox).
        if security.privileged && !srec.is_vm() && !self.config.host.allow_privileged {
            return Err(CriError::FailedPrecondition(
                "the container asks for privileged mode, which the config does not allow".into(),
            ));
        }
        let process = process(&config, &image.config, &security)?;
        let exec_base = {
            let u = process.user.clone().unwrap_or_default();
            ExecBase {
                env: process.env.clone(),
                cwd: process.cwd.clone(),
                uid: u.uid,
                gid: u.gid,
                username: u.username,
                additional_gids: u.additional_gids,
            }
        };

        let stdio = StdioConfig {
            stdin: config.stdin,
            stdin_once: config.stdin_once,
            tty: config.tty,
        };

        let id = new_id()?;
        let resources = config
            .linux
            .as_ref()
            .and_then(|l| l.resources.as_ref())
            .map(resources);
        let agent_security = super::security::container_security(&security, srec.pid_mode)?;
        let stop_signal = stop_signal(&image.config.stop_signal)?;
        if !config.devices.is_empty() || !config.cdi_devices.is_empty() {
            return Err(CriError::Unimplemented(
                "host devices are not passed into vmpod sandboxes".into(),
            ));
        }
        let mut agent_client = sandbox.agent()?;
        // The backend makes the image and volumes reachable by the agent
        // (a disk in a block slot, the VM's share, or the node's paths).
        let dir = self.state.sandbox_dir(&srec.id);
        let in_use: std::collections::BTreeSet<String> = self
            .containers_of(&srec.id)
            .iter()
            .map(|c| lock(&c.rec).image_id.clone())
            .collect();
        let mut backend = srec.backend.clone().ok_or_else(|| {
            CriError::FailedPrecondition(format!("pod sandbox {} has no backend", srec.id))
        })?;
        // The writable layer: a sparse ext4 file of the handler's size where
        // the handler keeps layers on disk, else a tmpfs the agent makes.
        let (layer, layer_bytes) = self
            .config
            .handler(&srec.resolved_handler)
            .map(|(_, h)| (h.writable_layer(), h.writable_layer_bytes()))
            .unwrap_or((
                crate::config::WritableLayer::Memory,
                crate::config::DEFAULT_MEMORY_LAYER_MIB << 20,
            ));
        let scratch = (layer == crate::config::WritableLayer::Disk
            && backend.kind() != crate::sandbox::BackendKind::Vmm)
            .then(|| crate::sandbox::scratch::path(&dir, &id));
        if let Some(file) = &scratch {
            crate::sandbox::scratch::create(file, layer_bytes).await?;
        }
        let remove_scratch = || {
            if let Some(file) = &scratch
                && let Err(e) = crate::sandbox::scratch::remove(file)
            {
                tracing::warn!(container = %id, error = %e, "removing a failed container's writable layer");
            }
        };
        let exposed = match backend
            .expose(&dir, &id, &image, &mounts, scratch.as_deref(), &in_use)
            .await
        {
            Ok(exposed) => exposed,
            Err(e) => {
                remove_scratch();
                return Err(e.into());
            }
        };
        // A disk attached now is recorded before anything else: unrecorded,
        // its slot would look free to a restarted daemon.
        if srec.backend.as_ref() != Some(&backend) {
            let r = {
                let mut r = lock(&sandbox.rec);
                r.backend = Some(backend.clone());
                r.clone()
            };
            if let Err(e) = self.state.save_sandbox(&r) {
                let _ = backend.withdraw(&dir, &id);
                remove_scratch();
                backend.release_images(&in_use).await;
                lock(&sandbox.rec).backend = Some(backend);
                return Err(e.into());
            }
        }
        let withdraw = || {
            if let Err(e) = backend.withdraw(&dir, &id) {
                tracing::warn!(container = %id, error = %super::error_chain(&e), "withdrawing a failed container's volumes");
            }
            remove_scratch();
        };
        let (rootfs_source, mount_sources) = (exposed.rootfs_source, exposed.mount_sources);
        let created = agent_client
            .create_container(agent::CreateContainerRequest {
                container_id: id.clone(),
                rootfs: Some(agent::Rootfs {
                    source: rootfs_source,
                    fstype: "erofs".into(),
                    writable_bytes: layer_bytes,
                    readonly: false,
                    scratch_source: exposed.scratch_source,
                }),
                process: Some(process),
                mounts: mounts
                    .iter()
                    .zip(&mount_sources)
                    .map(|(m, source)| agent::Mount {
                        destination: m.container_path.clone(),
                        source: source.clone(),
                        r#type: "bind".into(),
                        options: vec![
                            if m.readonly { "ro" } else { "rw" }.into(),
                            match m.propagation {
                                1 => "rslave",
                                2 => "rshared",
                                _ => "rprivate",
                            }
                            .into(),
                        ],
                    })
                    .collect(),
                resources,
                security: Some(agent_security),
                sysctls: Default::default(),
                hostname: srec.hostname.clone(),
            })
            .await;
        if let Err(status) = created {
            withdraw();
            return Err(CriError::agent("CreateContainer")(status));
        }
        let rec = ContainerRecord {
            id: id.clone(),
            sandbox_id: srec.id.clone(),
            name: meta.name,
            attempt: meta.attempt,
            labels: config.labels.into_iter().collect(),
            annotations: config.annotations.into_iter().collect(),
            image: image_ref,
            image_id: image.id,
            state: ContainerState::Created,
            created_at: now_ns(),
            started_at: 0,
            finished_at: 0,
            exit_code: 0,
            reason: String::new(),
            message: String::new(),
            log_path: log_path
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            mounts,
            log_pump: None,
            exec_base,
            stop_signal,
            stdio,
        };
        if let Err(e) = self.state.save_container(&rec) {
            let _ = agent_client
                .remove_container(agent::RemoveContainerRequest {
                    container_id: id.clone(),
                })
                .await;
            withdraw();
            return Err(e.into());
        }
        lock(&self.containers).insert(
            id.clone(),
            Arc::new(Container {
                rec: Mutex::new(rec.clone()),
            }),
        );
        self.emit(&rec, ContainerEventType::ContainerCreatedEvent);
        tracing::info!(container = %id, sandbox = %srec.id, "container created");
        Ok(CreateContainerResponse { container_id: id })
    }

    /// The container's log file: the pod's log directory joined with the
    /// relative path the kubelet chose, inside the configured log root.
    fn log_path(&self, directory: &str, relative: &str) -> Result<Option<PathBuf>, CriError> {
        if directory.is_empty() || relative.is_empty() {
            return Ok(None);
        }
        let dir = Path::new(directory);
        let rel = Path::new(relative);
        let plain = |p: &Path| {
            p.components()
                .all(|c| matches!(c, Component::Normal(_) | Component::RootDir))
        };
        if !dir.is_absolute() || !plain(dir) || rel.is_absolute() || !plain(rel) {
            return Err(CriError::InvalidArgument(format!(
                "log path {directory:?} + {relative:?} must be an absolute directory and a relative path without '..'"
            )));
        }
        if !dir.starts_with(&self.config.log_dir_root) {
            return Err(CriError::InvalidArgument(format!(
                "log directory {directory:?} is outside the configured log_dir_root {}",
                self.config.log_dir_root.display()
            )));
        }
        Ok(Some(dir.join(rel)))
    }
}

/// The request's mounts, checked. Propagation is runc's: HostToContainer
/// (rslave) needs a source on a shared or slave mount, Bidirectional
/// (rshared) a shared one (as containerd checks). VM pods get only private
/// mounts: their share clones each source privately into the guest, so no
/// mount event crosses the VM boundary either way.
fn mounts(config: &ContainerConfig, vm: bool) -> Result<Vec<MountRecord>, CriError> {
    use crate::sandbox::shared_fs::{Propagation, propagation_of};
    use k8s_cri::v1::MountPropagation;
    config
        .mounts
        .iter()
        .map(|m| {
            if m.recursive_read_only {
                return Err(CriError::InvalidArgument(format!(
                    "mount {:?}: recursive read-only mounts are not supported (the runtime \
                     handler does not report the feature)",
                    m.container_path
                )));
            }
            let propagation = MountPropagation::try_from(m.propagation)
                .unwrap_or(MountPropagation::PropagationPrivate);
            let abs = |p: &str| Path::new(p).is_absolute() && !p.split('/').any(|c| c == "..");
            if !abs(&m.container_path) || !abs(&m.host_path) {
                return Err(CriError::InvalidArgument(format!(
                    "mount {:?} → {:?}: both paths must be absolute without '..'",
                    m.host_path, m.container_path
                )));
            }
            if std::fs::symlink_metadata(&m.host_path).is_err() {
                return Err(CriError::InvalidArgument(format!(
                    "mount source {:?} does not exist",
                    m.host_path
                )));
            }
            if propagation != MountPropagation::PropagationPrivate {
                if vm {
                    return Err(CriError::Unimplemented(format!(
                        "mount {:?}: {} propagation cannot cross the VM boundary (VM pods \
                         see a private copy of each volume)",
                        m.container_path,
                        propagation.as_str_name()
                    )));
                }
                let source = std::fs::canonicalize(&m.host_path).map_err(|e| {
                    CriError::InvalidArgument(format!("mount source {:?}: {e}", m.host_path))
                })?;
                let have = propagation_of(&source);
                let ok = match propagation {
                    MountPropagation::PropagationBidirectional => have == Propagation::Shared,
                    _ => have != Propagation::Private,
                };
                if !ok {
                    return Err(CriError::FailedPrecondition(format!(
                        "mount {:?}: {} propagation needs a source on a {} mount; {} is on a \
                         {have:?} one",
                        m.container_path,
                        propagation.as_str_name(),
                        if propagation == MountPropagation::PropagationBidirectional {
                            "shared"
                        } else {
                            "shared or slave"
                        },
                        source.display()
                    )));
                }
            }
            Ok(MountRecord {
                container_path: m.container_path.clone(),
                host_path: m.host_path.clone(),
                readonly: m.readonly,
                propagation: propagation as i32,
            })
        })
        .collect()
}

/// The process: command/args merged with the image's entrypoint/cmd exactly
/// as containerd does (Docker's rules): a command replaces the entrypoint and
/// drops the image's cmd; args alone replace only the cmd.
pub(super) fn merge_args(
    command: &[String],
    args: &[String],
    image: &ImageConfig,
) -> Result<Vec<String>, CriError> {
    let mut out: Vec<String> = command.to_vec();
    let mut args = args.to_vec();
    if command.is_empty() {
        if args.is_empty() {
            args = image.cmd.clone();
        }
        if !(image.entrypoint.len() == 1 && image.entrypoint[0].is_empty()) {
            out = image.entrypoint.clone();
        }
    }
    out.extend(args);
    if out.is_empty() {
        return Err(CriError::InvalidArgument(
            "no command: neither the request nor the image names one".into(),
        ));
    }
    Ok(out)
}

/// Image env first, then the request's, a later key replacing an earlier one.
pub(super) fn merge_env(image: &[String], request: &[k8s_cri::v1::KeyValue]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut set = |kv: String| {
        let key = kv.split('=').next().unwrap_or_default().to_string();
        if let Some(slot) = out
            .iter_mut()
            .find(|e| e.split('=').next() == Some(key.as_str()))
        {
            *slot = kv;
        } else {
            out.push(kv);
        }
    };
    for e in image {
        set(e.clone());
    }
    for kv in request {
        set(format!("{}={}", kv.key, kv.value));
    }
    out
}

/// The user: the security context wins, then the image's USER.
pub(super) fn user(
    sc: &k8s_cri::v1::LinuxContainerSecurityContext,
    image_user: &str,
) -> Result<agent::User, CriError> {
    let mut user = agent::User {
        additional_gids: sc
            .supplemental_groups
            .iter()
            .map(|&g| id32(g))
            .collect::<Result<_, _>>()?,
        ..Default::default()
    };
    if !sc.run_as_username.is_empty() {
        user.username = sc.run_as_username.clone();
    } else if let Some(uid) = &sc.run_as_user {
        user.uid = id32(uid.value)?;
    } else if !image_user.is_empty() {
        let (name, group) = match image_user.split_once(':') {
            Some((n, g)) => (n, Some(g)),
            None => (image_user, None),
        };
        match name.parse::<u32>() {
            Ok(uid) => user.uid = uid,
            Err(_) => user.username = name.to_string(),
        }
        if let Some(g) = group {
            user.gid = Some(g.parse::<u32>().map_err(|_| {
                CriError::InvalidArgument(format!(
                    "image user {image_user:?}: group names are not supported, only numeric gids"
                ))
            })?);
        }
    }
    if let Some(gid) = &sc.run_as_group {
        // The CRI: "run_as_group should only be specified when run_as_user
        // or run_as_username is specified; otherwise, the runtime MUST
        // error" (containerd refuses it whatever the image's USER says).
        if sc.run_as_user.is_none() && sc.run_as_username.is_empty() {
            return Err(CriError::InvalidArgument(format!(
                "run_as_group {} is set without run_as_user or run_as_username",
                gid.value
            )));
        }
        user.gid = Some(id32(gid.value)?);
    }
    Ok(user)
}

fn id32(v: i64) -> Result<u32, CriError> {
    u32::try_from(v).map_err(|_| CriError::InvalidArgument(format!("ID {v} out of range")))
}

fn process(
    config: &ContainerConfig,
    image: &ImageConfig,
    sc: &k8s_cri::v1::LinuxContainerSecurityContext,
) -> Result<agent::Process, CriError> {
    Ok(agent::Process {
        args: merge_args(&config.command, &config.args, image)?,
        env: merge_env(&image.env, &config.envs),
        cwd: if config.working_dir.is_empty() {
            image.working_dir.clone()
        } else {
            config.working_dir.clone()
        },
        user: Some(user(sc, &image.user)?),
        // A TTY container's output is its terminal's, logged as stdout; its
        // stdin stays open for attach (the streaming server's job).
        terminal: config.tty,
        stdin: config.stdin,
        // The streaming server sets the size of an exec's terminal.
        ..Default::default()
    })
}

/// An image's StopSignal ("SIGTERM", "TERM", "15", "SIGRTMIN+3") as a
/// number; "" is 0 (SIGTERM). Anything else is refused at create time, not
/// discovered when the kubelet stops the container.
fn stop_signal(name: &str) -> Result<i32, CriError> {
    let bad =
        || CriError::InvalidArgument(format!("the image's StopSignal {name:?} is not a signal"));
    if name.is_empty() {
        return Ok(0);
    }
    if let Ok(n) = name.parse::<i32>() {
        return if (1..=64).contains(&n) {
            Ok(n)
        } else {
            Err(bad())
        };
    }
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    if let Some(rt) = bare.strip_prefix("RTMIN") {
        let offset = if rt.is_empty() {
            0
        } else {
            rt.strip_prefix('+')
                .and_then(|n| n.parse::<i32>().ok())
                .ok_or_else(bad)?
        };
        let n = libc::SIGRTMIN() + offset;
        return if offset >= 0 && n <= libc::SIGRTMAX() {
            Ok(n)
        } else {
            Err(bad())
        };
    }
    use std::str::FromStr;
    nix::sys::signal::Signal::from_str(&format!("SIG{bare}"))
        .map(|s| s as i32)
        .map_err(|_| bad())
}

pub(super) fn resources(r: &k8s_cri::v1::LinuxContainerResources) -> agent::Resources {
    agent::Resources {
        cpu_shares: u64::try_from(r.cpu_shares).unwrap_or(0),
        cpu_quota: r.cpu_quota,
        cpu_period: u64::try_from(r.cpu_period).unwrap_or(0),
        memory_limit: r.memory_limit_in_bytes,
        pids_limit: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn stop_signals_by_name_number_and_realtime_offset() {
        assert_eq!(stop_signal("").unwrap(), 0);
        assert_eq!(stop_signal("SIGQUIT").unwrap(), libc::SIGQUIT);
        assert_eq!(stop_signal("usr1").unwrap(), libc::SIGUSR1);
        assert_eq!(stop_signal("9").unwrap(), 9);
        assert_eq!(stop_signal("SIGRTMIN+3").unwrap(), libc::SIGRTMIN() + 3);
        for bad in ["SIGNOPE", "0", "65", "SIGRTMIN+99", "SIGRTMIN-1", "RTMINx"] {
            assert!(stop_signal(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn args_follow_the_kubernetes_rules() {
        let img = ImageConfig {
            entrypoint: v(&["/entry"]),
            cmd: v(&["default"]),
            ..Default::default()
        };
        assert_eq!(
            merge_args(&[], &[], &img).unwrap(),
            v(&["/entry", "default"])
        );
        assert_eq!(
            merge_args(&[], &v(&["a"]), &img).unwrap(),
            v(&["/entry", "a"])
        );
        assert_eq!(merge_args(&v(&["sh"]), &[], &img).unwrap(), v(&["sh"]));
        assert_eq!(
            merge_args(&v(&["sh"]), &v(&["-c", "x"]), &img).unwrap(),
            v(&["sh", "-c", "x"])
        );
        let cmd_only = ImageConfig {
            cmd: v(&["sh"]),
            ..Default::default()
        };
        assert_eq!(merge_args(&[], &[], &cmd_only).unwrap(), v(&["sh"]));
        assert!(merge_args(&[], &[], &ImageConfig::default()).is_err());
    }

    #[test]
    fn request_env_overrides_image_env() {
        let env = merge_env(
            &v(&["PATH=/bin", "A=1"]),
            &[k8s_cri::v1::KeyValue {
                key: "A".into(),
                value: "2=x".into(),
            }],
        );
        assert_eq!(env, v(&["PATH=/bin", "A=2=x"]));
    }

    #[test]
    fn user_from_context_or_image() {
        let none = k8s_cri::v1::LinuxContainerSecurityContext::default();
        let u = user(&none, "1000:50").unwrap();
        assert_eq!((u.uid, u.gid, u.username.as_str()), (1000, Some(50), ""));
        let u = user(&none, "nobody").unwrap();
        assert_eq!(u.username, "nobody");
        assert!(user(&none, "a:staff").is_err());
        let sc = k8s_cri::v1::LinuxContainerSecurityContext {
            run_as_user: Some(k8s_cri::v1::Int64Value { value: 7 }),
            run_as_group: Some(k8s_cri::v1::Int64Value { value: 8 }),
            ..Default::default()
        };
        let u = user(&sc, "nobody").unwrap();
        assert_eq!((u.uid, u.gid, u.username.as_str()), (7, Some(8), ""));
    }

    #[test]
    fn run_as_group_without_a_user_is_refused() {
        let group_only = k8s_cri::v1::LinuxContainerSecurityContext {
            run_as_group: Some(k8s_cri::v1::Int64Value { value: 8 }),
            ..Default::default()
        };
        // Not even an image USER with a uid makes it valid (as containerd).
        for image_user in ["", "1000", "nobody"] {
            assert!(matches!(
                user(&group_only, image_user),
                Err(CriError::InvalidArgument(_))
            ));
        }
        let by_name = k8s_cri::v1::LinuxContainerSecurityContext {
            run_as_username: "nobody".into(),
            ..group_only
        };
        assert_eq!(user(&by_name, "").unwrap().gid, Some(8));
    }
}
