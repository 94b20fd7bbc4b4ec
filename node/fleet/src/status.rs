//! A device's status within one deployment, with Mender's names, and counts of them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where one device is in one deployment. The names are Mender's, so a Mender-shaped
/// client reads them unchanged.
///
/// The device moves forward through `pending → downloading → installing → rebooting`
/// (it may skip steps) to one of the final statuses. It reports the middle ones and
/// `success`, `failure` and `already-installed`; `pending`, `aborted` and `noartifact`
/// are the server's to set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Status {
    /// In the deployment, not started (maybe not yet admitted by its phase).
    #[serde(rename = "pending")]
    Pending,
    /// Fetching the release.
    #[serde(rename = "downloading")]
    Downloading,
    /// Writing and verifying the inactive slot.
    #[serde(rename = "installing")]
    Installing,
    /// Rebooting into the new slot for its trial boot.
    #[serde(rename = "rebooting")]
    Rebooting,
    /// Final: the new release committed.
    #[serde(rename = "success")]
    Success,
    /// Final (once its retries are spent): the installation failed or rolled back.
    #[serde(rename = "failure")]
    Failure,
    /// Final: the device already ran this release; counts as a success.
    #[serde(rename = "already-installed")]
    AlreadyInstalled,
    /// Final: the deployment was aborted (or the device decommissioned) first.
    #[serde(rename = "aborted")]
    Aborted,
    /// Final: the release has no artifact for this device's type.
    #[serde(rename = "noartifact")]
    NoArtifact,
}

impl Status {
    /// Every status, in declaration order (the order of [`Status::index`]).
    pub const ALL: [Status; 9] = [
        Status::Pending,
        Status::Downloading,
        Status::Installing,
        Status::Rebooting,
        Status::Success,
        Status::Failure,
        Status::AlreadyInstalled,
        Status::Aborted,
        Status::NoArtifact,
    ];

    /// The API and database name (`pending`, `already-installed`, `noartifact`, ...).
    pub const fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Downloading => "downloading",
            Status::Installing => "installing",
            Status::Rebooting => "rebooting",
            Status::Success => "success",
            Status::Failure => "failure",
            Status::AlreadyInstalled => "already-installed",
            Status::Aborted => "aborted",
            Status::NoArtifact => "noartifact",
        }
    }

    /// Position in [`Status::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// Whether the device is done with the deployment.
    pub const fn is_final(self) -> bool {
        matches!(
            self,
            Status::Success
                | Status::Failure
                | Status::AlreadyInstalled
                | Status::Aborted
                | Status::NoArtifact
        )
    }

    /// Whether the device started and has not finished.
    pub const fn is_in_progress(self) -> bool {
        matches!(
            self,
            Status::Downloading | Status::Installing | Status::Rebooting
        )
    }

    /// Whether the status counts towards a phase's success threshold.
    pub const fn is_success(self) -> bool {
        matches!(self, Status::Success | Status::AlreadyInstalled)
    }

    /// Whether a device may report this status (the others are the server's).
    pub const fn is_reportable(self) -> bool {
        !matches!(self, Status::Pending | Status::Aborted | Status::NoArtifact)
    }

    /// Progress order: a report may not go to a lower rank.
    pub(crate) const fn rank(self) -> u8 {
        match self {
            Status::Pending => 0,
            Status::Downloading => 1,
            Status::Installing => 2,
            Status::Rebooting => 3,
            _ => 4,
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no deployment status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown deployment status {0:?} (expected pending, downloading, installing, rebooting, \
     success, failure, already-installed, aborted or noartifact)"
)]
pub struct ParseStatusError(pub String);

impl FromStr for Status {
    type Err = ParseStatusError;

    fn from_str(s: &str) -> Result<Status, ParseStatusError> {
        Status::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| ParseStatusError(s.to_owned()))
    }
}

/// How many devices are in each [`Status`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Devices in [`Status::Pending`].
    pub pending: u32,
    /// Devices in [`Status::Downloading`].
    pub downloading: u32,
    /// Devices in [`Status::Installing`].
    pub installing: u32,
    /// Devices in [`Status::Rebooting`].
    pub rebooting: u32,
    /// Devices in [`Status::Success`].
    pub success: u32,
    /// Devices in [`Status::Failure`].
    pub failure: u32,
    /// Devices in [`Status::AlreadyInstalled`].
    #[serde(rename = "already-installed")]
    pub already_installed: u32,
    /// Devices in [`Status::Aborted`].
    pub aborted: u32,
    /// Devices in [`Status::NoArtifact`].
    pub noartifact: u32,
}

