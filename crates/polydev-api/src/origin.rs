//! Which browser pages may act with a user's session cookie: this server's
//! own (as the browser reached it, also through a trusted reverse proxy
//! that sets `X-Forwarded-Host`) and the configured `allowed_origins`.
//! Bearer tokens are not ambient, so only cookie-authenticated requests
//! are checked; the session cookie is `SameSite=Strict` too, but "site" is
//! wider than "origin" (a sibling subdomain is the same site).

use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::{AUTHORIZATION, COOKIE};
use axum::http::{HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::net::SocketAddr;
use std::sync::Arc;

use crate::error::ApiError;
use crate::ApiConfig;

/// The connection's peer address, when the server recorded it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer(pub Option<SocketAddr>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Peer(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0),
        ))
    }
}

fn trusted_peer(peer: Option<SocketAddr>, config: &ApiConfig) -> bool {
    peer.is_some_and(|p| config.trusted_proxies.iter().any(|n| n.contains(&p.ip())))
}

/// Whether `origin` (an `Origin` header value) is this server or allowed.
fn origin_is_ours(
    origin: &str,
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
    config: &ApiConfig,
) -> bool {
    if config.allowed_origins.iter().any(|a| a == origin) {
        return true;
    }
    let (scheme, authority) = match origin.split_once("://") {
        Some((s @ ("http" | "https"), a)) => (s, a),
        _ => return false,
    };
    if authority.is_empty() {
        return false;
    }
    let first = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .map(str::trim)
            .map(str::to_owned)
    };
    let host_matches = first("host").as_deref() == Some(authority);
    if host_matches && !trusted_peer(peer, config) {
        return true;
    }
    // Behind a reverse proxy we trust, its view counts: the scheme the
    // browser used and the host it asked for.
    if trusted_peer(peer, config) {
        if let Some(proto) = first("x-forwarded-proto") {
            if proto != scheme {
                return false;
            }
        }
        if first("x-forwarded-host").as_deref() == Some(authority) || host_matches {
            return true;
        }
    }
    false
}

/// Whether a browser request comes from one of our pages: its `Origin` is
/// ours, or (without one) `Sec-Fetch-Site` says same-origin or
/// user-initiated. A request with neither is not from a browser page we
/// can vouch for.
pub(crate) fn from_our_page(
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
    config: &ApiConfig,
) -> bool {
    if let Some(origin) = headers.get("origin").and_then(|v| v.to_str().ok()) {
        return origin_is_ours(origin, headers, peer, config);
    }
    matches!(
        headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()),
        Some("same-origin" | "none")
    )
}

/// Whether the request carries the session cookie and no bearer token.
fn cookie_authenticated(headers: &HeaderMap) -> bool {
    !headers.contains_key(AUTHORIZATION)
        && headers
            .get_all(COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .any(|pair| {
                pair.trim()
                    .split_once('=')
                    .is_some_and(|(name, _)| name == crate::auth::SESSION_COOKIE)
            })
}

/// Refuses state-changing requests that ride on the session cookie from a
/// page that is not ours (cross-site request forgery): 403, nothing done.
pub(crate) async fn cookie_writes_from_our_pages(
    State(config): State<Arc<ApiConfig>>,
    req: Request,
    next: Next,
) -> Response {
    let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !safe && cookie_authenticated(req.headers()) {
        let peer = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0);
        if !from_our_page(req.headers(), peer, &config) {
            tracing::warn!(method = %req.method(), "cookie-authenticated change from a foreign page refused");
            return ApiError::forbidden(
                "this change came with your session cookie from a page that is not this server's; open polydev's own page (or use a bearer token)",
            )
            .into_response();
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn only_this_server_s_pages_and_allowed_origins_pass() {
        let config = ApiConfig {
            allowed_origins: vec!["https://app.example".into()],
            trusted_proxies: vec!["127.0.0.1/32".parse().unwrap()],
            ..ApiConfig::default()
        };
        let proxy = Some(SocketAddr::from(([127, 0, 0, 1], 5000)));
        let stranger = Some(SocketAddr::from(([198, 51, 100, 1], 5000)));
        let ok = |h: &[(&str, &str)], peer| from_our_page(&headers(h), peer, &config);
        assert!(ok(
            &[("origin", "http://pd.test:4000"), ("host", "pd.test:4000")],
            stranger
        ));
        assert!(ok(
            &[("origin", "https://app.example"), ("host", "x")],
            stranger
        ));
        assert!(!ok(
            &[("origin", "http://evil.test"), ("host", "pd.test:4000")],
            stranger
        ));
        assert!(!ok(&[("origin", "null"), ("host", "pd.test")], stranger));
        // X-Forwarded-Host only from the trusted proxy.
        let fwd = [
            ("origin", "https://pd.example"),
            ("host", "127.0.0.1:4000"),
            ("x-forwarded-host", "pd.example"),
        ];
        assert!(ok(&fwd, proxy));
        assert!(!ok(&fwd, stranger));
        // No Origin: Sec-Fetch-Site decides; neither: refused.
        assert!(ok(&[("sec-fetch-site", "same-origin")], stranger));
        assert!(!ok(&[("sec-fetch-site", "same-site")], stranger));
        assert!(!ok(&[("sec-fetch-site", "cross-site")], stranger));
        assert!(!ok(&[], stranger));
    }

    #[test]
    fn only_cookie_requests_without_a_bearer_are_checked() {
        assert!(cookie_authenticated(&headers(&[(
            "cookie",
            "a=1; polydev_session=x"
        )])));
        assert!(!cookie_authenticated(&headers(&[
            ("cookie", "polydev_session=x"),
            ("authorization", "Bearer t")
        ])));
        assert!(!cookie_authenticated(&headers(&[(
            "cookie",
            "polydev_sessionx=1"
        )])));
    }
}
