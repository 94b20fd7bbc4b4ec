//! ed25519 keys in PKCS#8 / SPKI PEM and their ids.

use std::fmt;
#[cfg(feature = "fs")]
use std::path::Path;
use std::path::PathBuf;
use std::str::FromStr;

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};

/// Errors reading, writing or making keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file could not be read or written.
    #[error("key file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The text is not a PKCS#8 PEM ed25519 private key.
    #[error("not an ed25519 private key in PKCS#8 PEM ({0})")]
    BadPrivateKey(String),
    /// The text is not an SPKI PEM ed25519 public key.
    #[error("not an ed25519 public key in SPKI PEM ({0})")]
    BadPublicKey(String),
    /// The bytes are not a valid ed25519 public key point.
    #[error("invalid ed25519 public key bytes")]
    BadPublicKeyBytes,
    /// The operating system's random number generator failed.
    #[error("no randomness from the operating system: {0}")]
    Random(String),
    /// A key id is not 64 hex digits.
    #[error("a key id is 64 hex digits, got {0:?}")]
    BadKeyId(String),
    /// The key file is empty.
    #[error("key file {path} is empty")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// The text is a key, but of another kind (RSA, EC, ...) or the other half.
    #[error("expected {expected}, found {found}")]
    WrongKind {
        /// What was wanted.
        expected: &'static str,
        /// What the text holds.
        found: String,
    },
}

/// The PEM label of a text (`PRIVATE KEY` for `-----BEGIN PRIVATE KEY-----`).
pub fn pem_label(text: &str) -> Option<&str> {
    text.lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("-----BEGIN ")?.strip_suffix("-----"))
}

/// What kind of key a PEM text holds, in words, when it is not the ed25519 key
/// wanted: from its label and, for PKCS#8 and SPKI, the algorithm the parser
/// named (`detail`).
fn key_kind(text: &str, detail: &str) -> Option<String> {
    let label = pem_label(text)?;
    let algorithm = [
        ("1.2.840.113549.1.1.1", "RSA"),
        ("1.2.840.10045.2.1", "EC"),
        ("1.3.101.113", "Ed448"),
        ("1.3.101.110", "X25519"),
        ("1.3.101.111", "X448"),
        ("1.2.840.10040.4.1", "DSA"),
    ]
    .into_iter()
    .find(|(oid, _)| detail.contains(oid))
    .map(|(_, name)| name);
    Some(match (label, algorithm) {
        ("RSA PRIVATE KEY", _) => "an RSA private key (PKCS#1 PEM)".into(),
        ("EC PRIVATE KEY", _) => "an EC private key (SEC1 PEM)".into(),
        ("OPENSSH PRIVATE KEY", _) => "an OpenSSH private key".into(),
        ("PRIVATE KEY", Some(a)) => format!("an {a} private key (PKCS#8 PEM)"),
        ("PUBLIC KEY", Some(a)) => format!("an {a} public key (SPKI PEM)"),
        ("PRIVATE KEY", None) => "a private key (PKCS#8 PEM)".into(),
        ("PUBLIC KEY", None) => "a public key (SPKI PEM)".into(),
        (other, _) => format!("a PEM {other:?} block"),
    })
}

/// The id of a key: BLAKE3 of the raw 32-byte ed25519 public key.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct KeyId(#[serde(with = "serde_bytes")] pub [u8; 32]);

impl KeyId {
    /// The first 8 bytes in hex: enough for people, not for machines.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..8])
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.short())
    }
}

impl FromStr for KeyId {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut id = [0u8; 32];
        hex::decode_to_slice(s, &mut id).map_err(|_| KeyError::BadKeyId(s.to_string()))?;
        Ok(KeyId(id))
    }
}

