-- Keys of decommissioned devices whose fleet credential may not have expired yet:
-- handed to every device as revoked until then (GET /api/devices/v1/credential).
CREATE TABLE revoked_keys (
    public_key TEXT PRIMARY KEY,       -- ed25519 public key, 32 bytes in hex
    until_ms BIGINT NOT NULL             -- when its last credential expires
);
