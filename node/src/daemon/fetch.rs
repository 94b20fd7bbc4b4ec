//! The server as the engine's request source: each [`Output::Fetch`] batch is one
//! `POST .../deployments/{id}/chunks`, run on one of a few worker threads (so
//! several requests are in flight), its `application/vnd.shoal.chunks` answer
//! read frame by frame as it arrives ([`BatchReader`]), each chunk decoded and
//! handed to the driver at once ([`Requests::wait`]) as a verified proof (decoded and
//! hashed here; the engine never takes unverified bytes).
//!
//! When the server hands out a static chunk base URL ([`StaticBase`]: nginx, S3,
//! a CDN serving its chunk store), each batch is instead a series of plain `GET`s
//! of `BASE/chunks/<2 hex>/<64 hex>` on one kept-alive connection per worker (so
//! as many in parallel as the engine's source limits allow requests), and zstd
//! dictionaries come from `BASE/dictionaries/<8 hex>`; the server streams no chunk
//! bytes. A chunk the static host does not have (404 or 410: a CDN not yet
//! filled) is asked of the server in one batch at the end of its request. Every
//! chunk is verified by the engine whatever its source.
//!
//! **Per-base encodings.** When the daemon knows the release its running slot
//! holds ([`DeltaBase`]), each batch request names it (`"base"`), and the server
//! answers in version 2 ([`shoal_node::wire`]): a chunk it holds a per-base
//! encoding of comes as a delta record (version 1, all plain, when it has no
//! encodings against that base), decoded here with the reference bytes read
//! from the running slot (the install path's [`crate::device::References`]), whose
//! hash is checked before any chunk is decoded with them, and every decoded chunk
//! is hashed before the engine sees it. Any delta that fails (bytes that fail the
//! reference's hash: the slot does not hold the base after all; a frame that does
//! not decode to the chunk; a malformed record), or a server that refuses the field
//! (older than per-base encodings), turns deltas off for the rest of the deployment
//! with an error in the log: the request is retried and gets plain chunks, so
//! deltas never make an update fail that plain chunks would carry.
//!
//! **Per-base encodings on a static chunk host.** The chunk store lays them out
//! as files too: `BASE/deltas/<base>/index/<release>` lists the chunks of the
//! release that have a record against the base and each record's length
//! ([`shoal_artifact::delta_record::parse_index`]; untrusted bytes, bounded by the
//! release's chunk count), `BASE/deltas/<base>/<2 hex>/<64 hex>` holds a record.
//! With a static host and a known running release, the index is fetched once per
//! deployment (none, 404: plain chunk files as before); a chunk it lists is fetched
//! as its record and decoded against the running slot as above, and a record the
//! host lacks (404/410) is fetched as the plain chunk file. A record that fails
//! (its length, its format, the reference's hash, the decoded chunk's id) turns
//! deltas off and the chunk comes plain from the static host at once.
//!
//! [`Output::Fetch`]: shoal_engine::Output::Fetch

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use reqwest::StatusCode;
use shoal_artifact::{ChunkId, ChunkRef};
use shoal_engine::{FetchFailure, RequestId};
use tracing::{debug, warn};

use super::api::{Api, ApiError, error_of};
use crate::device::{Answer, Requests};
use shoal_node::chunk_url::StaticBase;
use shoal_node::wire::BatchError;
use shoal_node::wire::{BatchReader, CONTENT_TYPE_V2, Stored};

struct Job {
    request: RequestId,
    ids: Vec<ChunkId>,
}

/// What workers share.
struct Shared {
    api: Api,
    path: String,
    refs: Arc<dyn ChunkLookup>,
    /// Dictionaries at hand.
    dictionaries: Mutex<HashMap<u32, Held>>,
    /// Held while a dictionary is fetched: one fetch per dictionary, not one per
    /// worker.
    dictionary_fetch: Mutex<()>,
    /// LAN peers, asked for dictionaries before the server.
    peers: Option<Arc<dyn PeerDictionaries>>,
    /// BLAKE3 of the dictionary the signed manifest names (format 2), if it names
    /// one: a peer's dictionary is used only if it hashes to it.
    named_dictionary: Option<ChunkId>,
    cancelled: Mutex<HashSet<RequestId>>,
    bytes: AtomicU64,
    /// The static chunk host, if the server named one.
    static_base: Option<StaticBase>,
    /// Bytes of chunks and dictionaries read from the static host.
    static_bytes: AtomicU64,
    aborted: AtomicBool,
    /// The base release the running slot holds, for per-base encodings.
    delta: Option<DeltaBase>,
    /// Chunks that came delta-encoded, and their bytes on the wire.
    delta_chunks: AtomicU64,
    /// The static host's index of per-base encodings (fetched once; `None`:
    /// there is none, or it was refused).
    static_index: std::sync::OnceLock<Option<HashMap<ChunkId, u32>>>,
}

/// The release's chunks by id, as the fetcher decodes them (sizes, sizes on
/// the wire): the verified release's table on the device
/// ([`shoal_engine::VerifiedRelease::chunk`], no map of its own), a map in tests.
pub trait ChunkLookup: Send + Sync {
    /// The chunk `id`, if the release has it.
    fn chunk(&self, id: &ChunkId) -> Option<ChunkRef>;
    /// Distinct chunks of the release.
    fn distinct(&self) -> usize;
}

impl ChunkLookup for shoal_engine::VerifiedRelease {
    fn chunk(&self, id: &ChunkId) -> Option<ChunkRef> {
        shoal_engine::VerifiedRelease::chunk(self, id)
    }
    fn distinct(&self) -> usize {
        self.distinct_chunks() as usize
    }
}

impl ChunkLookup for BTreeMap<ChunkId, ChunkRef> {
    fn chunk(&self, id: &ChunkId) -> Option<ChunkRef> {
        self.get(id).copied()
    }
    fn distinct(&self) -> usize {
        self.len()
    }
}

/// The release the running slot holds, named to the server so it may send chunks
/// delta-encoded against it, and the slot's bytes to decode them with.
pub struct DeltaBase {
    /// Its manifest hash.
    pub hash: [u8; 32],
    /// The manifest hash of the release being installed (names its per-base
    /// encoding index on a static host).
    pub release: [u8; 32],
    /// The running slot, read for references.
    pub references: Mutex<crate::device::References>,
    /// Set when deltas are off for this deployment (see the module doc).
    pub off: AtomicBool,
}

impl Shared {
    /// Per-base deltas off for the rest of the deployment: plain chunks only.
    fn deltas_off(&self) {
        if let Some(d) = &self.delta {
            d.off.store(true, Ordering::Relaxed);
        }
    }
}

