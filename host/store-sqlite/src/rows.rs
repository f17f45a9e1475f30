//! Rows into records, every column read by name: a column renamed or
//! added is one edit here, checked when the statement runs, instead of a
//! shifted index that reads the wrong value.

use refold_store::{
    Activation, ChangeKind, ChangeRecord, DeadLetter, EntityKey, EntityRecord, Generation,
    PluginRef, PluginVersion, QuarantineRecord, RawJson, RebuildRecord, StoredEvent,
    UnknownVariant,
};
use rusqlite::Row;
use rusqlite::types::Type;
use serde_json::Value;

/// A column whose text cannot be read back: a conversion failure, which the
/// error classification reports as corrupt data.
fn rotten(why: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(0, Type::Text, why.into())
}

/// A JSON column that must hold JSON: a rotted value is an error that names
/// the row, never a silent `null`.
fn strict_json(s: &str, what: impl FnOnce() -> String) -> rusqlite::Result<Value> {
    serde_json::from_str(s).map_err(|e| {
        rotten(format!(
            "{} is not JSON ({e}); the database is damaged",
            what()
        ))
    })
}

fn raw_json(s: &str, what: impl FnOnce() -> String) -> rusqlite::Result<RawJson> {
    RawJson::parse(s).map_err(|e| {
        rotten(format!(
            "{} is not JSON ({e}); the database is damaged",
            what()
        ))
    })
}

