//! The deployment lifecycle: offer (signature, compatibility, anti-rollback),
//! verify, arm, boot, commit, rollback. Each phase is persisted before the side
//! effect that leaves it.

use std::sync::Arc;

use shoal_artifact::{Manifest, PayloadKind};
use shoal_signing::EnvelopeRef;
use tracing::{info, warn};

use crate::error::{CommitError, InstallError, OfferError, RollbackError};
use crate::state::{
    Deployment, IndexedChunk, Outcome, Phase, Record, Slot, SlotIndex, Verdict, slot_ordinal,
};
use crate::time::Instant;

use super::release::VerifiedRelease;
use super::scheduler::{Job, SYNCS_ROOM, Step};
use super::{Boot, Engine, Event, Offer, Output, Progress};
use crate::source::SourceInfo;

/// The part of the active slot cut for an install, at least (an eighth), before
/// the engine judges whether the rest is worth cutting.
pub const INDEX_SAMPLE_PART: u64 = 8;

/// The cut of the active slot goes on when the needed chunks found in its sample
/// are at least this part (a 64th) of the bytes cut ([`Engine::index_pays`]).
pub const INDEX_FOUND_PART: u64 = 64;

impl Engine {
    /// Offers a release: verifies its signed manifest against the trust root
    /// ([`VerifiedRelease::verify`]) and goes on as [`Engine::offer_verified`].
    pub fn offer(&mut self, now: Instant, offer: Offer) -> Result<(), OfferError> {
        let release =
            VerifiedRelease::verify(&self.config.trust_root, offer.envelope, offer.wall_unix_s)?;
        self.offer_verified(now, &release, offer.sources, offer.reboot)
    }

