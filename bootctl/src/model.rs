//! The bootloader model: one description, over the boot variables alone, of what a
//! board's bootloader does at each boot ([`Bootloader::boot`]) and of what Shoal's
//! side does for each bootloader step the update engine asks for
//! ([`Bootloader::apply`]: disarm, arm, commit, roll back).
//!
//! It is the one model of the project. [`Bootloader::boot`] makes the decisions of
//! the scripts in `integration/` (Shoal's scheme) and of Mender's U-Boot and GRUB
//! integration (Mender's scheme), and is checked against the real GRUB
//! (`tests/grub_emu.rs`), the real U-Boot (`tests/uboot_qemu.rs`) and at every crash
//! point of every environment update (`tests/crash.rs`). [`BootControl`] carries
//! out [`Bootloader::apply`] on a real environment for the device driver; `shoal
//! demo` and the integration tests reboot a file environment through [`boot_env`];
//! the update engine's simulated device and the fleet simulator hold the variables
//! in memory in a [`Board`].
//!
//! Key design decision: no I/O here (the crate's `io` feature adds only
//! [`boot_env`]), so the sans-IO engine and the simulator depend on this module
//! without any storage, environment backend or OS code.
//!
//! [`BootControl`]: crate::BootControl

use crate::Slot;
use crate::scheme::{BootState, Flavor, Scheme, StateError, TriesError, Vars};

/// A bootloader step the update engine asks for (its `DisarmTrial`, `ArmTrial`,
/// `Commit` and `Rollback` outputs). [`Bootloader::apply`] carries it out
/// idempotently: the state is read first, and a step already taken (a rerun after a
/// power cut between two steps) is not taken again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Make sure `slot` will not be tried (it is about to be written).
    Disarm(Slot),
    /// Try `slot` once on the next boot, falling back to the running slot.
    Arm(Slot),
    /// `slot`, running on trial, becomes the committed slot.
    Commit(Slot),
    /// Give the trial up: the committed slot `to` boots again.
    RollbackTo(Slot),
}

/// Why the variables were left as they are.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The variables hold no valid boot state in the scheme.
    #[error("the bootloader environment holds no valid boot state")]
    State(#[from] StateError),
    /// The slot to arm is the running one.
    #[error("slot {slot} is running; arm the other slot")]
    ActiveSlot {
        /// The slot asked for.
        slot: Slot,
    },
    /// The running slot is itself on trial.
    #[error("slot {slot} is running on trial; commit or roll back first")]
    TrialRunning {
        /// The running trial slot.
        slot: Slot,
    },
    /// The tries are out of range for this scheme and bootloader.
    #[error(transparent)]
    Tries(#[from] TriesError),
    /// No trial is armed or running.
    #[error("no trial is armed or running")]
    NoTrial,
    /// The trial slot is not the running one (not booted yet, or the bootloader
    /// already fell back).
    #[error(
        "slot {trial} is on trial but slot {active} is running; commit only from the trial slot"
    )]
    TrialNotRunning {
        /// The slot on trial.
        trial: Slot,
        /// The running slot.
        active: Slot,
    },
    /// A rollback to `to` was asked for, but no trial is armed and `committed` is
    /// the committed slot.
    #[error("slot {committed} is committed and no trial is armed; cannot go back to slot {to}")]
    NotBack {
        /// The committed slot.
        committed: Slot,
        /// The slot asked for.
        to: Slot,
    },
}

/// A bootloader: a variable scheme read with one bootloader's semantics, and the
/// slot it boots when it finds no valid environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bootloader {
    /// How the variables are spelled.
    pub scheme: Scheme,
    /// Whose semantics (U-Boot, GRUB, the file backend modelled on U-Boot).
    pub flavor: Flavor,
    /// What the board boots when no environment is readable (U-Boot's built-in
    /// default environment, GRUB's fallback).
    pub default_slot: Slot,
}

impl Bootloader {
    /// A bootloader of `scheme` and `flavor` whose default slot is A.
    pub fn new(scheme: Scheme, flavor: Flavor) -> Bootloader {
        Bootloader {
            scheme,
            flavor,
            default_slot: Slot::A,
        }
    }

    /// The boot state `vars` hold.
    pub fn state(&self, vars: &Vars) -> Result<BootState, StateError> {
        self.scheme.decode(vars, self.flavor)
    }

