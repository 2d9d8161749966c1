//! `polydev-bench runs`: the whole chain (API → sandbox → agent → CLI →
//! egress proxy → stub provider) against each CLI run directly on the host
//! against the same stub, time to the first answer text; then 20
//! concurrent three-provider runs. Needs the CLIs on PATH (scripts/test.sh
//! installs the pinned versions) and root for the sandboxes.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use polydev_domain::Provider;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::kit::Server;

fn p50(v: Vec<f64>) -> f64 {
    crate::kit::percentile(v, 0.5)
}
use crate::BenchArgs;

const ROUNDS: usize = 20;
const CONCURRENT: usize = 20;
/// The CLIs this bench measures (OpenCode and Copilot CLI are not
/// benchmarked yet).
const BENCHED: [Provider; 3] = [Provider::ClaudeCode, Provider::Codex, Provider::GeminiCli];

/// The CLI run directly on the host, against the stub: ms to the first
/// stdout line carrying the answer.
async fn direct(
    provider: Provider,
    port: u16,
    answer: &str,
    home: &std::path::Path,
) -> anyhow::Result<f64> {
    let base = format!("http://127.0.0.1:{port}");
    let mut cmd = tokio::process::Command::new(match provider {
        Provider::ClaudeCode => "claude",
        Provider::Codex => "codex",
        Provider::GeminiCli => "gemini",
        other => bail!("{} is not benchmarked", other.as_str()),
    });
    cmd.env("HOME", home)
        .env("NO_PROXY", "*")
        .kill_on_drop(true);
    match provider {
        Provider::ClaudeCode => {
            cmd.args(["-p", "hi", "--output-format", "stream-json", "--verbose"])
                .env("ANTHROPIC_BASE_URL", &base)
                .env("ANTHROPIC_API_KEY", "bench")
                .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1");
        }
        Provider::Codex => {
            cmd.args(["exec", "--skip-git-repo-check", "--json", "-c", "analytics.enabled=false", "-c", "model_provider=stub", "-c"])
                .arg(format!("model_providers.stub={{name=\"stub\",base_url=\"{base}/v1\",env_key=\"OPENAI_API_KEY\",wire_api=\"responses\"}}"))
                .arg("hi")
                .env("OPENAI_API_KEY", "bench");
        }
        Provider::GeminiCli => {
            std::fs::create_dir_all(home.join(".gemini"))?;
            std::fs::write(
                home.join(".gemini/settings.json"),
                r#"{"security":{"auth":{"selectedType":"gemini-api-key"}},"privacy":{"usageStatisticsEnabled":false}}"#,
            )?;
            cmd.args(["-p", "hi", "-o", "stream-json", "--skip-trust"])
                .env("GOOGLE_GEMINI_BASE_URL", &base)
                .env("GEMINI_API_KEY", "bench");
        }
        other => bail!("{} is not benchmarked", other.as_str()),
    }
    let t = Instant::now();
    let mut child = cmd
        .current_dir(home)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| {
            format!(
                "cannot run the {} CLI (install the pinned CLIs)",
                provider.as_str()
            )
        })?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let mut first = None;
    while let Some(l) = lines.next_line().await? {
        if first.is_none() && l.contains(answer) {
            first = Some(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    let _ = child.wait().await;
    first.with_context(|| format!("{} printed no answer", provider.as_str()))
}

/// The key a run's view gives for `provider`'s sandbox.
fn sandbox_key(
    view: &Value,
    provider: Provider,
) -> anyhow::Result<polydev_vault::SealingPublicKey> {
    let pk = B64.decode(
        view["sandboxes"][provider.as_str()]["publicKey"]
            .as_str()
            .unwrap_or(""),
    )?;
    polydev_vault::SealingPublicKey::from_bytes(&pk).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Seals a stand-in key to each provider's sandbox and hands them over.
async fn send_credentials(
    http: &reqwest::Client,
    server: &str,
    token: &str,
    view: &Value,
    id: &str,
    providers: &[Provider],
) -> anyhow::Result<()> {
    let mut creds = Map::new();
    for p in providers {
        let sealed = sandbox_key(view, *p)?.seal(
            polydev_sessions::runs::CREDENTIAL_PURPOSE,
            format!("{id}/{}", p.as_str()).as_bytes(),
            b"bench",
        );
        creds.insert(p.as_str().to_owned(), json!(B64.encode(sealed)));
    }
    http.post(format!("{server}/api/runs/{id}/credentials"))
        .bearer_auth(token)
        .json(&json!({"credentials": creds}))
        .send()
        .await?;
    Ok(())
}

/// One run through polydev: ms from the request to each provider's first
/// delta, and to the end of the stream.
async fn through(
    server: &str,
    token: &str,
    providers: &[Provider],
) -> anyhow::Result<(Vec<(Provider, f64)>, f64)> {
    let http = reqwest::Client::new();
    let t = Instant::now();
    let names: Vec<&str> = providers.iter().map(|p| p.as_str()).collect();
    let r: Value = http
        .post(format!("{server}/api/runs"))
        .bearer_auth(token)
        .json(&json!({"prompt": "hi", "providers": names}))
        .send()
        .await?
        .json()
        .await?;
    let id = r["runId"]
        .as_str()
        .with_context(|| format!("run refused: {r}"))?
        .to_owned();
    send_credentials(&http, server, token, &r, &id, providers).await?;
    let mut resp = http
        .get(format!("{server}/api/runs/{id}/events"))
        .bearer_auth(token)
        .send()
        .await?;
    let mut firsts = Vec::new();
    let mut buf = String::new();
    let mut event = String::new();
    while let Some(chunk) = resp.chunk().await? {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(nl) = buf.find('\n') {
            let line: String = buf.drain(..=nl).collect();
            if let Some(e) = line.trim_end().strip_prefix("event: ") {
                event = e.to_owned();
            } else if let Some(d) = line.trim_end().strip_prefix("data: ") {
                let d: Value = serde_json::from_str(d).unwrap_or_default();
                let p: Option<Provider> = d["provider"].as_str().and_then(|p| p.parse().ok());
                if let (Some(p), "delta") = (p, event.as_str()) {
                    if !firsts.iter().any(|(q, _)| *q == p) {
                        firsts.push((p, t.elapsed().as_secs_f64() * 1000.0));
                    }
                }
                if event == "error" {
                    bail!("a provider failed: {d}");
                }
            }
        }
    }
    Ok((firsts, t.elapsed().as_secs_f64() * 1000.0))
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    // In start_stubs' order: Anthropic, OpenAI, Gemini.
    let answers = [
        (Provider::ClaudeCode, "bench answer from claude"),
        (Provider::Codex, "bench answer from codex"),
        (Provider::GeminiCli, "bench answer from gemini"),
    ];
    let stubs = crate::kit::start_stubs(answers.map(|(_, a)| a)).await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("polydev.toml");
    std::fs::write(
        &config,
        format!(
            "[egress]\nallow_private = [\"127.0.0.0/8\"]\nper_user_ports = false\nrequests_per_sec_per_user = 10000\n{}[sandbox]\nper_user_max = 100\nhost_max = 500\n[runs]\ntemplate = \"minimal\"\nmax_providers_in_flight = 1000\n{}",
            crate::kit::STUB_HOSTS,
            crate::kit::stub_bases(&stubs),
        ),
    )?;
    let server = Server::start(&[
        "--config",
        config.to_str().unwrap_or_default(),
        // A warm pool: run sandboxes are pool members routed to the
        // user's egress credential at hand-out.
        "--sandbox-pools",
        "minimal=4",
    ])?;
    let base = format!("http://{}", server.addr);
    let token = server.admin_token()?;
    let mut figures = Map::new();
    for (i, (provider, answer)) in answers.iter().enumerate() {
        if args.workspace_only {
            break;
        }
        let home = dir.path().join(format!("home-{i}"));
        std::fs::create_dir_all(&home)?;
        let mut d = Vec::new();
        let mut p = Vec::new();
        for _ in 0..ROUNDS {
            d.push(direct(*provider, stubs[i].addr.port(), answer, &home).await?);
            crate::stream::wait_for_pool(&base).await?;
            let (firsts, _) = through(&base, &token, &[*provider]).await?;
            p.push(firsts.first().map(|f| f.1).context("no delta")?);
        }
        let (d, p) = (p50(d), p50(p));
        let name = provider.as_str();
        figures.insert(format!("{name}_direct_p50_ms"), json!(d));
        figures.insert(format!("{name}_polydev_p50_ms"), json!(p));
        figures.insert(format!("{name}_added_p50_ms"), json!(p - d));
    }

    if !args.workspace_only {
        concurrent(&server, &base, &mut figures).await?;
    }
    workspaces(&server, &base, &mut figures).await?;
    crate::kit::report(args.json, figures);
    Ok(())
}

/// 20 concurrent three-provider runs, one user each.
async fn concurrent(
    server: &Server,
    base: &str,
    figures: &mut Map<String, Value>,
) -> anyhow::Result<()> {
    // Concurrent: one user each (a credential runs once at a time).
    let mut tokens = Vec::new();
    for i in 0..CONCURRENT {
        tokens.push(server.user_token(&format!("bench{i}@example.com"), false)?);
    }
    // The sandboxes' memory (the instance's parent cgroup), sampled while
    // the runs go: what 3 x CONCURRENT CLIs really hold.
    let cgroups = {
        let cfg = polydev_sandbox::LocalConfig::for_data_dir(server.data_dir());
        polydev_sandbox::cgroup::Cgroups::detect(&cfg.cgroup_root, &cfg.instance)?
    };
    let idle_bytes = cgroups.parent_memory_bytes();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(
                    cgroups.parent_memory_bytes(),
                    std::sync::atomic::Ordering::Relaxed,
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for tok in tokens {
        let base = base.to_owned();
        set.spawn(async move { through(&base, &tok, &BENCHED).await });
    }
    let mut totals = Vec::new();
    while let Some(r) = set.join_next().await {
        totals.push(r??.1);
    }
    let wall = t.elapsed().as_secs_f64();
    sampler.abort();
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    figures.insert("concurrent_peak_memory_mib".into(), json!(peak >> 20));
    figures.insert(
        "concurrent_memory_per_cli_mib".into(),
        json!(peak.saturating_sub(idle_bytes) as f64 / (3 * CONCURRENT) as f64 / 1048576.0),
    );
    figures.insert("concurrent_runs".into(), json!(CONCURRENT));
    figures.insert("concurrent_wall_s".into(), json!(wall));
    figures.insert("concurrent_run_p50_ms".into(), json!(p50(totals)));
    figures.insert(
        "concurrent_runs_per_min".into(),
        json!(CONCURRENT as f64 * 60.0 / wall),
    );
    Ok(())
}

/// A 50 MiB workspace for three CLIs, a few times.
async fn workspaces(
    server: &Server,
    base: &str,
    figures: &mut Map<String, Value>,
) -> anyhow::Result<()> {
    // A 50 MiB workspace for three CLIs: sealed here, uploaded and
    // unpacked in each sandbox (ready), then the run to its end.
    let (_, vault_token) = server.vault_user("workspace@example.com")?;
    let archive = workspace_archive(WORKSPACE_BYTES)?;
    let mut ready = Vec::new();
    let mut sealing = Vec::new();
    for _ in 0..WORKSPACE_ROUNDS {
        crate::stream::wait_for_pool(base).await?;
        let (seal_ms, ready_ms) = workspace_run(base, &vault_token, &archive).await?;
        sealing.push(seal_ms);
        ready.push(ready_ms);
    }
    figures.insert("workspace_mib".into(), json!(WORKSPACE_BYTES >> 20));
    figures.insert("workspace_50mib_seal_ms".into(), json!(p50(sealing)));
    figures.insert("workspace_50mib_ready_ms".into(), json!(p50(ready)));
    Ok(())
}

const WORKSPACE_BYTES: usize = 50 << 20;
const WORKSPACE_ROUNDS: usize = 3;

/// A repository-like tree of `bytes` (text files of 64 KiB, lines of
/// code-like text that differ) as a tar archive.
fn workspace_archive(bytes: usize) -> anyhow::Result<Vec<u8>> {
    let mut files = Vec::new();
    let mut n = 0usize;
    while files.len() * 65536 < bytes {
        let mut text = String::with_capacity(65536);
        while text.len() < 65536 - 80 {
            n += 1;
            text.push_str(&format!(
                "fn item_{n}(x: u64) -> u64 {{ x.wrapping_mul({}) ^ {} }}\n",
                n.wrapping_mul(2654435761) % 1_000_003,
                n % 977
            ));
        }
        files.push((
            format!("src/m{}/f{}.rs", files.len() / 64, files.len()),
            text.into_bytes(),
        ));
    }
    polydev_sessions::workspace::tar_of(&files).map_err(anyhow::Error::msg)
}

/// One edit run on `archive` with the three CLIs: ms to seal it for all
/// three here, and ms from the request to all three unpacked.
async fn workspace_run(server: &str, token: &str, archive: &[u8]) -> anyhow::Result<(f64, f64)> {
    let http = reqwest::Client::new();
    let t = Instant::now();
    let names: Vec<&str> = BENCHED.iter().map(|p| p.as_str()).collect();
    let r: Value = http
        .post(format!("{server}/api/runs"))
        .bearer_auth(token)
        .json(&json!({"prompt": "hi", "providers": names,
            "workspace": {"mode": "edit", "bytes": archive.len()}}))
        .send()
        .await?
        .json()
        .await?;
    let id = r["runId"]
        .as_str()
        .with_context(|| format!("run refused: {r}"))?
        .to_owned();
    // Sealed for the three at once (on the client's cores).
    let sealing = Instant::now();
    let keys: Vec<_> = BENCHED
        .iter()
        .map(|p| sandbox_key(&r, *p))
        .collect::<Result<_, _>>()?;
    let bodies: Vec<(Provider, Vec<u8>)> = std::thread::scope(|s| {
        let handles: Vec<_> = BENCHED
            .iter()
            .zip(&keys)
            .map(|(p, k)| {
                let id = &id;
                s.spawn(move || {
                    let body =
                        polydev_sessions::workspace::sealed_upload(k, id, p.as_str(), archive);
                    (*p, body)
                })
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    let seal_ms = sealing.elapsed().as_secs_f64() * 1000.0;
    let uploads = bodies.into_iter().map(|(p, body)| {
        let (http, id) = (&http, &id);
        async move {
            let r = http
                .put(format!("{server}/api/runs/{id}/workspace/{}", p.as_str()))
                .bearer_auth(token)
                .body(body)
                .send()
                .await?;
            if !r.status().is_success() {
                bail!("{} refused the workspace: {}", p.as_str(), r.text().await?);
            }
            anyhow::Ok(())
        }
    });
    for u in futures_util::future::join_all(uploads).await {
        u?;
    }
    let ready_ms = t.elapsed().as_secs_f64() * 1000.0;
    // Then the run, to its end (its sandboxes go with it).
    send_credentials(&http, server, token, &r, &id, &BENCHED).await?;
    let events = http
        .get(format!("{server}/api/runs/{id}/events"))
        .bearer_auth(token)
        .timeout(Duration::from_secs(300))
        .send()
        .await?
        .text()
        .await?;
    if events.contains("event: error") {
        bail!("a provider failed on the workspace: {events}");
    }
    Ok((seal_ms, ready_ms))
}
