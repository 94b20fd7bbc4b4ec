//! LAN peers over libp2p: devices on one site share chunks, so each chunk crosses
//! the site's uplink about once.
//!
//! The layout follows rust-libp2p's `examples/file-sharing`: one
//! [`#[derive(NetworkBehaviour)]`](Behaviour) (TCP + Noise + Yamux, and QUIC with
//! the `quic` feature; mDNS, identify, connection limits, a block list and three
//! request-response protocols, see [`proto`]), driven by an [`EventLoop`] on a
//! thread of its own (a current-thread tokio runtime); the rest of the daemon talks
//! to it through the [`Lan`] handle over a bounded command channel, and reads the
//! peers' last known state from a shared table.
//!
//! The libp2p code only carries messages. Which peer is asked for which chunk, when
//! to fall back to the server, and whom to ban are the engine's decisions
//! ([`shoal_engine::Engine::set_swarm`], bans on a bad chunk); [`requests`] turns the
//! peers into engine sources. The device key (`data_dir/device-key.pem`, the one
//! the daemon signs in to the server with) is the peer id.

pub mod member;
pub use shoal_node::peer_wire as proto;
pub mod requests;
pub mod serve;
#[cfg(test)]
pub(crate) mod tests;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use futures_util::StreamExt;
use libp2p_core::upgrade::Version;
use libp2p_core::{Multiaddr, Transport as _};
use libp2p_identity::PeerId;
use libp2p_request_response::{
    self as request_response, OutboundRequestId, ProtocolSupport, ResponseChannel,
};
use libp2p_swarm::Swarm;
use libp2p_swarm::behaviour::toggle::Toggle;
use libp2p_swarm::{NetworkBehaviour, SwarmEvent};
use shoal_artifact::ChunkId;
use shoal_bootctl::BootControl;
use shoal_engine::{Bitfield, FetchFailure};
use shoal_signing::SecretKey;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use {libp2p_allow_block_list as allow_block_list, libp2p_connection_limits as connection_limits};
use {libp2p_identify as identify, libp2p_mdns as mdns};

use proto::{
    ChunkData, ChunkRequest, ChunkResponse, Codec, DictionaryRequest, DictionaryResponse,
    Installing, ManifestId, ManifestRequest, ManifestResponse, State,
};
use serve::Served;

/// The fleet credential the server issued last, in `data_dir`.
pub const CREDENTIAL_FILE: &str = "fleet-credential";
/// Commands waiting for the event loop at most.
const COMMANDS_MAX: usize = 256;
/// How often unreachable static peers are dialled again.
const REDIAL: Duration = Duration::from_secs(3);
/// Inbound requests one peer may have open at once (per protocol).
const STREAMS_MAX: usize = 16;

/// The behaviour: every protocol the LAN layer speaks.
#[derive(NetworkBehaviour)]
#[behaviour(prelude = "libp2p_swarm::derive_prelude")]
pub struct Behaviour {
    limits: connection_limits::Behaviour,
    blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    identify: identify::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    state: request_response::Behaviour<Codec<State, State>>,
    manifest: request_response::Behaviour<Codec<ManifestRequest, ManifestResponse>>,
    chunk: request_response::Behaviour<Codec<ChunkRequest, ChunkResponse>>,
    dictionary: request_response::Behaviour<Codec<DictionaryRequest, DictionaryResponse>>,
}

impl std::fmt::Debug for Behaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Behaviour").finish_non_exhaustive()
    }
}

/// How a chunk request to a peer came out.
pub type ChunkReply = Box<dyn FnOnce(Result<Vec<ChunkData>, FetchFailure>) + Send>;

/// What the daemon asks of the event loop.
enum Command {
    /// The release this device runs (served whole).
    Running(Option<Arc<Served>>),
    /// The release this device installs, and the positions written and verified.
    Installing(Option<(Arc<Served>, Bitfield)>),
    /// The positions of the installing release now written and verified.
    Have(Bitfield),
    /// The positions of the installing release now asked of the server and not
    /// held yet.
    Fetching(Bitfield),
    /// Every position of the installing release is written and verified.
    HaveAll,
    /// Asks `peer` for chunks of `manifest`.
    Chunks {
        peer: PeerId,
        manifest: ManifestId,
        ids: Vec<ChunkId>,
        reply: ChunkReply,
    },
    /// Asks `peer` for the signed manifest envelope of `manifest`.
    Manifest {
        peer: PeerId,
        manifest: ManifestId,
        reply: ManifestReply,
    },
    /// Asks `peer` for the zstd dictionary `zstd_id` of `manifest`'s chunks.
    Dictionary {
        peer: PeerId,
        manifest: ManifestId,
        zstd_id: u32,
        reply: DictionaryReply,
    },
    /// Closes and refuses every connection of `peer` (it sent a bad chunk).
    Block(PeerId),
    /// The devices the server sees behind this device's public address, with
    /// where they listen: dialled like static peers (for sites without mDNS).
    ServerPeers(Vec<(PeerId, Vec<Multiaddr>)>),
    /// A credential the server issued, and the keys it says are revoked.
    Credential {
        credential: Vec<u8>,
        revoked: HashSet<[u8; 32]>,
    },
}

