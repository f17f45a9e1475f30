//! A source reading CloudEvents from JSONL files, optionally following them
//! as they grow, through rotation, truncation and re-creation.
//!
//! # Files, incarnations and checkpoints
//!
//! Each configured path is one source (its name is the path). The file found
//! at a path changes over time: logrotate renames it away and creates a new
//! one, `copytruncate` empties it in place, a producer deletes and recreates
//! it. A byte offset only means something together with the file it was
//! taken in, so every *incarnation* of the file (its identity: device, inode
//! and, where the filesystem keeps it, birth time) is its own partition of
//! the source: the partition number is a 31-bit tag hashed from the
//! identity ([`FileId::tag`], never 0), and a record's origin and every
//! checkpoint are (path, tag, byte offset).
//!
//! This needs nothing new from the store: checkpoints are still
//! `(source, partition, offset)` rows, written with the batch they end, and
//! `checkpoints(path)` returns the rows of every incarnation seen. At start
//! the source opens the file at the path, computes its tag and resumes from
//! that tag's row only; a file whose tag has no row (it replaced the one
//! checkpointed while the host was down) is read from its start. A row is
//! trusted only if its offset is within the file and just after a newline,
//! which also catches an incarnation truncated or rewritten while the host
//! was down (it is then read from its start; re-read events are dropped as
//! duplicates by event id). Rows of partition 0 were written before
//! incarnations were tracked; they are applied the same way while no tagged
//! row exists for the path.
//!
//! Within a run the file stays open. When it reaches its end the source
//! checks that it was not truncated (its size fell below the read position:
//! read again from 0) and that the path still names it. When the path names
//! another file, the open one is read to its end first (a writer may have
//! appended before it switched; an unterminated last line is handed out as
//! it is), then the new file is read from its start. When the path is gone,
//! the open file is still read (a writer may hold it open) and the source
//! reports it as missing. A batch never spans a truncation or a switch, so
//! the highest offset per partition in a batch is always its checkpoint.
//!
//! Lag is measured per incarnation from the last committed checkpoint:
//! bytes of the file not yet durable, plus the size of a newer file at the
//! path that is not yet being read.
//!
//! Residual limits: bytes written to a rotated-away file after the source
//! switched away from it are not read, nor is a rotated-away file's unread
//! tail when the rotation happened while the host was down; truncation
//! followed by growth past the read position between two polls (20 ms) is
//! not seen as a truncation.

use std::fs::{File, Metadata};
use std::io;
use std::os::unix::fs::{FileExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;

use refold_types::{Checkpoint, Origin};

use crate::error::SourceError;
use crate::event_source::EventSource;
use crate::record::{PartitionLag, SourceRecord};

/// Bytes read per `read` call.
const CHUNK: usize = 256 << 10;
/// Retired incarnations still reported (with lag 0) so that `/healthz` and
/// the lag gauge see the last of them settle.
const RETIRED_KEPT: usize = 4;
/// Pause between polls of a followed file at its end.
const POLL: Duration = Duration::from_millis(20);

/// What makes one file at a path distinct from the next file at that path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    /// Birth time in ns since the epoch, 0 where the filesystem has none:
    /// an inode number freed by a delete is often reused at once.
    born_ns: u128,
}

impl FileId {
    fn of(m: &Metadata) -> FileId {
        let born_ns = m
            .created()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        FileId {
            dev: m.dev(),
            ino: m.ino(),
            born_ns,
        }
    }

    /// The partition number of this incarnation: FNV-1a over the identity,
    /// folded to 31 bits. Stable across builds and restarts (unlike std's
    /// hasher, which does not promise that); 0 is left to checkpoints
    /// written before incarnations were tracked.
    fn tag(&self) -> i32 {
        let h = refold_types::stable_hash(
            self.dev
                .to_le_bytes()
                .into_iter()
                .chain(self.ino.to_le_bytes())
                .chain(self.born_ns.to_le_bytes()),
        );
        let t = ((h ^ (h >> 32)) & 0x7fff_ffff) as i32;
        if t == 0 { 1 } else { t }
    }
}

/// The head of a line longer than the record limit, kept while the rest of
/// it is skipped.
struct Oversized {
    /// Its first `limit + 2` bytes: enough for the pipeline to refuse it as
    /// too large and for the dead letter to show what it was.
    head: Vec<u8>,
    /// Bytes of the line seen so far.
    len: u64,
}

