//! The embedded backend: one SQLite file in WAL mode.
//!
//! A batch commits in one transaction, so raw events, states, projections,
//! dead letters and the source checkpoint advance together: after a crash
//! the pipeline re-reads from the checkpoint and finds exactly what it left.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, named_params, params};
use serde_json::Value;

use refold_store::{
    Activation, Checkpoint, Commit, DeadLetter, EntityKey, EntityRecord, EventIdentity, EventStore,
    Paged, PluginRef, PluginStore, PluginVersion, ProjectionWrite, QuarantineRecord, RawJson,
    RebuildRecord, StateStore, Storage, StoreError, StoredEvent, UnknownVariant, decode_cursor,
    encode_cursor,
};
use refold_types::Generation;

const SCHEMA: &str = r#"
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
CREATE TABLE IF NOT EXISTS checkpoints (
    source    TEXT NOT NULL,
    partition INTEGER NOT NULL,
    offset    INTEGER NOT NULL,
    PRIMARY KEY (source, partition)
) WITHOUT ROWID;
"#;

/// Columns added after the first release, for databases created before.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("entities", "generation", "TEXT NOT NULL DEFAULT ''"),
    ("activations", "generation", "TEXT NOT NULL DEFAULT ''"),
    ("activations", "previous_generation", "TEXT"),
    ("events", "record", "TEXT"),
    ("events", "digest", "TEXT"),
    ("activations", "rolled_back", "TEXT NOT NULL DEFAULT ''"),
];

fn migrate(c: &Connection) -> rusqlite::Result<()> {
    for (table, column, ty) in ADDED_COLUMNS {
        let present: bool = c.query_row(
            &format!("SELECT count(*) FROM pragma_table_info('{table}') WHERE name = ?1"),
            params![column],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )?;
        if !present {
            c.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {ty}"))?;
        }
    }
    Ok(())
}

/// SQLite-backed [`Storage`].
#[derive(Clone)]
pub struct SqliteStore {
    writer: Arc<Mutex<Connection>>,
    reader: Arc<Mutex<Connection>>,
    /// The database file and the identity it had when opened: a commit
    /// first checks that the file is still there, so a database deleted or
    /// replaced under a running host stops writes instead of vanishing with
    /// them (SQLite keeps writing to the unlinked inode).
    file: Option<Arc<DbFile>>,
}

/// The opened database file, with the lock that makes this process its only
/// writer for as long as it lives.
struct DbFile {
    path: std::path::PathBuf,
    identity: (u64, u64),
    /// Held, never read: the exclusive lock on `<db>.lock` lives as long as
    /// the store.
    _lock: std::fs::File,
}

/// Why a database cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Another process holds the database.
    #[error(
        "{path} is in use by another refold process (lock {lock} is held): one writer per embedded database; stop the other host or use another store.path"
    )]
    Locked {
        /// The database.
        path: String,
        /// The lock file.
        lock: String,
    },
}

fn file_identity(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

impl SqliteStore {
    /// Open (or create) the database at `path`.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        Self::open_capped(path, 0)
    }

    /// Open (or create) the database at `path`, capped at `max_bytes`
    /// (0: no cap). At the cap a write fails with SQLite's "database or
    /// disk is full", exactly as on a full disk.
    pub fn open_capped(path: &Path, max_bytes: u64) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // One writer per database: two hosts folding the same events into one
        // file would both pass dedup and apply them twice. The lock is the
        // kernel's, so it is released when the process dies, however it dies.
        let lock_path = {
            let mut p = path.as_os_str().to_owned();
            p.push(".lock");
            std::path::PathBuf::from(p)
        };
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("opening {}", lock_path.display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(OpenError::Locked {
                    path: path.display().to_string(),
                    lock: lock_path.display().to_string(),
                }
                .into());
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(
                    anyhow::Error::new(e).context(format!("locking {}", lock_path.display()))
                );
            }
        }
        let writer =
            Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        writer.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a commit that returned is on disk, even across power loss.
        writer.pragma_update(None, "synchronous", "FULL")?;
        writer.busy_timeout(std::time::Duration::from_secs(10))?;
        tune(&writer)?;
        writer
            .execute_batch(SCHEMA)
            .context("creating the schema")?;
        migrate(&writer).context("upgrading the schema")?;
        if max_bytes > 0 {
            let page: i64 = writer.query_row("PRAGMA page_size", [], |r| r.get(0))?;
            let pages = (max_bytes / page.max(512) as u64).max(1);
            writer.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))?;
        }
        let reader = Connection::open(path)?;
        reader.busy_timeout(std::time::Duration::from_secs(10))?;
        tune(&reader)?;
        let identity =
            file_identity(path).with_context(|| format!("reading {}", path.display()))?;
        Ok(SqliteStore {
            writer: Arc::new(Mutex::new(writer)),
            reader: Arc::new(Mutex::new(reader)),
            file: Some(Arc::new(DbFile {
                path: path.to_path_buf(),
                identity,
                _lock: lock,
            })),
        })
    }

    /// `Unavailable` when the database file is gone or replaced: writing on
    /// would go to a file nobody can open again.
    fn check_file(&self) -> Result<(), StoreError> {
        let Some(f) = &self.file else { return Ok(()) };
        match file_identity(&f.path) {
            Ok(id) if id == f.identity => Ok(()),
            Ok(_) => Err(StoreError::Unavailable(format!(
                "database {} was replaced while this host had it open; writing stopped (restart the host to open the new file)",
                f.path.display()
            ))),
            Err(e) => Err(StoreError::Unavailable(format!(
                "database {} is gone ({e}); writing stopped (restore the file, or restart the host to start a new one)",
                f.path.display()
            ))),
        }
    }

    /// Open an in-memory store (for unit tests of code above the store).
    pub fn in_memory() -> anyhow::Result<Self> {
        // A shared-cache in-memory db so that reader and writer see the same data.
        let name = format!(
            "file:refold-mem-{}?mode=memory&cache=shared",
            rand::random::<u64>()
        );
        let flags = rusqlite::OpenFlags::default() | rusqlite::OpenFlags::SQLITE_OPEN_URI;
        let writer = Connection::open_with_flags(&name, flags)?;
        writer.execute_batch(SCHEMA)?;
        let reader = Connection::open_with_flags(&name, flags)?;
        Ok(SqliteStore {
            writer: Arc::new(Mutex::new(writer)),
            reader: Arc::new(Mutex::new(reader)),
            file: None,
        })
    }

    async fn write<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> anyhow::Result<R> {
        let conn = self.writer.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = conn
                .lock()
                .map_err(|_| anyhow::anyhow!("sqlite writer poisoned"))?;
            f(&mut c).map_err(anyhow::Error::from)
        })
        .await
        .context("sqlite writer task")?
    }

    async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> anyhow::Result<R> {
        let conn = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let c = conn
                .lock()
                .map_err(|_| anyhow::anyhow!("sqlite reader poisoned"))?;
            // One read transaction per call: a consistent snapshot, and the
            // WAL read lock is taken once rather than per statement.
            let tx = c.unchecked_transaction()?;
            let r = f(&tx)?;
            tx.commit()?;
            Ok(r)
        })
        .await
        .context("sqlite reader task")?
    }
}

