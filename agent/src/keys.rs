//! The agent's cache of API keys, by the SHA-256 of their secret. A miss is
//! looked up on the coordinator; changes (revocation) are pushed. Unknown
//! keys are cached briefly so a flood of bad keys does not become a flood of
//! lookups.

use allot::key::{KeyHash, Purpose};
use allot::pb;
use std::collections::HashMap;
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

struct Cached {
    /// Shared with the requests using it: a hit costs a reference count,
    /// not a copy of the key's strings.
    info: Option<Arc<KeyInfo>>,
    at: Instant,
}

#[derive(Default)]
pub struct KeyCache {
    by_hash: RwLock<HashMap<KeyHash, Cached>>,
}

/// What the cache knows of a key.
pub enum Known {
    Key(Arc<KeyInfo>),
    Unknown,
    Miss,
}

impl KeyCache {
    pub fn get(&self, hash: &KeyHash, now: Instant) -> Known {
        let map = self.by_hash.read().unwrap_or_else(|p| p.into_inner());
        match map.get(hash) {
            Some(Cached {
                info: Some(info), ..
            }) => Known::Key(Arc::clone(info)),
            Some(Cached { info: None, at }) if now.duration_since(*at) < NEGATIVE_TTL => {
                Known::Unknown
            }
            _ => Known::Miss,
        }
    }

    pub fn put(&self, hash: KeyHash, info: Option<KeyInfo>, now: Instant) {
        self.by_hash
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                hash,
                Cached {
                    info: info.map(Arc::new),
                    at: now,
                },
            );
    }

    /// Applies a pushed change to a cached key.
    pub fn update(&self, info: KeyInfo) {
        let info = Arc::new(info);
        let mut map = self.by_hash.write().unwrap_or_else(|p| p.into_inner());
        for cached in map.values_mut() {
            if cached
                .info
                .as_ref()
                .is_some_and(|k| k.key_id == info.key_id)
            {
                cached.info = Some(Arc::clone(&info));
            }
        }
    }

    /// Hashes of every known key, to refresh after a reconnect.
    pub fn cached_hashes(&self) -> Vec<KeyHash> {
        self.by_hash
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, c)| c.info.is_some())
            .map(|(h, _)| *h)
            .collect()
    }
}