impl DeltaBase {
    /// Named to the server while deltas are on.
    fn named(&self) -> Option<String> {
        (!self.off.load(Ordering::Relaxed)).then(|| hex::encode(self.hash))
    }
}

/// Where a chunk's zstd dictionary may come from before the server: the LAN
/// peers that install the same release ([`super::lan_dictionary`]).
pub trait PeerDictionaries: Send + Sync {
    /// A peer's bytes for the dictionary `zstd_id`, its id checked (derived from
    /// them), or `None`: then the server is asked.
    fn fetch(&self, zstd_id: u32) -> Option<shoal_artifact::chunk::Dictionary>;
    /// The dictionary a peer sent decoded a chunk wrong: that peer is not trusted.
    fn refuse(&self, zstd_id: u32);
    /// The dictionary decoded a chunk right: keep it to serve to peers.
    fn keep(&self, dict: &shoal_artifact::chunk::Dictionary);
}

/// The server as a [`Requests`] source for one deployment.
pub struct HttpRequests {
    jobs: Option<Sender<Job>>,
    answers: Receiver<Vec<Answer>>,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// The status heartbeat: its stop channel and thread.
    beat: Option<(Sender<()>, JoinHandle<()>)>,
}

impl std::fmt::Debug for HttpRequests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpRequests")
            .field("path", &self.shared.path)
            .finish_non_exhaustive()
    }
}

/// A handle that outlives the source: whether the server aborted the deployment,
/// and the bytes read.
#[derive(Clone)]
pub struct Watch(Arc<Shared>);

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").finish_non_exhaustive()
    }
}

impl Watch {
    /// Whether the server answered 409 (the deployment was aborted).
    pub fn aborted(&self) -> bool {
        self.0.aborted.load(Ordering::Relaxed)
    }

    /// Bytes of chunk batches read from the server.
    pub fn bytes(&self) -> u64 {
        self.0.bytes.load(Ordering::Relaxed)
    }

    /// Bytes of chunks (and dictionaries) read from the static chunk host.
    pub fn static_bytes(&self) -> u64 {
        self.0.static_bytes.load(Ordering::Relaxed)
    }

    /// Chunks that came delta-encoded against the running release.
    pub fn delta_chunks(&self) -> u64 {
        self.0.delta_chunks.load(Ordering::Relaxed)
    }
}

impl HttpRequests {
    /// Starts `workers` threads fetching chunks of `deployment`, whose manifest
    /// lists `refs`, and one that reports `downloading` every `heartbeat` (so an
    /// abort is noticed even while every chunk request is already in flight).
    /// With `static_base`, chunks come from that static host (see the module doc);
    /// with `peers`, zstd dictionaries are asked of the LAN first, and used only if
    /// they hash to `named_dictionary` when the manifest names one; with `delta`,
    /// chunks may come delta-encoded against the running release.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        api: Api,
        deployment: &str,
        refs: Arc<dyn ChunkLookup>,
        workers: u32,
        heartbeat: Duration,
        static_base: Option<StaticBase>,
        peers: Option<Arc<dyn PeerDictionaries>>,
        named_dictionary: Option<ChunkId>,
        delta: Option<DeltaBase>,
    ) -> HttpRequests {
        let shared = Arc::new(Shared {
            api,
            path: format!("/deployments/{deployment}/chunks"),
            refs,
            dictionaries: Mutex::new(HashMap::new()),
            dictionary_fetch: Mutex::new(()),
            peers,
            named_dictionary,
            cancelled: Mutex::new(HashSet::new()),
            bytes: AtomicU64::new(0),
            static_base,
            static_bytes: AtomicU64::new(0),
            aborted: AtomicBool::new(false),
            delta,
            delta_chunks: AtomicU64::new(0),
            static_index: std::sync::OnceLock::new(),
        });
        let (stop_tx, stop_rx) = channel::<()>();
        let beat = {
            let shared = Arc::clone(&shared);
            let deployment = deployment.to_owned();
            std::thread::spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stop_rx.recv_timeout(heartbeat)
                {
                    match shared.api.status(&deployment, "downloading", None) {
                        Err(ApiError::Conflict(m)) => {
                            warn!(%deployment, message = %m, "the server ended the deployment");
                            shared.aborted.store(true, Ordering::Relaxed);
                            return;
                        }
                        Err(e) => debug!(error = %e, "status heartbeat failed"),
                        Ok(()) => {}
                    }
                }
            })
        };
        let (jobs, job_rx) = channel::<Job>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (answer_tx, answers) = channel();
        let workers = (0..workers.max(1))
            .map(|_| {
                let shared = Arc::clone(&shared);
                let job_rx = Arc::clone(&job_rx);
                let answer_tx: Sender<Vec<Answer>> = answer_tx.clone();
                std::thread::spawn(move || {
                    loop {
                        let job = match job_rx.lock().map(|rx| rx.recv()) {
                            Ok(Ok(job)) => job,
                            _ => return,
                        };
                        if cancelled(&shared, job.request) {
                            continue;
                        }
                        let deliver = |a| answer_tx.send(vec![a]).is_ok();
                        match &shared.static_base {
                            Some(base) => fetch_static(&shared, base, job, &deliver),
                            None => fetch(&shared, job, &deliver),
                        }
                    }
                })
            })
            .collect();
        HttpRequests {
            jobs: Some(jobs),
            answers,
            shared,
            workers,
            beat: Some((stop_tx, beat)),
        }
    }

    /// A handle to read the abort flag and byte count after the install.
    pub fn watch(&self) -> Watch {
        Watch(Arc::clone(&self.shared))
    }
}

impl Drop for HttpRequests {
    fn drop(&mut self) {
        // Closing the queues ends the workers: a request in flight stops at its
        // next chunk (each read is bounded by the client's timeout). They are not
        // waited for.
        self.jobs = None;
        if let Some((stop, _beat)) = self.beat.take() {
            let _ = stop.send(());
        }
        self.workers.clear();
    }
}

impl Requests for HttpRequests {
    fn send(&mut self, request: RequestId, ids: Vec<ChunkId>) {
        if let Some(jobs) = &self.jobs {
            let _ = jobs.send(Job { request, ids });
        }
    }

    fn cancel(&mut self, request: RequestId) {
        if let Ok(mut c) = self.shared.cancelled.lock() {
            c.insert(request);
        }
    }

    fn wait(&mut self, timeout: Duration) -> Vec<Answer> {
        let mut out = match self.answers.recv_timeout(timeout) {
            Ok(a) => a,
            Err(_) => return Vec::new(),
        };
        while let Ok(more) = self.answers.try_recv() {
            out.extend(more);
        }
        out
    }

    fn bytes_read(&self) -> u64 {
        self.shared.bytes.load(Ordering::Relaxed) + self.shared.static_bytes.load(Ordering::Relaxed)
    }

