//! The commit of one batch and its fencing. Each entity's new events, id
//! rows and state go in one single-partition conditional batch fenced on the
//! head the pipeline read (`IF head = expected_head`, or `IF head = null` to
//! open a bucket); then the read-model effects, recorded first as an intent,
//! then the dead letters and checkpoints. An intent whose commit failed is
//! carried to the next commit, or found by the next process that opens the
//! keyspace.

use std::collections::{BTreeMap, HashMap, HashSet};

use async_trait::async_trait;
use futures::{StreamExt as _, stream};
use scylla::serialize::row::SerializeRow;
use scylla::statement::SerialConsistency;
use scylla::statement::batch::{Batch, BatchType};

use refold_store::{
    Commit, EntityKey, EntityUpdate, ProjectionWrite, Result, Storage, StoreError, StoredEvent,
};

use crate::error::{applied, exec_err, other};
use crate::intents::{Effects, Intent, ProjOp, split_utf8};
use crate::outbox::{CHANGE_ROW_TTL, Planned};
use crate::rows::{
    AdvanceValues, ChangeRowValues, CheckpointValues, DeadLetterValues, EventValues, IdValues,
    IntentRow, IntentValues, Located, OpenBucketValues, PutStateValues, QuarantineValues,
    StateValues,
};
use crate::store::{CassandraStore, DEAD_LETTER_SHARDS, INDEX_SHARDS, shard_of};

/// Largest chunk of an intent row, in bytes.
const INTENT_CHUNK: usize = 256 << 10;
/// Checkpoint rows per batch: well under Cassandra's batch size warning
/// (5 KiB by default) for any source name of reasonable length.
const CHECKPOINTS_PER_BATCH: usize = 32;
/// How often `release` re-reads a head that moved under it.
const RELEASE_ATTEMPTS: usize = 20;

impl CassandraStore {
    /// List a new entity in the index. Listed before it exists: a superset
    /// is harmless, a gap is not.
    async fn index(&self, key: &EntityKey) -> Result<()> {
        let shard = shard_of(&key.entity_id, INDEX_SHARDS);
        self.run(
            &self.st.index_insert,
            (&key.entity_type, shard, &key.entity_id),
        )
        .await?;
        Ok(())
    }

    /// A state-only partition written by its only writer: one plain write
    /// in a single bucket that never fills (no events are ever appended to
    /// it), instead of a conditional batch.
    async fn put_state(&self, u: &EntityUpdate) -> Result<()> {
        if u.expected_head == 0 {
            self.index(&u.key).await?;
        }
        self.run(
            &self.st.put_state,
            PutStateValues {
                state: StateValues::of(u),
                cap: i64::MAX / 2,
            },
        )
        .await?;
        self.remember(&u.key, None);
        Ok(())
    }

