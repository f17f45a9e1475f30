//! Every statement the store runs, prepared once per session, each with its
//! CQL. A statement with more than a key's worth of values names its bind
//! markers (`:name`) and is bound by the struct of `rows.rs` named in its
//! doc; the results of the wider reads are read by name into the row struct
//! named there too. Statements over a key only keep `?` markers and a tuple.

use scylla::client::session::Session;
use scylla::errors::PrepareError;
use scylla::statement::prepared::PreparedStatement;

/// The prepared statements of one keyspace.
pub(crate) struct Statements {
    /// Read into [`crate::rows::StaticColumns`].
    pub(crate) read_static: PreparedStatement,
    /// Read into [`crate::rows::IdRow`].
    pub(crate) read_ids: PreparedStatement,
    /// Read into [`crate::rows::EventRow`].
    pub(crate) read_events: PreparedStatement,
    /// The ids alone of the rows `read_events` reads.
    pub(crate) read_event_ids: PreparedStatement,
    /// Bound by [`crate::rows::EventValues`].
    pub(crate) insert_event: PreparedStatement,
    /// Bound by [`crate::rows::IdValues`]. Conditional: an id the live
    /// bucket holds already fails its entity's batch.
    pub(crate) insert_id: PreparedStatement,
    /// Bound by [`crate::rows::AdvanceValues`].
    pub(crate) advance: PreparedStatement,
    /// Bound by [`crate::rows::OpenBucketValues`].
    pub(crate) open_bucket: PreparedStatement,
    pub(crate) set_live: PreparedStatement,
    pub(crate) release: PreparedStatement,
    /// Bound by [`crate::rows::PutStateValues`].
    pub(crate) put_state: PreparedStatement,
    pub(crate) delete_bucket: PreparedStatement,
    pub(crate) index_insert: PreparedStatement,
    pub(crate) index_read: PreparedStatement,
    pub(crate) index_drop: PreparedStatement,
    pub(crate) index_page: PreparedStatement,
    pub(crate) doc_index_insert: PreparedStatement,
    pub(crate) doc_index_delete: PreparedStatement,
    pub(crate) doc_index_page: PreparedStatement,
    pub(crate) doc_index_get: PreparedStatement,
    /// Bound by [`crate::rows::DocumentValues`].
    pub(crate) projection_upsert: PreparedStatement,
    /// Bound by [`crate::rows::DocumentKeyValues`].
    pub(crate) projection_delete: PreparedStatement,
    pub(crate) projection_read: PreparedStatement,
    /// Read into [`crate::rows::DocumentRow`].
    pub(crate) projection_scan: PreparedStatement,
    /// Bound by [`crate::rows::DeadLetterValues`].
    pub(crate) dead_letter_insert: PreparedStatement,
    /// Read into [`crate::rows::DeadLetterRow`].
    pub(crate) dead_letter_read: PreparedStatement,
    /// Read into [`crate::rows::DeadLetterRow`].
    pub(crate) dead_letter_get: PreparedStatement,
    pub(crate) dead_letter_exists: PreparedStatement,
    pub(crate) dead_letter_delete: PreparedStatement,
    /// Bound by [`crate::rows::QuarantineValues`].
    pub(crate) quarantine_insert: PreparedStatement,
    /// Read into [`crate::rows::QuarantineRow`].
    pub(crate) quarantine_read: PreparedStatement,
    /// Read into [`crate::rows::QuarantineRow`].
    pub(crate) quarantine_get: PreparedStatement,
    /// Read into [`crate::rows::QuarantinePageRow`].
    pub(crate) quarantine_page: PreparedStatement,
    pub(crate) quarantine_delete: PreparedStatement,
    pub(crate) quarantine_release: PreparedStatement,
    /// Bound by [`crate::rows::CheckpointValues`].
    pub(crate) checkpoint_upsert: PreparedStatement,
    /// Read into [`crate::rows::CheckpointRow`].
    pub(crate) checkpoint_read: PreparedStatement,
    /// Read into [`crate::rows::SnapshotRow`].
    pub(crate) snapshot_read: PreparedStatement,
    /// Bound by [`crate::rows::SnapshotValues`].
    pub(crate) snapshot_insert: PreparedStatement,
    /// Bound by [`crate::rows::IntentValues`].
    pub(crate) intent_insert: PreparedStatement,
    pub(crate) intent_delete: PreparedStatement,
    /// Read into [`crate::rows::IntentRow`].
    pub(crate) intent_read: PreparedStatement,
    /// Bound by [`crate::rows::PluginVersionValues`].
    pub(crate) plugin_version_insert: PreparedStatement,
    /// Bound by [`crate::rows::ChangeRowValues`]: in an entity's batch,
    /// the outbox id of the commit whose record that batch makes.
    pub(crate) insert_change: PreparedStatement,
    /// The outbox ids of the change rows at one position of some buckets
    /// of an entity.
    pub(crate) read_changes: PreparedStatement,
    /// Bound by [`crate::rows::OutboxValues`].
    pub(crate) outbox_insert: PreparedStatement,
    /// Read into [`crate::rows::OutboxRow`].
    pub(crate) outbox_read: PreparedStatement,
    /// `outbox_read` past a batch id (a sweep's window).
    pub(crate) outbox_read_after: PreparedStatement,
    pub(crate) outbox_delete_batch: PreparedStatement,
    pub(crate) outbox_delete_row: PreparedStatement,
    /// Read into [`crate::rows::PluginVersionRow`].
    pub(crate) plugin_versions_read: PreparedStatement,
    /// Bound by [`crate::rows::BlobValues`].
    pub(crate) plugin_blob_insert: PreparedStatement,
    /// Read into [`crate::rows::BlobRow`].
    pub(crate) plugin_blob_read: PreparedStatement,
    /// Bound by [`crate::rows::ActivationValues`].
    pub(crate) activation_insert: PreparedStatement,
    /// Bound by [`crate::rows::ActivationUpdateValues`].
    pub(crate) activation_update: PreparedStatement,
    /// Read into [`crate::rows::ActivationRow`].
    pub(crate) activations_read: PreparedStatement,
    /// Read into [`crate::rows::ActivationRow`].
    pub(crate) activation_get: PreparedStatement,
    /// `activation_history`: keep one activation.
    pub(crate) history_insert: PreparedStatement,
    /// `activation_history`: a page, newest first, below a `seq`.
    pub(crate) history_page: PreparedStatement,
    /// Bound by [`crate::rows::RebuildValues`].
    pub(crate) rebuild_insert: PreparedStatement,
    /// Bound by [`crate::rows::RebuildUpdateValues`].
    pub(crate) rebuild_update: PreparedStatement,
    /// Read into [`crate::rows::RebuildRow`].
    pub(crate) rebuilds_read: PreparedStatement,
}

