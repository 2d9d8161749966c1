//! The HTTP server: the router on hyper's HTTP/1.1 connections, one task
//! per connection, each request carrying its peer (`ConnectInfo`), every
//! accepted socket with TCP_NODELAY (small frames — VNC input, SSE deltas
//! — go out at once).
//!
//! Why not `axum::serve`: it serves through hyper-util's auto (HTTP/1 or
//! HTTP/2) connection, which wraps each socket in a private type, so an
//! upgraded connection no longer shows its `TcpStream`. Here an upgrade
//! hands back the socket itself, and the viewer's WebSocket (`ws.rs`)
//! moves the VNC side's bytes into it with `splice(2)`. Only HTTP/1.1 is
//! served (as before: the workspace never enabled axum's HTTP/2).

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

/// A client must send its request head within this long (slow-loris);
/// hyper also closes a keep-alive connection idle for this long (the
/// shipped nginx config keeps its upstream connections for less).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `app` on `listener` until `shutdown` resolves; then stops
/// accepting, lets each connection finish the request it is on (idle
/// ones close at once) and returns once all have ended. Upgraded
/// connections are no longer the server's: their tasks end them.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        while conns.try_join_next().is_some() {}
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of descriptors or memory: wait instead of spinning.
                tracing::error!(error = %e, "accepting a connection failed");
                tokio::select! {
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        let _ = tcp.set_nodelay(true);
        conns.spawn(connection(tcp, peer, app.clone(), stop_rx.clone()));
    }
    drop(listener);
    let _ = stop_tx.send(true);
    while conns.join_next().await.is_some() {}
    Ok(())
}

async fn connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    app: Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            tower::ServiceExt::oneshot(app.clone(), req.map(axum::body::Body::new))
        });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(tcp), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::trace!(error = %e, "connection ended with an error");
            }
        }
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Errors that end one incoming connection, not the listener.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset | Interrupted
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Each request knows its peer, and a shutdown lets a request in
    /// flight finish before `serve` returns.
    #[tokio::test]
    async fn requests_carry_their_peer_and_shutdown_drains_them() {
        let started = std::sync::Arc::new(tokio::sync::Notify::new());
        let on_slow = started.clone();
        let app = Router::new()
            .route(
                "/peer",
                axum::routing::get(|ConnectInfo(p): ConnectInfo<SocketAddr>| async move {
                    p.to_string()
                }),
            )
            .route(
                "/slow",
                axum::routing::get(move || async move {
                    on_slow.notify_one();
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    "done"
                }),
            );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, app, async {
            let _ = stop_rx.await;
        }));
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let me = s.local_addr().unwrap();
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            (me, out)
        };
        let (me, out) = get("/peer").await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.ends_with(&me.to_string()), "{out}");
        let slow = tokio::spawn(get("/slow"));
        started.notified().await;
        stop_tx.send(()).unwrap();
        let (_, out) = slow.await.unwrap();
        assert!(
            out.ends_with("done"),
            "the request in flight finished: {out}"
        );
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "no longer listening"
        );
    }
}
