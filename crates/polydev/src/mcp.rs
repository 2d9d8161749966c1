//! `polydev mcp`: an MCP server on stdio (the official Rust SDK, rmcp) with
//! one tool, `get_perspectives(prompt, providers?, path?, mode?)`, which
//! runs the prompt through the provider CLIs on a polydev controller
//! (optionally on a local directory, archived and sealed here) and returns
//! every answer, and in `edit` mode each CLI's diff. This process holds the credentials (provider API keys from its
//! environment) and seals each one to its run sandbox's agent key, so the
//! controller only ever relays ciphertext.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use polydev_domain::Provider;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock, Implementation, ServerCapabilities, ServerConfig};
use rmcp::{tool, tool_handler, tool_router, ErrorData, ServerHandler, ServiceExt};
use serde_json::{json, Value};

/// Where each provider's API key comes from (this process's environment).
pub fn key_env(provider: Provider) -> &'static [&'static str] {
    match provider {
        Provider::ClaudeCode => &["ANTHROPIC_API_KEY"],
        Provider::Codex => &["OPENAI_API_KEY", "CODEX_API_KEY"],
        Provider::GeminiCli => &["GEMINI_API_KEY", "GOOGLE_API_KEY"],
        // Any vendor's key OpenCode takes: named apart, so a key set for
        // Claude Code is not also spent through OpenCode unasked.
        Provider::OpenCode => &["OPENCODE_PROVIDER_API_KEY"],
        // Only its own variable: a GITHUB_TOKEN set for other tools is
        // not sent anywhere unasked.
        Provider::Copilot => &["COPILOT_GITHUB_TOKEN"],
    }
}

fn key_for(provider: Provider) -> Option<String> {
    key_env(provider)
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|k| !k.is_empty()))
}

/// A local directory for the CLIs to work on, and what they may do.
#[derive(Debug, Clone)]
pub struct LocalCode {
    pub path: std::path::PathBuf,
    pub mode: polydev_sessions::workspace::Mode,
}

/// The most a local directory may hold to be sent (the controller may
/// take less: its `[runs] max_workspace_mb`).
const MAX_LOCAL_CODE: u64 = 200 << 20;

