//! The router in-process, over a real store (SQLite, and PostgreSQL when
//! `POLYDEV_TEST_PG_URL` is set): route, auth and error-shape behaviour
//! without spawning the binary. What needs a process (signals, logs,
//! sockets, the kernel) stays in `crates/polydev/tests/it`.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Method, Request, StatusCode};
use polydev_api::{ApiConfig, AppState, HttpMetrics, Observability};
use polydev_domain::{Email, Role, UserId};
use polydev_store::testing::TestDatabase;
use polydev_store::{now_ms, Backend, NewToken, NewUser, TokenKind};
use secrecy::ExposeSecret;
use serde_json::{json, Value};
use tower::ServiceExt;

struct App {
    db: TestDatabase,
    router: axum::Router,
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Value,
    text: String,
}

impl Answer {
    fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or_default()
    }
    fn message(&self) -> &str {
        self.body["error"]["message"].as_str().unwrap_or_default()
    }
}

impl App {
    async fn new(backend: Backend, config: ApiConfig) -> Self {
        let db = TestDatabase::new(backend).await;
        let store = db.store().await;
        let mut registry = polydev_telemetry::metrics::MetricsRegistry::default();
        let http = Some(HttpMetrics::register(&mut registry));
        let alerts = Arc::new(polydev_telemetry::alerts::AlertEngine::new(
            &Default::default(),
            &mut registry,
        ));
        let observability = Observability {
            registry: Arc::new(registry),
            http,
            host: Arc::new(polydev_telemetry::host::HostMonitor::default()),
            alerts,
        };
        let state = AppState::new(store, config, observability, None);
        Self {
            db,
            router: polydev_api::router(state),
        }
    }

    /// One request through the whole router (layers included).
    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<(&str, Vec<u8>)>,
        request_id: Option<&str>,
    ) -> Answer {
        let bearer = token.map(|t| format!("Bearer {t}"));
        let mut headers = Vec::new();
        if let Some(b) = &bearer {
            headers.push(("authorization", b.as_str()));
        }
        if let Some(id) = request_id {
            headers.push(("x-request-id", id));
        }
        self.send(method, path, &headers, body).await
    }

    /// A request with headers of the caller's choosing (a cookie) and a
    /// JSON body or none.
    async fn call_with(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Answer {
        let body = body.map(|b| ("application/json", serde_json::to_vec(&b).unwrap()));
        self.send(method, path, headers, body).await
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<(&str, Vec<u8>)>,
    ) -> Answer {
        let mut req = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = match body {
            Some((content_type, bytes)) => req
                .header("content-type", content_type)
                .body(Body::from(bytes)),
            None => req.body(Body::empty()),
        };
        let mut req = req.unwrap();
        req.extensions_mut()
            .insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40000))));
        let res = self.router.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        Answer {
            status,
            headers,
            body: serde_json::from_str(&text).unwrap_or(Value::Null),
            text,
        }
    }

    async fn get(&self, path: &str, token: Option<&str>) -> Answer {
        self.call(Method::GET, path, token, None, None).await
    }

    async fn post_json(&self, path: &str, body: Value) -> Answer {
        let bytes = serde_json::to_vec(&body).unwrap();
        self.call(
            Method::POST,
            path,
            None,
            Some(("application/json", bytes)),
            None,
        )
        .await
    }

    /// A user straight in the store, with an API token (as `user add`
    /// makes), created at `at_ms`: (id, token).
    async fn user_with_token(&self, email: &str, role: Role, at_ms: i64) -> (UserId, String) {
        let store = self.db.store().await;
        let id = UserId::new();
        store
            .create_user(&NewUser {
                id,
                email: Email::parse(email).unwrap(),
                password_hash: None,
                role,
                created_at_ms: at_ms,
            })
            .await
            .unwrap();
        let minted = polydev_api::mint_token();
        store
            .create_token(&NewToken {
                user_id: id,
                kind: TokenKind::Api,
                token_hash: minted.hash.clone(),
                created_at_ms: now_ms(),
                expires_at_ms: None,
            })
            .await
            .unwrap();
        (id, minted.token.expose_secret().to_owned())
    }
}

/// A sign-up body with real vault key material for `email`.
fn signup(email: &str, password: &str) -> Value {
    polydev_testkit::signup(email, password).0
}

