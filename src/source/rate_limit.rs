//! The API client's request rate limit (`--kube-api-qps`, `--kube-api-burst`,
//! `clientConnection.qps` / `burst`): a token bucket in front of every request, as client-go's
//! default limiter. kproxy sends few requests (a list and a watch per kind, and their restarts),
//! so the limit matters when the API server is unhealthy and watches restart in a loop: then it
//! keeps thousands of nodes from hammering it at once.
//!
//! The bucket is pure (it takes the time as input); the tower layer around the client reads the
//! clock and sleeps.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

/// A token bucket: up to `burst` requests at once, then `qps` per second.
#[derive(Debug, Clone)]
pub struct Bucket {
    qps: f64,
    burst: f64,
    /// Tokens left; negative when requests have reserved future tokens.
    tokens: f64,
    last: Option<Instant>,
}

impl Bucket {
    /// A full bucket. `qps <= 0` means no limit; a burst of 0 allows one request at a time.
    pub fn new(qps: f32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Bucket {
            qps: f64::from(qps),
            burst,
            tokens: burst,
            last: None,
        }
    }

    /// Takes a token for a request made at `now`; returns how long the request must wait.
    pub fn reserve(&mut self, now: Instant) -> Duration {
        if self.qps <= 0.0 {
            return Duration::ZERO;
        }
        if let Some(last) = self.last {
            let elapsed = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.qps).min(self.burst);
        }
        self.last = Some(now);
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.qps)
        }
    }
}

/// The tower layer that puts a [`Bucket`] in front of a service.
#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    bucket: Arc<Mutex<Bucket>>,
}

impl RateLimitLayer {
    /// A layer allowing `burst` requests at once, then `qps` per second.
    pub fn new(qps: f32, burst: u32) -> Self {
        RateLimitLayer {
            bucket: Arc::new(Mutex::new(Bucket::new(qps, burst))),
        }
    }
}

impl<S> tower::Layer<S> for RateLimitLayer {
    type Service = RateLimited<S>;
    fn layer(&self, inner: S) -> RateLimited<S> {
        RateLimited {
            inner,
            bucket: self.bucket.clone(),
        }
    }
}

/// A service whose requests wait for a token first.
#[derive(Debug, Clone)]
pub struct RateLimited<S> {
    inner: S,
    bucket: Arc<Mutex<Bucket>>,
}

impl<S, Req> tower::Service<Req> for RateLimited<S>
where
    S: tower::Service<Req>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let wait = {
            // A poisoned lock only means a panic elsewhere; the bucket is plain numbers.
            let mut bucket = self
                .bucket
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            bucket.reserve(Instant::now())
        };
        // The request is not sent before its future is polled, which is after the wait.
        let response = self.inner.call(req);
        Box::pin(async move {
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            response.await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_qps() {
        let t0 = Instant::now();
        let mut b = Bucket::new(5.0, 10);
        for _ in 0..10 {
            assert_eq!(b.reserve(t0), Duration::ZERO);
        }
        // The 11th waits one token's time (1/5 s), the 12th two.
        assert_eq!(b.reserve(t0), Duration::from_millis(200));
        assert_eq!(b.reserve(t0), Duration::from_millis(400));
        // A second later, five tokens have come back: the two owed and three more.
        let t1 = t0 + Duration::from_secs(1);
        for _ in 0..3 {
            assert_eq!(b.reserve(t1), Duration::ZERO);
        }
        assert!(b.reserve(t1) > Duration::ZERO);
        // Never more than the burst, however long idle.
        let t2 = t1 + Duration::from_secs(3600);
        let free = (0..20).take_while(|_| b.reserve(t2).is_zero()).count();
        assert_eq!(free, 10);
    }

    #[test]
    fn no_limit_when_qps_is_not_positive() {
        let t0 = Instant::now();
        let mut b = Bucket::new(-1.0, 0);
        for _ in 0..1000 {
            assert_eq!(b.reserve(t0), Duration::ZERO);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_layer_delays_requests_beyond_the_burst() {
        use tower::{Layer, Service, ServiceExt};
        let calls = Arc::new(Mutex::new(Vec::new()));
        let seen = calls.clone();
        let inner = tower::service_fn(move |_: ()| {
            let seen = seen.clone();
            async move {
                seen.lock().expect("lock").push(Instant::now());
                Ok::<_, std::convert::Infallible>(())
            }
        });
        let mut svc = RateLimitLayer::new(2.0, 2).layer(inner);
        let start = Instant::now();
        for _ in 0..4 {
            svc.ready()
                .await
                .expect("ready")
                .call(())
                .await
                .expect("call");
        }
        let at: Vec<u128> = calls
            .lock()
            .expect("lock")
            .iter()
            .map(|t| (*t - start).as_millis())
            .collect();
        assert_eq!(at, vec![0, 0, 500, 1000]);
    }
}