    /// One entity's new events, id rows and state, as one conditional
    /// single-partition batch fenced on `expected_head`.
    async fn write_entity(
        &self,
        u: &EntityUpdate,
        events: &[&StoredEvent],
        change: Option<&(String, i64)>,
    ) -> Result<()> {
        self.unstash(&u.key);
        let loc = match self.cached(&u.key) {
            Some(l) if l.head == u.expected_head => Some(l),
            _ => self.locate(&u.key).await?.map(|(l, _)| l),
        };
        let loc_head = loc.map(|l| l.head).unwrap_or(0);
        if loc_head != u.expected_head {
            self.remember(&u.key, None);
            return Err(StoreError::Fenced(format!(
                "{} is at head {loc_head}, expected {}",
                u.key, u.expected_head
            )));
        }
        // Where the new events go, and on what the batch is conditioned.
        let (bucket, opens) = match loc {
            None => (0, true),
            Some(l) if l.full() => (l.bucket + 1, true),
            Some(l) => (l.bucket, false),
        };
        if bucket > 0 {
            // An event stored once is never stored again: the batch's
            // `IF NOT EXISTS` sees the id rows of the bucket it writes, this
            // read those of the earlier ones (closed: a commit only appends
            // to the live bucket, and one that did since would have moved
            // the head this batch is fenced on).
            let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
            let stored = self.ids_in(&u.key, (0..bucket).collect(), &ids).await?;
            if let Some(id) = stored.keys().next() {
                return Err(StoreError::Fenced(format!(
                    "{} already holds event {id}",
                    u.key
                )));
            }
        }
        if u.expected_head == 0 {
            self.index(&u.key).await?;
        }

        let mut batch = Batch::new(BatchType::Unlogged);
        let mut values: Vec<Box<dyn SerializeRow + Send + Sync + '_>> =
            Vec::with_capacity(events.len() * 2 + 1);
        for e in events {
            batch.append_statement(self.st.insert_event.clone());
            values.push(Box::new(EventValues::of(e, bucket)));
            batch.append_statement(self.st.insert_id.clone());
            values.push(Box::new(IdValues::of(e, bucket)));
        }
        if let Some((batch_id, position)) = change {
            // Applied with the state or not at all: what tells a publisher
            // whether this batch's record is true.
            batch.append_statement(self.st.insert_change.clone());
            values.push(Box::new(ChangeRowValues {
                entity_type: &u.key.entity_type,
                entity_id: &u.key.entity_id,
                bucket,
                position: *position,
                batch_id,
                ttl: CHANGE_ROW_TTL,
            }));
        }
        let state = StateValues::of(u);
        let expected_head = i64::try_from(u.expected_head).unwrap_or(i64::MAX);
        if opens {
            batch.append_statement(self.st.open_bucket.clone());
            values.push(Box::new(OpenBucketValues {
                state,
                bucket,
                base: expected_head,
                cap: i64::try_from(self.bucket_size).unwrap_or(i64::MAX),
            }));
        } else {
            batch.append_statement(self.st.advance.clone());
            values.push(Box::new(AdvanceValues {
                state,
                bucket,
                expected_head,
            }));
        }
        batch.set_serial_consistency(Some(SerialConsistency::Serial));
        let r = self.session.batch(&batch, values).await.map_err(exec_err)?;
        if !applied(r)? {
            self.remember(&u.key, None);
            return Err(StoreError::Fenced(format!(
                "{} moved past head {} under us, or already holds one of its events (bucket {bucket})",
                u.key, u.expected_head
            )));
        }
        let (base, cap) = match loc {
            Some(l) if !opens => (l.base, l.cap),
            _ => (u.expected_head, self.bucket_size),
        };
        self.remember(
            &u.key,
            Some(Located {
                bucket,
                base,
                cap,
                head: u.head,
            }),
        );
        if opens && bucket > 0 {
            self.write_hint(&u.key, bucket).await;
        }
        Ok(())
    }

    /// Record an intent before the entity batches.
    async fn write_intent(&self, intent: &Intent) -> Result<()> {
        let json = serde_json::to_string(&intent.effects).map_err(other)?;
        let chunks = split_utf8(&json, INTENT_CHUNK);
        let futs: Vec<_> = chunks
            .iter()
            .enumerate()
            .map(|(i, c)| {
                self.session.execute_unpaged(
                    &self.st.intent_insert,
                    IntentValues {
                        id: &intent.id,
                        seq: i as i32,
                        ts: intent.effects.ts,
                        chunk: c,
                    },
                )
            })
            .collect();
        self.all(futs).await
    }

    async fn forget_intent(&self, id: &str) {
        if let Err(e) = self.run(&self.st.intent_delete, (id,)).await {
            tracing::debug!(intent = id, error = %e, "could not delete an applied intent");
        }
    }

    /// Quarantine records, then read-model writes (the last operation per
    /// document: the batch's net effect), all at the intent's timestamp.
    async fn apply_effects(&self, e: &Effects) -> Result<()> {
        let ts = e.ts;
        // Releases one microsecond earlier than the rest: a record released
        // and quarantined again by the same commit stays, whichever of the
        // two writes lands first (so all of them go at once).
        let releases: Vec<_> = e
            .released
            .iter()
            .map(|k| {
                self.session.execute_unpaged(
                    &self.st.quarantine_release,
                    (ts - 1, &k.entity_type, &k.entity_id),
                )
            })
            .collect();
        let quarantines: Vec<_> = e
            .quarantines
            .iter()
            .map(|q| {
                self.session
                    .execute_unpaged(&self.st.quarantine_insert, QuarantineValues::of(q, ts))
            })
            .collect();
        let mut last: HashMap<(&str, &str), &ProjOp> = HashMap::new();
        for op in &e.projections {
            last.insert((op.projection.as_str(), op.key.as_str()), op);
        }
        let futs: Vec<_> = last
            .into_values()
            .map(|op| async move {
                match &op.body {
                    Some(body) => {
                        self.put_document(&op.projection, &op.key, &body.to_string(), ts)
                            .await
                    }
                    None => self.delete_document(&op.projection, &op.key, ts).await,
                }
            })
            .collect();
        let (released, quarantined, documents) =
            tokio::join!(self.all(releases), self.all(quarantines), self.each(futs));
        released.and(quarantined).and(documents)
    }

    /// Apply (and delete) the intents left by commits that failed in this process.
    async fn apply_carried(&self) -> Result<()> {
        let mut carry = self.carry.lock().await;
        while let Some(intent) = carry.first() {
            self.apply_if_committed(&intent.effects).await?;
            self.forget_intent(&intent.id).await;
            carry.remove(0);
        }
        Ok(())
    }