    /// Offers a release verified already (under this engine's trust root): checks
    /// device type, depends and the anti-rollback floor, then starts (or resumes,
    /// or re-arms) the install. No signature check, no manifest decoding: the
    /// `Arc` is shared with every other engine it was offered to.
    pub fn offer_verified(
        &mut self,
        now: Instant,
        rel: &Arc<VerifiedRelease>,
        sources: Vec<SourceInfo>,
        reboot: bool,
    ) -> Result<(), OfferError> {
        if rel.root != self.config.trust_root {
            return Err(OfferError::OtherTrustRoot);
        }
        if self.job.is_some() {
            // Offered again while installing: the journal so far is where it resumes.
            self.drop_job();
        }
        let manifest = &rel.manifest;
        if !manifest.device_types.contains(&self.config.device_type) {
            return Err(OfferError::DeviceType {
                device_type: self.config.device_type.clone(),
                supported: manifest.device_types.clone(),
            });
        }
        for (key, wanted) in &manifest.depends {
            let have = self.provided(key);
            if !have.as_ref().is_some_and(|h| wanted.contains(h)) {
                return Err(OfferError::Depends {
                    key: key.to_string(),
                    wanted: wanted.clone(),
                    have,
                });
            }
        }
        if manifest.security_counter < self.state.floor {
            return Err(OfferError::BelowFloor {
                counter: manifest.security_counter,
                floor: self.state.floor,
            });
        }
        let release = rel.release.clone();

        let mut resume = false;
        if let Some(dep) = &self.state.deployment {
            match &dep.phase {
                Phase::Trial | Phase::Rebooting | Phase::RollingBack { .. } => {
                    return Err(OfferError::Busy {
                        release: dep.release.to_string(),
                        phase: dep.phase.clone(),
                    });
                }
                Phase::Verified | Phase::TrialArmed
                    if dep.release.manifest_hash == release.manifest_hash =>
                {
                    // Installed already; make sure the trial is armed (idempotent).
                    info!(release = %release, slot = %dep.target, "already installed; re-arming trial");
                    let target = dep.target;
                    self.progress = Progress {
                        total_bytes: release.payload_size,
                        resumed_bytes: release.payload_size,
                        ..Progress::default()
                    };
                    self.arm(target, reboot);
                    return Ok(());
                }
                Phase::Fetching => {
                    resume = dep.target == self.state.active.other()
                        && (dep.release.manifest_hash == release.manifest_hash
                            || stored_manifest(self.state.envelope.as_deref()).is_some_and(
                                |(old, p)| same_chunks(&old.payloads[p].chunks, &rel.table),
                            ));
                }
                Phase::Verified | Phase::TrialArmed => {}
            }
        }
        let target = self.state.active.other();
        let capacity = self.state.slot_capacity[slot_ordinal(target)];
        if release.payload_size > capacity {
            return Err(OfferError::SlotTooSmall {
                slot: target,
                need: release.payload_size,
                capacity,
            });
        }

        // Accepted. Whatever happens next, the bootloader must not try the target.
        self.outputs.push_back(Output::DisarmTrial { slot: target });
        let dep = Deployment {
            release: release.clone(),
            target,
            phase: Phase::Fetching,
        };
        // The envelope is persisted once per deployment (not with every phase).
        let envelope = rel.envelope_record();
        let same_envelope = match (&self.state.envelope, &envelope) {
            (Some(e), Some(Record::Envelope(Some(r)))) => Arc::ptr_eq(e, r) || **e == **r,
            _ => false,
        };
        if resume {
            info!(release = %release, slot = %target, done = self.state.journaled.len(), "resuming install");
            if !same_envelope || self.state.deployment.as_ref() != Some(&dep) {
                let mut records = Vec::new();
                // A release whose envelope was shed was offered for this very
                // deployment: the store holds its envelope.
                if let Some(r) = envelope {
                    if let Record::Envelope(Some(e)) = &r {
                        self.state.envelope = Some(Arc::clone(e));
                    }
                    records.push(r);
                }
                records.push(Record::Deployment(Some(dep.clone())));
                self.persist(records);
            }
        } else {
            let envelope = envelope.expect(
                "a release offered for a new deployment keeps its envelope or was stored by the driver (a held one is shed only once persisted for its own)",
            );
            // A slot that already holds this payload (a release rolled back, then
            // offered again) is not written again: it is only verified.
            let held = self.state.releases[slot_ordinal(target)]
                .as_ref()
                .is_some_and(|r| {
                    r.payload_hash == release.payload_hash && r.payload_size == release.payload_size
                });
            info!(release = %release, slot = %target, held, "starting install");
            self.state.journaled.clear();
            self.state.wan_spent_bytes = 0;
            self.state.releases[slot_ordinal(target)] = None;
            self.state.envelope = match &envelope {
                Record::Envelope(Some(e)) => Some(Arc::clone(e)),
                _ => None,
            };
            let mut records = vec![
                envelope,
                Record::Deployment(Some(dep.clone())),
                Record::ClearProgress,
                Record::WanSpent(0),
                Record::SlotRelease {
                    slot: target,
                    release: None,
                },
                Record::SlotIndex {
                    slot: target,
                    index: None,
                },
            ];
            if held {
                let n = rel.table.positions();
                self.state.journaled = (0..n).collect();
                records.push(Record::Journaled(self.state.journaled.clone()));
            }
            self.persist(records);
        }
        self.state.deployment = Some(dep);

        let chunking = manifest.chunking;
        self.release = Some(Arc::clone(rel));
        let mut job = Job::new(
            Arc::clone(rel),
            target,
            reboot,
            &self.state.journaled,
            super::budget::WanBudget::new(self.config.wan_budget_bytes, self.state.wan_spent_bytes),
        );
        // While the install runs, its journal is the job's bitfield (a bit per
        // position, not four bytes).
        self.state.journaled = Vec::new();
        let resumed_bytes = job.journal_bytes;
        self.progress = Progress {
            total_bytes: release.payload_size,
            resumed_bytes,
            ..Progress::default()
        };
        self.event(Event::Accepted {
            release,
            target,
            resumed_bytes,
        });
        self.timers.clear();
        // When every source says what it holds and some needed chunk is held by
        // none, the plan checks the slot for it before anything is written (a thin
        // artifact without its base is refused untouched): then nothing is taken
        // while the active slot is indexed (`Engine::needed_chunks`).
        let mut seen = std::collections::BTreeSet::new();
        for info in sources {
            if !seen.insert(info.id) {
                continue;
            }
            job.add(info, self.config.retry.rto_initial);
        }
        job.take_while_indexing =
            !job.holds_all_known() || job.needed_entries().all(|e| job.someone_holds(e));
        // Syncs still owed for an earlier run belong to its journal, not this one.
        self.syncing.clear();
        self.unsynced.clear();
        self.flushed = 0;
        self.job = Some(job);
        // Room for two journal batches and a few syncs, so that the first chunks
        // allocate nothing.
        self.unsynced.reserve_exact(2 * self.batch_room());
        self.syncing.reserve(SYNCS_ROOM);
        if self.index.chunking() == Some(chunking) {
            self.plan(now);
        } else {
            self.ask_index(chunking);
        }
        Ok(())
    }

