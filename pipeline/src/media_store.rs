//! Where generated media goes: any S3-compatible store (aws-sdk-s3 with a
//! configurable endpoint, bucket, path-style addressing, static credentials
//! and a public CDN base URL), or a local directory (the embedded default).
//! Keys are `{tenant}/{yyyy}/{mm}/{job_id}/{name}`.

use std::path::PathBuf;

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::primitives::ByteStream;
use chrono::{DateTime, Datelike, Utc};

#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("media store: {0}")]
    Io(String),
    #[error("S3 upload of {key} to bucket {bucket}: {message}")]
    S3 {
        bucket: String,
        key: String,
        message: String,
    },
}

/// Settings of an S3-compatible store.
#[derive(Debug, Clone)]
pub struct S3Settings {
    /// None: AWS's own endpoint for the region.
    pub endpoint: Option<String>,
    pub region: String,
    pub bucket: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// `endpoint/bucket/key` instead of `bucket.endpoint/key` (MinIO, s3s, R2).
    pub force_path_style: bool,
    /// Public URL prefix of the bucket (a CDN); None: the object's S3 URL.
    pub cdn_base_url: Option<String>,
}

/// A stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub key: String,
    pub url: String,
}

pub enum MediaStore {
    Local {
        dir: PathBuf,
        base_url: String,
    },
    S3 {
        client: aws_sdk_s3::Client,
        settings: S3Settings,
    },
    /// Cog's `output_file_prefix`: each file is PUT at the prefix + its
    /// name, through the outbound guard (the caller named the URL).
    HttpPut {
        prefix: String,
        client: reqwest::Client,
    },
}

/// A key part made safe: letters, digits, `.`, `_`, `-` kept, the rest `_`.
fn safe(part: &str) -> String {
    let cleaned: String = part
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    match cleaned.trim_matches('.') {
        "" => "_".to_string(),
        s => s.to_string(),
    }
}

/// `{tenant}/{yyyy}/{mm}/{job_id}/{name}`.
pub fn media_key(tenant: &str, at: DateTime<Utc>, job_id: &str, name: &str) -> String {
    format!(
        "{}/{:04}/{:02}/{}/{}",
        safe(tenant),
        at.year(),
        at.month(),
        safe(job_id),
        safe(name)
    )
}

impl MediaStore {
    /// A local directory; URLs are `base_url/key` (`file://DIR` by default).
    pub fn local(dir: PathBuf, base_url: Option<String>) -> Self {
        let base_url = base_url.unwrap_or_else(|| format!("file://{}", dir.display()));
        MediaStore::Local { dir, base_url }
    }

