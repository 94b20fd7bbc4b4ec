//! `shoal admin`: the management API from the command line.
//!
//! Every command is one or two HTTP requests to `--server` with the API token in
//! `--token` (or `SHOAL_SERVER` / `SHOAL_TOKEN`). Data goes to stdout (tables, or
//! the server's JSON with `--json`); errors are one line on stderr. Exit codes:
//! 0 ok; 1 the server refused (404, 409, 413, 422); 2 usage or a request the
//! server found malformed or unauthorized (400, 401, 403); 75 the server is
//! unreachable or failed (5xx), safe to retry.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args as ClapArgs, Subcommand};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use super::{EXIT_FAILED, EXIT_TEMPFAIL, EXIT_USAGE, Exit};

/// Manage a Shoal server over its management API.
///
/// Example: shoal admin --server http://srv:8440 --token st_... devices list --status pending
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// The server's base URL.
    #[arg(long, env = "SHOAL_SERVER", value_name = "URL", global = true)]
    server: Option<String>,
    /// An API token (from `shoal server token` or `shoal admin tokens create`).
    #[arg(
        long,
        env = "SHOAL_TOKEN",
        value_name = "TOKEN",
        global = true,
        hide_env_values = true
    )]
    token: Option<String>,
    /// A PEM CA certificate to trust for an https server (besides the system's).
    #[arg(long, value_name = "FILE", global = true)]
    ca_cert: Option<PathBuf>,
    /// Print the server's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Devices: list, show, accept, reject, preauthorize, decommission.
    #[command(subcommand)]
    Devices(Devices),
    /// Static and dynamic device groups.
    #[command(subcommand)]
    Groups(Groups),
    /// Releases: upload, list, show, delete, delta preview.
    #[command(subcommand)]
    Releases(Releases),
    /// Deployments: create, list, show, per-device status and logs, abort, retry,
    /// pause, resume.
    #[command(subcommand)]
    Deployments(Deployments),
    /// API tokens (admin role).
    #[command(subcommand)]
    Tokens(Tokens),
    /// Show the audit log, newest first (admin role).
    Audit {
        /// How many entries.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

#[derive(Debug, Subcommand)]
enum Devices {
    /// List devices.
    ///
    /// Example: shoal admin devices list --status accepted --where device_type=rpi4
    List {
        /// Only devices with this status (pending, accepted, rejected, preauthorized).
        #[arg(long)]
        status: Option<String>,
        /// An inventory filter, e.g. 'device_type=acme and region in (eu,us)' (also !=,
        /// not in, exists, not exists, <, <=, >, >=); repeatable, all must hold.
        #[arg(long = "where", value_name = "COND")]
        conditions: Vec<String>,
    },
    /// Show one device with its identity and inventory.
    Show {
        /// The device id.
        id: String,
    },
    /// Accept a pending (or rejected) device.
    Accept {
        /// The device id.
        id: String,
    },
    /// Reject a device; its tokens stop working at once.
    Reject {
        /// The device id.
        id: String,
    },
    /// Preauthorize a device key: its first auth request is accepted.
    ///
    /// Example: shoal admin devices preauthorize --public-key-file dev.pub --identity serial=42
    Preauthorize {
        /// The device's public key (PEM, as `shoal key` writes it).
        #[arg(long, value_name = "FILE")]
        public_key_file: PathBuf,
        /// An identity attribute, name=value; repeatable.
        #[arg(long, value_name = "NAME=VALUE")]
        identity: Vec<String>,
    },
    /// Decommission a device: remove it, its tokens and inventory.
    Decommission {
        /// The device id.
        id: String,
    },
    /// A device's signed status reports by sequence number, with the times the device
    /// recorded (also those of offline installs, delivered later).
    ///
    /// Example: shoal admin devices reports <device-id> --after 100
    Reports {
        /// The device id.
        id: String,
        /// Only reports with a larger sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// At most this many (1 to 10000).
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
}

#[derive(Debug, Subcommand)]
enum Groups {
    /// List groups.
    List,
    /// Show a group.
    Show {
        /// The group's name.
        name: String,
    },
    /// Create or replace a group: static with --device, dynamic with --where.
    ///
    /// Example: shoal admin groups set berlin --where site=berlin --where device_type=rpi4
    Set {
        /// The group's name.
        name: String,
        /// A device id (static group); repeatable.
        #[arg(long = "device", value_name = "ID", conflicts_with = "conditions")]
        devices: Vec<String>,
        /// An inventory filter (dynamic group), as for `devices list --where`; repeatable.
        #[arg(long = "where", value_name = "COND")]
        conditions: Vec<String>,
    },
    /// Delete a group (its devices stay).
    Delete {
        /// The group's name.
        name: String,
    },
    /// List the devices in a group now.
    Devices {
        /// The group's name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum Releases {
    /// List releases.
    List,
    /// Upload a `.shoal` artifact; the server verifies it against its trust root.
    ///
    /// Example: shoal admin releases upload acme-os-2.0.shoal
    Upload {
        /// The artifact.
        file: PathBuf,
    },
    /// Show a release.
    Show {
        /// The release id.
        id: String,
    },
    /// Delete a release (refused while a deployment uses it).
    Delete {
        /// The release id.
        id: String,
    },
    /// What devices on each installed release must download for this release.
    Delta {
        /// The release id.
        id: String,
    },
    /// The release's per-base encodings: each base's state (queued, running,
    /// done, failed), whether the server queued it (auto) or an operator asked,
    /// the figures and the saving.
    Encodings {
        /// The release id.
        id: String,
    },
    /// Delta-encode the release's changed chunks against a base release, so
    /// devices running the base download those (per-base encodings); prints what a
    /// device on the base downloads, plain and encoded. Runs on the server (one
    /// encoding at a time) and waits for it.
    ///
    /// Example: shoal admin releases encode 3f2a…c1 --base 9b07…44
    Encode {
        /// The release id.
        id: String,
        /// The id of the base release (one devices run).
        #[arg(long)]
        base: String,
    },
}

#[derive(Debug, Subcommand)]
enum Deployments {
    /// List deployments, newest first.
    List,
    /// Deploy a release to devices, a group, or an inventory filter.
    ///
    /// Example: shoal admin deployments create --name q3 --release 1f0c... --group berlin
    Create {
        /// A name for people.
        #[arg(long)]
        name: String,
        /// The release id.
        #[arg(long)]
        release: String,
        /// A device id; repeatable.
        #[arg(long = "device", value_name = "ID")]
        devices: Vec<String>,
        /// A group.
        #[arg(long)]
        group: Option<String>,
        /// An inventory filter, as for `devices list --where`; repeatable.
        #[arg(long = "where", value_name = "COND")]
        conditions: Vec<String>,
        /// The rollout policy as JSON, or @FILE: phases (size {"count":N},
        /// {"percent":P} or "rest"; proceed {"successes":{"percent":90},
        /// "delay_ms":3600000}), failures_max ({"count":N} or {"percent":P}) that
        /// halts, retries, seed. Default: everyone at once.
        ///
        /// Example: --policy '{"phases":[{"size":{"count":1},"proceed":{"successes":{"count":1}}},{"size":"rest"}],"failures_max":{"count":0}}'
        #[arg(long, value_name = "JSON|@FILE")]
        policy: Option<String>,
    },
    /// Open the next rollout phase now.
    NextPhase {
        /// The deployment id.
        id: String,
    },
    /// Show a deployment with counts per state.
    Show {
        /// The deployment id.
        id: String,
    },
    /// Each device's state in a deployment.
    Devices {
        /// The deployment id.
        id: String,
    },
    /// A device's log for a deployment.
    Log {
        /// The deployment id.
        id: String,
        /// The device id.
        device: String,
    },
    /// Abort: devices stop at their next request.
    Abort {
        /// The deployment id.
        id: String,
    },
    /// Retry the failed devices.
    Retry {
        /// The deployment id.
        id: String,
    },
    /// Pause: devices get no new work from it until resumed.
    Pause {
        /// The deployment id.
        id: String,
    },
    /// Resume a paused or halted deployment.
    Resume {
        /// The deployment id.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum Tokens {
    /// List tokens.
    List,
    /// Make a token; prints its secret once.
    Create {
        /// Who or what it is for.
        #[arg(long)]
        name: String,
        /// viewer, operator or admin.
        #[arg(long)]
        role: String,
    },
    /// Revoke a token.
    Revoke {
        /// The token id.
        id: String,
    },
}

struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

fn http_error(e: reqwest::Error) -> anyhow::Error {
    Exit::tempfail(format!("cannot reach the server: {}", super::chain(&e)))
}

impl Client {
    fn new(args: &Args) -> anyhow::Result<Client> {
        let base = args
            .server
            .clone()
            .ok_or_else(|| Exit::usage("--server URL (or SHOAL_SERVER) is required"))?;
        let token = args
            .token
            .clone()
            .ok_or_else(|| Exit::usage("--token TOKEN (or SHOAL_TOKEN) is required"))?;
        // reqwest's rustls uses the process-wide provider: ring, never aws-lc (the
        // project's rule, for cross-compiled devices). rustls deprecates ring's
        // provider only for lacking post-quantum key exchange.
        #[allow(deprecated)]
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60));
        if let Some(path) = &args.ca_cert {
            let pem = std::fs::read(path)
                .map_err(|e| Exit::usage(format!("--ca-cert {}: {e}", path.display())))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| Exit::usage(format!("--ca-cert {}: {e}", path.display())))?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder.build().context("cannot set up the HTTP client")?;
        Ok(Client {
            http,
            base: base.trim_end_matches('/').to_owned(),
            token,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/management/v1{path}", self.base)
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(http_error)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(http_error)?;
        if status.is_success() {
            if bytes.is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_slice(&bytes).context("the server's answer is not JSON");
        }
        let message = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).trim().to_owned());
        let code = match status {
            StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                EXIT_USAGE
            }
            s if s.is_server_error() => EXIT_TEMPFAIL,
            _ => EXIT_FAILED,
        };
        Err(anyhow::Error::new(Exit {
            code,
            message: format!("server answered {status}: {message}"),
        }))
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let mut req = self.http.request(method, self.url(path));
        if let Some(b) = body {
            req = req.json(&b);
        }
        self.send(req).await
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        self.call(Method::POST, path, body).await
    }
}

/// Runs `shoal admin`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let client = Client::new(&args)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let json = args.json;
    let (value, view) = rt.block_on(execute(&client, args.command))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print_view(&value, view);
    }
    Ok(())
}

