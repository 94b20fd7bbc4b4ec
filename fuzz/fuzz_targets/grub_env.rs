//! GRUB environment blocks (`env::grub::decode`, as `grub-editenv` writes them) and
//! the two-copy, lock-file `GrubEnv` over them.
//!
//! The first input byte picks: bit 0 keeps the input's own first bytes instead of
//! the `# GRUB Environment Block` signature (so most inputs reach the variable
//! parser); bit 1 runs the two-copy environment on four blocks (env 1, env 2,
//! lock 1, lock 2) cut from the input, else one block. Blocks are padded with `#`
//! (as GRUB pads) or cut to 1024 bytes.
//!
//! Properties: no panic; what `decode` accepts, `encode` writes back to the same
//! variables unless it no longer fits with the warning line; `GrubEnv::load`
//! returns a copy `decode` accepts; after `store`, `load` returns what was stored.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_bootctl::env::grub::{self, BLOCK_SIZE, GrubEnv, HEADER};
use shoal_bootctl::env::{EncodeError, Env, Vars, validate};
use shoal_bootctl::testing::CrashDisk;

fn block(bytes: &[u8], keep_header: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(BLOCK_SIZE);
    if !keep_header {
        b.extend_from_slice(HEADER);
    }
    b.extend_from_slice(bytes);
    b.resize(BLOCK_SIZE, b'#');
    b
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let keep_header = mode & 1 == 1;
    if mode & 2 == 0 {
        let b = block(rest, keep_header);
        match grub::decode(&b) {
            Ok(vars) => {
                assert!(
                    validate(&vars).is_ok(),
                    "decoded variables are writable: {vars:?}"
                );
                match grub::encode(&vars) {
                    Ok(again) => assert_eq!(grub::decode(&again).as_ref(), Ok(&vars)),
                    Err(EncodeError::TooLarge { .. }) => {}
                    Err(e) => panic!("decoded variables refused by encode: {e}"),
                }
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
        // Not padded: any other length is refused by size.
        if rest.len() != BLOCK_SIZE {
            assert!(grub::decode(rest).is_err());
        }
        return;
    }

    let quarter = rest.len().div_ceil(4);
    let parts: Vec<&[u8]> = if quarter == 0 {
        vec![&[][..]; 4]
    } else {
        let mut p: Vec<&[u8]> = rest.chunks(quarter).collect();
        p.resize(4, &[]);
        p
    };
    let disk = CrashDisk::new();
    let names = ["env1", "env2", "lock1", "lock2"];
    for (name, part) in names.iter().zip(&parts) {
        // An empty part stands for a missing (empty) file.
        if part.is_empty() {
            disk.put(name, &[]);
        } else {
            disk.put(name, &block(part, keep_header));
        }
    }
    let mut env = GrubEnv::new(
        [
            Box::new(disk.storage("env1")),
            Box::new(disk.storage("env2")),
        ],
        [
            Box::new(disk.storage("lock1")),
            Box::new(disk.storage("lock2")),
        ],
        ["copy 1".into(), "copy 2".into()],
    );
    let loaded = env.load();
    match &loaded {
        Ok(vars) => {
            let ok = ["env1", "env2"]
                .iter()
                .any(|n| grub::decode(&disk.live(n)).as_ref() == Ok(vars));
            assert!(ok, "load returns a copy that decodes to it");
        }
        Err(e) => assert!(!e.to_string().is_empty()),
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
