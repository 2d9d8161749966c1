//! `/metrics` and the admin host-health API. Handlers read the sampler's
//! latest sample; none of them touches the machine itself.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::IntoResponse;
use axum::Json;
use polydev_telemetry::history::HistoryMetric;
use polydev_telemetry::host::HostSample;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::auth::AdminUser;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::ApiQuery;
use crate::state::AppState;

/// Prometheus metrics: OpenMetrics 1.0 when the scraper's `Accept` asks
/// for it (Prometheus does), else the classic text format 0.0.4.
#[utoipa::path(get, path = "/metrics", tag = "observability",
    responses((status = 200, description = "Metrics", content_type = "text/plain")))]
pub(crate) async fn metrics(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> impl IntoResponse {
    let registry = &state.observability.registry;
    let wants_openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    if wants_openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            polydev_telemetry::metrics::encode(registry),
        )
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            polydev_telemetry::metrics::encode_prometheus_text(registry),
        )
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Cpu {
    /// Percent of all cores, 0–100.
    usage: f64,
    cores: usize,
    model: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Memory {
    /// Bytes.
    total: u64,
    /// Bytes in use (total minus available).
    used: u64,
    free: u64,
    percent: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Disk {
    filesystem: String,
    size: u64,
    used: u64,
    available: u64,
    percent: f64,
    mount: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Interface {
    name: String,
    /// `up`, `down` or `unknown`.
    status: &'static str,
    rx_bytes: u64,
    tx_bytes: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Network {
    /// `up` when a non-loopback interface is up.
    status: &'static str,
    interfaces: Vec<Interface>,
    rx_bytes_per_sec: f64,
    tx_bytes_per_sec: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Temperature {
    /// °C, hottest sensor.
    current: f64,
    critical: Option<f64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SystemHealth {
    cpu: Cpu,
    memory: Memory,
    disk: Vec<Disk>,
    network: Network,
    /// Absent when the host has no temperature sensor.
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<Temperature>,
    /// Seconds since boot.
    uptime: u64,
    /// 1, 5 and 15 minutes.
    load_average: [f64; 3],
    /// When the sample was taken (Unix ms).
    timestamp: i64,
}

fn cpu(s: &HostSample) -> Cpu {
    Cpu {
        usage: round(s.cpu.usage_percent),
        cores: s.cpu.cores,
        model: s.cpu.model.clone(),
    }
}

fn memory(s: &HostSample) -> Memory {
    Memory {
        total: s.memory.total_bytes,
        used: s.memory.used_bytes,
        free: s.memory.free_bytes,
        percent: round(s.memory.percent),
    }
}

fn disks(s: &HostSample) -> Vec<Disk> {
    s.disks
        .iter()
        .map(|d| Disk {
            filesystem: d.filesystem.clone(),
            size: d.size_bytes,
            used: d.used_bytes,
            available: d.available_bytes,
            percent: round(d.percent),
            mount: d.mount.clone(),
        })
        .collect()
}

fn network(s: &HostSample) -> Network {
    Network {
        status: s.network.status,
        interfaces: s
            .network
            .interfaces
            .iter()
            .map(|i| Interface {
                name: i.name.clone(),
                status: i.status,
                rx_bytes: i.rx_bytes,
                tx_bytes: i.tx_bytes,
            })
            .collect(),
        rx_bytes_per_sec: round(s.network.rx_bytes_per_sec),
        tx_bytes_per_sec: round(s.network.tx_bytes_per_sec),
    }
}

fn temperature(s: &HostSample) -> Option<Temperature> {
    s.temperature.as_ref().map(|t| Temperature {
        current: round(t.current),
        critical: t.critical,
    })
}

fn round(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

fn latest(state: &AppState) -> ApiResult<Arc<HostSample>> {
    state
        .observability
        .host
        .latest()
        .ok_or_else(|| ApiError::unavailable("the first host sample is not taken yet", 1))
}

/// Everything about the host in one answer.
#[utoipa::path(get, path = "/api/admin/health/system", tag = "observability", security(("bearer" = [])),
    responses(
        (status = 200, description = "Latest host sample", body = SystemHealth),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 503, description = "No sample yet", body = ErrorBody)))]
pub(crate) async fn system(
    State(state): State<AppState>,
    _: AdminUser,
) -> ApiResult<Json<SystemHealth>> {
    let s = latest(&state)?;
    Ok(Json(SystemHealth {
        cpu: cpu(&s),
        memory: memory(&s),
        disk: disks(&s),
        network: network(&s),
        temperature: temperature(&s),
        uptime: s.uptime_secs,
        load_average: s.load_average.map(|l| (l * 100.0).round() / 100.0),
        timestamp: s.taken_at_ms,
    }))
}

#[utoipa::path(get, path = "/api/admin/health/cpu", tag = "observability", security(("bearer" = [])),
    responses((status = 200, body = Cpu), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(crate) async fn cpu_route(State(state): State<AppState>, _: AdminUser) -> ApiResult<Json<Cpu>> {
    Ok(Json(cpu(&*latest(&state)?)))
}

#[utoipa::path(get, path = "/api/admin/health/memory", tag = "observability", security(("bearer" = [])),
    responses((status = 200, body = Memory), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(crate) async fn memory_route(
    State(state): State<AppState>,
    _: AdminUser,
) -> ApiResult<Json<Memory>> {
    Ok(Json(memory(&*latest(&state)?)))
}

#[utoipa::path(get, path = "/api/admin/health/disk", tag = "observability", security(("bearer" = [])),
    responses((status = 200, body = Vec<Disk>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(crate) async fn disk_route(
    State(state): State<AppState>,
    _: AdminUser,
) -> ApiResult<Json<Vec<Disk>>> {
    Ok(Json(disks(&*latest(&state)?)))
}

#[utoipa::path(get, path = "/api/admin/health/network", tag = "observability", security(("bearer" = [])),
    responses((status = 200, body = Network), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(crate) async fn network_route(
    State(state): State<AppState>,
    _: AdminUser,
) -> ApiResult<Json<Network>> {
    Ok(Json(network(&*latest(&state)?)))
}

/// The hottest sensor, or `null` when the host has none.
#[utoipa::path(get, path = "/api/admin/health/temperature", tag = "observability", security(("bearer" = [])),
    responses((status = 200, body = Option<Temperature>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(crate) async fn temperature_route(
    State(state): State<AppState>,
    _: AdminUser,
) -> ApiResult<Json<Option<Temperature>>> {
    Ok(Json(temperature(&*latest(&state)?)))
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CheckResult {
    name: String,
    target: String,
    /// `ok`, `error` or `timeout`.
    status: &'static str,
    latency_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct NetworkHealth {
    /// `healthy` (all ok), `degraded` (the egress proxy or an upstream failed) or `unhealthy` (the store failed).
    status: &'static str,
    checks: Vec<CheckResult>,
}

const CHECK_DEADLINE: Duration = Duration::from_secs(2);

/// Reachability of what the controller depends on: the store, the egress
/// proxy when enabled, and each configured upstream, checked now,
/// concurrently, 2 s deadline each.
#[utoipa::path(get, path = "/api/admin/health/network-health", tag = "observability", security(("bearer" = [])),
    responses((status = 200, body = NetworkHealth), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(crate) async fn network_health(
    State(state): State<AppState>,
    _: AdminUser,
) -> Json<NetworkHealth> {
    let store = async {
        let started = Instant::now();
        let (status, error) = match tokio::time::timeout(CHECK_DEADLINE, state.store.ping()).await {
            Ok(Ok(())) => ("ok", None),
            Ok(Err(e)) => ("error", Some(e.to_string())),
            Err(_) => ("timeout", None),
        };
        CheckResult {
            name: "store".into(),
            target: state.store.backend().as_str().into(),
            status,
            latency_ms: ms(started),
            error,
        }
    };
    let client = reqwest::Client::builder()
        .timeout(CHECK_DEADLINE)
        .build()
        .unwrap_or_default();
    let mut probes = tokio::task::JoinSet::new();
    for url in state.config.health_upstreams.iter().cloned() {
        let client = client.clone();
        probes.spawn(async move {
            let started = Instant::now();
            let (status, error) = match client.get(&url).send().await {
                Ok(r) if !r.status().is_server_error() => ("ok", None),
                Ok(r) => ("error", Some(format!("answered {}", r.status().as_u16()))),
                Err(e) if e.is_timeout() => ("timeout", None),
                Err(e) => ("error", Some(e.to_string())),
            };
            CheckResult {
                name: "upstream".into(),
                target: url,
                status,
                latency_ms: ms(started),
                error,
            }
        });
    }
    let store = store.await;
    if let Some(port) = state.egress.as_ref().and_then(|e| e.port()) {
        let ip = state
            .egress
            .as_ref()
            .map(|e| e.config().listen.ip())
            .filter(|ip| !ip.is_unspecified());
        let addr =
            std::net::SocketAddr::new(ip.unwrap_or(std::net::IpAddr::from([127, 0, 0, 1])), port);
        probes.spawn(async move {
            let started = Instant::now();
            let (status, error) =
                match tokio::time::timeout(CHECK_DEADLINE, tokio::net::TcpStream::connect(addr))
                    .await
                {
                    Ok(Ok(_)) => ("ok", None),
                    Ok(Err(e)) => ("error", Some(e.to_string())),
                    Err(_) => ("timeout", None),
                };
            CheckResult {
                name: "egress".into(),
                target: addr.to_string(),
                status,
                latency_ms: ms(started),
                error,
            }
        });
    }
    let mut upstreams = Vec::new();
    while let Some(probe) = probes.join_next().await {
        if let Ok(check) = probe {
            upstreams.push(check);
        }
    }
    upstreams.sort_by(|a, b| a.target.cmp(&b.target));
    let status = if store.status != "ok" {
        "unhealthy"
    } else if upstreams.iter().any(|c| c.status != "ok") {
        "degraded"
    } else {
        "healthy"
    };
    let mut checks = vec![store];
    checks.extend(upstreams);
    Json(NetworkHealth { status, checks })
}

fn ms(started: Instant) -> f64 {
    (started.elapsed().as_secs_f64() * 1e5).round() / 100.0
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct HistoryQuery {
    /// `cpu`, `memory`, `disk` or `network`.
    metric: String,
    /// `1h`, `6h` or `24h` (default `1h`).
    range: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct HistoryResponse {
    metric: String,
    range: String,
    step_secs: u64,
    /// Unix ms, the start of each step.
    timestamps: Vec<i64>,
    /// One array per series, aligned with `timestamps`: `usage_percent`
    /// (cpu), `percent` (memory, disk), `rx_bytes_per_sec` and
    /// `tx_bytes_per_sec` (network).
    series: BTreeMap<String, Vec<f64>>,
}

/// Host history at 10 s resolution, up to 24 h.
#[utoipa::path(get, operation_id = "host_history", path = "/api/admin/health/history", tag = "observability", params(HistoryQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, body = HistoryResponse),
        (status = 400, description = "Unknown metric or range", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(crate) async fn history(
    State(state): State<AppState>,
    _: AdminUser,
    ApiQuery(q): ApiQuery<HistoryQuery>,
) -> ApiResult<Json<HistoryResponse>> {
    let metric: HistoryMetric = q
        .metric
        .parse()
        .map_err(|e: String| ApiError::bad_request("invalid_query", e))?;
    let range = q.range.unwrap_or_else(|| "1h".to_owned());
    let hours = match range.as_str() {
        "1h" => 1,
        "6h" => 6,
        "24h" => 24,
        other => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("unknown range {other:?}: expected 1h, 6h or 24h"),
            ))
        }
    };
    let since = polydev_store::now_ms() - hours * 3600 * 1000;
    let (timestamps, series) = state.observability.host.history(metric, since);
    Ok(Json(HistoryResponse {
        metric: q.metric,
        range,
        step_secs: state.observability.host.history_step().as_secs(),
        timestamps,
        series: series
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.into_iter().map(round).collect()))
            .collect(),
    }))
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct AlertView {
    rule: String,
    /// `cpu`, `memory`, `disk`, `sandbox_boot_failures`, `deploy_failures`.
    metric: &'static str,
    above: f64,
    for_secs: u64,
    /// `ok`, `pending` or `firing`.
    state: &'static str,
    /// Unix ms since when the rule is pending or firing.
    since: Option<i64>,
    value: f64,
    last_notified: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AlertList {
    alerts: Vec<AlertView>,
}

/// Alert rules and their current states.
#[utoipa::path(get, path = "/api/admin/alerts", tag = "observability", security(("bearer" = [])),
    responses((status = 200, body = AlertList), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(crate) async fn alerts(State(state): State<AppState>, _: AdminUser) -> Json<AlertList> {
    let alerts = state
        .observability
        .alerts
        .snapshot()
        .into_iter()
        .map(|a| AlertView {
            rule: a.rule.name,
            metric: a.rule.metric.as_str(),
            above: a.rule.above,
            for_secs: a.rule.for_secs,
            state: a.state.as_str(),
            since: a.state.since_ms(),
            value: round(a.value),
            last_notified: a.last_notified_ms,
        })
        .collect();
    Json(AlertList { alerts })
}
