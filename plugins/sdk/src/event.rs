use serde::de::DeserializeOwned;

use crate::Error;

/// One event of an entity, as the host stored it (a CloudEvent).
///
/// During a `fold` the SDK fills one `Event` per batch again and again, so
/// its strings keep their allocations from one event to the next; its data
/// stays JSON bytes until [`Event::data`] decodes them straight into the
/// plugin's own type.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// CloudEvents `id`: unique per event (the host deduplicates by it).
    pub id: String,
    /// CloudEvents `type`, e.g. `"account.deposited"`.
    pub event_type: String,
    /// CloudEvents `source`.
    pub source: String,
    /// CloudEvents `time` (RFC 3339), if the producer set one.
    pub time: Option<String>,
    /// Position of this event in its entity's history (1, 2, 3, ...).
    pub position: u64,
    /// CloudEvents `data` as JSON bytes; empty means `null`.
    data: Vec<u8>,
}

impl Event {
    /// An event with this id, type and data; `source` empty, no `time`,
    /// `position` 0. Meant for tests of a plugin's [`Plugin::apply`](crate::Plugin::apply).
    pub fn new(
        id: impl Into<String>,
        event_type: impl Into<String>,
        data: serde_json::Value,
    ) -> Self {
        Event {
            id: id.into(),
            event_type: event_type.into(),
            source: String::new(),
            time: None,
            position: 0,
            // Serializing a `Value` cannot fail.
            data: serde_json::to_vec(&data).unwrap_or_default(),
        }
    }

    /// An event with nothing in it, to be filled.
    pub(crate) fn empty() -> Self {
        Event {
            id: String::new(),
            event_type: String::new(),
            source: String::new(),
            time: None,
            position: 0,
            data: Vec::new(),
        }
    }

    /// The data buffer, for the SDK to refill.
    pub(crate) fn data_mut(&mut self) -> &mut Vec<u8> {
        &mut self.data
    }

    /// CloudEvents `data` as the JSON bytes the host stored (`null` when
    /// absent).
    pub fn data_json(&self) -> &[u8] {
        if self.data.is_empty() {
            b"null"
        } else {
            &self.data
        }
    }

    /// The event's data as a `T`.
    ///
    /// When the data does not fit `T` (a field missing, a string where a
    /// number belongs, ...) the [`Error`] names the event type and says what
    /// did not fit, so `?` is all a plugin needs:
    ///
    /// ```
    /// use refold_sdk::Event;
    /// use serde_json::json;
    ///
    /// #[derive(serde::Deserialize)]
    /// struct Amount { amount: i64 }
    ///
    /// let ok = Event::new("e1", "account.deposited", json!({ "amount": 1500 }));
    /// assert_eq!(ok.data::<Amount>().unwrap().amount, 1500);
    ///
    /// let bad = Event::new("e2", "account.deposited", json!({ "amount": "12.50" }));
    /// let err = bad.data::<Amount>().err().unwrap();
    /// assert_eq!(
    ///     err.message(),
    ///     "data of account.deposited does not fit its schema: invalid type: string \"12.50\", expected i64"
    /// );
    /// ```
    ///
    /// Data that is not JSON at all gives `data of TYPE is not valid JSON: …`.
    /// Use [`serde_json::Value`] as `T` to look at data of any shape.
    pub fn data<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(self.data_json()).map_err(|e| {
            let what = match e.classify() {
                serde_json::error::Category::Data => "does not fit its schema",
                _ => "is not valid JSON",
            };
            // Data is one JSON value; where in it serde stopped says little.
            let text = e.to_string();
            let suffix = format!(" at line {} column {}", e.line(), e.column());
            let reason = text.strip_suffix(&suffix).unwrap_or(&text);
            Error::new(format!("data of {} {what}: {reason}", self.event_type))
        })
    }
}
