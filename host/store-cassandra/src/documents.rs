//! Read-model documents and the key index that lists them.
//!
//! `projections` holds one partition per document, which only a full-table
//! scan could list; `projection_index` keeps each projection's keys in
//! [`INDEX_SHARDS`] partitions clustered by key. Every document write here
//! writes both at the same client timestamp, so an upsert and a delete of
//! one key order the same way in both tables. The index may briefly name a
//! document that is gone (a delete between the two writes, or a crash after
//! the first): a listing reads each document and skips the missing ones,
//! so the index can only hide nothing, never invent a document.

use futures::{StreamExt as _, stream};
use serde_json::Value;

use refold_store::{Paged, Result, StoreError, encode_cursor};

use crate::error::{exec_err, other, pager_err, row_err};
use crate::rows::{DocumentKeyValues, DocumentRow, DocumentValues};
use crate::store::{CassandraStore, INDEX_SHARDS, shard_of};

/// The index row that says every document written before the index
/// existed has been indexed: no projection is named "" (documents are
/// always written under a projection's name).
const BACKFILL_MARK: (&str, i32, &str) = ("", -1, "indexed");

/// Index rows written at once by the backfill.
const BACKFILL_CHUNK: usize = 256;

impl CassandraStore {
    /// Write a document (and its index row) at client timestamp `ts`.
    pub(crate) async fn put_document(
        &self,
        projection: &str,
        doc_key: &str,
        body: &str,
        ts: i64,
    ) -> Result<()> {
        let shard = shard_of(doc_key, INDEX_SHARDS);
        let (doc, index) = tokio::join!(
            self.session.execute_unpaged(
                &self.st.projection_upsert,
                DocumentValues {
                    projection,
                    doc_key,
                    body,
                    ts,
                },
            ),
            self.session
                .execute_unpaged(&self.st.doc_index_insert, (projection, shard, doc_key, ts)),
        );
        doc.map_err(exec_err)?;
        index.map_err(exec_err)?;
        Ok(())
    }

    /// Delete a document (and its index row) at client timestamp `ts`.
    pub(crate) async fn delete_document(
        &self,
        projection: &str,
        doc_key: &str,
        ts: i64,
    ) -> Result<()> {
        let shard = shard_of(doc_key, INDEX_SHARDS);
        let (doc, index) = tokio::join!(
            self.session.execute_unpaged(
                &self.st.projection_delete,
                DocumentKeyValues {
                    projection,
                    doc_key,
                    ts,
                },
            ),
            self.session
                .execute_unpaged(&self.st.doc_index_delete, (ts, projection, shard, doc_key)),
        );
        doc.map_err(exec_err)?;
        index.map_err(exec_err)?;
        Ok(())
    }

    /// One page of a projection's documents after the cursor `(shard,
    /// key)`, in index order (by shard, then key).
    pub(crate) async fn projection_page_inner(
        &self,
        name: &str,
        after: (i32, String),
        limit: usize,
    ) -> Result<Vec<Paged<(String, Value)>>> {
        let (first_shard, first_key) = after;
        let mut page = Vec::new();
        for shard in first_shard.max(0)..INDEX_SHARDS {
            let mut from = if shard == first_shard {
                first_key.clone()
            } else {
                String::new()
            };
            // Index rows of deleted documents are skipped, so a shard is
            // read until the page is full or the shard ends.
            while page.len() < limit {
                let want = limit - page.len();
                let keys: Vec<(String,)> = self
                    .page(&self.st.doc_index_page, (name, shard, &from, want as i32))
                    .await?;
                let Some((last,)) = keys.last() else { break };
                from = last.clone();
                let n = keys.len();
                let bodies = self.documents(name, keys.into_iter().map(|(k,)| k)).await?;
                for (key, body) in bodies {
                    page.push(Paged {
                        cursor: encode_cursor(&(shard, &key)),
                        item: (key, body),
                    });
                }
                if n < want {
                    break;
                }
            }
            if page.len() >= limit {
                break;
            }
        }
        Ok(page)
    }

    /// The documents of these keys that exist, in the order given.
    async fn documents(
        &self,
        name: &str,
        keys: impl Iterator<Item = String>,
    ) -> Result<Vec<(String, Value)>> {
        let futs: Vec<_> = keys
            .map(|k| async move {
                let row: Option<(Option<String>,)> =
                    self.one(&self.st.projection_read, (name, &k)).await?;
                Ok::<_, StoreError>((k, row.and_then(|(b,)| b)))
            })
            .collect();
        // `buffered`, not `buffer_unordered`: the page keeps index order.
        let mut s = stream::iter(futs).buffered(self.concurrency);
        let mut found = Vec::new();
        while let Some(r) = s.next().await {
            if let (k, Some(b)) = r? {
                found.push((k, serde_json::from_str(&b).unwrap_or(Value::Null)));
            }
        }
        Ok(found)
    }

    /// One page of the ids of a type's entities after the cursor `(shard,
    /// id)`, by shard, then id.
    pub(crate) async fn entity_page_inner(
        &self,
        entity_type: &str,
        after: (i32, String),
        limit: usize,
    ) -> Result<Vec<Paged<String>>> {
        let (first_shard, first_id) = after;
        let mut page = Vec::new();
        for shard in first_shard.max(0)..INDEX_SHARDS {
            if page.len() >= limit {
                break;
            }
            let from = if shard == first_shard {
                first_id.as_str()
            } else {
                ""
            };
            let rows: Vec<(String,)> = self
                .page(
                    &self.st.index_page,
                    (entity_type, shard, from, (limit - page.len()) as i32),
                )
                .await?;
            for (id,) in rows {
                page.push(Paged {
                    cursor: encode_cursor(&(shard, &id)),
                    item: id,
                });
            }
        }
        Ok(page)
    }

    /// Index the documents written before `projection_index` existed (a
    /// keyspace of an older release), once: the mark row says it is done,
    /// so a host killed part-way does it again at its next start.
    pub(crate) async fn backfill_document_index(&self) -> Result<usize> {
        let (p, shard, k) = BACKFILL_MARK;
        let done: Option<(String,)> = self.one(&self.st.doc_index_get, (p, shard, k)).await?;
        if done.is_some() {
            return Ok(0);
        }
        // Streamed page by page and written in chunks: the table may be
        // large, and memory stays at one page and one chunk.
        let ts = self.next_ts();
        let pager = self
            .session
            .execute_iter(self.st.projection_scan.clone(), ())
            .await
            .map_err(pager_err)?;
        let mut rows = pager.rows_stream::<DocumentRow>().map_err(other)?;
        let mut n = 0;
        let mut chunk: Vec<DocumentRow> = Vec::with_capacity(BACKFILL_CHUNK);
        loop {
            let row = rows.next().await.transpose().map_err(row_err)?;
            let end = row.is_none();
            if let Some(d) = row.filter(|d| d.body.is_some()) {
                chunk.push(d);
            }
            if chunk.len() >= BACKFILL_CHUNK || (end && !chunk.is_empty()) {
                let futs: Vec<_> = chunk
                    .iter()
                    .map(|d| {
                        self.session.execute_unpaged(
                            &self.st.doc_index_insert,
                            (
                                &d.projection,
                                shard_of(&d.doc_key, INDEX_SHARDS),
                                &d.doc_key,
                                ts,
                            ),
                        )
                    })
                    .collect();
                self.all(futs).await?;
                n += chunk.len();
                chunk.clear();
            }
            if end {
                break;
            }
        }
        self.session
            .execute_unpaged(&self.st.doc_index_insert, (p, shard, k, ts))
            .await
            .map_err(exec_err)?;
        Ok(n)
    }
}
