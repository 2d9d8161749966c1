//! Waiting with a deadline, never with a fixed sleep.

use std::time::{Duration, Instant};

/// Polls `check` (every 50 ms) until it gives `Some`, for at most
/// `within`; then panics naming `what`. The one way tests wait for
/// something to become true.
///
/// # Panics
/// When `check` gave nothing within `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    eventually_every(Duration::from_millis(50), within, what, check).await
}

/// [`eventually`], polling every `interval` (for checks that cost
/// something, such as a request that starts work).
///
/// # Panics
/// When `check` gave nothing within `within`.
pub async fn eventually_every<T, F, Fut>(
    interval: Duration,
    within: Duration,
    what: &str,
    mut check: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {within:?}"
        );
        tokio::time::sleep(interval).await;
    }
}

/// [`eventually`] for code outside an async runtime (a constructor, a
/// child process's exit).
///
/// # Panics
/// When `check` gave nothing within `within`.
pub fn eventually_blocking<T>(
    within: Duration,
    what: &str,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
