//! Sandboxes through the API of the real binary, on the real local driver.

use std::time::Duration;

use polydev_store::Backend;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::app::TestApp;
use crate::on_both_backends;

on_both_backends!(lifecycle_exec_files_and_delete);

async fn lifecycle_exec_files_and_delete(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (_, token) = app.user("sb@example.com").await;
    let t = Some(token.as_str());
    let r = app
        .post(
            "/api/sandboxes",
            t,
            json!({"template": "minimal", "env": {"GREETING": "hi"}, "labels": {"job": "r1"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["status"], "ready");
    let stages: Vec<&str> = r.body["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(stages, ["created", "started", "agent_ready"]);
    let id = r.body["id"].as_str().unwrap().to_owned();

    // Exec, one JSON answer; the configured env is there.
    let r = app
        .post(
            &format!("/api/sandboxes/{id}/exec"),
            t,
            json!({"cmd": ["/bin/sh", "-c", "echo $GREETING; echo oops >&2; exit 3"]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        r.body,
        json!({"exitCode": 3, "signal": null, "timedOut": false, "stdout": "hi\n", "stderr": "oops\n", "truncated": false})
    );

    // Exec streamed over SSE, with stdin.
    let resp = app
        .client
        .post(app.url(&format!("/api/sandboxes/{id}/exec")))
        .bearer_auth(&token)
        .header("accept", "text/event-stream")
        .json(&json!({"cmd": ["/bin/sh", "-c", "cat; echo done"], "stdin": "piped\n"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let body = resp.text().await.unwrap();
    let events: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(events.first(), Some(&"started"));
    assert_eq!(events.last(), Some(&"exit"));
    assert!(
        body.contains(r#"{"data":"piped\n"}"#) || body.contains("piped"),
        "{body}"
    );
    assert!(body.contains(r#""exitCode":0"#), "{body}");

    // Files in and out.
    let resp = app
        .client
        .put(app.url(&format!(
            "/api/sandboxes/{id}/files?path=/home/sandbox/in.txt"
        )))
        .bearer_auth(&token)
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let resp = app
        .client
        .get(app.url(&format!(
            "/api/sandboxes/{id}/files?path=/home/sandbox/in.txt"
        )))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.text().await.unwrap(), "payload");
    let r = app
        .get(&format!("/api/sandboxes/{id}/files?path=/nope"), t)
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::NOT_FOUND, "file_not_found")
    );

    // Read: live usage; another user sees nothing.
    let r = app.get(&format!("/api/sandboxes/{id}"), t).await;
    assert!(
        r.body["stats"]["memoryBytes"].as_u64().unwrap() > 0,
        "{}",
        r.text
    );
    assert!(r.body["stats"]["pids"].as_u64().unwrap() >= 2, "{}", r.text);
    assert_eq!(r.body["labels"]["job"], "r1");
    let (_, other) = app.user("other@example.com").await;
    let r = app.get(&format!("/api/sandboxes/{id}"), Some(&other)).await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::NOT_FOUND, "sandbox_not_found")
    );
    let r = app.get("/api/sandboxes", Some(&other)).await;
    assert_eq!(r.body["sandboxes"], json!([]));

    // Delete: gone for good, and nothing left on the host.
    let r = app
        .send(Method::DELETE, &format!("/api/sandboxes/{id}"), t, None)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = app.get(&format!("/api/sandboxes/{id}"), t).await;
    assert_eq!(r.body["status"], "ended");
    let r = app
        .post(
            &format!("/api/sandboxes/{id}/exec"),
            t,
            json!({"cmd": ["true"]}),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::GONE, "sandbox_gone")
    );
    let r = app
        .send(Method::DELETE, &format!("/api/sandboxes/{id}"), t, None)
        .await;
    assert_eq!(r.status, StatusCode::GONE);
    let cg = app.cgroups().unwrap();
    assert!(cg.list().is_empty(), "{:?}", cg.list());
    assert!(!app.db.dir().join("sandboxes").join(&id).exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_clear_errors() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (uid, token) = app.user("bad@example.com").await;
    let t = Some(token.as_str());
    let cases = [
        (
            json!({"template": "nope"}),
            StatusCode::BAD_REQUEST,
            "unknown_template",
        ),
        (
            json!({"template": "nope"}),
            StatusCode::BAD_REQUEST,
            "unknown_template",
        ),
        (
            json!({"template": "minimal", "network": "wifi"}),
            StatusCode::BAD_REQUEST,
            "invalid_sandbox_request",
        ),
        (
            json!({"template": "minimal", "memoryMb": 1}),
            StatusCode::BAD_REQUEST,
            "invalid_sandbox_request",
        ),
        (
            json!({"template": "minimal", "ttlSecs": 0}),
            StatusCode::BAD_REQUEST,
            "invalid_sandbox_request",
        ),
        (
            json!({"template": "minimal", "colour": "red"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "",
        ),
    ];
    // A known template this server has no image for: not the caller's
    // fault, and said so in a sentence (an admin also gets the command).
    let r = app
        .post("/api/sandboxes", t, json!({"template": "runtime"}))
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::SERVICE_UNAVAILABLE, "environment_missing"),
        "{}",
        r.text
    );
    assert!(!r.message().contains("polydev image"), "{}", r.message());
    let admin = app.admin("ops@example.com");
    let r = app
        .post(
            "/api/sandboxes",
            Some(&admin),
            json!({"template": "runtime"}),
        )
        .await;
    assert!(
        r.message().contains("polydev image build runtime"),
        "{}",
        r.message()
    );
    for (body, status, code) in cases {
        let r = app.post("/api/sandboxes", t, body.clone()).await;
        assert_eq!(r.status.as_u16() / 100, 4, "{body}: {}", r.text);
        if !code.is_empty() {
            assert_eq!(
                (r.status, r.error_code()),
                (status, code),
                "{body}: {}",
                r.text
            );
        } else {
            r.error_code();
        }
    }
    let r = app.get("/api/sandboxes/sb-zz", t).await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::NOT_FOUND, "sandbox_not_found")
    );
    let r = app
        .post("/api/sandboxes", None, json!({"template": "minimal"}))
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // v1: the runtime template has no image here; a bad vmType is named.
    let r = app
        .post(
            "/api/vms/create",
            t,
            json!({"userId": uid, "vmType": "gpu"}),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::BAD_REQUEST, "invalid_vm_type")
    );
    let r = app
        .post(
            "/api/vms/create",
            t,
            json!({"userId": uid, "vmType": "cli"}),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::SERVICE_UNAVAILABLE, "environment_missing")
    );
    assert!(
        r.message().contains("no runtime environment yet"),
        "{}",
        r.message()
    );
    let id = app
        .post("/api/sandboxes", t, json!({"template": "minimal"}))
        .await
        .body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = app
        .post(&format!("/api/sandboxes/{id}/exec"), t, json!({"cmd": []}))
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::BAD_REQUEST, "invalid_exec")
    );
    let r = app
        .post(
            &format!("/api/sandboxes/{id}/exec"),
            t,
            json!({"cmd": ["/no/such"]}),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::BAD_REQUEST, "exec_failed")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn quotas_ttl_and_warm_pool() {
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        &[
            "--sandbox-per-user-max",
            "2",
            "--sandbox-host-max",
            "4",
            "--sandbox-pools",
            "minimal=1",
        ],
    )
    .await;
    let (_, a) = app.user("qa@example.com").await;
    let (_, b) = app.user("qb@example.com").await;
    let create = |token: String, ttl: u64| {
        let app = &app;
        async move {
            app.post(
                "/api/sandboxes",
                Some(&token),
                json!({"template": "minimal", "ttlSecs": ttl}),
            )
            .await
        }
    };
    // The pool fills in the background; the first create takes from it.
    crate::app::eventually(
        Duration::from_secs(10),
        "a pool member is ready",
        || async {
            app.settled_logs()
                .await
                .contains("sandbox ready")
                .then_some(())
        },
    )
    .await;
    let first = create(a.clone(), 1).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text);
    let metrics = app.get("/metrics", None).await.text;
    assert!(
        metrics.contains(r#"polydev_pool_hits_total{template="minimal"} 1"#),
        "{metrics}"
    );
    assert_eq!(create(a.clone(), 600).await.status, StatusCode::CREATED);
    let r = create(a.clone(), 600).await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::TOO_MANY_REQUESTS, "sandbox_quota")
    );
    // Host: 4 at most, pool members included. Each create below is by a
    // user with room in their own quota, so the refusal that comes once
    // the host is full (however the pool refill interleaves) is the 503.
    assert_eq!(create(b.clone(), 600).await.status, StatusCode::CREATED);
    let mut others = Vec::new();
    for i in 0..4 {
        others.push(app.user(&format!("qc{i}@example.com")).await.1);
    }
    let mut r = create(b.clone(), 600).await;
    for token in others {
        if r.status != StatusCode::CREATED {
            break;
        }
        r = create(token, 600).await;
    }
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::SERVICE_UNAVAILABLE, "host_at_capacity"),
        "{}",
        r.text
    );
    assert!(r.headers.contains_key("retry-after"));

    // TTL: the first sandbox (1 s) is reaped.
    let id = first.body["id"].as_str().unwrap();
    crate::app::eventually(
        Duration::from_secs(10),
        "the 1 s sandbox is reaped",
        || async {
            let r = app.get(&format!("/api/sandboxes/{id}"), Some(&a)).await;
            (r.body["status"] == "ended").then_some(())
        },
    )
    .await;
    assert!(!app.cgroups().unwrap().list().contains(&id.to_owned()));
}

