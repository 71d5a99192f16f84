//! Step: meter. What the neuron produced, read as it passes: the usage it
//! reports (from the body, or the usage event of a stream, stripped for a
//! client that did not ask for it), else an estimate from what was
//! forwarded. A non-streamed response is read whole within
//! `request_timeout_ms`. A stream is relayed event by event and cut:
//! - past its reservation's bound (a neuron ignoring the limit it was
//!   sent): settled at the whole reservation, never more;
//! - after `stream_idle_timeout_ms` of silence or past `request_timeout_ms`.
//!
//! Durable before delivered: the end of a response (a stream's from its
//! usage event or `[DONE]` on, see [`SseScanner::hold_end`]) leaves only
//! once its usage record is on disk; when it cannot be written, the client
//! gets an error instead.

use super::settle::{self, Settlement};
use crate::api_error::ApiError;
use crate::usage::{self, Reported, SseScanner};
use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::Response;
use bytes::Bytes;
use futures_util::Stream;
use http_body_util::BodyExt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Reads a non-streamed response whole (by `deadline`), settles at the
/// usage it reports (or its whole bound when it is not even JSON) and
/// returns it once the record is durable.
pub async fn body<B>(
    upstream: B,
    deadline: Instant,
    mut settlement: Settlement,
) -> Result<Response, ApiError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let collected = match tokio::time::timeout_at(deadline.into(), upstream.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) => {
            settlement.finish(None, true);
            return Err(ApiError::bad_gateway(format!(
                "the neuron's response broke off: {e}"
            )));
        }
        Err(_) => {
            settlement.finish(None, true);
            return Err(ApiError::gateway_timeout(
                "the neuron's response did not complete in time",
            ));
        }
    };
    let read = usage::read_body(&collected);
    if let Some(model) = read.model {
        settlement.model_served = model;
    }
    let reported = read.usage;
    if reported.is_none() {
        // Not even JSON: charge the whole bound.
        settlement.chunks = read.estimate.unwrap_or(settlement.completion_bound);
    }
    // Durable before delivered: the body leaves once its record is on
    // disk (one fsync per batch of requests, shared).
    settle::durably(&mut settlement, reported).await?;
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let mut response = Response::new(Body::from(collected));
    *response.headers_mut() = headers;
    Ok(response)
}

/// How a stream is relayed: what to strip, when to cut, how to count.
pub struct StreamLimits {
    /// Strip the usage event: the agent asked for it, not the client.
    pub strip_usage: bool,
    /// How a stream that ends without usage is counted by its server's
    /// tokenizer (families whose streams carry none); `None`: it is
    /// charged the estimate.
    pub count: Option<TokenCount>,
    /// Choices the request asked for.
    pub choices: u64,
    pub idle_timeout: Duration,
    /// When the whole request must be done (`request_timeout_ms`).
    pub deadline: Instant,
}

/// Where and what of a stream without usage the server counts.
pub struct TokenCount {
    /// The upstream's base URL.
    pub url: std::sync::Arc<str>,
    /// The prompt of a legacy completion of one prompt, counted with it.
    pub prompt: Option<String>,
}

impl TokenCount {
    /// How a request of `operation` with `body` is counted when its stream
    /// reports no usage; `None` when it cannot be: a request with `stop`
    /// sequences (the server drops the text that matched them, so the
    /// streamed text undercounts what was generated) is charged the
    /// estimate.
    pub fn of(
        url: &std::sync::Arc<str>,
        operation: allot::reservation::Operation,
        body: &serde_json::Map<String, serde_json::Value>,
    ) -> Option<TokenCount> {
        use serde_json::Value;
        if !operation.usage_chunk_on_request() {
            return None;
        }
        match body.get("stop") {
            None | Some(Value::Null) => {}
            Some(Value::Array(stops)) if stops.is_empty() => {}
            Some(_) => return None,
        }
        let prompt = match (operation, body.get("prompt")) {
            (allot::reservation::Operation::Completions, Some(Value::String(prompt))) => {
                Some(prompt.clone())
            }
            (allot::reservation::Operation::Completions, Some(Value::Array(prompts))) => {
                match prompts.as_slice() {
                    [Value::String(prompt)] => Some(prompt.clone()),
                    _ => None,
                }
            }
            _ => None,
        };
        Some(TokenCount {
            url: url.clone(),
            prompt,
        })
    }
}

