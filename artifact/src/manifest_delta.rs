//! Manifest deltas: a thin artifact's signed manifest sent as a zstd frame
//! compressed against the manifest of the release the device runs, which it keeps.
//!
//! Between two releases most of a manifest is the same chunk list, so the frame
//! carries little more than the new chunks' entries and references (the v2 → v3
//! hotfix manifest of 629 KB travels as a few tens of KB). The signatures are those of
//! the *whole* new manifest: a reader rebuilds it from the base manifest it holds
//! (looked up by the BLAKE3 the delta names, and re-hashed), bounded by
//! [`ENVELOPE_SIZE_MAX`], and verifies the signatures over the rebuilt bytes exactly
//! as over an envelope's ([`ManifestDelta::rebuild`] gives an [`Envelope`]); nothing
//! of the delta is trusted before that.
//!
//! Goals: fixed cost proportional to the change; the same signature and the same
//! manifest as the full envelope (one manifest hash names the release whichever way
//! it travelled). Non-goals: a delta against a manifest the device does not hold (the
//! reader refuses with [`ManifestDeltaError::UnknownBase`]; the builder's
//! `--full-manifest` makes an artifact for such devices).

use shoal_signing::{ENVELOPE_SIZE_MAX, Envelope, SIGNATURES_MAX, Signature};

/// Path of the first member of an artifact whose manifest travels as a delta
/// (instead of [`crate::read::ENVELOPE_MEMBER`]).
pub const MANIFEST_DELTA_MEMBER: &str = "manifest.delta";

/// zstd level of manifest frames: manifests are small, and every byte saved is
/// saved on every device.
pub const MANIFEST_DELTA_LEVEL: i32 = 19;

/// Window log a manifest frame may ask for: the base manifest plus the new one, each
/// at most [`ENVELOPE_SIZE_MAX`] (32 MiB), fit in 2^26 bytes.
const WINDOW_LOG_MAX: u32 = 26;

/// The `manifest.delta` member (canonical CBOR, fields in canonical key order).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ManifestDelta {
    /// BLAKE3 of the manifest the frame is compressed against (its canonical CBOR,
    /// i.e. [`crate::Manifest::hash`]).
    #[serde(with = "serde_bytes")]
    pub base: [u8; 32],
    /// A zstd frame (content size in its header, no dictionary id, no checksum) of
    /// the new manifest's canonical CBOR, compressed with the base manifest's bytes
    /// as a raw prefix.
    #[serde(with = "serde_bytes")]
    pub frame: Vec<u8>,
    /// Signatures over the new manifest, as in its envelope.
    pub signatures: Vec<Signature>,
}

/// Why a manifest delta was refused. Nothing of it is used after one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestDeltaError {
    /// The member is empty.
    #[error("the manifest delta is empty")]
    Empty,
    /// The member is larger than an envelope may be.
    #[error("the manifest delta is {size} bytes, more than the limit of {max}")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The member is not the canonical CBOR of a manifest delta.
    #[error("the manifest delta is malformed: {0}")]
    Decode(String),
    /// More signatures than an envelope may carry.
    #[error("the manifest delta carries {count} signatures, more than the limit of {max}")]
    TooManySignatures {
        /// How many.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The delta carries no signature (refused before its frame is touched).
    #[error("the manifest delta carries no signature")]
    Unsigned,
    /// The manifest the delta is against is not held here.
    #[error(
        "the manifest travels as a delta against manifest {base}, which is not at hand (a device keeps its running release's manifest; `shoal artifact` commands take the base artifact with --base); a device without it needs an artifact built with --full-manifest"
    )]
    UnknownBase {
        /// The base manifest's BLAKE3 (hex).
        base: String,
    },
    /// The bytes given as the base manifest do not hash to what the delta names.
    #[error("the base manifest given hashes to {found}, the delta is against {base}")]
    BaseMismatch {
        /// What the delta names (hex).
        base: String,
        /// What the given bytes hash to (hex).
        found: String,
    },
    /// The frame is not a zstd frame without dictionary whose header gives the
    /// manifest's size.
    #[error("the manifest delta's frame is not usable: {0}")]
    Frame(String),
    /// The frame declares a manifest larger than envelopes may be.
    #[error("the manifest delta rebuilds a manifest of {size} bytes, more than the limit of {max}")]
    ManifestTooLarge {
        /// The declared size.
        size: u64,
        /// The limit.
        max: usize,
    },
    /// The frame does not decode (corrupt, or compressed against other bytes).
    #[error("the manifest delta's frame does not decode: {0}")]
    Corrupt(String),
    /// The frame decodes to another size than its header declares.
    #[error("the manifest delta's frame declares {declared} bytes but decodes to {found}")]
    SizeMismatch {
        /// Declared in the frame header.
        declared: u64,
        /// Decoded.
        found: usize,
    },
}