/// SIGKILL the controller while sandboxes run and more are being created;
/// a restart leaves no process, cgroup or directory behind and every record
/// final or live-and-real.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_controller_leaks_nothing_after_restart() {
    let mut app = TestApp::spawn(Backend::Sqlite).await;
    let (_, token) = app.user("crash@example.com").await;
    for _ in 0..3 {
        let r = app
            .post(
                "/api/sandboxes",
                Some(&token),
                json!({"template": "minimal"}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED);
    }
    // Creates in flight at the kill.
    let mut inflight = Vec::new();
    for _ in 0..4 {
        let (client, url, token) = (app.client.clone(), app.url("/api/sandboxes"), token.clone());
        inflight.push(tokio::spawn(async move {
            let _ = client
                .post(url)
                .bearer_auth(token)
                .json(&json!({"template": "minimal"}))
                .send()
                .await;
        }));
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(app.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = app.wait_exit(Duration::from_secs(10));
    for t in inflight {
        let _ = t.await;
    }

    app.restart().await;
    let again = &app;
    assert!(again.wait_for_log("sandboxes reconciled at start").await);
    let cg = again.cgroups().unwrap();
    crate::app::eventually(Duration::from_secs(10), "no cgroup is left", || async {
        cg.list().is_empty().then_some(())
    })
    .await;
    let dirs: Vec<_> = std::fs::read_dir(again.db.dir().join("sandboxes"))
        .unwrap()
        .flatten()
        .collect();
    assert!(dirs.is_empty(), "state left: {dirs:?}");
    // No process of any sandbox uid is left (they run as uid_base + n).
    let base = polydev_sandbox::LocalConfig::for_data_dir(again.db.dir()).uid_base;
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(status) = std::fs::read_to_string(e.path().join("status")) {
            if let Some(uid) = status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().next()?.parse::<u32>().ok())
            {
                assert!(
                    !(base..base + 65_536).contains(&uid) || !is_ours(&e.path(), again.db.dir()),
                    "sandbox process {:?} survived",
                    e.path()
                );
            }
        }
    }
    let r = again.get("/api/sandboxes", Some(&token)).await;
    let list = r.body["sandboxes"].as_array().unwrap();
    assert!(list.len() >= 3, "{}", r.text);
    for s in list {
        assert!(
            ["lost", "ended", "failed"].contains(&s["status"].as_str().unwrap()),
            "{s}"
        );
    }
    let v: Value = again.get("/api/sandboxes", Some(&token)).await.body;
    assert!(v["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["status"] == "lost"));
}

/// Whether a process belongs to a sandbox of this data dir (its bwrap binds
/// that dir's run directory).
fn is_ours(proc_dir: &std::path::Path, data_dir: &std::path::Path) -> bool {
    std::fs::read(proc_dir.join("cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(&data_dir.display().to_string()))
        .unwrap_or(false)
}

/// Network mode `egress`: the sandbox reaches the outside only through the
/// user's egress proxy (127.0.0.1:3128 inside, relayed by the agent and the
/// controller); direct connections fail; the proxy credential and env
/// values never reach the logs or the store.
#[tokio::test(flavor = "multi_thread")]
async fn egress_mode_goes_through_the_proxy_only() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("polydev.toml");
    std::fs::write(
        &config,
        "[egress]\nallow_private = [\"127.0.0.0/8\"]\nper_user_ports = false\n",
    )
    .unwrap();
    let app = TestApp::spawn_with(Backend::Sqlite, &["--config", config.to_str().unwrap()]).await;
    let (_, token) = app.user("net@example.com").await;
    let t = Some(token.as_str());

    // A stub "outside" server on the host's loopback.
    let stub = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = stub.local_addr().unwrap().port();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = stub.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\noutside",
                    )
                    .await;
            });
        }
    });

    let canary = format!("canary-{}", uuid::Uuid::new_v4().simple());
    let r = app
        .post(
            "/api/sandboxes",
            t,
            json!({"template": "minimal", "network": "egress", "env": {"API_KEY": canary}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_owned();
    let exec = |line: String, env: Value| {
        let app = &app;
        let id = id.clone();
        async move {
            app.post(
                &format!("/api/sandboxes/{id}/exec"),
                t,
                json!({"cmd": ["/bin/sh", "-c", line], "env": env}),
            )
            .await
        }
    };
    // Through the proxy (NO_PROXY lists loopback, so clear it for this call).
    let r = exec(
        format!("curl -s --max-time 5 http://127.0.0.1:{port}/"),
        json!({"NO_PROXY": "", "no_proxy": ""}),
    )
    .await;
    assert_eq!(r.body["stdout"], "outside", "{}", r.text);
    // Directly: there is no route.
    let r = exec(
        format!("curl -s --max-time 5 --noproxy '*' http://127.0.0.1:{port}/"),
        json!({}),
    )
    .await;
    assert_ne!(r.body["exitCode"], 0, "{}", r.text);
    // The relay is this sandbox's identity: a request that names no
    // credential (Chromium cannot) goes out with the sandbox's own...
    let r = exec(
        format!("curl -s --max-time 5 -x http://127.0.0.1:3128 http://127.0.0.1:{port}/"),
        json!({"NO_PROXY": "", "no_proxy": ""}),
    )
    .await;
    assert_eq!(r.body["stdout"], "outside", "{}", r.text);
    // ...while the proxy itself, reached from anywhere else, refuses it.
    let egress = app.egress.clone().unwrap();
    let outside = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://{egress}")).unwrap())
        .build()
        .unwrap()
        .get(format!("http://127.0.0.1:{port}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(outside.status().as_u16(), 407);

    // The sandbox never learns its egress credential: the relay adds it.
    assert_eq!(
        exec("echo $HTTP_PROXY".into(), json!({})).await.body["stdout"],
        "http://127.0.0.1:3128\n"
    );
    assert_eq!(
        exec("echo $API_KEY".into(), json!({})).await.body["stdout"],
        format!("{canary}\n")
    );

    // Ending the sandbox revokes the credential.
    let store = app.db.store().await;
    assert_eq!(
        store
            .live_egress_credentials_of_sandbox(&id)
            .await
            .unwrap()
            .len(),
        1
    );
    let r = app
        .send(Method::DELETE, &format!("/api/sandboxes/{id}"), t, None)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert!(store
        .live_egress_credentials_of_sandbox(&id)
        .await
        .unwrap()
        .is_empty());
    app.assert_nowhere(&[&canary]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_creates_give_exactly_the_user_quota() {
    // A warm pool and cold starts at once: counted and recorded under one
    // lock, so exactly the quota is granted, no more, no less.
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        &[
            "--sandbox-per-user-max",
            "10",
            "--sandbox-pools",
            "minimal=3",
        ],
    )
    .await;
    let (_, token) = app.user("race@example.com").await;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..15 {
        let (client, url, token) = (app.client.clone(), app.url("/api/sandboxes"), token.clone());
        set.spawn(async move {
            client
                .post(url)
                .bearer_auth(token)
                .json(&json!({"template": "minimal"}))
                .timeout(std::time::Duration::from_secs(60))
                .send()
                .await
                .unwrap()
                .status()
        });
    }
    let (mut created, mut refused) = (0, 0);
    while let Some(status) = set.join_next().await {
        match status.unwrap() {
            StatusCode::CREATED => created += 1,
            StatusCode::TOO_MANY_REQUESTS => refused += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((created, refused), (10, 5));
    let r = app.get("/api/sandboxes", Some(&token)).await;
    let live = r.body["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["status"] == "ready")
        .count();
    assert_eq!(live, 10, "{}", r.text);
}

/// A checkout in a private home (mode 0700, as root's is): the sandboxes'
/// uids cannot traverse it, so their state lives in a directory of the
/// controller's under /run instead, and sandboxes boot.
#[tokio::test(flavor = "multi_thread")]
async fn sandboxes_boot_when_the_data_dir_is_under_a_private_directory() {
    let db = polydev_store::testing::TestDatabase::sqlite_under_private_parent();
    let instance = polydev_sandbox::LocalConfig::for_data_dir(db.dir()).instance;
    let run_state = std::path::Path::new(polydev_sandbox::local::RUN_STATE_DIR).join(&instance);
    let app = TestApp::spawn_on(db, &[]);
    let (_, token) = app.user("private@example.com").await;
    let r = app
        .post(
            "/api/sandboxes",
            Some(&token),
            json!({"template": "minimal"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_owned();
    let r = app
        .post(
            &format!("/api/sandboxes/{id}/exec"),
            Some(&token),
            json!({"cmd": ["echo", "inside"]}),
        )
        .await;
    assert_eq!(r.body["stdout"], "inside\n", "{}", r.text);
    assert!(
        run_state.join(&id).is_dir(),
        "no state in {}",
        run_state.display()
    );
    assert!(
        app.wait_for_log("their state lives under /run instead")
            .await,
        "the move was not said"
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
    assert!(!run_state.join(&id).exists());
    drop(app);
    let _ = std::fs::remove_dir(&run_state);
}

/// `polydev image build` on a live controller's data dir (what an error
/// message tells an operator to do) leaves the controller's sandboxes,
/// cgroups and pool alone.
#[tokio::test(flavor = "multi_thread")]
async fn building_an_image_beside_a_live_controller_leaves_it_working() {
    let app = TestApp::spawn_with(Backend::Sqlite, &["--sandbox-pools", ""]).await;
    let (_, token) = app.user("builder@example.com").await;
    let cg = app.cgroups().unwrap();
    // No sandbox runs: the parent cgroup is empty, which is when the build's
    // cleanup used to remove it from under the controller.
    let out = tokio::task::block_in_place(|| app.cli(&["image", "build", "minimal"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("[1/2]") && err.contains("[2/2]"),
        "plain progress lines: {err}"
    );
    // The controller still makes sandboxes.
    for _ in 0..3 {
        let r = app
            .post(
                "/api/sandboxes",
                Some(&token),
                json!({"template": "minimal"}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    }
    assert_eq!(cg.list().len(), 3, "{:?}", cg.list());
    // The build's own validation instance left nothing behind: no cgroup
    // parent, no state directory (here or under /run).
    let build = polydev_sandbox::LocalConfig::for_validation(app.db.dir());
    let left: Vec<std::path::PathBuf> = [
        build.cgroup_root.join(&build.instance),
        build.cgroup_root.join("memory").join(&build.instance),
        build.cgroup_root.join("pids").join(&build.instance),
        build.state_dir.clone(),
        std::path::Path::new(polydev_sandbox::local::RUN_STATE_DIR).join(&build.instance),
    ]
    .into_iter()
    .filter(|p| p.exists())
    .collect();
    assert!(left.is_empty(), "the image build left {left:?}");
}
