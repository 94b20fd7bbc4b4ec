//! TUF-style trust roots: keys, roles with thresholds, version, expiry, rotation.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
#[cfg(feature = "fs")]
use std::path::Path;
use std::path::PathBuf;

use crate::envelope::{DecodeError, ENVELOPE_SIZE_MAX, Envelope, EnvelopeRef, from_cbor, to_cbor};
use crate::key::{KeyId, PublicKey};

/// Release envelopes this process checked against a trust root ([`release_checks`]).
static RELEASE_CHECKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many times this process has checked a signed envelope against a trust
/// root's `release` role (every [`TrustRoot::verify`], [`TrustRoot::verify_ref`]
/// and [`TrustRoot::verify_streamed`] of that role, whatever the verdict). A
/// diagnostic: the daemon logs how many checks a deployment took (one), which
/// its tests assert.
pub fn release_checks() -> u64 {
    RELEASE_CHECKS.load(std::sync::atomic::Ordering::Relaxed)
}

/// The most keys a root may list.
pub const ROOT_KEYS_MAX: usize = 64;

/// The root format this crate writes and reads.
const ROOT_FORMAT: u32 = 1;

/// A role: what a set of keys may sign.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum RoleName {
    /// Signs new trust roots.
    Root,
    /// Signs release manifests.
    Release,
    /// Signs fleet membership credentials: which devices' keys may get firmware
    /// from their LAN peers ([`crate::Credential`]). Optional: roots without it (all
    /// roots written before it existed) still read, and their devices' LAN is open.
    Fleet,
}

impl fmt::Display for RoleName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RoleName::Root => "root",
            RoleName::Release => "release",
            RoleName::Fleet => "fleet",
        })
    }
}

/// The keys of one role and how many of them must sign.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Role {
    /// Keys allowed to sign for this role.
    pub key_ids: BTreeSet<KeyId>,
    /// How many distinct keys of `key_ids` must sign.
    pub threshold: u32,
}

/// The trust root: which keys a device trusts for what, until when.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TrustRoot {
    /// Root format, 1.
    pub format: u32,
    /// Version; a rotation must raise it.
    pub version: u64,
    /// Unix time (seconds) at and after which this root is expired.
    pub expires_unix_s: u64,
    /// Every key any role uses, by id.
    pub keys: BTreeMap<KeyId, PublicKey>,
    /// The roles. `root` and `release` must be present.
    pub roles: BTreeMap<RoleName, Role>,
}

/// Errors verifying an envelope against a trust root.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// Fewer distinct valid signatures by the role's keys than its threshold.
    #[error(
        "{role} role needs {threshold} valid signature(s) from its keys, found {valid} \
         ({invalid} invalid, {unknown} by keys the {role} role does not list)"
    )]
    BelowThreshold {
        /// The role.
        role: RoleName,
        /// Distinct keys of the role whose signatures verified.
        valid: u32,
        /// The role's threshold.
        threshold: u32,
        /// Signatures by the role's keys that did not verify.
        invalid: u32,
        /// Signatures by keys the role does not list (ignored).
        unknown: u32,
    },
    /// The trust root is past its expiry time.
    #[error(
        "trust root expired at unix time {expires_unix_s} (now {now_unix_s}); install a newer root"
    )]
    Expired {
        /// When it expired.
        expires_unix_s: u64,
        /// The time passed in.
        now_unix_s: u64,
    },
    /// The root has no such role.
    #[error("trust root has no {0} role")]
    MissingRole(RoleName),
}

