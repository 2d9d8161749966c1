//! Stub provider servers on loopback: each answers the real CLI's requests
//! with a canned reply, over the provider's own streaming wire format
//! (see the CLI notes this project keeps). Every request is recorded so
//! tests can check what arrived (paths, API-key headers).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use axum::Router;
use serde_json::{json, Value};

pub mod oauth;

/// One request as the stub saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

#[derive(Debug, Clone)]
struct Stub {
    answer: String,
    /// Answer every model call with this HTTP status instead (a failing provider).
    fail: Option<u16>,
    /// Wait this long before answering a model call (a slow provider).
    delay: std::time::Duration,
    /// Answer as a subscription does: Anthropic's unified rate-limit
    /// headers on every model call (`Some(true)`: the 5-hour window is
    /// used up, every call refused with 429).
    subscription: Option<bool>,
    /// Drive the CLI's tool loop: the first model call that offers the
    /// CLI's file-writing tool is answered with a call writing this file
    /// (absolute path, content); the call that brings its result back
    /// gets the answer.
    edit: Option<(String, String)>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

/// A running stub; dropping it stops the server.
#[derive(Debug)]
pub struct StubServer {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StubServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl StubServer {
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    Anthropic,
    OpenAi,
    Gemini,
    /// GitHub Copilot's API as Copilot CLI uses it: the user and model
    /// catalog it asks for, then OpenAI's Responses API.
    Copilot,
}

/// Starts a stub for `provider` on 127.0.0.1, answering `answer`, or
/// failing every model call with `fail` (e.g. 500).
pub async fn start(
    provider: Provider,
    answer: &str,
    fail: Option<u16>,
) -> std::io::Result<StubServer> {
    start_slow(provider, answer, fail, std::time::Duration::ZERO).await
}

/// `start`, answering each model call only after `delay`.
pub async fn start_slow(
    provider: Provider,
    answer: &str,
    fail: Option<u16>,
    delay: std::time::Duration,
) -> std::io::Result<StubServer> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let stub = Stub {
        answer: answer.to_owned(),
        fail,
        delay,
        subscription: None,
        edit: None,
        seen: seen.clone(),
    };
    serve(provider, stub, seen).await
}

/// A stub whose model asks the CLI, through the CLI's own file-writing
/// tool, to write `content` to `path` (absolute, in the sandbox), then
/// answers `answer` once the tool's result is back: the real CLI really
/// edits its workspace.
pub async fn start_editing(
    provider: Provider,
    answer: &str,
    path: &str,
    content: &str,
) -> std::io::Result<StubServer> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let stub = Stub {
        answer: answer.to_owned(),
        fail: None,
        delay: std::time::Duration::ZERO,
        subscription: None,
        edit: Some((path.to_owned(), content.to_owned())),
        seen: seen.clone(),
    };
    serve(provider, stub, seen).await
}

/// An Anthropic stand-in answering as for a Claude subscription: the
/// unified rate-limit headers (5-hour window 82 % used, 7-day 40 %) on
/// each answer, or with `exhausted` every call refused with 429 and the
/// 5-hour window `rejected`.
pub async fn start_subscription(answer: &str, exhausted: bool) -> std::io::Result<StubServer> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let stub = Stub {
        answer: answer.to_owned(),
        fail: None,
        delay: std::time::Duration::ZERO,
        subscription: Some(exhausted),
        edit: None,
        seen: seen.clone(),
    };
    serve(Provider::Anthropic, stub, seen).await
}

/// Anthropic's unified rate-limit headers, as a subscription's answers
/// carry them: the 5-hour window resets in an hour (on the minute), the
/// 7-day in three days (Claude Code drops a window whose reset is further
/// off than the window is long).
fn unified_headers(status: &str) -> Vec<(&'static str, String)> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let five_hour = (now + 3600) / 60 * 60;
    let reset = five_hour.to_string();
    vec![
        ("anthropic-ratelimit-unified-status", status.to_owned()),
        ("anthropic-ratelimit-unified-reset", reset.clone()),
        (
            "anthropic-ratelimit-unified-representative-claim",
            "five_hour".into(),
        ),
        ("anthropic-ratelimit-unified-5h-utilization", "0.82".into()),
        ("anthropic-ratelimit-unified-5h-reset", reset.clone()),
        ("anthropic-ratelimit-unified-5h-status", status.to_owned()),
        ("anthropic-ratelimit-unified-7d-utilization", "0.4".into()),
        (
            "anthropic-ratelimit-unified-7d-reset",
            (now + 3 * 86_400).to_string(),
        ),
        ("anthropic-ratelimit-unified-7d-status", "allowed".into()),
        ("anthropic-ratelimit-unified-fallback", "available".into()),
        ("request-id", "req_stub".into()),
    ]
}

