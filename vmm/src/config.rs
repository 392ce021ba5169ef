//! The VMM's configuration: one JSON file describes one VM.
//!
//! ```json
//! {
//!   "vcpus": 1, "memory_mib": 256,
//!   "kernel": "vmlinux", "initramfs": "initramfs.cpio",
//!   "cmdline": "console=ttyS0 reboot=k panic=-1",
//!   "vsock": { "guest_cid": 3, "uds_path": "/run/vmpod/pod/vsock.sock" },
//!   "block": [ { "path": "rootfs.erofs", "read_only": true }, { "read_only": false } ],
//!   "net": { "tap": "tap0", "mac": "02:00:00:00:00:01" },
//!   "serial": { "path": "console.log" },
//!   "control_socket": "/run/vmpod/pod/control.sock",
//!   "jail": { "root": "/var/lib/vmpod/sandboxes/<id>/jail", "uid": 1000000007, "gid": 1000000007 }
//! }
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The most vCPUs a pod VM may have: the MP table and the APIC IDs are
/// laid out for at most this many.
pub const MAX_VCPUS: u8 = 64;
/// Guest RAM bounds in MiB.
pub const MIN_MEMORY_MIB: u32 = 16;
/// 1 TiB: far beyond any pod, small enough that address arithmetic cannot overflow.
pub const MAX_MEMORY_MIB: u32 = 1 << 20;
/// Linux's COMMAND_LINE_SIZE on x86 is 2048 including the terminating NUL.
pub const MAX_CMDLINE_LEN: usize = 2048;
/// The most block slots a VM may have (each takes a virtio-mmio window and a GSI).
pub const MAX_BLOCK_SLOTS: usize = 16;
/// The command line when the configuration gives none: the console on our
/// 16550, and `reboot=k` because the VMM's only reset path is the i8042
/// (no ACPI, no triple-fault reset), `panic=-1` so a panicking guest ends
/// the VM instead of hanging.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";
/// The largest configuration file read, in bytes.
const MAX_CONFIG_FILE: u64 = 1 << 20;

/// Errors from reading or validating a VMM configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading the VMM configuration {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the VMM configuration {path} is larger than {MAX_CONFIG_FILE} bytes")]
    TooLarge { path: PathBuf },
    #[error("parsing the VMM configuration")]
    Parse(#[source] serde_json::Error),
    #[error("invalid VMM configuration: {0}")]
    Invalid(String),
}

/// One VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmmConfig {
    /// Number of vCPUs (1..=MAX_VCPUS).
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Uncompressed ELF kernel (vmlinux).
    pub kernel: PathBuf,
    /// Optional initramfs (newc cpio, optionally compressed).
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line; the VMM appends its device declarations.
    /// Defaults to [`DEFAULT_CMDLINE`].
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// Block slots, present from boot; a slot without a path starts empty.
    #[serde(default)]
    pub block: Vec<BlockSlotConfig>,
    #[serde(default)]
    pub net: Option<NetConfig>,
    /// Where the guest's serial console goes; stdout when absent.
    #[serde(default)]
    pub serial: Option<SerialConfig>,
    /// The control socket (JSON lines); none when absent.
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// Confine the vCPU and event-loop threads with seccomp once the VM is
    /// built (default on).
    #[serde(default = "default_seccomp")]
    pub seccomp: bool,
    /// Jail the VMM before the guest runs (see `jail`); none: unjailed.
    #[serde(default)]
    pub jail: Option<crate::jail::JailConfig>,
}

fn default_seccomp() -> bool {
    true
}

fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}

/// The hybrid vsock device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context ID (3 and up; 0-2 are reserved).
    pub guest_cid: u32,
    /// The host-side unix socket (`CONNECT <port>\n`).
    pub uds_path: PathBuf,
}

/// One virtio-blk slot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockSlotConfig {
    /// The backing file at boot; empty slot when absent.
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub read_only: bool,
}

/// The virtio-net device on a tap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The tap's interface name (opened by name).
    pub tap: String,
    /// The guest MAC, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
}

/// The serial console's output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// A file (created or appended to) or a FIFO.
    pub path: PathBuf,
}

/// The serial (virtio-blk GET_ID) of block slot `slot`: what the guest finds
/// the slot's disk by (`/sys/block/*/serial`), whatever is attached to it.
pub fn block_slot_serial(slot: usize) -> String {
    format!("vmpod-slot{slot}")
}

impl VmmConfig {
    /// Reads and validates a configuration file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        use std::io::Read;
        let file = std::fs::File::open(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut text = String::new();
        file.take(MAX_CONFIG_FILE + 1)
            .read_to_string(&mut text)
            .map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
        if text.len() as u64 > MAX_CONFIG_FILE {
            return Err(ConfigError::TooLarge {
                path: path.to_path_buf(),
            });
        }
        Self::from_json(&text)
    }