/// How a manifest request to a peer came out: the envelope, or why not.
pub type ManifestReply = Box<dyn FnOnce(Result<Vec<u8>, String>) + Send>;

/// How a dictionary request to a peer came out: its bytes, `None` when the peer
/// does not have it (yet), or why it failed.
pub type DictionaryReply = Box<dyn FnOnce(Result<Option<Vec<u8>>, String>) + Send>;

/// The peers' state, as last said, for the daemon to read.
#[derive(Debug, Default)]
pub struct Peers {
    states: Mutex<HashMap<PeerId, State>>,
    version: AtomicU64,
}

impl Peers {
    /// A copy of every connected peer's last state.
    pub fn snapshot(&self) -> HashMap<PeerId, State> {
        self.states.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Bumped on every change.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    fn set(&self, peer: PeerId, state: Option<State>) {
        if let Ok(mut s) = self.states.lock() {
            let changed = match state {
                Some(state) => s.insert(peer, state.clone()).as_ref() != Some(&state),
                None => s.remove(&peer).is_some(),
            };
            if changed {
                self.version.fetch_add(1, Ordering::AcqRel);
            }
        }
    }
}

/// The daemon's handle on its LAN.
#[derive(Clone)]
pub struct Lan {
    commands: mpsc::Sender<Command>,
    peers: Arc<Peers>,
    me: PeerId,
    data_dir: PathBuf,
    listening: Arc<Mutex<Vec<Multiaddr>>>,
}

impl std::fmt::Debug for Lan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lan")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

/// The libp2p identity of a device key (the same ed25519 key).
pub fn keypair(key: &SecretKey) -> anyhow::Result<libp2p_identity::Keypair> {
    libp2p_identity::Keypair::ed25519_from_bytes(key.to_seed())
        .map_err(|e| anyhow!("the device key is not a valid ed25519 key: {e}"))
}

/// The engine's name for a peer (rendezvous hashing): BLAKE3 of its peer id.
pub fn node_key(peer: &PeerId) -> shoal_engine::NodeKey {
    shoal_engine::NodeKey(*blake3::hash(&peer.to_bytes()).as_bytes())
}

impl Lan {
    /// Joins the LAN as `config.lan` says, with the device key as peer id: listens,
    /// starts mDNS, dials the static peers. The event loop runs on a thread of its
    /// own until the process ends.
    pub fn start(config: &crate::config::Config, key: &SecretKey) -> anyhow::Result<Lan> {
        let lan = &config.lan;
        let keypair = keypair(key)?;
        let me = keypair.public().to_peer_id();
        let signed = shoal_signing::SignedRoot::load(&config.device.trust_root).map_err(|e| {
            crate::cmd::Exit::usage(format!("device.trust_root: {}", crate::cmd::chain(&e)))
        })?;
        // Without `[lan] credential`, the one the server issued last (saved by the
        // daemon) is shown until it is renewed.
        let mut settings_for_member = lan.clone();
        let saved = config.device.data_dir.join(CREDENTIAL_FILE);
        if settings_for_member.credential.is_none() && saved.exists() {
            settings_for_member.credential = Some(saved);
        }
        let membership = member::Membership::load(
            &settings_for_member,
            &signed.root,
            key,
            crate::device::wall_clock(),
        )?;
        let membership_closed = membership.closed();
        let boot = serve::open_slots(config)?;
        let listen = listen_addresses(lan)
            .map_err(|e| crate::cmd::Exit::usage(format!("lan.listen: {e}")))?;
        let static_peers: Vec<Multiaddr> = lan
            .static_peers
            .iter()
            .map(|a| a.parse())
            .collect::<Result<_, _>>()
            .map_err(|e| crate::cmd::Exit::usage(format!("lan.static_peers: {e}")))?;
        let (tx, rx) = mpsc::channel(COMMANDS_MAX);
        let peers = Arc::new(Peers::default());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let settings = lan.clone();
        let shared = Arc::clone(&peers);
        let data_dir = config.device.data_dir.clone();
        let dir = data_dir.clone();
        let listening: Arc<Mutex<Vec<Multiaddr>>> = Arc::default();
        let listening_loop = Arc::clone(&listening);
        std::thread::Builder::new()
            .name("shoal-lan".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow!("cannot start the LAN runtime: {e}")));
                        return;
                    }
                };
                rt.block_on(async move {
                    let swarm = match build_swarm(keypair, &settings) {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let mut ev = EventLoop::new(
                        swarm,
                        rx,
                        shared,
                        boot,
                        &settings,
                        Local {
                            static_peers,
                            data_dir: dir,
                            membership,
                            listening: listening_loop,
                        },
                    );
                    for addr in listen {
                        if let Err(e) = ev.swarm.listen_on(addr.clone()) {
                            let _ = ready_tx.send(Err(anyhow!("cannot listen on {addr}: {e}")));
                            return;
                        }
                    }
                    let _ = ready_tx.send(Ok(()));
                    ev.run().await;
                });
            })
            .context("cannot start the LAN thread")?;
        ready_rx
            .recv()
            .map_err(|_| anyhow!("the LAN thread ended before it started"))??;
        info!(peer = %me, closed_fleet = membership_closed, "joined the LAN");
        Ok(Lan {
            commands: tx,
            peers,
            me,
            data_dir,
            listening,
        })
    }

    /// This device's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.me
    }

    /// Where this device listens for LAN peers (without the `/p2p` part), as
    /// the swarm reported so far.
    pub fn listening(&self) -> Vec<Multiaddr> {
        self.listening.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Dials (and keeps dialling while not connected) the devices the server
    /// sees behind this device's public address; replaces the previous list.
    pub fn server_peers(&self, peers: Vec<(PeerId, Vec<Multiaddr>)>) {
        self.send(Command::ServerPeers(peers));
    }

    /// The peers' last state.
    pub fn peers(&self) -> &Arc<Peers> {
        &self.peers
    }

    fn send(&self, command: Command) {
        if self.commands.blocking_send(command).is_err() {
            warn!("the LAN event loop has ended");
        }
    }

    fn keep(&self, s: &Served) {
        // A kept manifest served from its own file is kept already.
        if matches!(&s.envelope, serve::EnvelopeAt::File { path, .. } if *path == serve::envelope_path(&self.data_dir, &s.manifest))
        {
            return;
        }
        if let Err(e) = s
            .envelope
            .open()
            .and_then(|r| serve::save_envelope(&self.data_dir, &s.manifest, r))
        {
            warn!(error = %format!("{e:#}"), "cannot keep the manifest for peers");
        }
    }

    /// Serves `running` whole (every chunk, from the running slot) and says so to
    /// every peer.
    pub fn serve_running(&self, running: Option<Arc<Served>>) {
        if let Some(s) = &running {
            self.keep(s);
        }
        self.send(Command::Running(running));
    }

    /// Serves the positions `have` of `installing` (from the slot being written) and
    /// says so to every peer. Its envelope is kept in `data_dir`, so the release is
    /// served again after the reboot into it.
    pub fn serve_installing(&self, installing: Option<(Arc<Served>, Bitfield)>) {
        if let Some((s, _)) = &installing {
            self.keep(s);
        }
        self.send(Command::Installing(installing));
    }

    /// The installing release's written and verified positions changed.
    pub fn have(&self, have: Bitfield) {
        self.send(Command::Have(have));
    }

    /// The installing release's positions asked of the server and not held yet
    /// changed (the peers leave those chunks to this device).
    pub fn fetching(&self, fetching: Bitfield) {
        self.send(Command::Fetching(fetching));
    }

    /// The installing release is written and verified whole.
    pub fn have_all(&self) {
        self.send(Command::HaveAll);
    }

    /// Asks `peer` for chunks; `reply` is called once with the outcome.
    pub fn chunks(&self, peer: PeerId, manifest: ManifestId, ids: Vec<ChunkId>, reply: ChunkReply) {
        self.send(Command::Chunks {
            peer,
            manifest,
            ids,
            reply,
        });
    }

    /// Asks `peer` for the signed manifest envelope of `manifest` and waits up to
    /// `timeout` for it. The bytes are the peer's word only: the caller verifies
    /// them against the trust root and checks they are `manifest`.
    pub fn manifest(
        &self,
        peer: PeerId,
        manifest: ManifestId,
        timeout: Duration,
    ) -> Result<Vec<u8>, String> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.send(Command::Manifest {
            peer,
            manifest,
            reply: Box::new(move |r| {
                let _ = tx.send(r);
            }),
        });
        rx.recv_timeout(timeout)
            .unwrap_or_else(|_| Err("the peer did not answer in time".into()))
    }

    /// Asks `peer` for the zstd dictionary `zstd_id` the chunks of `manifest` were
    /// compressed with, waiting up to `timeout`: its bytes (the peer's word only:
    /// the caller checks them), `Ok(None)` when the peer does not have it.
    pub fn dictionary(
        &self,
        peer: PeerId,
        manifest: ManifestId,
        zstd_id: u32,
        timeout: Duration,
    ) -> Result<Option<Vec<u8>>, String> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.send(Command::Dictionary {
            peer,
            manifest,
            zstd_id,
            reply: Box::new(move |r| {
                let _ = tx.send(r);
            }),
        });
        rx.recv_timeout(timeout)
            .unwrap_or_else(|_| Err("the peer did not answer in time".into()))
    }

    /// Shows `credential` (issued by the server) to peers from now on, when it
    /// verifies, and refuses the `revoked` keys; every peer is told at once.
    pub fn renew_credential(&self, credential: Vec<u8>, revoked: HashSet<[u8; 32]>) {
        self.send(Command::Credential {
            credential,
            revoked,
        });
    }

    /// Refuses `peer` from now on (it sent a chunk that does not hash to its id).
    pub fn block(&self, peer: PeerId) {
        self.block_because(peer, "it sent a corrupt chunk");
    }

    /// Refuses `peer` from now on, for the reason given (logged).
    pub fn block_because(&self, peer: PeerId, why: &str) {
        warn!(%peer, "blocking a peer: {why}");
        self.send(Command::Block(peer));
    }
}

