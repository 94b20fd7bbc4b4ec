//! Signed envelopes: bytes plus any number of `(key id, signature)` pairs.

use crate::key::{KeyId, SecretKey};

/// The largest encoded envelope accepted, in bytes. A manifest costs about 41 bytes
/// a chunk: an 8 GiB image cut with the default chunking (16 KiB average, about
/// 430,000 chunks) has a 17.6 MB envelope, so 32 MiB holds about 800,000 chunks
/// (a 15 GiB image); larger releases use bigger chunks.
pub const ENVELOPE_SIZE_MAX: usize = 32 * 1024 * 1024;

/// The most signatures an envelope may carry.
pub const SIGNATURES_MAX: usize = 256;

/// Prefix of every signed message: domain separation from other uses of the key.
pub const SIGNING_CONTEXT: &[u8] = b"shoal-envelope-v1\0";

/// Errors decoding an envelope, a trust root or another signed CBOR structure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input is larger than the format allows.
    #[error("{size} bytes is larger than the limit of {max} bytes")]
    TooLarge {
        /// Input size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The input is empty.
    #[error("empty input")]
    Empty,
    /// The bytes are not the expected CBOR structure.
    #[error("malformed CBOR: {0}")]
    Cbor(String),
    /// The CBOR is valid but not in canonical form (it would not re-encode to itself).
    #[error("CBOR is not in canonical form")]
    NonCanonical,
    /// More signatures than [`SIGNATURES_MAX`].
    #[error("{count} signatures is more than the limit of {max}")]
    TooManySignatures {
        /// How many there were.
        count: usize,
        /// The limit.
        max: usize,
    },
}

/// A CBOR decoding error in words (cbor4ii's `Display` is its `Debug` text, which
/// no one should read in an error message).
pub fn describe_cbor_error<E: std::fmt::Debug>(e: &cbor4ii::serde::DecodeError<E>) -> String {
    use cbor4ii::core::error::DecodeError as Core;
    let major = |byte: u8| match byte >> 5 {
        0 => "an unsigned integer",
        1 => "a negative integer",
        2 => "a byte string",
        3 => "a text string",
        4 => "an array",
        5 => "a map",
        6 => "a tag",
        _ => "a simple value or float",
    };
    let core = match e {
        cbor4ii::serde::DecodeError::Custom(msg) => return msg.to_string(),
        cbor4ii::serde::DecodeError::Core(core) => core,
    };
    match core {
        Core::Mismatch { name, found } => format!(
            "expected {name}, found {} (initial byte 0x{found:02x})",
            major(*found)
        ),
        Core::Unsupported { name, found } => {
            format!("unsupported {name} (initial byte 0x{found:02x})")
        }
        Core::Eof { name, .. } => format!("the input ends inside {name}"),
        Core::RequireLength { name, .. } => format!("{name} has no definite length"),
        Core::RequireBorrowed { name } | Core::RequireUtf8 { name } => {
            format!("{name} is not valid UTF-8")
        }
        Core::LengthOverflow { name, .. } => format!("{name} is longer than the input"),
        Core::CastOverflow { name } | Core::ArithmeticOverflow { name, .. } => {
            format!("{name} is out of range")
        }
        Core::DepthOverflow { name } => format!("{name} is nested too deeply"),
        _ => "not the expected structure".to_string(),
    }
}

/// One signature.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Signature {
    /// The signing key's id.
    pub key_id: KeyId,
    /// The ed25519 signature of [`SIGNING_CONTEXT`] followed by the signed bytes.
    #[serde(with = "serde_bytes")]
    pub sig: [u8; 64],
}

/// Signed bytes plus signatures.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Envelope {
    /// The bytes that are signed (canonical CBOR of a manifest, a root, ...).
    #[serde(with = "serde_bytes")]
    pub signed: Vec<u8>,
    /// Signatures, in the order they were added.
    pub signatures: Vec<Signature>,
}

impl Envelope {
    /// An envelope around `signed` with no signatures yet.
    pub fn new(signed: Vec<u8>) -> Envelope {
        Envelope {
            signed,
            signatures: Vec::new(),
        }
    }

