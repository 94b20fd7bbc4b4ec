//! `[network] rate_limit_kib_s` end to end: a real `shoal server` and `shoal daemon`
//! on loopback (where nothing else would slow the download), the daemon's bytes
//! counted by a proxy sampled every 50 ms. The download runs at the cap (±10 %) and
//! the install completes.

mod daemon_common;
mod server_common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use daemon_common::*;
use server_common::*;
use shoal_bootctl::Slot;

/// The cap: 128 KiB/s.
const CAP_KIB_S: u64 = 128;

/// Seconds at which `samples` (seconds, bytes) first reached `bytes`.
fn reached(samples: &[(f64, u64)], bytes: u64) -> f64 {
    samples
        .iter()
        .find(|&&(_, b)| b >= bytes)
        .map(|&(t, _)| t)
        .expect("reached")
}

#[test]
fn the_daemon_downloads_at_its_bandwidth_cap() {
    let setup = Setup::new();
    let data = setup.path("data");
    let server = Server::start(&setup, &data, &Db::Sqlite, &[]);
    let token = host_token(&data, &Db::Sqlite, "admin");
    let v1 = upload(&server, &token, &setup, "v1.shoal");
    // Counts the bytes towards the device; no fault, no limit of its own.
    let proxy = FaultProxy::start(&server.url);
    let dev = Dev::new(
        &setup,
        &proxy.url,
        &format!("[network]\nrate_limit_kib_s = {CAP_KIB_S}\n"),
    );
    let mut daemon = dev.start();
    let device = accept(&server, &token, &dev);
    wait_for(&dev, 60, "the running slot's index", || {
        dev.log().contains("the running slot's index is ready")
    });

    let before = proxy.faults.down_bytes.load(Ordering::Relaxed);
    let dep = deploy(&server, &token, "v1", &v1, &device);
    let start = Instant::now();
    let mut samples: Vec<(f64, u64)> = Vec::new();
    while !dev.log().contains("installed; trial armed") {
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "no install after 180 s; daemon log:\n{}",
            dev.log()
        );
        let bytes = proxy.faults.down_bytes.load(Ordering::Relaxed) - before;
        samples.push((start.elapsed().as_secs_f64(), bytes));
        std::thread::sleep(Duration::from_millis(50));
    }
    let total = proxy.faults.down_bytes.load(Ordering::Relaxed) - before;
    samples.push((start.elapsed().as_secs_f64(), total));
    let chunks = installed_field(&dev.log(), "transferred")[0];
    assert!(
        chunks > 1 << 20,
        "v1 needs more than 1 MiB of chunks, to have a rate to measure: {chunks}"
    );
    // The transfer proper: from a tenth to nine tenths of the bytes (the manifest,
    // the dictionary, polls and reports around it left out).
    let (t10, t90) = (
        reached(&samples, total / 10),
        reached(&samples, total * 9 / 10),
    );
    let rate = (total * 9 / 10 - total / 10) as f64 / (t90 - t10);
    let cap = (CAP_KIB_S * 1024) as f64;
    eprintln!(
        "{total} B towards the device, {chunks} B of chunks; {:.0} B/s from {t10:.2} s to {t90:.2} s (cap {cap} B/s, {:.3} ×)",
        rate,
        rate / cap
    );
    assert!(
        (0.9 * cap..=1.1 * cap).contains(&rate),
        "the download ran at {rate:.0} B/s, {:.3} × the cap of {cap} B/s",
        rate / cap
    );

    // And the install completes.
    reboot_and_succeed(&dev, &mut daemon, &server, &token, &dep);
    stop(&mut daemon);
    assert_eq!(
        dev.slot_bytes(Slot::B, 3 << 20),
        std::fs::read(setup.path("v1.img")).unwrap()
    );
}
