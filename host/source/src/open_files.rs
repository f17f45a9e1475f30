//! The process's limit on open files, which a host following many files
//! reaches first.

use anyhow::Context as _;

/// Raise this process's soft limit on open files (`RLIMIT_NOFILE`) to its
/// hard limit, so that a host following files, holding SQLite and sockets
/// open, does not run out of descriptors at a low default soft limit.
/// Returns the (old, new) soft limits; `None` stands for unlimited. Failing
/// to raise it is not fatal (the old limit stays), so callers log the error
/// and go on.
pub fn raise_open_files_limit() -> anyhow::Result<(Option<u64>, Option<u64>)> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    if lim.current == lim.maximum {
        return Ok((lim.current, lim.current));
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        },
    )
    .map_err(std::io::Error::from)
    .with_context(|| {
        format!(
            "raising the open files limit from {:?} to {:?}",
            lim.current, lim.maximum
        )
    })?;
    Ok((lim.current, lim.maximum))
}
