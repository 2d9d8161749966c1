//! Host health: one sampler reads the machine through sysinfo on an
//! interval; requests read the latest [`HostSample`], so the admin endpoints
//! cost nothing under load.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::Deserialize;
use sysinfo::{
    Components, CpuRefreshKind, Disks, InterfaceOperationalState, MemoryRefreshKind, Networks,
    RefreshKind, System,
};

use crate::history::History;

pub use crate::sample::*;

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        (part as f64 / whole as f64 * 100.0).clamp(0.0, 100.0)
    }
}

/// Where samples come from.
pub trait HostSource: Send {
    fn sample(&mut self) -> HostSample;
}

/// The real machine, through sysinfo.
pub struct SysinfoSource {
    system: System,
    disks: Disks,
    networks: Networks,
    components: Components,
    last_net: Option<(Instant, u64, u64)>,
    model: String,
}

impl std::fmt::Debug for SysinfoSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SysinfoSource").finish_non_exhaustive()
    }
}

impl SysinfoSource {
    /// Fails only where sysinfo cannot read the machine at all.
    pub fn new() -> Result<Self, sysinfo::Error> {
        let system = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::everything())
                .with_memory(MemoryRefreshKind::everything()),
        )?;
        let model = system
            .cpus()
            .first()
            .map(|c| c.brand().trim().to_owned())
            .filter(|b| !b.is_empty())
            .unwrap_or_else(|| "unknown".to_owned());
        Ok(Self {
            system,
            disks: Disks::new_with_refreshed_list()?,
            networks: Networks::new_with_refreshed_list()?,
            // Hosts without sensors (VMs) have no components: not an error.
            components: Components::new_with_refreshed_list().or_else(|_| Components::new())?,
            last_net: None,
            model,
        })
    }
}

impl HostSource for SysinfoSource {
    fn sample(&mut self) -> HostSample {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        self.disks.refresh(true);
        self.networks.refresh(true);
        self.components.refresh(false);

        let total = self.system.total_memory();
        let available = self.system.available_memory();
        let used = total.saturating_sub(available);
        let memory = MemorySample {
            total_bytes: total,
            used_bytes: used,
            free_bytes: self.system.free_memory(),
            percent: percent(used, total),
        };

        let mut seen = std::collections::HashSet::new();
        let disks = self
            .disks
            .iter()
            .filter(|d| d.total_space() > 0 && seen.insert(d.mount_point().to_path_buf()))
            .map(|d| {
                let size = d.total_space();
                let available = d.available_space().min(size);
                DiskSample {
                    filesystem: d.name().to_string_lossy().into_owned(),
                    mount: d.mount_point().display().to_string(),
                    size_bytes: size,
                    used_bytes: size - available,
                    available_bytes: available,
                    percent: percent(size - available, size),
                }
            })
            .collect();

        let mut interfaces: Vec<InterfaceSample> =
            self.networks
                .iter()
                .map(|(name, data)| InterfaceSample {
                    name: name.to_string_lossy().into_owned(),
                    status: match data.operational_state() {
                        InterfaceOperationalState::Up => "up",
                        InterfaceOperationalState::Down
                        | InterfaceOperationalState::LowerLayerDown => "down",
                        _ if name == "lo" => "up",
                        _ => "unknown",
                    },
                    rx_bytes: data.total_received(),
                    tx_bytes: data.total_transmitted(),
                })
                .collect();
        interfaces.sort_by(|a, b| a.name.cmp(&b.name));
        let external = interfaces.iter().filter(|i| i.name != "lo");
        let (rx, tx) = external
            .clone()
            .fold((0u64, 0u64), |(r, t), i| (r + i.rx_bytes, t + i.tx_bytes));
        let now = Instant::now();
        let (rx_rate, tx_rate) = match self.last_net {
            Some((then, prx, ptx)) => {
                let secs = now.duration_since(then).as_secs_f64().max(1e-3);
                (
                    rx.saturating_sub(prx) as f64 / secs,
                    tx.saturating_sub(ptx) as f64 / secs,
                )
            }
            None => (0.0, 0.0),
        };
        self.last_net = Some((now, rx, tx));
        let status = if external.clone().any(|i| i.status == "up") {
            "up"
        } else {
            "down"
        };

        let temperature = self
            .components
            .iter()
            .filter_map(|c| {
                c.temperature()
                    .filter(|t| t.is_finite())
                    .map(|t| (t, c.critical()))
            })
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(current, critical)| TemperatureSample {
                current: f64::from(current),
                critical: critical.filter(|c| c.is_finite()).map(f64::from),
            });

        let load = System::load_average().unwrap_or(sysinfo::LoadAvg {
            one: 0.0,
            five: 0.0,
            fifteen: 0.0,
        });
        HostSample {
            taken_at_ms: now_ms(),
            cpu: CpuSample {
                usage_percent: f64::from(self.system.global_cpu_usage()).clamp(0.0, 100.0),
                cores: self.system.cpus().len(),
                model: self.model.clone(),
            },
            memory,
            disks,
            network: NetworkSample {
                status,
                interfaces,
                rx_bytes_per_sec: rx_rate,
                tx_bytes_per_sec: tx_rate,
            },
            temperature,
            uptime_secs: System::uptime().unwrap_or(0),
            load_average: [load.one, load.five, load.fifteen],
        }
    }
}

fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

/// Percentages that override the real readings, read from a JSON file on
/// every sample: `{"cpu": 95, "memory": 80, "disk": 50, "temperature": 70}`
/// (any subset). For tests and demos of the dashboard and alerts; the real
/// machine fills everything else.
#[derive(Debug)]
pub struct OverrideSource {
    path: PathBuf,
    inner: SysinfoSource,
}

#[derive(Debug, Default, Deserialize)]
struct Overrides {
    cpu: Option<f64>,
    memory: Option<f64>,
    disk: Option<f64>,
    temperature: Option<f64>,
}

impl OverrideSource {
    pub fn new(path: PathBuf) -> Result<Self, sysinfo::Error> {
        Ok(Self {
            path,
            inner: SysinfoSource::new()?,
        })
    }
}

impl HostSource for OverrideSource {
    fn sample(&mut self) -> HostSample {
        let mut s = self.inner.sample();
        let o: Overrides = std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        if let Some(cpu) = o.cpu {
            s.cpu.usage_percent = cpu.clamp(0.0, 100.0);
        }
        if let Some(mem) = o.memory {
            let total = s.memory.total_bytes;
            s.memory.percent = mem.clamp(0.0, 100.0);
            s.memory.used_bytes = (total as f64 * s.memory.percent / 100.0) as u64;
            s.memory.free_bytes = total - s.memory.used_bytes;
        }
        if let Some(disk) = o.disk {
            for d in &mut s.disks {
                d.percent = disk.clamp(0.0, 100.0);
                d.used_bytes = (d.size_bytes as f64 * d.percent / 100.0) as u64;
                d.available_bytes = d.size_bytes - d.used_bytes;
            }
        }
        if let Some(t) = o.temperature {
            s.temperature = Some(TemperatureSample {
                current: t,
                critical: Some(100.0),
            });
        }
        s
    }
}

/// The latest sample and the history, shared by the sampler and the API.
#[derive(Debug)]
pub struct HostMonitor {
    latest: RwLock<Option<Arc<HostSample>>>,
    history: Mutex<History>,
}

impl Default for HostMonitor {
    fn default() -> Self {
        Self::new(History::DEFAULT_STEP, History::DEFAULT_SPAN)
    }
}

impl HostMonitor {
    pub fn new(step: Duration, span: Duration) -> Self {
        Self {
            latest: RwLock::new(None),
            history: Mutex::new(History::new(step, span)),
        }
    }

    pub fn latest(&self) -> Option<Arc<HostSample>> {
        self.latest.read().ok().and_then(|l| l.clone())
    }

    pub fn record(&self, sample: HostSample) -> Arc<HostSample> {
        let sample = Arc::new(sample);
        if let Ok(mut h) = self.history.lock() {
            h.add(&sample);
        }
        if let Ok(mut l) = self.latest.write() {
            *l = Some(sample.clone());
        }
        sample
    }

    /// History series since `since_ms`: timestamps and one vector per series.
    pub fn history(
        &self,
        metric: crate::history::HistoryMetric,
        since_ms: i64,
    ) -> (Vec<i64>, BTreeMap<&'static str, Vec<f64>>) {
        self.history
            .lock()
            .map(|h| h.series(metric, since_ms))
            .unwrap_or_default()
    }

    pub fn history_step(&self) -> Duration {
        self.history
            .lock()
            .map(|h| h.step())
            .unwrap_or(History::DEFAULT_STEP)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_real_machine_gives_sane_values() {
        let mut source = SysinfoSource::new().expect("sysinfo reads this machine");
        let _ = source.sample();
        std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
        let s = source.sample();
        assert!(s.cpu.cores >= 1);
        assert!((0.0..=100.0).contains(&s.cpu.usage_percent));
        assert!(s.memory.total_bytes > 0 && s.memory.total_bytes >= s.memory.used_bytes);
        assert!((0.0..=100.0).contains(&s.memory.percent));
        assert!(!s.disks.is_empty(), "no disks seen");
        for d in &s.disks {
            assert!(
                d.size_bytes >= d.used_bytes && d.size_bytes >= d.available_bytes,
                "{d:?}"
            );
            assert!((0.0..=100.0).contains(&d.percent));
        }
        assert!(s.network.interfaces.iter().any(|i| i.name == "lo"));
        assert!(s.uptime_secs > 0);
        assert!(s.load_average.iter().all(|l| *l >= 0.0));
    }

    #[test]
    fn overrides_replace_only_what_they_name() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("o.json");
        std::fs::write(&path, r#"{"cpu": 95, "disk": 72.5}"#).expect("write");
        let mut source = OverrideSource::new(path).expect("sysinfo reads this machine");
        let s = source.sample();
        assert_eq!(s.cpu.usage_percent, 95.0);
        assert_eq!(s.disk_percent(), 72.5);
        assert!(s.memory.percent < 100.0 && s.memory.total_bytes > 0);
    }
}
