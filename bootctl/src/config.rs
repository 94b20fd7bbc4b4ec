//! The slot and bootloader part of a device's configuration, and building a
//! ready [`BootControl`] from it.
//!
//! The device configuration file (owned by `shoal-node`) embeds these two tables:
//!
//! ```toml
//! [slots]
//! a = { path = "/dev/mmcblk0p2", root_aliases = ["PARTUUID=c0ffee00-02"] }
//! b = { path = "/dev/mmcblk0p3" }
//! # offset/size restrict a slot to part of a device or file:
//! # a = { path = "/var/lib/shoal/disk.img", offset = 0, size = 67108864 }
//!
//! [slots.detect]
//! from = "system"              # or "bootloader" for file-backed test devices
//! cmdline = "/proc/cmdline"
//! root_device = true           # compare the device of / with the slot devices
//!
//! [bootloader]
//! type = "uboot"               # "uboot", "grub" or "file"
//! scheme = "shoal"             # or "mender" (then mender_part_a/b apply)
//! fw_env_config = "/etc/fw_env.config"   # uboot
//! # allow_single_copy = false           # uboot: accept a non-redundant env
//! # grub_dir = "/boot/efi/EFI/shoal"    # grub: directory of the env/lock blocks
//! # grub_prefix = "shoal_grubenv"       # grub: default per scheme
//! # path = "/var/lib/shoal/bootenv"     # file
//! # mender_part_a = 2
//! # mender_part_b = 3
//! ```

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Slot;
use crate::control::{BootControl, Detect, SlotStorage};
use crate::detect::{SlotIdentity, SystemProbe};
use crate::env::Env;
use crate::env::file::FileEnv;
use crate::env::grub::{GrubEnv, Paths};
use crate::env::uboot::{self, FwEnvConfig, UbootEnv};
use crate::extent::{self, Extent};
use crate::scheme::{Flavor, MenderParts, Scheme};
use crate::storage::{FileStorage, Storage};

/// Default location of the device configuration.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/shoal/shoal.toml";

/// The `[slots]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotsConfig {
    /// Slot A.
    pub a: SlotConfig,
    /// Slot B.
    pub b: SlotConfig,
    /// How to find the running slot.
    #[serde(default)]
    pub detect: DetectConfig,
}

/// One slot: a block device or file, optionally a region of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotConfig {
    /// The block device or file.
    pub path: PathBuf,
    /// Byte offset of the slot in `path`.
    #[serde(default)]
    pub offset: u64,
    /// Size of the slot in bytes; default: from `offset` to the end of `path`.
    pub size: Option<u64>,
    /// Kernel `root=` values that name this slot besides `path`.
    #[serde(default)]
    pub root_aliases: Vec<String>,
}

/// Where the running slot is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DetectFrom {
    /// The kernel command line and the device of `/`, checked against the
    /// bootloader's record.
    #[default]
    System,
    /// The bootloader's record only (file-backed test devices).
    Bootloader,
}

/// The `[slots.detect]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectConfig {
    /// The source of truth.
    #[serde(default)]
    pub from: DetectFrom,
    /// Kernel command line file.
    #[serde(default = "default_cmdline")]
    pub cmdline: PathBuf,
    /// Whether to compare the device of `/` with the slots' devices.
    #[serde(default = "default_true")]
    pub root_device: bool,
}

fn default_cmdline() -> PathBuf {
    PathBuf::from("/proc/cmdline")
}

fn default_true() -> bool {
    true
}

impl Default for DetectConfig {
    fn default() -> DetectConfig {
        DetectConfig {
            from: DetectFrom::System,
            cmdline: default_cmdline(),
            root_device: true,
        }
    }
}

/// Which bootloader environment backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootloaderType {
    /// U-Boot, located by a `fw_env.config`.
    Uboot,
    /// GRUB env/lock blocks under a directory.
    Grub,
    /// The two-copy file backend.
    File,
}

/// Which variable scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SchemeName {
    /// Shoal's own variables.
    #[default]
    Shoal,
    /// Mender's variables.
    Mender,
}

