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
        events: wit::EventBatch,
    ) -> Result<Vec<u8>, wit::PluginError> {
        fold::<P>(&state, &events.bytes, &events.events)
    }

    fn project(
        entity_id: String,
        state_before: Vec<u8>,
        state_after: Vec<u8>,
        events: wit::EventBatch,
    ) -> Result<Vec<wit::ProjectionOp>, wit::PluginError> {
        project::<P>(
            &entity_id,
            &state_before,
            &state_after,
            &events.bytes,
            &events.events,
        )
    }
}

/// `fold`: decode the state, apply each event in order, stop at the first
/// failure, encode the state. `bytes` and `headers` are the two halves of
/// an `event-batch`.
///
/// One [`Event`] is refilled for every event of the batch, so that applying
/// an event allocates nothing once its strings have grown.
pub fn fold<P: Plugin>(
    state: &[u8],
    bytes: &[u8],
    headers: &[wit::EventHeader],
) -> Result<Vec<u8>, wit::PluginError> {
    let mut state: P::State = decode_state::<P>(state, "state", first_id(bytes, headers))?;
    let mut event = Event::empty();
    for (index, header) in headers.iter().enumerate() {
        fill(&mut event, bytes, header).map_err(|m| malformed(index, bytes, header, m))?;
        P::apply(&mut state, &event)
            .map_err(|e| plugin_error(index, &event.id, e.into_message()))?;
    }
    Ok(encode_state(&state))
}

/// `project`: decode both states and the events, ask the plugin, convert.
pub fn project<P: Plugin>(
    entity_id: &str,
    before: &[u8],
    after: &[u8],
    bytes: &[u8],
    headers: &[wit::EventHeader],
) -> Result<Vec<wit::ProjectionOp>, wit::PluginError> {
    let first = first_id(bytes, headers);
    let before: P::State = decode_state::<P>(before, "state-before", first)?;
    let after: P::State = decode_state::<P>(after, "state-after", first)?;
    let events = headers
        .iter()
        .enumerate()
        .map(|(index, header)| {
            let mut event = Event::empty();
            fill(&mut event, bytes, header).map_err(|m| malformed(index, bytes, header, m))?;
            Ok(event)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let ops = P::project(entity_id, &before, &after, &events);
    Ok(ops.into_iter().map(encode_op).collect())
}

/// The bytes of `span`, or why it does not fit in `bytes`. The host builds
/// the batch, but the SDK still never indexes out of bounds on its word.
fn slice(bytes: &[u8], span: wit::Span) -> Result<&[u8], String> {
    let start = span.offset as usize;
    start
        .checked_add(span.len as usize)
        .and_then(|end| bytes.get(start..end))
        .ok_or_else(|| {
            format!(
                "span {}+{} ends past the batch's {} bytes",
                span.offset,
                span.len,
                bytes.len()
            )
        })
}

fn text<'a>(bytes: &'a [u8], span: wit::Span, field: &str) -> Result<&'a str, String> {
    let raw = slice(bytes, span).map_err(|e| format!("{field}: {e}"))?;
    std::str::from_utf8(raw).map_err(|e| format!("{field} is not UTF-8: {e}"))
}

fn set(buf: &mut String, value: &str) {
    buf.clear();
    buf.push_str(value);
}

/// Refill `event` from one header, keeping its allocations. Every span is
/// checked before anything is written.
fn fill(event: &mut Event, bytes: &[u8], h: &wit::EventHeader) -> Result<(), String> {
    let id = text(bytes, h.id, "id")?;
    let event_type = text(bytes, h.event_type, "type")?;
    let source = text(bytes, h.source, "source")?;
    let time = match h.time {
        Some(span) => Some(text(bytes, span, "time")?),
        None => None,
    };
    let data = slice(bytes, h.data).map_err(|e| format!("data: {e}"))?;
    set(&mut event.id, id);
    set(&mut event.event_type, event_type);
    set(&mut event.source, source);
    match (time, &mut event.time) {
        (Some(t), Some(buf)) => set(buf, t),
        (t, slot) => *slot = t.map(str::to_owned),
    }
    event.position = h.position;
    let buf = event.data_mut();
    buf.clear();
    buf.extend_from_slice(data);
    Ok(())
}

