use std::fmt;

/// Why an event cannot be applied: a human-readable message.
///
/// Return it from [`Plugin::apply`](crate::Plugin::apply). The SDK adds the
/// index and id of the event being applied before handing it to the host, so
/// the message only needs to say what is wrong.
///
/// ```
/// use refold_sdk::Error;
///
/// let e = Error::new(format!("withdrawal of {} exceeds the balance", 500));
/// assert_eq!(e.message(), "withdrawal of 500 exceeds the balance");
/// let e: Error = "order is not open".into();
/// assert_eq!(e.to_string(), "order is not open");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    message: String,
}

impl Error {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        Error {
            message: message.into(),
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The message, by value.
    pub fn into_message(self) -> String {
        self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<String> for Error {
    fn from(message: String) -> Self {
        Error { message }
    }
}

impl From<&str> for Error {
    fn from(message: &str) -> Self {
        Error::new(message)
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::new(e.to_string())
    }
}