/// Runs `prompt` on the controller and collects each provider's answer;
/// with `code`, on that directory (archived and sealed here), and in
/// `edit` mode with each provider's changes as a diff (sealed in its
/// sandbox to a key this call makes, and opened here).
pub async fn perspectives(
    server: &str,
    token: &str,
    prompt: &str,
    providers: Option<Vec<Provider>>,
    code: Option<LocalCode>,
) -> anyhow::Result<Value> {
    let providers: Vec<Provider> = match providers {
        Some(p) if !p.is_empty() => p,
        _ => Provider::ALL
            .into_iter()
            .filter(|p| key_for(*p).is_some())
            .filter(|p| code.is_none() || polydev_sessions::providers::works_on_code(*p))
            .collect(),
    };
    // The archive, and a key of this call's own for the diffs.
    let archive = match &code {
        Some(c) => {
            let path = c.path.clone();
            let archiving = tokio::task::spawn_blocking(move || {
                polydev_sessions::workspace::tar_dir(&path, MAX_LOCAL_CODE)
            });
            let (tar, _) = tokio::time::timeout(Duration::from_secs(120), archiving)
                .await
                .context("archiving the code took more than 120 s")??
                .map_err(|e| anyhow::anyhow!("cannot archive the code: {e}"))?;
            Some(tar)
        }
        None => None,
    };
    let diff_key = polydev_vault::SealingKeyPair::generate();
    let workspace = match (&code, &archive) {
        (Some(c), Some(a)) => json!({"mode": c.mode, "bytes": a.len(),
            "recipient": B64.encode(diff_key.public().to_bytes())}),
        _ => Value::Null,
    };
    if providers.is_empty() {
        bail!("no provider has an API key here (set ANTHROPIC_API_KEY, OPENAI_API_KEY, GEMINI_API_KEY, OPENCODE_PROVIDER_API_KEY or COPILOT_GITHUB_TOKEN)");
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let server = server.trim_end_matches('/');
    let names: Vec<&str> = providers.iter().map(|p| p.as_str()).collect();
    // A first start prepares the CLIs' environment: wait for it (15 min).
    let patience = std::time::Instant::now() + Duration::from_secs(900);
    let run: Value = loop {
        let r = http
            .post(format!("{server}/api/runs"))
            .bearer_auth(token)
            .json(&if workspace.is_null() {
                json!({"prompt": prompt, "providers": names})
            } else {
                json!({"prompt": prompt, "providers": names, "workspace": workspace})
            })
            .send()
            .await
            .context("cannot reach the polydev controller")?;
        let status = r.status();
        let retry = r
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(10);
        let run: Value = r.json().await.unwrap_or_default();
        if status.is_success() {
            break run;
        }
        let message = run["error"]["message"].as_str().unwrap_or("").to_owned();
        // A first start's preparation, or a host at its most CLIs: both pass.
        let passes = ["environment_preparing", "runs_at_capacity"]
            .iter()
            .any(|c| run["error"]["code"] == *c);
        if passes && std::time::Instant::now() < patience {
            tracing::info!(%message, "waiting for the run environment");
            tokio::time::sleep(Duration::from_secs(retry.clamp(1, 30))).await;
            continue;
        }
        bail!("polydev refused the run ({status}): {message}");
    };
    let id = run["runId"].as_str().context("no runId")?.to_owned();
    let outcome = drive(
        &http, server, token, &run, &id, &providers, archive, &diff_key,
    )
    .await;
    if outcome.is_err() {
        // Its sandboxes go now, not when their waits run out.
        let _ = http
            .delete(format!("{server}/api/runs/{id}"))
            .bearer_auth(token)
            .send()
            .await;
    }
    outcome
}

/// The run once started: its code, its credentials, its stream, and each
/// provider's diff as it comes.
#[allow(clippy::too_many_arguments)]
async fn drive(
    http: &reqwest::Client,
    server: &str,
    token: &str,
    run: &Value,
    id: &str,
    providers: &[Provider],
    archive: Option<Vec<u8>>,
    diff_key: &polydev_vault::SealingKeyPair,
) -> anyhow::Result<Value> {
    let id = id.to_owned();
    // The code first, sealed here to each sandbox (a CLI starts on it).
    if let Some(archive) = archive {
        let archive = std::sync::Arc::new(archive);
        let uploads = providers.iter().map(|p| {
            let (http, run, id, archive) = (&http, &run, &id, archive.clone());
            async move {
                let key = sandbox_key(run, *p)?;
                // Sealed off the async threads (the MCP server stays responsive).
                let (archive, run_id, name) = (archive.clone(), id.clone(), p.as_str());
                let body = tokio::task::spawn_blocking(move || {
                    polydev_sessions::workspace::sealed_upload(&key, &run_id, name, &archive)
                })
                .await?;
                let r = http
                    .put(format!("{server}/api/runs/{id}/workspace/{}", p.as_str()))
                    .bearer_auth(token)
                    .header("content-type", "application/octet-stream")
                    .timeout(Duration::from_secs(600))
                    .body(body)
                    .send()
                    .await?;
                if !r.status().is_success() {
                    let v: Value = r.json().await.unwrap_or_default();
                    bail!(
                        "the controller refused {}'s code: {}",
                        p.as_str(),
                        v["error"]["message"]
                    );
                }
                anyhow::Ok(())
            }
        });
        for r in futures_util::future::join_all(uploads).await {
            r?;
        }
    }
    // Seals each provider's key to its sandbox and hands them over.
    let send = |which: Vec<Provider>| {
        let (http, run, id) = (&http, &run, &id);
        async move {
            let mut creds = serde_json::Map::new();
            for p in &which {
                let key = key_for(*p).with_context(|| {
                    format!(
                        "no API key for {} here ({})",
                        p.as_str(),
                        key_env(*p).join(" or ")
                    )
                })?;
                let sealed = sandbox_key(run, *p)?.seal(
                    polydev_sessions::runs::CREDENTIAL_PURPOSE,
                    format!("{id}/{}", p.as_str()).as_bytes(),
                    key.as_bytes(),
                );
                creds.insert(p.as_str().to_owned(), json!(B64.encode(sealed)));
            }
            let r = http
                .post(format!("{server}/api/runs/{id}/credentials"))
                .bearer_auth(token)
                .json(&json!({"credentials": creds}))
                .send()
                .await?;
            if !r.status().is_success() {
                let v: Value = r.json().await.unwrap_or_default();
                bail!(
                    "the controller refused the credentials: {}",
                    v["error"]["message"]
                );
            }
            anyhow::Ok(())
        }
    };
    // A provider another run of this user holds is `queued`: its key goes
    // when the stream says it is its turn (`awaiting_credentials`).
    let (queued, now): (Vec<Provider>, Vec<Provider>) = providers
        .iter()
        .partition(|p| run["sandboxes"][p.as_str()]["state"] == "queued");
    let mut sent: std::collections::BTreeSet<Provider> = now.iter().copied().collect();
    if !now.is_empty() {
        send(now).await?;
    }
    if !queued.is_empty() {
        tracing::info!(run = %id, queued = ?queued, "waiting for another run on the same credential");
    }
    let mut stream = reqwest::Client::builder()
        .timeout(Duration::from_secs(1800))
        .build()?
        .get(format!("{server}/api/runs/{id}/events"))
        .bearer_auth(token)
        .send()
        .await?;
    // The stream, read as it comes (a queued provider's turn is on it).
    let mut events = String::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut refused: BTreeMap<String, String> = BTreeMap::new();
    let mut diffs: BTreeMap<String, Result<String, String>> = BTreeMap::new();
    loop {
        let chunk = stream.chunk().await?;
        let done = chunk.is_none();
        if let Some(c) = chunk {
            buf.extend_from_slice(&c);
            // Either line ending; blocks end with an empty line.
            if buf.windows(2).any(|w| w == b"\r\n") {
                buf = String::from_utf8_lossy(&buf)
                    .replace("\r\n", "\n")
                    .into_bytes();
            }
        } else if !buf.is_empty() {
            buf.extend_from_slice(b"\n\n"); // what is left is the last block
        }
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = buf.drain(..end + 2).collect();
            let block = String::from_utf8_lossy(&block).into_owned();
            // A provider's changes: fetched at once (the controller keeps
            // the copy sealed to this call only while the run is in memory).
            if block.lines().any(|l| l == "event: diff") {
                let d = block
                    .lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .and_then(|d| serde_json::from_str::<Value>(d).ok())
                    .unwrap_or_default();
                if let (Some(p), true) =
                    (d["provider"].as_str(), d["bytes"].as_u64().unwrap_or(0) > 0)
                {
                    let got = fetch_diff(http, server, token, &id, p, diff_key).await;
                    diffs.insert(p.to_owned(), got);
                }
            }
            let turn = block.lines().any(|l| l == "event: awaiting_credentials");
            if turn {
                let provider = block
                    .lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .and_then(|d| serde_json::from_str::<Value>(d).ok())
                    .and_then(|d| {
                        d["provider"]
                            .as_str()
                            .and_then(|p| p.parse::<Provider>().ok())
                    });
                if let Some(p) = provider.filter(|p| queued.contains(p)) {
                    if sent.insert(p) {
                        // One provider's refusal is its own answer, not the call's.
                        if let Err(e) = send(vec![p]).await {
                            refused.insert(p.as_str().to_owned(), format!("{e:#}"));
                        }
                    }
                }
            }
            events.push_str(&block);
        }
        if done {
            break;
        }
    }
    let mut answers: BTreeMap<String, Value> = BTreeMap::new();
    let mut event = String::new();
    for line in events.lines() {
        if let Some(e) = line.strip_prefix("event: ") {
            event = e.to_owned();
        } else if let Some(d) = line.strip_prefix("data: ") {
            let d: Value = serde_json::from_str(d).unwrap_or_default();
            let Some(p) = d["provider"].as_str().map(str::to_owned) else {
                continue; // the run's own events (`end`)
            };
            let a = answers
                .entry(p)
                .or_insert_with(|| json!({"answer": "", "status": "running"}));
            match event.as_str() {
                "delta" => {
                    let text = format!(
                        "{}{}",
                        a["answer"].as_str().unwrap_or(""),
                        d["text"].as_str().unwrap_or("")
                    );
                    a["answer"] = json!(text);
                }
                "done" => {
                    a["status"] = json!("done");
                    a["usage"] = d["usage"].clone();
                }
                "error" => {
                    a["status"] = json!("error");
                    a["error"] = json!({"stage": d["stage"], "message": d["message"]});
                }
                "diff" => {
                    a["changes"] = json!({"bytes": d["bytes"], "error": d["error"]});
                }
                _ => {}
            }
        }
    }
    for (p, message) in refused {
        answers.insert(
            p,
            json!({"answer": "", "status": "error", "error": {"stage": "credentials", "message": message}}),
        );
    }
    for (p, got) in diffs {
        let a = answers
            .entry(p)
            .or_insert_with(|| json!({"answer": "", "status": "running"}));
        match got {
            Ok(diff) => a["diff"] = json!(diff),
            Err(e) => a["changes"]["error"] = json!(e),
        }
    }
    Ok(json!({"runId": id, "perspectives": answers}))
}

