//! A stub OAuth provider on loopback, shaped like the CLIs' real ones: an
//! authorize page whose one "Sign in" button (filling the window, so a
//! click anywhere on a streamed screen hits it) redirects to the caller's
//! `redirect_uri` with a code; a page that shows the code instead (for
//! paste-a-code flows); and a token endpoint that trades a code it issued
//! for tokens, and a refresh token it issued for new ones, each once (a
//! refresh token is single use, as OpenAI's and Anthropic's are: a
//! second use is refused). Every answer carries an `id_token` shaped like
//! OpenAI's (a JWT with the ChatGPT account claims Codex reads; unsigned).
//! Every request is recorded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::json;

use crate::{record, Seen, Stub, StubServer};

#[derive(Debug, Clone, Default)]
struct Codes {
    issued: Arc<Mutex<HashMap<String, bool>>>,
    /// Refresh tokens handed out, and whether each was used.
    refresh: Arc<Mutex<HashMap<String, bool>>>,
    /// Prefix of every token handed out (a canary tests look for).
    prefix: Arc<str>,
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

async fn authorize(Query(q): Query<HashMap<String, String>>) -> Response {
    let (Some(redirect), Some(state)) = (q.get("redirect_uri"), q.get("state")) else {
        return (
            StatusCode::BAD_REQUEST,
            "redirect_uri and state are required",
        )
            .into_response();
    };
    Html(format!(
        r#"<!doctype html><html><head><title>Stub sign-in</title></head>
<body style="margin:0">
<form action="/approve" method="get" style="margin:0">
<input type="hidden" name="redirect_uri" value="{}">
<input type="hidden" name="state" value="{}">
<button id="sign-in" type="submit" style="width:100vw;height:100vh;font-size:48px;background:#2563eb;color:#fff;border:0">Sign in</button>
</form></body></html>"#,
        escape(redirect),
        escape(state)
    ))
    .into_response()
}

async fn approve(State(codes): State<Codes>, Query(q): Query<HashMap<String, String>>) -> Response {
    let (Some(redirect), Some(state)) = (q.get("redirect_uri"), q.get("state")) else {
        return (
            StatusCode::BAD_REQUEST,
            "redirect_uri and state are required",
        )
            .into_response();
    };
    let code = format!("code-{:016x}", rand_u64());
    if let Ok(mut c) = codes.issued.lock() {
        c.insert(code.clone(), false);
    }
    let sep = if redirect.contains('?') { '&' } else { '?' };
    Redirect::to(&format!("{redirect}{sep}code={code}&state={state}")).into_response()
}

async fn show_code(Query(q): Query<HashMap<String, String>>) -> Response {
    let code = q.get("code").cloned().unwrap_or_default();
    Html(format!(
        "<!doctype html><p>Paste this code into your CLI:</p><pre id=\"code\">{}</pre>",
        escape(&code)
    ))
    .into_response()
}

/// A form or JSON body's field.
fn field(body: &str, name: &str) -> Option<String> {
    body.split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
        .or_else(|| {
            serde_json::from_str::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v[name].as_str().map(str::to_owned))
        })
}

/// Marks `key` used in `map`: true only the first time, for a key issued.
fn use_once(map: &Mutex<HashMap<String, bool>>, key: &str) -> bool {
    map.lock()
        .ok()
        .and_then(|mut c| c.get_mut(key).map(|used| !std::mem::replace(used, true)))
        .unwrap_or(false)
}

/// An unsigned JWT with OpenAI's ChatGPT claims (what Codex decodes).
fn id_token() -> String {
    use base64::Engine;
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    format!(
        "{}.{}.stub",
        b64(json!({"alg": "none", "typ": "JWT"})),
        b64(json!({
            "email": "stub@example.com",
            "exp": now + 3600,
            "https://api.openai.com/auth": {
                "chatgpt_plan_type": "plus",
                "chatgpt_account_id": "stub-account",
                "chatgpt_user_id": "stub-user",
            },
        }))
    )
}

async fn token(State(codes): State<Codes>, body: String) -> Response {
    let refresh = field(&body, "grant_type").as_deref() == Some("refresh_token");
    let fresh = if refresh {
        use_once(
            &codes.refresh,
            &field(&body, "refresh_token").unwrap_or_default(),
        )
    } else {
        use_once(&codes.issued, &field(&body, "code").unwrap_or_default())
    };
    if !fresh {
        let (status, error) = if refresh {
            (StatusCode::UNAUTHORIZED, "refresh_token_reused")
        } else {
            (StatusCode::BAD_REQUEST, "invalid_grant")
        };
        return (status, axum::Json(json!({"error": error}))).into_response();
    }
    let refresh_token = format!("{}-refresh-{:016x}", codes.prefix, rand_u64());
    if let Ok(mut r) = codes.refresh.lock() {
        r.insert(refresh_token.clone(), false);
    }
    axum::Json(json!({
        "access_token": format!("{}-access-{:016x}", codes.prefix, rand_u64()),
        "refresh_token": refresh_token,
        "id_token": id_token(),
        "expires_in": 3600,
        "token_type": "Bearer",
    }))
    .into_response()
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish()
}

/// Starts the stub OAuth provider on 127.0.0.1; every token it issues
/// starts with `token_prefix`.
pub async fn start(token_prefix: &str) -> std::io::Result<StubServer> {
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::new(Mutex::new(Vec::new()));
    let stub = Stub {
        answer: String::new(),
        fail: None,
        delay: std::time::Duration::ZERO,
        subscription: None,
        edit: None,
        seen: seen.clone(),
    };
    let app = Router::new()
        .route("/authorize", get(authorize))
        .route("/approve", get(approve))
        .route("/code", get(show_code))
        .route("/token", post(token))
        .with_state(Codes {
            issued: Arc::default(),
            refresh: Arc::default(),
            prefix: token_prefix.into(),
        })
        .layer(axum::middleware::from_fn_with_state(stub, record));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(StubServer { addr, seen, task })
}

/// The stub "CLI login" program (Node, no dependencies): behaves like the
/// real CLIs' login commands against this provider. Run it with
/// `node -e "$SCRIPT"`; see the script's header for its environment.
pub const CLI_LOGIN_SCRIPT: &str = include_str!("../stub-cli-login.js");
