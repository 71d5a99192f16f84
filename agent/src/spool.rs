//! The usage spool: every usage record is appended to a local file and
//! fsync'd (in batches) before it is sent, and kept until the coordinator
//! acknowledges it. A restarted agent resends what was not acknowledged;
//! the coordinator's high-water mark makes the resend harmless.
//!
//! Durable before delivered: the spool publishes a [`Durability`] mark, the
//! highest sequence number whose record (and every one before it) is on
//! disk. A request waits for its record's number to be covered before its
//! client receives the end of the response. Records are written in the
//! order they were numbered, one write and one fsync per batch of whatever
//! arrived meanwhile (group commit).
//!
//! When the disk refuses a write (full, I/O error), the records stay in a
//! bounded buffer in memory, are never sent (so never acknowledged), and
//! the write is retried with backoff; admission stops meanwhile (see
//! [`Durability::refusal`]) and resumes by itself once a write succeeds.
//! The spool must never send a record that is not on disk.
//!
//! Files in the spool directory:
//! - `usage.spool`: an 8-byte header (`ALLOTSP` and format 2), then
//!   protobuf `UsageRecord`s, each framed by its length and its CRC-32C,
//!   append-only;
//!   emptied (to its header) once everything in it is acknowledged, and rewritten at
//!   start with only what is pending (into `usage.spool.tmp`, fsync,
//!   rename, fsync of the directory: a crash at any point leaves the old
//!   or the new file whole);
//! - `state.json`: the agent's epoch and the acknowledged high-water mark,
//!   replaced atomically (write, fsync, rename, fsync of the directory).

use allot::pb;
use prost::Message;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

const LOG: &str = "usage.spool";
/// A log that had a damaged frame before its end is kept whole under this
/// name (then `.1`, `.2`, ... up to [`MAX_DAMAGED_COPIES`]) for an operator.
const LOG_DAMAGED: &str = "usage.spool.damaged";
const MAX_DAMAGED_COPIES: u32 = 16;
/// The first 8 bytes of a format-2 log. A log without them is format 1
/// (length-prefixed records, no checksum), written by earlier agents.
const LOG_MAGIC: &[u8; 8] = b"ALLOTSP\x02";
/// A frame longer than this is damage, not a record (records are a few
/// hundred bytes; their strings are bounded far below this).
const MAX_FRAME: usize = 1024 * 1024;
const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
const LOG_TMP: &str = "usage.spool.tmp";
const STATE: &str = "state.json";
const STATE_TMP: &str = "state.json.tmp";
/// Records per `UsageBatch` message.
const BATCH: usize = 512;
/// Longest a response waits for its record's fsync before the client gets
/// `503 usage_spool_unavailable` instead (a disk whose fsync hangs).
const MAX_DURABLE_WAIT: Duration = Duration::from_secs(30);
/// `usage.spool` is rewritten with only its unacknowledged records once it
/// passes 64 MiB (and twice its size after the last rewrite): its size is
/// bounded by about twice the records pending, never by the uptime.
const COMPACT_BYTES: u64 = 64 * 1024 * 1024;
/// Most records taken from the channel for one write and fsync.
const MAX_WRITE: usize = 4096;
/// First and longest wait before a failed write is tried again.
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct SpoolState {
    epoch: u64,
    acked: u64,
}

/// What a spool holds when the agent starts.
pub struct Recovered {
    pub epoch: u64,
    /// Highest sequence number ever written.
    pub last_seq: u64,
    pub pending: BTreeMap<u64, pb::UsageRecord>,
}

#[derive(Debug, thiserror::Error)]
#[error("spool {path}: {message}")]
pub struct SpoolError {
    path: String,
    message: String,
}

fn spool_error(path: &Path, e: impl std::fmt::Display) -> SpoolError {
    SpoolError {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// Events from the connection to the spool.
pub enum SpoolEvent {
    /// A new session is up: resend everything pending on it.
    Session(mpsc::Sender<pb::AgentMessage>),
    /// The coordinator settled everything up to here.
    Ack(u64),
}

/// How far the spool got: every record numbered up to `seq` is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurableMark {
    pub seq: u64,
    /// The last write failed: records above `seq` wait in memory for the
    /// disk to take them, and requests waiting for them are answered with
    /// an error instead.
    pub failing: bool,
}

/// Why the agent admits nothing new for now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpoolRefusal {
    /// The spool cannot write (the error, as the disk gave it).
    Unwritable(String),
    /// `max` records wait in memory for the coordinator or the disk.
    Full { max: usize },
}

/// A request's record could not be made durable.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the usage record could not be written to the spool: {0}")]
pub struct NotDurable(pub String);

/// The spool's durable high-water mark and health, shared with the
/// request handlers: they wait on it before delivering the end of a
/// response, and admission reads it before taking a request.
pub struct Durability {
    mark: watch::Sender<DurableMark>,
    failing: AtomicBool,
    /// Records held in memory: written and not acknowledged, or waiting
    /// for the disk.
    held: AtomicUsize,
    max_held: usize,
    /// The last write error, for refusals and `/readyz`.
    error: Mutex<String>,
}

impl Durability {
    fn new(seq: u64, held: usize, max_held: usize) -> Durability {
        Durability {
            mark: watch::channel(DurableMark {
                seq,
                failing: false,
            })
            .0,
            failing: AtomicBool::new(false),
            held: AtomicUsize::new(held),
            max_held: max_held.max(1),
            error: Mutex::new(String::new()),
        }
    }

