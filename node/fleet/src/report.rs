//! Signed status reports: what a device did, signed by its own key, so it can be
//! queued while the device is offline and delivered later — by the device itself or
//! relayed by a LAN peer — and still be believed.
//!
//! Goals:
//! - A report stands alone: it names its device, carries the time it happened (the
//!   device's clock) and a per-device sequence number, and its signature covers exactly
//!   the bytes that were signed (the report's JSON text travels as a string, so no
//!   re-encoding can change it).
//! - Delivery is idempotent and order-free: the server keys a report on
//!   `(device_id, seq)`; a report delivered twice is stored once, reports arriving out of
//!   order are stored all the same and read back in `seq` order.
//! - Whoever delivers a report does not matter: the signature is checked against the key
//!   the server holds for the report's device. That is what lets a peer on the LAN carry
//!   another device's reports (issue 13) without being able to forge or alter them.
//!
//! Non-goals: secrecy (reports are not encrypted; TLS protects them on the way) and
//! driving deployments (the daemon reports its deployment states live; these reports are
//! the device's own record of what happened and when, kept until delivered).
//!
//! The signature is ed25519 over [`DOMAIN`] followed by the report text, so a report
//! signature can never be mistaken for an auth request signature made with the same key.

use serde::{Deserialize, Serialize};

use crate::Status;

/// Prefixed to the report text before signing ("what this signature is for").
pub const DOMAIN: &[u8] = b"shoal status report v1\0";
/// The longest report text, in bytes.
pub const TEXT_MAX: usize = 4096;
/// The longest substate, in bytes (the same as a live status report's).
pub const SUBSTATE_MAX: usize = 256;
/// The longest release name or version, in bytes.
pub const NAME_MAX: usize = 256;

/// What produced a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// A standalone `shoal install` (a USB stick, a file), or `boot-check`, `commit`,
    /// `rollback` run by hand or at boot.
    Standalone,
    /// The daemon, for a deployment of its server.
    Daemon,
    /// The daemon, for a release a LAN peer ran (`[lan] accept_releases`, offline
    /// propagation): no deployment of the server.
    Lan,
}

impl Origin {
    /// The name used in the API and the database.
    pub const fn as_str(self) -> &'static str {
        match self {
            Origin::Standalone => "standalone",
            Origin::Daemon => "daemon",
            Origin::Lan => "lan",
        }
    }
}

/// A release, by name and version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    /// Release name.
    pub name: String,
    /// Release version.
    pub version: String,
}

/// One status report, as the device signed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    /// The device's id: its key's id, 64 lowercase hex digits.
    pub device_id: String,
    /// The device's sequence number for its reports, from 1, never reused.
    pub seq: u64,
    /// When it happened, Unix milliseconds of the device's clock; `None` when the device
    /// had no sane clock (boards boot in 1970).
    pub at_ms: Option<u64>,
    /// What produced it.
    pub origin: Origin,
    /// The server deployment it belongs to (32 lowercase hex digits), if any.
    #[serde(default)]
    pub deployment: Option<String>,
    /// The release concerned, when known.
    #[serde(default)]
    pub release: Option<Release>,
    /// The state reached (Mender's names, only those a device reports).
    pub status: Status,
    /// Details for an operator (why it failed, what was done).
    #[serde(default)]
    pub substate: Option<String>,
}

/// A report with its signature, as queued and as sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signed {
    /// The report's JSON text, exactly as signed.
    pub report: String,
    /// The ed25519 signature of [`DOMAIN`] + `report`, 64 bytes in hex.
    pub signature: String,
}