/// An ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    /// Parses an SPKI PEM public key (`openssl pkey -pubout` output).
    pub fn from_spki_pem(pem: &str) -> Result<Self, KeyError> {
        VerifyingKey::from_public_key_pem(pem)
            .map(PublicKey)
            .map_err(|e| {
                let detail = e.to_string();
                match key_kind(pem, &detail) {
                    // An SPKI ed25519 key that does not parse: say what the parser said.
                    Some(found) if found != "a public key (SPKI PEM)" => KeyError::WrongKind {
                        expected: "an ed25519 public key (SPKI PEM)",
                        found,
                    },
                    _ => KeyError::BadPublicKey(detail),
                }
            })
    }

    /// The SPKI PEM text of this key.
    pub fn to_spki_pem(&self) -> String {
        self.0
            .to_public_key_pem(LineEnding::LF)
            .expect("encoding a valid ed25519 public key cannot fail")
    }

    /// Reads an SPKI PEM public key file.
    #[cfg(feature = "fs")]
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        Self::from_spki_pem(&read_text(path)?)
    }

    /// Writes this key as an SPKI PEM file.
    #[cfg(feature = "fs")]
    pub fn save(&self, path: &Path) -> Result<(), KeyError> {
        std::fs::write(path, self.to_spki_pem()).map_err(|source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// The key from its raw 32 bytes.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, KeyError> {
        VerifyingKey::from_bytes(bytes)
            .map(PublicKey)
            .map_err(|_| KeyError::BadPublicKeyBytes)
    }

    /// The raw 32 bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// This key's id.
    pub fn id(&self) -> KeyId {
        KeyId(*blake3::hash(self.0.as_bytes()).as_bytes())
    }

    /// Whether `sig` is this key's strict ed25519 signature of `msg`.
    pub fn verify(&self, msg: &[u8], sig: &[u8; 64]) -> bool {
        let sig = ed25519_dalek::Signature::from_bytes(sig);
        self.0.verify_strict(msg, &sig).is_ok()
    }

    /// [`PublicKey::verify`] of the message made of `parts` one after the other,
    /// without joining them: the signature is checked as the parts stream through
    /// SHA-512 (`verify_stream`), so an envelope's 17.6 MB of signed bytes are not
    /// copied behind the signing context to be checked. The verdict is
    /// `verify_strict`'s: the stream verifier alone is not strict, so the checks
    /// `verify_strict` adds are made here first (R must be a point on the curve,
    /// and neither R nor the key may be of small order).
    pub fn verify_parts(&self, parts: &[&[u8]], sig: &[u8; 64]) -> bool {
        let Some(mut stream) = self.stream_verifier(sig) else {
            return false;
        };
        for part in parts {
            stream.update(part);
        }
        stream.verify()
    }

    /// The verifier of `sig` over a message fed to it in parts
    /// ([`PublicKey::verify_parts`], for a message read from a file as it is
    /// checked); `None` when `sig` fails `verify_strict`'s checks that need no
    /// message.
    pub fn stream_verifier(&self, sig: &[u8; 64]) -> Option<StreamVerifier> {
        // R is the signature's first half: decompressing it as a key is exactly
        // `verify_strict`'s decompression, and `is_weak` its small-order test.
        let r: &[u8; 32] = sig[..32].try_into().expect("64 bytes hold 32");
        match VerifyingKey::from_bytes(r) {
            Ok(r) if !r.is_weak() => {}
            _ => return None,
        }
        if self.0.is_weak() {
            return None;
        }
        let sig = ed25519_dalek::Signature::from_bytes(sig);
        // Refuses a non-canonical s, as `verify_strict` does.
        self.0.verify_stream(&sig).ok().map(StreamVerifier)
    }
}

/// A signature checked over a message fed in parts ([`PublicKey::stream_verifier`]).
pub struct StreamVerifier(ed25519_dalek::StreamVerifier);

impl fmt::Debug for StreamVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StreamVerifier")
    }
}

impl StreamVerifier {
    /// The next part of the message.
    pub fn update(&mut self, part: &[u8]) {
        self.0.update(part);
    }

    /// Whether the signature verifies over the parts fed.
    pub fn verify(self) -> bool {
        self.0.finalize_and_verify().is_ok()
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.id().short())
    }
}

