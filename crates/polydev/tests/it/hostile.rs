//! The attack suite: a tenant with a plain account (and a shell in its own
//! sandbox) tries every way from a sandbox to the host, to the controller's
//! resources or to another tenant that has been found, on the real kernel
//! with the default configuration wherever a test does not need another.
//! Each test names the attack; each asserts the attack is held and that a
//! neighbour keeps working meanwhile.

use std::path::Path;
use std::time::{Duration, Instant};

use polydev_store::Backend;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::app::{Reply, TestApp};

/// The agent's process name inside a sandbox (`/.polydev/agent`).
const AGENT_COMM: &str = "agent";

/// An egress config whose stub destinations live on the host's loopback.
const LOOPBACK_EGRESS: &str =
    "[egress]\nallow_private = [\"127.0.0.0/8\"]\nper_user_ports = false\n";

fn config(dir: &Path, text: &str) -> String {
    let path = dir.join("polydev.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

async fn sandbox(app: &TestApp, token: &str, body: Value) -> String {
    let r = app.post("/api/sandboxes", Some(token), body).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    r.body["id"].as_str().unwrap().to_owned()
}

async fn sh(app: &TestApp, token: &str, id: &str, line: &str) -> Reply {
    app.post(
        &format!("/api/sandboxes/{id}/exec"),
        Some(token),
        json!({"cmd": ["/bin/sh", "-c", line], "timeoutMs": 60_000}),
    )
    .await
}

/// The neighbour check: a sandbox of another user still runs commands.
async fn neighbour_works(app: &TestApp, token: &str, id: &str) {
    let r = sh(app, token, id, "echo alive").await;
    assert_eq!(
        r.body["stdout"], "alive\n",
        "the neighbour is hurt: {}",
        r.text
    );
}

/// A `/proc/<pid>/status` field of the controller, in kB.
fn controller_kb(app: &TestApp, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", app.pid())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn controller_fds(app: &TestApp) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", app.pid()))
        .unwrap()
        .count()
}

/// A loopback HTTP server that answers every request with the Host header
/// it got; returns its port.
async fn host_echo() -> u16 {
    let stub = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = stub.local_addr().unwrap().port();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = stub.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                let host = head
                    .lines()
                    .find_map(|l| {
                        l.split_once(':')
                            .filter(|(k, _)| k.eq_ignore_ascii_case("host"))
                            .map(|(_, v)| v.trim().to_owned())
                    })
                    .unwrap_or_default();
                let body = format!("host={host}");
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    port
}

