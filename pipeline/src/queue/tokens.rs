//! Each job's token stream `{ns}:tokens:{id}`: text deltas by option as the
//! worker generates them, spoken chunks of a reply as they are synthesized,
//! then one end event with the job's final state (written by the script
//! that ended the job). Also stop requests.

use redis::AsyncCommands;

use super::keys::TOKEN_STREAM_TTL_SECS;
use super::RedisQueue;
use crate::{JobState, PipelineError};

/// One event of a job's token stream.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenEvent {
    /// New text of option `option`.
    Text { option: usize, text: String },
    /// The job ended in this state; no events follow.
    End { state: JobState },
    /// The running job's progress (`{step, steps}`).
    Progress { progress: serde_json::Value },
    /// One spoken chunk of the reply (a sentence or a few), a whole audio
    /// file of its own.
    Audio(AudioChunk),
}

/// A spoken chunk of a streamed reply: `text` spoken, encoded as a complete
/// file in `format` (`wav`, `mp3`, `ogg`), chunks numbered from 0.
#[derive(Debug, Clone, PartialEq)]
pub struct AudioChunk {
    pub index: u64,
    pub text: String,
    pub format: String,
    pub seconds: f64,
    pub audio: Vec<u8>,
}

impl AudioChunk {
    /// The chunk as the shim sends it: `{index, text, format, seconds,
    /// audio}` with the audio in base64.
    pub fn to_json(&self) -> serde_json::Value {
        use base64::Engine as _;
        serde_json::json!({
            "index": self.index,
            "text": self.text,
            "format": self.format,
            "seconds": self.seconds,
            "audio": base64::engine::general_purpose::STANDARD.encode(&self.audio),
        })
    }
}

impl TokenEvent {
    pub(crate) fn from_entry(e: &redis::streams::StreamId) -> Self {
        if let Some(audio) = e.get::<Vec<u8>>("a") {
            return TokenEvent::Audio(AudioChunk {
                index: e.get::<u64>("ai").unwrap_or(0),
                text: e.get::<String>("at").unwrap_or_default(),
                format: e.get::<String>("af").unwrap_or_default(),
                seconds: e.get::<f64>("as").unwrap_or(0.0),
                audio,
            });
        }
        if let Some(p) = e.get::<String>("p") {
            return TokenEvent::Progress {
                progress: serde_json::from_str(&p).unwrap_or_default(),
            };
        }
        match e.get::<String>("end") {
            Some(state) => TokenEvent::End {
                // Written by the job-ending scripts, always a state name.
                state: JobState::parse(&state).unwrap_or(JobState::Failed),
            },
            None => TokenEvent::Text {
                option: e.get::<usize>("o").unwrap_or(0),
                text: e.get::<String>("t").unwrap_or_default(),
            },
        }
    }
}

impl RedisQueue {
    /// The token events of job `id` since the previous poll (RunPod's polled
    /// `/stream/{id}`): a cursor per job remembers how far polls have read.
    pub async fn poll_tokens(&self, id: &str) -> Result<Vec<TokenEvent>, PipelineError> {
        let mut conn = self.conn.clone();
        let cursor_key = self.keys.stream_cursor(id);
        let after: Option<String> = conn.get(&cursor_key).await?;
        let start = match &after {
            Some(a) => format!("({a}"),
            None => "-".into(),
        };
        let reply: redis::streams::StreamRangeReply = conn
            .xrange_count(self.keys.tokens(id), &start, "+", 1000)
            .await?;
        if let Some(last) = reply.ids.last() {
            let _: () = conn
                .set_ex(&cursor_key, &last.id, TOKEN_STREAM_TTL_SECS)
                .await?;
        }
        Ok(reply
            .ids
            .into_iter()
            .map(|e| TokenEvent::from_entry(&e))
            .collect())
    }

    /// Bytes of text already in job `id`'s token stream, by option (what an
    /// earlier run of the job streamed before its worker died or handed it
    /// back).
    pub async fn streamed_bytes(&self, id: &str) -> Result<Vec<usize>, PipelineError> {
        let reply: redis::streams::StreamRangeReply =
            self.conn.clone().xrange_all(self.keys.tokens(id)).await?;
        let mut bytes: Vec<usize> = Vec::new();
        for e in reply.ids {
            if let (Some(option), Some(text)) = (e.get::<usize>("o"), e.get::<String>("t")) {
                if bytes.len() <= option {
                    bytes.resize(option + 1, 0);
                }
                bytes[option] += text.len();
            }
        }
        Ok(bytes)
    }

    /// Asks the worker running job `id` to stop generating now (a streaming
    /// client went away). The job still finishes, with what it generated.
    pub async fn request_stop(&self, id: &str, reason: &str) -> Result<(), PipelineError> {
        let mut pipe = redis::pipe();
        pipe.hset(self.keys.job(id), "stop_requested", reason)
            .ignore();
        pipe.publish(self.keys.stops(), id).ignore();
        let _: () = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(())
    }

    /// Why a stop was requested for job `id`, if one was.
    pub async fn stop_requested(&self, id: &str) -> Result<Option<String>, PipelineError> {
        Ok(self
            .conn
            .clone()
            .hget(self.keys.job(id), "stop_requested")
            .await?)
    }
}