    /// The message a key signs for these bytes.
    pub fn message(signed: &[u8]) -> Vec<u8> {
        let mut msg = Vec::with_capacity(SIGNING_CONTEXT.len() + signed.len());
        msg.extend_from_slice(SIGNING_CONTEXT);
        msg.extend_from_slice(signed);
        msg
    }

    /// Adds `key`'s signature, replacing an earlier one by the same key.
    pub fn sign(&mut self, key: &SecretKey) {
        let sig = Signature {
            key_id: key.id(),
            sig: key.sign(&Self::message(&self.signed)),
        };
        match self.signatures.iter_mut().find(|s| s.key_id == sig.key_id) {
            Some(existing) => *existing = sig,
            None => self.signatures.push(sig),
        }
    }

    /// Canonical CBOR encoding, in a buffer sized for it up front (grown by
    /// doubling, the buffer of a large manifest's envelope would reserve up to
    /// twice its size).
    pub fn to_bytes(&self) -> Vec<u8> {
        // Map and field headers, the signed bytes' header, and per signature
        // its array entry, two field names, a 32-byte id and a 64-byte signature.
        let bound = 64 + self.signed.len() + self.signatures.len() * 128;
        let bytes = cbor4ii::serde::to_vec(Vec::with_capacity(bound), self)
            .expect("encoding into a Vec cannot fail");
        debug_assert!(bytes.len() <= bound, "the bound holds");
        bytes
    }

    /// Decodes an envelope, bounded by [`ENVELOPE_SIZE_MAX`] and [`SIGNATURES_MAX`].
    /// Says nothing about whether the signatures are valid: see
    /// [`TrustRoot::verify`](crate::TrustRoot::verify).
    pub fn from_bytes(bytes: &[u8]) -> Result<Envelope, DecodeError> {
        let env: Envelope = from_cbor(bytes, ENVELOPE_SIZE_MAX)?;
        if env.signatures.len() > SIGNATURES_MAX {
            return Err(DecodeError::TooManySignatures {
                count: env.signatures.len(),
                max: SIGNATURES_MAX,
            });
        }
        Ok(env)
    }
}

impl Envelope {
    /// [`Envelope::from_bytes`] of an owned buffer, decoded in place: the signed
    /// bytes keep the buffer's allocation (moved to its front), so a large
    /// envelope (17.6 MB for an 8 GiB image) is never held twice while it is
    /// decoded. The same checks, and the same errors word for word.
    pub fn from_vec(mut bytes: Vec<u8>) -> Result<Envelope, DecodeError> {
        let (start, len, signatures) = match EnvelopeRef::from_bytes(&bytes) {
            Ok(r) => {
                let start = (r.signed.as_ptr() as usize).wrapping_sub(bytes.as_ptr() as usize);
                assert!(
                    start + r.signed.len() <= bytes.len(),
                    "borrowed bytes lie inside the buffer"
                );
                (start, r.signed.len(), r.signatures)
            }
            // Refused: the error is the owned decoder's (cbor4ii words its errors
            // the same for both, but this keeps them equal by construction).
            Err(_) => return Envelope::from_bytes(&bytes),
        };
        bytes.truncate(start + len);
        bytes.drain(..start);
        Ok(Envelope {
            signed: bytes,
            signatures,
        })
    }
}

/// An envelope decoded in place: its signed bytes borrowed from the encoding, so
/// a large manifest's envelope is held once, not twice, while it is checked.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EnvelopeRef<'a> {
    /// The bytes that are signed (see [`Envelope::signed`]).
    #[serde(with = "serde_bytes", borrow)]
    pub signed: &'a [u8],
    /// Signatures, in the order they were added.
    pub signatures: Vec<Signature>,
}