/// Why a report was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The report text is longer than [`TEXT_MAX`].
    #[error("the report is longer than {TEXT_MAX} bytes")]
    TooLong,
    /// The report text is not a report (bad JSON, a missing or unknown field).
    #[error("the report is malformed: {0}")]
    Malformed(String),
    /// `device_id` is not 64 lowercase hex digits.
    #[error("the report's device_id is not 64 lowercase hex digits")]
    DeviceId,
    /// `seq` is 0.
    #[error("the report's seq must be at least 1")]
    Seq,
    /// The status is one only the server sets (pending, aborted, noartifact).
    #[error("a device does not report the status {0}")]
    Status(Status),
    /// `deployment` is not 32 lowercase hex digits.
    #[error("the report's deployment is not 32 lowercase hex digits")]
    Deployment,
    /// A release name or version is empty or longer than [`NAME_MAX`].
    #[error("the report's release name and version must be 1 to {NAME_MAX} bytes")]
    Release,
    /// The substate is longer than [`SUBSTATE_MAX`].
    #[error("the report's substate is longer than {SUBSTATE_MAX} bytes")]
    Substate,
    /// The signature is not 64 bytes of hex.
    #[error("the report's signature is not 64 bytes of hex")]
    SignatureEncoding,
    /// The signature does not verify with the device's key.
    #[error("the report's signature does not verify with the key of device {0}")]
    Signature(String),
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Report {
    /// Checks the fields a parser cannot: id shapes, lengths, a reportable status.
    pub fn check(&self) -> Result<(), OpenError> {
        if !is_lower_hex(&self.device_id, 64) {
            return Err(OpenError::DeviceId);
        }
        if self.seq == 0 {
            return Err(OpenError::Seq);
        }
        if !self.status.is_reportable() {
            return Err(OpenError::Status(self.status));
        }
        if self
            .deployment
            .as_ref()
            .is_some_and(|d| !is_lower_hex(d, 32))
        {
            return Err(OpenError::Deployment);
        }
        if let Some(r) = &self.release {
            let ok = |s: &str| !s.is_empty() && s.len() <= NAME_MAX;
            if !ok(&r.name) || !ok(&r.version) {
                return Err(OpenError::Release);
            }
        }
        if self
            .substate
            .as_ref()
            .is_some_and(|s| s.len() > SUBSTATE_MAX)
        {
            return Err(OpenError::Substate);
        }
        Ok(())
    }

    /// Cuts the substate to [`SUBSTATE_MAX`] bytes (on a character boundary), so a
    /// long error message still makes a valid report.
    pub fn truncate_substate(&mut self) {
        if let Some(s) = &mut self.substate {
            let mut end = s.len().min(SUBSTATE_MAX);
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s.truncate(end);
        }
    }
}

/// The bytes a report's signature covers.
pub fn message(text: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + text.len());
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(text.as_bytes());
    m
}

impl Signed {
    /// Signs `report` with `sign` (the device key's ed25519 signing function).
    ///
    /// # Panics
    /// If the report does not pass [`Report::check`] or its text is longer than
    /// [`TEXT_MAX`]: the device made it, so that is a bug.
    pub fn seal(report: &Report, sign: impl FnOnce(&[u8]) -> [u8; 64]) -> Signed {
        assert_eq!(report.check(), Ok(()), "sealing an invalid report");
        let text = serde_json::to_string(report).expect("a report serializes");
        assert!(text.len() <= TEXT_MAX, "report text too long");
        let signature = hex::encode(sign(&message(&text)));
        Signed {
            report: text,
            signature,
        }
    }

    /// The report, parsed and checked but **not authenticated**: use it only to find
    /// the key to [`Signed::verify`] with.
    pub fn claimed(&self) -> Result<Report, OpenError> {
        if self.report.len() > TEXT_MAX {
            return Err(OpenError::TooLong);
        }
        let report: Report =
            serde_json::from_str(&self.report).map_err(|e| OpenError::Malformed(e.to_string()))?;
        report.check()?;
        Ok(report)
    }

