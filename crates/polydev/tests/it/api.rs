//! The HTTP API through the real binary: what needs its sessions and
//! sandboxes (a login start, the schemas against live handlers) or the
//! served OpenAPI document. Route, auth and error-shape behaviour alone is
//! in polydev-api's in-process suite.

use polydev_store::Backend;
use reqwest::StatusCode;
use serde_json::json;

use crate::app::TestApp;
use crate::on_both_backends;

on_both_backends!(auth_start_validates_its_input,);

async fn auth_start_validates_its_input(backend: Backend) {
    // Sessions on the template every test server has (the browser image is
    // not built here: without it, a start is a clear 503, checked below).
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("polydev.toml");
    // Claude Code's subscription sign-in for admins only; Gemini CLI's off
    // (the vendor's default); Codex's for all (its default).
    std::fs::write(
        &config,
        "[login]\ntemplate = \"minimal\"\n[runs]\ntemplate = \"minimal\"\n[providers.claude_code]\nsubscription_login = \"owner\"\n",
    )
    .unwrap();
    let app = TestApp::spawn_with(backend, &["--config", config.to_str().unwrap()]).await;
    let bare = TestApp::spawn(backend).await;
    let (bare_id, bare_token) = bare.user("bare@example.com").await;
    let r = bare
        .post(
            "/api/auth/start",
            Some(&bare_token),
            json!({"userId": bare_id, "provider": "codex"}),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::SERVICE_UNAVAILABLE, "environment_missing"),
        "{}",
        r.text
    );
    let admin = app.admin("root@example.com");
    let (ada_id, ada) = app.user("ada@example.com").await;
    let app = &app;
    let start = |token: String, user_id: &str, provider: &str| {
        let body = json!({"userId": user_id, "provider": provider});
        async move { app.post("/api/auth/start", Some(&token), body).await }
    };

    let r = start(ada.clone(), "12345", "codex").await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::BAD_REQUEST, "invalid_uuid")
    );
    assert!(r.message().contains("userId"), "{}", r.message());
    let r = start(ada.clone(), &ada_id, "chatgpt").await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::BAD_REQUEST, "invalid_provider")
    );
    assert!(
        r.message().contains("claude_code|codex|gemini_cli"),
        "{}",
        r.message()
    );
    let unknown = "0b7c6a1e-5b0d-4c84-9d57-1f1f0f6b2a11";
    let r = start(admin.clone(), unknown, "codex").await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::NOT_FOUND, "user_not_found")
    );
    // A user may not start sessions for others, existing or not.
    let r = start(ada.clone(), unknown, "codex").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // Valid input is accepted at once (the session's own tests are in
    // login.rs); cancel what started.
    let r = start(ada.clone(), &ada_id, "codex").await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let id = r.body["sessionId"].as_str().unwrap().to_owned();
    app.send(
        reqwest::Method::DELETE,
        &format!("/api/auth/session/{id}"),
        Some(&ada),
        None,
    )
    .await;
    // A subscription sign-in the policy does not offer is a 403 that says
    // why and where the vendor says so — before any sandbox starts.
    for (provider, why) in [("claude_code", "admins"), ("gemini_cli", "API key")] {
        let r = start(ada.clone(), &ada_id, provider).await;
        assert_eq!(
            (r.status, r.error_code()),
            (StatusCode::FORBIDDEN, "sign_in_not_offered"),
            "{provider}: {}",
            r.text
        );
        assert!(r.message().contains(why), "{provider}: {}", r.message());
        let terms = r.body["error"]["details"]["terms"].as_str().unwrap();
        assert!(terms.starts_with("https://"), "{terms}");
        assert!(r.message().contains(terms), "{}", r.message());
    }
    // The policy asks about the user being signed in: an admin may not
    // start an `owner`-only sign-in for a plain user, but gets past the
    // policy for itself (to the next check: it has no vault).
    let r = start(admin.clone(), &ada_id, "claude_code").await;
    assert_eq!(r.error_code(), "sign_in_not_offered", "{}", r.text);
    let admin_id = app.get("/api/me", Some(&admin)).await.body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = start(admin.clone(), &admin_id, "claude_code").await;
    assert_eq!(r.error_code(), "invalid_login_request", "{}", r.text);
    assert!(r.message().contains("vault"), "{}", r.message());

    // The registry as the user sees it: what is offered to them, and why.
    let r = app.get("/api/providers", Some(&ada)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let by_id = |id: &str| {
        r.body
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["id"] == id)
            .unwrap()
            .clone()
    };
    let codex = by_id("codex");
    assert_eq!(codex["signInModes"], json!(["browser", "code"]), "{codex}");
    assert_eq!(codex["credentialKinds"], json!(["api_key", "cli_login"]));
    assert_eq!(codex["policy"]["subscriptionLogin"], "all");
    let pinned = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../polydev-sessions/cli-packages.txt"
    ))
    .unwrap();
    assert!(
        pinned.contains(&format!(
            "@openai/codex@{}",
            codex["version"].as_str().unwrap()
        )),
        "{codex}"
    );
    let claude = by_id("claude_code");
    assert_eq!(claude["signInModes"], json!([]), "{claude}");
    // A plain user: no subscription sign-in, but the cloud key (Bedrock).
    assert_eq!(claude["credentialKinds"], json!(["api_key", "cloud_key"]));
    assert_eq!(
        claude["cloudKeyPrefixes"],
        json!(["ABSK", "bedrock-api-key-"])
    );
    assert_eq!(
        (
            &claude["policy"]["subscriptionLogin"],
            &claude["policy"]["offeredToYou"]
        ),
        (&json!("owner"), &json!(false))
    );
    assert!(claude["policy"]["reason"]
        .as_str()
        .unwrap()
        .contains("API key"));
    let mine = app.get("/api/providers", Some(&admin)).await;
    let admin_claude = &mine.body.as_array().unwrap()[0];
    assert_eq!(admin_claude["id"], "claude_code");
    assert_eq!(
        admin_claude["policy"]["offeredToYou"], true,
        "{admin_claude}"
    );

    // A run refuses a CLI login file the policy does not offer, before it
    // opens anything; the run is then cancelled.
    let r = app
        .post(
            "/api/runs",
            Some(&ada),
            json!({"prompt": "hi", "providers": ["claude_code"]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let run = r.body["runId"].as_str().unwrap().to_owned();
    let r = app
        .post(
            &format!("/api/runs/{run}/credentials"),
            Some(&ada),
            json!({"credentials": {"claude_code": "AAAA"}, "kinds": {"claude_code": "cli_login"}}),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::FORBIDDEN, "sign_in_not_offered"),
        "{}",
        r.text
    );
    let r = app
        .send(
            reqwest::Method::DELETE,
            &format!("/api/runs/{run}"),
            Some(&ada),
            None,
        )
        .await;
    assert!(r.status.is_success(), "{}", r.text);
    let r = app
        .post(
            "/api/auth/start",
            None,
            json!({"userId": ada_id, "provider": "codex"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

/// The document the server serves is valid OpenAPI 3 (openapi-spec-validator
/// from PyPI: unique operationIds, path parameters that match their paths),
/// and a client generated from it (openapi-python-client) imports whole and
/// works: its typed answers for a public, an authenticated and an error
/// response.
#[tokio::test(flavor = "multi_thread")]
async fn the_served_openapi_document_is_valid_and_a_generated_client_works() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (_, token) = app.user("openapi@example.com").await;
    let dir = tempfile::tempdir().unwrap();
    let input = json!({"server": app.base, "token": token, "dir": dir.path()});
    let v = crate::app::python_script("openapi_client.py", input).await;
    assert_eq!(v["warnings"], 0, "every operation generated: {v}");
    assert_eq!(
        v["operations"], v["documented"],
        "one module per operation: {v}"
    );
    assert!(v["operations"].as_u64().unwrap() > 40, "{v}");
    assert_eq!(v["health"], 200, "{v}");
    assert_eq!(v["meIsUserView"], true, "{v}");
    assert_eq!(v["email"], "openapi@example.com", "{v}");
    assert_eq!(v["missingIsErrorBody"], true, "{v}");
    assert_eq!(v["missingCode"], "sandbox_not_found", "{v}");
    assert_eq!(v["created"], "ready", "{v}");
    assert_eq!(v["detail"], "ready", "{v}");
    assert_eq!(v["deleted"], 204, "{v}");
}

/// What a handler may refuse although the schema allowed the body: facts
/// no schema can state (whether a P-256 point is on the curve, the
/// template's and the caller's limits, which sign-in modes a provider
/// offers here) and the state of
/// the world (unknown ids, wrong credentials, stale versions, rate limits,
/// an environment not built on this server).
fn refusal_the_schema_cannot_state(op: &str, status: u16, code: &str) -> bool {
    match status {
        200..=299 => true,
        400 => {
            matches!(code, "invalid_public_key" | "limit_too_high")
                || (op == "POST /api/auth/start" && code == "invalid_login_request")
        }
        401 => code == "invalid_credentials",
        404 => code.ends_with("_not_found"),
        409 => matches!(
            code,
            "version_conflict" | "email_taken" | "login_in_progress"
        ),
        // The installation's sign-in policy, not the body's shape.
        403 => code == "sign_in_not_offered",
        429 => code == "rate_limited",
        // The installation's workspace limit (configured, not in the schema).
        413 => code == "workspace_too_large",
        503 => matches!(code, "environment_missing" | "environment_preparing"),
        _ => false,
    }
}

/// The outcomes of a fuzz report that the schema should have prevented.
fn schema_gaps(report: &serde_json::Value) -> Vec<String> {
    let mut gaps = Vec::new();
    for (op, r) in report.as_object().unwrap() {
        for (outcome, seen) in r["outcomes"].as_object().unwrap() {
            let (status, code) = outcome.split_once(' ').unwrap_or((outcome, ""));
            let status: u16 = status.parse().unwrap();
            if !refusal_the_schema_cannot_state(op, status, code) {
                gaps.push(format!(
                    "{op}: {outcome} ×{} e.g. {}",
                    seen["count"], seen["example"]
                ));
            }
        }
    }
    gaps
}

/// The request schemas state what the handlers check: 25 bodies per
/// operation, generated from its schema by a fuzzer (hypothesis-jsonschema,
/// derandomized), are never refused for their shape — only for what no
/// schema can say. The positive control: the same fuzzer on the sign-up
/// schema with its patterns stripped is refused for its shape.
#[tokio::test(flavor = "multi_thread")]
async fn bodies_generated_from_the_schemas_pass_the_handlers_checks() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    // An admin with a vault (the admin operations and a login start get
    // past "who" and "no vault").
    let admin = polydev_testkit::user_add(
        crate::app::BIN,
        &crate::app::store_args(&app.db),
        "fuzz@example.com",
        true,
        Some("correct horse battery"),
    )
    .unwrap();
    let (me, token) = (
        admin["id"].as_str().unwrap(),
        admin["token"].as_str().unwrap(),
    );
    let r = app
        .post(
            "/api/sandboxes",
            Some(token),
            json!({"template": "minimal"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let sandbox = r.body["id"].as_str().unwrap();
    let own = json!({"userId": me});
    let input = json!({
        "server": app.base, "token": token, "examples": 25,
        "ids": {"/api/sandboxes/{id}/exec": sandbox, "/api/vault/items/{id}": "fuzz.item"},
        "fixed": {
            "/api/auth/start": own, "/api/admin/egress/credentials": own, "/api/vms/create": own,
            // A generated command may read stdin or sleep: bounded here.
            "/api/sandboxes/{id}/exec": {"timeoutMs": 5000},
        },
        // A generated program name exists nowhere; its arguments are echoed.
        "program": {"/api/sandboxes/{id}/exec": "echo"},
        // What a fuzzer rarely generates, which the handlers refuse: the
        // schema must refuse it as well.
        "refused": [
            {"path": "/api/sandboxes", "why": "a reserved label",
             "body": {"template": "minimal", "labels": {"run": "x"}}},
            {"path": "/api/sandboxes", "why": "a label reserved for the system",
             "body": {"template": "minimal", "labels": {"system": "x"}}},
            {"path": "/api/sandboxes", "why": "the label that picks a CLI's egress allow-list",
             "body": {"template": "runtime", "labels": {"provider": "copilot"}}},
            {"path": "/api/runs", "why": "a prompt of U+0085 only (Rust's trim takes it)",
             "body": {"prompt": "\u{85}\u{3000}"}},
            {"path": "/api/sandboxes/{id}/exec", "why": "an argument over the kernel's 128 KiB",
             "body": {"cmd": ["echo", "x".repeat(131_072)]}},
            {"path": "/api/auth/session/{id}/code", "why": "a code of white space only",
             "body": {"code": "\u{2028}"}},
        ],
    });
    let report = crate::app::python_script("schema_fuzz.py", input).await;
    let ops = report["ops"].as_object().unwrap();
    assert_eq!(ops.len(), 13, "every operation with a JSON body: {report}");
    for (op, r) in ops {
        assert_eq!(r["sent"], 25, "{op}: {r}");
    }
    for r in report["refused"].as_array().unwrap() {
        assert_eq!(r["refused"], true, "the schema allows {}", r["why"]);
    }
    assert_eq!(report["refused"].as_array().unwrap().len(), 6);
    let gaps = schema_gaps(&report["ops"]);
    assert!(
        gaps.is_empty(),
        "refused for a shape the schema allowed:\n{}",
        gaps.join("\n")
    );
    // The fuzzer reached past the lookups where it could: a sandbox made,
    // a command run, a vault item stored.
    for op in [
        "POST /api/sandboxes",
        "POST /api/sandboxes/{id}/exec",
        "PUT /api/vault/items/{id}",
    ] {
        let accepted = ops[op]["outcomes"]
            .as_object()
            .unwrap()
            .keys()
            .any(|k| k.starts_with('2'));
        assert!(accepted, "{op} accepted nothing: {}", ops[op]);
    }

    // NUL cannot be part of a process's argument or environment, and the
    // kernel refuses an argument over 128 KiB: said as a 400 before
    // anything runs, not as a failure of the spawn; the count of
    // arguments is bounded too.
    for (path, body, code) in [
        (
            format!("/api/sandboxes/{sandbox}/exec"),
            json!({"cmd": ["echo", "x".repeat(128 * 1024)]}),
            "invalid_exec",
        ),
        (
            format!("/api/sandboxes/{sandbox}/exec"),
            json!({"cmd": vec!["echo"; 4097]}),
            "invalid_exec",
        ),
        (
            format!("/api/sandboxes/{sandbox}/exec"),
            json!({"cmd": ["echo", "a\0b"]}),
            "invalid_exec",
        ),
        (
            format!("/api/sandboxes/{sandbox}/exec"),
            json!({"cmd": ["true"], "env": {"A": "b\0"}}),
            "invalid_exec",
        ),
        (
            "/api/sandboxes".to_owned(),
            json!({"template": "minimal", "env": {"A": "\0"}}),
            "invalid_sandbox_request",
        ),
        (
            "/api/runs".to_owned(),
            json!({"prompt": "say\0hi"}),
            "invalid_run_request",
        ),
    ] {
        let r = app.post(&path, Some(token), body).await;
        assert_eq!(
            (r.status, r.error_code()),
            (StatusCode::BAD_REQUEST, code),
            "{path}: {}",
            r.text
        );
    }

    let loose = crate::app::python_script(
        "schema_fuzz.py",
        json!({"server": app.base, "token": token, "examples": 25, "ids": {}, "loosen": "/api/users"}),
    )
    .await;
    assert!(
        !schema_gaps(&loose["ops"]).is_empty(),
        "a schema without its patterns must be caught: {loose}"
    );
}