async fn serve(
    provider: Provider,
    stub: Stub,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> std::io::Result<StubServer> {
    let app = match provider {
        Provider::Anthropic => Router::new()
            .route("/v1/messages", post(anthropic_messages))
            .route("/v1/messages/count_tokens", post(anthropic_count))
            .route("/model/{model}/{call}", post(bedrock_invoke))
            .route("/inference-profiles", axum::routing::get(bedrock_profiles)),
        Provider::OpenAi => Router::new().route("/v1/responses", any(openai_responses)),
        // The Gemini API, and Vertex AI's express-mode path (same bodies).
        Provider::Gemini => Router::new()
            .route("/v1beta/models/{call}", post(gemini))
            .route("/v1beta1/publishers/google/models/{call}", post(gemini)),
        Provider::Copilot => Router::new()
            .route("/copilot_internal/user", axum::routing::get(copilot_user))
            .route("/models", axum::routing::get(copilot_models))
            .route("/responses", any(openai_responses)),
    }
    .fallback(fallback)
    .layer(axum::middleware::from_fn_with_state(stub.clone(), record))
    .with_state(stub);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(StubServer { addr, seen, task })
}

async fn record(
    State(stub): State<Stub>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, 16 << 20)
        .await
        .unwrap_or_default();
    if let Ok(mut s) = stub.seen.lock() {
        s.push(Seen {
            method: parts.method.to_string(),
            path: parts.uri.to_string(),
            headers: parts
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
                .collect(),
            body: String::from_utf8_lossy(&bytes).into_owned(),
        });
    }
    if !stub.delay.is_zero() && parts.method == Method::POST {
        tokio::time::sleep(stub.delay).await;
    }
    next.run(axum::extract::Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// Pre-connect probes (`HEAD /`, `HEAD /api/hello`) and anything else.
async fn fallback(method: Method, _uri: Uri) -> Response {
    if method == Method::HEAD || method == Method::GET {
        StatusCode::OK.into_response()
    } else {
        StatusCode::NOT_FOUND.into_response()
    }
}

fn sse(events: Vec<(Option<&str>, Value)>) -> Response {
    let mut out = String::new();
    for (name, data) in events {
        if let Some(n) = name {
            out.push_str(&format!("event: {n}\n"));
        }
        out.push_str(&format!("data: {data}\n\n"));
    }
    (
        [
            ("content-type", "text/event-stream"),
            ("cache-control", "no-cache"),
        ],
        Bytes::from(out),
    )
        .into_response()
}

fn failure(status: u16, message: &str) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    // A 429 says what the vendors say (a CLI that shows only the body's
    // words, like OpenCode, must be able to tell).
    let (kind, message) = if status == 429 {
        (
            "rate_limit_error",
            "This request would exceed your organization's rate limit; try again later",
        )
    } else {
        ("api_error", message)
    };
    (
        code,
        axum::Json(json!({"type": "error", "error": {"type": kind, "message": message}})),
    )
        .into_response()
}

async fn anthropic_messages(State(stub): State<Stub>, body: Bytes) -> Response {
    let mut resp = anthropic_answer(&stub, body);
    if let Some(exhausted) = stub.subscription {
        let status = if exhausted {
            "rejected"
        } else {
            "allowed_warning"
        };
        for (k, v) in unified_headers(status) {
            if let Ok(v) = axum::http::HeaderValue::from_str(&v) {
                resp.headers_mut().insert(k, v);
            }
        }
    }
    resp
}

fn anthropic_answer(stub: &Stub, body: Bytes) -> Response {
    if stub.subscription == Some(true) {
        return failure(429, "");
    }
    if let Some(s) = stub.fail {
        return failure(s, "stub provider failure");
    }
    let req: Value = serde_json::from_slice(&body).unwrap_or_default();
    let model = req["model"].as_str().unwrap_or("claude-stub").to_owned();
    let usage = json!({"input_tokens": 10, "output_tokens": 5});
    if req["stream"] != true {
        return axum::Json(json!({
            "id": "msg_stub", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": stub.answer}],
            "stop_reason": "end_turn", "stop_sequence": null, "usage": usage,
        }))
        .into_response();
    }
    // Each event named by its type, as Anthropic's stream does.
    let offers_write = req["tools"]
        .as_array()
        .is_some_and(|t| t.iter().any(|t| t["name"] == "Write"));
    let has_result = req["messages"].as_array().is_some_and(|m| {
        m.iter().any(|m| {
            m["content"]
                .as_array()
                .is_some_and(|c| c.iter().any(|b| b["type"] == "tool_result"))
        })
    });
    let events = match &stub.edit {
        Some((path, content)) if offers_write && !has_result => {
            anthropic_write_events(path, content, &model)
        }
        _ => anthropic_events(&stub.answer, &model),
    };
    let names: Vec<String> = events
        .iter()
        .map(|e| e["type"].as_str().unwrap_or_default().to_owned())
        .collect();
    sse(names.iter().map(|n| Some(n.as_str())).zip(events).collect())
}

/// An Anthropic Messages stream's events for `answer`.
fn anthropic_events(answer: &str, model: &str) -> Vec<Value> {
    vec![
        json!({"type": "message_start", "message": {"id": "msg_stub", "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 10, "output_tokens": 1}}}),
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": answer}}),
        json!({"type": "content_block_stop", "index": 0}),
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 5}}),
        json!({"type": "message_stop"}),
    ]
}

/// A Messages stream whose one block calls Claude Code's `Write` tool.
fn anthropic_write_events(path: &str, content: &str, model: &str) -> Vec<Value> {
    let input = json!({"file_path": path, "content": content}).to_string();
    vec![
        json!({"type": "message_start", "message": {"id": "msg_stub_tool", "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 10, "output_tokens": 1}}}),
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "toolu_stub_write", "name": "Write", "input": {}}}),
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": input}}),
        json!({"type": "content_block_stop", "index": 0}),
        json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null}, "usage": {"output_tokens": 5}}),
        json!({"type": "message_stop"}),
    ]
}