/// A header the SDK cannot read fails its event, named by index; the id is
/// given when it can be read.
fn malformed(
    index: usize,
    bytes: &[u8],
    h: &wit::EventHeader,
    message: String,
) -> wit::PluginError {
    let id = text(bytes, h.id, "id").unwrap_or_default();
    plugin_error(
        index,
        id,
        format!("malformed event from the host: {message}"),
    )
}

fn first_id<'a>(bytes: &'a [u8], headers: &[wit::EventHeader]) -> &'a str {
    headers
        .first()
        .and_then(|h| text(bytes, h.id, "id").ok())
        .unwrap_or_default()
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

    struct Ev<'a> {
        id: &'a str,
        ty: &'a str,
        time: Option<&'a str>,
        data: &'a str,
    }

    fn ev<'a>(id: &'a str, ty: &'a str, data: &'a str) -> Ev<'a> {
        Ev {
            id,
            ty,
            time: None,
            data,
        }
    }

    fn span(bytes: &mut Vec<u8>, field: &str) -> wit::Span {
        let offset = bytes.len() as u32;
        bytes.extend_from_slice(field.as_bytes());
        wit::Span {
            offset,
            len: field.len() as u32,
        }
    }

    /// The batch as the host encodes it.
    fn batch(events: Vec<Ev>) -> wit::EventBatch {
        let mut bytes = Vec::new();
        let mut headers = Vec::new();
        for (i, e) in events.iter().enumerate() {
            headers.push(wit::EventHeader {
                id: span(&mut bytes, e.id),
                event_type: span(&mut bytes, e.ty),
                source: span(&mut bytes, "/test"),
                time: e.time.map(|t| span(&mut bytes, t)),
                data: span(&mut bytes, e.data),
                position: i as u64 + 1,
            });
        }
        wit::EventBatch {
            bytes,
            events: headers,
        }
    }

    fn run_fold(state: &[u8], events: Vec<Ev>) -> Result<Vec<u8>, wit::PluginError> {
        let b = batch(events);
        fold::<Adder>(state, &b.bytes, &b.events)
    }

    fn run_project(
        before: &[u8],
        after: &[u8],
        events: Vec<Ev>,
    ) -> Result<Vec<wit::ProjectionOp>, wit::PluginError> {
        let b = batch(events);
        project::<Adder>("c1", before, after, &b.bytes, &b.events)
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
        let out = run_fold(
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
        let err = run_fold(
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
        let err = run_fold(
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
        let err = run_fold(
            br#"{"sum":0,"seen":[]}"#,
            vec![ev("a", "add", r#"{"n":1}"#), ev("b", "add", "{")],
        )
        .unwrap_err();
        assert_eq!((err.event_index, err.event_id.as_str()), (1, "b"));
        assert!(
            err.message.starts_with("data of add is not valid JSON: "),
            "{}",
            err.message
        );
        // Data is decoded when the plugin reads it: an event type the plugin
        // ignores does not look at its data.
        let out = run_fold(br#"{"sum":0,"seen":[]}"#, vec![ev("b", "x", "{")]).unwrap();
        assert_eq!(total(&out).seen, vec!["b".to_owned()]);
    }

    #[test]
    fn fields_cross_intact_and_the_event_is_refilled() {
        struct Seen;
        impl Plugin for Seen {
            type State = Vec<String>;
            fn describe() -> Descriptor {
                Adder::describe()
            }
            fn init(_: &str) -> Vec<String> {
                vec![]
            }
            fn apply(state: &mut Vec<String>, e: &Event) -> Result<(), Error> {
                state.push(format!(
                    "{}|{}|{}|{:?}|{}|{}",
                    e.id,
                    e.event_type,
                    e.source,
                    e.time,
                    e.position,
                    String::from_utf8_lossy(e.data_json())
                ));
                Ok(())
            }
        }
        let mut events = vec![
            ev("é1", "t", r#"{"k":"v"}"#),
            ev("2", "longer type", ""),
            ev("3", "t", "null"),
        ];
        events[0].time = Some("2025-01-01T00:00:00Z");
        let b = batch(events);
        let out = fold::<Seen>(b"[]", &b.bytes, &b.events).unwrap();
        let seen: Vec<String> = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            seen,
            [
                r#"é1|t|/test|Some("2025-01-01T00:00:00Z")|1|{"k":"v"}"#,
                "2|longer type|/test|None|2|null",
                "3|t|/test|None|3|null",
            ]
        );
    }

    #[test]
    fn malformed_batches_from_the_host_are_plugin_errors_not_panics() {
        let state = br#"{"sum":0,"seen":[]}"#;
        let good = batch(vec![
            ev("a", "add", r#"{"n":1}"#),
            ev("b", "add", r#"{"n":2}"#),
        ]);
        let far = wit::Span {
            offset: u32::MAX,
            len: u32::MAX,
        };
        let past = wit::Span {
            offset: 0,
            len: good.bytes.len() as u32 + 1,
        };
        type Edit = fn(&mut wit::EventHeader, wit::Span);
        let edits: [(&str, Edit); 5] = [
            ("id", |h, s| h.id = s),
            ("type", |h, s| h.event_type = s),
            ("source", |h, s| h.source = s),
            ("time", |h, s| h.time = Some(s)),
            ("data", |h, s| h.data = s),
        ];
        for (field, edit) in edits {
            for bad in [far, past] {
                let mut headers: Vec<wit::EventHeader> = good
                    .events
                    .iter()
                    .map(|h| wit::EventHeader { ..*h })
                    .collect();
                edit(&mut headers[1], bad);
                let err = fold::<Adder>(state, &good.bytes, &headers).unwrap_err();
                assert_eq!(err.event_index, 1, "{field}");
                assert!(
                    err.message
                        .starts_with(&format!("malformed event from the host: {field}: span ")),
                    "{}",
                    err.message
                );
                let err = project::<Adder>("c1", state, state, &good.bytes, &headers).unwrap_err();
                assert_eq!(err.event_index, 1, "{field}");
            }
        }
        // Strings must be UTF-8.
        let mut bytes = good.bytes.clone();
        let id = good.events[0].id;
        bytes[id.offset as usize] = 0xff;
        let err = fold::<Adder>(state, &bytes, &good.events).unwrap_err();
        assert_eq!((err.event_index, err.event_id.as_str()), (0, ""));
        assert!(err.message.contains("id is not UTF-8"), "{}", err.message);
        // Headers but no bytes at all.
        assert!(fold::<Adder>(state, &[], &good.events).is_err());
    }

    #[test]
    fn undecodable_state_fails_at_index_zero() {
        let err = run_fold(br#"{"total":0}"#, vec![ev("a", "add", r#"{"n":1}"#)]).unwrap_err();
        assert_eq!((err.event_index, err.event_id.as_str()), (0, "a"));
        assert!(
            err.message.starts_with(
                "state does not decode as this plugin's state (schema version 3): missing field"
            ),
            "{}",
            err.message
        );
        // An empty batch still checks (and normalizes) the state.
        assert!(run_fold(b"[]", vec![]).is_err());
        assert_eq!(
            total(&run_fold(br#"{ "seen": [], "sum": 4 }"#, vec![]).unwrap()).sum,
            4
        );
    }

    #[test]
    fn project_converts_ops() {
        let before = br#"{"sum":1,"seen":[]}"#;
        let after = br#"{"sum":5,"seen":[]}"#;
        let ops = run_project(before, after, vec![ev("a", "add", r#"{"n":4}"#)]).unwrap();
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
        let err = run_project(before, b"nope", vec![]).unwrap_err();
        assert!(
            err.message.starts_with("state-after does not decode"),
            "{}",
            err.message
        );
    }
}