/// The response relaying the neuron's SSE stream, metered.
pub fn stream<B>(upstream: B, limits: StreamLimits, settlement: Settlement) -> Response
where
    B: hyper::body::Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: std::fmt::Display,
{
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    let relay = SseRelay::new(upstream, limits, settlement);
    let mut response = Response::new(Body::from_stream(relay));
    *response.headers_mut() = headers;
    response
}

/// A record's way to the disk ([`crate::spool::Durability::wait`]).
type DurableWait = Pin<Box<dyn Future<Output = Result<(), crate::spool::NotDurable>> + Send>>;
/// The server's count of a stream's text ([`crate::upstream::count_tokens`]).
type CountWait = Pin<
    Box<dyn Future<Output = Result<crate::upstream::Counted, crate::upstream::AskError>> + Send>,
>;

/// Relays an SSE stream chunk by chunk, reading the usage chunk and
/// stripping it for clients that did not ask for it, and settles when the
/// stream ends (or, through the settlement's drop, when the client leaves).
/// The end of the stream is held back until the record is on disk.
pub struct SseRelay<B> {
    /// More content events than this and the neuron is generating past the
    /// bound it was given: the stream is cut there.
    cut_after: u64,
    upstream: B,
    scanner: SseScanner,
    settlement: Settlement,
    done: bool,
    /// How a stream that ends without usage is counted.
    count: Option<TokenCount>,
    /// Set when it ended so: the count, before the request settles...
    counting: Option<CountWait>,
    /// Set once settled: the record's way to the disk...
    durable: Option<DurableWait>,
    /// ...and the end of the stream, released when it gets there.
    tail: Bytes,
    /// Cut the stream when the neuron sends nothing for this long...
    idle_timeout: Duration,
    idle: Pin<Box<tokio::time::Sleep>>,
    /// ...or when the whole request outlives `request_timeout_ms`.
    deadline: Pin<Box<tokio::time::Sleep>>,
}

/// Events a stream may carry beyond one per completion token: the role
/// and finish events of each choice, and the lifecycle events of the
/// Responses API (created, in progress, item and part added and done,
/// completed).
fn stream_event_bound(completion_tokens: u64, choices: u64) -> u64 {
    completion_tokens
        .saturating_add(choices.saturating_mul(8))
        .saturating_add(16)
}

/// An OpenAI-shaped error as the last event of a stream.
fn error_event(message: &str, code: &str) -> Bytes {
    Bytes::from(format!(
        "data: {}\n\n",
        serde_json::json!({"error": {"message": message, "type": "server_error", "param": null, "code": code}})
    ))
}

impl<B> SseRelay<B> {
    fn new(upstream: B, limits: StreamLimits, settlement: Settlement) -> SseRelay<B> {
        SseRelay {
            cut_after: stream_event_bound(settlement.completion_bound, limits.choices),
            upstream,
            scanner: match limits.count {
                Some(_) => SseScanner::new(limits.strip_usage)
                    .hold_end()
                    .collect_text(crate::upstream::MAX_COUNTED_TEXT),
                None => SseScanner::new(limits.strip_usage).hold_end(),
            },
            settlement,
            done: false,
            count: limits.count,
            counting: None,
            durable: None,
            tail: Bytes::new(),
            idle_timeout: limits.idle_timeout,
            idle: Box::pin(tokio::time::sleep(limits.idle_timeout)),
            deadline: Box::pin(tokio::time::sleep_until(limits.deadline.into())),
        }
    }

    /// Settles at the end of the upstream and holds `tail` (the end of the
    /// stream) until the record is durable.
    fn settle_and_hold(&mut self, tail: Bytes) {
        let reported = self.relay_seen();
        if reported.is_none() {
            if let Some(counting) = self.count_text() {
                // Settled once the server counted the text (or could not).
                self.tail = tail;
                self.counting = Some(counting);
                return;
            }
        }
        self.settle_then_end(reported, tail);
    }

    /// Asks the server to count a stream's whole text, when it ended
    /// without usage and its family has a tokenizer to ask.
    fn count_text(&mut self) -> Option<CountWait> {
        let count = self.count.take()?;
        let text = self.scanner.seen.text.as_mut()?;
        if text.incomplete {
            return None;
        }
        let text = std::mem::take(&mut text.text);
        let state = &self.settlement.state;
        Some(Box::pin(crate::upstream::count_stream(
            state.neuron.client.clone(),
            count.url,
            self.settlement.template.model.clone(),
            count.prompt,
            text,
        )))
    }

