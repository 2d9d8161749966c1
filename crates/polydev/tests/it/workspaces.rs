//! Runs on the user's code: a tar archive sealed by the client to each
//! sandbox in chunks, unpacked there as a git repository; the real CLIs
//! (from npm) edit it through their own tools, driven by the stubs' tool
//! loop, and each one's changes come back as a diff sealed to the user.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use polydev_sessions::workspace::{CHUNK, DIFF_PURPOSE};
use polydev_stubs::Provider;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::app::{Reply, TestApp};
use crate::clis::{send_keys, sse_events, stub_config_with};

/// A small repository's files, as a tar archive.
fn archive(files: &[(&str, &str)]) -> Vec<u8> {
    let files: Vec<(String, Vec<u8>)> = files
        .iter()
        .map(|(p, c)| ((*p).to_owned(), c.as_bytes().to_vec()))
        .collect();
    polydev_sessions::workspace::tar_of(&files).unwrap()
}

/// The archive sealed to one provider's sandbox, chunk by chunk, framed
/// as the upload takes it.
fn sealed_upload(view: &Value, provider: &str, archive: &[u8]) -> Vec<u8> {
    let run = view["runId"].as_str().unwrap();
    let pk = B64
        .decode(view["sandboxes"][provider]["publicKey"].as_str().unwrap())
        .unwrap();
    let key = polydev_vault::SealingPublicKey::from_bytes(&pk).unwrap();
    polydev_sessions::workspace::sealed_upload(&key, run, provider, archive)
}

async fn upload(app: &TestApp, token: &str, run: &str, provider: &str, body: Vec<u8>) -> Reply {
    let resp = app
        .client
        .put(app.url(&format!("/api/runs/{run}/workspace/{provider}")))
        .bearer_auth(token)
        .header("content-type", "application/octet-stream")
        .body(body)
        .timeout(std::time::Duration::from_secs(120))
        .send()
        .await
        .unwrap();
    crate::app::read(resp).await
}

/// A provider's stored diff, fetched and opened with the user's key.
async fn open_diff(
    app: &TestApp,
    token: &str,
    run: &str,
    provider: &str,
    user_key: &polydev_vault::SealingKeyPair,
) -> Vec<u8> {
    let r = app
        .get(&format!("/api/runs/{run}/diff/{provider}"), Some(token))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["purpose"], DIFF_PURPOSE);
    let sealed = B64.decode(r.body["sealed"].as_str().unwrap()).unwrap();
    let aad = format!("{run}/{provider}");
    user_key
        .open(DIFF_PURPOSE, aad.as_bytes(), &sealed)
        .unwrap()
        .to_vec()
}

/// A path in the workspace, inside the sandbox.
fn in_workspace(rel: &str) -> String {
    format!("{}/{rel}", polydev_sessions::workspace::DIR)
}

