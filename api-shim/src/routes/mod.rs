//! HTTP handlers, one module per concern.

pub mod health;
pub mod images;
pub mod jobs;
pub mod memory;
pub mod openapi;
pub mod stream;