    fn stop_reason(&self) -> Option<String> {
        self.shared
            .aborted
            .load(Ordering::Relaxed)
            .then(|| "the server aborted the deployment".to_owned())
    }
}

/// Runs one request, handing each answer over as soon as it is known.
fn fetch(shared: &Shared, job: Job, deliver: &dyn Fn(Answer) -> bool) {
    let failed = |failure| {
        deliver(Answer::Failed {
            request: job.request,
            failure,
        });
    };
    let hex: Vec<String> = job.ids.iter().map(|id| id.to_hex()).collect();
    let base = shared.delta.as_ref().and_then(DeltaBase::named);
    let body = match &base {
        Some(b) => serde_json::json!({ "ids": hex, "base": b }),
        None => serde_json::json!({ "ids": hex }),
    };
    let resp = match shared.api.send(&shared.path, |c, u| c.post(u).json(&body)) {
        Ok(r) => r,
        Err(e) => {
            warn!(request = %job.request, error = %e, "chunk request failed");
            return failed(if e.is_transient() {
                FetchFailure::RetryLater
            } else {
                FetchFailure::DropSource
            });
        }
    };
    let status = resp.status();
    if !status.is_success() {
        let e = error_of(resp);
        warn!(request = %job.request, error = %e, "chunk request refused");
        if status == StatusCode::CONFLICT {
            shared.aborted.store(true, Ordering::Relaxed);
        }
        if base.is_some()
            && (status == StatusCode::BAD_REQUEST || status == StatusCode::UNPROCESSABLE_ENTITY)
        {
            // A server from before per-base encodings refuses the field: ask again
            // without it.
            warn!(request = %job.request, "the server refused the base release field; fetching plain chunks");
            shared.deltas_off();
            return failed(FetchFailure::RetryLater);
        }
        return failed(match status {
            StatusCode::NOT_FOUND => FetchFailure::NotThere,
            _ if e.is_transient() => FetchFailure::RetryLater,
            _ => FetchFailure::DropSource,
        });
    }
    let v2 = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == CONTENT_TYPE_V2.as_bytes());
    // Version 2 only when a base was named (then also version 1: the server has
    // no encodings against it).
    if v2 && base.is_none() {
        warn!(request = %job.request, "the chunk batch answer is in version 2, not asked for");
        return failed(FetchFailure::DropSource);
    }
    let body = CountingRead(resp, &shared.bytes);
    let mut reader = if v2 {
        BatchReader::new_v2(body, &job.ids)
    } else {
        BatchReader::new(body, &job.ids)
    };
    let mut sent = 0usize;
    loop {
        match reader.next_item() {
            Ok(Some((id, stored))) => {
                let Some(ref chunk) = shared.refs.chunk(&id) else {
                    if !deliver(Answer::Unavailable(id)) {
                        return;
                    }
                    continue;
                };
                let decoded = match stored {
                    Stored::Plain(stored) => decode(shared, &stored, chunk),
                    // Whatever fails with a delta (the reference's hash, the frame,
                    // the chunk's hash) turns deltas off: the plain chunks may well
                    // be fine.
                    Stored::Delta(record) => {
                        decode_delta(shared, &record, chunk).map_err(|e| match e {
                            Undecoded::Corrupt(m) => Undecoded::Reference(m),
                            other => other,
                        })
                    }
                };
                let answer = match decoded {
                    Ok(chunk) => Answer::Chunk(chunk),
                    Err(Undecoded::Dictionary(e)) => {
                        // Not the chunk's fault: its dictionary did not come (a cut
                        // connection, a restarting server). The request fails like
                        // a cut batch would; the chunks delivered so far stay.
                        warn!(request = %job.request, %id, error = %e, chunks = sent, "cannot get the chunk's dictionary");
                        failed(if e.is_transient() {
                            FetchFailure::RetryLater
                        } else {
                            FetchFailure::DropSource
                        });
                        return;
                    }
                    Err(Undecoded::Reference(message)) => {
                        // Not the chunk's fault: this slot does not hold the base.
                        // Deltas off; the request is asked again, plain.
                        tracing::error!(request = %job.request, %id, %message, "cannot decode a delta-encoded chunk against the running slot; fetching plain chunks");
                        shared.deltas_off();
                        failed(FetchFailure::RetryLater);
                        return;
                    }
                    Err(Undecoded::Corrupt(message)) => {
                        // Bytes that do not decode to the id: the engine bans the
                        // source.
                        warn!(%id, %message, "chunk from the server does not decode");
                        Answer::Corrupt(id)
                    }
                };
                sent += 1;
                // The install is over (or the request cancelled): stop reading.
                if !deliver(answer) || cancelled(shared, job.request) {
                    return;
                }
            }
            Ok(None) => break,
            Err(e @ (BatchError::BadDelta { .. } | BatchError::UnknownKind { .. }))
                if shared.delta.is_some() =>
            {
                // A malformed delta frame: plain chunks may well be fine.
                tracing::error!(request = %job.request, error = %e, chunks = sent, "malformed delta-encoded chunk; fetching plain chunks");
                shared.deltas_off();
                failed(FetchFailure::RetryLater);
                return;
            }
            Err(e) => {
                warn!(request = %job.request, error = %e, chunks = sent, "chunk batch failed");
                failed(if e.is_transport() {
                    FetchFailure::RetryLater
                } else {
                    FetchFailure::DropSource
                });
                return;
            }
        }
    }
    debug!(request = %job.request, chunks = sent, "chunk batch");
}

