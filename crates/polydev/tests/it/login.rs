//! Login sessions on the real kernel: a sandbox per session (the `minimal`
//! template borrows the host's /usr, where scripts/test.sh installed
//! TigerVNC's Xvnc, Chromium, Node and the CLIs), the stub OAuth provider
//! reachable only through the egress proxy, and the stub CLI login
//! program. The viewer end to end (noVNC in Chromium, through nginx too)
//! is in `login_viewer.rs`.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use polydev_store::Backend;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite;

use crate::app::{login_body, signup, TestApp};

/// The proxy resolves the stub's name, and the login sandboxes may reach
/// nothing else (Chromium's own background requests are refused too).
const EGRESS: &str = "[egress]\nallow_private = [\"127.0.0.0/8\"]\nper_user_ports = false\n[egress.hosts]\n\"auth.stub.test\" = \"127.0.0.1\"\n[egress.policies.minimal]\nallow_hosts = [\"auth.stub.test\"]\n";

/// A config whose login flows all run the stub CLI login against the stub
/// OAuth provider at `auth.stub.test` (a name only the proxy resolves).
pub fn stub_login_config(dir: &std::path::Path, auth_port: u16, extra: &str) -> std::path::PathBuf {
    let providers = stub_login_providers(auth_port);
    let config = dir.join("polydev.toml");
    std::fs::write(
        &config,
        format!("{EGRESS}[login]\ntemplate = \"minimal\"\n{extra}\n{providers}"),
    )
    .unwrap();
    config
}

/// `[login.providers.*]` tables running the stub CLI login against the stub
/// OAuth provider at `auth.stub.test:<auth_port>`.
pub fn stub_login_providers(auth_port: u16) -> String {
    stub_login_providers_for(&["claude_code", "codex", "gemini_cli"], auth_port)
}

/// `stub_login_providers` for some providers only (the others keep their
/// real CLIs' flows).
pub fn stub_login_providers_for(which: &[&str], auth_port: u16) -> String {
    let script = polydev_stubs::oauth::CLI_LOGIN_SCRIPT;
    assert!(!script.contains("'''"));
    let mut providers = subscription_login_for(which);
    for p in which {
        providers.push_str(&format!(
            "[login.providers.{p}]\nbrowser = 'exec node -e \"$STUB_LOGIN_JS\"'\ncode = 'exec node -e \"$STUB_LOGIN_JS\"'\ncredential_file = \"/home/sandbox/.stub/{p}.json\"\n[login.providers.{p}.env]\nSTUB_AUTH_BASE = \"http://auth.stub.test:{auth_port}\"\nSTUB_CREDENTIAL_FILE = \"/home/sandbox/.stub/{p}.json\"\nSTUB_LOGIN_JS = '''\n{script}'''\n"
        ));
    }
    providers
}

/// `[providers.*]` tables offering every user the subscription sign-in of
/// `which` (the default for Claude Code and Gemini CLI is off, as their
/// vendors' terms say for a multi-user installation; tests of sign-in flows
/// run as an operator who turned them on).
pub fn subscription_login_for(which: &[&str]) -> String {
    which
        .iter()
        .map(|p| format!("[providers.{p}]\nsubscription_login = \"all\"\n"))
        .collect()
}

/// Signs up as the browser does (keeping the enrollment, whose sealing key
/// opens what the login captured) and logs in; returns (id, token, enrollment).
pub async fn vault_user(app: &TestApp, email: &str) -> (String, String, polydev_vault::Enrollment) {
    let (body, e) = signup(email, "correct horse");
    let r = app.post("/api/users", None, body).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_owned();
    let r = app
        .post("/api/auth/login", None, login_body(email, &e))
        .await;
    (id, r.body["token"].as_str().unwrap().to_owned(), e)
}

/// Polls the session until `until` says stop (deadline 60 s).
pub async fn wait_state(
    app: &TestApp,
    id: &str,
    token: &str,
    until: impl Fn(&Value) -> bool,
) -> Value {
    crate::app::eventually(
        Duration::from_secs(60),
        "the session reaches the state",
        || async {
            let r = app
                .get(&format!("/api/auth/session/{id}"), Some(token))
                .await;
            (until(&r.body) || r.status != StatusCode::OK).then_some(r.body)
        },
    )
    .await
}

/// Opens a captured credential item (as the web client does: bound to the
/// user, the item and the version the server reports).
pub(crate) fn open_credential(
    e: &polydev_vault::Enrollment,
    user: &str,
    item: &Value,
    provider: &str,
) -> String {
    use base64::Engine;
    let sealed = base64::engine::general_purpose::STANDARD
        .decode(item["envelope"].as_str().unwrap())
        .unwrap();
    let version = item["version"].as_u64().unwrap();
    let aad = polydev_vault::ItemContext::new(user, &format!("credential.{provider}"), version)
        .sealed_aad();
    let opened = e
        .sealing
        .open(
            polydev_sessions::login::LOGIN_CREDENTIAL_PURPOSE,
            &aad,
            &sealed,
        )
        .unwrap();
    String::from_utf8(opened.to_vec()).unwrap()
}

