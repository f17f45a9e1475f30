//! The driver's errors classified as [`StoreError`]s: what means "not
//! reachable now" is an outage (`Unavailable`, retried by reads), a lost
//! condition is `Fenced` (decided by the callers), stored text that reads
//! back as nothing known is `Corrupt`, and the rest is `Other`.

use scylla::errors::{
    DbError, ExecutionError, NextPageError, NextRowError, PagerExecutionError, PrepareError,
    RequestAttemptError, RequestError,
};
use scylla::response::query_result::QueryResult;
use scylla::value::{CqlValue, Row};

use refold_store::{StoreError, UnknownVariant};

/// Any other driver error, kept whole.
pub(crate) fn other<E: std::error::Error + Send + Sync + 'static>(e: E) -> StoreError {
    StoreError::Other(anyhow::Error::new(e))
}

/// An enum read back from its stored text; text that names no variant is
/// corrupt data, never a default.
pub(crate) fn stored<T: std::str::FromStr<Err = UnknownVariant>>(
    text: &str,
) -> Result<T, StoreError> {
    text.parse()
        .map_err(|e: UnknownVariant| StoreError::Corrupt(e.to_string()))
}

/// `[applied]` of a conditional statement's result.
pub(crate) fn applied(r: QueryResult) -> Result<bool, StoreError> {
    let rows = r.into_rows_result().map_err(other)?;
    let row: Option<Row> = rows.maybe_first_row().map_err(other)?;
    match row.as_ref().and_then(|r| r.columns.first()) {
        Some(Some(CqlValue::Boolean(b))) => Ok(*b),
        _ => Err(StoreError::Other(anyhow::anyhow!(
            "a conditional write returned no [applied] column"
        ))),
    }
}

/// A failure that retrying later can cure: the node is down, overloaded,
/// unreachable or timed out (for a conditional write: outcome unknown, which
/// the fence sorts out on the retry).
fn transient_attempt(e: &RequestAttemptError) -> bool {
    match e {
        RequestAttemptError::BrokenConnectionError(_)
        | RequestAttemptError::UnableToAllocStreamId => true,
        RequestAttemptError::DbError(db, _) => matches!(
            db,
            DbError::Unavailable { .. }
                | DbError::Overloaded
                | DbError::IsBootstrapping
                | DbError::ReadTimeout { .. }
                | DbError::WriteTimeout { .. }
                | DbError::ReadFailure { .. }
                | DbError::WriteFailure { .. }
                | DbError::TruncateError
                | DbError::ServerError
                | DbError::RateLimitReached { .. }
        ),
        _ => false,
    }
}

fn transient_prepare(e: &PrepareError) -> bool {
    match e {
        PrepareError::ConnectionPoolError(_) => true,
        PrepareError::AllAttemptsFailed { first_attempt } => transient_attempt(first_attempt),
        _ => false,
    }
}

fn transient_exec(e: &ExecutionError) -> bool {
    match e {
        ExecutionError::ConnectionPoolError(_)
        | ExecutionError::RequestTimeout(_)
        | ExecutionError::EmptyPlan
        | ExecutionError::UseKeyspaceError(_)
        | ExecutionError::SchemaAgreementError(_)
        | ExecutionError::MetadataError(_) => true,
        ExecutionError::PrepareError(p) => transient_prepare(p),
        ExecutionError::LastAttemptError(a) => transient_attempt(a),
        _ => false,
    }
}

fn transient_page(e: &NextPageError) -> bool {
    match e {
        NextPageError::RequestFailure(r) => match r {
            RequestError::EmptyPlan
            | RequestError::ConnectionPoolError(_)
            | RequestError::RequestTimeout(_) => true,
            RequestError::LastAttemptError(a) => transient_attempt(a),
            _ => false,
        },
        _ => false,
    }
}

/// The error of one request (an unpaged read, a write, a batch).
pub(crate) fn exec_err(e: ExecutionError) -> StoreError {
    if transient_exec(&e) {
        StoreError::Unavailable(e.to_string())
    } else {
        other(e)
    }
}

/// The error of starting a paged read.
pub(crate) fn pager_err(e: PagerExecutionError) -> StoreError {
    let transient = match &e {
        PagerExecutionError::PrepareError(p) => transient_prepare(p),
        PagerExecutionError::NextPageError(n) => transient_page(n),
        PagerExecutionError::SchemaAgreementError(_) | PagerExecutionError::MetadataError(_) => {
            true
        }
        _ => false,
    };
    if transient {
        StoreError::Unavailable(e.to_string())
    } else {
        other(e)
    }
}

/// The error of reading the next row of a paged read (which may fetch a page).
pub(crate) fn row_err(e: NextRowError) -> StoreError {
    let transient = matches!(&e, NextRowError::NextPageError(n) if transient_page(n));
    if transient {
        StoreError::Unavailable(e.to_string())
    } else {
        other(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use refold_store::{ActivationMode, RebuildState};

    #[test]
    fn unknown_stored_text_is_corrupt_never_a_default() {
        assert!(matches!(
            stored::<ActivationMode>("sideways"),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            stored::<RebuildState>(""),
            Err(StoreError::Corrupt(_))
        ));
        let known = RebuildState::Running;
        assert_eq!(stored::<RebuildState>(known.as_str()).ok(), Some(known));
    }

    #[test]
    fn an_empty_plan_is_an_outage() {
        assert!(exec_err(ExecutionError::EmptyPlan).is_unavailable());
    }
}