    /// One boot: the slot the bootloader starts, with the variable writes the
    /// bootloader itself makes (a try counted down, a fallback taken, the booted
    /// slot recorded), exactly as the boot scripts make them.
    pub fn boot(&self, vars: &mut Vars) -> Slot {
        match self.scheme {
            Scheme::Shoal => boot_shoal(vars, self.default_slot),
            Scheme::Mender(m) => {
                let part = |v: &Vars| {
                    v.get("mender_boot_part")
                        .and_then(|p| p.parse::<u32>().ok())
                };
                let slot_of = |p: Option<u32>| match p {
                    Some(p) if p == m.part_b => Slot::B,
                    Some(p) if p == m.part_a => Slot::A,
                    _ => self.default_slot,
                };
                let num =
                    |v: &Vars, k: &str| v.get(k).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
                if vars.get("upgrade_available").map(String::as_str) == Some("1") {
                    match self.flavor {
                        Flavor::Uboot | Flavor::File => {
                            // U-Boot CONFIG_BOOTCOUNT_ENV: count, then altbootcmd past
                            // the limit.
                            let count = num(vars, "bootcount") + 1;
                            vars.insert("bootcount".into(), count.to_string());
                            let limit = num(vars, "bootlimit");
                            if limit != 0 && count > limit {
                                let back = slot_of(part(vars)).other();
                                let p = m.part(back);
                                vars.insert("mender_boot_part".into(), p.to_string());
                                vars.insert("mender_boot_part_hex".into(), format!("{p:x}"));
                                vars.insert("upgrade_available".into(), "0".into());
                            }
                        }
                        Flavor::Grub => {
                            if vars.get("bootcount").map(String::as_str) != Some("0") {
                                let back = slot_of(part(vars)).other();
                                vars.insert("mender_boot_part".into(), m.part(back).to_string());
                                vars.insert("upgrade_available".into(), "0".into());
                                vars.insert("bootcount".into(), "0".into());
                            } else {
                                vars.insert("bootcount".into(), "1".into());
                            }
                        }
                    }
                }
                slot_of(part(vars))
            }
        }
    }

    /// Arms a trial of `slot` for the next `tries` boots, falling back to the
    /// running slot `active`. Only arm a slot that verified.
    pub fn arm(
        &self,
        vars: &mut Vars,
        active: Slot,
        slot: Slot,
        tries: u32,
    ) -> Result<(), Refused> {
        let state = self.state(vars)?;
        if slot == active {
            return Err(Refused::ActiveSlot { slot });
        }
        if let Some(t) = state.trial.filter(|t| t.slot == active) {
            return Err(Refused::TrialRunning { slot: t.slot });
        }
        if self.scheme == Scheme::Shoal {
            // The fallback is the running, known-good slot.
            vars.insert("shoal_slot".into(), active.to_string());
        }
        self.scheme.arm(vars, self.flavor, slot, tries)?;
        Ok(())
    }

    /// Makes the trial slot, which must be the running slot `active`, the
    /// committed one.
    pub fn commit(&self, vars: &mut Vars, active: Slot) -> Result<(), Refused> {
        let state = self.state(vars)?;
        let trial = state.trial.ok_or(Refused::NoTrial)?;
        if trial.slot != active {
            return Err(Refused::TrialNotRunning {
                trial: trial.slot,
                active,
            });
        }
        self.scheme.commit(vars, &state);
        Ok(())
    }

    /// Cancels the armed, running or exhausted trial: the committed slot boots next.
    pub fn rollback(&self, vars: &mut Vars) -> Result<(), Refused> {
        let state = self.state(vars)?;
        if state.trial.is_none() {
            return Err(Refused::NoTrial);
        }
        self.scheme.rollback(vars, &state);
        Ok(())
    }

