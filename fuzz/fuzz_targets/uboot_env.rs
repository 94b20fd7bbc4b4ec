//! U-Boot environments (`env::uboot::decode` and `UbootEnv`), single and redundant,
//! as `fw_printenv` / `mkenvimage` write them.
//!
//! The first input byte picks: bit 0 redundant (the rest is split into two copies
//! of equal size) or single; bit 1 leaves the CRC as it is instead of fixing it (so
//! most inputs reach the variable parser). The rest is the copy or copies.
//!
//! Properties: no panic; what `decode` accepts, `encode` writes back to the same
//! variables (when they are writable at all: `env::validate`); `UbootEnv::load`
//! agrees with `decode` and U-Boot's choice of copy; after `store`, `load` returns
//! exactly what was stored, and the redundant layout keeps the other copy intact.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_bootctl::Storage;
use shoal_bootctl::env::uboot::{self, CRC_LEN, Layout, UbootEnv};
use shoal_bootctl::env::{Env, Vars, validate};
use shoal_bootctl::testing::CrashDisk;

fn fix_crc(block: &mut [u8], layout: Layout) {
    let header = match layout {
        Layout::Single => CRC_LEN,
        Layout::Redundant => CRC_LEN + 1,
    };
    if block.len() >= header {
        let crc = crc32fast::hash(&block[header..]);
        block[..CRC_LEN].copy_from_slice(&crc.to_le_bytes());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let layout = if mode & 1 == 1 {
        Layout::Redundant
    } else {
        Layout::Single
    };
    let fix = mode & 2 == 0;
    let mut blocks: Vec<Vec<u8>> = match layout {
        Layout::Single => vec![rest.to_vec()],
        Layout::Redundant => {
            let half = rest.len() / 2;
            vec![rest[..half].to_vec(), rest[half..2 * half].to_vec()]
        }
    };
    let size = blocks[0].len();
    if fix {
        for b in &mut blocks {
            fix_crc(b, layout);
        }
    }

    // The codec alone.
    let decoded: Vec<_> = blocks
        .iter()
        .map(|b| uboot::decode(b, size, layout))
        .collect();
    for copy in decoded.iter().flatten() {
        assert_eq!(copy.flag.is_some(), layout == Layout::Redundant);
        if validate(&copy.vars).is_ok() {
            let again = uboot::encode(&copy.vars, size, copy.flag)
                .expect("what was decoded from `size` bytes fits in `size` bytes");
            assert_eq!(uboot::decode(&again, size, layout).as_ref(), Ok(copy));
        }
    }
    for e in decoded.iter().filter_map(|d| d.as_ref().err()) {
        assert!(!e.to_string().is_empty());
    }

    // The environment over in-memory copies.
    let disk = CrashDisk::new();
    let names: Vec<String> = (0..blocks.len()).map(|i| format!("copy{i}")).collect();
    let mut copies: Vec<Box<dyn Storage>> = Vec::new();
    for (name, block) in names.iter().zip(&blocks) {
        disk.put(name, block);
        copies.push(Box::new(disk.storage(name)));
    }
    if size == 0 {
        return;
    }
    let mut env = UbootEnv::new(copies, names.clone(), size);
    let loaded = env.load();
    let current = match (&decoded[..], layout) {
        ([Ok(c)], _) => Some(c),
        ([Ok(a), Ok(b)], _) => Some(
            if uboot::newer(a.flag.unwrap_or(0), b.flag.unwrap_or(0)) == 0 {
                a
            } else {
                b
            },
        ),
        ([Ok(a), Err(_)], _) => Some(a),
        ([Err(_), Ok(b)], _) => Some(b),
        _ => None,
    };
    match (&loaded, current) {
        (Ok(vars), Some(c)) => assert_eq!(vars, &c.vars),
        (Err(e), None) => assert!(!e.to_string().is_empty()),
        (l, c) => panic!("load {l:?} disagrees with decode {c:?}"),
    }

    // Store a change and read it back.
    let mut vars: Vars = loaded.unwrap_or_default();
    vars.insert("upgrade_available".into(), "1".into());
    let before: Vec<Vec<u8>> = names.iter().map(|n| disk.live(n)).collect();
    match env.store(&vars) {
        Ok(()) => {
            assert_eq!(
                env.load().ok().as_ref(),
                Some(&vars),
                "load returns what was stored"
            );
            if layout == Layout::Redundant {
                let after: Vec<Vec<u8>> = names.iter().map(|n| disk.live(n)).collect();
                let unchanged = (0..2).filter(|&i| before[i] == after[i]).count();
                assert!(unchanged >= 1, "a redundant store rewrites one copy only");
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