    /// Settles at the server's count of the text (never below the events
    /// that carried it), or at the estimate when it could not count.
    fn settle_counted(
        &mut self,
        counted: Result<crate::upstream::Counted, crate::upstream::AskError>,
    ) {
        let token_events = self
            .scanner
            .seen
            .text
            .as_ref()
            .map_or(0, |text| text.token_events);
        match counted {
            Ok(counted) => {
                metrics::counter!("allot_agent_streams_counted_total", "outcome" => "counted")
                    .increment(1);
                self.settlement.chunks =
                    crate::family::counted_completion(counted.completion, token_events);
                self.settlement.prompt_counted = counted.prompt;
            }
            Err(error) => {
                metrics::counter!("allot_agent_streams_counted_total", "outcome" => "estimated")
                    .increment(1);
                tracing::warn!(%error, "the server did not count a stream's tokens; it is charged the estimate");
            }
        }
        let tail = std::mem::take(&mut self.tail);
        self.settle_then_end(None, tail);
    }

    /// Settles with `reported` and holds `tail`, the stream's last bytes
    /// (its end, or an error event), until the record is durable: a stream
    /// cut short is charged before its client sees it end, too.
    fn settle_then_end(&mut self, reported: Option<Reported>, tail: Bytes) {
        self.tail = tail;
        if let Some(seq) = self.settlement.finish(reported, true) {
            self.durable = Some(Box::pin(self.settlement.state.records.durability.wait(seq)));
        }
    }

