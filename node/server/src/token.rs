//! Device bearer tokens the server verifies itself, with no database round trip.
//!
//! A token is `sd2.<device id>.<epoch>.<expires_ms>.<mac>`: the device's id (64 hex
//! digits), its token epoch when the token was issued (see [`crate::view`]: a
//! rejection or decommission bumps it, which refuses every older token), the Unix
//! millisecond at which it expires, and a keyed BLAKE3 MAC over all three. The
//! MAC key is made once, by the first server to start on a database, and kept in
//! the database (`server_secrets`), so every server on that database issues and
//! verifies the same tokens. A token binds its device: every device endpoint takes
//! the device from the verified token, never from the request.
//!
//! Non-goals: tokens are not encrypted (they name nothing secret), and the key is
//! not rotated (a leaked database leaks it; delete its row and restart every server
//! to void every token; devices authenticate again on the 401).

use std::fmt::Write as _;

use sqlx::{AnyPool, Row};

use crate::db::{now_ms, random_hex};
use crate::view::DeviceKey;

/// What every token starts with (the format's version).
pub const PREFIX: &str = "sd2.";
/// The `server_secrets` row holding the MAC key.
const SECRET_NAME: &str = "device_token";
/// Domain separation of the MAC input.
const CONTEXT: &[u8] = b"shoal device token v2\n";

/// Why a bearer token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// It is not a token of this format.
    #[error("malformed device token: {0}")]
    Malformed(&'static str),
    /// Its MAC does not verify: altered, or made with another server's key.
    #[error("device token does not verify")]
    BadMac,
    /// It expired.
    #[error("device token expired")]
    Expired,
}

/// What a verified token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The device's id (lowercase hex).
    pub device_id: String,
    /// The same id as bytes.
    pub key: DeviceKey,
    /// The device's token epoch when it was issued.
    pub epoch: i64,
    /// When it expires, in Unix milliseconds.
    pub expires_ms: i64,
}

/// The key tokens are MAC'd with.
#[derive(Clone)]
pub struct TokenKey([u8; 32]);

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

impl TokenKey {
    /// A key from its bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> TokenKey {
        TokenKey(bytes)
    }

    /// The database's key, made (by whichever server comes first) if there is none.
    pub async fn load(db: &AnyPool) -> Result<TokenKey, sqlx::Error> {
        sqlx::query(
            "INSERT INTO server_secrets (name, secret, created_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(SECRET_NAME)
        .bind(random_hex(32))
        .bind(now_ms())
        .execute(db)
        .await?;
        let text: String = sqlx::query("SELECT secret FROM server_secrets WHERE name = $1")
            .bind(SECRET_NAME)
            .fetch_one(db)
            .await?
            .try_get("secret")?;
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut bytes).map_err(|e| {
            sqlx::Error::Decode(
                format!("server_secrets.{SECRET_NAME} is not 32 bytes of hex: {e}").into(),
            )
        })?;
        Ok(TokenKey(bytes))
    }

    fn mac(&self, device_id: &str, epoch: i64, expires_ms: i64) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(CONTEXT);
        h.update(device_id.as_bytes());
        h.update(b".");
        h.update(epoch.to_string().as_bytes());
        h.update(b".");
        h.update(expires_ms.to_string().as_bytes());
        h.finalize()
    }

    /// A token for `device_id` (64 lowercase hex digits) at `epoch`, valid until
    /// `expires_ms`.
    pub fn issue(&self, device_id: &str, epoch: i64, expires_ms: i64) -> String {
        let mut out = String::with_capacity(160);
        let _ = write!(out, "{PREFIX}{device_id}.{epoch}.{expires_ms}.");
        out.push_str(&self.mac(device_id, epoch, expires_ms).to_hex());
        out
    }

    /// Verifies `token` at `now_ms`.
    pub fn verify(&self, token: &str, now_ms: i64) -> Result<Claims, TokenError> {
        let rest = token
            .strip_prefix(PREFIX)
            .ok_or(TokenError::Malformed("unknown format"))?;
        let mut parts = rest.split('.');
        let (Some(device_id), Some(epoch), Some(expires), Some(mac), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(TokenError::Malformed("not five dot-separated parts"));
        };
        let key = DeviceKey::parse(device_id).ok_or(TokenError::Malformed(
            "device id is not 64 lowercase hex digits",
        ))?;
        let epoch = decimal(epoch).ok_or(TokenError::Malformed("epoch is not a number"))?;
        let expires_ms = decimal(expires).ok_or(TokenError::Malformed("expiry is not a number"))?;
        let mac = blake3::Hash::from_hex(mac)
            .map_err(|_| TokenError::Malformed("mac is not 64 hex digits"))?;
        // `Hash`'s equality is constant-time.
        if self.mac(device_id, epoch, expires_ms) != mac {
            return Err(TokenError::BadMac);
        }
        if expires_ms <= now_ms {
            return Err(TokenError::Expired);
        }
        Ok(Claims {
            device_id: device_id.to_owned(),
            key,
            epoch,
            expires_ms,
        })
    }
}

