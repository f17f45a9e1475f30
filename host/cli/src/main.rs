//! The `refold` binary: parse the command line and dispatch to the library.

use clap::Parser as _;
use refold::cli::{Cli, Command};

/// The host allocates per event (records, JSON, states) from several
/// threads at once (the runtime's workers, the fold threads, the store's);
/// with glibc's allocator a quarter of a profile of `refold run` was in
/// malloc and free, much of it contention between arenas.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The long-running engine logs what it does; one-shot commands print
    // their results and log only errors unless REFOLD_LOG says otherwise.
    let default_filter = match cli.command {
        Command::Run { .. } => "warn,refold=info",
        _ => "error",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("REFOLD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("refold: starting the runtime: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Run { config } => refold::cli::run::run(config.as_deref()).await.map(|_| true),
            Command::Demo {
                examples,
                generate,
                json_out,
            } => refold::cli::demo::demo(examples.as_deref(), generate, json_out.as_deref())
                .await
                .map(|_| true),
            Command::Test {
                plugin,
                fixture_dir,
                json,
                config,
                limits,
                batch_size,
                no_determinism,
            } => {
                refold::cli::testkit::test(&refold::cli::testkit::TestOptions {
                    plugin,
                    dir: fixture_dir,
                    json,
                    config,
                    limits,
                    batch_size,
                    determinism: !no_determinism,
                })
                .await
            }
            Command::New { lang, name } => {
                refold::cli::new::new(lang, &name, std::path::Path::new(".")).map(|_| true)
            }
            Command::Inspect { file } => refold::cli::inspect::inspect(&file),
            Command::Plugin { endpoint, action } => refold::cli::dispatch_plugin(&endpoint, action)
                .await
                .map(|_| true),
            Command::Quarantine { endpoint, action } => {
                refold::cli::dispatch_quarantine(&endpoint, action)
                    .await
                    .map(|_| true)
            }
            Command::Listen {
                endpoint,
                kafka,
                topics,
                after,
                follow,
                max,
            } => match kafka {
                Some(brokers) => tokio::task::spawn_blocking(move || {
                    refold::cli::listen::run_kafka(&brokers, &topics, follow, max)
                })
                .await
                .map_err(anyhow::Error::from)
                .and_then(|r| r)
                .map(|_| true),
                None => refold::cli::listen::run(&endpoint, after, follow, max)
                    .await
                    .map(|_| true),
            },
            Command::Resend { file, url, token } => {
                refold::sinks::resend_dead_letters(&file, &url, token.as_deref())
                    .await
                    .map(|(sent, failing)| {
                        println!(
                            "{sent} re-sent, {failing} still failing (kept in {})",
                            file.display()
                        );
                        failing == 0
                    })
            }
            Command::Produce {
                brokers,
                topic,
                file,
                binary,
                rate,
            } => refold::cli::produce::run(&brokers, &topic, &file, binary, rate)
                .await
                .map(|_| true),
        }
    });
    match result {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("refold: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