    /// Releases the end of the stream once the record is on disk, or ends
    /// the stream with an error event when it cannot be written.
    fn poll_release(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, std::io::Error>>> {
        if let Some(counting) = self.counting.as_mut() {
            let counted = std::task::ready!(counting.as_mut().poll(cx));
            self.counting = None;
            self.settle_counted(counted);
        }
        if let Some(durable) = self.durable.as_mut() {
            let written = std::task::ready!(durable.as_mut().poll(cx));
            self.durable = None;
            if let Err(error) = written {
                self.tail = Bytes::new();
                let error = ApiError::from(error);
                return Poll::Ready(Some(Ok(error_event(&error.message, error.code_label()))));
            }
        }
        let tail = std::mem::take(&mut self.tail);
        Poll::Ready((!tail.is_empty()).then_some(Ok(tail)))
    }

    /// Hands what the stream showed so far to the settlement; the usage
    /// the neuron reported, if any.
    fn relay_seen(&mut self) -> Option<Reported> {
        let seen = &self.scanner.seen;
        self.settlement.chunks = seen.chunks;
        if let Some(model) = &seen.model {
            self.settlement.model_served.clone_from(model);
        }
        seen.usage
    }
}

impl<B> Drop for SseRelay<B> {
    fn drop(&mut self) {
        // The client left mid-stream (a finished stream has settled
        // already): settle at the usage the neuron reported, if it came,
        // else at the estimate from what was forwarded.
        let reported = self.relay_seen();
        self.settlement.finish(reported, true);
    }
}

impl<B> Stream for SseRelay<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return this.poll_release(cx);
        }
        loop {
            match Pin::new(&mut this.upstream).poll_frame(cx) {
                Poll::Pending => {
                    let idle = this.idle.as_mut().poll(cx).is_ready();
                    if !idle && this.deadline.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    // Cut: dropping the upstream body (with this relay)
                    // cancels the neuron's request.
                    this.done = true;
                    let reported = this.relay_seen();
                    this.settlement.status = 504;
                    let (what, code) = if idle {
                        ("sent nothing for too long", "stream_idle_timeout")
                    } else {
                        ("did not finish in time", "request_timeout")
                    };
                    metrics::counter!("allot_agent_stream_timeouts_total", "kind" => code)
                        .increment(1);
                    let event = error_event(&format!("the neuron's stream {what}"), code);
                    this.settle_then_end(reported, event);
                    return this.poll_release(cx);
                }
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    let next = tokio::time::Instant::now() + this.idle_timeout;
                    this.idle.as_mut().reset(next);
                    let out = this.scanner.push(&data);
                    if this.scanner.seen.chunks > this.cut_after {
                        // Last line of defence: a neuron that ignores the
                        // limit it was sent is cut, and the request settles
                        // at its whole reservation (estimated), never more.
                        this.done = true;
                        metrics::counter!("allot_agent_streams_cut_total").increment(1);
                        tracing::error!(
                            key_id = this.settlement.template.key.key_id,
                            request_id = this.settlement.template.request_id,
                            "the neuron streamed past the completion bound it was sent; the stream is cut"
                        );
                        this.settlement.chunks = this.settlement.completion_bound;
                        let event = error_event(
                            "the neuron generated more than this request reserved; the stream was cut",
                            "reservation_exceeded",
                        );
                        this.settle_then_end(None, event);
                        return this.poll_release(cx);
                    }
                    if this.scanner.seen.done {
                        // `[DONE]` ends the stream even if the neuron keeps
                        // its connection open: settle now, and pass the end
                        // on once the record is on disk.
                        this.done = true;
                        let mut tail = bytes::BytesMut::from(this.scanner.take_held());
                        tail.extend_from_slice(&this.scanner.finish());
                        this.settle_and_hold(tail.freeze());
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(out)));
                        }
                        return this.poll_release(cx);
                    }
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(out)));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    let reported = this.relay_seen();
                    let event = error_event(
                        &format!("the neuron's stream broke off: {e}"),
                        "upstream_error",
                    );
                    this.settle_then_end(reported, event);
                    return this.poll_release(cx);
                }
                Poll::Ready(None) => {
                    this.done = true;
                    let mut tail = bytes::BytesMut::from(this.scanner.take_held());
                    tail.extend_from_slice(&this.scanner.finish());
                    this.settle_and_hold(tail.freeze());
                    return this.poll_release(cx);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::settle::tests::settlement;
    use crate::path::testing;
    use futures_util::StreamExt;
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    use tokio::sync::mpsc;

    type Events = mpsc::UnboundedSender<Result<Frame<Bytes>, std::io::Error>>;
    type Upstream = StreamBody<
        tokio_stream::wrappers::UnboundedReceiverStream<Result<Frame<Bytes>, std::io::Error>>,
    >;

    /// A neuron's stream the test writes event by event.
    fn upstream() -> (Events, Upstream) {
        let (events, receiver) = mpsc::unbounded_channel();
        let body = StreamBody::new(tokio_stream::wrappers::UnboundedReceiverStream::new(
            receiver,
        ));
        (events, body)
    }

    fn send(events: &Events, text: &str) {
        events
            .send(Ok(Frame::data(Bytes::from(text.to_string()))))
            .unwrap();
    }

    fn limits() -> StreamLimits {
        StreamLimits {
            strip_usage: true,
            count: None,
            choices: 1,
            idle_timeout: Duration::from_secs(60),
            deadline: Instant::now() + Duration::from_secs(60),
        }
    }

    const CONTENT: &str = "data: {\"model\":\"served\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\n";
    const USAGE: &str = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11}}\n\n";

    #[tokio::test]
    async fn a_stream_settles_at_its_usage_event_which_the_client_did_not_ask_for() {
        let mut agent = testing::agent(Default::default());
        agent.state.records.durability.mark_durable(u64::MAX);
        let (events, body) = upstream();
        let relay = SseRelay::new(body, limits(), settlement(&agent));
        send(&events, CONTENT);
        send(&events, CONTENT);
        send(&events, USAGE);
        send(&events, "data: [DONE]\n\n");
        let relayed: Vec<Bytes> = relay.map(|chunk| chunk.unwrap()).collect().await;
        let relayed = String::from_utf8(relayed.concat()).unwrap();
        assert!(!relayed.contains("usage"), "stripped: {relayed}");
        assert!(relayed.ends_with("data: [DONE]\n\n"), "{relayed}");
        let record = agent.records.try_recv().unwrap();
        assert_eq!((record.prompt_tokens, record.completion_tokens), (9, 2));
        assert!(!record.usage_estimated);
        assert_eq!(record.model_served, "served");
        assert!(agent.records.try_recv().is_err(), "settled once");
    }

    #[tokio::test]
    async fn the_end_of_a_stream_waits_until_its_record_is_durable() {
        let mut agent = testing::agent(Default::default());
        let (events, body) = upstream();
        let mut relay = SseRelay::new(body, limits(), settlement(&agent));
        send(&events, CONTENT);
        send(&events, USAGE);
        send(&events, "data: [DONE]\n\n");
        assert_eq!(
            &relay.next().await.unwrap().unwrap()[..],
            CONTENT.as_bytes()
        );
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(
            Pin::new(&mut relay).poll_next(&mut cx).is_pending(),
            "the end is held while the record is not on disk"
        );
        let seq = agent.records.try_recv().unwrap().seq;
        agent.state.records.durability.mark_durable(seq);
        let end = relay.next().await.unwrap().unwrap();
        assert!(end.ends_with(b"data: [DONE]\n\n"));
        assert!(relay.next().await.is_none());
    }

    #[tokio::test]
    async fn a_stream_past_its_bound_is_cut_and_settles_at_the_reservation() {
        let mut agent = testing::agent(Default::default());
        let (events, body) = upstream();
        let settlement = settlement(&agent);
        let bound = stream_event_bound(settlement.completion_bound, 1);
        let mut relay = SseRelay::new(body, limits(), settlement);
        agent.state.records.durability.mark_durable(u64::MAX);
        for _ in 0..=bound {
            send(&events, CONTENT);
        }
        for _ in 0..bound {
            let relayed = relay.next().await.unwrap().unwrap();
            assert_eq!(&relayed[..], CONTENT.as_bytes());
        }
        let cut = relay.next().await.unwrap().unwrap();
        assert!(
            std::str::from_utf8(&cut)
                .unwrap()
                .contains("reservation_exceeded"),
            "the client is told why"
        );
        assert!(relay.next().await.is_none());
        let record = agent.records.try_recv().unwrap();
        assert_eq!(record.completion_tokens, 20, "the whole completion bound");
        assert!(record.usage_estimated);
    }

    #[tokio::test]
    async fn a_silent_neuron_is_cut_with_504_and_charged_what_was_forwarded() {
        let mut agent = testing::agent(Default::default());
        let (events, body) = upstream();
        let mut limits = limits();
        limits.idle_timeout = Duration::from_millis(20);
        let mut relay = SseRelay::new(body, limits, settlement(&agent));
        agent.state.records.durability.mark_durable(u64::MAX);
        send(&events, CONTENT);
        relay.next().await.unwrap().unwrap();
        let event = relay.next().await.unwrap().unwrap();
        assert!(std::str::from_utf8(&event)
            .unwrap()
            .contains("stream_idle_timeout"));
        let record = agent.records.try_recv().unwrap();
        assert_eq!(record.http_status, 504);
        assert_eq!(record.completion_tokens, 1);
        drop(events);
    }

    #[tokio::test]
    async fn a_client_leaving_mid_stream_settles_at_what_was_forwarded() {
        let mut agent = testing::agent(Default::default());
        let (events, body) = upstream();
        let mut settlement = settlement(&agent);
        settlement.first_byte = Some(Duration::from_millis(1));
        let mut relay = SseRelay::new(body, limits(), settlement);
        send(&events, CONTENT);
        send(&events, CONTENT);
        relay.next().await.unwrap().unwrap();
        relay.next().await.unwrap().unwrap();
        drop(relay);
        let record = agent.records.try_recv().unwrap();
        assert!(record.charged && record.usage_estimated);
        assert_eq!(record.completion_tokens, 2);
    }

    #[tokio::test]
    async fn a_whole_body_settles_at_its_usage_then_is_delivered_once_durable() {
        let mut agent = testing::agent(Default::default());
        let json = r#"{"model":"served","choices":[],"usage":{"prompt_tokens":4,"completion_tokens":3,"total_tokens":7}}"#;
        let body = http_body_util::Full::new(Bytes::from(json));
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut delivered = Box::pin(super::body(body, deadline, settlement(&agent)));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(delivered.as_mut().poll(&mut cx).is_pending(), "held");
        let record = agent.records.try_recv().unwrap();
        assert_eq!((record.prompt_tokens, record.completion_tokens), (4, 3));
        agent.state.records.durability.mark_durable(record.seq);
        let response = delivered.await.unwrap();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], json.as_bytes());
    }
}
