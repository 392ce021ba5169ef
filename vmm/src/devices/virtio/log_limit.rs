//! Rate limiting for log lines a guest can trigger.
//!
//! A hostile guest can hit an error path millions of times a second; each
//! device logs such errors through a [`LogLimiter`] so the host log sees at
//! most a burst per interval plus a count of what was suppressed.

use std::time::{Duration, Instant};

/// Lines allowed per interval.
const BURST: u32 = 10;
/// Length of one interval.
const INTERVAL: Duration = Duration::from_secs(5);

/// Allows at most [`BURST`] log lines per [`INTERVAL`].
#[derive(Debug)]
pub struct LogLimiter {
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl LogLimiter {
    /// A limiter with an empty window.
    pub const fn new() -> Self {
        Self {
            window_start: None,
            in_window: 0,
            suppressed: 0,
        }
    }

    /// Returns `Some(suppressed_since_last_line)` if a line may be logged now.
    pub fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.window_start {
            Some(start) if now.duration_since(start) < INTERVAL => {}
            _ => {
                self.window_start = Some(now);
                self.in_window = 0;
            }
        }
        if self.in_window < BURST {
            self.in_window += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed = self.suppressed.saturating_add(1);
            None
        }
    }
}

/// Logs a warning about guest behaviour through a [`LogLimiter`].
macro_rules! guest_warn {
    ($limiter:expr, $($arg:tt)+) => {
        if let Some(suppressed) = $limiter.allow() {
            if suppressed > 0 {
                $crate::log::warning!("({suppressed} like it suppressed) {}", format_args!($($arg)+));
            } else {
                $crate::log::warning!($($arg)+);
            }
        }
    };
}
pub(crate) use guest_warn;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_suppress() {
        let mut l = LogLimiter::new();
        for _ in 0..BURST {
            assert_eq!(l.allow(), Some(0));
        }
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
        assert_eq!(l.suppressed, 2);
    }
}