    /// Asks the driver to cut the active slot with `chunking` ([`Output::IndexSlot`]).
    fn ask_index(&mut self, chunking: shoal_artifact::Chunking) {
        let active = self.state.active;
        let len = self.state.releases[slot_ordinal(active)]
            .as_ref()
            .map_or(self.state.slot_capacity[slot_ordinal(active)], |r| {
                r.payload_size
            });
        if let Some(job) = self.job.as_mut() {
            job.index_len = len;
            job.index_found = 0;
            job.index_window = (0, 0);
        }
        info!(slot = %active, len, "indexing the active slot");
        self.event(Event::Indexing { slot: active, len });
        self.outputs.push_back(Output::IndexSlot {
            slot: active,
            chunking,
            len,
        });
    }

    /// The driver cut the active slot's first `cut` bytes ([`Input::IndexProgress`]).
    /// The cut is judged by windows: the sample
    /// ([`Config::index_sample_min_bytes`](super::Config::index_sample_min_bytes),
    /// or an [`INDEX_SAMPLE_PART`]th of the slot when that is more), which says
    /// whether the slot is related at all, then each stretch of half that length
    /// after it, which says whether its related data goes on. At the end of each window the engine
    /// judges whether the rest is worth cutting ([`Engine::index_pays`]); if not,
    /// it asks the driver to stop ([`Output::StopIndex`]) and plans the install
    /// without an index, taking every chunk still needed from the sources.
    ///
    /// A resumed cut ([`Output::CutRest`]) is judged the same way, by
    /// half-windows from where it resumed: one that gives too little ends the pause
    /// on network fetches ([`Job::network_paused`]) — the slot past the stop looks
    /// unrelated again, and the network is not kept waiting for it (under a data
    /// budget that what only the network can serve would pass, the pause lasts
    /// until the cut ends or goes silent) — though with a
    /// network source open the cut goes on (each chunk it finds still saves a
    /// download; a request in flight for chunks it met is cancelled once none of
    /// its chunks is awaited, not per chunk); with none, and every
    /// chunk held locally again, it is stopped as the first cut was.
    pub(crate) fn on_index_progress(&mut self, now: Instant, slot: Slot, cut: u64) {
        let active = self.state.active;
        let Some(job) = self.job.as_mut() else { return };
        let resumed = job.cutting_rest;
        if slot != active || !(job.step == Step::Indexing || resumed) {
            return;
        }
        job.index_cut = job.index_cut.max(cut.min(job.index_len));
        if resumed {
            job.cut_heard = now;
            self.update_timers(now);
        }
        let Some(job) = self.job.as_mut() else { return };
        let sample = self
            .config
            .index_sample_min_bytes
            .max(job.index_len / INDEX_SAMPLE_PART);
        // After the sample (whether the slot is related at all), half of it:
        // where the related data ends.
        let window = if job.index_window.0 == 0 {
            sample
        } else {
            sample / 2
        };
        if cut < job.index_window.0.saturating_add(window) || cut >= job.index_len {
            return;
        }
        let gave = job.window_gave(cut);
        if self.index_pays(cut) {
            if let Some(job) = self.job.as_mut() {
                job.index_window = (cut, job.index_found);
            }
            // Under a data budget that what only the network can serve would pass,
            // bytes count more than time: the pause lasts until the cut ends (a
            // chunk fetched and then met in the slot would spend budget for
            // nothing, and could get the install refused). A budget that fits it
            // all changes nothing. Read once a window (every needed entry).
            let budget = resumed && !gave && self.job.as_ref().is_some_and(Job::budget_tight);
            if resumed && !gave && !budget {
                self.unpause_network(
                    now,
                    "the last stretch of the resumed cut held (next to) nothing",
                );
            }
            return;
        }
        let Some(job) = self.job.as_mut() else { return };
        job.index_stopped = true;
        job.end_cut(false);
        job.cut_recheck = false;
        let found = job.index_found;
        info!(
            slot = %slot,
            cut,
            found,
            "the last stretch of the active slot held (next to) nothing this release needs: indexing stopped"
        );
        self.outputs.push_back(Output::StopIndex { slot });
        self.event(Event::IndexStopped { slot, cut, found });
        if resumed {
            // Planned already: what the pause left idle is queued again.
            self.rescan(now);
        } else {
            self.plan(now);
        }
    }

