//! Pod-level settings (SetupSandbox): hostname, DNS, namespaced sysctls, and
//! the pod's shared /dev/shm.

use std::path::Path;

use vmpod_proto::v1::SetupSandboxRequest;

use crate::container::{ContainerError, Manager};

/// Sysctl prefixes that are per network/IPC/UTS namespace, so setting them
/// affects only this pod (Kubernetes allows no others in a pod spec).
const NAMESPACED_SYSCTLS: &[&str] = &[
    "net.",
    "kernel.shm",
    "kernel.msg",
    "kernel.sem",
    "fs.mqueue.",
    "kernel.hostname",
    "kernel.domainname",
];

/// Size of the pod's /dev/shm, as runc's default.
const SHM_SIZE: &str = "size=65536k";

fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 64
        && h.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn valid_sysctl(key: &str) -> bool {
    !key.is_empty()
        && !key.contains("..")
        && !key.starts_with('.')
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        && NAMESPACED_SYSCTLS.iter().any(|p| key.starts_with(p))
}

fn one_line(kind: &str, v: &str) -> Result<(), ContainerError> {
    if v.is_empty() || v.contains(['\n', '\r', '\0']) || v.len() > 256 {
        return Err(ContainerError::InvalidArgument(format!(
            "invalid DNS {kind} {v:?}"
        )));
    }
    Ok(())
}

/// The resolv.conf for a request.
pub fn resolv_conf(req: &SetupSandboxRequest) -> Result<String, ContainerError> {
    let mut out = String::new();
    for s in &req.dns_servers {
        one_line("server", s)?;
        if s.parse::<std::net::IpAddr>().is_err() {
            return Err(ContainerError::InvalidArgument(format!(
                "DNS server {s:?} is not an IP address"
            )));
        }
        out.push_str(&format!("nameserver {s}\n"));
    }
    if !req.dns_searches.is_empty() {
        for s in &req.dns_searches {
            one_line("search domain", s)?;
        }
        out.push_str(&format!("search {}\n", req.dns_searches.join(" ")));
    }
    if !req.dns_options.is_empty() {
        for o in &req.dns_options {
            one_line("option", o)?;
        }
        out.push_str(&format!("options {}\n", req.dns_options.join(" ")));
    }
    Ok(out)
}

/// Mounts the pod's /dev/shm (a tmpfs every container binds); once.
pub fn prepare(manager: &Manager) -> Result<(), ContainerError> {
    let dir = manager.sandbox_dir();
    let shm = dir.join("shm");
    std::fs::create_dir_all(&shm)
        .map_err(|e| ContainerError::Internal(format!("creating {}: {e}", shm.display())))?;
    use nix::mount::{MsFlags, mount};
    mount(
        Some("shm"),
        &shm,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(format!("mode=1777,{SHM_SIZE}").as_str()),
    )
    .map_err(|e| ContainerError::Internal(format!("mounting the pod's /dev/shm: {e}")))?;
    manager
        .sandbox
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .shm = Some(shm);
    Ok(())
}

/// SetupSandbox.
pub fn setup(manager: &Manager, req: &SetupSandboxRequest) -> Result<(), ContainerError> {
    if !req.hostname.is_empty() && !valid_hostname(&req.hostname) {
        return Err(ContainerError::InvalidArgument(format!(
            "invalid hostname {:?}",
            req.hostname
        )));
    }
    if let Some(bad) = req.sysctls.keys().find(|k| !valid_sysctl(k)) {
        return Err(ContainerError::InvalidArgument(format!(
            "sysctl {bad:?} is not a namespaced sysctl a pod may set"
        )));
    }
    let resolv = resolv_conf(req)?;
    let dir = manager.sandbox_dir();
    std::fs::create_dir_all(&dir)
        .map_err(|e| ContainerError::Internal(format!("creating {}: {e}", dir.display())))?;
    let write = |name: &str, text: &str| -> Result<std::path::PathBuf, ContainerError> {
        let path = dir.join(name);
        std::fs::write(&path, text)
            .map_err(|e| ContainerError::Internal(format!("writing {}: {e}", path.display())))?;
        Ok(path)
    };
    for (key, value) in &req.sysctls {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        std::fs::write(&path, value).map_err(|e| {
            ContainerError::InvalidArgument(format!("setting sysctl {key}={value:?}: {e}"))
        })?;
    }
    crate::netif::configure(&req.interfaces).map_err(|e| match e {
        crate::netif::NetifError::Invalid(m) => ContainerError::InvalidArgument(m),
        other => ContainerError::Internal(format!(
            "configuring the pod's network: {}",
            crate::container::chain(&other)
        )),
    })?;
    let mut files = manager.sandbox.lock().unwrap_or_else(|p| p.into_inner());
    if !req.hostname.is_empty() {
        nix::unistd::sethostname(&req.hostname)
            .map_err(|e| ContainerError::Internal(format!("setting the hostname: {e}")))?;
        files.etc_hostname = Some(write("hostname", &format!("{}\n", req.hostname))?);
        files.hostname = req.hostname.clone();
    }
    if !resolv.is_empty() {
        files.resolv_conf = Some(write("resolv.conf", &resolv)?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_follow_rfc_1123() {
        for good in ["pod", "my-pod-1", "a.b.c"] {
            assert!(valid_hostname(good), "{good}");
        }
        for bad in ["", "-x", "x-", "a..b", "sp ace", "x/y", &"a".repeat(65)] {
            assert!(!valid_hostname(bad), "{bad:?}");
        }
    }

    #[test]
    fn only_namespaced_sysctls_are_allowed() {
        assert!(valid_sysctl("net.ipv4.ip_forward"));
        assert!(valid_sysctl("kernel.shm_rmid_forced"));
        assert!(!valid_sysctl("kernel.panic"), "host-wide");
        assert!(!valid_sysctl("vm.swappiness"), "host-wide");
        assert!(!valid_sysctl("net/../../etc"));
        assert!(!valid_sysctl("net..x"));
    }

    #[test]
    fn resolv_conf_is_built_and_checked() {
        let req = SetupSandboxRequest {
            dns_servers: vec!["10.0.0.10".into()],
            dns_searches: vec!["default.svc.cluster.local".into(), "cluster.local".into()],
            dns_options: vec!["ndots:5".into()],
            ..Default::default()
        };
        assert_eq!(
            resolv_conf(&req).unwrap(),
            "nameserver 10.0.0.10\nsearch default.svc.cluster.local cluster.local\noptions ndots:5\n"
        );
        let bad = SetupSandboxRequest {
            dns_servers: vec!["1.2.3.4\nnameserver 6.6.6.6".into()],
            ..Default::default()
        };
        assert!(resolv_conf(&bad).is_err());
        let bad = SetupSandboxRequest {
            dns_servers: vec!["not-an-ip".into()],
            ..Default::default()
        };
        assert!(resolv_conf(&bad).is_err());
    }
}
