//! The real CLIs (Claude Code, Codex, Gemini CLI, from npm) inside a real
//! sandbox in network mode `egress`, talking to loopback stub provider
//! servers that only the egress proxy can resolve: the groundwork runs
//! (issue 8) build on. The CLIs come from scripts/test.sh (`npm install -g`
//! of the pinned versions); the `minimal` template borrows the host's /usr.

use std::time::Duration;

use polydev_store::Backend;
use polydev_stubs::Provider;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::app::TestApp;

#[tokio::test(flavor = "multi_thread")]
async fn each_cli_answers_from_its_stub_through_the_proxy_only() {
    let anthropic =
        polydev_stubs::start(Provider::Anthropic, "claude says hello from the stub", None)
            .await
            .unwrap();
    let openai = polydev_stubs::start(Provider::OpenAi, "codex says hello from the stub", None)
        .await
        .unwrap();
    let gemini = polydev_stubs::start(Provider::Gemini, "gemini says hello from the stub", None)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("polydev.toml");
    std::fs::write(
        &config,
        "[sandbox]\nmemory_mb = 2048\npids = 1024\n[egress]\nallow_private = [\"127.0.0.0/8\"]\nper_user_ports = false\n[egress.hosts]\n\"anthropic.stub.test\" = \"127.0.0.1\"\n\"openai.stub.test\" = \"127.0.0.1\"\n\"gemini.stub.test\" = \"127.0.0.1\"\n",
    )
    .unwrap();
    let app = TestApp::spawn_with(Backend::Sqlite, &["--config", config.to_str().unwrap()]).await;
    let (_, token) = app.user("clis@example.com").await;
    let t = Some(token.as_str());
    // The operator's defaults (2 GiB, 1024 processes) are what a plain user gets.
    let r = app
        .post(
            "/api/sandboxes",
            t,
            json!({"template": "minimal", "network": "egress"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_owned();
    let key = format!("sk-canary-{}", uuid::Uuid::new_v4().simple());
    let exec = |cmd: Vec<String>, env: Value| {
        let (app, id) = (&app, id.clone());
        async move {
            app.post(
                &format!("/api/sandboxes/{id}/exec"),
                t,
                json!({"cmd": cmd, "env": env, "timeoutMs": 90_000}),
            )
            .await
        }
    };

    // Claude Code: base URL + key; no non-essential traffic.
    let r = exec(
        vec![
            "claude".into(),
            "-p".into(),
            "say hello".into(),
            "--output-format".into(),
            "json".into(),
        ],
        json!({
            "ANTHROPIC_BASE_URL": format!("http://anthropic.stub.test:{}", anthropic.addr.port()),
            "ANTHROPIC_API_KEY": key,
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        }),
    )
    .await;
    assert!(
        r.body["stdout"]
            .as_str()
            .unwrap_or("")
            .contains("claude says hello from the stub"),
        "{}",
        r.text
    );

    // Codex: a custom provider (no WebSocket), analytics off.
    let provider = format!(
        "model_providers.stub={{name=\"stub\",base_url=\"http://openai.stub.test:{}/v1\",env_key=\"OPENAI_API_KEY\",wire_api=\"responses\"}}",
        openai.addr.port()
    );
    let r = exec(
        vec![
            "codex".into(),
            "exec".into(),
            "--skip-git-repo-check".into(),
            "--json".into(),
            "-c".into(),
            "model_provider=stub".into(),
            "-c".into(),
            provider,
            "-c".into(),
            "analytics.enabled=false".into(),
            "say hello".into(),
        ],
        json!({"OPENAI_API_KEY": key}),
    )
    .await;
    assert!(
        r.body["stdout"]
            .as_str()
            .unwrap_or("")
            .contains("codex says hello from the stub"),
        "{}",
        r.text
    );

    // Gemini CLI: API-key auth selected in its settings, workspace trusted.
    let settings = r#"{"security":{"auth":{"selectedType":"gemini-api-key"}},"privacy":{"usageStatisticsEnabled":false}}"#;
    let r = exec(
        vec!["/bin/sh".into(), "-c".into(), format!("mkdir -p ~/.gemini && printf '%s' '{settings}' > ~/.gemini/settings.json && gemini -p 'say hello' -o json --skip-trust")],
        json!({
            "GOOGLE_GEMINI_BASE_URL": format!("http://gemini.stub.test:{}", gemini.addr.port()),
            "GEMINI_API_KEY": key,
        }),
    )
    .await;
    assert!(
        r.body["stdout"]
            .as_str()
            .unwrap_or("")
            .contains("gemini says hello from the stub"),
        "{}",
        r.text
    );

    // Each stub got its key; nothing else answered (the names exist only in the proxy).
    let sent_key = |seen: Vec<polydev_stubs::Seen>| {
        seen.iter()
            .any(|s| s.headers.iter().any(|(_, v)| v.contains(&key)) || s.path.contains(&key))
    };
    assert!(sent_key(anthropic.seen()) && sent_key(openai.seen()) && sent_key(gemini.seen()));
    let r = exec(
        vec![
            "/bin/sh".into(),
            "-c".into(),
            format!(
                "curl -s --max-time 3 --noproxy '*' http://anthropic.stub.test:{}/",
                anthropic.addr.port()
            ),
        ],
        json!({}),
    )
    .await;
    assert_ne!(r.body["exitCode"], 0, "{}", r.text);

    // The key reached no log line, metric or store file.
    app.assert_nowhere(&[&key]).await;
}

fn stub_config(dir: &std::path::Path, a: u16, o: u16, g: u16, c: u16) -> std::path::PathBuf {
    stub_config_with(dir, a, o, g, c, "")
}

/// `stub_config` with `extra` lines after it (in its `[runs]` table
/// unless they open another).
pub(crate) fn stub_config_with(
    dir: &std::path::Path,
    a: u16,
    o: u16,
    g: u16,
    c: u16,
    extra: &str,
) -> std::path::PathBuf {
    let config = dir.join("polydev.toml");
    std::fs::write(
        &config,
        format!(
            "[egress]\nallow_private = [\"127.0.0.0/8\"]\nper_user_ports = false\n[egress.hosts]\n\"anthropic.stub.test\" = \"127.0.0.1\"\n\"openai.stub.test\" = \"127.0.0.1\"\n\"gemini.stub.test\" = \"127.0.0.1\"\n\"copilot.stub.test\" = \"127.0.0.1\"\n[runs]\ntemplate = \"minimal\"\ndeadline_secs = 60\ncredential_wait_secs = 60\nanthropic_base_url = \"http://anthropic.stub.test:{a}\"\nopenai_base_url = \"http://openai.stub.test:{o}/v1\"\ngemini_base_url = \"http://gemini.stub.test:{g}\"\ncopilot_base_url = \"http://copilot.stub.test:{c}\"\n{extra}"
        ),
    )
    .unwrap();
    config
}

/// Reads an SSE body to its end: (event, data) pairs.
pub(crate) async fn sse_events(app: &TestApp, path: &str, token: &str) -> Vec<(String, Value)> {
    let resp = app
        .client
        .get(app.url(path))
        .bearer_auth(token)
        .timeout(std::time::Duration::from_secs(120))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.text().await.unwrap();
    let mut out = Vec::new();
    let mut event = String::new();
    for line in body.lines() {
        if let Some(e) = line.strip_prefix("event: ") {
            event = e.to_owned();
        } else if let Some(d) = line.strip_prefix("data: ") {
            out.push((event.clone(), serde_json::from_str(d).unwrap()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_streams_every_provider_and_one_failure_stays_its_own() {
    let anthropic = polydev_stubs::start(Provider::Anthropic, "perspective of claude", None)
        .await
        .unwrap();
    let openai = polydev_stubs::start(Provider::OpenAi, "perspective of codex", None)
        .await
        .unwrap();
    let gemini = polydev_stubs::start(Provider::Gemini, "never seen", Some(400))
        .await
        .unwrap();
    let copilot = polydev_stubs::start(Provider::Copilot, "perspective of copilot", None)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = stub_config(
        dir.path(),
        anthropic.addr.port(),
        openai.addr.port(),
        gemini.addr.port(),
        copilot.addr.port(),
    );
    let app = TestApp::spawn_with(Backend::Sqlite, &["--config", config.to_str().unwrap()]).await;
    // Signed up as the browser does, keeping the enrollment (its sealing
    // key opens the stored answers).
    let (body, enrollment) = crate::app::signup("run@example.com", "correct horse");
    assert_eq!(
        app.post("/api/users", None, body).await.status,
        StatusCode::CREATED
    );
    let r = app
        .post(
            "/api/auth/login",
            None,
            crate::app::login_body("run@example.com", &enrollment),
        )
        .await;
    let token = r.body["token"].as_str().unwrap().to_owned();
    let t = Some(token.as_str());
    // GitHub-shaped (Copilot CLI refuses anything else; the others take
    // any string, and OpenCode reads it as an OpenAI key).
    let key = format!("github_pat_canary{}", uuid::Uuid::new_v4().simple());
    // The client seals the key to each sandbox's agent; the server relays it.
    // All five CLIs: OpenCode takes the key to OpenAI's stand-in; Copilot
    // CLI takes it as its GitHub token.
    let all = ["claude_code", "codex", "gemini_cli", "opencode", "copilot"];
    // OpenCode takes only a model vendor's key: an OpenAI-shaped canary.
    let opencode_key = format!("sk-canary-{}", uuid::Uuid::new_v4().simple());
    // A prompt that looks like options is still the prompt: each CLI
    // answers it (none prints its help or version instead).
    let (run, events) = run_with_keys(&app, &token, "--version --help", &all, |p| {
        if p == "opencode" { &opencode_key } else { &key }.clone()
    })
    .await;
    let of = |p: &str| {
        events
            .iter()
            .filter(|(_, d)| d["provider"] == p)
            .map(|(e, d)| (e.as_str(), d))
            .collect::<Vec<_>>()
    };
    for (p, answer) in [
        ("claude_code", "perspective of claude"),
        ("codex", "perspective of codex"),
        ("opencode", "perspective of codex"),
        ("copilot", "perspective of copilot"),
    ] {
        let evs = of(p);
        assert_eq!(evs.first().map(|e| e.0), Some("started"), "{p}: {evs:?}");
        assert!(
            evs.iter()
                .any(|(e, d)| *e == "delta" && d["text"] == answer),
            "{p}: {evs:?}"
        );
        assert_eq!(evs.last().map(|e| e.0), Some("done"), "{p}: {evs:?}");
        // Each reports what its answer used (the stand-ins say 10 in, 5 out).
        assert_eq!(
            evs.last().unwrap().1["usage"]["outputTokens"],
            5,
            "{p}: {evs:?}"
        );
    }
    // Copilot CLI sent the key as its token to its API, and OpenCode to OpenAI's.
    let bearer = |seen: Vec<polydev_stubs::Seen>, path: &str| {
        seen.iter().any(|s| {
            s.path.starts_with(path)
                && s.headers
                    .iter()
                    .any(|(k, v)| k == "authorization" && v == &format!("Bearer {key}"))
        })
    };
    assert!(
        bearer(copilot.seen(), "/responses"),
        "{:?}",
        copilot.seen().iter().map(|s| &s.path).collect::<Vec<_>>()
    );
    assert!(bearer(openai.seen(), "/v1/responses"));
    assert!(openai.seen().iter().any(|s| s
        .headers
        .iter()
        .any(|(k, v)| k == "authorization" && v == &format!("Bearer {opencode_key}"))));
    let g = of("gemini_cli");
    assert_eq!(g.last().map(|e| e.0), Some("error"), "{g:?}");
    assert!(!g.iter().any(|(e, _)| *e == "done"));

    // Every sandbox of the run is gone; the key reached no log, metric or store.
    crate::app::eventually(
        Duration::from_secs(10),
        "the run's sandboxes end",
        || async {
            let r = app.get("/api/sandboxes", t).await;
            r.body["sandboxes"]
                .as_array()?
                .iter()
                .all(|s| s["status"] != "ready")
                .then_some(())
        },
    )
    .await;
    app.assert_nowhere(&[&key, &opencode_key]).await;
    // The answers are stored sealed, never in the clear.
    assert!(!app.at_rest().contains("perspective of claude"));

    // History: states and timings, answers sealed to the user's vault key.
    let h = crate::app::eventually(
        Duration::from_secs(5),
        "the run is stored finished",
        || async {
            let h = app.get("/api/runs", t).await;
            (h.body["runs"][0]["state"] == "finished").then_some(h)
        },
    )
    .await;
    let rec = &h.body["runs"][0];
    assert_eq!(rec["runId"], run.as_str(), "{}", h.text);
    assert_eq!(rec["state"], "finished");
    let states: std::collections::BTreeMap<&str, &str> = rec["providers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["provider"].as_str().unwrap(),
                p["state"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        states,
        all.iter()
            .map(|p| (*p, if *p == "gemini_cli" { "failed" } else { "done" }))
            .collect()
    );
    use base64::Engine;
    let sealed = base64::engine::general_purpose::STANDARD
        .decode(rec["answers"]["claude_code"].as_str().unwrap())
        .unwrap();
    let opened = enrollment
        .sealing
        .open(
            polydev_sessions::runs::ANSWER_PURPOSE,
            format!("{run}/claude_code").as_bytes(),
            &sealed,
        )
        .unwrap();
    assert_eq!(&opened[..], b"perspective of claude");
}

/// A provider that refuses for a rate limit (HTTP 429 from each stand-in)
/// is reported as `rate_limited`, not as a generic failure: Codex gives up
/// at once; Claude Code and Gemini CLI retry (Claude's retries show as
/// `retrying` with the status) until the run's deadline.
#[tokio::test(flavor = "multi_thread")]
async fn a_rate_limited_provider_is_reported_as_rate_limited() {
    let stub = |p| polydev_stubs::start(p, "never", Some(429));
    let (a, o, g, c) = (
        stub(Provider::Anthropic).await.unwrap(),
        stub(Provider::OpenAi).await.unwrap(),
        stub(Provider::Gemini).await.unwrap(),
        stub(Provider::Copilot).await.unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let config = stub_config(
        dir.path(),
        a.addr.port(),
        o.addr.port(),
        g.addr.port(),
        c.addr.port(),
    );
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("deadline_secs = 60", "deadline_secs = 20");
    std::fs::write(&config, text).unwrap();
    let app = TestApp::spawn_with(Backend::Sqlite, &["--config", config.to_str().unwrap()]).await;
    let (_, token) = app.user("limited@example.com").await;
    // OpenCode on an Anthropic-shaped key (Anthropic's stand-in);
    // Copilot CLI stays up after its limit and is ended on its word.
    let all = ["claude_code", "codex", "gemini_cli", "opencode", "copilot"];
    // Copilot CLI takes only GitHub-shaped tokens.
    let (_, events) = run_with_keys(&app, &token, "hello?", &all, |p| {
        if p == "copilot" {
            "github_pat_x"
        } else {
            "sk-ant-x"
        }
        .to_owned()
    })
    .await;
    for p in all {
        let last = events
            .iter()
            .rev()
            .find(|(_, d)| d["provider"] == p)
            .unwrap();
        assert_eq!(
            (last.0.as_str(), &last.1["stage"]),
            ("error", &json!("rate_limited")),
            "{p}: {events:?}"
        );
        assert!(
            last.1["message"].as_str().unwrap().contains("HTTP 429")
                || last.1["message"]
                    .as_str()
                    .unwrap()
                    .contains("429 Too Many Requests"),
            "{p}: {last:?}"
        );
    }
    assert!(
        events.iter().any(|(e, d)| e == "retrying"
            && d["provider"] == "claude_code"
            && d["message"].as_str().unwrap().contains("HTTP 429")),
        "{events:?}"
    );
}

/// A queued provider waits at most `queue_wait`, then fails with stage
/// `queue` (and frees its sandbox), not a hang.
#[tokio::test(flavor = "multi_thread")]
async fn a_queued_provider_gives_up_after_the_queue_wait() {
    let dir = tempfile::tempdir().unwrap();
    let config = stub_config_with(dir.path(), 1, 1, 1, 1, "queue_wait_secs = 1\n");
    let app = TestApp::spawn_with(Backend::Sqlite, &["--config", config.to_str().unwrap()]).await;
    let (_, token) = app.user("queue@example.com").await;
    let t = Some(token.as_str());
    let start = || {
        app.post(
            "/api/runs",
            t,
            json!({"prompt": "x", "providers": ["codex"]}),
        )
    };
    let first = start().await;
    let second = start().await;
    assert_eq!(
        second.body["sandboxes"]["codex"]["state"], "queued",
        "{}",
        second.text
    );
    let id = second.body["runId"].as_str().unwrap();
    let events = sse_events(&app, &format!("/api/runs/{id}/events"), &token).await;
    let kinds: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(kinds, ["queued", "error", "end"], "{events:?}");
    assert_eq!(events[1].1["stage"], "queue", "{events:?}");
    let sandbox = second.body["sandboxes"]["codex"]["sandboxId"]
        .as_str()
        .unwrap();
    let r = app.get(&format!("/api/sandboxes/{sandbox}"), t).await;
    assert_eq!(r.body["status"], "ended", "{}", r.text);
    let id = first.body["runId"].as_str().unwrap();
    let r = app
        .send(reqwest::Method::DELETE, &format!("/api/runs/{id}"), t, None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
}

/// A host runs only so many CLIs at once (`max_providers_in_flight`): a
/// run beyond it is refused with 503 and Retry-After, before any sandbox
/// is made, and is admitted once the runs ahead have ended.
#[tokio::test(flavor = "multi_thread")]
async fn a_host_at_its_most_cli_runs_refuses_more_until_one_ends() {
    let dir = tempfile::tempdir().unwrap();
    let config = stub_config_with(dir.path(), 1, 1, 1, 1, "max_providers_in_flight = 5\n");
    let app = TestApp::spawn_with(Backend::Sqlite, &["--config", config.to_str().unwrap()]).await;
    let (_, first) = app.user("first@example.com").await;
    let (_, second) = app.user("second@example.com").await;
    let all = ["claude_code", "codex", "gemini_cli", "opencode", "copilot"];
    let r = app
        .post(
            "/api/runs",
            Some(&first),
            json!({"prompt": "x", "providers": all}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let ahead = r.body["runId"].as_str().unwrap().to_owned();
    let before = app.get("/api/sandboxes", Some(&second)).await;
    let r = app
        .post(
            "/api/runs",
            Some(&second),
            json!({"prompt": "y", "providers": ["codex"]}),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::SERVICE_UNAVAILABLE, "runs_at_capacity"),
        "{}",
        r.text
    );
    assert!(r.message().contains("its most at once (5)"), "{}", r.text);
    assert!(r.headers.contains_key("retry-after"));
    let after = app.get("/api/sandboxes", Some(&second)).await;
    assert_eq!(before.body, after.body, "no sandbox was made for it");
    let r = app
        .send(
            reqwest::Method::DELETE,
            &format!("/api/runs/{ahead}"),
            Some(&first),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = app
        .post(
            "/api/runs",
            Some(&second),
            json!({"prompt": "y", "providers": ["codex"]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    drop(app);

    // No user holds more than a share of the host (a quarter, five at
    // least): here 6 of 24.
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "max_providers_in_flight = 5",
        "max_providers_in_flight = 24",
    );
    std::fs::write(&config, text).unwrap();
    let app = TestApp::spawn_with(Backend::Sqlite, &["--config", config.to_str().unwrap()]).await;
    let (_, greedy) = app.user("greedy@example.com").await;
    let (_, other) = app.user("other@example.com").await;
    let two = json!({"prompt": "x", "providers": ["codex", "gemini_cli"]});
    let r = app
        .post(
            "/api/runs",
            Some(&greedy),
            json!({"prompt": "x", "providers": all}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let r = app.post("/api/runs", Some(&greedy), two.clone()).await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::SERVICE_UNAVAILABLE, "runs_at_capacity"),
        "{}",
        r.text
    );
    assert!(
        r.message().contains("your share of this server (6)"),
        "{}",
        r.text
    );
    let r = app.post("/api/runs", Some(&other), two).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_a_run_ends_every_provider_and_its_sandboxes() {
    let dir = tempfile::tempdir().unwrap();
    let config = stub_config(dir.path(), 1, 1, 1, 1);
    let app = TestApp::spawn_with(Backend::Sqlite, &["--config", config.to_str().unwrap()]).await;
    let (_, token) = app.user("cancel@example.com").await;
    let t = Some(token.as_str());
    let r = app
        .post(
            "/api/runs",
            t,
            json!({"prompt": "x", "providers": ["codex", "claude_code"]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let run = r.body["runId"].as_str().unwrap().to_owned();
    // One live run per credential: a second run on codex waits its turn,
    // a third behind it; a credential for a queued provider is refused
    // until its turn.
    let queued = |body: &serde_json::Value| {
        (
            body["sandboxes"]["codex"]["state"].clone(),
            body["sandboxes"]["codex"]["queuePosition"].clone(),
        )
    };
    let r = app
        .post(
            "/api/runs",
            t,
            json!({"prompt": "y", "providers": ["codex"]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(queued(&r.body).0, "queued", "{}", r.text);
    let second = r.body["runId"].as_str().unwrap().to_owned();
    let r = app
        .post(
            "/api/runs",
            t,
            json!({"prompt": "z", "providers": ["codex"]}),
        )
        .await;
    let third = r.body["runId"].as_str().unwrap().to_owned();
    let appr = &app;
    let position = move |id: String| async move {
        let r = appr.get(&format!("/api/runs/{id}"), t).await;
        queued(&r.body)
    };
    crate::app::eventually(
        Duration::from_secs(10),
        "the queue says its places",
        || async {
            let (a, b) = (
                position(second.clone()).await,
                position(third.clone()).await,
            );
            (a == (json!("queued"), json!(1)) && b == (json!("queued"), json!(2))).then_some(())
        },
    )
    .await;
    let r = app
        .post(
            &format!("/api/runs/{second}/credentials"),
            t,
            json!({"credentials": {"codex": "AAAA"}}),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::CONFLICT, "provider_queued"),
        "{}",
        r.text
    );
    let r = app
        .send(
            reqwest::Method::DELETE,
            &format!("/api/runs/{run}"),
            t,
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["state"], "cancelled");
    let events = sse_events(&app, &format!("/api/runs/{run}/events"), &token).await;
    // One final error per provider, then the run's end.
    assert_eq!(events.len(), 3, "{events:?}");
    assert!(events[..2]
        .iter()
        .all(|(e, d)| e == "error" && d["stage"] == "cancelled"));
    assert_eq!(events[2].0, "end");
    assert_eq!(events[2].1["state"], "cancelled");
    // Its end is the next one's turn: the second awaits its credential,
    // the third moves up; then both are cancelled.
    crate::app::eventually(Duration::from_secs(10), "the queue moves up", || async {
        let (a, b) = (
            position(second.clone()).await,
            position(third.clone()).await,
        );
        (a == (json!("awaiting_credentials"), json!(null)) && b == (json!("queued"), json!(1)))
            .then_some(())
    })
    .await;
    for id in [&second, &third] {
        let r = app
            .send(reqwest::Method::DELETE, &format!("/api/runs/{id}"), t, None)
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    }
    let events = sse_events(&app, &format!("/api/runs/{second}/events"), &token).await;
    let kinds: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(
        kinds,
        ["queued", "awaiting_credentials", "error", "end"],
        "{events:?}"
    );
    assert_eq!(events[0].1["position"], 1);
    let r = app.get("/api/sandboxes", t).await;
    assert!(
        r.body["sandboxes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["status"] == "ended"),
        "{}",
        r.text
    );
    assert!(app.cgroups().unwrap().list().is_empty());
    // Bad input: unknown provider, unknown run.
    let r = app
        .post("/api/runs", t, json!({"prompt": "x", "providers": ["gpt"]}))
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::BAD_REQUEST, "invalid_provider")
    );
    let r = app.get("/api/runs/run-nope", t).await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::NOT_FOUND, "run_not_found")
    );
    // After the cancel the credential is free again.
    let r = app
        .post(
            "/api/runs",
            t,
            json!({"prompt": "y", "providers": ["codex"]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
}

/// A real MCP client (rmcp) starts `polydev mcp`, lists its tool and calls
/// `get_perspectives`: every provider's answer comes back.
#[tokio::test(flavor = "multi_thread")]
async fn the_mcp_tool_returns_every_perspective() {
    use rmcp::transport::{ConfigureCommandExt, TokioChildProcess};
    use rmcp::ServiceExt;
    let anthropic = polydev_stubs::start(Provider::Anthropic, "mcp heard claude", None)
        .await
        .unwrap();
    let openai = polydev_stubs::start(Provider::OpenAi, "mcp heard codex", None)
        .await
        .unwrap();
    let gemini = polydev_stubs::start(Provider::Gemini, "mcp heard gemini", None)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = stub_config(
        dir.path(),
        anthropic.addr.port(),
        openai.addr.port(),
        gemini.addr.port(),
        1,
    );
    let app = TestApp::spawn_with(Backend::Sqlite, &["--config", config.to_str().unwrap()]).await;
    let (_, token) = app.user("mcp@example.com").await;
    let key = format!("sk-canary-{}", uuid::Uuid::new_v4().simple());
    let transport = TokioChildProcess::new(
        tokio::process::Command::new(crate::app::BIN).configure(|cmd| {
            cmd.args(["mcp", "--server", &app.base])
                .env("POLYDEV_TOKEN", &token)
                .env("ANTHROPIC_API_KEY", &key)
                .env("OPENAI_API_KEY", &key)
                .env("GEMINI_API_KEY", &key);
        }),
    )
    .unwrap();
    let client = ().serve(transport).await.unwrap();
    let tools = client.list_all_tools().await.unwrap();
    assert!(
        tools.iter().any(|t| t.name == "get_perspectives"),
        "{tools:?}"
    );
    // Another run of this user holds the codex credential (given none
    // yet): the tool's codex waits its turn, and gets its key when the
    // stream says so.
    let ahead = app
        .post(
            "/api/runs",
            Some(&token),
            json!({"prompt": "first", "providers": ["codex"]}),
        )
        .await;
    assert_eq!(ahead.status, StatusCode::CREATED, "{}", ahead.text);
    let args = json!({"prompt": "three views please"})
        .as_object()
        .unwrap()
        .clone();
    let tool = client.call_tool(
        rmcp::model::CallToolRequestParams::new("get_perspectives").with_arguments(args),
    );
    let first = async {
        crate::app::eventually(
            Duration::from_secs(30),
            "the tool's codex is queued",
            || async {
                let runs = app.get("/api/runs", Some(&token)).await;
                runs.body["runs"].as_array()?.iter().find(|r| {
                    r["providers"].as_array().is_some_and(|ps| {
                        ps.iter()
                            .any(|p| p["provider"] == "codex" && p["state"] == "queued")
                    })
                })?;
                Some(())
            },
        )
        .await;
        send_key(&app, &token, &ahead.body, &key).await;
    };
    let (result, ()) = tokio::join!(tool, first);
    let text = serde_json::to_string(&result.unwrap().content).unwrap();
    for answer in ["mcp heard claude", "mcp heard codex", "mcp heard gemini"] {
        assert!(text.contains(answer), "{text}");
    }
    // Codex answered twice, one run after the other: the first, then the tool's.
    let id = ahead.body["runId"].as_str().unwrap();
    let first = app.get(&format!("/api/runs/{id}"), Some(&token)).await;
    assert_eq!(
        first.body["sandboxes"]["codex"]["state"], "done",
        "{}",
        first.text
    );
    // Bad input is an MCP error, not a hang.
    let args = json!({"prompt": "x", "providers": ["gpt"]})
        .as_object()
        .unwrap()
        .clone();
    let err = client
        .call_tool(rmcp::model::CallToolRequestParams::new("get_perspectives").with_arguments(args))
        .await;
    assert!(
        err.is_err()
            || serde_json::to_string(&err.as_ref().unwrap().content)
                .unwrap()
                .contains("gpt"),
        "{err:?}"
    );
    client.cancel().await.unwrap();
    assert!(!app.settled_logs().await.contains(&key));
}

/// The web run page in headless Chromium: keys typed in the page are sealed
/// there; the three answers stream into their columns.
#[tokio::test(flavor = "multi_thread")]
async fn the_run_page_streams_three_answers_side_by_side() {
    // Claude fails at once while the other two are still answering: its
    // column ends on its own and the page keeps listening for the others.
    let anthropic = polydev_stubs::start(Provider::Anthropic, "never shown", Some(400))
        .await
        .unwrap();
    let slow = std::time::Duration::from_secs(3);
    let openai = polydev_stubs::start_slow(Provider::OpenAi, "page view of codex", None, slow)
        .await
        .unwrap();
    let gemini = polydev_stubs::start_slow(Provider::Gemini, "page view of gemini", None, slow)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = stub_config(
        dir.path(),
        anthropic.addr.port(),
        openai.addr.port(),
        gemini.addr.port(),
        1,
    );
    let key = format!("sk-canary-{}", uuid::Uuid::new_v4().simple());
    let v = crate::app::browser_script(
        "run-page.mjs",
        json!({"config": config, "prompt": "what do you see?", "key": key}),
    )
    .await;
    for (p, answer) in [
        ("codex", "page view of codex"),
        ("gemini_cli", "page view of gemini"),
    ] {
        assert_eq!(v["states"][p], "done", "{v}");
        assert!(v["answers"][p].as_str().unwrap().contains(answer), "{v}");
    }
    assert_eq!(v["states"]["claude_code"], "failed", "{v}");
    // Claude failed before the others were done, and said why in words.
    let failed_at = v["endedAt"]["claude_code"].as_f64().unwrap();
    assert!(failed_at < v["endedAt"]["codex"].as_f64().unwrap(), "{v}");
    let why = v["answers"]["claude_code"].as_str().unwrap();
    assert!(why.contains("Claude Code"), "{why}");
    for internal in ["[object", "Some(", "None", "    at "] {
        assert!(!why.contains(internal), "{why}");
    }
    // The run is in the page's history, and its stored answers open there.
    assert!(v["history"].as_str().unwrap().contains("finished"), "{v}");
    assert!(
        v["opened"]
            .as_str()
            .unwrap()
            .contains("page view of gemini"),
        "{v}"
    );
    // The history shows the prompt (sealed to the user, opened in the
    // tab) and searches it.
    assert_eq!(v["historyPrompt"], "what do you see?", "{v}");
    assert_eq!(v["searchNone"]["visible"], 0, "{v}");
    assert!(
        v["searchNone"]["count"]
            .as_str()
            .unwrap()
            .contains("No run matches"),
        "{v}"
    );
    assert_eq!(v["searchHit"]["visible"], 1, "{v}");
    assert_eq!(v["searchHit"]["count"], "1 of 1 runs match.", "{v}");
    // The key typed in the page reached the stubs, never the server's logs.
    assert!(!v["logs"].as_str().unwrap().contains(&key));
    assert!(openai
        .seen()
        .iter()
        .any(|s| s.headers.iter().any(|(_, h)| h.contains(&key))));
}

/// `polydev mcp --listen`: the same tool over streamable HTTP at /mcp,
/// called by rmcp's HTTP client.
#[tokio::test(flavor = "multi_thread")]
async fn the_mcp_tool_over_http() {
    use rmcp::transport::StreamableHttpClientTransport;
    use rmcp::ServiceExt;
    use tokio::io::AsyncBufReadExt;
    let anthropic = polydev_stubs::start(Provider::Anthropic, "http mcp heard claude", None)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = stub_config(dir.path(), anthropic.addr.port(), 1, 1, 1);
    let app = TestApp::spawn_with(Backend::Sqlite, &["--config", config.to_str().unwrap()]).await;
    let (_, token) = app.user("mcphttp@example.com").await;
    let mut mcp = tokio::process::Command::new(crate::app::BIN)
        .args(["mcp", "--server", &app.base, "--listen", "127.0.0.1:0"])
        .env("POLYDEV_TOKEN", &token)
        .env("ANTHROPIC_API_KEY", "sk-http-canary")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(mcp.stderr.take().unwrap()).lines();
    let url = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        while let Some(l) = lines.next_line().await.unwrap() {
            if let Some(u) = l.strip_prefix("MCP over HTTP at ") {
                return u.to_owned();
            }
        }
        panic!("polydev mcp exited");
    })
    .await
    .unwrap();
    let client = ().serve(StreamableHttpClientTransport::from_uri(url)).await.unwrap();
    let args = json!({"prompt": "over http", "providers": ["claude_code"]})
        .as_object()
        .unwrap()
        .clone();
    let result = client
        .call_tool(rmcp::model::CallToolRequestParams::new("get_perspectives").with_arguments(args))
        .await
        .unwrap();
    let text = serde_json::to_string(&result.content).unwrap();
    assert!(text.contains("http mcp heard claude"), "{text}");
    client.cancel().await.unwrap();
    // A non-loopback address is refused.
    let out = std::process::Command::new(crate::app::BIN)
        .args(["mcp", "--token", "x", "--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
}

/// Starts a run of `prompt` on `providers`, each with its own key sealed
/// to its sandbox, as a client does; its id and its events to the end.
pub(crate) async fn run_with_keys(
    app: &TestApp,
    token: &str,
    prompt: &str,
    providers: &[&str],
    key_of: impl Fn(&str) -> String,
) -> (String, Vec<(String, Value)>) {
    let run = start_with_keys(app, token, prompt, providers, key_of).await;
    let events = sse_events(app, &format!("/api/runs/{run}/events"), token).await;
    (run, events)
}

/// Starts a run of `providers` with `key` sealed to each sandbox; its id.
pub(crate) async fn start_with_key(
    app: &TestApp,
    token: &str,
    providers: &[&str],
    key: &str,
) -> String {
    start_with_keys(app, token, "hello?", providers, |_| key.to_owned()).await
}

/// Starts a run of `prompt` on `providers`, each with its own key sealed
/// to its sandbox; its id.
async fn start_with_keys(
    app: &TestApp,
    token: &str,
    prompt: &str,
    providers: &[&str],
    key_of: impl Fn(&str) -> String,
) -> String {
    let r = app
        .post(
            "/api/runs",
            Some(token),
            json!({"prompt": prompt, "providers": providers}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    send_keys(app, token, &r.body, key_of).await;
    r.body["runId"].as_str().unwrap().to_owned()
}

/// Seals `key` to each sandbox of the run `view` (the answer of `POST
/// /api/runs`) and hands them over.
pub(crate) async fn send_key(app: &TestApp, token: &str, view: &serde_json::Value, key: &str) {
    send_keys(app, token, view, |_| key.to_owned()).await
}

/// `send_key`, with each provider's own key.
pub(crate) async fn send_keys(
    app: &TestApp,
    token: &str,
    view: &serde_json::Value,
    key_of: impl Fn(&str) -> String,
) {
    let r = post_keys(app, token, view, key_of, json!({})).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
}

/// Seals each provider's key (`kinds`: what each is) and posts them; the
/// answer.
pub(crate) async fn post_keys(
    app: &TestApp,
    token: &str,
    view: &serde_json::Value,
    key_of: impl Fn(&str) -> String,
    kinds: Value,
) -> crate::app::Reply {
    use base64::Engine;
    let run = view["runId"].as_str().unwrap();
    let mut creds = serde_json::Map::new();
    for (provider, sb) in view["sandboxes"].as_object().unwrap() {
        let pk = base64::engine::general_purpose::STANDARD
            .decode(sb["publicKey"].as_str().unwrap())
            .unwrap();
        let sealed = polydev_vault::SealingPublicKey::from_bytes(&pk)
            .unwrap()
            .seal(
                polydev_sessions::runs::CREDENTIAL_PURPOSE,
                format!("{run}/{provider}").as_bytes(),
                key_of(provider).as_bytes(),
            );
        creds.insert(
            provider.clone(),
            json!(base64::engine::general_purpose::STANDARD.encode(sealed)),
        );
    }
    app.post(
        &format!("/api/runs/{run}/credentials"),
        Some(token),
        json!({"credentials": creds, "kinds": kinds}),
    )
    .await
}

/// Claude Code on a subscription token (`claude setup-token`'s), where the
/// operator offers subscription sign-in: the token reaches Anthropic as
/// the bearer, and the answer carries the subscription's windows (the
/// stand-in sends Anthropic's unified rate-limit headers). With the
/// 5-hour window used up the provider ends `rate_limited` with the reset
/// time; `owner` refuses a plain user's token before anything starts.
#[tokio::test(flavor = "multi_thread")]
async fn a_subscription_token_run_shows_its_windows_and_when_a_limit_resets() {
    let token_canary = format!("sk-ant-oat01-canary{}", uuid::Uuid::new_v4().simple());
    let start = |answer: &'static str, exhausted: bool, policy: &'static str| async move {
        let stub = polydev_stubs::start_subscription(answer, exhausted)
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let extra = format!("[providers.claude_code]\nsubscription_login = \"{policy}\"\n");
        let config = stub_config_with(dir.path(), stub.addr.port(), 1, 1, 1, &extra);
        let app =
            TestApp::spawn_with(Backend::Sqlite, &["--config", config.to_str().unwrap()]).await;
        (stub, dir, app)
    };
    async fn run(app: &TestApp, user: &str, canary: &str) -> (String, crate::app::Reply) {
        let r = app
            .post(
                "/api/runs",
                Some(user),
                json!({"prompt": "hello?", "providers": ["claude_code"]}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let answer = post_keys(
            app,
            user,
            &r.body,
            |_| canary.to_owned(),
            json!({"claude_code": "subscription_token"}),
        )
        .await;
        (r.body["runId"].as_str().unwrap().to_owned(), answer)
    }

    let (stub, _dir, app) = start("claude on a subscription", false, "all").await;
    let (_, user) = app.user("subscriber@example.com").await;
    let (id, r) = run(&app, &user, &token_canary).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let events = sse_events(&app, &format!("/api/runs/{id}/events"), &user).await;
    let done = events
        .iter()
        .find(|(e, _)| e == "done")
        .unwrap_or_else(|| panic!("{events:?}"));
    let windows = done.1["limits"]["windows"]
        .as_array()
        .unwrap_or_else(|| panic!("{events:?}"));
    let five = windows
        .iter()
        .find(|w| w["name"] == "five_hour")
        .unwrap_or_else(|| panic!("{done:?}"));
    assert_eq!(five["usedPercent"], 82.0, "{done:?}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let in_the_hour = |t: &Value| t.as_u64().is_some_and(|t| t > now && t <= now + 3660);
    assert!(in_the_hour(&five["resetsAt"]), "{done:?}");
    assert!(windows.iter().any(|w| w["name"] == "seven_day"), "{done:?}");
    assert!(events
        .iter()
        .any(|(e, d)| e == "delta" && d["text"] == "claude on a subscription"));
    assert!(
        stub.seen().iter().any(|s| s
            .headers
            .iter()
            .any(|(k, v)| k == "authorization" && v == &format!("Bearer {token_canary}"))),
        "the token is Claude Code's bearer"
    );
    app.assert_nowhere(&[&token_canary]).await;

    let (_stub, _dir, app) = start("never", true, "owner").await;
    let (_, plain) = app.user("plain@example.com").await;
    let (_, r) = run(&app, &plain, &token_canary).await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::FORBIDDEN, "sign_in_not_offered"),
        "{}",
        r.text
    );
    let admin = app.admin("owner@example.com");
    let (id, r) = run(&app, &admin, &token_canary).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let events = sse_events(&app, &format!("/api/runs/{id}/events"), &admin).await;
    let (kind, end) = events
        .iter()
        .rev()
        .find(|(_, d)| d["provider"] == "claude_code")
        .unwrap();
    assert_eq!(kind, "error", "{events:?}");
    assert_eq!(end["stage"], "rate_limited", "{end}");
    assert!(in_the_hour(&end["resetsAt"]), "{end}");
    let when = polydev_sessions::providers::utc(end["resetsAt"].as_u64().unwrap());
    assert!(end["message"].as_str().unwrap().contains(&when), "{end}");
    // The refusal Claude Code wrote itself is not shown as its answer.
    assert!(!events.iter().any(|(e, _)| e == "delta"), "{events:?}");
}

/// Cloud keys, the sanctioned path for products besides API keys: the
/// real Claude Code on Amazon Bedrock (a Bedrock API key; the stand-in
/// speaks Bedrock's invoke and event-stream protocol) and the real Gemini
/// CLI on Vertex AI (an express-mode API key) answer through the proxy,
/// each key reaching only its own vendor as its own credential header and
/// nowhere else; a CLI without a cloud gets a clear 400.
#[tokio::test(flavor = "multi_thread")]
async fn cloud_keys_run_claude_on_bedrock_and_gemini_on_vertex() {
    let bedrock = polydev_stubs::start(Provider::Anthropic, "claude on bedrock", None)
        .await
        .unwrap();
    let vertex = polydev_stubs::start(Provider::Gemini, "gemini on vertex", None)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "bedrock_region = \"eu-west-3\"\nbedrock_base_url = \"http://anthropic.stub.test:{}\"\nvertex_base_url = \"http://gemini.stub.test:{}\"\n",
        bedrock.addr.port(),
        vertex.addr.port()
    );
    let config = stub_config_with(dir.path(), 1, 1, 1, 1, &extra);
    let app = TestApp::spawn_with(Backend::Sqlite, &["--config", config.to_str().unwrap()]).await;
    let (_, user) = app.user("cloud@example.com").await;
    let bedrock_key = format!("ABSKcanary{}", uuid::Uuid::new_v4().simple());
    let vertex_key = format!("AQ.canary{}", uuid::Uuid::new_v4().simple());
    let r = app
        .post(
            "/api/runs",
            Some(&user),
            json!({"prompt": "hello?", "providers": ["claude_code", "gemini_cli"]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let id = r.body["runId"].as_str().unwrap().to_owned();
    let sent = post_keys(
        &app,
        &user,
        &r.body,
        |p| {
            if p == "claude_code" {
                bedrock_key.clone()
            } else {
                vertex_key.clone()
            }
        },
        json!({"claude_code": "cloud_key", "gemini_cli": "cloud_key"}),
    )
    .await;
    assert_eq!(sent.status, StatusCode::ACCEPTED, "{}", sent.text);
    let events = sse_events(&app, &format!("/api/runs/{id}/events"), &user).await;
    for (p, answer) in [
        ("claude_code", "claude on bedrock"),
        ("gemini_cli", "gemini on vertex"),
    ] {
        let mine: Vec<_> = events.iter().filter(|(_, d)| d["provider"] == p).collect();
        assert!(
            mine.iter()
                .any(|(e, d)| e == "delta" && d["text"].as_str().unwrap_or("").contains(answer)),
            "{p}: {mine:?}"
        );
        assert_eq!(
            mine.last().map(|e| e.0.as_str()),
            Some("done"),
            "{p}: {mine:?}"
        );
    }
    // Bedrock: the streamed invoke, on the key as its bearer, in the
    // region's inference profile; Vertex: its express path, on the key.
    let b = bedrock.seen();
    assert!(
        b.iter()
            .any(|s| s.path.ends_with("/invoke-with-response-stream")
                && s.path.starts_with("/model/")
                && s.headers
                    .iter()
                    .any(|(k, v)| k == "authorization" && v == &format!("Bearer {bedrock_key}"))),
        "{:?}",
        b.iter().map(|s| &s.path).collect::<Vec<_>>()
    );
    let v = vertex.seen();
    assert!(
        v.iter()
            .any(|s| s.path.starts_with("/v1beta1/publishers/google/models/")
                && s.headers
                    .iter()
                    .any(|(k, val)| k == "x-goog-api-key" && val == &vertex_key)),
        "{v:?}"
    );
    assert!(!b
        .iter()
        .chain(&v)
        .any(|s| s.path.starts_with("/v1/messages") || s.path.starts_with("/v1beta/models")));
    app.assert_nowhere(&[&bedrock_key, &vertex_key]).await;

    // Codex has no cloud here: said before anything starts.
    let r = app
        .post(
            "/api/runs",
            Some(&user),
            json!({"prompt": "x", "providers": ["codex"]}),
        )
        .await;
    let refused = post_keys(
        &app,
        &user,
        &r.body,
        |_| "k".into(),
        json!({"codex": "cloud_key"}),
    )
    .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{}", refused.text);
    assert!(
        refused.message().contains("no cloud key"),
        "{}",
        refused.text
    );
    drop(app);

    // In the browser: the Providers page offers the cloud key where a CLI
    // takes one, saves it to the vault, and the Runs page runs on it.
    let page_key = format!("ABSKpage{}", uuid::Uuid::new_v4().simple());
    let v = crate::app::browser_script("cloud-key.mjs", json!({"config": config, "key": page_key}))
        .await;
    assert!(
        v["hint"].as_str().unwrap().contains("Amazon Bedrock"),
        "{v}"
    );
    assert_eq!(v["codexHasCloud"], 0, "{v}");
    assert!(
        v["placeholder"]
            .as_str()
            .unwrap()
            .contains("saved Amazon Bedrock API key"),
        "{v}"
    );
    assert_eq!(v["state"], "done", "{v}");
    assert!(
        v["answer"].as_str().unwrap().contains("claude on bedrock"),
        "{v}"
    );
    assert_eq!(v["errors"], json!([]), "{v}");
    assert!(!v["logs"].as_str().unwrap().contains(&page_key));
    assert!(bedrock.seen().iter().any(|s| s
        .headers
        .iter()
        .any(|(k, val)| k == "authorization" && val == &format!("Bearer {page_key}"))));
}

/// An OpenAI stand-in that takes each request and never answers.
async fn hung_openai() -> polydev_stubs::StubServer {
    polydev_stubs::start_slow(Provider::OpenAi, "never", None, Duration::from_secs(600))
        .await
        .unwrap()
}

/// A run still working when the controller is told to stop ends there:
/// its viewers get the cancellation and the stream's end, the controller
/// exits well before the run's deadline, and after a restart the run's
/// stored state says it was cancelled (nothing is left "running").
#[tokio::test(flavor = "multi_thread")]
async fn a_run_in_flight_at_shutdown_ends_cancelled_and_the_controller_exits() {
    let hung = hung_openai().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("polydev.toml");
    std::fs::write(
        &config,
        format!(
            "[egress]\nallow_private = [\"127.0.0.0/8\"]\nper_user_ports = false\n[egress.hosts]\n\"openai.stub.test\" = \"127.0.0.1\"\n[runs]\ntemplate = \"minimal\"\ndeadline_secs = 300\nopenai_base_url = \"http://openai.stub.test:{}/v1\"\n",
            hung.addr.port()
        ),
    )
    .unwrap();
    let mut app =
        TestApp::spawn_with(Backend::Sqlite, &["--config", config.to_str().unwrap()]).await;
    let (_, token) = app.user("shutdown@example.com").await;
    let run = start_with_key(&app, &token, &["codex"], "sk-test").await;
    let pid = app.pid();
    let signal = async {
        // Codex is waiting on its provider: the request reached the stub.
        crate::app::eventually(
            Duration::from_secs(60),
            "codex reaches its provider",
            || async { (!hung.seen().is_empty()).then_some(()) },
        )
        .await;
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        std::time::Instant::now()
    };
    let events_path = format!("/api/runs/{run}/events");
    let (events, signalled) = tokio::join!(sse_events(&app, &events_path, &token), signal);
    let (kind, data) = events
        .iter()
        .rev()
        .find(|(_, d)| d["provider"] == "codex")
        .cloned()
        .expect("codex's last event");
    assert_eq!(kind, "error", "{events:?}");
    assert_eq!(data["stage"], "cancelled", "{data}");
    assert!(
        data["message"].as_str().unwrap().contains("shut down"),
        "{data}"
    );
    assert_eq!(events.last().unwrap().0, "end", "{events:?}");
    let exit = tokio::task::block_in_place(|| app.wait_exit(Duration::from_secs(20)));
    assert!(exit.success(), "exit status {exit:?}");
    assert!(
        signalled.elapsed() < Duration::from_secs(20),
        "the controller waited for the run"
    );
    app.restart().await;
    let r = app.get(&format!("/api/runs/{run}"), Some(&token)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        r.body["sandboxes"]["codex"]["state"], "cancelled",
        "{}",
        r.text
    );
}

/// A CLI whose provider never answers ends at the run's deadline with a
/// `timeout` error that says so; one whose provider's host does not
/// resolve says which host and why; a third answers meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn a_hung_provider_times_out_and_an_unreachable_one_says_why() {
    let hung = hung_openai().await;
    let gemini = polydev_stubs::start(Provider::Gemini, "gemini is fine", None)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("polydev.toml");
    std::fs::write(
        &config,
        format!(
            "[egress]\nallow_private = [\"127.0.0.0/8\"]\nper_user_ports = false\n[egress.hosts]\n\"openai.stub.test\" = \"127.0.0.1\"\n\"gemini.stub.test\" = \"127.0.0.1\"\n[runs]\ntemplate = \"minimal\"\ndeadline_secs = 120\ncredential_wait_secs = 60\nanthropic_base_url = \"http://nowhere.invalid:9\"\nopenai_base_url = \"http://openai.stub.test:{}/v1\"\ngemini_base_url = \"http://gemini.stub.test:{}\"\n",
            hung.addr.port(),
            gemini.addr.port()
        ),
    )
    .unwrap();
    let app = TestApp::spawn_with(Backend::Sqlite, &["--config", config.to_str().unwrap()]).await;
    let (_, token) = app.user("deadline@example.com").await;
    let started = std::time::Instant::now();
    // The run's own deadline, under the server's 120 s (one asked for
    // beyond it is cut to it).
    let r = app
        .post(
            "/api/runs",
            Some(&token),
            json!({"prompt": "hi", "providers": ["claude_code", "codex", "gemini_cli"], "deadlineSecs": 12}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["deadlineSecs"], 12, "{}", r.text);
    send_key(&app, &token, &r.body, "sk-test").await;
    let run = r.body["runId"].as_str().unwrap();
    let events = sse_events(&app, &format!("/api/runs/{run}/events"), &token).await;
    let took = started.elapsed();
    let long = app
        .post(
            "/api/runs",
            Some(&token),
            json!({"prompt": "hi", "providers": ["gemini_cli"], "deadlineSecs": 1_000_000}),
        )
        .await;
    assert_eq!(long.body["deadlineSecs"], 120, "{}", long.text);
    let id = long.body["runId"].as_str().unwrap();
    app.send(
        reqwest::Method::DELETE,
        &format!("/api/runs/{id}"),
        Some(&token),
        None,
    )
    .await;
    let last = |p: &str| {
        events
            .iter()
            .rev()
            .find(|(e, d)| d["provider"] == p && (e == "error" || e == "done"))
            .cloned()
            .unwrap_or_else(|| panic!("{p} never ended: {events:?}"))
    };
    let (kind, codex) = last("codex");
    assert_eq!(
        (kind.as_str(), codex["stage"].as_str()),
        ("error", Some("timeout")),
        "{codex}"
    );
    let m = codex["message"].as_str().unwrap();
    assert!(m.contains("Codex") && m.contains("12 s"), "{m}");
    let (kind, claude) = last("claude_code");
    assert_eq!(kind, "error", "{claude}");
    let m = claude["message"].as_str().unwrap();
    assert!(
        m.contains("nowhere.invalid") && m.contains("cannot be resolved"),
        "{m}"
    );
    assert_eq!(last("gemini_cli").0, "done", "{events:?}");
    assert_eq!(events.last().unwrap().0, "end", "{events:?}");
    // The deadline ended it, not the sandbox's TTL (minutes later).
    assert!(took < std::time::Duration::from_secs(40), "took {took:?}");
}

/// The `mcp` package from PyPI, as a coding agent's client: `polydev mcp`
/// names itself, and a run whose providers all failed comes back as a
/// tool result with `isError` (for the agent to read), not a protocol
/// error.
#[tokio::test(flavor = "multi_thread")]
async fn a_python_mcp_client_reads_a_failed_run_as_a_tool_error() {
    let gemini = polydev_stubs::start(Provider::Gemini, "never", Some(400))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = stub_config(dir.path(), 1, 1, gemini.addr.port(), 1);
    let app = TestApp::spawn_with(Backend::Sqlite, &["--config", config.to_str().unwrap()]).await;
    let (_, token) = app.user("py@example.com").await;
    let input = json!({
        "bin": crate::app::BIN,
        "server": app.base,
        "token": token,
        "providers": ["gemini_cli"],
        "env": {"GEMINI_API_KEY": "sk-python"},
    });
    let v = crate::app::python_script("mcp_client.py", input).await;
    assert_eq!(v["serverName"], "polydev", "{v}");
    assert_eq!(v["serverVersion"], env!("CARGO_PKG_VERSION"), "{v}");
    assert_eq!(v["tools"], json!(["get_perspectives"]));
    assert_eq!(v["isError"], true, "{v}");
    let text = v["text"].as_str().unwrap();
    assert!(text.contains("Gemini CLI"), "{text}");
}

/// One provider of a run can be stopped alone: it ends `cancelled` (its
/// sandbox with it) while the others answer; a provider not in the run,
/// or no provider at all, is a clear 400.
#[tokio::test(flavor = "multi_thread")]
async fn stopping_one_provider_leaves_the_others_running() {
    let anthropic = polydev_stubs::start(Provider::Anthropic, "claude kept going", None)
        .await
        .unwrap();
    let openai = hung_openai().await;
    let dir = tempfile::tempdir().unwrap();
    let config = stub_config(dir.path(), anthropic.addr.port(), openai.addr.port(), 1, 1);
    let app = TestApp::spawn_with(Backend::Sqlite, &["--config", config.to_str().unwrap()]).await;
    let (_, token) = app.user("stopper@example.com").await;
    let t = Some(token.as_str());
    let run = start_with_key(&app, &token, &["codex", "claude_code"], "sk-stop").await;
    // Codex is waiting on its (hung) provider: stopped there.
    crate::app::eventually(
        Duration::from_secs(30),
        "codex calls its provider",
        || async { (!openai.seen().is_empty()).then_some(()) },
    )
    .await;
    let r = app
        .send(
            reqwest::Method::DELETE,
            &format!("/api/runs/{run}/providers/codex"),
            t,
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    for (path, code) in [
        (
            format!("/api/runs/{run}/providers/gemini_cli"),
            "invalid_run_request",
        ),
        (
            format!("/api/runs/{run}/providers/nope"),
            "invalid_provider",
        ),
    ] {
        let r = app.send(reqwest::Method::DELETE, &path, t, None).await;
        assert_eq!(
            (r.status, r.error_code()),
            (StatusCode::BAD_REQUEST, code),
            "{path}: {}",
            r.text
        );
        assert!(!r.message().is_empty(), "{path}: {}", r.text);
    }
    let events = sse_events(&app, &format!("/api/runs/{run}/events"), &token).await;
    let last = |p: &str| {
        events
            .iter()
            .rev()
            .find(|(_, d)| d["provider"] == p)
            .cloned()
            .unwrap_or_else(|| panic!("{p}: {events:?}"))
    };
    let (kind, codex) = last("codex");
    assert_eq!(
        (kind.as_str(), &codex["stage"], &codex["message"]),
        ("error", &json!("cancelled"), &json!("you stopped Codex")),
        "{events:?}"
    );
    assert_eq!(last("claude_code").0, "done", "{events:?}");
    assert!(events
        .iter()
        .any(|(e, d)| e == "delta" && d["text"] == "claude kept going"));
    let sandbox = events
        .iter()
        .find(|(e, d)| e == "started" && d["provider"] == "codex")
        .map(|(_, d)| d["sandboxId"].as_str().unwrap().to_owned())
        .unwrap();
    let r = app.get(&format!("/api/sandboxes/{sandbox}"), t).await;
    assert_eq!(r.body["status"], "ended", "{}", r.text);
}

/// The daily run limit per user: past it a start is 429 with when the
/// count starts over (Retry-After, and the time in words), before any
/// sandbox is made; another user is not held by it.
#[tokio::test(flavor = "multi_thread")]
async fn a_user_past_the_daily_run_limit_is_told_when_it_resets() {
    let dir = tempfile::tempdir().unwrap();
    let config = stub_config_with(dir.path(), 1, 1, 1, 1, "max_runs_per_user_per_day = 2\n");
    let app = TestApp::spawn_with(Backend::Sqlite, &["--config", config.to_str().unwrap()]).await;
    let (_, token) = app.user("busy@example.com").await;
    let start = |t: String| {
        let app = &app;
        async move {
            app.post(
                "/api/runs",
                Some(&t),
                json!({"prompt": "hi", "providers": ["claude_code"]}),
            )
            .await
        }
    };
    let mut ids = Vec::new();
    for _ in 0..2 {
        let r = start(token.clone()).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        ids.push(r.body["runId"].as_str().unwrap().to_owned());
    }
    let sandboxes = app.get("/api/sandboxes", Some(&token)).await.body.clone();
    assert_eq!(
        sandboxes["sandboxes"].as_array().unwrap().len(),
        2,
        "{sandboxes}"
    );
    let r = start(token.clone()).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text);
    assert_eq!(r.error_code(), "daily_run_limit");
    assert!(
        r.text.contains("2 runs for today") && r.text.contains("UTC"),
        "{}",
        r.text
    );
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=86_400).contains(&retry), "{retry}");
    assert_eq!(
        app.get("/api/sandboxes", Some(&token)).await.body,
        sandboxes,
        "no sandbox for a refused run"
    );
    let (_, other) = app.user("calm@example.com").await;
    let r = start(other.clone()).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    ids.push(r.body["runId"].as_str().unwrap().to_owned());
    for (i, id) in ids.iter().enumerate() {
        let t = if i < 2 { &token } else { &other };
        let r = app
            .send(
                reqwest::Method::DELETE,
                &format!("/api/runs/{id}"),
                Some(t),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    }
}
