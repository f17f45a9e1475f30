//! The embedded backend: one SQLite file in WAL mode.
//!
//! A batch commits in one transaction, so raw events, states, projections,
//! dead letters and the source checkpoint advance together: after a crash
//! the pipeline re-reads from the checkpoint and finds exactly what it left.
//!
//! Modules, leaves first: `schema` (tables and upgrades), `error` (driver
//! errors classified into `StoreError`), `rows` (rows read by column name),
//! `open` (the store: file, lock, connections), then one module per trait:
//! `events`, `state`, `commit`, `plugins`. Every statement binds its values
//! by name (`:column`).

mod commit;
mod error;
mod events;
mod open;
mod plugins;
mod rows;
mod schema;
mod state;

pub use open::{OpenError, SqliteStore};