/// A page cache and memory map large enough that the hot part of the
/// database is read without a system call per page.
fn tune(c: &Connection) -> rusqlite::Result<()> {
    c.pragma_update(None, "cache_size", -65_536)?; // KiB: 64 MiB
    c.pragma_update(None, "mmap_size", 268_435_456)?;
    Ok(())
}

fn plugin_ref(
    name: Option<String>,
    version: Option<String>,
    digest: Option<String>,
) -> Option<PluginRef> {
    Some(PluginRef {
        name: name?,
        version: version?,
        digest: digest?,
    })
}

fn json_col(s: String) -> Value {
    serde_json::from_str(&s).unwrap_or(Value::Null)
}

/// A JSON column that must hold JSON: a rotted value is an error that names
/// the row, never a silent `null`.
fn strict_json(s: String, what: impl FnOnce() -> String) -> rusqlite::Result<Value> {
    serde_json::from_str(&s).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Text,
            format!("{} is not JSON ({e}); the database is damaged", what()).into(),
        )
    })
}

fn raw_col(s: String, what: impl FnOnce() -> String) -> rusqlite::Result<RawJson> {
    RawJson::parse(&s).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Text,
            format!("{} is not JSON ({e}); the database is damaged", what()).into(),
        )
    })
}

#[async_trait]
impl EventStore for SqliteStore {
    async fn known_ids(
        &self,
        ids: &[EventIdentity],
    ) -> Result<HashMap<EventIdentity, Option<String>>, StoreError> {
        let r: anyhow::Result<HashMap<EventIdentity, Option<String>>> = async {
        let ids = ids.to_vec();
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT digest FROM events WHERE entity_type = ?1 AND entity_id = ?2 AND event_id = ?3",
            )?;
            let mut known = HashMap::new();
            for identity in ids {
                let (k, id) = &identity;
                let found: Option<Option<String>> = st
                    .query_row(params![k.entity_type, k.entity_id, id], |r| r.get(0))
                    .optional()?;
                if let Some(digest) = found {
                    known.insert(identity, digest);
                }
            }
            Ok(known)
        })
        .await
    }
        .await;
        r.map_err(sql_error)
    }

    async fn history(
        &self,
        key: &EntityKey,
        after: u64,
        upto: Option<u64>,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let r: anyhow::Result<Vec<StoredEvent>> = async {
        let key = key.clone();
        let upto = upto.unwrap_or(i64::MAX as u64).min(i64::MAX as u64) as i64;
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT position, event_id, source, event_type, time, data, origin, record, digest FROM events
                 WHERE entity_type = ?1 AND entity_id = ?2 AND position > ?3 AND position <= ?4
                 ORDER BY position",
            )?;
            let rows = st.query_map(
                params![key.entity_type, key.entity_id, after as i64, upto],
                |r| {
                    let position = r.get::<_, i64>(0)? as u64;
                    let what = || format!("data of event {} at position {position}", key);
                    Ok(StoredEvent {
                        key: key.clone(),
                        position,
                        id: r.get(1)?,
                        source: r.get(2)?,
                        event_type: r.get(3)?,
                        time: r.get(4)?,
                        data: raw_col(r.get(5)?, what)?,
                        origin: r
                            .get::<_, Option<String>>(6)?
                            .and_then(|s| serde_json::from_str(&s).ok()),
                        record: r
                            .get::<_, Option<String>>(7)?
                            .and_then(|s| RawJson::parse(&s).ok()),
                        digest: r.get(8)?,
                    })
                },
            )?;
            rows.collect()
        })
        .await
    }
        .await;
        r.map_err(sql_error)
    }

    async fn entity_ids(&self, entity_type: &str) -> Result<Vec<String>, StoreError> {
        let r: anyhow::Result<Vec<String>> = async {
            let t = entity_type.to_string();
            self.read(move |c| {
                let mut st = c.prepare_cached(
                "SELECT DISTINCT entity_id FROM events WHERE entity_type = ?1 ORDER BY entity_id",
            )?;
                let rows = st.query_map(params![t], |r| r.get(0))?;
                rows.collect()
            })
            .await
        }
        .await;
        r.map_err(sql_error)
    }
}

