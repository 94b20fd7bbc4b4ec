//! Offline installs are reported later: a device installs from "USB" (standalone
//! `shoal install`, `shoal boot-check`) with no server in reach, its daemon is killed
//! while still offline, and when it finally meets the server its signed reports
//! arrive in order with the times they happened. Then a deployment through the
//! daemon is reported the same way, naming the deployment.

mod daemon_common;
mod server_common;

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use daemon_common::*;
use serde_json::Value;
use server_common::*;
use shoal_bootctl::Slot;
use shoal_tests::ok;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn queued(dev: &Dev) -> Value {
    serde_json::from_str(&ok(dev.shoal(&["reports", "--json"]))).unwrap()
}

#[test]
fn offline_installs_are_reported_later_with_their_times() {
    let setup = Setup::new();
    // No server yet: the proxy refuses every connection.
    let proxy = FaultProxy::start("127.0.0.1:9");
    proxy.faults.offline.store(true, Ordering::Relaxed);
    let dev = Dev::new(&setup, &proxy.url, "");

    // From the USB stick: an artifact signed by an unknown key (refused), then v1
    // (installed and armed), a reboot, boot-check (committed).
    let t0 = now_ms();
    let out = dev.shoal(&["install", setup.path("bad.shoal").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    ok(dev.shoal(&["install", setup.path("v1.shoal").to_str().unwrap()]));
    let t1 = now_ms();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(dev.reboot(), Slot::B);
    let check = ok(dev.shoal(&["boot-check", "--json"]));
    assert!(check.contains("committed"), "{check}");
    let t2 = now_ms();
    let q = queued(&dev);
    let pending = q["pending"].as_array().unwrap();
    assert_eq!(pending.len(), 3, "{q}");
    assert_eq!(pending[0]["status"], "failure");
    assert_eq!(pending[1]["status"], "installing");
    assert_eq!(pending[2]["status"], "success");

    // The daemon cannot reach the server: the reports stay. It is killed (a power
    // cut) while trying.
    let mut daemon = dev.start();
    wait_for(&dev, 30, "a failed poll", || {
        dev.log().contains("poll failed")
    });
    stop(&mut daemon);
    assert_eq!(queued(&dev)["pending"].as_array().unwrap().len(), 3);

    // The server appears; the device is accepted; the reports arrive.
    std::thread::sleep(Duration::from_millis(200));
    let data = setup.path("data");
    let server = Server::start(&setup, &data, &Db::Sqlite, &[]);
    let started = now_ms();
    let token = host_token(&data, &Db::Sqlite, "admin");
    proxy.set_upstream(&server.url);
    proxy.faults.offline.store(false, Ordering::Relaxed);
    daemon = dev.start();
    let device = accept(&server, &token, &dev);
    let mut reports = Value::Null;
    wait_for(&dev, 60, "the offline reports on the server", || {
        reports = admin_json(&server, &token, &["devices", "reports", &device]);
        reports.as_array().is_some_and(|a| a.len() >= 3)
    });
    let r = reports.as_array().unwrap();
    let at = |i: usize| r[i]["at_ms"].as_u64().unwrap();
    assert_eq!(
        r.iter()
            .map(|x| x["seq"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2, 3],
        "{reports}"
    );
    assert_eq!(r[0]["status"], "failure");
    assert!(
        r[0]["substate"].as_str().unwrap().contains("bad.shoal"),
        "{reports}"
    );
    assert_eq!(r[1]["status"], "installing");
    assert_eq!(r[1]["release_name"], "acme-os");
    assert_eq!(r[1]["release_version"], "1");
    assert_eq!(r[2]["status"], "success");
    assert_eq!(r[2]["release_version"], "1");
    for x in r {
        assert_eq!(x["origin"], "standalone");
        assert_eq!(x["relayed_by"], Value::Null);
        assert!(x["received_ms"].as_u64().unwrap() >= started, "{reports}");
    }
    // The times they happened, not when they arrived.
    assert!(
        t0 <= at(0) && at(0) <= at(1) && at(1) <= t1,
        "{t0} {t1} {reports}"
    );
    assert!(t1 <= at(2) && at(2) <= t2, "{t1} {t2} {reports}");
    wait_for(&dev, 30, "an empty queue", || {
        dev.log().contains("status reports delivered")
    });

    // A deployment through the daemon: its states are reported (and queued) too,
    // naming the deployment; the success comes from the boot-check after the reboot.
    let v2 = upload(&server, &token, &setup, "v2.shoal");
    let dep = deploy(&server, &token, "v2", &v2, &device);
    wait_for(&dev, 120, "the reboot command", || {
        dev.path("rebooted").exists()
    });
    stop(&mut daemon);
    std::fs::remove_file(dev.path("rebooted")).unwrap();
    assert_eq!(dev.reboot(), Slot::A);
    daemon = dev.start();
    let mut reports = Value::Null;
    wait_for(&dev, 60, "the deployment's reports", || {
        reports = admin_json(&server, &token, &["devices", "reports", &device]);
        reports
            .as_array()
            .is_some_and(|a| a.last().is_some_and(|x| x["status"] == "success") && a.len() > 3)
    });
    stop(&mut daemon);
    let mine: Vec<&Value> = reports
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["deployment_id"] == dep.as_str())
        .collect();
    assert_eq!(
        mine.iter()
            .map(|x| x["status"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["downloading", "installing", "rebooting", "success"],
        "{reports}"
    );
    for x in &mine {
        assert_eq!(x["origin"], "daemon");
        assert_eq!(x["release_version"], "2");
    }
    assert_eq!(device_state(&server, &token, &dep).0, "success");
    assert_eq!(queued(&dev)["pending"].as_array().unwrap().len(), 0);
}
