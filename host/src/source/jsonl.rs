//! A source reading CloudEvents from JSONL files, optionally following them
//! as they grow. Each file is one partition; its checkpoint is the byte
//! offset after the last consumed line, kept in the state store.

use std::io::{BufRead as _, BufReader, Seek as _, SeekFrom};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;

use super::{EventSource, PartitionLag, SourceRecord};
use crate::store::{Checkpoint, Origin};

struct FileCursor {
    path: PathBuf,
    name: String,
    /// Next byte to read.
    offset: u64,
    /// Everything before this byte is durable: lag is measured from here,
    /// so a batch stuck in processing shows as lag, not as progress.
    committed: u64,
    done: bool,
}

/// Reads one or more JSONL files.
pub struct JsonlSource {
    files: Vec<FileCursor>,
    follow: bool,
    linger: Duration,
}

impl JsonlSource {
    /// Read `paths` from the offsets in `checkpoints` (source name = path).
    pub fn new(
        paths: &[PathBuf],
        checkpoints: &[Checkpoint],
        follow: bool,
        linger: Duration,
    ) -> Self {
        let files = paths
            .iter()
            .map(|p| {
                let name = p.display().to_string();
                let offset = checkpoints
                    .iter()
                    .find(|c| c.source == name)
                    .map(|c| c.offset.max(0) as u64)
                    .unwrap_or(0);
                FileCursor {
                    path: p.clone(),
                    name,
                    offset,
                    committed: offset,
                    done: false,
                }
            })
            .collect();
        JsonlSource {
            files,
            follow,
            linger,
        }
    }

    /// Source names of the files (their checkpoint keys).
    pub fn source_names(paths: &[PathBuf]) -> Vec<String> {
        paths.iter().map(|p| p.display().to_string()).collect()
    }

    fn read_some(&mut self, max: usize) -> anyhow::Result<Vec<SourceRecord>> {
        let mut out = Vec::new();
        for f in &mut self.files {
            if out.len() >= max {
                break;
            }
            if f.done {
                continue;
            }
            let file = match std::fs::File::open(&f.path) {
                Ok(file) => file,
                // A followed file may not exist yet.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.follow => continue,
                Err(e) => return Err(e).with_context(|| format!("opening {}", f.path.display())),
            };
            let mut r = BufReader::with_capacity(256 << 10, file);
            r.seek(SeekFrom::Start(f.offset))?;
            let mut line = Vec::new();
            while out.len() < max {
                line.clear();
                let n = r.read_until(b'\n', &mut line)?;
                if n == 0 {
                    if !self.follow {
                        f.done = true;
                    }
                    break;
                }
                if line.last() != Some(&b'\n') && self.follow {
                    // A line still being written: take it once it is complete.
                    break;
                }
                let start = f.offset;
                f.offset += n as u64;
                let payload: Vec<u8> = trim_ascii(&line).to_vec();
                if payload.is_empty() {
                    continue;
                }
                out.push(SourceRecord {
                    origin: Origin {
                        source: f.name.clone(),
                        partition: 0,
                        offset: start as i64,
                    },
                    next_offset: f.offset as i64,
                    key: None,
                    headers: Vec::new(),
                    payload,
                    produced_at_ms: None,
                });
            }
        }
        Ok(out)
    }
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map(|i| i + 1)
        .unwrap_or(start);
    &b[start..end.max(start)]
}

#[async_trait]
impl EventSource for JsonlSource {
    async fn next_batch(&mut self, max: usize) -> anyhow::Result<Option<Vec<SourceRecord>>> {
        let deadline = tokio::time::Instant::now() + self.linger;
        loop {
            let batch = self.read_some(max)?;
            if !batch.is_empty() {
                return Ok(Some(batch));
            }
            if self.files.iter().all(|f| f.done) {
                return Ok(None);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(Some(Vec::new()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn commit(&mut self, checkpoints: &[Checkpoint]) -> anyhow::Result<()> {
        // The checkpoint itself was written with the batch, in the same
        // transaction; here we only track it for the lag.
        for c in checkpoints {
            if let Some(f) = self.files.iter_mut().find(|f| f.name == c.source) {
                f.committed = f.committed.max(c.offset.max(0) as u64);
            }
        }
        Ok(())
    }

    fn lag(&self) -> Vec<PartitionLag> {
        self.files
            .iter()
            .map(|f| {
                let len = std::fs::metadata(&f.path)
                    .map(|m| m.len())
                    .unwrap_or(f.offset);
                PartitionLag {
                    source: f.name.clone(),
                    partition: 0,
                    lag: len.saturating_sub(f.offset) as i64,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[tokio::test]
    async fn reads_resumes_and_follows() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e.jsonl");
        std::fs::write(&p, "{\"a\":1}\n\n{\"a\":2}\n{\"a\":").unwrap();
        let mut s = JsonlSource::new(
            std::slice::from_ref(&p),
            &[],
            true,
            Duration::from_millis(30),
        );
        let b = s.next_batch(10).await.unwrap().unwrap();
        assert_eq!(b.len(), 2, "the partial last line waits");
        let cps = super::super::checkpoints_of(&b);
        assert_eq!(cps[0].offset, 17);
        assert!(s.next_batch(10).await.unwrap().unwrap().is_empty());
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .unwrap()
            .write_all(b"3}\n")
            .unwrap();
        let b = s.next_batch(10).await.unwrap().unwrap();
        assert_eq!(b[0].payload, b"{\"a\":3}");

        // Resuming from the checkpoint skips what was consumed.
        let mut s2 = JsonlSource::new(std::slice::from_ref(&p), &cps, false, Duration::ZERO);
        let b = s2.next_batch(10).await.unwrap().unwrap();
        assert_eq!(b.len(), 1);
        assert!(s2.next_batch(10).await.unwrap().is_none());
    }
}