    /// Apply an interrupted commit's effects if any of its entity batches
    /// applied (or it had no events to tell).
    async fn apply_if_committed(&self, e: &Effects) -> Result<()> {
        let mut applied = e.probes.is_empty();
        for (key, id) in &e.probes {
            if self
                .known_for(key, vec![id.clone()])
                .await?
                .contains_key(id)
            {
                applied = true;
                break;
            }
        }
        if applied {
            self.apply_effects(e).await
        } else {
            tracing::info!("dropping the effects of a commit that stored nothing");
            Ok(())
        }
    }

    /// Apply every intent found in the table (left by crashed or failed
    /// commits of any process). Idempotent; returns how many there were.
    pub(crate) async fn recover_intents(&self) -> Result<usize> {
        let rows: Vec<IntentRow> = self.rows(&self.st.intent_read, ()).await?;
        let mut intents: BTreeMap<String, BTreeMap<i32, String>> = BTreeMap::new();
        for row in rows {
            intents
                .entry(row.id)
                .or_default()
                .insert(row.seq, row.chunk.unwrap_or_default());
        }
        let n = intents.len();
        for (id, chunks) in intents {
            let json: String = chunks.into_values().collect();
            match serde_json::from_str::<Effects>(&json) {
                Ok(effects) => self.apply_if_committed(&effects).await?,
                // A partial intent: its commit never got to the entity batches.
                Err(e) => tracing::warn!(intent = %id, error = %e, "dropping an incomplete intent"),
            }
            self.forget_intent(&id).await;
        }
        Ok(n)
    }

    async fn commit_inner(
        &self,
        commit: &Commit,
        intent: Option<&Intent>,
        planned: Option<&Planned>,
    ) -> Result<()> {
        // 1. Events + state, per entity, fenced.
        let mut by_key: HashMap<&EntityKey, Vec<&StoredEvent>> = HashMap::new();
        for e in &commit.events {
            by_key.entry(&e.key).or_default().push(e);
        }
        let updated: HashSet<&EntityKey> = commit.entities.iter().map(|u| &u.key).collect();
        if let Some(k) = by_key.keys().find(|k| !updated.contains(**k)) {
            // Events are only ever stored together with their entity's state.
            return Err(StoreError::Other(anyhow::anyhow!(
                "events of {k} come without an entity update"
            )));
        }
        let futs: Vec<_> = commit
            .entities
            .iter()
            .map(|u| {
                let events = by_key.get(&u.key).map(Vec::as_slice).unwrap_or(&[]);
                let change = planned.and_then(|p| p.change_rows.get(&u.key));
                async move {
                    if commit.exclusive && events.is_empty() && change.is_none() {
                        self.put_state(u).await
                    } else {
                        self.write_entity(u, events, change).await
                    }
                }
            })
            .collect();
        let mut results = stream::iter(futs).buffer_unordered(self.concurrency);
        let mut failure: Option<StoreError> = None;
        while let Some(r) = results.next().await {
            if let Err(e) = r {
                failure = Some(worst(failure, e));
            }
        }
        drop(results);
        if let Some(f) = failure {
            return Err(f);
        }
        // 2. Quarantine records and read-model writes.
        if let Some(i) = intent {
            self.apply_effects(&i.effects).await?;
        }
        let ts = intent
            .map(|i| i.effects.ts)
            .unwrap_or_else(|| self.next_ts());
        // 3. Dead letters (deterministic ids: re-inserting one is harmless).
        let futs: Vec<_> = commit
            .dead_letters
            .iter()
            .map(|d| {
                self.session.execute_unpaged(
                    &self.st.dead_letter_insert,
                    DeadLetterValues::of(d, shard_of(&d.id, DEAD_LETTER_SHARDS), ts),
                )
            })
            .collect();
        self.all(futs).await?;
        // 4. Checkpoints, while the intent is deleted: its effects are
        // applied, and should the checkpoints fail, the commit carries it
        // in memory all the same. A source's checkpoints share one
        // partition, so they go as single-partition batches.
        let mut by_source: BTreeMap<&str, Vec<CheckpointValues<'_>>> = BTreeMap::new();
        for c in &commit.checkpoints {
            by_source
                .entry(c.source.as_str())
                .or_default()
                .push(CheckpointValues {
                    source: &c.source,
                    part: c.partition,
                    next_offset: c.offset,
                    ts,
                });
        }
        let futs: Vec<_> = by_source
            .values()
            .flat_map(|rows| rows.chunks(CHECKPOINTS_PER_BATCH))
            .map(|rows| {
                let mut batch = Batch::new(BatchType::Unlogged);
                for _ in rows {
                    batch.append_statement(self.st.checkpoint_upsert.clone());
                }
                async move { self.session.batch(&batch, rows).await }
            })
            .collect();
        match intent {
            Some(i) => {
                let (written, ()) = tokio::join!(self.all(futs), self.forget_intent(&i.id));
                written
            }
            None => self.all(futs).await,
        }
    }

