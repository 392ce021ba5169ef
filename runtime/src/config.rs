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
    /// (backend vm, hypervisor vmpod) and `host` (backend host).
    pub handlers: BTreeMap<String, Handler>,
    /// What host sandboxes may do beyond the default isolation.
    pub host: HostPolicy,
    /// Images served from local files until the image service is wired in:
    /// `[[static_images]]` tables with `name`, `erofs` (the rootfs image)
    /// and `oci_layout` (an OCI layout directory holding the config).
    pub static_images: Vec<crate::cri::image::StaticImage>,
    /// `[image]`: the image service (registry endpoints and mirrors,
    /// platform, unpack bounds, `erofs_timeout_secs`); images live in
    /// `<state_dir>/images`, shared with `vmpod image`. See docs/config.md.
    pub image: crate::image::manager::ImageConfig,
    /// `[cni]`: pod networking through CNI plugins.
    pub cni: CniConfig,
    /// `[streaming]`: the exec/attach/port-forward server.
    pub streaming: crate::streaming::StreamingConfig,
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
    /// VM handlers only: `vmpod` (our own VMM, the default) or `qemu`.
    #[serde(default)]
    pub hypervisor: Option<Hypervisor>,
    /// `qemu` handlers only: `kvm` or `tcg`. Default `kvm`. (The `vmpod`
    /// VMM always runs on KVM.)
    #[serde(default)]
    pub accel: Option<Accel>,
    /// VM handlers only: virtual CPUs before the pod's own CPU limit is
    /// added. Default 1.
    #[serde(default)]
    pub vcpus: Option<u32>,
    /// VM handlers only: guest memory in MiB before the pod's memory limit
    /// is added. Default 256.
    #[serde(default)]
    pub memory_mib: Option<u32>,
    /// VM handlers only: the most vCPUs a pod VM may get. Default and
    /// upper bound 64 (the VMM's MP table).
    #[serde(default)]
    pub max_vcpus: Option<u32>,
    /// VM handlers only: the most guest memory a pod VM may get, in MiB.
    /// Default 131072 (128 GiB), upper bound 1 TiB.
    #[serde(default)]
    pub max_memory_mib: Option<u32>,
    /// VM handlers only: how long a pod VM gets to boot and answer the
    /// agent's Health call. Default 120 (QEMU TCG speeds).
    #[serde(default)]
    pub boot_timeout_secs: Option<u64>,
    /// `vmpod` handlers only: empty virtio-blk slots the VMM starts with;
    /// each image a pod's containers use takes one (hot-plugged). Default 8,
    /// at most 16.
    #[serde(default)]
    pub block_slots: Option<u32>,
    /// `vmpod` handlers only: whether the daemon checks at start-up that
    /// this host's KVM can run a stock Linux guest (`vmpod-vmm --probe`)
    /// and reports the handler not ready when it cannot (PVM, or a KVM
    /// without VT-x/AMD-V). Default true; false is for guests that are not
    /// stock Linux (test guests, PVM-patched kernels).
    #[serde(default)]
    pub probe_kvm: Option<bool>,
    /// `vmpod` handlers only: jail each pod's VMM (own mount, PID, IPC and
    /// UTS namespaces, an empty root, no capabilities, an unprivileged
    /// uid/gid, seccomp without open/socket/connect). Default true.
    #[serde(default)]
    pub jail: Option<bool>,
    /// `vmpod` handlers only: the uid and gid jailed VMMs run as. Default:
    /// one per pod from the range [`VMM_ID_BASE`], +65536 (derived from the
    /// sandbox ID).
    #[serde(default)]
    pub vmm_uid: Option<u32>,
    #[serde(default)]
    pub vmm_gid: Option<u32>,
    /// VM handlers only: words appended to the guest kernel's command line
    /// (printable ASCII, at most 512 bytes). Default none.
    #[serde(default)]
    pub kernel_args: Option<String>,
    /// VM handlers only: the guest kernel (ELF vmlinux).
    /// Default `/usr/lib/vmpod/vmlinux`.
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// VM handlers only: the guest initramfs (the agent as /init).
    /// Default `/usr/lib/vmpod/initramfs.cpio`.
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    /// Where containers' writable layers live: `disk` (a sparse ext4 file
    /// per container in the sandbox dir, the default) or `memory` (a
    /// tmpfs: guest RAM in a VM). The `vmpod` hypervisor has `memory` only
    /// for now.
    #[serde(default)]
    pub writable_layer: Option<WritableLayer>,
    /// The size of each container's writable layer in MiB. Default 10240
    /// on disk (sparse: only what the container writes takes space), 64 in
    /// memory. 1..=16777216.
    #[serde(default)]
    pub writable_layer_mib: Option<u64>,
}

