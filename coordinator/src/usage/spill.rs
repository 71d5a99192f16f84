use super::writer::ATTEMPTS;
use super::*;

/// Batches of usage rows kept on disk until the usage store takes them:
/// one file per batch (rows length-delimited, protobuf), written to a
/// temporary name, fsync'd and renamed, so a file that exists is whole.
#[derive(Clone)]
pub struct Spill {
    inner: Arc<SpillDir>,
}

struct SpillDir {
    dir: std::path::PathBuf,
    /// Batch files waiting: the writer looks at the disk only when some are.
    files: std::sync::atomic::AtomicUsize,
    next: std::sync::atomic::AtomicU64,
}

const SPILL_SUFFIX: &str = ".rows";

impl Spill {
    /// Opens (creating) the spill directory; batches already there, from an
    /// earlier run, are written first.
    pub fn open(dir: &Path) -> Result<Spill, UsageStoreError> {
        allot_runtime::private_files::create_dir_all(dir).map_err(|e| {
            setup(format_args!(
                "usage_spill_dir: cannot create {}: {e}",
                dir.display()
            ))
        })?;
        let files = Self::batch_files(dir)
            .map_err(|e| {
                setup(format_args!(
                    "usage_spill_dir: cannot read {}: {e}",
                    dir.display()
                ))
            })?
            .len();
        if files > 0 {
            tracing::warn!(files, dir = %dir.display(), "usage batches from an earlier run are waiting to be written");
        }
        metrics::gauge!("allot_usage_spill_batches").set(files as f64);
        Ok(Spill {
            inner: Arc::new(SpillDir {
                dir: dir.to_path_buf(),
                files: files.into(),
                next: 0.into(),
            }),
        })
    }

    pub fn has_files(&self) -> bool {
        self.inner.files.load(std::sync::atomic::Ordering::SeqCst) > 0
    }

    /// Batch files, oldest first (names sort by time of writing).
    pub(super) fn batch_files(dir: &Path) -> std::io::Result<Vec<std::path::PathBuf>> {
        let mut files: Vec<_> = std::fs::read_dir(dir)?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| {
                path.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with(SPILL_SUFFIX))
            })
            .collect();
        files.sort();
        Ok(files)
    }

    /// Keeps `batch` on disk, durably.
    pub async fn put(&self, batch: &[pb::UsageRow]) -> std::io::Result<()> {
        use std::sync::atomic::Ordering;
        let mut bytes = Vec::new();
        for row in batch {
            row.encode_length_delimited(&mut bytes)
                .map_err(std::io::Error::other)?;
        }
        let n = self.inner.next.fetch_add(1, Ordering::SeqCst);
        let name = format!(
            "{:016}-{}-{n:08}{SPILL_SUFFIX}",
            allot::clock::now_ms(),
            std::process::id()
        );
        let dir = self.inner.dir.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            let temporary = dir.join(format!("{name}.tmp"));
            let mut file = allot_runtime::private_files::create(&temporary)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&temporary, dir.join(&name))?;
            std::fs::File::open(&dir)?.sync_all()
        })
        .await
        .map_err(std::io::Error::other)??;
        let files = self.inner.files.fetch_add(1, Ordering::SeqCst) + 1;
        metrics::gauge!("allot_usage_spill_batches").set(files as f64);
        metrics::counter!("allot_usage_rows_spilled_total").increment(batch.len() as u64);
        tracing::error!(
            rows = batch.len(),
            "usage rows not written after {ATTEMPTS} tries: kept on disk, retried later"
        );
        Ok(())
    }

    /// The oldest batch file and its rows.
    pub(super) async fn oldest(
        &self,
    ) -> Option<(std::path::PathBuf, std::io::Result<Vec<pb::UsageRow>>)> {
        let dir = self.inner.dir.clone();
        tokio::task::spawn_blocking(move || {
            let file = Self::batch_files(&dir).ok()?.into_iter().next()?;
            let rows = std::fs::read(&file).and_then(|bytes| {
                let mut rest = bytes.as_slice();
                let mut rows = Vec::new();
                while !rest.is_empty() {
                    rows.push(
                        pb::UsageRow::decode_length_delimited(&mut rest).map_err(|e| {
                            std::io::Error::new(
                                std::io::ErrorKind::InvalidData,
                                format!("corrupt spilled row: {e}"),
                            )
                        })?,
                    );
                }
                Ok(rows)
            });
            Some((file, rows))
        })
        .await
        .ok()
        .flatten()
    }

    pub(super) async fn remove(&self, file: &Path) {
        let _ = tokio::fs::remove_file(file).await;
        self.forget_one();
    }

    /// Renames an unreadable batch file so that it is no longer replayed.
    pub(super) async fn set_aside(&self, file: &Path) {
        let _ = tokio::fs::rename(file, file.with_extension("unreadable")).await;
        metrics::counter!("allot_usage_spill_unreadable_total").increment(1);
        self.forget_one();
    }

    /// Nothing is left on disk (also if the count was off).
    pub(super) fn emptied(&self) {
        self.inner
            .files
            .store(0, std::sync::atomic::Ordering::SeqCst);
        metrics::gauge!("allot_usage_spill_batches").set(0.0);
    }

    fn forget_one(&self) {
        use std::sync::atomic::Ordering;
        let left = self
            .inner
            .files
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                Some(n.saturating_sub(1))
            })
            .unwrap_or(0)
            .saturating_sub(1);
        metrics::gauge!("allot_usage_spill_batches").set(left as f64);
    }
}
