//! Cog's prediction API on our jobs: the prediction object (Cog's
//! lowercase statuses, timestamps, `metrics.predict_time`) a job record
//! maps to, for the shim's `/cog/{kind}/predictions` routes and for the
//! callbacks of predictions made there.

use serde_json::{json, Value};

use crate::queue::JobRecord;
use crate::JobState;

/// Cog's word for a job state.
pub fn status(state: JobState) -> &'static str {
    match state {
        JobState::InQueue => "starting",
        JobState::InProgress => "processing",
        JobState::Completed => "succeeded",
        JobState::Failed | JobState::TimedOut => "failed",
        JobState::Cancelled => "canceled",
    }
}

fn iso(ms: Option<u64>) -> Value {
    ms.and_then(|ms| chrono::DateTime::from_timestamp_millis(ms as i64))
        .map(|t| json!(t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)))
        .unwrap_or(Value::Null)
}

/// The prediction object of job `rec`, named `id` (the caller's id for a
/// `PUT`, else the job id).
pub fn prediction(rec: &JobRecord, id: &str) -> Value {
    let mut p = json!({
        "id": id,
        "input": rec.input,
        "output": if rec.state == JobState::Completed { rec.output.clone().unwrap_or(Value::Null) } else { Value::Null },
        "status": status(rec.state),
        "created_at": iso(Some(rec.created_ms)),
        "started_at": iso(rec.started_ms),
        "completed_at": if rec.state.is_terminal() { iso(rec.finished_ms) } else { Value::Null },
        "logs": "",
        "error": if rec.state.is_terminal() && rec.state != JobState::Completed { rec.error.clone().map(Value::String).unwrap_or(Value::Null) } else { Value::Null },
        "metrics": {},
    });
    if let (Some(s), Some(f)) = (rec.started_ms, rec.finished_ms) {
        if rec.state.is_terminal() {
            p["metrics"]["predict_time"] = json!(f.saturating_sub(s) as f64 / 1000.0);
        }
    }
    if let Some(progress) = rec
        .progress
        .as_ref()
        .filter(|_| rec.state == JobState::InProgress)
    {
        p["logs"] = json!(format!(
            "step {}/{}\n",
            progress["step"].as_u64().unwrap_or(0),
            progress["steps"].as_u64().unwrap_or(0)
        ));
    }
    p
}
