//! Alerts: threshold rules over host health and over counted events
//! (sandbox boot failures, deploy failures), each a small state machine
//! `ok → pending → firing → ok`, notified to a webhook in a body that
//! Slack (`text`) and Discord (`content`) both accept, with a cooldown
//! between firing notifications and one resolve message.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Deserialize;

use crate::host::HostSample;

/// What a rule watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertMetric {
    /// CPU usage, percent.
    Cpu,
    /// Memory used, percent.
    Memory,
    /// The fullest disk, percent.
    Disk,
    /// Sandboxes that failed to boot within `for_secs`.
    SandboxBootFailures,
    /// Failed deployments within `for_secs`.
    DeployFailures,
}

impl AlertMetric {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Memory => "memory",
            Self::Disk => "disk",
            Self::SandboxBootFailures => "sandbox_boot_failures",
            Self::DeployFailures => "deploy_failures",
        }
    }

    fn is_event(&self) -> bool {
        matches!(self, Self::SandboxBootFailures | Self::DeployFailures)
    }
}

/// One rule: fires when the value stays above `above` for `for_secs`
/// (host metrics), or when more than `above` events happened in the last
/// `for_secs` (event metrics).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertRule {
    pub name: String,
    pub metric: AlertMetric,
    pub above: f64,
    #[serde(default)]
    pub for_secs: u64,
}

/// The `[alerts]` config section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// Slack- or Discord-compatible incoming webhook; none means alerts are
    /// only visible in the API and metrics.
    pub webhook_url: Option<String>,
    /// Least time between two firing notifications of one rule.
    #[serde(default = "default_cooldown")]
    pub cooldown_secs: u64,
    /// Replaces the default rules when given.
    pub rules: Option<Vec<AlertRule>>,
}

fn default_cooldown() -> u64 {
    600
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            webhook_url: None,
            cooldown_secs: default_cooldown(),
            rules: None,
        }
    }
}

impl AlertsConfig {
    /// CPU, memory, disk above 90 % for a minute; 3+ boot failures in
    /// 5 minutes; any failed deploy in the last hour.
    pub fn default_rules() -> Vec<AlertRule> {
        let rule = |name: &str, metric, above, for_secs| AlertRule {
            name: name.to_owned(),
            metric,
            above,
            for_secs,
        };
        vec![
            rule("cpu_high", AlertMetric::Cpu, 90.0, 60),
            rule("memory_high", AlertMetric::Memory, 90.0, 60),
            rule("disk_high", AlertMetric::Disk, 90.0, 60),
            rule(
                "sandbox_boot_failures",
                AlertMetric::SandboxBootFailures,
                2.0,
                300,
            ),
            rule("deploy_failed", AlertMetric::DeployFailures, 0.0, 3600),
        ]
    }
}

/// Where a rule stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertState {
    Ok,
    Pending { since_ms: i64 },
    Firing { since_ms: i64 },
}

impl AlertState {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Pending { .. } => "pending",
            Self::Firing { .. } => "firing",
        }
    }

    pub fn since_ms(&self) -> Option<i64> {
        match self {
            Self::Ok => None,
            Self::Pending { since_ms } | Self::Firing { since_ms } => Some(*since_ms),
        }
    }
}

/// A rule's state, as the API shows it.
#[derive(Debug, Clone)]
pub struct AlertStatus {
    pub rule: AlertRule,
    pub state: AlertState,
    pub value: f64,
    pub last_notified_ms: Option<i64>,
}

/// A message to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    pub rule: String,
    pub firing: bool,
    pub text: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    rule: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Debug)]
struct RuleState {
    status: AlertStatus,
    notified_firing: bool,
}

/// Evaluates rules and delivers notifications.
#[derive(Debug)]
pub struct AlertEngine {
    rules: Mutex<Vec<RuleState>>,
    events: Mutex<VecDeque<(AlertMetric, i64)>>,
    cooldown_ms: i64,
    webhook_url: Option<String>,
    host: String,
    client: reqwest::Client,
    firing: Family<RuleLabels, Gauge>,
    notifications: Family<OutcomeLabels, Counter>,
}

