//! The usage spool: every usage record is appended to a local file and
//! fsync'd (in batches) before it is sent, and kept until the coordinator
//! acknowledges it. A restarted agent resends what was not acknowledged;
//! the coordinator's high-water mark makes the resend harmless.
//!
//! Files in the spool directory:
//! - `usage.spool`: length-prefixed protobuf `UsageRecord`s, append-only;
//!   truncated once everything in it is acknowledged;
//! - `state.json`: the agent's epoch and the acknowledged high-water mark,
//!   replaced atomically (write, fsync, rename).

use allot::pb;
use prost::Message;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const LOG: &str = "usage.spool";
const STATE: &str = "state.json";
/// Records per `UsageBatch` message.
const BATCH: usize = 512;
/// How long the first record of a batch waits for others before the batch
/// is written and fsync'd (only when usage is sent in batches, that is
/// `usage_flush_ms` > 0).
const GATHER: Duration = Duration::from_millis(5);

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

pub struct Spool {
    dir: PathBuf,
    log: File,
    log_len: u64,
    state: SpoolState,
    pending: BTreeMap<u64, pb::UsageRecord>,
    session: Option<mpsc::Sender<pb::AgentMessage>>,
    last_sent: Option<Instant>,
    state_dirty: bool,
    depth: Arc<AtomicUsize>,
    /// Written and fsync'd, not yet sent: usage goes out in batches.
    unsent: Vec<pb::UsageRecord>,
    last_flush: Instant,
}

fn write_state(dir: &Path, state: &SpoolState) -> Result<(), SpoolError> {
    let tmp = dir.join("state.json.tmp");
    let path = dir.join(STATE);
    let bytes = serde_json::to_vec(state).map_err(|e| spool_error(&tmp, e))?;
    let mut file = allot::private_files::create(&tmp).map_err(|e| spool_error(&tmp, e))?;
    file.write_all(&bytes).map_err(|e| spool_error(&tmp, e))?;
    file.sync_all().map_err(|e| spool_error(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| spool_error(&path, e))?;
    Ok(())
}

/// Reads every complete record of a spool file; a torn tail (crash mid
/// write) is ignored, as it was never acknowledged to anyone.
fn read_records(path: &Path) -> Result<Vec<pb::UsageRecord>, SpoolError> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut bytes)
                .map_err(|e| spool_error(path, e))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(spool_error(path, e)),
    }
    let mut records = Vec::new();
    let mut at = 0usize;
    while at + 4 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let Some(body) = bytes.get(at + 4..at + 4 + len) else {
            tracing::warn!(path = %path.display(), "ignoring a torn record at the end of the spool");
            break;
        };
        match pb::UsageRecord::decode(body) {
            Ok(record) => records.push(record),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring an undecodable record at the end of the spool");
                break;
            }
        }
        at += 4 + len;
    }
    Ok(records)
}

