//! The boundary between the generated bindings and [`Plugin`]: bytes in,
//! bytes out. Everything a plugin author would otherwise repeat lives here.

use std::marker::PhantomData;

use serde::Serialize;

use crate::bindings::Guest;
use crate::bindings::refold::plugin::types as wit;
use crate::{Descriptor, Event, Plugin, ProjectionOp};

/// Implements the world's exports for a [`Plugin`]; named by [`export!`](crate::export).
pub struct Adapter<P>(PhantomData<P>);

impl<P> std::fmt::Debug for Adapter<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Adapter")
    }
}

impl<P: Plugin> Guest for Adapter<P> {
    fn describe() -> wit::Descriptor {
        let Descriptor {
            name,
            version,
            entity_type,
            event_types,
            state_schema_version,
        } = P::describe();
        wit::Descriptor {
            name,
            version,
            entity_type,
            event_types,
            state_schema_version,
        }
    }

    fn init(entity_id: String) -> Vec<u8> {
        encode_state(&P::init(&entity_id))
    }

    fn fold(
        _entity_id: String,
        state: Vec<u8>,
        events: Vec<wit::Event>,
    ) -> Result<Vec<u8>, wit::PluginError> {
        fold::<P>(&state, events)
    }

    fn project(
        entity_id: String,
        state_before: Vec<u8>,
        state_after: Vec<u8>,
        events: Vec<wit::Event>,
    ) -> Result<Vec<wit::ProjectionOp>, wit::PluginError> {
        project::<P>(&entity_id, &state_before, &state_after, events)
    }
}

/// `fold`: decode the state, apply each event in order, stop at the first
/// failure, encode the state.
pub(crate) fn fold<P: Plugin>(
    state: &[u8],
    events: Vec<wit::Event>,
) -> Result<Vec<u8>, wit::PluginError> {
    let first_id = events.first().map(|e| e.id.clone()).unwrap_or_default();
    let mut state: P::State = decode_state::<P>(state, "state", &first_id)?;
    for (index, raw) in events.into_iter().enumerate() {
        let event = decode_event(index, raw)?;
        P::apply(&mut state, &event)
            .map_err(|e| plugin_error(index, &event.id, e.into_message()))?;
    }
    Ok(encode_state(&state))
}

/// `project`: decode both states and the events, ask the plugin, convert.
pub(crate) fn project<P: Plugin>(
    entity_id: &str,
    before: &[u8],
    after: &[u8],
    events: Vec<wit::Event>,
) -> Result<Vec<wit::ProjectionOp>, wit::PluginError> {
    let first_id = events.first().map(|e| e.id.clone()).unwrap_or_default();
    let before: P::State = decode_state::<P>(before, "state-before", &first_id)?;
    let after: P::State = decode_state::<P>(after, "state-after", &first_id)?;
    let events = events
        .into_iter()
        .enumerate()
        .map(|(index, raw)| decode_event(index, raw))
        .collect::<Result<Vec<_>, _>>()?;
    let ops = P::project(entity_id, &before, &after, &events);
    Ok(ops.into_iter().map(encode_op).collect())
}

fn plugin_error(index: usize, event_id: &str, message: String) -> wit::PluginError {
    wit::PluginError {
        event_index: u32::try_from(index).unwrap_or(u32::MAX),
        event_id: event_id.to_owned(),
        message,
    }
}

/// A state that does not decode is reported at event index 0: no event of
/// the batch could be applied to it.
fn decode_state<P: Plugin>(
    bytes: &[u8],
    what: &str,
    first_event_id: &str,
) -> Result<P::State, wit::PluginError> {
    serde_json::from_slice(bytes).map_err(|e| {
        let version = P::describe().state_schema_version;
        plugin_error(
            0,
            first_event_id,
            format!(
                "{what} does not decode as this plugin's state (schema version {version}): {e}"
            ),
        )
    })
}

/// The WIT says absent data is `null`; empty bytes are read the same way.
fn decode_event(index: usize, raw: wit::Event) -> Result<Event, wit::PluginError> {
    let data = if raw.data.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&raw.data).map_err(|e| {
            plugin_error(
                index,
                &raw.id,
                format!("data of {} is not valid JSON: {e}", raw.event_type),
            )
        })?
    };
    Ok(Event {
        id: raw.id,
        event_type: raw.event_type,
        source: raw.source,
        time: raw.time,
        position: raw.position,
        data,
    })
}

/// A state that does not serialize is a bug in the plugin, not a property of
/// an event, so it traps (with the message on stderr) rather than quarantine.
fn encode_state<S: Serialize>(state: &S) -> Vec<u8> {
    match serde_json::to_vec(state) {
        Ok(bytes) => bytes,
        Err(e) => panic!("state does not serialize as JSON: {e}"),
    }
}

