//! vmpod-agent: PID 1 of a pod VM, or a host process for the host sandbox
//! backend. Serves the `vmpod.agent.v1` API on vsock (guest) or a unix
//! socket (host).
//!
//! Usage:
//!   vmpod-agent                          as PID 1: guest mode, vsock port 1024
//!   vmpod-agent --listen unix:PATH       host mode
//!   vmpod-agent --listen vsock:PORT      any mode, explicit vsock port

mod init;
mod server;
mod transport;

use std::process::ExitCode;

use transport::Listen;

/// How the agent runs: decides PID-1 duties and what Shutdown does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// PID 1 of a guest: mounts the basics, reaps orphans, ends the VM on exit.
    Guest,
    /// A host process in namespaces the daemon made.
    Host,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Guest => "guest",
            Mode::Host => "host",
        }
    }
}

#[derive(Debug)]
struct Args {
    listen: Listen,
}

fn parse_args(mode: Mode, args: impl IntoIterator<Item = String>) -> Result<Args, String> {
    let mut listen = match mode {
        Mode::Guest => Some(Listen::Vsock(vmpod_proto::AGENT_VSOCK_PORT)),
        Mode::Host => None,
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => {
                let value = args.next().ok_or("--listen needs a value")?;
                listen = Some(value.parse()?);
            }
            "--version" => return Err(format!("vmpod-agent {}", env!("CARGO_PKG_VERSION"))),
            // As PID 1 the kernel hands over command-line words it did not
            // understand; they are not ours to reject.
            _ if mode == Mode::Guest => {}
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    let listen = listen.ok_or("host mode needs --listen unix:PATH or --listen vsock:PORT")?;
    Ok(Args { listen })
}

fn main() -> ExitCode {
    let mode = if std::process::id() == 1 {
        Mode::Guest
    } else {
        Mode::Host
    };
    if mode == Mode::Guest {
        // Before anything logs: the console is not open yet.
        if let Err(e) = init::setup() {
            init::fatal(&format!("vmpod-agent: guest setup failed: {e}"));
        }
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .without_time()
        .init();

    let args = match parse_args(mode, std::env::args().skip(1)) {
        Ok(args) => args,
        Err(msg) => {
            eprintln!("vmpod-agent: {msg}");
            return if mode == Mode::Guest {
                init::fatal(&msg)
            } else {
                ExitCode::from(2)
            };
        }
    };

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let msg = format!("vmpod-agent: cannot start the runtime: {e}");
            return if mode == Mode::Guest {
                init::fatal(&msg)
            } else {
                eprintln!("{msg}");
                ExitCode::FAILURE
            };
        }
    };
    let result = runtime.block_on(server::run(mode, args.listen));
    drop(runtime);
    match (mode, result) {
        (Mode::Guest, Ok(())) => init::power_off(),
        (Mode::Guest, Err(e)) => init::fatal(&format!("vmpod-agent: {e}")),
        (Mode::Host, Ok(())) => ExitCode::SUCCESS,
        (Mode::Host, Err(e)) => {
            eprintln!("vmpod-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn guest_defaults_to_the_agent_vsock_port_and_ignores_kernel_words() {
        let a = parse_args(Mode::Guest, args(&["quiet", "foo=bar"])).unwrap();
        assert_eq!(a.listen, Listen::Vsock(vmpod_proto::AGENT_VSOCK_PORT));
    }

    #[test]
    fn host_requires_a_listen_address_and_rejects_strays() {
        assert!(parse_args(Mode::Host, args(&[])).is_err());
        assert!(parse_args(Mode::Host, args(&["--listen", "unix:/tmp/a.sock", "x"])).is_err());
        let a = parse_args(Mode::Host, args(&["--listen", "unix:/tmp/a.sock"])).unwrap();
        assert_eq!(a.listen, Listen::Unix("/tmp/a.sock".into()));
    }
}
