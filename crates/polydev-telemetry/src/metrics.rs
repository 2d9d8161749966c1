//! Prometheus metrics: the registry the binary assembles at start, the
//! process collector, and the metric structs of parts that have no crate of
//! their own yet (sandboxes, login sessions). Each crate that emits metrics owns a struct with a
//! `register(&mut Registry)` constructor (the HTTP metrics live in
//! `polydev-api`).
//!
//! Invariant: no label carries a user id, sandbox id, session id or raw
//! path; label values come from small fixed sets (templates, drivers,
//! stages, states, route templates, status codes).

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};

pub use prometheus_client::registry::Registry as MetricsRegistry;

/// The Prometheus text exposition of everything registered.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, registry).is_err() {
        out.clear();
    }
    out
}

/// The same metrics in Prometheus' classic text format (0.0.4), for
/// scrapers that do not ask for OpenMetrics: counter families are named
/// with their `_total` suffix, and `# UNIT` and `# EOF` lines are dropped.
pub fn encode_prometheus_text(registry: &Registry) -> String {
    openmetrics_to_text(&encode(registry))
}

fn openmetrics_to_text(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some(name) = rest.strip_suffix(" counter") {
                counters.insert(name.to_owned());
            }
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Buckets for durations from 1 ms to 30 s.
pub fn duration_buckets() -> impl Iterator<Item = f64> {
    [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ]
    .into_iter()
}

/// `process_*` metrics for this process, read through sysinfo at scrape time.
#[derive(Debug, Default)]
pub struct ProcessCollector;

impl prometheus_client::collector::Collector for ProcessCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        let pid = Pid::from_u32(std::process::id());
        let Ok(mut system) = System::new() else {
            return Ok(());
        };
        system.refresh_processes_specifics(
            ProcessesToUpdate::Some(&[pid]),
            false,
            ProcessRefreshKind::nothing().with_cpu().with_memory(),
        );
        let Some(process) = system.process(pid) else {
            return Ok(());
        };
        let cpu = ConstCounter::new(process.accumulated_cpu_time() as f64 / 1000.0);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu",
            "Total user and system CPU time spent",
            Some(&Unit::Seconds),
            cpu.metric_type(),
        )?)?;
        let gauges: [(&str, &str, Option<&Unit>, i64); 3] = [
            (
                "process_resident_memory",
                "Resident memory size",
                Some(&Unit::Bytes),
                process.memory() as i64,
            ),
            (
                "process_virtual_memory",
                "Virtual memory size",
                Some(&Unit::Bytes),
                process.virtual_memory() as i64,
            ),
            (
                "process_start_time",
                "Start time of the process since the Unix epoch",
                Some(&Unit::Seconds),
                process.start_time() as i64,
            ),
        ];
        for (name, help, unit, value) in gauges {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, unit, gauge.metric_type())?)?;
        }
        if let Some(fds) = process.open_files() {
            let gauge = ConstGauge::new(fds as i64);
            gauge.encode(encoder.encode_descriptor(
                "process_open_fds",
                "Open file descriptors",
                None,
                gauge.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

/// Which build is running.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: String,
    pub git_sha: String,
}

/// Registers `polydev_build_info{version,git_sha} 1` (a gauge, as
/// Prometheus' text format has no info type).
pub fn register_build_info(registry: &mut Registry, version: &str, git_sha: &str) {
    let info = Family::<BuildLabels, Gauge>::default();
    info.get_or_create(&BuildLabels {
        version: version.to_owned(),
        git_sha: git_sha.to_owned(),
    })
    .set(1);
    registry.register(
        "polydev_build_info",
        "The running polydev build (always 1)",
        info,
    );
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TemplateDriverLabels {
    pub template: String,
    pub driver: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TemplateStageLabels {
    pub template: String,
    pub stage: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TemplateLabels {
    pub template: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

/// Sandbox templates and drivers known today; their series exist from the
/// start (at zero) so dashboards and alerts see them before the first event.
pub const TEMPLATES: [&str; 2] = ["runtime", "browser"];
pub const DRIVERS: [&str; 1] = ["local"];
/// Boot stages after `created` (see the sandbox runtime).
pub const BOOT_STAGES: [&str; 2] = ["started", "agent_ready"];

/// Sandboxes and warm pools. Fed by the sandbox runtime; until it exists
/// these export zero.
#[derive(Debug, Clone)]
pub struct SandboxMetrics {
    pub active: Family<TemplateDriverLabels, Gauge>,
    /// v1's name for the total of `active`.
    pub containers_active: Gauge,
    pub boot_duration: Family<TemplateStageLabels, Histogram, fn() -> Histogram>,
    pub boot_failures: Family<TemplateLabels, Counter>,
    pub pool_size: Family<TemplateLabels, Gauge>,
    pub pool_hits: Family<TemplateLabels, Counter>,
    pub pool_misses: Family<TemplateLabels, Counter>,
}

fn boot_histogram() -> Histogram {
    Histogram::new(duration_buckets())
}

impl SandboxMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            active: Family::default(),
            containers_active: Gauge::default(),
            boot_duration: Family::new_with_constructor(boot_histogram as fn() -> Histogram),
            boot_failures: Family::default(),
            pool_size: Family::default(),
            pool_hits: Family::default(),
            pool_misses: Family::default(),
        };
        for template in TEMPLATES {
            let t = || TemplateLabels {
                template: template.to_owned(),
            };
            for driver in DRIVERS {
                let _ = m.active.get_or_create(&TemplateDriverLabels {
                    template: template.to_owned(),
                    driver: driver.to_owned(),
                });
            }
            for stage in BOOT_STAGES {
                let _ = m.boot_duration.get_or_create(&TemplateStageLabels {
                    template: template.to_owned(),
                    stage: stage.to_owned(),
                });
            }
            let _ = m.boot_failures.get_or_create(&t());
            let _ = m.pool_size.get_or_create(&t());
            let _ = m.pool_hits.get_or_create(&t());
            let _ = m.pool_misses.get_or_create(&t());
        }
        registry.register(
            "polydev_sandboxes_active",
            "Sandboxes running, by template and driver",
            m.active.clone(),
        );
        registry.register(
            "polydev_containers_active",
            "Sandboxes running (v1 name)",
            m.containers_active.clone(),
        );
        registry.register_with_unit(
            "polydev_sandbox_boot_duration",
            "Time from create to each boot stage",
            Unit::Seconds,
            m.boot_duration.clone(),
        );
        registry.register(
            "polydev_sandbox_boot_failures",
            "Sandboxes that failed to boot",
            m.boot_failures.clone(),
        );
        registry.register(
            "polydev_pool_size",
            "Warm sandboxes ready to hand out",
            m.pool_size.clone(),
        );
        registry.register(
            "polydev_pool_hits",
            "Hand-outs served from a warm pool",
            m.pool_hits.clone(),
        );
        registry.register(
            "polydev_pool_misses",
            "Hand-outs that needed a cold start",
            m.pool_misses.clone(),
        );
        m
    }
}

/// Login sessions: how many entered each state, live viewers, and the
/// bytes their bridges carried.
#[derive(Debug, Clone, Default)]
pub struct LoginMetrics {
    pub sessions: Family<StateLabels, Counter>,
    pub viewers: Gauge,
    pub bridged_bytes: Family<DirectionLabels, Counter>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `to_client` or `to_vnc`.
    pub direction: String,
}

impl LoginMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        for state in polydev_domain::LoginState::ALL {
            let _ = m.sessions.get_or_create(&StateLabels {
                state: state.as_str().to_owned(),
            });
        }
        registry.register(
            "polydev_login_sessions",
            "Login sessions that entered each state",
            m.sessions.clone(),
        );
        registry.register(
            "polydev_login_viewers",
            "Viewer WebSockets connected to login sessions",
            m.viewers.clone(),
        );
        registry.register(
            "polydev_login_bridged_bytes",
            "Bytes the viewer bridge carried, by direction",
            m.bridged_bytes.clone(),
        );
        m
    }

    pub fn entered(&self, state: polydev_domain::LoginState) {
        self.sessions
            .get_or_create(&StateLabels {
                state: state.as_str().to_owned(),
            })
            .inc();
    }

    /// The bridged-bytes counter of one direction, to count into without
    /// a lookup per message.
    pub fn bridged_counter(&self, direction: &str) -> Counter {
        self.bridged_bytes
            .get_or_create(&DirectionLabels {
                direction: direction.to_owned(),
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_text_names_counters_with_total_and_drops_openmetrics_lines() {
        let om = "# HELP a_total_bytes Bytes.\n# TYPE a_total_bytes counter\n# UNIT a_total_bytes bytes\na_total_bytes_total 3\n# HELP g G.\n# TYPE g gauge\ng 1\n# EOF\n";
        assert_eq!(
            openmetrics_to_text(om),
            "# HELP a_total_bytes_total Bytes.\n# TYPE a_total_bytes_total counter\na_total_bytes_total 3\n# HELP g G.\n# TYPE g gauge\ng 1\n"
        );
    }

    #[test]
    fn the_exposition_names_every_part_and_the_process() {
        let mut registry = Registry::default();
        register_build_info(&mut registry, "1.2.3", "abc1234");
        let sandboxes = SandboxMetrics::register(&mut registry);
        LoginMetrics::register(&mut registry);
        registry.register_collector(Box::new(ProcessCollector));
        sandboxes
            .active
            .get_or_create(&TemplateDriverLabels {
                template: "runtime".into(),
                driver: "local".into(),
            })
            .set(3);
        let text = encode(&registry);
        for needle in [
            "polydev_build_info{version=\"1.2.3\",git_sha=\"abc1234\"} 1",
            "polydev_sandboxes_active{template=\"runtime\",driver=\"local\"} 3",
            "polydev_containers_active 0",
            "polydev_sandbox_boot_duration_seconds_count{template=\"browser\",stage=\"agent_ready\"} 0",
            "polydev_login_sessions_total{state=\"awaiting_login\"} 0",

            "process_resident_memory_bytes ",
            "process_cpu_seconds_total ",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }
}
