//! `polydev serve` and `polydev migrate`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use std::sync::Arc;

use polydev_api::{AppState, HttpMetrics, Observability};
use polydev_egress::Egress;
use polydev_store::{Store, StoreOptions};
use polydev_telemetry::alerts::AlertEngine;
use polydev_telemetry::host::{HostMonitor, HostSource, OverrideSource, SysinfoSource};
use polydev_telemetry::metrics::{self, MetricsRegistry};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::{ServeConfig, StoreConfig};

/// How often background upkeep runs (expired sessions, rate-limit keys).
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(60);

/// Connects to the store and applies pending migrations.
pub async fn open_store(config: &StoreConfig) -> anyhow::Result<Store> {
    let url = config.database_url()?;
    let store = Store::connect(&url, &StoreOptions::default())
        .await
        .with_context(|| format!("cannot open the store ({})", config.describe()))?;
    let applied = store
        .migrate()
        .await
        .with_context(|| format!("cannot migrate the store ({})", config.describe()))?;
    for m in &applied {
        tracing::info!(version = m.version, description = %m.description, "applied migration");
    }
    Ok(store)
}

pub async fn migrate_only(
    config: &StoreConfig,
    dir: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let store = match dir {
        None => open_store(config).await?,
        Some(dir) => {
            let url = config.database_url()?;
            let store = Store::connect(&url, &StoreOptions::default())
                .await
                .with_context(|| format!("cannot open the store ({})", config.describe()))?;
            let sub = dir.join(store.backend().as_str());
            let dir = if sub.is_dir() { sub } else { dir.to_owned() };
            let applied = store.migrate_dir(&dir).await.with_context(|| {
                format!(
                    "cannot migrate the store ({}) from {}",
                    config.describe(),
                    dir.display()
                )
            })?;
            for m in &applied {
                tracing::info!(version = m.version, description = %m.description, "applied migration");
            }
            store
        }
    };
    let versions = store.applied_versions().await?;
    let report = serde_json::json!({
        "store": config.describe(),
        "backend": store.backend().as_str(),
        "version": versions.last().copied().unwrap_or(0),
    });
    println!("{report}");
    store.close().await;
    Ok(())
}

/// A registry with what every polydev process exports: build info and
/// process metrics.
fn base_registry() -> MetricsRegistry {
    let mut registry = MetricsRegistry::default();
    metrics::register_build_info(
        &mut registry,
        env!("CARGO_PKG_VERSION"),
        env!("POLYDEV_GIT_SHA"),
    );
    registry.register_collector(Box::new(metrics::ProcessCollector));
    registry
}

/// Assembles the metrics registry, the host monitor and (when enabled) the
/// egress proxy, whose metrics join the registry; returns them with the
/// host source the sampler will read.
/// The parts `assemble` makes: observability, the host source, the egress
/// proxy (when on) and the sandbox metrics.
type Assembled = (
    Observability,
    Box<dyn HostSource>,
    Option<Egress>,
    metrics::SandboxMetrics,
    metrics::LoginMetrics,
);

fn assemble(config: &ServeConfig, store: &Store) -> anyhow::Result<Assembled> {
    let mut registry = base_registry();
    let http = config
        .http_metrics
        .then(|| HttpMetrics::register(&mut registry));
    // Registered now so their series exist; fed by the parts as they land.
    let sandbox_metrics = metrics::SandboxMetrics::register(&mut registry);
    let login_metrics = metrics::LoginMetrics::register(&mut registry);
    let alerts = Arc::new(AlertEngine::new(&config.alerts, &mut registry));
    let egress = if config.egress.enabled {
        Some(Egress::new(
            config.egress.clone(),
            store.clone(),
            &mut registry,
        )?)
    } else {
        None
    };
    let source: Box<dyn HostSource> = match &config.health_override_file {
        Some(path) => {
            Box::new(OverrideSource::new(path.clone()).context("cannot read this host's health")?)
        }
        None => Box::new(SysinfoSource::new().context("cannot read this host's health")?),
    };
    Ok((
        Observability {
            registry: Arc::new(registry),
            http,
            host: Arc::new(HostMonitor::default()),
            alerts,
        },
        source,
        egress,
        sandbox_metrics,
        login_metrics,
    ))
}

