//! Where a model's requests go: a static URL from the configuration, or,
//! with `endpoint_discovery`, the neuron's `GET /models/{model_id}/endpoint`
//! answer (`{"url": "..."}`), cached for `endpoint_cache_ms` and dropped as
//! soon as a request to it fails to connect. Everything else goes to
//! `neuron_url`.
//!
//! It also owns what the agent asks its upstreams beside the requests it
//! forwards: their server family, with `upstream_family = "auto"`
//! ([`detect_family`]), and the token count of a stream that reported no
//! usage ([`count_tokens`]). Both are bounded in time and size.

use crate::config::AgentConfig;
use crate::family::{self, Family, FamilyCell, UpstreamFamily};
use allot::reservation::Operation;
use bytes::Bytes;
use http::Uri;
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};

/// The client of every upstream: `http://` and `https://`.
pub type HttpClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// Per-model base URLs (without a trailing `/v1`).
pub struct Upstreams {
    default: Arc<Upstream>,
    fixed: HashMap<String, Arc<Upstream>>,
    discovery: bool,
    ttl: Duration,
    lookup_timeout: Duration,
    cache: Mutex<HashMap<String, (Arc<Upstream>, Instant)>>,
    configured_family: UpstreamFamily,
    family: FamilyCell,
    /// Wakes [`detect_family`]: a request could not reach its upstream.
    unreachable: Notify,
}

/// One upstream server: its base URL, and the URI of each metered path on
/// it, parsed once instead of per request.
#[derive(Debug)]
pub struct Upstream {
    pub url: Arc<str>,
    /// By the operation's place in [`Operation::ALL`]; `None` where the
    /// URL cannot be one.
    uris: [Option<Uri>; Operation::ALL.len()],
}

/// Why the agent cannot send a request to an upstream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// The configured or discovered URL does not make a request URI.
    #[error("{url}{path} is not a valid URI")]
    InvalidUri { url: Arc<str>, path: &'static str },
}

impl Upstream {
    fn new(url: &str) -> Upstream {
        let url: Arc<str> = Arc::from(base_url(url));
        let uris = Operation::ALL
            .map(|operation| Uri::try_from(format!("{url}{}", operation.path())).ok());
        Upstream { url, uris }
    }

    /// The URI `operation` is sent to on this upstream.
    pub fn uri(&self, operation: Operation) -> Result<Uri, UpstreamError> {
        let index = Operation::ALL
            .iter()
            .position(|o| *o == operation)
            .expect("every operation is in Operation::ALL");
        self.uris[index]
            .clone()
            .ok_or_else(|| UpstreamError::InvalidUri {
                url: self.url.clone(),
                path: operation.path(),
            })
    }
}