#[async_trait]
impl StateStore for SqliteStore {
    async fn load(
        &self,
        keys: &[EntityKey],
    ) -> Result<HashMap<EntityKey, EntityRecord>, StoreError> {
        let r: anyhow::Result<HashMap<EntityKey, EntityRecord>> = async {
        let keys = keys.to_vec();
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT state, position, head, plugin_name, plugin_version, plugin_digest, quarantined, generation
                 FROM entities WHERE entity_type = ?1 AND entity_id = ?2",
            )?;
            let mut out = HashMap::new();
            for k in keys {
                let rec = st
                    .query_row(params![k.entity_type, k.entity_id], |r| {
                        Ok(EntityRecord {
                            key: k.clone(),
                            state: r
                                .get::<_, Option<String>>(0)?
                                .map(|s| strict_json(s, || format!("the state of {k}")))
                                .transpose()?,
                            position: r.get::<_, i64>(1)? as u64,
                            head: r.get::<_, i64>(2)? as u64,
                            plugin: plugin_ref(r.get(3)?, r.get(4)?, r.get(5)?),
                            quarantined: r.get::<_, i64>(6)? != 0,
                            generation: generation_col(r, 7)?,
                        })
                    })
                    .optional()?;
                if let Some(rec) = rec {
                    out.insert(k, rec);
                }
            }
            Ok(out)
        })
        .await
    }
        .await;
        r.map_err(sql_error)
    }

    async fn projection(&self, name: &str, key: &str) -> Result<Option<Value>, StoreError> {
        let r: anyhow::Result<Option<Value>> = async {
            let (n, k) = (name.to_string(), key.to_string());
            self.read(move |c| {
                c.query_row(
                    "SELECT body FROM projections WHERE projection = ?1 AND key = ?2",
                    params![n, k],
                    |r| r.get::<_, String>(0),
                )
                .optional()
                .map(|o| o.map(json_col))
            })
            .await
        }
        .await;
        r.map_err(sql_error)
    }

    async fn dead_letter_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Paged<DeadLetter>>, StoreError> {
        let r: anyhow::Result<Vec<Paged<DeadLetter>>> = async {
            // The cursor is the arrival sequence number of the last item seen.
            let after: i64 = after.map(decode_cursor).transpose()?.unwrap_or(0);
            let limit = limit.min(i64::MAX as usize) as i64;
            self.read(move |c| {
                let mut st = c.prepare_cached(
                "SELECT seq, id, code, reason, payload, origin, event_id, entity_type, recorded_at
                 FROM dead_letters WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )?;
                let rows = st.query_map(params![after, limit], |r| {
                    Ok(Paged {
                        cursor: encode_cursor(&r.get::<_, i64>(0)?),
                        item: DeadLetter {
                            id: r.get(1)?,
                            code: r.get(2)?,
                            reason: r.get(3)?,
                            payload: r.get(4)?,
                            origin: r
                                .get::<_, Option<String>>(5)?
                                .and_then(|s| serde_json::from_str(&s).ok()),
                            event_id: r.get(6)?,
                            entity_type: r.get(7)?,
                            recorded_at: r.get(8)?,
                        },
                    })
                })?;
                rows.collect()
            })
            .await
        }
        .await;
        r.map_err(sql_error)
    }

    async fn dead_letter(&self, id: &str) -> Result<Option<DeadLetter>, StoreError> {
        let id = id.to_string();
        self.read(move |c| {
            c.prepare_cached(
                "SELECT id, code, reason, payload, origin, event_id, entity_type, recorded_at
                 FROM dead_letters WHERE id = :id",
            )?
            .query_row(named_params! {":id": id}, |r| {
                Ok(DeadLetter {
                    id: r.get("id")?,
                    code: r.get("code")?,
                    reason: r.get("reason")?,
                    payload: r.get("payload")?,
                    origin: r
                        .get::<_, Option<String>>("origin")?
                        .and_then(|s| serde_json::from_str(&s).ok()),
                    event_id: r.get("event_id")?,
                    entity_type: r.get("entity_type")?,
                    recorded_at: r.get("recorded_at")?,
                })
            })
            .optional()
        })
        .await
        .map_err(sql_error)
    }

    async fn remove_dead_letter(&self, id: &str) -> Result<bool, StoreError> {
        let r: anyhow::Result<bool> = async {
            let id = id.to_string();
            self.write(move |c| {
                Ok(c.execute("DELETE FROM dead_letters WHERE id = ?1", params![id])? > 0)
            })
            .await
        }
        .await;
        r.map_err(sql_error)
    }

    async fn quarantine_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Paged<QuarantineRecord>>, StoreError> {
        let r: anyhow::Result<Vec<Paged<QuarantineRecord>>> = async {
            // The cursor is the primary key (entity type, entity id) of the last
            // item seen; the empty key sorts before every real one.
            let (t, id): (String, String) =
                after.map(decode_cursor).transpose()?.unwrap_or_default();
            let limit = limit.min(i64::MAX as usize) as i64;
            self.read(move |c| {
                let mut st = c.prepare_cached(
                    "SELECT entity_type, entity_id, event_id, event_position, kind, error,
                        plugin_name, plugin_version, plugin_digest, recorded_at
                 FROM quarantine WHERE (entity_type, entity_id) > (?1, ?2)
                 ORDER BY entity_type, entity_id LIMIT ?3",
                )?;
                let rows = st.query_map(params![t, id, limit], |r| {
                    let key = EntityKey::new(r.get::<_, String>(0)?, r.get::<_, String>(1)?);
                    Ok(Paged {
                        cursor: encode_cursor(&(&key.entity_type, &key.entity_id)),
                        item: QuarantineRecord {
                            key,
                            event_id: r.get(2)?,
                            event_position: r.get::<_, i64>(3)? as u64,
                            kind: r.get(4)?,
                            error: r.get(5)?,
                            plugin: PluginRef {
                                name: r.get(6)?,
                                version: r.get(7)?,
                                digest: r.get(8)?,
                            },
                            recorded_at: r.get(9)?,
                        },
                    })
                })?;
                rows.collect()
            })
            .await
        }
        .await;
        r.map_err(sql_error)
    }

    async fn quarantine(&self, key: &EntityKey) -> Result<Option<QuarantineRecord>, StoreError> {
        let key = key.clone();
        self.read(move |c| {
            c.prepare_cached(
                "SELECT event_id, event_position, kind, error, plugin_name, plugin_version,
                        plugin_digest, recorded_at
                 FROM quarantine WHERE entity_type = :entity_type AND entity_id = :entity_id",
            )?
            .query_row(
                named_params! {":entity_type": key.entity_type, ":entity_id": key.entity_id},
                |r| {
                    Ok(QuarantineRecord {
                        key: key.clone(),
                        event_id: r.get("event_id")?,
                        event_position: r.get::<_, i64>("event_position")? as u64,
                        kind: r.get("kind")?,
                        error: r.get("error")?,
                        plugin: PluginRef {
                            name: r.get("plugin_name")?,
                            version: r.get("plugin_version")?,
                            digest: r.get("plugin_digest")?,
                        },
                        recorded_at: r.get("recorded_at")?,
                    })
                },
            )
            .optional()
        })
        .await
        .map_err(sql_error)
    }

    async fn release(&self, key: &EntityKey) -> Result<(), StoreError> {
        let r: anyhow::Result<()> = async {
            let key = key.clone();
            self.write(move |c| {
                let tx = c.transaction()?;
                tx.execute(
                    "DELETE FROM quarantine WHERE entity_type = ?1 AND entity_id = ?2",
                    params![key.entity_type, key.entity_id],
                )?;
                tx.execute(
                    "UPDATE entities SET quarantined = 0 WHERE entity_type = ?1 AND entity_id = ?2",
                    params![key.entity_type, key.entity_id],
                )?;
                tx.commit()
            })
            .await
        }
        .await;
        r.map_err(sql_error)
    }

    async fn adopt_projections(&self, ns: &str, archive: &str) -> Result<(), StoreError> {
        let r: anyhow::Result<()> = async {
        let (suffix, keep) = (format!("@{ns}"), format!("@{archive}"));
        self.write(move |c| {
            let tx = c.transaction()?;
            // The live documents about to be replaced are kept for a rollback.
            tx.execute(
                "DELETE FROM projections WHERE substr(projection, length(projection) - length(?1) + 1) = ?1",
                params![keep],
            )?;
            tx.execute(
                "INSERT OR REPLACE INTO projections (projection, key, body)
                 SELECT live.projection || ?2, live.key, live.body
                 FROM projections AS built JOIN projections AS live
                   ON live.projection = substr(built.projection, 1, length(built.projection) - length(?1))
                  AND live.key = built.key
                 WHERE substr(built.projection, length(built.projection) - length(?1) + 1) = ?1",
                params![suffix, keep],
            )?;
            tx.execute(
                "INSERT OR REPLACE INTO projections (projection, key, body)
                 SELECT substr(projection, 1, length(projection) - length(?1)), key, body FROM projections
                 WHERE substr(projection, length(projection) - length(?1) + 1) = ?1",
                params![suffix],
            )?;
            tx.execute("DELETE FROM projections WHERE substr(projection, length(projection) - length(?1) + 1) = ?1", params![suffix])?;
            tx.commit()
        })
        .await
    }
        .await;
        r.map_err(sql_error)
    }

    async fn drop_namespace(&self, ns: &str) -> Result<(), StoreError> {
        let r: anyhow::Result<()> = async {
        let ns = ns.to_string();
        self.write(move |c| {
            let tx = c.transaction()?;
            tx.execute("DELETE FROM entities WHERE entity_type = ?1", params![ns])?;
            tx.execute("DELETE FROM quarantine WHERE entity_type = ?1", params![ns])?;
            let suffix = format!("@{ns}");
            tx.execute("DELETE FROM projections WHERE substr(projection, length(projection) - length(?1) + 1) = ?1", params![suffix])?;
            tx.commit()
        })
        .await
    }
        .await;
        r.map_err(sql_error)
    }

    async fn snapshot_before(
        &self,
        key: &EntityKey,
        digest: &str,
        at: u64,
    ) -> Result<Option<(u64, Value)>, StoreError> {
        let r: anyhow::Result<Option<(u64, Value)>> = async {
            let (key, digest) = (key.clone(), digest.to_string());
            let at = at.min(i64::MAX as u64) as i64;
            self.read(move |c| {
                let row: Option<(i64, String)> = c
                    .prepare_cached(
                        "SELECT position, state FROM snapshots
                     WHERE entity_type = ?1 AND entity_id = ?2 AND digest = ?3 AND position <= ?4
                     ORDER BY position DESC LIMIT 1",
                    )?
                    .query_row(params![key.entity_type, key.entity_id, digest, at], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })
                    .optional()?;
                // A snapshot that does not parse is only a lost shortcut.
                Ok(row.and_then(|(p, s)| serde_json::from_str(&s).ok().map(|v| (p as u64, v))))
            })
            .await
        }
        .await;
        r.map_err(sql_error)
    }

    async fn put_snapshots(
        &self,
        key: &EntityKey,
        digest: &str,
        snapshots: &[(u64, Value)],
    ) -> Result<(), StoreError> {
        let r: anyhow::Result<()> = async {
        if snapshots.is_empty() {
            return Ok(());
        }
        let (key, digest) = (key.clone(), digest.to_string());
        let snaps: Vec<(i64, String)> = snapshots
            .iter()
            .map(|(p, v)| (*p as i64, v.to_string()))
            .collect();
        self.write(move |c| {
            let tx = c.transaction()?;
            {
                let mut st = tx.prepare_cached(
                    "INSERT OR REPLACE INTO snapshots (entity_type, entity_id, digest, position, state)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
                for (p, v) in &snaps {
                    st.execute(params![key.entity_type, key.entity_id, digest, p, v])?;
                }
            }
            tx.commit()
        })
        .await
    }
        .await;
        r.map_err(sql_error)
    }

    async fn checkpoints(&self, source: &str) -> Result<Vec<Checkpoint>, StoreError> {
        let r: anyhow::Result<Vec<Checkpoint>> = async {
            let s = source.to_string();
            self.read(move |c| {
                let mut st = c.prepare_cached(
                "SELECT partition, offset FROM checkpoints WHERE source = ?1 ORDER BY partition",
            )?;
                let rows = st.query_map(params![s], |r| {
                    Ok(Checkpoint {
                        source: s.clone(),
                        partition: r.get(0)?,
                        offset: r.get(1)?,
                    })
                })?;
                rows.collect()
            })
            .await
        }
        .await;
        r.map_err(sql_error)
    }
}