impl<'a> EnvelopeRef<'a> {
    /// Decodes an envelope without copying its signed bytes, with the checks of
    /// [`Envelope::from_bytes`] (size, canonical form, signature count).
    pub fn from_bytes(bytes: &'a [u8]) -> Result<EnvelopeRef<'a>, DecodeError> {
        if bytes.is_empty() {
            return Err(DecodeError::Empty);
        }
        if bytes.len() > ENVELOPE_SIZE_MAX {
            return Err(DecodeError::TooLarge {
                size: bytes.len(),
                max: ENVELOPE_SIZE_MAX,
            });
        }
        let env: EnvelopeRef<'a> = cbor4ii::serde::from_slice(bytes)
            .map_err(|e| DecodeError::Cbor(describe_cbor_error(&e)))?;
        if !encodes_to(&env, bytes) {
            return Err(DecodeError::NonCanonical);
        }
        if env.signatures.len() > SIGNATURES_MAX {
            return Err(DecodeError::TooManySignatures {
                count: env.signatures.len(),
                max: SIGNATURES_MAX,
            });
        }
        Ok(env)
    }
}

/// Where an envelope's signed bytes lie in its encoding, found without reading
/// them ([`EnvelopeLayout::locate`]), with its signatures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeLayout {
    /// Offset of the signed bytes in the encoding.
    pub signed_at: u64,
    /// Their length.
    pub signed_len: u64,
    /// The signatures.
    pub signatures: Vec<Signature>,
}

/// The signatures alone: an envelope's encoding after its signed bytes, behind a
/// one-entry map head.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SignaturesOnly {
    signatures: Vec<Signature>,
}

impl EnvelopeLayout {
    /// Reads the layout of the envelope encoded in `len` bytes that `read_at`
    /// reads (an envelope file): its head and its signatures, not its signed
    /// bytes. `None` unless it is laid out exactly as a canonical envelope
    /// [`EnvelopeRef::from_bytes`] accepts (then decode the whole bytes with it,
    /// for its error), its signed bytes aside, which the caller checks.
    pub fn locate(
        len: u64,
        read_at: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
    ) -> std::io::Result<Option<EnvelopeLayout>> {
        if len == 0 || len > ENVELOPE_SIZE_MAX as u64 {
            return Ok(None);
        }
        // `{"signed": h'...'`: a two-entry map, the key, the bytes' head.
        const KEY: &[u8] = b"\xa2\x66signed";
        let mut head = [0u8; KEY.len() + 9];
        let n = head.len().min(len as usize);
        read_at(0, &mut head[..n])?;
        if n < KEY.len() + 1 || head[..KEY.len()] != *KEY {
            return Ok(None);
        }
        let initial = head[KEY.len()];
        let (arg_len, short) = match initial {
            0x40..=0x57 => (0, u64::from(initial & 0x1f)),
            0x58 => (1, 0),
            0x59 => (2, 0),
            0x5a => (4, 0),
            0x5b => (8, 0),
            _ => return Ok(None),
        };
        if n < KEY.len() + 1 + arg_len {
            return Ok(None);
        }
        let signed_len = if arg_len == 0 {
            short
        } else {
            let mut b = [0u8; 8];
            b[8 - arg_len..].copy_from_slice(&head[KEY.len() + 1..KEY.len() + 1 + arg_len]);
            u64::from_be_bytes(b)
        };
        let signed_at = (KEY.len() + 1 + arg_len) as u64;
        let Some(tail_at) = signed_at.checked_add(signed_len).filter(|&e| e <= len) else {
            return Ok(None);
        };
        // The signatures: bounded (each about 110 bytes).
        let tail_len = len - tail_at;
        if tail_len > (SIGNATURES_MAX as u64 + 1) * 128 {
            return Ok(None);
        }
        let mut tail = vec![0u8; 1 + tail_len as usize];
        tail[0] = 0xa1;
        read_at(tail_at, &mut tail[1..])?;
        let Ok(sigs) = cbor4ii::serde::from_slice::<SignaturesOnly>(&tail) else {
            return Ok(None);
        };
        if sigs.signatures.len() > SIGNATURES_MAX {
            return Ok(None);
        }
        // Canonical: the encoding with empty signed bytes, their head aside.
        let env = EnvelopeRef {
            signed: &[],
            signatures: sigs.signatures,
        };
        let empty = to_cbor(&env);
        let mut want_head = Vec::with_capacity(9);
        let m = 2u8 << 5;
        match signed_len {
            0..=23 => want_head.push(m | signed_len as u8),
            24..=0xff => want_head.extend_from_slice(&[m | 24, signed_len as u8]),
            0x100..=0xffff => {
                want_head.push(m | 25);
                want_head.extend_from_slice(&(signed_len as u16).to_be_bytes());
            }
            0x1_0000..=0xffff_ffff => {
                want_head.push(m | 26);
                want_head.extend_from_slice(&(signed_len as u32).to_be_bytes());
            }
            _ => {
                want_head.push(m | 27);
                want_head.extend_from_slice(&signed_len.to_be_bytes());
            }
        }
        let canonical = head[KEY.len()..KEY.len() + 1 + arg_len] == want_head[..]
            && empty.get(..KEY.len()) == Some(KEY)
            && empty.get(KEY.len()) == Some(&0x40)
            && empty[KEY.len() + 1..] == tail[1..];
        if !canonical {
            return Ok(None);
        }
        Ok(Some(EnvelopeLayout {
            signed_at,
            signed_len,
            signatures: env.signatures,
        }))
    }
}