/// How to print an answer as text.
#[derive(Debug, Clone, Copy)]
enum View {
    /// A list of objects: these columns.
    Table(&'static [&'static str]),
    /// One object: its fields, one per line.
    Object,
    /// Nothing (204).
    Done(&'static str),
    /// Just the token secret.
    Secret,
}

const DEVICE_COLS: &[&str] = &["id", "status", "identity", "inventory"];
const RELEASE_COLS: &[&str] = &[
    "id",
    "name",
    "version",
    "chunks",
    "stored_bytes",
    "payload_bytes",
];
const DEPLOYMENT_COLS: &[&str] = &["id", "name", "status", "release_id", "stats", "halt_reason"];

async fn execute(c: &Client, command: Command) -> anyhow::Result<(Value, View)> {
    Ok(match command {
        Command::Devices(d) => match d {
            Devices::List { status, conditions } => {
                let mut q: Vec<(&str, String)> = Vec::new();
                if let Some(s) = status {
                    q.push(("status", s));
                }
                for w in conditions {
                    q.push(("filter", w));
                }
                let req = c.http.get(c.url("/devices")).query(&q);
                (c.send(req).await?, View::Table(DEVICE_COLS))
            }
            Devices::Show { id } => (c.get(&format!("/devices/{id}")).await?, View::Object),
            Devices::Accept { id } => (
                c.post(&format!("/devices/{id}/accept"), None).await?,
                View::Object,
            ),
            Devices::Reject { id } => (
                c.post(&format!("/devices/{id}/reject"), None).await?,
                View::Object,
            ),
            Devices::Preauthorize {
                public_key_file,
                identity,
            } => {
                let key = shoal_signing::PublicKey::load(&public_key_file).map_err(|e| {
                    Exit::usage(format!(
                        "{}: {}",
                        public_key_file.display(),
                        super::chain(&e)
                    ))
                })?;
                let identity = pairs(&identity)?;
                let body =
                    json!({ "identity": identity, "public_key": hex::encode(key.to_bytes()) });
                (c.post("/devices", Some(body)).await?, View::Object)
            }
            Devices::Decommission { id } => (
                c.call(Method::DELETE, &format!("/devices/{id}"), None)
                    .await?,
                View::Done("decommissioned"),
            ),
            Devices::Reports { id, after, limit } => {
                let req = c
                    .http
                    .get(c.url(&format!("/devices/{id}/reports")))
                    .query(&[("after", after.to_string()), ("limit", limit.to_string())]);
                (
                    c.send(req).await?,
                    View::Table(&[
                        "seq",
                        "at_ms",
                        "origin",
                        "status",
                        "release_name",
                        "release_version",
                        "deployment_id",
                        "substate",
                        "relayed_by",
                    ]),
                )
            }
        },
        Command::Groups(g) => match g {
            Groups::List => (
                c.get("/groups").await?,
                View::Table(&["name", "kind", "devices", "filter"]),
            ),
            Groups::Show { name } => (c.get(&format!("/groups/{name}")).await?, View::Object),
            Groups::Set {
                name,
                devices,
                conditions,
            } => {
                let body = if conditions.is_empty() {
                    json!({ "devices": devices })
                } else {
                    json!({ "filter": conditions })
                };
                (
                    c.call(Method::PUT, &format!("/groups/{name}"), Some(body))
                        .await?,
                    View::Object,
                )
            }
            Groups::Delete { name } => (
                c.call(Method::DELETE, &format!("/groups/{name}"), None)
                    .await?,
                View::Done("deleted"),
            ),
            Groups::Devices { name } => (
                c.get(&format!("/groups/{name}/devices")).await?,
                View::Table(DEVICE_COLS),
            ),
        },
        Command::Releases(r) => match r {
            Releases::List => (c.get("/releases").await?, View::Table(RELEASE_COLS)),
            Releases::Upload { file } => {
                let f = tokio::fs::File::open(&file)
                    .await
                    .map_err(|e| Exit::usage(format!("{}: {e}", file.display())))?;
                let len = f
                    .metadata()
                    .await
                    .with_context(|| format!("cannot stat {}", file.display()))?
                    .len();
                let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(
                    f,
                    256 * 1024,
                ));
                let req = c
                    .http
                    .post(c.url("/releases"))
                    .header(
                        reqwest::header::CONTENT_TYPE,
                        "application/vnd.shoal.artifact",
                    )
                    .header(reqwest::header::CONTENT_LENGTH, len)
                    .timeout(Duration::from_secs(24 * 3600))
                    .body(body);
                (c.send(req).await?, View::Object)
            }
            Releases::Show { id } => {
                let mut v = c.get(&format!("/releases/{id}")).await?;
                let e = c.get(&format!("/releases/{id}/encodings")).await?;
                if let Some(o) = v.as_object_mut() {
                    o.insert("encodings".into(), e);
                }
                (v, View::Object)
            }
            Releases::Encodings { id } => (
                c.get(&format!("/releases/{id}/encodings")).await?,
                View::Table(&[
                    "base",
                    "base_name",
                    "base_version",
                    "state",
                    "origin",
                    "devices",
                    "chunks_delta",
                    "plain_bytes",
                    "encoded_bytes",
                    "saving",
                    "error",
                ]),
            ),
            Releases::Delete { id } => (
                c.call(Method::DELETE, &format!("/releases/{id}"), None)
                    .await?,
                View::Done("deleted"),
            ),
            Releases::Encode { id, base } => {
                let req = c
                    .http
                    .post(c.url(&format!("/releases/{id}/encodings")))
                    .json(&json!({ "base": base }))
                    .timeout(Duration::from_secs(24 * 3600));
                (c.send(req).await?, View::Object)
            }
            Releases::Delta { id } => {
                let v = c.get(&format!("/releases/{id}/delta")).await?;
                let rows = v.get("installed").cloned().unwrap_or(Value::Null);
                return Ok((
                    if rows.is_array() { rows } else { v },
                    View::Table(&[
                        "installed_name",
                        "installed_version",
                        "known",
                        "devices",
                        "chunks",
                        "bytes",
                    ]),
                ));
            }
        },
        Command::Deployments(d) => match d {
            Deployments::List => (c.get("/deployments").await?, View::Table(DEPLOYMENT_COLS)),
            Deployments::Create {
                name,
                release,
                devices,
                group,
                conditions,
                policy,
            } => {
                let mut body = json!({ "name": name, "release": release });
                if let Some(p) = policy {
                    let text = match p.strip_prefix('@') {
                        Some(path) => std::fs::read_to_string(path)
                            .map_err(|e| Exit::usage(format!("--policy {path}: {e}")))?,
                        None => p,
                    };
                    let v: Value = serde_json::from_str(&text)
                        .map_err(|e| Exit::usage(format!("--policy is not JSON: {e}")))?;
                    body["policy"] = v;
                }
                let targets = usize::from(!devices.is_empty())
                    + usize::from(group.is_some())
                    + usize::from(!conditions.is_empty());
                if targets != 1 {
                    return Err(Exit::usage(
                        "give exactly one target: --device (repeatable), --group or --where (repeatable)",
                    ));
                }
                if !devices.is_empty() {
                    body["devices"] = json!(devices);
                } else if let Some(g) = group {
                    body["group"] = json!(g);
                } else {
                    body["filter"] = json!(conditions);
                }
                (c.post("/deployments", Some(body)).await?, View::Object)
            }
            Deployments::Show { id } => (c.get(&format!("/deployments/{id}")).await?, View::Object),
            Deployments::Devices { id } => (
                c.get(&format!("/deployments/{id}/devices")).await?,
                View::Table(&["device_id", "status", "phase", "substate", "attempts"]),
            ),
            Deployments::Log { id, device } => (
                c.get(&format!("/deployments/{id}/devices/{device}/log"))
                    .await?,
                View::Table(&["timestamp_ms", "level", "message"]),
            ),
            Deployments::Abort { id } => (
                c.post(&format!("/deployments/{id}/abort"), None).await?,
                View::Object,
            ),
            Deployments::Retry { id } => (
                c.post(&format!("/deployments/{id}/retry"), None).await?,
                View::Object,
            ),
            Deployments::Pause { id } => (
                c.post(&format!("/deployments/{id}/pause"), None).await?,
                View::Object,
            ),
            Deployments::NextPhase { id } => (
                c.post(&format!("/deployments/{id}/next_phase"), None)
                    .await?,
                View::Object,
            ),
            Deployments::Resume { id } => (
                c.post(&format!("/deployments/{id}/resume"), None).await?,
                View::Object,
            ),
        },
        Command::Tokens(t) => match t {
            Tokens::List => (
                c.get("/tokens").await?,
                View::Table(&["id", "name", "role", "created_ms", "revoked_ms"]),
            ),
            Tokens::Create { name, role } => (
                c.post("/tokens", Some(json!({ "name": name, "role": role })))
                    .await?,
                View::Secret,
            ),
            Tokens::Revoke { id } => (
                c.call(Method::DELETE, &format!("/tokens/{id}"), None)
                    .await?,
                View::Done("revoked"),
            ),
        },
        Command::Audit { limit } => (
            c.get(&format!("/audit?limit={limit}")).await?,
            View::Table(&["id", "at_ms", "actor", "action", "object", "details"]),
        ),
    })
}

fn pairs(list: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    list.iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| Exit::usage(format!("{p:?} is not NAME=VALUE")))
        })
        .collect()
}

fn cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| format!("{k}={}", cell(Some(v))))
            .collect::<Vec<_>>()
            .join(","),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| cell(Some(v)))
            .collect::<Vec<_>>()
            .join(","),
        Some(other) => other.to_string(),
    }
}

fn print_view(value: &Value, view: View) {
    match view {
        View::Done(what) => println!("{what}"),
        View::Secret => println!("{}", cell(value.get("secret"))),
        View::Object => {
            if let Value::Object(m) = value {
                for (k, v) in m {
                    println!("{k}: {}", cell(Some(v)));
                }
            }
        }
        View::Table(cols) => {
            println!("{}", cols.join("\t"));
            for row in value.as_array().into_iter().flatten() {
                let cells: Vec<String> = cols.iter().map(|c| cell(row.get(*c))).collect();
                println!("{}", cells.join("\t"));
            }
        }
    }
}
