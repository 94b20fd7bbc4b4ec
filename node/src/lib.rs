//! The library side of the `shoal` binary: the parts other crates call directly.
//!
//! The device configuration parser, the chunk batch wire format and the LAN peers'
//! messages ([`peer_wire`]) live here, so the fuzz targets (`fuzz/`) can feed them
//! untrusted bytes; the binary uses them from here, unchanged. [`chunk_url`] is shared by the server role (which validates
//! `--chunk-base-url`) and the daemon (which fetches from it).

pub mod chunk_url;
pub mod config;
pub mod peer_wire;
pub mod wire;