/// The key the run's view gives for `provider`'s sandbox.
fn sandbox_key(run: &Value, provider: Provider) -> anyhow::Result<polydev_vault::SealingPublicKey> {
    let pk = run["sandboxes"][provider.as_str()]["publicKey"]
        .as_str()
        .and_then(|k| B64.decode(k).ok())
        .context("the controller sent no sandbox key")?;
    polydev_vault::SealingPublicKey::from_bytes(&pk)
        .map_err(|e| anyhow::anyhow!("bad sandbox key: {e}"))
}

/// One provider's diff, sealed to this call's key, fetched and opened.
async fn fetch_diff(
    http: &reqwest::Client,
    server: &str,
    token: &str,
    id: &str,
    provider: &str,
    key: &polydev_vault::SealingKeyPair,
) -> Result<String, String> {
    let r = http
        .get(format!(
            "{server}/api/runs/{id}/diff/{provider}?to=recipient"
        ))
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| format!("the diff could not be fetched: {e}"))?;
    let v: Value = r.json().await.unwrap_or_default();
    let sealed = v["sealed"]
        .as_str()
        .and_then(|s| B64.decode(s).ok())
        .ok_or_else(|| format!("the diff could not be fetched: {}", v["error"]["message"]))?;
    let diff = key
        .open(
            polydev_sessions::workspace::DIFF_PURPOSE,
            format!("{id}/{provider}").as_bytes(),
            &sealed,
        )
        .map_err(|e| format!("the diff did not open: {e}"))?;
    Ok(String::from_utf8_lossy(&diff).into_owned())
}

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
struct GetPerspectives {
    #[schemars(description = "The prompt every provider answers")]
    prompt: String,
    #[schemars(
        description = "Any of claude_code, codex, gemini_cli (default: every provider with a key)"
    )]
    providers: Option<Vec<String>>,
    #[schemars(
        description = "A local directory (e.g. the repository you are working in) the CLIs work on: archived and sealed on this machine, each CLI gets its own copy"
    )]
    path: Option<String>,
    #[schemars(
        description = "With a path: ask (default: the CLIs read the code, in their read-only modes) or edit (they may change it; each one's changes come back as a unified diff)"
    )]
    mode: Option<String>,
}

