use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::alerts::AlertEngine;
use crate::host::{HostMonitor, HostSource};

/// The one host sampler: reads `source` every `interval` (on a blocking
/// thread), records the sample, advances the alert rules and sends their
/// notifications. Returns when `stop` changes, after in-flight
/// notifications finish (each has its own 5 s deadline).
pub async fn run_sampler(
    monitor: Arc<HostMonitor>,
    alerts: Arc<AlertEngine>,
    source: Box<dyn HostSource>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut source = Some(source);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut deliveries = JoinSet::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        let Some(mut src) = source.take() else { break };
        let Ok((src, sample)) = tokio::task::spawn_blocking(move || {
            let sample = src.sample();
            (src, sample)
        })
        .await
        else {
            tracing::error!("host sampler thread panicked; host health stops updating");
            break;
        };
        source = Some(src);
        let now = sample.taken_at_ms;
        let sample = monitor.record(sample);
        for note in alerts.observe(&sample, now) {
            let alerts = alerts.clone();
            deliveries.spawn(async move { alerts.deliver(note).await });
        }
        while deliveries.try_join_next().is_some() {}
    }
    while deliveries.join_next().await.is_some() {}
}
