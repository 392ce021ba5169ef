//! Images: references, registry pulls, the content store, safe unpacking,
//! erofs root filesystems and the CRI ImageService.

pub mod erofs;
pub mod import;
pub mod manager;
pub mod manifest;
pub mod pull;
pub mod reference;
pub mod service;
pub mod store;
pub mod unpack;
