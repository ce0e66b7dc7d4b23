//! Job kinds: one contract module per kind (its typed input, parsed once
//! and valid by construction, its typed output, its input schema) and the
//! table that names them all.
//!
//! Adding a kind: a contract file here implementing [`JobContract`], a
//! variant in [`JobKind`] and [`Job`] with its line in each `match` below,
//! and a handler file in the worker (see the README's "Adding a job kind").

pub mod chat;
pub mod chat_stream;
pub mod echo;
pub mod image;
pub mod memory;
pub mod video;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::InputError;
use chat::ChatRespondJob;
use chat_stream::ChatStreamJob;
use echo::EchoJob;
use image::ImageJob;
use memory::MemoryCondenseJob;
use video::VideoJob;

/// One kind's contract.
pub trait JobContract: Sized + Send + 'static {
    /// The kind this contract belongs to.
    const KIND: JobKind;
    /// What a finished job's `output` holds.
    type Output: Serialize;
    /// Parses and checks a job's `input`; errors name the field from
    /// `input.` and the rule.
    fn parse(input: &Value) -> Result<Self, InputError>;
    /// JSON Schema of `input`, for the OpenAPI document.
    fn input_schema() -> Value;
}

/// The table of kinds: their names on the wire (`/v2/{kind}/…`,
/// `WORKER_KINDS`, the queue's lanes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    Chat,
    Memory,
    ChatStream,
    Image,
    Video,
    /// The no-op kind (`jobs::echo`): not in [`JobKind::ALL`], served only
    /// where it is turned on.
    Echo,
}

impl JobKind {
    pub const ALL: [JobKind; 5] = [
        JobKind::Chat,
        JobKind::Memory,
        JobKind::ChatStream,
        JobKind::Image,
        JobKind::Video,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Chat => "chat",
            JobKind::Memory => "memory",
            JobKind::ChatStream => "chat_stream",
            JobKind::Image => "image",
            JobKind::Video => "video",
            JobKind::Echo => "echo",
        }
    }

    /// A kind by its wire name, `echo` included (workers and queue records
    /// know it; the shim serves it only with `ECHO_KIND=true`).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .chain([JobKind::Echo])
            .find(|k| k.as_str() == s)
    }

    /// The kind's input schema.
    pub fn input_schema(self) -> Value {
        match self {
            JobKind::Chat => ChatRespondJob::input_schema(),
            JobKind::Memory => MemoryCondenseJob::input_schema(),
            JobKind::ChatStream => ChatStreamJob::input_schema(),
            JobKind::Image => ImageJob::input_schema(),
            JobKind::Video => VideoJob::input_schema(),
            JobKind::Echo => EchoJob::input_schema(),
        }
    }

    /// Every kind's name, for messages.
    pub fn names() -> String {
        Self::ALL
            .iter()
            .map(|k| k.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A job of any kind, parsed once: what the shim validated and the worker's
/// handlers take.
#[derive(Debug, Clone, PartialEq)]
pub enum Job {
    Chat(Box<ChatRespondJob>),
    Memory(MemoryCondenseJob),
    ChatStream(Box<ChatStreamJob>),
    Image(Box<ImageJob>),
    Video(Box<VideoJob>),
    Echo(EchoJob),
}

impl Job {
    /// Parses `input` as a job of `kind`.
    pub fn parse(kind: JobKind, input: &Value) -> Result<Self, InputError> {
        Ok(match kind {
            JobKind::Chat => Job::Chat(Box::new(ChatRespondJob::parse(input)?)),
            JobKind::Memory => Job::Memory(MemoryCondenseJob::parse(input)?),
            JobKind::ChatStream => Job::ChatStream(Box::new(ChatStreamJob::parse(input)?)),
            JobKind::Image => Job::Image(Box::new(ImageJob::parse(input)?)),
            JobKind::Video => Job::Video(Box::new(VideoJob::parse(input)?)),
            JobKind::Echo => Job::Echo(EchoJob::parse(input)?),
        })
    }

    pub fn kind(&self) -> JobKind {
        match self {
            Job::Chat(_) => JobKind::Chat,
            Job::Memory(_) => JobKind::Memory,
            Job::ChatStream(_) => JobKind::ChatStream,
            Job::Image(_) => JobKind::Image,
            Job::Video(_) => JobKind::Video,
            Job::Echo(_) => JobKind::Echo,
        }
    }
}