    /// Carries out `step` on `vars`, idempotently; `active` is the running slot
    /// (only [`Step::Arm`] and [`Step::Commit`] look at it). Leaves `vars` as they
    /// are when the step was taken already.
    pub fn apply(&self, vars: &mut Vars, active: Slot, step: Step) -> Result<(), Refused> {
        let state = self.state(vars)?;
        match step {
            Step::Disarm(slot) => {
                if state.trial.is_some_and(|t| t.slot == slot) {
                    self.rollback(vars)?;
                }
            }
            Step::Arm(slot) => {
                if !state
                    .trial
                    .is_some_and(|t| t.slot == slot && t.tries_left > 0)
                {
                    self.arm(vars, active, slot, 1)?;
                }
            }
            Step::Commit(slot) => {
                if state.trial.is_some() || state.committed != slot {
                    self.commit(vars, active)?;
                }
            }
            Step::RollbackTo(to) => {
                if state.trial.is_some() {
                    self.rollback(vars)?;
                } else if state.committed != to {
                    return Err(Refused::NotBack {
                        committed: state.committed,
                        to,
                    });
                }
            }
        }
        Ok(())
    }
}

/// The Shoal scheme's boot decision, exactly as `integration/shoal-boot.cmd` and
/// `integration/grub.cfg` make it: slots must be exactly `A` or `B`, tries exactly
/// one digit `1`..=`9` (anything else is no try left).
fn boot_shoal(vars: &mut Vars, default_slot: Slot) -> Slot {
    let exact_slot = |v: &Vars, k: &str| match v.get(k).map(String::as_str) {
        Some("A") => Some(Slot::A),
        Some("B") => Some(Slot::B),
        _ => None,
    };
    let committed = exact_slot(vars, "shoal_slot").unwrap_or(default_slot);
    let tries = match vars.get("shoal_tries").map(String::as_bytes) {
        Some(&[d]) if (b'1'..=b'9').contains(&d) => u32::from(d - b'0'),
        _ => 0,
    };
    let slot = match exact_slot(vars, "shoal_try_slot") {
        Some(trial) if tries > 0 => {
            vars.insert("shoal_tries".into(), (tries - 1).to_string());
            trial
        }
        _ => committed,
    };
    if exact_slot(vars, "shoal_booted") != Some(slot) {
        vars.insert("shoal_booted".into(), slot.to_string());
    }
    slot
}

/// A board in memory (the engine's simulated device, the fleet simulator): a
/// bootloader, its variables, and the slot running now. Every change goes through
/// the [`Bootloader`] model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Board {
    /// The bootloader.
    pub bootloader: Bootloader,
    /// Its environment's variables.
    pub vars: Vars,
    /// The slot running now (the one the last boot started).
    pub running: Slot,
}

impl Board {
    /// A freshly provisioned board of `bootloader`, committed to and running `slot`.
    pub fn new(bootloader: Bootloader, slot: Slot) -> Board {
        Board {
            vars: bootloader.scheme.initial(bootloader.flavor, slot),
            bootloader,
            running: slot,
        }
    }

    /// The boot state of its variables.
    ///
    /// # Panics
    /// If they hold none: every change goes through the model, which keeps them
    /// valid.
    pub fn state(&self) -> BootState {
        self.bootloader
            .state(&self.vars)
            .expect("the model keeps the variables valid")
    }

    /// A reboot: the bootloader picks the slot (consuming a try) and it runs.
    pub fn reboot(&mut self) -> Slot {
        self.running = self.bootloader.boot(&mut self.vars);
        self.running
    }

    /// Carries out an engine's bootloader step on the running board.
    pub fn apply(&mut self, step: Step) -> Result<(), Refused> {
        self.bootloader.apply(&mut self.vars, self.running, step)
    }

    /// The committed slot (booted when no trial is pending).
    pub fn committed(&self) -> Slot {
        self.state().committed
    }

    /// The slot armed for a trial that the next boot tries, if any.
    pub fn armed(&self) -> Option<Slot> {
        self.state()
            .trial
            .filter(|t| t.tries_left > 0)
            .map(|t| t.slot)
    }

    /// The slot the next boot starts.
    pub fn next_boot(&self) -> Slot {
        self.state().next_boot()
    }
}

/// One boot of a board whose environment is `env`: the bootloader reads it (or
/// uses its built-in default when none is readable), decides with
/// [`Bootloader::boot`], and writes back what it changed, through the same
/// backend (so those writes can crash too).
#[cfg(feature = "io")]
pub fn boot_env(env: &mut dyn crate::env::Env, bootloader: &Bootloader) -> std::io::Result<Booted> {
    let Ok(mut vars) = env.load() else {
        return Ok(Booted {
            slot: bootloader.default_slot,
            used_default_env: true,
        });
    };
    let before = vars.clone();
    let slot = bootloader.boot(&mut vars);
    if vars != before {
        env.store(&vars).map_err(std::io::Error::other)?;
    }
    Ok(Booted {
        slot,
        used_default_env: false,
    })
}