/// Runs one request against the static chunk host: a `GET` per chunk, each
/// handed over as soon as it is read; the chunks the host lacks are asked of the
/// server at the end, in one batch.
fn fetch_static(shared: &Shared, base: &StaticBase, job: Job, deliver: &dyn Fn(Answer) -> bool) {
    let request = job.request;
    let failed = |failure| {
        deliver(Answer::Failed { request, failure });
    };
    let mut missing = Vec::new();
    let mut sent = 0usize;
    for id in job.ids {
        if cancelled(shared, request) {
            return;
        }
        let Some(ref chunk) = shared.refs.chunk(&id) else {
            if !deliver(Answer::Unavailable(id)) {
                return;
            }
            continue;
        };
        if let Some(len) = static_delta_index(shared, base).and_then(|i| i.get(&id)) {
            match static_delta(shared, base, &id, *len, chunk) {
                StaticDelta::Chunk(v) => {
                    sent += 1;
                    if !deliver(Answer::Chunk(v)) {
                        return;
                    }
                    continue;
                }
                StaticDelta::Plain => {}
                StaticDelta::Retry => return failed(FetchFailure::RetryLater),
            }
        }
        let url = base.chunk(&id);
        let resp = match shared.api.client().get(&url).send() {
            Ok(r) => r,
            Err(e) => {
                warn!(%request, %url, error = %crate::cmd::chain(&e), "static chunk request failed");
                return failed(FetchFailure::RetryLater);
            }
        };
        let status = resp.status();
        if status == StatusCode::NOT_FOUND || status == StatusCode::GONE {
            missing.push(id);
            continue;
        }
        if !status.is_success() {
            warn!(%request, %url, %status, "static chunk host refused a chunk");
            return failed(
                if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
                    FetchFailure::RetryLater
                } else {
                    FetchFailure::DropSource
                },
            );
        }
        let max = shoal_artifact::manifest::stored_size_max(chunk.size).min(STORED_MAX);
        let stored = match read_counted(resp, u64::from(max), &shared.static_bytes) {
            Ok(b) => b,
            Err(StaticRead::TooLarge) => {
                warn!(%request, %url, max, "static chunk is larger than the chunk can be stored");
                return failed(FetchFailure::DropSource);
            }
            Err(StaticRead::Io(e)) => {
                warn!(%request, %url, error = %e, "reading a static chunk failed");
                return failed(FetchFailure::RetryLater);
            }
        };
        let answer = match decode(shared, &stored, chunk) {
            Ok(chunk) => Answer::Chunk(chunk),
            Err(Undecoded::Dictionary(e)) => {
                // Not the chunk's fault: the request fails like a cut one; the chunks
                // delivered so far stay.
                warn!(%request, %id, error = %e, chunks = sent, "cannot get the chunk's dictionary");
                return failed(if e.is_transient() {
                    FetchFailure::RetryLater
                } else {
                    FetchFailure::DropSource
                });
            }
            Err(Undecoded::Corrupt(message) | Undecoded::Reference(message)) => {
                // The engine bans the source.
                warn!(%id, %message, "chunk from the static host does not decode");
                Answer::Corrupt(id)
            }
        };
        sent += 1;
        if !deliver(answer) {
            return;
        }
    }
    debug!(%request, chunks = sent, missing = missing.len(), "static chunk requests");
    if !missing.is_empty() && !cancelled(shared, request) {
        warn!(%request, chunks = missing.len(), "the static chunk host lacks chunks; asking the server");
        fetch(
            shared,
            Job {
                request,
                ids: missing,
            },
            deliver,
        );
    }
}

/// The static host's index of the release's per-base encodings against the
/// running release, fetched on first use; `None` while deltas are off, when
/// there is no base, no index (404/410), or it was refused (logged).
fn static_delta_index<'a>(
    shared: &'a Shared,
    base: &StaticBase,
) -> Option<&'a HashMap<ChunkId, u32>> {
    let d = shared.delta.as_ref()?;
    if d.off.load(Ordering::Relaxed) {
        return None;
    }
    shared
        .static_index
        .get_or_init(|| {
            let url = base.delta_index(&d.hash, &d.release);
            let resp = match shared.api.client().get(&url).send() {
                Ok(r) => r,
                Err(e) => {
                    warn!(%url, error = %crate::cmd::chain(&e), "cannot fetch the per-base encoding index; fetching plain chunks");
                    return None;
                }
            };
            let status = resp.status();
            if !status.is_success() {
                if status == StatusCode::NOT_FOUND || status == StatusCode::GONE {
                    debug!(%url, "the static chunk host has no per-base encodings for the running release");
                } else {
                    warn!(%url, %status, "the static chunk host refused the per-base encoding index; fetching plain chunks");
                }
                return None;
            }
            let max = (shared.refs.distinct() * shoal_artifact::delta_record::INDEX_ENTRY) as u64;
            let bytes = match read_counted(resp, max, &shared.static_bytes) {
                Ok(b) => b,
                Err(StaticRead::TooLarge) => {
                    tracing::error!(%url, max, "the per-base encoding index is larger than the release's chunks allow; fetching plain chunks");
                    return None;
                }
                Err(StaticRead::Io(e)) => {
                    warn!(%url, error = %e, "reading the per-base encoding index failed; fetching plain chunks");
                    return None;
                }
            };
            match shoal_artifact::delta_record::parse_index(
                &bytes,
                shared.refs.distinct(),
                STORED_MAX + DELTA_RECORD_OVERHEAD,
            ) {
                Ok(i) => {
                    tracing::info!(%url, chunks = i.len(), "per-base encodings on the static chunk host");
                    Some(i)
                }
                Err(e) => {
                    tracing::error!(%url, error = %e, "malformed per-base encoding index on the static chunk host; fetching plain chunks");
                    None
                }
            }
        })
        .as_ref()
}

/// Bytes a delta record may have beyond its frame (header, 4 ranges, hash).
const DELTA_RECORD_OVERHEAD: u32 = 128;

/// What fetching a chunk's delta record from the static host gave.
enum StaticDelta {
    /// The chunk, decoded against the running slot and verified.
    Chunk(shoal_artifact::VerifiedChunk),
    /// Fetch the plain chunk file instead (no record there, or it failed: then
    /// deltas are off).
    Plain,
    /// The host failed transiently: the request is retried.
    Retry,
}

/// Fetches chunk `id`'s delta record (of `len` bytes, as the index says) from the
/// static host and decodes it against the running slot.
fn static_delta(
    shared: &Shared,
    base: &StaticBase,
    id: &ChunkId,
    len: u32,
    chunk: &ChunkRef,
) -> StaticDelta {
    let Some(d) = &shared.delta else {
        return StaticDelta::Plain;
    };
    let url = base.delta(&d.hash, id);
    let resp = match shared.api.client().get(&url).send() {
        Ok(r) => r,
        Err(e) => {
            warn!(%url, error = %crate::cmd::chain(&e), "static delta record request failed");
            return StaticDelta::Retry;
        }
    };
    let status = resp.status();
    if status == StatusCode::NOT_FOUND || status == StatusCode::GONE {
        return StaticDelta::Plain;
    }
    if !status.is_success() {
        warn!(%url, %status, "static chunk host refused a delta record");
        return if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            StaticDelta::Retry
        } else {
            StaticDelta::Plain
        };
    }
    let bad = |message: String| {
        tracing::error!(%url, %message, "cannot decode a delta-encoded chunk from the static chunk host; fetching plain chunks");
        shared.deltas_off();
        StaticDelta::Plain
    };
    let bytes = match read_counted(resp, u64::from(len), &shared.static_bytes) {
        Ok(b) if b.len() == len as usize => b,
        Ok(b) => {
            return bad(format!(
                "the record is {} bytes, the index says {len}",
                b.len()
            ));
        }
        Err(StaticRead::TooLarge) => {
            return bad(format!(
                "the record is longer than the {len} bytes the index says"
            ));
        }
        Err(StaticRead::Io(e)) => {
            warn!(%url, error = %e, "reading a static delta record failed");
            return StaticDelta::Retry;
        }
    };
    let record = match shoal_artifact::delta_record::DeltaRecord::parse(&bytes) {
        Ok(r) => r,
        Err(e) => return bad(e.to_string()),
    };
    match decode_delta(shared, &record, chunk) {
        Ok(v) => StaticDelta::Chunk(v),
        Err(Undecoded::Reference(m) | Undecoded::Corrupt(m)) => bad(m),
        Err(Undecoded::Dictionary(e)) => bad(e.to_string()),
    }
}