    /// Every record numbered up to here is on disk.
    pub fn durable_seq(&self) -> u64 {
        self.mark.borrow().seq
    }

    /// Records held in memory until acknowledged (or written).
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Why admission must stop now, if it must: the spool cannot write,
    /// or it holds `max_held` records already. Two atomic loads.
    pub fn refusal(&self) -> Option<SpoolRefusal> {
        if self.failing.load(Ordering::Acquire) {
            return Some(SpoolRefusal::Unwritable(self.last_error()));
        }
        if self.held.load(Ordering::Relaxed) >= self.max_held {
            return Some(SpoolRefusal::Full { max: self.max_held });
        }
        None
    }

    /// Resolves once the record numbered `seq` is on disk, or fails when
    /// the spool cannot write it for now (the record stays in memory and
    /// is written, and charged, once the disk takes it).
    pub fn wait(
        self: &Arc<Self>,
        seq: u64,
    ) -> impl std::future::Future<Output = Result<(), NotDurable>> + Send + 'static {
        let mut mark = self.mark.subscribe();
        let this = self.clone();
        async move {
            let waited = tokio::time::timeout(
                MAX_DURABLE_WAIT,
                mark.wait_for(|m| m.seq >= seq || m.failing),
            )
            .await;
            match waited {
                Ok(Ok(m)) if m.seq >= seq => Ok(()),
                Ok(Ok(_)) => Err(NotDurable(this.last_error())),
                Ok(Err(_)) => Err(NotDurable("the spool has stopped".into())),
                // A disk whose fsync hangs: the client is told, not kept.
                Err(_) => Err(NotDurable(format!(
                    "the usage spool did not confirm the record within {} s",
                    MAX_DURABLE_WAIT.as_secs()
                ))),
            }
        }
    }

    fn last_error(&self) -> String {
        // A std mutex: held for a copy, never across an await.
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The spool cannot write (or cannot run at all).
    pub fn set_failing(&self, error: String) {
        *self.error.lock().unwrap_or_else(|p| p.into_inner()) = error;
        self.failing.store(true, Ordering::Release);
        self.mark.send_modify(|m| m.failing = true);
    }

    /// A mark at 0 with no spool behind it, for unit tests of the path.
    #[cfg(test)]
    pub(crate) fn for_tests(max_held: usize) -> Arc<Durability> {
        Arc::new(Durability::new(0, 0, max_held))
    }

    /// Every record up to `seq` is on disk, as the spool would say.
    #[cfg(test)]
    pub(crate) fn mark_durable(&self, seq: u64) {
        self.set_durable(seq);
    }

    fn set_durable(&self, seq: u64) {
        self.failing.store(false, Ordering::Release);
        self.mark.send_if_modified(|m| {
            let changed = m.seq < seq || m.failing;
            m.seq = m.seq.max(seq);
            m.failing = false;
            changed
        });
    }

    fn set_held(&self, held: usize) {
        self.held.store(held, Ordering::Relaxed);
        metrics::gauge!("allot_agent_spool_depth").set(held as f64);
    }
}

pub struct Spool {
    dir: PathBuf,
    log: File,
    /// Bytes of `usage.spool` known to be whole and fsync'd.
    log_len: u64,
    /// `log_len` after the last compaction (or the start).
    compacted_len: u64,
    /// Compact the log past this many bytes ([`COMPACT_BYTES`]).
    compact_bytes: u64,
    /// A write or fsync failed after `log_len`: what follows may be torn
    /// or lost, and is cut off before the next write.
    log_torn: bool,
    state: SpoolState,
    pending: BTreeMap<u64, pb::UsageRecord>,
    session: Option<mpsc::Sender<pb::AgentMessage>>,
    last_sent: Option<Instant>,
    state_dirty: bool,
    /// The last `state.json` write failed (logged once).
    state_failing: bool,
    depth: Arc<AtomicUsize>,
    /// Written and fsync'd, not yet sent: usage goes out in batches.
    unsent: Vec<pb::UsageRecord>,
    last_flush: Instant,
    /// Received, not on disk yet: the disk refused them. Never sent.
    unwritten: Vec<pb::UsageRecord>,
    /// When to try writing `unwritten` again, and the wait after that.
    retry_at: Option<tokio::time::Instant>,
    retry_wait: Duration,
    durability: Arc<Durability>,
    /// Test hook: the next writes fail with this error.
    #[cfg(test)]
    fault: Option<Fault>,
}

#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Write,
    Fsync,
}

/// fsyncs a directory, so that a file created or renamed in it stays.
fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| spool_error(dir, e))
}

/// Replaces `dir/name` with `bytes` atomically: a temporary file, fsync,
/// rename, fsync of the directory.
fn replace_file(dir: &Path, name: &str, tmp_name: &str, bytes: &[u8]) -> Result<(), SpoolError> {
    let tmp = dir.join(tmp_name);
    let path = dir.join(name);
    write_temp(&tmp, bytes)?;
    std::fs::rename(&tmp, &path).map_err(|e| spool_error(&path, e))?;
    sync_dir(dir)
}

