//! The store itself: opening the file (and the lock that makes this process
//! its only writer), the reader and writer connections, and the check that
//! the file is still the one opened.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use rusqlite::Connection;

use refold_store::StoreError;

use crate::error::classify;
use crate::schema;

/// SQLite-backed [`Storage`](refold_store::Storage).
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
    path: PathBuf,
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

/// Take `<db>.lock`, or say who has it.
fn lock(path: &Path) -> anyhow::Result<std::fs::File> {
    let lock_path = {
        let mut p = path.as_os_str().to_owned();
        p.push(".lock");
        PathBuf::from(p)
    };
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => Err(OpenError::Locked {
            path: path.display().to_string(),
            lock: lock_path.display().to_string(),
        }
        .into()),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(anyhow::Error::new(e).context(format!("locking {}", lock_path.display())))
        }
    }
}

/// A page cache and memory map large enough that the hot part of the
/// database is read without a system call per page.
fn tune(c: &Connection) -> rusqlite::Result<()> {
    c.pragma_update(None, "cache_size", -65_536)?; // KiB: 64 MiB
    c.pragma_update(None, "mmap_size", 268_435_456)?;
    Ok(())
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
        let lock = lock(path)?;
        let writer =
            Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        writer.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a commit that returned is on disk, even across power loss.
        writer.pragma_update(None, "synchronous", "FULL")?;
        writer.busy_timeout(std::time::Duration::from_secs(10))?;
        tune(&writer)?;
        schema::create_or_upgrade(&writer).context("creating or upgrading the schema")?;
        if max_bytes > 0 {
            let page: i64 = writer.query_row("PRAGMA page_size", [], |r| r.get("page_size"))?;
            let pages = (max_bytes / page.max(512) as u64).max(1);
            // A pragma takes no parameters; `pages` is a number computed here.
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

    /// Open an in-memory store (for unit tests of code above the store).
    pub fn in_memory() -> anyhow::Result<Self> {
        // A shared-cache in-memory db so that reader and writer see the same data.
        let name = format!(
            "file:refold-mem-{}?mode=memory&cache=shared",
            rand::random::<u64>()
        );
        let flags = rusqlite::OpenFlags::default() | rusqlite::OpenFlags::SQLITE_OPEN_URI;
        let writer = Connection::open_with_flags(&name, flags)?;
        schema::create_or_upgrade(&writer).context("creating the schema")?;
        let reader = Connection::open_with_flags(&name, flags)?;
        Ok(SqliteStore {
            writer: Arc::new(Mutex::new(writer)),
            reader: Arc::new(Mutex::new(reader)),
            file: None,
        })
    }

    /// `Unavailable` when the database file is gone or replaced: writing on
    /// would go to a file nobody can open again.
    pub(crate) fn check_file(&self) -> Result<(), StoreError> {
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

    /// Run `f` on the writer connection, off the async threads, with its
    /// error typed by the caller.
    pub(crate) async fn write_typed<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let conn = self.writer.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = conn
                .lock()
                .map_err(|_| StoreError::Other(anyhow::anyhow!("sqlite writer poisoned")))?;
            f(&mut c)
        })
        .await
        .map_err(|e| StoreError::Other(anyhow::anyhow!("sqlite writer task: {e}")))?
    }

    /// Run `f` on the writer connection; its driver error is classified.
    pub(crate) async fn write<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R, StoreError> {
        self.write_typed(move |c| f(c).map_err(classify)).await
    }

    /// Run `f` on the reader connection, in one read transaction: a
    /// consistent snapshot, and the WAL read lock is taken once rather than
    /// per statement. Its driver error is classified.
    pub(crate) async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R, StoreError> {
        let conn = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let c = conn
                .lock()
                .map_err(|_| StoreError::Other(anyhow::anyhow!("sqlite reader poisoned")))?;
            let in_tx = || -> rusqlite::Result<R> {
                let tx = c.unchecked_transaction()?;
                let r = f(&tx)?;
                tx.commit()?;
                Ok(r)
            };
            in_tx().map_err(classify)
        })
        .await
        .map_err(|e| StoreError::Other(anyhow::anyhow!("sqlite reader task: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use refold_store::{
        ActivationMode, Commit, EntityKey, PluginStore, RawJson, RebuildRecord, RebuildState,
        Storage, StoredEvent,
    };

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
        let key = EntityKey::new("account", "a1");
        let c = Commit {
            events: vec![StoredEvent {
                key,
                position: 1,
                id: "e1".into(),
                source: "/t".into(),
                event_type: "t".into(),
                time: None,
                data: RawJson::from_value(&serde_json::json!({"n": 1})),
                origin: None,
                record: None,
                digest: None,
            }],
            ..Default::default()
        };
        match s.commit(c).await {
            Err(StoreError::Unavailable(why)) => assert!(why.contains("is gone"), "{why}"),
            other => panic!("expected unavailable, got {other:?}"),
        }
    }

    /// A database at its size cap refuses a write as a full disk does: an
    /// outage to wait out, never a lost race or a verdict on the batch.
    #[tokio::test]
    async fn a_full_database_is_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open_capped(&dir.path().join("r.db"), 64 * 1024).unwrap();
        let body = "x".repeat(1 << 20);
        let c = Commit {
            dead_letters: vec![refold_store::DeadLetter {
                id: "big".into(),
                code: "too_large".into(),
                reason: "r".into(),
                payload: body,
                origin: None,
                event_id: None,
                entity_type: None,
                recorded_at: "2026-01-01T00:00:00Z".into(),
            }],
            ..Default::default()
        };
        match s.commit(c).await {
            Err(StoreError::Unavailable(why)) => assert!(why.contains("disk full"), "{why}"),
            other => panic!("expected unavailable, got {other:?}"),
        }
    }

    /// A database made before rebuild records, generations and rolled-back
    /// marks is upgraded in place, its activations kept.
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
        assert!(a[0].generation.is_base());
        let mut next = a[0].clone();
        next.digest = "d0".into();
        next.mode = ActivationMode::Rollback;
        next.seq = 2;
        next.rolled_back = vec!["d1".into()];
        s.put_activation(&next).await.unwrap();
        assert_eq!(s.activations().await.unwrap()[0].rolled_back, vec!["d1"]);
        let rebuild = RebuildRecord {
            id: "rb-account-1".into(),
            entity_type: "account".into(),
            digest: "d1".into(),
            generation: "account#d1.1".into(),
            state: RebuildState::Running,
            entities_done: 0,
            entities_total: 1,
            events_done: 0,
            events_total: 1,
            quarantined: 0,
            error: None,
            owner: "h/1/0".into(),
            started_at: "2026-01-01T00:00:00Z".into(),
            finished_at: None,
            heartbeat_ms: 1,
        };
        assert!(s.put_rebuild(&rebuild, None).await.unwrap());
    }
}