/// The `[bootloader]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootloaderConfig {
    /// The backend.
    #[serde(rename = "type")]
    pub kind: BootloaderType,
    /// The variable scheme.
    #[serde(default)]
    pub scheme: SchemeName,
    /// U-Boot: the `fw_env.config` describing the environment copies (default
    /// `/etc/fw_env.config`).
    pub fw_env_config: Option<PathBuf>,
    /// U-Boot: accept a single-copy environment, which a power cut during an update
    /// can destroy.
    #[serde(default)]
    pub allow_single_copy: bool,
    /// GRUB: the directory holding `<prefix>1/` and `<prefix>2/`.
    pub grub_dir: Option<PathBuf>,
    /// GRUB: the directory prefix (default `shoal_grubenv`, or `mender_grubenv` with
    /// the Mender scheme).
    pub grub_prefix: Option<String>,
    /// File: the first copy's path (the second is `<path>.2`).
    pub path: Option<PathBuf>,
    /// Mender: partition number of slot A.
    pub mender_part_a: Option<u32>,
    /// Mender: partition number of slot B.
    pub mender_part_b: Option<u32>,
}

/// The `[slots]` and `[bootloader]` tables of a device configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootConfig {
    /// `[slots]`.
    pub slots: SlotsConfig,
    /// `[bootloader]`.
    pub bootloader: BootloaderConfig,
}

