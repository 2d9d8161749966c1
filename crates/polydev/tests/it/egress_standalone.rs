//! `polydev egress` on its own, sharing the store with a controller.

use std::process::{Command, Stdio};
use std::time::Duration;

use polydev_store::Store;

use crate::app::{eventually, BIN};

#[tokio::test(flavor = "multi_thread")]
async fn the_standalone_proxy_serves_credentials_minted_into_the_shared_store() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("polydev.toml"),
        "[egress]\nallow_private = [\"127.0.0.0/8\"]\nper_user_ports = false\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["user", "add", "--email", "ada@example.com", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let user: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let user_id = polydev_domain::UserId::parse("id", user["id"].as_str().unwrap()).unwrap();

    // A controller elsewhere mints into the shared store.
    let store = Store::connect(&Store::sqlite_url(dir.path()), &Default::default())
        .await
        .unwrap();
    let config = polydev_egress::EgressConfig {
        per_user_ports: false,
        ..Default::default()
    };
    let minter =
        polydev_egress::Egress::new(config, store.clone(), &mut Default::default()).unwrap();
    let access = minter.mint(user_id, "sandbox-1", "minimal").await.unwrap();

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(BIN)
        .args(["egress", "--egress-listen", &format!("127.0.0.1:{port}")])
        .args([
            "--metrics-listen",
            &format!("127.0.0.1:{metrics_port}"),
            "--data-dir",
        ])
        .arg(dir.path())
        .arg("--config")
        .arg(dir.path().join("polydev.toml"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    eventually(
        Duration::from_secs(20),
        "polydev egress listens",
        || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
        },
    )
    .await;
    let origin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin_addr = origin.local_addr().unwrap();
    tokio::spawn(async move {
        let app = axum::Router::new().fallback(|| async { "via standalone" });
        axum::serve(origin, app).await.unwrap();
    });
    let proxy_url = format!(
        "http://{}:{}@127.0.0.1:{port}",
        access.credential.username, access.credential.secret
    );
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(&proxy_url).unwrap())
        .build()
        .unwrap();
    let body = client
        .get(format!("http://{origin_addr}/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "via standalone");

    let metrics = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("polydev_egress_requests_total 1"),
        "{metrics}"
    );
    // Revoked elsewhere: the standalone cache forgets it within its TTL
    // (2 s; the deadline leaves room for a slow machine).
    store
        .revoke_egress_credential(&access.credential.username, 0)
        .await
        .unwrap();
    // Until then it still serves: those requests are usage too.
    let served = std::cell::Cell::new(1i64);
    eventually(
        Duration::from_secs(6),
        "the revoked credential is refused",
        || async {
            let r = client
                .get(format!("http://{origin_addr}/"))
                .send()
                .await
                .unwrap();
            if r.status() == reqwest::StatusCode::PROXY_AUTHENTICATION_REQUIRED {
                return Some(());
            }
            assert_eq!(r.text().await.unwrap(), "via standalone");
            served.set(served.get() + 1);
            None
        },
    )
    .await;

    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = polydev_testkit::eventually_blocking(
        Duration::from_secs(15),
        "polydev egress exits on SIGTERM",
        || child.try_wait().unwrap(),
    );
    assert!(status.success(), "{status:?}");
    // Usage was flushed at shutdown.
    let usage = store.egress_usage(user_id).await.unwrap();
    assert_eq!((usage.len(), usage[0].requests), (1, served.get()));
}
