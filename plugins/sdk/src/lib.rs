//! Write refold projection plugins in Rust.
//!
//! A refold plugin owns one entity type. The host hands it batches of one
//! entity's events; the plugin folds them into a new state (JSON) and derives
//! read-model operations from the change. Plugins are WebAssembly components
//! implementing the `projector` world of `wit/plugin.wit`; this crate hides
//! that boundary: you implement [`Plugin`] on plain Rust types and call
//! [`export!`] once.
//!
//! # Example
//!
//! ```
//! use refold_sdk::{Descriptor, Error, Event, Plugin, ProjectionOp};
//! use serde::{Deserialize, Serialize};
//!
//! /// The state of one account, stored by the host as JSON.
//! #[derive(Serialize, Deserialize)]
//! struct Account {
//!     owner: Option<String>,
//!     balance: i64,
//! }
//!
//! /// `data` of `account.opened`.
//! #[derive(Deserialize)]
//! struct Opened {
//!     owner: String,
//! }
//!
//! /// `data` of `account.deposited`.
//! #[derive(Deserialize)]
//! struct Amount {
//!     amount: i64,
//! }
//!
//! struct Bank;
//!
//! impl Plugin for Bank {
//!     type State = Account;
//!
//!     fn describe() -> Descriptor {
//!         Descriptor {
//!             name: "bank".into(),
//!             version: "1.0.0".into(),
//!             entity_type: "account".into(),
//!             event_types: vec!["account.opened".into(), "account.deposited".into()],
//!             state_schema_version: 1,
//!         }
//!     }
//!
//!     fn init(_entity_id: &str) -> Account {
//!         Account { owner: None, balance: 0 }
//!     }
//!
//!     fn apply(state: &mut Account, event: &Event) -> Result<(), Error> {
//!         match event.event_type.as_str() {
//!             "account.opened" => state.owner = Some(event.data::<Opened>()?.owner),
//!             "account.deposited" => {
//!                 let Amount { amount } = event.data()?;
//!                 if amount <= 0 {
//!                     return Err(Error::new(format!("deposit of {amount}: must be positive")));
//!                 }
//!                 state.balance += amount;
//!             }
//!             // Event types a plugin does not know leave the state unchanged.
//!             _ => {}
//!         }
//!         Ok(())
//!     }
//!
//!     fn project(entity_id: &str, _before: &Account, after: &Account, _events: &[Event]) -> Vec<ProjectionOp> {
//!         match &after.owner {
//!             Some(owner) => vec![ProjectionOp::upsert(
//!                 "balances",
//!                 owner.as_str(),
//!                 &serde_json::json!({ "account": entity_id, "balance": after.balance }),
//!             )],
//!             None => Vec::new(),
//!         }
//!     }
//! }
//!
//! refold_sdk::export!(Bank);
//! # fn main() {}
//! ```
//!
//! Build it as a `cdylib` for `wasm32-wasip2`; the `.wasm` that cargo writes
//! is the component the host loads:
//!
//! ```toml
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! refold-sdk = { path = "../sdk" }
//! serde = { version = "1", features = ["derive"] }
//! serde_json = "1"
//! ```
//!
//! ```text
//! cargo build --release --target wasm32-wasip2
//! ```
//!
//! # What the SDK does for you
//!
//! * **`init`** encodes [`Plugin::init`] as JSON.
//! * **`fold`** decodes the stored state into [`Plugin::State`], then for each
//!   event of the batch, in order: fills one reused [`Event`] from the
//!   host's `event-batch` (checking every span against the batch's bytes),
//!   and calls [`Plugin::apply`]. The event's data stays JSON bytes until
//!   [`Event::data`] decodes it straight into your type. It stops at the
//!   first failing event and reports it to the host with that event's index
//!   and id, so the host can quarantine the entity at the state before it.
//!   Otherwise it encodes the new state. The whole batch is one call into the
//!   plugin.
//! * **`project`** decodes both states and the events and calls
//!   [`Plugin::project`].
//!
//! Failures reported as a plugin error (the host quarantines the entity):
//!
//! * [`Plugin::apply`] returned an [`Error`], for example from
//!   [`Event::data`] when the event's data does not fit its schema;
//! * an event's data bytes, when [`Event::data`] reads them, are not valid
//!   JSON;
//! * the host sent a batch the SDK cannot read (a span past its bytes, a
//!   string that is not UTF-8): the event concerned fails, nothing panics;
//! * the stored state does not decode as [`Plugin::State`] (reported at event
//!   index 0, since no event of the batch could be applied).
//!
//! A panic in a plugin is not a plugin error but a trap: std's panic hook
//! writes the message to stderr, which the host captures, and the call fails.
//!
//! # Determinism
//!
//! The host replays history through `fold`, so a fold must be a pure function
//! of the state and the events. The host grants no clock, randomness, files,
//! environment or network; do not try to work around that. Prefer ordered
//! collections (`BTreeMap`) in states so that the same state always encodes to
//! the same bytes.
#![deny(missing_docs)]
#![deny(unsafe_code)]

