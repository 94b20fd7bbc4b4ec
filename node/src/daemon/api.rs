//! The server's device API (`/api/devices/v1`) over blocking HTTP: signed auth
//! requests, the next deployment, its signed manifest, status reports, inventory.
//!
//! Every wait is bounded: connecting ([`CONNECT_TIMEOUT`]), and each request and
//! each read of a body ([`IO_TIMEOUT`], reqwest's blocking timeout, which also
//! bounds an idle body).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::blocking::{Client, RequestBuilder, Response};
use serde::Deserialize;
use shoal_signing::SecretKey;

use crate::config::Server;

/// The longest wait for a TCP (and TLS) connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest wait for a response, and for each read of its body.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest signed manifest envelope accepted (the server's own cap is lower).
pub const MANIFEST_MAX: u64 = 64 * 1024 * 1024;
/// Content type of a manifest the server sends as a delta against one the device
/// keeps.
pub const MANIFEST_DELTA_TYPE: &str = "application/vnd.shoal.manifest-delta.v1";
/// The largest zstd dictionary accepted.
pub const DICTIONARY_MAX: u64 = 16 * 1024 * 1024;

/// Why a call to the server did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No connection, a timeout, a cut connection: try again later.
    #[error("cannot reach the server: {0}")]
    Transport(String),
    /// The server's TLS certificate was not trusted: a wrong or missing
    /// `server.ca_certificate` (or someone in between). Retried like a transport
    /// failure: the server's certificate may be fixed.
    #[error(
        "the server's TLS certificate is not trusted ({0}); server.ca_certificate must name the CA that signed it"
    )]
    Tls(String),
    /// The device is not accepted (yet): pending, rejected or decommissioned.
    #[error("the server does not accept this device yet: {0}")]
    NotAccepted(String),
    /// 409: the deployment was aborted (or the device decommissioned).
    #[error("the server ended this deployment: {0}")]
    Conflict(String),
    /// The server answered an error status.
    #[error("the server answered {status}: {message}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// Its JSON error message, or the body's start.
        message: String,
    },
    /// The server answered something that is not the API's shape.
    #[error("the server's answer is malformed: {0}")]
    Malformed(String),
}

impl ApiError {
    /// Whether retrying later can help (transport trouble, 5xx, 429, 401).
    pub fn is_transient(&self) -> bool {
        match self {
            ApiError::Transport(_) | ApiError::Tls(_) | ApiError::NotAccepted(_) => true,
            ApiError::Status { status, .. } => *status >= 500 || *status == 429,
            ApiError::Conflict(_) | ApiError::Malformed(_) => false,
        }
    }
}

fn transport(e: reqwest::Error) -> ApiError {
    let chain = crate::cmd::chain(&e);
    // rustls's verdict, as the error chain words it ("invalid peer certificate:
    // UnknownIssuer", "... NotValidForName", "... Expired").
    match chain.find("invalid peer certificate") {
        Some(at) => ApiError::Tls(chain[at..].to_owned()),
        None => ApiError::Transport(chain),
    }
}

/// The error of a non-success response.
pub fn error_of(resp: Response) -> ApiError {
    let status = resp.status();
    let body = resp.text().unwrap_or_default();
    let message = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_else(|| body.chars().take(200).collect());
    match status {
        StatusCode::CONFLICT => ApiError::Conflict(message),
        StatusCode::UNAUTHORIZED => ApiError::NotAccepted(message),
        s => ApiError::Status {
            status: s.as_u16(),
            message,
        },
    }
}

/// A deployment's signed manifest as the server sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Manifest {
    /// The signed envelope (canonical CBOR).
    Envelope(Vec<u8>),
    /// A manifest delta ([`shoal_artifact::manifest_delta::ManifestDelta`]'s bytes)
    /// against a manifest the device named as held.
    Delta(Vec<u8>),
}

