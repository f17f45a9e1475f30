//! The change feed's host-side tasks: the JSONL file sink and the pruning
//! of old records. The records themselves are made by the pipeline
//! ([`crate::pipeline::ChangeDetail`]) and stored by the commit that applies
//! them; everything here reads the store's feed in order, from a cursor.

use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;

use refold_store::StoredChange;

use crate::host::Host;

/// Records read from the feed per step of a sink.
const SINK_PAGE: usize = 256;
/// How often old records are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// The extension attribute a sink adds to each record: its feed cursor.
pub const CURSOR_ATTRIBUTE: &str = "refoldcursor";

/// A record as a sink writes it: the CloudEvent with its feed cursor.
pub fn with_cursor(c: &StoredChange) -> serde_json::Value {
    let mut e = c.event.clone();
    if let Some(o) = e.as_object_mut() {
        o.insert(CURSOR_ATTRIBUTE.into(), c.cursor.into());
    }
    e
}

/// The records a reader at `after` lost to pruning, as a range, when the
/// page it read does not start at `after + 1` (cursors follow each other
/// with no hole, so a jump is records pruned before they were read).
pub fn pruned_gap(after: u64, page: &[StoredChange]) -> Option<(u64, u64)> {
    let first = page.first()?.cursor;
    (after > 0 && first > after + 1).then_some((after + 1, first - 1))
}

/// Wait until the next commit with change records, `timeout`, or a stop.
/// Returns false on a stop.
async fn wait_for_records(
    host: &Host,
    stop: &mut watch::Receiver<bool>,
    timeout: Duration,
) -> bool {
    let woken = host.changes.notified();
    tokio::select! {
        _ = tokio::time::timeout(timeout, woken) => true,
        r = stop.changed() => r.is_ok() && !*stop.borrow(),
    }
}

/// The next records after `cursor` for a sink (`who`, in logs), at most
/// `limit`: while there are none, or the feed cannot be read, it waits for
/// a commit (at most a second) and asks again. `None` once `stop` is set.
pub async fn next_page(
    host: &Host,
    cursor: u64,
    limit: usize,
    stop: &mut watch::Receiver<bool>,
    who: &str,
) -> Option<Vec<StoredChange>> {
    loop {
        if *stop.borrow() {
            return None;
        }
        match host.storage.changes_after(cursor, limit).await {
            Ok(page) if !page.is_empty() => {
                if let Some((from, to)) = pruned_gap(cursor, &page) {
                    tracing::error!(
                        sink = who,
                        from,
                        to,
                        "change records were pruned before the sink took them (changes.retention_hours)"
                    );
                }
                return Some(page);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(sink = who, error = %e, "reading the change feed"),
        }
        if !wait_for_records(host, stop, Duration::from_secs(1)).await {
            return None;
        }
    }
}

/// Append every record of the feed to `path`, one CloudEvent per line, in
/// feed order, until `stop`. The file is its own cursor: it starts after
/// the record on its last complete line, and a line cut short by a crash is
/// cut off and written again, so the file holds each record once.
pub async fn run_jsonl_sink(
    host: Host,
    path: PathBuf,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let p = path.clone();
    let (mut file, mut cursor) = tokio::task::spawn_blocking(move || open_sink_file(&p))
        .await
        .context("opening the change sink file")??;
    tracing::info!(path = %path.display(), after = cursor, "change records sink to a JSONL file");
    while let Some(page) = next_page(&host, cursor, SINK_PAGE, &mut stop, "jsonl").await {
        let mut text = String::new();
        for c in &page {
            text.push_str(&with_cursor(c).to_string());
            text.push('\n');
        }
        let last = page.last().map(|c| c.cursor).unwrap_or(cursor);
        file = tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
            file.write_all(text.as_bytes())?;
            file.sync_data()?;
            Ok(file)
        })
        .await
        .context("writing the change sink file")?
        .with_context(|| format!("writing {}", path.display()))?;
        cursor = last;
    }
    Ok(())
}

/// Open (or create) the sink file for appending, cut off a last line left
/// incomplete, and read the cursor of the last complete one (0: none).
fn open_sink_file(path: &Path) -> anyhow::Result<(std::fs::File, u64)> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let len = f.metadata()?.len();
    let (end, last) = last_line(&mut f, len)?;
    if end < len {
        tracing::warn!(path = %path.display(), cut = len - end, "cut off an incomplete last line");
        f.set_len(end)?;
    }
    f.seek(SeekFrom::Start(end))?;
    let cursor = match last {
        None => 0,
        Some(line) => serde_json::from_slice::<serde_json::Value>(&line)
            .ok()
            .and_then(|v| v.get(CURSOR_ATTRIBUTE).and_then(|c| c.as_u64()))
            .with_context(|| {
                format!(
                    "the last line of {} is not a change record with `{CURSOR_ATTRIBUTE}`: \
                     refusing to guess where to continue (move the file away to start over)",
                    path.display()
                )
            })?,
    };
    Ok((f, cursor))
}

