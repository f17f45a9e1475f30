//! The driver's errors classified into [`StoreError`], in one place: every
//! statement's `rusqlite::Error` goes through [`classify`] exactly once.

use refold_store::StoreError;

/// An error by what the caller can do about it: a full disk, an I/O
/// error, a busy or locked or read-only database is waited out (the batch
/// is retried); a constraint violation (only the events table can raise
/// one, during a commit) means another writer stored the row since our
/// dedup (the batch is re-run); a value that cannot be read back is
/// corrupt, never taken for absent.
pub(crate) fn classify(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode as C;
    if matches!(
        e,
        rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::IntegralValueOutOfRange(..)
    ) {
        return StoreError::Corrupt(e.to_string());
    }
    match e.sqlite_error_code() {
        Some(C::DiskFull) => StoreError::Unavailable(format!("disk full: {e}")),
        Some(
            C::SystemIoFailure | C::CannotOpen | C::DatabaseBusy | C::DatabaseLocked | C::ReadOnly,
        ) => StoreError::Unavailable(format!("sqlite: {e}")),
        Some(C::ConstraintViolation) => StoreError::Fenced(format!(
            "an event row was written by another writer meanwhile: {e}"
        )),
        _ => StoreError::Other(anyhow::Error::from(e).context("sqlite")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(code: std::ffi::c_int) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None)
    }

    /// A full disk is an outage (retried), a uniqueness conflict a lost
    /// race, a value of the wrong type rot.
    #[test]
    fn errors_are_classified_by_kind() {
        use rusqlite::ffi;
        for code in [
            ffi::SQLITE_FULL,
            ffi::SQLITE_IOERR,
            ffi::SQLITE_BUSY,
            ffi::SQLITE_LOCKED,
            ffi::SQLITE_READONLY,
            ffi::SQLITE_CANTOPEN,
        ] {
            let e = classify(failure(code));
            assert!(matches!(e, StoreError::Unavailable(_)), "{code}: {e}");
        }
        assert!(matches!(
            classify(failure(ffi::SQLITE_FULL)),
            StoreError::Unavailable(why) if why.starts_with("disk full")
        ));
        assert!(matches!(
            classify(failure(ffi::SQLITE_CONSTRAINT_UNIQUE)),
            StoreError::Fenced(_)
        ));
        let wrong_type =
            rusqlite::Error::InvalidColumnType(0, "state".into(), rusqlite::types::Type::Integer);
        assert!(matches!(classify(wrong_type), StoreError::Corrupt(_)));
        assert!(matches!(
            classify(failure(ffi::SQLITE_MISMATCH)),
            StoreError::Other(_)
        ));
    }
}