/// Whether the canonical CBOR of `value` is exactly `bytes`, compared as it is
/// encoded (no copy of the encoding is made: for a manifest of 100,000 chunks a
/// copy would be 9 MB).
pub fn encodes_to<T: serde::Serialize + ?Sized>(value: &T, bytes: &[u8]) -> bool {
    /// Compares what is written with `expect`, from `at` on.
    struct Match<'a> {
        expect: &'a [u8],
        at: usize,
    }
    #[derive(Debug)]
    struct Differs;
    impl std::fmt::Display for Differs {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("the encoding differs")
        }
    }
    impl std::error::Error for Differs {}
    impl cbor4ii::core::enc::Write for Match<'_> {
        type Error = Differs;
        fn push(&mut self, input: &[u8]) -> Result<(), Differs> {
            let end = self.at + input.len();
            if self.expect.get(self.at..end) != Some(input) {
                return Err(Differs);
            }
            self.at = end;
            Ok(())
        }
    }
    let mut ser = cbor4ii::serde::Serializer::new(Match {
        expect: bytes,
        at: 0,
    });
    value.serialize(&mut ser).is_ok() && ser.into_inner().at == bytes.len()
}

/// Canonical CBOR of a value (struct fields in declaration order, maps sorted).
pub(crate) fn to_cbor<T: serde::Serialize>(value: &T) -> Vec<u8> {
    cbor4ii::serde::to_vec(Vec::new(), value).expect("encoding into a Vec cannot fail")
}