/// Where the LAN layer listens, as `[lan]` says: `listen`, and with `quic` also a
/// QUIC twin of each plain TCP address (`/ip4/A/tcp/P` -> `/ip4/A/udp/P/quic-v1`)
/// that is not listed already.
pub fn listen_addresses(
    lan: &crate::config::Lan,
) -> Result<Vec<Multiaddr>, libp2p_core::multiaddr::Error> {
    use libp2p_core::multiaddr::Protocol;
    let listed: Vec<Multiaddr> = lan
        .listen
        .iter()
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let mut all = listed.clone();
    if lan.quic {
        for addr in &listed {
            let parts: Vec<Protocol> = addr.iter().collect();
            let twin = match parts.as_slice() {
                [
                    ip @ (Protocol::Ip4(_) | Protocol::Ip6(_)),
                    Protocol::Tcp(port),
                ] => Multiaddr::empty()
                    .with(ip.clone())
                    .with(Protocol::Udp(*port))
                    .with(Protocol::QuicV1),
                _ => continue,
            };
            if !all.contains(&twin) {
                all.push(twin);
            }
        }
    }
    Ok(all)
}

fn build_swarm(
    keypair: libp2p_identity::Keypair,
    lan: &crate::config::Lan,
) -> anyhow::Result<Swarm<Behaviour>> {
    let timeout = Duration::from_secs(lan.request_timeout_s);
    let rr = || {
        request_response::Config::default()
            .with_request_timeout(timeout)
            .with_max_concurrent_streams(STREAMS_MAX)
    };
    let me = keypair.public().to_peer_id();
    let mdns = if lan.mdns {
        let cfg = mdns::Config {
            query_interval: Duration::from_secs(lan.mdns_query_interval_s),
            ..Default::default()
        };
        Some(mdns::tokio::Behaviour::new(cfg, me).context("cannot start mDNS")?)
    } else {
        None
    };
    let connections_max = lan.connections_max;
    let behaviour = Behaviour {
        limits: connection_limits::Behaviour::new(
            connection_limits::ConnectionLimits::default()
                .with_max_established(Some(connections_max))
                .with_max_pending_incoming(Some(connections_max))
                .with_max_established_per_peer(Some(4)),
        ),
        blocked: allow_block_list::Behaviour::default(),
        identify: identify::Behaviour::new(identify::Config::new(
            "/shoal/id/1".into(),
            keypair.public(),
        )),
        mdns: mdns.into(),
        state: request_response::Behaviour::with_codec(
            Codec::new(proto::STATE_BYTES_MAX, proto::STATE_BYTES_MAX),
            [
                (proto::STATE, ProtocolSupport::Full),
                (proto::STATE_V1, ProtocolSupport::Full),
            ],
            rr(),
        ),
        manifest: request_response::Behaviour::with_codec(
            Codec::new(proto::MANIFEST_REQUEST_BYTES_MAX, proto::ENVELOPE_BYTES_MAX),
            [(proto::MANIFEST, ProtocolSupport::Full)],
            rr(),
        ),
        chunk: request_response::Behaviour::with_codec(
            Codec::new(
                proto::CHUNK_REQUEST_BYTES_MAX,
                proto::CHUNK_RESPONSE_BYTES_MAX,
            ),
            [(proto::CHUNK, ProtocolSupport::Full)],
            rr(),
        ),
        dictionary: request_response::Behaviour::with_codec(
            Codec::new(
                proto::DICTIONARY_REQUEST_BYTES_MAX,
                proto::DICTIONARY_RESPONSE_BYTES_MAX,
            ),
            [(proto::DICTIONARY, ProtocolSupport::Full)],
            rr(),
        ),
    };
    let noise =
        libp2p_noise::Config::new(&keypair).map_err(|e| anyhow!("cannot set up Noise: {e}"))?;
    let transport = libp2p_tcp::tokio::Transport::new(libp2p_tcp::Config::default().nodelay(true))
        .upgrade(Version::V1Lazy)
        .authenticate(noise)
        .multiplex(libp2p_yamux::Config::default())
        .boxed();
    // QUIC besides TCP: TLS 1.3 (libp2p-tls on rustls/ring) and QUIC's own streams
    // instead of Noise and Yamux; the same peer ids, so the block list, the
    // connection limits and the fleet check see no difference.
    #[cfg(feature = "quic")]
    let transport = if lan.quic {
        use futures_util::future::Either;
        use libp2p_core::muxing::StreamMuxerBox;
        let quic = libp2p_quic::tokio::Transport::new(libp2p_quic::Config::new(&keypair));
        transport
            .or_transport(quic)
            .map(|either, _| match either {
                Either::Left(tcp) => tcp,
                Either::Right((peer, connection)) => (peer, StreamMuxerBox::new(connection)),
            })
            .boxed()
    } else {
        transport
    };
    let config = libp2p_swarm::Config::with_tokio_executor()
        .with_idle_connection_timeout(Duration::from_secs(600));
    Ok(Swarm::new(transport, behaviour, me, config))
}

