//! A refold projection plugin: entity type `{{entity}}`.
//!
//! | event type          | data            | effect                    |
//! |---------------------|-----------------|---------------------------|
//! | `{{entity}}.added`   | `{"n": int}`    | `total += n`, `count += 1` |
//! | `{{entity}}.reset`   | anything        | `total = 0`, `count += 1` |
//! | any other type      | anything        | nothing                   |
//!
//! A negative `n`, or one that is not an integer, is a plugin error: the host
//! quarantines that entity at its state before the event.

use refold_sdk::{Descriptor, Error, Event, Plugin, ProjectionOp};
use serde::{Deserialize, Serialize};

/// The state of one entity, stored by the host as JSON.
#[derive(Debug, Serialize, Deserialize)]
pub struct Total {
    total: i64,
    count: u64,
}

#[derive(Deserialize)]
struct Added {
    n: i64,
}

/// The plugin.
#[derive(Debug)]
pub struct {{type_name}};

impl Plugin for {{type_name}} {
    type State = Total;

    fn describe() -> Descriptor {
        Descriptor {
            name: "{{name}}".into(),
            version: "0.1.0".into(),
            entity_type: "{{entity}}".into(),
            event_types: vec!["{{entity}}.added".into(), "{{entity}}.reset".into()],
            state_schema_version: 1,
        }
    }

    fn init(_entity_id: &str) -> Total {
        Total { total: 0, count: 0 }
    }

    fn apply(state: &mut Total, event: &Event) -> Result<(), Error> {
        match event.event_type.as_str() {
            "{{entity}}.added" => {
                let Added { n } = event.data()?;
                if n < 0 {
                    return Err(Error::new(format!("cannot add {n}: must not be negative")));
                }
                state.total = state
                    .total
                    .checked_add(n)
                    .ok_or_else(|| Error::new(format!("adding {n} overflows the total")))?;
                state.count += 1;
            }
            "{{entity}}.reset" => {
                state.total = 0;
                state.count += 1;
            }
            // Unknown event types leave the state unchanged.
            _ => {}
        }
        Ok(())
    }

    fn project(entity_id: &str, _before: &Total, after: &Total, _events: &[Event]) -> Vec<ProjectionOp> {
        vec![ProjectionOp::upsert(
            "totals",
            entity_id,
            &serde_json::json!({ "total": after.total }),
        )]
    }
}

refold_sdk::export!({{type_name}});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_and_resets() {
        let mut s = {{type_name}}::init("x");
        {{type_name}}::apply(&mut s, &Event::new("e1", "{{entity}}.added", serde_json::json!({"n": 5}))).unwrap();
        assert_eq!((s.total, s.count), (5, 1));
        {{type_name}}::apply(&mut s, &Event::new("e2", "{{entity}}.reset", serde_json::json!(null))).unwrap();
        assert_eq!((s.total, s.count), (0, 2));
        assert!({{type_name}}::apply(&mut s, &Event::new("e3", "{{entity}}.added", serde_json::json!({"n": -1}))).is_err());
    }
}