/// The end of the file's last complete line (just past its newline) and
/// that line, read backwards in chunks so that a large file is not read
/// whole.
fn last_line(f: &mut std::fs::File, len: u64) -> std::io::Result<(u64, Option<Vec<u8>>)> {
    const CHUNK: u64 = 64 << 10;
    // Newline positions, found from the end.
    let mut newlines: Vec<u64> = Vec::new();
    let mut pos = len;
    let mut buf = vec![0u8; CHUNK as usize];
    while pos > 0 && newlines.len() < 2 {
        let start = pos.saturating_sub(CHUNK);
        let n = (pos - start) as usize;
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut buf[..n])?;
        for i in (0..n).rev() {
            if buf[i] == b'\n' {
                newlines.push(start + i as u64);
                if newlines.len() == 2 {
                    break;
                }
            }
        }
        pos = start;
    }
    let Some(&end_nl) = newlines.first() else {
        return Ok((0, None));
    };
    let begin = newlines.get(1).map(|p| p + 1).unwrap_or(0);
    let mut line = vec![0u8; (end_nl - begin) as usize];
    f.seek(SeekFrom::Start(begin))?;
    f.read_exact(&mut line)?;
    Ok((end_nl + 1, Some(line)))
}

/// Prune records older than `changes.retention_hours`, once a minute,
/// until `stop`.
pub async fn run_pruning(host: Host, mut stop: watch::Receiver<bool>) {
    let hours = host.config.changes.retention_hours;
    if hours == 0 {
        return;
    }
    loop {
        let before = refold_types::clock::unix_ms() - (hours as i64) * 3_600_000;
        match host.storage.prune_changes(before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "pruned old change records"),
            Err(e) => tracing::warn!(error = %e, "pruning change records"),
        }
        tokio::select! {
            _ = tokio::time::sleep(PRUNE_EVERY) => {}
            r = stop.changed() => if r.is_err() || *stop.borrow() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("changes.jsonl");
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    #[test]
    fn a_jump_in_cursors_is_a_pruned_range() {
        let at = |cursor| StoredChange {
            cursor,
            id: String::new(),
            key: refold_store::EntityKey::new("t", "i"),
            event: serde_json::Value::Null,
        };
        assert_eq!(pruned_gap(4, &[at(5), at(6)]), None);
        assert_eq!(pruned_gap(4, &[at(9)]), Some((5, 8)));
        assert_eq!(pruned_gap(0, &[at(9)]), None, "from the oldest kept");
        assert_eq!(pruned_gap(4, &[]), None);
    }

    #[test]
    fn an_empty_or_new_file_starts_from_the_beginning() {
        let (_d, p) = file_with("");
        assert_eq!(open_sink_file(&p).unwrap().1, 0);
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(open_sink_file(&dir.path().join("new.jsonl")).unwrap().1, 0);
    }

    #[test]
    fn the_file_continues_after_its_last_complete_record_and_drops_a_torn_one() {
        let (_d, p) = file_with(
            "{\"id\":\"a\",\"refoldcursor\":1}\n{\"id\":\"b\",\"refoldcursor\":7}\n{\"id\":\"c\",\"refo",
        );
        let (_f, cursor) = open_sink_file(&p).unwrap();
        assert_eq!(cursor, 7);
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.ends_with("\"refoldcursor\":7}\n"), "{text}");
    }

    #[test]
    fn a_long_last_line_is_found_across_chunks() {
        let big = "x".repeat(200_000);
        let (_d, p) = file_with(&format!(
            "{{\"refoldcursor\":1}}\n{{\"pad\":\"{big}\",\"refoldcursor\":2}}\n"
        ));
        assert_eq!(open_sink_file(&p).unwrap().1, 2);
    }

    #[test]
    fn a_file_that_is_not_a_sink_is_refused_not_overwritten() {
        let (_d, p) = file_with("hello\n");
        let e = open_sink_file(&p).unwrap_err();
        assert!(format!("{e:#}").contains("refusing to guess"), "{e:#}");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "hello\n");
    }
}
