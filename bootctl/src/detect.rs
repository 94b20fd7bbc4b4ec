//! Which slot is running, as the running system sees it: the kernel command line
//! (`shoal.slot=`, `root=`) and the device that holds `/`.
//!
//! [`crate::BootControl`] compares this with what the bootloader recorded and
//! refuses to act when they disagree: writing the slot the system actually runs from
//! would destroy it.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::Slot;

/// How the running system names one slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotIdentity {
    /// The slot's device or file.
    pub path: PathBuf,
    /// Extra `root=` values that mean this slot, e.g. `PARTUUID=…-02` or `/dev/sda2`.
    pub root_aliases: Vec<String>,
}

/// Where to look for the running slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemProbe {
    /// The kernel command line file (normally `/proc/cmdline`).
    pub cmdline: PathBuf,
    /// Whether to compare the device of `/` with the slots' block devices.
    pub root_device: bool,
    /// Slot A and slot B.
    pub slots: [SlotIdentity; 2],
}

/// What the running system says, source by source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SystemView {
    /// From `shoal.slot=` on the kernel command line.
    pub shoal_slot_arg: Option<Slot>,
    /// From `root=` on the kernel command line.
    pub root_arg: Option<Slot>,
    /// From the device that holds `/`.
    pub root_device: Option<Slot>,
}

