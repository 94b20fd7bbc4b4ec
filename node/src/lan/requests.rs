//! LAN peers as engine sources during one install.
//!
//! [`LanRequests`] wraps the server's [`Requests`] source and adds a
//! [`SourceClass::Peer`] source for each connected peer that runs the release being
//! installed (it holds every chunk) or installs it too (it holds what its
//! have-bitfield says, and is a member of the engine's swarm: rendezvous hashing
//! names one owner per chunk that fetches it from the server). Peers appear, change
//! what they hold and go away as the event loop hears of them; each change is handed
//! to the driver as an [`Answer`] the driver applies to the engine. What this device
//! asks the server for (and does not hold yet) is said to the peers, so that a peer
//! that joins late, or whose turn it would be by rendezvous hashing, leaves those
//! chunks to this device rather than pull them over the uplink a second time; what
//! members say they fetch goes to the engine ([`Answer::Fetching`]). A peer whose
//! chunk does not hash to its id is banned by the engine; [`Requests::banned`] then
//! blocks it on the LAN.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use libp2p_identity::PeerId;
use shoal_artifact::{ChunkId, VerifiedChunk};
use shoal_engine::{
    Bitfield, FetchFailure, Holds, NodeKey, RequestId, SourceClass, SourceId, SourceInfo,
    SourceKind, Swarm,
};
use tracing::{debug, info};

use super::proto::{ChunkData, State};
use super::serve::Served;
use super::{Lan, node_key};
use crate::device::{Answer, Requests};

/// The first source id given to a peer (the driver's own sources are below).
const FIRST_PEER_SOURCE: u32 = 1000;
/// How long `wait` sleeps on the server's answers before looking at the LAN again.
const SLICE: Duration = Duration::from_millis(20);
/// How long an install waits, before it plans, for the connected peers to say what
/// they do with its release: devices given the same deployment start within a poll
/// interval of each other, and a device that planned alone would fetch over the WAN
/// what its peers fetch too.
pub const JOIN_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug)]
struct Peer {
    source: SourceId,
    /// Installs the release too (a swarm member), rather than running it.
    member: bool,
    /// What it was last said to hold.
    holds: Holds,
    /// What it was last said to fetch from the server (members only).
    fetching: Option<Bitfield>,
}

/// The server plus the LAN peers that can serve the release being installed.
pub struct LanRequests {
    server: Box<dyn Requests>,
    lan: Lan,
    release: Arc<Served>,
    me: NodeKey,
    peers: HashMap<PeerId, Peer>,
    by_source: HashMap<SourceId, PeerId>,
    banned: HashSet<PeerId>,
    next: u32,
    seen: u64,
    members: Vec<PeerId>,
    tx: Sender<(SourceId, Answer)>,
    rx: Receiver<(SourceId, Answer)>,
    /// Chunk bytes received from peers.
    peer_bytes: Arc<AtomicU64>,
    /// The positions written and verified, as last said to the peers.
    have: Bitfield,
    /// Chunks asked of the server, by the request that asks for them, not answered
    /// yet.
    wan: HashMap<ChunkId, RequestId>,
    /// Chunks the server sent that are not yet written and verified (in `have`).
    got: HashSet<ChunkId>,
    /// `wan` or `got` changed since the peers were told.
    fetching_changed: bool,
    /// What the peers were last told this device fetches.
    fetching: Bitfield,
}

impl std::fmt::Debug for LanRequests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LanRequests")
            .field("peers", &self.peers.len())
            .finish_non_exhaustive()
    }
}

