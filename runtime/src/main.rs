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
    /// Pull, list, remove and import images (the store the daemon uses).
    Image {
        /// The daemon's state dir.
        #[arg(long, default_value = "/var/lib/vmpod", global = true)]
        state_dir: PathBuf,
        /// Registry endpoints and timeouts (TOML: the daemon config's `[image.registry]` table).
        #[arg(long, global = true)]
        registry_config: Option<PathBuf>,
        #[command(subcommand)]
        command: ImageCommand,
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
        /// The RuntimeClass handler (empty: the daemon's default, whose VM
        /// hypervisor is vmpod's own VMM unless its config says `qemu`; on a
        /// host whose KVM cannot boot a stock guest, name a `qemu` handler).
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

#[derive(Subcommand, Debug)]
enum ImageCommand {
    /// Pull an image from its registry, showing progress.
    Pull {
        /// The image reference (`busybox`, `host:port/repo:tag`, `repo@sha256:...`).
        reference: String,
        /// Registry user (the password comes from VMPOD_REGISTRY_PASSWORD).
        #[arg(long)]
        username: Option<String>,
    },
    /// List images.
    Ls,
    /// Remove images by ID, tag or digest.
    Rm {
        /// The references.
        #[arg(required = true)]
        references: Vec<String>,
    },
    /// Import an OCI image layout directory or OCI archive.
    Import {
        /// The layout or archive.
        path: PathBuf,
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
        // Colour only for a person at a terminal: the daemon's log usually
        // goes to a file or journald, where escape codes are noise.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
                .block_on(vmpod::run_cli::run(vmpod::run_cli::RunOptions {
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
            rt.block_on(vmpod::log_pump::run(addr, container, log))
                .context("log pump")?;
        }
        Command::Serve { socket, config } => {
            let cfg = match &config {
                Some(path) => vmpod::config::Config::load(path, true),
                None => vmpod::config::Config::load(std::path::Path::new(DEFAULT_CONFIG), false),
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
        Command::Image {
            state_dir,
            registry_config,
            command,
        } => image_command(&state_dir, registry_config.as_deref(), command)?,
    }
    Ok(())
}

fn image_command(
    state_dir: &std::path::Path,
    registry_config: Option<&std::path::Path>,
    command: ImageCommand,
) -> anyhow::Result<()> {
    use vmpod::image::manager::{ImageConfig, ImageManager, Removed};
    use vmpod::image::pull::{Credentials, PullEvent};

    let mut config = ImageConfig::default();
    if let Some(path) = registry_config {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        config.registry =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    }
    // The daemon's image store: `<state dir>/images` (vmpod serve opens the same).
    let images_dir = state_dir.join("images");
    let manager = ImageManager::open(&images_dir, config)
        .with_context(|| format!("opening the image store in {}", images_dir.display()))?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match command {
        ImageCommand::Pull {
            reference,
            username,
        } => {
            let credentials = match username {
                Some(username) => Credentials::Basic {
                    username,
                    password: std::env::var("VMPOD_REGISTRY_PASSWORD").unwrap_or_default(),
                },
                None => Credentials::Anonymous,
            };
            let start = std::time::Instant::now();
            // Last tenth reported per layer: one line per 10%, not per MiB.
            let reported = std::sync::Mutex::new(std::collections::HashMap::<String, u64>::new());
            let progress = |event: PullEvent| match event {
                PullEvent::Resolved {
                    endpoint,
                    layers,
                    bytes,
                } => eprintln!("resolved on {endpoint}: {layers} layers, {bytes} bytes"),
                PullEvent::LayerCached { digest } => {
                    eprintln!("{}: already present", short(&digest))
                }
                PullEvent::LayerProgress {
                    digest,
                    done,
                    total,
                } => {
                    let tenth = done.saturating_mul(10) / total.max(1);
                    let mut reported = reported.lock().unwrap_or_else(|e| e.into_inner());
                    let last = reported.entry(digest.clone()).or_insert(0);
                    if tenth > *last {
                        *last = tenth;
                        eprintln!("{}: {:>3}% of {total} bytes", short(&digest), tenth * 10);
                    }
                }
                PullEvent::LayerDone { digest } => eprintln!("{}: done", short(&digest)),
                PullEvent::Unpacking => eprintln!("unpacking and building the erofs rootfs"),
            };
            let record = runtime.block_on(manager.pull(&reference, &credentials, &progress))?;
            println!("{}", record.id);
            eprintln!(
                "pulled {reference} in {:.2} s",
                start.elapsed().as_secs_f64()
            );
        }
        ImageCommand::Ls => {
            println!("{:<14} {:>12} REFERENCES", "IMAGE ID", "SIZE");
            for r in manager.list() {
                let refs = if r.repo_tags.is_empty() {
                    r.repo_digests.join(" ")
                } else {
                    r.repo_tags.join(" ")
                };
                println!("{:<14} {:>12} {refs}", &r.id_hex()[..12], r.size);
            }
        }
        ImageCommand::Rm { references } => {
            for reference in references {
                // The CLI cannot know which containers run: the daemon checks.
                match runtime.block_on(manager.remove(&reference, &|_| false))? {
                    Removed::NotFound => eprintln!("{reference}: not found"),
                    Removed::Untagged(tag) => println!("untagged {tag}"),
                    Removed::Deleted(r) => println!("deleted {}", r.id),
                }
            }
        }
        ImageCommand::Import { path } => {
            for r in runtime.block_on(manager.import(&path))? {
                println!("{} {}", r.id, r.repo_tags.join(" "));
            }
        }
    }
    Ok(())
}

fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    hex.get(..12).unwrap_or(hex)
}