/// A column holding an enum's stored text; text that names no variant is a
/// conversion failure, never a default.
fn enum_col<T>(r: &Row<'_>, column: &str) -> rusqlite::Result<T>
where
    T: std::str::FromStr<Err = UnknownVariant>,
{
    let text: String = r.get(column)?;
    text.parse().map_err(|e: UnknownVariant| {
        rusqlite::Error::FromSqlConversionFailure(0, Type::Text, Box::new(e))
    })
}

fn generation_col(r: &Row<'_>, column: &str) -> rusqlite::Result<Generation> {
    r.get::<_, String>(column).map(Generation::from)
}

/// A position or count kept as SQLite's signed integer.
fn u64_col(r: &Row<'_>, column: &str) -> rusqlite::Result<u64> {
    r.get::<_, i64>(column).map(|n| n as u64)
}

/// The `origin` column: JSON of an `Origin`; one that does not parse is
/// only a lost provenance note, read as none.
fn origin_col(r: &Row<'_>) -> rusqlite::Result<Option<refold_store::Origin>> {
    Ok(r.get::<_, Option<String>>("origin")?
        .and_then(|s| serde_json::from_str(&s).ok()))
}

/// An `events` row of entity `key`.
pub(crate) fn event(key: &EntityKey, r: &Row<'_>) -> rusqlite::Result<StoredEvent> {
    let position = u64_col(r, "position")?;
    let data: String = r.get("data")?;
    Ok(StoredEvent {
        key: key.clone(),
        position,
        id: r.get("event_id")?,
        source: r.get("source")?,
        event_type: r.get("event_type")?,
        time: r.get("time")?,
        data: raw_json(&data, || {
            format!("data of event {key} at position {position}")
        })?,
        origin: origin_col(r)?,
        record: r
            .get::<_, Option<String>>("record")?
            .and_then(|s| RawJson::parse(&s).ok()),
        digest: r.get("digest")?,
    })
}

/// The `plugin_name`, `plugin_version` and `plugin_digest` columns: a
/// plugin version, or none when any of them is null.
fn plugin_cols(r: &Row<'_>) -> rusqlite::Result<Option<PluginRef>> {
    Ok(
        match (
            r.get::<_, Option<String>>("plugin_name")?,
            r.get::<_, Option<String>>("plugin_version")?,
            r.get::<_, Option<String>>("plugin_digest")?,
        ) {
            (Some(name), Some(version), Some(digest)) => Some(PluginRef {
                name,
                version,
                digest,
            }),
            _ => None,
        },
    )
}

/// An `entities` row of entity `key`.
pub(crate) fn entity(key: &EntityKey, r: &Row<'_>) -> rusqlite::Result<EntityRecord> {
    let plugin = plugin_cols(r)?;
    Ok(EntityRecord {
        key: key.clone(),
        state: r
            .get::<_, Option<String>>("state")?
            .map(|s| strict_json(&s, || format!("the state of {key}")))
            .transpose()?,
        position: u64_col(r, "position")?,
        head: u64_col(r, "head")?,
        plugin,
        quarantined: r.get::<_, i64>("quarantined")? != 0,
        generation: generation_col(r, "generation")?,
    })
}

/// A `projections` body; one that does not parse reads as `null`, as the
/// read model always has (it is rebuilt from the events, never trusted).
pub(crate) fn projection_body(r: &Row<'_>) -> rusqlite::Result<Value> {
    let body: String = r.get("body")?;
    Ok(serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// A `dead_letters` row.
pub(crate) fn dead_letter(r: &Row<'_>) -> rusqlite::Result<DeadLetter> {
    Ok(DeadLetter {
        id: r.get("id")?,
        code: r.get("code")?,
        reason: r.get("reason")?,
        payload: r.get("payload")?,
        origin: origin_col(r)?,
        event_id: r.get("event_id")?,
        entity_type: r.get("entity_type")?,
        recorded_at: r.get("recorded_at")?,
    })
}

/// A `quarantine` row.
pub(crate) fn quarantine(r: &Row<'_>) -> rusqlite::Result<QuarantineRecord> {
    Ok(QuarantineRecord {
        key: EntityKey::new(
            r.get::<_, String>("entity_type")?,
            r.get::<_, String>("entity_id")?,
        ),
        event_id: r.get("event_id")?,
        event_position: u64_col(r, "event_position")?,
        kind: r.get("kind")?,
        error: r.get("error")?,
        plugin: PluginRef {
            name: r.get("plugin_name")?,
            version: r.get("plugin_version")?,
            digest: r.get("plugin_digest")?,
        },
        recorded_at: r.get("recorded_at")?,
    })
}

/// A `snapshots` row: position and state. A state that does not parse is
/// only a lost shortcut (the replay starts further back), read as none.
pub(crate) fn snapshot(r: &Row<'_>) -> rusqlite::Result<Option<(u64, Value)>> {
    let position = u64_col(r, "position")?;
    let state: String = r.get("state")?;
    Ok(serde_json::from_str(&state).ok().map(|v| (position, v)))
}

/// A `plugin_versions` row, without its bytes.
pub(crate) fn plugin_version(r: &Row<'_>) -> rusqlite::Result<PluginVersion> {
    Ok(PluginVersion {
        entity_type: r.get("entity_type")?,
        name: r.get("name")?,
        version: r.get("version")?,
        digest: r.get("digest")?,
        size: u64_col(r, "size")?,
        uploaded_at: r.get("uploaded_at")?,
    })
}

/// An `activations` row.
pub(crate) fn activation(r: &Row<'_>) -> rusqlite::Result<Activation> {
    Ok(Activation {
        entity_type: r.get("entity_type")?,
        digest: r.get("digest")?,
        previous: r.get("previous")?,
        mode: enum_col(r, "mode")?,
        seq: r.get("seq")?,
        activated_at: r.get("activated_at")?,
        generation: generation_col(r, "generation")?,
        previous_generation: r
            .get::<_, Option<String>>("previous_generation")?
            .map(Generation::from),
        rolled_back: split_digests(&r.get::<_, String>("rolled_back")?),
    })
}

/// The `rolled_back` column: digests (hex, so never a comma) joined by `,`.
pub(crate) fn join_digests(digests: &[String]) -> String {
    digests.join(",")
}

fn split_digests(s: &str) -> Vec<String> {
    s.split(',')
        .filter(|d| !d.is_empty())
        .map(String::from)
        .collect()
}

/// A `rebuilds` row.
pub(crate) fn rebuild(r: &Row<'_>) -> rusqlite::Result<RebuildRecord> {
    Ok(RebuildRecord {
        id: r.get("id")?,
        entity_type: r.get("entity_type")?,
        digest: r.get("digest")?,
        generation: generation_col(r, "generation")?,
        state: enum_col(r, "state")?,
        entities_done: r.get("entities_done")?,
        entities_total: r.get("entities_total")?,
        events_done: r.get("events_done")?,
        events_total: r.get("events_total")?,
        quarantined: r.get("quarantined")?,
        error: r.get("error")?,
        owner: r.get("owner")?,
        started_at: r.get("started_at")?,
        finished_at: r.get("finished_at")?,
        heartbeat_ms: r.get("heartbeat_ms")?,
    })
}

/// A `changes` row: its cursor and the record.
pub(crate) fn change(r: &Row<'_>) -> rusqlite::Result<(u64, ChangeRecord)> {
    let cursor = u64_col(r, "seq")?;
    let key = EntityKey::new(
        r.get::<_, String>("entity_type")?,
        r.get::<_, String>("entity_id")?,
    );
    let what = |col: &str| format!("the {col} of change record {cursor}");
    let kind = match r.get::<_, i64>("kind")? {
        0 => ChangeKind::Changed,
        1 => ChangeKind::Corrected,
        k => return Err(rotten(format!("change record {cursor} has kind {k}"))),
    };
    let plugin = plugin_cols(r)?;
    let state: String = r.get("state")?;
    let previous = r
        .get::<_, Option<String>>("previous")?
        .map(|p| strict_json(&p, || what("previous state")))
        .transpose()?;
    let event_ids = match r.get::<_, Option<String>>("event_ids")? {
        None => None,
        Some(t) => Some(
            serde_json::from_str::<Vec<String>>(&t)
                .map_err(|e| rotten(format!("{} is not a list ({e})", what("event ids"))))?,
        ),
    };
    Ok((
        cursor,
        ChangeRecord {
            kind,
            first_position: u64_col(r, "first_position")?,
            last_position: u64_col(r, "last_position")?,
            generation: generation_col(r, "generation")?,
            activation: r
                .get::<_, Option<i64>>("activation")?
                .map(|a| a.max(0) as u64),
            plugin,
            state: strict_json(&state, || what("state"))?,
            previous,
            event_ids,
            time: r.get("time")?,
            key,
        },
    ))
}