fn write_temp(tmp: &Path, bytes: &[u8]) -> Result<(), SpoolError> {
    let mut file = allot_runtime::private_files::create(tmp).map_err(|e| spool_error(tmp, e))?;
    file.write_all(bytes).map_err(|e| spool_error(tmp, e))?;
    file.sync_all().map_err(|e| spool_error(tmp, e))
}

fn write_state(dir: &Path, state: &SpoolState) -> Result<(), SpoolError> {
    let bytes = serde_json::to_vec(state).map_err(|e| spool_error(&dir.join(STATE), e))?;
    replace_file(dir, STATE, STATE_TMP, &bytes)
}

/// What was read back from a log.
#[derive(Debug, Default, PartialEq)]
pub struct ParsedLog {
    pub records: Vec<pb::UsageRecord>,
    /// Bytes skipped over inside the log: damage with whole records after
    /// it (a bad sector, a stray write), never a crash.
    pub damaged_bytes: usize,
    /// Bytes of an incomplete last frame: a crash in the middle of a
    /// write, which was never acknowledged to anyone.
    pub torn_bytes: usize,
}

/// The whole record framed at `at` of a format-2 log, and its length.
fn frame_at(bytes: &[u8], at: usize) -> Option<(pb::UsageRecord, usize)> {
    let header = bytes.get(at..at.checked_add(8)?)?;
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
    // Every record has a sequence number from 1, so it is never empty (a
    // run of zeros, which file systems leave after a crash, has a valid
    // CRC-32C for an empty body).
    if len == 0 || len > MAX_FRAME {
        return None;
    }
    let body = bytes.get(at + 8..at + 8 + len)?;
    if CRC.checksum(body) != crc {
        return None;
    }
    let record = pb::UsageRecord::decode(body).ok().filter(|r| r.seq > 0)?;
    Some((record, 8 + len))
}

/// Reads a log's bytes, of either format. In format 2 a frame that does
/// not check out is skipped to the next one that does, so damage in the
/// middle of the log loses only the records it hit; what cannot be read
/// at the end is a torn tail. Format 1 has no checksums and stops at the
/// first frame it cannot read, as earlier agents did.
pub fn parse_log(bytes: &[u8]) -> ParsedLog {
    let mut parsed = ParsedLog::default();
    let Some(body) = bytes.strip_prefix(LOG_MAGIC) else {
        let mut at = 0usize;
        while at + 4 <= bytes.len() {
            let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
            let Some(record) = bytes
                .get(at + 4..(at + 4).saturating_add(len))
                .and_then(|b| pb::UsageRecord::decode(b).ok())
            else {
                break;
            };
            // Sequence numbers start at 1: a record without one is not a
            // record (and could not be written again in format 2).
            if record.seq > 0 {
                parsed.records.push(record);
            }
            at += 4 + len;
        }
        parsed.torn_bytes = bytes.len() - at;
        return parsed;
    };
    let mut at = 0usize;
    while at < body.len() {
        if let Some((record, len)) = frame_at(body, at) {
            parsed.records.push(record);
            at += len;
            continue;
        }
        match (at + 1..body.len()).find(|&next| frame_at(body, next).is_some()) {
            Some(next) => {
                parsed.damaged_bytes += next - at;
                at = next;
            }
            None => {
                parsed.torn_bytes = body.len() - at;
                break;
            }
        }
    }
    parsed
}

/// Reads every record of a spool file that can be read. Damage before
/// the end keeps a copy of the file as it was ([`LOG_DAMAGED`]), since
/// the rewrite at start would otherwise erase the evidence.
fn read_records(dir: &Path, path: &Path) -> Result<Vec<pb::UsageRecord>, SpoolError> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut bytes)
                .map_err(|e| spool_error(path, e))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(spool_error(path, e)),
    }
    let parsed = parse_log(&bytes);
    if parsed.torn_bytes > 0 {
        tracing::warn!(path = %path.display(), bytes = parsed.torn_bytes,
            "ignoring a torn record at the end of the spool");
    }
    if parsed.damaged_bytes > 0 {
        metrics::counter!("allot_agent_spool_damaged_bytes_total")
            .increment(parsed.damaged_bytes as u64);
        let copy = (0..MAX_DAMAGED_COPIES)
            .map(|n| match n {
                0 => dir.join(LOG_DAMAGED),
                n => dir.join(format!("{LOG_DAMAGED}.{n}")),
            })
            .find(|p| !p.exists());
        if let Some(copy) = &copy {
            std::fs::copy(path, copy).map_err(|e| spool_error(copy, e))?;
        }
        tracing::error!(path = %path.display(), bytes = parsed.damaged_bytes,
            records = parsed.records.len(), copy = ?copy,
            "the usage spool was damaged before its end: the damaged bytes are skipped and every \
             whole record after them is kept; the records the damage hit are lost");
    }
    Ok(parsed.records)
}

/// A whole log holding `records`: the header, then a frame each.
pub fn log_image<'a>(records: impl Iterator<Item = &'a pb::UsageRecord>) -> Vec<u8> {
    let mut out = LOG_MAGIC.to_vec();
    for record in records {
        frame(&mut out, record);
    }
    out
}

