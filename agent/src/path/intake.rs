//! Step: intake. The request body, read whole before anything else holds a
//! place for it: at most `max_body_bytes` (413 past it, after draining a
//! bounded rest so the client reads the answer) and within
//! `body_read_timeout_ms` of the headers (408 for a client trickling it).

use crate::api_error::ApiError;
use crate::config::AgentConfig;
use axum::body::Body;
use bytes::Bytes;
use http_body_util::BodyExt;
use std::time::Duration;

/// Past the size limit, the rest of a body is read and dropped, up to this
/// much and for at most [`DRAIN_TIME`], so that the client, still sending,
/// reads the 413 instead of a broken connection (nginx's lingering close).
const DRAIN_BYTES: usize = 64 * 1024 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(5);

/// Reads the whole request body within `body_read_timeout_ms` of the
/// headers: a client trickling its body gets 408 instead of holding the
/// connection.
pub async fn read_body(config: &AgentConfig, body: Body) -> Result<Bytes, ApiError> {
    read_bounded(body, config.max_body_bytes, config.body_read_timeout()).await
}

async fn read_bounded(body: Body, limit: usize, timeout: Duration) -> Result<Bytes, ApiError> {
    match tokio::time::timeout(timeout, read_within_limit(body, limit)).await {
        Ok(read) => read,
        Err(_) => {
            metrics::counter!("allot_agent_body_read_timeouts_total").increment(1);
            Err(ApiError::body_timeout(timeout))
        }
    }
}

async fn read_within_limit(mut body: Body, limit: usize) -> Result<Bytes, ApiError> {
    // A body that arrives in one frame (the common case) is kept as it
    // came; only one in several frames is copied together.
    let mut first: Option<Bytes> = None;
    let mut collected = bytes::BytesMut::new();
    let mut length = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            ApiError::bad_request(format!("cannot read the request body: {e}"), None)
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if length + data.len() > limit {
            let mut drained = length + data.len();
            let _ = tokio::time::timeout(DRAIN_TIME, async {
                while drained < DRAIN_BYTES {
                    match body.frame().await {
                        Some(Ok(frame)) => {
                            drained += frame.data_ref().map_or(0, |d| d.len());
                        }
                        _ => break,
                    }
                }
            })
            .await;
            return Err(ApiError::too_large(limit));
        }
        length += data.len();
        match first.take() {
            None if collected.is_empty() => first = Some(data),
            None => collected.extend_from_slice(&data),
            Some(earlier) => {
                collected.reserve(earlier.len() + data.len());
                collected.extend_from_slice(&earlier);
                collected.extend_from_slice(&data);
            }
        }
    }
    Ok(first.unwrap_or_else(|| collected.freeze()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;
    use futures_util::stream;

    const TIME: Duration = Duration::from_secs(5);

    fn frames(parts: &[&'static str]) -> Body {
        let parts: Vec<Result<Bytes, std::io::Error>> = parts
            .iter()
            .map(|p| Ok(Bytes::from_static(p.as_bytes())))
            .collect();
        Body::from_stream(stream::iter(parts))
    }

    #[tokio::test]
    async fn one_frame_is_kept_as_it_came_and_several_are_joined() {
        let one = Bytes::from_static(b"{\"model\":\"m\"}");
        let read = read_bounded(Body::from(one.clone()), 100, TIME)
            .await
            .unwrap();
        assert_eq!(read, one);
        assert_eq!(read.as_ptr(), one.as_ptr(), "not copied");
        let read = read_bounded(frames(&["{\"mo", "del\"", ":1}"]), 100, TIME)
            .await
            .unwrap();
        assert_eq!(&read[..], b"{\"model\":1}");
    }

    #[tokio::test]
    async fn a_body_past_the_limit_is_413_and_one_at_it_is_read() {
        let read = read_bounded(frames(&["12345", "67890"]), 10, TIME).await;
        assert_eq!(&read.unwrap()[..], b"1234567890");
        let error = read_bounded(frames(&["12345", "678901"]), 10, TIME)
            .await
            .unwrap_err();
        assert_eq!(error.status, StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn a_body_that_does_not_finish_in_time_is_408() {
        let (_sender, receiver) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        let never_ends = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(receiver));
        let error = read_bounded(never_ends, 10, Duration::from_millis(20))
            .await
            .unwrap_err();
        assert_eq!(error.status, StatusCode::REQUEST_TIMEOUT);
    }
}
