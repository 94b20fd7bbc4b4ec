//! The library side of the `shoal` binary: the parts other crates call directly.
//!
//! Only the device configuration parser lives here, so the fuzz targets (`fuzz/`)
//! can feed it untrusted text; the binary uses it from here, unchanged.

pub mod config;
