//! The agent's cache of API keys, by the SHA-256 of their secret. A miss is
//! looked up on the coordinator; changes (revocation) are pushed. Unknown
//! keys are cached briefly so a flood of bad keys does not become a flood of
//! lookups, and at most `unknown_key_cache_max` of them at once (the oldest
//! is forgotten first), so a flood of random keys cannot grow memory.

use allot::key::{KeyHash, Purpose};
use allot::pb;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// How long an unknown key stays unknown before it is looked up again.
const NEGATIVE_TTL: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub key_id: String,
    pub account_id: String,
    pub purpose: Purpose,
    pub revoked: bool,
    pub allowed_models: Vec<String>,
}

impl KeyInfo {
    pub fn from_pb(key: &pb::KeyInfo) -> Option<KeyInfo> {
        Some(KeyInfo {
            key_id: key.key_id.clone(),
            account_id: key.account_id.clone(),
            purpose: Purpose::from_pb("purpose", key.purpose).ok()?,
            revoked: key.revoked,
            allowed_models: key.allowed_models.clone(),
        })
    }

    pub fn allows_model(&self, model: &str) -> bool {
        self.allowed_models.is_empty() || self.allowed_models.iter().any(|m| m == model)
    }
}

/// Cached keys, known and unknown, behind one lock. No `.await` is ever
/// held under it: a `std` lock is right.
pub struct KeyCache {
    inner: RwLock<Entries>,
    /// Most unknown keys remembered at once.
    max_unknown: usize,
}

#[derive(Default)]
struct Entries {
    /// Keys the coordinator knows. Only the operator creates keys, so this
    /// holds at most the fleet's keys; a client cannot grow it.
    known: HashMap<KeyHash, Arc<KeyInfo>>,
    /// Keys the coordinator said it does not know, and when. Clients can
    /// send any number of these: bounded by `max_unknown` and
    /// [`NEGATIVE_TTL`].
    unknown: HashMap<KeyHash, Instant>,
    /// Unknown keys oldest first, for eviction; an entry whose time no
    /// longer matches `unknown` is stale and skipped. Never longer than
    /// `max_unknown`, so neither is `unknown`.
    unknown_order: VecDeque<(KeyHash, Instant)>,
}

/// What the cache knows of a key.
pub enum Known {
    Key(Arc<KeyInfo>),
    Unknown,
    Miss,
}

impl Default for KeyCache {
    fn default() -> Self {
        KeyCache::new(DEFAULT_MAX_UNKNOWN)
    }
}

/// The default bound of remembered unknown keys.
pub const DEFAULT_MAX_UNKNOWN: usize = 10_000;

impl KeyCache {
    /// A cache remembering at most `max_unknown` unknown keys (at least 1).
    pub fn new(max_unknown: usize) -> KeyCache {
        KeyCache {
            inner: RwLock::new(Entries::default()),
            max_unknown: max_unknown.max(1),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Entries> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Entries> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, hash: &KeyHash, now: Instant) -> Known {
        let entries = self.read();
        if let Some(info) = entries.known.get(hash) {
            return Known::Key(Arc::clone(info));
        }
        match entries.unknown.get(hash) {
            Some(at) if now.saturating_duration_since(*at) < NEGATIVE_TTL => Known::Unknown,
            _ => Known::Miss,
        }
    }

    pub fn put(&self, hash: KeyHash, info: Option<KeyInfo>, now: Instant) {
        let mut entries = self.write();
        match info {
            Some(info) => {
                entries.unknown.remove(&hash);
                entries.known.insert(hash, Arc::new(info));
            }
            None => {
                entries.known.remove(&hash);
                entries.unknown.insert(hash, now);
                entries.unknown_order.push_back((hash, now));
                entries.evict_unknown(self.max_unknown, now);
            }
        }
    }

    /// Unknown keys remembered now.
    pub fn unknown_len(&self) -> usize {
        self.read().unknown.len()
    }

    /// Applies a pushed change to a cached key.
    pub fn update(&self, info: KeyInfo) {
        let info = Arc::new(info);
        let mut entries = self.write();
        for cached in entries.known.values_mut() {
            if cached.key_id == info.key_id {
                *cached = Arc::clone(&info);
            }
        }
    }

    /// Hashes of every known key, to refresh after a reconnect.
    pub fn cached_hashes(&self) -> Vec<KeyHash> {
        self.read().known.keys().copied().collect()
    }
}

impl Entries {
    /// Forgets expired unknown keys, then the oldest ones over `max`.
    fn evict_unknown(&mut self, max: usize, now: Instant) {
        while let Some((hash, at)) = self.unknown_order.front().copied() {
            let expired = now.saturating_duration_since(at) >= NEGATIVE_TTL;
            if !expired && self.unknown_order.len() <= max {
                break;
            }
            self.unknown_order.pop_front();
            if self.unknown.get(&hash) == Some(&at) {
                self.unknown.remove(&hash);
            }
        }
        debug_assert!(self.unknown.len() <= max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_hash(i: u64) -> KeyHash {
        KeyHash::of_secret(&format!("sk-random-{i}-{}", rand::random::<u64>()))
    }

    fn key(id: &str) -> KeyInfo {
        KeyInfo {
            key_id: id.into(),
            account_id: "acme".into(),
            purpose: Purpose::Realtime,
            revoked: false,
            allowed_models: Vec::new(),
        }
    }

    #[test]
    fn unknown_keys_stay_within_the_bound_whatever_clients_send() {
        let cache = KeyCache::new(1_000);
        let now = Instant::now();
        for i in 0..160_000 {
            cache.put(random_hash(i), None, now);
            assert!(cache.unknown_len() <= 1_000);
        }
        assert_eq!(cache.unknown_len(), 1_000);
        assert!(cache.read().unknown_order.len() <= 1_000);
    }

    #[test]
    fn the_oldest_unknown_key_is_forgotten_first_and_known_keys_are_kept() {
        let cache = KeyCache::new(2);
        let now = Instant::now();
        let known = random_hash(0);
        cache.put(known, Some(key("k1")), now);
        let (a, b, c) = (random_hash(1), random_hash(2), random_hash(3));
        cache.put(a, None, now);
        cache.put(b, None, now);
        cache.put(c, None, now);
        assert!(matches!(cache.get(&a, now), Known::Miss));
        assert!(matches!(cache.get(&b, now), Known::Unknown));
        assert!(matches!(cache.get(&c, now), Known::Unknown));
        assert!(matches!(cache.get(&known, now), Known::Key(_)));
    }

    #[test]
    fn unknown_keys_expire_after_the_negative_ttl_and_are_then_dropped() {
        let cache = KeyCache::new(100);
        let start = Instant::now();
        for i in 0..50 {
            cache.put(random_hash(i), None, start);
        }
        let later = start + NEGATIVE_TTL;
        let fresh = random_hash(99);
        cache.put(fresh, None, later);
        assert_eq!(cache.unknown_len(), 1, "expired entries are dropped");
        assert!(matches!(cache.get(&fresh, later), Known::Unknown));
    }

    #[test]
    fn a_key_looked_up_again_is_known_and_no_longer_unknown() {
        let cache = KeyCache::new(10);
        let now = Instant::now();
        let hash = random_hash(1);
        cache.put(hash, None, now);
        cache.put(hash, Some(key("k1")), now);
        assert_eq!(cache.unknown_len(), 0);
        assert!(matches!(cache.get(&hash, now), Known::Key(_)));
        assert_eq!(cache.cached_hashes(), vec![hash]);
    }
}
