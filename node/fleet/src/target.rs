//! What a deployment targets, and which devices that is.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::DeviceId;
use crate::auth;
use crate::filter::{Filter, Inventory};

/// What a deployment is for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// These devices; each must be known and accepted.
    Devices(Vec<DeviceId>),
    /// The accepted members of a static group.
    Group(String),
    /// The accepted devices whose inventory matches (a dynamic group or an ad-hoc filter).
    Filter(Filter),
}

/// What [`Target::resolve`] needs to know about one device.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    /// The device.
    pub id: &'a DeviceId,
    /// Its authentication state; only accepted devices are deployed to.
    pub auth: auth::State,
    /// The static groups it belongs to.
    pub groups: &'a [String],
    /// Its inventory.
    pub inventory: &'a Inventory,
}

/// Why a target resolved to nothing usable. Nothing was created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// A listed device is unknown.
    #[error("device {0} is unknown")]
    UnknownDevice(DeviceId),
    /// A listed device is not accepted.
    #[error("device {device} is {state}, not accepted")]
    NotAccepted {
        /// The device.
        device: DeviceId,
        /// Its state.
        state: auth::State,
    },
    /// No device matched.
    #[error("the target matches no accepted device")]
    NoDevices,
}

impl Target {
    /// The devices this target means now, in id order without duplicates, out of
    /// `fleet`. A dynamic group is evaluated once, here: a deployment keeps the devices
    /// it started with.
    pub fn resolve<'a>(
        &self,
        fleet: impl IntoIterator<Item = Candidate<'a>>,
    ) -> Result<Vec<DeviceId>, ResolveError> {
        let accepted = |c: &Candidate<'_>| c.auth == auth::State::Accepted;
        let devices: Vec<DeviceId> = match self {
            Target::Devices(list) => {
                let wanted: BTreeSet<&DeviceId> = list.iter().collect();
                let known: BTreeMap<&DeviceId, auth::State> = fleet
                    .into_iter()
                    .filter(|c| wanted.contains(c.id))
                    .map(|c| (c.id, c.auth))
                    .collect();
                for &device in &wanted {
                    match known.get(device) {
                        None => return Err(ResolveError::UnknownDevice(device.clone())),
                        Some(&auth::State::Accepted) => {}
                        Some(&state) => {
                            return Err(ResolveError::NotAccepted {
                                device: device.clone(),
                                state,
                            });
                        }
                    }
                }
                wanted.into_iter().cloned().collect()
            }
            Target::Group(group) => fleet
                .into_iter()
                .filter(|c| accepted(c) && c.groups.iter().any(|g| g == group))
                .map(|c| c.id.clone())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
            Target::Filter(filter) => fleet
                .into_iter()
                .filter(|c| accepted(c) && filter.matches(c.inventory))
                .map(|c| c.id.clone())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
        };
        if devices.is_empty() {
            return Err(ResolveError::NoDevices);
        }
        Ok(devices)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dev {
        id: DeviceId,
        auth: auth::State,
        groups: Vec<String>,
        inventory: Inventory,
    }

    fn fleet() -> Vec<Dev> {
        let dev = |id: &str, auth, groups: &[&str], inv: &[(&str, &str)]| Dev {
            id: DeviceId::new(id),
            auth,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            inventory: inv.iter().copied().collect(),
        };
        use auth::State::*;
        vec![
            dev(
                "d3",
                Accepted,
                &["lab"],
                &[("device_type", "acme"), ("region", "eu")],
            ),
            dev(
                "d1",
                Accepted,
                &["lab", "field"],
                &[("device_type", "acme"), ("region", "us")],
            ),
            dev(
                "d2",
                Pending,
                &["lab"],
                &[("device_type", "acme"), ("region", "eu")],
            ),
            dev("d4", Rejected, &[], &[("device_type", "acme")]),
            dev(
                "d5",
                Accepted,
                &["field"],
                &[("device_type", "other"), ("region", "eu")],
            ),
        ]
    }

    fn resolve(t: &Target) -> Result<Vec<DeviceId>, ResolveError> {
        let f = fleet();
        t.resolve(f.iter().map(|d| Candidate {
            id: &d.id,
            auth: d.auth,
            groups: &d.groups,
            inventory: &d.inventory,
        }))
    }

    fn ids(v: &[&str]) -> Vec<DeviceId> {
        v.iter().map(|s| DeviceId::new(*s)).collect()
    }

    #[test]
    fn device_lists_need_known_accepted_devices() {
        assert_eq!(
            resolve(&Target::Devices(ids(&["d5", "d1", "d5"]))),
            Ok(ids(&["d1", "d5"]))
        );
        assert_eq!(
            resolve(&Target::Devices(ids(&["d1", "nope"]))),
            Err(ResolveError::UnknownDevice(DeviceId::new("nope")))
        );
        assert_eq!(
            resolve(&Target::Devices(ids(&["d1", "d2"]))),
            Err(ResolveError::NotAccepted {
                device: DeviceId::new("d2"),
                state: auth::State::Pending
            })
        );
        assert_eq!(
            resolve(&Target::Devices(vec![])),
            Err(ResolveError::NoDevices)
        );
    }

    #[test]
    fn groups_and_filters_take_accepted_members_only() {
        assert_eq!(
            resolve(&Target::Group("lab".into())),
            Ok(ids(&["d1", "d3"]))
        );
        assert_eq!(
            resolve(&Target::Group("field".into())),
            Ok(ids(&["d1", "d5"]))
        );
        assert_eq!(
            resolve(&Target::Group("none".into())),
            Err(ResolveError::NoDevices)
        );
        let f: Filter = "device_type=acme and region in (eu)".parse().unwrap();
        assert_eq!(resolve(&Target::Filter(f)), Ok(ids(&["d3"])));
        let f: Filter = "region exists".parse().unwrap();
        assert_eq!(resolve(&Target::Filter(f)), Ok(ids(&["d1", "d3", "d5"])));
        let f: Filter = "device_type=acme and region not exists".parse().unwrap();
        assert_eq!(resolve(&Target::Filter(f)), Err(ResolveError::NoDevices));
    }

    #[test]
    fn targets_serialise_with_filter_text() {
        let t = Target::Filter("region in (eu,us)".parse().unwrap());
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, r#"{"filter":"region in (eu,us)"}"#);
        assert_eq!(serde_json::from_str::<Target>(&json).unwrap(), t);
    }
}
