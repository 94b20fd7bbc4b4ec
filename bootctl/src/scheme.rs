//! Boot variable schemes: how "committed slot, trial, tries" is spelled in an
//! environment.
//!
//! # Shoal's scheme
//!
//! | variable | meaning |
//! |---|---|
//! | `shoal_slot` | `A`/`B`: the committed slot, booted when no trial is pending |
//! | `shoal_try_slot` | `A`/`B`, or absent: the slot on trial |
//! | `shoal_tries` | decimal `0..=9`: trial boots left; the bootloader decrements it before each trial boot and boots `shoal_slot` once it is `0` |
//! | `shoal_booted` | `A`/`B`: written by the bootloader, the slot it booted last |
//!
//! # Mender's scheme
//!
//! `mender_boot_part` (partition number of the slot to boot), `mender_boot_part_hex`
//! (the same in hex), `upgrade_available` (`1` during a trial), `bootcount` and
//! `bootlimit`. On U-Boot (`CONFIG_BOOTCOUNT_ENV`) the bootloader increments
//! `bootcount` on each boot while `upgrade_available=1` and runs `altbootcmd`, which
//! switches `mender_boot_part` back and clears `upgrade_available`, once `bootcount >
//! bootlimit`. Mender's GRUB integration allows exactly one trial boot and does not
//! use `bootlimit`.

use std::collections::BTreeMap;

use crate::Slot;

/// Environment variables, ordered by name.
pub type Vars = BTreeMap<String, String>;

/// The most trial boots a trial can be armed with. GRUB's script language cannot
/// do arithmetic, so the boot scripts count down through a fixed chain of
/// one-digit values.
pub const TRIES_MAX: u32 = 9;

/// Which bootloader's script semantics apply to an environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavor {
    /// U-Boot with the Shoal boot script, or Mender's U-Boot integration.
    Uboot,
    /// GRUB with the Shoal `grub.cfg` fragment, or Mender's GRUB integration.
    Grub,
    /// The file backend (tests and the simulator), modelled on U-Boot.
    File,
}

/// Mender's partition numbers for the two slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MenderParts {
    /// `mender_boot_part` value of slot A (Mender's `mender_rootfsa_part`).
    pub part_a: u32,
    /// `mender_boot_part` value of slot B (Mender's `mender_rootfsb_part`).
    pub part_b: u32,
}

impl MenderParts {
    /// The partition number of `slot`.
    pub fn part(&self, slot: Slot) -> u32 {
        match slot {
            Slot::A => self.part_a,
            Slot::B => self.part_b,
        }
    }

    fn slot(&self, part: u32) -> Option<Slot> {
        if part == self.part_a {
            Some(Slot::A)
        } else if part == self.part_b {
            Some(Slot::B)
        } else {
            None
        }
    }
}

/// A variable scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Shoal's own variables.
    Shoal,
    /// Mender's variables, with the slots' partition numbers.
    Mender(MenderParts),
}

/// A trial boot of a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Trial {
    /// The slot on trial.
    pub slot: Slot,
    /// Trial boots left before the bootloader falls back to the committed slot.
    pub tries_left: u32,
}

/// What an environment says about the slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BootState {
    /// The slot booted when no trial is pending, and the fallback of a trial.
    pub committed: Slot,
    /// The pending or running trial, if any.
    pub trial: Option<Trial>,
    /// The slot the bootloader booted last, when the environment records it.
    pub booted: Option<Slot>,
}

impl BootState {
    /// The slot the bootloader will boot next.
    pub fn next_boot(&self) -> Slot {
        match self.trial {
            Some(t) if t.tries_left > 0 => t.slot,
            _ => self.committed,
        }
    }
}

/// Why an environment does not describe a valid boot state in a scheme.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// A required variable is not set.
    #[error("boot variable {name} is not set")]
    Missing {
        /// The variable.
        name: &'static str,
    },
    /// A variable has a value the scheme does not allow.
    #[error("boot variable {name} has invalid value {value:?}")]
    Invalid {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: String,
    },
}

/// Why a trial cannot be armed with the given tries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tries must be between 1 and {max} for this bootloader, got {tries}")]
pub struct TriesError {
    /// The tries asked for.
    pub tries: u32,
    /// The most this scheme and bootloader support.
    pub max: u32,
}

fn get<'a>(vars: &'a Vars, name: &str) -> Option<&'a str> {
    vars.get(name).map(String::as_str).filter(|v| !v.is_empty())
}