/// Where a container's writable layer lives.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum WritableLayer {
    Disk,
    Memory,
}

/// Default `writable_layer_mib` on disk (10 GiB, sparse).
pub const DEFAULT_DISK_LAYER_MIB: u64 = 10 << 10;
/// Default `writable_layer_mib` in memory.
pub const DEFAULT_MEMORY_LAYER_MIB: u64 = 64;
/// The largest `writable_layer_mib` (16 TiB, ext4's file-size bound).
pub const MAX_WRITABLE_LAYER_MIB: u64 = 16 << 20;

/// Where a handler's pods run.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Host,
    Vm,
}

/// Which hypervisor runs a VM handler's pods.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Hypervisor {
    Qemu,
    /// vmpod's own VMM (`vmpod-vmm`), one process per pod.
    #[default]
    Vmpod,
}

/// The most vCPUs any pod VM gets (the VMM's MP table and APIC IDs).
pub const MAX_VCPUS: u32 = vmpod_vmm::config::MAX_VCPUS as u32;
/// Default `max_memory_mib`: 128 GiB.
pub const DEFAULT_MAX_MEMORY_MIB: u32 = 128 << 10;
/// The largest `max_memory_mib` accepted (the VMM's bound, 1 TiB).
pub const MAX_MEMORY_MIB: u32 = vmpod_vmm::config::MAX_MEMORY_MIB;
/// Default and largest `block_slots`.
pub const DEFAULT_BLOCK_SLOTS: u32 = 8;
pub const MAX_BLOCK_SLOTS: u32 = vmpod_vmm::config::MAX_BLOCK_SLOTS as u32;
/// The first of the 65536 uids/gids jailed VMMs get by default (no user
/// or group of a Debian system lives there).
pub const VMM_ID_BASE: u32 = 0x5000_0000;

/// Default and largest `boot_timeout_secs`.
pub const DEFAULT_BOOT_TIMEOUT_SECS: u64 = 120;
pub const MAX_BOOT_TIMEOUT_SECS: u64 = 3600;
/// The longest `kernel_args`.
pub const MAX_KERNEL_ARGS: usize = 512;

impl Handler {
    /// A handler of `backend` with every optional setting at its default.
    pub fn new(backend: Backend) -> Handler {
        Handler {
            backend,
            hypervisor: None,
            accel: None,
            vcpus: None,
            memory_mib: None,
            max_vcpus: None,
            max_memory_mib: None,
            boot_timeout_secs: None,
            block_slots: None,
            probe_kvm: None,
            jail: None,
            vmm_uid: None,
            vmm_gid: None,
            kernel_args: None,
            kernel: None,
            initramfs: None,
            writable_layer: None,
            writable_layer_mib: None,
        }
    }

    /// Where this handler's containers get their writable layer.
    pub fn writable_layer(&self) -> WritableLayer {
        match (self.backend, self.hypervisor(), self.writable_layer) {
            (_, _, Some(WritableLayer::Memory)) => WritableLayer::Memory,
            (Backend::Vm, Hypervisor::Vmpod, _) => WritableLayer::Memory,
            _ => WritableLayer::Disk,
        }
    }

    /// The size of each container's writable layer, in bytes.
    pub fn writable_layer_bytes(&self) -> u64 {
        let mib = self
            .writable_layer_mib
            .unwrap_or(match self.writable_layer() {
                WritableLayer::Disk => DEFAULT_DISK_LAYER_MIB,
                WritableLayer::Memory => DEFAULT_MEMORY_LAYER_MIB,
            });
        mib << 20
    }

    /// Whether pods' VMMs are jailed (`vmpod` handlers).
    pub fn jail(&self) -> bool {
        self.jail.unwrap_or(true)
    }

