//! `shoal-bootctl`: how Shoal commits an update through the bootloader.
//!
//! This crate owns everything between "the new image is in memory" and "the
//! bootloader will try it": the two A/B [`Slot`]s, the [`SlotWriter`] that fills the
//! inactive slot and verifies it by reading it back, the bootloader environments
//! ([`env::uboot`], [`env::grub`], [`env::file`]) in the exact byte formats the
//! standard tools use (`fw_printenv`/`fw_setenv`, `mkenvimage`, `grub-editenv`), the
//! two variable [`scheme`]s (Shoal's own and Mender's), and [`BootControl`], which ties
//! them together into arm / commit / rollback / status.
//!
//! # Key design decision
//!
//! Every byte that reaches a disk goes through the small [`Storage`] seam
//! (`len/read_at/write_at/set_len/sync`), and every environment update is a
//! sequence of single-block writes, each made durable before the next begins, such
//! that *any prefix* of the sequence, with the last write torn, leaves the bootloader
//! choosing a slot that holds a complete, verified image. The `testing` module
//! (feature `testing`) provides a crash backend that keeps a "durable" and a "live"
//! image and crashes at write N; the crate's tests run every crash point of every env
//! update and of every arm / commit / rollback sequence, not a sample. `DESIGN.md`
//! gives the byte layouts and the commit protocols.
//!
//! There is no async runtime and no networking here: this crate is plain blocking
//! I/O, driven by the daemon (or by the simulator, through the `testing` backends).
//!
//! # Where to start
//!
//! - From a device configuration: [`config::BootConfig`] (or the `[slots]` and
//!   `[bootloader]` tables, [`config::SlotsConfig`] / [`config::BootloaderConfig`],
//!   embedded in a larger file) and [`config::build`] give a ready [`BootControl`].
//! - [`BootControl::status`], [`BootControl::active`], [`BootControl::arm`],
//!   [`BootControl::commit`], [`BootControl::rollback`]; [`BootControl::open_writer`]
//!   returns a [`SlotWriter`] (`write_at`, `sync`, `verify`) for the inactive slot;
//!   [`BootControl::open_reader`] reads a slot.
//! - Environments directly: [`env::Env`] (`load`/`store`) implemented by
//!   [`env::uboot::UbootEnv`], [`env::grub::GrubEnv`], [`env::file::FileEnv`];
//!   [`env::EnvLock`] serialises read-modify-write between processes.
//! - The bootloader model ([`model`], no I/O, so the update engine and the
//!   simulator use it too): [`model::Bootloader`] (a boot; the engine's steps),
//!   [`model::Board`] (a board in memory), [`model::boot_env`] (a boot of a real
//!   environment, for `shoal demo` and tests).
//! - Tests (feature `testing`): `testing::CrashDisk`, `testing::CrashSlots`,
//!   `testing::Backend`.

#[cfg(feature = "io")]
pub mod config;
#[cfg(feature = "io")]
pub mod control;
#[cfg(feature = "io")]
pub mod detect;
#[cfg(feature = "io")]
pub mod env;
#[cfg(feature = "io")]
pub mod extent;
pub mod model;
pub mod scheme;
mod slot;
#[cfg(feature = "io")]
pub mod storage;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
#[cfg(feature = "io")]
pub mod writer;

#[cfg(feature = "io")]
pub use control::{BootControl, Status};
pub use scheme::{BootState, Scheme, Trial};
pub use slot::{ParseSlotError, Slot};
#[cfg(feature = "io")]
pub use storage::{FileStorage, Storage};
#[cfg(feature = "io")]
pub use writer::SlotWriter;
