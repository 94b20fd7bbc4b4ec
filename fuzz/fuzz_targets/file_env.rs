//! The `file` bootloader environment (`env::file::decode`): two text copies with a
//! `# shoal-env v1 seq=.. len=.. crc32=..` header, and `FileEnv` over them.
//!
//! The first input byte picks: bit 0 fixes the header's `len` and `crc32` to the
//! body (so most inputs reach the variable parser); bit 1 runs the two-copy
//! `FileEnv` on the rest cut in two at the position the second byte gives.
//!
//! Properties: no panic; what `decode` accepts, `encode` writes back to the same
//! sequence number and variables; `FileEnv::load` returns the newest valid copy;
//! after `store`, `load` returns what was stored.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_bootctl::env::file::{self, FileEnv};
use shoal_bootctl::env::{Env, Vars, validate};
use shoal_bootctl::testing::CrashDisk;

/// Rewrites a copy's header so its `len` and `crc32` match the body after it.
fn fixed(bytes: &[u8]) -> Vec<u8> {
    let (seq, body) = match bytes.iter().position(|&b| b == b'\n') {
        Some(nl) => {
            let header = String::from_utf8_lossy(&bytes[..nl]);
            let seq = header
                .split(' ')
                .find_map(|f| f.strip_prefix("seq="))
                .unwrap_or("0")
                .to_string();
            (seq, &bytes[nl + 1..])
        }
        None => ("0".to_string(), bytes),
    };
    let mut out = format!(
        "# shoal-env v1 seq={seq} len={} crc32={:08x}\n",
        body.len(),
        crc32fast::hash(body)
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

fn check_codec(bytes: &[u8]) -> Option<file::Copy> {
    match file::decode(bytes) {
        Ok(copy) => {
            assert!(
                validate(&copy.vars).is_ok(),
                "decoded variables are writable: {copy:?}"
            );
            let again = file::encode(&copy.vars, copy.seq).expect("decoded variables encode");
            assert_eq!(file::decode(&again).as_ref(), Ok(&copy));
            Some(copy)
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            None
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let prepare = |b: &[u8]| if mode & 1 == 1 { fixed(b) } else { b.to_vec() };
    if mode & 2 == 0 {
        check_codec(&prepare(rest));
        return;
    }
    let Some((&cut, rest)) = rest.split_first() else {
        return;
    };
    let cut = usize::from(cut).min(rest.len());
    let copies = [prepare(&rest[..cut]), prepare(&rest[cut..])];
    let decoded: Vec<Option<file::Copy>> = copies.iter().map(|c| check_codec(c)).collect();
    let disk = CrashDisk::new();
    disk.put("env", &copies[0]);
    disk.put("env.2", &copies[1]);
    let mut env = FileEnv::new(
        [
            Box::new(disk.storage("env")),
            Box::new(disk.storage("env.2")),
        ],
        ["env".into(), "env.2".into()],
    );
    let loaded = env.load();
    let newest = match (&decoded[0], &decoded[1]) {
        (Some(a), Some(b)) => Some(if b.seq > a.seq { b } else { a }),
        (Some(a), None) => Some(a),
        (None, Some(b)) => Some(b),
        (None, None) => None,
    };
    match (&loaded, newest) {
        (Ok(vars), Some(c)) => assert_eq!(vars, &c.vars),
        (Err(e), None) => assert!(!e.to_string().is_empty()),
        (l, c) => panic!("load {l:?} disagrees with decode {c:?}"),
    }
    let mut vars: Vars = loaded.unwrap_or_default();
    vars.insert("upgrade_available".into(), "1".into());
    match env.store(&vars) {
        Ok(()) => assert_eq!(
            env.load().ok().as_ref(),
            Some(&vars),
            "load returns what was stored"
        ),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