impl serde::Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serde_bytes::Bytes::new(self.0.as_bytes()).serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes: [u8; 32] = serde_bytes::deserialize(d)?;
        PublicKey::from_bytes(&bytes).map_err(serde::de::Error::custom)
    }
}

/// An ed25519 private key. Its bytes are zeroed on drop.
#[derive(Clone)]
pub struct SecretKey(SigningKey);

impl SecretKey {
    /// A new key from the operating system's random number generator.
    #[cfg(feature = "keygen")]
    pub fn generate() -> Result<Self, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
        let key = SecretKey(SigningKey::from_bytes(&seed));
        seed.fill(0);
        Ok(key)
    }

    /// A key from a 32-byte seed: for tests and reproducible demos only.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        SecretKey(SigningKey::from_bytes(seed))
    }

    /// Parses a PKCS#8 PEM private key (`openssl genpkey -algorithm ed25519` output).
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, KeyError> {
        SigningKey::from_pkcs8_pem(pem).map(SecretKey).map_err(|e| {
            let detail = e.to_string();
            match key_kind(pem, &detail) {
                // An unknown PKCS#8 problem: say what the parser said.
                Some(found) if found != "a private key (PKCS#8 PEM)" => KeyError::WrongKind {
                    expected: "an ed25519 private key (PKCS#8 PEM)",
                    found,
                },
                _ => KeyError::BadPrivateKey(detail),
            }
        })
    }

    /// The PKCS#8 PEM text of this key: a v1 `PrivateKeyInfo` without the optional
    /// public key, the form `openssl genpkey` writes and OpenSSL 3.0 reads (it refuses
    /// the v2 form with the public key attached).
    pub fn to_pkcs8_pem(&self) -> String {
        let v1 = ed25519_dalek::pkcs8::KeypairBytes {
            secret_key: self.0.to_bytes(),
            public_key: None,
        };
        v1.to_pkcs8_pem(LineEnding::LF)
            .expect("encoding a valid ed25519 private key cannot fail")
            .to_string()
    }

    /// Reads a PKCS#8 PEM private key file.
    #[cfg(feature = "fs")]
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        Self::from_pkcs8_pem(&read_text(path)?)
    }

    /// Writes this key as a PKCS#8 PEM file readable by its owner only. Refuses to
    /// overwrite an existing file.
    #[cfg(feature = "fs")]
    pub fn save(&self, path: &Path) -> Result<(), KeyError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let io = |source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        file.write_all(self.to_pkcs8_pem().as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)
    }

    /// The 32-byte seed this key is made from (the libp2p identity of a device is
    /// the same key). Secret: never log or send it.
    pub fn to_seed(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// The id of the public half.
    pub fn id(&self) -> KeyId {
        self.public().id()
    }

    /// Signs `msg`.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.0.sign(msg).to_bytes()
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({})", self.id().short())
    }
}