/// One line taken from a file.
struct Line {
    start: u64,
    /// Offset after the line (and its newline).
    next: u64,
    payload: Vec<u8>,
    /// Length of the line as written, when it was longer than the limit.
    oversized: Option<u64>,
}

/// One open file: an incarnation of a path.
struct Incarnation {
    file: File,
    id: FileId,
    tag: i32,
    /// Start of the first line not yet handed out.
    offset: u64,
    /// Everything before this byte is durable: lag is measured from here,
    /// so a batch stuck in processing shows as lag, not as progress.
    committed: u64,
    /// Next byte to read from the file.
    end: u64,
    /// Bytes read and not yet handed out: `buf[head..]` are the file's bytes
    /// from `offset` (or, while skipping an oversized line, from after the
    /// part of it already counted) up to `end`.
    buf: Vec<u8>,
    head: usize,
    /// Bytes of `buf[head..]` already searched for a newline: a partial line
    /// is searched once, not once per poll.
    scanned: usize,
    over: Option<Oversized>,
    /// The path names another file now: an unterminated last line is
    /// handed out at the end instead of waited for.
    finishing: bool,
}

impl Incarnation {
    fn open(
        path: &Path,
        opener: &(dyn Fn(&Path) -> io::Result<File> + Send + Sync),
    ) -> io::Result<Incarnation> {
        let file = opener(path)?;
        // Identity from the open descriptor, not the path: the path may be
        // renamed between the two calls.
        let meta = file.metadata()?;
        if meta.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::IsADirectory,
                "is a directory",
            ));
        }
        let id = FileId::of(&meta);
        Ok(Incarnation {
            file,
            id,
            tag: id.tag(),
            offset: 0,
            committed: 0,
            end: 0,
            buf: Vec::new(),
            head: 0,
            scanned: 0,
            over: None,
            finishing: false,
        })
    }

    /// Resume at `at`, once it is known to be a line boundary of this file.
    fn start_at(&mut self, at: u64) {
        self.offset = at;
        self.committed = at;
        self.end = at;
        self.buf.clear();
        self.head = 0;
        self.scanned = 0;
        self.over = None;
    }

    /// `at` can be a checkpoint of this file: within it and just after a
    /// newline (every checkpoint is, except after an unterminated last line
    /// read without following, which is then read again).
    fn plausible(&self, at: u64) -> io::Result<bool> {
        if at == 0 {
            return Ok(true);
        }
        if at > self.file.metadata()?.len() {
            return Ok(false);
        }
        let mut b = [0u8; 1];
        let n = self.file.read_at(&mut b, at - 1)?;
        Ok(n == 1 && b[0] == b'\n')
    }

    /// The next complete line, or `None` at the end of what is written. With
    /// `finish`, an unterminated last line counts as complete. On error
    /// nothing has moved.
    fn next_line(
        &mut self,
        limit: usize,
        finish: bool,
        read_bytes: &mut u64,
    ) -> io::Result<Option<Line>> {
        loop {
            let from = self.head + self.scanned;
            if let Some(i) = memchr::memchr(b'\n', &self.buf[from..]) {
                let nl = from + i;
                let len = (nl - self.head) as u64;
                let line = match self.over.take() {
                    None => Line {
                        start: self.offset,
                        next: self.offset + len + 1,
                        payload: self.buf[self.head..nl].to_vec(),
                        oversized: None,
                    },
                    Some(o) => Line {
                        start: self.offset,
                        next: self.offset + o.len + len + 1,
                        payload: o.head,
                        oversized: Some(o.len + len),
                    },
                };
                self.offset = line.next;
                self.head = nl + 1;
                self.scanned = 0;
                return Ok(Some(line));
            }
            self.scanned = self.buf.len() - self.head;
            self.bound(limit);
            // Keep only the unconsumed part before reading on; once the head
            // is at 0 a waiting partial line is not moved again.
            if self.head > 0 {
                self.buf.drain(..self.head);
                self.head = 0;
            }
            if self.buf.capacity() > 4 * CHUNK && self.buf.len() < CHUNK {
                // A long line is done with: give its memory back.
                self.buf.shrink_to(2 * CHUNK);
            }
            let had = self.buf.len();
            self.buf.resize(had + CHUNK, 0);
            let n = match self.file.read_at(&mut self.buf[had..], self.end) {
                Ok(n) => n,
                Err(e) => {
                    self.buf.truncate(had);
                    return Err(e);
                }
            };
            self.buf.truncate(had + n);
            self.end += n as u64;
            *read_bytes += n as u64;
            if n > 0 {
                continue;
            }
            if finish && (self.over.is_some() || self.buf.len() > self.head) {
                let len = (self.buf.len() - self.head) as u64;
                let line = match self.over.take() {
                    None => Line {
                        start: self.offset,
                        next: self.offset + len,
                        payload: self.buf[self.head..].to_vec(),
                        oversized: None,
                    },
                    Some(o) => Line {
                        start: self.offset,
                        next: self.offset + o.len + len,
                        payload: o.head,
                        oversized: Some(o.len + len),
                    },
                };
                self.offset = line.next;
                self.head = self.buf.len();
                self.scanned = 0;
                return Ok(Some(line));
            }
            return Ok(None);
        }
    }

    /// Bound the memory of a partial line: past `limit + 1` bytes (a line of
    /// `limit` bytes may end in `\r`) it can only be refused as too large,
    /// so only its head is kept and the rest is counted, not stored.
    fn bound(&mut self, limit: usize) {
        let pending = self.buf.len() - self.head;
        let keep = limit.saturating_add(2);
        match &mut self.over {
            Some(o) => {
                o.len += pending as u64;
            }
            None if pending >= keep => {
                self.over = Some(Oversized {
                    head: self.buf[self.head..self.head + keep].to_vec(),
                    len: pending as u64,
                });
            }
            None => return,
        }
        self.head = self.buf.len();
        self.scanned = 0;
    }
}

