//! The change outbox's side of a commit and of the publisher: a commit's
//! records planned and written before its entity batches and settled after
//! them, and a claimed partition's batches handed out, from memory or, in
//! doubt, from the table checked against the change rows (`outbox.rs`
//! holds the state and the reasons).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

use futures::{StreamExt as _, stream};
use scylla::statement::batch::{Batch, BatchType};

use refold_store::{
    Commit, EntityKey, OutboxBatch, OutboxPartition, PendingChange, PublishedBatch, Result,
    StoreError,
};

use crate::error::{other, pager_err, row_err};
use crate::outbox::{DOUBT_BUCKETS, OutboxState, Part, Planned, READY_MAX, SCAN_ROWS, WRITE_BYTES};
use crate::rows::{OutboxRow, OutboxValues};
use crate::store::CassandraStore;

/// Whether a record in doubt is published.
enum Verdict {
    Publish,
    Drop,
    Wait,
}

impl CassandraStore {
    /// The outbox rows of `commit`, or `None` when it makes no record.
    pub(crate) fn plan_outbox(&self, commit: &Commit) -> Result<Option<Planned>> {
        if commit.changes.is_empty() {
            return Ok(None);
        }
        // Made and marked under way under one lock with a scan's start
        // (`scan`): a scan skips every batch of this process, those under
        // way or in memory when it starts and those made after.
        let batch = {
            let mut o = self.outbox_lock();
            let id = format!("{:016x}{:016x}", self.next_ts(), rand::random::<u64>());
            o.inflight.insert(id.clone());
            id
        };
        let updates: HashMap<&EntityKey, u64> = commit
            .entities
            .iter()
            .map(|u| (&u.key, u.expected_head))
            .collect();
        // The partition of each entity's last event in the commit.
        let mut origin: HashMap<&EntityKey, (u64, &refold_store::Origin)> = HashMap::new();
        for e in &commit.events {
            if let Some(o) = &e.origin {
                let slot = origin.entry(&e.key).or_insert((e.position, o));
                if e.position >= slot.0 {
                    *slot = (e.position, o);
                }
            }
        }
        let mut rows: BTreeMap<OutboxPartition, Vec<OutboxValues>> = BTreeMap::new();
        let mut records: BTreeMap<OutboxPartition, Vec<PendingChange>> = BTreeMap::new();
        let mut change_rows = HashMap::new();
        for c in &commit.changes {
            let part = match origin.get(&c.key) {
                Some((_, o)) => OutboxPartition {
                    source: o.source.clone(),
                    partition: o.partition,
                },
                None => OutboxPartition::control(),
            };
            let (id, ce) = c.id_and_cloudevent();
            let event = serde_json::to_string(&ce).map_err(other)?;
            let last = i64::try_from(c.last_position).unwrap_or(i64::MAX);
            let expected = updates.get(&c.key).copied();
            if expected.is_some() {
                change_rows.insert(c.key.clone(), (batch.clone(), last));
            }
            records
                .entry(part.clone())
                .or_default()
                .push(PendingChange {
                    id: id.clone(),
                    key: c.key.clone(),
                    event: event.clone(),
                });
            rows.entry(part.clone()).or_default().push(OutboxValues {
                source: part.source,
                part: part.partition,
                batch_id: batch.clone(),
                entity_type: c.key.entity_type.clone(),
                entity_id: c.key.entity_id.clone(),
                change_id: id,
                last_position: last,
                expected_head: expected
                    .map(|h| i64::try_from(h).unwrap_or(i64::MAX))
                    .unwrap_or(-1),
                // Without an entity batch in the commit (a correction)
                // nothing can fail to apply: the record is certain.
                certain: expected.is_none(),
                event,
            });
        }
        Ok(Some(Planned {
            batch,
            rows,
            records,
            change_rows,
        }))
    }