    /// Resumes the cut of the active slot that was stopped ([`Output::CutRest`])
    /// when the reason for the stop no longer holds: some chunk still needed is no
    /// longer held by an open local source that says so, or a LAN peer or the WAN
    /// is open ([`Job::served_locally`], the rule of [`Engine::index_pays`]). Run
    /// at a pump after a source came, went, or said it lacks a chunk. Until the
    /// cut gives too little, ends or stops, chunks it may meet are asked of local
    /// sources only ([`Job::network_paused`]); a fetch already in flight goes on.
    pub(crate) fn cut_rest(&mut self, now: Instant) {
        let active = self.state.active;
        let Some(job) = self.job.as_mut() else { return };
        job.cut_recheck = false;
        if !job.index_stopped
            || job.cutting_rest
            || job.cut_given_up
            || job.step != Step::Fetching
            || job.needed == 0
            || job.index_cut >= job.index_len
            || job.served_locally()
        {
            return;
        }
        if job.sources.iter().all(|s| s.gone.is_some()) {
            // No source left (the artifact banned for a corrupt chunk, the stick
            // pulled out): the rest would come from the slot alone, which the
            // part cut showed unrelated. Not read for that: the install fails
            // now, saying why, and a rerun resumes it.
            info!(
                slot = %active,
                "no source is left: the stopped cut of the active slot is not resumed"
            );
            return;
        }
        let from = job.index_cut;
        info!(
            slot = %active,
            from,
            "a chunk still needed is no longer held by a local source: cutting the rest of the active slot"
        );
        self.start_cut(now, from, true);
    }

    /// Asks the driver to cut the active slot from `from` to its end
    /// ([`Output::CutRest`]), judged by half-windows from there; with `pause`,
    /// network fetches of what the cut may meet wait for it
    /// ([`Job::network_paused`]).
    pub(crate) fn start_cut(&mut self, now: Instant, from: u64, pause: bool) {
        let active = self.state.active;
        let Some(job) = self.job.as_mut() else { return };
        job.cutting_rest = true;
        job.network_paused = pause;
        if pause {
            job.pause_generation = job.generation();
        }
        job.cut_heard = now;
        job.index_cut = from;
        job.index_window = (from, job.index_found);
        let (len, chunking) = (job.index_len, job.rel.manifest.chunking);
        self.event(Event::CutResumed { slot: active, from });
        self.outputs.push_back(Output::CutRest {
            slot: active,
            chunking,
            from,
            len,
        });
    }

    /// The network fetches paused for a resumed cut go ahead (the cut goes on).
    pub(crate) fn unpause_network(&mut self, now: Instant, why: &str) {
        let Some(job) = self.job.as_mut().filter(|j| j.network_paused) else {
            return;
        };
        job.network_paused = false;
        info!(
            reason = why,
            cut = job.index_cut,
            "fetching from the network without waiting for the cut"
        );
        self.rescan(now);
    }

    /// The resumed cut told no progress for [`Config::cut_silence`](super::Config::cut_silence)
    /// (`Timer::CutSilence`: a driver whose read stalled): it is given up
    /// ([`Output::StopIndex`]) and not resumed again during this install. The
    /// fetches paused for it go ahead, and a chunk no source holds then fails the
    /// install as stuck: the install never waits for a cut that tells nothing.
    pub(crate) fn give_up_cut(&mut self, now: Instant) {
        let active = self.state.active;
        let Some(job) = self.job.as_mut().filter(|j| j.cutting_rest) else {
            return;
        };
        job.end_cut(true);
        warn!(
            slot = %active,
            cut = job.index_cut,
            "the resumed cut of the active slot told no progress: given up"
        );
        self.outputs.push_back(Output::StopIndex { slot: active });
        self.rescan(now);
    }

    /// The resumed cut reached the end of the slot ([`Input::CutRestEnded`]):
    /// what it did not meet comes from the sources.
    pub(crate) fn on_cut_rest_ended(&mut self, now: Instant, slot: Slot) {
        let active = self.state.active;
        let Some(job) = self.job.as_mut().filter(|j| j.cutting_rest) else {
            return;
        };
        if slot != active {
            return;
        }
        job.end_cut(false);
        job.index_cut = job.index_len;
        info!(%slot, found = job.index_found, "the resumed cut of the active slot ended");
        self.rescan(now);
    }

