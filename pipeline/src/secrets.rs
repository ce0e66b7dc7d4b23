//! Secrets a job carries (RunPod's per-request `s3Config`), sealed at rest:
//! the job record holds them encrypted with ChaCha20-Poly1305 under a key
//! from the environment (`JOB_SECRETS_KEY`, shared by shim and workers),
//! bound to the job id, so neither Redis nor a record dump shows them and a
//! sealed value moved to another job does not open.

use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};

/// The sealing key.
#[derive(Clone)]
pub struct JobSecrets {
    cipher: ChaCha20Poly1305,
}

impl std::fmt::Debug for JobSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JobSecrets(****)")
    }
}

impl JobSecrets {
    /// From 32 bytes, base64-encoded.
    pub fn from_base64(key: &str) -> Result<Self, String> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(key.trim())
            .map_err(|_| "JOB_SECRETS_KEY must be base64".to_string())?;
        if raw.len() != 32 {
            return Err(format!(
                "JOB_SECRETS_KEY must be 32 bytes once decoded, not {}",
                raw.len()
            ));
        }
        Ok(Self {
            cipher: ChaCha20Poly1305::new(Key::from_slice(&raw)),
        })
    }

    /// `plaintext` sealed for job `id`: base64 of nonce ‖ ciphertext.
    pub fn seal(&self, id: &str, plaintext: &[u8]) -> String {
        let nonce: [u8; 12] = rand::random();
        let sealed = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: id.as_bytes(),
                },
            )
            .expect("ChaCha20-Poly1305 seals any message");
        let mut out = nonce.to_vec();
        out.extend(sealed);
        base64::engine::general_purpose::STANDARD.encode(out)
    }

    /// Opens what [`Self::seal`] sealed for job `id`.
    pub fn open(&self, id: &str, sealed: &str) -> Result<Vec<u8>, String> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(sealed)
            .map_err(|_| "a sealed secret is not base64".to_string())?;
        if raw.len() < 12 {
            return Err("a sealed secret is too short".into());
        }
        self.cipher
            .decrypt(
                Nonce::from_slice(&raw[..12]),
                Payload {
                    msg: &raw[12..],
                    aad: id.as_bytes(),
                },
            )
            .map_err(|_| "a sealed secret does not open with this JOB_SECRETS_KEY".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_opens_only_for_its_job_and_key() {
        let key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        let s = JobSecrets::from_base64(&key).unwrap();
        let sealed = s.seal("job-1", b"top secret");
        assert!(!sealed.contains("top secret"));
        assert_eq!(s.open("job-1", &sealed).unwrap(), b"top secret");
        assert!(s.open("job-2", &sealed).is_err());
        let other =
            JobSecrets::from_base64(&base64::engine::general_purpose::STANDARD.encode([8u8; 32]))
                .unwrap();
        assert!(other.open("job-1", &sealed).is_err());
        assert!(JobSecrets::from_base64("c2hvcnQ=").is_err());
    }
}
