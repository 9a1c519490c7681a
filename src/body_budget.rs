//! The bytes of request bodies read whole at once, bounded over the whole process.
//!
//! Estimated endpoints read their JSON body whole (up to `server.max_body_bytes` each). Without
//! a bound over all requests, twenty clients sending 30 MB each take 600 MB before any of them
//! is answered. Each body holds permits for its bytes (in KiB) while sluice holds the body; a
//! body that finds no room waits a moment for others to finish, then is refused with a 503
//! that tells the client to retry: the process never grows past the bound.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ProxyError;

/// Permits count KiB: the semaphore's counts are `u32` per acquisition.
const UNIT: usize = 1024;

/// How long a body waits for room before it is refused.
const WAIT_FOR_ROOM: Duration = Duration::from_secs(2);

/// The shared bound. Cloning shares it.
#[derive(Clone, Debug)]
pub struct BodyBudget {
    permits: Arc<Semaphore>,
    total: usize,
}

/// Room held for one body's bytes; given back when dropped.
#[derive(Debug)]
pub struct Held {
    _permit: Option<OwnedSemaphorePermit>,
}

impl BodyBudget {
    /// A bound of `bytes` (rounded up to whole KiB).
    pub fn new(bytes: usize) -> Self {
        let units = bytes.div_ceil(UNIT).min(Semaphore::MAX_PERMITS);
        Self {
            permits: Arc::new(Semaphore::new(units)),
            total: bytes,
        }
    }

    /// Reads `body` whole, at most `limit` bytes, holding room for what it read. `declared` is
    /// the request's Content-Length, when it gave one: its room is taken before reading.
    pub async fn read(
        &self,
        body: Body,
        declared: Option<u64>,
        limit: usize,
    ) -> Result<(Bytes, Held), ProxyError> {
        if declared.is_some_and(|length| length > limit as u64) {
            return Err(ProxyError::BodyTooLarge { limit });
        }
        let mut held: Option<OwnedSemaphorePermit> = None;
        let mut units_held = 0usize;
        if let Some(length) = declared {
            let units = (length as usize).div_ceil(UNIT);
            held = Some(self.take(units).await?);
            units_held = units;
        }
        let mut body = body;
        let mut buffer = BytesMut::with_capacity(declared.map_or(0, |length| length as usize));
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|err| ProxyError::BodyRead(err.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if buffer.len() + data.len() > limit {
                return Err(ProxyError::BodyTooLarge { limit });
            }
            buffer.extend_from_slice(&data);
            let units = buffer.len().div_ceil(UNIT);
            if units > units_held {
                let more = self.take(units - units_held).await?;
                match held.as_mut() {
                    Some(permit) => permit.merge(more),
                    None => held = Some(more),
                }
                units_held = units;
            }
        }
        Ok((buffer.freeze(), Held { _permit: held }))
    }

    async fn take(&self, units: usize) -> Result<OwnedSemaphorePermit, ProxyError> {
        let refused = || ProxyError::BodyBufferFull { limit: self.total };
        let units = u32::try_from(units).map_err(|_| refused())?;
        let permits = Arc::clone(&self.permits);
        match tokio::time::timeout(WAIT_FOR_ROOM, permits.acquire_many_owned(units)).await {
            Ok(Ok(permit)) => Ok(permit),
            // Timed out, or closed (never: the budget is never closed).
            _ => Err(refused()),
        }
    }

    /// Bytes' worth of room free now, for tests and status.
    pub fn available(&self) -> usize {
        self.permits.available_permits() * UNIT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bodies_beyond_the_bound_wait_then_are_refused_and_room_comes_back() {
        let budget = BodyBudget::new(64 * 1024);
        let (first, held) = budget
            .read(Body::from(vec![b'a'; 40 * 1024]), Some(40 * 1024), 1 << 20)
            .await
            .expect("fits");
        assert_eq!(first.len(), 40 * 1024);
        assert_eq!(budget.available(), 24 * 1024);
        // A declared 40 KiB does not fit next to it: refused after the wait.
        let refused = budget
            .read(Body::from(vec![b'b'; 40 * 1024]), Some(40 * 1024), 1 << 20)
            .await;
        assert!(matches!(refused, Err(ProxyError::BodyBufferFull { .. })));
        // A body of unknown length is charged as it arrives.
        let stream = futures_util::stream::iter(
            (0..3).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b'c'; 8 * 1024]))),
        );
        let (third, held_third) = budget
            .read(Body::from_stream(stream), None, 1 << 20)
            .await
            .expect("fits");
        assert_eq!(third.len(), 24 * 1024);
        assert_eq!(budget.available(), 0);
        drop(held);
        drop(held_third);
        assert_eq!(budget.available(), 64 * 1024);
    }

    #[tokio::test]
    async fn the_size_limit_still_applies() {
        let budget = BodyBudget::new(1 << 20);
        let too_big = budget
            .read(Body::from(vec![b'a'; 2048]), Some(2048), 1024)
            .await;
        assert!(matches!(
            too_big,
            Err(ProxyError::BodyTooLarge { limit: 1024 })
        ));
        let undeclared = budget.read(Body::from(vec![b'a'; 2048]), None, 1024).await;
        assert!(matches!(
            undeclared,
            Err(ProxyError::BodyTooLarge { limit: 1024 })
        ));
        assert_eq!(budget.available(), 1 << 20);
    }
}