/// What the event loop is given of this device besides its `[lan]` table.
struct Local {
    static_peers: Vec<Multiaddr>,
    data_dir: PathBuf,
    membership: member::Membership,
    listening: Arc<Mutex<Vec<Multiaddr>>>,
}

/// Serving limits of one peer: a token bucket of chunk bytes.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The event loop: owns the swarm, carries out [`Command`]s, answers peers.
struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    peers: Arc<Peers>,
    boot: Arc<Mutex<BootControl>>,
    running: Option<Arc<Served>>,
    installing: Option<(Arc<Served>, Bitfield)>,
    /// Of the installing release, the positions asked of the server and not held.
    fetching: Bitfield,
    pending_chunks: HashMap<OutboundRequestId, (usize, ChunkReply)>,
    pending_manifests: HashMap<OutboundRequestId, ManifestReply>,
    pending_dictionaries: HashMap<OutboundRequestId, DictionaryReply>,
    static_peers: Vec<Multiaddr>,
    /// Devices behind the same public address, as the server said last.
    server_peers: Vec<(PeerId, Vec<Multiaddr>)>,
    /// Where we listen (no `/p2p` part), shared with the daemon's handle.
    listening: Arc<Mutex<Vec<Multiaddr>>>,
    /// Remote addresses of connections we dialled, with their count.
    dialled: HashMap<Multiaddr, u32>,
    /// Peers mDNS found (until their record expires), dialled again while not
    /// connected: a dial that fails (a lost handshake on a busy link) is not
    /// followed by another discovery of the same peer.
    discovered: HashMap<PeerId, Multiaddr>,
    connected: HashSet<PeerId>,
    served_tx: mpsc::Sender<(PeerId, u64, ResponseChannel<ChunkResponse>, ChunkResponse)>,
    served_rx: mpsc::Receiver<(PeerId, u64, ResponseChannel<ChunkResponse>, ChunkResponse)>,
    /// Manifest answers read off the loop (a file read), to send.
    manifest_tx: mpsc::Sender<(ResponseChannel<ManifestResponse>, ManifestResponse)>,
    manifest_rx: mpsc::Receiver<(ResponseChannel<ManifestResponse>, ManifestResponse)>,
    /// Held while an envelope is read for a peer.
    manifest_reads: Arc<Mutex<()>>,
    buckets: HashMap<PeerId, Bucket>,
    rate: f64,
    data_dir: PathBuf,
    listen_addrs: Vec<Multiaddr>,
    /// Who is served.
    membership: member::Membership,
    /// Connected peers whose credential was checked and admitted.
    admitted: HashSet<PeerId>,
    /// Refused peers already logged.
    refused_logged: HashSet<PeerId>,
}

