//! `fw_env.config` (`FwEnvConfig::parse`): `device offset size [sector-size
//! [sectors]]` lines, as libubootenv reads them.
//!
//! Properties: no panic on any text; an accepted config has one or two copies of
//! one size, each large enough for a header and an empty environment, two copies in
//! one file do not overlap, and no copy is an MTD device; a refused one is a
//! `ConfigError` with a message.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_bootctl::env::uboot::{FwEnvConfig, Layout};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match FwEnvConfig::parse(text) {
        Ok(cfg) => {
            match cfg.copies.as_slice() {
                [a] => assert_eq!(cfg.layout(), Layout::Single, "{a:?}"),
                [a, b] => {
                    assert_eq!(cfg.layout(), Layout::Redundant);
                    assert_eq!(a.size, b.size);
                    if a.path == b.path {
                        let (a0, a1) = (
                            u128::from(a.offset),
                            u128::from(a.offset) + u128::from(a.size),
                        );
                        let (b0, b1) = (
                            u128::from(b.offset),
                            u128::from(b.offset) + u128::from(b.size),
                        );
                        assert!(a1 <= b0 || b1 <= a0, "copies overlap: {a:?} {b:?}");
                    }
                }
                other => panic!("{} copies accepted", other.len()),
            }
            for c in &cfg.copies {
                assert!(c.size >= 6, "{c:?}");
                assert!(!c.path.starts_with("/dev/mtd"));
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