/// A slot variable, exactly `A` or `B` as the boot scripts compare it.
fn parse_slot(vars: &Vars, name: &'static str) -> Result<Option<Slot>, StateError> {
    match get(vars, name) {
        None => Ok(None),
        Some("A") => Ok(Some(Slot::A)),
        Some("B") => Ok(Some(Slot::B)),
        Some(v) => Err(StateError::Invalid {
            name,
            value: v.to_string(),
        }),
    }
}

fn parse_num(vars: &Vars, name: &'static str) -> Result<Option<u32>, StateError> {
    get(vars, name)
        .map(|v| {
            v.parse::<u32>().map_err(|_| StateError::Invalid {
                name,
                value: v.to_string(),
            })
        })
        .transpose()
}

impl Scheme {
    /// The variables this scheme reads and writes.
    pub fn variables(&self) -> &'static [&'static str] {
        match self {
            Scheme::Shoal => &[
                "shoal_slot",
                "shoal_try_slot",
                "shoal_tries",
                "shoal_booted",
            ],
            Scheme::Mender(_) => &[
                "mender_boot_part",
                "mender_boot_part_hex",
                "upgrade_available",
                "bootcount",
                "bootlimit",
            ],
        }
    }

    /// The most trial boots this scheme supports on `flavor`.
    pub fn tries_max(&self, flavor: Flavor) -> u32 {
        match (self, flavor) {
            (Scheme::Mender(_), Flavor::Grub) => 1,
            _ => TRIES_MAX,
        }
    }

    /// Reads the boot state from `vars`.
    pub fn decode(&self, vars: &Vars, flavor: Flavor) -> Result<BootState, StateError> {
        match self {
            Scheme::Shoal => {
                let committed = parse_slot(vars, "shoal_slot")?
                    .ok_or(StateError::Missing { name: "shoal_slot" })?;
                let trial = match parse_slot(vars, "shoal_try_slot")? {
                    None => None,
                    Some(slot) => {
                        // The boot scripts count down from one digit only.
                        let name = "shoal_tries";
                        let tries_left = match get(vars, name) {
                            None => 0,
                            Some(t) if t.len() == 1 && t.as_bytes()[0].is_ascii_digit() => {
                                u32::from(t.as_bytes()[0] - b'0')
                            }
                            Some(t) => {
                                return Err(StateError::Invalid {
                                    name,
                                    value: t.to_string(),
                                });
                            }
                        };
                        Some(Trial { slot, tries_left })
                    }
                };
                let booted = parse_slot(vars, "shoal_booted")?;
                Ok(BootState {
                    committed,
                    trial,
                    booted,
                })
            }
            Scheme::Mender(parts) => {
                let name = "mender_boot_part";
                let part = parse_num(vars, name)?.ok_or(StateError::Missing { name })?;
                let slot = parts.slot(part).ok_or_else(|| StateError::Invalid {
                    name,
                    value: part.to_string(),
                })?;
                let upgrade = match get(vars, "upgrade_available") {
                    None | Some("0") => false,
                    Some("1") => true,
                    Some(other) => {
                        return Err(StateError::Invalid {
                            name: "upgrade_available",
                            value: other.to_string(),
                        });
                    }
                };
                if !upgrade {
                    // Whether the running system is this slot or the other (after a
                    // rollback not yet followed by a reboot) is not recorded.
                    return Ok(BootState {
                        committed: slot,
                        trial: None,
                        booted: None,
                    });
                }
                let bootcount = parse_num(vars, "bootcount")?.unwrap_or(0);
                let bootlimit = match flavor {
                    Flavor::Grub => 1,
                    Flavor::Uboot | Flavor::File => parse_num(vars, "bootlimit")?
                        .filter(|&l| l > 0)
                        .ok_or(StateError::Missing { name: "bootlimit" })?,
                };
                let trial = Trial {
                    slot,
                    tries_left: bootlimit.saturating_sub(bootcount),
                };
                let booted = if bootcount == 0 { slot.other() } else { slot };
                Ok(BootState {
                    committed: slot.other(),
                    trial: Some(trial),
                    booted: Some(booted),
                })
            }
        }
    }

    /// Sets `vars` so that the next `tries` boots try `slot`, keeping the current
    /// committed slot as the fallback. For Mender that committed slot is implied
    /// (the other one).
    pub fn arm(
        &self,
        vars: &mut Vars,
        flavor: Flavor,
        slot: Slot,
        tries: u32,
    ) -> Result<(), TriesError> {
        let max = self.tries_max(flavor);
        if tries == 0 || tries > max {
            return Err(TriesError { tries, max });
        }
        match self {
            Scheme::Shoal => {
                vars.insert("shoal_try_slot".into(), slot.to_string());
                vars.insert("shoal_tries".into(), tries.to_string());
            }
            Scheme::Mender(parts) => {
                set_mender_part(vars, parts, slot);
                vars.insert("upgrade_available".into(), "1".into());
                vars.insert("bootcount".into(), "0".into());
                if flavor != Flavor::Grub {
                    vars.insert("bootlimit".into(), tries.to_string());
                }
            }
        }
        Ok(())
    }

    /// Sets `vars` so that `state`'s trial slot becomes the committed slot.
    ///
    /// # Panics
    /// If `state` has no trial (the caller checks).
    pub fn commit(&self, vars: &mut Vars, state: &BootState) {
        let trial = state.trial.expect("commit needs a trial");
        match self {
            Scheme::Shoal => {
                vars.insert("shoal_slot".into(), trial.slot.to_string());
                vars.remove("shoal_try_slot");
                vars.remove("shoal_tries");
            }
            Scheme::Mender(parts) => {
                set_mender_part(vars, parts, trial.slot);
                vars.insert("upgrade_available".into(), "0".into());
                vars.insert("bootcount".into(), "0".into());
            }
        }
    }

    /// Sets `vars` so that no trial is pending and the committed slot boots.
    pub fn rollback(&self, vars: &mut Vars, state: &BootState) {
        match self {
            Scheme::Shoal => {
                vars.insert("shoal_slot".into(), state.committed.to_string());
                vars.remove("shoal_try_slot");
                vars.remove("shoal_tries");
            }
            Scheme::Mender(parts) => {
                set_mender_part(vars, parts, state.committed);
                vars.insert("upgrade_available".into(), "0".into());
                vars.insert("bootcount".into(), "0".into());
            }
        }
    }

    /// A fresh environment's variables for a device whose committed slot is `slot`
    /// (used to provision a new device or test image).
    pub fn initial(&self, flavor: Flavor, slot: Slot) -> Vars {
        let mut vars = Vars::new();
        match self {
            Scheme::Shoal => {
                vars.insert("shoal_slot".into(), slot.to_string());
                vars.insert("shoal_booted".into(), slot.to_string());
            }
            Scheme::Mender(parts) => {
                set_mender_part(&mut vars, parts, slot);
                vars.insert("upgrade_available".into(), "0".into());
                vars.insert("bootcount".into(), "0".into());
                if flavor != Flavor::Grub {
                    vars.insert("bootlimit".into(), "1".into());
                }
            }
        }
        vars
    }
}