#[async_trait]
impl Storage for SqliteStore {
    async fn commit(&self, commit: Commit) -> Result<(), StoreError> {
        self.check_file()?;
        let w = self.writer.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = w
                .lock()
                .map_err(|_| StoreError::Other(anyhow::anyhow!("sqlite writer poisoned")))?;
            write_commit(&mut c, &commit)
        })
        .await
        .map_err(|e| StoreError::Other(anyhow::anyhow!("sqlite writer task: {e}")))?
    }
}

/// A failed write, typed by what the caller can do about it: a full disk or
/// an I/O error is waited out (the batch is retried), a uniqueness conflict
/// means another writer got there first (the batch is re-run).
/// A read's or a plain write's error, by kind: the driver's own error is
/// classified like a commit's; a value that cannot be read back is corrupt.
fn sql_error(e: anyhow::Error) -> StoreError {
    match e.downcast::<rusqlite::Error>() {
        Ok(
            e @ (rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::IntegralValueOutOfRange(..)),
        ) => StoreError::Corrupt(e.to_string()),
        Ok(e) => classify(e),
        Err(e) => StoreError::from(e),
    }
}

fn classify(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode as C;
    match e.sqlite_error_code() {
        Some(C::DiskFull) => StoreError::Unavailable(format!("disk full: {e}")),
        Some(
            C::SystemIoFailure | C::CannotOpen | C::DatabaseBusy | C::DatabaseLocked | C::ReadOnly,
        ) => StoreError::Unavailable(format!("sqlite: {e}")),
        Some(C::ConstraintViolation) => StoreError::Fenced(format!(
            "an event row was written by another writer meanwhile: {e}"
        )),
        _ => StoreError::Other(anyhow::Error::from(e).context("sqlite")),
    }
}