/// Why a configuration cannot be turned into a [`BootControl`] or an [`Env`].
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The configuration file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The configuration is not valid TOML or does not match the schema.
    #[error("invalid configuration")]
    Toml(#[from] toml::de::Error),
    /// A table the operation needs is absent.
    #[error("configuration has no [{table}] table")]
    MissingTable {
        /// The table.
        table: &'static str,
    },
    /// A field this bootloader type or scheme requires is not set.
    #[error("[bootloader] {field} is required for {context}")]
    MissingField {
        /// The field.
        field: &'static str,
        /// The type or scheme that requires it.
        context: &'static str,
    },
    /// A field is set that this bootloader type does not use.
    #[error("[bootloader] {field} does not apply to type = {kind:?}")]
    UnusedField {
        /// The field.
        field: &'static str,
        /// The configured type.
        kind: BootloaderType,
    },
    /// The `fw_env.config` is invalid.
    #[error("invalid fw_env.config {path}")]
    FwEnv {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: uboot::ConfigError,
    },
    /// The U-Boot environment has one copy and `allow_single_copy` is not set.
    #[error(
        "the U-Boot environment in {path} has a single copy, which a power cut during an update can destroy; configure a redundant environment or set allow_single_copy = true"
    )]
    SingleCopy {
        /// The config file.
        path: PathBuf,
    },
    /// Slots A and B are the same storage: the same path, a symlink or hard link
    /// to the other, or a partition and a region of its disk.
    #[error("slots A and B overlap: {a} and {b} are the same storage")]
    SlotsOverlap {
        /// Slot A, as configured (and what it resolves to).
        a: String,
        /// Slot B, as configured (and what it resolves to).
        b: String,
    },
    /// A file or device could not be opened.
    #[error("cannot open {what}")]
    Open {
        /// What was being opened.
        what: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

impl BootConfig {
    /// Reads the `[slots]` and `[bootloader]` tables from a TOML document, ignoring
    /// other tables (they belong to the rest of the device configuration).
    pub fn from_toml_str(text: &str) -> Result<BootConfig, BuildError> {
        let mut table: toml::Table = toml::from_str(text)?;
        let slots = table
            .remove("slots")
            .ok_or(BuildError::MissingTable { table: "slots" })?;
        let bootloader = table.remove("bootloader").ok_or(BuildError::MissingTable {
            table: "bootloader",
        })?;
        Ok(BootConfig {
            slots: slots.try_into()?,
            bootloader: bootloader.try_into()?,
        })
    }

    /// Like [`BootConfig::from_toml_str`], reading `path`.
    pub fn load(path: &Path) -> Result<BootConfig, BuildError> {
        let text = std::fs::read_to_string(path).map_err(|source| BuildError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        BootConfig::from_toml_str(&text)
    }

    /// Builds boot control. `writable` opens the environment for writing.
    pub fn build(&self, writable: bool) -> Result<BootControl, BuildError> {
        build(&self.slots, &self.bootloader, writable)
    }
}

impl BootloaderConfig {
    /// The scheme, with Mender's partition numbers.
    pub fn scheme(&self) -> Result<Scheme, BuildError> {
        match self.scheme {
            SchemeName::Shoal => Ok(Scheme::Shoal),
            SchemeName::Mender => {
                let part_a = self.mender_part_a.ok_or(BuildError::MissingField {
                    field: "mender_part_a",
                    context: "scheme = \"mender\"",
                })?;
                let part_b = self.mender_part_b.ok_or(BuildError::MissingField {
                    field: "mender_part_b",
                    context: "scheme = \"mender\"",
                })?;
                Ok(Scheme::Mender(MenderParts { part_a, part_b }))
            }
        }
    }

    /// The bootloader semantics of this backend.
    pub fn flavor(&self) -> Flavor {
        match self.kind {
            BootloaderType::Uboot => Flavor::Uboot,
            BootloaderType::Grub => Flavor::Grub,
            BootloaderType::File => Flavor::File,
        }
    }

    fn check_fields(&self) -> Result<(), BuildError> {
        let kind = self.kind;
        let unused = |set: bool, field: &'static str, applies: bool| {
            if set && !applies {
                Err(BuildError::UnusedField { field, kind })
            } else {
                Ok(())
            }
        };
        let uboot = kind == BootloaderType::Uboot;
        let grub = kind == BootloaderType::Grub;
        let file = kind == BootloaderType::File;
        unused(self.fw_env_config.is_some(), "fw_env_config", uboot)?;
        unused(self.allow_single_copy, "allow_single_copy", uboot)?;
        unused(self.grub_dir.is_some(), "grub_dir", grub)?;
        unused(self.grub_prefix.is_some(), "grub_prefix", grub)?;
        unused(self.path.is_some(), "path", file)?;
        Ok(())
    }

    /// Opens the environment this table describes.
    pub fn open_env(&self, writable: bool) -> Result<Box<dyn Env>, BuildError> {
        self.check_fields()?;
        let open_err = |what: String| move |source| BuildError::Open { what, source };
        match self.kind {
            BootloaderType::Uboot => {
                let path = self
                    .fw_env_config
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("/etc/fw_env.config"));
                let cfg = FwEnvConfig::load(&path).map_err(|source| BuildError::FwEnv {
                    path: path.clone(),
                    source,
                })?;
                if cfg.copies.len() == 1 && !self.allow_single_copy {
                    return Err(BuildError::SingleCopy { path });
                }
                let env = UbootEnv::open(&cfg, writable).map_err(open_err(format!(
                    "the U-Boot environment described by {}",
                    path.display()
                )))?;
                Ok(Box::new(env))
            }
            BootloaderType::Grub => {
                let dir = self.grub_dir.as_ref().ok_or(BuildError::MissingField {
                    field: "grub_dir",
                    context: "type = \"grub\"",
                })?;
                let prefix = self.grub_prefix.as_deref().unwrap_or(match self.scheme {
                    SchemeName::Shoal => "shoal_grubenv",
                    SchemeName::Mender => "mender_grubenv",
                });
                let env = GrubEnv::open(&Paths::new(dir, prefix), writable).map_err(open_err(
                    format!("the GRUB environment under {}", dir.display()),
                ))?;
                Ok(Box::new(env))
            }
            BootloaderType::File => {
                let path = self.path.as_ref().ok_or(BuildError::MissingField {
                    field: "path",
                    context: "type = \"file\"",
                })?;
                let env = FileEnv::open(path, writable)
                    .map_err(open_err(format!("the file environment {}", path.display())))?;
                Ok(Box::new(env))
            }
        }
    }
}

/// The slots of a [`SlotsConfig`], opened from their files or devices.
#[derive(Debug, Clone)]
pub struct SlotDevices {
    slots: [SlotConfig; 2],
}