pub async fn run(config: ServeConfig) -> anyhow::Result<()> {
    let listener = if config.listen_stdin {
        inherited_listener()?
    } else {
        bind(config.listen).await?
    };
    let store = open_store(&config.store).await?;
    let (observability, host_source, egress, sandbox_metrics, login_metrics) =
        assemble(&config, &store)?;
    let sandboxes = crate::sandbox_cli::manager(
        &config.store.data_dir,
        &config.store.images_dir,
        &config.sandbox,
        &store,
        sandbox_metrics,
    )
    .await;
    if let (Ok(m), Some(e)) = (&sandboxes, &egress) {
        m.set_egress(Arc::new(crate::sandbox_cli::EgressGateway(e.clone())));
    }
    match &sandboxes {
        Ok(m) => {
            tracing::info!(driver = m.driver_name(), templates = ?m.images().templates(), "sandboxes enabled")
        }
        Err(why) => tracing::warn!(reason = %why, "sandboxes unavailable"),
    }
    let egress_listener = match &egress {
        Some(e) => {
            let listener = e.bind().await?;
            // Logged before the API's "listening", which tells callers all is up.
            tracing::info!(addr = %listener.local_addr().context("cannot read the egress address")?, "egress proxy listening");
            Some(listener)
        }
        None => None,
    };
    let state = AppState::new(
        store.clone(),
        config.api.clone(),
        observability.clone(),
        egress.clone(),
    )
    .with_sandboxes(sandboxes.clone())
    .with_runs(match (&sandboxes, &egress) {
        (Ok(m), Some(_)) => Some(polydev_sessions::runs::Runs::new(
            m.clone(),
            store.clone(),
            config.runs.clone(),
        )),
        _ => None,
    });
    let logins = match (&sandboxes, &egress) {
        (Ok(m), Some(_)) => Some(
            polydev_sessions::login::Logins::new(
                m.clone(),
                store.clone(),
                config.login.clone(),
                login_metrics,
            )
            .await
            .context("cannot start login sessions")?,
        ),
        _ => None,
    };
    let state = state.with_logins(logins.clone());
    // While handing over to a new release (supervised), every response says
    // `Connection: close`, so keep-alive clients reconnect — to the shared
    // socket, where the new process accepts — instead of racing our close.
    let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = draining.clone();
    let app = polydev_api::router(state.clone()).layer(axum::middleware::map_response(
        move |mut resp: axum::response::Response| {
            let flag = flag.clone();
            async move {
                // Not on a WebSocket's 101, whose `Connection: upgrade` the
                // browser checks.
                if flag.load(std::sync::atomic::Ordering::Relaxed)
                    && resp.status() != axum::http::StatusCode::SWITCHING_PROTOCOLS
                {
                    resp.headers_mut().insert(
                        axum::http::header::CONNECTION,
                        axum::http::HeaderValue::from_static("close"),
                    );
                }
                resp
            }
        },
    ));
    let addr = listener
        .local_addr()
        .context("cannot read the listening address")?;
    if !addr.ip().is_loopback() {
        if !config.api.cookie_secure {
            tracing::warn!(addr = %addr, "listening beyond loopback with --cookie-secure false: session cookies travel in clear text unless TLS ends here; put polydev behind TLS (deploy/nginx/polydev.conf) and set --cookie-secure true");
        }
        if config.api.trusted_proxies.is_empty() {
            tracing::warn!(addr = %addr, "listening beyond loopback without --trusted-proxies: behind a reverse proxy every client shares its address, so one client's failed logins limit everybody; name the proxy with --trusted-proxies");
        }
    }
    tracing::info!(addr = %addr, store = %config.store.describe(), "listening");

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let (streams, runs) = (state.tasks.clone(), state.runs.clone());
    tasks.spawn(housekeeping(state, stop_rx.clone()));
    {
        // On shutdown, live runs and login sessions end (their sandboxes go,
        // their states are stored), their tasks and the streams' pumps are
        // joined: open event streams end, so the drain need not wait for them.
        let mut stop = stop_rx.clone();
        tasks.spawn(async move {
            let _ = stop.changed().await;
            if let Some(runs) = runs {
                runs.shutdown().await;
            }
            if let Some(logins) = logins {
                logins.shutdown().await;
            }
            streams.shutdown(Duration::from_secs(1)).await;
        });
    }
    if let Ok(manager) = sandboxes {
        // First start: the images runs and logins need, built meanwhile.
        let (m, dir, mirror, mut stop) = (
            manager.clone(),
            config.store.data_dir.clone(),
            config.sandbox.debian_mirror.clone(),
            stop_rx.clone(),
        );
        tasks.spawn(async move {
            tokio::select! {
                _ = crate::sandbox_cli::prepare(m, dir, mirror) => {}
                _ = stop.changed() => {}
            }
        });
        tasks.spawn(manager.run(stop_rx.clone()));
    }
    if let (Some(egress), Some(listener)) = (egress, egress_listener) {
        tasks.spawn(egress.run(listener, stop_rx.clone()));
    }
    tasks.spawn(polydev_telemetry::run_sampler(
        observability.host.clone(),
        observability.alerts.clone(),
        host_source,
        config.health_interval,
        stop_rx.clone(),
    ));

    let mut graceful = stop_rx.clone();
    // TCP_NODELAY on every connection; the peer on every request.
    let mut server = Box::pin(polydev_api::serve(listener, app, async move {
        let _ = graceful.changed().await;
    }));

    let result = tokio::select! {
        result = &mut server => result.context("the HTTP server failed"),
        signal = shutdown_signal() => {
            tracing::info!(signal, drain_secs = config.shutdown_timeout.as_secs(), "shutting down; finishing in-flight requests");
            let mut ended = None;
            if config.listen_stdin {
                draining.store(true, std::sync::atomic::Ordering::Relaxed);
                tokio::select! {
                    _ = tokio::time::sleep(HANDOVER_GRACE) => {}
                    result = &mut server => ended = Some(result),
                }
            }
            let _ = stop_tx.send(true);
            match ended {
                Some(result) => result.context("the HTTP server failed"),
                None => match tokio::time::timeout(config.shutdown_timeout, &mut server).await {
                    Ok(result) => result.context("the HTTP server failed while draining"),
                    Err(_) => {
                        tracing::warn!("drain deadline passed; closing the remaining connections");
                        Ok(())
                    }
                },
            }
        }
    };
    // Past the drain deadline: the connections still open end here.
    drop(server);
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    store.close().await;
    tracing::info!("stopped");
    result
}

