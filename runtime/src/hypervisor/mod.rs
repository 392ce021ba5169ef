//! Hypervisors a pod VM can run on. `qemu` launches Debian's QEMU microvm
//! (KVM where the host has hardware virtualization, TCG where configured);
//! vmpod's own VMM lands beside it.

pub mod qemu;

/// A helper program we run beside the VM (vhost-device-vsock, virtiofsd):
/// found on PATH, else in ~/.cargo/bin where `cargo install` puts it (see
/// scripts/install-deps), else the bare name (spawning it then fails with
/// a clear "not found").
pub fn helper_program(name: &str) -> std::path::PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    on_path
        .or_else(|| {
            let home = std::env::var_os("HOME")?;
            Some(std::path::PathBuf::from(home).join(".cargo/bin").join(name))
                .filter(|p| p.is_file())
        })
        .unwrap_or_else(|| name.into())
}