/// Every regular file under `dir` (not following links), with its bytes.
fn files_under(dir: &Path, out: &mut Vec<(std::path::PathBuf, Vec<u8>)>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let Ok(t) = e.file_type() else { continue };
        if t.is_dir() {
            files_under(&e.path(), out);
        } else if t.is_file() {
            if let Ok(b) = std::fs::read(e.path()) {
                out.push((e.path(), b));
            }
        }
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut all = Vec::new();
    files_under(dir, &mut all);
    all.iter().map(|(_, b)| b.len() as u64).sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_symlink_planted_in_the_sandbox_never_leads_the_controller_to_a_host_socket() {
    // A root-only host socket the attacker would like to reach.
    let secret = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        secret.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let canary_path = secret.path().join("canary.sock");
    let canary = std::os::unix::net::UnixListener::bind(&canary_path).unwrap();
    canary.set_nonblocking(true).unwrap();
    let canary_str = canary_path.display().to_string();

    // The login flow plants symlinks where the VNC server's socket was.
    let dir = tempfile::tempdir().unwrap();
    // It prints a URL once the links are in place: the session shows it.
    let plant = format!(
        "rm -f /run/polydev/vnc.sock; ln -sf {canary_str} /run/polydev/vnc.sock; ln -sf {canary_str} /run/polydev/agent.sock; echo https://planted.invalid/; exec sleep 600"
    );
    let cfg = config(
        dir.path(),
        &format!(
            "{LOOPBACK_EGRESS}[login]\ntemplate = \"minimal\"\n[login.providers.claude_code]\nbrowser = '{plant}'\ncredential_file = \"/home/sandbox/.never\"\n{}",
            crate::login::subscription_login_for(&["claude_code"])
        ),
    );
    let app = TestApp::spawn_with(Backend::Sqlite, &["--config", &cfg]).await;
    let (uid, token, _) = crate::login::vault_user(&app, "attacker@example.com").await;
    let (_, neighbour) = app.user("neighbour@example.com").await;
    let next_door = sandbox(&app, &neighbour, json!({"template": "minimal"})).await;

    // A plain sandbox plants the same links in its /run/polydev: the
    // controller's agent socket is elsewhere, so exec keeps working.
    let id = sandbox(&app, &token, json!({"template": "minimal"})).await;
    let r = sh(
        &app,
        &token,
        &id,
        &format!("ls -A /run/polydev; for s in agent.sock vnc.sock egress.sock; do ln -sf {canary_str} /run/polydev/$s; done; ls /run/polydev"),
    )
    .await;
    assert_eq!(
        r.body["stdout"], "agent.sock\negress.sock\nvnc.sock\n",
        "{}",
        r.text
    );
    for _ in 0..3 {
        assert_eq!(
            sh(&app, &token, &id, "echo still").await.body["stdout"],
            "still\n"
        );
    }

    // The login sandbox: its desktop served, then the flow replaced the
    // VNC socket with a link to the host socket. The viewer bridge asks
    // the agent, which dials inside the sandbox, where the link leads
    // nowhere.
    let session = crate::login::start_session(&app, &token, &uid, "claude_code", "browser").await;
    let v = crate::login::wait_state(&app, &session, &token, |v| {
        v["state"] == "awaiting_login" || v["state"] == "failed"
    })
    .await;
    assert_eq!(v["state"], "awaiting_login", "{v}");
    let v = crate::login::wait_state(&app, &session, &token, |v| {
        v["authUrl"].is_string() || v["state"] != "awaiting_login"
    })
    .await;
    assert_eq!(
        v["authUrl"], "https://planted.invalid/",
        "the links are planted: {v}"
    );
    let r = app
        .post(
            &format!("/api/auth/session/{session}/ticket"),
            Some(&token),
            json!({}),
        )
        .await;
    let ticket = r.body["ticket"].as_str().unwrap().to_owned();
    let url = format!(
        "{}/api/auth/session/{session}/novnc/websock?ticket={ticket}",
        app.url("").replace("http://", "ws://")
    );
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
            .unwrap();
    req.headers_mut()
        .insert("origin", app.url("").parse().unwrap());
    let attempt = tokio::time::timeout(Duration::from_secs(10), async {
        // Whether refused outright or closed at once, nothing is bridged.
        match tokio_tungstenite::connect_async(req).await {
            Ok((mut ws, _)) => {
                use futures_util::StreamExt;
                let first = tokio::time::timeout(Duration::from_secs(3), ws.next()).await;
                !matches!(
                    first,
                    Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Binary(_))))
                )
            }
            Err(_) => true,
        }
    })
    .await
    .unwrap();
    assert!(attempt, "the viewer got bytes from somewhere");

    // The canary never accepted a connection.
    assert!(
        matches!(canary.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the host socket was reached"
    );
    neighbour_works(&app, &neighbour, &next_door).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_terabyte_of_memory_and_other_huge_limits_are_refused() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (_, token) = app.user("greedy@example.com").await;
    for (field, value) in [
        ("memoryMb", 1_048_576u64),
        ("pids", 4_000_000),
        ("diskMb", 1_048_576),
        ("cpuMillis", 256_000),
    ] {
        let r = app
            .post(
                "/api/sandboxes",
                Some(&token),
                json!({"template": "minimal", field: value}),
            )
            .await;
        assert_eq!(
            (r.status, r.error_code()),
            (StatusCode::BAD_REQUEST, "limit_too_high"),
            "{field}: {}",
            r.text
        );
        assert!(r.message().starts_with(field), "{}", r.message());
        assert_eq!(r.body["error"]["details"]["limit"], field);
    }
    // All four at once, as the issue's attacker sent them.
    let r = app
        .post(
            "/api/sandboxes",
            Some(&token),
            json!({"template": "minimal", "memoryMb": 1048576, "pids": 4000000, "diskMb": 1048576, "cpuMillis": 256000}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    // A plain user may not go above the template's defaults either...
    let r = app
        .post(
            "/api/sandboxes",
            Some(&token),
            json!({"template": "minimal", "memoryMb": 1024}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert!(r.message().contains("only an admin"), "{}", r.message());
    // ...an admin may, up to the maximum, and no further.
    let admin = app.admin("ops@example.com");
    let r = app
        .post(
            "/api/sandboxes",
            Some(&admin),
            json!({"template": "minimal", "memoryMb": 1024}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let r = app
        .post(
            "/api/sandboxes",
            Some(&admin),
            json!({"template": "minimal", "memoryMb": 1048576}),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::BAD_REQUEST, "limit_too_high")
    );
    // All sandboxes together are held below the host: the instance's
    // parent cgroup has a memory and a pids budget.
    let (memory, pids) = app.cgroups().unwrap().budget();
    let total_kb: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let memory = memory.expect("a memory budget");
    assert!(memory < total_kb * 1024 - (1 << 30), "budget {memory}");
    let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(pids.expect("a pids budget") < pid_max);
}

/// Memory limits are promised, not only enforced: one user's live
/// sandboxes hold at most `per_user_memory_mb` of limits (429), all of
/// them at most the budget times `memory_overcommit` (503 with
/// Retry-After), and a deleted sandbox gives its share back.
#[tokio::test(flavor = "multi_thread")]
async fn memory_limits_are_committed_per_user_and_per_host() {
    let budget = polydev_sandbox::cgroup::Budget::for_host()
        .memory_bytes
        .expect("a memory budget");
    // Room for three sandboxes of 512 MiB on the whole host, two per user.
    let overcommit = (1792u64 << 20) as f64 / budget as f64;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("polydev.toml");
    std::fs::write(
        &config,
        format!("[sandbox]\npools = {{}}\nper_user_memory_mb = 1024\nmemory_overcommit = {overcommit:.12}\n"),
    )
    .unwrap();
    let app = TestApp::spawn_with(Backend::Sqlite, &["--config", config.to_str().unwrap()]).await;
    let (_, first) = app.user("hoarder@example.com").await;
    let (_, second) = app.user("latecomer@example.com").await;
    let minimal = json!({"template": "minimal"});
    let a = sandbox(&app, &first, minimal.clone()).await;
    sandbox(&app, &first, minimal.clone()).await;
    let r = app
        .post("/api/sandboxes", Some(&first), minimal.clone())
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::TOO_MANY_REQUESTS, "sandbox_memory_quota"),
        "{}",
        r.text
    );
    assert!(r.message().contains("1024 MiB"), "{}", r.message());
    sandbox(&app, &second, minimal.clone()).await;
    let r = app
        .post("/api/sandboxes", Some(&second), minimal.clone())
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::SERVICE_UNAVAILABLE, "host_at_capacity"),
        "{}",
        r.text
    );
    assert!(r.headers.contains_key("retry-after"));
    let r = app
        .send(
            reqwest::Method::DELETE,
            &format!("/api/sandboxes/{a}"),
            Some(&first),
            None,
        )
        .await;
    assert!(r.status.is_success(), "{}", r.text);
    sandbox(&app, &second, minimal).await;
}

/// What sandboxes really use is the host's admission check: while they use
/// more than `admit_memory_percent` of their budget, no new sandbox (503,
/// Retry-After); once the memory is given back, sandboxes come again.
#[tokio::test(flavor = "multi_thread")]
async fn a_host_whose_sandboxes_use_their_memory_admits_no_more() {
    let budget = polydev_sandbox::cgroup::Budget::for_host()
        .memory_bytes
        .expect("a memory budget");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("polydev.toml");
    std::fs::write(&config, "[sandbox]\npools = {}\nadmit_memory_percent = 1\n").unwrap();
    let app = TestApp::spawn_with(Backend::Sqlite, &["--config", config.to_str().unwrap()]).await;
    let admin = app.admin("filler@example.com");
    let (_, user) = app.user("next@example.com").await;
    // Tmpfs pages are charged to the sandbox's memory: fill past 1 %.
    let fill_mb = budget / 100 / (1 << 20) + 64;
    let hog = sandbox(
        &app,
        &admin,
        json!({"template": "minimal", "diskMb": fill_mb + 64, "memoryMb": fill_mb + 256}),
    )
    .await;
    let r = sh(
        &app,
        &admin,
        &hog,
        &format!("dd if=/dev/zero of=/tmp/fill bs=1M count={fill_mb} 2>/tmp/dd.err; s=$?; tail -1 /tmp/dd.err; du -m /tmp/fill; exit $s"),
    )
    .await;
    // dd's own status, and the file really is that big.
    assert_eq!(r.body["exitCode"], 0, "{}", r.text);
    let written: u64 = r.body["stdout"]
        .as_str()
        .unwrap()
        .lines()
        .last()
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(written >= fill_mb, "{}", r.text);
    let r = app
        .post(
            "/api/sandboxes",
            Some(&user),
            json!({"template": "minimal"}),
        )
        .await;
    let admissions = || {
        let logs = app.logs();
        let seen: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains("memory admission"))
            .collect();
        format!(
            "budget {} MiB; the controller's readings: {seen:?}",
            budget >> 20
        )
    };
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::SERVICE_UNAVAILABLE, "host_at_capacity"),
        "{} ({})",
        r.text,
        admissions()
    );
    assert!(
        r.message().contains("using most of their memory"),
        "{}",
        r.message()
    );
    assert!(r.headers.contains_key("retry-after"));
    let r = sh(&app, &admin, &hog, "rm /tmp/fill").await;
    assert_eq!(r.body["exitCode"], 0, "{}", r.text);
    sandbox(&app, &user, json!({"template": "minimal"})).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn filling_the_sandbox_disk_and_console_never_grows_the_host_disk() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (_, token) = app.user("filler@example.com").await;
    let (_, neighbour) = app.user("neighbour@example.com").await;
    let next_door = sandbox(&app, &neighbour, json!({"template": "minimal"})).await;
    let id = sandbox(&app, &token, json!({"template": "minimal", "diskMb": 64})).await;
    let before = dir_bytes(app.db.dir());
    for target in ["/run/polydev/fill", "/tmp/fill", "/home/sandbox/fill"] {
        let r = sh(
            &app,
            &token,
            &id,
            &format!("dd if=/dev/zero of={target} bs=1M count=200 2>&1; rm -f {target}"),
        )
        .await;
        assert!(
            r.body["stdout"].as_str().unwrap().contains("No space left"),
            "{target}: {}",
            r.text
        );
    }
    // The agent's stderr (the console): not writable through /proc (the
    // agent is not dumpable), and bounded where the controller keeps it.
    let r = sh(
        &app,
        &token,
        &id,
        &format!("for p in /proc/[0-9]*; do if grep -q '({AGENT_COMM})' $p/stat 2>/dev/null; then echo FOUND; head -c 200000000 /dev/zero > $p/fd/2 && echo WROTE; fi; done; true"),
    )
    .await;
    let out = r.body["stdout"].as_str().unwrap();
    assert!(out.contains("FOUND"), "the agent was not found: {}", r.text);
    assert!(!out.contains("WROTE"), "{}", r.text);
    let grown = dir_bytes(app.db.dir()).saturating_sub(before);
    assert!(grown < 8 << 20, "the data dir grew by {grown} bytes");
    neighbour_works(&app, &neighbour, &next_door).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_sandboxes_flooding_output_keep_the_controller_within_a_memory_bound() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (_, neighbour) = app.user("neighbour@example.com").await;
    let next_door = sandbox(&app, &neighbour, json!({"template": "minimal"})).await;
    // Ten flooders (one user may wait on only a few JSON answers at once).
    let mut flooders = Vec::new();
    for i in 0..10 {
        let (_, token) = app.user(&format!("flood{i}@example.com")).await;
        let id = sandbox(&app, &token, json!({"template": "minimal"})).await;
        flooders.push((id, token));
    }
    let baseline_kb = controller_kb(&app, "VmRSS:");
    let mut floods = tokio::task::JoinSet::new();
    for (id, token) in flooders {
        let (client, url) = (
            app.client.clone(),
            app.url(&format!("/api/sandboxes/{id}/exec")),
        );
        floods.spawn(async move {
            let r = client
                .post(url)
                .bearer_auth(token)
                .json(&json!({"cmd": ["/bin/sh", "-c", "head -c 300000000 /dev/zero | tr '\\0' a"], "timeoutMs": 120_000}))
                .timeout(Duration::from_secs(120))
                .send()
                .await
                .unwrap();
            let status = r.status();
            let body: Value = r.json().await.unwrap();
            assert_eq!(status, StatusCode::OK, "{}", body["error"]);
            (status, body["truncated"].clone(), body["stdout"].as_str().map_or(0, str::len))
        });
    }
    neighbour_works(&app, &neighbour, &next_door).await;
    while let Some(done) = floods.join_next().await {
        let (status, truncated, len) = done.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(truncated, true);
        assert!(len <= 16 << 20, "an answer of {len} bytes");
    }
    // 10 × 300 MB went nowhere near the controller's memory.
    let peak_kb = controller_kb(&app, "VmHWM:");
    assert!(
        peak_kb < baseline_kb + 900 * 1024,
        "the controller peaked at {peak_kb} kB (from {baseline_kb} kB)"
    );
    neighbour_works(&app, &neighbour, &next_door).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn thousands_of_idle_proxy_connections_keep_the_controller_s_descriptors_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), LOOPBACK_EGRESS);
    let app = TestApp::spawn_with(Backend::Sqlite, &["--config", &cfg]).await;
    let (_, token) = app.user("hoarder@example.com").await;
    let (_, neighbour) = app.user("neighbour@example.com").await;
    let port = host_echo().await;
    let next_door = sandbox(
        &app,
        &neighbour,
        json!({"template": "minimal", "network": "egress"}),
    )
    .await;
    let id = sandbox(
        &app,
        &token,
        json!({"template": "minimal", "network": "egress"}),
    )
    .await;
    let before = controller_fds(&app);
    // 3000 idle connections to the relay, held while we count.
    let hoard = r#"