/// How long a supervised controller keeps answering (with `Connection:
/// close`) after SIGTERM before it stops accepting and closes idle
/// connections.
const HANDOVER_GRACE: Duration = Duration::from_secs(1);

/// The listening socket a supervisor passed as stdin: shared with the
/// process being replaced, so no connection is refused during a handover.
fn inherited_listener() -> anyhow::Result<TcpListener> {
    use std::os::fd::AsFd;
    let fd = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .context("cannot take the listening socket from stdin")?;
    let std_listener = std::net::TcpListener::from(fd);
    std_listener
        .local_addr()
        .context("stdin is not a listening TCP socket")?;
    std_listener.set_nonblocking(true)?;
    TcpListener::from_std(std_listener).context("cannot use the inherited listening socket")
}

/// Binds the listening socket, with a one-line reason when it cannot.
async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::AddrInUse => {
                "address already in use (another process has the port; choose one with --listen)"
                    .to_owned()
            }
            std::io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
            std::io::ErrorKind::AddrNotAvailable => "address not available on this host".to_owned(),
            _ => e.to_string(),
        };
        anyhow::anyhow!("cannot listen on {addr}: {why}")
    })
}

async fn housekeeping(state: AppState, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(HOUSEKEEPING_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => state.housekeeping().await,
            _ = stop.changed() => return,
        }
    }
}

/// Resolves with the signal's name on SIGTERM or SIGINT.
async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; only Ctrl-C will stop the server");
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        }
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    }
}

/// `polydev egress`: the proxy alone, against the shared store, with an
/// optional /metrics and /healthz listener.
pub async fn egress_only(
    store_config: &StoreConfig,
    config: polydev_egress::EgressConfig,
    metrics_listen: Option<SocketAddr>,
) -> anyhow::Result<()> {
    let store = open_store(store_config).await?;
    let mut registry = base_registry();
    let egress = Egress::new(config, store.clone(), &mut registry)?;
    let listener = egress.bind().await?;
    let registry = Arc::new(registry);
    tracing::info!(addr = %listener.local_addr()?, "egress proxy listening");
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    tasks.spawn(egress.run(listener, stop_rx.clone()));
    if let Some(addr) = metrics_listen {
        let listener = bind(addr).await?;
        let app = axum::Router::new()
            .route(
                "/healthz",
                axum::routing::get(|| async {
                    axum::Json(serde_json::json!({"status": "healthy"}))
                }),
            )
            .route(
                "/metrics",
                axum::routing::get(move || {
                    let registry = registry.clone();
                    async move { metrics::encode_prometheus_text(&registry) }
                }),
            );
        let mut stop = stop_rx.clone();
        tasks.spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.changed().await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "egress metrics listener failed");
            }
        });
    }
    let signal = shutdown_signal().await;
    tracing::info!(signal, "egress proxy shutting down");
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    store.close().await;
    Ok(())
}