#[derive(Debug, Clone)]
struct PerspectivesServer {
    server: String,
    token: String,
    #[allow(dead_code)]
    tool_router: ToolRouter<Self>,
}

#[tool_router]
impl PerspectivesServer {
    #[tool(
        description = "Ask Claude Code, Codex and Gemini CLI the same prompt, each in its own polydev sandbox, and get every answer back; with a path, on that local directory (in edit mode each CLI's changes come back as a diff)"
    )]
    async fn get_perspectives(
        &self,
        Parameters(req): Parameters<GetPerspectives>,
    ) -> Result<CallToolResult, ErrorData> {
        let providers = req
            .providers
            .map(|ps| {
                ps.iter()
                    .map(|p| p.parse::<Provider>())
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()
            .map_err(|e| ErrorData::invalid_params(e.to_string(), None))?;
        let mode = match req.mode.as_deref() {
            None | Some("ask") => polydev_sessions::workspace::Mode::Ask,
            Some("edit") => polydev_sessions::workspace::Mode::Edit,
            Some(m) => {
                return Err(ErrorData::invalid_params(
                    format!("mode: {m:?} is neither ask nor edit"),
                    None,
                ))
            }
        };
        let code = match req.path {
            Some(p) => {
                let path = std::path::PathBuf::from(&p);
                if !path.is_dir() {
                    return Err(ErrorData::invalid_params(
                        format!("path: {p} is not a directory here"),
                        None,
                    ));
                }
                Some(LocalCode { path, mode })
            }
            None => None,
        };
        // A failed run is the tool's answer (isError), for the calling
        // agent to read; protocol errors are only for bad parameters.
        let out = match perspectives(&self.server, &self.token, &req.prompt, providers, code).await
        {
            Ok(out) => out,
            Err(e) => {
                return Ok(CallToolResult::error(vec![ContentBlock::text(format!(
                    "{e:#}"
                ))]))
            }
        };
        let text = serde_json::to_string_pretty(&out).unwrap_or_default();
        let answers = out["perspectives"].as_object();
        let none_answered = answers.is_none_or(|a| a.values().all(|p| p["status"] != "done"));
        Ok(if none_answered {
            CallToolResult::error(vec![ContentBlock::text(text)])
        } else {
            CallToolResult::success(vec![ContentBlock::text(text)])
        })
    }
}

#[tool_handler]
impl ServerHandler for PerspectivesServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build()).with_server_info(
            Implementation::new("polydev", env!("CARGO_PKG_VERSION"))
                .with_title("polydev: perspectives from several coding CLIs"),
        )
    }
}