impl Spool {
    /// Opens (or creates) the spool, bumps the epoch and recovers what was
    /// not acknowledged. `max_held`: records kept in memory before
    /// admission stops ([`Durability::refusal`]).
    pub fn open(dir: &Path, max_held: usize) -> Result<(Spool, Recovered), SpoolError> {
        allot_runtime::private_files::create_dir_all(dir).map_err(|e| spool_error(dir, e))?;
        let state_path = dir.join(STATE);
        let mut state: SpoolState = match std::fs::read(&state_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| spool_error(&state_path, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => SpoolState::default(),
            Err(e) => return Err(spool_error(&state_path, e)),
        };
        state.epoch += 1;
        write_state(dir, &state)?;
        let log_path = dir.join(LOG);
        // A rewrite interrupted before its rename: `usage.spool` is whole,
        // the temporary copy is not to be trusted.
        match std::fs::remove_file(dir.join(LOG_TMP)) {
            Ok(()) => tracing::warn!("removed an unfinished rewrite of the usage spool"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(spool_error(&dir.join(LOG_TMP), e)),
        }
        let records = read_records(dir, &log_path)?;
        let last_seq = records
            .iter()
            .map(|r| r.seq)
            .max()
            .unwrap_or(0)
            .max(state.acked);
        let pending: BTreeMap<u64, pb::UsageRecord> = records
            .into_iter()
            .filter(|r| r.seq > state.acked)
            .map(|r| (r.seq, r))
            .collect();
        // Rewrite the log with only what is pending, dropping a torn tail:
        // into a new file, renamed over the old one once on disk, so that
        // a crash here never loses a pending record.
        let frames = log_image(pending.values());
        replace_file(dir, LOG, LOG_TMP, &frames)?;
        let log_len = frames.len() as u64;
        let log = OpenOptions::new()
            .append(true)
            .open(&log_path)
            .map_err(|e| spool_error(&log_path, e))?;
        let recovered_len = pending.len();
        let recovered = Recovered {
            epoch: state.epoch,
            last_seq,
            pending: pending.clone(),
        };
        if !pending.is_empty() {
            tracing::info!(
                records = pending.len(),
                "usage records recovered from the spool"
            );
        }
        Ok((
            Spool {
                dir: dir.to_path_buf(),
                log,
                log_len,
                compacted_len: log_len,
                compact_bytes: COMPACT_BYTES,
                log_torn: false,
                state,
                pending,
                session: None,
                last_sent: None,
                state_dirty: false,
                state_failing: false,
                depth: Arc::new(AtomicUsize::new(recovered_len)),
                unsent: Vec::new(),
                last_flush: Instant::now(),
                unwritten: Vec::new(),
                retry_at: None,
                retry_wait: RETRY_FIRST,
                durability: Arc::new(Durability::new(last_seq, recovered_len, max_held)),
                #[cfg(test)]
                fault: None,
            },
            recovered,
        ))
    }

    /// Records not yet acknowledged, readable from other tasks.
    pub fn depth(&self) -> Arc<AtomicUsize> {
        self.depth.clone()
    }

    /// The durable mark and health, for request handlers.
    pub fn durability(&self) -> Arc<Durability> {
        self.durability.clone()
    }

    fn set_depth(&self) {
        let held = self.pending.len() + self.unwritten.len();
        self.depth.store(held, Ordering::Relaxed);
        self.durability.set_held(held);
    }

    fn send_pending(&mut self) {
        self.unsent.clear();
        let Some(session) = &self.session else {
            return;
        };
        send_in_batches(session, self.pending.values().cloned());
        self.last_sent = Some(Instant::now());
    }

    /// Appends `frames` after the last whole, fsync'd byte and fsyncs.
    fn append(&mut self, frames: &[u8]) -> std::io::Result<()> {
        #[cfg(test)]
        if self.fault == Some(Fault::Write) {
            return Err(std::io::Error::other("injected write failure"));
        }
        if self.log_torn {
            // Cut off what a failed write may have left (a torn frame
            // would hide every record after it from recovery).
            self.log.set_len(self.log_len)?;
            self.log_torn = false;
        }
        self.log_torn = true;
        self.log.write_all(frames)?;
        #[cfg(test)]
        if self.fault == Some(Fault::Fsync) {
            return Err(std::io::Error::other("injected fsync failure"));
        }
        // After a failed fsync the kernel may have dropped the pages: the
        // frames are cut off and written again, never just fsync'd again.
        self.log.sync_data()?;
        self.log_torn = false;
        self.log_len += frames.len() as u64;
        Ok(())
    }

    /// Writes `records` (and whatever waits from a failed write before
    /// them, in order) with one write and one fsync; only then are they
    /// pending, to be sent, and covered by the durable mark. On failure
    /// they wait in memory for [`Spool::retry`].
    fn write_records(&mut self, records: Vec<pb::UsageRecord>) {
        self.unwritten.extend(records);
        if self.retry_at.is_some() {
            // The disk failed a moment ago: wait for the retry, in order.
            self.set_depth();
            return;
        }
        self.write_unwritten();
    }

    fn write_unwritten(&mut self) {
        if self.unwritten.is_empty() {
            return;
        }
        let mut frames = Vec::with_capacity(self.unwritten.len() * 128);
        for record in &self.unwritten {
            frame(&mut frames, record);
        }
        match self.append(&frames) {
            Ok(()) => {
                let records = std::mem::take(&mut self.unwritten);
                let last = records.last().map_or(0, |r| r.seq);
                for record in &records {
                    self.pending.insert(record.seq, record.clone());
                }
                self.unsent.extend(records);
                if self.retry_wait != RETRY_FIRST {
                    tracing::info!("the usage spool is writable again: admission resumes");
                }
                self.retry_at = None;
                self.retry_wait = RETRY_FIRST;
                self.set_depth();
                self.durability.set_durable(last);
            }
            Err(e) => {
                metrics::counter!("allot_agent_spool_write_errors_total").increment(1);
                if self.retry_wait == RETRY_FIRST {
                    tracing::error!(
                        error = %e,
                        records = self.unwritten.len(),
                        dir = %self.dir.display(),
                        "cannot write the usage spool: admission stops until it can; the records wait in memory and are not sent"
                    );
                }
                self.durability
                    .set_failing(format!("{}: {e}", self.dir.join(LOG).display()));
                self.retry_at = Some(tokio::time::Instant::now() + self.retry_wait);
                self.retry_wait = (self.retry_wait * 2).min(RETRY_MAX);
                self.set_depth();
            }
        }
    }

    /// Tries a failed write again.
    fn retry(&mut self) {
        self.retry_at = None;
        self.write_unwritten();
    }

    /// Sends what was written since the last flush, in `UsageBatch`es.
    fn send_unsent(&mut self) {
        self.last_flush = Instant::now();
        let unsent = std::mem::take(&mut self.unsent);
        let Some(session) = &self.session else {
            return;
        };
        send_in_batches(session, unsent.into_iter());
        if self.last_sent.is_none() {
            self.last_sent = Some(Instant::now());
        }
    }

    fn ack(&mut self, high_water_seq: u64) {
        // A coordinator cannot acknowledge what is not on disk yet (a
        // buggy or hostile one would otherwise make a restart drop it).
        let durable = self.durability.durable_seq();
        if high_water_seq > durable {
            tracing::error!(high_water_seq, durable, "the coordinator acknowledged records not yet written; taken as acknowledging what is on disk");
        }
        let high_water_seq = high_water_seq.min(durable);
        if high_water_seq <= self.state.acked {
            return;
        }
        debug_assert!(
            high_water_seq <= self.durability.durable_seq()
                || self.pending.range(..=high_water_seq).next().is_none(),
            "acknowledged records must have been on disk"
        );
        self.state.acked = high_water_seq;
        self.pending = self.pending.split_off(&high_water_seq.saturating_add(1));
        self.state_dirty = true;
        self.last_sent = (!self.pending.is_empty()).then(Instant::now);
        self.set_depth();
    }

    fn flush_state(&mut self) {
        if !self.state_dirty {
            return;
        }
        if let Err(e) = write_state(&self.dir, &self.state) {
            // Tried again every tick: said once per outage.
            if !self.state_failing {
                tracing::error!(error = %e, "cannot persist the spool state");
            }
            self.state_failing = true;
            return;
        }
        self.state_failing = false;
        self.state_dirty = false;
        // Everything in the log is acknowledged: start it afresh, after
        // its header (without it, what follows would be read as format 1).
        let header = LOG_MAGIC.len() as u64;
        if self.pending.is_empty() && self.unwritten.is_empty() && self.log_len > header {
            match self.log.set_len(header) {
                Ok(()) => self.log_len = header,
                Err(e) => tracing::warn!(error = %e, "cannot truncate the usage spool"),
            }
            return;
        }
        // Under constant load something is always pending, so the log
        // would never be emptied: past COMPACT_BYTES (and twice what its
        // last compaction left), it is rewritten with only its pending
        // records, atomically, like at start.
        if self.unwritten.is_empty()
            && self.log_len > self.compact_bytes
            && self.log_len > self.compacted_len.saturating_mul(2)
        {
            if let Err(e) = self.compact() {
                tracing::warn!(error = %e, "cannot compact the usage spool; trying again later");
            }
        }
    }

    /// Rewrites the log with only the pending records: a temporary file,
    /// fsync, rename, fsync of the directory. A crash at any point leaves
    /// the old log or the new one, each holding every pending record.
    fn compact(&mut self) -> Result<(), SpoolError> {
        let frames = log_image(self.pending.values());
        // The new log is opened for appending before it replaces the old
        // one: a failed open leaves the old log in use and in place, never
        // a handle on a file the rename unlinked (appends there would be
        // "durable" in a file no restart reads).
        let tmp = self.dir.join(LOG_TMP);
        write_temp(&tmp, &frames)?;
        let log = OpenOptions::new()
            .append(true)
            .open(&tmp)
            .map_err(|e| spool_error(&tmp, e))?;
        let path = self.dir.join(LOG);
        std::fs::rename(&tmp, &path).map_err(|e| spool_error(&path, e))?;
        self.log = log;
        sync_dir(&self.dir)?;
        tracing::debug!(
            from = self.log_len,
            to = frames.len(),
            "usage spool compacted"
        );
        metrics::counter!("allot_agent_spool_compactions_total").increment(1);
        self.log_len = frames.len() as u64;
        self.compacted_len = self.log_len;
        self.log_torn = false;
        Ok(())
    }

    /// Runs until the record channel closes and everything received is on
    /// disk. Records are written and fsync'd as they come, in batches of
    /// what arrived during the previous fsync (group commit), and sent
    /// every `flush_every` (or as soon as a full batch is there), so a
    /// busy agent sends one message per many requests.
    pub async fn run(
        mut self,
        mut records: mpsc::UnboundedReceiver<pb::UsageRecord>,
        mut events: mpsc::UnboundedReceiver<SpoolEvent>,
        resend_after: Duration,
        flush_every: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut events_open = true;
        let mut tick = tokio::time::interval(
            flush_every.clamp(Duration::from_millis(1), Duration::from_millis(100)),
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let retry_at = self.retry_at;
            tokio::select! {
                record = records.recv() => {
                    let Some(record) = record else { break };
                    // Group commit: everything that arrived while the last
                    // batch was being fsync'd goes in one write and fsync.
                    let mut batch = vec![record];
                    while batch.len() < MAX_WRITE {
                        match records.try_recv() {
                            Ok(r) => batch.push(r),
                            Err(_) => break,
                        }
                    }
                    self.write_records(batch);
                    if flush_every.is_zero() || self.unsent.len() >= BATCH {
                        self.send_unsent();
                    }
                }
                _ = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)), if retry_at.is_some() => {
                    self.retry();
                    if flush_every.is_zero() || self.unsent.len() >= BATCH {
                        self.send_unsent();
                    }
                }
                event = events.recv(), if events_open => match event {
                    Some(SpoolEvent::Session(session)) => {
                        self.session = Some(session);
                        self.send_pending();
                    }
                    Some(SpoolEvent::Ack(high_water_seq)) => self.ack(high_water_seq),
                    None => events_open = false,
                },
                changed = stop.changed() => {
                    let stopping = changed.is_err() || *stop.borrow();
                    if stopping {
                        // Shutdown, or the agent is gone (its task dropped):
                        // what was handed over is written, then the spool
                        // ends.
                        let mut rest = Vec::new();
                        while let Ok(record) = records.try_recv() {
                            rest.push(record);
                        }
                        self.retry_at = None;
                        self.write_records(rest);
                        if !self.unwritten.is_empty() {
                            tracing::error!(
                                records = self.unwritten.len(),
                                "stopping with usage records the spool could not write: they are lost (their requests were answered with an error)"
                            );
                        }
                        if changed.is_err() {
                            return;
                        }
                        break;
                    }
                }
                _ = tick.tick() => {
                    if !self.unsent.is_empty() && self.last_flush.elapsed() >= flush_every {
                        self.send_unsent();
                    }
                    self.flush_state();
                    let stale = self.last_sent.is_some_and(|at| at.elapsed() >= resend_after);
                    if !self.pending.is_empty() && stale {
                        self.send_pending();
                    }
                }
            }
        }
        self.send_unsent();
        self.flush_state();
    }
}