/// The user's part of a code-relay sign-in: opens the sign-in page at the
/// stub OAuth provider (directly: the test is outside the sandbox), signs
/// in, and reads the code the page shows.
pub(crate) async fn approve_at_stub(auth_url: &str, oauth: &polydev_stubs::StubServer) -> String {
    let direct = auth_url.replace("auth.stub.test", "127.0.0.1");
    let page = reqwest::get(&direct).await.unwrap().text().await.unwrap();
    assert!(page.contains("Sign in"));
    let query = direct.split_once('?').unwrap().1;
    let approved = reqwest::get(format!("http://{}/approve?{query}", oauth.addr))
        .await
        .unwrap();
    let shown = approved.text().await.unwrap();
    shown
        .split("<pre id=\"code\">")
        .nth(1)
        .unwrap()
        .split('<')
        .next()
        .unwrap()
        .to_owned()
}

/// Starts a login session (202 expected); its id.
pub(crate) async fn start_session(
    app: &TestApp,
    token: &str,
    uid: &str,
    provider: &str,
    mode: &str,
) -> String {
    let r = app
        .post(
            "/api/auth/start",
            Some(token),
            json!({"userId": uid, "provider": provider, "mode": mode}),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    r.body["sessionId"].as_str().unwrap().to_owned()
}

/// The code of the next close frame on a viewer WebSocket (5 s at most).
async fn close_code<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> u16
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
        {
            Some(Ok(tungstenite::Message::Close(f))) => return u16::from(f.unwrap().code),
            Some(Ok(_)) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    }
}

