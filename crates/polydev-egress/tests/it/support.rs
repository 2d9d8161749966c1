//! A proxy on loopback against a fresh store, stub origin servers (HTTP,
//! HTTPS with a certificate made now, a raw TCP echo), and a raw CONNECT
//! helper.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use polydev_domain::{Email, Role, UserId};
use polydev_egress::{Egress, EgressConfig, ProxyAccess};
use polydev_store::testing::TestDatabase;
use polydev_store::{NewUser, Store};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub egress: Egress,
    pub addr: SocketAddr,
    pub store: Store,
    pub registry: Arc<Registry>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
    _db: TestDatabase,
}

/// Loopback exceptions, as the tests' stubs need.
pub fn loopback_config() -> EgressConfig {
    EgressConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        allow_private: vec!["127.0.0.0/8".into(), "::1".into()],
        per_user_ports: false,
        ..EgressConfig::default()
    }
}

impl Proxy {
    pub async fn start(config: EgressConfig) -> Self {
        let db = TestDatabase::sqlite();
        let store = db.store().await;
        let mut registry = Registry::default();
        let egress =
            Egress::new(config, store.clone(), &mut registry).expect("valid egress config");
        let listener = egress.bind().await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(egress.clone().run(listener, rx));
        Self {
            egress,
            addr,
            store,
            registry: Arc::new(registry),
            stop,
            task: Some(task),
            _db: db,
        }
    }

    pub async fn user(&self, email: &str) -> UserId {
        let user = NewUser {
            id: UserId::new(),
            email: Email::parse(email).unwrap(),
            password_hash: None,
            role: Role::User,
            created_at_ms: 0,
        };
        self.store.create_user(&user).await.unwrap().id
    }

    /// A credential for a new sandbox of `user`.
    pub async fn access(&self, user: UserId, template: &str) -> ProxyAccess {
        self.egress
            .mint(user, &uuid::Uuid::new_v4().to_string(), template)
            .await
            .unwrap()
    }

    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }

    pub fn metrics(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).unwrap();
        out
    }
}

async fn stub(req: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let mut resp = match path.as_str() {
        "/hello" => Response::new(Full::new(Bytes::from_static(b"hello from stub"))),
        "/redirect" => {
            let to = query.strip_prefix("to=").unwrap_or("/");
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::FOUND;
            r.headers_mut().insert("location", to.parse().unwrap());
            r
        }
        "/bytes" => {
            let n: usize = query
                .strip_prefix("n=")
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            Response::new(Full::new(Bytes::from(vec![b'x'; n])))
        }
        "/echo" => {
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Response::new(Full::new(body))
        }
        _ => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"no such stub path")));
            *r.status_mut() = StatusCode::NOT_FOUND;
            r
        }
    };
    resp.headers_mut().insert("x-stub", "1".parse().unwrap());
    Ok(resp)
}

/// A plain HTTP origin on loopback.
pub async fn http_stub() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), hyper::service::service_fn(stub))
                    .await;
            });
        }
    });
    addr
}

/// An HTTPS origin on loopback with a certificate for localhost and
/// 127.0.0.1 made now; returns its address and the CA certificate (PEM).
pub async fn https_stub() -> (SocketAddr, String) {
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let pem = cert.cert.pem();
    let der = cert.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![der], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), hyper::service::service_fn(stub))
                    .await;
            });
        }
    });
    (addr, pem)
}

/// A TCP echo server on loopback.
pub async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Sends CONNECT through the proxy; returns the status code and the
/// stream (a tunnel when the status is 200).
pub async fn connect(
    proxy: SocketAddr,
    auth: Option<(&str, &str)>,
    target: &str,
) -> (u16, TcpStream) {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some((u, p)) = auth {
        use base64::Engine;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
        head.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    while !buf.ends_with(b"\r\n\r\n") {
        let b = tokio::time::timeout(Duration::from_secs(10), stream.read_u8())
            .await
            .expect("proxy answers")
            .unwrap();
        buf.push(b);
    }
    let text = String::from_utf8_lossy(&buf).to_string();
    let code = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    // A refusal may carry a body; drain what has arrived so far is not needed.
    (code, stream)
}

/// `curl` through the proxy; returns (exit status, HTTP code, body).
pub fn curl(
    proxy: SocketAddr,
    auth: Option<(&str, &str)>,
    url: &str,
    extra: &[&str],
) -> (bool, u16, String) {
    let mut cmd = std::process::Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "20",
        "-o",
        "-",
        "-w",
        "\n%{http_code}:%{http_connect}",
        "--proxy",
        &format!("http://{proxy}"),
    ])
    .args(["--noproxy", ""])
    .env_remove("http_proxy")
    .env_remove("https_proxy")
    .env_remove("HTTPS_PROXY")
    .env_remove("ALL_PROXY")
    .env_remove("NO_PROXY")
    .env_remove("no_proxy");
    if let Some((u, p)) = auth {
        cmd.args(["--proxy-user", &format!("{u}:{p}")]);
    }
    let out = cmd
        .args(extra)
        .arg(url)
        .output()
        .expect("curl is installed");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, codes) = text.rsplit_once('\n').unwrap_or(("", "0:0"));
    // A refused CONNECT leaves http_code at 000; its status is http_connect.
    let (code, connect) = codes.trim().split_once(':').unwrap_or(("0", "0"));
    let code = match code.parse().unwrap_or(0) {
        0 => connect.parse().unwrap_or(0),
        c => c,
    };
    (out.status.success(), code, body.to_owned())
}