    /// The uid and gid of the jailed VMM of sandbox `id`: the handler's,
    /// else one per pod in [`VMM_ID_BASE`]..+65536, so no two pods' VMMs
    /// likely share an id even before their namespaces separate them.
    pub fn vmm_ids(&self, id: &str) -> (u32, u32) {
        // FNV-1a: stable across releases (the id must not change for a
        // running pod after a daemon upgrade; it is recorded in vmm.json).
        let hash = id.bytes().fold(0x811c_9dc5u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
        let derived = VMM_ID_BASE + (hash & 0xffff);
        (
            self.vmm_uid.unwrap_or(derived),
            self.vmm_gid.unwrap_or(derived),
        )
    }

    /// Whether readiness includes the start-up KVM probe (`vmpod` handlers).
    pub fn probe_kvm(&self) -> bool {
        self.probe_kvm.unwrap_or(true)
    }

    /// The hypervisor that runs this handler's VMs (default `vmpod`).
    pub fn hypervisor(&self) -> Hypervisor {
        self.hypervisor.unwrap_or_default()
    }

    /// vCPUs before the pod's own limit is added.
    pub fn base_vcpus(&self) -> u32 {
        self.vcpus.unwrap_or(1)
    }

    /// Guest MiB before the pod's own limit is added.
    pub fn base_memory_mib(&self) -> u32 {
        self.memory_mib.unwrap_or(256)
    }

    /// The most vCPUs one of this handler's pods may get.
    pub fn max_vcpus(&self) -> u32 {
        self.max_vcpus.unwrap_or(MAX_VCPUS)
    }

    /// The most guest MiB one of this handler's pods may get.
    pub fn max_memory_mib(&self) -> u32 {
        self.max_memory_mib.unwrap_or(DEFAULT_MAX_MEMORY_MIB)
    }

    /// How long a pod VM gets to answer Health.
    pub fn boot_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.boot_timeout_secs.unwrap_or(DEFAULT_BOOT_TIMEOUT_SECS))
    }

    /// The VMM's block slots.
    pub fn block_slots(&self) -> u32 {
        self.block_slots.unwrap_or(DEFAULT_BLOCK_SLOTS)
    }

    /// The guest kernel.
    pub fn kernel(&self) -> PathBuf {
        self.kernel
            .clone()
            .unwrap_or_else(|| "/usr/lib/vmpod/vmlinux".into())
    }

    /// The guest initramfs.
    pub fn initramfs(&self) -> PathBuf {
        self.initramfs
            .clone()
            .unwrap_or_else(|| "/usr/lib/vmpod/initramfs.cpio".into())
    }

    /// Checks the settings against the backend and hypervisor, and the bounds.
    fn validate(&self, name: &str) -> Result<(), ConfigError> {
        let invalid = |what: String| Err(ConfigError::Invalid(format!("handler {name:?}: {what}")));
        let vm_settings = self.hypervisor.is_some()
            || self.accel.is_some()
            || self.vcpus.is_some()
            || self.memory_mib.is_some()
            || self.max_vcpus.is_some()
            || self.max_memory_mib.is_some()
            || self.boot_timeout_secs.is_some()
            || self.block_slots.is_some()
            || self.probe_kvm.is_some()
            || self.jail.is_some()
            || self.vmm_uid.is_some()
            || self.vmm_gid.is_some()
            || self.kernel_args.is_some()
            || self.kernel.is_some()
            || self.initramfs.is_some();
        if let Some(mib) = self.writable_layer_mib
            && !(1..=MAX_WRITABLE_LAYER_MIB).contains(&mib)
        {
            return invalid(format!(
                "writable_layer_mib must be 1..={MAX_WRITABLE_LAYER_MIB}"
            ));
        }
        if self.backend == Backend::Vm
            && self.hypervisor() == Hypervisor::Vmpod
            && self.writable_layer == Some(WritableLayer::Disk)
        {
            return invalid(
                "writable_layer = \"disk\" needs hypervisor = \"qemu\" for now; the vmpod \
                 hypervisor keeps writable layers in memory"
                    .into(),
            );
        }
        if self.backend == Backend::Host {
            return if vm_settings {
                invalid("VM settings on a host handler".into())
            } else {
                Ok(())
            };
        }
        if self.hypervisor() == Hypervisor::Vmpod && self.accel.is_some() {
            return invalid(
                "accel is a qemu setting; the vmpod hypervisor always runs on KVM".into(),
            );
        }
        if self.hypervisor() == Hypervisor::Qemu && self.probe_kvm.is_some() {
            return invalid(
                "probe_kvm is a vmpod setting; QEMU handlers choose accel instead".into(),
            );
        }
        if self.hypervisor() == Hypervisor::Qemu
            && (self.jail.is_some() || self.vmm_uid.is_some() || self.vmm_gid.is_some())
        {
            return invalid("jail, vmm_uid and vmm_gid are vmpod settings".into());
        }
        if self.vmm_uid == Some(0) || self.vmm_gid == Some(0) {
            return invalid("vmm_uid and vmm_gid must not be 0 (root)".into());
        }
        if self.hypervisor() == Hypervisor::Qemu && self.block_slots.is_some() {
            return invalid(
                "block_slots is a vmpod setting; QEMU's microvm attaches images at boot".into(),
            );
        }
        if !(1..=MAX_VCPUS).contains(&self.max_vcpus()) {
            return invalid(format!("max_vcpus must be 1..={MAX_VCPUS}"));
        }
        if !(64..=MAX_MEMORY_MIB).contains(&self.max_memory_mib()) {
            return invalid(format!("max_memory_mib must be 64..={MAX_MEMORY_MIB}"));
        }
        if self.base_vcpus() == 0 || self.base_vcpus() > self.max_vcpus() {
            return invalid(format!(
                "vcpus must be 1..={} (max_vcpus)",
                self.max_vcpus()
            ));
        }
        if self.base_memory_mib() < 64 || self.base_memory_mib() > self.max_memory_mib() {
            return invalid(format!(
                "memory_mib must be 64..={} (max_memory_mib)",
                self.max_memory_mib()
            ));
        }
        if !(1..=MAX_BOOT_TIMEOUT_SECS).contains(&self.boot_timeout().as_secs()) {
            return invalid(format!(
                "boot_timeout_secs must be 1..={MAX_BOOT_TIMEOUT_SECS}"
            ));
        }
        if !(1..=MAX_BLOCK_SLOTS).contains(&self.block_slots()) {
            return invalid(format!("block_slots must be 1..={MAX_BLOCK_SLOTS}"));
        }
        if let Some(args) = &self.kernel_args
            && (args.len() > MAX_KERNEL_ARGS
                || !args.bytes().all(|b| b == b' ' || b.is_ascii_graphic()))
        {
            return invalid(format!(
                "kernel_args must be printable ASCII of at most {MAX_KERNEL_ARGS} bytes"
            ));
        }
        Ok(())
    }
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
        let mut vm = Handler::new(Backend::Vm);
        vm.hypervisor = Some(Hypervisor::Vmpod);
        handlers.insert("vm".to_string(), vm);
        handlers.insert("host".to_string(), Handler::new(Backend::Host));
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
            streaming: Default::default(),
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
            h.validate(name)?;
        }
        self.streaming
            .validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
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
        if let Some(beside) = crate::self_exe()
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
        // The issue's default: our own VMM.
        let vm = cfg.handler("vm").unwrap().1;
        assert_eq!(vm.hypervisor(), Hypervisor::Vmpod);
        assert_eq!(vm.block_slots(), DEFAULT_BLOCK_SLOTS);
        assert_eq!(vm.boot_timeout().as_secs(), 120);
        assert_eq!((vm.base_vcpus(), vm.base_memory_mib()), (1, 256));
        assert_eq!(cfg.handler("host").unwrap().1.backend, Backend::Host);
        assert!(!cfg.host.allow_privileged);
        // A vm handler that names no hypervisor gets vmpod too.
        let cfg = Config::parse("[handlers.vm]\nbackend = \"vm\"\n").unwrap();
        assert_eq!(cfg.handler("vm").unwrap().1.hypervisor(), Hypervisor::Vmpod);
        assert_eq!(cfg.cni.conf_dir, Path::new("/etc/cni/net.d"));
        assert_eq!(
            cfg.cni.bin_dirs,
            [Path::new("/opt/cni/bin"), Path::new("/usr/lib/cni")]
        );
        assert_eq!(cfg.cni.network, None);
    }

    #[test]
    fn writable_layers_default_to_disk_where_the_backend_can() {
        let host = Handler::new(Backend::Host);
        assert_eq!(host.writable_layer(), WritableLayer::Disk);
        assert_eq!(host.writable_layer_bytes(), 10 << 30);
        let mut qemu = Handler::new(Backend::Vm);
        qemu.hypervisor = Some(Hypervisor::Qemu);
        assert_eq!(qemu.writable_layer(), WritableLayer::Disk);
        // The vmpod VMM has no way to give a container a disk yet.
        let vmm = Handler::new(Backend::Vm);
        assert_eq!(vmm.writable_layer(), WritableLayer::Memory);
        assert_eq!(vmm.writable_layer_bytes(), 64 << 20);
        let cfg = Config::parse(
            "[handlers.vm]\nbackend = \"vm\"\nhypervisor = \"qemu\"\n\
             writable_layer = \"memory\"\nwritable_layer_mib = 128\n",
        )
        .unwrap();
        let vm = cfg.handler("vm").unwrap().1;
        assert_eq!(vm.writable_layer(), WritableLayer::Memory);
        assert_eq!(vm.writable_layer_bytes(), 128 << 20);
        for bad in [
            "writable_layer_mib = 0",
            "writable_layer_mib = 16777217",
            "writable_layer = \"nvme\"",
            "hypervisor = \"vmpod\"\nwritable_layer = \"disk\"",
        ] {
            let toml = format!("[handlers.vm]\nbackend = \"vm\"\n{bad}\n");
            assert!(Config::parse(&toml).is_err(), "{bad}");
        }
        // Host handlers take the two keys too.
        Config::parse(
            "[handlers.h]\nbackend = \"host\"\nwritable_layer_mib = 100\n\
                       [handlers.vm]\nbackend = \"vm\"\n",
        )
        .unwrap();
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
        for bad in [
            "block_slots = 4",                         // on a host handler below
            "hypervisor = \"vmpod\"\naccel = \"tcg\"", // vmpod always runs on KVM
            "hypervisor = \"qemu\"\nblock_slots = 4",  // QEMU attaches at boot
            "block_slots = 0",
            "block_slots = 17",
            "boot_timeout_secs = 0",
            "boot_timeout_secs = 86400",
            "max_vcpus = 65",
            "vcpus = 3\nmax_vcpus = 2",
            "memory_mib = 63",
            "memory_mib = 1024\nmax_memory_mib = 512",
            "max_memory_mib = 4294967295",
            "kernel_args = \"a\\nb\"",
            "kernel_args = \"é\"",
            "hypervisor = \"qemu\"\nprobe_kvm = false",
            "hypervisor = \"qemu\"\njail = false",
            "vmm_uid = 0",
            "vmm_gid = 0",
        ] {
            let backend = if bad.starts_with("block_slots = 4") {
                "host"
            } else {
                "vm"
            };
            let text =
                format!("default_handler = \"h\"\n[handlers.h]\nbackend = \"{backend}\"\n{bad}\n");
            assert!(Config::parse(&text).is_err(), "accepted {text}");
        }
        let ok = Config::parse(
            "default_handler = \"h\"\n[handlers.h]\nbackend = \"vm\"\nblock_slots = 16\n\
             boot_timeout_secs = 5\n\
             max_vcpus = 4\nvcpus = 4\nmax_memory_mib = 1024\nmemory_mib = 1024\n",
        )
        .unwrap();
        let h = ok.handler("h").unwrap().1;
        assert_eq!((h.block_slots(), h.boot_timeout().as_secs()), (16, 5));
        assert!(h.probe_kvm(), "the probe is on by default");
        assert!(h.jail(), "VMMs are jailed by default");
        let (uid, gid) = h.vmm_ids("0123abcd");
        assert_eq!(uid, gid);
        assert!((VMM_ID_BASE..VMM_ID_BASE + 65536).contains(&uid));
        assert_eq!(h.vmm_ids("0123abcd"), (uid, gid), "stable");
        assert_ne!(h.vmm_ids("0123abce").0, uid, "per pod");
    }

    #[test]
    fn the_documented_example_is_valid() {
        let doc = include_str!("../../docs/config.md");
        let start = doc.find("```toml\n").expect("a toml block") + "```toml\n".len();
        let len = doc[start..].find("```").expect("the block's end");
        let cfg = Config::parse(&doc[start..start + len]).unwrap();
        let vm = cfg.handler("").unwrap().1;
        assert_eq!(vm.hypervisor(), Hypervisor::Vmpod);
        assert_eq!(vm.block_slots(), DEFAULT_BLOCK_SLOTS);
        assert_eq!(
            cfg.handler("vm-qemu").unwrap().1.hypervisor(),
            Hypervisor::Qemu
        );
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
