//! In-memory history of host health: fixed-size ring buffers of averages
//! over `step` (10 s), `span` long (24 h = 8640 points, ~0.4 MiB).

use std::collections::{BTreeMap, VecDeque};
use std::str::FromStr;
use std::time::Duration;

use crate::sample::HostSample;

/// What a history request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryMetric {
    /// `usage_percent`
    Cpu,
    /// `percent`
    Memory,
    /// `percent` of the fullest disk
    Disk,
    /// `rx_bytes_per_sec`, `tx_bytes_per_sec`
    Network,
}

impl FromStr for HistoryMetric {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "cpu" => Ok(Self::Cpu),
            "memory" => Ok(Self::Memory),
            "disk" => Ok(Self::Disk),
            "network" => Ok(Self::Network),
            other => Err(format!(
                "unknown metric {other:?}: expected cpu, memory, disk or network"
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Point {
    t_ms: i64,
    cpu: f64,
    memory: f64,
    disk: f64,
    rx: f64,
    tx: f64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Accumulator {
    n: u32,
    sum: Point,
}

#[derive(Debug)]
pub struct History {
    step_ms: i64,
    capacity: usize,
    points: VecDeque<Point>,
    acc: Option<Accumulator>,
}

impl History {
    pub const DEFAULT_STEP: Duration = Duration::from_secs(10);
    pub const DEFAULT_SPAN: Duration = Duration::from_secs(24 * 3600);

    pub fn new(step: Duration, span: Duration) -> Self {
        let step_ms = i64::try_from(step.as_millis()).unwrap_or(10_000).max(1);
        let capacity = (span.as_millis() / step.as_millis().max(1)).max(1) as usize;
        Self {
            step_ms,
            capacity,
            points: VecDeque::with_capacity(capacity),
            acc: None,
        }
    }

    pub fn step(&self) -> Duration {
        Duration::from_millis(self.step_ms as u64)
    }

    /// Adds a sample; closes a point whenever a step boundary is crossed.
    pub fn add(&mut self, s: &HostSample) {
        let slot = s.taken_at_ms - s.taken_at_ms.rem_euclid(self.step_ms);
        if let Some(acc) = self.acc {
            if slot != acc.sum.t_ms {
                self.close(acc);
                self.acc = None;
            }
        }
        let acc = self.acc.get_or_insert(Accumulator {
            n: 0,
            sum: Point {
                t_ms: slot,
                ..Point::default()
            },
        });
        acc.n += 1;
        acc.sum.cpu += s.cpu.usage_percent;
        acc.sum.memory += s.memory.percent;
        acc.sum.disk += s.disk_percent();
        acc.sum.rx += s.network.rx_bytes_per_sec;
        acc.sum.tx += s.network.tx_bytes_per_sec;
    }

    fn close(&mut self, acc: Accumulator) {
        let n = f64::from(acc.n.max(1));
        if self.points.len() == self.capacity {
            self.points.pop_front();
        }
        self.points.push_back(Point {
            t_ms: acc.sum.t_ms,
            cpu: acc.sum.cpu / n,
            memory: acc.sum.memory / n,
            disk: acc.sum.disk / n,
            rx: acc.sum.rx / n,
            tx: acc.sum.tx / n,
        });
    }

    /// Completed points at or after `since_ms`.
    pub fn series(
        &self,
        metric: HistoryMetric,
        since_ms: i64,
    ) -> (Vec<i64>, BTreeMap<&'static str, Vec<f64>>) {
        let points: Vec<&Point> = self.points.iter().filter(|p| p.t_ms >= since_ms).collect();
        let times = points.iter().map(|p| p.t_ms).collect();
        let column = |f: fn(&Point) -> f64| points.iter().map(|p| f(p)).collect::<Vec<_>>();
        let mut series = BTreeMap::new();
        match metric {
            HistoryMetric::Cpu => {
                series.insert("usage_percent", column(|p| p.cpu));
            }
            HistoryMetric::Memory => {
                series.insert("percent", column(|p| p.memory));
            }
            HistoryMetric::Disk => {
                series.insert("percent", column(|p| p.disk));
            }
            HistoryMetric::Network => {
                series.insert("rx_bytes_per_sec", column(|p| p.rx));
                series.insert("tx_bytes_per_sec", column(|p| p.tx));
            }
        }
        (times, series)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::{CpuSample, MemorySample, NetworkSample};

    fn sample(t_ms: i64, cpu: f64) -> HostSample {
        HostSample {
            taken_at_ms: t_ms,
            cpu: CpuSample {
                usage_percent: cpu,
                cores: 2,
                model: "test".into(),
            },
            memory: MemorySample {
                total_bytes: 100,
                used_bytes: 50,
                free_bytes: 50,
                percent: 50.0,
            },
            disks: Vec::new(),
            network: NetworkSample {
                status: "up",
                interfaces: Vec::new(),
                rx_bytes_per_sec: 10.0,
                tx_bytes_per_sec: 20.0,
            },
            temperature: None,
            uptime_secs: 1,
            load_average: [0.0; 3],
        }
    }

    #[test]
    fn samples_average_into_steps_and_old_points_fall_off() {
        let mut h = History::new(Duration::from_secs(10), Duration::from_secs(30));
        for (t, cpu) in [
            (0, 10.0),
            (5_000, 30.0),
            (10_000, 50.0),
            (20_000, 70.0),
            (30_000, 0.0),
            (40_000, 0.0),
        ] {
            h.add(&sample(t, cpu));
        }
        // Four steps closed, capacity three: the first (average 20) is gone.
        let (times, series) = h.series(HistoryMetric::Cpu, 0);
        assert_eq!(times, [10_000, 20_000, 30_000]);
        assert_eq!(series["usage_percent"], [50.0, 70.0, 0.0]);
        let (times, series) = h.series(HistoryMetric::Network, 25_000);
        assert_eq!(times, [30_000]);
        assert_eq!(
            (series["rx_bytes_per_sec"][0], series["tx_bytes_per_sec"][0]),
            (10.0, 20.0)
        );
    }

    #[test]
    fn a_day_at_ten_seconds_is_8640_points() {
        let h = History::new(History::DEFAULT_STEP, History::DEFAULT_SPAN);
        assert_eq!(h.capacity, 8640);
        assert!("swap".parse::<HistoryMetric>().is_err());
    }
}
