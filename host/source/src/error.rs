//! How a source says that it could not deliver, and whether to retry.

use crate::fault;

/// Why a source could not deliver a batch. `next_batch` returns it inside its
/// `anyhow::Error` (find it with [`SourceError::of`] or [`is_transient`]).
///
/// Either way nothing was handed out and nothing was skipped: the next call
/// resumes exactly where the last delivered batch ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// Likely to clear up by itself (a followed file that does not exist
    /// yet or was deleted, a permission being fixed, the process out of file
    /// descriptors, an I/O error): call `next_batch` again, after a pause.
    #[error("source unavailable: {reason}")]
    Transient {
        /// What is wrong, naming the file.
        reason: String,
    },
    /// Will not clear up without a change of configuration (a file that is
    /// not followed and does not exist, a directory given as an input file).
    #[error("source failed: {reason}")]
    Fatal {
        /// What is wrong, naming the file.
        reason: String,
    },
}

impl SourceError {
    /// The `SourceError` somewhere in `e`'s chain, if any.
    pub fn of(e: &anyhow::Error) -> Option<&SourceError> {
        e.chain().find_map(|c| c.downcast_ref::<SourceError>())
    }

    /// Retrying can help.
    pub fn is_transient(&self) -> bool {
        matches!(self, SourceError::Transient { .. })
    }

    /// What is wrong.
    pub fn reason(&self) -> &str {
        match self {
            SourceError::Transient { reason } | SourceError::Fatal { reason } => reason,
        }
    }
}

/// The caller should wait and call `next_batch` again rather than stop: `e`
/// carries a [`SourceError::Transient`], or, from a source that does not
/// type its errors (librdkafka's), an I/O error of the machine.
pub fn is_transient(e: &anyhow::Error) -> bool {
    match SourceError::of(e) {
        Some(se) => se.is_transient(),
        None => fault::io_transient(e),
    }
}
