//! `[network] budget_per_month_mib`: the daemon counts the bytes it downloads per
//! calendar month (across deployments and restarts, in `data_dir/budget-month.json`)
//! and the engine gets min(per deployment, what is left of the month): a deployment
//! needing one byte more than is left fails before a byte is fetched, with a status
//! that gives the numbers; one needing exactly what is left succeeds.

mod daemon_common;
mod server_common;

use daemon_common::*;
use serde_json::{Value, json};
use server_common::*;
use shoal_bootctl::Slot;

const LIMIT: u64 = 8 << 20;

fn ledger(dev: &Dev) -> Value {
    serde_json::from_slice(&std::fs::read(dev.path("data/budget-month.json")).unwrap()).unwrap()
}

fn seed(dev: &Dev, month: &str, used: u64) {
    std::fs::write(
        dev.path("data/budget-month.json"),
        json!({ "month": month, "used_bytes": used }).to_string(),
    )
    .unwrap();
}

#[test]
fn the_monthly_budget_is_counted_and_enforced() {
    let setup = Setup::new();
    let data = setup.path("data");
    let server = Server::start(&setup, &data, &Db::Sqlite, &[]);
    let token = host_token(&data, &Db::Sqlite, "admin");
    let v1 = upload(&server, &token, &setup, "v1.shoal");
    let v2 = upload(&server, &token, &setup, "v2.shoal");
    let dev = Dev::new(&setup, &server.url, "[network]\nbudget_per_month_mib = 8\n");
    let mut daemon = dev.start();
    let device = accept(&server, &token, &dev);

    // v1: counted in this month.
    let dep1 = deploy(&server, &token, "v1", &v1, &device);
    reboot_and_succeed(&dev, &mut daemon, &server, &token, &dep1);
    stop(&mut daemon);
    let t1 = installed_field(&dev.log(), "transferred")[0];
    assert!(t1 > 0);
    let l = ledger(&dev);
    let month = l["month"].as_str().unwrap().to_owned();
    assert_eq!(month.len(), 7, "{l}");
    assert_eq!(l["used_bytes"], t1, "{l}");

    // v2 needs `needed` bytes on the wire. One byte less is left this month: it
    // fails before a byte is fetched, saying how much it needs and how much is left.
    let d = diff(&setup, "v1.shoal", "v2.shoal");
    let needed = d["needed_stored_bytes"].as_u64().unwrap();
    seed(&dev, &month, LIMIT - needed + 1);
    let b_before = dev.slot_bytes(Slot::B, SLOT);
    let before = dev.log().len();
    daemon = dev.start();
    let dep2 = deploy(&server, &token, "v2-over", &v2, &device);
    wait_for(&dev, 60, "failure", || {
        device_state(&server, &token, &dep2).0 == "failure"
    });
    stop(&mut daemon);
    let (_, substate) = device_state(&server, &token, &dep2);
    assert!(
        substate.contains(&format!(
            "the monthly data budget has {} of {LIMIT} bytes left in {month}",
            needed - 1
        )),
        "{substate}"
    );
    assert!(
        substate.contains(&format!("needs {needed} bytes")),
        "{substate}"
    );
    assert!(
        substate.contains(&format!("allows {}", needed - 1)),
        "{substate}"
    );
    assert!(installed_field(&dev.log()[before..], "transferred").is_empty());
    assert_eq!(ledger(&dev)["used_bytes"], LIMIT - needed + 1);
    assert_eq!(dev.slot_bytes(Slot::B, SLOT), b_before);

    // Exactly what it needs is left: it goes through, and is counted.
    seed(&dev, &month, LIMIT - needed);
    let before = dev.log().len();
    daemon = dev.start();
    let dep3 = deploy(&server, &token, "v2", &v2, &device);
    reboot_and_succeed(&dev, &mut daemon, &server, &token, &dep3);
    stop(&mut daemon);
    let t3 = installed_field(&dev.log()[before..], "transferred")[0];
    let framing = 36 * d["chunks_needed"].as_u64().unwrap();
    assert_eq!(t3, needed + framing);
    assert_eq!(ledger(&dev)["used_bytes"], LIMIT - needed + t3);

    // A new month starts from zero (a ledger of an older month is not carried on):
    // v3, unrelated to what the device has, needs bytes again and gets them.
    std::fs::write(setup.path("v3.img"), image(3, 2 << 20)).unwrap();
    shoal_tests::ok(shoal_tests::run_in(
        setup.dir.path(),
        &[
            "--quiet",
            "artifact",
            "build",
            "--image",
            "v3.img",
            "--name",
            "acme-os",
            "--version",
            "3",
            "--device-type",
            "board",
            "--security-counter",
            "1",
            "--key",
            "rel.pem",
            "--out",
            "v3.shoal",
        ],
    ));
    let v3 = upload(&server, &token, &setup, "v3.shoal");
    seed(&dev, "2000-01", LIMIT);
    let before = dev.log().len();
    daemon = dev.start();
    let dep4 = deploy(&server, &token, "v3", &v3, &device);
    reboot_and_succeed(&dev, &mut daemon, &server, &token, &dep4);
    stop(&mut daemon);
    let t4 = installed_field(&dev.log()[before..], "transferred")[0];
    assert!(t4 > 500_000, "{t4}");
    assert_eq!(ledger(&dev)["month"], month.as_str());
    assert_eq!(ledger(&dev)["used_bytes"], t4);
}
