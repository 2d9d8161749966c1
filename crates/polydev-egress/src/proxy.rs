//! One client connection served by hyper: HTTP/1.1 with upgrades, each
//! request authenticated, checked against policy and limits, then
//! tunnelled (CONNECT) or forwarded (absolute-form `http://`). A
//! connection's first CONNECT skips hyper entirely (`raw.rs`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use polydev_domain::UserId;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use crate::accounting::{Activity, Meter, Metered};
use crate::credentials::{parse_basic, Identity};
use crate::guard::{host_allowed, ConnectError};
use crate::Inner;

pub(crate) type Body = BoxBody<Bytes, hyper::Error>;

fn text(status: StatusCode, message: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(message + "\n"))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A request the proxy will not carry out, rendered as a hyper response or
/// as raw bytes on the CONNECT fast path.
#[derive(Debug)]
pub(crate) struct Refusal {
    status: StatusCode,
    /// `x-polydev-egress-denied` value, for policy-type refusals.
    reason: Option<&'static str>,
    message: String,
    challenge: bool,
    retry_after: bool,
}

impl Refusal {
    fn new(status: StatusCode, message: String) -> Self {
        Self {
            status,
            reason: None,
            message,
            challenge: false,
            retry_after: false,
        }
    }

    fn denied(status: StatusCode, reason: &'static str, message: String) -> Self {
        Self {
            reason: Some(reason),
            ..Self::new(status, format!("polydev egress: {message}"))
        }
    }

    fn auth() -> Self {
        Self {
            challenge: true,
            ..Self::new(
                StatusCode::PROXY_AUTHENTICATION_REQUIRED,
                "polydev egress: proxy credentials required".into(),
            )
        }
    }

    pub(crate) fn bad_request(inner: &Inner, message: &str) -> Self {
        inner.accounting.metrics().deny("bad_request");
        Self::new(
            StatusCode::BAD_REQUEST,
            format!("polydev egress: {message}"),
        )
    }

    pub(crate) fn into_response(self) -> Response<Body> {
        let mut r = text(self.status, self.message);
        if let Some(reason) = self.reason {
            r.headers_mut()
                .insert("x-polydev-egress-denied", HeaderValue::from_static(reason));
        }
        if self.challenge {
            r.headers_mut().insert(
                header::PROXY_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"polydev egress\""),
            );
        }
        if self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }

    /// The same as an HTTP/1.1 response that closes the connection.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let body = format!("{}\n", self.message);
        let mut head = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n",
            self.status.as_u16(),
            self.status.canonical_reason().unwrap_or(""),
            body.len()
        );
        if let Some(reason) = self.reason {
            head.push_str(&format!("x-polydev-egress-denied: {reason}\r\n"));
        }
        if self.challenge {
            head.push_str("proxy-authenticate: Basic realm=\"polydev egress\"\r\n");
        }
        if self.retry_after {
            head.push_str("retry-after: 1\r\n");
        }
        head.push_str("\r\n");
        head.push_str(&body);
        head.into_bytes()
    }
}

/// Waits until `activity` has been idle for `limit`.
pub(crate) async fn idle(activity: &Activity, limit: Duration) {
    loop {
        let quiet = activity.idle_for();
        if quiet >= limit {
            return;
        }
        tokio::time::sleep(limit - quiet + Duration::from_millis(10)).await;
    }
}