/// One configured path.
struct FileCursor {
    path: PathBuf,
    name: String,
    /// Checkpoints of this path from the store, consulted for the first
    /// incarnation opened only: later ones are new files, read from 0.
    saved: Option<Vec<Checkpoint>>,
    cur: Option<Incarnation>,
    /// Tags of incarnations read before `cur`, newest last.
    retired: Vec<i32>,
    done: bool,
}

/// How a file is opened (replaced in tests to inject faults).
type Opener = Box<dyn Fn(&Path) -> io::Result<File> + Send + Sync>;

/// Reads one or more JSONL files.
pub struct JsonlSource {
    files: Vec<FileCursor>,
    follow: bool,
    linger: Duration,
    max_record_bytes: usize,
    opener: Opener,
    /// Bytes read from files so far.
    read_bytes: u64,
}

impl JsonlSource {
    /// Read `paths` from the offsets in `checkpoints` (source name = path;
    /// see the module documentation for the partitions).
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
                let saved = checkpoints
                    .iter()
                    .filter(|c| c.source == name)
                    .cloned()
                    .collect();
                FileCursor {
                    path: p.clone(),
                    name,
                    saved: Some(saved),
                    cur: None,
                    retired: Vec::new(),
                    done: false,
                }
            })
            .collect();
        JsonlSource {
            files,
            follow,
            linger,
            max_record_bytes: refold_types::event::DEFAULT_MAX_RECORD_BYTES,
            opener: Box::new(|p| File::open(p)),
            read_bytes: 0,
        }
    }

    /// The largest record the pipeline accepts (`[engine] max_record_bytes`):
    /// a longer line is not buffered whole but handed out as its first
    /// bytes, which the pipeline dead-letters as too large.
    pub fn with_max_record_bytes(mut self, max: usize) -> Self {
        self.max_record_bytes = max;
        self
    }

    /// Open files through `opener` (tests inject faults with it).
    #[cfg(test)]
    fn with_opener(
        mut self,
        opener: impl Fn(&Path) -> io::Result<File> + Send + Sync + 'static,
    ) -> Self {
        self.opener = Box::new(opener);
        self
    }

    /// Source names of the files (their checkpoint keys).
    pub fn source_names(paths: &[PathBuf]) -> Vec<String> {
        paths.iter().map(|p| p.display().to_string()).collect()
    }

    /// Read what is available into `out`, up to `max` records. Faults of
    /// single files are returned beside the records: a missing file does not
    /// hold up the others.
    fn read_some(&mut self, max: usize) -> (Vec<SourceRecord>, Vec<SourceError>) {
        let mut out = Vec::new();
        let mut faults = Vec::new();
        let ctx = ReadCtx {
            follow: self.follow,
            limit: self.max_record_bytes,
            opener: self.opener.as_ref(),
        };
        for f in &mut self.files {
            if out.len() >= max {
                break;
            }
            if let Err(e) = f.read(&mut out, max, &ctx, &mut self.read_bytes) {
                faults.push(e);
            }
        }
        (out, faults)
    }
}