/// Claude on Amazon Bedrock: `POST /model/{id}/invoke` answers the
/// Messages JSON, `…/invoke-with-response-stream` the same events in
/// AWS's event-stream framing (each a `chunk` whose payload is
/// `{"bytes": base64(event)}`), `GET /inference-profiles` an empty list.
async fn bedrock_invoke(
    State(stub): State<Stub>,
    Path((model, call)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    if let Some(s) = stub.fail {
        return failure(s, "stub provider failure");
    }
    let _: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(_) => return failure(400, "the body is not JSON"),
    };
    match call.as_str() {
        "invoke" => axum::Json(json!({
            "id": "msg_stub", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": stub.answer}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": 10, "output_tokens": 5},
        }))
        .into_response(),
        "invoke-with-response-stream" => {
            use base64::Engine;
            let mut out = Vec::new();
            for event in anthropic_events(&stub.answer, &model) {
                let payload = json!({
                    "bytes": base64::engine::general_purpose::STANDARD.encode(event.to_string()),
                });
                out.extend(event_stream_message(
                    &[
                        (":event-type", "chunk"),
                        (":content-type", "application/json"),
                        (":message-type", "event"),
                    ],
                    payload.to_string().as_bytes(),
                ));
            }
            Response::builder()
                .header("content-type", "application/vnd.amazon.eventstream")
                .body(Body::from(out))
                .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
        }
        _ => failure(404, "no such model operation"),
    }
}

async fn bedrock_profiles() -> Response {
    axum::Json(json!({"inferenceProfileSummaries": []})).into_response()
}

/// One message in AWS's event-stream encoding: total and headers length,
/// the prelude's CRC-32, string headers, the payload, the message's CRC-32.
fn event_stream_message(headers: &[(&str, &str)], payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::new();
    for (name, value) in headers {
        h.push(name.len() as u8);
        h.extend_from_slice(name.as_bytes());
        h.push(7); // a string
        h.extend_from_slice(&(value.len() as u16).to_be_bytes());
        h.extend_from_slice(value.as_bytes());
    }
    let total = 12 + h.len() + payload.len() + 4;
    let mut m = Vec::with_capacity(total);
    m.extend_from_slice(&(total as u32).to_be_bytes());
    m.extend_from_slice(&(h.len() as u32).to_be_bytes());
    let prelude = crc32(&m);
    m.extend_from_slice(&prelude.to_be_bytes());
    m.extend_from_slice(&h);
    m.extend_from_slice(payload);
    let all = crc32(&m);
    m.extend_from_slice(&all.to_be_bytes());
    m
}

/// CRC-32 (IEEE 802.3, the one AWS's event stream uses).
fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        // Bit by bit: a stub's few messages need no table.
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

async fn anthropic_count(State(_stub): State<Stub>) -> Response {
    axum::Json(json!({"input_tokens": 10})).into_response()
}