fn write_commit(c: &mut Connection, commit: &Commit) -> Result<(), StoreError> {
    let other = classify;
    let tx = c.transaction().map_err(other)?;
    {
        let mut ins = tx
            .prepare_cached(
                // Not `OR IGNORE`: an event row that is already there means
                // another writer stored it since our dedup, and the state
                // update that goes with it must not succeed either.
                "INSERT INTO events (entity_type, entity_id, position, event_id, source, event_type, time, data, origin, record, digest)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )
            .map_err(other)?;
        for e in &commit.events {
            ins.execute(params![
                e.key.entity_type,
                e.key.entity_id,
                e.position as i64,
                e.id,
                e.source,
                e.event_type,
                e.time,
                e.data.as_str(),
                e.origin
                    .as_ref()
                    .map(|o| serde_json::to_string(o).unwrap_or_default()),
                e.record.as_ref().map(RawJson::as_str),
                e.digest,
            ])
            .map_err(other)?;
        }
        let mut upd = tx
            .prepare_cached(
                "UPDATE entities SET state = ?3, position = ?4, head = ?5, plugin_name = ?6, plugin_version = ?7,
                        plugin_digest = ?8, quarantined = ?9, generation = ?11
                 WHERE entity_type = ?1 AND entity_id = ?2 AND head = ?10",
            )
            .map_err(other)?;
        let mut ins_ent = tx
            .prepare_cached(
                "INSERT OR IGNORE INTO entities (entity_type, entity_id, state, position, head, plugin_name, plugin_version, plugin_digest, quarantined, generation)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )
            .map_err(other)?;
        for u in &commit.entities {
            let p = u.plugin.as_ref();
            let state = u.state.to_string();
            let args = params![
                u.key.entity_type,
                u.key.entity_id,
                state,
                u.position as i64,
                u.head as i64,
                p.map(|p| &p.name),
                p.map(|p| &p.version),
                p.map(|p| &p.digest),
                u.quarantined as i64,
                u.generation.as_str(),
            ];
            let changed = if u.expected_head == 0 {
                ins_ent.execute(args).map_err(other)?
            } else {
                upd.execute(params![
                    u.key.entity_type,
                    u.key.entity_id,
                    state,
                    u.position as i64,
                    u.head as i64,
                    p.map(|p| &p.name),
                    p.map(|p| &p.version),
                    p.map(|p| &p.digest),
                    u.quarantined as i64,
                    u.expected_head as i64,
                    u.generation.as_str(),
                ])
                .map_err(other)?
            };
            if changed != 1 {
                // Dropping `tx` rolls everything back.
                return Err(StoreError::Fenced(format!(
                    "{} moved past head {} under us",
                    u.key, u.expected_head
                )));
            }
        }
        let mut rel = tx
            .prepare_cached("DELETE FROM quarantine WHERE entity_type = ?1 AND entity_id = ?2")
            .map_err(other)?;
        for k in &commit.released {
            rel.execute(params![k.entity_type, k.entity_id])
                .map_err(other)?;
        }
        let mut q = tx
            .prepare_cached(
                "INSERT OR REPLACE INTO quarantine (entity_type, entity_id, event_id, event_position, kind, error, plugin_name, plugin_version, plugin_digest, recorded_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )
            .map_err(other)?;
        for r in &commit.quarantines {
            q.execute(params![
                r.key.entity_type,
                r.key.entity_id,
                r.event_id,
                r.event_position as i64,
                r.kind,
                r.error,
                r.plugin.name,
                r.plugin.version,
                r.plugin.digest,
                r.recorded_at,
            ])
            .map_err(other)?;
        }
        let mut up = tx
            .prepare_cached(
                "INSERT OR REPLACE INTO projections (projection, key, body) VALUES (?1, ?2, ?3)",
            )
            .map_err(other)?;
        let mut del = tx
            .prepare_cached("DELETE FROM projections WHERE projection = ?1 AND key = ?2")
            .map_err(other)?;
        for p in &commit.projections {
            match p {
                ProjectionWrite::Upsert {
                    projection,
                    key,
                    body,
                } => {
                    up.execute(params![projection, key, body.to_string()])
                        .map_err(other)?;
                }
                ProjectionWrite::Delete { projection, key } => {
                    del.execute(params![projection, key]).map_err(other)?;
                }
            }
        }
        let mut dl = tx
            .prepare_cached(
                "INSERT OR IGNORE INTO dead_letters (id, code, reason, payload, origin, event_id, entity_type, recorded_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .map_err(other)?;
        for d in &commit.dead_letters {
            dl.execute(params![
                d.id,
                d.code,
                d.reason,
                d.payload,
                d.origin
                    .as_ref()
                    .map(|o| serde_json::to_string(o).unwrap_or_default()),
                d.event_id,
                d.entity_type,
                d.recorded_at,
            ])
            .map_err(other)?;
        }
        let mut cp = tx
            .prepare_cached("INSERT OR REPLACE INTO checkpoints (source, partition, offset) VALUES (?1, ?2, ?3)")
            .map_err(other)?;
        for k in &commit.checkpoints {
            cp.execute(params![k.source, k.partition, k.offset])
                .map_err(other)?;
        }
    }
    tx.commit().map_err(other)
}

#[async_trait]
impl PluginStore for SqliteStore {
    async fn put_plugin(&self, v: &PluginVersion, bytes: &[u8]) -> Result<(), StoreError> {
        let r: anyhow::Result<()> = async {
        let (v, bytes) = (v.clone(), bytes.to_vec());
        self.write(move |c| {
            c.execute(
                "INSERT OR IGNORE INTO plugin_versions (digest, entity_type, name, version, size, uploaded_at, seq, bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, (SELECT COALESCE(MAX(seq), 0) + 1 FROM plugin_versions), ?7)",
                params![v.digest, v.entity_type, v.name, v.version, v.size as i64, v.uploaded_at, bytes],
            )?;
            Ok(())
        })
        .await
    }
        .await;
        r.map_err(sql_error)
    }

    async fn plugin_versions(&self, entity_type: &str) -> Result<Vec<PluginVersion>, StoreError> {
        let r: anyhow::Result<Vec<PluginVersion>> = async {
            let t = entity_type.to_string();
            self.read(move |c| {
                let mut st = c.prepare_cached(
                "SELECT entity_type, name, version, digest, size, uploaded_at FROM plugin_versions
                 WHERE entity_type = ?1 ORDER BY seq",
            )?;
                let rows = st.query_map(params![t], |r| {
                    Ok(PluginVersion {
                        entity_type: r.get(0)?,
                        name: r.get(1)?,
                        version: r.get(2)?,
                        digest: r.get(3)?,
                        size: r.get::<_, i64>(4)? as u64,
                        uploaded_at: r.get(5)?,
                    })
                })?;
                rows.collect()
            })
            .await
        }
        .await;
        r.map_err(sql_error)
    }

    async fn plugin_bytes(&self, digest: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let r: anyhow::Result<Option<Vec<u8>>> = async {
            let d = digest.to_string();
            self.read(move |c| {
                c.query_row(
                    "SELECT bytes FROM plugin_versions WHERE digest = ?1",
                    params![d],
                    |r| r.get(0),
                )
                .optional()
            })
            .await
        }
        .await;
        r.map_err(sql_error)
    }

    async fn activation(&self, entity_type: &str) -> Result<Option<Activation>, StoreError> {
        let t = entity_type.to_string();
        self.read(move |c| {
            c.prepare_cached(
                "SELECT entity_type, digest, previous, mode, seq, activated_at, generation,
                        previous_generation, rolled_back
                 FROM activations WHERE entity_type = :entity_type",
            )?
            .query_row(named_params! {":entity_type": t}, activation_row)
            .optional()
        })
        .await
        .map_err(sql_error)
    }

    async fn activations(&self) -> Result<Vec<Activation>, StoreError> {
        let r: anyhow::Result<Vec<Activation>> = async {
        self.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT entity_type, digest, previous, mode, seq, activated_at, generation, previous_generation, rolled_back
                 FROM activations ORDER BY entity_type",
            )?;
            let rows = st.query_map([], |r| {
                Ok(Activation {
                    entity_type: r.get(0)?,
                    digest: r.get(1)?,
                    previous: r.get(2)?,
                    mode: enum_col(r, 3)?,
                    seq: r.get(4)?,
                    activated_at: r.get(5)?,
                    generation: generation_col(r, 6)?,
                    previous_generation: r
                        .get::<_, Option<String>>(7)?
                        .map(Generation::from),
                    rolled_back: split_digests(&r.get::<_, String>(8)?),
                })
            })?;
            rows.collect()
        })
        .await
    }
        .await;
        r.map_err(sql_error)
    }

    async fn put_activation(&self, a: &Activation) -> Result<(), StoreError> {
        let r: anyhow::Result<()> = async {
        let t = a.entity_type.clone();
        let a = a.clone();
        let rolled_back = a.rolled_back.join(",");
        let changed = self
            .write(move |c| {
                if a.seq <= 1 {
                    c.execute(
                        "INSERT OR IGNORE INTO activations (entity_type, digest, previous, mode, seq, activated_at, generation, previous_generation, rolled_back)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                        params![a.entity_type, a.digest, a.previous, a.mode.as_str(), a.seq, a.activated_at, a.generation.as_str(), a.previous_generation.as_ref().map(Generation::as_str), rolled_back],
                    )
                } else {
                    c.execute(
                        "UPDATE activations SET digest = ?2, previous = ?3, mode = ?4, seq = ?5, activated_at = ?6,
                                generation = ?7, previous_generation = ?8, rolled_back = ?10
                         WHERE entity_type = ?1 AND seq = ?9",
                        params![a.entity_type, a.digest, a.previous, a.mode.as_str(), a.seq, a.activated_at, a.generation.as_str(), a.previous_generation.as_ref().map(Generation::as_str), a.seq - 1, rolled_back],
                    )
                }
            })
            .await?;
        if changed != 1 {
            return Err(StoreError::Fenced(format!(
                "another activation of {t} was recorded meanwhile"
            ))
            .into());
        }
        Ok(())
    }
        .await;
        r.map_err(sql_error)
    }

    async fn put_rebuild(
        &self,
        r: &RebuildRecord,
        expected_heartbeat: Option<i64>,
    ) -> Result<bool, StoreError> {
        let r: anyhow::Result<bool> = async {
        let r = r.clone();
        let changed = self
            .write(move |c| {
                let sql = match expected_heartbeat {
                    None => {
                        "INSERT OR IGNORE INTO rebuilds (id, entity_type, digest, generation, state, entities_done, entities_total,
                                events_done, events_total, quarantined, error, owner, started_at, finished_at, heartbeat_ms)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"
                    }
                    Some(_) => {
                        "UPDATE rebuilds SET entity_type = ?2, digest = ?3, generation = ?4, state = ?5, entities_done = ?6,
                                entities_total = ?7, events_done = ?8, events_total = ?9, quarantined = ?10, error = ?11,
                                owner = ?12, started_at = ?13, finished_at = ?14, heartbeat_ms = ?15
                         WHERE id = ?1 AND heartbeat_ms = ?16"
                    }
                };
                let mut st = c.prepare_cached(sql)?;
                let generation = r.generation.as_str();
                let state = r.state.as_str();
                let mut values: Vec<&dyn rusqlite::ToSql> = vec![
                    &r.id,
                    &r.entity_type,
                    &r.digest,
                    &generation,
                    &state,
                    &r.entities_done,
                    &r.entities_total,
                    &r.events_done,
                    &r.events_total,
                    &r.quarantined,
                    &r.error,
                    &r.owner,
                    &r.started_at,
                    &r.finished_at,
                    &r.heartbeat_ms,
                ];
                if let Some(h) = &expected_heartbeat {
                    values.push(h);
                }
                st.execute(values.as_slice())
            })
            .await?;
        Ok(changed == 1)
    }
        .await;
        r.map_err(sql_error)
    }

    async fn rebuilds(&self) -> Result<Vec<RebuildRecord>, StoreError> {
        let r: anyhow::Result<Vec<RebuildRecord>> = async {
        self.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT id, entity_type, digest, generation, state, entities_done, entities_total, events_done,
                        events_total, quarantined, error, owner, started_at, finished_at, heartbeat_ms
                 FROM rebuilds ORDER BY started_at, id",
            )?;
            let rows = st.query_map([], |r| {
                Ok(RebuildRecord {
                    id: r.get(0)?,
                    entity_type: r.get(1)?,
                    digest: r.get(2)?,
                    generation: generation_col(r, 3)?,
                    state: enum_col(r, 4)?,
                    entities_done: r.get(5)?,
                    entities_total: r.get(6)?,
                    events_done: r.get(7)?,
                    events_total: r.get(8)?,
                    quarantined: r.get(9)?,
                    error: r.get(10)?,
                    owner: r.get(11)?,
                    started_at: r.get(12)?,
                    finished_at: r.get(13)?,
                    heartbeat_ms: r.get(14)?,
                })
            })?;
            rows.collect()
        })
        .await
    }
        .await;
        r.map_err(sql_error)
    }
}

