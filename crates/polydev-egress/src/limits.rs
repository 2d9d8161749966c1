//! Per-user limits: open tunnels, new requests per second, bandwidth.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use polydev_domain::UserId;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A token bucket of bytes per second (burst: one second's worth).
#[derive(Debug)]
pub struct Bandwidth {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bandwidth {
    pub fn new(bytes_per_sec: u64) -> Self {
        let rate = bytes_per_sec as f64;
        Self {
            rate,
            state: Mutex::new((rate, Instant::now())),
        }
    }

    /// Takes `n` bytes; returns how long to wait before moving more.
    pub fn take(&self, n: usize) -> Duration {
        let Ok(mut s) = self.state.lock() else {
            return Duration::ZERO;
        };
        let now = Instant::now();
        let refill = now.duration_since(s.1).as_secs_f64() * self.rate;
        s.0 = (s.0 + refill).min(self.rate) - n as f64;
        s.1 = now;
        if s.0 >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-s.0 / self.rate)
        }
    }
}

#[derive(Debug)]
pub(crate) struct Limits {
    max_tunnels: u32,
    tunnels: Mutex<HashMap<UserId, Arc<Semaphore>>>,
    requests: DefaultKeyedRateLimiter<UserId>,
    bandwidth_per_user: u64,
    bandwidth: Mutex<HashMap<UserId, Arc<Bandwidth>>>,
}

impl Limits {
    pub(crate) fn new(max_tunnels: u32, requests_per_sec: u32, bandwidth_per_user: u64) -> Self {
        let rps = NonZeroU32::new(requests_per_sec.max(1)).unwrap_or(NonZeroU32::MIN);
        Self {
            max_tunnels: max_tunnels.max(1),
            tunnels: Mutex::new(HashMap::new()),
            requests: RateLimiter::keyed(Quota::per_second(rps)),
            bandwidth_per_user,
            bandwidth: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a new request or tunnel; false when over the rate.
    pub(crate) fn admit_request(&self, user: UserId) -> bool {
        self.requests.check_key(&user).is_ok()
    }

    /// A slot for one more open tunnel, or `None` at the limit.
    pub(crate) fn open_tunnel(&self, user: UserId) -> Option<OwnedSemaphorePermit> {
        let sem = self
            .tunnels
            .lock()
            .ok()?
            .entry(user)
            .or_insert_with(|| Arc::new(Semaphore::new(self.max_tunnels as usize)))
            .clone();
        sem.try_acquire_owned().ok()
    }

    pub(crate) fn bandwidth(&self, user: UserId) -> Option<Arc<Bandwidth>> {
        if self.bandwidth_per_user == 0 {
            return None;
        }
        let mut map = self.bandwidth.lock().ok()?;
        Some(
            map.entry(user)
                .or_insert_with(|| Arc::new(Bandwidth::new(self.bandwidth_per_user)))
                .clone(),
        )
    }

    /// Forgets idle users (bounds memory).
    pub(crate) fn sweep(&self) {
        self.requests.retain_recent();
        if let Ok(mut t) = self.tunnels.lock() {
            let max = self.max_tunnels as usize;
            t.retain(|_, s| s.available_permits() < max);
        }
        if let Ok(mut b) = self.bandwidth.lock() {
            b.retain(|_, bw| Arc::strong_count(bw) > 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnels_are_capped_per_user() {
        let limits = Limits::new(2, 100, 0);
        let (a, b) = (UserId::new(), UserId::new());
        let p1 = limits.open_tunnel(a).unwrap();
        let _p2 = limits.open_tunnel(a).unwrap();
        assert!(limits.open_tunnel(a).is_none());
        assert!(
            limits.open_tunnel(b).is_some(),
            "another user is unaffected"
        );
        drop(p1);
        assert!(limits.open_tunnel(a).is_some());
    }

    #[test]
    fn bandwidth_makes_callers_wait_once_the_burst_is_spent() {
        let bw = Bandwidth::new(1000);
        assert_eq!(bw.take(1000), Duration::ZERO);
        let wait = bw.take(500);
        assert!(
            wait >= Duration::from_millis(450) && wait <= Duration::from_millis(510),
            "{wait:?}"
        );
    }
}
