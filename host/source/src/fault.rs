//! Which source errors are faults of the machine, to be waited out, rather
//! than faults of the configuration, to be reported.

use std::io::ErrorKind;

/// Whether a source error is worth retrying: an I/O error somewhere in its
/// chain that goes away by itself or by an operator's hand without a restart
/// (too many open files, a permission being fixed, a file not there yet, a
/// connection refused or reset, a timeout).
pub(crate) fn io_transient(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        let Some(io) = c.downcast_ref::<std::io::Error>() else {
            return false;
        };
        // EMFILE / ENFILE (no ErrorKind of their own), ENOSPC, EIO.
        if matches!(io.raw_os_error(), Some(24 | 23 | 28 | 5)) {
            return true;
        }
        matches!(
            io.kind(),
            ErrorKind::NotFound
                | ErrorKind::PermissionDenied
                | ErrorKind::Interrupted
                | ErrorKind::TimedOut
                | ErrorKind::WouldBlock
                | ErrorKind::ConnectionRefused
                | ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::BrokenPipe
                | ErrorKind::StaleNetworkFileHandle
                | ErrorKind::ResourceBusy
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context as _;

    #[test]
    fn machine_faults_are_transient_and_others_are_not() {
        let emfile: anyhow::Result<()> =
            Err(std::io::Error::from_raw_os_error(24)).context("opening input.jsonl");
        assert!(io_transient(&emfile.unwrap_err()));
        let denied: anyhow::Result<()> =
            Err(std::io::Error::from(ErrorKind::PermissionDenied)).context("reading input.jsonl");
        assert!(io_transient(&denied.unwrap_err()));
        assert!(!io_transient(&anyhow::anyhow!("bad config")));
    }
}