impl SlotDevices {
    /// Slots A and B from configuration.
    pub fn new(config: &SlotsConfig) -> SlotDevices {
        SlotDevices {
            slots: [config.a.clone(), config.b.clone()],
        }
    }

    fn config(&self, slot: Slot) -> &SlotConfig {
        match slot {
            Slot::A => &self.slots[0],
            Slot::B => &self.slots[1],
        }
    }
}

impl SlotStorage for SlotDevices {
    fn open(&self, slot: Slot, writable: bool) -> io::Result<Box<dyn Storage>> {
        let c = self.config(slot);
        let size = match c.size {
            Some(size) => size,
            None => {
                let whole = FileStorage::open(&c.path, false)?;
                whole.len()?.checked_sub(c.offset).ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "slot offset is past the end of its device",
                    )
                })?
            }
        };
        Ok(Box::new(FileStorage::open_region(
            &c.path, c.offset, size, writable, false,
        )?))
    }

    fn extent(&self, slot: Slot) -> Option<io::Result<Extent>> {
        let c = self.config(slot);
        Some(extent::resolve(&c.path, c.offset, c.size))
    }

    fn describe(&self, slot: Slot) -> String {
        let c = self.config(slot);
        match c.size {
            Some(size) => format!("{} (offset {}, {} bytes)", c.path.display(), c.offset, size),
            None if c.offset > 0 => format!("{} (from offset {})", c.path.display(), c.offset),
            None => c.path.display().to_string(),
        }
    }
}

/// Whether two slots share bytes: compared by what their paths resolve to
/// ([`extent`]: symlinks, hard links, partitions of one disk), or by path text
/// when a path does not resolve (yet); [`BootControl::open_writer`] checks again
/// right before writing.
fn overlaps(a: &SlotConfig, b: &SlotConfig) -> bool {
    if let (Ok(ea), Ok(eb)) = (
        extent::resolve(&a.path, a.offset, a.size),
        extent::resolve(&b.path, b.offset, b.size),
    ) {
        return ea.overlaps(&eb);
    }
    if a.path != b.path {
        return false;
    }
    let end = |c: &SlotConfig| c.size.map_or(u64::MAX, |s| c.offset.saturating_add(s));
    a.offset < end(b) && b.offset < end(a)
}

/// A slot for messages: its path, and what it resolves to when that differs.
fn show(c: &SlotConfig) -> String {
    let region = match c.size {
        Some(size) => format!(" (offset {}, {size} bytes)", c.offset),
        None if c.offset > 0 => format!(" (from offset {})", c.offset),
        None => String::new(),
    };
    match std::fs::canonicalize(&c.path) {
        Ok(real) if real != c.path => {
            format!("{}{region} (= {})", c.path.display(), real.display())
        }
        _ => format!("{}{region}", c.path.display()),
    }
}