/// Errors reading or checking a trust root.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    /// The root file could not be read or written.
    #[error("trust root file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not a signed root.
    #[error("not a signed trust root: {0}")]
    Decode(#[from] DecodeError),
    /// A root format this version does not know.
    #[error("trust root format {0} is not supported (this shoal knows format 1)")]
    UnknownFormat(u32),
    /// A role the format requires is missing.
    #[error("trust root has no {0} role")]
    MissingRole(RoleName),
    /// A role's threshold is zero.
    #[error("{0} role has threshold 0; it must be at least 1")]
    ZeroThreshold(RoleName),
    /// A role's threshold is more than its number of keys.
    #[error("{role} role has threshold {threshold} but only {keys} key(s)")]
    ThresholdAboveKeys {
        /// The role.
        role: RoleName,
        /// Its threshold.
        threshold: u32,
        /// Its number of keys.
        keys: usize,
    },
    /// A role lists a key id the root does not hold.
    #[error("{role} role lists key {key_id} which the root does not contain")]
    UnknownRoleKey {
        /// The role.
        role: RoleName,
        /// The missing key.
        key_id: KeyId,
    },
    /// A key is stored under an id that is not its own.
    #[error("key stored under id {claimed} has id {actual}")]
    KeyIdMismatch {
        /// The id it is stored under.
        claimed: KeyId,
        /// Its real id.
        actual: KeyId,
    },
    /// More keys than [`ROOT_KEYS_MAX`].
    #[error("{0} keys is more than the limit of {ROOT_KEYS_MAX}")]
    TooManyKeys(usize),
    /// Version 0: versions start at 1, so every rotation has a version to go up from.
    #[error("trust root version 0 is not valid; versions start at 1")]
    VersionZero,
    /// The file is PEM text (a key), not a signed root.
    #[error(
        "this is a PEM file (a key?), not a signed trust root such as `shoal root init` writes"
    )]
    Pem,
}

/// Errors accepting a new root in place of the current one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RotateError {
    /// The offered root's version is not higher than the current one.
    #[error("offered root version {offered} is not newer than the trusted version {current}")]
    VersionNotNewer {
        /// The trusted version.
        current: u64,
        /// The offered version.
        offered: u64,
    },
    /// The offered root is not signed by a threshold of the current root's root keys.
    #[error("not signed by the currently trusted root keys: {0}")]
    CurrentKeys(VerifyError),
    /// The offered root is not signed by a threshold of its own root keys, or expired.
    #[error("not signed by its own root keys: {0}")]
    OwnKeys(VerifyError),
}

impl TrustRoot {
    /// A new root (format 1) with `root` and `release` roles.
    pub fn new(
        version: u64,
        expires_unix_s: u64,
        root_keys: &[PublicKey],
        root_threshold: u32,
        release_keys: &[PublicKey],
        release_threshold: u32,
    ) -> Result<TrustRoot, RootError> {
        let mut keys = BTreeMap::new();
        let mut role = |list: &[PublicKey], threshold| Role {
            key_ids: list
                .iter()
                .map(|k| {
                    keys.insert(k.id(), *k);
                    k.id()
                })
                .collect(),
            threshold,
        };
        let roles = BTreeMap::from([
            (RoleName::Root, role(root_keys, root_threshold)),
            (RoleName::Release, role(release_keys, release_threshold)),
        ]);
        let root = TrustRoot {
            format: ROOT_FORMAT,
            version,
            expires_unix_s,
            keys,
            roles,
        };
        root.validate()?;
        Ok(root)
    }

    /// Checks the root is well formed: known format, both roles, thresholds in
    /// `1..=keys`, every role key present and stored under its own id.
    pub fn validate(&self) -> Result<(), RootError> {
        if self.format != ROOT_FORMAT {
            return Err(RootError::UnknownFormat(self.format));
        }
        if self.version == 0 {
            return Err(RootError::VersionZero);
        }
        if self.keys.len() > ROOT_KEYS_MAX {
            return Err(RootError::TooManyKeys(self.keys.len()));
        }
        for (claimed, key) in &self.keys {
            if key.id() != *claimed {
                return Err(RootError::KeyIdMismatch {
                    claimed: *claimed,
                    actual: key.id(),
                });
            }
        }
        for name in [RoleName::Root, RoleName::Release, RoleName::Fleet] {
            let role = match self.roles.get(&name) {
                Some(role) => role,
                // The fleet role is optional.
                None if name == RoleName::Fleet => continue,
                None => return Err(RootError::MissingRole(name)),
            };
            if role.threshold == 0 {
                return Err(RootError::ZeroThreshold(name));
            }
            if role.threshold as usize > role.key_ids.len() {
                return Err(RootError::ThresholdAboveKeys {
                    role: name,
                    threshold: role.threshold,
                    keys: role.key_ids.len(),
                });
            }
            if let Some(missing) = role.key_ids.iter().find(|id| !self.keys.contains_key(id)) {
                return Err(RootError::UnknownRoleKey {
                    role: name,
                    key_id: *missing,
                });
            }
        }
        Ok(())
    }