    /// Whether the cut of the active slot that the install in progress waits for is
    /// worth going on with, `cut` bytes into it (at the end of a window: see
    /// [`Input::IndexProgress`]). It is, unless all of these hold:
    /// - needed chunks may be taken as they are met (not a thin artifact, whose
    ///   lacking chunks must all be found in the slot before anything is written);
    /// - the needed chunks found (each once) since the window began are less than
    ///   an [`INDEX_FOUND_PART`]th of the bytes cut since;
    /// - every chunk still needed comes from a local source that says it holds it,
    ///   and no source of another class is open ([`SourceClass`]).
    ///
    /// The cost model: cutting the rest of the slot reads, cuts and hashes every
    /// byte of it; each needed chunk it would find saves reading that chunk from
    /// the source and decoding it. From a local source that holds the whole
    /// release (an artifact file, a USB stick), a stretch of the slot that gave
    /// less than 1/64 of its bytes in new chunks says the rest would, by the same
    /// proportion, save reading a 64th of its size from the source at the cost of
    /// reading all of it: a loss unless the source is over 64 times slower to read
    /// than the slot. With a LAN peer or the WAN among the sources, every chunk
    /// found saves a download (and data budget): the index always runs to the end.
    /// Never tuned to a kind of data: a slot of zeros gives the (one) zero chunk, a
    /// few KiB, in its first window; a slot that holds an earlier release gives a
    /// large part of each window until the release's data ends (its free space
    /// then gives nothing new). What it gives up is never a wrong write: the
    /// chunks come from the source, verified as always; what it may cost is source
    /// reads of chunks the slot holds past a window that gave nothing.
    ///
    /// The same rule judges a resumed cut ([`Output::CutRest`]) and says when
    /// a stopped one resumes: once it no longer holds.
    ///
    /// [`SourceClass`]: crate::SourceClass
    pub fn index_pays(&self, cut: u64) -> bool {
        let Some(job) = self.job.as_ref().filter(|j| j.cut_running()) else {
            return false;
        };
        !job.take_while_indexing || job.window_gave(cut) || !job.served_locally()
    }

    /// Indexes the active slot while the device is idle, so that the next install
    /// does not wait for it: with no install in progress and no index of the active
    /// slot cut with `chunking`, an [`Output::IndexSlot`]; the driver answers with
    /// [`Input::SlotIndexed`] (perhaps to an engine restored later, while still idle
    /// and on the same slot), and the index is persisted as one cut for an install
    /// is. Returns whether it asked.
    /// Not while a deployment is past fetching (its slot is verified and armed, or
    /// booting): the running slot may be about to change.
    pub fn index_idle(&mut self, _now: Instant, chunking: shoal_artifact::Chunking) -> bool {
        let settling = self
            .state
            .deployment
            .as_ref()
            .is_some_and(|d| d.phase != Phase::Fetching);
        if self.job.is_some() || settling || self.index.chunking() == Some(chunking) {
            return false;
        }
        self.ask_index(chunking);
        true
    }

    /// How the active slot's index was cut, when it has one.
    pub fn active_chunking(&self) -> Option<shoal_artifact::Chunking> {
        self.index.chunking()
    }

    /// The active slot no longer holds what its index says (the driver read back a
    /// recorded chunk and it hashed otherwise): the slot was changed outside Shoal.
    /// Its index is dropped and persisted as dropped, so nothing is taken from the
    /// slot on its word; [`Engine::index_idle`] or the next install cuts it again.
    /// Ignored while an install runs (its reads are verified chunk by chunk).
    pub fn active_slot_changed(&mut self, _now: Instant) -> bool {
        if self.job.is_some() {
            return false;
        }
        let active = self.state.active;
        tracing::warn!(slot = %active, "the active slot does not hold what its index says; dropping the index");
        self.index = super::index::ActiveIndex::default();
        self.index_partial = false;
        self.persist(vec![Record::SlotIndex {
            slot: active,
            index: None,
        }]);
        true
    }

    fn provided(&self, key: &str) -> Option<String> {
        let running = self.state.releases[slot_ordinal(self.state.active)].as_ref();
        running
            .and_then(|r| r.provides.get(key))
            .or_else(|| self.config.provides.get(key))
            .cloned()
    }