/// Builds a ready [`BootControl`] from the two tables.
pub fn build(
    slots: &SlotsConfig,
    bootloader: &BootloaderConfig,
    writable: bool,
) -> Result<BootControl, BuildError> {
    if overlaps(&slots.a, &slots.b) {
        return Err(BuildError::SlotsOverlap {
            a: show(&slots.a),
            b: show(&slots.b),
        });
    }
    let scheme = bootloader.scheme()?;
    let env = bootloader.open_env(writable)?;
    let detect = match slots.detect.from {
        DetectFrom::Bootloader => Detect::Bootloader,
        DetectFrom::System => Detect::System(SystemProbe {
            cmdline: slots.detect.cmdline.clone(),
            root_device: slots.detect.root_device,
            slots: [&slots.a, &slots.b].map(|c| SlotIdentity {
                path: c.path.clone(),
                root_aliases: c.root_aliases.clone(),
            }),
        }),
    };
    Ok(BootControl::new(
        env,
        scheme,
        bootloader.flavor(),
        Box::new(SlotDevices::new(slots)),
        detect,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheme::Flavor;

    const EXAMPLE: &str = r#"
        [server]
        url = "https://example.invalid"

        [slots]
        a = { path = "/dev/mmcblk0p2", root_aliases = ["PARTUUID=c0ffee00-02"] }
        b = { path = "/dev/mmcblk0p3" }

        [bootloader]
        type = "uboot"
        scheme = "mender"
        fw_env_config = "/etc/fw_env.config"
        mender_part_a = 2
        mender_part_b = 3
    "#;

    #[test]
    fn parses_and_ignores_foreign_tables() {
        let cfg = BootConfig::from_toml_str(EXAMPLE).unwrap();
        assert_eq!(
            cfg.slots.a.root_aliases,
            vec!["PARTUUID=c0ffee00-02".to_string()]
        );
        assert_eq!(cfg.slots.detect, DetectConfig::default());
        assert_eq!(cfg.bootloader.kind, BootloaderType::Uboot);
        assert_eq!(
            cfg.bootloader.scheme().unwrap(),
            Scheme::Mender(MenderParts {
                part_a: 2,
                part_b: 3
            })
        );
    }

    #[test]
    fn rejects_unknown_fields_and_missing_tables() {
        let bad = EXAMPLE.replace("scheme = \"mender\"", "schema = \"mender\"");
        assert!(matches!(
            BootConfig::from_toml_str(&bad),
            Err(BuildError::Toml(_))
        ));
        assert!(matches!(
            BootConfig::from_toml_str("[slots]\na={path=\"/a\"}\nb={path=\"/b\"}"),
            Err(BuildError::MissingTable {
                table: "bootloader"
            })
        ));
        let no_part = EXAMPLE.replace("mender_part_b = 3", "");
        let cfg = BootConfig::from_toml_str(&no_part).unwrap();
        assert!(matches!(
            cfg.bootloader.scheme(),
            Err(BuildError::MissingField {
                field: "mender_part_b",
                ..
            })
        ));
    }

    #[test]
    fn rejects_fields_of_other_types_and_overlapping_slots() {
        let grub = EXAMPLE.replace("type = \"uboot\"", "type = \"grub\"");
        let cfg = BootConfig::from_toml_str(&grub).unwrap();
        assert!(matches!(
            cfg.build(false),
            Err(BuildError::UnusedField {
                field: "fw_env_config",
                kind: BootloaderType::Grub
            })
        ));
        let same = EXAMPLE.replace("/dev/mmcblk0p3", "/dev/mmcblk0p2");
        let cfg = BootConfig::from_toml_str(&same).unwrap();
        assert!(matches!(
            cfg.build(false),
            Err(BuildError::SlotsOverlap { .. })
        ));
    }

    #[test]
    fn slot_devices_open_their_regions() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.img");
        std::fs::write(&disk, vec![0u8; 100]).unwrap();
        let slot = |offset, size| SlotConfig {
            path: disk.clone(),
            offset,
            size,
            root_aliases: vec![],
        };
        let slots = SlotsConfig {
            a: slot(10, Some(40)),
            b: slot(50, None),
            detect: DetectConfig::default(),
        };
        let dev = SlotDevices::new(&slots);
        let mut a = dev.open(Slot::A, true).unwrap();
        assert_eq!(a.len().unwrap(), 40);
        assert_eq!(dev.open(Slot::B, false).unwrap().len().unwrap(), 50);
        a.write_at(0, &[7; 40]).unwrap();
        assert!(a.write_at(40, &[7]).is_err());
        let bytes = std::fs::read(&disk).unwrap();
        assert_eq!(&bytes[10..50], &[7; 40]);
        assert!(bytes[..10].iter().chain(&bytes[50..]).all(|&b| b == 0));
        assert!(!overlaps(&slots.a, &slots.b));
        assert!(overlaps(&slots.a, &slot(49, Some(2))));
    }

    /// A file-backed device: slots `a.img` and `b.img` (or what `b` is made into),
    /// the file bootloader provisioned to run slot A.
    fn file_device(dir: &Path, b: &Path) -> (SlotsConfig, BootloaderConfig) {
        let a = dir.join("a.img");
        std::fs::write(&a, vec![1u8; 4096]).unwrap();
        let env_path = dir.join("bootenv");
        let mut env = FileEnv::open(&env_path, true).unwrap();
        env.store(&Scheme::Shoal.initial(Flavor::File, Slot::A))
            .unwrap();
        let slot = |path: &Path| SlotConfig {
            path: path.to_path_buf(),
            offset: 0,
            size: None,
            root_aliases: vec![],
        };
        let slots = SlotsConfig {
            a: slot(&a),
            b: slot(b),
            detect: DetectConfig {
                from: DetectFrom::Bootloader,
                ..DetectConfig::default()
            },
        };
        let bootloader = BootloaderConfig {
            kind: BootloaderType::File,
            scheme: SchemeName::Shoal,
            fw_env_config: None,
            allow_single_copy: false,
            grub_dir: None,
            grub_prefix: None,
            path: Some(env_path),
            mender_part_a: None,
            mender_part_b: None,
        };
        (slots, bootloader)
    }

    /// Regression (issue 9, item 1): slot B configured as a symlink to slot A's file
    /// (as `/dev/disk/by-partlabel/...` beside `/dev/mmcblk0pN`) was taken for
    /// another slot, and an install overwrote the running slot.
    #[test]
    fn a_symlink_or_hard_link_to_the_other_slot_is_an_overlap() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("by-partlabel-b");
        std::os::unix::fs::symlink("a.img", &link).unwrap();
        let (slots, bootloader) = file_device(dir.path(), &link);
        let err = build(&slots, &bootloader, true).unwrap_err();
        assert!(
            matches!(&err, BuildError::SlotsOverlap { b, .. } if b.contains("by-partlabel-b") && b.ends_with("a.img)")),
            "{err}"
        );
        let hard = dir.path().join("b-hard.img");
        std::fs::hard_link(dir.path().join("a.img"), &hard).unwrap();
        let (slots, bootloader) = file_device(dir.path(), &hard);
        assert!(matches!(
            build(&slots, &bootloader, true),
            Err(BuildError::SlotsOverlap { .. })
        ));
    }

    /// Regression (issue 9, item 1): the slots are resolved again right before the
    /// first write, so a path that changed after the configuration was checked (a
    /// symlink swapped in) cannot make the writer overwrite the running slot.
    #[test]
    fn the_writer_checks_the_slots_again_right_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let b = dir.path().join("b.img");
        std::fs::write(&b, vec![0u8; 4096]).unwrap();
        let (slots, bootloader) = file_device(dir.path(), &b);
        let control = build(&slots, &bootloader, true).unwrap();
        assert!(control.open_writer(Slot::B, 4096).is_ok());
        std::fs::remove_file(&b).unwrap();
        std::os::unix::fs::symlink(dir.path().join("a.img"), &b).unwrap();
        let err = control.open_writer(Slot::B, 4096).unwrap_err();
        assert!(
            matches!(
                err,
                crate::control::OpenWriterError::Overlap { slot: Slot::B, .. }
            ),
            "{err}"
        );
        assert_eq!(
            std::fs::read(dir.path().join("a.img")).unwrap(),
            vec![1u8; 4096]
        );
    }

    #[test]
    fn single_copy_uboot_needs_opt_in() {
        let dir = tempfile::tempdir().unwrap();
        let fw = dir.path().join("fw_env.config");
        std::fs::write(
            &fw,
            format!("{} 0 0x1000\n", dir.path().join("env").display()),
        )
        .unwrap();
        let text = format!(
            "[slots]\na={{path=\"/a\"}}\nb={{path=\"/b\"}}\n[bootloader]\ntype=\"uboot\"\nfw_env_config={:?}\n",
            fw
        );
        let cfg = BootConfig::from_toml_str(&text).unwrap();
        assert!(matches!(
            cfg.bootloader.open_env(true),
            Err(BuildError::SingleCopy { .. })
        ));
        let mut ok = cfg.bootloader.clone();
        ok.allow_single_copy = true;
        let env = ok.open_env(true).unwrap();
        assert!(!env.is_power_safe());
    }
}