/// Why the running system's slot could not be determined.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The kernel command line could not be read.
    #[error("cannot read kernel command line {path}")]
    Cmdline {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// `shoal.slot=` names no slot.
    #[error("kernel command line has shoal.slot={value:?}, expected A or B")]
    BadSlotArg {
        /// The value found.
        value: String,
    },
    /// `root=` names neither slot.
    #[error("kernel command line root={root:?} names neither slot A nor slot B")]
    UnknownRoot {
        /// The value found.
        root: String,
    },
    /// `stat` of `/` or of a slot device failed.
    #[error("cannot stat {path}")]
    Stat {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

impl SystemView {
    /// The slot every present source agrees on; `Err` with the view when they
    /// disagree, `Ok(None)` when no source says anything.
    pub fn agreed(&self) -> Result<Option<Slot>, SystemView> {
        let mut found: Option<Slot> = None;
        for s in [self.shoal_slot_arg, self.root_arg, self.root_device]
            .into_iter()
            .flatten()
        {
            match found {
                Some(f) if f != s => return Err(*self),
                _ => found = Some(s),
            }
        }
        Ok(found)
    }
}

/// Resolves `root=` values of the forms `/dev/…`, `PARTUUID=`, `UUID=`, `PARTLABEL=`
/// and `LABEL=` to a device path through `/dev/disk/by-*`.
fn resolve_root(root: &str) -> Option<PathBuf> {
    let by = |dir: &str, v: &str| Path::new("/dev/disk").join(dir).join(v);
    let path = if let Some(v) = root.strip_prefix("PARTUUID=") {
        by("by-partuuid", &v.to_ascii_lowercase())
    } else if let Some(v) = root.strip_prefix("UUID=") {
        by("by-uuid", v)
    } else if let Some(v) = root.strip_prefix("PARTLABEL=") {
        by("by-partlabel", v)
    } else if let Some(v) = root.strip_prefix("LABEL=") {
        by("by-label", v)
    } else {
        PathBuf::from(root)
    };
    std::fs::canonicalize(path).ok()
}

impl SystemProbe {
    /// Parses a kernel command line.
    pub fn parse_cmdline(&self, cmdline: &str) -> Result<(Option<Slot>, Option<Slot>), ProbeError> {
        let mut slot_arg = None;
        let mut root_arg = None;
        for word in cmdline.split_whitespace() {
            if let Some(v) = word.strip_prefix("shoal.slot=") {
                let slot = v.parse::<Slot>().map_err(|_| ProbeError::BadSlotArg {
                    value: v.to_string(),
                })?;
                slot_arg = Some(slot);
            } else if let Some(root) = word.strip_prefix("root=") {
                root_arg = Some(self.root_slot(root)?);
            }
        }
        Ok((slot_arg, root_arg))
    }

    fn root_slot(&self, root: &str) -> Result<Slot, ProbeError> {
        for (slot, id) in Slot::ALL.into_iter().zip(&self.slots) {
            if id.path.as_os_str() == root || id.root_aliases.iter().any(|a| a == root) {
                return Ok(slot);
            }
        }
        if let Some(dev) = resolve_root(root) {
            for (slot, id) in Slot::ALL.into_iter().zip(&self.slots) {
                if std::fs::canonicalize(&id.path).is_ok_and(|p| p == dev) {
                    return Ok(slot);
                }
            }
        }
        Err(ProbeError::UnknownRoot {
            root: root.to_string(),
        })
    }

    /// Looks at the command line and (if enabled) the device of `/`.
    pub fn probe(&self) -> Result<SystemView, ProbeError> {
        let text =
            std::fs::read_to_string(&self.cmdline).map_err(|source| ProbeError::Cmdline {
                path: self.cmdline.clone(),
                source,
            })?;
        let (shoal_slot_arg, root_arg) = self.parse_cmdline(&text)?;
        let mut root_device = None;
        if self.root_device {
            let stat = |p: &Path| {
                std::fs::metadata(p).map_err(|source| ProbeError::Stat {
                    path: p.to_path_buf(),
                    source,
                })
            };
            let root_dev = stat(Path::new("/"))?.dev();
            for (slot, id) in Slot::ALL.into_iter().zip(&self.slots) {
                let meta = stat(&id.path)?;
                if meta.file_type().is_block_device() && meta.rdev() == root_dev {
                    root_device = Some(slot);
                }
            }
        }
        Ok(SystemView {
            shoal_slot_arg,
            root_arg,
            root_device,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe() -> SystemProbe {
        SystemProbe {
            cmdline: PathBuf::from("/nonexistent"),
            root_device: false,
            slots: [
                SlotIdentity {
                    path: "/dev/mmcblk0p2".into(),
                    root_aliases: vec!["PARTUUID=abcd-02".into()],
                },
                SlotIdentity {
                    path: "/dev/mmcblk0p3".into(),
                    root_aliases: vec![],
                },
            ],
        }
    }

    #[test]
    fn cmdline_forms() {
        let p = probe();
        assert_eq!(
            p.parse_cmdline("console=ttyS0 root=/dev/mmcblk0p3 rw")
                .unwrap(),
            (None, Some(Slot::B))
        );
        assert_eq!(
            p.parse_cmdline("root=PARTUUID=abcd-02 shoal.slot=A\n")
                .unwrap(),
            (Some(Slot::A), Some(Slot::A))
        );
        assert!(matches!(
            p.parse_cmdline("root=/dev/sda9"),
            Err(ProbeError::UnknownRoot { root }) if root == "/dev/sda9"
        ));
        assert!(matches!(
            p.parse_cmdline("shoal.slot=C"),
            Err(ProbeError::BadSlotArg { value }) if value == "C"
        ));
        assert_eq!(p.parse_cmdline("quiet").unwrap(), (None, None));
    }

    #[test]
    fn agreement() {
        let v = SystemView {
            shoal_slot_arg: Some(Slot::A),
            root_arg: Some(Slot::A),
            root_device: None,
        };
        assert_eq!(v.agreed(), Ok(Some(Slot::A)));
        let bad = SystemView {
            root_device: Some(Slot::B),
            ..v
        };
        assert_eq!(bad.agreed(), Err(bad));
        assert_eq!(SystemView::default().agreed(), Ok(None));
    }

    #[test]
    fn probe_reads_cmdline_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cmdline");
        std::fs::write(&path, "shoal.slot=B\n").unwrap();
        let p = SystemProbe {
            cmdline: path,
            ..probe()
        };
        assert_eq!(p.probe().unwrap().shoal_slot_arg, Some(Slot::B));
        let missing = SystemProbe {
            cmdline: dir.path().join("nope"),
            ..probe()
        };
        assert!(matches!(missing.probe(), Err(ProbeError::Cmdline { .. })));
    }
}