/// Decodes canonical CBOR of at most `max` bytes; rejects trailing bytes and
/// encodings that do not re-encode to themselves.
pub(crate) fn from_cbor<T>(bytes: &[u8], max: usize) -> Result<T, DecodeError>
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    if bytes.len() > max {
        return Err(DecodeError::TooLarge {
            size: bytes.len(),
            max,
        });
    }
    let value: T = cbor4ii::serde::from_slice(bytes)
        .map_err(|e| DecodeError::Cbor(describe_cbor_error(&e)))?;
    if !encodes_to(&value, bytes) {
        return Err(DecodeError::NonCanonical);
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn locate(bytes: &[u8]) -> Option<EnvelopeLayout> {
        EnvelopeLayout::locate(bytes.len() as u64, &mut |at, buf| {
            buf.copy_from_slice(&bytes[at as usize..at as usize + buf.len()]);
            Ok(())
        })
        .expect("reads from memory")
    }

    /// Issue 10: an envelope file's layout is found without reading its signed
    /// bytes, and only where `EnvelopeRef::from_bytes` accepts the whole: for a
    /// signed envelope (short and long signed bytes) and every bit flip of one.
    #[test]
    fn the_layout_is_found_exactly_where_the_whole_envelope_decodes() {
        let (a, b) = (
            SecretKey::generate().expect("a key"),
            SecretKey::generate().expect("a key"),
        );
        for signed in [b"abc".to_vec(), vec![7u8; 300], vec![9u8; 70_000]] {
            let mut env = Envelope::new(signed.clone());
            env.sign(&a);
            env.sign(&b);
            let bytes = env.to_bytes();
            let l = locate(&bytes).expect("a canonical envelope");
            let at = l.signed_at as usize;
            assert_eq!(&bytes[at..at + l.signed_len as usize], &signed[..]);
            assert_eq!(l.signatures, env.signatures);
        }
        let mut env = Envelope::new(b"a manifest".to_vec());
        env.sign(&a);
        let bytes = env.to_bytes();
        for i in 0..bytes.len() * 8 {
            let mut f = bytes.clone();
            f[i / 8] ^= 1 << (i % 8);
            let whole = EnvelopeRef::from_bytes(&f);
            match (locate(&f), whole) {
                (Some(l), Ok(w)) => {
                    let at = l.signed_at as usize;
                    assert_eq!(&f[at..at + l.signed_len as usize], w.signed, "bit {i}");
                    assert_eq!(l.signatures, w.signatures, "bit {i}");
                }
                (None, Err(_)) => {}
                (l, w) => panic!("bit {i}: layout {l:?}, whole {w:?}"),
            }
        }
        assert_eq!(locate(&[]), None);
        assert_eq!(locate(&bytes[..bytes.len() - 1]), None);
    }

    /// An envelope whose byte string has a longer header than it needs decodes but
    /// is not canonical: both decoders refuse it (the check compares the encoding
    /// as it is made, without a copy), and one byte more or less is refused too.
    #[test]
    fn non_canonical_envelopes_are_refused_by_both_decoders() {
        let head = [&[0xa2, 0x66][..], b"signed"].concat();
        let tail = [&[0x6a][..], b"signatures", &[0x80]].concat();
        let canonical = [&head[..], &[0x43], b"abc", &tail[..]].concat();
        let loose = [&head[..], &[0x58, 0x03], b"abc", &tail[..]].concat();
        assert_eq!(
            EnvelopeRef::from_bytes(&canonical)
                .expect("canonical")
                .signed,
            b"abc"
        );
        assert_eq!(
            Envelope::from_bytes(&canonical).expect("canonical").signed,
            b"abc"
        );
        assert_eq!(
            EnvelopeRef::from_bytes(&loose),
            Err(DecodeError::NonCanonical)
        );
        assert_eq!(Envelope::from_bytes(&loose), Err(DecodeError::NonCanonical));
        let env = Envelope::from_bytes(&canonical).expect("canonical");
        assert!(encodes_to(&env, &canonical));
        assert!(!encodes_to(&env, &canonical[..canonical.len() - 1]));
        assert!(!encodes_to(&env, &[&canonical[..], &[0]].concat()));
    }

    /// A large envelope is encoded into a buffer of its size, not one grown by
    /// doubling (up to twice its size, 17 MB for an 8 GiB image's manifest).
    #[test]
    fn a_large_envelope_is_encoded_into_a_buffer_of_its_size() {
        let mut env = Envelope::new(vec![7u8; 1 << 20]);
        env.sign(&SecretKey::from_seed(&[1; 32]));
        env.sign(&SecretKey::from_seed(&[2; 32]));
        let bytes = env.to_bytes();
        assert!(
            bytes.capacity() <= bytes.len() + 512,
            "capacity {} for {} bytes",
            bytes.capacity(),
            bytes.len()
        );
        assert_eq!(Envelope::from_bytes(&bytes).expect("decodes"), env);
    }

    #[test]
    fn signing_twice_with_one_key_keeps_one_signature() {
        let key = SecretKey::from_seed(&[9; 32]);
        let mut env = Envelope::new(b"payload".to_vec());
        env.sign(&key);
        env.sign(&key);
        assert_eq!(env.signatures.len(), 1);
        assert!(
            key.public()
                .verify(&Envelope::message(b"payload"), &env.signatures[0].sig)
        );
    }

    /// `from_vec` decodes what `from_bytes` decodes, and refuses what it refuses
    /// with the same error.
    #[test]
    fn from_vec_is_from_bytes_in_place() {
        let mut env = Envelope::new(b"signed manifest bytes".repeat(50));
        env.sign(&SecretKey::from_seed(&[1; 32]));
        env.sign(&SecretKey::from_seed(&[2; 32]));
        let bytes = env.to_bytes();
        assert_eq!(Envelope::from_vec(bytes.clone()), Ok(env.clone()));
        let mut trailing = bytes.clone();
        trailing.push(0);
        // The byte string's header in 2 bytes where 1 does: not canonical.
        let head = [&[0xa2, 0x66][..], b"signed"].concat();
        let tail = [&[0x6a][..], b"signatures", &[0x80]].concat();
        let loose = [&head[..], &[0x58, 0x03], b"abc", &tail[..]].concat();
        let big = vec![0u8; ENVELOPE_SIZE_MAX + 1];
        for bad in [
            Vec::new(),
            b"not cbor at all".to_vec(),
            bytes[..bytes.len() - 1].to_vec(),
            trailing,
            loose,
            big,
        ] {
            let owned = Envelope::from_bytes(&bad);
            assert!(owned.is_err());
            assert_eq!(Envelope::from_vec(bad), owned);
        }
    }

    #[test]
    fn malformed_envelopes_give_specific_errors() {
        assert_eq!(Envelope::from_bytes(&[]), Err(DecodeError::Empty));
        // Regression (issue 9, error contract): cbor4ii's errors display as Rust
        // Debug text (`Core(Mismatch { name: "u32", found: 27 })`); they are words.
        let words = |bytes: &[u8]| match Envelope::from_bytes(bytes) {
            Err(DecodeError::Cbor(m)) => m,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            words(b"not cbor at all"),
            "expected map, found a text string (initial byte 0x6e)"
        );
        let mut env = Envelope::new(vec![1, 2, 3]);
        env.sign(&SecretKey::from_seed(&[1; 32]));
        let bytes = env.to_bytes();
        let message = words(&bytes[..bytes.len() - 1]);
        assert!(
            !message.contains('{') && !message.contains("Core("),
            "{message}"
        );
        assert!(matches!(
            Envelope::from_bytes(b"not cbor at all"),
            Err(DecodeError::Cbor(_))
        ));
        let big = vec![0u8; ENVELOPE_SIZE_MAX + 1];
        assert_eq!(
            Envelope::from_bytes(&big),
            Err(DecodeError::TooLarge {
                size: ENVELOPE_SIZE_MAX + 1,
                max: ENVELOPE_SIZE_MAX
            })
        );
        let mut env = Envelope::new(vec![1, 2, 3]);
        env.sign(&SecretKey::from_seed(&[1; 32]));
        let bytes = env.to_bytes();
        // Truncated.
        assert!(matches!(
            Envelope::from_bytes(&bytes[..bytes.len() - 1]),
            Err(DecodeError::Cbor(_))
        ));
        // Trailing garbage.
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Envelope::from_bytes(&longer).is_err());
    }

    #[test]
    fn too_many_signatures_are_refused() {
        let key = SecretKey::from_seed(&[1; 32]);
        let mut env = Envelope::new(vec![1]);
        env.sign(&key);
        let one = env.signatures[0].clone();
        env.signatures = vec![one; SIGNATURES_MAX + 1];
        assert_eq!(
            Envelope::from_bytes(&env.to_bytes()),
            Err(DecodeError::TooManySignatures {
                count: SIGNATURES_MAX + 1,
                max: SIGNATURES_MAX
            })
        );
    }

    proptest! {
        #[test]
        fn envelope_round_trips(signed in proptest::collection::vec(any::<u8>(), 0..512), seeds in proptest::collection::vec(any::<[u8; 32]>(), 0..4)) {
            let mut env = Envelope::new(signed);
            for seed in &seeds {
                env.sign(&SecretKey::from_seed(seed));
            }
            prop_assert_eq!(Envelope::from_bytes(&env.to_bytes()).unwrap(), env);
        }
    }
}
