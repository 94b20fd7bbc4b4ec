//! [`BootControl`]: which slot runs, which boots next, and the arm / commit /
//! rollback operations, over any environment backend and either scheme.

use std::fmt;
use std::io;

use crate::Slot;
use crate::detect::{ProbeError, SystemProbe, SystemView};
use crate::env::{Env, LoadError, StoreError, Vars};
use crate::extent::Extent;
use crate::model::{Bootloader, Refused, Step};
use crate::scheme::{BootState, Flavor, Scheme, StateError, TriesError};
use crate::storage::Storage;
use crate::writer::{OpenError, SlotWriter};

/// Where the slots' bytes live.
pub trait SlotStorage: fmt::Debug + Send {
    /// Opens `slot`'s storage: exactly the slot's extent (its length is the slot's
    /// capacity). Read-only unless `writable`.
    fn open(&self, slot: Slot, writable: bool) -> io::Result<Box<dyn Storage>>;

    /// A short description of where `slot` lives, e.g. its device path.
    fn describe(&self, slot: Slot) -> String;

    /// What `slot` really is on the machine (symlinks, hard links and partitions
    /// resolved), for the overlap checks; `None` for storage that is not a file or
    /// device (in-memory test disks, whose slots never share bytes).
    fn extent(&self, _slot: Slot) -> Option<io::Result<Extent>> {
        None
    }
}

/// How [`BootControl`] determines the running slot.
#[derive(Debug, Clone)]
pub enum Detect {
    /// From the running system (kernel command line, device of `/`), which must
    /// agree with what the bootloader recorded.
    System(SystemProbe),
    /// From the bootloader's record alone (file-backed test devices). Falls back to
    /// the committed slot when the scheme records nothing.
    Bootloader,
    /// The caller knows (the simulator); still checked against the bootloader's
    /// record.
    Fixed(Slot),
}

/// Why the running slot could not be determined.
#[derive(Debug, thiserror::Error)]
pub enum ActiveError {
    /// The environment could not be read.
    #[error("cannot read the bootloader environment")]
    Load(#[from] LoadError),
    /// The environment does not hold a valid boot state.
    #[error("the bootloader environment holds no valid boot state")]
    State(#[from] StateError),
    /// The running system could not be inspected.
    #[error("cannot determine the running slot from the system")]
    Probe(#[from] ProbeError),
    /// The sources disagree about which slot runs; acting could overwrite the
    /// running system.
    #[error(
        "sources disagree about the running slot (bootloader: {}, shoal.slot=: {}, root=: {}, device of /: {})",
        show(.bootloader), show(&.system.shoal_slot_arg), show(&.system.root_arg), show(&.system.root_device)
    )]
    Disagree {
        /// What the bootloader recorded.
        bootloader: Option<Slot>,
        /// What the running system says.
        system: SystemView,
    },
    /// No source says which slot runs.
    #[error(
        "cannot tell which slot is running: no shoal.slot= or matching root= on the kernel command line, / is on neither slot, and the bootloader records nothing"
    )]
    Undetermined,
}

fn show(slot: &Option<Slot>) -> &'static str {
    slot.map_or("-", Slot::as_str)
}