    /// Parses and validates a configuration.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let cfg: VmmConfig = serde_json::from_str(text).map_err(ConfigError::Parse)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every bound the VMM relies on later.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if let Some(jail) = &self.jail {
            jail.validate().map_err(ConfigError::Invalid)?;
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return invalid(format!("vcpus must be 1..={MAX_VCPUS}, not {}", self.vcpus));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return invalid(format!(
                "memory_mib must be {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB}, not {}",
                self.memory_mib
            ));
        }
        // Leave room for the device declarations the VMM appends.
        if self.cmdline.len() > MAX_CMDLINE_LEN / 2 {
            return invalid(format!(
                "cmdline is {} bytes; at most {} are allowed",
                self.cmdline.len(),
                MAX_CMDLINE_LEN / 2
            ));
        }
        if !self.cmdline.is_ascii() || self.cmdline.contains('\0') {
            return invalid("cmdline must be printable ASCII".into());
        }
        if let Some(vsock) = &self.vsock {
            if vsock.guest_cid < 3 {
                return invalid(format!(
                    "vsock guest_cid {} is reserved (use 3 or more)",
                    vsock.guest_cid
                ));
            }
        }
        if self.block.len() > MAX_BLOCK_SLOTS {
            return invalid(format!(
                "{} block slots; at most {MAX_BLOCK_SLOTS}",
                self.block.len()
            ));
        }
        if let Some(net) = &self.net {
            if net.tap.is_empty() || net.tap.len() > 15 || net.tap.contains(['/', '\0']) {
                return invalid(format!("tap name {:?} is not an interface name", net.tap));
            }
            parse_mac(&net.mac)
                .ok_or_else(|| ConfigError::Invalid(format!("bad MAC {:?}", net.mac)))?;
        }
        Ok(())
    }

    /// Guest RAM in bytes.
    pub fn memory_bytes(&self) -> u64 {
        u64::from(self.memory_mib) << 20
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(mac: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = mac.split(':');
    for byte in out.iter_mut() {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"{
        "vcpus": 2, "memory_mib": 256,
        "kernel": "/k/vmlinux", "initramfs": "/k/initramfs.cpio",
        "cmdline": "console=ttyS0 reboot=k",
        "vsock": { "guest_cid": 3, "uds_path": "/run/pod/vsock.sock" },
        "block": [ { "path": "/img/rootfs.erofs", "read_only": true }, { "read_only": false } ],
        "net": { "tap": "tap0", "mac": "02:00:00:00:00:01" },
        "serial": { "path": "/run/pod/console.log" },
        "control_socket": "/run/pod/control.sock"
    }"#;

    #[test]
    fn parses_a_full_config() {
        let cfg = VmmConfig::from_json(FULL).unwrap();
        assert_eq!(cfg.vcpus, 2);
        assert_eq!(cfg.memory_bytes(), 256 << 20);
        assert_eq!(cfg.block.len(), 2);
        assert_eq!(cfg.block[1].path, None);
        assert!(cfg.block[0].read_only);
        assert_eq!(cfg.vsock.unwrap().guest_cid, 3);
        assert_eq!(
            cfg.control_socket.as_deref(),
            Some(Path::new("/run/pod/control.sock"))
        );
    }

    #[test]
    fn minimal_config_has_no_devices() {
        let cfg = VmmConfig::from_json(r#"{"vcpus":1,"memory_mib":64,"kernel":"k"}"#).unwrap();
        assert!(cfg.vsock.is_none() && cfg.net.is_none() && cfg.block.is_empty());
        assert!(cfg.initramfs.is_none() && cfg.serial.is_none());
        assert_eq!(cfg.cmdline, DEFAULT_CMDLINE);
        assert!(cfg.seccomp, "seccomp is on unless turned off");
        assert!(cfg.cmdline.split(' ').any(|w| w == "reboot=k"));
    }

    #[test]
    fn rejects_bad_values() {
        for bad in [
            r#"{"vcpus":0,"memory_mib":64,"kernel":"k"}"#,
            r#"{"vcpus":65,"memory_mib":64,"kernel":"k"}"#,
            r#"{"vcpus":1,"memory_mib":1,"kernel":"k"}"#,
            r#"{"vcpus":1,"memory_mib":4294967295,"kernel":"k"}"#,
            r#"{"vcpus":1,"memory_mib":64,"kernel":"k","vsock":{"guest_cid":2,"uds_path":"x"}}"#,
            r#"{"vcpus":1,"memory_mib":64,"kernel":"k","net":{"tap":"a/b","mac":"02:00:00:00:00:01"}}"#,
            r#"{"vcpus":1,"memory_mib":64,"kernel":"k","net":{"tap":"t","mac":"02:00:00:00:00"}}"#,
            r#"{"vcpus":1,"memory_mib":64,"kernel":"k","cmdline":"a\u0000b"}"#,
            r#"{"vcpus":1,"memory_mib":64,"kernel":"k","surprise":1}"#,
            r#"{"vcpus":1,"memory_mib":64}"#,
            "not json",
        ] {
            assert!(VmmConfig::from_json(bad).is_err(), "accepted {bad}");
        }
        let long = format!(
            r#"{{"vcpus":1,"memory_mib":64,"kernel":"k","cmdline":"{}"}}"#,
            "x".repeat(MAX_CMDLINE_LEN)
        );
        assert!(VmmConfig::from_json(&long).is_err());
    }

    #[test]
    fn from_file_bounds_the_read() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("ok.json");
        std::fs::write(&ok, r#"{"vcpus":1,"memory_mib":64,"kernel":"k"}"#).unwrap();
        assert_eq!(VmmConfig::from_file(&ok).unwrap().memory_mib, 64);
        let big = dir.path().join("big.json");
        std::fs::write(&big, vec![b' '; MAX_CONFIG_FILE as usize + 1]).unwrap();
        assert!(matches!(
            VmmConfig::from_file(&big),
            Err(ConfigError::TooLarge { .. })
        ));
        assert!(matches!(
            VmmConfig::from_file(&dir.path().join("missing.json")),
            Err(ConfigError::Read { .. })
        ));
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(parse_mac("02:0a:FF:00:10:01"), Some([2, 10, 255, 0, 16, 1]));
        assert_eq!(parse_mac("02:0a:ff:00:10:01:02"), None);
        assert_eq!(parse_mac("2:0a:ff:00:10:01"), None);
        assert_eq!(parse_mac("zz:0a:ff:00:10:01"), None);
    }
}
