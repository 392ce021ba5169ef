//! The daemon's TOML configuration (`/etc/vmpod/config.toml`).
//!
//! Every key is optional and has a sane default; unknown keys are rejected so
//! a typo never silently falls back to a default. docs/config.md documents
//! the same keys with an example.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Errors from reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The whole configuration file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where sandbox and container metadata live (JSON per object), plus each
    /// host pod's agent socket and network namespace. Default `/var/lib/vmpod`.
    pub state_dir: PathBuf,
    /// Root under which log directories given by the kubelet must lie; log
    /// paths outside it are refused. Default `/var/log/pods`.
    pub log_dir_root: PathBuf,
    /// The static `vmpod-agent` binary run by host sandboxes (and built into
    /// the guest initramfs). Default: `vmpod-agent` next to the `vmpod`
    /// binary, else `/usr/lib/vmpod/vmpod-agent`.
    pub agent_binary: Option<PathBuf>,
    /// The handler that serves pods with an empty runtime handler.
    /// Default `"vm"`.
    pub default_handler: String,
    /// Runtime handlers by name (the RuntimeClass handler). Default: `vm`
    /// (backend vm, hypervisor qemu) and `host` (backend host).
    pub handlers: BTreeMap<String, Handler>,
    /// What host sandboxes may do beyond the default isolation.
    pub host: HostPolicy,
    /// Images served from local files until the image service is wired in:
    /// `[[static_images]]` tables with `name`, `erofs` (the rootfs image)
    /// and `oci_layout` (an OCI layout directory holding the config).
    pub static_images: Vec<super::image::StaticImage>,
    /// `[image]`: the image service (registry endpoints and mirrors,
    /// platform, unpack bounds, `erofs_timeout_secs`); images live in
    /// `<state_dir>/images`, shared with `vmpod image`. See docs/config.md.
    pub image: crate::image::manager::ImageConfig,
    /// `[cni]`: pod networking through CNI plugins.
    pub cni: CniConfig,
}

/// Where the CNI network configuration and plugins are.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct CniConfig {
    /// Network configuration files (`.conflist`, `.conf`, `.json`).
    /// Default `/etc/cni/net.d`.
    pub conf_dir: PathBuf,
    /// Where plugin binaries are looked up, in order (CNI_PATH).
    /// Default `["/opt/cni/bin", "/usr/lib/cni"]` (Debian's
    /// containernetworking-plugins installs into /usr/lib/cni).
    pub bin_dirs: Vec<PathBuf>,
    /// The network pods join, by its `name`. Default: the first config
    /// file in `conf_dir` by file name, as containerd.
    pub network: Option<String>,
}

impl Default for CniConfig {
    fn default() -> Self {
        CniConfig {
            conf_dir: PathBuf::from("/etc/cni/net.d"),
            bin_dirs: vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")],
            network: None,
        }
    }
}

/// One runtime handler.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Handler {
    /// `host` (the agent as a host process in fresh namespaces) or `vm`.
    pub backend: Backend,
    /// VM handlers only: `qemu` (the only one wired so far) or `vmpod`.
    #[serde(default)]
    pub hypervisor: Option<Hypervisor>,
    /// VM handlers only: `kvm` or `tcg`. Default `kvm`.
    #[serde(default)]
    pub accel: Option<Accel>,
    /// VM handlers only: virtual CPUs. Default 1.
    #[serde(default)]
    pub vcpus: Option<u32>,
    /// VM handlers only: guest memory in MiB. Default 256.
    #[serde(default)]
    pub memory_mib: Option<u32>,
    /// VM handlers only: the guest kernel (ELF vmlinux).
    /// Default `/usr/lib/vmpod/vmlinux`.
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// VM handlers only: the guest initramfs (the agent as /init).
    /// Default `/usr/lib/vmpod/initramfs.cpio`.
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
}

/// Where a handler's pods run.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Host,
    Vm,
}

/// Which hypervisor runs a VM handler's pods.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Hypervisor {
    Qemu,
    Vmpod,
}

/// How QEMU runs the guest.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

/// Which weakenings of isolation host sandboxes may ask for. A pod that asks
/// for one that is not allowed gets FailedPrecondition, never a downgrade.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct HostPolicy {
    /// Pods may use the node's network namespace. Default false.
    pub allow_host_network: bool,
    /// Pods may use the node's PID namespace. Default false.
    pub allow_host_pid: bool,
    /// Pods may use the node's IPC namespace. Default false.
    pub allow_host_ipc: bool,
    /// Containers may be privileged. Default false.
    pub allow_privileged: bool,
}

impl Default for Config {
    fn default() -> Self {
        let mut handlers = BTreeMap::new();
        handlers.insert(
            "vm".to_string(),
            Handler {
                backend: Backend::Vm,
                hypervisor: Some(Hypervisor::Qemu),
                accel: None,
                vcpus: None,
                memory_mib: None,
                kernel: None,
                initramfs: None,
            },
        );
        handlers.insert(
            "host".to_string(),
            Handler {
                backend: Backend::Host,
                hypervisor: None,
                accel: None,
                vcpus: None,
                memory_mib: None,
                kernel: None,
                initramfs: None,
            },
        );
        Config {
            state_dir: PathBuf::from("/var/lib/vmpod"),
            log_dir_root: PathBuf::from("/var/log/pods"),
            agent_binary: None,
            default_handler: "vm".to_string(),
            handlers,
            host: HostPolicy::default(),
            static_images: Vec::new(),
            image: crate::image::manager::ImageConfig::default(),
            cni: CniConfig::default(),
        }
    }
}

