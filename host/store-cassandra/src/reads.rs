//! Reads of entities, events and the small tables, and the [`EventStore`]
//! and [`StateStore`] implementations. Every trait read runs through
//! [`CassandraStore::read`], which waits out a short outage; the writes of
//! [`StateStore`] are delegated to `commit.rs` (release) and
//! `generations.rs` (adopt, drop).

use std::collections::{BTreeSet, HashMap};

use async_trait::async_trait;
use futures::{StreamExt as _, stream};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use refold_store::{
    Checkpoint, DeadLetter, EntityKey, EntityRecord, EventIdentity, EventStore, OutboxBatch,
    OutboxPartition, Paged, PublishedBatch, QuarantineRecord, Result, StateStore, StoreError,
    StoredChange, StoredEvent, decode_cursor, encode_cursor,
};

use crate::rows::{
    CheckpointRow, DeadLetterRow, EventRow, Found, IdRow, QuarantinePageRow, QuarantineRow,
    SnapshotRow, SnapshotValues, StaticColumns, StaticRow,
};
use crate::store::{CassandraStore, DEAD_LETTER_SHARDS, INDEX_SHARDS, shard_of};

/// Event ids per `IN (...)` lookup.
const IDS_PER_QUERY: usize = 100;

/// Where a quarantine listing resumes: the partition token of the last item
/// seen. A named field rather than a bare number, so that a cursor the store
/// did not issue (any other JSON) is refused as such.
#[derive(Serialize, Deserialize)]
struct TokenCursor {
    token: i64,
}

impl CassandraStore {
    /// The static columns of one bucket; `None` if it was never opened.
    async fn read_static(&self, key: &EntityKey, bucket: i64) -> Result<Option<StaticRow>> {
        let row: Option<StaticColumns> = self
            .one(
                &self.st.read_static,
                (&key.entity_type, &key.entity_id, bucket),
            )
            .await?;
        Ok(row.and_then(|r| r.into_static(self.bucket_size)))
    }

    /// Find the live bucket of an entity: bucket 0, or the one its `live`
    /// hint names, then forward past full buckets.
    pub(crate) async fn locate(&self, key: &EntityKey) -> Result<Option<Found>> {
        let Some(s0) = self.read_static(key, 0).await? else {
            return Ok(None);
        };
        let hint = s0.live;
        let (mut bucket, mut s) = (0i64, s0);
        if hint > 0
            && let Some(sh) = self.read_static(key, hint).await?
        {
            bucket = hint;
            s = sh;
        }
        while s.located(bucket).full() {
            match self.read_static(key, bucket + 1).await? {
                Some(next) => {
                    bucket += 1;
                    s = next;
                }
                None => break,
            }
        }
        if bucket > hint {
            self.write_hint(key, bucket).await;
        }
        let loc = s.located(bucket);
        Ok(Some((loc, s)))
    }

    /// Record the live bucket in bucket 0 (best effort: it is only a hint,
    /// always a lower bound, and `locate` walks forward from it).
    pub(crate) async fn write_hint(&self, key: &EntityKey, bucket: i64) {
        if let Err(e) = self
            .run(
                &self.st.set_live,
                (bucket, &key.entity_type, &key.entity_id, 0i64),
            )
            .await
        {
            tracing::debug!(entity = %key, error = %e, "could not record the live bucket");
        }
    }

    /// Of `ids`, those stored for `key` in these buckets, with their digests.
    pub(crate) async fn ids_in(
        &self,
        key: &EntityKey,
        buckets: Vec<i64>,
        ids: &[String],
    ) -> Result<HashMap<String, Option<String>>> {
        let mut found = HashMap::new();
        for chunk in ids.chunks(IDS_PER_QUERY) {
            let rows: Vec<IdRow> = self
                .page(
                    &self.st.read_ids,
                    (&key.entity_type, &key.entity_id, &buckets, chunk),
                )
                .await?;
            found.extend(rows.into_iter().map(|r| (r.event_id, r.digest)));
        }
        Ok(found)
    }

    /// Of `ids`, those stored for `key`; keeps the entity's row for the
    /// `load` that follows.
    pub(crate) async fn known_for(
        &self,
        key: &EntityKey,
        ids: Vec<String>,
    ) -> Result<HashMap<String, Option<String>>> {
        let (s0, in0) = tokio::join!(self.read_static(key, 0), self.ids_in(key, vec![0], &ids));
        let Some(s0) = s0? else {
            self.stash(key, None);
            return Ok(HashMap::new());
        };
        let mut found = in0?;
        if s0.live == 0 && !s0.located(0).full() {
            self.stash(key, Some((s0.located(0), s0)));
            return Ok(found);
        }
        let Some((loc, row)) = self.locate(key).await? else {
            return Ok(found);
        };
        self.stash(key, Some((loc, row)));
        if loc.bucket > 0 {
            let rest: Vec<String> = ids.into_iter().filter(|i| !found.contains_key(i)).collect();
            if !rest.is_empty() {
                found.extend(self.ids_in(key, (1..=loc.bucket).collect(), &rest).await?);
            }
        }
        Ok(found)
    }

