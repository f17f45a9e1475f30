//! Black-box integration tests: they drive the `refold` binary and its HTTP
//! API, with fixtures from `examples/` and guest components built from
//! `plugins/` during the run.

mod api;
mod cluster;
mod common;
mod console;
mod embedded;
mod follow;
mod integrity;
mod layout;
mod lifecycle;
mod operations;
mod sandbox;