struct ReadCtx<'a> {
    follow: bool,
    limit: usize,
    opener: &'a (dyn Fn(&Path) -> io::Result<File> + Send + Sync),
}

impl FileCursor {
    fn read(
        &mut self,
        out: &mut Vec<SourceRecord>,
        max: usize,
        ctx: &ReadCtx<'_>,
        read_bytes: &mut u64,
    ) -> Result<(), SourceError> {
        if self.done {
            return Ok(());
        }
        if self.cur.is_none() {
            self.cur = Some(self.open_first(ctx)?);
        }
        let path = self.path.as_path();
        let fault = |e: &io::Error, doing: &str| classify(path, e, doing, true, ctx.follow);
        let before = out.len();
        while out.len() < max {
            let Some(cur) = self.cur.as_mut() else {
                return Ok(());
            };
            let finish = !ctx.follow || cur.finishing;
            if let Some(line) = cur
                .next_line(ctx.limit, finish, read_bytes)
                .map_err(|e| fault(&e, "reading"))?
            {
                push(&self.name, cur.tag, out, line, ctx.limit);
                continue;
            }
            if !ctx.follow {
                self.done = true;
                return Ok(());
            }
            // At the end of the open file: is it still the file at the path?
            let size = cur
                .file
                .metadata()
                .map_err(|e| fault(&e, "inspecting"))?
                .len();
            if size < cur.end {
                if out.len() > before {
                    // Hand out what was read before the truncation first: a
                    // batch never spans it.
                    return Ok(());
                }
                tracing::warn!(file = %self.name, was = cur.end, now = size,
                    "input file truncated; reading it again from its start");
                cur.start_at(0);
                continue;
            }
            match std::fs::metadata(path) {
                Ok(m) if FileId::of(&m) == cur.id => return Ok(()),
                Ok(_) => {
                    if out.len() > before {
                        return Ok(());
                    }
                    if !cur.finishing {
                        // The writer may have appended to the old file
                        // before it moved on: read it to its end once more.
                        cur.finishing = true;
                        continue;
                    }
                    let next =
                        Incarnation::open(path, ctx.opener).map_err(|e| fault(&e, "opening"))?;
                    tracing::info!(file = %self.name, from = cur.tag, to = next.tag,
                        read = cur.offset, "input file replaced; reading the new one from its start");
                    self.retired.push(cur.tag);
                    if self.retired.len() > RETIRED_KEPT {
                        self.retired.remove(0);
                    }
                    self.cur = Some(next);
                }
                // Deleted: keep the open file (a writer may still hold it)
                // and say that the path is gone.
                Err(e) => return Err(fault(&e, "inspecting")),
            }
        }
        Ok(())
    }

    /// Open the file for the first time in this run and find where to
    /// resume in it.
    fn open_first(&mut self, ctx: &ReadCtx<'_>) -> Result<Incarnation, SourceError> {
        let path = self.path.as_path();
        let fault = |e: &io::Error, doing: &str| classify(path, e, doing, false, ctx.follow);
        let mut inc = Incarnation::open(path, ctx.opener).map_err(|e| fault(&e, "opening"))?;
        let saved = self.saved.take().unwrap_or_default();
        let tagged = saved.iter().any(|c| c.partition != 0);
        let row = saved.iter().find(|c| c.partition == inc.tag).or_else(|| {
            (!tagged)
                .then(|| saved.iter().find(|c| c.partition == 0))
                .flatten()
        });
        let Some(row) = row else {
            if tagged {
                tracing::info!(file = %self.name, tag = inc.tag,
                    "input file replaced since the last checkpoint; reading it from its start");
            }
            return Ok(inc);
        };
        let at = row.offset.max(0) as u64;
        match inc.plausible(at) {
            Ok(true) => inc.start_at(at),
            Ok(false) => tracing::warn!(file = %self.name, checkpoint = at,
                "the checkpoint is not a line boundary of the input file (truncated or rewritten since); reading it from its start"),
            Err(e) => {
                let err = fault(&e, "reading");
                // Try again on the next call, from the same saved rows.
                self.saved = Some(saved);
                return Err(err);
            }
        }
        Ok(inc)
    }
}

