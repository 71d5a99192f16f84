//! Step: authenticate. The bearer token's key, by the SHA-256 of the
//! secret: from the key cache, or, on a miss, looked up on the coordinator
//! (waiting at most `allowance_wait_ms`). Never logs or records the secret.

use crate::api_error::ApiError;
use crate::keys::{KeyInfo, Known};
use crate::Coordinator;
use allot::key::KeyHash;
use axum::http::{header, HeaderMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The key of the request's `Authorization: Bearer` secret; 401 for none,
/// an unknown or a revoked key, 503 when the coordinator cannot be asked.
pub async fn authenticate(
    coordinator: &Coordinator,
    lookup_wait: Duration,
    headers: &HeaderMap,
) -> Result<Arc<KeyInfo>, ApiError> {
    let secret = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            ApiError::invalid_api_key(
                "you didn't provide an API key: send Authorization: Bearer <key>",
            )
        })?;
    let hash = KeyHash::of_secret(secret);
    let key = match coordinator.keys.get(&hash, Instant::now()) {
        Known::Key(key) => Some(key),
        Known::Unknown => None,
        Known::Miss => coordinator
            .link
            .lookup(hash, lookup_wait)
            .await
            .map_err(|_| {
                ApiError::unavailable("cannot reach the coordinator to check the API key", 1)
            })?
            .map(Arc::new),
    };
    match key {
        Some(key) if key.revoked => Err(ApiError::invalid_api_key("the API key was revoked")),
        Some(key) => Ok(key),
        None => Err(ApiError::invalid_api_key("incorrect API key provided")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::testing;
    use axum::http::{HeaderValue, StatusCode};

    fn bearer(secret: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {secret}")).unwrap(),
        );
        headers
    }

    const WAIT: Duration = Duration::from_millis(50);

    #[tokio::test]
    async fn a_cached_key_is_found_by_the_hash_of_its_secret() {
        let agent = testing::agent(Default::default());
        let coordinator = &agent.state.coordinator;
        let key = (*testing::key("k1")).clone();
        coordinator
            .keys
            .put(KeyHash::of_secret("sk-one"), Some(key), Instant::now());
        let found = authenticate(coordinator, WAIT, &bearer("sk-one"))
            .await
            .unwrap();
        assert_eq!(found.key_id, "k1");
        let other = authenticate(coordinator, WAIT, &bearer("sk-two")).await;
        assert_eq!(
            other.unwrap_err().status,
            StatusCode::SERVICE_UNAVAILABLE,
            "a miss is asked of the coordinator, which is not connected"
        );
    }

    #[tokio::test]
    async fn no_unknown_or_revoked_key_is_401() {
        let agent = testing::agent(Default::default());
        let coordinator = &agent.state.coordinator;
        let now = Instant::now();
        coordinator
            .keys
            .put(KeyHash::of_secret("sk-unknown"), None, now);
        let mut revoked = (*testing::key("k2")).clone();
        revoked.revoked = true;
        coordinator
            .keys
            .put(KeyHash::of_secret("sk-revoked"), Some(revoked), now);
        for (headers, message) in [
            (HeaderMap::new(), "you didn't provide an API key"),
            (bearer("  "), "you didn't provide an API key"),
            (bearer("sk-unknown"), "incorrect API key provided"),
            (bearer("sk-revoked"), "the API key was revoked"),
        ] {
            let error = authenticate(coordinator, WAIT, &headers).await.unwrap_err();
            assert_eq!(error.status, StatusCode::UNAUTHORIZED);
            assert_eq!(error.code_label(), "invalid_api_key");
            assert!(error.message.starts_with(message), "{}", error.message);
        }
    }
}