    /// Write the records of a commit to the outbox, before its entity
    /// batches: from here on, a crash leaves them for a publisher to check.
    pub(crate) async fn write_outbox(&self, p: &Planned) -> Result<()> {
        let mut chunks: Vec<&[OutboxValues]> = Vec::new();
        for rows in p.rows.values() {
            let (mut start, mut bytes) = (0, 0);
            for (i, r) in rows.iter().enumerate() {
                if i > start && bytes + r.event.len() > WRITE_BYTES {
                    chunks.push(&rows[start..i]);
                    (start, bytes) = (i, 0);
                }
                bytes += r.event.len();
            }
            chunks.push(&rows[start..]);
        }
        let futs: Vec<_> = chunks
            .into_iter()
            .map(|rows| {
                let mut batch = Batch::new(BatchType::Unlogged);
                for _ in rows {
                    batch.append_statement(self.st.outbox_insert.clone());
                }
                async move { self.session.batch(&batch, rows).await }
            })
            .collect();
        self.all(futs).await
    }

    /// A commit with records returned: hand its batch to the publisher of
    /// each partition claimed here if it applied, or leave it to the table
    /// (in doubt) if it failed part-way.
    pub(crate) fn settle_outbox(&self, p: Planned, applied: bool) {
        let mut o = self.outbox_lock();
        o.inflight.remove(&p.batch);
        for (part, records) in p.records {
            let Some(st) = o.parts.get_mut(&part) else {
                continue;
            };
            if !applied || st.ready_records + records.len() > READY_MAX {
                st.ready.clear();
                st.ready_records = 0;
                st.doubt = true;
                continue;
            }
            st.ready_records += records.len();
            st.ready.push_back(OutboxBatch {
                id: p.batch.clone(),
                whole: true,
                records,
            });
        }
    }

