-- Shoal server schema, SQLite. Times are Unix milliseconds; ids are lowercase hex.
-- Keep in step with migrations/postgres/0001_initial.sql (same tables and columns).

CREATE TABLE devices (
    id TEXT PRIMARY KEY,               -- the device key's id (BLAKE3 of the public key)
    public_key TEXT NOT NULL UNIQUE,   -- ed25519 public key, 32 bytes in hex
    identity TEXT NOT NULL,            -- identity attributes, a JSON object of strings
    status TEXT NOT NULL,              -- pending | accepted | rejected | preauthorized
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    last_seen_ms INTEGER
);
CREATE INDEX devices_status ON devices (status);

CREATE TABLE inventory (
    device_id TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (device_id, name)
);

CREATE TABLE device_tokens (
    token_hash TEXT PRIMARY KEY,
    device_id TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    expires_ms INTEGER NOT NULL
);
CREATE INDEX device_tokens_device ON device_tokens (device_id);

CREATE TABLE auth_nonces (
    nonce TEXT PRIMARY KEY,
    expires_ms INTEGER NOT NULL
);

CREATE TABLE api_tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,                -- viewer | operator | admin
    token_hash TEXT NOT NULL UNIQUE,
    created_ms INTEGER NOT NULL,
    revoked_ms INTEGER
);

CREATE TABLE audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    object TEXT NOT NULL,
    details TEXT NOT NULL              -- JSON
);

CREATE TABLE device_groups (
    name TEXT PRIMARY KEY,
    filter TEXT,                       -- JSON list of conditions; NULL for a static group
    created_ms INTEGER NOT NULL
);

CREATE TABLE group_members (
    group_name TEXT NOT NULL REFERENCES device_groups (name) ON DELETE CASCADE,
    device_id TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    PRIMARY KEY (group_name, device_id)
);

CREATE TABLE releases (
    id TEXT PRIMARY KEY,               -- BLAKE3 of the manifest CBOR
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    device_types TEXT NOT NULL,        -- JSON list
    payload_bytes INTEGER NOT NULL,
    stored_bytes INTEGER NOT NULL,     -- distinct chunks, compressed
    chunks INTEGER NOT NULL,           -- distinct chunks
    created_ms INTEGER NOT NULL,
    UNIQUE (name, version)
);

CREATE TABLE deployments (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    release_id TEXT NOT NULL,          -- no foreign key: finished deployments outlive releases
    target TEXT NOT NULL,              -- JSON: what the deployment was created for
    status TEXT NOT NULL,              -- the rollout's state: running | paused | halted | aborted | finished
    rollout TEXT NOT NULL,             -- JSON: shoal_fleet::Rollout (policy, phases, counts, state)
    halt_reason TEXT,                  -- why it last halted by itself
    next_timer_ms INTEGER,                -- when the rollout's timer (a phase's soak delay) is due
    created_ms INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    finished_ms INTEGER
);
CREATE INDEX deployments_timer ON deployments (next_timer_ms);
CREATE INDEX deployments_release ON deployments (release_id);

CREATE TABLE deployment_devices (
    deployment_id TEXT NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
    device_id TEXT NOT NULL,
    status TEXT NOT NULL,              -- Mender's device deployment states (shoal_fleet::Status)
    substate TEXT,
    phase INTEGER NOT NULL,               -- the rollout phase it is in (0-based)
    attempts INTEGER NOT NULL,            -- failures retried so far
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    finished_ms INTEGER,
    PRIMARY KEY (deployment_id, device_id)
);
CREATE INDEX deployment_devices_device ON deployment_devices (device_id, status);

CREATE TABLE deployment_logs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    deployment_id TEXT NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
    device_id TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX deployment_logs_device ON deployment_logs (deployment_id, device_id);
