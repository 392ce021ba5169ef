//! libcontainer runs in a short-lived helper: the agent binary re-executed
//! as `vmpod-agent __libcontainer create|exec ...`.
//!
//! Why: libcontainer forks (clone) and then runs ordinary Rust code in the
//! child. In the multi-threaded agent a lock held by another thread at that
//! moment (the allocator's, tracing's) would deadlock the child; a fresh
//! single-threaded process has no other threads. The container's processes
//! are the helper's children; when the helper exits they are reparented to
//! the agent (PID 1 in a guest, a child subreaper on the host), whose
//! reaper collects their exit statuses.
//!
//! The helper's stdin/stdout/stderr are the container process's: it prints
//! nothing. It reports through files: the PID on success, the error text on
//! failure.

use std::path::PathBuf;
use std::process::ExitCode;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;

/// The first argument that selects the helper.
pub const HELPER_ARG: &str = "__libcontainer";

#[derive(Debug, Default)]
struct HelperArgs {
    op: String,
    root: PathBuf,
    id: String,
    bundle: Option<PathBuf>,
    process: Option<PathBuf>,
    pid_file: PathBuf,
    error_file: PathBuf,
    console_socket: Option<PathBuf>,
}

fn parse(args: &[String]) -> Result<HelperArgs, String> {
    let mut out = HelperArgs {
        op: args.first().cloned().ok_or("no operation")?,
        ..Default::default()
    };
    let mut it = args[1..].iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--root" => out.root = value.into(),
            "--id" => out.id = value.clone(),
            "--bundle" => out.bundle = Some(value.into()),
            "--process" => out.process = Some(value.into()),
            "--pid-file" => out.pid_file = value.into(),
            "--error-file" => out.error_file = value.into(),
            "--console-socket" => out.console_socket = Some(value.into()),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(out)
}

/// Entry point of the helper process (`args` follow HELPER_ARG).
pub fn main(args: &[String]) -> ExitCode {
    let parsed = match parse(args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("vmpod-agent helper: {e}");
            return ExitCode::from(2);
        }
    };
    // libcontainer explains failures only in its log ("failed syscall"
    // says little): keep its errors beside the error file and report them.
    let log_path = parsed.error_file.with_extension("log");
    if let Ok(log) = std::fs::File::create(&log_path) {
        tracing_subscriber::fmt()
            .with_writer(std::sync::Mutex::new(log))
            .with_ansi(false)
            .without_time()
            .with_max_level(tracing::Level::ERROR)
            .init();
    }
    match run(&parsed) {
        Ok(pid) => {
            if std::fs::write(&parsed.pid_file, pid.to_string()).is_err() {
                return ExitCode::from(3);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            let mut text = e;
            if let Ok(log) = std::fs::read_to_string(&log_path) {
                let log = log.trim();
                if !log.is_empty() {
                    // Bounded: the caller puts it in an error message.
                    let tail: String = log
                        .chars()
                        .rev()
                        .take(2000)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect();
                    text.push_str(" (libcontainer: ");
                    text.push_str(&tail.replace('\n', "; "));
                    text.push(')');
                }
            }
            let _ = std::fs::write(&parsed.error_file, text);
            ExitCode::FAILURE
        }
    }
}

fn run(a: &HelperArgs) -> Result<i32, String> {
    let builder = ContainerBuilder::new(a.id.clone(), SyscallType::Linux)
        .with_root_path(&a.root)
        .map_err(|e| format!("container state root {}: {e}", a.root.display()))?
        .with_console_socket(a.console_socket.as_ref());
    match a.op.as_str() {
        "create" => {
            let bundle = a.bundle.as_ref().ok_or("create needs --bundle")?;
            let container = builder
                .as_init(bundle)
                .with_systemd(false)
                .with_detach(true)
                .build()
                .map_err(|e| format!("creating the container: {e}"))?;
            container
                .pid()
                .map(|p| p.as_raw())
                .ok_or_else(|| "the container has no init process".to_string())
        }
        "exec" => {
            let process = a.process.as_ref().ok_or("exec needs --process")?;
            let pid = builder
                .as_tenant()
                .with_detach(true)
                .with_process(Some(process))
                .build()
                .map_err(|e| format!("starting the process: {e}"))?;
            Ok(pid.as_raw())
        }
        other => Err(format!("unknown operation {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_helper_arguments() {
        let args: Vec<String> = [
            "create",
            "--root",
            "/r",
            "--id",
            "c",
            "--bundle",
            "/b",
            "--pid-file",
            "/p",
            "--error-file",
            "/e",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let a = parse(&args).unwrap();
        assert_eq!((a.op.as_str(), a.id.as_str()), ("create", "c"));
        assert_eq!(a.bundle, Some(PathBuf::from("/b")));
        assert!(parse(&["create".to_string(), "--root".to_string()]).is_err());
        assert!(parse(&["create".to_string(), "--bogus".to_string(), "x".to_string()]).is_err());
    }
}