async fn openai_responses(
    State(stub): State<Stub>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // Codex tries a WebSocket first when pointed at a base URL: say no.
    if method == Method::GET || headers.contains_key("upgrade") {
        return StatusCode::UPGRADE_REQUIRED.into_response();
    }
    if let Some(s) = stub.fail {
        return failure(s, "stub provider failure");
    }
    let req: Value = serde_json::from_slice(&body).unwrap_or_default();
    let model = req["model"].as_str().unwrap_or("gpt-stub").to_owned();
    let response = |status: &str, output: Value| {
        json!({"id": "resp_stub", "object": "response", "created_at": 0, "status": status, "model": model, "output": output,
        "usage": {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 15}})
    };
    if let Some((path, content)) = stub.edit.as_ref().filter(|_| codex_wants_a_tool_call(&req)) {
        // Codex's one model-facing tool runs JavaScript that calls its
        // nested tools; `apply_patch` adds the file (refused in its
        // read-only sandbox mode).
        let mut patch = format!("*** Begin Patch\n*** Add File: {path}\n");
        for line in content.lines() {
            patch.push('+');
            patch.push_str(line);
            patch.push('\n');
        }
        patch.push_str("*** End Patch\n");
        let input = format!(
            "const r = await tools.apply_patch({}); text(JSON.stringify(r));",
            json!(patch)
        );
        let item = json!({"type": "custom_tool_call", "id": "ctc_stub", "call_id": "call_stub", "name": "exec", "input": input, "status": "completed"});
        let events = vec![
            json!({"type": "response.created", "response": response("in_progress", json!([]))}),
            json!({"type": "response.output_item.added", "output_index": 0, "item": item}),
            json!({"type": "response.output_item.done", "output_index": 0, "item": item}),
            json!({"type": "response.completed", "response": response("completed", json!([item]))}),
        ];
        let names: Vec<String> = events
            .iter()
            .map(|e| e["type"].as_str().unwrap_or_default().to_owned())
            .collect();
        return sse(names.iter().map(|n| Some(n.as_str())).zip(events).collect());
    }
    let item = json!({"type": "message", "id": "msg_stub", "status": "completed", "role": "assistant",
        "content": [{"type": "output_text", "text": stub.answer, "annotations": []}]});
    // The whole sequence OpenAI's Responses API streams for one message
    // (Codex reads the finished item; the AI SDK in OpenCode, the parts
    // and deltas).
    let open_item = json!({"type": "message", "id": "msg_stub", "status": "in_progress", "role": "assistant", "content": []});
    let part = |text: &str| json!({"type": "output_text", "text": text, "annotations": []});
    let at = json!({"item_id": "msg_stub", "output_index": 0, "content_index": 0});
    let with = |kind: &str, extra: Value| {
        let mut v = at.clone();
        v["type"] = json!(kind);
        for (k, x) in extra.as_object().into_iter().flatten() {
            v[k] = x.clone();
        }
        (Some(kind.to_owned()), v)
    };
    let events: Vec<(Option<String>, Value)> = vec![
        (
            Some("response.created".into()),
            json!({"type": "response.created", "response": response("in_progress", json!([]))}),
        ),
        (
            Some("response.output_item.added".into()),
            json!({"type": "response.output_item.added", "output_index": 0, "item": open_item}),
        ),
        with("response.content_part.added", json!({"part": part("")})),
        with("response.output_text.delta", json!({"delta": stub.answer})),
        with("response.output_text.done", json!({"text": stub.answer})),
        with(
            "response.content_part.done",
            json!({"part": part(&stub.answer)}),
        ),
        (
            Some("response.output_item.done".into()),
            json!({"type": "response.output_item.done", "output_index": 0, "item": item}),
        ),
        (
            Some("response.completed".into()),
            json!({"type": "response.completed", "response": response("completed", json!([item]))}),
        ),
    ];
    sse(events
        .iter()
        .map(|(n, v)| (n.as_deref(), v.clone()))
        .collect())
}

/// Whether a Responses request offers Codex's `exec` tool (in its
/// `additional_tools` input item, or as a plain tool) and carries no
/// tool result yet.
fn codex_wants_a_tool_call(req: &Value) -> bool {
    fn names_exec(tools: &Value) -> bool {
        tools.as_array().is_some_and(|t| {
            t.iter()
                .any(|t| t["name"] == "exec" || names_exec(&t["tools"]))
        })
    }
    let input = req["input"].as_array();
    let offered = names_exec(&req["tools"])
        || input.is_some_and(|i| i.iter().any(|i| names_exec(&i["tools"])));
    let answered = input.is_some_and(|i| {
        i.iter().any(|i| {
            matches!(
                i["type"].as_str(),
                Some("custom_tool_call_output" | "function_call_output")
            )
        })
    });
    offered && !answered
}

