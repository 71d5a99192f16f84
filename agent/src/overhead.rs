//! Prompt overheads the agent learns from its neuron. A chat template
//! longer than configured, or a system prompt the server adds, makes the
//! neuron bill more prompt tokens than the reservation's bound predicted.
//! The first such request is charged its excess (SPEC Admission 2); this
//! table then raises that model's overhead so that every later reservation
//! covers it.
//!
//! The overhead of a model only grows: it is the largest excess seen over
//! the bound computed without it. It is kept beside the spool in
//! `prompt_overheads.json` (written to a temporary file, fsync'd, renamed,
//! directory fsync'd), exported as `allot_agent_prompt_overhead_tokens`,
//! and reported to the coordinator (Admin `ListAgents`).
//!
//! Bounds: at most [`MAX_MODELS`] models (models are only learned from
//! responses the neuron served with usage), each overhead at most
//! [`MAX_OVERHEAD`] tokens.

use allot::pb;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

const FILE: &str = "prompt_overheads.json";
/// Most models whose overhead is learned.
pub const MAX_MODELS: usize = 256;
/// Largest overhead learned, in tokens (a long system prompt fits): a
/// neuron reporting more than this above the bound is broken, not
/// templated; its excess is still charged, but one absurd report cannot
/// make every later reservation of the model huge.
pub const MAX_OVERHEAD: u64 = 32_768;

#[derive(Debug)]
pub struct LearnedOverheads {
    path: Option<PathBuf>,
    by_model: RwLock<HashMap<String, u64>>,
    /// Serializes saves: each writes the latest table.
    saving: Arc<Mutex<()>>,
}

impl LearnedOverheads {
    /// The table kept in `dir`, or an empty one (a file that cannot be
    /// read is reported and set aside: learning starts again).
    pub fn open(dir: &Path) -> LearnedOverheads {
        let path = dir.join(FILE);
        let by_model = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<BTreeMap<String, u64>>(&bytes) {
                Ok(table) => table
                    .into_iter()
                    .take(MAX_MODELS)
                    .map(|(model, tokens)| (model, tokens.min(MAX_OVERHEAD)))
                    .collect(),
                Err(error) => {
                    tracing::error!(path = %path.display(), %error, "unreadable prompt overheads; learning them again");
                    HashMap::new()
                }
            },
            Err(_) => HashMap::new(),
        };
        for (model, tokens) in &by_model {
            gauge(model, *tokens);
        }
        LearnedOverheads {
            path: Some(path),
            by_model: RwLock::new(by_model),
            saving: Arc::default(),
        }
    }

    /// A table kept nowhere (tests, benchmarks).
    pub fn in_memory() -> LearnedOverheads {
        LearnedOverheads {
            path: None,
            by_model: RwLock::default(),
            saving: Arc::default(),
        }
    }

    /// Tokens to add to the prompt bound of a request for `model`.
    pub fn extra(&self, model: &str) -> u64 {
        let table = self.by_model.read().unwrap_or_else(|e| e.into_inner());
        table.get(model).copied().unwrap_or(0)
    }

    /// A request for `model` was reserved with `extra` tokens of learned
    /// overhead in a prompt bound of `bound`, and its neuron reported
    /// `reported` prompt tokens. Raises the model's overhead to cover it;
    /// `true` when it grew (the caller reports the table).
    pub fn learn(&self, model: &str, extra: u64, bound: u64, reported: u64) -> bool {
        if reported <= bound || model.is_empty() {
            return false;
        }
        let wanted = extra.saturating_add(reported - bound).min(MAX_OVERHEAD);
        {
            let mut table = self.by_model.write().unwrap_or_else(|e| e.into_inner());
            let known = table.len();
            match table.get_mut(model) {
                Some(current) if *current >= wanted => return false,
                Some(current) => *current = wanted,
                None if known >= MAX_MODELS => {
                    tracing::warn!(
                        model,
                        "prompt overheads are learned for at most {MAX_MODELS} models"
                    );
                    return false;
                }
                None => {
                    table.insert(model.to_string(), wanted);
                }
            }
        }
        gauge(model, wanted);
        tracing::warn!(
            model,
            overhead_tokens = wanted,
            "the neuron billed more prompt tokens than reserved; later reservations of this model add the difference"
        );
        self.save();
        true
    }

    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        let table = self.by_model.read().unwrap_or_else(|e| e.into_inner());
        table.iter().map(|(m, t)| (m.clone(), *t)).collect()
    }

    /// The table as the coordinator receives it.
    pub fn message(&self) -> pb::agent_message::Msg {
        pb::agent_message::Msg::PromptOverheads(pb::PromptOverheads {
            tokens_by_model: self.snapshot().into_iter().collect(),
        })
    }

    /// Writes the latest table in the background (rare: only when an
    /// overhead grows), off the request's worker thread.
    fn save(&self) {
        let Some(path) = self.path.clone() else {
            return;
        };
        let snapshot = self.snapshot();
        let saving = self.saving.clone();
        let write = move || {
            let _one_at_a_time = saving.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(error) = write_atomically(&path, &snapshot) {
                tracing::error!(path = %path.display(), %error, "cannot save the learned prompt overheads");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn_blocking(write);
            }
            Err(_) => write(),
        }
    }
}

fn gauge(model: &str, tokens: u64) {
    metrics::gauge!("allot_agent_prompt_overhead_tokens", "model" => model.to_string())
        .set(tokens as f64);
}

/// Temporary file, fsync, rename, directory fsync: a crash leaves the old
/// table or the new one, never a torn one.
fn write_atomically(path: &Path, table: &BTreeMap<String, u64>) -> std::io::Result<()> {
    let temporary = path.with_extension("json.tmp");
    let mut file = allot_runtime::private_files::create(&temporary)?;
    file.write_all(&serde_json::to_vec(table).map_err(std::io::Error::other)?)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_excess_raises_the_overhead_to_cover_it_and_it_never_shrinks() {
        let table = LearnedOverheads::in_memory();
        assert!(!table.learn("m", 0, 100, 100), "no excess, nothing learned");
        assert!(table.learn("m", 0, 100, 174));
        assert_eq!(table.extra("m"), 74);
        // The next bound included the 74: a further 10 over it adds 10.
        assert!(table.learn("m", 74, 180, 190));
        assert_eq!(table.extra("m"), 84);
        // A smaller excess (a request reserved before the raise) keeps it.
        assert!(!table.learn("m", 0, 100, 150));
        assert_eq!(table.extra("m"), 84);
        assert_eq!(table.extra("other"), 0);
        assert!(!table.learn("m", 0, 0, u64::MAX) || table.extra("m") <= MAX_OVERHEAD);
    }

    #[test]
    fn the_table_is_bounded_in_models() {
        let table = LearnedOverheads::in_memory();
        for i in 0..MAX_MODELS + 10 {
            table.learn(&format!("m{i}"), 0, 1, 2);
        }
        assert_eq!(table.snapshot().len(), MAX_MODELS);
    }

    #[test]
    fn learned_overheads_survive_a_restart() {
        let dir = std::env::temp_dir().join(format!("allot-overheads-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let table = LearnedOverheads::open(&dir);
        assert!(table.learn("m", 0, 10, 42));
        let again = LearnedOverheads::open(&dir);
        assert_eq!(again.extra("m"), 32);
        std::fs::write(dir.join(FILE), b"{not json").unwrap();
        assert_eq!(LearnedOverheads::open(&dir).extra("m"), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
