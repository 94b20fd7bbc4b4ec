//! The slot writer: fills the *inactive* slot with a payload, chunk by chunk, and
//! proves it by reading it back.
//!
//! Chunks may arrive in any order and at any offset (a resumed download writes
//! where it left off). Writes are synced in batches of
//! [`SlotWriter::sync_batch_bytes`] (an fsync per chunk caps throughput), and
//! [`SlotWriter::verify`] syncs, re-reads the whole payload from the medium and
//! compares its BLAKE3 hash with the manifest's. "From the medium" is the
//! storage's job: [`crate::storage::FileStorage`] reads a slot with `O_DIRECT`, so
//! the check covers what reached the device, not the page cache that the writes
//! filled. Only a verified slot may be armed
//! for a trial boot; [`crate::BootControl::open_writer`] refuses to open the active
//! slot or a payload larger than the slot.

use std::io;

use crate::Slot;
use crate::storage::Storage;

/// Default bytes written between two syncs.
pub const SYNC_BATCH_BYTES: u64 = 64 * 1024 * 1024;
/// Bytes read at a time when verifying.
const READ_BLOCK: usize = 1024 * 1024;

/// Why a slot writer could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The payload is larger than the slot.
    #[error("payload of {payload} bytes does not fit in slot {slot} ({capacity} bytes)")]
    TooLarge {
        /// The slot.
        slot: Slot,
        /// Payload size in bytes.
        payload: u64,
        /// Slot size in bytes.
        capacity: u64,
    },
    /// The slot's storage could not be opened or measured.
    #[error("cannot open slot {slot}")]
    Io {
        /// The slot.
        slot: Slot,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

/// Why a write or sync into a slot failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The write reaches past the end of the payload.
    #[error("write of {len} bytes at offset {offset} is past the payload's {payload_size} bytes")]
    OutOfBounds {
        /// Offset of the write.
        offset: u64,
        /// Length of the write.
        len: u64,
        /// The payload size the writer was opened for.
        payload_size: u64,
    },
    /// The storage write or sync failed.
    #[error("cannot write slot {slot}")]
    Io {
        /// The slot.
        slot: Slot,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

/// Why verification of a written slot failed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The bytes read back do not hash to the expected value.
    #[error("slot {slot} holds a payload with BLAKE3 {actual}, expected {expected}")]
    Mismatch {
        /// The slot.
        slot: Slot,
        /// Expected hash, hex.
        expected: String,
        /// Hash of what was read back, hex.
        actual: String,
    },
    /// Syncing or reading back failed.
    #[error("cannot read back slot {slot}")]
    Io {
        /// The slot.
        slot: Slot,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

/// BLAKE3 of the first `len` bytes of `storage`.
pub fn hash_prefix(storage: &dyn Storage, len: u64) -> io::Result<[u8; 32]> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0; READ_BLOCK];
    let mut offset = 0;
    while offset < len {
        let n = usize::try_from((len - offset).min(READ_BLOCK as u64)).unwrap_or(READ_BLOCK);
        storage.read_at(offset, &mut buf[..n])?;
        hasher.update(&buf[..n]);
        offset += n as u64;
    }
    Ok(*hasher.finalize().as_bytes())
}

/// Writes one payload into one (inactive) slot.
#[derive(Debug)]
pub struct SlotWriter {
    storage: Box<dyn Storage>,
    slot: Slot,
    payload_size: u64,
    sync_batch_bytes: u64,
    unsynced_bytes: u64,
}

impl SlotWriter {
    /// A writer for a payload of `payload_size` bytes into `storage`, which holds
    /// `slot`. Prefer [`crate::BootControl::open_writer`], which also refuses the
    /// active slot.
    pub fn new(
        storage: Box<dyn Storage>,
        slot: Slot,
        payload_size: u64,
    ) -> Result<SlotWriter, OpenError> {
        let capacity = storage
            .len()
            .map_err(|source| OpenError::Io { slot, source })?;
        if payload_size > capacity {
            return Err(OpenError::TooLarge {
                slot,
                payload: payload_size,
                capacity,
            });
        }
        Ok(SlotWriter {
            storage,
            slot,
            payload_size,
            sync_batch_bytes: SYNC_BATCH_BYTES,
            unsynced_bytes: 0,
        })
    }

    /// The slot being written.
    pub fn slot(&self) -> Slot {
        self.slot
    }

    /// The payload size this writer accepts.
    pub fn payload_size(&self) -> u64 {
        self.payload_size
    }

    /// Bytes written between automatic syncs.
    pub fn sync_batch_bytes(&self) -> u64 {
        self.sync_batch_bytes
    }

    /// Sets the bytes written between automatic syncs (at least 1).
    pub fn set_sync_batch_bytes(&mut self, bytes: u64) {
        self.sync_batch_bytes = bytes.max(1);
    }

    /// Bytes written since the last sync.
    pub fn unsynced_bytes(&self) -> u64 {
        self.unsynced_bytes
    }

    /// Writes `data` at `offset` of the payload; syncs when a batch is full.
    /// Returns whether it synced, so a caller can persist its progress journal
    /// exactly for bytes that are durable.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<bool, WriteError> {
        self.put(offset, data.len() as u64, |s| s.write_at(offset, data))
    }

    /// Like [`SlotWriter::write_at`] of `len` zero bytes, without transferring
    /// them where the storage can zero a range ([`Storage::write_zeroes`]).
    pub fn write_zeroes_at(&mut self, offset: u64, len: u64) -> Result<bool, WriteError> {
        self.put(offset, len, |s| s.write_zeroes(offset, len))
    }

    fn put(
        &mut self,
        offset: u64,
        len: u64,
        write: impl FnOnce(&mut dyn Storage) -> io::Result<()>,
    ) -> Result<bool, WriteError> {
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.payload_size)
        {
            return Err(WriteError::OutOfBounds {
                offset,
                len,
                payload_size: self.payload_size,
            });
        }
        write(&mut *self.storage).map_err(|source| WriteError::Io {
            slot: self.slot,
            source,
        })?;
        self.unsynced_bytes += len;
        if self.unsynced_bytes >= self.sync_batch_bytes {
            self.sync()?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Makes every write so far durable.
    pub fn sync(&mut self) -> Result<(), WriteError> {
        self.storage.sync().map_err(|source| WriteError::Io {
            slot: self.slot,
            source,
        })?;
        self.unsynced_bytes = 0;
        Ok(())
    }

    /// Syncs, reads the whole payload back and checks its BLAKE3 hash.
    ///
    /// The read-back goes through the slot's [`Storage`]; for a slot on a block
    /// device ([`crate::storage::FileStorage`]) that is an `O_DIRECT` read of the
    /// medium, not of the cached pages the writes left behind.
    pub fn verify(&mut self, expected: &[u8; 32]) -> Result<(), VerifyError> {
        let slot = self.slot;
        self.sync().map_err(|e| match e {
            WriteError::Io { source, .. } => VerifyError::Io { slot, source },
            WriteError::OutOfBounds { .. } => unreachable!("sync does not check bounds"),
        })?;
        let actual = hash_prefix(&*self.storage, self.payload_size)
            .map_err(|source| VerifyError::Io { slot, source })?;
        if &actual != expected {
            return Err(VerifyError::Mismatch {
                slot,
                expected: hex::encode(expected),
                actual: hex::encode(actual),
            });
        }
        tracing::info!(slot = %slot, bytes = self.payload_size, "slot verified");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::CrashDisk;

    #[test]
    fn writes_out_of_order_syncs_in_batches_and_verifies() {
        let disk = CrashDisk::new();
        disk.put("b", &[0; 100]);
        let payload: Vec<u8> = (0..90u8).collect();
        let mut w = SlotWriter::new(Box::new(disk.storage("b")), Slot::B, 90).unwrap();
        w.set_sync_batch_bytes(40);
        assert!(!w.write_at(30, &payload[30..60]).unwrap());
        assert_eq!(disk.durable("b"), vec![0; 100]);
        assert!(w.write_at(0, &payload[..30]).unwrap());
        assert_eq!(&disk.durable("b")[..60], &payload[..60]);
        assert!(!w.write_at(60, &payload[60..]).unwrap());
        assert_eq!(w.unsynced_bytes(), 30);
        assert!(matches!(
            w.write_at(80, &[0; 11]),
            Err(WriteError::OutOfBounds {
                offset: 80,
                len: 11,
                payload_size: 90
            })
        ));
        w.verify(blake3::hash(&payload).as_bytes()).unwrap();
        assert_eq!(&disk.durable("b")[..90], &payload[..]);
        let wrong = [0u8; 32];
        assert!(matches!(
            w.verify(&wrong),
            Err(VerifyError::Mismatch { slot: Slot::B, .. })
        ));
    }

    #[test]
    fn zeroed_ranges_are_bounded_synced_and_verified_like_writes() {
        let disk = CrashDisk::new();
        disk.put("b", &[7; 100]);
        let mut payload = vec![1u8; 90];
        payload[20..70].fill(0);
        let mut w = SlotWriter::new(Box::new(disk.storage("b")), Slot::B, 90).unwrap();
        w.set_sync_batch_bytes(60);
        assert!(!w.write_at(0, &payload[..20]).unwrap());
        assert!(
            w.write_zeroes_at(20, 50).unwrap(),
            "70 bytes: a batch is full"
        );
        assert_eq!(&disk.durable("b")[..70], &payload[..70]);
        assert!(matches!(
            w.write_zeroes_at(80, 11),
            Err(WriteError::OutOfBounds {
                offset: 80,
                len: 11,
                payload_size: 90
            })
        ));
        assert!(!w.write_at(70, &payload[70..]).unwrap());
        w.verify(blake3::hash(&payload).as_bytes()).unwrap();
    }

    #[test]
    fn refuses_payload_larger_than_slot() {
        let disk = CrashDisk::new();
        disk.put("b", &[0; 10]);
        assert!(matches!(
            SlotWriter::new(Box::new(disk.storage("b")), Slot::B, 11),
            Err(OpenError::TooLarge {
                slot: Slot::B,
                payload: 11,
                capacity: 10
            })
        ));
    }
}
