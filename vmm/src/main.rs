//! `vmpod-vmm --config <vmm.json>`: runs one microVM. Exit status: 0 when
//! the guest reset or powered off, 2 when it crashed, 3 when a graceful
//! shutdown timed out, 1 on VMM errors.
//!
//! `vmpod-vmm --probe`: can this host's KVM run a stock Linux guest (see
//! `probe`)? Exit status 0 when it can, 4 when it cannot, with the reason
//! on stdout.

use std::process::ExitCode;
use std::time::Instant;

use vmpod_vmm::config::VmmConfig;

const USAGE: &str = "usage: vmpod-vmm --config <vmm.json> | --probe | --version";

fn main() -> ExitCode {
    let started = Instant::now();
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let config = match args.as_slice() {
        [flag, path] if flag == "--config" => std::path::PathBuf::from(path),
        [flag] if flag == "--probe" => {
            // One line on stdout either way, for the daemon's Status.
            return match vmpod_vmm::probe::run_probe() {
                Ok(()) => {
                    println!("ok: this KVM runs stock Linux guests");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    println!("{e}");
                    ExitCode::from(4)
                }
            };
        }
        [flag] if flag == "--version" => {
            println!("vmpod-vmm {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(1);
        }
    };
    let cfg = match VmmConfig::from_file(&config) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("vmpod-vmm: {}", vmpod_vmm::error_chain(&e));
            return ExitCode::from(1);
        }
    };
    if let Some(target) = std::env::var_os("VMPOD_VMM_JAIL_PROBE") {
        vmpod_vmm::jail::arm_probe(target.to_string_lossy().into_owned());
    }
    if cfg.jail.is_some() {
        // From here on this is the VMM in its own PID namespace; the
        // process that started it only waits (see `jail`).
        if let Err(e) = vmpod_vmm::jail::enter_pid_namespace() {
            eprintln!("vmpod vmm: {}", vmpod_vmm::error_chain(&e));
            return ExitCode::from(1);
        }
    }
    match vmpod_vmm::run_with_devices(&cfg, started) {
        Ok(reason) => {
            eprintln!("vmpod vmm: {reason}");
            ExitCode::from(u8::try_from(reason.exit_code()).unwrap_or(1))
        }
        Err(e) => {
            eprintln!("vmpod vmm: running the VM: {}", vmpod_vmm::error_chain(&e));
            ExitCode::from(1)
        }
    }
}