/// A non-negative decimal `i64` in canonical form (no sign, no leading zero), so a
/// token has exactly one spelling.
fn decimal(s: &str) -> Option<i64> {
    if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if s.len() > 1 && s.starts_with('0') {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEVICE: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    fn key(b: u8) -> TokenKey {
        TokenKey::from_bytes([b; 32])
    }

    #[test]
    fn an_issued_token_verifies_and_says_what_it_was_issued_for() {
        let token = key(1).issue(DEVICE, 3, 10_000);
        assert!(token.len() <= 256, "fits the bearer length limit");
        let claims = key(1).verify(&token, 9_999).expect("verifies");
        assert_eq!(claims.device_id, DEVICE);
        assert_eq!(claims.key, DeviceKey::parse(DEVICE).unwrap());
        assert_eq!(claims.epoch, 3);
        assert_eq!(claims.expires_ms, 10_000);
    }

    #[test]
    fn expired_tokens_and_other_servers_keys_are_refused() {
        let token = key(1).issue(DEVICE, 0, 10_000);
        assert_eq!(key(1).verify(&token, 10_000), Err(TokenError::Expired));
        assert_eq!(key(2).verify(&token, 0), Err(TokenError::BadMac));
    }

    #[test]
    fn altered_tokens_are_refused() {
        let token = key(1).issue(DEVICE, 0, 10_000);
        // Another device, a lower epoch, a later expiry: each breaks the MAC.
        let other = "f".repeat(64);
        for altered in [
            token.replace(DEVICE, &other),
            token.replacen(".0.", ".1.", 1),
            token.replace(".10000.", ".99999."),
        ] {
            assert_ne!(altered, token);
            assert_eq!(
                key(1).verify(&altered, 0),
                Err(TokenError::BadMac),
                "{altered}"
            );
        }
        // A flipped MAC digit.
        let mut bytes = token.clone().into_bytes();
        let last = bytes.len() - 1;
        bytes[last] = if bytes[last] == b'0' { b'1' } else { b'0' };
        let flipped = String::from_utf8(bytes).unwrap();
        assert_eq!(key(1).verify(&flipped, 0), Err(TokenError::BadMac));
    }

    #[test]
    fn malformed_tokens_name_what_is_wrong() {
        let mac = "0".repeat(64);
        let cases: &[(String, &str)] = &[
            ("sd_0123".into(), "unknown format"),
            (String::new(), "unknown format"),
            (format!("sd2.{DEVICE}.0.1"), "not five dot-separated parts"),
            (
                format!("sd2.{DEVICE}.0.1.{mac}.x"),
                "not five dot-separated parts",
            ),
            (
                format!("sd2.{}.0.1.{mac}", DEVICE.to_uppercase()),
                "device id is not 64 lowercase hex digits",
            ),
            (
                format!("sd2.{}.0.1.{mac}", &DEVICE[..62]),
                "device id is not 64 lowercase hex digits",
            ),
            (format!("sd2.{DEVICE}.-1.1.{mac}"), "epoch is not a number"),
            (format!("sd2.{DEVICE}.01.1.{mac}"), "epoch is not a number"),
            (format!("sd2.{DEVICE}..1.{mac}"), "epoch is not a number"),
            (
                format!("sd2.{DEVICE}.0.99999999999999999999.{mac}"),
                "expiry is not a number",
            ),
            (format!("sd2.{DEVICE}.0.+5.{mac}"), "expiry is not a number"),
            (
                format!("sd2.{DEVICE}.0.1.{}", &mac[..63]),
                "mac is not 64 hex digits",
            ),
            (
                format!("sd2.{DEVICE}.0.1.{}g", &mac[..63]),
                "mac is not 64 hex digits",
            ),
        ];
        for (token, why) in cases {
            assert_eq!(
                key(1).verify(token, 0),
                Err(TokenError::Malformed(why)),
                "{token}"
            );
        }
    }
}
