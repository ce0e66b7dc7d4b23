//! Every error the shim answers is JSON: `{"error": message, "field"?, "rule"?}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use pipeline::envelope::RequestError;
use pipeline::{InputError, PipelineError};
use serde_json::json;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub field: Option<String>,
    pub rule: Option<String>,
    /// Seconds for a `Retry-After` header (503 while Redis is down).
    pub retry_after: Option<u32>,
    /// Keys merged into the JSON body.
    pub extra: Option<Box<serde_json::Value>>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            field: None,
            rule: None,
            retry_after: None,
            extra: None,
        }
    }

    pub fn input(status: StatusCode, e: &InputError) -> Self {
        Self {
            status,
            message: e.to_string(),
            field: Some(e.field.clone()),
            rule: Some(e.rule.clone()),
            retry_after: None,
            extra: None,
        }
    }

    /// An input error of a native route, whose body is the input itself:
    /// fields are named from the body's root (`max_words`, not
    /// `input.max_words`).
    pub fn native_input(e: RequestError) -> Self {
        let mut err = Self::from(e);
        if let Some(field) = err.field.take() {
            let field = match field.strip_prefix("input.") {
                Some(f) => f.to_string(),
                None if field == "input" => "body".to_string(),
                None => field,
            };
            err.message = format!("{field}: {}", err.rule.clone().unwrap_or_default());
            err.field = Some(field);
        }
        err
    }

    pub fn not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            format!("no job {id} for this API key"),
        )
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        match &e {
            RequestError::Malformed(i) => Self::input(StatusCode::BAD_REQUEST, i),
            RequestError::Invalid(i) => Self::input(StatusCode::UNPROCESSABLE_ENTITY, i),
        }
    }
}

impl From<PipelineError> for ApiError {
    fn from(e: PipelineError) -> Self {
        if pipeline::queue::is_unavailable(&e) {
            tracing::warn!(error = %e, "the job store is unavailable");
            let mut err = Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the job store (Redis) is unavailable; retry shortly",
            );
            err.retry_after = Some(1);
            return err;
        }
        tracing::error!(error = %e, "pipeline error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error in the job store",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.message });
        if let Some(f) = self.field {
            body["field"] = json!(f);
        }
        if let Some(r) = self.rule {
            body["rule"] = json!(r);
        }
        if let Some(serde_json::Value::Object(extra)) = self.extra.map(|b| *b) {
            for (k, v) in extra {
                body[k] = v;
            }
        }
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(secs),
            );
        }
        resp
    }
}