impl LanRequests {
    /// Starts serving `release` (being written) to the LAN and carrying requests to
    /// the peers that have it, besides `server`.
    pub fn start(lan: Lan, server: Box<dyn Requests>, release: Served) -> LanRequests {
        let positions = release.positions();
        let release = Arc::new(release);
        lan.serve_installing(Some((Arc::clone(&release), Bitfield::new(positions))));
        // Give the peers a moment to say whether they install it too.
        let start = Instant::now();
        while start.elapsed() < JOIN_WAIT {
            let states = lan.peers().snapshot();
            let all_said = states.values().all(|s| {
                s.running == Some(release.manifest)
                    || s.installing
                        .as_ref()
                        .is_some_and(|i| i.manifest == release.manifest)
            });
            if !states.is_empty() && all_said {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let (tx, rx) = channel();
        LanRequests {
            server,
            me: node_key(&lan.peer_id()),
            lan,
            release,
            peers: HashMap::new(),
            by_source: HashMap::new(),
            banned: HashSet::new(),
            next: FIRST_PEER_SOURCE,
            seen: u64::MAX,
            members: Vec::new(),
            tx,
            rx,
            peer_bytes: Arc::new(AtomicU64::new(0)),
            have: Bitfield::new(positions),
            wan: HashMap::new(),
            got: HashSet::new(),
            fetching_changed: false,
            fetching: Bitfield::new(positions),
        }
    }

    /// A counter of chunk bytes received from peers (outlives the source).
    pub fn peer_bytes(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.peer_bytes)
    }

    /// What a peer's state says it holds of this release, if anything: whether it
    /// installs it too (a swarm member), what it holds, and (a member) what it
    /// fetches from the server.
    fn holds_of(&self, state: &State) -> Option<(bool, Holds, Option<Bitfield>)> {
        if state.running == Some(self.release.manifest) {
            return Some((false, Holds::All, None));
        }
        let i = state.installing.as_ref()?;
        (i.manifest == self.release.manifest && i.positions == self.release.positions()).then(
            || {
                (
                    true,
                    Holds::Positions(i.bitfield()),
                    Some(i.fetching_bitfield()),
                )
            },
        )
    }

    /// The changes in the peers since last looked at, as answers for the driver.
    fn updates(&mut self) -> Vec<Answer> {
        let version = self.lan.peers().version();
        if version == self.seen {
            return Vec::new();
        }
        self.seen = version;
        let states = self.lan.peers().snapshot();
        let mut out = Vec::new();
        let mut wanted: BTreeMap<PeerId, (bool, Holds, Option<Bitfield>)> = BTreeMap::new();
        for (peer, state) in &states {
            if self.banned.contains(peer) {
                continue;
            }
            if let Some(h) = self.holds_of(state) {
                wanted.insert(*peer, h);
            }
        }
        // Gone (or no longer useful): removed first.
        let gone: Vec<PeerId> = self
            .peers
            .keys()
            .filter(|p| !wanted.contains_key(p))
            .copied()
            .collect();
        for p in gone {
            if let Some(peer) = self.peers.remove(&p) {
                self.by_source.remove(&peer.source);
                info!(%p, source = %peer.source, "LAN peer gone");
                out.push(Answer::Removed(peer.source));
            }
        }
        // What members fetch, said after the swarm (the engine ignores it from a
        // source that is not a member yet).
        let mut fetching_changes = Vec::new();
        for (p, (member, holds, fetching)) in wanted {
            match self.peers.get_mut(&p) {
                Some(peer) => {
                    if peer.holds != holds {
                        peer.holds = holds.clone();
                        peer.member = member;
                        out.push(Answer::Holds {
                            source: peer.source,
                            holds,
                        });
                    }
                    if peer.fetching != fetching {
                        peer.fetching = fetching.clone();
                        if let Some(f) = fetching {
                            fetching_changes.push((peer.source, f));
                        }
                    }
                }
                None => {
                    let source = SourceId(self.next);
                    self.next += 1;
                    info!(peer = %p, %source, member, "LAN peer serves this release");
                    out.push(Answer::Added(
                        SourceInfo::new(
                            source,
                            SourceKind::Requests,
                            SourceClass::Peer,
                            p.to_string(),
                        )
                        .holding(holds.clone()),
                    ));
                    self.by_source.insert(source, p);
                    if let Some(f) = &fetching {
                        fetching_changes.push((source, f.clone()));
                    }
                    self.peers.insert(
                        p,
                        Peer {
                            source,
                            member,
                            holds,
                            fetching,
                        },
                    );
                }
            }
        }
        let mut members: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, peer)| peer.member)
            .map(|(p, _)| *p)
            .collect();
        members.sort();
        if members != self.members {
            self.members = members;
            out.push(Answer::Swarm(Swarm {
                me: self.me,
                members: self
                    .members
                    .iter()
                    .map(|p| (node_key(p), self.peers[p].source))
                    .collect(),
            }));
        }
        for (source, f) in fetching_changes {
            out.push(Answer::Fetching {
                source,
                fetching: Holds::Positions(f),
            });
        }
        out
    }

    /// Notes what the server answered (chunks no longer in flight).
    fn on_server_answer(&mut self, answer: &Answer) {
        match answer {
            Answer::Chunk(c) => {
                let id = c.chunk().id;
                if self.wan.remove(&id).is_some() {
                    self.got.insert(id);
                    self.fetching_changed = true;
                }
            }
            Answer::Unavailable(id) | Answer::Corrupt(id) if self.wan.remove(id).is_some() => {
                self.fetching_changed = true;
            }
            Answer::Failed { request, .. } => self.forget_request(*request),
            _ => {}
        }
    }

    /// A request to the server ended without its remaining chunks.
    fn forget_request(&mut self, request: RequestId) {
        let before = self.wan.len();
        self.wan.retain(|_, r| *r != request);
        if self.wan.len() != before {
            self.fetching_changed = true;
        }
    }

    /// Tells the peers what this device fetches now, when that changed.
    fn say_fetching(&mut self) {
        if !self.fetching_changed {
            return;
        }
        self.fetching_changed = false;
        let have = &self.have;
        self.got.retain(|id| {
            let p = self.release.position(id);
            p.is_some_and(|p| !have.get(p))
        });
        let positions = self.release.positions();
        let fetching = Bitfield::from_members(
            positions,
            self.wan
                .keys()
                .chain(self.got.iter())
                .filter_map(|id| self.release.position(id))
                .filter(|&p| !have.get(p)),
        );
        if fetching != self.fetching {
            self.fetching = fetching.clone();
            self.lan.fetching(fetching);
        }
    }
}

