//! HTTP handlers, one module per concern.

pub mod cog;
pub mod health;
pub mod images;
pub mod jobs;
pub mod memory;
pub mod openai;
pub mod openapi;
pub mod stream;