/// What [`boot_env`] did.
#[cfg(feature = "io")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Booted {
    /// The slot whose kernel and root filesystem were started.
    pub slot: Slot,
    /// Whether the environment had to be replaced by the bootloader's built-in
    /// default (no readable environment).
    pub used_default_env: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheme::MenderParts;

    #[test]
    fn shoal_boot_counts_down_then_falls_back() {
        let mut vars = Vars::new();
        vars.insert("shoal_slot".into(), "A".into());
        vars.insert("shoal_try_slot".into(), "B".into());
        vars.insert("shoal_tries".into(), "2".into());
        assert_eq!(boot_shoal(&mut vars, Slot::A), Slot::B);
        assert_eq!(vars["shoal_tries"], "1");
        assert_eq!(boot_shoal(&mut vars, Slot::A), Slot::B);
        assert_eq!(boot_shoal(&mut vars, Slot::A), Slot::A);
        assert_eq!(vars["shoal_tries"], "0");
        assert_eq!(vars["shoal_booted"], "A");
        // As the scripts: only exact values count.
        vars.insert("shoal_tries".into(), "10".into());
        assert_eq!(boot_shoal(&mut vars, Slot::A), Slot::A);
        vars.insert("shoal_tries".into(), "3".into());
        vars.insert("shoal_try_slot".into(), "b".into());
        assert_eq!(boot_shoal(&mut vars, Slot::A), Slot::A);
        assert_eq!(vars["shoal_tries"], "3");
    }

    /// The engine's steps, in both schemes: arm, a trial boot, commit; arm, a trial
    /// that does not come up, the fallback, the rollback; every step taken twice
    /// (a rerun after a power cut) changes nothing the second time.
    #[test]
    fn engine_steps_are_idempotent_in_both_schemes() {
        let mender = Scheme::Mender(MenderParts {
            part_a: 2,
            part_b: 3,
        });
        for (scheme, flavor) in [
            (Scheme::Shoal, Flavor::Uboot),
            (Scheme::Shoal, Flavor::Grub),
            (mender, Flavor::Uboot),
            (mender, Flavor::Grub),
        ] {
            let what = format!("{scheme:?} {flavor:?}");
            let mut b = Board::new(Bootloader::new(scheme, flavor), Slot::A);
            let twice = |b: &mut Board, step: Step| {
                b.apply(step).expect("step");
                let once = b.vars.clone();
                b.apply(step).expect("step again");
                assert_eq!(b.vars, once, "{step:?} taken twice changed more");
            };
            twice(&mut b, Step::Disarm(Slot::B));
            assert_eq!(b.vars, scheme.initial(flavor, Slot::A), "{what}");
            twice(&mut b, Step::Arm(Slot::B));
            assert_eq!(
                (b.armed(), b.next_boot()),
                (Some(Slot::B), Slot::B),
                "{what}"
            );
            assert_eq!(b.reboot(), Slot::B, "{what}");
            assert_eq!(b.armed(), None, "{what}: one try, consumed");
            assert_eq!(
                b.apply(Step::Arm(Slot::A)),
                Err(Refused::TrialRunning { slot: Slot::B }),
                "{what}"
            );
            twice(&mut b, Step::Commit(Slot::B));
            assert_eq!((b.committed(), b.state().trial), (Slot::B, None), "{what}");
            assert_eq!(b.reboot(), Slot::B, "{what}");

            twice(&mut b, Step::Arm(Slot::A));
            assert_eq!(b.reboot(), Slot::A, "{what}: the trial");
            // The trial kernel hangs: the watchdog resets, the bootloader falls back.
            assert_eq!(b.reboot(), Slot::B, "{what}: the fallback");
            twice(&mut b, Step::RollbackTo(Slot::B));
            assert_eq!((b.committed(), b.state().trial), (Slot::B, None), "{what}");
            assert_eq!(
                b.apply(Step::RollbackTo(Slot::A)),
                Err(Refused::NotBack {
                    committed: Slot::B,
                    to: Slot::A
                }),
                "{what}"
            );
            assert_eq!(
                b.apply(Step::Arm(Slot::B)),
                Err(Refused::ActiveSlot { slot: Slot::B }),
                "{what}"
            );
        }
    }
}
