//! One reading of the host (what the sampler records, the history keeps and
//! the admin health API shows).

/// One reading of the host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostSample {
    /// Unix milliseconds.
    pub taken_at_ms: i64,
    pub cpu: CpuSample,
    pub memory: MemorySample,
    pub disks: Vec<DiskSample>,
    pub network: NetworkSample,
    pub temperature: Option<TemperatureSample>,
    pub uptime_secs: u64,
    pub load_average: [f64; 3],
}

#[derive(Debug, Clone, PartialEq)]
pub struct CpuSample {
    /// All cores, 0–100.
    pub usage_percent: f64,
    pub cores: usize,
    pub model: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MemorySample {
    pub total_bytes: u64,
    /// Total minus available (what processes hold, not the page cache).
    pub used_bytes: u64,
    pub free_bytes: u64,
    pub percent: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DiskSample {
    pub filesystem: String,
    pub mount: String,
    pub size_bytes: u64,
    pub used_bytes: u64,
    pub available_bytes: u64,
    pub percent: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NetworkSample {
    /// `up` when a non-loopback interface is up, else `down`.
    pub status: &'static str,
    pub interfaces: Vec<InterfaceSample>,
    /// Bytes per second over all non-loopback interfaces since the last sample.
    pub rx_bytes_per_sec: f64,
    pub tx_bytes_per_sec: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct InterfaceSample {
    pub name: String,
    pub status: &'static str,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TemperatureSample {
    /// Hottest sensor, °C.
    pub current: f64,
    pub critical: Option<f64>,
}

impl HostSample {
    /// The fullest disk's percentage (what "disk" means in history and alerts).
    pub fn disk_percent(&self) -> f64 {
        self.disks.iter().map(|d| d.percent).fold(0.0, f64::max)
    }
}
