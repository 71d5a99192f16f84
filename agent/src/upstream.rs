//! Where a model's requests go: a static URL from the configuration, or,
//! with `endpoint_discovery`, the neuron's `GET /models/{model_id}/endpoint`
//! answer (`{"url": "..."}`), cached for `endpoint_cache_ms` and dropped as
//! soon as a request to it fails to connect. Everything else goes to
//! `neuron_url`.

use crate::config::AgentConfig;
use crate::proxy::HttpClient;
use allot::reservation::Operation;
use bytes::Bytes;
use http::Uri;
use http_body_util::{BodyExt, Full};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Per-model base URLs (without a trailing `/v1`).
pub struct Upstreams {
    default: Arc<Upstream>,
    fixed: HashMap<String, Arc<Upstream>>,
    discovery: bool,
    ttl: Duration,
    lookup_timeout: Duration,
    cache: Mutex<HashMap<String, (Arc<Upstream>, Instant)>>,
}

/// One upstream server: its base URL, and the URI of each metered path on
/// it, parsed once instead of per request.
#[derive(Debug)]
pub struct Upstream {
    pub url: Arc<str>,
    /// By the operation's place in [`Operation::ALL`]; the parse error of a
    /// URL that cannot be one.
    uris: [Result<Uri, String>; Operation::ALL.len()],
}

impl Upstream {
    fn new(url: &str) -> Upstream {
        let url: Arc<str> = Arc::from(base_url(url));
        let uris = Operation::ALL.map(|operation| {
            Uri::try_from(format!("{url}{}", operation.path())).map_err(|e| e.to_string())
        });
        Upstream { url, uris }
    }

    /// The URI `operation` is sent to on this upstream.
    pub fn uri(&self, operation: Operation) -> Result<Uri, String> {
        let index = Operation::ALL
            .iter()
            .position(|o| *o == operation)
            .expect("every operation is in Operation::ALL");
        self.uris[index].clone()
    }
}

/// Why a model's endpoint could not be found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookupError {
    /// The neuron does not know the model (404).
    UnknownModel,
    /// The neuron could not be asked, or answered nonsense.
    Unavailable(String),
}

/// `http://host:port/v1` and `http://host:port/` both mean the server at
/// `http://host:port`: request paths carry `/v1` themselves.
pub fn base_url(url: &str) -> &str {
    let url = url.trim_end_matches('/');
    url.strip_suffix("/v1").unwrap_or(url)
}

impl Upstreams {
    pub fn new(config: &AgentConfig) -> Upstreams {
        Upstreams {
            default: Arc::new(Upstream::new(&config.neuron_url)),
            fixed: config
                .upstreams
                .iter()
                .map(|(model, url)| (model.clone(), Arc::new(Upstream::new(url))))
                .collect(),
            discovery: config.endpoint_discovery,
            ttl: Duration::from_millis(config.endpoint_cache_ms),
            lookup_timeout: Duration::from_millis(config.first_byte_timeout_ms.min(10_000)),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The neuron itself: `/v1/models` and pass-through go here.
    pub fn default_url(&self) -> Arc<str> {
        self.default.url.clone()
    }

    /// The upstream serving `model` now.
    pub async fn resolve(
        &self,
        client: &HttpClient,
        model: &str,
    ) -> Result<Arc<Upstream>, LookupError> {
        if let Some(url) = self.fixed.get(model) {
            return Ok(url.clone());
        }
        if !self.discovery {
            return Ok(self.default.clone());
        }
        let now = Instant::now();
        if let Some((url, at)) = self.lock().get(model) {
            if now.duration_since(*at) < self.ttl {
                return Ok(url.clone());
            }
        }
        let upstream = Arc::new(Upstream::new(&self.discover(client, model).await?));
        metrics::counter!("allot_agent_endpoint_lookups_total").increment(1);
        self.lock()
            .insert(model.to_string(), (upstream.clone(), Instant::now()));
        Ok(upstream)
    }

    /// Forgets a discovered endpoint after a request to it failed.
    pub fn invalidate(&self, model: &str) {
        if self.discovery && self.lock().remove(model).is_some() {
            tracing::info!(
                model,
                "endpoint cache entry dropped after an upstream error"
            );
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Arc<Upstream>, Instant)>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The URL the neuron names for `model`.
    async fn discover(&self, client: &HttpClient, model: &str) -> Result<String, LookupError> {
        let escaped: String = model
            .bytes()
            .flat_map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b':' => {
                    vec![b as char]
                }
                _ => format!("%{b:02X}").chars().collect(),
            })
            .collect();
        let request =
            hyper::Request::get(format!("{}/models/{escaped}/endpoint", self.default.url))
                .body(Full::new(Bytes::new()))
                .map_err(|e| LookupError::Unavailable(e.to_string()))?;
        let response = tokio::time::timeout(self.lookup_timeout, client.request(request))
            .await
            .map_err(|_| LookupError::Unavailable("the endpoint lookup timed out".into()))?
            .map_err(|e| LookupError::Unavailable(format!("the neuron is unreachable: {e}")))?;
        let status = response.status();
        if status == hyper::StatusCode::NOT_FOUND {
            return Err(LookupError::UnknownModel);
        }
        let body = tokio::time::timeout(self.lookup_timeout, response.into_body().collect())
            .await
            .map_err(|_| LookupError::Unavailable("the endpoint lookup timed out".into()))?
            .map_err(|e| LookupError::Unavailable(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            return Err(LookupError::Unavailable(format!(
                "the endpoint lookup answered {status}"
            )));
        }
        let url = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("url")?.as_str().map(str::to_string))
            .filter(|u| u.starts_with("http://") || u.starts_with("https://"))
            .ok_or_else(|| {
                LookupError::Unavailable(
                    "the endpoint lookup did not answer {\"url\": \"http://...\"}".into(),
                )
            })?;
        Ok(url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_drop_a_trailing_v1_and_slash() {
        assert_eq!(base_url("http://h:1/v1"), "http://h:1");
        assert_eq!(base_url("http://h:1/v1/"), "http://h:1");
        assert_eq!(base_url("http://h:1/"), "http://h:1");
        assert_eq!(base_url("http://h:1/api"), "http://h:1/api");
    }
}
