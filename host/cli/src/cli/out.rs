//! Command output.

/// `println!` for command output: a reader that goes away (`refold inspect
/// x.wasm | head -1`) ends the command quietly instead of panicking on the
/// closed pipe.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        if let Err(e) = writeln!(out, $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}
pub(crate) use outln;