fn set_mender_part(vars: &mut Vars, parts: &MenderParts, slot: Slot) {
    let part = parts.part(slot);
    vars.insert("mender_boot_part".into(), part.to_string());
    vars.insert("mender_boot_part_hex".into(), format!("{part:x}"));
}

#[cfg(test)]
mod tests {
    use super::*;

    const MENDER: Scheme = Scheme::Mender(MenderParts {
        part_a: 2,
        part_b: 3,
    });

    fn vars(pairs: &[(&str, &str)]) -> Vars {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn shoal_arm_commit_rollback() {
        let s = Scheme::Shoal;
        let mut v = s.initial(Flavor::Uboot, Slot::A);
        let st = s.decode(&v, Flavor::Uboot).unwrap();
        assert_eq!(
            st,
            BootState {
                committed: Slot::A,
                trial: None,
                booted: Some(Slot::A)
            }
        );
        s.arm(&mut v, Flavor::Uboot, Slot::B, 3).unwrap();
        let st = s.decode(&v, Flavor::Uboot).unwrap();
        assert_eq!(
            st.trial,
            Some(Trial {
                slot: Slot::B,
                tries_left: 3
            })
        );
        assert_eq!(st.next_boot(), Slot::B);
        let mut committed = v.clone();
        s.commit(&mut committed, &st);
        let c = s.decode(&committed, Flavor::Uboot).unwrap();
        assert_eq!((c.committed, c.trial), (Slot::B, None));
        s.rollback(&mut v, &st);
        let r = s.decode(&v, Flavor::Uboot).unwrap();
        assert_eq!(
            (r.committed, r.trial, r.next_boot()),
            (Slot::A, None, Slot::A)
        );
        assert_eq!(
            s.arm(&mut v, Flavor::Grub, Slot::B, 10),
            Err(TriesError { tries: 10, max: 9 })
        );
        assert_eq!(
            s.arm(&mut v, Flavor::Grub, Slot::B, 0),
            Err(TriesError { tries: 0, max: 9 })
        );
    }

    #[test]
    fn shoal_bad_states() {
        let s = Scheme::Shoal;
        assert_eq!(
            s.decode(&Vars::new(), Flavor::Uboot),
            Err(StateError::Missing { name: "shoal_slot" })
        );
        assert_eq!(
            s.decode(&vars(&[("shoal_slot", "C")]), Flavor::Uboot),
            Err(StateError::Invalid {
                name: "shoal_slot",
                value: "C".into()
            })
        );
        assert_eq!(
            s.decode(
                &vars(&[
                    ("shoal_slot", "A"),
                    ("shoal_try_slot", "B"),
                    ("shoal_tries", "x")
                ]),
                Flavor::Uboot
            ),
            Err(StateError::Invalid {
                name: "shoal_tries",
                value: "x".into()
            })
        );
        let exhausted = vars(&[
            ("shoal_slot", "A"),
            ("shoal_try_slot", "B"),
            ("shoal_tries", "0"),
        ]);
        assert_eq!(
            s.decode(&exhausted, Flavor::Uboot).unwrap().next_boot(),
            Slot::A
        );
    }

    #[test]
    fn mender_uboot_and_grub() {
        let mut v = MENDER.initial(Flavor::Uboot, Slot::A);
        assert_eq!(v["mender_boot_part"], "2");
        MENDER.arm(&mut v, Flavor::Uboot, Slot::B, 2).unwrap();
        assert_eq!(
            v,
            vars(&[
                ("bootcount", "0"),
                ("bootlimit", "2"),
                ("mender_boot_part", "3"),
                ("mender_boot_part_hex", "3"),
                ("upgrade_available", "1")
            ])
        );
        let st = MENDER.decode(&v, Flavor::Uboot).unwrap();
        assert_eq!(st.committed, Slot::A);
        assert_eq!(
            st.trial,
            Some(Trial {
                slot: Slot::B,
                tries_left: 2
            })
        );
        assert_eq!(st.booted, Some(Slot::A));
        v.insert("bootcount".into(), "1".into());
        let st = MENDER.decode(&v, Flavor::Uboot).unwrap();
        assert_eq!(
            (st.trial.unwrap().tries_left, st.booted),
            (1, Some(Slot::B))
        );
        let mut g = MENDER.initial(Flavor::Grub, Slot::A);
        assert_eq!(
            MENDER.arm(&mut g, Flavor::Grub, Slot::B, 2),
            Err(TriesError { tries: 2, max: 1 })
        );
        MENDER.arm(&mut g, Flavor::Grub, Slot::B, 1).unwrap();
        assert!(!g.contains_key("bootlimit"));
        assert_eq!(
            MENDER
                .decode(&g, Flavor::Grub)
                .unwrap()
                .trial
                .unwrap()
                .tries_left,
            1
        );
        let st = MENDER.decode(&g, Flavor::Grub).unwrap();
        MENDER.rollback(&mut g, &st);
        assert_eq!(g["mender_boot_part"], "2");
        assert_eq!(g["upgrade_available"], "0");
    }

    #[test]
    fn mender_hex_and_bad_states() {
        let parts = Scheme::Mender(MenderParts {
            part_a: 10,
            part_b: 11,
        });
        let v = parts.initial(Flavor::Uboot, Slot::B);
        assert_eq!(v["mender_boot_part_hex"], "b");
        assert_eq!(
            MENDER.decode(&vars(&[("mender_boot_part", "5")]), Flavor::Uboot),
            Err(StateError::Invalid {
                name: "mender_boot_part",
                value: "5".into()
            })
        );
        assert_eq!(
            MENDER.decode(
                &vars(&[("mender_boot_part", "2"), ("upgrade_available", "2")]),
                Flavor::Uboot
            ),
            Err(StateError::Invalid {
                name: "upgrade_available",
                value: "2".into()
            })
        );
        assert_eq!(
            MENDER.decode(
                &vars(&[("mender_boot_part", "2"), ("upgrade_available", "1")]),
                Flavor::Uboot
            ),
            Err(StateError::Missing { name: "bootlimit" })
        );
        assert_eq!(
            MENDER.decode(&Vars::new(), Flavor::Grub),
            Err(StateError::Missing {
                name: "mender_boot_part"
            })
        );
    }
}
