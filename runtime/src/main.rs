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
    /// Serve the CRI v1 RuntimeService on a unix socket (the kubelet's
    /// --container-runtime-endpoint). Pods keep running when it stops.
    Serve {
        /// The CRI socket (created with mode 0660).
        #[arg(long, default_value = "/run/vmpod/vmpod.sock")]
        socket: PathBuf,
        /// The TOML configuration (see docs/config.md); a missing file at
        /// the default path means all defaults.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Internal: copies one container's output into its CRI log (started
    /// by `vmpod serve`, one per running container).
    #[command(hide = true)]
    LogPump {
        /// unix:PATH or hybrid-vsock:PATH:PORT.
        #[arg(long)]
        agent: String,
        #[arg(long)]
        container: String,
        #[arg(long)]
        log: PathBuf,
    },
    /// Run IMAGE in a new pod through a running `vmpod serve`, print its
    /// output, remove the pod, and exit with the container's exit code.
    Run {
        /// The image (as the daemon knows it).
        image: String,
        /// The command; the image's entrypoint/cmd when empty.
        #[arg(last = true)]
        command: Vec<String>,
        /// The daemon's CRI socket.
        #[arg(long, default_value = "/run/vmpod/vmpod.sock")]
        socket: PathBuf,
        /// The RuntimeClass handler (empty: the daemon's default).
        #[arg(long, default_value = "")]
        runtime_handler: String,
        /// The daemon's log_dir_root.
        #[arg(long, default_value = "/var/log/pods")]
        log_root: PathBuf,
        /// Seconds before giving up on the container.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
}

/// Where `vmpod serve` reads its configuration unless told otherwise.
const DEFAULT_CONFIG: &str = "/etc/vmpod/config.toml";

#[derive(Clone, Copy, Debug, ValueEnum)]
enum AccelArg {
    Kvm,
    Tcg,
}

/// The agent address as `AgentAddr`'s Display writes it.
fn parse_agent_addr(s: &str) -> anyhow::Result<vmpod::agent_client::AgentAddr> {
    use vmpod::agent_client::AgentAddr;
    if let Some(path) = s.strip_prefix("unix:") {
        return Ok(AgentAddr::Unix(path.into()));
    }
    if let Some(rest) = s.strip_prefix("hybrid-vsock:")
        && let Some((uds, port)) = rest.rsplit_once(':')
    {
        return Ok(AgentAddr::HybridVsock {
            uds: uds.into(),
            port: port.parse().context("the vsock port")?,
        });
    }
    anyhow::bail!("--agent {s:?}: expected unix:PATH or hybrid-vsock:PATH:PORT")
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Run {
            image,
            command,
            socket,
            runtime_handler,
            log_root,
            timeout,
        } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the tokio runtime")?;
            let code = rt
                .block_on(vmpod::cri::run_cli::run(vmpod::cri::run_cli::RunOptions {
                    socket,
                    image,
                    command,
                    runtime_handler,
                    log_root,
                    timeout: Duration::from_secs(timeout),
                }))
                .context("vmpod run")?;
            std::process::exit(code);
        }
        Command::LogPump {
            agent,
            container,
            log,
        } => {
            let addr = parse_agent_addr(&agent)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the tokio runtime")?;
            rt.block_on(vmpod::cri::log_pump::run(addr, container, log))
                .context("log pump")?;
        }
        Command::Serve { socket, config } => {
            let cfg = match &config {
                Some(path) => vmpod::cri::config::Config::load(path, true),
                None => {
                    vmpod::cri::config::Config::load(std::path::Path::new(DEFAULT_CONFIG), false)
                }
            }
            .context("loading the configuration")?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the tokio runtime")?;
            rt.block_on(vmpod::cri::serve::serve(cfg, &socket))
                .context("serving the CRI")?;
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