/// The `rolled_back` column: digests (hex, so never a comma) joined by `,`.
/// A column holding a generation.
fn generation_col<I: rusqlite::RowIndex>(
    r: &rusqlite::Row<'_>,
    i: I,
) -> rusqlite::Result<Generation> {
    r.get::<_, String>(i).map(Generation::from)
}

/// A column holding an enum's stored text; text that names no variant is a
/// conversion failure, which reads as corrupt data.
fn enum_col<T, I>(r: &rusqlite::Row<'_>, i: I) -> rusqlite::Result<T>
where
    T: std::str::FromStr<Err = UnknownVariant>,
    I: rusqlite::RowIndex,
{
    let text: String = r.get(i)?;
    text.parse().map_err(|e: UnknownVariant| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

/// An `activations` row, read by column name.
fn activation_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Activation> {
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

fn split_digests(s: &str) -> Vec<String> {
    s.split(',')
        .filter(|d| !d.is_empty())
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(key: &EntityKey, pos: u64, id: &str) -> StoredEvent {
        StoredEvent {
            key: key.clone(),
            position: pos,
            id: id.into(),
            source: "/t".into(),
            event_type: "t".into(),
            time: None,
            data: RawJson::from_value(&json!({"n": pos})),
            origin: None,
            record: None,
            digest: Some(format!("d-{id}")),
        }
    }

    /// Two activations built on the same predecessor: the second loses,
    /// typed, and the first stays.
    #[tokio::test]
    async fn activations_are_conditional_on_their_predecessor() {
        let s = SqliteStore::in_memory().unwrap();
        let act = |digest: &str, seq: i64| Activation {
            entity_type: "account".into(),
            digest: digest.into(),
            previous: None,
            mode: refold_store::ActivationMode::Forward,
            seq,
            activated_at: "2026-01-01T00:00:00Z".into(),
            generation: Generation::base(),
            previous_generation: None,
            rolled_back: vec![],
        };
        s.put_activation(&act("d1", 1)).await.unwrap();
        let lost = s.put_activation(&act("d0", 1)).await.unwrap_err();
        assert!(matches!(Some(&lost), Some(StoreError::Fenced(_))), "{lost}");
        s.put_activation(&act("d2", 2)).await.unwrap();
        let lost = s.put_activation(&act("d3", 2)).await.unwrap_err();
        assert!(matches!(Some(&lost), Some(StoreError::Fenced(_))), "{lost}");
        let now = s.activations().await.unwrap();
        assert_eq!((now[0].digest.as_str(), now[0].seq), ("d2", 2));
    }

    fn rebuild(state: &str, heartbeat_ms: i64) -> RebuildRecord {
        RebuildRecord {
            id: "rb-account-1".into(),
            entity_type: "account".into(),
            digest: "d1".into(),
            generation: "account#d1.1".into(),
            state: state.parse().unwrap(),
            entities_done: 3,
            entities_total: 10,
            events_done: 30,
            events_total: 100,
            quarantined: 0,
            error: None,
            owner: "h/1/0".into(),
            started_at: "2026-01-01T00:00:00Z".into(),
            finished_at: None,
            heartbeat_ms,
        }
    }

    /// A rebuild record is written once, then only over the heartbeat
    /// the writer last saw.
    #[tokio::test]
    async fn rebuild_records_are_compare_and_set_on_their_heartbeat() {
        let s = SqliteStore::in_memory().unwrap();
        assert!(s.put_rebuild(&rebuild("running", 10), None).await.unwrap());
        assert!(!s.put_rebuild(&rebuild("running", 11), None).await.unwrap());
        assert!(
            s.put_rebuild(&rebuild("running", 20), Some(10))
                .await
                .unwrap()
        );
        // A writer that missed the last write loses.
        assert!(!s.put_rebuild(&rebuild("done", 30), Some(10)).await.unwrap());
        let all = s.rebuilds().await.unwrap();
        assert_eq!(all, vec![rebuild("running", 20)]);
    }

    /// A database made before rebuild records and rolled-back marks is
    /// upgraded in place, its activations kept.
    #[tokio::test]
    async fn an_older_database_is_upgraded_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE activations (entity_type TEXT PRIMARY KEY, digest TEXT NOT NULL, previous TEXT,
                     mode TEXT NOT NULL, seq INTEGER NOT NULL, activated_at TEXT NOT NULL);
                 INSERT INTO activations VALUES ('account', 'd1', NULL, 'forward', 1, '2026-01-01T00:00:00Z');
                 CREATE TABLE entities (entity_type TEXT NOT NULL, entity_id TEXT NOT NULL, state TEXT,
                     position INTEGER NOT NULL, head INTEGER NOT NULL, plugin_name TEXT, plugin_version TEXT,
                     plugin_digest TEXT, quarantined INTEGER NOT NULL DEFAULT 0,
                     PRIMARY KEY (entity_type, entity_id)) WITHOUT ROWID;",
            )
            .unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        let a = s.activations().await.unwrap();
        assert_eq!((a[0].digest.as_str(), a[0].rolled_back.len()), ("d1", 0));
        let mut next = a[0].clone();
        next.digest = "d0".into();
        next.mode = refold_store::ActivationMode::Rollback;
        next.seq = 2;
        next.rolled_back = vec!["d1".into()];
        s.put_activation(&next).await.unwrap();
        assert_eq!(s.activations().await.unwrap()[0].rolled_back, vec!["d1"]);
        assert!(s.put_rebuild(&rebuild("running", 1), None).await.unwrap());
    }

    #[tokio::test]
    async fn commit_is_atomic_and_fenced() {
        let s = SqliteStore::in_memory().unwrap();
        let k = EntityKey::new("account", "a1");
        let update = |head, expected| refold_store::EntityUpdate {
            key: k.clone(),
            state: json!({"head": head}),
            position: head,
            head,
            expected_head: expected,
            plugin: None,
            quarantined: false,
            generation: Generation::base(),
        };
        let c1 = Commit {
            events: vec![ev(&k, 1, "e1"), ev(&k, 2, "e2")],
            entities: vec![update(2, 0)],
            checkpoints: vec![Checkpoint {
                source: "f".into(),
                partition: 0,
                offset: 10,
            }],
            ..Default::default()
        };
        s.commit(c1).await.unwrap();
        assert_eq!(s.load(std::slice::from_ref(&k)).await.unwrap()[&k].head, 2);
        assert_eq!(
            s.known_ids(&[(k.clone(), "e1".into()), (k.clone(), "zz".into())])
                .await
                .unwrap()
                .len(),
            1
        );

        // A stale writer (expects head 0 again) is fenced and changes nothing.
        let stale = Commit {
            events: vec![ev(&k, 3, "e3")],
            entities: vec![update(3, 1)],
            checkpoints: vec![Checkpoint {
                source: "f".into(),
                partition: 0,
                offset: 99,
            }],
            ..Default::default()
        };
        assert!(matches!(s.commit(stale).await, Err(StoreError::Fenced(_))));
        assert_eq!(s.history(&k, 0, None).await.unwrap().len(), 2);
        assert_eq!(s.checkpoints("f").await.unwrap()[0].offset, 10);
        assert_eq!(s.history(&k, 1, Some(1)).await.unwrap().len(), 0);
    }

    /// One writer per database: a second open is refused with a reason that
    /// says so, and the lock goes with the first store.
    #[test]
    fn a_second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let first = SqliteStore::open(&path).unwrap();
        let err = SqliteStore::open(&path).err().expect("second open refused");
        assert!(
            matches!(
                err.downcast_ref::<OpenError>(),
                Some(OpenError::Locked { .. })
            ),
            "{err:#}"
        );
        assert!(err.to_string().contains("in use by another refold process"));
        drop(first);
        SqliteStore::open(&path).expect("free again once the first is gone");
    }

    /// A database deleted under a running store stops writes, typed as an
    /// outage to wait out, instead of writing into the unlinked file.
    #[tokio::test]
    async fn a_deleted_database_stops_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let s = SqliteStore::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let k = EntityKey::new("account", "a1");
        let c = Commit {
            events: vec![ev(&k, 1, "e1")],
            ..Default::default()
        };
        match s.commit(c).await {
            Err(StoreError::Unavailable(why)) => assert!(why.contains("is gone"), "{why}"),
            other => panic!("expected unavailable, got {other:?}"),
        }
    }

    /// A full disk is an outage (retried), a uniqueness conflict a lost race.
    #[test]
    fn write_errors_are_typed() {
        let full = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            None,
        );
        assert!(matches!(classify(full), StoreError::Unavailable(_)));
        let dup = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE),
            None,
        );
        assert!(matches!(classify(dup), StoreError::Fenced(_)));
    }

    /// An event row already written by someone else fails the whole commit,
    /// so no state advances past an event that this writer did not store.
    #[tokio::test]
    async fn an_event_row_written_meanwhile_fences_the_commit() {
        let s = SqliteStore::in_memory().unwrap();
        let k = EntityKey::new("account", "a1");
        let update = |head, expected| refold_store::EntityUpdate {
            key: k.clone(),
            state: json!({"head": head}),
            position: head,
            head,
            expected_head: expected,
            plugin: None,
            quarantined: false,
            generation: Generation::base(),
        };
        let c = Commit {
            events: vec![ev(&k, 1, "e1")],
            entities: vec![update(1, 0)],
            ..Default::default()
        };
        s.commit(c.clone()).await.unwrap();
        // The same event at another position, state fenced on the new head.
        let again = Commit {
            events: vec![ev(&k, 2, "e1")],
            entities: vec![update(2, 1)],
            ..Default::default()
        };
        assert!(matches!(s.commit(again).await, Err(StoreError::Fenced(_))));
        assert_eq!(s.load(std::slice::from_ref(&k)).await.unwrap()[&k].head, 1);
    }

    /// A state column that is not JSON is an error naming the entity.
    #[tokio::test]
    async fn a_rotted_state_is_an_error_not_null() {
        let s = SqliteStore::in_memory().unwrap();
        s.write(|c| {
            c.execute(
                "INSERT INTO entities (entity_type, entity_id, state, position, head) VALUES ('account', 'a1', '{rot', 1, 1)",
                [],
            )
        })
        .await
        .unwrap();
        let err = s
            .load(&[EntityKey::new("account", "a1")])
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("account/a1"), "{err:#}");
    }
}
