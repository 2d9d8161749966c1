//! The binary as a process: start-up errors, signals, the CLI, secrets in
//! logs and at rest, the web UI. On SQLite only: none of it depends on the
//! backend (the API suite covers both).

use std::process::Command;
use std::time::Duration;

use polydev_store::Backend;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::app::{login_body, signup, wrong_login_body, TestApp, BIN};

#[tokio::test]
async fn a_port_in_use_is_a_clear_start_up_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(BIN)
            .args(["serve", "--listen", &addr, "--data-dir"])
            .arg(dir.path())
            .output(),
    )
    .await
    .expect("polydev exits instead of hanging")
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    assert_eq!(last, format!("error: cannot listen on {addr}: address already in use (another process has the port; choose one with --listen)"));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_in_flight_requests_finish_then_exits_cleanly() {
    let mut app = TestApp::spawn(Backend::Sqlite).await;
    // Sign-ups hash login credentials (tens of ms each, four at a time), so
    // twenty of them are still in flight when the signal lands. (One set of
    // derived keys serves every body: the server checks shapes only.)
    let (template, _) = signup("u@example.com", "correct horse");
    let requests: Vec<_> = (0..20)
        .map(|i| {
            let mut body = template.clone();
            body["email"] = json!(format!("u{i}@example.com"));
            body["userId"] = json!(uuid::Uuid::new_v4().to_string());
            app.client.post(app.url("/api/users")).json(&body).send()
        })
        .collect();
    let all = tokio::spawn(futures_join_all(requests));
    // Wait until the server has accepted work, then signal.
    // Polled every 2 ms: the signal must land while requests are in flight.
    polydev_testkit::eventually_every(
        Duration::from_millis(2),
        Duration::from_secs(10),
        "a request reaches the server",
        || async { app.logs().contains("user signed up").then_some(()) },
    )
    .await;
    let status = Command::new("kill")
        .args(["-TERM", &app.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let statuses = all.await.unwrap();
    assert!(
        statuses.iter().all(|s| *s == Some(StatusCode::CREATED)),
        "some in-flight requests failed: {statuses:?}"
    );
    let exit = tokio::task::block_in_place(|| app.wait_exit(Duration::from_secs(15)));
    assert!(exit.success(), "exit status {exit:?}");
    // The process has exited; its last lines may still be in the pipe.
    assert!(app.wait_for_log("\"stopped\"").await, "{}", app.logs());
    assert!(app.logs().contains("shutting down"));
}

async fn futures_join_all(
    requests: Vec<
        impl std::future::Future<Output = reqwest::Result<reqwest::Response>> + Send + 'static,
    >,
) -> Vec<Option<StatusCode>> {
    let handles: Vec<_> = requests.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.ok().and_then(|r| r.ok()).map(|r| r.status()));
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn user_add_and_migrate_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .arg("--data-dir")
            .arg(dir.path())
            .output()
            .unwrap()
    };
    let out = run(&["migrate"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["backend"], "sqlite");
    assert!(report["version"].as_i64().unwrap() >= 1);

    let out = run(&["user", "add", "--email", "ops@example.com"]);
    assert!(out.status.success());
    let user: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(user["role"], "user");
    assert!(user["token"].as_str().unwrap().starts_with("pd_"));
    uuid::Uuid::parse_str(user["id"].as_str().unwrap()).unwrap();

    let out = run(&["user", "add", "--email", "OPS@example.com"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    let out = run(&["user", "add", "--email", "not an email"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("email"));
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_never_reach_the_logs_or_the_store_in_plaintext() {
    use base64::Engine;
    let app = TestApp::spawn(Backend::Sqlite).await; // logs at debug
    let password = "canary-pw-5d81c7e2f0";
    let (body, e) = signup("ada@example.com", password);
    assert!(
        !body.to_string().contains(password),
        "the password itself is never sent"
    );
    let credential =
        base64::engine::general_purpose::STANDARD.encode(e.login_credential.as_bytes());
    let r = app.post("/api/users", None, body).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = app
        .post("/api/auth/login", None, login_body("ada@example.com", &e))
        .await;
    let token = r.body["token"].as_str().unwrap().to_owned();
    assert_eq!(
        app.get("/api/me", Some(&token)).await.status,
        StatusCode::OK
    );
    // A failed login must not be logged with its credential either.
    let wrong = wrong_login_body("ada@example.com");
    app.post("/api/auth/login", None, wrong.clone()).await;
    let wrong_credential = wrong["loginCredential"].as_str().unwrap().to_owned();

    let logs = app.settled_logs().await;
    assert!(
        logs.contains("user signed in"),
        "logs were not captured:\n{logs}"
    );
    for secret in [
        password,
        credential.as_str(),
        wrong_credential.as_str(),
        token.as_str(),
    ] {
        assert!(!logs.contains(secret), "a secret reached the logs");
    }
    let at_rest = app.at_rest();
    assert!(
        at_rest.contains("ada@example.com"),
        "store files were not read"
    );
    for secret in [password, credential.as_str(), token.as_str()] {
        assert!(!at_rest.contains(secret), "a secret is stored in plaintext");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_web_ui_and_the_openapi_document_are_served() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    // The binary tells the API what it is (the route itself is tested in
    // polydev-api's suite); not started from a release directory.
    let h = app.get("/api/auth/health", None).await;
    assert_eq!(h.body["version"], env!("CARGO_PKG_VERSION"), "{}", h.text);
    assert!(h.body["gitSha"].is_string(), "{}", h.text);
    assert_eq!(h.body["release"], serde_json::Value::Null);
    for path in ["/", "/login", "/signup"] {
        let r = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html"));
        assert!(r.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("default-src 'self'"));
        assert!(
            r.text()
                .await
                .unwrap()
                .contains("<script type=\"module\" src=\"/app.js\">"),
            "{path}"
        );
    }
    let js = app.client.get(app.url("/app.js")).send().await.unwrap();
    assert!(js.headers()["content-type"]
        .to_str()
        .unwrap()
        .contains("javascript"));
    let missing = app.get("/missing.js", None).await;
    assert_eq!(
        (missing.status, missing.error_code()),
        (StatusCode::NOT_FOUND, "not_found")
    );

    let doc = app.get("/api/openapi.json", None).await;
    assert_eq!(doc.status, StatusCode::OK);
    assert_eq!(
        doc.text,
        polydev_api::openapi_json(),
        "served document differs from the generated one"
    );
    assert!(doc.body["paths"]["/api/auth/start"]["post"].is_object());
}

#[tokio::test(flavor = "multi_thread")]
async fn behind_a_trusted_proxy_the_login_limit_counts_forwarded_clients() {
    let attempt = |app: &TestApp, forwarded: &str| {
        app.client
            .post(app.url("/api/auth/login"))
            .header("x-forwarded-for", forwarded.to_owned())
            .json(&wrong_login_body(&format!(
                "{}@example.com",
                forwarded.replace('.', "-")
            )))
            .send()
    };
    let limits = [
        "--login-per-ip-per-minute",
        "2",
        "--login-per-account-per-minute",
        "100",
    ];
    // Trusted: each forwarded client has its own budget.
    let mut args = limits.to_vec();
    args.extend(["--trusted-proxies", "127.0.0.1/32"]);
    let app = TestApp::spawn_with(Backend::Sqlite, &args).await;
    for client in ["203.0.113.1", "203.0.113.2", "203.0.113.3"] {
        assert_eq!(
            attempt(&app, client).await.unwrap().status(),
            StatusCode::UNAUTHORIZED
        );
    }
    for expected in [StatusCode::UNAUTHORIZED, StatusCode::TOO_MANY_REQUESTS] {
        assert_eq!(
            attempt(&app, "203.0.113.1").await.unwrap().status(),
            expected
        );
    }
    // Not trusted (the default): the header is ignored, so it cannot dodge the limit.
    let app = TestApp::spawn_with(Backend::Sqlite, &limits).await;
    let codes = [
        attempt(&app, "203.0.113.1").await.unwrap().status(),
        attempt(&app, "203.0.113.2").await.unwrap().status(),
        attempt(&app, "203.0.113.3").await.unwrap().status(),
    ];
    assert_eq!(
        codes,
        [
            StatusCode::UNAUTHORIZED,
            StatusCode::UNAUTHORIZED,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
}