/// The client side of a connection, noting activity for the idle timeout.
struct Touched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Touched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) {
            self.activity.touch_now();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Touched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(_))) {
            self.activity.touch_now();
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves a connection with hyper; `owner` is set on a per-user port.
pub(crate) async fn serve_connection<S>(
    inner: Arc<Inner>,
    stream: S,
    peer: SocketAddr,
    owner: Option<UserId>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Activity::new();
    let io = TokioIo::new(Touched {
        inner: stream,
        activity: activity.clone(),
    });
    let service_inner = inner.clone();
    let service = hyper::service::service_fn(move |req| {
        let inner = service_inner.clone();
        async move { Ok::<_, Infallible>(handle(inner, req, owner).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(inner.config.header_timeout())
        .serve_connection(io, service)
        .with_upgrades();
    tokio::select! {
        result = conn => {
            if let Err(e) = result {
                tracing::debug!(peer = %peer, error = %e, "egress client connection ended with an error");
            }
        }
        _ = idle(&activity, inner.config.idle_timeout()) => {
            tracing::debug!(peer = %peer, "closing idle egress client connection");
        }
    }
}

/// Checks credentials (and the port's owner) and the request rate.
pub(crate) async fn authorize(
    inner: &Inner,
    proxy_authorization: Option<&str>,
    owner: Option<UserId>,
) -> Result<Identity, Refusal> {
    let metrics = inner.accounting.metrics();
    let Some((username, secret)) = proxy_authorization.and_then(parse_basic) else {
        metrics.deny("auth");
        return Err(Refusal::auth());
    };
    let identity = match inner.credentials.verify(&username, &secret).await {
        Ok(Some(identity)) if owner.is_none_or(|o| o == identity.user_id) => identity,
        Ok(_) => {
            metrics.deny("auth");
            tracing::info!(username = %username, on_user_port = owner.is_some(), "egress credential refused");
            return Err(Refusal::auth());
        }
        Err(e) => {
            tracing::error!(error = %e, "egress cannot check credentials");
            return Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "polydev egress: credential store unavailable".into(),
            ));
        }
    };
    if !inner.limits.admit_request(identity.user_id) {
        metrics.deny("rate_limited");
        tracing::info!(sandbox_id = %identity.sandbox_id, "egress request rate limit reached");
        return Err(Refusal {
            retry_after: true,
            ..Refusal::denied(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "request rate limit reached".into(),
            )
        });
    }
    Ok(identity)
}

async fn handle(
    inner: Arc<Inner>,
    req: Request<Incoming>,
    owner: Option<UserId>,
) -> Response<Body> {
    let presented = req
        .headers()
        .get(header::PROXY_AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let identity = match authorize(&inner, presented, owner).await {
        Ok(i) => i,
        Err(refusal) => return refusal.into_response(),
    };
    if req.method() == Method::CONNECT {
        tunnel(inner, req, identity).await
    } else {
        forward(inner, req, identity).await
    }
}

/// Policy check on the destination host, for the identity's template.
fn policy_refusal(inner: &Inner, identity: &Identity, host: &str) -> Option<Refusal> {
    if host_allowed(inner.policy(&identity.template).as_deref(), host) {
        return None;
    }
    inner.accounting.metrics().deny("policy");
    inner.note_refusal(
        &identity.sandbox_id,
        host,
        "is not on this server's allow-list for this kind of sandbox",
    );
    tracing::info!(sandbox_id = %identity.sandbox_id, host, template = %identity.template, "egress destination not allowed by policy");
    Some(Refusal::denied(
        StatusCode::FORBIDDEN,
        "policy",
        format!(
            "{host} is not on the allow-list of template {}",
            identity.template
        ),
    ))
}

fn connect_failure(inner: &Inner, identity: &Identity, host: &str, err: ConnectError) -> Refusal {
    let metrics = inner.accounting.metrics();
    let why = match &err {
        ConnectError::Host(_) => "is this server itself".to_owned(),
        ConnectError::Denied(ip) => format!("resolves to {ip}, a private or reserved address"),
        ConnectError::Resolve(_) => {
            "cannot be resolved from this server (no such name, or no DNS)".to_owned()
        }
        ConnectError::Timeout(_) => "did not answer in time".to_owned(),
        ConnectError::Refused { source, .. } => format!("refused the connection ({source})"),
    };
    inner.note_refusal(&identity.sandbox_id, host, &why);
    match err {
        ConnectError::Host(ip) => {
            metrics.deny("host_address");
            tracing::info!(sandbox_id = %identity.sandbox_id, %ip, "egress refused an address of this host");
            Refusal::denied(
                StatusCode::FORBIDDEN,
                "host_address",
                format!("destination {ip} is this host"),
            )
        }
        ConnectError::Denied(ip) => {
            metrics.deny("private_address");
            tracing::info!(sandbox_id = %identity.sandbox_id, %ip, "egress refused a private or reserved address");
            Refusal::denied(
                StatusCode::FORBIDDEN,
                "private_address",
                format!("destination {ip} is in a private or reserved range"),
            )
        }
        ConnectError::Timeout(target) => {
            metrics.deny("upstream");
            tracing::info!(sandbox_id = %identity.sandbox_id, %target, "egress connect deadline passed");
            Refusal::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!("polydev egress: connecting to {target} timed out"),
            )
        }
        other => {
            metrics.deny("upstream");
            tracing::info!(sandbox_id = %identity.sandbox_id, error = %other, "egress cannot reach the destination");
            Refusal::new(StatusCode::BAD_GATEWAY, format!("polydev egress: {other}"))
        }
    }
}

/// Everything before a tunnel's bytes flow: target, policy, the tunnel
/// slot, the connection to the destination.
pub(crate) async fn open_tunnel(
    inner: &Inner,
    identity: &Identity,
    authority: Option<&hyper::http::uri::Authority>,
) -> Result<(TcpStream, OwnedSemaphorePermit), Refusal> {
    let Some((host, port)) = authority.and_then(|a| a.port_u16().map(|p| (a.host().to_owned(), p)))
    else {
        return Err(Refusal::bad_request(inner, "CONNECT needs host:port"));
    };
    if let Some(refusal) = policy_refusal(inner, identity, &host) {
        return Err(refusal);
    }
    let Some(permit) = inner.limits.open_tunnel(identity.user_id) else {
        inner.accounting.metrics().deny("tunnel_limit");
        tracing::info!(sandbox_id = %identity.sandbox_id, "egress tunnel limit reached");
        return Err(Refusal::denied(
            StatusCode::TOO_MANY_REQUESTS,
            "tunnel_limit",
            "too many open tunnels".into(),
        ));
    };
    let origin = inner
        .dial(&host, port, identity)
        .await
        .map_err(|e| connect_failure(inner, identity, &host, e))?;
    Ok((origin, permit))
}

/// CONNECT on a connection hyper already serves (after an earlier
/// request); first requests take the fast path in `raw.rs`.
async fn tunnel(inner: Arc<Inner>, req: Request<Incoming>, identity: Identity) -> Response<Body> {
    let (origin, permit) = match open_tunnel(&inner, &identity, req.uri().authority()).await {
        Ok(pair) => pair,
        Err(refusal) => return refusal.into_response(),
    };
    let cell = inner
        .accounting
        .cell(identity.user_id, &identity.sandbox_id);
    cell.tunnel();
    let metrics = inner.accounting.metrics().clone();
    metrics.tunnels.inc();
    let origin = Metered::new(
        origin,
        Meter::new(cell, &metrics, inner.limits.bandwidth(identity.user_id)),
    );
    let idle_limit = inner.config.idle_timeout();
    let sandbox = identity.sandbox_id.clone();
    inner.spawn(async move {
        let _permit = permit;
        let upgraded = match hyper::upgrade::on(req).await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(sandbox_id = %sandbox, error = %e, "egress tunnel upgrade failed");
                return;
            }
        };
        metrics.tunnels_active.inc();
        let activity = origin.meter.activity.clone();
        let mut client = TokioIo::new(upgraded);
        let mut origin = origin;
        tokio::select! {
            r = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut origin, 64 * 1024, 64 * 1024) => {
                if let Err(e) = r {
                    tracing::debug!(sandbox_id = %sandbox, error = %e, "egress tunnel closed with an error");
                }
            }
            _ = idle(&activity, idle_limit) => {
                tracing::debug!(sandbox_id = %sandbox, "closing idle egress tunnel");
            }
        }
        metrics.tunnels_active.dec();
    });
    Response::new(Empty::new().map_err(|never| match never {}).boxed())
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        "connection",
        "proxy-connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(name);
    }
}

