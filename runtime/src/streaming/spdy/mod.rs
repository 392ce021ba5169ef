//! A small, bounded SPDY/3.1 server: what Kubernetes' remotecommand and
//! port-forward clients (spdystream) speak. No Rust crate serves SPDY.
//!
//! [`frame`] parses and encodes frames, [`headers`] the zlib-compressed
//! header blocks, [`conn`] runs one connection.

pub mod conn;
pub mod frame;
pub mod headers;
