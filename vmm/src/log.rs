//! The VMM's logging: one line per event on stderr (the daemon keeps it as
//! the pod's `vmm.log`). No logging framework: the process that faces the
//! guest carries as little code as possible.
//!
//! The level comes from `VMPOD_VMM_LOG`, else `RUST_LOG` (the daemon's own
//! variable, inherited): `error`, `warn`, `info` (the default) or `debug`.
//! Only the word matters; `RUST_LOG=vmpod=debug` means debug.

use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};

/// How much is logged, from least to most.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Level {
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Error => "ERROR",
            Level::Warn => "WARN",
            Level::Info => "INFO",
            Level::Debug => "DEBUG",
        }
    }

    /// The most verbose level named in `spec` (a `RUST_LOG`-style string).
    pub fn parse(spec: &str) -> Level {
        let spec = spec.to_ascii_lowercase();
        [
            ("trace", Level::Debug),
            ("debug", Level::Debug),
            ("info", Level::Info),
            ("warn", Level::Warn),
            ("error", Level::Error),
        ]
        .into_iter()
        .find(|(word, _)| spec.contains(word))
        .map_or(Level::Info, |(_, l)| l)
    }
}

/// 0: not read from the environment yet.
static MAX: AtomicU8 = AtomicU8::new(0);

/// Whether `level` is logged.
pub fn enabled(level: Level) -> bool {
    let mut max = MAX.load(Ordering::Relaxed);
    if max == 0 {
        let spec = std::env::var("VMPOD_VMM_LOG")
            .or_else(|_| std::env::var("RUST_LOG"))
            .unwrap_or_default();
        max = Level::parse(&spec) as u8;
        MAX.store(max, Ordering::Relaxed);
    }
    level as u8 <= max
}

/// Writes one log line (callers use the macros).
pub fn write(level: Level, args: std::fmt::Arguments<'_>) {
    // One write per line, so lines from vCPU threads do not interleave.
    let line = format!("vmpod-vmm {}: {args}\n", level.name());
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

macro_rules! log_at {
    ($level:expr, $($arg:tt)+) => {
        if $crate::log::enabled($level) {
            $crate::log::write($level, format_args!($($arg)+));
        }
    };
}
macro_rules! error {
    ($($arg:tt)+) => { $crate::log::log_at!($crate::log::Level::Error, $($arg)+) };
}
macro_rules! warning {
    ($($arg:tt)+) => { $crate::log::log_at!($crate::log::Level::Warn, $($arg)+) };
}
macro_rules! info {
    ($($arg:tt)+) => { $crate::log::log_at!($crate::log::Level::Info, $($arg)+) };
}
macro_rules! debug {
    ($($arg:tt)+) => { $crate::log::log_at!($crate::log::Level::Debug, $($arg)+) };
}
pub(crate) use {debug, error, info, log_at, warning};

#[cfg(test)]
mod tests {
    use super::Level;

    #[test]
    fn levels_parse_like_rust_log() {
        assert_eq!(Level::parse(""), Level::Info);
        assert_eq!(Level::parse("debug"), Level::Debug);
        assert_eq!(Level::parse("vmpod=debug,h2=warn"), Level::Debug);
        assert_eq!(Level::parse("WARN"), Level::Warn);
        assert_eq!(Level::parse("error"), Level::Error);
        assert_eq!(Level::parse("nonsense"), Level::Info);
    }
}