mod error;
mod event;
mod glue;
pub mod log;
mod op;

pub use error::Error;
pub use event::Event;
pub use op::ProjectionOp;
/// The `serde_json` this SDK is built with ([`Event::new`] takes a
/// [`serde_json::Value`]).
pub use serde_json;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// What a plugin says about itself; returned by [`Plugin::describe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// Plugin name, e.g. `"bank"`.
    pub name: String,
    /// Plugin version (semver), e.g. `"1.2.0"`.
    pub version: String,
    /// The one entity type this plugin owns, e.g. `"account"`.
    pub entity_type: String,
    /// Event types it understands. Events of other types are still passed to
    /// [`Plugin::apply`] and must leave the state unchanged.
    pub event_types: Vec<String>,
    /// Version of the state's JSON schema; bump it when the shape changes.
    pub state_schema_version: u32,
}

/// A projection plugin: a fold of one entity type's events into a state, plus
/// the read-model operations derived from each change.
///
/// Implement it on a unit struct and export it with [`export!`]. All
/// functions are associated functions (no `self`): a plugin keeps no data
/// between calls, everything it needs is in the state and the events.
pub trait Plugin {
    /// The state of one entity. It is stored by the host as the JSON that
    /// serde makes of it, and must decode from what it encoded.
    type State: Serialize + DeserializeOwned;

    /// Who the plugin is and what it owns.
    fn describe() -> Descriptor;

    /// The state of entity `entity_id` before its first event.
    fn init(entity_id: &str) -> Self::State;

    /// Apply one event to the state.
    ///
    /// Return an [`Error`] when the event cannot be applied (its data does
    /// not fit the event's schema, or it breaks an invariant): the batch stops
    /// there, the changes made so far are discarded, and the host quarantines
    /// the entity at its state before that event. Event types the plugin does
    /// not know must leave the state unchanged and return `Ok(())`.
    fn apply(state: &mut Self::State, event: &Event) -> Result<(), Error>;

    /// Read-model operations for a batch of `events` that moved entity
    /// `entity_id` from `before` to `after`. Defaults to none.
    fn project(
        entity_id: &str,
        before: &Self::State,
        after: &Self::State,
        events: &[Event],
    ) -> Vec<ProjectionOp> {
        let _ = (entity_id, before, after, events);
        Vec::new()
    }
}

/// Export a [`Plugin`] as the component's implementation of the `projector`
/// world. Call it once, at the top level of the plugin crate:
///
/// ```
/// # use refold_sdk::{Descriptor, Error, Event, Plugin};
/// # struct Counter;
/// # impl Plugin for Counter {
/// #     type State = u64;
/// #     fn describe() -> Descriptor {
/// #         Descriptor { name: "counter".into(), version: "1.0.0".into(), entity_type: "counter".into(),
/// #                      event_types: vec![], state_schema_version: 1 }
/// #     }
/// #     fn init(_: &str) -> u64 { 0 }
/// #     fn apply(n: &mut u64, _: &Event) -> Result<(), Error> { *n += 1; Ok(()) }
/// # }
/// refold_sdk::export!(Counter);
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! export {
    ($plugin:ty) => {
        const _: () = {
            type __RefoldExport = $crate::__private::Adapter<$plugin>;
            $crate::__private::bindings::export!(
                __RefoldExport with_types_in $crate::__private::bindings
            );
        };
    };
}

/// Not public API: used by [`export!`].
#[doc(hidden)]
pub mod __private {
    pub use crate::bindings;
    pub use crate::glue::Adapter;
    pub use crate::glue::fold;
}

/// Bindings generated from `wit/plugin.wit`: the only place `generate!` runs.
/// Their types stay behind the SDK's own; see `glue` for the conversions.
#[allow(missing_docs, unsafe_code, clippy::all)]
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "projector",
        pub_export_macro: true,
        default_bindings_module: "refold_sdk::bindings",
    });
}