    async fn history_inner(
        &self,
        key: &EntityKey,
        after: u64,
        upto: Option<u64>,
    ) -> Result<Vec<StoredEvent>> {
        let Some((loc, _)) = self.locate(key).await? else {
            return Ok(Vec::new());
        };
        let upto = upto.unwrap_or(i64::MAX as u64).min(i64::MAX as u64) as i64;
        let after = after.min(i64::MAX as u64) as i64;
        let mut out = Vec::new();
        for bucket in 0..=loc.bucket {
            let rows: Vec<EventRow> = self
                .rows(
                    &self.st.read_events,
                    (&key.entity_type, &key.entity_id, bucket, after, upto),
                )
                .await?;
            for row in rows {
                out.push(row.into_event(key)?);
            }
        }
        Ok(out)
    }

    async fn event_ids_inner(&self, key: &EntityKey, upto: u64) -> Result<Vec<String>> {
        let Some((loc, _)) = self.locate(key).await? else {
            return Ok(Vec::new());
        };
        let upto = upto.min(i64::MAX as u64) as i64;
        let mut out = Vec::new();
        for bucket in 0..=loc.bucket {
            let rows: Vec<(String,)> = self
                .rows(
                    &self.st.read_event_ids,
                    (&key.entity_type, &key.entity_id, bucket, upto),
                )
                .await?;
            out.extend(rows.into_iter().map(|(id,)| id));
        }
        Ok(out)
    }

    /// The ids of the entities of a type, in order, each once.
    pub(crate) async fn index_ids(&self, entity_type: &str) -> Result<BTreeSet<String>> {
        let mut ids = BTreeSet::new();
        for shard in 0..INDEX_SHARDS {
            let rows: Vec<(String,)> = self.rows(&self.st.index_read, (entity_type, shard)).await?;
            ids.extend(rows.into_iter().map(|(id,)| id));
        }
        Ok(ids)
    }

    /// Every quarantine record (a full scan: used to drop a namespace).
    pub(crate) async fn all_quarantine(&self) -> Result<Vec<QuarantineRecord>> {
        let rows: Vec<QuarantineRow> = self.rows(&self.st.quarantine_read, ()).await?;
        Ok(rows.into_iter().map(QuarantineRow::into_record).collect())
    }

    async fn load_inner(&self, keys: &[EntityKey]) -> Result<HashMap<EntityKey, EntityRecord>> {
        let futs: Vec<_> = keys
            .iter()
            .map(|k| async move {
                match self.take_fresh(k) {
                    Some(row) => (k, Ok(row)),
                    None => (k, self.locate(k).await),
                }
            })
            .collect();
        let mut s = stream::iter(futs).buffer_unordered(self.concurrency);
        let mut out = HashMap::new();
        while let Some((k, r)) = s.next().await {
            let Some((loc, row)) = r? else {
                self.remember(k, None);
                continue;
            };
            self.remember(k, Some(loc));
            // A state that is not JSON is damage to report, never a
            // silent `null` that a fold would start over from.
            let state = match row.state.as_deref() {
                None => None,
                Some(s) => Some(serde_json::from_str(s).map_err(|e| {
                    StoreError::Corrupt(format!(
                        "the state of {k} is not JSON ({e}); the keyspace is damaged"
                    ))
                })?),
            };
            out.insert(
                k.clone(),
                EntityRecord {
                    key: k.clone(),
                    state,
                    position: row.position,
                    head: row.head,
                    plugin: row.plugin,
                    quarantined: row.quarantined,
                    generation: row.generation.into(),
                },
            );
        }
        Ok(out)
    }

    /// One page of dead letters after the cursor `(shard, id)`.
    async fn dead_letter_page_inner(
        &self,
        first_shard: i32,
        first_id: &str,
        limit: usize,
    ) -> Result<Vec<Paged<DeadLetter>>> {
        let mut page = Vec::new();
        for shard in first_shard.max(0)..DEAD_LETTER_SHARDS {
            if page.len() >= limit {
                break;
            }
            // "" sorts before every id: the whole next shard.
            let after_id = if shard == first_shard { first_id } else { "" };
            let rows: Vec<DeadLetterRow> = self
                .page(
                    &self.st.dead_letter_read,
                    (shard, after_id, (limit - page.len()) as i32),
                )
                .await?;
            for row in rows {
                let item = row.into_record();
                page.push(Paged {
                    cursor: encode_cursor(&(shard, &item.id)),
                    item,
                });
            }
        }
        Ok(page)
    }
}

