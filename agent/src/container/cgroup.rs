//! A container's cgroup as files: statistics, limits, OOM kills.
//!
//! In a guest the hierarchy is cgroup v2 (the agent mounts it). A host-mode
//! agent on a cgroups v1/hybrid host (where every controller is bound to v1)
//! gets v1 from libcontainer, so both layouts are read here; the numbers
//! mean the same either way.

use std::path::{Path, PathBuf};

use vmpod_proto::v1::Resources;

/// Which hierarchy a container's cgroup lives in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cgroup {
    /// `/sys/fs/cgroup/<path>`.
    V2(PathBuf),
    /// `/sys/fs/cgroup/<controller>/<path>`.
    V1 { root: PathBuf, path: String },
}

/// Statistics of one cgroup.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupStats {
    pub cpu_usage_ns: u64,
    pub memory_usage_bytes: u64,
    pub memory_working_set_bytes: u64,
    pub pids: u64,
    pub oom_kills: u64,
}

/// Errors from writing limits.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("writing {value:?} to {path}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: std::io::Error,
    },
}

impl Cgroup {
    /// The cgroup at `path` (as in the spec's cgroupsPath) under `mount`.
    pub fn detect(mount: &Path, path: &str) -> Cgroup {
        let rel = path.trim_start_matches('/');
        if mount.join("cgroup.controllers").exists() {
            Cgroup::V2(mount.join(rel))
        } else {
            Cgroup::V1 {
                root: mount.to_path_buf(),
                path: rel.to_string(),
            }
        }
    }

    fn file(&self, v2: &str, v1_controller: &str, v1: &str) -> PathBuf {
        match self {
            Cgroup::V2(dir) => dir.join(v2),
            Cgroup::V1 { root, path } => root.join(v1_controller).join(path).join(v1),
        }
    }

    /// Reads what the kubelet's stats need; missing files count as zero.
    pub fn stats(&self) -> CgroupStats {
        match self {
            Cgroup::V2(dir) => {
                let usage = read_u64(&dir.join("memory.current"));
                let inactive = key_value(&dir.join("memory.stat"), "inactive_file");
                CgroupStats {
                    cpu_usage_ns: key_value(&dir.join("cpu.stat"), "usage_usec")
                        .saturating_mul(1000),
                    memory_usage_bytes: usage,
                    memory_working_set_bytes: usage.saturating_sub(inactive),
                    pids: read_u64(&dir.join("pids.current")),
                    oom_kills: key_value(&dir.join("memory.events"), "oom_kill"),
                }
            }
            Cgroup::V1 { .. } => {
                let usage = read_u64(&self.file("", "memory", "memory.usage_in_bytes"));
                let inactive = key_value(
                    &self.file("", "memory", "memory.stat"),
                    "total_inactive_file",
                );
                CgroupStats {
                    cpu_usage_ns: read_u64(&self.file("", "cpuacct", "cpuacct.usage")),
                    memory_usage_bytes: usage,
                    memory_working_set_bytes: usage.saturating_sub(inactive),
                    pids: read_u64(&self.file("", "pids", "pids.current")),
                    oom_kills: key_value(
                        &self.file("", "memory", "memory.oom_control"),
                        "oom_kill",
                    ),
                }
            }
        }
    }