async fn bad_input_gets_a_clear_error_in_one_shape(backend: Backend) {
    let app = App::new(
        backend,
        ApiConfig {
            body_limit: 4096,
            ..Default::default()
        },
    )
    .await;
    let (_, admin) = app
        .user_with_token("root@example.com", Role::Admin, now_ms())
        .await;
    let ada = app
        .post_json("/api/users", signup("ada@example.com", "correct horse"))
        .await;
    assert_eq!(ada.status, StatusCode::CREATED, "{}", ada.text);

    let bad_uuid = app.get("/api/users/not-a-uuid", Some(&admin)).await;
    assert_eq!(
        (bad_uuid.status, bad_uuid.code()),
        (StatusCode::BAD_REQUEST, "invalid_uuid")
    );
    assert!(
        bad_uuid.message().contains("id must be a UUID"),
        "{}",
        bad_uuid.message()
    );
    let unknown_user = app
        .get(
            "/api/users/6f1c1a2e-0000-4000-8000-000000000000",
            Some(&admin),
        )
        .await;
    assert_eq!(
        (unknown_user.status, unknown_user.code()),
        (StatusCode::NOT_FOUND, "user_not_found")
    );

    let dup = app
        .post_json("/api/users", signup("ADA@example.com", "another one"))
        .await;
    assert_eq!(
        (dup.status, dup.code()),
        (StatusCode::CONFLICT, "email_taken")
    );
    let r = app
        .post_json("/api/users", signup("ada", "correct horse"))
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::BAD_REQUEST, "invalid_email")
    );
    let mut short = signup("bo@example.com", "correct horse");
    short["loginCredential"] = json!("c2hvcnQ=");
    let r = app.post_json("/api/users", short).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::BAD_REQUEST, "invalid_login_credential")
    );
    let r = app
        .post_json("/api/users", json!({"email": "bo@example.com"}))
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::BAD_REQUEST, "invalid_body")
    );
    assert!(r.message().contains("missing field"), "{}", r.message());

    let raw = |body: &str, content_type: &'static str| {
        let bytes = body.as_bytes().to_vec();
        app.call(
            Method::POST,
            "/api/users",
            None,
            Some((content_type, bytes)),
            None,
        )
    };
    let r = raw("{\"email\":", "application/json").await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::BAD_REQUEST, "malformed_json")
    );
    let r = raw("email=a", "application/x-www-form-urlencoded").await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
    );
    let big = format!(
        "{{\"email\":\"{}@example.com\",\"password\":\"correct horse\"}}",
        "a".repeat(8000)
    );
    let r = raw(&big, "application/json").await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
    );

    let r = app
        .call(Method::DELETE, "/api/users", None, None, None)
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
    );
    let r = app.get("/api/no/such/route", None).await;
    assert_eq!((r.status, r.code()), (StatusCode::NOT_FOUND, "not_found"));
    let r = app.get("/api/me", None).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );
    let r = app.get("/api/me", Some("pd_not-a-token")).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );

    // A caller's request id is echoed (that it reaches the log, every
    // binary test that reads the log proves: `TestApp::settled_logs`).
    let r = app
        .call(Method::GET, "/api/me", None, None, Some("trace-me-42"))
        .await;
    assert_eq!(r.headers["x-request-id"], "trace-me-42");

    // None of the errors above leaked the database's own words.
    let bodies = [&dup.text, &unknown_user.text, &bad_uuid.text].map(|t| t.to_lowercase());
    for leak in [
        "unique constraint",
        "duplicate key",
        "violates",
        "invalid input syntax",
        "sqlx",
        "database",
    ] {
        assert!(
            bodies.iter().all(|b| !b.contains(leak)),
            "{leak} leaked: {bodies:?}"
        );
    }
}

