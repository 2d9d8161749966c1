//! Bytes and requests per (user, sandbox), counted as they flow, flushed to
//! the store periodically; totals (never per-user labels) as metrics.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use polydev_domain::UserId;
use polydev_store::{now_ms, Store, UsageDelta};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::limits::Bandwidth;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// Egress totals (no per-user labels: per-user figures go to the store).
#[derive(Debug, Clone, Default)]
pub struct EgressMetrics {
    pub bytes: Family<DirectionLabels, Counter>,
    pub tunnels_active: Gauge,
    pub tunnels: Counter,
    pub requests: Counter,
    pub denied: Family<ReasonLabels, Counter>,
}

/// Why a request was refused, as a metric label.
pub const DENY_REASONS: [&str; 8] = [
    "auth",
    "policy",
    "private_address",
    "host_address",
    "rate_limited",
    "tunnel_limit",
    "bad_request",
    "upstream",
];

impl EgressMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        for direction in ["up", "down"] {
            let _ = m.bytes.get_or_create(&DirectionLabels { direction });
        }
        for reason in DENY_REASONS {
            let _ = m.denied.get_or_create(&ReasonLabels { reason });
        }
        registry.register_with_unit(
            "polydev_egress",
            "Bytes through the egress proxy, by direction (up/down)",
            Unit::Bytes,
            m.bytes.clone(),
        );
        registry.register(
            "polydev_egress_tunnels_active",
            "Open egress tunnels",
            m.tunnels_active.clone(),
        );
        registry.register(
            "polydev_egress_tunnels",
            "Egress tunnels opened",
            m.tunnels.clone(),
        );
        registry.register(
            "polydev_egress_requests",
            "Plain-HTTP requests forwarded by the egress proxy",
            m.requests.clone(),
        );
        registry.register(
            "polydev_egress_denied",
            "Egress requests refused, by reason",
            m.denied.clone(),
        );
        m
    }

    pub(crate) fn deny(&self, reason: &'static str) {
        self.denied.get_or_create(&ReasonLabels { reason }).inc();
    }
}

/// Running counters of one (user, sandbox).
#[derive(Debug, Default)]
pub(crate) struct UsageCell {
    up: AtomicI64,
    down: AtomicI64,
    requests: AtomicI64,
    tunnels: AtomicI64,
}