#[async_trait]
impl EventStore for CassandraStore {
    async fn known_ids(
        &self,
        ids: &[EventIdentity],
    ) -> Result<HashMap<EventIdentity, Option<String>>> {
        let mut per: HashMap<&EntityKey, Vec<String>> = HashMap::new();
        for (k, id) in ids {
            per.entry(k).or_default().push(id.clone());
        }
        let per: Vec<(&EntityKey, Vec<String>)> = per.into_iter().collect();
        self.read("looking up event ids", || async {
            let futs: Vec<_> = per
                .iter()
                .map(|(k, ids)| async move { (*k, self.known_for(k, ids.clone()).await) })
                .collect();
            let mut s = stream::iter(futs).buffer_unordered(self.concurrency);
            // Keyed by the whole identity: an id known for one entity says
            // nothing about another entity's event with the same id.
            let mut known = HashMap::new();
            while let Some((k, r)) = s.next().await {
                for (id, digest) in r? {
                    known.insert((k.clone(), id), digest);
                }
            }
            Ok(known)
        })
        .await
    }

    async fn history(
        &self,
        key: &EntityKey,
        after: u64,
        upto: Option<u64>,
    ) -> Result<Vec<StoredEvent>> {
        self.read("reading a history", || self.history_inner(key, after, upto))
            .await
    }

    async fn event_ids(&self, key: &EntityKey, upto: u64) -> Result<Vec<String>> {
        self.read("reading event ids", || self.event_ids_inner(key, upto))
            .await
    }

    async fn entity_ids(&self, entity_type: &str) -> Result<Vec<String>> {
        let ids = self
            .read("listing entities", || self.index_ids(entity_type))
            .await?;
        Ok(ids.into_iter().collect())
    }

    async fn entity_page(
        &self,
        entity_type: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Paged<String>>> {
        let after: (i32, String) = after.map(decode_cursor).transpose()?.unwrap_or_default();
        self.read("listing entities", || {
            self.entity_page_inner(entity_type, after.clone(), limit)
        })
        .await
    }
}

#[async_trait]
impl StateStore for CassandraStore {
    async fn load(&self, keys: &[EntityKey]) -> Result<HashMap<EntityKey, EntityRecord>> {
        self.read("loading entities", || self.load_inner(keys))
            .await
    }

    async fn projection(&self, name: &str, key: &str) -> Result<Option<Value>> {
        self.read("reading a projection", || async {
            let row: Option<(Option<String>,)> =
                self.one(&self.st.projection_read, (name, key)).await?;
            Ok(row
                .and_then(|(b,)| b)
                .map(|b| serde_json::from_str(&b).unwrap_or(Value::Null)))
        })
        .await
    }

