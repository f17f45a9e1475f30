//! [`PluginStore`]: uploaded versions and their components (in chunks), the
//! active version of each entity type (a conditional write fenced on the
//! activation it follows) and rebuild records (fenced on the heartbeat their
//! writer last saw).

use std::collections::BTreeMap;

use async_trait::async_trait;

use refold_store::{Activation, PluginStore, PluginVersion, RebuildRecord, Result, StoreError};

use crate::error::applied;
use crate::rows::{
    ActivationRow, ActivationUpdateValues, ActivationValues, BlobRow, BlobValues, PluginVersionRow,
    PluginVersionValues, RebuildRow, RebuildUpdateValues, RebuildValues,
};
use crate::store::CassandraStore;

/// Largest chunk of a stored component, in bytes.
const BLOB_CHUNK: usize = 512 << 10;

#[async_trait]
impl PluginStore for CassandraStore {
    async fn put_plugin(&self, v: &PluginVersion, bytes: &[u8]) -> Result<()> {
        let seq = self.next_ts();
        self.read("storing a plugin", || async {
            // The bytes first: a listed version always has them.
            let futs: Vec<_> = bytes
                .chunks(BLOB_CHUNK)
                .enumerate()
                .map(|(i, c)| {
                    self.session.execute_unpaged(
                        &self.st.plugin_blob_insert,
                        BlobValues {
                            digest: &v.digest,
                            chunk: i as i32,
                            bytes: c,
                        },
                    )
                })
                .collect();
            self.all(futs).await?;
            self.run(
                &self.st.plugin_version_insert,
                PluginVersionValues::of(v, seq),
            )
            .await?;
            Ok(())
        })
        .await
    }

    async fn plugin_versions(&self, entity_type: &str) -> Result<Vec<PluginVersion>> {
        self.read("listing plugin versions", || async {
            let rows: Vec<PluginVersionRow> = self
                .rows(&self.st.plugin_versions_read, (entity_type,))
                .await?;
            let mut out: Vec<(i64, PluginVersion)> = rows
                .into_iter()
                .map(PluginVersionRow::into_record)
                .collect();
            out.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.digest.cmp(&b.1.digest)));
            Ok(out.into_iter().map(|(_, v)| v).collect())
        })
        .await
    }

    async fn plugin_bytes(&self, digest: &str) -> Result<Option<Vec<u8>>> {
        self.read("reading a plugin", || async {
            let rows: Vec<BlobRow> = self.rows(&self.st.plugin_blob_read, (digest,)).await?;
            if rows.is_empty() {
                return Ok(None);
            }
            let chunks: BTreeMap<i32, Vec<u8>> = rows
                .into_iter()
                .map(|r| (r.chunk, r.bytes.unwrap_or_default()))
                .collect();
            Ok(Some(chunks.into_values().flatten().collect()))
        })
        .await
    }

    async fn activation(&self, entity_type: &str) -> Result<Option<Activation>> {
        self.read("reading an activation", || async {
            let row: Option<ActivationRow> =
                self.one(&self.st.activation_get, (entity_type,)).await?;
            row.map(ActivationRow::into_record).transpose()
        })
        .await
    }

    async fn activations(&self) -> Result<Vec<Activation>> {
        self.read("reading activations", || async {
            let rows: Vec<ActivationRow> = self.rows(&self.st.activations_read, ()).await?;
            let mut out = rows
                .into_iter()
                .map(ActivationRow::into_record)
                .collect::<Result<Vec<_>>>()?;
            out.sort_by(|a, b| a.entity_type.cmp(&b.entity_type));
            Ok(out)
        })
        .await
    }

    async fn put_activation(&self, a: &Activation) -> Result<()> {
        // Not retried: a conditional write that timed out has an unknown
        // outcome, which the caller sees as an error and can check.
        let r = if a.seq <= 1 {
            self.run(&self.st.activation_insert, ActivationValues::of(a))
                .await?
        } else {
            self.run(
                &self.st.activation_update,
                ActivationUpdateValues {
                    activation: ActivationValues::of(a),
                    expected_seq: a.seq - 1,
                },
            )
            .await?
        };
        if !applied(r)? {
            return Err(StoreError::Fenced(format!(
                "another activation of {} was recorded meanwhile",
                a.entity_type
            )));
        }
        // After the conditional write won: the history never holds an
        // activation that lost. A failure here leaves a gap in it, which is
        // logged, not the activation's failure: it is recorded.
        let kept =
            refold_store::plugins::history_entry(a).map_err(|e| StoreError::Other(e.into()))?;
        if let Err(e) = self
            .run(&self.st.history_insert, (&a.entity_type, a.seq, kept))
            .await
        {
            tracing::warn!(entity_type = %a.entity_type, seq = a.seq, error = %e,
                "keeping an activation in its history failed; the history has a gap there");
        }
        Ok(())
    }

    async fn activation_history(
        &self,
        entity_type: &str,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<Activation>> {
        let current = self.activation(entity_type).await?;
        let n = limit.clamp(1, i32::MAX as usize) as i32;
        let kept: Vec<(String,)> = self
            .read("reading an activation history", || async {
                self.page(
                    &self.st.history_page,
                    (entity_type, before.unwrap_or(i64::MAX), n),
                )
                .await
            })
            .await?;
        let kept: Vec<String> = kept.into_iter().map(|(j,)| j).collect();
        refold_store::plugins::merge_history(&kept, current, before, limit)
    }

    async fn put_rebuild(
        &self,
        r: &RebuildRecord,
        expected_heartbeat: Option<i64>,
    ) -> Result<bool> {
        // Not retried, like the activation: a conditional write that timed
        // out has an unknown outcome; the next write's condition sorts it out.
        let res = match expected_heartbeat {
            None => {
                self.run(&self.st.rebuild_insert, RebuildValues::of(r))
                    .await?
            }
            Some(h) => {
                self.run(
                    &self.st.rebuild_update,
                    RebuildUpdateValues {
                        rebuild: RebuildValues::of(r),
                        expected_heartbeat: h,
                    },
                )
                .await?
            }
        };
        applied(res)
    }

    async fn rebuilds(&self) -> Result<Vec<RebuildRecord>> {
        self.read("reading rebuilds", || async {
            let rows: Vec<RebuildRow> = self.rows(&self.st.rebuilds_read, ()).await?;
            let mut out = rows
                .into_iter()
                .map(RebuildRow::into_record)
                .collect::<Result<Vec<_>>>()?;
            out.sort_by(|a, b| (&a.started_at, &a.id).cmp(&(&b.started_at, &b.id)));
            Ok(out)
        })
        .await
    }
}