impl EventLoop {
    fn new(
        swarm: Swarm<Behaviour>,
        commands: mpsc::Receiver<Command>,
        peers: Arc<Peers>,
        boot: BootControl,
        lan: &crate::config::Lan,
        local: Local,
    ) -> EventLoop {
        let Local {
            static_peers,
            data_dir,
            membership,
            listening,
        } = local;
        let (served_tx, served_rx) = mpsc::channel(COMMANDS_MAX);
        let (manifest_tx, manifest_rx) = mpsc::channel(COMMANDS_MAX);
        EventLoop {
            swarm,
            commands,
            peers,
            boot: Arc::new(Mutex::new(boot)),
            running: None,
            installing: None,
            fetching: Bitfield::new(0),
            pending_chunks: HashMap::new(),
            pending_manifests: HashMap::new(),
            pending_dictionaries: HashMap::new(),
            static_peers,
            server_peers: Vec::new(),
            listening,
            dialled: HashMap::new(),
            discovered: HashMap::new(),
            connected: HashSet::new(),
            served_tx,
            served_rx,
            manifest_tx,
            manifest_rx,
            manifest_reads: Arc::new(Mutex::new(())),
            buckets: HashMap::new(),
            rate: (lan.serve_rate_kib_s * 1024) as f64,
            membership,
            admitted: HashSet::new(),
            refused_logged: HashSet::new(),
            data_dir,
            listen_addrs: Vec::new(),
        }
    }