#[cfg(feature = "fs")]
fn read_text(path: &Path) -> Result<String, KeyError> {
    // A PEM key is a few hundred bytes; refuse to slurp anything large.
    const KEY_FILE_SIZE_MAX: u64 = 64 * 1024;
    let io = |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if meta.len() > KEY_FILE_SIZE_MAX {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} bytes is too large for a key file", meta.len()),
        )));
    }
    let text = std::fs::read_to_string(path).map_err(io)?;
    if text.trim().is_empty() {
        return Err(KeyError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A public key and signature built by hand from scalars: `R` and `A` given,
    /// `s = k·a` where `k = SHA-512(R ‖ A ‖ msg)`, so `[s]B = R + [k]A` holds when
    /// `R` is the identity and `A = [a]B`: the signature equation is satisfied, and
    /// only the strict checks (small-order R, weak key) refuse it.
    fn forged(r: [u8; 32], a: curve25519_dalek::Scalar, msg: &[u8]) -> ([u8; 32], [u8; 64]) {
        use sha2::Digest as _;
        let public = curve25519_dalek::EdwardsPoint::mul_base(&a).compress();
        let mut h = sha2::Sha512::new();
        h.update(r);
        h.update(public.as_bytes());
        h.update(msg);
        let wide: [u8; 64] = h.finalize().into();
        let k = curve25519_dalek::Scalar::from_bytes_mod_order_wide(&wide);
        let s = k * a;
        let mut sig = [0u8; 64];
        sig[..32].copy_from_slice(&r);
        sig[32..].copy_from_slice(s.as_bytes());
        (public.to_bytes(), sig)
    }

    /// The compressed identity point: small order (order 1).
    const IDENTITY: [u8; 32] = {
        let mut b = [0u8; 32];
        b[0] = 1;
        b
    };

    /// The equation of `sig` over `msg` holds, so ed25519-dalek's (non-strict)
    /// stream verifier alone accepts it, while `verify_strict` refuses it.
    fn assert_forgery_needs_the_strict_checks(key: &PublicKey, msg: &[u8], sig: &[u8; 64]) {
        let mut stream = key
            .0
            .verify_stream(&ed25519_dalek::Signature::from_bytes(sig))
            .unwrap();
        stream.update(msg);
        assert!(
            stream.finalize_and_verify().is_ok(),
            "the forgery is valid unless strict"
        );
        assert!(!key.verify(msg, sig), "verify_strict refuses it");
    }

    #[test]
    fn stream_verify_refuses_a_small_order_r() {
        let msg = b"shoal-envelope-v1\0manifest";
        let (public, sig) = forged(IDENTITY, curve25519_dalek::Scalar::from(12345u64), msg);
        let key = PublicKey::from_bytes(&public).unwrap();
        assert_forgery_needs_the_strict_checks(&key, msg, &sig);
        assert!(!key.verify_parts(&[&msg[..5], &msg[5..]], &sig));
    }

    #[test]
    fn stream_verify_refuses_a_weak_key() {
        // The identity as the key, the identity as R and s = 0: [0]B = R + [k]A
        // for every message.
        let key = PublicKey::from_bytes(&IDENTITY).unwrap();
        let mut sig = [0u8; 64];
        sig[..32].copy_from_slice(&IDENTITY);
        let msg = b"anything at all";
        assert_forgery_needs_the_strict_checks(&key, msg, &sig);
        assert!(!key.verify_parts(&[msg], &sig));
    }

    #[test]
    fn stream_verify_refuses_an_r_off_the_curve() {
        let key = SecretKey::from_seed(&[3; 32]);
        let msg = b"message";
        let mut sig = key.sign(msg);
        assert!(key.public().verify_parts(&[msg], &sig));
        // y = 2 is not the y of any point on edwards25519.
        sig[..32].copy_from_slice(&{
            let mut b = [0u8; 32];
            b[0] = 2;
            b
        });
        assert!(VerifyingKey::from_bytes(sig[..32].try_into().unwrap()).is_err());
        assert!(!key.public().verify(msg, &sig));
        assert!(!key.public().verify_parts(&[msg], &sig));
    }

    proptest::proptest! {
        /// The streamed verdict is `verify_strict`'s, whatever the split of the
        /// message, for valid signatures, signatures with a byte changed (in R or
        /// s, including a non-canonical s), other messages and hand-made small-order
        /// forgeries.
        #[test]
        fn stream_verdict_equals_verify_strict(
            seed in proptest::array::uniform32(0u8..),
            msg in proptest::collection::vec(0u8.., 0..300),
            split in 0usize..300,
            flip in proptest::option::of((0usize..64, 1u8..)),
            other in proptest::option::of(proptest::collection::vec(0u8.., 0..40)),
            forge in 0u8..3,
        ) {
            let key = SecretKey::from_seed(&seed);
            let (public, mut sig) = match forge {
                0 => (key.public(), key.sign(&msg)),
                1 => {
                    let (p, s) = forged(IDENTITY, curve25519_dalek::Scalar::from_bytes_mod_order(seed), &msg);
                    (PublicKey::from_bytes(&p).unwrap(), s)
                }
                _ => {
                    let mut s = [0u8; 64];
                    s[..32].copy_from_slice(&IDENTITY);
                    (PublicKey::from_bytes(&IDENTITY).unwrap(), s)
                }
            };
            if let Some((at, x)) = flip {
                sig[at] ^= x;
            }
            let msg = other.unwrap_or(msg);
            let split = split.min(msg.len());
            proptest::prop_assert_eq!(
                public.verify_parts(&[&msg[..split], &msg[split..]], &sig),
                public.verify(&msg, &sig)
            );
        }
    }

    #[test]
    fn pem_round_trip_keeps_the_key() {
        let key = SecretKey::from_seed(&[7; 32]);
        let again = SecretKey::from_pkcs8_pem(&key.to_pkcs8_pem()).unwrap();
        assert_eq!(again.id(), key.id());
        let public = PublicKey::from_spki_pem(&key.public().to_spki_pem()).unwrap();
        assert_eq!(public, key.public());
        assert!(
            key.to_pkcs8_pem()
                .starts_with("-----BEGIN PRIVATE KEY-----")
        );
        assert!(
            public
                .to_spki_pem()
                .starts_with("-----BEGIN PUBLIC KEY-----")
        );
    }

    #[test]
    fn key_id_is_blake3_of_public_key_and_parses_from_hex() {
        let key = SecretKey::from_seed(&[1; 32]);
        let id = key.id();
        assert_eq!(id.0, *blake3::hash(&key.public().to_bytes()).as_bytes());
        assert_eq!(id.to_string().parse::<KeyId>().unwrap(), id);
        assert!(matches!("abc".parse::<KeyId>(), Err(KeyError::BadKeyId(_))));
    }

    #[test]
    fn garbage_pem_is_a_specific_error() {
        assert!(matches!(
            SecretKey::from_pkcs8_pem(
                "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
            ),
            Err(KeyError::BadPrivateKey(_))
        ));
        assert!(matches!(
            PublicKey::from_spki_pem("hello"),
            Err(KeyError::BadPublicKey(_))
        ));
        // A private key where a public key is expected, and the other way round:
        // the error says what was found.
        let key = SecretKey::from_seed(&[2; 32]);
        assert!(matches!(
            PublicKey::from_spki_pem(&key.to_pkcs8_pem()),
            Err(KeyError::WrongKind { found, .. }) if found == "a private key (PKCS#8 PEM)"
        ));
        assert!(matches!(
            SecretKey::from_pkcs8_pem(&key.public().to_spki_pem()),
            Err(KeyError::WrongKind { found, .. }) if found == "a public key (SPKI PEM)"
        ));
        // Keys of other algorithms and formats, by label and OID.
        assert_eq!(
            key_kind("-----BEGIN RSA PRIVATE KEY-----\n", ""),
            Some("an RSA private key (PKCS#1 PEM)".into())
        );
        assert_eq!(
            key_kind(
                "-----BEGIN PRIVATE KEY-----\n",
                "unknown/unsupported algorithm OID: 1.2.840.10045.2.1"
            ),
            Some("an EC private key (PKCS#8 PEM)".into())
        );
        assert_eq!(key_kind("hello", ""), None);
    }

    #[test]
    fn an_empty_key_file_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(
            SecretKey::load(&path),
            Err(KeyError::Empty { .. })
        ));
        assert!(matches!(
            PublicKey::load(&path),
            Err(KeyError::Empty { .. })
        ));
    }

    #[test]
    fn save_refuses_to_overwrite_and_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        let key = SecretKey::generate().unwrap();
        key.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(key.save(&path), Err(KeyError::Io { .. })));
        assert_eq!(SecretKey::load(&path).unwrap().id(), key.id());
    }

    #[test]
    fn signatures_verify_only_for_the_right_message_and_key() {
        let key = SecretKey::from_seed(&[3; 32]);
        let other = SecretKey::from_seed(&[4; 32]);
        let sig = key.sign(b"hello");
        assert!(key.public().verify(b"hello", &sig));
        assert!(!key.public().verify(b"hellO", &sig));
        assert!(!other.public().verify(b"hello", &sig));
    }
}
