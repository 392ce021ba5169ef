//! Images: references, registry pulls, the content store, safe unpacking,
//! erofs root filesystems and the CRI ImageService.
//!
//! ```text
//! service (CRI ImageService) ─┐
//! vmpod image (CLI) ──────────┴─> manager ─┬─> pull (oci-client: endpoints, auth) ─┐
//!                                          ├─> import (OCI layout / archive) ──────┤
//!                                          │                                       v
//!                                          ├─> store (verified blobs, records) <───┘
//!                                          └─> unpack (safe, bounded) ─> erofs (one per image ID)
//! ```

pub mod erofs;
pub mod import;
pub mod manager;
pub mod manifest;
pub mod pull;
pub mod reference;
pub mod service;
pub mod store;
pub mod unpack;
