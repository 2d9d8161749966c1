//! A first start on the images users get: `polydev serve` builds the
//! `runtime` and `browser` images itself (debootstrap, apt, npm: the real
//! build, into the directory `scripts/test.sh` names in
//! `POLYDEV_TEST_IMAGES`), says how far along it is meanwhile, and then a
//! run across the three real CLIs and a login session work on those
//! images, against the local stubs. `scripts/test.sh` runs this first, on
//! its own, and the rest of the suite then finds the images there.

use std::time::Duration;

use polydev_store::Backend;
use polydev_stubs::Provider;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::app::TestApp;

/// Where `scripts/test.sh` keeps the real images for the suite.
pub const IMAGES_VAR: &str = "POLYDEV_TEST_IMAGES";

/// The images directory, or a loud failure: these tests must never pass
/// without the real images.
pub fn images_dir() -> String {
    std::env::var(IMAGES_VAR).unwrap_or_else(|_| {
        panic!("{IMAGES_VAR} is not set: run the tests through scripts/test.sh, which builds the real images there")
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn first_start_prepares_the_images_then_runs_and_logins_work_on_them() {
    let images = images_dir();
    let store = polydev_sandbox::ImageStore::new(&images);
    for t in ["runtime", "browser"] {
        assert!(
            store.current(t).is_err(),
            "{images} has a {t} image already: this test must see a first start (scripts/test.sh empties it)"
        );
    }
    let anthropic = polydev_stubs::start(Provider::Anthropic, "claude on the real image", None)
        .await
        .unwrap();
    let openai = polydev_stubs::start(Provider::OpenAi, "codex on the real image", None)
        .await
        .unwrap();
    let gemini = polydev_stubs::start(Provider::Gemini, "gemini on the real image", None)
        .await
        .unwrap();
    let copilot = polydev_stubs::start(Provider::Copilot, "copilot on the real image", None)
        .await
        .unwrap();
    let oauth = polydev_stubs::oauth::start("first").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("polydev.toml");
    std::fs::write(
        &config,
        format!(
            "[sandbox]\npools = {{}}\n[egress]\nallow_private = [\"127.0.0.0/8\"]\nper_user_ports = false\n[egress.hosts]\n\"anthropic.stub.test\" = \"127.0.0.1\"\n\"openai.stub.test\" = \"127.0.0.1\"\n\"gemini.stub.test\" = \"127.0.0.1\"\n\"copilot.stub.test\" = \"127.0.0.1\"\n\"auth.stub.test\" = \"127.0.0.1\"\n[runs]\ndeadline_secs = 120\ncredential_wait_secs = 60\nanthropic_base_url = \"http://anthropic.stub.test:{}\"\nopenai_base_url = \"http://openai.stub.test:{}/v1\"\ngemini_base_url = \"http://gemini.stub.test:{}\"\ncopilot_base_url = \"http://copilot.stub.test:{}\"\n[login]\nboot_deadline_secs = 60\n{}",
            anthropic.addr.port(),
            openai.addr.port(),
            gemini.addr.port(),
            copilot.addr.port(),
            crate::login::stub_login_providers_for(&["gemini_cli"], oauth.addr.port()),
        ),
    )
    .unwrap();
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        &[
            "--config",
            config.to_str().unwrap(),
            "--images-dir",
            &images,
            "--sandbox-prepare",
            "runtime,browser",
        ],
    )
    .await;
    let (uid, token, enrollment) = crate::login::vault_user(&app, "first@example.com").await;
    let t = Some(token.as_str());

    // While the images are being built, a run says what is prepared and
    // how far along it is, and so do a login and `polydev image status`.
    let r = app
        .post(
            "/api/runs",
            t,
            json!({"prompt": "early", "providers": ["codex"]}),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::SERVICE_UNAVAILABLE, "environment_preparing"),
        "{}",
        r.text
    );
    assert!(
        r.message()
            .contains("runtime environment is being prepared"),
        "{}",
        r.message()
    );
    assert!(r.headers.contains_key("retry-after"));
    let r = app
        .post(
            "/api/auth/start",
            t,
            json!({"userId": uid, "provider": "codex", "mode": "code"}),
        )
        .await;
    assert_eq!(r.error_code(), "environment_preparing", "{}", r.text);
    let status = tokio::task::block_in_place(|| {
        app.cli(&["image", "status", "--images-dir", &images, "--json"])
    });
    let rows: Value = serde_json::from_slice(&status.stdout).unwrap();
    let runtime = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["template"] == "runtime")
        .unwrap();
    assert!(
        ["building", "queued"].contains(&runtime["status"]["state"].as_str().unwrap()),
        "{rows}"
    );

    // It waits, then runs (as the web page and `polydev mcp` do). Every
    // 3 s: each try starts work when the images are ready.
    let seen_steps = std::cell::RefCell::new(std::collections::BTreeSet::new());
    let every = Duration::from_secs(3);
    let within = Duration::from_secs(15 * 60);
    polydev_testkit::eventually_every(every, within, "the runtime image is ready", || async {
        let r = app
            .post(
                "/api/runs",
                t,
                json!({"prompt": "probe", "providers": ["codex"]}),
            )
            .await;
        if r.status == StatusCode::CREATED {
            let id = r.body["runId"].as_str().unwrap();
            app.send(reqwest::Method::DELETE, &format!("/api/runs/{id}"), t, None)
                .await;
            return Some(());
        }
        if r.error_code() != "environment_preparing" {
            panic!("{}\n{}", r.text, why_not_prepared(&app, &images));
        }
        if let Some(step) = r.body["error"]["details"]["what"].as_str() {
            seen_steps.borrow_mut().insert(step.to_owned());
        }
        None
    })
    .await;
    assert!(!seen_steps.borrow().is_empty(), "no step was ever reported");
    // The browser image may still be building; wait for it too.
    polydev_testkit::eventually_every(every, within, "the browser image is ready", || async {
        let r = app
            .post(
                "/api/auth/start",
                t,
                json!({"userId": uid, "provider": "codex", "mode": "code"}),
            )
            .await;
        if r.status == StatusCode::ACCEPTED {
            let id = r.body["sessionId"].as_str().unwrap().to_owned();
            app.send(
                reqwest::Method::DELETE,
                &format!("/api/auth/session/{id}"),
                t,
                None,
            )
            .await;
            return Some(());
        }
        if r.error_code() != "environment_preparing" {
            panic!("{}\n{}", r.text, why_not_prepared(&app, &images));
        }
        None
    })
    .await;

    // A run across the five real CLIs on the runtime image (Copilot CLI
    // on a GitHub-shaped token, OpenCode on an OpenAI-shaped key).
    let (_, events) = crate::clis::run_with_keys(
        &app,
        &token,
        "hello?",
        &["claude_code", "codex", "gemini_cli", "opencode", "copilot"],
        |p| {
            if p == "copilot" {
                "github_pat_first_start"
            } else {
                "sk-first-start"
            }
            .to_owned()
        },
    )
    .await;
    for (p, answer) in [
        ("claude_code", "claude on the real image"),
        ("codex", "codex on the real image"),
        ("gemini_cli", "gemini on the real image"),
        ("opencode", "codex on the real image"),
        ("copilot", "copilot on the real image"),
    ] {
        let mine: Vec<&(String, Value)> =
            events.iter().filter(|(_, d)| d["provider"] == p).collect();
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

    // A login session on the browser image (code relay, the stub provider):
    // the CLI's credential is captured and sealed to the user.
    let id = crate::login::start_session(&app, &token, &uid, "gemini_cli", "code").await;
    let v = crate::login::wait_state(&app, &id, &token, |v| {
        v["authUrl"].is_string() || v["state"] == "failed"
    })
    .await;
    assert_eq!(v["state"], "awaiting_code", "{v}");
    let code = crate::login::approve_at_stub(v["authUrl"].as_str().unwrap(), &oauth).await;
    let r = app
        .post(
            &format!("/api/auth/session/{id}/code"),
            t,
            json!({"code": code}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let v = crate::login::wait_state(&app, &id, &token, |v| {
        v["state"] == "completed" || v["state"] == "failed"
    })
    .await;
    assert_eq!(v["state"], "completed", "{v}");
    let item = app.get("/api/vault/items/credential.gemini_cli", t).await;
    let file = crate::login::open_credential(&enrollment, &uid, &item.body, "gemini_cli");
    assert!(file.contains("stubOauth"), "{file}");

    // The real CLIs are in the browser image: Codex's own sign-in starts
    // there and opens its page in the remote browser.
    let id = crate::login::start_session(&app, &token, &uid, "codex", "browser").await;
    let v = crate::login::wait_state(&app, &id, &token, |v| {
        v["authUrl"].is_string() || v["state"] == "failed"
    })
    .await;
    assert_eq!(v["state"], "awaiting_login", "{v}");
    assert!(
        v["authUrl"]
            .as_str()
            .unwrap()
            .starts_with("https://auth.openai.com/"),
        "{v}"
    );
    app.send(
        reqwest::Method::DELETE,
        &format!("/api/auth/session/{id}"),
        t,
        None,
    )
    .await;
}

/// Why the images are not ready, for a failure's message: what
/// `polydev image status` says and the end of the controller's log.
fn why_not_prepared(app: &TestApp, images: &str) -> String {
    let status = tokio::task::block_in_place(|| {
        app.cli(&["image", "status", "--images-dir", images, "--json"])
    });
    let logs = app.logs();
    let tail: Vec<&str> = logs.lines().rev().take(60).collect();
    format!(
        "polydev image status: {}\nthe controller's last log lines:\n{}",
        String::from_utf8_lossy(&status.stdout),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    )
}

/// A new user's first minutes in the browser, on the images the first
/// start built: sign up, unlock after a reload, connect Claude Code by
/// code (its credential file in Claude Code's own shape), run one prompt
/// across the three CLIs (Claude Code on that login, the others on a
/// typed key), log out and back in, and find the run in the history.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_user_signs_up_connects_runs_and_returns_on_the_real_images() {
    let images = images_dir();
    let anthropic = polydev_stubs::start(Provider::Anthropic, "claude for the newcomer", None)
        .await
        .unwrap();
    let openai = polydev_stubs::start(Provider::OpenAi, "codex for the newcomer", None)
        .await
        .unwrap();
    let gemini = polydev_stubs::start(Provider::Gemini, "gemini for the newcomer", None)
        .await
        .unwrap();
    let canary = format!("newcomer{}", uuid::Uuid::new_v4().simple());
    let oauth = polydev_stubs::oauth::start(&canary).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("polydev.toml");
    std::fs::write(
        &config,
        format!(
            "[sandbox]\npools = {{}}\n[egress]\nallow_private = [\"127.0.0.0/8\"]\nper_user_ports = false\n[egress.hosts]\n\"anthropic.stub.test\" = \"127.0.0.1\"\n\"openai.stub.test\" = \"127.0.0.1\"\n\"gemini.stub.test\" = \"127.0.0.1\"\n\"auth.stub.test\" = \"127.0.0.1\"\n[runs]\ndeadline_secs = 120\ncredential_wait_secs = 60\nanthropic_base_url = \"http://anthropic.stub.test:{}\"\nopenai_base_url = \"http://openai.stub.test:{}/v1\"\ngemini_base_url = \"http://gemini.stub.test:{}\"\n[login]\nboot_deadline_secs = 60\n[login.providers.claude_code]\ncode = 'exec node -e \"$STUB_LOGIN_JS\"'\ncredential_file = \"/home/sandbox/.claude/.credentials.json\"\n[login.providers.claude_code.env]\nSTUB_AUTH_BASE = \"http://auth.stub.test:{}\"\nSTUB_CREDENTIAL_FILE = \"/home/sandbox/.claude/.credentials.json\"\nSTUB_CREDENTIAL_FORMAT = \"claude\"\nSTUB_LOGIN_JS = '''\n{}'''\n{}",
            anthropic.addr.port(),
            openai.addr.port(),
            gemini.addr.port(),
            oauth.addr.port(),
            polydev_stubs::oauth::CLI_LOGIN_SCRIPT,
            crate::login::subscription_login_for(&["claude_code"]),
        ),
    )
    .unwrap();
    let key = format!("sk-newcomer-{}", uuid::Uuid::new_v4().simple());
    let v = crate::app::browser_script(
        "new-user.mjs",
        json!({"config": config, "imagesDir": images, "key": key}),
    )
    .await;
    assert!(
        v["error"].is_null(),
        "the walk stopped: {} (sign-in page {})\n{}",
        v["error"],
        v["authUrl"],
        v["logs"]
    );
    assert_eq!(v["connected"], "signed in", "{v}");
    // The Providers page shows each provider's policy: Claude Code's
    // subscription sign-in turned on by this operator, Gemini CLI's off by
    // default with the vendor's reason and no sign-in button.
    assert_eq!(v["claudePolicy"], "true", "{v}");
    assert_eq!(v["geminiSignIn"], "disabled", "{v}");
    let gemini = v["geminiPolicy"].as_str().unwrap();
    assert!(
        gemini.contains("not offered") && gemini.contains("API key"),
        "{gemini}"
    );
    for (p, answer) in [
        ("claude_code", "claude for the newcomer"),
        ("codex", "codex for the newcomer"),
        ("gemini_cli", "gemini for the newcomer"),
    ] {
        assert_eq!(v["states"][p], "done", "{p}: {v}");
        assert!(
            v["answers"][p].as_str().unwrap().contains(answer),
            "{p}: {v}"
        );
    }
    // Each answer shows its usage; Claude Code's also the list-price cost
    // it computed.
    for p in ["claude_code", "codex", "gemini_cli"] {
        assert!(
            v["notes"][p].as_str().unwrap().contains("tokens in"),
            "{p}: {v}"
        );
    }
    assert!(
        v["notes"]["claude_code"]
            .as_str()
            .unwrap()
            .contains("at list price"),
        "{v}"
    );
    // Claude Code answered on the login's OAuth token, not on a key.
    assert!(anthropic
        .seen()
        .iter()
        .any(|s| s.headers.iter().any(|(_, h)| h.contains(&canary))));
    let history = v["history"].as_str().unwrap();
    assert!(history.contains("finished"), "{history}");
    assert!(history.contains("gemini for the newcomer"), "{history}");
    // Nothing went wrong in the page: the one failed request is the first
    // visit's "who am I" before signing up.
    let errors: Vec<&str> = v["console"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e.as_str())
        .filter(|e| !(e.contains("401") && e.ends_with("/api/me")))
        .collect();
    assert!(errors.is_empty(), "the page logged errors: {errors:?}");
    let logs = v["logs"].as_str().unwrap();
    assert!(
        !logs.contains(&key) && !logs.contains(&canary),
        "a secret reached the logs"
    );
}