    pub(super) fn on_hashed(&mut self, slot: Slot, hash: [u8; 32]) {
        let Some(job) = self.job.as_ref() else { return };
        if job.step != Step::Hashing || slot != job.target {
            return;
        }
        let payload = &job.rel.manifest.payloads[job.rel.payload];
        if hash != payload.hash {
            let err = InstallError::VerifyFailed {
                slot,
                expected: hex(&payload.hash),
                actual: hex(&hash),
            };
            if let Some(job) = self.job.as_mut() {
                job.journaled = crate::Bitfield::new(job.rel.table.positions());
            }
            self.state.journaled.clear();
            self.persist(vec![Record::ClearProgress]);
            self.fail(err);
            return;
        }
        let Some(job) = self.take_job() else { return };
        let Some(mut dep) = self.state.deployment.clone() else {
            return;
        };
        dep.phase = Phase::Verified;
        self.state.releases[slot_ordinal(slot)] = Some(dep.release.clone());
        self.state.journaled.clear();
        self.persist(vec![
            Record::Deployment(Some(dep.clone())),
            Record::SlotRelease {
                slot,
                release: Some(dep.release.clone()),
            },
            Record::ReleaseIndex {
                slot,
                release: Arc::clone(&job.rel),
            },
            Record::ClearProgress,
        ]);
        self.state.deployment = Some(dep);
        info!(slot = %slot, "slot verified");
        self.arm(slot, job.reboot);
    }

    /// Arms the trial of a verified slot (idempotent), and reboots into it if asked.
    fn arm(&mut self, slot: Slot, reboot: bool) {
        let Some(mut dep) = self.state.deployment.clone() else {
            return;
        };
        assert!(
            self.state.releases[slot_ordinal(slot)]
                .as_ref()
                .map(|r| r.manifest_hash)
                == Some(dep.release.manifest_hash),
            "arming a slot that is not recorded as verified"
        );
        self.outputs.push_back(Output::ArmTrial { slot });
        dep.phase = Phase::TrialArmed;
        self.persist(vec![Record::Deployment(Some(dep.clone()))]);
        self.event(Event::Armed {
            release: dep.release.clone(),
            slot,
        });
        if reboot {
            dep.phase = Phase::Rebooting;
            self.persist(vec![Record::Deployment(Some(dep.clone()))]);
            self.outputs.push_back(Output::Reboot);
        }
        self.state.deployment = Some(dep);
    }

    /// Tells the engine the device has booted, and what the bootloader says. In a
    /// trial boot of the deployed slot this runs the health checks; after a trial the
    /// bootloader gave up on, it records the rollback.
    pub fn boot(&mut self, now: Instant, boot: Boot) {
        self.drop_job();
        let Some(dep) = self.state.deployment.clone() else {
            self.observe_running(now, boot.slot);
            return;
        };
        let target = dep.target;
        match &dep.phase {
            Phase::Fetching => {
                if boot.slot == target {
                    // The slot being written booted: whatever it holds now runs.
                    let reason =
                        format!("the device booted slot {target} while it was being written");
                    self.switch_active(boot.slot);
                    self.end(
                        dep,
                        Verdict::Failed { reason },
                        vec![Record::Active(boot.slot)],
                    );
                }
            }
            Phase::Verified | Phase::TrialArmed | Phase::Rebooting | Phase::Trial => {
                // A verified slot may be armed even when the store says Verified (a
                // power cut between arming and recording it).
                if boot.slot == target && boot.trial {
                    if dep.phase != Phase::Trial {
                        let mut d = dep.clone();
                        d.phase = Phase::Trial;
                        self.persist(vec![Record::Deployment(Some(d.clone()))]);
                        self.state.deployment = Some(d);
                    }
                    info!(release = %dep.release, "trial boot; running health checks");
                    self.event(Event::Checking {
                        release: dep.release.clone(),
                    });
                    self.outputs.push_back(Output::RunHealthChecks);
                } else if boot.slot == target {
                    // The bootloader already made it permanent (a commit whose store
                    // update was cut off).
                    self.finish_commit(dep);
                } else if boot.pending == Some(target) {
                    self.event(Event::TrialPending { slot: target });
                } else if dep.phase == Phase::Verified {
                    // Not armed yet: offering the release again arms it.
                } else {
                    let reason = format!(
                        "the trial boot of slot {target} did not come up; the bootloader went back to slot {}",
                        boot.slot
                    );
                    self.outputs.push_back(Output::Rollback { to: boot.slot });
                    self.end(dep, Verdict::RolledBack { reason }, Vec::new());
                }
            }
            Phase::RollingBack { reason } => {
                if boot.slot == target {
                    self.outputs
                        .push_back(Output::Rollback { to: target.other() });
                    let reason = reason.clone();
                    self.end(dep, Verdict::RolledBack { reason }, Vec::new());
                    self.outputs.push_back(Output::Reboot);
                } else {
                    let reason = reason.clone();
                    self.end(dep, Verdict::RolledBack { reason }, Vec::new());
                }
            }
        }
    }