    /// The same root with a `fleet` role (keys that sign membership credentials).
    pub fn with_fleet(
        mut self,
        fleet_keys: &[PublicKey],
        threshold: u32,
    ) -> Result<TrustRoot, RootError> {
        let key_ids = fleet_keys
            .iter()
            .map(|k| {
                self.keys.insert(k.id(), *k);
                k.id()
            })
            .collect();
        self.roles
            .insert(RoleName::Fleet, Role { key_ids, threshold });
        self.validate()?;
        Ok(self)
    }

    /// Canonical CBOR of this root: the bytes that are signed.
    pub fn to_cbor(&self) -> Vec<u8> {
        to_cbor(self)
    }

    /// Checks that a threshold of distinct keys of `role` signed `env` and, when
    /// `now_unix_s` is known, that this root has not expired. Signatures by keys the
    /// role does not list are ignored; several signatures by one key count once.
    /// Returns the signed bytes.
    pub fn verify<'a>(
        &self,
        role: RoleName,
        env: &'a Envelope,
        now_unix_s: Option<u64>,
    ) -> Result<&'a [u8], VerifyError> {
        self.verify_parts(role, &env.signed, &env.signatures, now_unix_s)
    }

    /// [`TrustRoot::verify`] of an envelope decoded in place.
    pub fn verify_ref<'a>(
        &self,
        role: RoleName,
        env: &EnvelopeRef<'a>,
        now_unix_s: Option<u64>,
    ) -> Result<&'a [u8], VerifyError> {
        self.verify_parts(role, env.signed, &env.signatures, now_unix_s)
    }

    fn verify_parts<'a>(
        &self,
        role: RoleName,
        signed: &'a [u8],
        signatures: &[crate::Signature],
        now_unix_s: Option<u64>,
    ) -> Result<&'a [u8], VerifyError> {
        let verdict = self.verify_streamed(role, signatures, now_unix_s, |feed| {
            feed(signed);
            Ok::<(), std::convert::Infallible>(())
        });
        match verdict {
            Ok(v) => v.map(|()| signed),
            Err(never) => match never {},
        }
    }

    /// [`TrustRoot::verify`] of signed bytes that `feed` gives in parts (read
    /// from a file as they are checked: an 8 GiB image's manifest is 17.6 MB),
    /// once, to every signature at the same time; the same verdicts and errors.
    /// A failure of `feed` is returned as is (the outer error).
    pub fn verify_streamed<E>(
        &self,
        role: RoleName,
        signatures: &[crate::Signature],
        now_unix_s: Option<u64>,
        feed: impl FnOnce(&mut dyn FnMut(&[u8])) -> Result<(), E>,
    ) -> Result<Result<(), VerifyError>, E> {
        if role == RoleName::Release {
            RELEASE_CHECKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if let Err(e) = self.check_expiry(now_unix_s) {
            return Ok(Err(e));
        }
        let Some(def) = self.roles.get(&role) else {
            return Ok(Err(VerifyError::MissingRole(role)));
        };
        // The message is the signing context followed by the signed bytes: checked
        // as they stream through the hash, never joined. Each signature by a key
        // of the role is checked (a key's later signatures count only when its
        // earlier ones do not verify, tallied below in order).
        let mut streams: Vec<Option<crate::key::StreamVerifier>> = signatures
            .iter()
            .map(|sig| match self.keys.get(&sig.key_id) {
                Some(key) if def.key_ids.contains(&sig.key_id) => {
                    let mut s = key.stream_verifier(&sig.sig)?;
                    s.update(crate::envelope::SIGNING_CONTEXT);
                    Some(s)
                }
                _ => None,
            })
            .collect();
        feed(&mut |part: &[u8]| {
            for s in streams.iter_mut().flatten() {
                s.update(part);
            }
        })?;
        let mut valid = BTreeSet::new();
        let (mut invalid, mut unknown) = (0u32, 0u32);
        for (sig, stream) in signatures.iter().zip(streams) {
            if !(self.keys.contains_key(&sig.key_id) && def.key_ids.contains(&sig.key_id)) {
                unknown += 1;
                continue;
            }
            if valid.contains(&sig.key_id) {
                continue;
            }
            if stream.is_some_and(crate::key::StreamVerifier::verify) {
                valid.insert(sig.key_id);
            } else {
                invalid += 1;
            }
        }
        let valid = u32::try_from(valid.len()).expect("bounded by SIGNATURES_MAX");
        if valid < def.threshold {
            return Ok(Err(VerifyError::BelowThreshold {
                role,
                valid,
                threshold: def.threshold,
                invalid,
                unknown,
            }));
        }
        Ok(Ok(()))
    }

    /// Fails with [`VerifyError::Expired`] when `now_unix_s` is known and not before
    /// the expiry time.
    pub fn check_expiry(&self, now_unix_s: Option<u64>) -> Result<(), VerifyError> {
        match now_unix_s {
            Some(now) if now >= self.expires_unix_s => Err(VerifyError::Expired {
                expires_unix_s: self.expires_unix_s,
                now_unix_s: now,
            }),
            _ => Ok(()),
        }
    }

    /// Accepts `next` in place of this root: its version must be higher, and a
    /// threshold of this root's `root` keys *and* of its own must have signed it; it
    /// must not be expired (when the time is known). This root may itself have
    /// expired: rotation is how a device recovers from that.
    pub fn rotate(
        &self,
        next: &SignedRoot,
        now_unix_s: Option<u64>,
    ) -> Result<TrustRoot, RotateError> {
        if next.root.version <= self.version {
            return Err(RotateError::VersionNotNewer {
                current: self.version,
                offered: next.root.version,
            });
        }
        self.verify(RoleName::Root, &next.envelope, None)
            .map_err(RotateError::CurrentKeys)?;
        next.root
            .verify(RoleName::Root, &next.envelope, now_unix_s)
            .map_err(RotateError::OwnKeys)?;
        Ok(next.root.clone())
    }

    /// Walks a chain of rotations from this root; returns the last root, or the index
    /// in `chain` of the first root refused and why.
    pub fn walk(
        &self,
        chain: &[SignedRoot],
        now_unix_s: Option<u64>,
    ) -> Result<TrustRoot, (usize, RotateError)> {
        let mut current = self.clone();
        for (i, next) in chain.iter().enumerate() {
            current = current.rotate(next, now_unix_s).map_err(|e| (i, e))?;
        }
        Ok(current)
    }
}

