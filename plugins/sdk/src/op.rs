use serde::Serialize;

use crate::Error;

/// A read-model operation returned by [`Plugin::project`](crate::Plugin::project).
///
/// A projection is a named collection of JSON documents with string keys
/// that the host keeps and serves. Documents are upserted and deleted by key;
/// one entity may write several documents, and documents of several entities
/// may share a projection.
#[derive(Debug, Clone, PartialEq)]
pub enum ProjectionOp {
    /// Insert or replace the document at `key` in `projection`.
    Upsert {
        /// Projection name, e.g. `"balances"`.
        projection: String,
        /// Document key within the projection.
        key: String,
        /// The document.
        body: serde_json::Value,
    },
    /// Delete the document at `key` from `projection` (no-op if absent).
    Delete {
        /// Projection name.
        projection: String,
        /// Document key within the projection.
        key: String,
    },
}

impl ProjectionOp {
    /// Upsert `body`, serialized as JSON, at `key` in `projection`.
    ///
    /// # Panics
    ///
    /// If `body` cannot be represented as JSON (a map with non-string keys,
    /// or a `Serialize` impl that fails); that is a bug in the plugin. Use
    /// [`ProjectionOp::try_upsert`] to handle it instead.
    pub fn upsert(
        projection: impl Into<String>,
        key: impl Into<String>,
        body: &impl Serialize,
    ) -> Self {
        let projection = projection.into();
        match serde_json::to_value(body) {
            Ok(body) => ProjectionOp::Upsert {
                projection,
                key: key.into(),
                body,
            },
            Err(e) => {
                panic!("document for projection {projection} does not serialize as JSON: {e}")
            }
        }
    }

    /// Like [`ProjectionOp::upsert`], but returns an error where that panics.
    pub fn try_upsert(
        projection: impl Into<String>,
        key: impl Into<String>,
        body: &impl Serialize,
    ) -> Result<Self, Error> {
        let projection = projection.into();
        let body = serde_json::to_value(body).map_err(|e| {
            Error::new(format!(
                "document for projection {projection} does not serialize as JSON: {e}"
            ))
        })?;
        Ok(ProjectionOp::Upsert {
            projection,
            key: key.into(),
            body,
        })
    }

    /// Delete the document at `key` from `projection`.
    pub fn delete(projection: impl Into<String>, key: impl Into<String>) -> Self {
        ProjectionOp::Delete {
            projection: projection.into(),
            key: key.into(),
        }
    }
}