import resource, socket, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
held = []
for i in range(3000):
    try:
        s = socket.create_connection(("127.0.0.1", 3128), timeout=2)
        held.append(s)
    except OSError:
        break
print(len(held), flush=True)
time.sleep(10)
"#;
    let hoarding = {
        let (app, token, id) = (&app, token.clone(), id.clone());
        async move {
            // 3000 connections take ~8 s here and over 14 s on a busy
            // CI machine: longer than the client's usual 20 s allows.
            app.post_within(
                &format!("/api/sandboxes/{id}/exec"),
                Some(&token),
                json!({"cmd": ["python3", "-c", hoard], "timeoutMs": 90_000}),
                Duration::from_secs(100),
            )
            .await
        }
    };
    let counting = async {
        // Counted once the hoard fills the relay (it holds it for 10 s).
        let during = crate::app::eventually(
            Duration::from_secs(20),
            "the hoard fills the relay",
            || async {
                let now = controller_fds(&app);
                (now >= before + polydev_sandbox::local::MAX_RELAY_CONNECTIONS).then_some(now)
            },
        )
        .await;
        // The neighbour's egress still works meanwhile.
        let r = sh(
            &app,
            &neighbour,
            &next_door,
            &format!("NO_PROXY= no_proxy= curl -s --max-time 5 http://127.0.0.1:{port}/"),
        )
        .await;
        (during, r)
    };
    let (r, (during, next)) = tokio::join!(hoarding, counting);
    assert!(
        r.body["stdout"]
            .as_str()
            .unwrap()
            .trim()
            .parse::<u32>()
            .unwrap()
            >= 1000,
        "{}",
        r.text
    );
    assert!(
        during < before + 2 * polydev_sandbox::local::MAX_RELAY_CONNECTIONS + 32,
        "the controller went from {before} to {during} descriptors"
    );
    assert_eq!(
        next.body["stdout"],
        format!("host=127.0.0.1:{port}"),
        "{}",
        next.text
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn af_vsock_sockets_and_unusual_personalities_are_refused_inside() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (_, token) = app.user("vsock@example.com").await;
    let id = sandbox(&app, &token, json!({"template": "minimal"})).await;
    let r = sh(
        &app,
        &token,
        &id,
        "python3 -c 'import socket\ntry:\n socket.socket(40, socket.SOCK_STREAM); print(\"opened\")\nexcept OSError as e: print(e.errno)'",
    )
    .await;
    assert_eq!(r.body["stdout"], "1\n", "AF_VSOCK: {}", r.text);
    // Address randomisation cannot be turned off (personality).
    let r = sh(&app, &token, &id, "setarch x86_64 -R true 2>&1; echo rc=$?").await;
    assert!(
        r.body["stdout"].as_str().unwrap().contains("rc=1"),
        "{}",
        r.text
    );
    // Ordinary sockets still work.
    let r = sh(
        &app,
        &token,
        &id,
        "python3 -c 'import socket; socket.socket(); socket.socket(socket.AF_UNIX); print(\"ok\")'",
    )
    .await;
    assert_eq!(r.body["stdout"], "ok\n", "{}", r.text);
}