/// Oldest event kept, whatever the rules say (bounds memory).
const EVENT_HORIZON_MS: i64 = 24 * 3600 * 1000;
const MAX_EVENTS: usize = 10_000;

impl AlertEngine {
    pub fn new(config: &AlertsConfig, registry: &mut Registry) -> Self {
        let rules = config
            .rules
            .clone()
            .unwrap_or_else(AlertsConfig::default_rules)
            .into_iter()
            .map(|rule| RuleState {
                status: AlertStatus {
                    rule,
                    state: AlertState::Ok,
                    value: 0.0,
                    last_notified_ms: None,
                },
                notified_firing: false,
            })
            .collect::<Vec<RuleState>>();
        let firing = Family::<RuleLabels, Gauge>::default();
        let notifications = Family::<OutcomeLabels, Counter>::default();
        for rs in &rules {
            let _ = firing.get_or_create(&RuleLabels {
                rule: rs.status.rule.name.clone(),
            });
        }
        for outcome in ["ok", "error"] {
            let _ = notifications.get_or_create(&OutcomeLabels {
                outcome: outcome.to_owned(),
            });
        }
        registry.register(
            "polydev_alerts_firing",
            "1 while an alert rule is firing",
            firing.clone(),
        );
        registry.register(
            "polydev_alert_notifications",
            "Webhook notifications sent, by outcome (ok/error)",
            notifications.clone(),
        );
        Self {
            rules: Mutex::new(rules),
            events: Mutex::new(VecDeque::new()),
            cooldown_ms: i64::try_from(config.cooldown_secs.saturating_mul(1000))
                .unwrap_or(i64::MAX),
            webhook_url: config.webhook_url.clone(),
            host: sysinfo::System::host_name().unwrap_or_else(|_| "polydev".to_owned()),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap_or_default(),
            firing,
            notifications,
        }
    }

    /// Counts one event (a failed sandbox boot, a failed deploy).
    pub fn record_event(&self, metric: AlertMetric, at_ms: i64) {
        if let Ok(mut events) = self.events.lock() {
            events.push_back((metric, at_ms));
            while events.len() > MAX_EVENTS
                || events
                    .front()
                    .is_some_and(|(_, t)| at_ms - t > EVENT_HORIZON_MS)
            {
                events.pop_front();
            }
        }
    }

