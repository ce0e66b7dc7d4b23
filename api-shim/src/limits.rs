//! Per-key limits: a request rate (token bucket, `429` with `Retry-After`
//! and the JSON error body) and a cap on the streams a key holds open at
//! once (SSE and chunked chat), each of which also has a maximum duration.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::HashMapStateStore;
use governor::{Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;

type KeyedLimiter = RateLimiter<usize, HashMapStateStore<usize>, DefaultClock>;

pub struct Limits {
    rate: Option<KeyedLimiter>,
    clock: DefaultClock,
    streams_per_key: usize,
    streams: Mutex<HashMap<usize, Arc<Semaphore>>>,
    /// How long one stream may stay open.
    pub stream_max: Duration,
}

impl Limits {
    /// `per_second` requests a key may make on average (0: no limit), in
    /// bursts of up to `burst`; `streams_per_key` streams open at once.
    pub fn new(per_second: u32, burst: u32, streams_per_key: usize, stream_max: Duration) -> Self {
        let rate = NonZeroU32::new(per_second).map(|rate| {
            let burst = NonZeroU32::new(burst.max(per_second)).expect("not zero");
            RateLimiter::hashmap(Quota::per_second(rate).allow_burst(burst))
        });
        Self {
            rate,
            clock: DefaultClock::default(),
            streams_per_key: streams_per_key.max(1),
            streams: Mutex::default(),
            stream_max,
        }
    }

    /// One request of key `key`: refused with 429 and the wait when the
    /// key is over its rate.
    pub fn check_rate(&self, key: usize) -> Result<(), ApiError> {
        let Some(limiter) = &self.rate else {
            return Ok(());
        };
        limiter.check_key(&key).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            let secs = wait.as_secs_f64().ceil().max(1.0) as u32;
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!("rate limit: this API key makes too many requests; retry in {secs} s (RATE_LIMIT_PER_S)"),
            );
            e.retry_after = Some(secs);
            e
        })
    }

    /// A stream slot of key `key`, held while the stream is open; 429 when
    /// the key already holds as many as it may.
    pub fn open_stream(&self, key: usize) -> Result<OwnedSemaphorePermit, ApiError> {
        let slots = self
            .streams
            .lock()
            .expect("not poisoned")
            .entry(key)
            .or_insert_with(|| Arc::new(Semaphore::new(self.streams_per_key)))
            .clone();
        slots.try_acquire_owned().map_err(|_| {
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "this API key already holds {} open streams, the most it may (MAX_STREAMS_PER_KEY)",
                    self.streams_per_key
                ),
            );
            e.retry_after = Some(1);
            e
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_over_its_rate_is_told_when_to_retry_and_other_keys_are_not_touched() {
        let limits = Limits::new(1, 3, 2, Duration::from_secs(60));
        for _ in 0..3 {
            limits.check_rate(0).unwrap();
        }
        let e = limits.check_rate(0).unwrap_err();
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(e.retry_after, Some(1));
        limits.check_rate(1).unwrap();
        let unlimited = Limits::new(0, 0, 1, Duration::from_secs(1));
        for _ in 0..1000 {
            unlimited.check_rate(0).unwrap();
        }
    }

    #[test]
    fn streams_are_capped_per_key_and_freed_when_closed() {
        let limits = Limits::new(0, 0, 2, Duration::from_secs(60));
        let a = limits.open_stream(7).unwrap();
        let _b = limits.open_stream(7).unwrap();
        assert!(limits.open_stream(7).is_err());
        let _other = limits.open_stream(8).unwrap();
        drop(a);
        let _reopened = limits.open_stream(7).unwrap();
    }
}
