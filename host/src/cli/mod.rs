//! The `refold` command line. `main.rs` only parses and dispatches here.

pub mod demo;
pub mod inspect;
pub mod run;
pub mod testkit;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// refold: a WebAssembly-pluggable projection engine for event sourcing.
#[derive(Debug, Parser)]
#[command(name = "refold", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the engine with its HTTP API until interrupted.
    Run {
        /// Config file (TOML); every key can be overridden by REFOLD_<SECTION>__<KEY>.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Quick start: fold the bank and orders examples and print the states.
    Demo {
        /// Examples directory (default: ./examples, or the one in the source tree).
        #[arg(long)]
        examples: Option<PathBuf>,
        /// Also fold N generated bank events and report the rate.
        #[arg(long, default_value_t = 0)]
        generate: usize,
        /// Write the measured figures as JSON to this file.
        #[arg(long)]
        json_out: Option<PathBuf>,
    },
    /// Test a plugin against a fixture directory (events.jsonl + expected.jsonl).
    Test {
        /// The component to test.
        #[arg(long)]
        plugin: PathBuf,
        /// Directory with events.jsonl and expected.jsonl.
        fixture_dir: PathBuf,
        /// Print one JSON summary object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show what a component describes and whether it matches the WIT world.
    Inspect {
        /// The component.
        file: PathBuf,
    },
}
