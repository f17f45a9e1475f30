//! The tables, and the upgrade of a database created by an older release.

use rusqlite::{Connection, named_params};

/// Every table as the current release writes it; `IF NOT EXISTS`, so that
/// opening an existing database leaves it alone.
pub(crate) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS events (
    entity_type TEXT NOT NULL,
    entity_id   TEXT NOT NULL,
    position    INTEGER NOT NULL,
    event_id    TEXT NOT NULL,
    source      TEXT NOT NULL,
    event_type  TEXT NOT NULL,
    time        TEXT,
    data        TEXT NOT NULL,
    origin      TEXT,
    record      TEXT,
    digest      TEXT,
    PRIMARY KEY (entity_type, entity_id, position)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS events_by_id ON events (entity_type, entity_id, event_id);
CREATE TABLE IF NOT EXISTS entities (
    entity_type    TEXT NOT NULL,
    entity_id      TEXT NOT NULL,
    state          TEXT,
    position       INTEGER NOT NULL,
    head           INTEGER NOT NULL,
    plugin_name    TEXT,
    plugin_version TEXT,
    plugin_digest  TEXT,
    quarantined    INTEGER NOT NULL DEFAULT 0,
    generation     TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (entity_type, entity_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS projections (
    projection TEXT NOT NULL,
    key        TEXT NOT NULL,
    body       TEXT NOT NULL,
    PRIMARY KEY (projection, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT NOT NULL UNIQUE,
    code        TEXT NOT NULL,
    reason      TEXT NOT NULL,
    payload     TEXT NOT NULL,
    origin      TEXT,
    event_id    TEXT,
    entity_type TEXT,
    recorded_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantine (
    entity_type    TEXT NOT NULL,
    entity_id      TEXT NOT NULL,
    event_id       TEXT NOT NULL,
    event_position INTEGER NOT NULL,
    kind           TEXT NOT NULL,
    error          TEXT NOT NULL,
    plugin_name    TEXT NOT NULL,
    plugin_version TEXT NOT NULL,
    plugin_digest  TEXT NOT NULL,
    recorded_at    TEXT NOT NULL,
    PRIMARY KEY (entity_type, entity_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS plugin_versions (
    digest      TEXT PRIMARY KEY,
    entity_type TEXT NOT NULL,
    name        TEXT NOT NULL,
    version     TEXT NOT NULL,
    size        INTEGER NOT NULL,
    uploaded_at TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    bytes       BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS activations (
    entity_type  TEXT PRIMARY KEY,
    digest       TEXT NOT NULL,
    previous     TEXT,
    mode         TEXT NOT NULL,
    seq          INTEGER NOT NULL,
    activated_at TEXT NOT NULL,
    generation   TEXT NOT NULL DEFAULT '',
    previous_generation TEXT,
    rolled_back  TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS activation_history (
    entity_type TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    activation  TEXT NOT NULL,
    PRIMARY KEY (entity_type, seq)
);
CREATE TABLE IF NOT EXISTS rebuilds (
    id             TEXT PRIMARY KEY,
    entity_type    TEXT NOT NULL,
    digest         TEXT NOT NULL,
    generation     TEXT NOT NULL,
    state          TEXT NOT NULL,
    entities_done  INTEGER NOT NULL,
    entities_total INTEGER NOT NULL,
    events_done    INTEGER NOT NULL,
    events_total   INTEGER NOT NULL,
    quarantined    INTEGER NOT NULL,
    error          TEXT,
    owner          TEXT NOT NULL,
    started_at     TEXT NOT NULL,
    finished_at    TEXT,
    heartbeat_ms   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshots (
    entity_type TEXT NOT NULL,
    entity_id   TEXT NOT NULL,
    digest      TEXT NOT NULL,
    position    INTEGER NOT NULL,
    state       TEXT NOT NULL,
    PRIMARY KEY (entity_type, entity_id, digest, position)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS changes (
    seq            INTEGER PRIMARY KEY,
    kind           INTEGER NOT NULL,
    entity_type    TEXT NOT NULL,
    entity_id      TEXT NOT NULL,
    first_position INTEGER NOT NULL,
    last_position  INTEGER NOT NULL,
    generation     TEXT NOT NULL,
    activation     INTEGER,
    plugin_name    TEXT,
    plugin_version TEXT,
    plugin_digest  TEXT,
    state          TEXT NOT NULL,
    previous       TEXT,
    event_ids      TEXT,
    time           TEXT NOT NULL,
    recorded_ms    INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    source    TEXT NOT NULL,
    partition INTEGER NOT NULL,
    offset    INTEGER NOT NULL,
    PRIMARY KEY (source, partition)
) WITHOUT ROWID;
"#;

/// Columns added after the first release, for databases created before:
/// `CREATE TABLE IF NOT EXISTS` leaves an older table as it was.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("entities", "generation", "TEXT NOT NULL DEFAULT ''"),
    ("activations", "generation", "TEXT NOT NULL DEFAULT ''"),
    ("activations", "previous_generation", "TEXT"),
    ("events", "record", "TEXT"),
    ("events", "digest", "TEXT"),
    ("activations", "rolled_back", "TEXT NOT NULL DEFAULT ''"),
    ("changes", "activation", "INTEGER"),
];

/// Create what is missing and add the columns an older database lacks.
pub(crate) fn create_or_upgrade(c: &Connection) -> rusqlite::Result<()> {
    c.execute_batch(SCHEMA)?;
    for (table, column, ty) in ADDED_COLUMNS {
        let present: i64 = c.query_row(
            "SELECT count(*) AS n FROM pragma_table_info(:table) WHERE name = :column",
            named_params! {":table": table, ":column": column},
            |r| r.get("n"),
        )?;
        if present == 0 {
            // DDL takes no parameters; both names are constants above.
            c.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {ty}"))?;
        }
    }
    Ok(())
}
