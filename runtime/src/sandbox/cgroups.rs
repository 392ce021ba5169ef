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
    for procs in prepare(parent)? {
        for pid in pids {
            std::fs::write(&procs, pid.to_string()).map_err(|e| CgroupError {
                path: procs.clone(),
                source: e,
            })?;
        }
    }
    Ok(())
}

/// Creates the pod's cgroup `parent` in every hierarchy (cpuset levels
/// filled in from their parents) and returns each one's `cgroup.procs`:
/// what a process writes `0` into to join it itself (a VMM does, before it
/// runs, so the VMM its jailer forks starts inside).
pub fn prepare(parent: &str) -> Result<Vec<PathBuf>, CgroupError> {
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
    let mut out = Vec::new();
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
        out.push(dir.join("cgroup.procs"));
    }
    Ok(out)
}

/// Limits a pod cgroup that holds only a VMM: its memory (guest RAM plus
/// the VMM's own) and its number of tasks. cgroup v1 (memory, pids
/// hierarchies) or v2. A limit whose file is missing (controller not
/// mounted) is skipped; one the kernel refuses is an error.
pub fn limit_vmm(parent: &str, memory_bytes: u64, pids: u32) -> Result<(), CgroupError> {
    let rel = parent.trim_start_matches('/');
    let unified = Path::new("/sys/fs/cgroup/cgroup.procs").exists();
    let files: [(PathBuf, String); 2] = if unified {
        let dir = Path::new("/sys/fs/cgroup").join(rel);
        [
            (dir.join("memory.max"), memory_bytes.to_string()),
            (dir.join("pids.max"), pids.to_string()),
        ]
    } else {
        [
            (
                Path::new("/sys/fs/cgroup/memory")
                    .join(rel)
                    .join("memory.limit_in_bytes"),
                memory_bytes.to_string(),
            ),
            (
                Path::new("/sys/fs/cgroup/pids").join(rel).join("pids.max"),
                pids.to_string(),
            ),
        ]
    };
    for (file, value) in files {
        if file.exists() {
            std::fs::write(&file, &value).map_err(|e| CgroupError {
                path: file.clone(),
                source: e,
            })?;
        }
    }
    Ok(())
}

/// What a pod's cgroup on the host has used: a host pod's containers,
/// agent and log pumps; a VM pod's VMM or QEMU (the guest's memory as the
/// node backs it), its helpers and log pumps. PodSandboxStats reports
/// these, as containerd reports the sandbox cgroup, so the kubelet sees
/// what the pod costs the node, not only what its containers see inside.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub cpu_ns: u64,
    pub memory_bytes: u64,
    /// Memory less inactive file pages, as the kubelet computes it.
    pub working_set_bytes: u64,
}

/// The pod cgroup's usage, from the memory and cpuacct hierarchies (cgroup
/// v1) or the unified one (v2); None when they cannot be read.
pub fn usage(parent: &str) -> Option<Usage> {
    usage_in(Path::new("/sys/fs/cgroup"), parent)
}

fn usage_in(root: &Path, parent: &str) -> Option<Usage> {
    let rel = parent.trim_start_matches('/');
    if rel.is_empty() {
        return None;
    }
    let (memory, inactive, cpu_ns) = if root.join("cgroup.procs").exists() {
        let dir = root.join(rel);
        let memory = read_u64(&dir.join("memory.current"))?;
        let stat = std::fs::read_to_string(dir.join("memory.stat")).ok()?;
        let cpu = std::fs::read_to_string(dir.join("cpu.stat")).ok()?;
        (
            memory,
            stat_field(&stat, "inactive_file").unwrap_or(0),
            stat_field(&cpu, "usage_usec")?.saturating_mul(1000),
        )
    } else {
        let dir = root.join("memory").join(rel);
        let memory = read_u64(&dir.join("memory.usage_in_bytes"))?;
        let stat = std::fs::read_to_string(dir.join("memory.stat")).ok()?;
        (
            memory,
            stat_field(&stat, "total_inactive_file").unwrap_or(0),
            read_u64(&root.join("cpuacct").join(rel).join("cpuacct.usage"))?,
        )
    };
    Some(Usage {
        cpu_ns,
        memory_bytes: memory,
        working_set_bytes: memory.saturating_sub(inactive),
    })
}

/// A small cgroup file holding one number.
fn read_u64(path: &Path) -> Option<u64> {
    let mut buf = [0u8; 64];
    let n = std::io::Read::read(&mut std::fs::File::open(path).ok()?, &mut buf).ok()?;
    std::str::from_utf8(&buf[..n]).ok()?.trim().parse().ok()
}

/// `key value` lines (memory.stat, cpu.stat).
fn stat_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_reads_v1_and_v2_layouts() {
        let v1 = tempfile::tempdir().unwrap();
        let mem = v1.path().join("memory/vmpod/p1");
        let cpu = v1.path().join("cpuacct/vmpod/p1");
        std::fs::create_dir_all(&mem).unwrap();
        std::fs::create_dir_all(&cpu).unwrap();
        std::fs::write(mem.join("memory.usage_in_bytes"), "1000000\n").unwrap();
        std::fs::write(
            mem.join("memory.stat"),
            "cache 5\ninactive_file 1\ntotal_inactive_file 400000\n",
        )
        .unwrap();
        std::fs::write(cpu.join("cpuacct.usage"), "123456789\n").unwrap();
        assert_eq!(
            usage_in(v1.path(), "/vmpod/p1"),
            Some(Usage {
                cpu_ns: 123456789,
                memory_bytes: 1000000,
                working_set_bytes: 600000,
            })
        );
        assert_eq!(usage_in(v1.path(), "/vmpod/gone"), None);
        assert_eq!(usage_in(v1.path(), ""), None);

        let v2 = tempfile::tempdir().unwrap();
        std::fs::write(v2.path().join("cgroup.procs"), "").unwrap();
        let dir = v2.path().join("vmpod/p2");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("memory.current"), "2048\n").unwrap();
        std::fs::write(dir.join("memory.stat"), "anon 1024\ninactive_file 48\n").unwrap();
        std::fs::write(dir.join("cpu.stat"), "usage_usec 7\nuser_usec 5\n").unwrap();
        assert_eq!(
            usage_in(v2.path(), "vmpod/p2"),
            Some(Usage {
                cpu_ns: 7000,
                memory_bytes: 2048,
                working_set_bytes: 2000,
            })
        );
    }
}
