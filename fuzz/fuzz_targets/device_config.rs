//! The device configuration (`shoal_node::config::Config::parse`, the binary's
//! `--config` file) and the `[slots]`/`[bootloader]` tables bootctl reads on its own
//! (`BootConfig::from_toml_str`).
//!
//! bootctl's tables also round-trip: parse, serialize, parse gives the same.
//!
//! Properties: no panic on any text; an accepted config satisfies every range the
//! parser promises; when the device config is accepted, bootctl reads the same
//! slots and bootloader tables from the same text.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use shoal_bootctl::config::BootConfig;
use shoal_node::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let boot = BootConfig::from_toml_str(text);
    if let Err(e) = &boot {
        assert!(!e.to_string().is_empty());
    }
    if let Ok(b) = &boot {
        let _ = b.bootloader.scheme();
        let _ = b.bootloader.flavor();
        // parse -> serialize -> parse gives the same tables.
        let text = toml::to_string(b).expect("accepted tables serialize");
        assert_eq!(
            BootConfig::from_toml_str(&text).ok().as_ref(),
            Some(b),
            "{text}"
        );
    }
    match Config::parse(text, Path::new("shoal.toml")) {
        Ok(cfg) => {
            assert!(!cfg.device.device_type.trim().is_empty());
            assert!(!cfg.device.data_dir.as_os_str().is_empty());
            assert!(!cfg.device.trust_root.as_os_str().is_empty());
            assert!((1..=86_400).contains(&cfg.health.timeout_s));
            assert!((1..=1024).contains(&cfg.install.journal_batch_mib));
            assert!(
                cfg.device
                    .reboot_command
                    .first()
                    .is_none_or(|c| !c.is_empty())
            );
            let boot = boot.expect("bootctl reads the tables the device config accepted");
            assert_eq!(boot.slots, cfg.slots);
            assert_eq!(boot.bootloader, cfg.bootloader);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