impl Config {
    /// Reads `path`; a missing file at the default location means defaults.
    pub fn load(path: &Path, must_exist: bool) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => String::new(),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                source,
            },
            other => other,
        })
    }

    /// Parses and validates a configuration text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::new(),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !self.state_dir.is_absolute() || !self.log_dir_root.is_absolute() {
            return Err(ConfigError::Invalid(
                "state_dir and log_dir_root must be absolute paths".into(),
            ));
        }
        if !self.handlers.contains_key(&self.default_handler) {
            return Err(ConfigError::Invalid(format!(
                "default_handler {:?} is not a configured handler",
                self.default_handler
            )));
        }
        if !self.cni.conf_dir.is_absolute()
            || self.cni.bin_dirs.is_empty()
            || self.cni.bin_dirs.iter().any(|d| !d.is_absolute())
        {
            return Err(ConfigError::Invalid(
                "cni.conf_dir and cni.bin_dirs must be absolute paths (at least one bin dir)"
                    .into(),
            ));
        }
        for (name, h) in &self.handlers {
            if h.backend == Backend::Host
                && (h.hypervisor.is_some()
                    || h.accel.is_some()
                    || h.vcpus.is_some()
                    || h.memory_mib.is_some()
                    || h.kernel.is_some()
                    || h.initramfs.is_some())
            {
                return Err(ConfigError::Invalid(format!(
                    "handler {name:?}: VM settings on a host handler"
                )));
            }
            if h.vcpus == Some(0) || h.memory_mib.is_some_and(|m| m < 64) {
                return Err(ConfigError::Invalid(format!(
                    "handler {name:?}: vcpus must be ≥ 1 and memory_mib ≥ 64"
                )));
            }
        }
        Ok(())
    }

    /// The handler for a RuntimeClass handler name ("" = the default).
    pub fn handler(&self, name: &str) -> Option<(&str, &Handler)> {
        let name = if name.is_empty() {
            self.default_handler.as_str()
        } else {
            name
        };
        self.handlers
            .get_key_value(name)
            .map(|(k, v)| (k.as_str(), v))
    }

    /// The agent binary host sandboxes run.
    pub fn agent_binary(&self) -> PathBuf {
        if let Some(p) = &self.agent_binary {
            return p.clone();
        }
        if let Some(beside) = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|d| d.join("vmpod-agent")))
            .filter(|p| p.is_file())
        {
            return beside;
        }
        PathBuf::from("/usr/lib/vmpod/vmpod-agent")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_serve_vm() {
        let cfg = Config::parse("").unwrap();
        assert_eq!(cfg.default_handler, "vm");
        assert_eq!(cfg.handler("").unwrap().1.backend, Backend::Vm);
        assert_eq!(cfg.handler("host").unwrap().1.backend, Backend::Host);
        assert!(!cfg.host.allow_privileged);
        assert_eq!(cfg.cni.conf_dir, Path::new("/etc/cni/net.d"));
        assert_eq!(
            cfg.cni.bin_dirs,
            [Path::new("/opt/cni/bin"), Path::new("/usr/lib/cni")]
        );
        assert_eq!(cfg.cni.network, None);
    }

    #[test]
    fn cni_section() {
        let cfg = Config::parse(
            "[cni]\nconf_dir = \"/x/net.d\"\nbin_dirs = [\"/x/bin\"]\nnetwork = \"podnet\"\n",
        )
        .unwrap();
        assert_eq!(cfg.cni.network.as_deref(), Some("podnet"));
        assert!(Config::parse("[cni]\nbin_dirs = []").is_err());
        assert!(Config::parse("[cni]\nconf_dir = \"rel\"").is_err());
        assert!(Config::parse("[cni]\nconfdir = \"/x\"").is_err());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_rejected() {
        assert!(Config::parse("stat_dir = \"/x\"").is_err());
        assert!(Config::parse("[host]\nallow_everything = true").is_err());
        assert!(Config::parse("state_dir = \"relative\"").is_err());
        assert!(Config::parse("default_handler = \"nope\"").is_err());
        assert!(Config::parse("[handlers.h]\nbackend = \"host\"\nvcpus = 2").is_err());
        assert!(Config::parse("[handlers.h]\nbackend = \"moon\"").is_err());
    }

    #[test]
    fn custom_handlers() {
        let cfg = Config::parse(
            "default_handler = \"fast\"\n[handlers.fast]\nbackend = \"host\"\n\
             [handlers.slow]\nbackend = \"vm\"\nhypervisor = \"qemu\"\naccel = \"tcg\"\nvcpus = 2\n",
        )
        .unwrap();
        assert_eq!(cfg.handler("").unwrap().0, "fast");
        assert_eq!(cfg.handler("slow").unwrap().1.accel, Some(Accel::Tcg));
        assert!(cfg.handler("none").is_none());
    }
}
