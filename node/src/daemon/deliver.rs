//! Delivers the device's queued status reports ([`crate::reports`]) to the server,
//! oldest first, in batches (`POST /api/devices/v1/reports`).
//!
//! A batch the server stored (or already had) leaves the queue. Transport trouble,
//! 5xx, 429 and 401 stop the delivery; the reports stay and go with the next poll. A
//! batch refused for good (another 4xx) is sent again one report at a time, so one
//! bad report never holds back the others: a report refused on its own is moved to
//! the queue's `refused` table with the server's answer, not dropped silently.

use std::path::Path;

use reqwest::StatusCode;
use serde::Deserialize;
use shoal_fleet::report::Signed;
use tracing::{info, warn};

use super::api::{Api, ApiError, error_of};
use crate::reports::Queue;

/// Reports per request (the server takes at most 100).
pub const BATCH: usize = 50;

/// What one delivery did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Flushed {
    /// Reports the server has now (stored now or before).
    pub delivered: usize,
    /// Reports it refused for good.
    pub refused: usize,
}

/// Why a delivery stopped.
#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    /// The queue could not be read or written.
    #[error(transparent)]
    Queue(#[from] crate::reports::QueueError),
    /// The server could not be reached, or answered with a temporary error.
    #[error(transparent)]
    Api(#[from] ApiError),
}

#[derive(Debug, Deserialize)]
struct Delivered {
    stored: Vec<u64>,
    duplicates: Vec<u64>,
}

/// Sends `reports` (all of this device); the sequence numbers the server has.
fn post(api: &Api, reports: &[(u64, Signed)]) -> Result<Vec<u64>, ApiError> {
    let body = serde_json::json!({
        "device_id": api.device_id(),
        "reports": reports.iter().map(|(_, s)| s).collect::<Vec<_>>(),
    });
    let resp = api.send("/reports", |c, u| c.post(u).json(&body))?;
    if resp.status() != StatusCode::OK {
        return Err(error_of(resp));
    }
    let d: Delivered = resp
        .json()
        .map_err(|e| ApiError::Malformed(format!("report delivery: {e}")))?;
    let mut have: Vec<u64> = d.stored.into_iter().chain(d.duplicates).collect();
    have.retain(|s| reports.iter().any(|(q, _)| q == s));
    if have.len() != reports.len() {
        return Err(ApiError::Malformed(format!(
            "the server acknowledged {} of {} reports",
            have.len(),
            reports.len()
        )));
    }
    Ok(have)
}

/// Delivers every queued report of the device in `data_dir`.
pub fn flush(api: &Api, data_dir: &Path) -> Result<Flushed, DeliverError> {
    let mut done = Flushed::default();
    loop {
        // The queue is open only between requests, never during one: a standalone
        // `shoal install` may want to add a report meanwhile.
        let batch = Queue::open(data_dir)?.peek(BATCH)?;
        if batch.is_empty() {
            if done != Flushed::default() {
                info!(
                    delivered = done.delivered,
                    refused = done.refused,
                    "status reports delivered"
                );
            }
            return Ok(done);
        }
        match post(api, &batch) {
            Ok(have) => {
                Queue::open(data_dir)?.delivered(&have)?;
                done.delivered += have.len();
            }
            Err(e) if e.is_transient() => return Err(e.into()),
            Err(e) => {
                warn!(error = %e, reports = batch.len(), "the server refused a batch of reports; sending them one by one");
                for one in &batch {
                    match post(api, std::slice::from_ref(one)) {
                        Ok(have) => {
                            Queue::open(data_dir)?.delivered(&have)?;
                            done.delivered += have.len();
                        }
                        Err(e) if e.is_transient() => return Err(e.into()),
                        Err(e) => {
                            warn!(seq = one.0, error = %e, "the server refused a status report; it is kept as refused");
                            Queue::open(data_dir)?.refuse(one.0, &e.to_string())?;
                            done.refused += 1;
                        }
                    }
                }
            }
        }
    }
}
