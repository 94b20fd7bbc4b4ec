//! Signed status reports (`shoal_fleet::report::Signed`): what a device (or a LAN
//! peer relaying for it) delivers to `POST /api/devices/v1/reports`.
//!
//! Input: the report's text. Properties: opening never panics; an accepted report
//! passes `Report::check` and survives a JSON round trip; a report is accepted by
//! `verify` exactly when it is accepted by `claimed` and the signature checks, and
//! never when the signature check fails; a refused one is an `OpenError` with a
//! message.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_fleet::report::{Report, Signed};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let signed = Signed {
        report: text.to_string(),
        signature: "00".repeat(64),
    };
    match signed.claimed() {
        Ok(report) => {
            assert_eq!(report.check(), Ok(()));
            let json = serde_json::to_string(&report).expect("a report serializes");
            let again: Report = serde_json::from_str(&json).expect("its JSON parses");
            assert_eq!(again, report, "JSON round trip");
            assert_eq!(signed.verify(|_, _| true).as_ref(), Ok(&report));
            assert!(signed.verify(|_, _| false).is_err(), "a bad signature passed");
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            assert!(signed.verify(|_, _| true).is_err(), "verify accepted what claimed refused");
        }
    }
});
