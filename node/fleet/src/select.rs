//! Deterministic assignment of devices to phases.
//!
//! Each device gets a key from the seed and its id (FNV-1a over the seed's and the id's
//! bytes, finished with SplitMix64's mixer), and devices are ordered by key, then id.
//! The order depends on the set of devices and the seed only, never on the order they
//! were listed in, the platform, or a process's hash seed; another seed gives another,
//! unrelated order, so one unlucky device is not always in the first phase.

use std::collections::BTreeSet;

use crate::DeviceId;

/// The key that orders `device` under `seed`.
pub fn key(seed: u64, device: &DeviceId) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = FNV_OFFSET;
    for b in seed.to_le_bytes().iter().chain(device.as_str().as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    // SplitMix64's finaliser: spreads FNV's weak low bits over the whole word.
    h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^ (h >> 31)
}

/// `devices` without duplicates, in the order phases take them under `seed`.
pub fn order(seed: u64, devices: impl IntoIterator<Item = DeviceId>) -> Vec<DeviceId> {
    let unique: BTreeSet<DeviceId> = devices.into_iter().collect();
    let mut keyed: Vec<(u64, DeviceId)> = unique.into_iter().map(|d| (key(seed, &d), d)).collect();
    keyed.sort_unstable();
    keyed.into_iter().map(|(_, d)| d).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<DeviceId> {
        (0..n)
            .map(|i| DeviceId::new(format!("dev-{i:04}")))
            .collect()
    }

    #[test]
    fn order_ignores_input_order_and_duplicates() {
        let a = order(7, ids(50));
        let mut shuffled = ids(50);
        shuffled.reverse();
        shuffled.extend(ids(10));
        assert_eq!(order(7, shuffled), a);
        assert_eq!(a.len(), 50);
    }

    #[test]
    fn seeds_give_different_orders() {
        let a = order(1, ids(50));
        let b = order(2, ids(50));
        assert_ne!(a, b);
        let mut sorted_a = a.clone();
        sorted_a.sort();
        assert_eq!(sorted_a, ids(50), "a permutation of the input");
        // Not simply the id order.
        assert_ne!(a, ids(50));
    }

    #[test]
    fn key_is_pinned() {
        // Stored rollouts depend on this function: it must never change silently.
        assert_eq!(key(0, &DeviceId::new("a")), key(0, &DeviceId::new("a")));
        assert_eq!(key(0, &DeviceId::new("dev-0001")), PINNED);
        assert_ne!(key(1, &DeviceId::new("dev-0001")), PINNED);
    }
    // Computed independently (Python) from the definition in the module doc.
    const PINNED: u64 = 8_073_620_867_816_777_086;

    #[test]
    fn a_small_canary_is_spread_over_the_fleet() {
        // 1,000 devices, 10% canary: the canary's ids are not bunched in one range.
        let first: Vec<DeviceId> = order(42, ids(1000)).into_iter().take(100).collect();
        let low = first.iter().filter(|d| d.as_str() < "dev-0500").count();
        assert!((30..=70).contains(&low), "{low} of 100 below the median id");
    }
}
