-- Per-base encodings (node/server/src/encodings.rs): one row per (release, base)
-- pair, queued automatically (a deployment's or an upload's devices run the base)
-- or made by an operator, and encoded by one server's background worker at a time:
-- a worker claims a row by setting its lease (a conditional UPDATE only one
-- server's can win) and renews it while it encodes; a lease that expired (its
-- server died) is claimed again.
CREATE TABLE encodings (
    release_id TEXT NOT NULL REFERENCES releases (id) ON DELETE CASCADE,
    base_id TEXT NOT NULL REFERENCES releases (id) ON DELETE CASCADE,
    state TEXT NOT NULL,               -- queued, running, done, failed
    origin TEXT NOT NULL,              -- auto or operator
    devices BIGINT NOT NULL,          -- devices on the base when it was queued
    attempts BIGINT NOT NULL,
    not_before_ms BIGINT NOT NULL,    -- a failed attempt is retried after this
    lease_owner TEXT,                  -- the server process encoding it
    lease_until_ms BIGINT,
    error TEXT,                        -- the last failure
    chunks BIGINT,                    -- figures of the encoding (encodings::Encoded)
    chunks_delta BIGINT,
    plain_bytes BIGINT,
    encoded_bytes BIGINT,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL,
    PRIMARY KEY (release_id, base_id)
);
CREATE INDEX encodings_state ON encodings (state, not_before_ms);
CREATE INDEX encodings_base ON encodings (base_id);