#[tokio::test(flavor = "multi_thread")]
async fn values_given_at_create_and_run_prompts_are_in_no_file_under_the_data_dir() {
    let anthropic = polydev_stubs::start(polydev_stubs::Provider::Anthropic, "x", None)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &format!("{LOOPBACK_EGRESS}[runs]\ntemplate = \"minimal\"\ncredential_wait_secs = 60\nanthropic_base_url = \"http://127.0.0.1:{}\"\n", anthropic.addr.port()),
    );
    // No warm pool: every sandbox is a cold create, the case that wrote
    // values to disk.
    let app =
        TestApp::spawn_with(Backend::Sqlite, &["--config", &cfg, "--sandbox-pools", ""]).await;
    let (_, token) = app.user("canary@example.com").await;
    let env_canary = format!("env-canary-{}", uuid::Uuid::new_v4().simple());
    let prompt_canary = format!("prompt-canary-{}", uuid::Uuid::new_v4().simple());
    let id = sandbox(
        &app,
        &token,
        json!({"template": "minimal", "env": {"CANARY_ENV": env_canary}}),
    )
    .await;
    assert_eq!(
        sh(&app, &token, &id, "echo $CANARY_ENV").await.body["stdout"],
        format!("{env_canary}\n")
    );
    let r = app
        .post(
            "/api/runs",
            Some(&token),
            json!({"prompt": prompt_canary, "providers": ["claude_code"]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    // Everything under the data dir while both sandboxes are alive.
    let mut files = Vec::new();
    files_under(app.db.dir(), &mut files);
    assert!(files.len() > 3, "nothing was read");
    for (path, bytes) in &files {
        let text = String::from_utf8_lossy(bytes);
        assert!(
            !text.contains(&env_canary),
            "an env value is in {}",
            path.display()
        );
        assert!(
            !text.contains(&prompt_canary),
            "the prompt is in {}",
            path.display()
        );
        use std::os::unix::fs::PermissionsExt;
        if path.components().any(|c| c.as_os_str() == "sandboxes") {
            let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode & 0o077, 0, "{} is mode {mode:o}", path.display());
        }
    }
    app.assert_nowhere(&[&env_canary, &prompt_canary]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_live_sandbox_runs_as_its_own_host_uid() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (_, token) = app.user("uids@example.com").await;
    let cg = app.cgroups().unwrap();
    let mut uids = std::collections::HashSet::new();
    for _ in 0..4 {
        let id = sandbox(&app, &token, json!({"template": "minimal"})).await;
        let sid = polydev_sandbox::SandboxId::parse(&id).unwrap();
        let mut seen = std::collections::HashSet::new();
        for pid in cg.processes(&sid) {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            if let Some(uid) = status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().next())
            {
                seen.insert(uid.to_owned());
            }
        }
        assert_eq!(seen.len(), 1, "one uid per sandbox: {seen:?}");
        assert!(
            uids.insert(seen.into_iter().next().unwrap()),
            "a uid is shared"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_cannot_run_commands_in_or_read_files_of_a_run_sandbox() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &format!("{LOOPBACK_EGRESS}[runs]\ntemplate = \"minimal\"\ncredential_wait_secs = 60\n"),
    );
    let app = TestApp::spawn_with(Backend::Sqlite, &["--config", &cfg]).await;
    let (_, token) = app.user("owner@example.com").await;
    let admin = app.admin("root@example.com");
    let r = app
        .post(
            "/api/runs",
            Some(&token),
            json!({"prompt": "hi", "providers": ["codex"]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let sid = r.body["sandboxes"]["codex"]["sandboxId"]
        .as_str()
        .unwrap()
        .to_owned();
    for who in [&admin, &token] {
        let r = sh(&app, who, &sid, "cat /home/sandbox/.polydev/credential").await;
        assert_eq!(
            (r.status, r.error_code()),
            (StatusCode::FORBIDDEN, "forbidden"),
            "{}",
            r.text
        );
        let r = app
            .get(
                &format!("/api/sandboxes/{sid}/files?path=/home/sandbox/.polydev/credential"),
                Some(who),
            )
            .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
        let r = app
            .send(
                Method::PUT,
                &format!("/api/sandboxes/{sid}/files?path=/tmp/x"),
                Some(who),
                Some(json!("x")),
            )
            .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
    }
    // They may see it and end it.
    let r = app
        .get(&format!("/api/sandboxes/{sid}"), Some(&admin))
        .await;
    assert_eq!(r.body["labels"]["system"], "run", "{}", r.text);
    // A user cannot dress their own sandbox up as one (or hide one).
    let r = app
        .post(
            "/api/sandboxes",
            Some(&token),
            json!({"template": "minimal", "labels": {"system": "no"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    let r = app
        .send(
            Method::DELETE,
            &format!("/api/sandboxes/{sid}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_service_on_all_interfaces_is_refused_through_the_proxy() {
    let host_ip = polydev_egress::guard::host_addresses()
        .into_iter()
        .find(|a| a.is_ipv4() && !a.is_loopback())
        .expect("this host has a non-loopback IPv4 address");
    let service = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = service.local_addr().unwrap().port();
    service.set_nonblocking(true).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), LOOPBACK_EGRESS);
    let app = TestApp::spawn_with(Backend::Sqlite, &["--config", &cfg]).await;
    let (_, token) = app.user("ssrf@example.com").await;
    let id = sandbox(
        &app,
        &token,
        json!({"template": "minimal", "network": "egress"}),
    )
    .await;
    for url in [
        format!("http://{host_ip}:{port}/"),
        format!("http://0.0.0.0:{port}/"),
    ] {
        let r = sh(
            &app,
            &token,
            &id,
            &format!("curl -s -o /dev/null -D - --max-time 5 {url}"),
        )
        .await;
        let head = r.body["stdout"].as_str().unwrap();
        assert!(head.starts_with("HTTP/1.1 403"), "{url}: {head}");
        assert!(head.contains("x-polydev-egress-denied"), "{url}: {head}");
    }
    // Nothing reached the service.
    assert!(matches!(service.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock));
}

#[tokio::test(flavor = "multi_thread")]
async fn another_sandbox_s_credential_and_a_forged_host_buy_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), LOOPBACK_EGRESS);
    let app = TestApp::spawn_with(Backend::Sqlite, &["--config", &cfg]).await;
    let (_, token) = app.user("thief@example.com").await;
    let (victim_id, victim) = app.user("victim@example.com").await;
    let admin = app.admin("ops@example.com");
    let port = host_echo().await;
    // A live credential of the victim's (as if leaked).
    let r = app
        .post(
            "/api/admin/egress/credentials",
            Some(&admin),
            json!({"userId": victim_id, "template": "minimal"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let (user, pass) = (
        r.body["username"].as_str().unwrap(),
        r.body["password"].as_str().unwrap(),
    );
    let id = sandbox(
        &app,
        &token,
        json!({"template": "minimal", "network": "egress"}),
    )
    .await;
    // Presented through the relay: replaced by the sandbox's own, and a
    // Host naming another site is replaced by the checked destination.
    let r = sh(
        &app,
        &token,
        &id,
        &format!("NO_PROXY= no_proxy= curl -s --max-time 5 -x http://{user}:{pass}@127.0.0.1:3128 -H 'Host: evil.example' http://127.0.0.1:{port}/"),
    )
    .await;
    assert_eq!(
        r.body["stdout"],
        format!("host=127.0.0.1:{port}"),
        "{}",
        r.text
    );
    // The traffic counts as the thief's sandbox, never the victim's.
    crate::app::eventually(
        Duration::from_secs(15),
        "the thief's usage is recorded",
        || async {
            let mine = app.get("/api/egress/usage", Some(&token)).await;
            mine.body["usage"]
                .as_array()?
                .iter()
                .any(|row| {
                    row["sandboxId"] == id.as_str()
                        && row["requests"].as_i64().is_some_and(|n| n >= 1)
                })
                .then_some(())
        },
    )
    .await;
    let theirs = app.get("/api/egress/usage", Some(&victim)).await;
    assert_eq!(theirs.body["usage"], json!([]), "{}", theirs.text);
}

/// Two consecutive free ports on loopback.
fn two_free_ports() -> u16 {
    for _ in 0..200 {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = a.local_addr().unwrap().port();
        if p < 65535 && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
    panic!("no two consecutive free ports");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_user_after_the_egress_port_range_is_used_up_can_still_run() {
    let first = two_free_ports();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &format!("[egress]\nallow_private = [\"127.0.0.0/8\"]\nper_user_ports = true\nuser_ports = {{ first = {first}, last = {} }}\n", first + 1),
    );
    let app = TestApp::spawn_with(Backend::Sqlite, &["--config", &cfg]).await;
    // Three users, two ports: each one's sandbox ends before the next.
    for i in 0..3 {
        let (_, token) = app.user(&format!("u{i}@example.com")).await;
        let id = sandbox(
            &app,
            &token,
            json!({"template": "minimal", "network": "egress"}),
        )
        .await;
        let r = app
            .send(
                Method::DELETE,
                &format!("/api/sandboxes/{id}"),
                Some(&token),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sign_up_floods_from_one_address_are_throttled() {
    let app = TestApp::spawn_with(Backend::Sqlite, &["--signups-per-ip-per-hour", "3"]).await;
    for i in 0..3 {
        let (body, _) = crate::app::signup(&format!("s{i}@example.com"), "correct horse");
        assert_eq!(
            app.post("/api/users", None, body).await.status,
            StatusCode::CREATED
        );
    }
    let (body, _) = crate::app::signup("s3@example.com", "correct horse");
    let r = app.post("/api/users", None, body).await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
        "{}",
        r.text
    );
    assert!(r.headers.contains_key("retry-after"));
    // Admins still add users (not through the open door).
    app.admin("ops@example.com");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sandbox_that_dies_or_expires_loses_its_egress_credential() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &format!("{LOOPBACK_EGRESS}[sandbox]\nreconcile_interval_secs = 1\n"),
    );
    let app = TestApp::spawn_with(Backend::Sqlite, &["--config", &cfg]).await;
    let (_, token) = app.user("dier@example.com").await;
    let store = app.db.store().await;
    // Killed from inside: reconciliation marks it lost and revokes.
    let id = sandbox(
        &app,
        &token,
        json!({"template": "minimal", "network": "egress"}),
    )
    .await;
    assert_eq!(
        store
            .live_egress_credentials_of_sandbox(&id)
            .await
            .unwrap()
            .len(),
        1
    );
    let _ = sh(&app, &token, &id, "kill -9 -1").await;
    // Expired: the reaper revokes.
    let short = sandbox(
        &app,
        &token,
        json!({"template": "minimal", "network": "egress", "ttlSecs": 1}),
    )
    .await;
    for sid in [&id, &short] {
        let what = format!("{sid} loses its credential");
        crate::app::eventually(Duration::from_secs(20), &what, || async {
            store
                .live_egress_credentials_of_sandbox(sid)
                .await
                .unwrap()
                .is_empty()
                .then_some(())
        })
        .await;
    }
    let r = app.get(&format!("/api/sandboxes/{id}"), Some(&token)).await;
    assert_eq!(r.body["status"], "lost", "{}", r.text);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cookie_authenticated_change_from_another_site_is_refused() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (_, token) = app.user("csrf@example.com").await;
    let cookie = format!("polydev_session={token}");
    let post = |origin: Option<&str>, fetch_site: Option<&str>| {
        let mut req = app
            .client
            .post(app.url("/api/sandboxes"))
            .header("cookie", &cookie)
            .json(&json!({"template": "minimal"}));
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        if let Some(s) = fetch_site {
            req = req.header("sec-fetch-site", s);
        }
        async move { crate::app::read(req.send().await.unwrap()).await }
    };
    for (origin, site) in [
        (Some("http://evil.example"), None),
        (None, Some("cross-site")),
        (None, Some("same-site")),
        (None, None),
    ] {
        let r = post(origin, site).await;
        assert_eq!(
            (r.status, r.error_code()),
            (StatusCode::FORBIDDEN, "forbidden"),
            "{origin:?} {site:?}: {}",
            r.text
        );
    }
    assert!(
        app.get("/api/sandboxes", Some(&token)).await.body["sandboxes"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    // This server's own page, and bearer clients, go through.
    let own = app.url("");
    assert_eq!(
        post(Some(own.trim_end_matches('/')), None).await.status,
        StatusCode::CREATED
    );
    assert_eq!(
        post(None, Some("same-origin")).await.status,
        StatusCode::CREATED
    );
    let r = app
        .post(
            "/api/sandboxes",
            Some(&token),
            json!({"template": "minimal"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_agent_makes_requests_fail_within_their_deadline() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (_, token) = app.user("stopper@example.com").await;
    let id = sandbox(&app, &token, json!({"template": "minimal"})).await;
    // Freeze the agent from inside (same uid: a signal is allowed), just
    // after this command has reported back.
    let r = sh(
        &app,
        &token,
        &id,
        &format!("(sleep 0.5; for p in /proc/[0-9]*; do grep -q '({AGENT_COMM})' $p/stat 2>/dev/null && kill -STOP ${{p#/proc/}}; done) >/dev/null 2>&1 &"),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    // Seen from the host: the sandbox's agent (in its cgroup) is stopped.
    crate::app::eventually(Duration::from_secs(10), "the agent is stopped", || async {
        std::fs::read_dir("/proc")
            .ok()?
            .flatten()
            .any(|p| {
                let path = p.path();
                let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
                let in_sandbox = std::fs::read_to_string(path.join("cgroup"))
                    .unwrap_or_default()
                    .contains(&id);
                in_sandbox
                    && stat.contains(&format!("({AGENT_COMM})"))
                    && stat
                        .rsplit_once(") ")
                        .is_some_and(|(_, rest)| rest.starts_with('T'))
            })
            .then_some(())
    })
    .await;
    let started = Instant::now();
    let r = sh(&app, &token, &id, "echo hi").await;
    let took = started.elapsed();
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::GATEWAY_TIMEOUT, "agent_timeout"),
        "{}",
        r.text
    );
    assert!(took < Duration::from_secs(12), "took {took:?}");
    // The sandbox can still be read and ended.
    assert_eq!(
        app.get(&format!("/api/sandboxes/{id}"), Some(&token))
            .await
            .status,
        StatusCode::OK
    );
    let r = app
        .send(
            Method::DELETE,
            &format!("/api/sandboxes/{id}"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
}

/// An exec is bounded by its own `timeoutMs`, not the request deadline,
/// but its body is not: a client that sends an exec's headers and then
/// trickles (or withholds) the body gets 408 at the request deadline
/// instead of holding the request open for as long as it likes.
#[tokio::test(flavor = "multi_thread")]
async fn an_exec_whose_body_never_arrives_ends_at_the_request_deadline() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn_with(Backend::Sqlite, &["--request-timeout-secs", "2"]).await;
    let (_, token) = app.user("slow@example.com").await;
    let url = reqwest::Url::parse(&app.url("/")).unwrap();
    let addr = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap());
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /api/sandboxes/sb-0123456789/exec HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"cmd\":"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
            if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") {
                break;
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the request was held for 20 s");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("body_timeout"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}