/// A trust root with its signatures, as stored in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedRoot {
    /// The envelope whose signed bytes are `root`'s canonical CBOR.
    pub envelope: Envelope,
    /// The decoded root.
    pub root: TrustRoot,
}

impl SignedRoot {
    /// An unsigned envelope around `root`; add signatures with `envelope.sign`.
    pub fn new(root: TrustRoot) -> SignedRoot {
        SignedRoot {
            envelope: Envelope::new(root.to_cbor()),
            root,
        }
    }

    /// Decodes and validates a signed root (signatures are not checked here: see
    /// [`SignedRoot::verify_self`] and [`TrustRoot::rotate`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<SignedRoot, RootError> {
        if bytes.trim_ascii_start().starts_with(b"-----BEGIN") {
            return Err(RootError::Pem);
        }
        let envelope = Envelope::from_bytes(bytes)?;
        let root: TrustRoot = from_cbor(&envelope.signed, ENVELOPE_SIZE_MAX)?;
        root.validate()?;
        Ok(SignedRoot { envelope, root })
    }

    /// The file encoding (the envelope's canonical CBOR).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.envelope.to_bytes()
    }

    /// Reads and decodes a signed root file.
    #[cfg(feature = "fs")]
    pub fn load(path: &Path) -> Result<SignedRoot, RootError> {
        let io = |source| RootError::Io {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        if meta.len() > ENVELOPE_SIZE_MAX as u64 {
            return Err(DecodeError::TooLarge {
                size: usize::try_from(meta.len()).unwrap_or(usize::MAX),
                max: ENVELOPE_SIZE_MAX,
            }
            .into());
        }
        Self::from_bytes(&std::fs::read(path).map_err(io)?)
    }

    /// Writes the root file atomically: a uniquely named temporary file in the same
    /// directory, fsync, rename over `path`.
    #[cfg(feature = "fs")]
    pub fn save(&self, path: &Path) -> Result<(), RootError> {
        use std::io::Write;
        let io = |source| RootError::Io {
            path: path.to_path_buf(),
            source,
        };
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
        tmp.write_all(&self.to_bytes()).map_err(io)?;
        tmp.as_file().sync_all().map_err(io)?;
        tmp.persist(path).map_err(|e| io(e.error))?;
        Ok(())
    }

    /// Checks the root is signed by a threshold of its own `root` keys and (when the
    /// time is known) not expired: what a device checks before trusting a root it is
    /// given at provisioning time.
    pub fn verify_self(&self, now_unix_s: Option<u64>) -> Result<(), VerifyError> {
        self.root
            .verify(RoleName::Root, &self.envelope, now_unix_s)
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::SecretKey;

    fn keys(seed: u8, n: usize) -> Vec<SecretKey> {
        (0..n)
            .map(|i| SecretKey::from_seed(&[seed.wrapping_add(i as u8); 32]))
            .collect()
    }

    fn publics(keys: &[SecretKey]) -> Vec<PublicKey> {
        keys.iter().map(SecretKey::public).collect()
    }

    fn root(
        version: u64,
        root_keys: &[SecretKey],
        t: u32,
        release: &[SecretKey],
        rt: u32,
    ) -> TrustRoot {
        TrustRoot::new(
            version,
            2_000_000_000,
            &publics(root_keys),
            t,
            &publics(release),
            rt,
        )
        .unwrap()
    }

    fn signed(root: TrustRoot, signers: &[&SecretKey]) -> SignedRoot {
        let mut s = SignedRoot::new(root);
        for k in signers {
            s.envelope.sign(k);
        }
        s
    }

    #[test]
    fn threshold_counts_distinct_keys_and_ignores_unknown_ones() {
        let rk = keys(1, 1);
        let rel = keys(10, 3);
        let r = root(1, &rk, 1, &rel, 2);
        let mut env = Envelope::new(b"manifest".to_vec());
        env.sign(&rel[0]);
        // The same key twice counts once.
        env.signatures.push(env.signatures[0].clone());
        // A key not in the root is ignored, not an error.
        env.sign(&SecretKey::from_seed(&[99; 32]));
        assert_eq!(
            r.verify(RoleName::Release, &env, None),
            Err(VerifyError::BelowThreshold {
                role: RoleName::Release,
                valid: 1,
                threshold: 2,
                invalid: 0,
                unknown: 1
            })
        );
        env.sign(&rel[2]);
        assert_eq!(
            r.verify(RoleName::Release, &env, None),
            Ok(&b"manifest"[..])
        );
        // Release keys cannot sign for the root role.
        assert!(matches!(
            r.verify(RoleName::Root, &env, None),
            Err(VerifyError::BelowThreshold {
                valid: 0,
                unknown: 4,
                ..
            })
        ));
    }

    #[test]
    fn flipped_signature_or_payload_bit_is_below_threshold() {
        let rk = keys(1, 1);
        let rel = keys(10, 1);
        let r = root(1, &rk, 1, &rel, 1);
        let mut env = Envelope::new(b"manifest".to_vec());
        env.sign(&rel[0]);
        let mut bad_sig = env.clone();
        bad_sig.signatures[0].sig[5] ^= 0x10;
        let mut bad_payload = env.clone();
        bad_payload.signed[0] ^= 1;
        for bad in [bad_sig, bad_payload] {
            assert_eq!(
                r.verify(RoleName::Release, &bad, None),
                Err(VerifyError::BelowThreshold {
                    role: RoleName::Release,
                    valid: 0,
                    threshold: 1,
                    invalid: 1,
                    unknown: 0
                })
            );
        }
    }

    #[test]
    fn expiry_is_checked_only_when_time_is_known() {
        let rk = keys(1, 1);
        let r = root(1, &rk, 1, &rk, 1);
        let mut env = Envelope::new(vec![1]);
        env.sign(&rk[0]);
        assert!(r.verify(RoleName::Release, &env, None).is_ok());
        assert!(
            r.verify(RoleName::Release, &env, Some(1_999_999_999))
                .is_ok()
        );
        assert_eq!(
            r.verify(RoleName::Release, &env, Some(2_000_000_000)),
            Err(VerifyError::Expired {
                expires_unix_s: 2_000_000_000,
                now_unix_s: 2_000_000_000
            })
        );
    }

    #[test]
    fn rotation_chain_v1_v2_v3_works_and_needs_old_and_new_keys() {
        let k1 = keys(1, 3);
        let k2 = keys(20, 2);
        let k3 = keys(40, 1);
        let rel = keys(60, 1);
        let v1 = root(1, &k1, 2, &rel, 1);
        let v2 = signed(root(2, &k2, 2, &rel, 1), &[&k1[0], &k1[2], &k2[0], &k2[1]]);
        let v3 = signed(root(3, &k3, 1, &rel, 1), &[&k2[1], &k2[0], &k3[0]]);
        let last = v1.walk(&[v2.clone(), v3.clone()], Some(1_000)).unwrap();
        assert_eq!(last, v3.root);

        // Signed by only one of the old keys: refused with the reason.
        let weak = signed(root(2, &k2, 2, &rel, 1), &[&k1[0], &k2[0], &k2[1]]);
        assert_eq!(
            v1.rotate(&weak, None),
            Err(RotateError::CurrentKeys(VerifyError::BelowThreshold {
                role: RoleName::Root,
                valid: 1,
                threshold: 2,
                invalid: 0,
                unknown: 2
            }))
        );
        // Signed by the wrong keys altogether (its own only).
        let own_only = signed(root(2, &k2, 2, &rel, 1), &[&k2[0], &k2[1]]);
        assert!(matches!(
            v1.rotate(&own_only, None),
            Err(RotateError::CurrentKeys(_))
        ));
        // Not signed by its own keys.
        let old_only = signed(root(2, &k2, 2, &rel, 1), &[&k1[0], &k1[1]]);
        assert!(matches!(
            v1.rotate(&old_only, None),
            Err(RotateError::OwnKeys(_))
        ));
        // Same and lower versions are refused.
        let v2_root = v1.rotate(&v2, None).unwrap();
        assert_eq!(
            v2_root.rotate(&v2, None),
            Err(RotateError::VersionNotNewer {
                current: 2,
                offered: 2
            })
        );
        let v1_again = signed(v1.clone(), &[&k2[0], &k2[1], &k1[0], &k1[1]]);
        assert_eq!(
            v2_root.rotate(&v1_again, None),
            Err(RotateError::VersionNotNewer {
                current: 2,
                offered: 1
            })
        );
        // A chain reports which link failed.
        assert_eq!(v1.walk(&[v2, own_only], None).unwrap_err().0, 1);
    }

    #[test]
    fn signed_root_round_trips_through_bytes_and_files() {
        let rk = keys(1, 2);
        let s = signed(root(7, &rk, 2, &rk, 1), &[&rk[0], &rk[1]]);
        assert_eq!(SignedRoot::from_bytes(&s.to_bytes()).unwrap(), s);
        s.verify_self(Some(0)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.cbor");
        s.save(&path).unwrap();
        assert_eq!(SignedRoot::load(&path).unwrap(), s);
    }

    #[test]
    fn malformed_roots_give_specific_errors() {
        let rk = keys(1, 2);
        let mut good = root(1, &rk, 1, &rk, 1);
        assert!(matches!(
            TrustRoot::new(1, 5, &publics(&rk), 3, &publics(&rk), 1),
            Err(RootError::ThresholdAboveKeys {
                role: RoleName::Root,
                threshold: 3,
                keys: 2
            })
        ));
        assert!(matches!(
            TrustRoot::new(1, 5, &publics(&rk), 1, &publics(&rk), 0),
            Err(RootError::ZeroThreshold(RoleName::Release))
        ));
        good.roles.remove(&RoleName::Release);
        assert!(matches!(
            good.validate(),
            Err(RootError::MissingRole(RoleName::Release))
        ));

        // A key stored under another key's id.
        let mut swapped = root(1, &rk, 1, &rk, 1);
        let ids: Vec<KeyId> = swapped.keys.keys().copied().collect();
        let k0 = swapped.keys[&ids[0]];
        swapped.keys.insert(ids[1], k0);
        let bytes = SignedRoot::new(swapped).to_bytes();
        assert!(matches!(
            SignedRoot::from_bytes(&bytes),
            Err(RootError::KeyIdMismatch { .. })
        ));

        // Not a root at all.
        let env = Envelope::new(b"hello".to_vec()).to_bytes();
        assert!(matches!(
            SignedRoot::from_bytes(&env),
            Err(RootError::Decode(DecodeError::Cbor(_)))
        ));
        assert!(matches!(
            SignedRoot::from_bytes(b""),
            Err(RootError::Decode(DecodeError::Empty))
        ));
    }
}
