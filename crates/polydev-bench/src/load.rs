//! `polydev-bench load`: a load test that stops by itself. For a fixed
//! duration, `--load-clients` simulated API clients (closed loop, a short
//! think time) read the routes a signed-in page reads, `--load-runs`
//! workers each keep one run in flight against the stub providers (the real
//! CLIs, in sandboxes), and `--load-logins` workers each start a login
//! session, wait for its code prompt and cancel it. Then the work in flight
//! ends, the server stops, and nothing may be left: no sandbox, no cgroup.
//!
//! Reported: requests/s and p50/p99 per route, answers by status, runs and
//! logins finished. Overload must be 429 or 503 with `Retry-After`; a 5xx of
//! another kind, a 429/503 without `Retry-After`, a timeout, an admitted
//! run that does not finish or a leak fails the bench (exit status 1),
//! after the report.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use polydev_domain::Provider;
use serde_json::{json, Map, Value};

use crate::kit::{percentile, Server};
use crate::BenchArgs;

/// How long one API request may take before it counts as a timeout.
const REQUEST_DEADLINE: Duration = Duration::from_secs(30);
/// How long a run (start → stream's end) may take.
const RUN_DEADLINE: Duration = Duration::from_secs(240);
/// A simulated client's pause between requests.
const THINK: Duration = Duration::from_millis(100);
/// The API users the clients share (each a separate account).
const CLIENT_USERS: usize = 20;