    fn value(
        &self,
        metric: AlertMetric,
        window_secs: u64,
        sample: &HostSample,
        now_ms: i64,
    ) -> f64 {
        match metric {
            AlertMetric::Cpu => sample.cpu.usage_percent,
            AlertMetric::Memory => sample.memory.percent,
            AlertMetric::Disk => sample.disk_percent(),
            event => {
                let window = i64::try_from(window_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
                self.events
                    .lock()
                    .map(|e| {
                        e.iter()
                            .filter(|(m, t)| *m == event && now_ms - t <= window)
                            .count()
                    })
                    .unwrap_or(0) as f64
            }
        }
    }

    /// Advances every rule with a new sample; returns what to notify.
    pub fn observe(&self, sample: &HostSample, now_ms: i64) -> Vec<Notification> {
        let Ok(mut rules) = self.rules.lock() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for rs in rules.iter_mut() {
            let rule = rs.status.rule.clone();
            let value = self.value(rule.metric, rule.for_secs, sample, now_ms);
            rs.status.value = value;
            let breach = value > rule.above;
            let held_ms = i64::try_from(rule.for_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
            let next = match (rs.status.state, breach) {
                (AlertState::Ok, true) if rule.metric.is_event() || held_ms == 0 => {
                    AlertState::Firing { since_ms: now_ms }
                }
                (AlertState::Ok, true) => AlertState::Pending { since_ms: now_ms },
                (AlertState::Pending { since_ms }, true) if now_ms - since_ms >= held_ms => {
                    AlertState::Firing { since_ms }
                }
                (state, true) => state,
                (_, false) => AlertState::Ok,
            };
            let was_firing = matches!(rs.status.state, AlertState::Firing { .. });
            rs.status.state = next;
            match next {
                AlertState::Firing { .. } if !rs.notified_firing => {
                    let cooled = rs
                        .status
                        .last_notified_ms
                        .is_none_or(|t| now_ms - t >= self.cooldown_ms);
                    if cooled {
                        rs.notified_firing = true;
                        rs.status.last_notified_ms = Some(now_ms);
                        out.push(Notification {
                            rule: rule.name.clone(),
                            firing: true,
                            text: self.firing_text(&rule, value),
                        });
                    }
                }
                AlertState::Ok if was_firing && rs.notified_firing => {
                    rs.notified_firing = false;
                    out.push(Notification {
                        rule: rule.name.clone(),
                        firing: false,
                        text: format!(
                            "[polydev] RESOLVED {} on {}: {} is {} now",
                            rule.name,
                            self.host,
                            rule.metric.as_str(),
                            show(rule.metric, value)
                        ),
                    });
                }
                _ => {}
            }
            let firing = matches!(next, AlertState::Firing { .. });
            self.firing
                .get_or_create(&RuleLabels {
                    rule: rule.name.clone(),
                })
                .set(i64::from(firing));
        }
        out
    }

    fn firing_text(&self, rule: &AlertRule, value: f64) -> String {
        if rule.metric.is_event() {
            format!(
                "[polydev] FIRING {} on {}: {} {} in the last {} s (more than {})",
                rule.name,
                self.host,
                value,
                rule.metric.as_str().replace('_', " "),
                rule.for_secs,
                rule.above
            )
        } else {
            format!(
                "[polydev] FIRING {} on {}: {} at {} (above {}% for {} s)",
                rule.name,
                self.host,
                rule.metric.as_str(),
                show(rule.metric, value),
                rule.above,
                rule.for_secs
            )
        }
    }

    /// Every rule's state.
    pub fn snapshot(&self) -> Vec<AlertStatus> {
        self.rules
            .lock()
            .map(|r| r.iter().map(|s| s.status.clone()).collect())
            .unwrap_or_default()
    }

    /// Posts a notification to the webhook (5 s deadline); failures are
    /// logged and counted, never retried in a loop.
    pub async fn deliver(&self, note: Notification) {
        let Some(url) = &self.webhook_url else {
            tracing::info!(rule = %note.rule, firing = note.firing, "{}", note.text);
            return;
        };
        let body = serde_json::json!({
            "text": note.text,
            "content": note.text,
            "username": "polydev",
            "alert": {"rule": note.rule, "state": if note.firing { "firing" } else { "resolved" }},
        });
        let outcome = match self.client.post(url).json(&body).send().await {
            Ok(r) if r.status().is_success() => "ok",
            Ok(r) => {
                tracing::warn!(rule = %note.rule, status = r.status().as_u16(), "alert webhook refused the notification");
                "error"
            }
            Err(e) => {
                tracing::warn!(rule = %note.rule, error = %e, "alert webhook unreachable");
                "error"
            }
        };
        self.notifications
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_owned(),
            })
            .inc();
    }
}