    /// The report, once its signature verifies with `verify(message, signature)` (the
    /// report's device key).
    pub fn verify(
        &self,
        verify: impl FnOnce(&[u8], &[u8; 64]) -> bool,
    ) -> Result<Report, OpenError> {
        let report = self.claimed()?;
        let sig: [u8; 64] = hex::decode(&self.signature)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or(OpenError::SignatureEncoding)?;
        if !verify(&message(&self.report), &sig) {
            return Err(OpenError::Signature(report.device_id));
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        Report {
            device_id: "ab".repeat(32),
            seq: 7,
            at_ms: Some(1_700_000_000_000),
            origin: Origin::Standalone,
            deployment: None,
            release: Some(Release {
                name: "os".into(),
                version: "2".into(),
            }),
            status: Status::Success,
            substate: None,
        }
    }

    /// A toy "signature": FNV-1a of the message, spread over 64 bytes; enough to test
    /// the plumbing (the real key is in shoal-signing, tested there and end to end).
    fn toy_sign(m: &[u8]) -> [u8; 64] {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in m {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        let mut s = [0u8; 64];
        for (i, c) in s.chunks_mut(8).enumerate() {
            c.copy_from_slice(&h.rotate_left(i as u32 * 8).to_le_bytes());
        }
        s
    }

    #[test]
    fn sealed_reports_open_with_the_right_key_only() {
        let r = report();
        let s = Signed::seal(&r, toy_sign);
        assert_eq!(s.verify(|m, sig| toy_sign(m) == *sig), Ok(r.clone()));
        assert_eq!(
            s.verify(|_, _| false),
            Err(OpenError::Signature(r.device_id.clone()))
        );
        // The signature covers the domain: the bare text is not what was signed.
        let bare = toy_sign(s.report.as_bytes());
        assert_ne!(hex::encode(bare), s.signature);
    }

    #[test]
    fn altered_text_does_not_verify() {
        let r = report();
        let s = Signed::seal(&r, toy_sign);
        let altered = Signed {
            report: s.report.replace("\"success\"", "\"failure\""),
            signature: s.signature.clone(),
        };
        assert_eq!(altered.claimed().map(|r| r.status), Ok(Status::Failure));
        assert_eq!(
            altered.verify(|m, sig| toy_sign(m) == *sig),
            Err(OpenError::Signature(r.device_id))
        );
    }

    #[test]
    fn malformed_reports_get_specific_errors() {
        let s = |text: &str| Signed {
            report: text.to_owned(),
            signature: "00".repeat(64),
        };
        let base = serde_json::to_value(report()).expect("json");
        let with = |k: &str, v: serde_json::Value| {
            let mut o = base.clone();
            o[k] = v;
            s(&o.to_string())
        };
        assert!(matches!(s("{").claimed(), Err(OpenError::Malformed(_))));
        assert!(matches!(s("[]").claimed(), Err(OpenError::Malformed(_))));
        assert_eq!(
            s(&"x".repeat(TEXT_MAX + 1)).claimed(),
            Err(OpenError::TooLong)
        );
        assert!(matches!(
            with("extra", 1.into()).claimed(),
            Err(OpenError::Malformed(m)) if m.contains("unknown field")
        ));
        assert_eq!(
            with("device_id", "AB".repeat(32).into()).claimed(),
            Err(OpenError::DeviceId)
        );
        assert_eq!(
            with("device_id", "ab".into()).claimed(),
            Err(OpenError::DeviceId)
        );
        assert_eq!(with("seq", 0.into()).claimed(), Err(OpenError::Seq));
        assert!(matches!(
            with("seq", (-1).into()).claimed(),
            Err(OpenError::Malformed(_))
        ));
        assert_eq!(
            with("status", "aborted".into()).claimed(),
            Err(OpenError::Status(Status::Aborted))
        );
        assert!(matches!(
            with("status", "done".into()).claimed(),
            Err(OpenError::Malformed(_))
        ));
        assert_eq!(
            with("deployment", "xyz".into()).claimed(),
            Err(OpenError::Deployment)
        );
        assert_eq!(
            with("release", serde_json::json!({"name": "", "version": "1"})).claimed(),
            Err(OpenError::Release)
        );
        assert_eq!(
            with("substate", "x".repeat(SUBSTATE_MAX + 1).into()).claimed(),
            Err(OpenError::Substate)
        );
        let good = Signed::seal(&report(), toy_sign);
        let bad_sig = Signed {
            signature: "zz".into(),
            ..good
        };
        assert_eq!(
            bad_sig.verify(|_, _| true),
            Err(OpenError::SignatureEncoding)
        );
    }

    #[test]
    fn long_substates_are_cut_on_a_character_boundary() {
        let mut r = report();
        r.substate = Some("é".repeat(SUBSTATE_MAX));
        r.truncate_substate();
        let s = r.substate.as_deref().expect("substate");
        assert!(s.len() <= SUBSTATE_MAX && s.len() >= SUBSTATE_MAX - 1);
        assert_eq!(r.check(), Ok(()));
    }
}