async fn forward(inner: Arc<Inner>, req: Request<Incoming>, identity: Identity) -> Response<Body> {
    let uri = req.uri().clone();
    let Some(authority) = uri.authority().cloned() else {
        inner.accounting.metrics().deny("bad_request");
        return text(
            StatusCode::BAD_REQUEST,
            "polydev egress: this is a proxy; send absolute-form http:// requests or CONNECT"
                .into(),
        );
    };
    if uri.scheme_str() != Some("http") {
        inner.accounting.metrics().deny("bad_request");
        return text(
            StatusCode::BAD_REQUEST,
            "polydev egress: only http:// is forwarded; use CONNECT for https".into(),
        );
    }
    let host = authority.host().to_owned();
    let port = authority.port_u16().unwrap_or(80);
    if let Some(refusal) = policy_refusal(&inner, &identity, &host) {
        return refusal.into_response();
    }
    let origin = match inner.dial(&host, port, &identity).await {
        Ok(s) => s,
        Err(e) => return connect_failure(&inner, &identity, &host, e).into_response(),
    };
    let cell = inner
        .accounting
        .cell(identity.user_id, &identity.sandbox_id);
    cell.request();
    let metrics = inner.accounting.metrics().clone();
    metrics.requests.inc();
    let origin = Metered::new(
        origin,
        Meter::new(cell, &metrics, inner.limits.bandwidth(identity.user_id)),
    );
    let activity = origin.meter.activity.clone();
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(origin)).await
    {
        Ok(pair) => pair,
        Err(e) => return text(StatusCode::BAD_GATEWAY, format!("polydev egress: {e}")),
    };
    let idle_limit = inner.config.idle_timeout();
    inner.spawn(async move {
        tokio::select! {
            _ = conn => {}
            _ = idle(&activity, idle_limit) => {}
        }
    });
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // The destination the policy checked, never the client's own Host (a
    // shared front end would otherwise serve whatever site it names).
    parts.headers.remove(header::HOST);
    let host_value = match authority.port_u16() {
        Some(80) | None => authority.host().to_owned(),
        Some(p) => format!("{}:{p}", authority.host()),
    };
    match HeaderValue::from_str(&host_value) {
        Ok(v) => {
            parts.headers.insert(header::HOST, v);
        }
        Err(_) => {
            return text(
                StatusCode::BAD_REQUEST,
                "polydev egress: the request's host is not valid".into(),
            )
        }
    }
    parts.uri = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .parse()
        .unwrap_or_default();
    parts.version = hyper::Version::HTTP_11;
    match sender.send_request(Request::from_parts(parts, body)).await {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, body.boxed())
        }
        Err(e) => {
            tracing::info!(sandbox_id = %identity.sandbox_id, error = %e, "egress forward failed");
            text(
                StatusCode::BAD_GATEWAY,
                format!("polydev egress: the destination failed: {e}"),
            )
        }
    }
}