fn encode_op(op: ProjectionOp) -> wit::ProjectionOp {
    match op {
        ProjectionOp::Upsert {
            projection,
            key,
            body,
        } => wit::ProjectionOp::Upsert(wit::Document {
            projection,
            key,
            // Serializing a `Value` cannot fail.
            body: serde_json::to_vec(&body).unwrap_or_default(),
        }),
        ProjectionOp::Delete { projection, key } => wit::ProjectionOp::Delete((projection, key)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Total {
        sum: i64,
        seen: Vec<String>,
    }

    struct Adder;

    #[derive(Deserialize)]
    struct Add {
        n: i64,
    }

    impl Plugin for Adder {
        type State = Total;
        fn describe() -> Descriptor {
            Descriptor {
                name: "adder".into(),
                version: "0.1.0".into(),
                entity_type: "counter".into(),
                event_types: vec!["add".into()],
                state_schema_version: 3,
            }
        }
        fn init(_: &str) -> Total {
            Total {
                sum: 0,
                seen: vec![],
            }
        }
        fn apply(state: &mut Total, event: &Event) -> Result<(), Error> {
            state.seen.push(event.id.clone());
            if event.event_type == "add" {
                let Add { n } = event.data()?;
                if n < 0 {
                    return Err(format!("negative: {n}").into());
                }
                state.sum += n;
            }
            Ok(())
        }
        fn project(
            entity_id: &str,
            before: &Total,
            after: &Total,
            events: &[Event],
        ) -> Vec<ProjectionOp> {
            vec![
                ProjectionOp::upsert(
                    "sums",
                    entity_id,
                    &json!({ "from": before.sum, "to": after.sum, "n": events.len() }),
                ),
                ProjectionOp::delete("old", entity_id),
            ]
        }
    }

    fn ev(id: &str, ty: &str, data: &str) -> wit::Event {
        wit::Event {
            id: id.into(),
            event_type: ty.into(),
            source: "/test".into(),
            time: None,
            position: 1,
            data: data.as_bytes().to_vec(),
        }
    }

    fn total(bytes: &[u8]) -> Total {
        serde_json::from_slice(bytes).unwrap()
    }

    #[test]
    fn init_and_describe_cross_the_boundary() {
        assert_eq!(
            total(&Adapter::<Adder>::init("c1".into())),
            Total {
                sum: 0,
                seen: vec![]
            }
        );
        let d = Adapter::<Adder>::describe();
        assert_eq!(
            (d.entity_type.as_str(), d.state_schema_version),
            ("counter", 3)
        );
    }

    #[test]
    fn folds_a_batch_in_order() {
        let state = br#"{"sum":1,"seen":[]}"#;
        let out = fold::<Adder>(
            state,
            vec![
                ev("a", "add", r#"{"n":2}"#),
                ev("b", "other", ""),
                ev("c", "add", r#"{"n":3}"#),
            ],
        )
        .unwrap();
        assert_eq!(
            total(&out),
            Total {
                sum: 6,
                seen: vec!["a".into(), "b".into(), "c".into()]
            }
        );
    }

    #[test]
    fn stops_at_the_first_failing_event() {
        let state = br#"{"sum":0,"seen":[]}"#;
        let err = fold::<Adder>(
            state,
            vec![
                ev("a", "add", r#"{"n":2}"#),
                ev("b", "add", r#"{"n":-1}"#),
                ev("c", "add", "not json"),
            ],
        )
        .unwrap_err();
        assert_eq!(
            (err.event_index, err.event_id.as_str(), err.message.as_str()),
            (1, "b", "negative: -1")
        );
    }

    #[test]
    fn schema_mismatch_names_the_event_type() {
        let err = fold::<Adder>(
            br#"{"sum":0,"seen":[]}"#,
            vec![ev("a", "add", r#"{"n":"12.50"}"#)],
        )
        .unwrap_err();
        assert_eq!(err.event_index, 0);
        assert_eq!(
            err.message,
            r#"data of add does not fit its schema: invalid type: string "12.50", expected i64"#
        );
    }

    #[test]
    fn invalid_json_data_fails_that_event() {
        let err = fold::<Adder>(
            br#"{"sum":0,"seen":[]}"#,
            vec![ev("a", "add", r#"{"n":1}"#), ev("b", "x", "{")],
        )
        .unwrap_err();
        assert_eq!((err.event_index, err.event_id.as_str()), (1, "b"));
        assert!(
            err.message.starts_with("data of x is not valid JSON: "),
            "{}",
            err.message
        );
    }

    #[test]
    fn undecodable_state_fails_at_index_zero() {
        let err = fold::<Adder>(br#"{"total":0}"#, vec![ev("a", "add", r#"{"n":1}"#)]).unwrap_err();
        assert_eq!((err.event_index, err.event_id.as_str()), (0, "a"));
        assert!(
            err.message.starts_with(
                "state does not decode as this plugin's state (schema version 3): missing field"
            ),
            "{}",
            err.message
        );
        // An empty batch still checks (and normalizes) the state.
        assert!(fold::<Adder>(b"[]", vec![]).is_err());
        assert_eq!(
            total(&fold::<Adder>(br#"{ "seen": [], "sum": 4 }"#, vec![]).unwrap()).sum,
            4
        );
    }

    #[test]
    fn project_converts_ops() {
        let before = br#"{"sum":1,"seen":[]}"#;
        let after = br#"{"sum":5,"seen":[]}"#;
        let ops =
            project::<Adder>("c1", before, after, vec![ev("a", "add", r#"{"n":4}"#)]).unwrap();
        match &ops[..] {
            [
                wit::ProjectionOp::Upsert(doc),
                wit::ProjectionOp::Delete((p, k)),
            ] => {
                assert_eq!((doc.projection.as_str(), doc.key.as_str()), ("sums", "c1"));
                assert_eq!(
                    serde_json::from_slice::<serde_json::Value>(&doc.body).unwrap(),
                    json!({"from":1,"to":5,"n":1})
                );
                assert_eq!((p.as_str(), k.as_str()), ("old", "c1"));
            }
            other => panic!("unexpected ops: {other:?}"),
        }
        let err = project::<Adder>("c1", before, b"nope", vec![]).unwrap_err();
        assert!(
            err.message.starts_with("state-after does not decode"),
            "{}",
            err.message
        );
    }
}
