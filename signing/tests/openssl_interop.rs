//! Keys made by the real `openssl` work in Shoal and keys made by Shoal work in
//! `openssl`, both ways. The test fails (it does not skip) when openssl is missing:
//! `.ci/run` installs it.

use std::path::Path;
use std::process::Command;

use shoal_signing::{Envelope, PublicKey, SecretKey};

fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("the `openssl` command is required for this test (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn openssl_generated_key_loads_signs_and_matches_openssl_public_key() {
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("k.pem");
    let pub_path = dir.path().join("k.pub");
    openssl(&["genpkey", "-algorithm", "ed25519", "-out", path(&key_path)]);
    openssl(&[
        "pkey",
        "-in",
        path(&key_path),
        "-pubout",
        "-out",
        path(&pub_path),
    ]);

    let secret = SecretKey::load(&key_path).unwrap();
    let public = PublicKey::load(&pub_path).unwrap();
    assert_eq!(secret.public(), public);

    // A signature Shoal makes with openssl's key verifies with openssl's public key.
    let mut env = Envelope::new(b"release".to_vec());
    env.sign(&secret);
    let msg = Envelope::message(b"release");
    assert!(public.verify(&msg, &env.signatures[0].sig));

    // And openssl itself accepts that signature.
    let msg_path = dir.path().join("msg");
    let sig_path = dir.path().join("sig");
    std::fs::write(&msg_path, &msg).unwrap();
    std::fs::write(&sig_path, env.signatures[0].sig).unwrap();
    let out = openssl(&[
        "pkeyutl",
        "-verify",
        "-pubin",
        "-inkey",
        path(&pub_path),
        "-rawin",
        "-in",
        path(&msg_path),
        "-sigfile",
        path(&sig_path),
    ]);
    assert!(String::from_utf8_lossy(&out).contains("Signature Verified Successfully"));
}

#[test]
fn shoal_generated_key_is_read_by_openssl() {
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("k.pem");
    let key = SecretKey::generate().unwrap();
    key.save(&key_path).unwrap();
    let pub_pem = openssl(&["pkey", "-in", path(&key_path), "-pubout"]);
    assert_eq!(
        String::from_utf8(pub_pem).unwrap(),
        key.public().to_spki_pem()
    );
}