impl ManifestDelta {
    /// The delta of `envelope` (a signed manifest) against `base` (the canonical CBOR
    /// of the manifest the device holds).
    pub fn new(envelope: &Envelope, base: &[u8]) -> ManifestDelta {
        use zstd::zstd_safe::{CCtx, CParameter};
        let mut cctx = CCtx::create();
        for p in [
            CParameter::CompressionLevel(MANIFEST_DELTA_LEVEL),
            CParameter::ContentSizeFlag(true),
            CParameter::ChecksumFlag(false),
            CParameter::DictIdFlag(false),
            CParameter::WindowLog(WINDOW_LOG_MAX),
        ] {
            cctx.set_parameter(p).expect("zstd parameter");
        }
        cctx.ref_prefix(base).expect("zstd prefix");
        let mut frame = Vec::with_capacity(zstd::zstd_safe::compress_bound(envelope.signed.len()));
        cctx.compress2(&mut frame, &envelope.signed)
            .expect("compressing into a sized buffer cannot fail");
        ManifestDelta {
            base: *blake3::hash(base).as_bytes(),
            frame,
            signatures: envelope.signatures.clone(),
        }
    }

    /// Canonical CBOR (the member's data).
    pub fn to_bytes(&self) -> Vec<u8> {
        cbor4ii::serde::to_vec(Vec::new(), self).expect("encoding into a Vec cannot fail")
    }

    /// Decodes a member's data, bounded by [`ENVELOPE_SIZE_MAX`] and
    /// [`SIGNATURES_MAX`]. Says nothing about the frame or the signatures.
    pub fn from_bytes(bytes: &[u8]) -> Result<ManifestDelta, ManifestDeltaError> {
        if bytes.is_empty() {
            return Err(ManifestDeltaError::Empty);
        }
        if bytes.len() > ENVELOPE_SIZE_MAX {
            return Err(ManifestDeltaError::TooLarge {
                size: bytes.len(),
                max: ENVELOPE_SIZE_MAX,
            });
        }
        let delta: ManifestDelta = cbor4ii::serde::from_slice(bytes)
            .map_err(|e| ManifestDeltaError::Decode(shoal_signing::describe_cbor_error(&e)))?;
        if delta.signatures.len() > SIGNATURES_MAX {
            return Err(ManifestDeltaError::TooManySignatures {
                count: delta.signatures.len(),
                max: SIGNATURES_MAX,
            });
        }
        if delta.to_bytes() != bytes {
            return Err(ManifestDeltaError::Decode(
                "not in canonical form".to_string(),
            ));
        }
        Ok(delta)
    }

    /// Decodes a manifest delta (a thin artifact's member, or the server's
    /// `application/vnd.shoal.manifest-delta.v1` answer) and rebuilds the envelope
    /// it stands for against the manifest of `held` it names: decoded and bounded
    /// ([`ManifestDelta::from_bytes`]), at least one signature
    /// ([`ManifestDeltaError::Unsigned`]), the base held
    /// ([`ManifestDeltaError::UnknownBase`]) and re-hashed, then rebuilt
    /// ([`ManifestDelta::rebuild`]). Also gives the base's hash. The signatures
    /// are not checked: verify the envelope as any other before using a byte of it.
    pub fn open(
        bytes: &[u8],
        held: &dyn HeldManifests,
    ) -> Result<(Envelope, [u8; 32]), ManifestDeltaError> {
        let delta = ManifestDelta::from_bytes(bytes)?;
        if delta.signatures.is_empty() {
            return Err(ManifestDeltaError::Unsigned);
        }
        let base = held
            .manifest(&delta.base)
            .ok_or_else(|| ManifestDeltaError::UnknownBase {
                base: delta.base_hex(),
            })?;
        Ok((delta.rebuild(&base)?, delta.base))
    }