    /// Applies new limits (UpdateContainerResources). Zero leaves a limit
    /// as it is.
    pub fn update(&self, r: &Resources) -> Result<(), CgroupError> {
        let mut writes: Vec<(PathBuf, String)> = Vec::new();
        match self {
            Cgroup::V2(dir) => {
                if r.memory_limit > 0 {
                    writes.push((dir.join("memory.max"), r.memory_limit.to_string()));
                }
                if r.pids_limit > 0 {
                    writes.push((dir.join("pids.max"), r.pids_limit.to_string()));
                }
                if r.cpu_shares > 0 {
                    writes.push((
                        dir.join("cpu.weight"),
                        shares_to_weight(r.cpu_shares).to_string(),
                    ));
                }
                if r.cpu_quota > 0 || r.cpu_period > 0 {
                    let period = if r.cpu_period > 0 {
                        r.cpu_period
                    } else {
                        100_000
                    };
                    let quota = if r.cpu_quota > 0 {
                        r.cpu_quota.to_string()
                    } else {
                        "max".to_string()
                    };
                    writes.push((dir.join("cpu.max"), format!("{quota} {period}")));
                }
            }
            Cgroup::V1 { .. } => {
                if r.memory_limit > 0 {
                    writes.push((
                        self.file("", "memory", "memory.limit_in_bytes"),
                        r.memory_limit.to_string(),
                    ));
                }
                if r.pids_limit > 0 {
                    writes.push((self.file("", "pids", "pids.max"), r.pids_limit.to_string()));
                }
                if r.cpu_shares > 0 {
                    writes.push((self.file("", "cpu", "cpu.shares"), r.cpu_shares.to_string()));
                }
                if r.cpu_period > 0 {
                    writes.push((
                        self.file("", "cpu", "cpu.cfs_period_us"),
                        r.cpu_period.to_string(),
                    ));
                }
                if r.cpu_quota > 0 {
                    writes.push((
                        self.file("", "cpu", "cpu.cfs_quota_us"),
                        r.cpu_quota.to_string(),
                    ));
                }
            }
        }
        for (path, value) in writes {
            std::fs::write(&path, &value).map_err(|source| CgroupError::Write {
                path,
                value,
                source,
            })?;
        }
        Ok(())
    }
}

/// The cgroup v2 weight for CPU shares (the conversion runc and crun use).
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 0;
    }
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

fn read_u64(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn key_value(path: &Path, key: &str) -> u64 {
    let Ok(text) = std::fs::read_to_string(path) else {
        return 0;
    };
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_v2_statistics() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "cpu memory pids").unwrap();
        let dir = root.path().join("vmpod/c1");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("memory.current"), "1000\n").unwrap();
        std::fs::write(dir.join("memory.stat"), "anon 10\ninactive_file 300\n").unwrap();
        std::fs::write(dir.join("cpu.stat"), "usage_usec 7\nuser_usec 5\n").unwrap();
        std::fs::write(dir.join("pids.current"), "3\n").unwrap();
        std::fs::write(dir.join("memory.events"), "low 0\noom 1\noom_kill 1\n").unwrap();
        let cg = Cgroup::detect(root.path(), "/vmpod/c1");
        assert_eq!(cg, Cgroup::V2(dir.clone()));
        assert_eq!(
            cg.stats(),
            CgroupStats {
                cpu_usage_ns: 7000,
                memory_usage_bytes: 1000,
                memory_working_set_bytes: 700,
                pids: 3,
                oom_kills: 1
            }
        );
        cg.update(&Resources {
            memory_limit: 4096,
            cpu_quota: 50_000,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("memory.max")).unwrap(),
            "4096"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("cpu.max")).unwrap(),
            "50000 100000"
        );
    }

    #[test]
    fn reads_v1_statistics() {
        let root = tempfile::tempdir().unwrap();
        for (ctrl, file, value) in [
            ("memory", "memory.usage_in_bytes", "500"),
            (
                "memory",
                "memory.stat",
                "cache 1\ntotal_inactive_file 100\n",
            ),
            (
                "memory",
                "memory.oom_control",
                "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
            ),
            ("cpuacct", "cpuacct.usage", "123"),
            ("pids", "pids.current", "4"),
        ] {
            let dir = root.path().join(ctrl).join("vmpod/c1");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(file), value).unwrap();
        }
        let cg = Cgroup::detect(root.path(), "/vmpod/c1");
        assert!(matches!(cg, Cgroup::V1 { .. }));
        assert_eq!(
            cg.stats(),
            CgroupStats {
                cpu_usage_ns: 123,
                memory_usage_bytes: 500,
                memory_working_set_bytes: 400,
                pids: 4,
                oom_kills: 2
            }
        );
    }

    #[test]
    fn shares_map_onto_weights_like_runc() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(0), 0);
    }
}