/// A deployment for this device (`GET /deployments/next`).
#[derive(Debug, Clone, Deserialize)]
pub struct NextDeployment {
    /// The deployment's id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// The release.
    pub release: ReleaseRef,
    /// A static host serving the server's chunk store (see
    /// [`shoal_node::chunk_url`]), to fetch chunks from instead of the server.
    #[serde(default)]
    pub chunk_base_url: Option<String>,
}

/// The release of a [`NextDeployment`].
#[derive(Debug, Clone, Deserialize)]
pub struct ReleaseRef {
    /// The release's id: BLAKE3 of its manifest CBOR (servers before session 7's
    /// devices always sent it; the device checks the manifest it gets against it).
    #[serde(default)]
    pub id: Option<String>,
    /// Release name.
    pub name: String,
    /// Release version.
    pub version: String,
}

#[derive(Debug, Deserialize)]
struct Nonce {
    nonce: String,
}

#[derive(Debug, Deserialize)]
struct Token {
    token: String,
    device_id: String,
}

/// A device's connection to its server; cheap to clone (one connection pool).
#[derive(Clone)]
pub struct Api {
    http: Client,
    base: String,
    key: Arc<SecretKey>,
    identity: BTreeMap<String, String>,
    token: Arc<RwLock<Option<String>>>,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl Api {
    /// A client for `server`, authenticating with `key`.
    pub fn new(server: &Server, key: SecretKey) -> anyhow::Result<Api> {
        #[allow(deprecated)]
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(IO_TIMEOUT)
            .user_agent(concat!("shoal-daemon/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &server.ca_certificate {
            let pem = std::fs::read(ca).map_err(|e| {
                crate::cmd::Exit::usage(format!("server.ca_certificate {}: {e}", ca.display()))
            })?;
            let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| {
                crate::cmd::Exit::usage(format!(
                    "server.ca_certificate {} is not a PEM certificate: {e}",
                    ca.display()
                ))
            })?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder
            .build()
            .map_err(|e| anyhow::anyhow!("cannot make the HTTP client: {e}"))?;
        Ok(Api {
            http,
            base: format!("{}/api/devices/v1", server.url.trim_end_matches('/')),
            key: Arc::new(key),
            identity: server.identity.clone(),
            token: Arc::new(RwLock::new(None)),
        })
    }

    /// The HTTP client (its connection pool, timeouts and trusted CAs), for
    /// requests to other hosts the server names (a static chunk host).
    pub fn client(&self) -> &Client {
        &self.http
    }

    /// This device's id on the server (its key's id, hex).
    pub fn device_id(&self) -> String {
        hex::encode(self.key.public().id().0)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Authenticates: a fresh nonce, the auth request signed with the device key.
    /// [`ApiError::NotAccepted`] while the device is pending or rejected.
    pub fn authenticate(&self) -> Result<(), ApiError> {
        let resp = self
            .http
            .get(self.url("/authentication/nonce"))
            .send()
            .map_err(transport)?;
        if !resp.status().is_success() {
            return Err(error_of(resp));
        }
        let nonce: Nonce = resp
            .json()
            .map_err(|e| ApiError::Malformed(format!("nonce: {e}")))?;
        let body = serde_json::to_vec(&serde_json::json!({
            "identity": self.identity,
            "public_key": hex::encode(self.key.public().to_bytes()),
            "nonce": nonce.nonce,
        }))
        .map_err(|e| ApiError::Malformed(e.to_string()))?;
        let sig = hex::encode(self.key.sign(&body));
        let resp = self
            .http
            .post(self.url("/authentication/auth_requests"))
            .header("content-type", "application/json")
            .header("x-shoal-signature", sig)
            .body(body)
            .send()
            .map_err(transport)?;
        if !resp.status().is_success() {
            return Err(error_of(resp));
        }
        let token: Token = resp
            .json()
            .map_err(|e| ApiError::Malformed(format!("auth token: {e}")))?;
        if token.device_id != self.device_id() {
            return Err(ApiError::Malformed(format!(
                "the token is for device {}, not this one",
                token.device_id
            )));
        }
        *self.token.write().unwrap_or_else(|p| p.into_inner()) = Some(token.token);
        Ok(())
    }

    /// Whether the device holds a token.
    pub fn has_token(&self) -> bool {
        self.token
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Forgets the token (it expired: the next call authenticates again).
    pub fn forget_token(&self) {
        *self.token.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Sends `build(url)` with the bearer token, authenticating first if needed
    /// and once more if the token expired.
    pub fn send(
        &self,
        path: &str,
        build: impl Fn(&Client, String) -> RequestBuilder,
    ) -> Result<Response, ApiError> {
        for attempt in 0..2 {
            if !self.has_token() {
                self.authenticate()?;
            }
            let token = self
                .token
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .unwrap_or_default();
            let resp = build(&self.http, self.url(path))
                .bearer_auth(token)
                .send()
                .map_err(transport)?;
            if resp.status() == StatusCode::UNAUTHORIZED && attempt == 0 {
                self.forget_token();
                continue;
            }
            return Ok(resp);
        }
        Err(ApiError::NotAccepted("the token was refused twice".into()))
    }

    /// The next deployment for this device, if any.
    pub fn next(&self) -> Result<Option<NextDeployment>, ApiError> {
        let resp = self.send("/deployments/next", |c, u| c.get(u))?;
        match resp.status() {
            StatusCode::NO_CONTENT => Ok(None),
            s if s.is_success() => resp
                .json()
                .map(Some)
                .map_err(|e| ApiError::Malformed(format!("next deployment: {e}"))),
            _ => Err(error_of(resp)),
        }
    }

    /// A fresh fleet membership credential and the revoked keys; `None` when the
    /// server issues none (404). The credential is the server's word only: the LAN
    /// layer verifies it against the trust root before showing it.
    pub fn credential(&self) -> Result<Option<IssuedCredential>, ApiError> {
        let resp = self.send("/credential", |c, u| c.get(u))?;
        match resp.status() {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => {
                let body = read_capped(resp, CREDENTIAL_ANSWER_MAX, "the credential")?;
                let c: IssuedCredential = serde_json::from_slice(&body)
                    .map_err(|e| ApiError::Malformed(format!("credential: {e}")))?;
                Ok(Some(c))
            }
            _ => Err(error_of(resp)),
        }
    }

    /// The deployment's signed manifest (not yet verified): its envelope, or, when
    /// `held` names manifests this device keeps (its running release's first) and
    /// the server holds one of them too, a manifest delta against it (servers from
    /// before ignore `held` and send the envelope).
    pub fn manifest(&self, deployment: &str, held: &[[u8; 32]]) -> Result<Manifest, ApiError> {
        let mut path = format!("/deployments/{deployment}/manifest");
        if !held.is_empty() {
            let list: Vec<String> = held.iter().map(hex::encode).collect();
            path.push_str("?held=");
            path.push_str(&list.join(","));
        }
        let resp = self.send(&path, |c, u| c.get(u))?;
        if !resp.status().is_success() {
            return Err(error_of(resp));
        }
        let delta = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .is_some_and(|t| t.as_bytes() == MANIFEST_DELTA_TYPE.as_bytes());
        let bytes = read_capped(resp, MANIFEST_MAX, "the manifest")?;
        Ok(if delta {
            Manifest::Delta(bytes)
        } else {
            Manifest::Envelope(bytes)
        })
    }

    /// A zstd dictionary by id.
    pub fn dictionary(&self, zstd_id: u32) -> Result<Vec<u8>, ApiError> {
        let resp = self.send(&format!("/dictionaries/{zstd_id:08x}"), |c, u| c.get(u))?;
        if !resp.status().is_success() {
            return Err(error_of(resp));
        }
        read_capped(resp, DICTIONARY_MAX, "the dictionary")
    }

    /// Reports a deployment state (Mender's names); [`ApiError::Conflict`] once the
    /// deployment was aborted.
    pub fn status(
        &self,
        deployment: &str,
        status: &str,
        substate: Option<&str>,
    ) -> Result<(), ApiError> {
        let mut body = serde_json::json!({ "status": status });
        if let Some(s) = substate {
            // The server keeps at most 256 bytes.
            let mut s = s.to_owned();
            while s.len() > 256 {
                s.pop();
            }
            body["substate"] = s.into();
        }
        let resp = self.send(&format!("/deployments/{deployment}/status"), |c, u| {
            c.put(u).json(&body)
        })?;
        if !resp.status().is_success() {
            return Err(error_of(resp));
        }
        Ok(())
    }

    /// Says where this device's LAN layer listens (multiaddrs without `/p2p`)
    /// and returns the other accepted devices the server sees behind the same
    /// public address. A hint only: whom the LAN serves is decided by credentials.
    pub fn lan_peers(&self, addrs: &[String]) -> Result<LanPeers, ApiError> {
        let body = serde_json::json!({ "addrs": addrs });
        let resp = self.send("/lan/peers", |c, u| c.post(u).json(&body))?;
        if !resp.status().is_success() {
            return Err(error_of(resp));
        }
        let body = read_capped(resp, LAN_PEERS_ANSWER_MAX, "the LAN peers")?;
        serde_json::from_slice(&body).map_err(|e| ApiError::Malformed(format!("LAN peers: {e}")))
    }

    /// Replaces the device's inventory attributes.
    pub fn inventory(&self, attributes: &BTreeMap<String, String>) -> Result<(), ApiError> {
        let list: Vec<serde_json::Value> = attributes
            .iter()
            .map(|(k, v)| serde_json::json!({ "name": k, "value": v }))
            .collect();
        let resp = self.send("/inventory/attributes", |c, u| c.put(u).json(&list))?;
        if !resp.status().is_success() {
            return Err(error_of(resp));
        }
        Ok(())
    }
}

/// A response body of at most `max` bytes.
pub fn read_capped(resp: Response, max: u64, what: &str) -> Result<Vec<u8>, ApiError> {
    use std::io::Read;
    if resp.content_length().is_some_and(|n| n > max) {
        return Err(ApiError::Malformed(format!(
            "{what} is larger than {max} bytes"
        )));
    }
    let mut buf = Vec::new();
    resp.take(max + 1)
        .read_to_end(&mut buf)
        .map_err(|e| ApiError::Transport(format!("reading {what}: {e}")))?;
    if buf.len() as u64 > max {
        return Err(ApiError::Malformed(format!(
            "{what} is larger than {max} bytes"
        )));
    }
    Ok(buf)
}

/// The largest answer to `GET /credential` read (a credential and up to a few
/// thousand revoked keys).
const CREDENTIAL_ANSWER_MAX: u64 = 1 << 20;

/// The largest answer to `POST /lan/peers` read (64 peers of 16 addresses).
const LAN_PEERS_ANSWER_MAX: u64 = 1 << 20;

/// The devices behind this device's public address (`POST /lan/peers`).
#[derive(Debug, serde::Deserialize)]
pub struct LanPeers {
    /// The public address the server sees.
    pub source_ip: String,
    /// The other devices there.
    pub peers: Vec<LanPeer>,
}

/// One device behind the same public address.
#[derive(Debug, serde::Deserialize)]
pub struct LanPeer {
    /// Its ed25519 key, hex (its peer id).
    pub public_key: String,
    /// Where it said it listens.
    pub addrs: Vec<String>,
}

/// A fleet membership credential issued by the server (`GET /credential`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct IssuedCredential {
    /// The signed credential, hex.
    pub credential: String,
    /// The fleet.
    pub fleet: String,
    /// When it expires (Unix seconds).
    pub expires_unix_s: u64,
    /// Keys (hex) of decommissioned devices to refuse.
    pub revoked: Vec<String>,
}