/// What every worker records.
#[derive(Default)]
struct Tally {
    /// Per route: latencies (ms).
    latency: BTreeMap<&'static str, Vec<f64>>,
    /// Per route and status ("timeout" for none).
    statuses: BTreeMap<(&'static str, String), u64>,
    /// Faults: a 5xx that is not an overload answer, an overload answer
    /// without Retry-After, a timeout (the first `FAULTS_KEPT` in words,
    /// all counted).
    faults: Vec<String>,
    fault_count: usize,
    runs_done: u64,
    runs_failed: u64,
    logins_done: u64,
}

type Shared = Arc<Mutex<Tally>>;

/// Faults kept in words (all are counted).
const FAULTS_KEPT: usize = 50;

impl Tally {
    fn fault(&mut self, what: String) {
        self.fault_count += 1;
        if self.faults.len() < FAULTS_KEPT {
            self.faults.push(what);
        }
    }
}

/// Sends `req` within the deadline and records it under `route`; the
/// answer, or None on a timeout or transport error.
async fn send(
    tally: &Shared,
    route: &'static str,
    req: reqwest::RequestBuilder,
) -> Option<(reqwest::StatusCode, Option<u64>, Value)> {
    let t = Instant::now();
    let result = tokio::time::timeout(REQUEST_DEADLINE, async {
        let r = req.send().await?;
        let status = r.status();
        let retry = r
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let body: Value = r.json().await.unwrap_or(Value::Null);
        Ok::<_, reqwest::Error>((status, retry, body))
    })
    .await;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    let mut g = tally.lock().unwrap_or_else(|p| p.into_inner());
    match result {
        Ok(Ok((status, retry, body))) => {
            g.latency.entry(route).or_default().push(ms);
            *g.statuses
                .entry((route, status.as_u16().to_string()))
                .or_default() += 1;
            let overload = matches!(status.as_u16(), 429 | 503);
            if overload && retry.is_none() {
                g.fault(format!("{route}: {status} without Retry-After: {body}"));
            } else if status.is_server_error() && !overload {
                g.fault(format!("{route}: {status}: {body}"));
            }
            Some((status, retry, body))
        }
        Ok(Err(e)) => {
            *g.statuses.entry((route, "error".into())).or_default() += 1;
            g.fault(format!("{route}: {e}"));
            None
        }
        Err(_) => {
            *g.statuses.entry((route, "timeout".into())).or_default() += 1;
            g.fault(format!(
                "{route}: no answer within {} s",
                REQUEST_DEADLINE.as_secs()
            ));
            None
        }
    }
}

/// Waits as an overloaded server asked (at most 5 s).
async fn back_off(retry: Option<u64>) {
    tokio::time::sleep(Duration::from_secs(retry.unwrap_or(1).clamp(1, 5))).await;
}

/// A simulated page: the routes a signed-in tab reads, round robin.
async fn client(http: reqwest::Client, base: String, token: String, until: Instant, tally: Shared) {
    const ROUTES: [&str; 6] = [
        "/api/me",
        "/api/providers",
        "/api/runs",
        "/api/vault/items",
        "/api/sandboxes",
        "/api/auth/health",
    ];
    let mut i = 0usize;
    while Instant::now() < until {
        let route = ROUTES[i % ROUTES.len()];
        i += 1;
        let answer = send(
            &tally,
            route,
            http.get(format!("{base}{route}")).bearer_auth(&token),
        )
        .await;
        match answer {
            Some((s, retry, _)) if matches!(s.as_u16(), 429 | 503) => {
                back_off(retry).await;
                continue;
            }
            // No answer at all (recorded): not a tight loop against it.
            None => back_off(None).await,
            Some(_) => {}
        }
        tokio::time::sleep(THINK).await;
    }
}

/// Keeps one run in flight: start, seal the key, follow the stream to its
/// end; again until the time is up.
async fn runner(http: reqwest::Client, base: String, token: String, until: Instant, tally: Shared) {
    let providers = [Provider::ClaudeCode, Provider::Codex, Provider::GeminiCli];
    let mut n = 0usize;
    while Instant::now() < until {
        let provider = providers[n % providers.len()];
        n += 1;
        let started = send(
            &tally,
            "POST /api/runs",
            http.post(format!("{base}/api/runs"))
                .bearer_auth(&token)
                .json(&json!({"prompt": "load", "providers": [provider.as_str()]})),
        )
        .await;
        let Some((status, retry, view)) = started else {
            back_off(None).await;
            continue;
        };
        if !status.is_success() {
            back_off(retry).await;
            continue;
        }
        let Some(id) = view["runId"].as_str().map(str::to_owned) else {
            continue;
        };
        let ok = follow(&http, &base, &token, &id, provider, &view, &tally).await;
        let mut g = tally.lock().unwrap_or_else(|p| p.into_inner());
        if ok {
            g.runs_done += 1;
        } else {
            g.runs_failed += 1;
        }
    }
}

/// Hands a run its key and reads its stream to the end; whether every
/// provider finished `done`.
async fn follow(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    id: &str,
    provider: Provider,
    view: &Value,
    tally: &Shared,
) -> bool {
    let p = provider.as_str();
    let Ok(pk) = B64.decode(view["sandboxes"][p]["publicKey"].as_str().unwrap_or("")) else {
        return false;
    };
    let Ok(pk) = polydev_vault::SealingPublicKey::from_bytes(&pk) else {
        return false;
    };
    let sealed = pk.seal(
        polydev_sessions::runs::CREDENTIAL_PURPOSE,
        format!("{id}/{p}").as_bytes(),
        b"load-key",
    );
    // A queued provider's key waits for its turn (409 until then).
    let deadline = Instant::now() + RUN_DEADLINE;
    loop {
        let r = send(
            tally,
            "POST /api/runs/{id}/credentials",
            http.post(format!("{base}/api/runs/{id}/credentials"))
                .bearer_auth(token)
                .json(&json!({"credentials": {p: B64.encode(&sealed)}})),
        )
        .await;
        match r {
            Some((s, _, _)) if s.is_success() => break,
            Some((s, _, _)) if s.as_u16() == 409 && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            _ => return false,
        }
    }
    let t = Instant::now();
    let read = tokio::time::timeout(RUN_DEADLINE, async {
        let mut resp = http
            .get(format!("{base}/api/runs/{id}/events"))
            .bearer_auth(token)
            .send()
            .await?;
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await? {
            body.extend_from_slice(&chunk);
        }
        Ok::<_, reqwest::Error>(String::from_utf8_lossy(&body).into_owned())
    })
    .await;
    let mut g = tally.lock().unwrap_or_else(|p| p.into_inner());
    match read {
        Ok(Ok(text)) => {
            g.latency
                .entry("run (stream to its end)")
                .or_default()
                .push(t.elapsed().as_secs_f64() * 1000.0);
            // An admitted run that does not finish is a fault: overload is
            // refused at the door (503), not ended late.
            let done = text.contains("event: done");
            if !done {
                let why: String = text
                    .lines()
                    .filter(|l| l.starts_with("data:") && l.contains("\"stage\""))
                    .collect::<Vec<_>>()
                    .join(" ")
                    .chars()
                    .take(300)
                    .collect();
                g.fault(format!("run {id} did not finish: {why}"));
            }
            done
        }
        Ok(Err(e)) => {
            g.fault(format!("run {id}: its stream broke: {e}"));
            false
        }
        Err(_) => {
            g.fault(format!(
                "run {id}: its stream did not end within {} s",
                RUN_DEADLINE.as_secs()
            ));
            false
        }
    }
}

/// Starts a login session by code, waits for its code prompt, cancels it;
/// again until the time is up.
async fn login(
    http: reqwest::Client,
    base: String,
    user: (String, String),
    until: Instant,
    tally: Shared,
) {
    let (uid, token) = user;
    while Instant::now() < until {
        let started = send(
            &tally,
            "POST /api/auth/start",
            http.post(format!("{base}/api/auth/start"))
                .bearer_auth(&token)
                .json(&json!({"userId": uid, "provider": "codex", "mode": "code"})),
        )
        .await;
        let Some((_, retry, v)) = started else {
            back_off(None).await;
            continue;
        };
        let Some(id) = v["sessionId"].as_str().map(str::to_owned) else {
            back_off(retry).await;
            continue;
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut prompted = false;
        while Instant::now() < deadline {
            let r = send(
                &tally,
                "GET /api/auth/session/{id}",
                http.get(format!("{base}/api/auth/session/{id}"))
                    .bearer_auth(&token),
            )
            .await;
            match r
                .as_ref()
                .map(|(_, _, v)| v["state"].as_str().unwrap_or(""))
            {
                Some("awaiting_code") => {
                    prompted = true;
                    break;
                }
                Some("failed" | "expired" | "cancelled") | None => break,
                _ => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
        send(
            &tally,
            "DELETE /api/auth/session/{id}",
            http.delete(format!("{base}/api/auth/session/{id}"))
                .bearer_auth(&token),
        )
        .await;
        if prompted {
            tally.lock().unwrap_or_else(|p| p.into_inner()).logins_done += 1;
        }
    }
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let stubs = crate::kit::start_stubs([
        "load answer from claude",
        "load answer from codex",
        "load answer from gemini",
    ])
    .await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("polydev.toml");
    // Runs on the host-borrowing `minimal` template (the CLIs from the
    // host), a small warm pool; login sessions whose command prints a
    // sign-in address and waits for its code, like a CLI's.
    std::fs::write(
        &config,
        format!(
            "[egress]\nallow_private = [\"127.0.0.0/8\"]\nper_user_ports = false\n{}[sandbox]\npools = {{minimal = 4}}\n[runs]\ntemplate = \"minimal\"\ndeadline_secs = 120\n{}[login]\ntemplate = \"minimal\"\n[login.providers.codex]\ncode = 'echo \"Visit https://auth.stub.test/authorize?state=load to sign in\"; exec sleep 600'\ncredential_file = \"/home/sandbox/.codex/auth.json\"\n",
            crate::kit::STUB_HOSTS,
            crate::kit::stub_bases(&stubs),
        ),
    )?;
    let server = Server::start(&["--config", config.to_str().unwrap_or_default()])?;
    let base = format!("http://{}", server.addr);
    let cgroups = {
        let cfg = polydev_sandbox::LocalConfig::for_data_dir(server.data_dir());
        polydev_sandbox::cgroup::Cgroups::detect(&cfg.cgroup_root, &cfg.instance)?
    };

    eprintln!(
        "load: {} clients, {} runs in flight, {} login sessions, {} s",
        args.load_clients, args.load_runs, args.load_logins, args.duration_secs
    );
    let mut client_tokens = Vec::new();
    for i in 0..CLIENT_USERS.min(args.load_clients.max(1)) {
        client_tokens.push(server.user_token(&format!("client{i}@example.com"), false)?);
    }
    let mut run_tokens = Vec::new();
    for i in 0..args.load_runs {
        run_tokens.push(server.user_token(&format!("runner{i}@example.com"), false)?);
    }
    let mut login_users = Vec::new();
    for i in 0..args.load_logins {
        login_users.push(server.vault_user(&format!("login{i}@example.com"))?);
    }

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.load_clients + args.load_runs + args.load_logins)
        .build()?;
    let tally: Shared = Arc::default();
    let t0 = Instant::now();
    let until = t0 + Duration::from_secs(args.duration_secs);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..args.load_clients {
        let token = client_tokens[i % client_tokens.len()].clone();
        set.spawn(client(
            http.clone(),
            base.clone(),
            token,
            until,
            tally.clone(),
        ));
    }
    for token in run_tokens {
        set.spawn(runner(
            http.clone(),
            base.clone(),
            token,
            until,
            tally.clone(),
        ));
    }
    for user in login_users {
        set.spawn(login(
            http.clone(),
            base.clone(),
            user,
            until,
            tally.clone(),
        ));
    }
    // Work still in flight at the end finishes (each has its deadline).
    while set.join_next().await.is_some() {}
    let wall = t0.elapsed().as_secs_f64();

    // Nothing the load made outlives it: once the server has stopped, no
    // sandbox cgroup of its instance is left.
    drop(server);
    let left = cgroups.list();

    let g = tally.lock().unwrap_or_else(|p| p.into_inner());
    let mut figures = Map::new();
    let mut requests = 0usize;
    for (route, v) in &g.latency {
        requests += v.len();
        figures.insert(format!("{route} count"), json!(v.len()));
        figures.insert(format!("{route} p50_ms"), json!(percentile(v.clone(), 0.5)));
        figures.insert(
            format!("{route} p99_ms"),
            json!(percentile(v.clone(), 0.99)),
        );
    }
    let mut by_status: BTreeMap<String, u64> = BTreeMap::new();
    for ((_, status), n) in &g.statuses {
        *by_status.entry(status.clone()).or_default() += n;
    }
    figures.insert("requests_per_s".into(), json!(requests as f64 / wall));
    figures.insert("answers_by_status".into(), json!(by_status));
    figures.insert("runs_done".into(), json!(g.runs_done));
    figures.insert("runs_not_done".into(), json!(g.runs_failed));
    figures.insert("logins_to_code_prompt".into(), json!(g.logins_done));
    figures.insert("wall_s".into(), json!(wall));
    figures.insert("faults".into(), json!(g.fault_count));
    figures.insert("sandboxes_left".into(), json!(left.len()));
    crate::kit::report(args.json, figures);
    for f in g.faults.iter().take(20) {
        eprintln!("fault: {f}");
    }
    anyhow::ensure!(
        g.fault_count == 0 && left.is_empty(),
        "{} faults (5xx, overload without Retry-After, timeouts, runs not finished), {} sandboxes left",
        g.fault_count,
        left.len()
    );
    // A load under which nothing gets done is no pass either.
    anyhow::ensure!(args.load_runs == 0 || g.runs_done > 0, "no run finished");
    anyhow::ensure!(
        args.load_logins == 0 || g.logins_done > 0,
        "no login session reached its code prompt"
    );
    Ok(())
}
