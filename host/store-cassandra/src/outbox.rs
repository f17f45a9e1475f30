//! The change outbox: a commit's change records wait here, per source
//! partition, until that partition's holder has published them (the
//! argument is in `CASSANDRA.md`, "The change stream of a cluster").
//!
//! A commit writes its records to the outbox before its entity batches,
//! and each entity batch writes the id of its record (a kind 2 row at the
//! record's last position) in the same conditional batch as the state: so
//! a record is in the outbox whenever its batch may have applied, and its
//! change row says whether it did. Batches this process committed go to
//! the publisher from memory; every other batch found in the table (left
//! by a crash, a failed commit, or the partition's previous holder) is in
//! doubt, and each of its records is handed out only once its change row
//! is found, dropped once its entity has moved on without it, and kept
//! while neither is known.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use refold_store::{EntityKey, OutboxBatch, OutboxPartition, PendingChange};

use crate::rows::OutboxValues;

/// How long a change row outlives its batch: far longer than a record
/// stays in doubt (a change row is only read for a record still in the
/// outbox).
pub(crate) const CHANGE_ROW_TTL: i32 = 7 * 24 * 3600;
/// Records held in memory per partition for its publisher; beyond, they
/// are left to the table (read back in doubt), so that a stalled publisher
/// costs reads, not memory.
pub(crate) const READY_MAX: usize = 20_000;
/// Rows of batches in doubt one read of a partition takes (the rows of
/// batches held in memory are paged past, not counted).
pub(crate) const SCAN_ROWS: usize = 2_000;
/// Bytes of records per outbox write (one single-partition batch), under
/// Cassandra's batch size failure threshold (50 KiB by default).
pub(crate) const WRITE_BYTES: usize = 32 << 10;
/// Buckets of an entity searched for a record's change row, back from the
/// live one: a record in doubt is looked at long before its entity has
/// filled that many buckets more.
pub(crate) const DOUBT_BUCKETS: i64 = 8;
/// How soon records still in doubt are looked at again.
pub(crate) const RESCAN_AFTER: Duration = Duration::from_secs(2);
/// How often a held partition with nothing in doubt is swept for rows
/// written since its last read by another process: the previous holder's
/// commits that were queued or under way when the partition moved (its
/// lanes learn of the move only after the read that revoked it, and
/// finish the batches they hold), whose rows land after the new holder's
/// first read. Without the sweep nothing would look at them again, and
/// their records would never be published.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// How far back before the previous read a sweep starts, in the batch ids'
/// clock (microseconds of the writer's wall clock): covers the time from
/// a commit's planning to its outbox write, and the clock skew between
/// hosts. Rows older than that when they land (a host paused for longer
/// between the two) are found only by the next holder's full read.
pub(crate) const SWEEP_MARGIN_MICROS: i64 = 5 * 60 * 1_000_000;

/// What this process holds of the outbox.
#[derive(Default)]
pub(crate) struct OutboxState {
    /// Partitions claimed by this process's publisher.
    pub(crate) parts: HashMap<OutboxPartition, Part>,
    /// Batches whose commit is under way here: the scan leaves them alone
    /// (their records come from memory when the commit returns).
    pub(crate) inflight: HashSet<String>,
}

#[derive(Default)]
pub(crate) struct Part {
    /// Batches committed here since the claim, in commit order.
    pub(crate) ready: VecDeque<OutboxBatch>,
    pub(crate) ready_records: usize,
    /// The table may hold batches of this partition that are not in
    /// `ready`: they are read (and checked) before `ready` is handed out.
    pub(crate) doubt: bool,
    /// Records still in doubt were left at this scan.
    pub(crate) waiting_since: Option<Instant>,
    /// When the last read of the table started: by this process's clock,
    /// and in the batch ids' (wall-clock microseconds).
    pub(crate) read_at: Option<(Instant, i64)>,
}

impl Part {
    /// Where the next read of the table starts, if one is due: `Some(None)`
    /// for the whole partition (something is in doubt), `Some(Some(id))`
    /// for a sweep of the batches after `id`.
    pub(crate) fn read_due(&self) -> Option<Option<String>> {
        if self.doubt
            || self
                .waiting_since
                .is_some_and(|t| t.elapsed() >= RESCAN_AFTER)
        {
            return Some(None);
        }
        match self.read_at {
            Some((at, micros)) if at.elapsed() >= SWEEP_EVERY && self.waiting_since.is_none() => {
                Some(Some(sweep_from(micros)))
            }
            Some(_) => None,
            None => Some(None),
        }
    }
}

/// The batch id a sweep reads after, for a previous read at `micros`:
/// batch ids start with their writer's clock in 16 hex digits.
pub(crate) fn sweep_from(micros: i64) -> String {
    format!("{:016x}", micros.saturating_sub(SWEEP_MARGIN_MICROS).max(0))
}

/// The outbox part of one commit.
pub(crate) struct Planned {
    pub(crate) batch: String,
    pub(crate) rows: BTreeMap<OutboxPartition, Vec<OutboxValues>>,
    pub(crate) records: BTreeMap<OutboxPartition, Vec<PendingChange>>,
    /// Per entity with a batch in this commit: the change row, this
    /// commit's outbox id at the record's last position. (The commit's id,
    /// not the record's: a commit that runs again after a failure makes a
    /// record of the same id, and only the attempt that applied may be
    /// published.)
    pub(crate) change_rows: HashMap<EntityKey, (String, i64)>,
}