async fn admin_routes_need_the_admin_role(backend: Backend) {
    let app = App::new(backend, ApiConfig::default()).await;
    let (admin_id, admin) = app
        .user_with_token("root@example.com", Role::Admin, 1)
        .await;
    let (user_id, user) = app.user_with_token("ada@example.com", Role::User, 2).await;

    let list = app.get("/api/admin/users", Some(&admin)).await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.text);
    assert_eq!(list.body["total"], 2);
    let emails: Vec<_> = list.body["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["email"].clone())
        .collect();
    assert_eq!(
        emails,
        [json!("root@example.com"), json!("ada@example.com")]
    );

    let forbidden = app.get("/api/admin/users", Some(&user)).await;
    assert_eq!(
        (forbidden.status, forbidden.code()),
        (StatusCode::FORBIDDEN, "forbidden")
    );
    for token in [None, Some("pd_not-a-real-token")] {
        let r = app.get("/api/admin/users", token).await;
        assert_eq!(
            (r.status, r.code()),
            (StatusCode::UNAUTHORIZED, "unauthorized")
        );
    }
    let bad_page = app.get("/api/admin/users?limit=0", Some(&admin)).await;
    assert_eq!(bad_page.code(), "invalid_query");
    let bad_type = app.get("/api/admin/users?limit=lots", Some(&admin)).await;
    assert_eq!(bad_type.code(), "invalid_query");

    // Admins may look anyone up; users only themselves.
    let r = app
        .get(&format!("/api/users/{user_id}"), Some(&admin))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = app.get(&format!("/api/users/{user_id}"), Some(&user)).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = app
        .get(&format!("/api/users/{admin_id}"), Some(&user))
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

async fn sign_up_log_in_and_use_the_token(backend: Backend) {
    let app = App::new(backend, ApiConfig::default()).await;
    let (ada_signup, ada) = polydev_testkit::signup("Ada@Example.com", "correct horse");
    let r = app.post_json("/api/users", ada_signup).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["email"], "ada@example.com");
    assert_eq!(r.body["role"], "user");
    let id = r.body["id"].as_str().unwrap().to_owned();
    assert_eq!(r.headers["location"], format!("/api/users/{id}").as_str());
    assert!(r.body.get("passwordHash").is_none() && !r.text.contains("argon2"));

    let r = app
        .post_json(
            "/api/auth/login",
            polydev_testkit::login_body("ada@example.com", &ada),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let cookie = r.headers["set-cookie"].to_str().unwrap().to_owned();
    let token = r.body["token"].as_str().unwrap().to_owned();
    assert!(
        cookie.starts_with(&format!("polydev_session={token};")),
        "{cookie}"
    );
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(attr), "cookie lacks {attr}: {cookie}");
    }

    // Bearer works, and so does the cookie the web UI uses.
    let me = app.get("/api/me", Some(&token)).await;
    assert_eq!(me.body["id"], id.as_str());
    let session = format!("polydev_session={token}");
    let by_cookie = app
        .call_with(
            Method::GET,
            &format!("/api/users/{id}"),
            &[("cookie", &session)],
            None,
        )
        .await;
    assert_eq!(by_cookie.status, StatusCode::OK, "{}", by_cookie.text);

    // Wrong password and unknown account look the same.
    let wrong = app
        .post_json(
            "/api/auth/login",
            polydev_testkit::wrong_login_body("ada@example.com"),
        )
        .await;
    let unknown = app
        .post_json(
            "/api/auth/login",
            polydev_testkit::wrong_login_body("bob@example.com"),
        )
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        (wrong.code(), wrong.message()),
        (unknown.code(), unknown.message())
    );

    // Logout revokes the session token and clears the cookie.
    let bearer = format!("Bearer {token}");
    let out = app
        .call_with(
            Method::POST,
            "/api/auth/logout",
            &[("authorization", &bearer)],
            None,
        )
        .await;
    assert_eq!(out.status, StatusCode::NO_CONTENT);
    assert!(out.headers["set-cookie"]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
    let after = app.get("/api/me", Some(&token)).await;
    assert_eq!(
        (after.status, after.code()),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );
}

async fn logins_are_rate_limited_per_account(backend: Backend) {
    let app = App::new(
        backend,
        ApiConfig {
            login_per_account_per_minute: 3,
            ..Default::default()
        },
    )
    .await;
    let (body, ada) = polydev_testkit::signup("ada@example.com", "correct horse");
    assert_eq!(
        app.post_json("/api/users", body).await.status,
        StatusCode::CREATED
    );
    let right = || {
        app.post_json(
            "/api/auth/login",
            polydev_testkit::login_body("ada@example.com", &ada),
        )
    };
    let wrong = || {
        app.post_json(
            "/api/auth/login",
            polydev_testkit::wrong_login_body("ada@example.com"),
        )
    };
    assert_eq!(right().await.status, StatusCode::OK); // one login used
    assert_eq!(wrong().await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(wrong().await.status, StatusCode::UNAUTHORIZED);
    let limited = wrong().await;
    assert_eq!(
        (limited.status, limited.code()),
        (StatusCode::TOO_MANY_REQUESTS, "rate_limited")
    );
    let retry: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    // The right password does not get through either while limited.
    assert_eq!(right().await.status, StatusCode::TOO_MANY_REQUESTS);
}

async fn health_and_readiness(backend: Backend) {
    let app = App::new(
        backend,
        ApiConfig {
            build: polydev_api::BuildInfo {
                version: "9.8.7".into(),
                git_sha: "abc1234".into(),
                release: None,
            },
            ..Default::default()
        },
    )
    .await;
    let r = app.get("/api/auth/health", None).await;
    assert_eq!(
        (r.status, &r.body["status"]),
        (StatusCode::OK, &json!("healthy"))
    );
    assert_eq!(
        (&r.body["version"], &r.body["gitSha"]),
        (&json!("9.8.7"), &json!("abc1234"))
    );
    // Not started from a release directory.
    assert_eq!(r.body["release"], Value::Null);
    let r = app.get("/readyz", None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["status"], "ready");
    assert_eq!(r.body["checks"]["store"]["status"], "ok");
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread")] async fn $name() { super::$name(polydev_store::Backend::Sqlite).await })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread")] async fn $name() { super::$name(polydev_store::Backend::Postgres).await })*
        }
    };
}

on_both_backends!(
    bad_input_gets_a_clear_error_in_one_shape,
    admin_routes_need_the_admin_role,
    sign_up_log_in_and_use_the_token,
    logins_are_rate_limited_per_account,
    health_and_readiness,
);