/// The largest stored chunk read from a static host.
const STORED_MAX: u32 = shoal_node::wire::STORED_CHUNK_MAX;

/// Why a static body was not read.
enum StaticRead {
    /// Longer than allowed.
    TooLarge,
    /// The connection failed or timed out.
    Io(std::io::Error),
}

/// Reads a body of at most `max` bytes, counting them.
fn read_counted(
    resp: reqwest::blocking::Response,
    max: u64,
    counter: &AtomicU64,
) -> Result<Vec<u8>, StaticRead> {
    use std::io::Read;
    if resp.content_length().is_some_and(|n| n > max) {
        return Err(StaticRead::TooLarge);
    }
    let mut buf = Vec::new();
    CountingRead(resp, counter)
        .take(max + 1)
        .read_to_end(&mut buf)
        .map_err(StaticRead::Io)?;
    if buf.len() as u64 > max {
        return Err(StaticRead::TooLarge);
    }
    Ok(buf)
}

fn cancelled(shared: &Shared, request: RequestId) -> bool {
    shared
        .cancelled
        .lock()
        .map(|c| c.contains(&request))
        .unwrap_or(false)
}

/// A body that counts the bytes read from it.
struct CountingRead<'a, R>(R, &'a AtomicU64);

impl<R: std::io::Read> std::io::Read for CountingRead<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.read(buf)?;
        self.1.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Why a stored chunk was not decoded.
enum Undecoded {
    /// Its zstd dictionary could not be fetched (or the server's is malformed).
    Dictionary(ApiError),
    /// The bytes do not decode.
    Corrupt(String),
    /// The reference bytes of a delta-encoded chunk could not be read from the
    /// running slot, or they fail their hash.
    Reference(String),
}

/// Decodes a chunk delta-encoded against the running release: its reference read
/// from the running slot and checked against the record's hash, then the frame
/// decoded against it and the chunk checked against its id.
fn decode_delta(
    shared: &Shared,
    record: &shoal_artifact::delta_record::DeltaRecord,
    chunk: &ChunkRef,
) -> Result<shoal_artifact::VerifiedChunk, Undecoded> {
    let Some(delta) = &shared.delta else {
        return Err(Undecoded::Corrupt(
            "a delta-encoded chunk, though no base was named".into(),
        ));
    };
    let reference = record.reference();
    let bytes = delta
        .references
        .lock()
        .map_err(|_| Undecoded::Reference("the running slot's reader failed".into()))?
        .get(&reference)
        .map_err(|e| Undecoded::Reference(crate::cmd::one_line(&e)))?;
    bytes.check().map_err(|e| {
        Undecoded::Reference(format!(
            "the running slot's bytes {} are not the base release's: {e}",
            reference.describe()
        ))
    })?;
    let data = shoal_artifact::chunk::decode_against(&record.frame, chunk, bytes.bytes())
        .map_err(|e| Undecoded::Corrupt(e.to_string()))?;
    let v = shoal_artifact::VerifiedChunk::check(chunk.id, data)
        .map_err(|e| Undecoded::Corrupt(e.to_string()))?;
    shared.delta_chunks.fetch_add(1, Ordering::Relaxed);
    Ok(v)
}

/// Decodes a chunk's stored form, fetching its zstd dictionary once if needed.
/// A dictionary a peer sent that decodes the chunk wrong is dropped, its peer
/// refused, and the chunk decoded again with the server's.
fn decode(
    shared: &Shared,
    stored: &[u8],
    chunk: &ChunkRef,
) -> Result<shoal_artifact::VerifiedChunk, Undecoded> {
    use shoal_artifact::chunk::frame_dictionary_id;
    let Some(zstd_id) = frame_dictionary_id(stored) else {
        return shoal_artifact::VerifiedChunk::decode(stored, chunk, None)
            .map_err(|e| Undecoded::Corrupt(e.to_string()));
    };
    let held = dictionary(shared, zstd_id, false)?;
    let held = match shoal_artifact::VerifiedChunk::decode(stored, chunk, Some(&held.dict)) {
        Ok(v) => return Ok(proven(shared, held, v)),
        Err(e) if held.from_peer => {
            warn!(zstd_id = %format!("{zstd_id:08x}"), error = %e, "a LAN peer's dictionary decoded a chunk wrong; asking the server");
            if let Some(p) = &shared.peers {
                p.refuse(zstd_id);
            }
            dictionary(shared, zstd_id, true)?
        }
        Err(e) => return Err(Undecoded::Corrupt(e.to_string())),
    };
    shoal_artifact::VerifiedChunk::decode(stored, chunk, Some(&held.dict))
        .map(|v| proven(shared, held, v))
        .map_err(|e| Undecoded::Corrupt(e.to_string()))
}

/// `held` decoded a chunk right: the first time, it is kept to serve to peers.
fn proven(
    shared: &Shared,
    held: Held,
    v: shoal_artifact::VerifiedChunk,
) -> shoal_artifact::VerifiedChunk {
    if held.kept {
        return v;
    }
    let zstd_id = held.dict.zstd_id;
    let first = shared.dictionaries.lock().ok().is_some_and(|mut d| {
        d.get_mut(&zstd_id)
            .filter(|h| !h.kept && Arc::ptr_eq(&h.dict, &held.dict))
            .map(|h| {
                h.kept = true;
                h.from_peer = false;
            })
            .is_some()
    });
    if first && let Some(p) = &shared.peers {
        p.keep(&held.dict);
    }
    v
}

/// A zstd dictionary at hand.
#[derive(Clone)]
pub(crate) struct Held {
    dict: Arc<shoal_artifact::chunk::Dictionary>,
    /// A peer sent it and no chunk decoded right with it yet.
    from_peer: bool,
    /// A chunk decoded right with it, and it was kept for peers.
    kept: bool,
}

