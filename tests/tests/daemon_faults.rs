//! Network faults between a real `shoal daemon` and a real `shoal server`, made by
//! a TCP proxy (`daemon_common::FaultProxy`):
//! - every connection cut after 160 KiB towards the device, and the zstd
//!   dictionary's download cut once (it must fail the request, not pass for a corrupt
//!   chunk that gets the server banned): the install still
//!   completes (each connection carries less than an eighth of it, so it can only
//!   finish by keeping the chunks verified before each cut), and the bytes that
//!   crossed the proxy stay within what it needs plus one partial chunk per cut;
//! - a connection that stalls (open and silent) in the middle of a chunk batch: the
//!   engine's silence timeout gives up on it and asks again elsewhere, so it costs
//!   far less than the HTTP client's own 30 s read timeout;
//! - the server killed mid-download and started again (on another port): the
//!   daemon goes on and finishes without fetching verified chunks again.

mod daemon_common;
mod server_common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use daemon_common::*;
use server_common::*;
use shoal_bootctl::Slot;

/// The largest chunk (the chunking's maximum for these images, `shoal artifact
/// inspect` says 64 KiB), compressed or not.
const CHUNK_MAX: u64 = 64 * 1024;
/// Each connection is cut after this many bytes towards the device (more than the
/// release's zstd dictionary, which must come whole over one connection).
const CUT: u64 = 160 * 1024;

fn build(setup: &Setup, img: &str, seed: u64, len: usize, version: &str, out: &str) {
    std::fs::write(setup.path(img), image(seed, len)).unwrap();
    build_release(setup.dir.path(), img, version, "rel.pem", out);
}

#[test]
fn cuts_stalls_and_a_server_restart_cost_no_verified_chunk() {
    let setup = Setup::new();
    let data = setup.path("data");
    let mut server = Server::start(&setup, &data, &Db::Sqlite, &[]);
    let token = host_token(&data, &Db::Sqlite, "admin");
    // Two releases unrelated to each other and to the device's running image.
    build(&setup, "u1.img", 11, 3 << 20, "11", "u1.shoal");
    build(&setup, "u2.img", 12, 3 << 20, "12", "u2.shoal");
    let v1 = upload(&server, &token, &setup, "v1.shoal");
    let u1 = upload(&server, &token, &setup, "u1.shoal");
    let u2 = upload(&server, &token, &setup, "u2.shoal");
    let proxy = FaultProxy::start(&server.url);
    let dev = Dev::new(&setup, &proxy.url, "");
    let mut daemon = dev.start();
    let device = accept(&server, &token, &dev);
    let f = &proxy.faults;

    // 1. Every connection cut after 160 KiB.
    let full = |file: &str| {
        let d = diff(&setup, file, file);
        (
            d["full_stored_bytes"].as_u64().unwrap(),
            d["chunks_needed"].as_u64().unwrap_or(0),
        )
    };
    let (v1_stored, _) = full("v1.shoal");
    assert!(v1_stored > 7 * CUT, "v1 is too small: {v1_stored}");
    f.cut_after.store(CUT, Ordering::Relaxed);
    // And the zstd dictionary's download (the only octet-stream) cut once, 2 KB in.
    *f.cut_at_pattern.lock().unwrap() = Some((b"application/octet-stream".to_vec(), 2000));
    let down0 = f.down_bytes.load(Ordering::Relaxed);
    let dep1 = deploy(&server, &token, "v1-cut", &v1, &device);
    reboot_and_succeed(&dev, &mut daemon, &server, &token, &dep1);
    f.cut_after.store(0, Ordering::Relaxed);
    let cuts = f.cuts.load(Ordering::Relaxed);
    let down = f.down_bytes.load(Ordering::Relaxed) - down0;
    let v1_img = std::fs::read(setup.path("v1.img")).unwrap();
    assert_eq!(dev.slot_bytes(Slot::B, v1_img.len()), v1_img);
    assert!(cuts >= 5, "only {cuts} cuts");
    // The cut dictionary failed its request (retried), it did not make the chunk
    // look corrupt and the server banned (regression: it did).
    let log = dev.log();
    assert!(
        f.cut_at_pattern.lock().unwrap().is_none(),
        "the dictionary was never fetched"
    );
    assert!(log.contains("cannot get the chunk's dictionary"), "{log}");
    assert!(!log.contains("banning it"), "{log}");
    // What v1 needs, one partial chunk (and its frame) lost per cut, and 64 KiB for
    // the rest of the traffic (headers, polls, the manifest, status reports).
    let bound = v1_stored + cuts * (CHUNK_MAX + 36) + 64 * 1024;
    assert!(
        down <= bound,
        "{down} bytes crossed for v1 ({v1_stored} stored, {cuts} cuts): over {bound}"
    );
    eprintln!(
        "cut: {cuts} cuts, {down} bytes for {v1_stored} stored ({:.2}x)",
        down as f64 / v1_stored as f64
    );

    // 2. One connection stalls after 64 KiB of a chunk batch: the engine's silence
    //    timeout fires and the chunks come over another connection.
    f.stall_after.store(64 * 1024, Ordering::Relaxed);
    let dep2 = deploy(&server, &token, "u1-stall", &u1, &device);
    wait_for(&dev, 120, "a stall", || {
        f.stalled_at.lock().unwrap().is_some()
    });
    let stalled = f.stalled_at.lock().unwrap().expect("stalled");
    let before = dev.log().matches("installed; trial armed").count();
    wait_for(&dev, 60, "the install after the stall", || {
        dev.log().matches("installed; trial armed").count() > before
    });
    let cost = stalled.elapsed();
    assert!(
        cost < Duration::from_secs(20),
        "the install finished {cost:?} after the stall: the stalled request was not given up before the HTTP client's 30 s timeout"
    );
    reboot_and_succeed(&dev, &mut daemon, &server, &token, &dep2);
    let u1_img = std::fs::read(setup.path("u1.img")).unwrap();
    assert_eq!(dev.slot_bytes(Slot::A, u1_img.len()), u1_img);
    eprintln!("stall: install done {cost:?} after the stall");

    // 3. The server killed mid-download and started again on another port.
    let (u2_stored, _) = full("u2.shoal");
    f.rate.store(200 * 1024, Ordering::Relaxed);
    let down0 = f.down_bytes.load(Ordering::Relaxed);
    let dep3 = deploy(&server, &token, "u2-restart", &u2, &device);
    let t = Instant::now();
    wait_for(&dev, 60, "half of u2", || {
        f.down_bytes.load(Ordering::Relaxed) - down0 > u2_stored / 2
    });
    server.kill();
    std::thread::sleep(Duration::from_millis(1500));
    server = Server::start(&setup, &data, &Db::Sqlite, &[]);
    proxy.set_upstream(&server.url);
    f.rate.store(0, Ordering::Relaxed);
    reboot_and_succeed(&dev, &mut daemon, &server, &token, &dep3);
    let down = f.down_bytes.load(Ordering::Relaxed) - down0;
    let u2_img = std::fs::read(setup.path("u2.img")).unwrap();
    assert_eq!(dev.slot_bytes(Slot::B, u2_img.len()), u2_img);
    // In flight when the server died: at most the four requests' batches.
    assert!(
        down < u2_stored + u2_stored / 2,
        "{down} bytes crossed for u2 ({u2_stored} stored) across a server restart"
    );
    eprintln!(
        "restart: {down} bytes for {u2_stored} stored in {:?}",
        t.elapsed()
    );
    stop(&mut daemon);
}
