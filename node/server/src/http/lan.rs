//! LAN peers behind one public address: where multicast is blocked (no mDNS), a
//! device tells the server where its LAN layer listens, and the server answers
//! with the other accepted devices it sees behind the same public address (the
//! request's source IP). The devices then dial each other; what they may do once
//! connected is still decided by their fleet credentials, never by this list.

use axum::extract::ConnectInfo;
use serde::{Deserialize, Serialize};
use sqlx::Row;

use super::PeerAddr;
use super::error::{ApiError, ApiResult};
use super::extractor::{ApiJson, DeviceAuth};
use crate::Ctx;
use crate::db::now_ms;

/// The most addresses a device may say it listens on.
pub const ADDRS_MAX: usize = 16;
/// The longest address accepted, in bytes.
pub const ADDR_LEN_MAX: usize = 256;
/// The most peers handed out in one answer (the most recently seen first).
pub const PEERS_MAX: usize = 64;
/// A device not heard from for this long is no longer handed out.
pub const PEER_TTL_MS: i64 = 24 * 3600 * 1000;

/// What a device says of its LAN layer.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Announce {
    /// Where it listens for LAN peers: multiaddrs such as `/ip4/10.0.0.5/tcp/4001`,
    /// without a `/p2p/` part (its peer id is its device key).
    pub addrs: Vec<String>,
}

/// One device behind the same public address.
#[derive(Debug, Serialize)]
pub struct LanPeer {
    /// Its ed25519 public key (hex): its libp2p peer id.
    pub public_key: String,
    /// Where it said it listens.
    pub addrs: Vec<String>,
}

/// The answer of `POST /lan/peers`.
#[derive(Debug, Serialize)]
pub struct LanPeers {
    /// The public address the server sees the device behind.
    pub source_ip: String,
    /// The other accepted devices seen behind it, the most recently seen first.
    pub peers: Vec<LanPeer>,
}

fn check(announce: &Announce) -> Result<(), ApiError> {
    if announce.addrs.len() > ADDRS_MAX {
        return Err(ApiError::BadRequest(format!(
            "at most {ADDRS_MAX} addresses, got {}",
            announce.addrs.len()
        )));
    }
    for a in &announce.addrs {
        if a.len() > ADDR_LEN_MAX {
            return Err(ApiError::BadRequest(format!(
                "an address is longer than {ADDR_LEN_MAX} bytes"
            )));
        }
        if !a.starts_with('/') || a.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ApiError::BadRequest(format!(
                "{a:?} is not a multiaddr (it must start with '/', with no spaces)"
            )));
        }
        if a.contains("/p2p/") || a.ends_with("/p2p") {
            return Err(ApiError::BadRequest(format!(
                "{a:?} has a /p2p part: the peer id is the device key"
            )));
        }
    }
    Ok(())
}

/// `POST /lan/peers`: records where the device's LAN layer listens and answers
/// with the other accepted devices behind the same public address.
pub async fn peers(
    ctx: axum::extract::State<Ctx>,
    ConnectInfo(PeerAddr(from)): ConnectInfo<PeerAddr>,
    auth: DeviceAuth,
    ApiJson(announce): ApiJson<Announce>,
) -> ApiResult<axum::Json<LanPeers>> {
    check(&announce)?;
    // An IPv4 client on a dual-stack socket shows as ::ffff:a.b.c.d.
    let source_ip = from.ip().to_canonical().to_string();
    let now = now_ms();
    let addrs = serde_json::to_string(&announce.addrs)
        .map_err(|e| ApiError::Internal(format!("encoding addresses: {e}")))?;
    sqlx::query(
        "INSERT INTO lan_peers (device_id, source_ip, addrs, seen_ms) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (device_id) DO UPDATE SET source_ip = excluded.source_ip, \
         addrs = excluded.addrs, seen_ms = excluded.seen_ms",
    )
    .bind(&auth.device_id)
    .bind(&source_ip)
    .bind(&addrs)
    .bind(now)
    .execute(&ctx.db)
    .await?;
    let rows = sqlx::query(
        "SELECT d.public_key, l.addrs FROM lan_peers l JOIN devices d ON d.id = l.device_id \
         WHERE l.source_ip = $1 AND l.device_id <> $2 AND l.seen_ms > $3 \
         AND d.status = 'accepted' ORDER BY l.seen_ms DESC, l.device_id LIMIT $4",
    )
    .bind(&source_ip)
    .bind(&auth.device_id)
    .bind(now.saturating_sub(PEER_TTL_MS))
    .bind(PEERS_MAX as i64)
    .fetch_all(&ctx.db)
    .await?;
    let mut peers = Vec::with_capacity(rows.len());
    for r in &rows {
        let public_key: String = r.try_get("public_key")?;
        let addrs: String = r.try_get("addrs")?;
        let addrs: Vec<String> = serde_json::from_str(&addrs)
            .map_err(|e| ApiError::Internal(format!("stored LAN addresses: {e}")))?;
        peers.push(LanPeer { public_key, addrs });
    }
    Ok(axum::Json(LanPeers { source_ip, peers }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn announce(addrs: &[&str]) -> Announce {
        Announce {
            addrs: addrs.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    fn message(r: Result<(), ApiError>) -> String {
        match r {
            Err(ApiError::BadRequest(m)) => m,
            other => panic!("expected a bad request, got {other:?}"),
        }
    }

    #[test]
    fn announcements_are_checked_precisely() {
        check(&announce(&["/ip4/10.0.0.5/tcp/4001", "/ip6/::1/tcp/9"])).expect("valid");
        check(&announce(&[])).expect("no addresses is valid");
        let many: Vec<&str> = vec!["/ip4/1.2.3.4/tcp/1"; ADDRS_MAX + 1];
        assert_eq!(
            message(check(&announce(&many))),
            format!("at most {ADDRS_MAX} addresses, got {}", ADDRS_MAX + 1)
        );
        let long = format!("/dns/{}", "a".repeat(ADDR_LEN_MAX));
        assert_eq!(
            message(check(&announce(&[&long]))),
            format!("an address is longer than {ADDR_LEN_MAX} bytes")
        );
        assert!(message(check(&announce(&["10.0.0.5:4001"]))).contains("is not a multiaddr"));
        assert!(
            message(check(&announce(&["/ip4/1.2.3.4/tcp/1 x"]))).contains("is not a multiaddr")
        );
        assert!(
            message(check(&announce(&["/ip4/1.2.3.4/tcp/1/p2p/12D3KooWabc"])))
                .contains("has a /p2p part")
        );
    }
}
