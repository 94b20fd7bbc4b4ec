-- Signed status reports from devices (issue 11: offline installs are reported later).
-- Keep in step with migrations/sqlite/0002_device_reports.sql.

CREATE TABLE device_reports (
    device_id TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    seq BIGINT NOT NULL,              -- the device's report number; (device, seq) is stored once
    at_ms BIGINT,                     -- when it happened (the device's clock); NULL without one
    received_ms BIGINT NOT NULL,      -- when the server stored it
    relayed_by TEXT,                   -- the device that delivered it, when not its own
    origin TEXT NOT NULL,              -- standalone | daemon
    deployment_id TEXT,
    release_name TEXT,
    release_version TEXT,
    status TEXT NOT NULL,
    substate TEXT,
    report TEXT NOT NULL,              -- the report text as signed
    signature TEXT NOT NULL,           -- its ed25519 signature (hex)
    PRIMARY KEY (device_id, seq)
);