impl Counts {
    /// The count for `status`.
    pub fn get(&self, status: Status) -> u32 {
        match status {
            Status::Pending => self.pending,
            Status::Downloading => self.downloading,
            Status::Installing => self.installing,
            Status::Rebooting => self.rebooting,
            Status::Success => self.success,
            Status::Failure => self.failure,
            Status::AlreadyInstalled => self.already_installed,
            Status::Aborted => self.aborted,
            Status::NoArtifact => self.noartifact,
        }
    }

    fn get_mut(&mut self, status: Status) -> &mut u32 {
        match status {
            Status::Pending => &mut self.pending,
            Status::Downloading => &mut self.downloading,
            Status::Installing => &mut self.installing,
            Status::Rebooting => &mut self.rebooting,
            Status::Success => &mut self.success,
            Status::Failure => &mut self.failure,
            Status::AlreadyInstalled => &mut self.already_installed,
            Status::Aborted => &mut self.aborted,
            Status::NoArtifact => &mut self.noartifact,
        }
    }

    /// Move one device from `from` to `to`.
    ///
    /// # Panics
    /// If no device is counted in `from`: the counts no longer describe the entries, a
    /// bug (or a stored rollout and entries that do not belong together).
    pub(crate) fn shift(&mut self, from: Status, to: Status) {
        let count = self.get_mut(from);
        assert!(*count > 0, "no device counted as {from} to move to {to}");
        *count -= 1;
        *self.get_mut(to) += 1;
    }

    /// Add `n` devices in `status`.
    pub(crate) fn add(&mut self, status: Status, n: u32) {
        *self.get_mut(status) += n;
    }

    /// All devices counted.
    pub fn total(&self) -> u32 {
        Status::ALL.into_iter().map(|s| self.get(s)).sum()
    }

    /// Devices in a final status.
    pub fn finished(&self) -> u32 {
        Status::ALL
            .into_iter()
            .filter(|s| s.is_final())
            .map(|s| self.get(s))
            .sum()
    }

    /// Devices that succeeded ([`Status::Success`] and [`Status::AlreadyInstalled`]).
    pub fn successes(&self) -> u32 {
        self.success + self.already_installed
    }

    /// Devices not yet in a final status.
    pub fn unfinished(&self) -> u32 {
        self.total() - self.finished()
    }

    /// The element-wise sum.
    pub fn plus(&self, other: &Counts) -> Counts {
        let mut sum = *self;
        for s in Status::ALL {
            *sum.get_mut(s) += other.get(s);
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_menders_and_round_trip() {
        let names: Vec<&str> = Status::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            names,
            [
                "pending",
                "downloading",
                "installing",
                "rebooting",
                "success",
                "failure",
                "already-installed",
                "aborted",
                "noartifact"
            ]
        );
        for (i, s) in Status::ALL.into_iter().enumerate() {
            assert_eq!(s.index(), i);
            assert_eq!(s.as_str().parse::<Status>(), Ok(s));
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
        assert_eq!(
            "already_installed".parse::<Status>(),
            Err(ParseStatusError("already_installed".into()))
        );
    }

    #[test]
    fn classes() {
        let finals: Vec<Status> = Status::ALL.into_iter().filter(|s| s.is_final()).collect();
        assert_eq!(
            finals,
            [
                Status::Success,
                Status::Failure,
                Status::AlreadyInstalled,
                Status::Aborted,
                Status::NoArtifact
            ]
        );
        let reportable: Vec<Status> = Status::ALL
            .into_iter()
            .filter(|s| s.is_reportable())
            .collect();
        assert_eq!(
            reportable,
            [
                Status::Downloading,
                Status::Installing,
                Status::Rebooting,
                Status::Success,
                Status::Failure,
                Status::AlreadyInstalled
            ]
        );
        assert!(Status::AlreadyInstalled.is_success() && Status::Success.is_success());
        assert!(!Status::Failure.is_success() && !Status::NoArtifact.is_success());
    }

    #[test]
    fn counts_shift_and_sum() {
        let mut c = Counts::default();
        c.add(Status::Pending, 3);
        c.shift(Status::Pending, Status::Downloading);
        c.shift(Status::Pending, Status::AlreadyInstalled);
        assert_eq!((c.pending, c.downloading, c.already_installed), (1, 1, 1));
        assert_eq!(
            (c.total(), c.finished(), c.unfinished(), c.successes()),
            (3, 1, 2, 1)
        );
        assert_eq!(c.plus(&c).total(), 6);
        assert_eq!(
            serde_json::to_value(c).unwrap()["already-installed"],
            serde_json::json!(1)
        );
    }

    #[test]
    #[should_panic(expected = "no device counted as failure")]
    fn shifting_from_an_empty_status_is_a_bug() {
        Counts::default().shift(Status::Failure, Status::Pending);
    }
}
