//! [`Storage::commit`]: a batch in one transaction. Raw events, states
//! (fenced on their head), released and new quarantines, projections,
//! dead letters and checkpoints land together or not at all.

use async_trait::async_trait;
use refold_store::{ChangeKind, Commit, ProjectionWrite, RawJson, Storage, StoreError};
use rusqlite::types::ToSql;
use rusqlite::{Connection, Transaction, named_params};

use crate::error::classify;
use crate::open::SqliteStore;

#[async_trait]
impl Storage for SqliteStore {
    async fn commit(&self, commit: Commit) -> Result<(), StoreError> {
        self.check_file()?;
        self.write_typed(move |c| write_commit(c, &commit)).await
    }
}

/// Why a commit did not apply: the driver failed, or a state moved on.
enum Refused {
    Sql(rusqlite::Error),
    /// An entity's head is no longer the one the batch was computed on.
    Fenced(String),
}

impl From<rusqlite::Error> for Refused {
    fn from(e: rusqlite::Error) -> Self {
        Refused::Sql(e)
    }
}

fn write_commit(c: &mut Connection, commit: &Commit) -> Result<(), StoreError> {
    let tx = c.transaction().map_err(classify)?;
    // Dropping `tx` on any error rolls everything back.
    match write_all(&tx, commit) {
        Ok(()) => tx.commit().map_err(classify),
        Err(Refused::Sql(e)) => Err(classify(e)),
        Err(Refused::Fenced(why)) => Err(StoreError::Fenced(why)),
    }
}

fn write_all(tx: &Transaction<'_>, commit: &Commit) -> Result<(), Refused> {
    insert_events(tx, commit)?;
    write_states(tx, commit)?;
    write_quarantines(tx, commit)?;
    write_projections(tx, commit)?;
    write_dead_letters(tx, commit)?;
    write_changes(tx, commit)?;
    write_checkpoints(tx, commit)?;
    Ok(())
}

/// The change records, in the transaction of the states they describe:
/// the commit's fence is what keeps a record from being stored twice (a
/// record names the position its entity's head moved to, and no later
/// commit can move it there again). Stored as columns, not as the
/// CloudEvent: the feed builds that on read, and the row stays small.
fn write_changes(tx: &Transaction<'_>, commit: &Commit) -> rusqlite::Result<()> {
    if commit.changes.is_empty() {
        return Ok(());
    }
    let now = refold_types::clock::unix_ms();
    let mut st = tx.prepare_cached(
        "INSERT INTO changes (kind, entity_type, entity_id, first_position, last_position,
             generation, activation, plugin_name, plugin_version, plugin_digest, state,
             previous, event_ids, time, recorded_ms)
         VALUES (:kind, :entity_type, :entity_id, :first, :last, :generation, :activation,
             :plugin_name,
             :plugin_version, :plugin_digest, :state, :previous, :event_ids, :time, :recorded_ms)",
    )?;
    for c in &commit.changes {
        let kind = match c.kind {
            ChangeKind::Changed => 0,
            ChangeKind::Corrected => 1,
        };
        st.execute(named_params! {
            ":kind": kind,
            ":entity_type": c.key.entity_type,
            ":entity_id": c.key.entity_id,
            ":first": c.first_position.min(i64::MAX as u64) as i64,
            ":last": c.last_position.min(i64::MAX as u64) as i64,
            ":generation": c.generation.as_str(),
            ":activation": c.activation.map(|a| a.min(i64::MAX as u64) as i64),
            ":plugin_name": c.plugin.as_ref().map(|p| p.name.as_str()),
            ":plugin_version": c.plugin.as_ref().map(|p| p.version.as_str()),
            ":plugin_digest": c.plugin.as_ref().map(|p| p.digest.as_str()),
            ":state": c.state.to_string(),
            ":previous": c.previous.as_ref().map(|v| v.to_string()),
            ":event_ids": c.event_ids.as_ref().map(|v| serde_json::Value::from(v.clone()).to_string()),
            ":time": c.time,
            ":recorded_ms": now,
        })?;
    }
    Ok(())
}

fn insert_events(tx: &Transaction<'_>, commit: &Commit) -> rusqlite::Result<()> {
    // Not `OR IGNORE`: an event row that is already there means another
    // writer stored it since our dedup, and the state update that goes with
    // it must not succeed either (the constraint error is `Fenced`).
    let mut ins = tx.prepare_cached(
        "INSERT INTO events (entity_type, entity_id, position, event_id, source, event_type, time,
                             data, origin, record, digest)
         VALUES (:entity_type, :entity_id, :position, :event_id, :source, :event_type, :time,
                 :data, :origin, :record, :digest)",
    )?;
    for e in &commit.events {
        let origin = e
            .origin
            .as_ref()
            .map(|o| serde_json::to_string(o).unwrap_or_default());
        ins.execute(named_params! {
            ":entity_type": e.key.entity_type,
            ":entity_id": e.key.entity_id,
            ":position": e.position as i64,
            ":event_id": e.id,
            ":source": e.source,
            ":event_type": e.event_type,
            ":time": e.time,
            ":data": e.data.as_str(),
            ":origin": origin,
            ":record": e.record.as_ref().map(RawJson::as_str),
            ":digest": e.digest,
        })?;
    }
    Ok(())
}