/// The model polydev runs Copilot CLI on (the registry's).
const COPILOT_MODEL: &str = "gpt-5-mini";

async fn copilot_user() -> Response {
    axum::Json(json!({"login": "stub-user", "copilot_plan": "individual", "chat_enabled": true}))
        .into_response()
}

/// The catalog shape Copilot CLI 1.0.102 accepts (measured 2026-12-01):
/// a chat model, enabled, served at `/responses`.
async fn copilot_models() -> Response {
    axum::Json(json!({"object": "list", "data": [{
        "id": COPILOT_MODEL, "name": "GPT-5 mini", "object": "model", "vendor": "Azure OpenAI",
        "version": COPILOT_MODEL, "model_picker_enabled": true, "preview": false, "is_chat_default": true,
        "capabilities": {"family": COPILOT_MODEL, "type": "chat", "object": "model_capabilities", "tokenizer": "o200k_base",
            "limits": {"max_context_window_tokens": 128000, "max_output_tokens": 16384, "max_prompt_tokens": 128000},
            "supports": {"streaming": true, "tool_calls": true, "parallel_tool_calls": true}},
        "supported_endpoints": ["/responses"],
        "policy": {"state": "enabled", "terms": "stub"},
        "billing": {"is_premium": false, "multiplier": 0}
    }]}))
    .into_response()
}

async fn gemini(State(stub): State<Stub>, Path(call): Path<String>, body: Bytes) -> Response {
    if let Some(s) = stub.fail {
        return failure(s, "stub provider failure");
    }
    let req: Value = serde_json::from_slice(&body).unwrap_or_default();
    let usage = json!({"promptTokenCount": 10, "candidatesTokenCount": 5, "totalTokenCount": 15});
    let candidate = |text: &str| json!({"candidates": [{"content": {"parts": [{"text": text}], "role": "model"}, "finishReason": "STOP", "index": 0}], "usageMetadata": usage});
    if call.ends_with(":streamGenerateContent") {
        let offers_write = req["tools"].as_array().is_some_and(|t| {
            t.iter().any(|t| {
                t["functionDeclarations"]
                    .as_array()
                    .is_some_and(|d| d.iter().any(|d| d["name"] == "write_file"))
            })
        });
        let has_result = req["contents"].as_array().is_some_and(|c| {
            c.iter().any(|c| {
                c["parts"].as_array().is_some_and(|p| {
                    p.iter()
                        .any(|p| p.get("functionResponse").is_some_and(|r| !r.is_null()))
                })
            })
        });
        if let Some((path, content)) = stub.edit.as_ref().filter(|_| offers_write && !has_result) {
            let call = json!({"candidates": [{"content": {"parts": [{"functionCall": {"name": "write_file", "args": {"file_path": path, "content": content}}}], "role": "model"}, "finishReason": "STOP", "index": 0}], "usageMetadata": usage});
            return sse(vec![(None, call)]);
        }
        return sse(vec![(None, candidate(&stub.answer))]);
    }
    // generateContent: the CLI's "complexity router" asks for JSON that fits
    // its schema; anything else gets the answer.
    let wants_json = req["generationConfig"]["responseMimeType"] == "application/json";
    let text = if wants_json {
        json!({"complexity_reasoning": "a short prompt", "complexity_score": 1}).to_string()
    } else {
        stub.answer.clone()
    };
    axum::Json(candidate(&text)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The event-stream framing's checksums, against known values: the
    /// CRC-32 check value, and a message whose prelude CRC matches.
    #[test]
    fn event_stream_framing_is_aws_s() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        let m = event_stream_message(&[(":event-type", "chunk")], b"{}");
        let total = u32::from_be_bytes(m[0..4].try_into().unwrap()) as usize;
        let headers = u32::from_be_bytes(m[4..8].try_into().unwrap()) as usize;
        assert_eq!((total, headers), (m.len(), 1 + 11 + 1 + 2 + 5));
        assert_eq!(
            u32::from_be_bytes(m[8..12].try_into().unwrap()),
            crc32(&m[..8])
        );
        let end = m.len() - 4;
        assert_eq!(
            u32::from_be_bytes(m[end..].try_into().unwrap()),
            crc32(&m[..end])
        );
        assert_eq!(&m[end - 2..end], b"{}");
    }
}
