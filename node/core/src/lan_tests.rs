//! LAN cooperation: several engines wired together in memory on one virtual clock
//! ([`crate::testing::LanSim`]), invariants checked after every step.

use shoal_artifact::Chunking;

use crate::testing::{LanSim, bytes, keys, release_chunked, sign};
use crate::{Config, Event, Slot, SourceId};

const DEVICE: &str = "acme-board";
const CHUNKS: usize = 2_000;

fn swarm(n: usize, seed: u64) -> (LanSim, Vec<u8>) {
    let (key, root) = keys(5);
    let chunking = Chunking {
        min_size: 64,
        avg_size: 256,
        max_size: 1024,
    };
    let image = bytes(seed, CHUNKS * 256);
    let (m, chunks) = release_chunked("acme-os", "2.0", 2, DEVICE, &image, chunking);
    let mut config = Config::new(DEVICE, root);
    config.journal_batch_bytes = 64 * 1024;
    let sim = LanSim::new(n, &config, &m, &sign(&m, &key), &chunks);
    (sim, image)
}

/// Every live device armed a slot holding the image.
fn all_installed(sim: &LanSim, image: &[u8]) {
    for (i, n) in sim.nodes.iter().enumerate().filter(|(_, n)| n.alive) {
        assert!(
            n.dev
                .events
                .iter()
                .any(|e| matches!(e, Event::Armed { .. })),
            "device {i}: {:?}",
            n.dev.events.last()
        );
        assert_eq!(n.dev.boot.armed(), Some(Slot::B), "device {i}");
        assert!(n.dev.live[1][..image.len()] == *image, "device {i} slot B");
    }
}

#[test]
fn ten_engines_on_one_lan_fetch_each_chunk_over_the_wan_once() {
    let (mut sim, image) = swarm(10, 1);
    sim.run(3_600_000);
    all_installed(&sim, &image);
    eprintln!(
        "10 engines: {} WAN and {} LAN chunks for {CHUNKS}, {} ms",
        sim.wan_chunks,
        sim.lan_chunks,
        sim.now_ms()
    );
    assert!(
        sim.wan_chunks <= CHUNKS as u64,
        "{} WAN chunks for {CHUNKS}",
        sim.wan_chunks
    );
    // The rest came over the LAN: nine copies of each chunk.
    assert!(sim.lan_chunks >= 9 * CHUNKS as u64 - sim.wan_chunks);
}

#[test]
fn without_a_swarm_every_device_fetches_everything_over_the_wan() {
    // The control for the test above: the swarm is what saves the WAN.
    let (key, root) = keys(5);
    let chunking = Chunking {
        min_size: 64,
        avg_size: 256,
        max_size: 1024,
    };
    let image = bytes(1, 200 * 256);
    let (m, chunks) = release_chunked("acme-os", "2.0", 2, DEVICE, &image, chunking);
    let config = Config::new(DEVICE, root);
    let mut sim = LanSim::new(3, &config, &m, &sign(&m, &key), &chunks);
    for n in &mut sim.nodes {
        n.engine
            .set_swarm(
                n.dev.now(),
                crate::Swarm {
                    me: crate::NodeKey([0; 32]),
                    members: Vec::new(),
                },
            )
            .expect("swarm");
    }
    sim.run(3_600_000);
    all_installed(&sim, &image);
    assert_eq!(sim.wan_chunks, 3 * 200);
}

#[test]
fn owners_dying_mid_way_cost_at_most_a_tenth_more_wan_fetches() {
    let (mut sim, image) = swarm(10, 2);
    sim.run(110);
    assert!(sim.wan_chunks > 0 && sim.wan_chunks < CHUNKS as u64 / 2);
    sim.kill(3);
    sim.kill(7);
    sim.run(3_600_000);
    all_installed(&sim, &image);
    eprintln!(
        "owners dying: {} WAN chunks for {CHUNKS}, {} ms",
        sim.wan_chunks,
        sim.now_ms()
    );
    assert!(
        sim.wan_chunks as f64 <= 1.1 * CHUNKS as f64,
        "{} WAN chunks for {CHUNKS}",
        sim.wan_chunks
    );
}

#[test]
fn a_peer_serving_corrupt_chunks_is_banned_and_every_slot_verifies() {
    let (mut sim, image) = swarm(5, 3);
    sim.nodes[0].corrupt = true;
    sim.run(3_600_000);
    all_installed(&sim, &image);
    for n in &sim.nodes[1..] {
        assert!(n.dev.events.contains(&Event::SourceBanned {
            source: SourceId(0)
        }));
    }
}

/// WAN chunks when device 0 starts alone and the nine others join `join_ms` later
/// (device 0 has asked the server for chunks they would own by then).
fn late_join(announce_fetching: bool, join_ms: u64) -> (LanSim, Vec<u8>) {
    let (mut sim, image) = swarm(10, 4);
    sim.announce_fetching = announce_fetching;
    let late: Vec<usize> = (1..10).collect();
    sim.hold_back(&late);
    sim.run(join_ms);
    assert!(
        sim.nodes[0].engine.is_installing(),
        "device 0 finished alone"
    );
    sim.join(&late);
    sim.run(3_600_000);
    all_installed(&sim, &image);
    (sim, image)
}

#[test]
fn late_joiners_leave_the_chunks_a_member_is_fetching_to_it() {
    let (with, _) = late_join(true, 60);
    let (without, _) = late_join(false, 60);
    eprintln!(
        "late join: {} WAN chunks for {CHUNKS} with in-flight announcements, {} without",
        with.wan_chunks, without.wan_chunks
    );
    // The control: without saying what it fetches, device 0's requests in flight
    // are fetched again by the joiners that own them.
    assert!(
        without.wan_chunks > CHUNKS as u64 + 20,
        "{} WAN chunks without announcements",
        without.wan_chunks
    );
    assert!(
        with.wan_chunks <= CHUNKS as u64,
        "{} WAN chunks for {CHUNKS}",
        with.wan_chunks
    );
}

#[test]
fn a_member_slow_to_serve_keeps_fetching_what_it_owns() {
    // Device 0 answers its peers 2 s late (past their retransmission timeouts),
    // later and later as their requests queue up: they time it out as a source and
    // ask others, but it still fetches its own chunks over the WAN, and the WAN
    // does not take over what it was asked, so few chunks cross the uplink twice
    // (those it still owned when the others finally dropped it): 2,186 WAN
    // chunks for 2,000. With the WAN still taking over requests to a failing peer:
    // 3,512. (Keeping a failing member's ownership does not change this case: its
    // own chunks arrive from the WAN before the others time it out; without that
    // change the figure is the same and the install ends sooner, 5.5 s vs 10.1 s.)
    let (mut sim, image) = swarm(10, 5);
    sim.nodes[0].serve_delay_ms = 2_000;
    sim.run(3_600_000);
    all_installed(&sim, &image);
    eprintln!(
        "a slow server: {} WAN chunks for {CHUNKS}, {} ms",
        sim.wan_chunks,
        sim.now_ms()
    );
    assert!(
        sim.wan_chunks as f64 <= 1.1 * CHUNKS as f64,
        "{} WAN chunks for {CHUNKS}",
        sim.wan_chunks
    );
}