    /// Tells the engine which slot the device runs from, outside a boot (before an
    /// install, a status, a commit). With no deployment in flight a slot other than
    /// the recorded one was switched to outside Shoal: the engine records it as the
    /// active slot (an [`Output::Persist`] of [`Record::Active`]; the active slot's
    /// index is then the store's for that slot, so a driver reloads its state) and
    /// returns `true`. A deployment in flight explains a slot change, which
    /// [`Engine::boot`] settles: nothing is recorded then.
    pub fn observe_running(&mut self, _now: Instant, running: Slot) -> bool {
        if self.state.deployment.is_some() || running == self.state.active {
            return false;
        }
        info!(slot = %running, "running from the other slot; recording it as active");
        self.switch_active(running);
        self.persist(vec![Record::Active(running)]);
        true
    }

    /// Commits the trial boot the device runs, as an operator's `commit` does: when
    /// the trial was not recorded yet (the boot check did not run), the engine
    /// records it first, without running the health checks the operator overrides.
    /// Refused, as [`Engine::commit`] is, when the device does not run the deployed
    /// slot in a trial boot.
    pub fn commit_running(&mut self, now: Instant, boot: Boot) -> Result<(), CommitError> {
        if let Some(dep) = self.state.deployment.clone()
            && dep.phase != Phase::Trial
            && matches!(
                dep.phase,
                Phase::Verified | Phase::TrialArmed | Phase::Rebooting
            )
            && boot.trial
            && boot.slot == dep.target
        {
            self.drop_job();
            let mut d = dep;
            d.phase = Phase::Trial;
            self.persist(vec![Record::Deployment(Some(d.clone()))]);
            self.state.deployment = Some(d);
        }
        self.commit(now)
    }

    fn switch_active(&mut self, slot: Slot) {
        self.state.active = slot;
        self.index = super::index::ActiveIndex::default();
        self.index_partial = false;
    }

    pub(super) fn on_health(&mut self, result: Result<(), String>) {
        let Some(dep) = self.state.deployment.clone() else {
            return;
        };
        if dep.phase != Phase::Trial {
            return;
        }
        match result {
            Ok(()) => self.finish_commit(dep),
            Err(reason) => self.start_rollback(dep, reason),
        }
    }

    /// Commits the trial boot: the bootloader keeps the slot, the floor rises.
    pub fn commit(&mut self, _now: Instant) -> Result<(), CommitError> {
        match self.state.deployment.clone() {
            Some(dep) if dep.phase == Phase::Trial => {
                self.finish_commit(dep);
                Ok(())
            }
            other => Err(CommitError::NotInTrial {
                phase: other.map(|d| d.phase),
            }),
        }
    }

    /// Rolls back the deployment in progress: in a trial boot, points the bootloader
    /// back at the other slot and reboots; before it, cancels the install.
    pub fn rollback(
        &mut self,
        _now: Instant,
        reason: impl Into<String>,
    ) -> Result<(), RollbackError> {
        let reason = reason.into();
        let Some(dep) = self.state.deployment.clone() else {
            return Err(RollbackError::NothingToRollBack);
        };
        self.drop_job();
        match dep.phase {
            Phase::Trial | Phase::RollingBack { .. } => self.start_rollback(dep, reason),
            Phase::Fetching | Phase::Verified | Phase::TrialArmed | Phase::Rebooting => {
                self.outputs
                    .push_back(Output::DisarmTrial { slot: dep.target });
                self.end(dep, Verdict::RolledBack { reason }, Vec::new());
            }
        }
        Ok(())
    }