    /// The base manifest's hash, hex.
    pub fn base_hex(&self) -> String {
        hex::encode(self.base)
    }

    /// Rebuilds the signed envelope from `base`, the bytes of the manifest the delta
    /// names (re-hashed here): the frame is decoded into at most
    /// [`ENVELOPE_SIZE_MAX`] bytes, as its header declares. The signatures are not
    /// checked: verify the envelope as any other.
    pub fn rebuild(&self, base: &[u8]) -> Result<Envelope, ManifestDeltaError> {
        use zstd::zstd_safe::{DCtx, DParameter};
        let found = blake3::hash(base);
        if *found.as_bytes() != self.base {
            return Err(ManifestDeltaError::BaseMismatch {
                base: self.base_hex(),
                found: found.to_hex().to_string(),
            });
        }
        if !self.frame.starts_with(&crate::chunk::ZSTD_MAGIC) {
            return Err(ManifestDeltaError::Frame("not a zstd frame".into()));
        }
        if let Some(id) = crate::chunk::frame_dictionary_id(&self.frame) {
            return Err(ManifestDeltaError::Frame(format!(
                "it names zstd dictionary {id}"
            )));
        }
        let declared = match zstd::zstd_safe::get_frame_content_size(&self.frame) {
            Ok(Some(n)) => n,
            Ok(None) => {
                return Err(ManifestDeltaError::Frame(
                    "its header does not give the manifest's size".into(),
                ));
            }
            Err(_) => return Err(ManifestDeltaError::Frame("corrupt frame header".into())),
        };
        if declared > ENVELOPE_SIZE_MAX as u64 {
            return Err(ManifestDeltaError::ManifestTooLarge {
                size: declared,
                max: ENVELOPE_SIZE_MAX,
            });
        }
        let mut d = DCtx::create();
        d.set_parameter(DParameter::WindowLogMax(WINDOW_LOG_MAX))
            .expect("zstd parameter");
        d.ref_prefix(base).expect("zstd prefix");
        // One byte more than declared, so a frame that decodes longer is seen.
        let mut out = Vec::with_capacity(declared as usize + 1);
        if let Err(code) = d.decompress(&mut out, &self.frame) {
            return Err(ManifestDeltaError::Corrupt(
                zstd::zstd_safe::get_error_name(code).to_string(),
            ));
        }
        if out.len() as u64 != declared {
            return Err(ManifestDeltaError::SizeMismatch {
                declared,
                found: out.len(),
            });
        }
        Ok(Envelope {
            signed: out,
            signatures: self.signatures.clone(),
        })
    }
}

/// Manifests a reader can rebuild a manifest delta against, by BLAKE3: the
/// manifests of the releases a device runs or ran (`shoal install` keeps them).
pub trait HeldManifests {
    /// The canonical CBOR of the manifest hashing to `hash`, if held.
    fn manifest(&self, hash: &[u8; 32]) -> Option<Vec<u8>>;
}

/// Holds no manifest: a manifest delta is [`ManifestDeltaError::UnknownBase`].
#[derive(Debug, Clone, Copy, Default)]
pub struct NoManifests;

impl HeldManifests for NoManifests {
    fn manifest(&self, _hash: &[u8; 32]) -> Option<Vec<u8>> {
        None
    }
}

