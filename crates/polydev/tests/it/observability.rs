//! Metrics, host health, history and alerts, through the real binary.

use std::time::Duration;

use polydev_store::Backend;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::app::TestApp;

fn promtool(input: &str, args: &[&str]) -> std::process::Output {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed (scripts/test.sh installs the Debian prometheus package)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

async fn scrape(app: &TestApp) -> String {
    let r = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    r.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_after_real_traffic_pass_promtool_and_use_route_templates() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (user_id, token) = app.user("ada@example.com").await;
    app.get(&format!("/api/users/{user_id}"), Some(&token))
        .await;
    app.get("/api/users/not-a-uuid", Some(&token)).await;
    app.get("/api/no/such/route", None).await;
    let text = scrape(&app).await;

    let out = promtool(&text, &["check", "metrics"]);
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "http_request_duration_seconds_count{method=\"POST\",route=\"/api/users\",status_code=\"201\"} 1",
        "http_request_duration_seconds_count{method=\"GET\",route=\"/api/users/{id}\",status_code=\"200\"} 1",
        "http_request_duration_seconds_count{method=\"GET\",route=\"/api/users/{id}\",status_code=\"400\"} 1",
        "polydev_containers_active 0",
        "polydev_build_info{version=",
        "process_resident_memory_bytes ",
    ] {
        assert!(text.contains(needle), "missing {needle:?}");
    }
    // Bounded cardinality: no raw paths, no ids.
    assert!(
        !text.contains("not-a-uuid") && !text.contains(&user_id) && !text.contains("/api/no/such")
    );

    // Prometheus itself asks for OpenMetrics and gets it.
    let om = app
        .client
        .get(app.url("/metrics"))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
        )
        .send()
        .await
        .unwrap();
    assert!(om.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    assert!(om.text().await.unwrap().ends_with("# EOF\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn host_health_is_for_admins_and_its_values_are_sane() {
    // One upstream that answers, one that refuses connections.
    let up = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = up.local_addr().unwrap();
    let down_addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    tokio::spawn(async move {
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        axum::serve(up, app).await.unwrap();
    });
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("polydev.toml");
    std::fs::write(
        &config,
        format!("health_upstreams = [\"http://{up_addr}/\", \"http://{down_addr}/\"]\n"),
    )
    .unwrap();
    let app = TestApp::spawn_with(Backend::Sqlite, &["--config", config.to_str().unwrap()]).await;
    let admin = app.admin("root@example.com");
    let (_, user) = app.user("ada@example.com").await;

    let paths = [
        "system",
        "cpu",
        "memory",
        "disk",
        "network",
        "temperature",
        "network-health",
        "history?metric=cpu",
    ];
    for path in paths {
        let path = format!("/api/admin/health/{path}");
        assert_eq!(
            app.get(&path, None).await.status,
            StatusCode::UNAUTHORIZED,
            "{path}"
        );
        let r = app.get(&path, Some(&user)).await;
        assert_eq!(
            (r.status, r.error_code()),
            (StatusCode::FORBIDDEN, "forbidden"),
            "{path}"
        );
    }

    let s = app.get("/api/admin/health/system", Some(&admin)).await;
    assert_eq!(s.status, StatusCode::OK, "{}", s.text);
    let b = &s.body;
    let pct = |v: &Value| v.as_f64().is_some_and(|p| (0.0..=100.0).contains(&p));
    // Every figure must be there: a missing one is a failure, not a pass.
    let n = |v: &Value, what: &str| {
        v.as_u64()
            .unwrap_or_else(|| panic!("{what} is not a number: {v}"))
    };
    assert!(
        pct(&b["cpu"]["usage"])
            && n(&b["cpu"]["cores"], "cores") >= 1
            && b["cpu"]["model"].is_string(),
        "{b}"
    );
    let m = &b["memory"];
    let total = n(&m["total"], "memory total");
    assert!(
        total > 0
            && total >= n(&m["used"], "memory used")
            && total >= n(&m["free"], "memory free")
            && pct(&m["percent"]),
        "{m}"
    );
    let disks = b["disk"].as_array().unwrap();
    assert!(!disks.is_empty());
    for d in disks {
        let size = n(&d["size"], "disk size");
        assert!(
            size >= n(&d["used"], "disk used")
                && size >= n(&d["available"], "disk available")
                && pct(&d["percent"]),
            "{d}"
        );
        assert!(d["mount"].is_string() && d["filesystem"].is_string());
    }
    let ifaces = b["network"]["interfaces"].as_array().unwrap();
    assert!(ifaces
        .iter()
        .any(|i| i["name"] == "lo" && i["rx_bytes"].is_u64() && i["tx_bytes"].is_u64()));
    assert!(["up", "down"].contains(&b["network"]["status"].as_str().unwrap()));
    assert!(b["uptime"].as_u64() > Some(0));
    assert_eq!(b["load_average"].as_array().unwrap().len(), 3);
    // Temperature is absent (not null) in /system without a sensor, and
    // /temperature answers 200 with null or a reading, never 404.
    let t = app.get("/api/admin/health/temperature", Some(&admin)).await;
    assert_eq!(t.status, StatusCode::OK);
    assert_eq!(t.body.is_null(), b.get("temperature").is_none());
    assert!(pct(&app
        .get("/api/admin/health/memory", Some(&admin))
        .await
        .body["percent"]));

    let nh = app
        .get("/api/admin/health/network-health", Some(&admin))
        .await;
    assert_eq!(nh.body["status"], "degraded", "{}", nh.text);
    let checks = nh.body["checks"].as_array().unwrap();
    let status_of = |target: &str| {
        checks
            .iter()
            .find(|c| c["target"] == target)
            .map(|c| c["status"].clone())
    };
    assert_eq!(status_of("sqlite"), Some(json!("ok")));
    assert_eq!(status_of(&format!("http://{up_addr}/")), Some(json!("ok")));
    assert_eq!(
        status_of(&format!("http://{down_addr}/")),
        Some(json!("error"))
    );

    let h = app
        .get(
            "/api/admin/health/history?metric=network&range=24h",
            Some(&admin),
        )
        .await;
    assert_eq!(h.status, StatusCode::OK);
    assert_eq!(h.body["stepSecs"], 10);
    assert!(h.body["series"]["rx_bytes_per_sec"].is_array() && h.body["timestamps"].is_array());
    for bad in ["metric=swap", "metric=cpu&range=2d", "range=1h"] {
        let r = app
            .get(&format!("/api/admin/health/history?{bad}"), Some(&admin))
            .await;
        assert_eq!(
            (r.status, r.error_code()),
            (StatusCode::BAD_REQUEST, "invalid_query"),
            "{bad}"
        );
    }
}

/// A webhook receiver on loopback that hands each JSON body to the test.
async fn webhook_receiver() -> (String, mpsc::UnboundedReceiver<Value>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(body);
                "ok"
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, rx)
}

async fn next_hook(rx: &mut mpsc::UnboundedReceiver<Value>) -> Value {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a webhook notification within 10 s")
        .expect("receiver open")
}

#[tokio::test(flavor = "multi_thread")]
async fn an_alert_fires_to_a_webhook_and_resolves() {
    let (hook, mut hooks) = webhook_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let overrides = dir.path().join("host.json");
    std::fs::write(&overrides, r#"{"cpu": 10}"#).unwrap();
    let config = dir.path().join("polydev.toml");
    std::fs::write(
        &config,
        format!(
            "[alerts]\nwebhook_url = \"{hook}\"\ncooldown_secs = 0\n[[alerts.rules]]\nname = \"cpu_high\"\nmetric = \"cpu\"\nabove = 90\nfor_secs = 1\n"
        ),
    )
    .unwrap();
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        &[
            "--config",
            config.to_str().unwrap(),
            "--health-override-file",
            overrides.to_str().unwrap(),
            "--health-interval-ms",
            "200",
        ],
    )
    .await;
    let admin = app.admin("root@example.com");
    let state = |body: &Value| {
        body["alerts"][0]["state"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(
        state(&app.get("/api/admin/alerts", Some(&admin)).await.body),
        "ok"
    );

    std::fs::write(&overrides, r#"{"cpu": 97}"#).unwrap();
    let fired = next_hook(&mut hooks).await;
    let text = fired["text"].as_str().unwrap();
    assert!(
        text.contains("FIRING cpu_high") && text.contains("97.0%"),
        "{fired}"
    );
    assert_eq!(
        fired["content"], fired["text"],
        "Discord reads `content`, Slack `text`"
    );
    let alerts = app.get("/api/admin/alerts", Some(&admin)).await.body;
    assert_eq!(state(&alerts), "firing");
    assert!(alerts["alerts"][0]["lastNotified"].is_i64());
    assert!(scrape(&app)
        .await
        .contains("polydev_alerts_firing{rule=\"cpu_high\"} 1"));

    std::fs::write(&overrides, r#"{"cpu": 5}"#).unwrap();
    let resolved = next_hook(&mut hooks).await;
    assert!(
        resolved["text"]
            .as_str()
            .unwrap()
            .contains("RESOLVED cpu_high"),
        "{resolved}"
    );
    assert_eq!(resolved["alert"]["state"], "resolved");
    assert_eq!(
        state(&app.get("/api/admin/alerts", Some(&admin)).await.body),
        "ok"
    );
    let text = scrape(&app).await;
    assert!(
        text.contains("polydev_alert_notifications_total{outcome=\"ok\"} 2"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_shipped_grafana_dashboard_only_queries_exported_metrics() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{root}/deploy/grafana/polydev-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            exprs.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    assert!(exprs.len() >= 10);

    let app = TestApp::spawn(Backend::Sqlite).await;
    app.get("/api/auth/health", None).await;
    let text = scrape(&app).await;
    let exported: std::collections::HashSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let mut queried = std::collections::BTreeSet::new();
    for expr in &exprs {
        for token in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
            if ["http_", "polydev_", "process_"]
                .iter()
                .any(|p| token.starts_with(p))
            {
                queried.insert(token.to_owned());
            }
        }
    }
    let missing: Vec<_> = queried
        .iter()
        .filter(|m| !exported.contains(m.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics polydev does not export: {missing:?}"
    );

    let out = std::process::Command::new("promtool")
        .args(["check", "config"])
        .arg(format!("{root}/deploy/prometheus/prometheus.yml"))
        .output()
        .expect("promtool is installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