    async fn run(mut self) {
        let mut redial = tokio::time::interval(REDIAL);
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm(event),
                command = self.commands.recv() => match command {
                    Some(c) => self.on_command(c),
                    // Every handle is gone: the daemon ended.
                    None => return,
                },
                Some((peer, bytes, channel, response)) = self.served_rx.recv() => {
                    self.spend(peer, bytes);
                    let _ = self.swarm.behaviour_mut().chunk.send_response(channel, response);
                }
                Some((channel, answer)) = self.manifest_rx.recv() => {
                    let _ = self.swarm.behaviour_mut().manifest.send_response(channel, answer);
                }
                _ = redial.tick() => self.redial(),
            }
        }
    }

    fn state(&self) -> State {
        State {
            running: self.running.as_ref().map(|s| s.manifest),
            installing: self.installing.as_ref().map(|(s, have)| {
                #[cfg(feature = "test-peer-faults")]
                let empty = serve::test_advertised(have);
                #[cfg(feature = "test-peer-faults")]
                let have = empty.as_ref().unwrap_or(have);
                let i = Installing::new(s.manifest, have);
                if self.fetching.len() == have.len() && self.fetching.count() > 0 {
                    i.fetching(&self.fetching)
                } else {
                    i
                }
            }),
            credential: self.credential(),
        }
    }

    fn credential(&self) -> Option<serde_bytes::ByteBuf> {
        self.membership
            .credential()
            .map(|c| serde_bytes::ByteBuf::from(c.to_vec()))
    }

    /// A peer's state: recorded when its credential admits it. Returns whether
    /// it is admitted.
    fn on_state(&mut self, peer: PeerId, state: State) -> bool {
        let verdict = self.membership.admit(
            &peer,
            state.credential.as_deref().map(|c| &c[..]),
            crate::device::wall_clock(),
        );
        match verdict {
            Ok(()) => {
                self.admitted.insert(peer);
                self.peers.set(peer, Some(state));
                true
            }
            Err(e) => {
                if self.admitted.remove(&peer) || self.refused_logged.insert(peer) {
                    info!(%peer, reason = %e, "not serving a peer outside the fleet");
                }
                self.peers.set(peer, None);
                false
            }
        }
    }

    fn announce(&mut self) {
        let state = self.state();
        let peers: Vec<PeerId> = self.connected.iter().copied().collect();
        for p in peers {
            self.swarm
                .behaviour_mut()
                .state
                .send_request(&p, state.clone());
        }
    }

    fn redial(&mut self) {
        let unconnected: Vec<(PeerId, Multiaddr)> = self
            .discovered
            .iter()
            .filter(|(p, _)| !self.swarm.is_connected(p))
            .map(|(p, a)| (*p, a.clone()))
            .collect();
        for (peer, addr) in unconnected {
            self.dial_found(peer, addr);
        }
        for addr in self.static_peers.clone() {
            if self.dialled.get(&addr).is_some_and(|&n| n > 0) {
                continue;
            }
            if let Err(e) = self.swarm.dial(addr.clone()) {
                debug!(%addr, error = %e, "cannot dial a static peer");
            }
        }
        self.dial_server_peers();
    }

    /// Dials each device the server named that is not connected yet.
    fn dial_server_peers(&mut self) {
        let me = *self.swarm.local_peer_id();
        for (peer, addrs) in self.server_peers.clone() {
            if peer == me || self.connected.contains(&peer) || addrs.is_empty() {
                continue;
            }
            let opts = libp2p_swarm::dial_opts::DialOpts::peer_id(peer)
                .addresses(addrs)
                .build();
            if let Err(e) = self.swarm.dial(opts) {
                debug!(%peer, error = %e, "cannot dial a peer the server named");
            }
        }
    }

    /// Dials a peer mDNS found, unless a connection or a dial to it is under way.
    fn dial_found(&mut self, peer: PeerId, addr: Multiaddr) {
        use libp2p_swarm::dial_opts::{DialOpts, PeerCondition};
        let opts = DialOpts::peer_id(peer)
            .addresses(vec![addr])
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        if let Err(e) = self.swarm.dial(opts) {
            debug!(%peer, error = %e, "not dialling a peer found by mDNS");
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Running(running) => {
                self.running = running;
                self.announce();
            }
            Command::Installing(installing) => {
                self.installing = installing;
                self.fetching = Bitfield::new(0);
                self.announce();
            }
            Command::Fetching(fetching) => {
                if self.fetching != fetching {
                    self.fetching = fetching;
                    if self.installing.is_some() {
                        self.announce();
                    }
                }
            }
            Command::HaveAll => {
                if let Some((_, h)) = self.installing.as_mut() {
                    *h = Bitfield::full(h.len());
                    self.announce();
                }
            }
            Command::Have(have) => {
                if let Some((_, h)) = self.installing.as_mut()
                    && *h != have
                {
                    *h = have;
                    self.announce();
                }
            }
            Command::Chunks {
                peer,
                manifest,
                ids,
                reply,
            } => {
                let n = ids.len();
                let id = self
                    .swarm
                    .behaviour_mut()
                    .chunk
                    .send_request(&peer, ChunkRequest { manifest, ids });
                self.pending_chunks.insert(id, (n, reply));
            }
            Command::Manifest {
                peer,
                manifest,
                reply,
            } => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .manifest
                    .send_request(&peer, ManifestRequest { manifest });
                self.pending_manifests.insert(id, reply);
            }
            Command::Dictionary {
                peer,
                manifest,
                zstd_id,
                reply,
            } => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .dictionary
                    .send_request(&peer, DictionaryRequest { manifest, zstd_id });
                self.pending_dictionaries.insert(id, reply);
            }
            Command::Credential {
                credential,
                revoked,
            } => {
                match self
                    .membership
                    .renew(&credential, revoked, crate::device::wall_clock())
                {
                    Ok(()) => debug!("fleet credential renewed"),
                    Err(e) => warn!(error = %e, "the server's fleet credential is refused"),
                }
                // Admitted peers are checked again (a key may be revoked now), and
                // every peer hears our credential and answers with its own.
                for (peer, state) in self.peers.snapshot() {
                    self.on_state(peer, state);
                }
                self.announce();
            }
            Command::ServerPeers(peers) => {
                if peers != self.server_peers {
                    info!(
                        peers = peers.len(),
                        "LAN peers behind our public address, from the server"
                    );
                }
                self.server_peers = peers;
                self.dial_server_peers();
            }
            Command::Block(peer) => {
                self.swarm.behaviour_mut().blocked.block_peer(peer);
                self.peers.set(peer, None);
            }
        }
    }

    /// Bytes `peer` may be sent now.
    fn budget(&mut self, peer: PeerId) -> u64 {
        let rate = self.rate;
        let b = self.buckets.entry(peer).or_insert(Bucket {
            tokens: rate,
            at: Instant::now(),
        });
        let now = Instant::now();
        b.tokens = (b.tokens + rate * now.duration_since(b.at).as_secs_f64()).min(rate);
        b.at = now;
        b.tokens.max(0.0) as u64
    }

    fn spend(&mut self, peer: PeerId, bytes: u64) {
        if let Some(b) = self.buckets.get_mut(&peer) {
            b.tokens -= bytes as f64;
        }
    }

    fn release(&self, manifest: &ManifestId) -> Option<Arc<Served>> {
        self.running
            .iter()
            .chain(self.installing.iter().map(|(s, _)| s))
            .find(|s| s.manifest == *manifest)
            .cloned()
    }

    fn on_swarm(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                let full = address.clone().with(libp2p_core::multiaddr::Protocol::P2p(
                    *self.swarm.local_peer_id(),
                ));
                info!(address = %full, "listening for LAN peers");
                if let Ok(mut l) = self.listening.lock() {
                    l.push(address.clone());
                }
                self.listen_addrs.push(full);
                // For people and tests: where this device can be reached.
                let text: String = self.listen_addrs.iter().map(|a| format!("{a}\n")).collect();
                let path = self.data_dir.join("lan-addresses");
                let tmp = self.data_dir.join("lan-addresses.new");
                if std::fs::create_dir_all(&self.data_dir)
                    .and_then(|()| std::fs::write(&tmp, text))
                    .and_then(|()| std::fs::rename(&tmp, &path))
                    .is_err()
                {
                    debug!(path = %path.display(), "cannot write the listen addresses");
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                // An interface went away: the server is told only live addresses.
                if let Ok(mut l) = self.listening.lock() {
                    l.retain(|a| *a != address);
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                num_established,
                ..
            } => {
                if endpoint.is_dialer() {
                    *self
                        .dialled
                        .entry(endpoint.get_remote_address().clone())
                        .or_default() += 1;
                }
                if num_established.get() == 1 {
                    debug!(peer = %peer_id, address = %endpoint.get_remote_address(), "peer connected");
                    self.connected.insert(peer_id);
                    let state = self.state();
                    self.swarm
                        .behaviour_mut()
                        .state
                        .send_request(&peer_id, state);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                endpoint,
                num_established,
                ..
            } => {
                if endpoint.is_dialer()
                    && let Some(n) = self.dialled.get_mut(endpoint.get_remote_address())
                {
                    *n = n.saturating_sub(1);
                }
                if num_established == 0 {
                    debug!(peer = %peer_id, "peer disconnected");
                    self.connected.remove(&peer_id);
                    self.admitted.remove(&peer_id);
                    self.peers.set(peer_id, None);
                    self.buckets.remove(&peer_id);
                }
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                error,
                ..
            } => {
                debug!(%peer, error = %error, "cannot connect to a peer; dialled again later");
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour(event),
            _ => {}
        }
    }

    fn on_behaviour(&mut self, event: BehaviourEvent) {
        use request_response::{Event as Rr, Message};
        match event {
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, addr) in found {
                    self.discovered.insert(peer, addr.clone());
                    if !self.swarm.is_connected(&peer) {
                        debug!(%peer, %addr, "found a peer by mDNS");
                        self.dial_found(peer, addr);
                    }
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Expired(gone)) => {
                for (peer, addr) in gone {
                    if self.discovered.get(&peer) == Some(&addr) {
                        self.discovered.remove(&peer);
                    }
                }
            }
            BehaviourEvent::State(Rr::Message { peer, message, .. }) => match message {
                Message::Request {
                    request, channel, ..
                } => {
                    // A peer outside the fleet learns nothing but our credential.
                    let state = if self.on_state(peer, request) {
                        self.state()
                    } else {
                        State {
                            credential: self.credential(),
                            ..State::default()
                        }
                    };
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .state
                        .send_response(channel, state);
                }
                Message::Response { response, .. } => {
                    self.on_state(peer, response);
                }
            },
            BehaviourEvent::State(Rr::InboundFailure { peer, error, .. })
            | BehaviourEvent::Manifest(Rr::InboundFailure { peer, error, .. })
            | BehaviourEvent::Chunk(Rr::InboundFailure { peer, error, .. })
            | BehaviourEvent::Dictionary(Rr::InboundFailure { peer, error, .. }) => {
                debug!(%peer, %error, "a peer's request failed");
            }
            BehaviourEvent::Dictionary(Rr::Message { peer, message, .. }) => match message {
                Message::Request {
                    request, channel, ..
                } => {
                    let answer = if !self.admitted.contains(&peer) {
                        DictionaryResponse::Refused
                    } else if self.release(&request.manifest).is_none() {
                        DictionaryResponse::NotHere
                    } else {
                        match serve::read_dictionary(&self.data_dir, request.zstd_id) {
                            Some(bytes) => DictionaryResponse::Bytes(bytes),
                            None => DictionaryResponse::NotHere,
                        }
                    };
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .dictionary
                        .send_response(channel, answer);
                }
                Message::Response {
                    request_id,
                    response,
                } => {
                    if let Some(reply) = self.pending_dictionaries.remove(&request_id) {
                        reply(match response {
                            DictionaryResponse::Bytes(b) => Ok(Some(b)),
                            DictionaryResponse::NotHere => Ok(None),
                            DictionaryResponse::Refused => {
                                Err("the peer refused us (fleet membership)".into())
                            }
                        });
                    }
                }
            },
            BehaviourEvent::Dictionary(Rr::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            }) => {
                if let Some(reply) = self.pending_dictionaries.remove(&request_id) {
                    debug!(%peer, %error, "a dictionary request to a peer failed");
                    reply(Err(format!("the request failed: {error}")));
                }
            }
            BehaviourEvent::Manifest(Rr::Message { peer, message, .. }) => match message {
                Message::Request {
                    request, channel, ..
                } => {
                    let answer = match self.release(&request.manifest) {
                        _ if !self.admitted.contains(&peer) => ManifestResponse::Refused,
                        Some(s) => {
                            // Read off the event loop (up to the envelope size
                            // limit from a file), one at a time (one envelope in
                            // memory, as when it was read on the loop); answered
                            // when read.
                            let tx = self.manifest_tx.clone();
                            let one = Arc::clone(&self.manifest_reads);
                            tokio::task::spawn_blocking(move || {
                                let _one = one.lock().unwrap_or_else(|e| e.into_inner());
                                let answer = match s.envelope.read() {
                                    Ok(e) => {
                                        ManifestResponse::Envelope(serve::envelope_for_peer(e))
                                    }
                                    Err(e) => {
                                        warn!(%peer, error = %format!("{e:#}"), "cannot read the manifest a peer asked for");
                                        ManifestResponse::NotHere
                                    }
                                };
                                let _ = tx.blocking_send((channel, answer));
                            });
                            return;
                        }
                        None => ManifestResponse::NotHere,
                    };
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .manifest
                        .send_response(channel, answer);
                }
                // Offline propagation: the envelope of a release a peer runs.
                Message::Response {
                    request_id,
                    response,
                } => {
                    if let Some(reply) = self.pending_manifests.remove(&request_id) {
                        reply(match response {
                            ManifestResponse::Envelope(e) => Ok(e),
                            ManifestResponse::NotHere => {
                                Err("the peer does not serve that release".into())
                            }
                            ManifestResponse::Refused => {
                                Err("the peer refused us (fleet membership)".into())
                            }
                        });
                    }
                }
            },
            BehaviourEvent::Manifest(Rr::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            }) => {
                if let Some(reply) = self.pending_manifests.remove(&request_id) {
                    debug!(%peer, %error, "a manifest request to a peer failed");
                    reply(Err(format!("the request failed: {error}")));
                }
            }
            BehaviourEvent::Chunk(Rr::Message { peer, message, .. }) => match message {
                Message::Request {
                    request, channel, ..
                } => {
                    if !self.admitted.contains(&peer) {
                        debug!(%peer, "refusing chunks to a peer outside the fleet");
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .chunk
                            .send_response(channel, ChunkResponse::Refused);
                        return;
                    }
                    let Some(release) = self.release(&request.manifest) else {
                        let n = request.ids.len();
                        let _ = self.swarm.behaviour_mut().chunk.send_response(
                            channel,
                            ChunkResponse::Chunks(vec![ChunkData::NotHere; n]),
                        );
                        return;
                    };
                    let budget = self.budget(peer);
                    let boot = Arc::clone(&self.boot);
                    let tx = self.served_tx.clone();
                    tokio::task::spawn_blocking(move || {
                        let chunks = serve::answer(&boot, &release, &request.ids, budget);
                        let bytes = chunks
                            .iter()
                            .map(|c| match c {
                                ChunkData::Bytes(b) => b.len() as u64,
                                _ => 0,
                            })
                            .sum();
                        let _ =
                            tx.blocking_send((peer, bytes, channel, ChunkResponse::Chunks(chunks)));
                    });
                }
                Message::Response {
                    request_id,
                    response,
                } => {
                    if let Some((asked, reply)) = self.pending_chunks.remove(&request_id) {
                        reply(match response {
                            ChunkResponse::Chunks(chunks) => {
                                match proto::check_answer(asked, &chunks) {
                                    Ok(()) => Ok(chunks),
                                    Err(e) => {
                                        warn!(%peer, error = %e, "a peer's chunk answer is malformed");
                                        Err(FetchFailure::DropSource)
                                    }
                                }
                            }
                            ChunkResponse::Refused => Err(FetchFailure::DropSource),
                        });
                    }
                }
            },
            BehaviourEvent::Chunk(Rr::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            }) => {
                if let Some((_, reply)) = self.pending_chunks.remove(&request_id) {
                    debug!(%peer, %error, "a chunk request to a peer failed");
                    reply(Err(match error {
                        request_response::OutboundFailure::UnsupportedProtocols => {
                            FetchFailure::DropSource
                        }
                        _ => FetchFailure::RetryLater,
                    }));
                }
            }
            BehaviourEvent::State(Rr::OutboundFailure { peer, error, .. }) => {
                debug!(%peer, %error, "a state message to a peer failed");
            }
            _ => {}
        }
    }
}