/// Holds exactly the given manifests (canonical CBOR), e.g. the base artifact's.
impl HeldManifests for Vec<Vec<u8>> {
    fn manifest(&self, hash: &[u8; 32]) -> Option<Vec<u8>> {
        self.iter()
            .find(|m| blake3::hash(m).as_bytes() == hash)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_signing::SecretKey;

    fn signed(bytes: &[u8]) -> Envelope {
        let mut e = Envelope::new(bytes.to_vec());
        e.sign(&SecretKey::from_seed(&[7; 32]));
        e
    }

    fn base() -> Vec<u8> {
        (0..20_000u32).flat_map(|i| i.to_le_bytes()).collect()
    }

    fn new_bytes() -> Vec<u8> {
        let mut n = base();
        n[4000..4010].copy_from_slice(b"0123456789");
        n.extend_from_slice(b"a new chunk entry");
        n
    }

    #[test]
    fn round_trips_and_is_small_when_little_changed() {
        let (b, n) = (base(), new_bytes());
        let env = signed(&n);
        let delta = ManifestDelta::new(&env, &b);
        let bytes = delta.to_bytes();
        assert!(bytes.len() < 400, "{} bytes", bytes.len());
        let back = ManifestDelta::from_bytes(&bytes).unwrap();
        assert_eq!(back, delta);
        assert_eq!(back.rebuild(&b).unwrap(), env);
    }

    #[test]
    fn malformed_deltas_give_specific_errors() {
        let (b, n) = (base(), new_bytes());
        let delta = ManifestDelta::new(&signed(&n), &b);
        assert_eq!(
            ManifestDelta::from_bytes(&[]),
            Err(ManifestDeltaError::Empty)
        );
        assert_eq!(
            ManifestDelta::from_bytes(&vec![0; ENVELOPE_SIZE_MAX + 1]),
            Err(ManifestDeltaError::TooLarge {
                size: ENVELOPE_SIZE_MAX + 1,
                max: ENVELOPE_SIZE_MAX
            })
        );
        assert!(matches!(
            ManifestDelta::from_bytes(b"not cbor"),
            Err(ManifestDeltaError::Decode(_))
        ));
        // A truncated member.
        let bytes = delta.to_bytes();
        assert!(matches!(
            ManifestDelta::from_bytes(&bytes[..bytes.len() - 1]),
            Err(ManifestDeltaError::Decode(_))
        ));
        // Too many signatures.
        let mut many = delta.clone();
        many.signatures = vec![delta.signatures[0].clone(); SIGNATURES_MAX + 1];
        assert_eq!(
            ManifestDelta::from_bytes(&many.to_bytes()),
            Err(ManifestDeltaError::TooManySignatures {
                count: SIGNATURES_MAX + 1,
                max: SIGNATURES_MAX
            })
        );
        // Against other bytes than it names.
        let mut other = b.clone();
        other[0] ^= 1;
        assert_eq!(
            delta.rebuild(&other),
            Err(ManifestDeltaError::BaseMismatch {
                base: delta.base_hex(),
                found: blake3::hash(&other).to_hex().to_string()
            })
        );
        // Not a zstd frame.
        let mut raw = delta.clone();
        raw.frame = b"plain bytes".to_vec();
        assert_eq!(
            raw.rebuild(&b),
            Err(ManifestDeltaError::Frame("not a zstd frame".into()))
        );
        // A frame naming a dictionary.
        // (Frame header descriptor 0x21: single segment, a 1-byte dictionary id (7)
        // and a 1-byte content size (3); then one raw last block of 3 bytes.)
        let mut dicted = delta.clone();
        dicted.frame = [
            &crate::chunk::ZSTD_MAGIC[..],
            &[0x21, 7, 3, 25, 0, 0],
            b"abc",
        ]
        .concat();
        assert!(matches!(
            dicted.rebuild(&b),
            Err(ManifestDeltaError::Frame(m)) if m.starts_with("it names zstd dictionary")
        ));
        // A frame without a content size (streamed).
        let mut unsized_frame = delta.clone();
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        enc.include_contentsize(false).unwrap();
        std::io::Write::write_all(&mut enc, &n).unwrap();
        unsized_frame.frame = enc.finish().unwrap();
        assert_eq!(
            unsized_frame.rebuild(&b),
            Err(ManifestDeltaError::Frame(
                "its header does not give the manifest's size".into()
            ))
        );
        // A frame declaring more than an envelope may hold (a bomb): refused
        // before anything is allocated.
        let mut bomb = delta.clone();
        bomb.frame = zstd::bulk::compress(&vec![0u8; ENVELOPE_SIZE_MAX + 1], 1).unwrap();
        assert_eq!(
            bomb.rebuild(&b),
            Err(ManifestDeltaError::ManifestTooLarge {
                size: ENVELOPE_SIZE_MAX as u64 + 1,
                max: ENVELOPE_SIZE_MAX
            })
        );
        // A corrupt frame body.
        let mut corrupt = delta.clone();
        let last = corrupt.frame.len() - 1;
        corrupt.frame.truncate(last);
        assert!(matches!(
            corrupt.rebuild(&b),
            Err(ManifestDeltaError::Corrupt(_))
        ));
    }

    #[test]
    fn a_frame_tampered_to_decode_otherwise_fails_the_signature() {
        // The frame decodes against the right base, but to other bytes than were
        // signed (here: against a base that differs where a match was taken): the
        // rebuilt envelope's signature check refuses it.
        let (b, n) = (base(), new_bytes());
        let env = signed(&n);
        let delta = ManifestDelta::new(&env, &b);
        let mut forged = delta.clone();
        forged.frame = ManifestDelta::new(&signed(&b), &b).frame;
        let rebuilt = forged.rebuild(&b).unwrap();
        assert_ne!(rebuilt.signed, n);
        let key = SecretKey::from_seed(&[7; 32]);
        assert!(!key.public().verify(
            &Envelope::message(&rebuilt.signed),
            &rebuilt.signatures[0].sig
        ));
    }

    proptest::proptest! {
        #[test]
        fn malformed_members_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            if let Ok(d) = ManifestDelta::from_bytes(&bytes) {
                let _ = d.rebuild(&base());
            }
        }

        #[test]
        fn any_frame_against_its_base_never_panics(frame in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            static DELTA: std::sync::OnceLock<ManifestDelta> = std::sync::OnceLock::new();
            let b = base();
            let mut d = DELTA
                .get_or_init(|| ManifestDelta::new(&signed(&new_bytes()), &base()))
                .clone();
            // Keep the magic half the time so the decoder is reached.
            d.frame = if frame.first().is_some_and(|f| f % 2 == 0) {
                [&crate::chunk::ZSTD_MAGIC[..], &frame].concat()
            } else {
                frame
            };
            let _ = d.rebuild(&b);
        }
    }

