//! API keys. A caller is known by a fingerprint of its key (never the key
//! itself), stored as the owner of the jobs it submits.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::StatusCode;

use crate::error::ApiError;
use crate::startup::AppState;

/// Key → owner fingerprint.
#[derive(Clone)]
pub struct ApiKeys(Arc<HashMap<String, String>>);

impl ApiKeys {
    pub fn new(keys: &[String]) -> Self {
        Self(Arc::new(
            keys.iter()
                .filter(|k| !k.trim().is_empty())
                .map(|k| (k.trim().to_string(), pipeline::owner_fingerprint(k)))
                .collect(),
        ))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The authenticated caller.
pub struct Caller {
    pub owner: String,
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "Authorization: Bearer <API key> is required",
                )
            })?;
        // RunPod's clients send "Bearer KEY"; some send the bare key.
        let key = header.strip_prefix("Bearer ").unwrap_or(header).trim();
        state
            .keys
            .0
            .get(key)
            .map(|owner| Caller {
                owner: owner.clone(),
            })
            .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "the API key is not valid"))
    }
}
