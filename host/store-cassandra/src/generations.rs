//! Generations as namespaces: a rebuild folds into entity type `ns` and
//! projections `name@ns`; adopting moves those documents under `name`
//! (keeping each live one it replaces under `name@archive`), dropping
//! deletes every entity, index row, quarantine record and document of `ns`.

use futures::{StreamExt as _, stream};

use refold_store::{EntityKey, Result};

use crate::rows::DocumentRow;
use crate::store::{CassandraStore, INDEX_SHARDS};

impl CassandraStore {
    async fn drop_index(&self, entity_type: &str) -> Result<()> {
        let futs: Vec<_> = (0..INDEX_SHARDS)
            .map(|shard| {
                self.session
                    .execute_unpaged(&self.st.index_drop, (entity_type, shard))
            })
            .collect();
        self.all(futs).await
    }

    /// Delete every bucket of one entity (a namespace's state).
    async fn drop_entity(&self, key: &EntityKey) -> Result<()> {
        let Some((loc, _)) = self.locate(key).await? else {
            return Ok(());
        };
        let futs: Vec<_> = (0..=loc.bucket)
            .map(|b| {
                self.session.execute_unpaged(
                    &self.st.delete_bucket,
                    (&key.entity_type, &key.entity_id, b),
                )
            })
            .collect();
        self.all(futs).await
    }

    /// Every read-model document whose projection name ends with `@ns`.
    async fn namespace_documents(&self, ns: &str) -> Result<Vec<DocumentRow>> {
        let suffix = format!("@{ns}");
        let rows: Vec<DocumentRow> = self.rows(&self.st.projection_scan, ()).await?;
        Ok(rows
            .into_iter()
            .filter(|d| d.projection.ends_with(&suffix))
            .collect())
    }

    /// Delete documents at timestamp `ts`.
    async fn delete_documents(&self, docs: &[DocumentRow], ts: i64) -> Result<()> {
        let futs: Vec<_> = docs
            .iter()
            .map(|d| self.delete_document(&d.projection, &d.doc_key, ts))
            .collect();
        self.each(futs).await
    }

    pub(crate) async fn drop_namespace_inner(&self, ns: &str) -> Result<()> {
        self.forget_locations();
        let ts = self.next_ts();
        let keys: Vec<EntityKey> = self
            .index_ids(ns)
            .await?
            .into_iter()
            .map(|i| EntityKey::new(ns, i))
            .collect();
        let futs: Vec<_> = keys.iter().map(|k| self.drop_entity(k)).collect();
        let mut s = stream::iter(futs).buffer_unordered(self.concurrency);
        while let Some(r) = s.next().await {
            r?;
        }
        drop(s);
        self.drop_index(ns).await?;
        for q in self.all_quarantine().await? {
            if q.key.entity_type == ns {
                self.run(
                    &self.st.quarantine_release,
                    (ts, &q.key.entity_type, &q.key.entity_id),
                )
                .await?;
            }
        }
        let docs = self.namespace_documents(ns).await?;
        self.delete_documents(&docs, ts).await?;
        self.forget_locations();
        Ok(())
    }

    /// Move the documents under `name@ns` to `name`, first keeping each
    /// live document they replace under `name@archive`.
    pub(crate) async fn adopt_projections_inner(&self, ns: &str, archive: &str) -> Result<()> {
        let (ts, ts2) = (self.next_ts(), self.next_ts());
        let kept = self.namespace_documents(archive).await?;
        self.delete_documents(&kept, ts).await?;
        let docs = self.namespace_documents(ns).await?;
        let suffix_len = ns.len() + 1;
        let futs: Vec<_> = docs
            .iter()
            .map(|d| async move {
                let live = &d.projection[..d.projection.len() - suffix_len];
                let old: Option<(Option<String>,)> = self
                    .one(&self.st.projection_read, (live, &d.doc_key))
                    .await?;
                if let Some((Some(old),)) = old {
                    let keep = format!("{live}@{archive}");
                    self.put_document(&keep, &d.doc_key, &old, ts).await?;
                }
                if let Some(b) = &d.body {
                    self.put_document(live, &d.doc_key, b, ts2).await?;
                }
                self.delete_document(&d.projection, &d.doc_key, ts2).await
            })
            .collect();
        self.each(futs).await
    }
}