/// Sends `records` to the session in `UsageBatch`es of [`BATCH`], until the
/// session's queue is full or closed: the resend timer or the next session
/// sends the rest again.
fn send_in_batches(
    session: &mpsc::Sender<pb::AgentMessage>,
    mut records: impl Iterator<Item = pb::UsageRecord>,
) {
    loop {
        let batch: Vec<pb::UsageRecord> = records.by_ref().take(BATCH).collect();
        if batch.is_empty() {
            return;
        }
        let message = pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Usage(pb::UsageBatch {
                records: batch,
            })),
        };
        if session.try_send(message).is_err() {
            return;
        }
    }
}

/// Appends one record to `out`: its length, its CRC-32C, its bytes.
fn frame(out: &mut Vec<u8>, record: &pb::UsageRecord) {
    let len = record.encoded_len();
    out.extend_from_slice(&(len as u32).to_le_bytes());
    let crc_at = out.len();
    out.extend_from_slice(&[0; 4]);
    record.encode(out).expect("a Vec grows to fit any record");
    let crc = CRC.checksum(&out[crc_at + 4..]);
    out[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64) -> pb::UsageRecord {
        pb::UsageRecord {
            seq,
            key_id: "k".into(),
            ..Default::default()
        }
    }

    #[test]
    fn unacknowledged_records_survive_a_restart_and_the_epoch_grows() {
        let dir = std::env::temp_dir().join(format!("allot-spool-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (mut spool, recovered) = Spool::open(&dir, 100).unwrap();
        assert_eq!(recovered.epoch, 1);
        spool.write_records(vec![record(1), record(2), record(3)]);
        spool.ack(1);
        spool.flush_state();
        drop(spool);
        let (_, recovered) = Spool::open(&dir, 100).unwrap();
        assert_eq!(recovered.epoch, 2);
        assert_eq!(
            recovered.pending.keys().copied().collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert_eq!(recovered.last_seq, 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn under_constant_load_the_log_is_compacted_to_its_pending_records() {
        let dir = fresh_dir("compact");
        let (mut spool, _) = Spool::open(&dir, 100_000).unwrap();
        spool.compact_bytes = 4096;
        // Records keep coming and are acknowledged one batch behind, so
        // the log is never entirely acknowledged.
        for batch in 0..200u64 {
            let first = batch * 10 + 1;
            spool.write_records((first..first + 10).map(record).collect());
            if batch > 0 {
                spool.ack(first - 1);
            }
            spool.flush_state();
        }
        let size = std::fs::metadata(dir.join(LOG)).unwrap().len();
        assert!(size <= 3 * 4096, "the log grew to {size} bytes");
        drop(spool);
        let (_, recovered) = Spool::open(&dir, 100_000).unwrap();
        let seqs: Vec<u64> = recovered.pending.keys().copied().collect();
        assert_eq!(
            seqs,
            (1991..=2000).collect::<Vec<_>>(),
            "exactly the unacknowledged records"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_acknowledgement_past_what_is_on_disk_acknowledges_only_what_is() {
        let dir = fresh_dir("over-ack");
        let (mut spool, _) = Spool::open(&dir, 100).unwrap();
        spool.write_records(vec![record(1), record(2)]);
        // A coordinator acknowledging far ahead (u64::MAX even).
        spool.ack(u64::MAX);
        assert_eq!(spool.state.acked, 2);
        spool.write_records(vec![record(3)]);
        spool.flush_state();
        drop(spool);
        let (_, recovered) = Spool::open(&dir, 100).unwrap();
        assert_eq!(
            recovered.pending.keys().copied().collect::<Vec<_>>(),
            vec![3]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_torn_tail_is_ignored() {
        let dir = std::env::temp_dir().join(format!("allot-spool-torn-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (mut spool, _) = Spool::open(&dir, 100).unwrap();
        spool.write_records(vec![record(1)]);
        drop(spool);
        let mut f = OpenOptions::new().append(true).open(dir.join(LOG)).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2]).unwrap();
        let (_, recovered) = Spool::open(&dir, 100).unwrap();
        assert_eq!(recovered.pending.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn damage_in_the_middle_of_the_log_loses_only_the_records_it_hit_and_is_kept_aside() {
        let dir = fresh_dir("damaged");
        let (mut spool, _) = Spool::open(&dir, 100).unwrap();
        spool.write_records((1..=5).map(record).collect());
        drop(spool);
        let path = dir.join(LOG);
        let mut bytes = std::fs::read(&path).unwrap();
        // Flip bytes inside the body of record 2 (after the header and
        // record 1).
        let first = frame_at(&bytes[8..], 0).unwrap().1;
        let target = 8 + first + 8 + 2;
        bytes[target] ^= 0xff;
        bytes[target + 1] ^= 0x55;
        std::fs::write(&path, &bytes).unwrap();
        let (_, recovered) = Spool::open(&dir, 100).unwrap();
        assert_eq!(pending_seqs(&recovered), vec![1, 3, 4, 5]);
        assert_eq!(recovered.last_seq, 5);
        assert_eq!(std::fs::read(dir.join(LOG_DAMAGED)).unwrap(), bytes);
        // The rewritten log reads back whole.
        let (_, again) = Spool::open(&dir, 100).unwrap();
        assert_eq!(pending_seqs(&again), vec![1, 3, 4, 5]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn records_written_after_the_log_was_emptied_are_read_back() {
        let dir = fresh_dir("emptied");
        let (mut spool, _) = Spool::open(&dir, 100).unwrap();
        spool.write_records(vec![record(1), record(2)]);
        spool.ack(2);
        spool.flush_state();
        assert_eq!(std::fs::read(dir.join(LOG)).unwrap(), LOG_MAGIC.to_vec());
        spool.write_records(vec![record(3)]);
        drop(spool);
        let (_, recovered) = Spool::open(&dir, 100).unwrap();
        assert_eq!(pending_seqs(&recovered), vec![3]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_format_1_frame_without_a_sequence_number_is_not_a_record() {
        // Found by the spool_log fuzz target: format 1 read a record with
        // seq 0, which format 2 (rightly) never reads back.
        let crash: &[u8] = &[
            0x07, 0, 0, 0, 0x08, 0x01, 0x10, 0x03, 0x22, 0x01, 0x6b, 0x07, 0, 0, 0, 0x08, 0x02,
            0x10, 0x03, 0x22, 0x01, 0, 0, 0, 0, 0, 0, 0, 0x08, 0x6b,
        ];
        let parsed = parse_log(crash);
        assert!(parsed.records.iter().all(|r| r.seq > 0));
        let again = parse_log(&log_image(parsed.records.iter()));
        assert_eq!(again.records, parsed.records);
    }

    #[test]
    fn frames_carry_the_standard_crc_32c() {
        // The check value of CRC-32C (Castagnoli), so that other tools
        // (and the fuzz seeds, written in Python) can check a frame.
        assert_eq!(CRC.checksum(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn zeros_and_garbage_are_never_read_as_records() {
        let mut one = LOG_MAGIC.to_vec();
        frame(&mut one, &record(7));
        let whole = one.clone();
        one.extend_from_slice(&[0; 4096]);
        let parsed = parse_log(&one);
        assert_eq!(parsed.records.len(), 1);
        assert_eq!(parsed.torn_bytes, 4096);
        let mut garbage = LOG_MAGIC.to_vec();
        garbage.extend((0..10_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
        garbage.extend_from_slice(&whole[8..]);
        let parsed = parse_log(&garbage);
        assert_eq!(parsed.records, vec![record(7)]);
        assert_eq!(parsed.damaged_bytes, 10_000);
    }

    #[test]
    fn a_log_written_by_an_earlier_agent_is_read_and_rewritten_in_the_new_format() {
        let dir = fresh_dir("format1");
        std::fs::create_dir_all(&dir).unwrap();
        let mut old = Vec::new();
        for seq in 1..=3 {
            let r = record(seq);
            old.extend_from_slice(&(r.encoded_len() as u32).to_le_bytes());
            r.encode(&mut old).unwrap();
        }
        std::fs::write(dir.join(LOG), &old).unwrap();
        let (_, recovered) = Spool::open(&dir, 100).unwrap();
        assert_eq!(pending_seqs(&recovered), vec![1, 2, 3]);
        assert!(std::fs::read(dir.join(LOG)).unwrap().starts_with(LOG_MAGIC));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn fresh_dir(label: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("allot-spool-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn pending_seqs(recovered: &Recovered) -> Vec<u64> {
        recovered.pending.keys().copied().collect()
    }

    #[test]
    fn a_restart_interrupted_between_the_temporary_write_and_the_rename_loses_nothing() {
        let dir = fresh_dir("rewrite");
        let (mut spool, _) = Spool::open(&dir, 100).unwrap();
        spool.write_records(vec![record(1), record(2), record(3)]);
        spool.ack(1);
        spool.flush_state();
        drop(spool);
        // The crash: a restart wrote its rewrite (pending records only)
        // into the temporary file, partly, and died before the rename.
        let mut frames = Vec::new();
        frame(&mut frames, &record(2));
        frames.extend_from_slice(&[9, 0, 0]);
        std::fs::write(dir.join(LOG_TMP), &frames).unwrap();
        let (spool, recovered) = Spool::open(&dir, 100).unwrap();
        assert_eq!(pending_seqs(&recovered), vec![2, 3]);
        assert!(!dir.join(LOG_TMP).exists(), "the unfinished copy is gone");
        drop(spool);
        // And the rewrite that completed keeps them for the next start.
        let (_, recovered) = Spool::open(&dir, 100).unwrap();
        assert_eq!(pending_seqs(&recovered), vec![2, 3]);
        assert_eq!(recovered.epoch, 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_usage_log_is_never_truncated_in_place_at_start() {
        let dir = fresh_dir("no-truncate");
        let (mut spool, _) = Spool::open(&dir, 100).unwrap();
        spool.write_records(vec![record(1), record(2)]);
        spool.ack(1);
        spool.flush_state();
        drop(spool);
        let before = std::fs::metadata(dir.join(LOG)).unwrap();
        // A reader holding the old file (as a crashed rewrite would leave
        // it) still sees every record: the start replaced the file instead
        // of truncating and refilling it.
        let old = File::open(dir.join(LOG)).unwrap();
        let (_, recovered) = Spool::open(&dir, 100).unwrap();
        assert_eq!(pending_seqs(&recovered), vec![2]);
        let mut kept = Vec::new();
        { old }.read_to_end(&mut kept).unwrap();
        assert_eq!(kept.len() as u64, before.len());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_durable_mark_advances_only_after_the_fsync() {
        let dir = fresh_dir("mark");
        let (mut spool, recovered) = Spool::open(&dir, 100).unwrap();
        let durability = spool.durability();
        assert_eq!(durability.durable_seq(), recovered.last_seq);
        spool.write_records(vec![record(1), record(2)]);
        assert_eq!(durability.durable_seq(), 2);

        // The write goes through, its fsync fails: not durable, not sent.
        spool.fault = Some(Fault::Fsync);
        spool.write_records(vec![record(3)]);
        assert_eq!(durability.durable_seq(), 2);
        assert!(matches!(
            durability.refusal(),
            Some(SpoolRefusal::Unwritable(_))
        ));
        assert!(
            !spool.pending.contains_key(&3),
            "an unwritten record is not pending"
        );
        assert!(spool.unsent.iter().all(|r| r.seq != 3), "nor sent");
        // Later records wait behind it, in order.
        spool.write_records(vec![record(4)]);
        assert_eq!(durability.durable_seq(), 2);
        assert_eq!(durability.held(), 4);

        spool.fault = None;
        spool.retry();
        assert_eq!(durability.durable_seq(), 4);
        assert_eq!(durability.refusal(), None);
        assert_eq!(
            spool.unsent.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        drop(spool);
        // The torn attempt was cut off: every record is read back once.
        let (_, recovered) = Spool::open(&dir, 100).unwrap();
        assert_eq!(pending_seqs(&recovered), vec![1, 2, 3, 4]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_waiter_is_told_when_its_record_cannot_be_written_and_released_once_it_is() {
        let dir = fresh_dir("waiter");
        let (mut spool, _) = Spool::open(&dir, 100).unwrap();
        let durability = spool.durability();
        let first = durability.wait(1);
        spool.write_records(vec![record(1)]);
        first.await.unwrap();

        let failed = durability.wait(2);
        spool.fault = Some(Fault::Write);
        spool.write_records(vec![record(2)]);
        let error = failed.await.unwrap_err();
        assert!(error.0.contains("injected write failure"), "{error}");

        spool.fault = None;
        spool.retry();
        durability.wait(2).await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn admission_stops_when_the_records_held_in_memory_reach_the_cap() {
        let dir = fresh_dir("cap");
        let (mut spool, _) = Spool::open(&dir, 3).unwrap();
        let durability = spool.durability();
        spool.write_records(vec![record(1), record(2)]);
        assert_eq!(durability.refusal(), None);
        spool.write_records(vec![record(3)]);
        assert_eq!(durability.refusal(), Some(SpoolRefusal::Full { max: 3 }));
        spool.ack(2);
        assert_eq!(durability.refusal(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
