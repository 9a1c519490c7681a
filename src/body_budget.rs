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
use tokio::time::Instant;

use crate::config::MIN_BODY_RATE;
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
    ///
    /// `grace` bounds the wait for each piece of the body, and the whole body must arrive at
    /// [`MIN_BODY_RATE`] past it: a body dripped a byte a second is cut after `grace`, one of
    /// 32 MiB may take about eight minutes. An oversized body is still read (and discarded)
    /// for a moment after the refusal, so a client that writes it whole before reading sees
    /// the 413 instead of a broken pipe.
    pub async fn read(
        &self,
        body: Body,
        declared: Option<u64>,
        limit: usize,
        grace: Duration,
    ) -> Result<(Bytes, Held), ProxyError> {
        if declared.is_some_and(|length| length > limit as u64) {
            linger(body);
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
        let started = Instant::now();
        loop {
            let by_rate = started + grace + rate_allowance(buffer.len());
            let deadline = by_rate.min(Instant::now() + grace);
            let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(_) => return Err(ProxyError::BodyTimeout(grace)),
            };
            let frame = frame.map_err(|err| ProxyError::BodyRead(err.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if buffer.len() + data.len() > limit {
                linger(body);
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

/// How long `bytes` may take at [`MIN_BODY_RATE`].
fn rate_allowance(bytes: usize) -> Duration {
    Duration::from_secs_f64(bytes as f64 / MIN_BODY_RATE as f64)
}

/// How long, and how much, an oversized body is still read after its 413.
const LINGER_FOR: Duration = Duration::from_secs(5);
const LINGER_BYTES: usize = 64 * 1024 * 1024;

/// Reads and discards what the client still sends of a refused body, for a bounded time and
/// size, as nginx's lingering close does: closing at once would reset the connection under a
/// client still writing, and it would see a broken pipe instead of the answer.
fn linger(mut body: Body) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let mut read = 0usize;
        let _ = tokio::time::timeout(LINGER_FOR, async {
            while let Some(Ok(frame)) = body.frame().await {
                read += frame.data_ref().map_or(0, Bytes::len);
                if read > LINGER_BYTES {
                    break;
                }
            }
        })
        .await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn bodies_beyond_the_bound_wait_then_are_refused_and_room_comes_back() {
        let budget = BodyBudget::new(64 * 1024);
        let (first, held) = budget
            .read(
                Body::from(vec![b'a'; 40 * 1024]),
                Some(40 * 1024),
                1 << 20,
                SECOND,
            )
            .await
            .expect("fits");
        assert_eq!(first.len(), 40 * 1024);
        assert_eq!(budget.available(), 24 * 1024);
        // A declared 40 KiB does not fit next to it: refused after the wait.
        let refused = budget
            .read(
                Body::from(vec![b'b'; 40 * 1024]),
                Some(40 * 1024),
                1 << 20,
                SECOND,
            )
            .await;
        assert!(matches!(refused, Err(ProxyError::BodyBufferFull { .. })));
        // A body of unknown length is charged as it arrives.
        let stream = futures_util::stream::iter(
            (0..3).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b'c'; 8 * 1024]))),
        );
        let (third, held_third) = budget
            .read(Body::from_stream(stream), None, 1 << 20, SECOND)
            .await
            .expect("fits");
        assert_eq!(third.len(), 24 * 1024);
        assert_eq!(budget.available(), 0);
        drop(held);
        drop(held_third);
        assert_eq!(budget.available(), 64 * 1024);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dripped_body_is_cut_after_the_grace_and_a_steady_one_is_not() {
        let budget = BodyBudget::new(1 << 20);
        let drip = |pieces: usize, every: Duration, size: usize| {
            Body::from_stream(futures_util::stream::unfold(0, move |sent| async move {
                if sent == pieces {
                    return None;
                }
                tokio::time::sleep(every).await;
                Some((
                    Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; size])),
                    sent + 1,
                ))
            }))
        };
        // A byte every half second: each piece within the grace, the whole far below the rate.
        let dripped = budget
            .read(drip(100, SECOND / 2, 1), None, 1 << 20, SECOND * 5)
            .await;
        assert!(matches!(dripped, Err(ProxyError::BodyTimeout(_))));
        // 640 KiB in ten 64 KiB pieces a second apart: at the rate, never past it.
        let steady = budget
            .read(drip(10, SECOND, 64 * 1024), None, 1 << 20, SECOND * 5)
            .await;
        assert_eq!(steady.expect("steady body").0.len(), 640 * 1024);
        // A silence longer than the grace cuts even a fast body.
        let stalled = budget
            .read(drip(2, SECOND * 6, 10), None, 1 << 20, SECOND * 5)
            .await;
        assert!(matches!(stalled, Err(ProxyError::BodyTimeout(_))));
        assert_eq!(budget.available(), 1 << 20);
    }

    #[tokio::test]
    async fn the_size_limit_still_applies() {
        let budget = BodyBudget::new(1 << 20);
        let too_big = budget
            .read(Body::from(vec![b'a'; 2048]), Some(2048), 1024, SECOND)
            .await;
        assert!(matches!(
            too_big,
            Err(ProxyError::BodyTooLarge { limit: 1024 })
        ));
        let undeclared = budget
            .read(Body::from(vec![b'a'; 2048]), None, 1024, SECOND)
            .await;
        assert!(matches!(
            undeclared,
            Err(ProxyError::BodyTooLarge { limit: 1024 })
        ));
        assert_eq!(budget.available(), 1 << 20);
    }
}