async fn sandbox_ended(app: &TestApp, token: &str, id: &str) {
    let r = app.get(&format!("/api/sandboxes/{id}"), Some(token)).await;
    assert_ne!(r.body["status"], "running", "{}", r.text);
    let dir = app.db.dir().join("sandboxes").join(id);
    assert!(
        !dir.exists(),
        "the sandbox's directory is left: {:?}\n{}",
        std::fs::read_dir(&dir).map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>()),
        app.logs()
            .lines()
            .filter(|l| l.contains(id))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn code_relay_login_seals_the_credential_for_the_user_only() {
    let oauth = polydev_stubs::oauth::start("stub").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = stub_login_config(dir.path(), oauth.addr.port(), "");
    // Through warm pool members: made before any user, with an egress
    // relay that has no route until hand-out, and the desktop started.
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!("[sandbox]\npools = {{minimal = 2}}\n{text}"),
    )
    .unwrap();
    let app = TestApp::spawn_with(Backend::Sqlite, &["--config", config.to_str().unwrap()]).await;
    let (uid, token, enrollment) = vault_user(&app, "code@example.com").await;
    let pool_full = "polydev_pool_size{template=\"minimal\"} 2";
    crate::app::eventually(Duration::from_secs(30), "the pool fills", || async {
        app.get("/metrics", None)
            .await
            .text
            .contains(pool_full)
            .then_some(())
    })
    .await;
    let t = Some(token.as_str());

    // Bad input first: clear 4xx, nothing started.
    let r = app
        .post(
            "/api/auth/start",
            t,
            json!({"userId": uid, "provider": "codex", "mode": "teleport"}),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::BAD_REQUEST, "invalid_mode")
    );
    let r = app
        .post(
            "/api/auth/start",
            t,
            json!({"userId": uid, "provider": "cursor"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);

    let started = Instant::now();
    let r = app
        .post(
            "/api/auth/start",
            t,
            json!({"userId": uid, "provider": "codex", "mode": "code"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "start must not wait for the sandbox"
    );
    assert_eq!(r.body["status"], "booting");
    let id = r.body["sessionId"].as_str().unwrap().to_owned();
    // One live session per user and provider.
    let r = app
        .post(
            "/api/auth/start",
            t,
            json!({"userId": uid, "provider": "codex", "mode": "code"}),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::CONFLICT, "login_in_progress")
    );
    assert_eq!(r.body["error"]["details"]["sessionId"], id.as_str());

    let v = wait_state(&app, &id, &token, |v| {
        v["state"] != "booting" && v["state"] != "ready" && v["authUrl"].is_string()
    })
    .await;
    assert_eq!(v["state"], "awaiting_code", "{v}");
    let sandbox = v["sandboxId"].as_str().unwrap().to_owned();
    let auth_url = v["authUrl"].as_str().unwrap().to_owned();
    assert!(
        auth_url.starts_with(&format!(
            "http://auth.stub.test:{}/authorize",
            oauth.addr.port()
        )),
        "{auth_url}"
    );
    let states: Vec<&str> = v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["booting", "ready", "awaiting_code"]);

    // The user signs in in their own browser (here: plain HTTP to the stub,
    // which the test reaches directly) and copies the code it shows.
    let code = approve_at_stub(&auth_url, &oauth).await;

    let r = app
        .post(
            &format!("/api/auth/session/{id}/code"),
            t,
            json!({"code": ""}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    let r = app
        .post(
            &format!("/api/auth/session/{id}/code"),
            t,
            json!({"code": code}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let v = wait_state(&app, &id, &token, |v| {
        v["state"] == "completed" || v["state"] == "failed"
    })
    .await;
    assert_eq!(v["state"], "completed", "{v}");
    assert_eq!(v["vaultItem"], "credential.codex");

    // The sealed credential is in the vault; only the user's key opens it.
    let item = app.get("/api/vault/items/credential.codex", t).await;
    assert_eq!(item.status, StatusCode::OK, "{}", item.text);
    let plain = open_credential(&enrollment, &uid, &item.body, "codex");
    let creds: Value = serde_json::from_str(&plain).unwrap();
    let refresh = creds["stubOauth"]["refreshToken"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(refresh.starts_with("stub-refresh-"));
    // The token request went through the egress proxy to the stub.
    assert!(oauth
        .seen()
        .iter()
        .any(|s| s.path == "/token" && s.body.contains(&code)));
    sandbox_ended(&app, &token, &sandbox).await;
    let metrics = app.get("/metrics", None).await.text;
    assert!(
        metrics.contains("polydev_pool_hits_total{template=\"minimal\"} 1"),
        "the session did not get a pool member"
    );
    // A browser session from the pool finds its desktop already running.
    let browser = start_session(&app, &token, &uid, "claude_code", "browser").await;
    let v = wait_state(&app, &browser, &token, |v| {
        v["state"] == "awaiting_login" || v["state"] == "failed"
    })
    .await;
    assert_eq!(v["state"], "awaiting_login", "{v}");
    assert!(app
        .get("/metrics", None)
        .await
        .text
        .contains("polydev_pool_hits_total{template=\"minimal\"} 2"));
    // The plaintext (tokens, code) reached no log, metric or store file.
    app.assert_nowhere(&[
        &refresh,
        creds["stubOauth"]["accessToken"].as_str().unwrap(),
    ])
    .await;

    // Another user cannot see it; a finished session can be read, a new
    // one for the same provider may start.
    let (_, other, _) = vault_user(&app, "other@example.com").await;
    let r = app
        .get(&format!("/api/auth/session/{id}"), Some(&other))
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
    let r = app.get("/api/auth/session/login-0000000000000000", t).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
}

/// The whole flow a user sees: the providers page, the real noVNC client
/// through the bridge (directly, and through nginx with the shipped
/// config), a click on the remote page's "Sign in", the credential sealed
/// into the vault.
#[tokio::test(flavor = "multi_thread")]
async fn the_streamed_browser_signs_in_directly_and_behind_nginx() {
    let canary = format!("canary{}", uuid::Uuid::new_v4().simple());
    let oauth = polydev_stubs::oauth::start(&canary).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = stub_login_config(dir.path(), oauth.addr.port(), "");
    let v = crate::app::browser_script("login-viewer.mjs", json!({"config": config})).await;
    for (way, provider) in [("direct", "codex"), ("nginx", "claude_code")] {
        let seen = &v[way];
        assert_eq!(
            seen["state"],
            "completed",
            "{way}: {seen}\nthe stub saw: {:?}",
            oauth
                .seen()
                .iter()
                .map(|s| s.path.clone())
                .collect::<Vec<_>>()
        );
        assert_eq!(seen["providerState"], "signed in", "{seen}");
        let item = format!("credential.{provider}");
        assert!(
            seen["items"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i == item.as_str()),
            "{seen}"
        );
        // The click went through noVNC and the bridge as RFB pointer events.
        assert!(seen["pointerEvents"].as_u64().unwrap() >= 2, "{seen}");
        // A sealed box (kind 4), not plaintext.
        assert_eq!(seen["envelopeHead"], json!([0x50, 1, 4]), "{seen}");
    }
    // The WebSocket went through nginx (101 in its access log).
    let nginx_log = v["nginxLog"].as_str().unwrap();
    assert!(
        nginx_log
            .lines()
            .any(|l| l.contains("/novnc/websock") && l.contains("\" 101 ")),
        "{nginx_log}"
    );
    // Two sign-ins, two token exchanges through the egress proxy; no token
    // reached the server's logs.
    assert_eq!(
        oauth.seen().iter().filter(|s| s.path == "/token").count(),
        2
    );
    assert!(!v["logs"].as_str().unwrap().contains(&canary));
}

#[tokio::test(flavor = "multi_thread")]
async fn viewer_tickets_origins_expiry_and_cancel() {
    let oauth = polydev_stubs::oauth::start("stub").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = stub_login_config(dir.path(), oauth.addr.port(), "idle_timeout_secs = 4");
    let mut app =
        TestApp::spawn_with(Backend::Sqlite, &["--config", config.to_str().unwrap()]).await;
    let (uid, token, _) = vault_user(&app, "viewer@example.com").await;
    let (_, other, _) = vault_user(&app, "intruder@example.com").await;
    let t = Some(token.as_str());
    let r = app
        .post(
            "/api/auth/start",
            t,
            json!({"userId": uid, "provider": "claude_code"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let id = r.body["sessionId"].as_str().unwrap().to_owned();
    let ws_base = app.url("").replace("http://", "ws://");
    let ticket = |tok: String| {
        let (app, id) = (&app, id.clone());
        async move {
            let r = app
                .post(
                    &format!("/api/auth/session/{id}/ticket"),
                    Some(&tok),
                    json!({}),
                )
                .await;
            (r.status, r.body["ticket"].as_str().unwrap_or("").to_owned())
        }
    };
    let connect = |ticket: String, origin: Option<&'static str>, bearer: Option<String>| {
        let url = format!("{ws_base}/api/auth/session/{id}/novnc/websock?ticket={ticket}");
        async move {
            let mut req = tungstenite::client::IntoClientRequest::into_client_request(url).unwrap();
            req.headers_mut()
                .insert("sec-websocket-protocol", "binary".parse().unwrap());
            if let Some(o) = origin {
                req.headers_mut().insert("origin", o.parse().unwrap());
            }
            if let Some(b) = bearer {
                req.headers_mut()
                    .insert("authorization", format!("Bearer {b}").parse().unwrap());
            }
            tokio_tungstenite::connect_async(req).await
        }
    };
    let status_of = |e: tungstenite::Error| match e {
        tungstenite::Error::Http(resp) => resp.status().as_u16(),
        other => panic!("not an HTTP refusal: {other}"),
    };

    // Not the owner: no ticket.
    assert_eq!(ticket(other.clone()).await.0, StatusCode::FORBIDDEN);
    let v = wait_state(&app, &id, &token, |v| {
        v["state"] == "awaiting_login" || v["state"] == "failed"
    })
    .await;
    assert_eq!(v["state"], "awaiting_login", "{v}");

    // A plain GET (no upgrade) is a clear 400, logged, not a silent 404.
    let r = app
        .get(
            &format!("/api/auth/session/{id}/novnc/websock?ticket=x"),
            None,
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::BAD_REQUEST, "not_a_websocket")
    );
    let origin: &'static str = Box::leak(app.url("").into_boxed_str());
    // No ticket, a made-up one: 401.
    assert_eq!(
        status_of(
            connect(String::new(), Some(origin), None)
                .await
                .unwrap_err()
        ),
        401
    );
    assert_eq!(
        status_of(
            connect("f".repeat(64), Some(origin), None)
                .await
                .unwrap_err()
        ),
        401
    );
    // A foreign page's Origin, or none (not a browser page of ours): 403
    // (the ticket is not spent on it).
    let (_, tk) = ticket(token.clone()).await;
    assert_eq!(
        status_of(
            connect(tk.clone(), None, Some(token.clone()))
                .await
                .unwrap_err()
        ),
        403
    );
    assert_eq!(
        status_of(
            connect(tk.clone(), Some("http://evil.example"), None)
                .await
                .unwrap_err()
        ),
        403
    );
    // The owner's ticket presented by another signed-in user: 403.
    let (_, tk2) = ticket(token.clone()).await;
    assert_eq!(
        status_of(
            connect(tk2, Some(origin), Some(other.clone()))
                .await
                .unwrap_err()
        ),
        403
    );

    // The owner, same origin: the VNC server greets through the bridge.
    let (mut ws, resp) = connect(tk.clone(), Some(origin), Some(token.clone()))
        .await
        .unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "binary");
    let first = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.into_data().starts_with(b"RFB 003.008"));
    // RFB handshake far enough for a framebuffer: version, no auth, shared.
    ws.send(tungstenite::Message::Binary(
        b"RFB 003.008\n".to_vec().into(),
    ))
    .await
    .unwrap();
    let sec = ws.next().await.unwrap().unwrap().into_data();
    assert!(
        sec.len() >= 2 && sec[1..].contains(&1),
        "security types {sec:?}"
    );
    ws.send(tungstenite::Message::Binary(vec![1u8].into()))
        .await
        .unwrap();
    let result = ws.next().await.unwrap().unwrap().into_data();
    assert_eq!(&result[..4], &[0, 0, 0, 0]);
    ws.send(tungstenite::Message::Binary(vec![1u8].into()))
        .await
        .unwrap();
    let init = ws.next().await.unwrap().unwrap().into_data();
    let (w, h) = (
        u16::from_be_bytes([init[0], init[1]]),
        u16::from_be_bytes([init[2], init[3]]),
    );
    assert_eq!((w, h), (1280, 800));
    // A reused ticket is refused.
    assert_eq!(
        status_of(connect(tk, Some(origin), None).await.unwrap_err()),
        401
    );

    // Cancel: the open viewer is closed with 1001, the session is gone (410).
    let r = app
        .send(
            reqwest::Method::DELETE,
            &format!("/api/auth/session/{id}"),
            t,
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["state"], "cancelled");
    assert_eq!(close_code(&mut ws).await, 1001);
    let r = app.get(&format!("/api/auth/session/{id}"), t).await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::GONE, "login_session_gone")
    );
    sandbox_ended(&app, &token, v["sandboxId"].as_str().unwrap()).await;

    // Idle expiry: nobody watches, nothing happens → expired, sandbox gone, 410.
    let idle = start_session(&app, &token, &uid, "gemini_cli", "browser").await;
    let v = wait_state(&app, &idle, &token, |v| v["state"] == "awaiting_login").await;
    let gone = wait_state(&app, &idle, &token, |_| false).await;
    assert_eq!(gone["error"]["code"], "login_session_gone", "{gone}");
    assert_eq!(gone["error"]["details"]["state"], "expired");
    sandbox_ended(&app, &token, v["sandboxId"].as_str().unwrap()).await;

    // The VNC server failing closes the viewer with 1011.
    let failing = start_session(&app, &token, &uid, "claude_code", "browser").await;
    let v = wait_state(&app, &failing, &token, |v| v["state"] == "awaiting_login").await;
    let r = app
        .post(&format!("/api/auth/session/{failing}/ticket"), t, json!({}))
        .await;
    let url = format!(
        "{ws_base}/api/auth/session/{failing}/novnc/websock?ticket={}",
        r.body["ticket"].as_str().unwrap()
    );
    let mut req = tungstenite::client::IntoClientRequest::into_client_request(url).unwrap();
    req.headers_mut().insert("origin", origin.parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let first = ws.next().await.unwrap().unwrap();
    assert!(first.into_data().starts_with(b"RFB "));
    // Nobody may exec in a login sandbox: the test kills its VNC server
    // from outside, by pid, from the sandbox's cgroup.
    let r = app
        .post(
            &format!("/api/sandboxes/{}/exec", v["sandboxId"].as_str().unwrap()),
            t,
            json!({"cmd": ["true"]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
    let sid = polydev_sandbox::SandboxId::parse(v["sandboxId"].as_str().unwrap()).unwrap();
    let xvnc: Vec<i32> = app
        .cgroups()
        .unwrap()
        .processes(&sid)
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| ["Xvnc", "Xtigervnc"].contains(&c.trim()))
        })
        .collect();
    assert!(!xvnc.is_empty(), "no VNC server in the sandbox");
    for pid in xvnc {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
    assert_eq!(close_code(&mut ws).await, 1011);
    // ...and the session fails, saying so, with the desktop's log.
    let v = wait_state(&app, &failing, &token, |v| v["state"] == "failed").await;
    assert_eq!(v["error"], "the remote browser's desktop stopped", "{v}");
    sandbox_ended(&app, &token, v["sandboxId"].as_str().unwrap()).await;

    // After a restart, old ids still answer 410 (from the store), and a
    // session the previous process left live is expired, not stuck.
    let orphan = start_session(&app, &token, &uid, "codex", "browser").await;
    wait_state(&app, &orphan, &token, |v| v["state"] == "awaiting_login").await;
    app.restart().await;
    for id in [&id, &idle, &orphan] {
        let r = app.get(&format!("/api/auth/session/{id}"), t).await;
        assert_eq!(r.status, StatusCode::GONE, "{id}: {}", r.text);
    }
    if let Some(cg) = app.cgroups() {
        // Reconciliation at start removed the orphan's sandbox.
        crate::app::eventually(
            Duration::from_secs(10),
            "the orphaned sandbox's cgroup is removed",
            || async { cg.list().is_empty().then_some(()) },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_browser_that_cannot_boot_fails_within_the_deadline_with_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let config = stub_login_config(
        dir.path(),
        9,
        "boot_deadline_secs = 20\ntemplate = \"browser\"",
    );
    // `template` appears twice otherwise: keep the last one only.
    let text =
        std::fs::read_to_string(&config)
            .unwrap()
            .replacen("template = \"minimal\"\n", "", 1);
    std::fs::write(
        &config,
        format!("[sandbox]\npools = {{}}\nboot_deadline_ms = 1500\n{text}"),
    )
    .unwrap();
    let app = TestApp::spawn_with(Backend::Sqlite, &["--config", config.to_str().unwrap()]).await;
    // A `browser` image whose agent never comes up.
    let images = polydev_sandbox::ImageStore::new(app.db.dir().join("images"));
    let fake = dir.path().join("fake-agent");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'browser image: agent broken on purpose' >&2\nexec sleep 600\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let broken = images.build_minimal(&fake).unwrap();
    let browser = images
        .import(
            "browser",
            &broken.rootfs,
            broken.manifest.host_binds.clone(),
            Vec::new(),
        )
        .unwrap();
    images.activate("browser", &browser.manifest.hash).unwrap();

    let (uid, token, _) = vault_user(&app, "broken@example.com").await;
    let started = Instant::now();
    let r = app
        .post(
            "/api/auth/start",
            Some(&token),
            json!({"userId": uid, "provider": "codex"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let id = r.body["sessionId"].as_str().unwrap();
    let v = wait_state(&app, id, &token, |v| v["state"] == "failed").await;
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(v["failedStage"], "booting", "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("stage started"),
        "{v}"
    );
    let tail = v["logTail"].as_array().unwrap();
    assert!(
        tail.iter()
            .any(|l| l.as_str().unwrap().contains("broken on purpose")),
        "{v}"
    );
    assert!(app.cgroups().map(|c| c.list().is_empty()).unwrap_or(true));
}

/// The real CLIs' login commands (the built-in flows), far enough to show
/// their sign-in page in the remote browser: each prints its URL (Gemini
/// CLI opens it without printing when headless), opens it in the
/// sandbox's Chromium, and Chromium asks the egress proxy for the
/// provider's sign-in host — which this test's policy refuses, so nothing
/// leaves the machine. The hosts are read from what the CLI did, not
/// written here (vendors move them: Claude Code 2.1.332 prints claude.ai
/// and opens claude.com, 2.1.197 used claude.com for both), and must be
/// ones the built-in `browser` allow-list admits, so a real installation's
/// login browser reaches them; a CLI release that moves to a host the list
/// lacks fails here by name (the wait names the provider).
#[tokio::test(flavor = "multi_thread")]
async fn each_real_cli_login_opens_its_sign_in_page_in_the_remote_browser() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("polydev.toml");
    std::fs::write(
        &config,
        format!(
            "{EGRESS}[login]\ntemplate = \"minimal\"\n{}",
            subscription_login_for(&["claude_code", "codex", "gemini_cli"])
        ),
    )
    .unwrap();
    let app = TestApp::spawn_with(Backend::Sqlite, &["--config", config.to_str().unwrap()]).await;
    let (uid, token, _) = vault_user(&app, "real@example.com").await;
    let browser_policy = polydev_egress::config::builtin_policy("browser");
    let mut sessions = Vec::new();
    for provider in ["claude_code", "codex", "gemini_cli"] {
        let r = app
            .post(
                "/api/auth/start",
                Some(&token),
                json!({"userId": uid, "provider": provider}),
            )
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
        sessions.push((provider, r.body["sessionId"].as_str().unwrap().to_owned()));
    }
    for (provider, id) in &sessions {
        let prints_url = *provider != "gemini_cli";
        let v = wait_state(&app, id, &token, |v| {
            v["authUrl"].is_string()
                || v["state"] == "failed"
                || (!prints_url && v["state"] == "awaiting_login")
        })
        .await;
        assert_eq!(v["state"], "awaiting_login", "{provider}: {v}");
        let printed_host = prints_url.then(|| {
            let url = v["authUrl"].as_str().unwrap();
            let rest = url
                .strip_prefix("https://")
                .unwrap_or_else(|| panic!("{provider}: not an https URL: {url}"));
            rest.split(['/', '?', ':']).next().unwrap().to_owned()
        });
        // The remote Chromium asked for the sign-in page: the first host it
        // asked for, refused by this test's policy.
        let sandbox = v["sandboxId"].as_str().unwrap().to_owned();
        let what = format!("{provider}: the remote browser asks for its sign-in host");
        let since = std::time::Instant::now();
        let asked: String = crate::app::eventually(Duration::from_secs(45), &what, || async {
            let hosts: Vec<String> = app
                .logs()
                .lines()
                .filter(|l| {
                    l.contains("egress destination not allowed by policy") && l.contains(&sandbox)
                })
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter_map(|l| l["fields"]["host"].as_str().map(str::to_owned))
                .collect();
            // Chromium also asks for hosts of its own (clients2.google.com,
            // update.googleapis.com) which the allow-list refuses: the
            // sign-in page is the first one it admits. Near the deadline,
            // what it did ask for (to name a host that moved).
            let found = hosts
                .iter()
                .find(|h| polydev_egress::guard::host_allowed(browser_policy.as_ref(), h));
            match found {
                Some(h) => Some(Ok(h.clone())),
                None if since.elapsed() > Duration::from_secs(40) => Some(Err(hosts)),
                None => None,
            }
        })
        .await
        .unwrap_or_else(|hosts| {
            panic!("{provider}: the remote browser asked for no host the built-in browser allow-list admits (BROWSER_HOSTS); it asked for {hosts:?}")
        });
        // The URL printed for the user's own browser (Claude Code 2.1.332
        // prints claude.ai while its browser opens claude.com) must be
        // reachable too.
        if let Some(host) = &printed_host {
            assert!(
                polydev_egress::guard::host_allowed(browser_policy.as_ref(), host),
                "{provider} prints a sign-in URL at {host}, which the built-in browser allow-list (BROWSER_HOSTS) does not admit (its browser asked for {asked})"
            );
        }
        let r = app
            .send(
                reqwest::Method::DELETE,
                &format!("/api/auth/session/{id}"),
                Some(&token),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    }
}

/// A CLI signed in by a login session answers a run with that credential:
/// the client opens the vault item, seals the file to the run's sandbox,
/// the real Claude Code uses its OAuth token against the stub provider, and
/// the file comes back sealed to the user as the item's next version.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_uses_the_credential_a_login_session_captured() {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let canary = format!("canary{}", uuid::Uuid::new_v4().simple());
    let oauth = polydev_stubs::oauth::start(&canary).await.unwrap();
    let anthropic = polydev_stubs::start(
        polydev_stubs::Provider::Anthropic,
        "answered with the login",
        None,
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("polydev.toml");
    std::fs::write(
        &config,
        format!(
            "[egress]\nallow_private = [\"127.0.0.0/8\"]\nper_user_ports = false\n[egress.hosts]\n\"auth.stub.test\" = \"127.0.0.1\"\n\"anthropic.stub.test\" = \"127.0.0.1\"\n[egress.policies.minimal]\nallow_hosts = [\"auth.stub.test\", \"anthropic.stub.test\"]\n[runs]\ntemplate = \"minimal\"\nanthropic_base_url = \"http://anthropic.stub.test:{}\"\n[login]\ntemplate = \"minimal\"\n[login.providers.claude_code]\ncode = 'exec node -e \"$STUB_LOGIN_JS\"'\ncredential_file = \"/home/sandbox/.claude/.credentials.json\"\n[login.providers.claude_code.env]\nSTUB_AUTH_BASE = \"http://auth.stub.test:{}\"\nSTUB_CREDENTIAL_FILE = \"/home/sandbox/.claude/.credentials.json\"\nSTUB_CREDENTIAL_FORMAT = \"claude\"\nSTUB_LOGIN_JS = '''\n{}'''\n{}",
            anthropic.addr.port(),
            oauth.addr.port(),
            polydev_stubs::oauth::CLI_LOGIN_SCRIPT,
            subscription_login_for(&["claude_code"]),
        ),
    )
    .unwrap();
    let app = TestApp::spawn_with(Backend::Sqlite, &["--config", config.to_str().unwrap()]).await;
    let (uid, token, enrollment) = vault_user(&app, "both@example.com").await;
    let t = Some(token.as_str());

    // Sign Claude Code in (code relay).
    let id = start_session(&app, &token, &uid, "claude_code", "code").await;
    let v = wait_state(&app, &id, &token, |v| v["authUrl"].is_string()).await;
    // The user's own browser (here: the test) reaches the stub directly.
    let code = approve_at_stub(v["authUrl"].as_str().unwrap(), &oauth).await;
    app.post(
        &format!("/api/auth/session/{id}/code"),
        t,
        json!({"code": code}),
    )
    .await;
    let v = wait_state(&app, &id, &token, |v| {
        v["state"] == "completed" || v["state"] == "failed"
    })
    .await;
    assert_eq!(v["state"], "completed", "{v}");

    // The client opens the item and seals the file to the run's sandbox.
    let item = app.get("/api/vault/items/credential.claude_code", t).await;
    assert_eq!(item.body["version"], 1);
    let file = open_credential(&enrollment, &uid, &item.body, "claude_code");
    let access = serde_json::from_str::<Value>(&file).unwrap()["claudeAiOauth"]["accessToken"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(access.starts_with(&canary));
    let r = app
        .post(
            "/api/runs",
            t,
            json!({"prompt": "who are you?", "providers": ["claude_code"]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let run = r.body["runId"].as_str().unwrap().to_owned();
    let pk = b64
        .decode(
            r.body["sandboxes"]["claude_code"]["publicKey"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
    let sealed = polydev_vault::SealingPublicKey::from_bytes(&pk)
        .unwrap()
        .seal(
            polydev_sessions::runs::CREDENTIAL_PURPOSE,
            format!("{run}/claude_code").as_bytes(),
            file.as_bytes(),
        );
    let r = app
        .post(
            &format!("/api/runs/{run}/credentials"),
            t,
            json!({"credentials": {"claude_code": b64.encode(sealed)}, "kinds": {"claude_code": "cli_login"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let events = crate::clis::sse_events(&app, &format!("/api/runs/{run}/events"), &token).await;
    let answer: String = events
        .iter()
        .filter(|(k, _)| k == "delta")
        .filter_map(|(_, d)| d["text"].as_str())
        .collect();
    assert!(answer.contains("answered with the login"), "{events:?}");
    // The CLI authenticated with the OAuth token from the login.
    assert!(anthropic.seen().iter().any(|s| s
        .headers
        .iter()
        .any(|(k, v)| k == "authorization" && v == &format!("Bearer {access}"))));
    // The file came back sealed to the user, as the item's next version.
    let item = app.get("/api/vault/items/credential.claude_code", t).await;
    assert_eq!(item.body["version"], 2, "{}", item.text);
    let back = open_credential(&enrollment, &uid, &item.body, "claude_code");
    assert!(back.contains(&access));
    app.assert_nowhere(&[&access]).await;
}

/// Codex's refresh tokens are single use: two runs on one ChatGPT sign-in
/// at once would log the user out. The second run waits its turn; the
/// real Codex in the first refreshes the sign-in (dated a month back) at
/// the stand-in for OpenAI's token endpoint, the rotated file comes back
/// sealed to the user, and the second run is handed that file: it answers
/// on the new access token without refreshing again (its refresh token
/// was never used twice, which the stand-in would refuse).
#[tokio::test(flavor = "multi_thread")]
async fn two_runs_on_one_codex_sign_in_take_turns_and_the_second_uses_the_rotated_tokens() {
    let canary = format!("canary{}", uuid::Uuid::new_v4().simple());
    let oauth = polydev_stubs::oauth::start(&canary).await.unwrap();
    let chatgpt = polydev_stubs::start(
        polydev_stubs::Provider::OpenAi,
        "answered on the ChatGPT sign-in",
        None,
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("polydev.toml");
    std::fs::write(
        &config,
        format!(
            "[egress]\nallow_private = [\"127.0.0.0/8\"]\nper_user_ports = false\n[egress.hosts]\n\"auth.stub.test\" = \"127.0.0.1\"\n\"chatgpt.stub.test\" = \"127.0.0.1\"\n[egress.policies.minimal]\nallow_hosts = [\"auth.stub.test\", \"chatgpt.stub.test\"]\n[runs]\ntemplate = \"minimal\"\nchatgpt_base_url = \"http://chatgpt.stub.test:{}/v1\"\nopenai_token_url = \"http://auth.stub.test:{}/token\"\n[login]\ntemplate = \"minimal\"\n[login.providers.codex]\ncode = 'exec node -e \"$STUB_LOGIN_JS\"'\ncredential_file = \"/home/sandbox/.codex/auth.json\"\n[login.providers.codex.env]\nSTUB_AUTH_BASE = \"http://auth.stub.test:{}\"\nSTUB_CREDENTIAL_FILE = \"/home/sandbox/.codex/auth.json\"\nSTUB_CREDENTIAL_FORMAT = \"codex\"\nSTUB_LOGIN_JS = '''\n{}'''\n",
            chatgpt.addr.port(),
            oauth.addr.port(),
            oauth.addr.port(),
            polydev_stubs::oauth::CLI_LOGIN_SCRIPT,
        ),
    )
    .unwrap();
    let app = TestApp::spawn_with(Backend::Sqlite, &["--config", config.to_str().unwrap()]).await;
    let (uid, token, enrollment) = vault_user(&app, "codex-turns@example.com").await;
    let t = Some(token.as_str());

    // Sign Codex in with a ChatGPT plan (code relay at the stand-in).
    let id = start_session(&app, &token, &uid, "codex", "code").await;
    let v = wait_state(&app, &id, &token, |v| v["authUrl"].is_string()).await;
    let code = approve_at_stub(v["authUrl"].as_str().unwrap(), &oauth).await;
    app.post(
        &format!("/api/auth/session/{id}/code"),
        t,
        json!({"code": code}),
    )
    .await;
    let v = wait_state(&app, &id, &token, |v| {
        v["state"] == "completed" || v["state"] == "failed"
    })
    .await;
    assert_eq!(v["state"], "completed", "{v}");
    let tokens = |file: &str| -> (String, String) {
        let v: Value = serde_json::from_str(file).unwrap();
        (
            v["tokens"]["access_token"].as_str().unwrap().to_owned(),
            v["tokens"]["refresh_token"].as_str().unwrap().to_owned(),
        )
    };

    // Two runs at once: the second's Codex waits its turn.
    let mut runs = Vec::new();
    for prompt in ["first", "second"] {
        let r = app
            .post(
                "/api/runs",
                t,
                json!({"prompt": prompt, "providers": ["codex"]}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        runs.push(r.body);
    }
    assert_eq!(
        runs[1]["sandboxes"]["codex"]["state"], "queued",
        "{}",
        runs[1]
    );
    // The client opens the item's newest version when a run's turn comes.
    let hand_over = |run: Value| {
        let (app, enrollment, uid, token) = (&app, &enrollment, &uid, &token);
        async move {
            let item = app.get("/api/vault/items/credential.codex", t).await;
            let file = open_credential(enrollment, uid, &item.body, "codex");
            let id = run["runId"].as_str().unwrap().to_owned();
            let r = crate::clis::post_keys(
                app,
                token,
                &run,
                |_| file.clone(),
                json!({"codex": "cli_login"}),
            )
            .await;
            assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
            let events =
                crate::clis::sse_events(app, &format!("/api/runs/{id}/events"), token).await;
            let answer: String = events
                .iter()
                .filter(|(k, _)| k == "delta")
                .filter_map(|(_, d)| d["text"].as_str())
                .collect();
            assert!(
                answer.contains("answered on the ChatGPT sign-in"),
                "{events:?}"
            );
            (file, item.body["version"].as_u64().unwrap())
        }
    };
    let (first_file, v1) = hand_over(runs[0].clone()).await;
    let (a1, r1) = tokens(&first_file);
    // The second run's turn: it is handed the file the first refreshed.
    let r = app
        .get(
            &format!("/api/runs/{}", runs[1]["runId"].as_str().unwrap()),
            t,
        )
        .await;
    assert_eq!(
        r.body["sandboxes"]["codex"]["state"], "awaiting_credentials",
        "{}",
        r.text
    );
    let (second_file, v2) = hand_over(r.body.clone()).await;
    let (a2, r2) = tokens(&second_file);
    assert_eq!(v2, v1 + 1, "the first run sealed its refreshed file back");
    assert!(
        a2 != a1 && r2 != r1 && a2.starts_with(&canary),
        "{second_file}"
    );

    // OpenAI's side: one refresh, with the sign-in's own refresh token;
    // both runs asked on the refreshed access token, none on the old.
    let refreshes: Vec<String> = oauth
        .seen()
        .into_iter()
        .filter(|s| s.path == "/token" && s.body.contains("refresh_token\":"))
        .map(|s| s.body)
        .collect();
    assert_eq!(refreshes.len(), 1, "{refreshes:?}");
    assert!(refreshes[0].contains(&r1), "{refreshes:?}");
    let bearers: std::collections::BTreeSet<String> = chatgpt
        .seen()
        .into_iter()
        .filter(|s| s.path == "/v1/responses")
        .flat_map(|s| s.headers)
        .filter(|(k, _)| k == "authorization")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(
        bearers.into_iter().collect::<Vec<_>>(),
        [format!("Bearer {a2}")],
        "the old access token {a1} was never sent"
    );
    // The second run's file (unchanged: no refresh needed) is version 3.
    let item = app.get("/api/vault/items/credential.codex", t).await;
    let last = open_credential(&enrollment, &uid, &item.body, "codex");
    assert_eq!(tokens(&last), (a2.clone(), r2.clone()));
    app.assert_nowhere(&[&a1, &r1, &a2, &r2]).await;
}
