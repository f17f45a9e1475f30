//! The runtime in process, against the real guest components built by
//! `plugins/build.sh`: every limit of `Limits` the sandbox enforces, with its
//! typed outcome and a message naming the export and the limit key; a fresh
//! instance after each trap; and `Plugin::load`.

mod common;
mod limits;
mod load;
