//! How many refusals the agent records: at most a configured number per key
//! and UTC minute, so that a client hammering a refused key cannot fill the
//! spool, the coordinator or the usage store. Refusals past that number are
//! still refused, and counted in `allot_agent_refusals_unrecorded_total`
//! instead of recorded. The table is bounded too: it tracks at most
//! [`MAX_KEYS_PER_MINUTE`] keys per minute; a refusal of a further key in
//! the same minute is counted, not recorded.

use std::collections::HashMap;

/// Keys tracked in one minute (each entry holds one key id, at most 64
/// bytes): about 1 MB at most.
pub const MAX_KEYS_PER_MINUTE: usize = 10_000;

pub struct RefusalRecords {
    per_key_per_minute: u32,
    // A std mutex: held for one map lookup, never across an `.await`.
    minute: std::sync::Mutex<Minute>,
}

#[derive(Default)]
struct Minute {
    start: i64,
    recorded: HashMap<String, u32>,
}

impl RefusalRecords {
    pub fn new(per_key_per_minute: u32) -> RefusalRecords {
        RefusalRecords {
            per_key_per_minute,
            minute: std::sync::Mutex::new(Minute::default()),
        }
    }

    /// Whether a refusal of `key_id` at `now_ms` may be recorded; counts it
    /// when it may.
    pub fn admit(&self, key_id: &str, now_ms: i64) -> bool {
        let start = now_ms.div_euclid(60_000);
        let mut minute = self.minute.lock().unwrap_or_else(|e| e.into_inner());
        if minute.start != start {
            minute.start = start;
            minute.recorded.clear();
        }
        if let Some(recorded) = minute.recorded.get_mut(key_id) {
            if *recorded >= self.per_key_per_minute {
                return false;
            }
            *recorded += 1;
            return true;
        }
        if self.per_key_per_minute == 0 || minute.recorded.len() >= MAX_KEYS_PER_MINUTE {
            return false;
        }
        minute.recorded.insert(key_id.to_string(), 1);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: i64 = 60_000;

    #[test]
    fn at_most_n_per_key_and_minute_then_again_the_next_minute() {
        let records = RefusalRecords::new(3);
        let t = 100 * MINUTE;
        let admitted = (0..10).filter(|i| records.admit("k1", t + i)).count();
        assert_eq!(admitted, 3);
        assert!(records.admit("k2", t + 20), "another key has its own count");
        assert!(!records.admit("k1", t + MINUTE - 1));
        assert!(records.admit("k1", t + MINUTE));
    }

    #[test]
    fn the_table_is_bounded() {
        let records = RefusalRecords::new(1);
        for i in 0..MAX_KEYS_PER_MINUTE {
            assert!(records.admit(&format!("k{i}"), 0));
        }
        assert!(!records.admit("one-more", 1));
        assert_eq!(
            records.minute.lock().unwrap().recorded.len(),
            MAX_KEYS_PER_MINUTE
        );
        assert!(
            records.admit("one-more", MINUTE),
            "a new minute starts empty"
        );
        assert_eq!(records.minute.lock().unwrap().recorded.len(), 1);
    }

    #[test]
    fn zero_records_none() {
        assert!(!RefusalRecords::new(0).admit("k", 0));
    }
}
