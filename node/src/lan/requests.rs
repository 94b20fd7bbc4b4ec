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

/// The chunks this device fetches from the server now, by position, as said to the
/// peers: each chunk's position is looked up once, when it is asked for (a lookup
/// by id searches the release's table and may read the ids file), not each time
/// the peers are told.
#[derive(Debug, Default)]
struct FromServer {
    /// Chunks asked of the server, not answered yet: the request that asks for
    /// each, and its first position (`None`: not in the release).
    wan: HashMap<ChunkId, (RequestId, Option<u32>)>,
    /// Positions of the chunks the server sent that were not yet written and
    /// verified (in `have`) when the peers were last told.
    got: HashSet<u32>,
}

impl FromServer {
    /// `id`, at `position`, is asked of the server by `request`.
    fn sent(&mut self, request: RequestId, id: ChunkId, position: Option<u32>) {
        self.wan.insert(id, (request, position));
    }

    /// The server sent `id`; whether it was asked for.
    fn got(&mut self, id: &ChunkId) -> bool {
        match self.wan.remove(id) {
            Some((_, position)) => {
                self.got.extend(position);
                true
            }
            None => false,
        }
    }

    /// The server did not send `id` (unavailable, corrupt); whether it was asked
    /// for.
    fn gone(&mut self, id: &ChunkId) -> bool {
        self.wan.remove(id).is_some()
    }

    /// `request` ended without its remaining chunks; whether it had any.
    fn forget(&mut self, request: RequestId) -> bool {
        let before = self.wan.len();
        self.wan.retain(|_, (r, _)| *r != request);
        self.wan.len() != before
    }

    /// Whether a chunk the server sent may still be missing from `have`.
    fn got_any(&self) -> bool {
        !self.got.is_empty()
    }

    /// The positions (of `positions`) fetched and not in `have`; forgets the
    /// chunks sent that `have` now holds.
    fn fetching(&mut self, positions: u32, have: &Bitfield) -> Bitfield {
        self.got.retain(|&p| !have.get(p));
        Bitfield::from_members(
            positions,
            self.wan
                .values()
                .filter_map(|&(_, p)| p)
                .chain(self.got.iter().copied())
                .filter(|&p| !have.get(p)),
        )
    }
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
    /// What is fetched from the server now, by position.
    from_server: FromServer,
    /// `from_server` changed since the peers were told.
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
            from_server: FromServer::default(),
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
            Answer::Chunk(c) if self.from_server.got(&c.chunk().id) => {
                self.fetching_changed = true;
            }
            Answer::Unavailable(id) | Answer::Corrupt(id) if self.from_server.gone(id) => {
                self.fetching_changed = true;
            }
            Answer::Failed { request, .. } => self.forget_request(*request),
            _ => {}
        }
    }

    /// A request to the server ended without its remaining chunks.
    fn forget_request(&mut self, request: RequestId) {
        if self.from_server.forget(request) {
            self.fetching_changed = true;
        }
    }

    /// Tells the peers what this device fetches now, when that changed.
    fn say_fetching(&mut self) {
        if !self.fetching_changed {
            return;
        }
        self.fetching_changed = false;
        let fetching = self
            .from_server
            .fetching(self.release.positions(), &self.have);
        if fetching != self.fetching {
            self.fetching = fetching.clone();
            self.lan.fetching(fetching);
        }
    }
}

impl Requests for LanRequests {
    fn send(&mut self, request: RequestId, ids: Vec<ChunkId>) {
        for id in &ids {
            // Looked up once, here: the table's lookup reads the ids file.
            self.from_server
                .sent(request, *id, self.release.position(id));
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
            if self.from_server.got_any() {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    /// What is said to be fetched from the server: asked and not answered, or sent
    /// and not yet held; a chunk the server did not send, or a request that ended,
    /// is not.
    #[test]
    fn fetching_follows_the_server_s_answers_by_position() {
        let mut f = FromServer::default();
        let (r1, r2) = (RequestId(1), RequestId(2));
        f.sent(r1, id(1), Some(3));
        f.sent(r1, id(2), Some(5));
        f.sent(r2, id(3), Some(7));
        f.sent(r2, id(9), None);
        let mut have = Bitfield::new(10);
        let members = |b: &Bitfield| (0..10).filter(|&p| b.get(p)).collect::<Vec<_>>();
        assert_eq!(members(&f.fetching(10, &have)), [3, 5, 7]);
        assert!(f.got(&id(1)));
        assert!(!f.got(&id(1)), "answered twice");
        assert!(f.got_any());
        assert_eq!(members(&f.fetching(10, &have)), [3, 5, 7]);
        have.set(3);
        assert_eq!(members(&f.fetching(10, &have)), [5, 7]);
        assert!(!f.got_any(), "held chunks are forgotten");
        assert!(f.gone(&id(2)));
        assert!(!f.gone(&id(2)));
        assert_eq!(members(&f.fetching(10, &have)), [7]);
        assert!(f.forget(r2));
        assert!(!f.forget(r2));
        assert!(members(&f.fetching(10, &have)).is_empty());
    }
}
