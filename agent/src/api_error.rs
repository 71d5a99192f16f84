//! The agent's errors as OpenAI-shaped HTTP responses, in one place:
//! `{"error": {"message", "type", "param", "code"}}`. Never 402: an
//! exhausted budget is 429.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub message: String,
    pub param: Option<String>,
    /// Whole seconds for a `Retry-After` header.
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(
        status: StatusCode,
        kind: &'static str,
        code: Option<&'static str>,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            kind,
            code,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    pub fn invalid_api_key(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            Some("invalid_api_key"),
            message,
        )
    }

    pub fn bad_request(message: impl Into<String>, param: Option<String>) -> ApiError {
        ApiError {
            param,
            ..ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                message,
            )
        }
    }

    pub fn too_large(limit: usize) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            Some("request_too_large"),
            format!("request body is larger than {limit} bytes"),
        )
    }

    /// The request body did not arrive within `body_read_timeout_ms`.
    pub fn body_timeout(limit: std::time::Duration) -> ApiError {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            Some("request_body_timeout"),
            format!(
                "the request body did not arrive within {} ms",
                limit.as_millis()
            ),
        )
    }

    /// Every connection the agent may hold is serving a request.
    pub fn too_many_connections(max: usize) -> ApiError {
        ApiError {
            retry_after: Some(1),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("too_many_connections"),
                format!("this agent is serving its maximum of {max} connections"),
            )
        }
    }

    pub fn model_not_found(model: &str) -> ApiError {
        ApiError {
            param: Some("model".into()),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model_not_found"),
                format!("the model `{model}` does not exist or you do not have access to it"),
            )
        }
    }

    pub fn insufficient_quota(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "insufficient_quota",
            Some("insufficient_quota"),
            message,
        )
    }

    pub fn rate_limited(message: impl Into<String>, retry_after: u64) -> ApiError {
        ApiError {
            retry_after: Some(retry_after.max(1)),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "requests",
                Some("rate_limit_exceeded"),
                message,
            )
        }
    }

    pub fn unavailable(message: impl Into<String>, retry_after: u64) -> ApiError {
        ApiError {
            retry_after: Some(retry_after.max(1)),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("allowance_unavailable"),
                message,
            )
        }
    }

    /// The usage spool cannot take a request's record: admission stops
    /// (503) until it can, and a request whose record could not be made
    /// durable ends with this instead of its response.
    pub fn spool_unavailable(message: impl Into<String>) -> ApiError {
        ApiError {
            retry_after: Some(1),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("usage_spool_unavailable"),
                message,
            )
        }
    }

    pub fn bad_gateway(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "server_error",
            Some("upstream_unreachable"),
            message,
        )
    }

    pub fn gateway_timeout(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "server_error",
            Some("upstream_timeout"),
            message,
        )
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("unknown_url"),
            message,
        )
    }

    /// The OpenAI error code, for metrics and usage records.
    pub fn code_label(&self) -> &'static str {
        self.code.unwrap_or(self.kind)
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl From<crate::spool::SpoolRefusal> for ApiError {
    fn from(refusal: crate::spool::SpoolRefusal) -> ApiError {
        use crate::spool::SpoolRefusal;
        ApiError::spool_unavailable(match refusal {
            SpoolRefusal::Unwritable(error) => format!(
                "this agent cannot record usage on its disk ({error}); it admits no request \
                 until it can"
            ),
            SpoolRefusal::Full { max } => format!(
                "this agent holds {max} usage records the coordinator has not acknowledged; \
                 it admits no request until the coordinator catches up"
            ),
        })
    }
}

impl From<crate::spool::NotDurable> for ApiError {
    fn from(error: crate::spool::NotDurable) -> ApiError {
        ApiError::spool_unavailable(format!(
            "the response was not delivered: this agent could not record its usage on disk ({})",
            error.0
        ))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        debug_assert_ne!(
            self.status,
            StatusCode::PAYMENT_REQUIRED,
            "allot never answers 402"
        );
        metrics::counter!("allot_agent_refusals_total", "code" => self.code_label()).increment(1);
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