/// Each state is written only over the head it was computed on: inserted
/// when the batch saw no record (`expected_head` 0), else updated where the
/// head is still `expected_head`. Anything else is a fence.
fn write_states(tx: &Transaction<'_>, commit: &Commit) -> Result<(), Refused> {
    let mut insert = tx.prepare_cached(
        "INSERT OR IGNORE INTO entities (entity_type, entity_id, state, position, head, plugin_name,
                                         plugin_version, plugin_digest, quarantined, generation)
         VALUES (:entity_type, :entity_id, :state, :position, :head, :plugin_name,
                 :plugin_version, :plugin_digest, :quarantined, :generation)",
    )?;
    let mut update = tx.prepare_cached(
        "UPDATE entities SET state = :state, position = :position, head = :head,
                plugin_name = :plugin_name, plugin_version = :plugin_version,
                plugin_digest = :plugin_digest, quarantined = :quarantined, generation = :generation
         WHERE entity_type = :entity_type AND entity_id = :entity_id AND head = :expected_head",
    )?;
    for u in &commit.entities {
        let p = u.plugin.as_ref();
        let state = u.state.to_string();
        let (position, head, expected_head) =
            (u.position as i64, u.head as i64, u.expected_head as i64);
        let (name, version, digest) = (
            p.map(|p| &p.name),
            p.map(|p| &p.version),
            p.map(|p| &p.digest),
        );
        let quarantined = u.quarantined as i64;
        let generation = u.generation.as_str();
        // The same names for both statements; the update adds its fence.
        let row: [(&str, &dyn ToSql); 10] = [
            (":entity_type", &u.key.entity_type),
            (":entity_id", &u.key.entity_id),
            (":state", &state),
            (":position", &position),
            (":head", &head),
            (":plugin_name", &name),
            (":plugin_version", &version),
            (":plugin_digest", &digest),
            (":quarantined", &quarantined),
            (":generation", &generation),
        ];
        let changed = if u.expected_head == 0 {
            insert.execute(&row[..])?
        } else {
            let mut fenced = row.to_vec();
            fenced.push((":expected_head", &expected_head));
            update.execute(fenced.as_slice())?
        };
        if changed != 1 {
            return Err(Refused::Fenced(format!(
                "{} moved past head {} under us",
                u.key, u.expected_head
            )));
        }
    }
    Ok(())
}

fn write_quarantines(tx: &Transaction<'_>, commit: &Commit) -> rusqlite::Result<()> {
    let mut release = tx.prepare_cached(
        "DELETE FROM quarantine WHERE entity_type = :entity_type AND entity_id = :entity_id",
    )?;
    for k in &commit.released {
        release.execute(named_params! {
            ":entity_type": k.entity_type,
            ":entity_id": k.entity_id,
        })?;
    }
    let mut hold = tx.prepare_cached(
        "INSERT OR REPLACE INTO quarantine (entity_type, entity_id, event_id, event_position, kind,
                                            error, plugin_name, plugin_version, plugin_digest,
                                            recorded_at)
         VALUES (:entity_type, :entity_id, :event_id, :event_position, :kind,
                 :error, :plugin_name, :plugin_version, :plugin_digest, :recorded_at)",
    )?;
    for r in &commit.quarantines {
        hold.execute(named_params! {
            ":entity_type": r.key.entity_type,
            ":entity_id": r.key.entity_id,
            ":event_id": r.event_id,
            ":event_position": r.event_position as i64,
            ":kind": r.kind,
            ":error": r.error,
            ":plugin_name": r.plugin.name,
            ":plugin_version": r.plugin.version,
            ":plugin_digest": r.plugin.digest,
            ":recorded_at": r.recorded_at,
        })?;
    }
    Ok(())
}

fn write_projections(tx: &Transaction<'_>, commit: &Commit) -> rusqlite::Result<()> {
    let mut upsert = tx.prepare_cached(
        "INSERT OR REPLACE INTO projections (projection, key, body) VALUES (:projection, :key, :body)",
    )?;
    let mut delete =
        tx.prepare_cached("DELETE FROM projections WHERE projection = :projection AND key = :key")?;
    for p in &commit.projections {
        match p {
            ProjectionWrite::Upsert {
                projection,
                key,
                body,
            } => {
                upsert.execute(named_params! {
                    ":projection": projection,
                    ":key": key,
                    ":body": body.to_string(),
                })?;
            }
            ProjectionWrite::Delete { projection, key } => {
                delete.execute(named_params! {":projection": projection, ":key": key})?;
            }
        }
    }
    Ok(())
}

fn write_dead_letters(tx: &Transaction<'_>, commit: &Commit) -> rusqlite::Result<()> {
    // `OR IGNORE`: a dead letter's id is derived from its origin, so one
    // read again after a crash is the same one.
    let mut dl = tx.prepare_cached(
        "INSERT OR IGNORE INTO dead_letters (id, code, reason, payload, origin, event_id,
                                             entity_type, recorded_at)
         VALUES (:id, :code, :reason, :payload, :origin, :event_id, :entity_type, :recorded_at)",
    )?;
    for d in &commit.dead_letters {
        let origin = d
            .origin
            .as_ref()
            .map(|o| serde_json::to_string(o).unwrap_or_default());
        dl.execute(named_params! {
            ":id": d.id,
            ":code": d.code,
            ":reason": d.reason,
            ":payload": d.payload,
            ":origin": origin,
            ":event_id": d.event_id,
            ":entity_type": d.entity_type,
            ":recorded_at": d.recorded_at,
        })?;
    }
    Ok(())
}

fn write_checkpoints(tx: &Transaction<'_>, commit: &Commit) -> rusqlite::Result<()> {
    let mut cp = tx.prepare_cached(
        "INSERT OR REPLACE INTO checkpoints (source, partition, offset)
         VALUES (:source, :partition, :offset)",
    )?;
    for k in &commit.checkpoints {
        cp.execute(named_params! {
            ":source": k.source,
            ":partition": k.partition,
            ":offset": k.offset,
        })?;
    }
    Ok(())
}