/// Why a model's endpoint could not be found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// The neuron does not know the model (404).
    #[error("the neuron does not know the model")]
    UnknownModel,
    /// The neuron could not be asked, or answered nonsense.
    #[error("{0}")]
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
            configured_family: config.upstream_family,
            family: FamilyCell::new(config.upstream_family.initial()),
            unreachable: Notify::new(),
        }
    }

    /// The server family requests are bounded, metered and identified by
    /// now (one atomic load).
    pub fn family(&self) -> Family {
        self.family.get()
    }

    /// A request could not reach its upstream: with `auto`, the family is
    /// asked again once the server answers (it may have been replaced).
    pub fn unreachable(&self) {
        if self.configured_family == UpstreamFamily::Auto {
            self.unreachable.notify_one();
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

/// How long one question to an upstream (a detection probe, a token
/// count) may take, answer included.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest answer read from such a question: a `/v1/models` list, or the
/// token ids of the longest counted text ([`MAX_COUNTED_TEXT`]).
const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;
/// Longest streamed text counted by the server's tokenizer; a longer
/// stream is charged the estimate.
pub const MAX_COUNTED_TEXT: usize = 1024 * 1024;
/// Longest wait between detection attempts while the server is down.
const MAX_DETECT_BACKOFF: Duration = Duration::from_secs(30);

/// Why a question to an upstream went unanswered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AskError {
    #[error("{url}: cannot be asked: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("{url}: no answer within {ASK_TIMEOUT:?}")]
    TimedOut { url: String },
    #[error("{url}: answered {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: the answer is larger than {MAX_ANSWER_BYTES} bytes or broke off")]
    Body { url: String },
}

/// `method` `url` with an optional JSON body, answered 2xx within
/// [`ASK_TIMEOUT`] and at most [`MAX_ANSWER_BYTES`].
async fn ask(
    client: &HttpClient,
    method: http::Method,
    url: String,
    body: Option<Value>,
) -> Result<Bytes, AskError> {
    let asked = async {
        let mut request = hyper::Request::builder().method(method).uri(&url);
        if body.is_some() {
            request = request.header(http::header::CONTENT_TYPE, "application/json");
        }
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let request = request
            .body(Full::new(body))
            .map_err(|e| AskError::Unreachable {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        let response = client
            .request(request)
            .await
            .map_err(|e| AskError::Unreachable {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        let status = response.status();
        if !status.is_success() {
            return Err(AskError::Status {
                url: url.clone(),
                status: status.as_u16(),
            });
        }
        http_body_util::Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .map_err(|_| AskError::Body { url: url.clone() })
    };
    match tokio::time::timeout(ASK_TIMEOUT, asked).await {
        Ok(answer) => answer,
        Err(_) => Err(AskError::TimedOut { url }),
    }
}

/// What the server at `url` says of its family: `owned_by` of
/// `GET /v1/models`, else TGI's `GET /info`, else Ollama's
/// `GET /api/version`. `Ok(None)` when it answers but names none;
/// `Err` when `/v1/models` cannot be asked at all.
pub async fn probe_family(client: &HttpClient, url: &str) -> Result<Option<Family>, AskError> {
    let json = |bytes: Bytes| serde_json::from_slice::<Value>(&bytes).ok();
    let models = match ask(client, http::Method::GET, format!("{url}/v1/models"), None).await {
        Ok(bytes) => json(bytes),
        Err(AskError::Status { .. }) => None,
        Err(unreachable) => return Err(unreachable),
    };
    if let Some(family) = models.as_ref().and_then(family::family_of_models) {
        return Ok(Some(family));
    }
    let info = ask(client, http::Method::GET, format!("{url}/info"), None).await;
    if let Some(family) = info
        .ok()
        .and_then(json)
        .as_ref()
        .and_then(Family::from_info)
    {
        return Ok(Some(family));
    }
    let version = ask(
        client,
        http::Method::GET,
        format!("{url}/api/version"),
        None,
    )
    .await;
    Ok(version
        .ok()
        .and_then(json)
        .as_ref()
        .and_then(Family::from_ollama_version))
}

/// With `upstream_family = "auto"`: asks the neuron its family at start,
/// until it answers (backing off to [`MAX_DETECT_BACKOFF`]), and again
/// each time a request could not reach it ([`Upstreams::unreachable`]).
/// Until then requests go as to [`Family::Unknown`]. Ends with `stop`.
pub async fn detect_family(
    upstreams: &Upstreams,
    client: &HttpClient,
    mut stop: watch::Receiver<bool>,
) {
    if upstreams.configured_family != UpstreamFamily::Auto {
        return;
    }
    let url = upstreams.default_url();
    let mut backoff = Duration::from_millis(250);
    loop {
        // Shutdown never waits for a probe.
        let probed = tokio::select! {
            probed = probe_family(client, &url) => probed,
            _ = stop.wait_for(|stopped| *stopped) => return,
        };
        let wait = match probed {
            Ok(found) => {
                let family = found.unwrap_or(Family::Unknown);
                if upstreams.family() != family || found.is_none() {
                    tracing::info!(
                        family = family.name(),
                        %url,
                        "upstream family detected"
                    );
                }
                upstreams.family.set(family);
                backoff = Duration::from_millis(250);
                None
            }
            Err(error) => {
                tracing::debug!(%error, "upstream family not detected yet");
                backoff = (backoff * 2).min(MAX_DETECT_BACKOFF);
                Some(backoff)
            }
        };
        let retry = async {
            match wait {
                Some(wait) => tokio::time::sleep(wait).await,
                None => upstreams.unreachable.notified().await,
            }
        };
        tokio::select! {
            _ = retry => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
    }
}

/// A stream's tokens as the server's tokenizer counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    /// The prompt's, when the agent had it to count (a legacy completion
    /// of one prompt); a chat prompt is rendered by the server's template,
    /// which the agent does not know.
    pub prompt: Option<u64>,
    pub completion: u64,
}

/// Counts a stream's generated `text`, and with `prompt` the prompt too:
/// the completion is then `prompt + text` less `prompt`, so the BOS token
/// the tokenizer adds is counted once, in the prompt, as the server does.
pub async fn count_stream(
    client: HttpClient,
    url: Arc<str>,
    model: String,
    prompt: Option<String>,
    text: String,
) -> Result<Counted, AskError> {
    let Some(prompt) = prompt else {
        let completion = count_tokens(client, url, model, text).await?;
        return Ok(Counted {
            prompt: None,
            completion,
        });
    };
    let whole = format!("{prompt}{text}");
    let (prompt, whole) = futures_util::future::try_join(
        count_tokens(client.clone(), url.clone(), model.clone(), prompt),
        count_tokens(client, url, model, whole),
    )
    .await?;
    Ok(Counted {
        prompt: Some(prompt),
        completion: whole.saturating_sub(prompt),
    })
}

/// The tokens of `text` by the tokenizer of `model` on the server at
/// `url`: llama-cpp-python's `POST /extras/tokenize/count`, else
/// llama-server's `POST /tokenize`. The server's count includes the BOS
/// token it adds to any text, so it errs high, never low.
pub async fn count_tokens(
    client: HttpClient,
    url: Arc<str>,
    model: String,
    text: String,
) -> Result<u64, AskError> {
    let python = serde_json::json!({"model": model, "input": text});
    let counted = match ask(
        &client,
        http::Method::POST,
        format!("{url}/extras/tokenize/count"),
        Some(python),
    )
    .await
    {
        Err(AskError::Status { status: 404, .. }) => {
            let server = serde_json::json!({"content": text});
            ask(
                &client,
                http::Method::POST,
                format!("{url}/tokenize"),
                Some(server),
            )
            .await?
        }
        other => other?,
    };
    family::token_count_of(&counted).ok_or(AskError::Body {
        url: url.to_string(),
    })
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