/// The zstd dictionary `zstd_id`: at hand, else from a LAN peer, else from the
/// server (or its static chunk host); with `server_only`, one a peer sent is
/// dropped and the server's fetched. The one place the daemon gets dictionaries.
///
/// When the signed manifest names its dictionary (format 2), a peer's is used
/// only if it hashes to that name, and is then as good as the server's. One that
/// does not may still be honest (a chunk the server stores from an older release
/// names an older dictionary): the server's is fetched, and if the server's is the
/// named one, the peer sent other bytes under its zstd id and is refused.
fn dictionary(shared: &Shared, zstd_id: u32, server_only: bool) -> Result<Held, Undecoded> {
    let at_hand = |shared: &Shared| {
        shared
            .dictionaries
            .lock()
            .ok()
            .and_then(|d| d.get(&zstd_id).cloned())
            .filter(|h| !(server_only && h.from_peer))
    };
    if let Some(h) = at_hand(shared) {
        return Ok(h);
    }
    // One worker fetches; the others find it at hand once it is done.
    let _fetching = shared.dictionary_fetch.lock();
    if let Some(h) = at_hand(shared) {
        return Ok(h);
    }
    debug!(zstd_id = %format!("{zstd_id:08x}"), "a chunk needs a zstd dictionary not at hand");
    let named = shared.named_dictionary;
    let mut not_named = false;
    let from_peer = if server_only {
        None
    } else {
        shared
            .peers
            .as_ref()
            .and_then(|p| p.fetch(zstd_id))
            .filter(|d| match named {
                Some(h) if d.id != h => {
                    warn!(zstd_id = %format!("{zstd_id:08x}"), sent = %d.id, named = %h, "a LAN peer's dictionary is not the one the manifest names; asking the server");
                    not_named = true;
                    false
                }
                _ => true,
            })
    };
    let held = match from_peer {
        Some(d) => Held {
            // One that hashes to the manifest's name needs no proof by use.
            from_peer: named.is_none(),
            dict: Arc::new(d),
            kept: false,
        },
        None => {
            let bytes = match &shared.static_base {
                Some(base) => static_dictionary(shared, base, zstd_id),
                None => shared.api.dictionary(zstd_id),
            }
            .map_err(Undecoded::Dictionary)?;
            let dict = shoal_artifact::chunk::Dictionary::from_bytes(bytes).map_err(|e| {
                Undecoded::Dictionary(ApiError::Malformed(format!(
                    "dictionary {zstd_id:08x}: {e}"
                )))
            })?;
            if dict.zstd_id != zstd_id {
                return Err(Undecoded::Dictionary(ApiError::Malformed(format!(
                    "dictionary {zstd_id:08x}: the server sent dictionary {:08x}",
                    dict.zstd_id
                ))));
            }
            if not_named
                && named == Some(dict.id)
                && let Some(p) = &shared.peers
            {
                p.refuse(zstd_id);
            }
            Held {
                dict: Arc::new(dict),
                from_peer: false,
                kept: false,
            }
        }
    };
    if let Ok(mut d) = shared.dictionaries.lock() {
        d.insert(zstd_id, held.clone());
    }
    Ok(held)
}