impl UsageCell {
    pub(crate) fn add_up(&self, n: usize) {
        self.up.fetch_add(n as i64, Ordering::Relaxed);
    }
    pub(crate) fn add_down(&self, n: usize) {
        self.down.fetch_add(n as i64, Ordering::Relaxed);
    }
    pub(crate) fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn tunnel(&self) {
        self.tunnels.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
pub(crate) struct Accounting {
    cells: Mutex<HashMap<(UserId, String), Arc<UsageCell>>>,
    metrics: EgressMetrics,
}

impl Accounting {
    pub(crate) fn new(metrics: EgressMetrics) -> Self {
        Self {
            cells: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    pub(crate) fn metrics(&self) -> &EgressMetrics {
        &self.metrics
    }

    pub(crate) fn cell(&self, user: UserId, sandbox: &str) -> Arc<UsageCell> {
        match self.cells.lock() {
            Ok(mut cells) => cells.entry((user, sandbox.to_owned())).or_default().clone(),
            Err(_) => Arc::default(),
        }
    }

    /// Writes what accumulated since the last flush. On a store error the
    /// deltas are put back, so nothing is lost.
    pub(crate) async fn flush(&self, store: &Store) {
        let mut deltas = Vec::new();
        if let Ok(mut cells) = self.cells.lock() {
            for ((user, sandbox), cell) in cells.iter() {
                let d = UsageDelta {
                    user_id: *user,
                    sandbox_id: sandbox.clone(),
                    bytes_up: cell.up.swap(0, Ordering::Relaxed),
                    bytes_down: cell.down.swap(0, Ordering::Relaxed),
                    requests: cell.requests.swap(0, Ordering::Relaxed),
                    tunnels: cell.tunnels.swap(0, Ordering::Relaxed),
                };
                if d.bytes_up != 0 || d.bytes_down != 0 || d.requests != 0 || d.tunnels != 0 {
                    deltas.push((d, cell.clone()));
                }
            }
            // Cells nobody holds and that are now empty can go.
            cells.retain(|_, c| Arc::strong_count(c) > 1);
        }
        if deltas.is_empty() {
            return;
        }
        let rows: Vec<UsageDelta> = deltas.iter().map(|(d, _)| d.clone()).collect();
        if let Err(e) = store.add_egress_usage(&rows, now_ms()).await {
            tracing::warn!(error = %e, "could not record egress usage; will retry");
            if let Ok(mut cells) = self.cells.lock() {
                for (d, cell) in deltas {
                    let cell = cells
                        .entry((d.user_id, d.sandbox_id.clone()))
                        .or_insert(cell);
                    cell.up.fetch_add(d.bytes_up, Ordering::Relaxed);
                    cell.down.fetch_add(d.bytes_down, Ordering::Relaxed);
                    cell.requests.fetch_add(d.requests, Ordering::Relaxed);
                    cell.tunnels.fetch_add(d.tunnels, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Counts a connection's bytes into its usage cell and the metrics, notes
/// activity for the idle timeout, and applies the user's bandwidth. Shared
/// by the hyper path (`Metered`) and the splice path (`raw.rs`).
pub(crate) struct Meter {
    cell: Arc<UsageCell>,
    up: Counter,
    down: Counter,
    bandwidth: Option<Arc<Bandwidth>>,
    pub(crate) activity: Arc<Activity>,
}

impl Meter {
    pub(crate) fn new(
        cell: Arc<UsageCell>,
        metrics: &EgressMetrics,
        bandwidth: Option<Arc<Bandwidth>>,
    ) -> Self {
        let counter = |direction| {
            metrics
                .bytes
                .get_or_create(&DirectionLabels { direction })
                .clone()
        };
        Self {
            cell,
            up: counter("up"),
            down: counter("down"),
            bandwidth,
            activity: Activity::new(),
        }
    }

    /// Counts `n` bytes (`up`: towards the destination); returns how long
    /// to wait before moving more.
    pub(crate) fn count(&self, n: usize, up: bool) -> Duration {
        if up {
            self.cell.add_up(n);
            self.up.inc_by(n as u64);
        } else {
            self.cell.add_down(n);
            self.down.inc_by(n as u64);
        }
        self.activity.touch_now();
        self.bandwidth
            .as_ref()
            .map(|bw| bw.take(n))
            .unwrap_or_default()
    }

    /// `count`, then waits out the bandwidth delay.
    pub(crate) async fn moved(&self, n: usize, up: bool) {
        let wait = self.count(n, up);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// The destination side of a connection on the hyper path, metered.
pub(crate) struct Metered<S> {
    inner: S,
    pub(crate) meter: Meter,
    delay: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// Last time bytes moved, as ms since `start`.
#[derive(Debug)]
pub(crate) struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        })
    }
    pub(crate) fn touch_now(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    pub(crate) fn idle_for(&self) -> std::time::Duration {
        let now = self.start.elapsed().as_millis() as u64;
        std::time::Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

impl<S> Metered<S> {
    pub(crate) fn new(inner: S, meter: Meter) -> Self {
        Self {
            inner,
            meter,
            delay: None,
        }
    }

    /// Waits out a pending bandwidth delay.
    fn poll_delay(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(d) = self.delay.as_mut() {
            ready!(d.as_mut().poll(cx));
            self.delay = None;
        }
        Poll::Ready(())
    }

    fn moved(&mut self, n: usize, up: bool) {
        let wait = self.meter.count(n, up);
        if !wait.is_zero() {
            self.delay = Some(Box::pin(tokio::time::sleep(wait)));
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        ready!(self.poll_delay(cx));
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let n = buf.filled().len() - before;
        if n > 0 {
            self.moved(n, false);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        ready!(self.poll_delay(cx));
        let n = ready!(Pin::new(&mut self.inner).poll_write(cx, data))?;
        if n > 0 {
            self.moved(n, true);
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
