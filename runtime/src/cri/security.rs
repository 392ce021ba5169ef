//! A container's security context → the agent's `Security`: every field
//! of the CRI request is honoured or refused with a reason, never dropped.
//!
//! - capabilities add/drop: passed through (the agent applies them in
//!   containerd's order); ambient capabilities are refused.
//! - seccomp: RuntimeDefault, Unconfined, or Localhost (a profile file on
//!   the node, bounded, handed to the agent as JSON), also in the
//!   deprecated `seccomp_profile_path` spelling.
//! - AppArmor and SELinux: vmpod applies neither, so only "unconfined" or
//!   "the runtime default" (which is: none) are accepted; a named profile
//!   or an SELinux label is refused rather than silently not applied.
//! - PID namespace: the pod's or the container's own; TARGET (ephemeral
//!   debug containers) is refused.

use std::io::Read;
use std::path::Path;

use k8s_cri::v1::security_profile::ProfileType;
use k8s_cri::v1::{LinuxContainerSecurityContext, NamespaceMode, SecurityProfile};
use vmpod_proto::v1 as agent;

use super::CriError;

/// The largest seccomp profile read from the node.
const MAX_SECCOMP_PROFILE: u64 = 1 << 20;

/// The agent's `Security` for a container's security context.
pub(super) fn container_security(
    sc: &LinuxContainerSecurityContext,
    pod_pid_mode: i32,
) -> Result<agent::Security, CriError> {
    let (add_capabilities, drop_capabilities) = match &sc.capabilities {
        Some(c) => {
            if !c.add_ambient_capabilities.is_empty() {
                return Err(CriError::Unimplemented(
                    "ambient capabilities are not supported by vmpod".into(),
                ));
            }
            (c.add_capabilities.clone(), c.drop_capabilities.clone())
        }
        None => (Vec::new(), Vec::new()),
    };
    let seccomp = seccomp(sc)?;
    apparmor(sc)?;
    if let Some(se) = &sc.selinux_options
        && !(se.user.is_empty()
            && se.role.is_empty()
            && se.r#type.is_empty()
            && se.level.is_empty())
    {
        return Err(CriError::Unimplemented(
            "SELinux labels are not applied by vmpod (no SELinux policy in its sandboxes); \
             remove seLinuxOptions"
                .into(),
        ));
    }
    let pid_mode = sc
        .namespace_options
        .as_ref()
        .map(|n| n.pid)
        .unwrap_or(pod_pid_mode);
    if pid_mode == NamespaceMode::Target as i32 {
        return Err(CriError::Unimplemented(
            "sharing another container's PID namespace (TARGET) is not supported".into(),
        ));
    }
    if pid_mode == NamespaceMode::Node as i32 && pod_pid_mode != NamespaceMode::Node as i32 {
        return Err(CriError::FailedPrecondition(
            "a container cannot use the node's PID namespace in a pod that does not".into(),
        ));
    }
    Ok(agent::Security {
        privileged: sc.privileged,
        no_new_privileges: sc.no_new_privs,
        readonly_rootfs: sc.readonly_rootfs,
        capabilities: Vec::new(),
        seccomp_json: seccomp.json,
        seccomp_runtime_default: seccomp.runtime_default,
        masked_paths: sc.masked_paths.clone(),
        readonly_paths: sc.readonly_paths.clone(),
        rlimits: Vec::new(),
        // In a hostPID pod the agent runs in the node's PID namespace, so
        // sharing the agent's is sharing the node's.
        share_pod_pid_namespace: pid_mode == NamespaceMode::Pod as i32
            || pid_mode == NamespaceMode::Node as i32,
        add_capabilities,
        drop_capabilities,
    })
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Seccomp {
    runtime_default: bool,
    json: String,
}

// Older kubelets still send the deprecated string spellings.
#[allow(deprecated)]
fn seccomp(sc: &LinuxContainerSecurityContext) -> Result<Seccomp, CriError> {
    // The structured field wins; the deprecated path spelling otherwise.
    let (kind, localhost) = match &sc.seccomp {
        Some(SecurityProfile {
            profile_type,
            localhost_ref,
        }) => (*profile_type, localhost_ref.clone()),
        None => match sc.seccomp_profile_path.as_str() {
            "" | "unconfined" => (ProfileType::Unconfined as i32, String::new()),
            "runtime/default" | "docker/default" => {
                (ProfileType::RuntimeDefault as i32, String::new())
            }
            p => match p.strip_prefix("localhost/") {
                Some(path) => (ProfileType::Localhost as i32, path.to_string()),
                None => {
                    return Err(CriError::InvalidArgument(format!(
                        "unknown seccomp profile path {p:?}"
                    )));
                }
            },
        },
    };
    if sc.privileged {
        // As containerd: privileged containers run unconfined.
        return Ok(Seccomp::default());
    }
    match ProfileType::try_from(kind) {
        Ok(ProfileType::Unconfined) => Ok(Seccomp::default()),
        Ok(ProfileType::RuntimeDefault) => Ok(Seccomp {
            runtime_default: true,
            json: String::new(),
        }),
        Ok(ProfileType::Localhost) => Ok(Seccomp {
            runtime_default: false,
            json: read_profile(Path::new(&localhost))?,
        }),
        Err(_) => Err(CriError::InvalidArgument(format!(
            "unknown seccomp profile type {kind}"
        ))),
    }
}

/// A Localhost seccomp profile: an absolute path on the node, at most
/// 1 MiB of JSON (the agent checks the content).
fn read_profile(path: &Path) -> Result<String, CriError> {
    if !path.is_absolute() {
        return Err(CriError::InvalidArgument(format!(
            "the seccomp profile {} must be an absolute path",
            path.display()
        )));
    }
    let file = std::fs::File::open(path)
        .map_err(|e| CriError::NotFound(format!("the seccomp profile {}: {e}", path.display())))?;
    let mut text = String::new();
    file.take(MAX_SECCOMP_PROFILE + 1)
        .read_to_string(&mut text)
        .map_err(|e| {
            CriError::InvalidArgument(format!(
                "reading the seccomp profile {}: {e}",
                path.display()
            ))
        })?;
    if text.len() as u64 > MAX_SECCOMP_PROFILE {
        return Err(CriError::InvalidArgument(format!(
            "the seccomp profile {} is larger than {MAX_SECCOMP_PROFILE} bytes",
            path.display()
        )));
    }
    serde_json::from_str::<serde_json::Value>(&text).map_err(|e| {
        CriError::InvalidArgument(format!(
            "the seccomp profile {} is not JSON: {e}",
            path.display()
        ))
    })?;
    Ok(text)
}

#[allow(deprecated)]
fn apparmor(sc: &LinuxContainerSecurityContext) -> Result<(), CriError> {
    let named = match &sc.apparmor {
        Some(p) => match ProfileType::try_from(p.profile_type) {
            Ok(ProfileType::Localhost) => Some(p.localhost_ref.clone()),
            Ok(_) => None,
            Err(_) => {
                return Err(CriError::InvalidArgument(format!(
                    "unknown AppArmor profile type {}",
                    p.profile_type
                )));
            }
        },
        None => match sc.apparmor_profile.as_str() {
            "" | "unconfined" | "runtime/default" => None,
            p => Some(p.strip_prefix("localhost/").unwrap_or(p).to_string()),
        },
    };
    match named {
        None => Ok(()),
        Some(profile) => Err(CriError::Unimplemented(format!(
            "AppArmor profile {profile:?} cannot be applied: vmpod's sandboxes run without \
             AppArmor (only unconfined or runtime/default are accepted)"
        ))),
    }
}

#[cfg(test)]
#[allow(deprecated)]
mod tests {
    use super::*;
    use k8s_cri::v1::{Capability, NamespaceOption, SeLinuxOption};

    fn ctx() -> LinuxContainerSecurityContext {
        LinuxContainerSecurityContext::default()
    }

    fn code(r: Result<agent::Security, CriError>) -> tonic::Code {
        r.expect_err("must be refused").to_status().code()
    }

    #[test]
    fn capabilities_pass_through_and_ambient_is_refused() {
        let mut sc = ctx();
        sc.capabilities = Some(Capability {
            add_capabilities: vec!["NET_ADMIN".into()],
            drop_capabilities: vec!["ALL".into()],
            add_ambient_capabilities: vec![],
        });
        let s = container_security(&sc, NamespaceMode::Container as i32).unwrap();
        assert_eq!(s.add_capabilities, ["NET_ADMIN"]);
        assert_eq!(s.drop_capabilities, ["ALL"]);
        sc.capabilities.as_mut().unwrap().add_ambient_capabilities = vec!["NET_RAW".into()];
        assert_eq!(
            code(container_security(&sc, NamespaceMode::Container as i32)),
            tonic::Code::Unimplemented
        );
    }

    #[test]
    fn seccomp_profiles_in_both_spellings() {
        let mut sc = ctx();
        sc.seccomp_profile_path = "runtime/default".into();
        assert!(seccomp(&sc).unwrap().runtime_default);
        sc.seccomp_profile_path = "unconfined".into();
        assert_eq!(seccomp(&sc).unwrap(), Seccomp::default());
        sc.seccomp_profile_path = "bogus".into();
        assert!(seccomp(&sc).is_err());

        let dir = tempfile::tempdir().unwrap();
        let profile = dir.path().join("p.json");
        std::fs::write(&profile, r#"{"defaultAction":"SCMP_ACT_ALLOW"}"#).unwrap();
        sc.seccomp = Some(SecurityProfile {
            profile_type: ProfileType::Localhost as i32,
            localhost_ref: profile.display().to_string(),
        });
        assert!(seccomp(&sc).unwrap().json.contains("SCMP_ACT_ALLOW"));
        sc.seccomp_profile_path.clear();
        sc.seccomp = None;
        sc.seccomp_profile_path = format!("localhost/{}", profile.display());
        assert!(seccomp(&sc).unwrap().json.contains("SCMP_ACT_ALLOW"));

        std::fs::write(&profile, "not json").unwrap();
        assert!(matches!(seccomp(&sc), Err(CriError::InvalidArgument(_))));
        sc.seccomp_profile_path = "localhost/relative.json".into();
        assert!(matches!(seccomp(&sc), Err(CriError::InvalidArgument(_))));
        sc.seccomp_profile_path = format!("localhost/{}/missing", dir.path().display());
        assert!(matches!(seccomp(&sc), Err(CriError::NotFound(_))));
        std::fs::write(&profile, vec![b' '; (MAX_SECCOMP_PROFILE + 2) as usize]).unwrap();
        sc.seccomp_profile_path = format!("localhost/{}", profile.display());
        assert!(matches!(seccomp(&sc), Err(CriError::InvalidArgument(_))));
        // Privileged containers run unconfined, as with containerd.
        sc.privileged = true;
        assert_eq!(seccomp(&sc).unwrap(), Seccomp::default());
    }

    #[test]
    fn apparmor_and_selinux_are_refused_rather_than_ignored() {
        let mut sc = ctx();
        sc.apparmor_profile = "runtime/default".into();
        assert!(container_security(&sc, 0).is_ok());
        sc.apparmor_profile = "localhost/k8s-nginx".into();
        assert_eq!(code(container_security(&sc, 0)), tonic::Code::Unimplemented);
        sc.apparmor_profile.clear();
        sc.apparmor = Some(SecurityProfile {
            profile_type: ProfileType::Unconfined as i32,
            localhost_ref: String::new(),
        });
        assert!(container_security(&sc, 0).is_ok());
        sc.selinux_options = Some(SeLinuxOption::default());
        assert!(container_security(&sc, 0).is_ok());
        sc.selinux_options = Some(SeLinuxOption {
            level: "s0:c1,c2".into(),
            ..Default::default()
        });
        assert_eq!(code(container_security(&sc, 0)), tonic::Code::Unimplemented);
    }

    #[test]
    fn pid_namespace_modes() {
        let mut sc = ctx();
        let pod = NamespaceMode::Pod as i32;
        assert!(
            container_security(&sc, pod)
                .unwrap()
                .share_pod_pid_namespace
        );
        sc.namespace_options = Some(NamespaceOption {
            pid: NamespaceMode::Container as i32,
            ..Default::default()
        });
        assert!(
            !container_security(&sc, pod)
                .unwrap()
                .share_pod_pid_namespace
        );
        sc.namespace_options = Some(NamespaceOption {
            pid: NamespaceMode::Target as i32,
            ..Default::default()
        });
        assert_eq!(
            code(container_security(&sc, pod)),
            tonic::Code::Unimplemented
        );
        sc.namespace_options = Some(NamespaceOption {
            pid: NamespaceMode::Node as i32,
            ..Default::default()
        });
        assert_eq!(
            code(container_security(&sc, pod)),
            tonic::Code::FailedPrecondition
        );
        let node = NamespaceMode::Node as i32;
        assert!(
            container_security(&sc, node)
                .unwrap()
                .share_pod_pid_namespace
        );
    }
}