/// Serves MCP on stdin/stdout until the client goes away.
pub async fn serve_stdio(server: String, token: String) -> anyhow::Result<()> {
    let service = PerspectivesServer {
        server,
        token,
        tool_router: PerspectivesServer::tool_router(),
    }
    .serve(rmcp::transport::stdio())
    .await
    .context("MCP handshake failed")?;
    service.waiting().await.context("MCP session failed")?;
    Ok(())
}

/// Serves MCP over HTTP (streamable HTTP at `/mcp`) on a loopback address:
/// the same tool, for clients that speak HTTP. It stays on this machine
/// because the provider keys it seals are this user's.
pub async fn serve_http(
    server: String,
    token: String,
    listen: std::net::SocketAddr,
) -> anyhow::Result<()> {
    use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
    use rmcp::transport::streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService,
    };
    if !listen.ip().is_loopback() {
        bail!("--listen must be a loopback address: this server seals your own provider keys");
    }
    let service: StreamableHttpService<PerspectivesServer, LocalSessionManager> =
        StreamableHttpService::new(
            move || {
                Ok(PerspectivesServer {
                    server: server.clone(),
                    token: token.clone(),
                    tool_router: PerspectivesServer::tool_router(),
                })
            },
            Default::default(),
            StreamableHttpServerConfig::default(),
        );
    let router = axum::Router::new().nest_service("/mcp", service);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    eprintln!("MCP over HTTP at http://{addr}/mcp");
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("the MCP HTTP server failed")
}
