//! API keys and tenants. `SHIM_API_KEYS` holds `tenant:key` entries (a bare
//! key is the tenant `default`'s); a job's owner is its caller's tenant, so
//! a tenant's keys see its jobs and no other's, and the worker calls the
//! platform with that tenant's credentials.
//!
//! Keys are kept as SHA-256 digests and a presented key is compared with
//! every one in constant time: neither the lookup's timing nor a memory
//! dump gives a key away.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::StatusCode;
use sha2::Digest;
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::startup::AppState;

/// Each key's digest and its tenant.
#[derive(Clone)]
pub struct ApiKeys(Arc<Vec<([u8; 32], String)>>);

fn digest(key: &str) -> [u8; 32] {
    sha2::Sha256::digest(key.trim().as_bytes()).into()
}

impl ApiKeys {
    /// Reads `tenant:key` / `key` entries; an entry whose tenant part breaks
    /// the tenant rule is an error (a key with a ':' must be given with its
    /// tenant).
    pub fn parse(entries: &[String]) -> anyhow::Result<Self> {
        let mut keys = Vec::new();
        for entry in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            let (tenant, key) = match entry.split_once(':') {
                Some((tenant, key)) => {
                    if !pipeline::is_valid_tenant(tenant) || key.is_empty() {
                        anyhow::bail!(
                            "SHIM_API_KEYS: an entry is tenant:key or key, where a tenant {}",
                            pipeline::TENANT_RULE
                        );
                    }
                    (tenant, key)
                }
                None => (pipeline::DEFAULT_TENANT, entry),
            };
            keys.push((digest(key), tenant.to_string()));
        }
        Ok(Self(Arc::new(keys)))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The tenant of `key`, comparing against every key.
    pub fn tenant_of(&self, key: &str) -> Option<&str> {
        self.find(key).map(|(_, tenant)| tenant)
    }

    /// The index and tenant of `key`, comparing against every key.
    fn find(&self, key: &str) -> Option<(usize, &str)> {
        let presented = digest(key);
        let mut found = None;
        for (i, (d, tenant)) in self.0.iter().enumerate() {
            if bool::from(d.ct_eq(&presented)) {
                found = Some((i, tenant.as_str()));
            }
        }
        found
    }
}

/// The authenticated caller.
pub struct Caller {
    /// The caller's tenant: the owner of the jobs it submits.
    pub owner: String,
    /// Which key it used (its limits are per key).
    pub key: usize,
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
        let (index, tenant) = state
            .keys
            .find(key)
            .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "the API key is not valid"))?;
        state.limits.check_rate(index)?;
        Ok(Caller {
            owner: tenant.to_string(),
            key: index,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_their_tenant_and_bare_keys_are_the_default_tenants() {
        let keys = ApiKeys::parse(&[
            "acme:k1".into(),
            " acme:k2 ".into(),
            "globex:k3".into(),
            "bare".into(),
        ])
        .unwrap();
        assert_eq!(keys.tenant_of("k1"), Some("acme"));
        assert_eq!(keys.tenant_of("k2"), Some("acme"));
        assert_eq!(keys.tenant_of("k3"), Some("globex"));
        assert_eq!(keys.tenant_of("bare"), Some("default"));
        assert_eq!(
            keys.tenant_of("acme:k1"),
            None,
            "the tenant is not part of the key"
        );
        assert_eq!(keys.tenant_of("k"), None);
        assert!(ApiKeys::parse(&["bad tenant:k".into()]).is_err());
        assert!(ApiKeys::parse(&["acme:".into()]).is_err());
    }
}