    fn outbox_lock(&self) -> std::sync::MutexGuard<'_, OutboxState> {
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) async fn claim_outbox(
        &self,
        part: &OutboxPartition,
        published: &[PublishedBatch],
    ) -> Result<()> {
        self.delete_published(part, published).await?;
        self.outbox_lock().parts.insert(
            part.clone(),
            Part {
                doubt: true,
                ..Part::default()
            },
        );
        Ok(())
    }

    pub(crate) fn release_outbox(&self, part: &OutboxPartition) {
        self.outbox_lock().parts.remove(part);
    }

    pub(crate) fn outbox_records(&self) -> u64 {
        self.outbox_lock()
            .parts
            .values()
            .map(|p| p.ready_records as u64)
            .sum()
    }

    pub(crate) async fn next_from_outbox(
        &self,
        part: &OutboxPartition,
        max: usize,
    ) -> Result<Vec<OutboxBatch>> {
        let due = {
            let o = self.outbox_lock();
            let st = o.parts.get(part).ok_or_else(|| {
                StoreError::Other(anyhow::anyhow!(
                    "change outbox partition {} is not claimed here",
                    part.name()
                ))
            })?;
            st.read_due()
        };
        if let Some(from) = due {
            let batches = self.scan(part, from.as_deref()).await?;
            if !batches.is_empty() {
                return Ok(batches);
            }
        }
        let mut o = self.outbox_lock();
        let Some(st) = o.parts.get_mut(part) else {
            return Ok(Vec::new());
        };
        if st.doubt {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        let mut n = 0;
        for b in &st.ready {
            if n > 0 && n + b.records.len() > max {
                break;
            }
            n += b.records.len();
            out.push(b.clone());
        }
        Ok(out)
    }

    pub(crate) async fn done_in_outbox(
        &self,
        part: &OutboxPartition,
        published: &[PublishedBatch],
    ) -> Result<()> {
        self.delete_published(part, published).await?;
        let mut o = self.outbox_lock();
        if let Some(st) = o.parts.get_mut(part) {
            let ids: HashSet<&str> = published.iter().map(|p| p.id.as_str()).collect();
            while st
                .ready
                .front()
                .is_some_and(|b| ids.contains(b.id.as_str()))
            {
                if let Some(b) = st.ready.pop_front() {
                    st.ready_records -= b.records.len().min(st.ready_records);
                }
            }
        }
        Ok(())
    }

    async fn delete_published(
        &self,
        part: &OutboxPartition,
        published: &[PublishedBatch],
    ) -> Result<()> {
        let (mut whole, mut rows) = (Vec::new(), Vec::new());
        for p in published {
            match &p.keys {
                None => whole.push(self.session.execute_unpaged(
                    &self.st.outbox_delete_batch,
                    (&part.source, part.partition, &p.id),
                )),
                Some(keys) => {
                    for k in keys {
                        rows.push(self.session.execute_unpaged(
                            &self.st.outbox_delete_row,
                            (
                                &part.source,
                                part.partition,
                                &p.id,
                                &k.entity_type,
                                &k.entity_id,
                            ),
                        ));
                    }
                }
            }
        }
        let (a, b) = tokio::join!(self.all(whole), self.all(rows));
        a.and(b)
    }

    /// Read a partition from the table (all of it, or from a sweep's
    /// `after`): every batch neither under way here nor held in memory,
    /// each record checked against its entity, up to `SCAN_ROWS` of them
    /// per call. Whatever it finds was not committed here and is judged in
    /// doubt.
    async fn scan(&self, part: &OutboxPartition, after: Option<&str>) -> Result<Vec<OutboxBatch>> {
        let (skip, start) = {
            let o = self.outbox_lock();
            let mut s: HashSet<String> = o.inflight.iter().cloned().collect();
            if let Some(st) = o.parts.get(part) {
                s.extend(st.ready.iter().map(|b| b.id.clone()));
            }
            (s, self.next_ts())
        };
        // A batch of this process made after `start` is not in `skip` but
        // comes from memory (or is in doubt by its own failure): read from
        // the table too, it would be published twice. Another process's
        // batch stamped after `start` by its clock is read by a later sweep.
        let skipped = |id: &str| {
            skip.contains(id)
                || id
                    .get(..16)
                    .and_then(|t| i64::from_str_radix(t, 16).ok())
                    .is_some_and(|t| t >= start)
        };
        // Paged past the rows of the skipped batches: were they counted
        // against the limit, a partition whose memory holds more rows than
        // one scan takes would never be read to its end, stay in doubt, and
        // hold back what memory holds, for good.
        let started = (Instant::now(), start);
        let pager = match after {
            None => {
                self.session
                    .execute_iter(self.st.outbox_read.clone(), (&part.source, part.partition))
                    .await
            }
            Some(after) => {
                self.session
                    .execute_iter(
                        self.st.outbox_read_after.clone(),
                        (&part.source, part.partition, after),
                    )
                    .await
            }
        }
        .map_err(pager_err)?;
        let mut stream = pager.rows_stream::<OutboxRow>().map_err(other)?;
        let mut rows: Vec<OutboxRow> = Vec::new();
        let mut complete = true;
        while let Some(r) = stream.next().await {
            let r = r.map_err(row_err)?;
            if skipped(&r.batch_id) {
                continue;
            }
            if rows.len() >= SCAN_ROWS {
                complete = false;
                break;
            }
            rows.push(r);
        }
        let futs: Vec<_> = rows.iter().map(|r| self.verdict(r)).collect();
        let verdicts: Vec<Result<Verdict>> = stream::iter(futs)
            .buffered(self.concurrency.min(64))
            .collect()
            .await;
        let mut drop_rows = Vec::new();
        let mut waiting = false;
        let mut batches: Vec<OutboxBatch> = Vec::new();
        let mut whole: HashMap<String, bool> = HashMap::new();
        for (r, v) in rows.into_iter().zip(verdicts) {
            match v? {
                Verdict::Publish => {
                    whole.entry(r.batch_id.clone()).or_insert(true);
                    let batch = r.batch_id.clone();
                    let rec = PendingChange {
                        id: r.change_id.clone().unwrap_or_default(),
                        key: EntityKey::new(r.entity_type.clone(), r.entity_id.clone()),
                        event: match r.event.clone() {
                            Some(v) => v,
                            None => {
                                tracing::warn!(batch = %r.batch_id, entity = %r.entity_id, "dropping an unreadable outbox row");
                                drop_rows.push(r);
                                continue;
                            }
                        },
                    };
                    match batches.last_mut() {
                        Some(b) if b.id == batch => b.records.push(rec),
                        _ => batches.push(OutboxBatch {
                            id: batch,
                            whole: true,
                            records: vec![rec],
                        }),
                    }
                }
                Verdict::Drop => {
                    whole.insert(r.batch_id.clone(), false);
                    drop_rows.push(r);
                }
                Verdict::Wait => {
                    whole.insert(r.batch_id.clone(), false);
                    waiting = true;
                }
            }
        }
        let futs: Vec<_> = drop_rows
            .iter()
            .map(|r| {
                self.session.execute_unpaged(
                    &self.st.outbox_delete_row,
                    (
                        &part.source,
                        part.partition,
                        &r.batch_id,
                        &r.entity_type,
                        &r.entity_id,
                    ),
                )
            })
            .collect();
        if !futs.is_empty() {
            tracing::info!(partition = %part.name(), records = futs.len(), "dropped outbox records of entity batches that never applied");
        }
        self.all(futs).await?;
        for b in &mut batches {
            b.whole = whole.get(&b.id).copied().unwrap_or(true);
        }
        let mut o = self.outbox_lock();
        if let Some(st) = o.parts.get_mut(part) {
            // Records left waiting do not hold the partition back: they
            // are looked at again every `RESCAN_AFTER` (their entity
            // batches are either under way elsewhere, a previous holder's,
            // or will be fenced by the commit that runs them again).
            st.waiting_since = waiting.then(Instant::now);
            st.read_at = Some(started);
            if !complete {
                // A sweep that did not reach the end hands over to reads
                // of the whole partition.
                st.doubt = true;
            } else if batches.is_empty() && after.is_none() {
                st.doubt = false;
            }
        }
        Ok(batches)
    }

    /// Whether the entity batch of an outbox record applied.
    async fn verdict(&self, r: &OutboxRow) -> Result<Verdict> {
        if r.certain.unwrap_or(false) {
            return Ok(Verdict::Publish);
        }
        let (Some(_), Some(last), Some(expected)) =
            (r.change_id.as_deref(), r.last_position, r.expected_head)
        else {
            return Ok(Verdict::Drop);
        };
        let key = EntityKey::new(r.entity_type.clone(), r.entity_id.clone());
        let Some((loc, st)) = self.locate(&key).await? else {
            // Not even the entity exists: its first batch has not applied
            // (yet), unless it was never meant to.
            return Ok(if expected == 0 {
                Verdict::Wait
            } else {
                Verdict::Drop
            });
        };
        let buckets: Vec<i64> = ((loc.bucket - DOUBT_BUCKETS).max(0)..=loc.bucket).collect();
        let found: Vec<(Option<String>,)> = self
            .rows(
                &self.st.read_changes,
                (&key.entity_type, &key.entity_id, buckets, last),
            )
            .await?;
        if found
            .iter()
            .any(|(c,)| c.as_deref() == Some(r.batch_id.as_str()))
        {
            return Ok(Verdict::Publish);
        }
        let head = i64::try_from(loc.head).unwrap_or(i64::MAX);
        let position = i64::try_from(st.position).unwrap_or(i64::MAX);
        // The batch was fenced on `expected`: once the head moved off it
        // without the change row, that batch can never apply.
        Ok(if head != expected || position >= last {
            Verdict::Drop
        } else {
            Verdict::Wait
        })
    }
}
