//! Plain data shared by every part of the host: what an event is as it
//! arrives ([`event`]) and as it is kept ([`record`]), where it came from,
//! which plugin version and generation a state belongs to ([`generation`]),
//! and the clock ([`clock`]). No I/O, no engine, no store.

pub mod clock;
pub mod digest;
pub mod event;
pub mod generation;
pub mod record;

pub use digest::{digest_of, stable_hash};
pub use event::{EntityKey, Envelope, RawJson, Rejection};
pub use generation::Generation;
pub use record::{Checkpoint, EventIdentity, Origin, PluginRef, ProjectionWrite, StoredEvent};