    async fn projection_page(
        &self,
        name: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Paged<(String, Value)>>> {
        let after: (i32, String) = after.map(decode_cursor).transpose()?.unwrap_or_default();
        self.read("listing a projection", || {
            self.projection_page_inner(name, after.clone(), limit)
        })
        .await
    }

    async fn dead_letter_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Paged<DeadLetter>>> {
        // The cursor is (shard, id) of the last item seen: each shard is one
        // partition clustered by id, read in order, shard after shard, so a
        // page is at most `limit` rows whatever the table holds.
        let (first_shard, first_id): (i32, String) =
            after.map(decode_cursor).transpose()?.unwrap_or_default();
        let limit = limit.min(i32::MAX as usize);
        self.read("listing dead letters", || {
            self.dead_letter_page_inner(first_shard, &first_id, limit)
        })
        .await
    }

    async fn dead_letter(&self, id: &str) -> Result<Option<DeadLetter>> {
        let shard = shard_of(id, DEAD_LETTER_SHARDS);
        self.read("reading a dead letter", || async {
            let row: Option<DeadLetterRow> =
                self.one(&self.st.dead_letter_get, (shard, id)).await?;
            Ok(row.map(DeadLetterRow::into_record))
        })
        .await
    }

    async fn remove_dead_letter(&self, id: &str) -> Result<bool> {
        let shard = shard_of(id, DEAD_LETTER_SHARDS);
        self.read("removing a dead letter", || async {
            let found: Option<(String,)> =
                self.one(&self.st.dead_letter_exists, (shard, id)).await?;
            if found.is_none() {
                return Ok(false);
            }
            self.run(&self.st.dead_letter_delete, (shard, id)).await?;
            Ok(true)
        })
        .await
    }

    async fn quarantine(&self, key: &EntityKey) -> Result<Option<QuarantineRecord>> {
        self.read("reading a quarantine record", || async {
            let row: Option<QuarantineRow> = self
                .one(&self.st.quarantine_get, (&key.entity_type, &key.entity_id))
                .await?;
            Ok(row.map(QuarantineRow::into_record))
        })
        .await
    }

    async fn quarantine_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Paged<QuarantineRecord>>> {
        // The cursor is the partition token of the last item seen (one
        // partition per entity): a range scan from it reads at most `limit`
        // rows. No key hashes to i64::MIN under Murmur3, so `> MIN` is the
        // whole table. Two entities sharing a 64-bit token across a page
        // boundary would lose the second; the odds are negligible.
        let after = after
            .map(decode_cursor::<TokenCursor>)
            .transpose()?
            .map_or(i64::MIN, |c| c.token);
        let limit = limit.min(i32::MAX as usize) as i32;
        self.read("listing quarantined entities", || async {
            let rows: Vec<QuarantinePageRow> =
                self.page(&self.st.quarantine_page, (after, limit)).await?;
            Ok(rows
                .into_iter()
                .map(|r| Paged {
                    cursor: encode_cursor(&TokenCursor {
                        token: r.cursor_token,
                    }),
                    item: r.into_record(),
                })
                .collect())
        })
        .await
    }

    async fn release(&self, key: &EntityKey) -> Result<()> {
        self.read("releasing an entity", || self.release_inner(key))
            .await
    }

    async fn adopt_projections(&self, ns: &str, archive: &str) -> Result<()> {
        self.read("adopting a generation's read model", || {
            self.adopt_projections_inner(ns, archive)
        })
        .await
    }

    async fn drop_namespace(&self, ns: &str) -> Result<()> {
        self.read("dropping a generation", || self.drop_namespace_inner(ns))
            .await
    }

    async fn snapshot_before(
        &self,
        key: &EntityKey,
        digest: &str,
        at: u64,
    ) -> Result<Option<(u64, Value)>> {
        let at = at.min(i64::MAX as u64) as i64;
        self.read("reading a snapshot", || async {
            let row: Option<SnapshotRow> = self
                .one(
                    &self.st.snapshot_read,
                    (&key.entity_type, &key.entity_id, digest, at),
                )
                .await?;
            // A snapshot that does not parse is only a lost shortcut.
            Ok(row.and_then(|r| {
                serde_json::from_str(&r.state)
                    .ok()
                    .map(|v| (r.position.max(0) as u64, v))
            }))
        })
        .await
    }

    async fn put_snapshots(
        &self,
        key: &EntityKey,
        digest: &str,
        snapshots: &[(u64, Value)],
    ) -> Result<()> {
        let futs: Vec<_> = snapshots
            .iter()
            .map(|(p, v)| {
                self.session.execute_unpaged(
                    &self.st.snapshot_insert,
                    SnapshotValues {
                        entity_type: &key.entity_type,
                        entity_id: &key.entity_id,
                        digest,
                        position: i64::try_from(*p).unwrap_or(i64::MAX),
                        state: v.to_string(),
                    },
                )
            })
            .collect();
        self.all(futs).await
    }

    async fn checkpoints(&self, source: &str) -> Result<Vec<Checkpoint>> {
        self.read("reading checkpoints", || async {
            let rows: Vec<CheckpointRow> = self.page(&self.st.checkpoint_read, (source,)).await?;
            Ok(rows
                .into_iter()
                .map(|r| Checkpoint {
                    source: source.to_string(),
                    partition: r.part,
                    offset: r.next_offset,
                })
                .collect())
        })
        .await
    }

    // A cluster has no single commit order to number records by; its
    // change stream is meant to be a Kafka topic fed from an outbox, which
    // this store does not write yet. Asked for a feed, it says so rather
    // than answer an empty one that would look like "nothing changed".
    async fn changes_after(&self, _after: u64, _limit: usize) -> Result<Vec<StoredChange>> {
        Err(no_change_feed())
    }

    async fn changes_head(&self) -> Result<u64> {
        Err(no_change_feed())
    }

    async fn prune_changes(&self, _before_ms: i64) -> Result<u64> {
        Ok(0)
    }

    fn has_outbox(&self) -> bool {
        true
    }

    async fn outbox_claim(
        &self,
        part: &OutboxPartition,
        published: &[PublishedBatch],
    ) -> Result<()> {
        self.claim_outbox(part, published).await
    }

    async fn outbox_next(&self, part: &OutboxPartition, max: usize) -> Result<Vec<OutboxBatch>> {
        self.next_from_outbox(part, max).await
    }

    async fn outbox_done(
        &self,
        part: &OutboxPartition,
        published: &[PublishedBatch],
    ) -> Result<()> {
        self.done_in_outbox(part, published).await
    }

    fn outbox_release(&self, part: &OutboxPartition) {
        self.release_outbox(part)
    }

    fn outbox_depth(&self) -> u64 {
        self.outbox_records()
    }
}

fn no_change_feed() -> StoreError {
    StoreError::Unsupported(
        "the Cassandra store keeps no change feed: change records are served by the embedded (SQLite) store only".into(),
    )
}
