//! Fakes for entropy device tests.

use std::io;

use super::EntropySource;

/// Counts up from a seed, so tests can tell which bytes the device wrote.
#[derive(Debug)]
pub struct PatternSource(pub u8);

impl EntropySource for PatternSource {
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<()> {
        for b in buf {
            *b = self.0;
            self.0 = self.0.wrapping_add(1);
        }
        Ok(())
    }
}

/// Always fails, like a broken host source.
#[derive(Debug)]
pub struct FailingSource;

impl EntropySource for FailingSource {
    fn fill(&mut self, _buf: &mut [u8]) -> io::Result<()> {
        Err(io::Error::other("entropy source broken"))
    }
}