impl Statements {
    /// Prepare every statement in keyspace `ks`.
    pub(crate) async fn prepare(session: &Session, ks: &str) -> Result<Self, PrepareError> {
        let p = |q: &str| {
            let q = q.replace("{ks}", ks);
            async move {
                let mut s = session.prepare(q).await?;
                s.set_is_idempotent(true);
                Ok::<_, PrepareError>(s)
            }
        };
        let mut st = Statements {
            read_static: p("SELECT base, cap, head, state, state_position, plugin_name, plugin_version, plugin_digest, quarantined, live, generation
                            FROM {ks}.entity_log WHERE entity_type = ? AND entity_id = ? AND bucket = ? LIMIT 1").await?,
            read_ids: p("SELECT event_id, digest FROM {ks}.entity_log
                         WHERE entity_type = ? AND entity_id = ? AND bucket IN ? AND kind = 1 AND position = 0 AND event_id IN ?").await?,
            read_events: p("SELECT position, event_id, source, event_type, event_time, data, origin, record, digest FROM {ks}.entity_log
                            WHERE entity_type = ? AND entity_id = ? AND bucket = ? AND kind = 0 AND position > ? AND position <= ?").await?,
            read_event_ids: p("SELECT event_id FROM {ks}.entity_log
                            WHERE entity_type = ? AND entity_id = ? AND bucket = ? AND kind = 0 AND position <= ?").await?,
            insert_event: p("INSERT INTO {ks}.entity_log (entity_type, entity_id, bucket, kind, position, event_id, source, event_type, event_time, data, origin, record, digest)
                             VALUES (:entity_type, :entity_id, :bucket, 0, :position, :event_id, :source, :event_type, :event_time, :data, :origin, :record, :digest)").await?,
            insert_id: p("INSERT INTO {ks}.entity_log (entity_type, entity_id, bucket, kind, position, event_id, digest)
                          VALUES (:entity_type, :entity_id, :bucket, 1, 0, :event_id, :digest) IF NOT EXISTS").await?,
            advance: p("UPDATE {ks}.entity_log SET head = :head, state = :state, state_position = :state_position,
                               plugin_name = :plugin_name, plugin_version = :plugin_version, plugin_digest = :plugin_digest,
                               quarantined = :quarantined, generation = :generation
                        WHERE entity_type = :entity_type AND entity_id = :entity_id AND bucket = :bucket IF head = :expected_head").await?,
            open_bucket: p("UPDATE {ks}.entity_log SET base = :base, cap = :cap, head = :head, state = :state, state_position = :state_position,
                                   plugin_name = :plugin_name, plugin_version = :plugin_version, plugin_digest = :plugin_digest,
                                   quarantined = :quarantined, generation = :generation
                            WHERE entity_type = :entity_type AND entity_id = :entity_id AND bucket = :bucket IF head = null").await?,
            set_live: p("UPDATE {ks}.entity_log SET live = ? WHERE entity_type = ? AND entity_id = ? AND bucket = ?").await?,
            release: p("UPDATE {ks}.entity_log SET quarantined = false WHERE entity_type = ? AND entity_id = ? AND bucket = ? IF head = ?").await?,
            put_state: p("UPDATE {ks}.entity_log SET base = 0, cap = :cap, head = :head, state = :state, state_position = :state_position,
                                 plugin_name = :plugin_name, plugin_version = :plugin_version, plugin_digest = :plugin_digest,
                                 quarantined = :quarantined, generation = :generation
                          WHERE entity_type = :entity_type AND entity_id = :entity_id AND bucket = 0").await?,
            delete_bucket: p("DELETE FROM {ks}.entity_log WHERE entity_type = ? AND entity_id = ? AND bucket = ?").await?,
            index_insert: p("INSERT INTO {ks}.entity_index (entity_type, shard, entity_id) VALUES (?, ?, ?)").await?,
            index_read: p("SELECT entity_id FROM {ks}.entity_index WHERE entity_type = ? AND shard = ?").await?,
            index_drop: p("DELETE FROM {ks}.entity_index WHERE entity_type = ? AND shard = ?").await?,
            index_page: p("SELECT entity_id FROM {ks}.entity_index WHERE entity_type = ? AND shard = ? AND entity_id > ? LIMIT ?").await?,
            doc_index_insert: p("INSERT INTO {ks}.projection_index (projection, shard, doc_key) VALUES (?, ?, ?) USING TIMESTAMP ?").await?,
            doc_index_delete: p("DELETE FROM {ks}.projection_index USING TIMESTAMP ? WHERE projection = ? AND shard = ? AND doc_key = ?").await?,
            doc_index_page: p("SELECT doc_key FROM {ks}.projection_index WHERE projection = ? AND shard = ? AND doc_key > ? LIMIT ?").await?,
            doc_index_get: p("SELECT doc_key FROM {ks}.projection_index WHERE projection = ? AND shard = ? AND doc_key = ?").await?,
            projection_upsert: p("INSERT INTO {ks}.projections (projection, doc_key, body) VALUES (:projection, :doc_key, :body) USING TIMESTAMP :ts").await?,
            projection_delete: p("DELETE FROM {ks}.projections USING TIMESTAMP :ts WHERE projection = :projection AND doc_key = :doc_key").await?,
            projection_read: p("SELECT body FROM {ks}.projections WHERE projection = ? AND doc_key = ?").await?,
            projection_scan: p("SELECT projection, doc_key, body FROM {ks}.projections").await?,
            dead_letter_insert: p("INSERT INTO {ks}.dead_letters (shard, id, code, reason, payload, origin, event_id, entity_type, recorded_at)
                                   VALUES (:shard, :id, :code, :reason, :payload, :origin, :event_id, :entity_type, :recorded_at) USING TIMESTAMP :ts").await?,
            dead_letter_read: p("SELECT id, code, reason, payload, origin, event_id, entity_type, recorded_at
                                 FROM {ks}.dead_letters WHERE shard = ? AND id > ? LIMIT ?").await?,
            dead_letter_get: p("SELECT id, code, reason, payload, origin, event_id, entity_type, recorded_at
                                FROM {ks}.dead_letters WHERE shard = ? AND id = ?").await?,
            dead_letter_exists: p("SELECT id FROM {ks}.dead_letters WHERE shard = ? AND id = ?").await?,
            dead_letter_delete: p("DELETE FROM {ks}.dead_letters WHERE shard = ? AND id = ?").await?,
            quarantine_insert: p("INSERT INTO {ks}.quarantine (entity_type, entity_id, event_id, event_position, failure_kind, error,
                                                               plugin_name, plugin_version, plugin_digest, recorded_at)
                                  VALUES (:entity_type, :entity_id, :event_id, :event_position, :failure_kind, :error,
                                          :plugin_name, :plugin_version, :plugin_digest, :recorded_at) USING TIMESTAMP :ts").await?,
            quarantine_read: p("SELECT entity_type, entity_id, event_id, event_position, failure_kind, error, plugin_name, plugin_version, plugin_digest, recorded_at
                                FROM {ks}.quarantine").await?,
            quarantine_get: p("SELECT entity_type, entity_id, event_id, event_position, failure_kind, error, plugin_name, plugin_version, plugin_digest, recorded_at
                               FROM {ks}.quarantine WHERE entity_type = ? AND entity_id = ?").await?,
            quarantine_page: p("SELECT token(entity_type, entity_id) AS cursor_token, entity_type, entity_id, event_id, event_position, failure_kind, error,
                                       plugin_name, plugin_version, plugin_digest, recorded_at
                                FROM {ks}.quarantine WHERE token(entity_type, entity_id) > ? LIMIT ?").await?,
            quarantine_delete: p("DELETE FROM {ks}.quarantine WHERE entity_type = ? AND entity_id = ?").await?,
            quarantine_release: p("DELETE FROM {ks}.quarantine USING TIMESTAMP ? WHERE entity_type = ? AND entity_id = ?").await?,
            checkpoint_upsert: p("INSERT INTO {ks}.checkpoints (source, part, next_offset) VALUES (:source, :part, :next_offset) USING TIMESTAMP :ts").await?,
            checkpoint_read: p("SELECT part, next_offset FROM {ks}.checkpoints WHERE source = ?").await?,
            snapshot_read: p("SELECT position, state FROM {ks}.snapshots
                              WHERE entity_type = ? AND entity_id = ? AND digest = ? AND position <= ? LIMIT 1").await?,
            snapshot_insert: p("INSERT INTO {ks}.snapshots (entity_type, entity_id, digest, position, state)
                                VALUES (:entity_type, :entity_id, :digest, :position, :state)").await?,
            intent_insert: p("INSERT INTO {ks}.pending_effects (id, seq, ts, chunk) VALUES (:id, :seq, :ts, :chunk)").await?,
            intent_delete: p("DELETE FROM {ks}.pending_effects WHERE id = ?").await?,
            intent_read: p("SELECT id, seq, chunk FROM {ks}.pending_effects").await?,
            plugin_version_insert: p("INSERT INTO {ks}.plugin_versions (entity_type, digest, name, version, size, uploaded_at, seq)
                                      VALUES (:entity_type, :digest, :name, :version, :size, :uploaded_at, :seq) IF NOT EXISTS").await?,
            insert_change: p("INSERT INTO {ks}.entity_log (entity_type, entity_id, bucket, kind, position, event_id)
                              VALUES (:entity_type, :entity_id, :bucket, 2, :position, :batch_id) USING TTL :ttl").await?,
            read_changes: p("SELECT event_id FROM {ks}.entity_log
                             WHERE entity_type = ? AND entity_id = ? AND bucket IN ? AND kind = 2 AND position = ?").await?,
            outbox_insert: p("INSERT INTO {ks}.change_outbox (source, part, batch_id, entity_type, entity_id, change_id, last_position, expected_head, certain, event)
                              VALUES (:source, :part, :batch_id, :entity_type, :entity_id, :change_id, :last_position, :expected_head, :certain, :event)").await?,
            outbox_read: p("SELECT batch_id, entity_type, entity_id, change_id, last_position, expected_head, certain, event
                            FROM {ks}.change_outbox WHERE source = ? AND part = ?").await?,
            outbox_read_after: p("SELECT batch_id, entity_type, entity_id, change_id, last_position, expected_head, certain, event
                            FROM {ks}.change_outbox WHERE source = ? AND part = ? AND batch_id > ?").await?,
            outbox_delete_batch: p("DELETE FROM {ks}.change_outbox WHERE source = ? AND part = ? AND batch_id = ?").await?,
            outbox_delete_row: p("DELETE FROM {ks}.change_outbox WHERE source = ? AND part = ? AND batch_id = ? AND entity_type = ? AND entity_id = ?").await?,
            plugin_versions_read: p("SELECT entity_type, name, version, digest, size, uploaded_at, seq FROM {ks}.plugin_versions WHERE entity_type = ?").await?,
            plugin_blob_insert: p("INSERT INTO {ks}.plugin_blobs (digest, chunk, bytes) VALUES (:digest, :chunk, :bytes)").await?,
            plugin_blob_read: p("SELECT chunk, bytes FROM {ks}.plugin_blobs WHERE digest = ?").await?,
            activation_insert: p("INSERT INTO {ks}.activations (entity_type, digest, previous, mode, seq, activated_at, generation, previous_generation, rolled_back)
                                  VALUES (:entity_type, :digest, :previous, :mode, :seq, :activated_at, :generation, :previous_generation, :rolled_back)
                                  IF NOT EXISTS").await?,
            activation_update: p("UPDATE {ks}.activations SET digest = :digest, previous = :previous, mode = :mode, seq = :seq, activated_at = :activated_at,
                                         generation = :generation, previous_generation = :previous_generation, rolled_back = :rolled_back
                                  WHERE entity_type = :entity_type IF seq = :expected_seq").await?,
            activations_read: p("SELECT entity_type, digest, previous, mode, seq, activated_at, generation, previous_generation, rolled_back
                                 FROM {ks}.activations").await?,
            activation_get: p("SELECT entity_type, digest, previous, mode, seq, activated_at, generation, previous_generation, rolled_back
                               FROM {ks}.activations WHERE entity_type = ?").await?,
            history_insert: p("INSERT INTO {ks}.activation_history (entity_type, seq, activation) VALUES (?, ?, ?)").await?,
            history_page: p("SELECT activation FROM {ks}.activation_history WHERE entity_type = ? AND seq < ? LIMIT ?").await?,
            rebuild_insert: p("INSERT INTO {ks}.rebuilds (id, entity_type, digest, generation, state, entities_done, entities_total, events_done, events_total,
                                                          quarantined, error, owner, started_at, finished_at, heartbeat_ms)
                               VALUES (:id, :entity_type, :digest, :generation, :state, :entities_done, :entities_total, :events_done, :events_total,
                                       :quarantined, :error, :owner, :started_at, :finished_at, :heartbeat_ms) IF NOT EXISTS").await?,
            rebuild_update: p("UPDATE {ks}.rebuilds SET entity_type = :entity_type, digest = :digest, generation = :generation, state = :state,
                                      entities_done = :entities_done, entities_total = :entities_total, events_done = :events_done,
                                      events_total = :events_total, quarantined = :quarantined, error = :error, owner = :owner,
                                      started_at = :started_at, finished_at = :finished_at, heartbeat_ms = :heartbeat_ms
                               WHERE id = :id IF heartbeat_ms = :expected_heartbeat").await?,
            rebuilds_read: p("SELECT id, entity_type, digest, generation, state, entities_done, entities_total, events_done, events_total,
                                     quarantined, error, owner, started_at, finished_at, heartbeat_ms FROM {ks}.rebuilds").await?,
        };
        // Conditional statements are not idempotent: a retried LWT that had
        // applied reports "not applied".
        for s in [
            &mut st.insert_id,
            &mut st.advance,
            &mut st.open_bucket,
            &mut st.release,
            &mut st.plugin_version_insert,
            &mut st.activation_insert,
            &mut st.activation_update,
            &mut st.rebuild_insert,
            &mut st.rebuild_update,
        ] {
            s.set_is_idempotent(false);
        }
        Ok(st)
    }
}