/// Why the status could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The environment could not be read.
    #[error("cannot read the bootloader environment")]
    Load(#[from] LoadError),
    /// The environment does not hold a valid boot state.
    #[error("the bootloader environment holds no valid boot state")]
    State(#[from] StateError),
    /// The running slot could not be determined.
    #[error(transparent)]
    Active(#[from] ActiveError),
}

/// Why a trial could not be armed.
#[derive(Debug, thiserror::Error)]
pub enum ArmError {
    /// The environment could not be read.
    #[error("cannot read the bootloader environment")]
    Load(#[from] LoadError),
    /// The environment does not hold a valid boot state.
    #[error("the bootloader environment holds no valid boot state")]
    State(#[from] StateError),
    /// The running slot could not be determined.
    #[error(transparent)]
    Active(#[from] ActiveError),
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
    /// The environment could not be written.
    #[error("cannot write the bootloader environment")]
    Store(#[from] StoreError),
}

/// Why a trial could not be committed.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// The environment could not be read.
    #[error("cannot read the bootloader environment")]
    Load(#[from] LoadError),
    /// The environment does not hold a valid boot state.
    #[error("the bootloader environment holds no valid boot state")]
    State(#[from] StateError),
    /// The running slot could not be determined.
    #[error(transparent)]
    Active(#[from] ActiveError),
    /// No trial is armed or running.
    #[error("no trial to commit")]
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
    /// The environment could not be written.
    #[error("cannot write the bootloader environment")]
    Store(#[from] StoreError),
}

/// Why a rollback could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    /// The environment could not be read.
    #[error("cannot read the bootloader environment")]
    Load(#[from] LoadError),
    /// The environment does not hold a valid boot state.
    #[error("the bootloader environment holds no valid boot state")]
    State(#[from] StateError),
    /// No trial is armed or running, so there is nothing to return from.
    #[error("no trial to roll back")]
    NoTrial,
    /// The environment could not be written.
    #[error("cannot write the bootloader environment")]
    Store(#[from] StoreError),
}

/// Why a bootloader step of the update engine was not taken ([`BootControl::apply`]).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The environment could not be read, holds no valid state, or the running
    /// slot could not be determined.
    #[error(transparent)]
    Active(#[from] ActiveError),
    /// The model refused the step in this state.
    #[error(transparent)]
    Refused(#[from] Refused),
    /// The environment could not be written.
    #[error("cannot write the bootloader environment")]
    Store(#[from] StoreError),
}

/// Why a slot writer could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenWriterError {
    /// The running slot could not be determined, so no slot is safe to write.
    #[error(transparent)]
    Active(#[from] ActiveError),
    /// The slot asked for is the running one.
    #[error("slot {slot} is running; refusing to write it")]
    ActiveSlot {
        /// The slot asked for.
        slot: Slot,
    },
    /// The slot is armed for a trial boot; writing it would break that boot.
    #[error("slot {slot} is armed for a trial boot; roll back before writing it")]
    ArmedSlot {
        /// The slot asked for.
        slot: Slot,
    },
    /// Slot A and slot B are the same storage (a symlink, hard link, or a
    /// partition and its disk): writing one would overwrite the other.
    #[error(
        "slots A and B overlap: {a} and {b} are the same storage; refusing to write slot {slot}"
    )]
    Overlap {
        /// The slot asked for.
        slot: Slot,
        /// Slot A, as configured and as resolved.
        a: String,
        /// Slot B, as configured and as resolved.
        b: String,
    },
    /// The slot asked for holds the running root file system.
    #[error("slot {slot} ({path}) holds the running root file system; refusing to write it")]
    RunningRoot {
        /// The slot asked for.
        slot: Slot,
        /// Where it lives.
        path: String,
    },
    /// What a slot is could not be found out, so it is not known to be safe.
    #[error("cannot resolve slot {slot} ({path})")]
    Resolve {
        /// The slot.
        slot: Slot,
        /// Where it is configured.
        path: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The slot could not be opened, or the payload does not fit.
    #[error(transparent)]
    Open(#[from] OpenError),
}

/// The boot status, explained.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Status {
    /// The running slot.
    pub active: Slot,
    /// The slot the next boot starts.
    pub next_boot: Slot,
    /// The environment's boot state.
    pub state: BootState,
    /// Which environment backend, in words.
    pub env: String,
    /// `shoal` or `mender`.
    pub scheme: &'static str,
    /// Whether environment updates survive power loss.
    pub power_safe: bool,
    /// One sentence that explains the state.
    pub summary: String,
}

fn plural(n: u32) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn explain(active: Slot, state: &BootState) -> String {
    let committed = state.committed;
    match state.trial {
        None if active == committed => {
            format!("running slot {active}, which is committed and boots next")
        }
        None => format!(
            "running slot {active}, but slot {committed} is committed: the next boot returns to {committed}"
        ),
        Some(t) if t.slot == active => format!(
            "running slot {active} on trial ({} boot{} left): commit to keep it, or roll back to slot {committed}",
            t.tries_left,
            plural(t.tries_left)
        ),
        Some(t) if t.tries_left > 0 => format!(
            "running slot {active}; slot {} is armed for a trial ({} boot{}): the next boot tries it and falls back to slot {committed} if it is not committed",
            t.slot,
            t.tries_left,
            plural(t.tries_left)
        ),
        Some(t) => format!(
            "running slot {active}; the trial of slot {} used up its boots and the bootloader fell back to slot {committed}: roll back to clear it",
            t.slot
        ),
    }
}

/// Boot control over one environment, one scheme and the two slots.
#[derive(Debug)]
pub struct BootControl {
    env: Box<dyn Env>,
    scheme: Scheme,
    flavor: Flavor,
    slots: Box<dyn SlotStorage>,
    detect: Detect,
}

impl BootControl {
    /// Boot control over `env` interpreted by `scheme` with `flavor`'s bootloader
    /// semantics, slots from `slots`, running slot found by `detect`.
    pub fn new(
        env: Box<dyn Env>,
        scheme: Scheme,
        flavor: Flavor,
        slots: Box<dyn SlotStorage>,
        detect: Detect,
    ) -> BootControl {
        BootControl {
            env,
            scheme,
            flavor,
            slots,
            detect,
        }
    }

    /// The environment backend.
    pub fn env(&self) -> &dyn Env {
        &*self.env
    }

    /// The environment backend, mutably (e.g. to provision a fresh device).
    pub fn env_mut(&mut self) -> &mut dyn Env {
        &mut *self.env
    }

    /// The variable scheme.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// The bootloader semantics.
    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    /// Where the slots live.
    pub fn slots(&self) -> &dyn SlotStorage {
        &*self.slots
    }

    fn load(&self) -> Result<(Vars, BootState), ActiveError> {
        let vars = self.env.load()?;
        let state = self.scheme.decode(&vars, self.flavor)?;
        Ok((vars, state))
    }

    /// The boot state the environment holds.
    pub fn state(&self) -> Result<BootState, StatusError> {
        Ok(self.scheme.decode(&self.env.load()?, self.flavor)?)
    }

    fn active_in(&self, state: &BootState) -> Result<Slot, ActiveError> {
        let bootloader = state.booted;
        let (system, known) = match &self.detect {
            Detect::Bootloader => return Ok(bootloader.unwrap_or(state.committed)),
            Detect::Fixed(slot) => {
                let view = SystemView {
                    shoal_slot_arg: Some(*slot),
                    ..SystemView::default()
                };
                (view, Some(*slot))
            }
            Detect::System(probe) => {
                let view = probe.probe()?;
                let known = view
                    .agreed()
                    .map_err(|system| ActiveError::Disagree { bootloader, system })?;
                (view, known)
            }
        };
        match (known, bootloader) {
            (Some(s), Some(b)) if s != b => Err(ActiveError::Disagree { bootloader, system }),
            (Some(s), _) => Ok(s),
            (None, Some(b)) => Ok(b),
            (None, None) => Err(ActiveError::Undetermined),
        }
    }

    /// The running slot; refuses when the running system and the bootloader's
    /// record disagree.
    pub fn active(&self) -> Result<Slot, ActiveError> {
        let (_, state) = self.load()?;
        self.active_in(&state)
    }

    /// The running slot, the next boot, and an explanation.
    pub fn status(&self) -> Result<Status, StatusError> {
        let (_, state) = self.load()?;
        let active = self.active_in(&state)?;
        Ok(Status {
            active,
            next_boot: state.next_boot(),
            state,
            env: self.env.describe(),
            scheme: match self.scheme {
                Scheme::Shoal => "shoal",
                Scheme::Mender(_) => "mender",
            },
            power_safe: self.env.is_power_safe(),
            summary: explain(active, &state),
        })
    }

    /// Arms a trial boot of `slot` (the inactive one) for the next `tries` boots,
    /// falling back to the running slot. Only arm a slot that
    /// [`SlotWriter::verify`] accepted.
    pub fn arm(&mut self, slot: Slot, tries: u32) -> Result<BootState, ArmError> {
        let (mut vars, state) = self.load().map_err(split_active_arm)?;
        let active = self.active_in(&state)?;
        self.model()
            .arm(&mut vars, active, slot, tries)
            .map_err(|e| match e {
                Refused::ActiveSlot { slot } => ArmError::ActiveSlot { slot },
                Refused::TrialRunning { slot } => ArmError::TrialRunning { slot },
                Refused::Tries(t) => ArmError::Tries(t),
                Refused::State(e) => ArmError::State(e),
                other => unreachable!("arm does not refuse with {other:?}"),
            })?;
        self.env.store(&vars)?;
        let next = self.scheme.decode(&vars, self.flavor)?;
        tracing::info!(slot = %slot, tries, "trial boot armed");
        Ok(next)
    }

    /// Makes the running trial slot the committed one.
    pub fn commit(&mut self) -> Result<BootState, CommitError> {
        let (mut vars, state) = self.load().map_err(split_active_commit)?;
        let trial = state.trial.ok_or(CommitError::NoTrial)?;
        let active = self.active_in(&state)?;
        self.model()
            .commit(&mut vars, active)
            .map_err(|e| match e {
                Refused::TrialNotRunning { trial, active } => {
                    CommitError::TrialNotRunning { trial, active }
                }
                Refused::NoTrial => CommitError::NoTrial,
                Refused::State(e) => CommitError::State(e),
                other => unreachable!("commit does not refuse with {other:?}"),
            })?;
        self.env.store(&vars)?;
        tracing::info!(slot = %trial.slot, "trial committed");
        Ok(self.scheme.decode(&vars, self.flavor)?)
    }

    /// Cancels the armed, running or exhausted trial: the committed slot boots next.
    /// When the trial slot is running, the caller reboots afterwards.
    pub fn rollback(&mut self) -> Result<BootState, RollbackError> {
        let mut vars = self.env.load()?;
        let state = self.scheme.decode(&vars, self.flavor)?;
        let trial = state.trial.ok_or(RollbackError::NoTrial)?;
        self.model().rollback(&mut vars).map_err(|e| match e {
            Refused::NoTrial => RollbackError::NoTrial,
            Refused::State(e) => RollbackError::State(e),
            other => unreachable!("rollback does not refuse with {other:?}"),
        })?;
        self.env.store(&vars)?;
        tracing::info!(from = %trial.slot, to = %state.committed, "trial rolled back");
        Ok(self.scheme.decode(&vars, self.flavor)?)
    }

    /// The bootloader model of this environment.
    pub fn model(&self) -> Bootloader {
        Bootloader::new(self.scheme, self.flavor)
    }

    /// Carries out a bootloader step of the update engine, idempotently (the model's
    /// [`Bootloader::apply`]): the environment is written only when the step was
    /// not taken already.
    pub fn apply(&mut self, step: Step) -> Result<(), ApplyError> {
        let (mut vars, state) = self.load()?;
        // Only arming and committing depend on which slot runs: a disarm or a
        // rollback is possible even when the running slot cannot be told.
        let active = match step {
            Step::Arm(_) | Step::Commit(_) => self.active_in(&state)?,
            Step::Disarm(_) | Step::RollbackTo(_) => state.booted.unwrap_or(state.committed),
        };
        let before = vars.clone();
        self.model().apply(&mut vars, active, step)?;
        if vars != before {
            self.env.store(&vars)?;
            tracing::info!(?step, "bootloader step taken");
        }
        Ok(())
    }

    /// Opens the inactive `slot` for writing a payload of `payload_size` bytes.
    /// Refuses the running slot, a slot armed for a trial, and a payload larger than
    /// the slot.
    pub fn open_writer(
        &self,
        slot: Slot,
        payload_size: u64,
    ) -> Result<SlotWriter, OpenWriterError> {
        let (_, state) = self.load()?;
        let active = self.active_in(&state)?;
        if slot == active {
            return Err(OpenWriterError::ActiveSlot { slot });
        }
        if state
            .trial
            .is_some_and(|t| t.slot == slot && t.tries_left > 0)
        {
            return Err(OpenWriterError::ArmedSlot { slot });
        }
        self.check_target(slot)?;
        let storage = self
            .slots
            .open(slot, true)
            .map_err(|source| OpenError::Io { slot, source })?;
        Ok(SlotWriter::new(storage, slot, payload_size)?)
    }

    /// Right before a slot is opened for writing: checks again, on what the paths
    /// resolve to now, that the two slots are distinct storage, and (when the
    /// running system is probed) that `slot` does not hold the root file system.
    fn check_target(&self, slot: Slot) -> Result<(), OpenWriterError> {
        let resolve = |s: Slot| {
            self.slots.extent(s).map(|r| {
                r.map_err(|source| OpenWriterError::Resolve {
                    slot: s,
                    path: self.slots.describe(s),
                    source,
                })
            })
        };
        let (Some(a), Some(b)) = (resolve(Slot::A), resolve(Slot::B)) else {
            return Ok(());
        };
        let (a, b) = (a?, b?);
        if a.overlaps(&b) {
            let show = |s: Slot, e: &Extent| {
                format!("{} (= {})", self.slots.describe(s), e.canonical.display())
            };
            return Err(OpenWriterError::Overlap {
                slot,
                a: show(Slot::A, &a),
                b: show(Slot::B, &b),
            });
        }
        if let Detect::System(probe) = &self.detect
            && probe.root_device
        {
            let target = if slot == Slot::A { &a } else { &b };
            let root = crate::extent::root_device().map_err(|source| OpenWriterError::Resolve {
                slot,
                path: "/".into(),
                source,
            })?;
            if root.is_some_and(|r| r.overlaps(target)) {
                return Err(OpenWriterError::RunningRoot {
                    slot,
                    path: self.slots.describe(slot),
                });
            }
        }
        Ok(())
    }

    /// Opens `slot` read-only (e.g. to index or serve the running release's chunks).
    ///
    /// A slot on a block device (or a file on a file system that supports it) is
    /// read with `O_DIRECT` ([`crate::storage::FileStorage`]): the running slot's
    /// page cache is the mounted root file system's, and a journaled ext4 mounted
    /// read-only changes cached blocks it never writes, so buffered reads would
    /// return bytes that are not the installed release's.
    pub fn open_reader(&self, slot: Slot) -> io::Result<Box<dyn Storage>> {
        self.slots.open(slot, false)
    }
}

fn split_active_arm(e: ActiveError) -> ArmError {
    match e {
        ActiveError::Load(e) => ArmError::Load(e),
        ActiveError::State(e) => ArmError::State(e),
        other => ArmError::Active(other),
    }
}

fn split_active_commit(e: ActiveError) -> CommitError {
    match e {
        ActiveError::Load(e) => CommitError::Load(e),
        ActiveError::State(e) => CommitError::State(e),
        other => CommitError::Active(other),
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.summary)?;
        writeln!(f, "active:     {}", self.active)?;
        writeln!(f, "next boot:  {}", self.next_boot)?;
        writeln!(f, "committed:  {}", self.state.committed)?;
        match self.state.trial {
            Some(t) => writeln!(
                f,
                "trial:      {} ({} boot{} left)",
                t.slot,
                t.tries_left,
                plural(t.tries_left)
            )?,
            None => writeln!(f, "trial:      none")?,
        }
        writeln!(f, "scheme:     {}", self.scheme)?;
        write!(f, "env:        {}", self.env)?;
        if !self.power_safe {
            write!(
                f,
                "\nwarning:    this environment has a single copy; a power cut during an update can lose it"
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheme::MenderParts;
    use crate::testing::{Backend, CrashDisk, CrashSlots};

    fn device(scheme: Scheme, running: Slot) -> (CrashDisk, BootControl) {
        let disk = CrashDisk::new();
        disk.put("a", &[1; 4096]);
        disk.put("b", &[2; 4096]);
        let mut env = Backend::File.open(&disk);
        env.store(&scheme.initial(Flavor::File, Slot::A)).unwrap();
        let bc = BootControl::new(
            Backend::File.open(&disk),
            scheme,
            Flavor::File,
            Box::new(CrashSlots::new(&disk, "a", "b")),
            Detect::Fixed(running),
        );
        (disk, bc)
    }

    #[test]
    fn writer_refuses_active_armed_and_oversized() {
        let (_disk, mut bc) = device(Scheme::Shoal, Slot::A);
        assert!(matches!(
            bc.open_writer(Slot::A, 10),
            Err(OpenWriterError::ActiveSlot { slot: Slot::A })
        ));
        assert!(matches!(
            bc.open_writer(Slot::B, 4097),
            Err(OpenWriterError::Open(OpenError::TooLarge {
                payload: 4097,
                capacity: 4096,
                ..
            }))
        ));
        let w = bc.open_writer(Slot::B, 4096).unwrap();
        assert_eq!((w.slot(), w.payload_size()), (Slot::B, 4096));
        bc.arm(Slot::B, 1).unwrap();
        assert!(matches!(
            bc.open_writer(Slot::B, 10),
            Err(OpenWriterError::ArmedSlot { slot: Slot::B })
        ));
    }

    #[test]
    fn arm_commit_rollback_preconditions() {
        let (_disk, mut bc) = device(Scheme::Shoal, Slot::A);
        assert!(matches!(
            bc.arm(Slot::A, 1),
            Err(ArmError::ActiveSlot { slot: Slot::A })
        ));
        assert!(matches!(
            bc.arm(Slot::B, 0),
            Err(ArmError::Tries(TriesError { tries: 0, max: 9 }))
        ));
        assert!(matches!(bc.commit(), Err(CommitError::NoTrial)));
        assert!(matches!(bc.rollback(), Err(RollbackError::NoTrial)));
        let state = bc.arm(Slot::B, 2).unwrap();
        assert_eq!(state.next_boot(), Slot::B);
        assert!(matches!(
            bc.commit(),
            Err(CommitError::TrialNotRunning {
                trial: Slot::B,
                active: Slot::A
            })
        ));
        let status = bc.status().unwrap();
        assert!(
            status
                .summary
                .contains("slot B is armed for a trial (2 boots)"),
            "{}",
            status.summary
        );
        let state = bc.rollback().unwrap();
        assert_eq!((state.committed, state.trial), (Slot::A, None));
    }

    #[test]
    fn running_trial_cannot_arm_and_disagreement_is_refused() {
        let (disk, mut bc) = device(Scheme::Shoal, Slot::A);
        bc.arm(Slot::B, 1).unwrap();
        let mut env = Backend::File.open(&disk);
        let boot = crate::model::boot_env(
            &mut *env,
            &crate::model::Bootloader::new(Scheme::Shoal, Flavor::File),
        )
        .unwrap();
        assert_eq!(boot.slot, Slot::B);
        // Still told "A runs": the bootloader's record says B.
        assert!(matches!(
            bc.status(),
            Err(StatusError::Active(ActiveError::Disagree {
                bootloader: Some(Slot::B),
                ..
            }))
        ));
        let mut on_b = BootControl::new(
            Backend::File.open(&disk),
            Scheme::Shoal,
            Flavor::File,
            Box::new(CrashSlots::new(&disk, "a", "b")),
            Detect::Fixed(Slot::B),
        );
        assert!(matches!(
            on_b.arm(Slot::A, 1),
            Err(ArmError::TrialRunning { slot: Slot::B })
        ));
        assert!(
            on_b.status()
                .unwrap()
                .summary
                .contains("on trial (0 boots left)")
        );
        assert_eq!(on_b.commit().unwrap().committed, Slot::B);
    }

    #[test]
    fn mender_status_and_bootloader_detection() {
        let parts = Scheme::Mender(MenderParts {
            part_a: 2,
            part_b: 3,
        });
        let (disk, mut bc) = device(parts, Slot::A);
        bc.arm(Slot::B, 1).unwrap();
        let by_record = BootControl::new(
            Backend::File.open(&disk),
            parts,
            Flavor::File,
            Box::new(CrashSlots::new(&disk, "a", "b")),
            Detect::Bootloader,
        );
        // Armed, bootcount 0: the record says the committed slot runs.
        assert_eq!(by_record.active().unwrap(), Slot::A);
        let s = by_record.status().unwrap();
        assert_eq!(
            (s.scheme, s.next_boot, s.power_safe),
            ("mender", Slot::B, true)
        );
    }
}
