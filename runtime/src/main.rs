//! The `vmpod` command: guest image tooling and guest boots today; the CRI
//! daemon (`vmpod serve`) and the VMM as they land.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use vmpod::guest::initramfs;
use vmpod::hypervisor::qemu::{Accel, QemuConfig};

#[derive(Parser, Debug)]
#[command(
    name = "vmpod",
    version,
    about = "A Kubernetes container runtime that runs every pod in its own microVM"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build the guest initramfs: the static agent as /init, nothing else.
    Initramfs {
        /// The statically linked vmpod-agent binary.
        #[arg(long)]
        agent: PathBuf,
        /// Where to write the newc cpio archive.
        #[arg(long)]
        out: PathBuf,
    },
    /// Boot the guest image and wait for the agent's ready line.
    Boot {
        /// The guest kernel (ELF vmlinux).
        #[arg(long)]
        kernel: PathBuf,
        /// The guest initramfs.
        #[arg(long)]
        initramfs: PathBuf,
        /// How QEMU runs the guest: kvm needs hardware virtualization.
        #[arg(long, value_enum, default_value_t = AccelArg::Tcg)]
        accel: AccelArg,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 256)]
        memory: u32,
        /// Seconds to wait for the agent.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        /// Print the whole guest console, not only the result.
        #[arg(long)]
        console: bool,
    },
    /// Run one microVM with vmpod's own VMM. Exit status: 0 when the guest
    /// reset or powered off, 2 when it crashed, 3 when a graceful shutdown
    /// timed out, 1 on VMM errors.
    Vmm {
        /// The VM's JSON configuration (see `vmpod::vmm::config`).
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum AccelArg {
    Kvm,
    Tcg,
}

fn main() -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Vmm { config } => {
            let cfg = vmpod::vmm::config::VmmConfig::from_file(&config)?;
            let reason = vmpod::vmm::run_with_devices(&cfg, started).context("running the VM")?;
            eprintln!("vmpod vmm: {reason}");
            std::process::exit(reason.exit_code());
        }
        Command::Initramfs { agent, out } => {
            let size = initramfs::build_to_file(&agent, &out)?;
            println!(
                "{}: {size} bytes, /init = {}",
                out.display(),
                agent.display()
            );
        }
        Command::Boot {
            kernel,
            initramfs,
            accel,
            memory,
            timeout,
            console,
        } => {
            let accel = match accel {
                AccelArg::Kvm => Accel::Kvm,
                AccelArg::Tcg => Accel::Tcg,
            };
            let mut cfg = QemuConfig::new(kernel, initramfs, accel);
            cfg.memory_mib = memory;
            let guest = cfg
                .boot_until_ready(Duration::from_secs(timeout))
                .context("booting the guest")?;
            if console {
                for line in guest.console() {
                    println!("console: {line}");
                }
            }
            let ready = guest.ready_line().unwrap_or_default().to_string();
            let elapsed = guest.time_to_ready().unwrap_or_default();
            println!("{ready}");
            println!(
                "agent ready {:.2} s after QEMU started ({accel:?})",
                elapsed.as_secs_f64()
            );
        }
    }
    Ok(())
}
