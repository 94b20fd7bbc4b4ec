-- Where each device's LAN layer listens, as it last said, and the public address
-- (the request's source IP) it said it from: devices behind one public address
-- are handed each other (POST /api/devices/v1/lan/peers) where multicast is blocked.
CREATE TABLE lan_peers (
    device_id TEXT PRIMARY KEY,        -- devices.id
    source_ip TEXT NOT NULL,           -- the request's source address
    addrs TEXT NOT NULL,               -- JSON array of multiaddrs (no /p2p part)
    seen_ms INTEGER NOT NULL              -- when it last said so
);
CREATE INDEX lan_peers_source ON lan_peers (source_ip, seen_ms);
