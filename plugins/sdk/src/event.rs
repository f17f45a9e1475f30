use serde::de::DeserializeOwned;

use crate::Error;

/// One event of an entity, as the host stored it (a CloudEvent).
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
    /// CloudEvents `data`, parsed; [`serde_json::Value::Null`] when absent.
    pub data: serde_json::Value,
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
            data,
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
    pub fn data<T: DeserializeOwned>(&self) -> Result<T, Error> {
        T::deserialize(&self.data).map_err(|e| {
            Error::new(format!(
                "data of {} does not fit its schema: {e}",
                self.event_type
            ))
        })
    }
}
