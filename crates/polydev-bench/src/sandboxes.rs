//! `polydev-bench sandboxes`: the local driver on this host — cold create
//! to agent ready (one at a time, then 50 at once), warm hand-out through
//! the manager (pool + store), exec round trip, and idle density.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use polydev_sandbox::{
    CreateRequest, Driver, LocalDriver, Manager, ManagerConfig, SandboxId, SandboxSpec,
};
use serde_json::{json, Map, Value};

use crate::kit::percentile;
use crate::BenchArgs;

fn summary(v: Vec<f64>) -> (f64, f64) {
    (percentile(v.clone(), 0.5), percentile(v, 0.99))
}

fn spec() -> SandboxSpec {
    SandboxSpec {
        template: "minimal".into(),
        limits: Default::default(),
        network: Default::default(),
        env: vec![],
        labels: [("purpose".to_owned(), "bench".to_owned())].into(),
        ttl: Duration::from_secs(3600),
        egress: None,
        egress_auth: None,
    }
}

fn mem_available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

async fn timed_create(
    driver: &LocalDriver,
    image: &polydev_sandbox::Image,
) -> anyhow::Result<(SandboxId, f64)> {
    let id = SandboxId::generate();
    let t = Instant::now();
    driver
        .create(&id, &spec(), image, Duration::from_secs(30))
        .await?;
    Ok((id, t.elapsed().as_secs_f64() * 1000.0))
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("pdb").tempdir()?;
    let driver = Arc::new(
        polydev_sandbox::LocalDriver::for_data_dir(dir.path(), false)
            .map_err(anyhow::Error::msg)?,
    );
    let images = polydev_sandbox::ImageStore::new(dir.path().join("images"));
    let image = images.build_minimal(&driver.config().launcher)?;
    images.activate("minimal", &image.manifest.hash)?;
    let mut figures = Map::new();
    let mut put = |k: &str, v: Value| {
        figures.insert(k.to_owned(), v);
    };

    // Cold, one at a time.
    let mut cold = Vec::new();
    for _ in 0..100 {
        let (id, ms) = timed_create(&driver, &image).await?;
        cold.push(ms);
        driver.destroy(&id).await?;
    }
    let (p50, p99) = summary(cold);
    put("cold_p50_ms", json!(p50));
    put("cold_p99_ms", json!(p99));

    // Cold, 50 at once (two rounds).
    let mut conc = Vec::new();
    for _ in 0..2 {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..50 {
            let (d, img) = (driver.clone(), image.clone());
            set.spawn(async move { timed_create(&d, &img).await });
        }
        let mut ids = Vec::new();
        while let Some(r) = set.join_next().await {
            let (id, ms) = r??;
            conc.push(ms);
            ids.push(id);
        }
        for id in ids {
            driver.destroy(&id).await?;
        }
    }
    let (p50, p99) = summary(conc);
    put("cold_concurrent_p50_ms", json!(p50));
    put("cold_concurrent_p99_ms", json!(p99));

    // Exec round trip on an open agent connection (`/bin/true`).
    let (id, _) = timed_create(&driver, &image).await?;
    let mut agent = driver.agent(&id, Duration::from_secs(5)).await?;
    let mut rtt = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        agent
            .exec(&["/bin/true"], None, Duration::from_secs(5), |_| {})
            .await?;
        rtt.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let (p50, p99) = summary(rtt);
    put("exec_rtt_p50_ms", json!(p50));
    put("exec_rtt_p99_ms", json!(p99));
    drop(agent);
    driver.destroy(&id).await?;

    // Warm hand-out through the manager: pool pop + store update + read.
    let store = polydev_store::Store::connect(
        &polydev_store::Store::sqlite_url(dir.path()),
        &Default::default(),
    )
    .await?;
    store.migrate().await?;
    let user = polydev_domain::UserId::new();
    store
        .create_user(&polydev_store::NewUser {
            id: user,
            email: polydev_domain::Email::parse("bench@example.com")?,
            password_hash: None,
            role: polydev_domain::Role::User,
            created_at_ms: 0,
        })
        .await?;
    let cfg = ManagerConfig {
        pools: [("minimal".to_owned(), 100)].into(),
        per_user_max: 1000,
        // 100 hand-outs to one user: speed, not the per-user memory cap.
        per_user_memory: None,
        ..Default::default()
    };
    let manager = Manager::new(
        driver.clone(),
        store.clone(),
        images.clone(),
        cfg,
        polydev_telemetry::metrics::SandboxMetrics::register(&mut Default::default()),
    );
    manager.refill_pools().await?;
    let mut warm = Vec::new();
    for _ in 0..100 {
        let t = Instant::now();
        manager
            .create(
                user,
                CreateRequest {
                    template: "minimal".into(),
                    ..Default::default()
                },
            )
            .await?;
        warm.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let (p50, p99) = summary(warm);
    put("warm_p50_ms", json!(p50));
    put("warm_p99_ms", json!(p99));
    manager.shutdown().await;

    // Density: idle sandboxes (each with its agent) until the target.
    let target = args.idle_target;
    let before = mem_available_kib();
    let mut idle = Vec::new();
    let mut at = Map::new();
    let started = Instant::now();
    while idle.len() < target {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..(target - idle.len()).min(16) {
            let (d, img) = (driver.clone(), image.clone());
            set.spawn(async move { timed_create(&d, &img).await });
        }
        let mut failed = None;
        while let Some(r) = set.join_next().await {
            match r? {
                Ok((id, _)) => idle.push(id),
                Err(e) => failed = Some(e),
            }
        }
        for n in [100usize, 500, 1000, 2000] {
            if idle.len() >= n && !at.contains_key(&n.to_string()) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let cg: u64 = {
                    let mut sum = 0;
                    for id in &idle {
                        sum += driver.stats(id).await.map(|s| s.memory_bytes).unwrap_or(0);
                    }
                    sum
                };
                let host = before.saturating_sub(mem_available_kib()) as f64 / idle.len() as f64;
                at.insert(n.to_string(), json!({"cgroup_kib_per_sandbox": cg as f64 / 1024.0 / idle.len() as f64, "host_kib_per_sandbox": host}));
            }
        }
        if let Some(e) = failed {
            eprintln!("stopped at {} idle sandboxes: {e}", idle.len());
            break;
        }
    }
    let fill_secs = started.elapsed().as_secs_f64();
    put("idle_max", json!(idle.len()));
    put("idle_fill_secs", json!(fill_secs));
    let per = |n: &str, k: &str| {
        at.get(n)
            .and_then(|v| v.get(k))
            .cloned()
            .unwrap_or(Value::Null)
    };
    put("idle_rss_kib", per("100", "cgroup_kib_per_sandbox"));
    put("idle_100_host_kib", per("100", "host_kib_per_sandbox"));
    put("idle_500_cgroup_kib", per("500", "cgroup_kib_per_sandbox"));
    put("idle_500_host_kib", per("500", "host_kib_per_sandbox"));
    put("idle_2000_host_kib", per("2000", "host_kib_per_sandbox"));
    let t = Instant::now();
    for id in &idle {
        driver
            .destroy(id)
            .await
            .with_context(|| format!("destroy {id}"))?;
    }
    put("idle_teardown_secs", json!(t.elapsed().as_secs_f64()));
    store.close().await;
    driver.cgroups().remove_all(Duration::from_secs(10))?;

    crate::kit::report(args.json, figures);
    Ok(())
}