impl Requests for LanRequests {
    fn send(&mut self, request: RequestId, ids: Vec<ChunkId>) {
        for id in &ids {
            self.wan.insert(*id, request);
        }
        self.fetching_changed = true;
        self.server.send(request, ids);
    }

    fn cancel(&mut self, request: RequestId) {
        self.forget_request(request);
        self.server.cancel(request);
    }

    fn carries(&self, source: SourceId) -> bool {
        self.by_source.contains_key(&source)
    }

    fn send_to(&mut self, source: SourceId, request: RequestId, ids: Vec<ChunkId>) {
        let Some(&peer) = self.by_source.get(&source) else {
            let _ = self.tx.send((
                source,
                Answer::Failed {
                    request,
                    failure: FetchFailure::DropSource,
                },
            ));
            return;
        };
        let tx = self.tx.clone();
        let bytes = Arc::clone(&self.peer_bytes);
        let asked = ids.clone();
        self.lan.chunks(
            peer,
            self.release.manifest,
            ids,
            Box::new(move |result| match result {
                Ok(chunks) => {
                    let mut later = false;
                    for (id, c) in asked.into_iter().zip(chunks) {
                        let answer = match c {
                            ChunkData::Bytes(data) => {
                                bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                                // Hashed here, off the driver's thread; the engine
                                // bans a peer whose bytes are not the chunk.
                                match VerifiedChunk::check(id, data) {
                                    Ok(chunk) => Answer::Chunk(chunk),
                                    Err(_) => Answer::Corrupt(id),
                                }
                            }
                            ChunkData::NotHere => Answer::Unavailable(id),
                            ChunkData::Later => {
                                later = true;
                                continue;
                            }
                        };
                        let _ = tx.send((source, answer));
                    }
                    if later {
                        // The peer's serving cap: the rest is asked again later
                        // (or of someone else meanwhile).
                        let _ = tx.send((
                            source,
                            Answer::Failed {
                                request,
                                failure: FetchFailure::RetryLater,
                            },
                        ));
                    }
                }
                Err(failure) => {
                    let _ = tx.send((source, Answer::Failed { request, failure }));
                }
            }),
        );
    }

    fn cancel_to(&mut self, _source: SourceId, request: RequestId) {
        // A request in flight to a peer is small and bounded by its timeout; its
        // answer is simply no longer wanted (the engine ignores chunks it has).
        debug!(%request, "peer request cancelled");
    }

    fn banned(&mut self, source: SourceId) {
        if let Some(peer) = self.by_source.remove(&source) {
            self.peers.remove(&peer);
            self.banned.insert(peer);
            self.lan.block(peer);
        }
    }

    fn journaled(&mut self, ranges: &[(u64, u64)]) {
        let have = self.release.have_of(ranges);
        if have.count() != self.have.count() {
            self.have = have.clone();
            self.lan.have(have);
            // Chunks now held are no longer said to be fetched.
            if !self.got.is_empty() {
                self.fetching_changed = true;
            }
        }
    }

    fn wait(&mut self, timeout: Duration) -> Vec<Answer> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut out = self.updates();
            while let Ok((source, answer)) = self.rx.try_recv() {
                out.push(Answer::From {
                    source,
                    answer: Box::new(answer),
                });
            }
            let now = Instant::now();
            let slice = if out.is_empty() {
                deadline.saturating_duration_since(now).min(SLICE)
            } else {
                Duration::ZERO
            };
            let server = self.server.wait(slice);
            for a in &server {
                self.on_server_answer(a);
            }
            out.extend(server);
            self.say_fetching();
            if !out.is_empty() || Instant::now() >= deadline {
                return out;
            }
        }
    }

    fn bytes_read(&self) -> u64 {
        self.server.bytes_read()
    }

    fn stop_reason(&self) -> Option<String> {
        self.server.stop_reason()
    }
}