    pub fn s3(settings: S3Settings) -> Self {
        let mut cfg = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(settings.region.clone()))
            .credentials_provider(Credentials::new(
                settings.access_key_id.clone(),
                settings.secret_access_key.clone(),
                None,
                None,
                "companion-worker",
            ))
            .force_path_style(settings.force_path_style)
            // Every upload has a deadline of its own (a hung S3 never holds
            // a run past it; the job's execution timeout is the outer one).
            .timeout_config(
                aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                    .connect_timeout(std::time::Duration::from_secs(5))
                    .operation_attempt_timeout(std::time::Duration::from_secs(60))
                    .operation_timeout(std::time::Duration::from_secs(180))
                    .build(),
            );
        if let Some(e) = &settings.endpoint {
            cfg = cfg.endpoint_url(e);
        }
        MediaStore::S3 {
            client: aws_sdk_s3::Client::from_conf(cfg.build()),
            settings,
        }
    }

    /// A store that PUTs each file at `prefix` + its name (Cog's
    /// `output_file_prefix`), dialling only what `guard` lets through.
    pub fn http_put(
        prefix: String,
        guard: &crate::outbound::OutboundGuard,
    ) -> Result<Self, MediaError> {
        let client = guard
            .client(std::time::Duration::from_secs(60))
            .map_err(|e| MediaError::Io(e.to_string()))?;
        Ok(MediaStore::HttpPut { prefix, client })
    }

    fn url_of(&self, key: &str) -> String {
        match self {
            MediaStore::HttpPut { prefix, .. } => {
                // Only the file name goes after the prefix.
                format!("{prefix}{}", key.rsplit('/').next().unwrap_or(key))
            }
            MediaStore::Local { base_url, .. } => {
                format!("{}/{key}", base_url.trim_end_matches('/'))
            }
            MediaStore::S3 { settings, .. } => match (&settings.cdn_base_url, &settings.endpoint) {
                (Some(cdn), _) => format!("{}/{key}", cdn.trim_end_matches('/')),
                (None, Some(ep)) => {
                    format!("{}/{}/{key}", ep.trim_end_matches('/'), settings.bucket)
                }
                (None, None) => format!(
                    "https://{}.s3.{}.amazonaws.com/{key}",
                    settings.bucket, settings.region
                ),
            },
        }
    }

    /// Stores `bytes` under `key`. A local write goes through a temporary
    /// file renamed into place, so nothing half-written is ever visible.
    pub async fn put(
        &self,
        key: &str,
        bytes: Vec<u8>,
        content_type: &str,
    ) -> Result<Stored, MediaError> {
        match self {
            MediaStore::HttpPut { client, .. } => {
                let url = self.url_of(key);
                let resp = client
                    .put(&url)
                    .header("content-type", content_type)
                    .body(bytes)
                    .send()
                    .await
                    .map_err(|e| {
                        MediaError::Io(format!("PUT {}: {e}", crate::outbound::redact_url(&url)))
                    })?;
                if !resp.status().is_success() {
                    return Err(MediaError::Io(format!(
                        "PUT {}: answered {}",
                        crate::outbound::redact_url(&url),
                        resp.status()
                    )));
                }
            }
            MediaStore::Local { dir, .. } => {
                let path = dir.join(key);
                let parent = path.parent().expect("a key has a parent").to_path_buf();
                let tmp = path.with_extension(format!("part{}", std::process::id()));
                tokio::fs::create_dir_all(&parent)
                    .await
                    .map_err(|e| MediaError::Io(format!("{}: {e}", parent.display())))?;
                tokio::fs::write(&tmp, &bytes)
                    .await
                    .map_err(|e| MediaError::Io(format!("{}: {e}", tmp.display())))?;
                tokio::fs::rename(&tmp, &path)
                    .await
                    .map_err(|e| MediaError::Io(format!("{}: {e}", path.display())))?;
            }
            MediaStore::S3 { client, settings } => {
                client
                    .put_object()
                    .bucket(&settings.bucket)
                    .key(key)
                    .content_type(content_type)
                    .body(ByteStream::from(bytes))
                    .send()
                    .await
                    .map_err(|e| MediaError::S3 {
                        bucket: settings.bucket.clone(),
                        key: key.to_string(),
                        message: format!("{}", aws_sdk_s3::error::DisplayErrorContext(&e)),
                    })?;
            }
        }
        Ok(Stored {
            key: key.to_string(),
            url: self.url_of(key),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn keys_are_tenant_year_month_job_name_and_safe() {
        let at = Utc.with_ymd_and_hms(2026, 3, 9, 12, 0, 0).unwrap();
        assert_eq!(
            media_key("acme", at, "job-1", "response.wav"),
            "acme/2026/03/job-1/response.wav"
        );
        assert_eq!(media_key("../x", at, "a/b", ".."), "_x/2026/03/a_b/_");
    }

    #[tokio::test]
    async fn local_store_writes_the_file_and_names_its_url() {
        let dir = tempfile::tempdir().unwrap();
        let store = MediaStore::local(
            dir.path().to_path_buf(),
            Some("https://cdn.example/m".into()),
        );
        let stored = store
            .put("t/2026/03/j/a.wav", b"RIFF".to_vec(), "audio/wav")
            .await
            .unwrap();
        assert_eq!(stored.url, "https://cdn.example/m/t/2026/03/j/a.wav");
        assert_eq!(
            std::fs::read(dir.path().join("t/2026/03/j/a.wav")).unwrap(),
            b"RIFF"
        );
    }
}