    /// Clear the quarantine flag in the live bucket, fenced on its head so
    /// that a concurrent commit is not half-overwritten (re-read if it
    /// moved), then remove the quarantine record.
    pub(crate) async fn release_inner(&self, key: &EntityKey) -> Result<()> {
        self.unstash(key);
        for _ in 0..RELEASE_ATTEMPTS {
            let Some((loc, _)) = self.locate(key).await? else {
                break;
            };
            let r = self
                .run(
                    &self.st.release,
                    (
                        &key.entity_type,
                        &key.entity_id,
                        loc.bucket,
                        i64::try_from(loc.head).unwrap_or(i64::MAX),
                    ),
                )
                .await?;
            if applied(r)? {
                break;
            }
        }
        self.run(
            &self.st.quarantine_delete,
            (&key.entity_type, &key.entity_id),
        )
        .await?;
        Ok(())
    }
}

/// Of two failures of one commit's entity batches, the one to report: an
/// unexpected error over an outage, an outage over a lost fence (a fence
/// is only worth re-running once the store answers).
fn worst(a: Option<StoreError>, b: StoreError) -> StoreError {
    match (a, b) {
        (Some(StoreError::Other(a)), _) | (_, StoreError::Other(a)) => StoreError::Other(a),
        (Some(StoreError::Unavailable(a)), _) | (_, StoreError::Unavailable(a)) => {
            StoreError::Unavailable(a)
        }
        (_, f) => f,
    }
}

/// The read-model part of a commit, with one probe event per entity.
fn effects_of(commit: &Commit, ts: i64) -> Effects {
    let mut seen = HashSet::new();
    Effects {
        ts,
        quarantines: commit.quarantines.clone(),
        released: commit.released.clone(),
        probes: commit
            .events
            .iter()
            .filter(|e| seen.insert(&e.key))
            .map(|e| (e.key.clone(), e.id.clone()))
            .collect(),
        projections: commit
            .projections
            .iter()
            .map(|p| match p {
                ProjectionWrite::Upsert {
                    projection,
                    key,
                    body,
                } => ProjOp {
                    projection: projection.clone(),
                    key: key.clone(),
                    body: Some(body.clone()),
                },
                ProjectionWrite::Delete { projection, key } => ProjOp {
                    projection: projection.clone(),
                    key: key.clone(),
                    body: None,
                },
            })
            .collect(),
    }
}

#[async_trait]
impl Storage for CassandraStore {
    async fn commit(&self, commit: Commit) -> Result<()> {
        // Effects of an earlier commit that failed after some of its entity
        // batches may have applied.
        self.apply_carried().await?;

        let effects = effects_of(&commit, self.next_ts());
        let planned = self.plan_outbox(&commit)?;
        let intent = (!effects.is_empty()).then(|| Intent {
            id: format!(
                "{:016x}{:016x}",
                rand::random::<u64>(),
                rand::random::<u64>()
            ),
            effects,
        });
        // Nothing of the commit is applied yet: a failure here needs no
        // carrying over (outbox rows written meanwhile stay in doubt, and
        // are dropped once their entities move on without them).
        let (written, recorded) = tokio::join!(
            async {
                match &intent {
                    Some(i) => self.write_intent(i).await,
                    None => Ok(()),
                }
            },
            async {
                match &planned {
                    Some(p) => self.write_outbox(p).await,
                    None => Ok(()),
                }
            }
        );
        if let Err(e) = written.and(recorded) {
            if let Some(p) = planned {
                self.settle_outbox(p, false);
            }
            return Err(e);
        }
        let r = self
            .commit_inner(&commit, intent.as_ref(), planned.as_ref())
            .await;
        if let Some(p) = planned {
            self.settle_outbox(p, r.is_ok());
        }
        match r {
            Ok(()) => Ok(()),
            Err(e) => {
                if let Some(i) = intent {
                    self.carry.lock().await.push(i);
                }
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unexpected_error_outranks_an_outage_and_an_outage_a_fence() {
        let fenced = || StoreError::Fenced("f".into());
        let down = || StoreError::Unavailable("u".into());
        assert!(matches!(
            worst(Some(down()), fenced()),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(
            worst(Some(fenced()), down()),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(
            worst(Some(down()), StoreError::Other(anyhow::anyhow!("x"))),
            StoreError::Other(_)
        ));
        assert!(matches!(worst(None, fenced()), StoreError::Fenced(_)));
    }
}