    fn finish_commit(&mut self, dep: Deployment) {
        let slot = dep.target;
        self.outputs.push_back(Output::Commit { slot });
        let floor = self.state.floor.max(dep.release.security_counter);
        self.state.floor = floor;
        if self.state.active != slot {
            self.switch_active(slot);
            let deployed = self
                .release
                .as_ref()
                .filter(|r| r.release.manifest_hash == dep.release.manifest_hash)
                .cloned();
            // The store's index of the slot, when it holds a complete one: the
            // release's chunk list, written when the slot verified
            // (`Record::ReleaseIndex`; the slot's index was dropped when the
            // install started, and only the active slot is cut at idle time).
            let stored = self.state.indexes.as_ref().and_then(|store| {
                match store.0.chunking(slot) {
                    Ok(c) => c.map(|c| (c, Arc::clone(&store.0))),
                    Err(err) => {
                        tracing::warn!(%slot, %err, "the committed slot's index is not readable; using the manifest's chunk list");
                        None
                    }
                }
            });
            if let Some(rel) = deployed {
                // The release verified in this run: its table is the index, shared.
                self.index = super::index::ActiveIndex::release(rel);
            } else if let Some((chunking, reader)) = stored {
                self.index = super::index::ActiveIndex::stored(slot, chunking, reader);
            } else if let Some((m, p)) = stored_manifest(self.state.envelope.as_deref()) {
                let index = SlotIndex {
                    chunking: m.chunking,
                    chunks: m.payloads[p]
                        .chunk_offsets()
                        .map(|(offset, c)| IndexedChunk {
                            id: c.id,
                            offset,
                            len: c.size,
                        })
                        .collect(),
                };
                self.set_index(&index);
            }
        }
        info!(release = %dep.release, slot = %slot, floor, "committed");
        self.end(
            dep,
            Verdict::Committed,
            vec![Record::Floor(floor), Record::Active(slot)],
        );
    }

    fn start_rollback(&mut self, dep: Deployment, reason: String) {
        info!(release = %dep.release, %reason, "rolling back");
        let mut d = dep.clone();
        d.phase = Phase::RollingBack {
            reason: reason.clone(),
        };
        self.persist(vec![Record::Deployment(Some(d))]);
        self.outputs.push_back(Output::Rollback {
            to: dep.target.other(),
        });
        self.end(dep, Verdict::RolledBack { reason }, Vec::new());
        self.outputs.push_back(Output::Reboot);
    }

    /// Ends the deployment with a verdict, persisted with `records`.
    fn end(&mut self, dep: Deployment, verdict: Verdict, mut records: Vec<Record>) {
        let outcome = Outcome {
            release: dep.release.clone(),
            slot: dep.target,
            verdict: verdict.clone(),
        };
        records.extend([
            Record::Deployment(None),
            Record::Envelope(None),
            Record::WanSpent(0),
            Record::ClearProgress,
            Record::Last(outcome.clone()),
        ]);
        self.persist(records);
        self.state.deployment = None;
        self.state.envelope = None;
        self.state.wan_spent_bytes = 0;
        self.journal_bytes = 0;
        self.state.journaled.clear();
        self.state.last = Some(outcome);
        let (release, slot) = (dep.release, dep.target);
        match verdict {
            Verdict::Committed => self.event(Event::Committed { release, slot }),
            Verdict::RolledBack { reason } => self.event(Event::RolledBack {
                release,
                slot,
                reason,
            }),
            Verdict::Failed { reason } => {
                self.event(Event::Failed(InstallError::Abandoned { reason }))
            }
        }
    }
}

/// The manifest of the deployment's stored envelope (verified when it was offered)
/// and its rootfs payload index.
fn stored_manifest(envelope: Option<&[u8]>) -> Option<(Manifest, usize)> {
    let env = EnvelopeRef::from_bytes(envelope?).ok()?;
    let manifest = Manifest::from_cbor(env.signed).ok()?;
    let p = manifest
        .payloads
        .iter()
        .position(|p| p.kind == PayloadKind::RootfsImage)?;
    Some((manifest, p))
}

/// Bytes the journal `done` (positions) records for the deployment whose envelope
/// is stored.
pub(super) fn journal_bytes(envelope: Option<&[u8]>, done: &[u32]) -> u64 {
    let Some((m, p)) = stored_manifest(envelope) else {
        return 0;
    };
    let sizes = &m.payloads[p].chunks;
    done.iter()
        .filter_map(|&i| sizes.get(i as usize))
        .map(|c| u64::from(c.size))
        .sum()
}

/// Whether the chunk list `a` is the one of table `b`, position by position.
fn same_chunks(a: &[shoal_artifact::ChunkRef], b: &super::table::ChunkTable) -> bool {
    a.len() == b.positions() as usize
        && a.iter().enumerate().all(|(p, x)| {
            let e = b.entry_at(p as u32);
            x.id == b.id(e) && x.size == b.size(e)
        })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