/// Hand out one line of incarnation `tag` of file `name`.
fn push(name: &str, tag: i32, out: &mut Vec<SourceRecord>, line: Line, limit: usize) {
    let payload = match line.oversized {
        None => trim_ascii(&line.payload).to_vec(),
        Some(len) => {
            tracing::warn!(file = %name, offset = line.start, bytes = len, limit,
                "line longer than the record limit; handing out its head only (dead-lettered as too large)");
            line.payload
        }
    };
    if payload.is_empty() {
        return;
    }
    out.push(SourceRecord {
        origin: Origin {
            source: name.to_string(),
            partition: tag,
            offset: line.start as i64,
        },
        next_offset: line.next as i64,
        key: None,
        headers: Vec::new(),
        payload,
        produced_at_ms: None,
    });
}

/// Classify an I/O failure on input file `path`; `open`: a file was being
/// read there already.
fn classify(path: &Path, e: &io::Error, doing: &str, open: bool, follow: bool) -> SourceError {
    let file = path.display();
    let transient = |reason: String| SourceError::Transient { reason };
    let errno = e.raw_os_error();
    let too_many = [rustix::io::Errno::MFILE, rustix::io::Errno::NFILE]
        .map(|e| Some(e.raw_os_error()))
        .contains(&errno);
    match e.kind() {
        io::ErrorKind::NotFound if open => transient(format!(
            "input file {file} does not exist (deleted; the file last read there is still followed)"
        )),
        io::ErrorKind::NotFound if follow => transient(format!("input file {file} does not exist")),
        io::ErrorKind::NotFound => SourceError::Fatal {
            reason: format!("input file {file} does not exist"),
        },
        io::ErrorKind::PermissionDenied => transient(format!(
            "input file {file} is not readable ({doing} it: permission denied)"
        )),
        io::ErrorKind::IsADirectory => SourceError::Fatal {
            reason: format!("input file {file} is a directory"),
        },
        _ if too_many => transient(format!(
            "too many open files ({doing} input file {file}: {e})"
        )),
        _ => transient(format!("{doing} input file {file}: {e}")),
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
            let (batch, faults) = self.read_some(max);
            if !batch.is_empty() {
                // Faults come back on a later call, once these are committed.
                return Ok(Some(batch));
            }
            if let Some(fatal) = faults.iter().find(|f| !f.is_transient()) {
                return Err(fatal.clone().into());
            }
            if faults.is_empty() && self.files.iter().all(|f| f.done) {
                return Ok(None);
            }
            if tokio::time::Instant::now() >= deadline {
                if faults.is_empty() {
                    return Ok(Some(Vec::new()));
                }
                let reason = faults
                    .iter()
                    .map(SourceError::reason)
                    .collect::<Vec<_>>()
                    .join("; ");
                return Err(SourceError::Transient { reason }.into());
            }
            tokio::time::sleep(POLL.min(self.linger)).await;
        }
    }

    async fn commit(&mut self, checkpoints: &[Checkpoint]) -> anyhow::Result<()> {
        // The checkpoint itself was written with the batch, in the same
        // transaction; here we only track it for the lag.
        for c in checkpoints {
            let Some(f) = self.files.iter_mut().find(|f| f.name == c.source) else {
                continue;
            };
            if let Some(cur) = f.cur.as_mut().filter(|cur| cur.tag == c.partition) {
                cur.committed = cur.committed.max(c.offset.max(0) as u64);
            }
        }
        Ok(())
    }

    fn lag(&self) -> Vec<PartitionLag> {
        let mut out = Vec::new();
        for f in &self.files {
            for &tag in &f.retired {
                out.push(PartitionLag {
                    source: f.name.clone(),
                    partition: tag,
                    lag: 0,
                });
            }
            let Some(cur) = &f.cur else { continue };
            let size = cur.file.metadata().map(|m| m.len()).unwrap_or(cur.end);
            let mut lag = size.saturating_sub(cur.committed);
            if let Ok(m) = std::fs::metadata(&f.path)
                && FileId::of(&m) != cur.id
            {
                // A newer file waits at the path: all of it is behind.
                lag += m.len();
            }
            out.push(PartitionLag {
                source: f.name.clone(),
                partition: cur.tag,
                lag: lag as i64,
            });
        }
        out
    }

    /// A rotated file's rest and its successor are partitions of one
    /// stream: an entity's events in both keep their order only when both
    /// go through one lane.
    fn independent_partitions(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::checkpoints_of;
    use std::io::Write as _;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicI32, Ordering};

    fn follow(p: &Path, cps: &[Checkpoint]) -> JsonlSource {
        JsonlSource::new(&[p.to_path_buf()], cps, true, Duration::from_millis(30))
    }

    fn append(p: &Path, text: &str) {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }

    fn lines(range: std::ops::Range<usize>) -> String {
        range.map(|i| format!("{{\"n\":{i}}}\n")).collect()
    }

    fn texts(b: &[SourceRecord]) -> Vec<String> {
        b.iter()
            .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
            .collect()
    }

    fn want(range: std::ops::Range<usize>) -> Vec<String> {
        range.map(|i| format!("{{\"n\":{i}}}")).collect()
    }

    /// One batch, committed as the consume loop does.
    async fn take(s: &mut JsonlSource) -> Vec<SourceRecord> {
        let b = s.next_batch(1000).await.unwrap().unwrap();
        s.commit(&checkpoints_of(&b)).await.unwrap();
        b
    }

    /// Batches until one comes back empty; each batch's partitions.
    async fn drain(s: &mut JsonlSource) -> (Vec<String>, Vec<Vec<i32>>) {
        let (mut all, mut parts) = (Vec::new(), Vec::new());
        loop {
            let b = take(s).await;
            if b.is_empty() {
                return (all, parts);
            }
            all.extend(texts(&b));
            let mut p: Vec<i32> = b.iter().map(|r| r.origin.partition).collect();
            p.dedup();
            parts.push(p);
        }
    }

    fn lag_of(s: &JsonlSource) -> i64 {
        s.lag().iter().map(|l| l.lag).sum()
    }

    async fn transient_reason(s: &mut JsonlSource) -> String {
        let e = s.next_batch(1000).await.expect_err("a fault");
        let se = SourceError::of(&e).expect("a typed source error");
        assert!(se.is_transient(), "{se}");
        assert!(crate::error::is_transient(&e));
        se.reason().to_string()
    }

    #[tokio::test]
    async fn reads_resumes_and_follows() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e.jsonl");
        std::fs::write(&p, "{\"a\":1}\n\n{\"a\":2}\n{\"a\":").unwrap();
        let mut s = follow(&p, &[]);
        let b = s.next_batch(10).await.unwrap().unwrap();
        assert_eq!(b.len(), 2, "the partial last line waits");
        let cps = checkpoints_of(&b);
        assert_eq!(cps[0].offset, 17);
        assert!(s.next_batch(10).await.unwrap().unwrap().is_empty());
        append(&p, "3}\n");
        let b = s.next_batch(10).await.unwrap().unwrap();
        assert_eq!(b[0].payload, b"{\"a\":3}");

        // Resuming from the checkpoint skips what was consumed.
        let mut s2 = JsonlSource::new(std::slice::from_ref(&p), &cps, false, Duration::ZERO);
        let b = s2.next_batch(10).await.unwrap().unwrap();
        assert_eq!(b.len(), 1);
        assert!(s2.next_batch(10).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn rotation_by_rename_and_create_reads_the_old_tail_then_the_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e.jsonl");
        append(&p, &lines(0..3));
        let mut s = follow(&p, &[]);
        assert_eq!(drain(&mut s).await.0, want(0..3));
        // Written just before the rotation, never seen by the source; the
        // last line is never finished.
        append(&p, &lines(3..5));
        append(&p, "{\"n\":");
        std::fs::rename(&p, dir.path().join("e.jsonl.1")).unwrap();
        append(&p, &lines(5..7));
        let (got, parts) = drain(&mut s).await;
        let mut expected = want(3..5);
        expected.push("{\"n\":".into());
        expected.extend(want(5..7));
        assert_eq!(got, expected);
        assert!(
            parts.iter().all(|p| p.len() == 1),
            "a batch spans one file: {parts:?}"
        );
        let mut files: Vec<i32> = parts.concat();
        files.dedup();
        assert_eq!(files.len(), 2, "each file is its own partition: {parts:?}");
        assert_eq!(lag_of(&s), 0);
        // The old file's partition is still reported, settled.
        assert_eq!(s.lag().len(), 2);
    }

    #[tokio::test]
    async fn growth_after_rotation_past_the_old_offset_reads_whole_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e.jsonl");
        append(&p, &lines(0..10));
        let mut s = follow(&p, &[]);
        assert_eq!(drain(&mut s).await.0, want(0..10));
        std::fs::rename(&p, dir.path().join("e.jsonl.1")).unwrap();
        append(&p, &lines(100..101));
        assert_eq!(drain(&mut s).await.0, want(100..101));
        append(&p, &lines(101..140));
        assert_eq!(drain(&mut s).await.0, want(101..140));
        // Growth in one go past the old offset, without a poll in between.
        std::fs::rename(&p, dir.path().join("e.jsonl.2")).unwrap();
        append(&p, &lines(200..260));
        assert_eq!(drain(&mut s).await.0, want(200..260));
        assert_eq!(lag_of(&s), 0);
    }

    #[tokio::test]
    async fn truncation_in_place_reads_the_file_again_from_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e.jsonl");
        append(&p, &lines(0..20));
        let mut s = follow(&p, &[]);
        assert_eq!(drain(&mut s).await.0, want(0..20));
        let tag = s.lag()[0].partition;
        // copytruncate: emptied in place, then written again.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(0)
            .unwrap();
        append(&p, &lines(50..52));
        let b = take(&mut s).await;
        assert_eq!(texts(&b), want(50..52));
        assert_eq!(b[0].origin.offset, 0);
        assert_eq!(b[0].origin.partition, tag, "the same file");
        assert_eq!(lag_of(&s), 0);
        append(&p, &lines(52..80));
        assert_eq!(drain(&mut s).await.0, want(52..80));
        assert_eq!(lag_of(&s), 0);
    }

    #[tokio::test]
    async fn delete_and_recreate_is_read_as_a_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e.jsonl");
        append(&p, &lines(0..5));
        let mut s = follow(&p, &[]);
        assert_eq!(drain(&mut s).await.0, want(0..5));
        std::fs::remove_file(&p).unwrap();
        let why = transient_reason(&mut s).await;
        assert!(why.contains("does not exist"), "{why}");
        // Larger than what was read of the old one: size alone would not tell.
        append(&p, &lines(10..30));
        assert_eq!(drain(&mut s).await.0, want(10..30));
        assert_eq!(lag_of(&s), 0);
    }

    #[tokio::test]
    async fn a_missing_file_is_transient_and_read_once_created() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("later.jsonl");
        let mut s = follow(&p, &[]);
        let why = transient_reason(&mut s).await;
        assert_eq!(why, format!("input file {} does not exist", p.display()));
        assert!(s.lag().is_empty());
        append(&p, &lines(0..3));
        assert_eq!(drain(&mut s).await.0, want(0..3));

        // Not followed, a missing file is a configuration error.
        let gone = dir.path().join("never.jsonl");
        let mut s = JsonlSource::new(&[gone], &[], false, Duration::ZERO);
        let e = s.next_batch(10).await.expect_err("fatal");
        assert!(matches!(
            SourceError::of(&e),
            Some(SourceError::Fatal { .. })
        ));
    }

    #[tokio::test]
    async fn open_faults_are_transient_and_resume_where_they_stood() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e.jsonl");
        append(&p, &lines(0..3));
        let errno = Arc::new(AtomicI32::new(0));
        let opener = {
            let errno = errno.clone();
            move |p: &Path| match errno.load(Ordering::SeqCst) {
                0 => File::open(p),
                n => Err(io::Error::from_raw_os_error(n)),
            }
        };
        let emfile = rustix::io::Errno::MFILE.raw_os_error();
        let eacces = rustix::io::Errno::ACCESS.raw_os_error();

        // At start.
        errno.store(emfile, Ordering::SeqCst);
        let mut s = follow(&p, &[]).with_opener(opener.clone());
        assert!(
            transient_reason(&mut s)
                .await
                .contains("too many open files")
        );
        errno.store(eacces, Ordering::SeqCst);
        assert!(transient_reason(&mut s).await.contains("permission denied"));
        errno.store(0, Ordering::SeqCst);
        assert_eq!(drain(&mut s).await.0, want(0..3));

        // When switching to a rotated file: the old one stays, nothing is
        // skipped or read twice.
        std::fs::rename(&p, dir.path().join("e.jsonl.1")).unwrap();
        append(&p, &lines(3..6));
        errno.store(emfile, Ordering::SeqCst);
        assert!(
            transient_reason(&mut s)
                .await
                .contains("too many open files")
        );
        assert!(
            transient_reason(&mut s)
                .await
                .contains("too many open files")
        );
        errno.store(eacces, Ordering::SeqCst);
        assert!(transient_reason(&mut s).await.contains("permission denied"));
        errno.store(0, Ordering::SeqCst);
        assert_eq!(drain(&mut s).await.0, want(3..6));
    }

    #[tokio::test]
    async fn a_restart_resumes_only_in_the_file_it_checkpointed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e.jsonl");
        append(&p, &lines(0..10));
        let mut s = follow(&p, &[]);
        let b = take(&mut s).await;
        let cps = checkpoints_of(&b);
        drop(s);

        // Same file: resume after the checkpoint.
        append(&p, &lines(10..12));
        let mut s = follow(&p, &cps);
        assert_eq!(drain(&mut s).await.0, want(10..12));
        drop(s);

        // Rotated while down; the new file is larger than the old offset.
        std::fs::rename(&p, dir.path().join("e.jsonl.1")).unwrap();
        append(&p, &lines(100..150));
        let mut s = follow(&p, &cps);
        assert_eq!(drain(&mut s).await.0, want(100..150));
        drop(s);

        // A checkpoint from before files were told apart (partition 0) is
        // applied while it is a line boundary of the file...
        let legacy = |offset| Checkpoint {
            source: p.display().to_string(),
            partition: 0,
            offset,
        };
        let first = lines(100..101).len() as i64;
        let mut s = follow(&p, &[legacy(first)]);
        assert_eq!(drain(&mut s).await.0, want(101..150));
        // ... and not in the middle of a line.
        let mut s = follow(&p, &[legacy(first - 3)]);
        assert_eq!(drain(&mut s).await.0, want(100..150));
    }

    #[tokio::test]
    async fn a_partial_line_is_read_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e.jsonl");
        let big = 4 << 20;
        append(&p, &"x".repeat(big));
        let mut s = follow(&p, &[]).with_max_record_bytes(8 << 20);
        for _ in 0..5 {
            assert!(take(&mut s).await.is_empty());
        }
        assert_eq!(s.read_bytes, big as u64, "each byte is read once");
        append(&p, "y\n{\"n\":1}\n");
        let b = take(&mut s).await;
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].payload.len(), big + 1);
        assert_eq!(b[1].payload, b"{\"n\":1}");
        assert_eq!(s.read_bytes, big as u64 + 10);
        assert_eq!(lag_of(&s), 0);
    }

    #[tokio::test]
    async fn a_line_longer_than_the_limit_is_handed_out_as_its_head() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e.jsonl");
        let limit = 1000;
        append(&p, &"x".repeat(3 * CHUNK));
        let mut s = follow(&p, &[]).with_max_record_bytes(limit);
        assert!(take(&mut s).await.is_empty());
        let held = |s: &JsonlSource| {
            let cur = s.files[0].cur.as_ref().unwrap();
            cur.buf.len() - cur.head + cur.over.as_ref().map_or(0, |o| o.head.len())
        };
        assert!(held(&s) <= limit + 2, "{} bytes held", held(&s));
        append(&p, &"x".repeat(CHUNK));
        assert!(take(&mut s).await.is_empty());
        assert!(held(&s) <= limit + 2, "{} bytes held", held(&s));
        append(&p, "\n{\"n\":1}\n");
        let b = take(&mut s).await;
        assert_eq!(b.len(), 2);
        assert_eq!(
            b[0].payload.len(),
            limit + 2,
            "refused by the pipeline as too large"
        );
        assert_eq!(b[0].next_offset, 4 * CHUNK as i64 + 1);
        assert_eq!(b[1].payload, b"{\"n\":1}");
        assert_eq!(lag_of(&s), 0);

        // A line of exactly the limit, even with `\r\n`, is whole.
        let exact = format!("{}\r\n", "z".repeat(limit));
        append(&p, &exact);
        let b = take(&mut s).await;
        assert_eq!(b[0].payload.len(), limit);
    }

    #[tokio::test]
    async fn lag_is_the_uncommitted_bytes_of_the_current_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e.jsonl");
        let text = lines(0..3);
        append(&p, &text);
        let mut s = follow(&p, &[]);
        let b = s.next_batch(100).await.unwrap().unwrap();
        assert_eq!(lag_of(&s), text.len() as i64, "read, not yet durable");
        s.commit(&checkpoints_of(&b)).await.unwrap();
        assert_eq!(lag_of(&s), 0);
        std::fs::rename(&p, dir.path().join("e.jsonl.1")).unwrap();
        let next = lines(3..5);
        append(&p, &next);
        assert_eq!(lag_of(&s), next.len() as i64, "the new file is behind");
        assert_eq!(drain(&mut s).await.0, want(3..5));
        assert_eq!(lag_of(&s), 0);
    }
}
