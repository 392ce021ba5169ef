//! A pod's cgroups on the host: `<cgroup parent>/<sandbox ID>` in every
//! hierarchy. Host pods' containers live below it; VM pods' host processes
//! (VMM or QEMU and their helpers) are moved into it.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// A process could not join a pod cgroup.
#[derive(Debug, thiserror::Error)]
#[error("joining the pod's cgroup {path}")]
pub struct CgroupError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Moves host processes of a VM pod (its VMM or QEMU and their helpers)
/// into the pod's cgroup in every hierarchy, so the node's accounting (the
/// kubelet's pod cgroup, when it names one) sees the VM. cpuset cgroups
/// start empty in cgroup v1 and take their parent's CPUs and memory nodes.
pub fn join_cgroups(parent: &str, pids: &[i32]) -> Result<(), CgroupError> {
    let rel = parent.trim_start_matches('/');
    let mut roots: Vec<PathBuf> = Vec::new();
    if Path::new("/sys/fs/cgroup/cgroup.procs").exists() {
        roots.push(PathBuf::from("/sys/fs/cgroup")); // cgroup v2 only
    } else if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
        roots.extend(
            hierarchies
                .flatten()
                .map(|h| h.path())
                .filter(|h| h.join("cgroup.procs").exists()),
        );
    }
    let err = |path: &Path, e: std::io::Error| CgroupError {
        path: path.to_path_buf(),
        source: e,
    };
    for root in roots {
        let dir = root.join(rel);
        // Create level by level so cpuset levels inherit as they appear.
        let mut at = root.clone();
        for part in Path::new(rel).components() {
            at.push(part);
            if at.is_dir() {
                continue;
            }
            std::fs::create_dir(&at).map_err(|e| err(&at, e))?;
            for file in ["cpuset.cpus", "cpuset.mems"] {
                let own = at.join(file);
                let Some(up) = at.parent().map(|p| p.join(file)) else {
                    continue;
                };
                if own.exists()
                    && std::fs::read_to_string(&own).is_ok_and(|s| s.trim().is_empty())
                    && let Ok(value) = std::fs::read_to_string(&up)
                {
                    std::fs::write(&own, value.trim()).map_err(|e| err(&own, e))?;
                }
            }
        }
        let procs = dir.join("cgroup.procs");
        for pid in pids {
            std::fs::write(&procs, pid.to_string()).map_err(|e| err(&procs, e))?;
        }
    }
    Ok(())
}

/// Kills whatever still runs under a sandbox's cgroup parent, in every
/// hierarchy of the host, and removes the cgroups, deepest first. False
/// when some are left (a process that would not die).
pub async fn remove_cgroups(parent: &str) -> bool {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
        for h in hierarchies.flatten() {
            collect_dirs(&h.path().join(parent.trim_start_matches('/')), &mut dirs);
        }
    }
    // cgroup v2 mounted directly on /sys/fs/cgroup.
    collect_dirs(
        &Path::new("/sys/fs/cgroup").join(parent.trim_start_matches('/')),
        &mut dirs,
    );
    for dir in &dirs {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    dirs.dedup();
    for _ in 0..50 {
        dirs.retain(|d| std::fs::remove_dir(d).is_err() && d.exists());
        if dirs.is_empty() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tracing::warn!(?dirs, "cgroups left behind");
    false
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    if !dir.is_dir() {
        return;
    }
    out.push(dir.to_path_buf());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}
