//! The egress proxy inside `polydev serve`, driven through the admin API
//! and curl.

use std::time::Duration;

use polydev_store::Backend;
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::app::TestApp;

/// An HTTP origin on loopback answering every request with `pong`.
async fn origin() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(|| async { "pong" });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn curl_via(proxy_url: &str, url: &str) -> (u16, String) {
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "--noproxy",
            "",
            "-w",
            "\n%{http_code}",
            "--proxy",
            proxy_url,
            url,
        ])
        .env_remove("http_proxy")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .output()
        .expect("curl is installed");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn admins_mint_and_revoke_proxy_credentials_and_users_see_their_usage() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("polydev.toml");
    std::fs::write(
        &config,
        "[egress]\nallow_private = [\"127.0.0.0/8\"]\nper_user_ports = false\nflush_interval_secs = 1\n",
    )
    .unwrap();
    let app = TestApp::spawn_with(Backend::Sqlite, &["--config", config.to_str().unwrap()]).await;
    let egress = app
        .egress
        .clone()
        .expect("the proxy runs in the controller by default");
    let admin = app.admin("root@example.com");
    let (ada_id, ada) = app.user("ada@example.com").await;
    let target = origin().await;

    let r = app
        .post(
            "/api/admin/egress/credentials",
            Some(&ada),
            json!({"userId": ada_id}),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = app
        .post(
            "/api/admin/egress/credentials",
            Some(&admin),
            json!({"userId": "nope"}),
        )
        .await;
    assert_eq!(r.error_code(), "invalid_uuid");
    let r = app
        .post(
            "/api/admin/egress/credentials",
            Some(&admin),
            json!({"userId": "0b7c6a1e-5b0d-4c84-9d57-1f1f0f6b2a11"}),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::NOT_FOUND, "user_not_found")
    );

    // A template without an allow-list (the default, runtime, has one).
    let minted = app
        .post(
            "/api/admin/egress/credentials",
            Some(&admin),
            json!({"userId": ada_id, "template": "minimal"}),
        )
        .await;
    assert_eq!(minted.status, StatusCode::CREATED, "{}", minted.text);
    let username = minted.body["username"].as_str().unwrap().to_owned();
    let password = minted.body["password"].as_str().unwrap().to_owned();
    let proxy_url = minted.body["proxyUrl"].as_str().unwrap().to_owned();
    assert_eq!(proxy_url, format!("http://{username}:{password}@{egress}"));

    let (code, body) = curl_via(&proxy_url, &format!("http://localhost:{}/", target.port()));
    assert_eq!((code, body.as_str()), (200, "pong"));
    let (code, _) = curl_via(
        &format!("http://{username}:wrong@{egress}"),
        &format!("http://localhost:{}/", target.port()),
    );
    assert_eq!(code, 407);

    // Usage reaches the store within a flush interval; each user sees their own.
    let sandbox = minted.body["sandboxId"].as_str().unwrap().to_owned();
    let usage = crate::app::eventually(Duration::from_secs(10), "usage is recorded", || async {
        let usage = app.get("/api/egress/usage", Some(&ada)).await;
        (usage.body["usage"][0]["requests"] == 1).then_some(usage)
    })
    .await;
    assert_eq!(usage.body["usage"][0]["sandboxId"], sandbox.as_str());
    assert!(usage.body["usage"][0]["bytesDown"].as_i64().unwrap() > 0);
    let root_id = app.get("/api/me", Some(&admin)).await.body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = app
        .get(&format!("/api/egress/usage?userId={root_id}"), Some(&ada))
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(
        app.get(&format!("/api/egress/usage?userId={ada_id}"), Some(&admin))
            .await
            .status,
        StatusCode::OK
    );

    let r = app
        .send(
            Method::DELETE,
            &format!("/api/admin/egress/credentials/{username}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let (code, _) = curl_via(&proxy_url, &format!("http://localhost:{}/", target.port()));
    assert_eq!(code, 407, "revoked credentials stop working at once");
    let r = app
        .send(
            Method::DELETE,
            &format!("/api/admin/egress/credentials/{username}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    // The secret never reaches the logs or the metrics; the proxy is in network-health.
    assert!(
        !app.settled_logs().await.contains(&password),
        "the proxy secret was logged"
    );
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!metrics.contains(&password) && metrics.contains("polydev_egress_requests_total 1"));
    let nh = app
        .get("/api/admin/health/network-health", Some(&admin))
        .await;
    let checks = nh.body["checks"].as_array().unwrap();
    assert!(
        checks
            .iter()
            .any(|c| c["name"] == "egress" && c["status"] == "ok"),
        "{}",
        nh.text
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_egress_off_the_credential_api_says_so() {
    let app = TestApp::spawn_with(Backend::Sqlite, &["--egress", "false"]).await;
    assert!(app.egress.is_none());
    let admin = app.admin("root@example.com");
    let (ada_id, _) = app.user("ada@example.com").await;
    let r = app
        .post(
            "/api/admin/egress/credentials",
            Some(&admin),
            json!({"userId": ada_id}),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::SERVICE_UNAVAILABLE, "egress_disabled")
    );
}
