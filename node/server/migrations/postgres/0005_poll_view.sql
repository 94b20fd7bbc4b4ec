-- Device tokens the server verifies itself, and each server's in-memory view of the
-- fleet (node/server/src/view.rs): a poll with nothing to do needs no database.

-- Tokens are MAC'd (keyed BLAKE3) with a key every server on this database shares;
-- the device token table goes (its tokens are void: devices authenticate again).
DROP TABLE device_tokens;
CREATE TABLE server_secrets (
    name TEXT PRIMARY KEY,             -- what it is for (device_token)
    secret TEXT NOT NULL,              -- 32 random bytes in hex
    created_ms BIGINT NOT NULL
);

-- A device's token epoch: bumped when it is rejected or decommissioned, so every
-- token issued before is refused. Kept when the device row goes (decommission), so
-- a key that comes back never revives its old tokens.
CREATE TABLE device_epochs (
    device_id TEXT PRIMARY KEY,
    epoch BIGINT NOT NULL
);

-- The change log servers refresh their views from. Every transaction that changes
-- what a view holds bumps the one generation row last, just before it commits (so
-- generations are handed out in commit order and no other lock is taken after it),
-- and adds a row per changed device or deployment under that generation.
CREATE TABLE view_generation (
    id BIGINT PRIMARY KEY CHECK (id = 1),
    generation BIGINT NOT NULL
);
INSERT INTO view_generation (id, generation) VALUES (1, 0);
CREATE TABLE view_changes (
    generation BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    device_id TEXT,                    -- a device's epoch or deployments changed
    deployment_id TEXT                 -- a deployment's devices may have something to do
);
CREATE INDEX view_changes_gen ON view_changes (generation);
CREATE INDEX view_changes_at ON view_changes (at_ms);
