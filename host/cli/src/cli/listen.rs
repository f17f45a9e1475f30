//! `refold listen`: a host's change records as JSONL on standard output,
//! for scripts. Each line is a structured CloudEvent with its feed cursor
//! (`refoldcursor`); `--after` takes the last one seen, so a script that
//! stops can continue where it was.

use std::io::Write as _;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::cli::plugin::Endpoint;

#[derive(Debug, Deserialize)]
struct Page {
    changes: Vec<Item>,
    next: u64,
}

#[derive(Debug, Deserialize)]
struct Item {
    cursor: u64,
    event: Value,
}

/// Print the records after `after` as JSONL. With `follow`, wait for new
/// ones (long polls of `wait` seconds) until interrupted; without, stop at
/// the end of the feed. Stops after `max` records when given.
pub async fn run(ep: &Endpoint, after: u64, follow: bool, max: Option<u64>) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(90))
        .build()?;
    let url = format!("{}/v1/changes", ep.api.trim_end_matches('/'));
    let mut after = after;
    let mut printed = 0u64;
    let mut out = std::io::stdout().lock();
    loop {
        let wait = if follow { 25 } else { 0 };
        let page: Page = ep
            .send(
                client
                    .get(&url)
                    .query(&[("after", after), ("wait", wait), ("limit", 1000)]),
            )
            .await?;
        let empty = page.changes.is_empty();
        for mut item in page.changes {
            if let Some(o) = item.event.as_object_mut() {
                o.insert(
                    refold_engine::changes::CURSOR_ATTRIBUTE.into(),
                    item.cursor.into(),
                );
            }
            writeln!(out, "{}", item.event)?;
            printed += 1;
            if max.is_some_and(|m| printed >= m) {
                out.flush()?;
                return Ok(());
            }
        }
        out.flush()?;
        after = page.next.max(after);
        if empty && !follow {
            return Ok(());
        }
    }
}
