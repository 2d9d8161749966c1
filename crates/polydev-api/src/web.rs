//! The web UI: static files from `web/public`, embedded in the binary in
//! release builds (read from the source tree in debug builds). Unknown
//! non-API paths fall back to `index.html`, so client-side routes work.

use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use rust_embed::RustEmbed;

use crate::error::ApiError;

#[derive(RustEmbed)]
#[folder = "../../web/public"]
struct Assets;

/// Content-Security-Policy for the UI: everything from this origin only.
const CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

pub(crate) fn routes() -> Router {
    Router::new()
        .route("/", get(serve))
        .route("/{*path}", get(serve))
        .route_layer(axum::middleware::from_fn(crate::middleware::record_route))
}

async fn serve(req: Request) -> Response {
    let path = req.uri().path().trim_start_matches('/');
    if path.starts_with("api/") || path == "api" {
        return ApiError::not_found(format!("no route for GET /{path}")).into_response();
    }
    let (name, file) = match Assets::get(path).filter(|_| !path.is_empty()) {
        Some(file) => (path, file),
        // Client-side routes (no extension) get the app shell.
        None if !path.rsplit('/').next().unwrap_or("").contains('.') => {
            match Assets::get("index.html") {
                Some(file) => ("index.html", file),
                None => {
                    return ApiError::not_found("the web UI is not built into this binary")
                        .into_response()
                }
            }
        }
        None => return ApiError::not_found(format!("no file /{path}")).into_response(),
    };
    let mime = mime_guess::from_path(name).first_or_octet_stream();
    let cache = if name == "index.html" {
        "no-cache"
    } else {
        "public, max-age=300"
    };
    let mut response = (StatusCode::OK, file.data.into_owned()).into_response();
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(mime.as_ref()) {
        headers.insert(header::CONTENT_TYPE, v);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

#[cfg(test)]
mod state_names {
    //! The web UI matches states by their text: every state it names must
    //! be one its machine has, and the login page labels each of them.
    use polydev_domain::{LoginState, RunState};
    use std::collections::BTreeSet;

    fn page(name: &str) -> String {
        let path = format!("{}/../../web/public/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// Every `"word"` right after `marker` in `text`.
    fn quoted_after<'a>(text: &'a str, marker: &str) -> Vec<&'a str> {
        text.match_indices(marker)
            .filter_map(|(i, _)| {
                let rest = text[i + marker.len()..].strip_prefix('"')?;
                rest.split('"').next()
            })
            .collect()
    }

    #[test]
    fn the_login_page_knows_exactly_the_login_states() {
        let js = page("providers.js");
        let start = js.find("const LABELS = {").expect("the LABELS table");
        let block = &js[start..start + js[start..].find("};").unwrap()];
        let labelled: BTreeSet<&str> = block
            .lines()
            .skip(1)
            .filter_map(|l| l.trim().split_once(':').map(|(k, _)| k))
            .collect();
        let all: BTreeSet<&str> = LoginState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(labelled, all, "one label per login state");
        let compared = quoted_after(&js, "state === ");
        assert!(compared.len() >= 4, "{compared:?}");
        for s in compared {
            assert!(
                s.parse::<LoginState>().is_ok(),
                "providers.js compares with {s:?}"
            );
        }
        let ended = js
            .split("].includes(v.state)")
            .next()
            .and_then(|b| b.rsplit('[').next())
            .expect("the terminal states list");
        let ended: BTreeSet<&str> = ended
            .split(',')
            .map(|s| s.trim().trim_matches('"'))
            .collect();
        let terminal: BTreeSet<&str> = LoginState::ALL
            .iter()
            .filter(|s| s.is_terminal())
            .map(|s| s.as_str())
            .collect();
        assert_eq!(ended, terminal, "the page's ended states");
    }

    #[test]
    fn the_run_page_compares_with_run_states_only() {
        let js = page("runs.js");
        let compared = quoted_after(&js, "r.state === ");
        assert!(!compared.is_empty());
        for s in compared {
            assert!(s.parse::<RunState>().is_ok(), "runs.js compares with {s:?}");
        }
    }
}
