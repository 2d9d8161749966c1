//! The real CLIs (Claude Code, Codex, Gemini CLI, from npm) inside a real
//! sandbox in network mode `egress`, talking to loopback stub provider
//! servers that only the egress proxy can resolve: the groundwork runs
//! (issue 8) build on. The CLIs come from scripts/test.sh (`npm install -g`
//! of the pinned versions); the `minimal` template borrows the host's /usr.

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
        "[egress]\nallow_private = [\"127.0.0.0/8\"]\nper_user_ports = false\n[egress.hosts]\n\"anthropic.stub.test\" = \"127.0.0.1\"\n\"openai.stub.test\" = \"127.0.0.1\"\n\"gemini.stub.test\" = \"127.0.0.1\"\n",
    )
    .unwrap();
    let app = TestApp::spawn_with(Backend::Sqlite, &["--config", config.to_str().unwrap()]).await;
    let (_, token) = app.user("clis@example.com").await;
    let t = Some(token.as_str());
    let r = app
        .post(
            "/api/sandboxes",
            t,
            json!({"template": "minimal", "network": "egress", "memoryMb": 2048, "pids": 1024}),
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
    let logs = app.settled_logs().await;
    assert!(!logs.contains(&key));
    assert!(!app.get("/metrics", None).await.text.contains(&key));
    for entry in std::fs::read_dir(app.db.dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            assert!(!String::from_utf8_lossy(&std::fs::read(path).unwrap()).contains(&key));
        }
    }
}