/// A zstd dictionary from the static chunk host.
fn static_dictionary(
    shared: &Shared,
    base: &StaticBase,
    zstd_id: u32,
) -> Result<Vec<u8>, ApiError> {
    let url = base.dictionary(zstd_id);
    let resp = shared
        .api
        .client()
        .get(&url)
        .send()
        .map_err(|e| ApiError::Transport(format!("{url}: {}", crate::cmd::chain(&e))))?;
    if !resp.status().is_success() {
        return Err(ApiError::Status {
            status: resp.status().as_u16(),
            message: format!("{url}: the static chunk host refused the dictionary"),
        });
    }
    read_counted(resp, super::api::DICTIONARY_MAX, &shared.static_bytes).map_err(|e| match e {
        StaticRead::TooLarge => ApiError::Malformed(format!(
            "{url}: larger than {} bytes",
            super::api::DICTIONARY_MAX
        )),
        StaticRead::Io(e) => ApiError::Transport(format!("{url}: {e}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_artifact::chunk::{Dictionary, encode_with, frame_dictionary_id};

    fn samples(salt: &str) -> (Vec<u8>, Vec<usize>) {
        let (mut data, mut sizes) = (Vec::new(), Vec::new());
        for i in 0..400 {
            let s = format!(
                "{salt} record {i}: name=device-{} status=ok temperature={} firmware=acme-os-{salt}\n",
                i % 17,
                i * 7 % 90
            )
            .repeat(3);
            sizes.push(s.len());
            data.extend_from_slice(s.as_bytes());
        }
        (data, sizes)
    }

    /// A static chunk host on loopback serving `bytes` to every request: its base
    /// URL and its request count.
    fn static_host(bytes: Vec<u8>) -> (String, Arc<AtomicU64>) {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let served = Arc::new(AtomicU64::new(0));
        let count = Arc::clone(&served);
        std::thread::spawn(move || {
            for conn in listener.incoming().map_while(Result::ok) {
                let mut r = BufReader::new(conn.try_clone().expect("clone"));
                let mut line = String::new();
                while r.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                count.fetch_add(1, Ordering::Relaxed);
                let mut w = conn;
                let _ = write!(
                    w,
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    bytes.len()
                );
                let _ = w.write_all(&bytes);
            }
        });
        (base, served)
    }

    /// A peer that sends `other` for any dictionary asked.
    struct Liar {
        other: Dictionary,
        refused: Mutex<Vec<u32>>,
        kept: Mutex<Vec<u32>>,
    }
    impl PeerDictionaries for Liar {
        fn fetch(&self, _zstd_id: u32) -> Option<Dictionary> {
            Some(self.other.clone())
        }
        fn refuse(&self, zstd_id: u32) {
            self.refused.lock().expect("lock").push(zstd_id);
        }
        fn keep(&self, dict: &Dictionary) {
            self.kept.lock().expect("lock").push(dict.zstd_id);
        }
    }

    fn liar(other: Dictionary) -> Arc<Liar> {
        Arc::new(Liar {
            other,
            refused: Mutex::new(Vec::new()),
            kept: Mutex::new(Vec::new()),
        })
    }

    fn shared_with(base: &str, liar: &Arc<Liar>, named: Option<ChunkId>) -> Shared {
        let server: crate::config::Server =
            toml::from_str(&format!("url = \"{base}\"\nidentity = {{ mac = \"m\" }}\n"))
                .expect("server table");
        let key = shoal_signing::SecretKey::generate().expect("key");
        Shared {
            api: Api::new(&server, key).expect("api"),
            path: "/deployments/d/chunks".into(),
            refs: Arc::new(BTreeMap::new()),
            dictionaries: Mutex::new(HashMap::new()),
            dictionary_fetch: Mutex::new(()),
            peers: Some(Arc::clone(liar) as Arc<dyn PeerDictionaries>),
            named_dictionary: named,
            cancelled: Mutex::new(HashSet::new()),
            bytes: AtomicU64::new(0),
            static_base: Some(StaticBase::parse(base).expect("base")),
            static_bytes: AtomicU64::new(0),
            aborted: AtomicBool::new(false),
            delta: None,
            delta_chunks: AtomicU64::new(0),
            static_index: std::sync::OnceLock::new(),
        }
    }

    /// A chunk compressed with `dict`: its stored form and its reference.
    fn chunk_with(dict: &Dictionary) -> (Vec<u8>, Vec<u8>, ChunkRef) {
        let data =
            b"alpha record 3: name=device-3 status=ok temperature=21 firmware=acme-os-alpha\n"
                .repeat(4);
        let stored = encode_with(&data, 3, Some(dict));
        assert_eq!(frame_dictionary_id(&stored), Some(dict.zstd_id));
        let chunk = ChunkRef {
            id: ChunkId::of(&data),
            size: data.len() as u32,
            stored_size: stored.len() as u32,
        };
        (data, stored, chunk)
    }

    /// A dictionary a peer sent that decodes a chunk wrong is dropped, its peer
    /// refused, and the chunk decoded with the server's (fetched once); the
    /// server's is kept for peers once it decoded the chunk.
    #[test]
    fn a_peer_dictionary_that_decodes_wrong_gives_way_to_the_servers() {
        let (d, z) = samples("alpha");
        let good = Dictionary::train(&d, &z, 4096).expect("a dictionary");
        let (d, z) = samples("omega");
        let other = Dictionary::train(&d, &z, 4096).expect("another dictionary");
        assert_ne!(good.zstd_id, other.zstd_id);
        let (data, stored, chunk) = chunk_with(&good);
        // The static chunk host: serves the good dictionary, counting requests.
        let (base, served) = static_host(good.bytes().to_vec());
        let liar = liar(other);
        let shared = shared_with(&base, &liar, None);
        let v = match decode(&shared, &stored, &chunk) {
            Ok(v) => v,
            Err(Undecoded::Corrupt(e) | Undecoded::Reference(e)) => panic!("corrupt: {e}"),
            Err(Undecoded::Dictionary(e)) => panic!("no dictionary: {e}"),
        };
        assert_eq!(v.data(), &data[..]);
        assert_eq!(*liar.refused.lock().expect("lock"), vec![good.zstd_id]);
        assert_eq!(*liar.kept.lock().expect("lock"), vec![good.zstd_id]);
        assert_eq!(served.load(Ordering::Relaxed), 1);
        // The next chunk uses the server's, at hand: no fetch, no refusal.
        assert!(decode(&shared, &stored, &chunk).is_ok());
        assert_eq!(served.load(Ordering::Relaxed), 1);
        assert_eq!(liar.refused.lock().expect("lock").len(), 1);
    }

    /// When the signed manifest names its dictionary (format 2), a peer's that
    /// does not hash to that name is not used, even one that carries the same zstd
    /// id and decodes the chunk at hand right: the server's is fetched, and the peer is refused since
    /// the server's is the named one. One that hashes to the name is used without
    /// asking the server.
    #[test]
    fn a_peer_dictionary_must_hash_to_the_one_the_manifest_names() {
        let (d, z) = samples("alpha");
        let good = Dictionary::train(&d, &z, 4096).expect("a dictionary");
        let (data, stored, chunk) = chunk_with(&good);
        // Other bytes under the same zstd id: that id is derived from the bytes
        // (31 bits of their BLAKE3), so a peer forging one searches about 2^31
        // variants; here the forgery is stood in for by the good bytes under
        // another BLAKE3 (what `Dictionary::from_bytes` computes from other
        // bytes). It decodes the chunk right, so only the name tells it apart.
        let mut altered = good.clone();
        altered.id = ChunkId::of(b"other bytes with the same zstd id");
        assert!(
            shoal_artifact::VerifiedChunk::decode(&stored, &chunk, Some(&altered))
                .is_ok_and(|v| v.data() == &data[..])
        );
        assert_ne!(altered.id, good.id);
        let (base, served) = static_host(good.bytes().to_vec());

        // Without a named dictionary the altered one passes (it decodes right):
        // only the name tells it apart.
        let peer = liar(altered.clone());
        let shared = shared_with(&base, &peer, None);
        assert!(decode(&shared, &stored, &chunk).is_ok());
        assert_eq!(served.load(Ordering::Relaxed), 0);

        let peer = liar(altered);
        let shared = shared_with(&base, &peer, Some(good.id));
        let v = match decode(&shared, &stored, &chunk) {
            Ok(v) => v,
            Err(Undecoded::Corrupt(e) | Undecoded::Reference(e)) => panic!("corrupt: {e}"),
            Err(Undecoded::Dictionary(e)) => panic!("no dictionary: {e}"),
        };
        assert_eq!(v.data(), &data[..]);
        assert_eq!(served.load(Ordering::Relaxed), 1, "the server's is fetched");
        assert_eq!(*peer.refused.lock().expect("lock"), vec![good.zstd_id]);
        let held = dictionary(&shared, good.zstd_id, false).unwrap_or_else(|_| panic!("held"));
        assert_eq!(held.dict.id, good.id);

        // A peer whose dictionary hashes to the name: used, the server not asked.
        let honest = liar(good.clone());
        let shared = shared_with(&base, &honest, Some(good.id));
        assert!(decode(&shared, &stored, &chunk).is_ok());
        assert_eq!(served.load(Ordering::Relaxed), 1);
        assert!(honest.refused.lock().expect("lock").is_empty());
        assert_eq!(*honest.kept.lock().expect("lock"), vec![good.zstd_id]);
    }

    /// A source whose running slot is a file of patterned bytes (returned), with
    /// per-base deltas on.
    fn delta_shared(dir: &std::path::Path) -> (Shared, Vec<u8>) {
        let path = dir.join("slot-b.img");
        let slot: Vec<u8> = (0..200_000usize).map(|i| (i * 7 + i / 251) as u8).collect();
        std::fs::write(&path, &slot).expect("write");
        let storage = shoal_bootctl::FileStorage::open(&path, false).expect("open");
        let references = crate::device::References::new(
            shoal_bootctl::Slot::B,
            Box::new(storage),
            slot.len() as u64,
            "acme-os 1".into(),
        );
        let server: crate::config::Server =
            toml::from_str("url = \"http://127.0.0.1:9\"\nidentity = { mac = \"m\" }\n")
                .expect("server table");
        let key = shoal_signing::SecretKey::generate().expect("key");
        let shared = Shared {
            api: Api::new(&server, key).expect("api"),
            path: "/deployments/d/chunks".into(),
            refs: Arc::new(BTreeMap::new()),
            dictionaries: Mutex::new(HashMap::new()),
            dictionary_fetch: Mutex::new(()),
            peers: None,
            named_dictionary: None,
            cancelled: Mutex::new(HashSet::new()),
            bytes: AtomicU64::new(0),
            static_base: None,
            static_bytes: AtomicU64::new(0),
            aborted: AtomicBool::new(false),
            delta: Some(DeltaBase {
                hash: [1; 32],
                release: [2; 32],
                references: Mutex::new(references),
                off: AtomicBool::new(false),
            }),
            delta_chunks: AtomicU64::new(0),
            static_index: std::sync::OnceLock::new(),
        };
        (shared, slot)
    }

    /// A per-base delta record decodes against the running slot's bytes, checked
    /// against the record's hash; a slot that does not hold them, a range past the
    /// slot's end and a frame that decodes to other bytes are refused, each with
    /// its own error, and no chunk comes out of them.
    #[test]
    fn delta_records_decode_against_the_running_slot_and_bad_ones_are_refused() {
        use shoal_artifact::delta_record::DeltaRecord;
        let dir = tempfile::tempdir().expect("tempdir");
        let (shared, slot) = delta_shared(dir.path());
        // The chunk: slot bytes 70 000.. with a few edits.
        let mut data = slot[70_000..90_000].to_vec();
        data[100..108].copy_from_slice(b"REBUILT!");
        data.extend_from_slice(b"a new tail");
        let chunk = ChunkRef {
            id: ChunkId::of(&data),
            size: data.len() as u32,
            stored_size: 0,
        };
        let ranges = vec![(65_536u64, 32_768u32)];
        let reference = &slot[65_536..65_536 + 32_768];
        let record = DeltaRecord {
            ranges: ranges.clone(),
            hash: *blake3::hash(reference).as_bytes(),
            frame: shoal_artifact::chunk::encode_against(&data, 3, reference),
        };
        assert!(record.frame.len() < 200, "{}", record.frame.len());
        let v = match decode_delta(&shared, &record, &chunk) {
            Ok(v) => v,
            Err(Undecoded::Corrupt(e) | Undecoded::Reference(e)) => panic!("{e}"),
            Err(Undecoded::Dictionary(e)) => panic!("{e}"),
        };
        assert_eq!(v.data(), &data[..]);
        assert_eq!(shared.delta_chunks.load(Ordering::Relaxed), 1);

        let refused = |r: &DeltaRecord| match decode_delta(&shared, r, &chunk) {
            Ok(_) => panic!("decoded {:?} {}", r.ranges, hex::encode(r.hash)),
            Err(Undecoded::Reference(m)) => format!("reference: {m}"),
            Err(Undecoded::Corrupt(m)) => format!("corrupt: {m}"),
            Err(Undecoded::Dictionary(e)) => format!("dictionary: {e}"),
        };
        // The slot's bytes there are not what the server encoded against.
        let mut wrong = record.clone();
        wrong.hash = [0xab; 32];
        let m = refused(&wrong);
        assert!(
            m.starts_with(
                "reference: the running slot's bytes 65536+32768 are not the base release's"
            ),
            "{m}"
        );
        // A range past the slot's end (another hash: bytes already read are found
        // by their hash, whatever ranges name them).
        let mut past = record.clone();
        past.ranges = vec![(190_000, 20_000)];
        past.hash = [0xcd; 32];
        let m = refused(&past);
        assert!(
            m.starts_with("reference: cannot read the reference bytes 190000+20000"),
            "{m}"
        );
        // A frame of other bytes against the right reference: the chunk's hash.
        let mut other = record.clone();
        let mut lie = data.clone();
        lie[0] ^= 1;
        other.frame = shoal_artifact::chunk::encode_against(&lie, 3, reference);
        let m = refused(&other);
        assert!(m.starts_with("corrupt: ") && m.contains("hash"), "{m}");
        // A frame cut short.
        let mut cut = record.clone();
        cut.frame.truncate(cut.frame.len() - 3);
        assert!(refused(&cut).starts_with("corrupt: "));
        assert_eq!(shared.delta_chunks.load(Ordering::Relaxed), 1);
    }

    fn id(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    fn frame(id: ChunkId, data: &[u8]) -> Vec<u8> {
        let mut out = id.as_bytes().to_vec();
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        out
    }

    fn read_all(body: &[u8], asked: &[ChunkId]) -> Result<Vec<Vec<u8>>, BatchError> {
        let mut r = BatchReader::new(body, asked);
        let mut out = Vec::new();
        while let Some((_, stored)) = r.next_frame()? {
            out.push(stored);
        }
        Ok(out)
    }

    #[test]
    fn parses_frames_in_order() {
        let mut body = frame(id(1), b"abc");
        body.extend(frame(id(2), b""));
        let got = read_all(&body, &[id(1), id(2)]).expect("valid");
        assert_eq!(got, vec![b"abc".to_vec(), Vec::new()]);
        assert_eq!(read_all(&[], &[]), Ok(vec![]));
    }

    #[test]
    fn malformed_batches_are_refused_precisely() {
        let body = frame(id(1), b"abcdef");
        assert_eq!(
            read_all(&body[..20], &[id(1)]),
            Err(BatchError::TruncatedHeader { index: 0 })
        );
        assert_eq!(
            read_all(&body[..38], &[id(1)]),
            Err(BatchError::TruncatedChunk {
                index: 0,
                declared: 6
            })
        );
        assert_eq!(
            read_all(&body, &[id(2)]),
            Err(BatchError::WrongId {
                index: 0,
                want: id(2),
                got: id(1)
            })
        );
        assert_eq!(
            read_all(&body, &[id(1), id(2)]),
            Err(BatchError::TruncatedHeader { index: 1 })
        );
        let mut long = body.clone();
        long.extend_from_slice(b"xyz");
        assert_eq!(read_all(&long, &[id(1)]), Err(BatchError::Trailing));
        // A huge declared length is refused before anything is allocated for it.
        let mut huge = id(1).as_bytes().to_vec();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            read_all(&huge, &[id(1)]),
            Err(BatchError::TooLong {
                index: 0,
                declared: u32::MAX
            })
        );
        // Transport failures are retried; wrong bytes drop the source.
        assert!(
            BatchError::TruncatedChunk {
                index: 0,
                declared: 1
            }
            .is_transport()
        );
        assert!(!BatchError::Trailing.is_transport());
        assert!(
            !BatchError::TooLong {
                index: 0,
                declared: 1
            }
            .is_transport()
        );
    }
}