impl Spool {
    /// Opens (or creates) the spool, bumps the epoch and recovers what was
    /// not acknowledged.
    pub fn open(dir: &Path) -> Result<(Spool, Recovered), SpoolError> {
        allot::private_files::create_dir_all(dir).map_err(|e| spool_error(dir, e))?;
        let state_path = dir.join(STATE);
        let mut state: SpoolState = match std::fs::read(&state_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| spool_error(&state_path, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => SpoolState::default(),
            Err(e) => return Err(spool_error(&state_path, e)),
        };
        state.epoch += 1;
        write_state(dir, &state)?;
        let log_path = dir.join(LOG);
        let records = read_records(&log_path)?;
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
        // Rewrite the log with only what is pending, dropping a torn tail.
        let mut log =
            allot::private_files::create(&log_path).map_err(|e| spool_error(&log_path, e))?;
        let mut frames = Vec::new();
        for record in pending.values() {
            frame(&mut frames, record);
        }
        log.write_all(&frames)
            .map_err(|e| spool_error(&log_path, e))?;
        let log_len = frames.len() as u64;
        log.sync_all().map_err(|e| spool_error(&log_path, e))?;
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
                state,
                pending,
                session: None,
                last_sent: None,
                state_dirty: false,
                depth: Arc::new(AtomicUsize::new(recovered_len)),
                unsent: Vec::new(),
                last_flush: Instant::now(),
            },
            recovered,
        ))
    }

    /// Records not yet acknowledged, readable from other tasks.
    pub fn depth(&self) -> Arc<AtomicUsize> {
        self.depth.clone()
    }

    fn set_depth(&self) {
        self.depth.store(self.pending.len(), Ordering::Relaxed);
        metrics::gauge!("allot_agent_spool_depth").set(self.pending.len() as f64);
    }

    fn send_pending(&mut self) {
        self.unsent.clear();
        let Some(session) = &self.session else {
            return;
        };
        let records: Vec<pb::UsageRecord> = self.pending.values().cloned().collect();
        for chunk in records.chunks(BATCH) {
            let message = pb::AgentMessage {
                msg: Some(pb::agent_message::Msg::Usage(pb::UsageBatch {
                    records: chunk.to_vec(),
                })),
            };
            if session.try_send(message).is_err() {
                // Full or closed: the resend timer or the next session
                // sends them again.
                break;
            }
        }
        self.last_sent = Some(Instant::now());
    }

    fn write_records(&mut self, records: Vec<pb::UsageRecord>) {
        // One write and one fsync for the whole batch.
        let mut frames = Vec::with_capacity(records.len() * 128);
        for record in &records {
            frame(&mut frames, record);
        }
        match self.log.write_all(&frames) {
            Ok(()) => self.log_len += frames.len() as u64,
            Err(e) => {
                metrics::counter!("allot_agent_spool_write_errors_total").increment(1);
                tracing::error!(error = %e, records = records.len(), "cannot append to the usage spool; keeping the records in memory");
            }
        }
        let mut fresh = Vec::with_capacity(records.len());
        for record in records {
            self.pending.insert(record.seq, record.clone());
            fresh.push(record);
        }
        if let Err(e) = self.log.sync_data() {
            tracing::error!(error = %e, "cannot fsync the usage spool");
        }
        self.set_depth();
        self.unsent.extend(fresh);
    }

    /// Sends what was written since the last flush, in `UsageBatch`es.
    fn send_unsent(&mut self) {
        self.last_flush = Instant::now();
        let unsent = std::mem::take(&mut self.unsent);
        let Some(session) = &self.session else {
            return;
        };
        for chunk in unsent.chunks(BATCH) {
            let message = pb::AgentMessage {
                msg: Some(pb::agent_message::Msg::Usage(pb::UsageBatch {
                    records: chunk.to_vec(),
                })),
            };
            if session.try_send(message).is_err() {
                // The resend timer or the next session sends them again.
                break;
            }
        }
        if self.last_sent.is_none() {
            self.last_sent = Some(Instant::now());
        }
    }

    fn ack(&mut self, high_water_seq: u64) {
        if high_water_seq <= self.state.acked {
            return;
        }
        self.state.acked = high_water_seq;
        self.pending = self.pending.split_off(&(high_water_seq + 1));
        self.state_dirty = true;
        self.last_sent = (!self.pending.is_empty()).then(Instant::now);
        self.set_depth();
    }

    fn flush_state(&mut self) {
        if !self.state_dirty {
            return;
        }
        if let Err(e) = write_state(&self.dir, &self.state) {
            tracing::error!(error = %e, "cannot persist the spool state");
            return;
        }
        self.state_dirty = false;
        // Everything in the log is acknowledged: start it afresh.
        if self.pending.is_empty() && self.log_len > 0 {
            match self.log.set_len(0) {
                Ok(()) => self.log_len = 0,
                Err(e) => tracing::warn!(error = %e, "cannot truncate the usage spool"),
            }
        }
    }

    /// Runs until the record channel closes and everything received is on
    /// disk. Records are fsync'd as they come and sent every `flush_every`
    /// (or as soon as a full batch is there), so a busy agent sends one
    /// message per many requests.
    pub async fn run(
        mut self,
        mut records: mpsc::UnboundedReceiver<pb::UsageRecord>,
        mut events: mpsc::UnboundedReceiver<SpoolEvent>,
        resend_after: Duration,
        flush_every: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut events_open = true;
        let mut tick = tokio::time::interval(
            flush_every.clamp(Duration::from_millis(1), Duration::from_millis(100)),
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                record = records.recv() => {
                    let Some(record) = record else { break };
                    // Group commit: let a busy agent's records gather for a
                    // moment, so that one write and one fsync cover many of
                    // them and request threads rarely have to wake this one.
                    if !flush_every.is_zero() {
                        tokio::time::sleep(GATHER.min(flush_every)).await;
                    }
                    let mut batch = vec![record];
                    while batch.len() < 4096 {
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
                        if !rest.is_empty() {
                            self.write_records(rest);
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

/// Appends one length-prefixed record to `out`.
fn frame(out: &mut Vec<u8>, record: &pb::UsageRecord) {
    let len = record.encoded_len();
    out.extend_from_slice(&(len as u32).to_le_bytes());
    record.encode(out).expect("a Vec grows to fit any record");
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
        let (mut spool, recovered) = Spool::open(&dir).unwrap();
        assert_eq!(recovered.epoch, 1);
        spool.write_records(vec![record(1), record(2), record(3)]);
        spool.ack(1);
        spool.flush_state();
        drop(spool);
        let (_, recovered) = Spool::open(&dir).unwrap();
        assert_eq!(recovered.epoch, 2);
        assert_eq!(
            recovered.pending.keys().copied().collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert_eq!(recovered.last_seq, 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_torn_tail_is_ignored() {
        let dir = std::env::temp_dir().join(format!("allot-spool-torn-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (mut spool, _) = Spool::open(&dir).unwrap();
        spool.write_records(vec![record(1)]);
        drop(spool);
        let mut f = OpenOptions::new().append(true).open(dir.join(LOG)).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2]).unwrap();
        let (_, recovered) = Spool::open(&dir).unwrap();
        assert_eq!(recovered.pending.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