/// `files` committed in a repository of their own, as a `git bundle`.
fn git_bundle(files: &[(&str, &str)]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    for (path, content) in files {
        let p = repo.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(&repo)
            .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    git(&["init", "-q"]);
    git(&["add", "-A"]);
    git(&["commit", "-q", "-m", "the user's history"]);
    let bundle = dir.path().join("repo.bundle");
    git(&[
        "bundle",
        "create",
        bundle.to_str().unwrap(),
        "HEAD",
        "--branches",
    ]);
    std::fs::read(bundle).unwrap()
}

/// Applies `diff` to a fresh copy of `files` with `git apply`; the tree
/// after, as (path, content) of every file.
fn apply(files: &[(&str, &str)], diff: &[u8]) -> Vec<(String, String)> {
    let dir = tempfile::tempdir().unwrap();
    for (path, content) in files {
        let p = dir.path().join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
    let patch = dir.path().join("../polydev-test.patch");
    std::fs::write(&patch, diff).unwrap();
    let out = std::process::Command::new("git")
        .arg("apply")
        .arg(&patch)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&patch);
    assert!(
        out.status.success(),
        "git apply: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(diff)
    );
    let mut tree = Vec::new();
    for e in walk(dir.path()) {
        let rel = e.strip_prefix(dir.path()).unwrap().display().to_string();
        tree.push((rel, std::fs::read_to_string(&e).unwrap()));
    }
    tree.sort();
    tree
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

const ALL: [&str; 3] = ["claude_code", "codex", "gemini_cli"];

#[tokio::test(flavor = "multi_thread")]
async fn an_edit_run_brings_each_cli_s_changes_back_as_a_diff_sealed_to_the_user() {
    let canary = format!("canary-code-{}", uuid::Uuid::new_v4().simple());
    // More than one chunk (1 MiB each), so their order is bound too.
    let big = "a line of data that fills the archive\n".repeat(40_000);
    let files = [
        ("README.md", "# demo\n"),
        ("src/lib.txt", canary.as_str()),
        ("data/big.txt", big.as_str()),
    ];
    let claude_wrote = "fixed by claude\n";
    let gemini_wrote = "fixed by gemini\n";
    let codex_wrote = "fixed by codex\n";
    let openai = polydev_stubs::start_editing(
        Provider::OpenAi,
        "codex changed the code",
        &in_workspace("src/codex.txt"),
        codex_wrote,
    )
    .await
    .unwrap();
    let anthropic = polydev_stubs::start_editing(
        Provider::Anthropic,
        "claude changed the code",
        &in_workspace("src/claude.txt"),
        claude_wrote,
    )
    .await
    .unwrap();
    let gemini = polydev_stubs::start_editing(
        Provider::Gemini,
        "gemini changed the code",
        &in_workspace("src/gemini.txt"),
        gemini_wrote,
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = stub_config_with(
        dir.path(),
        anthropic.addr.port(),
        openai.addr.port(),
        gemini.addr.port(),
        1,
        "max_workspace_mb = 3\n",
    );
    let app = TestApp::spawn_with(
        polydev_store::Backend::Sqlite,
        &["--config", config.to_str().unwrap()],
    )
    .await;
    let (_, token, user_key) = app.enrolled_user("code@example.com").await;
    let t = Some(token.as_str());

    // A workspace run needs the vault its diffs come back sealed to (an
    // operator-made account has none until its owner signs in).
    let tar = archive(&files);
    let start = |mode: &str, bytes: usize| {
        json!({"prompt": "fix the bug", "providers": ["claude_code", "codex", "gemini_cli"],
            "workspace": {"mode": mode, "bytes": bytes}})
    };
    let admin = app.admin("ops@example.com");
    let r = app
        .post("/api/runs", Some(&admin), start("edit", tar.len()))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert!(r.text.contains("vault"), "{}", r.text);
    // Larger than the server takes: 413, naming the limit, before any
    // sandbox is made; a CLI with no read-only mode is refused.
    let r = app.post("/api/runs", t, start("edit", 3 << 20 | 1)).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text);
    assert!(r.text.contains("3 MiB"), "{}", r.text);
    let r = app
        .post(
            "/api/runs",
            t,
            json!({"prompt": "x", "providers": ["copilot"], "workspace": {"mode": "ask", "bytes": 10}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);

    let r = app.post("/api/runs", t, start("edit", tar.len())).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let view = r.body.clone();
    let run = view["runId"].as_str().unwrap().to_owned();
    assert_eq!(view["sandboxes"]["claude_code"]["workspace"], "awaiting");
    // No credential before the code.
    let r = crate::clis::post_keys(&app, &token, &view, |_| "sk-test".into(), json!({})).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text);

    // A stream sealed for another provider, or cut short, does not open
    // or is refused; the provider still awaits its workspace after.
    let wrong = sealed_upload(&view, "gemini_cli", &tar);
    let r = upload(&app, &token, &run, "claude_code", wrong).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert!(r.text.contains("did not open"), "{}", r.text);
    let whole = sealed_upload(&view, "claude_code", &tar);
    let r = upload(
        &app,
        &token,
        &run,
        "claude_code",
        whole[..whole.len() - 7].to_vec(),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    // The right chunks in the wrong order do not open either.
    let first = 4 + u32::from_be_bytes(whole[..4].try_into().unwrap()) as usize;
    assert!(first < whole.len(), "the archive takes two chunks");
    let swapped = [&whole[first..], &whole[..first]].concat();
    let r = upload(&app, &token, &run, "claude_code", swapped).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert!(r.text.contains("chunk 0"), "{}", r.text);
    // A declared chunk longer than a sealed chunk is refused unread.
    let mut huge = ((CHUNK as u32) * 2).to_be_bytes().to_vec();
    huge.extend_from_slice(&[0; 64]);
    let r = upload(&app, &token, &run, "claude_code", huge).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text);

    for p in ALL {
        let r = upload(&app, &token, &run, p, sealed_upload(&view, p, &tar)).await;
        assert_eq!(r.status, StatusCode::OK, "{p}: {}", r.text);
        assert_eq!(r.body["sandboxes"][p]["workspace"], "ready", "{}", r.text);
    }
    let r = upload(
        &app,
        &token,
        &run,
        "gemini_cli",
        sealed_upload(&view, "gemini_cli", &tar),
    )
    .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text);

    send_keys(&app, &token, &view, |_| "sk-test-key".into()).await;
    let events = sse_events(&app, &format!("/api/runs/{run}/events"), &token).await;
    for p in ALL {
        let diff = events
            .iter()
            .find(|(e, d)| e == "diff" && d["provider"] == p)
            .unwrap_or_else(|| panic!("no diff event for {p}: {events:?}"));
        assert!(diff.1["bytes"].as_u64().unwrap() > 0, "{events:?}");
        assert!(
            events
                .iter()
                .any(|(e, d)| e == "done" && d["provider"] == p),
            "{events:?}"
        );
    }
    // The CLIs really ran their tools: each stub got its tool's result.
    assert!(anthropic
        .seen()
        .iter()
        .any(|s| s.body.contains("tool_result")));
    assert!(gemini
        .seen()
        .iter()
        .any(|s| s.body.contains("functionResponse")));
    assert!(openai
        .seen()
        .iter()
        .any(|s| s.body.contains("custom_tool_call_output")));

    // Each diff opens with the user's key only and applies to the base.
    for (p, file, wrote) in [
        ("claude_code", "src/claude.txt", claude_wrote),
        ("gemini_cli", "src/gemini.txt", gemini_wrote),
        ("codex", "src/codex.txt", codex_wrote),
    ] {
        let diff = open_diff(&app, &token, &run, p, &user_key).await;
        let tree = apply(&files, &diff);
        let mut want: Vec<(String, String)> = files
            .iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect();
        want.push((file.to_owned(), wrote.to_owned()));
        want.sort();
        assert_eq!(tree, want, "{p}");
    }
    // Listed in the history; another user sees none of it.
    let h = app.get("/api/runs", t).await;
    assert_eq!(h.body["runs"][0]["diffs"], json!(ALL), "{}", h.text);
    let (_, other) = app.user("other@example.com").await;
    let r = app
        .get(&format!("/api/runs/{run}/diff/claude_code"), Some(&other))
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);

    // A git bundle is a workspace too: cloned, its HEAD the base (and
    // its history there for the CLI); the diff applies to a checkout.
    let bundle = git_bundle(&files);
    let r = app
        .post(
            "/api/runs",
            t,
            json!({"prompt": "fix it", "providers": ["claude_code"],
                "workspace": {"mode": "edit", "bytes": bundle.len()}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let (bview, brun) = (r.body.clone(), r.body["runId"].as_str().unwrap().to_owned());
    let r = upload(
        &app,
        &token,
        &brun,
        "claude_code",
        sealed_upload(&bview, "claude_code", &bundle),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    send_keys(&app, &token, &bview, |_| "sk-test-key".into()).await;
    let events = sse_events(&app, &format!("/api/runs/{brun}/events"), &token).await;
    assert!(
        events
            .iter()
            .any(|(e, d)| e == "diff" && d["bytes"].as_u64() > Some(0)),
        "{events:?}"
    );
    let diff = open_diff(&app, &token, &brun, "claude_code", &user_key).await;
    let tree = apply(&files, &diff);
    assert!(
        tree.contains(&("src/claude.txt".to_owned(), claude_wrote.to_owned())),
        "{tree:?}"
    );

    // Asked only to read, the same CLIs (whose models again try to write)
    // stay in their read-only modes: the workspace is unchanged, and no
    // diff comes back.
    let r = app.post("/api/runs", t, start("ask", tar.len())).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let view = r.body.clone();
    let run = view["runId"].as_str().unwrap().to_owned();
    for p in ALL {
        let r = upload(&app, &token, &run, p, sealed_upload(&view, p, &tar)).await;
        assert_eq!(r.status, StatusCode::OK, "{p}: {}", r.text);
    }
    send_keys(&app, &token, &view, |_| "sk-test-key".into()).await;
    let events = sse_events(&app, &format!("/api/runs/{run}/events"), &token).await;
    assert!(!events.iter().any(|(e, _)| e == "diff"), "{events:?}");
    for p in ALL {
        assert!(
            events
                .iter()
                .any(|(e, d)| e == "done" && d["provider"] == p),
            "{events:?}"
        );
        let r = app.get(&format!("/api/runs/{run}/diff/{p}"), t).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
    }

    // The code reached no log line, metric, store or file of the controller.
    app.assert_nowhere(&[&canary]).await;
}

/// The run page with code, in headless Chromium, on the real runtime
/// image: a picked folder goes to the three CLIs sealed in the tab, each column offers its CLI's
/// changes, which open in the tab as a per-file view, and the patch the
/// page offers for download applies to the folder.
#[tokio::test(flavor = "multi_thread")]
async fn the_run_page_sends_a_folder_and_shows_each_cli_s_changes() {
    let mut stubs = Vec::new();
    for (provider, name) in [
        (Provider::Anthropic, "claude"),
        (Provider::OpenAi, "codex"),
        (Provider::Gemini, "gemini"),
    ] {
        let path = in_workspace(&format!("src/{name}.txt"));
        let stub = polydev_stubs::start_editing(
            provider,
            &format!("{name} changed the code"),
            &path,
            &format!("fixed by {name}\n"),
        )
        .await
        .unwrap();
        stubs.push(stub);
    }
    let files = [("README.md", "# demo\n"), ("src/lib.txt", "the code\n")];
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join("project");
    for (path, content) in files {
        let p = project.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
    let config = stub_config_with(
        dir.path(),
        stubs[0].addr.port(),
        stubs[1].addr.port(),
        stubs[2].addr.port(),
        1,
        "",
    );
    // On the runtime image users get (its git and tar, its CLIs), not the
    // host-borrowing `minimal` template.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("template = \"minimal\"\n", "")).unwrap();
    let v = crate::app::browser_script(
        "workspace-page.mjs",
        json!({"config": config, "imagesDir": crate::first_start::images_dir(), "key": "sk-test-key", "dir": project}),
    )
    .await;
    assert!(v["picked"].as_str().unwrap().contains("2 files"), "{v}");
    for (p, name) in [
        ("claude_code", "claude"),
        ("codex", "codex"),
        ("gemini_cli", "gemini"),
    ] {
        assert_eq!(v["states"][p], "done", "{v}");
        let file = format!("src/{name}.txt");
        let shown = v["changes"][p].as_str().unwrap();
        assert!(
            shown.contains(&file) && shown.contains("added"),
            "{p}: {shown}"
        );
        assert!(shown.contains(&format!("+fixed by {name}")), "{p}: {shown}");
        let tree = apply(&files, v["patches"][p].as_str().unwrap().as_bytes());
        assert!(
            tree.contains(&(file.clone(), format!("fixed by {name}\n"))),
            "{p}: {tree:?}"
        );
    }
    assert!(
        v["history"].as_str().unwrap().contains("src/codex.txt"),
        "{v}"
    );
}

/// `polydev mcp`'s `get_perspectives` on a local checkout: the directory
/// is archived and sealed on the user's side, and in `edit` mode each
/// CLI's diff comes back to the calling agent (sealed to the call's own
/// key, opened there), applying to the checkout.
#[tokio::test(flavor = "multi_thread")]
async fn the_mcp_tool_works_on_a_local_checkout() {
    use rmcp::transport::{ConfigureCommandExt, TokioChildProcess};
    use rmcp::ServiceExt;
    let claude_wrote = "from the agent's perspective\n";
    let anthropic = polydev_stubs::start_editing(
        Provider::Anthropic,
        "claude read your repository",
        &in_workspace("NOTES.md"),
        claude_wrote,
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let checkout = dir.path().join("checkout");
    let files = [
        ("Cargo.toml", "[package]\n"),
        ("src/main.rs", "fn main() {}\n"),
    ];
    for (path, content) in files {
        let p = checkout.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
    // Its .git stays on this machine.
    std::fs::create_dir_all(checkout.join(".git")).unwrap();
    std::fs::write(checkout.join(".git/config"), "secret-ish local config").unwrap();
    let config = stub_config_with(dir.path(), anthropic.addr.port(), 1, 1, 1, "");
    let app = TestApp::spawn_with(
        polydev_store::Backend::Sqlite,
        &["--config", config.to_str().unwrap()],
    )
    .await;
    let (_, token) = app.user("agent@example.com").await;
    let transport = TokioChildProcess::new(
        tokio::process::Command::new(crate::app::BIN).configure(|cmd| {
            cmd.args(["mcp", "--server", &app.base])
                .env("POLYDEV_TOKEN", &token)
                .env("ANTHROPIC_API_KEY", "sk-test-key");
        }),
    )
    .unwrap();
    let client = ().serve(transport).await.unwrap();
    let call = |args: Value| {
        let client = &client;
        async move {
            client
                .call_tool(
                    rmcp::model::CallToolRequestParams::new("get_perspectives")
                        .with_arguments(args.as_object().unwrap().clone()),
                )
                .await
        }
    };
    let r = call(
        json!({"prompt": "what does it do?", "providers": ["claude_code"],
        "path": checkout, "mode": "edit"}),
    )
    .await
    .unwrap();
    let content = serde_json::to_value(&r.content).unwrap();
    let text = content[0]["text"].as_str().unwrap().to_owned();
    let out: Value = serde_json::from_str(&text).unwrap();
    let p = &out["perspectives"]["claude_code"];
    assert_eq!(p["status"], "done", "{text}");
    assert!(
        p["answer"].as_str().unwrap().contains("claude read"),
        "{text}"
    );
    let tree = apply(&files, p["diff"].as_str().unwrap().as_bytes());
    assert!(
        tree.contains(&("NOTES.md".to_owned(), claude_wrote.to_owned())),
        "{tree:?}"
    );
    // Not a directory: a clear parameter error, no run.
    let err = call(json!({"prompt": "x", "path": dir.path().join("nowhere")})).await;
    assert!(format!("{err:?}").contains("not a directory"), "{err:?}");
    client.cancel().await.unwrap();
    app.assert_nowhere(&["secret-ish local config"]).await;
}