/// Opens a tunnel through an upstream HTTP proxy to `target` (an address
/// already checked by the guard) and returns the raw stream.
pub(crate) async fn upstream_connect(
    proxy: SocketAddr,
    target: SocketAddr,
    authorization: Option<&str>,
    deadline: Duration,
) -> Result<TcpStream, ConnectError> {
    let work = async {
        let mut stream =
            TcpStream::connect(proxy)
                .await
                .map_err(|source| ConnectError::Refused {
                    target: format!("upstream proxy {proxy}"),
                    source,
                })?;
        let _ = stream.set_nodelay(true);
        let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(auth) = authorization {
            head.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
        }
        head.push_str("\r\n");
        let io_err = |source| ConnectError::Refused {
            target: format!("upstream proxy {proxy}"),
            source,
        };
        stream.write_all(head.as_bytes()).await.map_err(io_err)?;
        // Read the response head byte by byte so nothing of the tunnel is consumed.
        let mut buf = Vec::with_capacity(256);
        while !buf.ends_with(b"\r\n\r\n") {
            if buf.len() > 8192 {
                return Err(ConnectError::Refused {
                    target: format!("upstream proxy {proxy}"),
                    source: std::io::Error::other("response head too long"),
                });
            }
            let b = stream.read_u8().await.map_err(io_err)?;
            buf.push(b);
        }
        let status_line = String::from_utf8_lossy(&buf);
        let code = status_line.split_whitespace().nth(1).unwrap_or("");
        if code != "200" {
            return Err(ConnectError::Refused {
                target: format!("{target} via upstream proxy {proxy}"),
                source: std::io::Error::other(format!("upstream answered {code}")),
            });
        }
        Ok(stream)
    };
    tokio::time::timeout(deadline, work)
        .await
        .map_err(|_| ConnectError::Timeout(format!("{target} via upstream proxy {proxy}")))?
}
