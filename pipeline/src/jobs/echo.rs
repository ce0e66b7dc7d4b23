//! The `echo` job: a no-op that returns its input's `payload`, for
//! measuring the pipeline's own overhead (shim → Redis → worker → result →
//! signed callback; `benches/pipeline_overhead.sh`). Off by default: the
//! shim serves `/v2/echo/…` only with `ECHO_KIND=true`, and a worker takes it
//! only when `WORKER_KINDS` names it.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::InputError;

/// The most bytes an echo payload may take (as JSON).
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EchoWire {
    #[serde(default)]
    payload: Value,
}

/// A valid echo job.
#[derive(Debug, Clone, PartialEq)]
pub struct EchoJob {
    pub payload: Value,
}

impl EchoJob {
    pub fn parse(input: &Value) -> Result<Self, InputError> {
        let w: EchoWire = serde_path_to_error::deserialize(input).map_err(|e| {
            crate::field_error("input", &e.path().to_string(), e.into_inner().to_string())
        })?;
        let size = serde_json::to_vec(&w.payload).map(|v| v.len()).unwrap_or(0);
        if size > MAX_PAYLOAD_BYTES {
            return Err(InputError::new(
                "input.payload",
                format!("must be at most {MAX_PAYLOAD_BYTES} bytes of JSON"),
            ));
        }
        Ok(Self { payload: w.payload })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EchoOutput {
    pub payload: Value,
}

impl super::JobContract for EchoJob {
    const KIND: super::JobKind = super::JobKind::Echo;
    type Output = EchoOutput;

    fn parse(input: &Value) -> Result<Self, InputError> {
        EchoJob::parse(input)
    }

    fn input_schema() -> Value {
        serde_json::json!({"type": "object", "additionalProperties": false, "properties": {
            "payload": {"description": "any JSON, returned as is"}}})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn returns_any_payload_and_refuses_the_rest() {
        let j = EchoJob::parse(&json!({"payload": {"n": [1, 2]}})).unwrap();
        assert_eq!(j.payload, json!({"n": [1, 2]}));
        assert_eq!(EchoJob::parse(&json!({})).unwrap().payload, Value::Null);
        let e = EchoJob::parse(&json!({"payload": 1, "extra": 2})).unwrap_err();
        assert!(e.field.starts_with("input"), "{e:?}");
        let big = "x".repeat(MAX_PAYLOAD_BYTES + 1);
        let e = EchoJob::parse(&json!({ "payload": big })).unwrap_err();
        assert_eq!(e.field, "input.payload");
    }
}