fn show(metric: AlertMetric, value: f64) -> String {
    if metric.is_event() {
        format!("{value}")
    } else {
        format!("{value:.1}%")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::{CpuSample, MemorySample, NetworkSample};

    fn sample(cpu: f64) -> HostSample {
        HostSample {
            taken_at_ms: 0,
            cpu: CpuSample {
                usage_percent: cpu,
                cores: 2,
                model: "test".into(),
            },
            memory: MemorySample {
                total_bytes: 100,
                used_bytes: 10,
                free_bytes: 90,
                percent: 10.0,
            },
            disks: Vec::new(),
            network: NetworkSample {
                status: "up",
                interfaces: Vec::new(),
                rx_bytes_per_sec: 0.0,
                tx_bytes_per_sec: 0.0,
            },
            temperature: None,
            uptime_secs: 1,
            load_average: [0.0; 3],
        }
    }

    fn engine(rules: Vec<AlertRule>, cooldown_secs: u64) -> AlertEngine {
        let config = AlertsConfig {
            webhook_url: None,
            cooldown_secs,
            rules: Some(rules),
        };
        AlertEngine::new(&config, &mut Registry::default())
    }

    fn cpu_rule(for_secs: u64) -> AlertRule {
        AlertRule {
            name: "cpu_high".into(),
            metric: AlertMetric::Cpu,
            above: 90.0,
            for_secs,
        }
    }

    #[test]
    fn a_sustained_breach_fires_once_and_resolves_once() {
        let e = engine(vec![cpu_rule(10)], 600);
        assert!(
            e.observe(&sample(95.0), 0).is_empty(),
            "pending, not yet firing"
        );
        assert_eq!(e.snapshot()[0].state, AlertState::Pending { since_ms: 0 });
        assert!(e.observe(&sample(95.0), 5_000).is_empty());
        let fired = e.observe(&sample(97.0), 10_000);
        assert_eq!(fired.len(), 1);
        assert!(
            fired[0].firing
                && fired[0].text.contains("FIRING cpu_high")
                && fired[0].text.contains("97.0%")
        );
        assert!(
            e.observe(&sample(99.0), 11_000).is_empty(),
            "no repeat while firing"
        );
        let resolved = e.observe(&sample(20.0), 12_000);
        assert_eq!(resolved.len(), 1);
        assert!(!resolved[0].firing && resolved[0].text.contains("RESOLVED cpu_high"));
        assert_eq!(e.snapshot()[0].state, AlertState::Ok);
    }

    #[test]
    fn a_blip_shorter_than_the_hold_never_fires() {
        let e = engine(vec![cpu_rule(10)], 600);
        assert!(e.observe(&sample(95.0), 0).is_empty());
        assert!(e.observe(&sample(50.0), 5_000).is_empty());
        assert!(e.observe(&sample(95.0), 9_000).is_empty());
        assert!(
            e.observe(&sample(95.0), 15_000).is_empty(),
            "the hold restarted at 9 s"
        );
        assert_eq!(e.observe(&sample(95.0), 19_000).len(), 1);
    }

    #[test]
    fn the_cooldown_holds_back_a_flapping_rule() {
        let e = engine(vec![cpu_rule(0)], 60);
        assert_eq!(e.observe(&sample(95.0), 0).len(), 1);
        assert_eq!(e.observe(&sample(10.0), 1_000).len(), 1, "resolve");
        assert!(
            e.observe(&sample(95.0), 2_000).is_empty(),
            "inside the cooldown"
        );
        assert_eq!(
            e.snapshot()[0].state,
            AlertState::Firing { since_ms: 2_000 }
        );
        assert!(
            e.observe(&sample(10.0), 3_000).is_empty(),
            "nothing was notified, so nothing resolves"
        );
        assert_eq!(
            e.observe(&sample(95.0), 61_000).len(),
            1,
            "after the cooldown"
        );
    }

    #[test]
    fn events_fire_by_count_in_a_window() {
        let rule = AlertRule {
            name: "boots".into(),
            metric: AlertMetric::SandboxBootFailures,
            above: 1.0,
            for_secs: 60,
        };
        let e = engine(vec![rule], 0);
        e.record_event(AlertMetric::SandboxBootFailures, 1_000);
        e.record_event(AlertMetric::DeployFailures, 1_000);
        assert!(e.observe(&sample(0.0), 2_000).is_empty());
        e.record_event(AlertMetric::SandboxBootFailures, 3_000);
        let fired = e.observe(&sample(0.0), 4_000);
        assert_eq!(fired.len(), 1);
        assert!(
            fired[0]
                .text
                .contains("2 sandbox boot failures in the last 60 s"),
            "{}",
            fired[0].text
        );
        assert_eq!(
            e.observe(&sample(0.0), 62_000).len(),
            1,
            "resolves when the first leaves the window"
        );
    }
}