    #[test]
    fn open_rebuilds_against_a_held_manifest_and_refuses_the_rest() {
        let (b, n) = (base(), new_bytes());
        let env = signed(&n);
        let delta = ManifestDelta::new(&env, &b);
        let held = vec![b.clone()];
        assert_eq!(
            ManifestDelta::open(&delta.to_bytes(), &held),
            Ok((env, *blake3::hash(&b).as_bytes()))
        );
        // Not held: refused, naming the base.
        assert_eq!(
            ManifestDelta::open(&delta.to_bytes(), &NoManifests),
            Err(ManifestDeltaError::UnknownBase {
                base: delta.base_hex()
            })
        );
        // Unsigned: refused before the base is looked up.
        let mut unsigned = delta.clone();
        unsigned.signatures.clear();
        assert_eq!(
            ManifestDelta::open(&unsigned.to_bytes(), &NoManifests),
            Err(ManifestDeltaError::Unsigned)
        );
        // Malformed bytes: the decoder's error.
        assert_eq!(
            ManifestDelta::open(&[], &held),
            Err(ManifestDeltaError::Empty)
        );
        // A corrupt frame: the rebuild's error.
        let mut corrupt = delta.clone();
        corrupt.frame.truncate(corrupt.frame.len() - 1);
        assert!(matches!(
            ManifestDelta::open(&corrupt.to_bytes(), &held),
            Err(ManifestDeltaError::Corrupt(_))
        ));
    }

    #[test]
    fn held_manifests_are_found_by_hash() {
        let held = vec![base(), new_bytes()];
        let h = *blake3::hash(&new_bytes()).as_bytes();
        assert_eq!(held.manifest(&h), Some(new_bytes()));
        assert_eq!(held.manifest(&[0; 32]), None);
        assert_eq!(NoManifests.manifest(&h), None);
    }
}
