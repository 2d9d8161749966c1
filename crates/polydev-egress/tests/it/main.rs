//! The egress proxy with real clients (curl, reqwest, raw TCP) against
//! stub origins on loopback.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::time::{Duration, Instant};

use polydev_egress::{EgressConfig, PolicyConfig, UpstreamConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use support::{connect, curl, echo_server, http_stub, https_stub, loopback_config, Proxy};

fn auth(access: &polydev_egress::ProxyAccess) -> (String, String) {
    (
        access.credential.username.clone(),
        access.credential.secret.clone(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn curl_and_a_rust_client_reach_http_and_https_origins_through_the_proxy() {
    let proxy = Proxy::start(loopback_config()).await;
    let user = proxy.user("ada@example.com").await;
    let access = proxy.access(user, "work").await;
    let (u, p) = auth(&access);
    let http = http_stub().await;
    let (https, ca_pem) = https_stub().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &ca_pem).unwrap();

    // curl: absolute-form for http://, CONNECT for https://.
    let (ok, code, body) = curl(
        proxy.addr,
        Some((&u, &p)),
        &format!("http://localhost:{}/hello", http.port()),
        &[],
    );
    assert!(
        ok && code == 200 && body == "hello from stub",
        "{code} {body}"
    );
    let (ok, code, body) = curl(
        proxy.addr,
        Some((&u, &p)),
        &format!("https://localhost:{}/hello", https.port()),
        &["--cacert", ca.to_str().unwrap()],
    );
    assert!(
        ok && code == 200 && body == "hello from stub",
        "{code} {body}"
    );
    // Gemini CLI tunnels even plain http:// with CONNECT.
    let (ok, code, body) = curl(
        proxy.addr,
        Some((&u, &p)),
        &format!("http://127.0.0.1:{}/hello", http.port()),
        &["--proxytunnel"],
    );
    assert!(
        ok && code == 200 && body == "hello from stub",
        "{code} {body}"
    );

    // A Rust client with the proxy's URL (credentials in it), POSTing a body.
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(&access.proxy_url).unwrap())
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .use_rustls_tls()
        .build()
        .unwrap();
    let echoed = client
        .post(format!("http://localhost:{}/echo", http.port()))
        .body("ping through the proxy")
        .send()
        .await
        .unwrap();
    assert_eq!(echoed.headers()["x-stub"], "1");
    assert!(echoed.headers().get("proxy-authorization").is_none());
    assert_eq!(echoed.text().await.unwrap(), "ping through the proxy");
    let tls = client
        .get(format!("https://localhost:{}/bytes?n=100000", https.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(tls.bytes().await.unwrap().len(), 100_000);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_wrong_and_revoked_credentials_get_407() {
    let proxy = Proxy::start(loopback_config()).await;
    let user = proxy.user("ada@example.com").await;
    let access = proxy.access(user, "work").await;
    let (u, p) = auth(&access);
    let http = http_stub().await;
    let target = format!("127.0.0.1:{}", http.port());

    for creds in [
        None,
        Some((u.as_str(), "wrong-secret")),
        Some(("sbx-nobody", p.as_str())),
    ] {
        let (code, mut stream) = connect(proxy.addr, creds, &target).await;
        assert_eq!(code, 407, "{creds:?}");
        let mut rest = vec![0u8; 512];
        let n = stream.read(&mut rest).await.unwrap_or(0);
        let _ = n;
        let (_, code, _) = curl(proxy.addr, creds, &format!("http://{target}/hello"), &[]);
        assert_eq!(code, 407);
    }
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-D",
            "-",
            "--noproxy",
            "",
            "--proxy",
            &format!("http://{}", proxy.addr),
        ])
        .arg(format!("http://{target}/hello"))
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(
        head.contains("proxy-authenticate: basic realm=\"polydev egress\""),
        "{head}"
    );

    assert_eq!(connect(proxy.addr, Some((&u, &p)), &target).await.0, 200);
    proxy.egress.revoke(&u).await.unwrap();
    assert_eq!(
        connect(proxy.addr, Some((&u, &p)), &target).await.0,
        407,
        "revoked at once"
    );
    // Revoking a sandbox revokes all its credentials.
    let other = proxy.access(user, "work").await;
    assert_eq!(
        proxy
            .egress
            .revoke_sandbox(&other.credential.sandbox_id)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        connect(
            proxy.addr,
            Some((&other.credential.username, &other.credential.secret)),
            &target
        )
        .await
        .0,
        407
    );
    assert!(proxy
        .metrics()
        .contains("polydev_egress_denied_total{reason=\"auth\"}"));
    proxy.stop().await;
}

/// A base port with `n` free consecutive ports above it.
fn free_port_range(n: u16) -> u16 {
    let seed = (std::process::id() as u16 % 200) * 100;
    'outer: for base in (20000 + seed..60000).step_by(37) {
        for p in base..base + n {
            if std::net::TcpListener::bind(("127.0.0.1", p)).is_err() {
                continue 'outer;
            }
        }
        return base;
    }
    panic!("no free port range");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_users_port_accepts_only_that_users_credentials() {
    let base = free_port_range(4);
    let config = EgressConfig {
        per_user_ports: true,
        user_ports: polydev_egress::PortRange {
            first: base,
            last: base + 3,
        },
        ..loopback_config()
    };
    let proxy = Proxy::start(config).await;
    let (ada, bob) = (
        proxy.user("ada@example.com").await,
        proxy.user("bob@example.com").await,
    );
    let ada_access = proxy.access(ada, "work").await;
    let bob_access = proxy.access(bob, "work").await;
    assert_eq!(ada_access.user_port, Some(base));
    assert_eq!(bob_access.user_port, Some(base + 1));
    assert_eq!(
        proxy.access(ada, "browser").await.user_port,
        Some(base),
        "one port per user"
    );
    assert_eq!(
        proxy.store.proxy_ports().await.unwrap(),
        vec![(ada, base), (bob, base + 1)]
    );

    let http = http_stub().await;
    let target = format!("127.0.0.1:{}", http.port());
    let ada_port: std::net::SocketAddr = format!("127.0.0.1:{base}").parse().unwrap();
    // The listener comes up right after minting.
    let deadline = Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(ada_port).await.is_err() {
        assert!(Instant::now() < deadline, "per-user port never listened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (au, ap) = auth(&ada_access);
    let (bu, bp) = auth(&bob_access);
    assert_eq!(connect(ada_port, Some((&au, &ap)), &target).await.0, 200);
    assert_eq!(
        connect(ada_port, Some((&bu, &bp)), &target).await.0,
        407,
        "bob on ada's port"
    );
    // The shared port takes both.
    assert_eq!(connect(proxy.addr, Some((&bu, &bp)), &target).await.0, 200);
    let user_url = proxy.egress.user_proxy_url(&ada_access).unwrap();
    assert!(user_url.ends_with(&format!(":{base}")));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ssrf_attempts_are_refused_in_every_form() {
    // No exceptions: the built-in deny is whole.
    let proxy = Proxy::start(EgressConfig {
        allow_private: vec![],
        ..loopback_config()
    })
    .await;
    let user = proxy.user("ada@example.com").await;
    let access = proxy.access(user, "work").await;
    let (u, p) = auth(&access);
    let http = http_stub().await;
    let port = http.port();
    for target in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
        format!("[::ffff:127.0.0.1]:{port}"),
        format!("2130706433:{port}"),
        format!("0.0.0.0:{port}"),
        "169.254.169.254:80".to_owned(),
        "10.0.0.1:443".to_owned(),
        "192.168.1.1:443".to_owned(),
        "[fd00::1]:443".to_owned(),
        "[fe80::1]:443".to_owned(),
    ] {
        let (code, _) = connect(proxy.addr, Some((&u, &p)), &target).await;
        assert_eq!(code, 403, "CONNECT {target} was not refused");
        let (_, code, body) = curl(
            proxy.addr,
            Some((&u, &p)),
            &format!("http://{target}/hello"),
            &[],
        );
        assert_eq!(code, 403, "GET http://{target}/ was not refused: {body}");
        assert!(body.contains("private or reserved range"), "{body}");
    }
    proxy.stop().await;

    // With the stub allowed, a redirect from it to a private address is
    // refused when the client follows it through the proxy.
    let proxy = Proxy::start(EgressConfig {
        allow_private: vec!["127.0.0.0/8".into()],
        ..loopback_config()
    })
    .await;
    let user = proxy.user("ada@example.com").await;
    let access = proxy.access(user, "work").await;
    let (u, p) = auth(&access);
    for to in [
        "http://169.254.169.254/latest/meta-data/",
        "http://10.1.2.3/",
        "http://[::1]/",
    ] {
        let (_, code, body) = curl(
            proxy.addr,
            Some((&u, &p)),
            &format!("http://127.0.0.1:{port}/redirect?to={to}"),
            &["-L"],
        );
        assert_eq!(code, 403, "redirect to {to} followed: {body}");
    }
    assert!(proxy
        .metrics()
        .contains("polydev_egress_denied_total{reason=\"private_address\"} 3"));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn template_allow_lists_limit_destinations() {
    let mut config = loopback_config();
    config.policies.insert(
        "runtime".into(),
        PolicyConfig {
            allow_hosts: vec!["localhost".into()],
        },
    );
    let proxy = Proxy::start(config).await;
    let user = proxy.user("ada@example.com").await;
    let runtime = proxy.access(user, "runtime").await;
    let browser = proxy.access(user, "other").await;
    let http = http_stub().await;
    let (u, p) = auth(&runtime);
    let (_, code, _) = curl(
        proxy.addr,
        Some((&u, &p)),
        &format!("http://localhost:{}/hello", http.port()),
        &[],
    );
    assert_eq!(code, 200);
    let (_, code, body) = curl(
        proxy.addr,
        Some((&u, &p)),
        &format!("http://127.0.0.1:{}/hello", http.port()),
        &[],
    );
    assert_eq!(code, 403);
    assert!(
        body.contains("not on the allow-list of template runtime"),
        "{body}"
    );
    // A template without a policy may reach any (allowed) address.
    let (bu, bp) = auth(&browser);
    let (_, code, _) = curl(
        proxy.addr,
        Some((&bu, &bp)),
        &format!("http://127.0.0.1:{}/hello", http.port()),
        &[],
    );
    assert_eq!(code, 200);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn traffic_can_chain_through_an_upstream_proxy() {
    let upstream = Proxy::start(loopback_config()).await;
    let up_user = upstream.user("operator@example.com").await;
    let up_access = upstream.access(up_user, "upstream").await;
    let (uu, up) = auth(&up_access);
    let config = EgressConfig {
        upstream: Some(UpstreamConfig {
            url: format!("http://{uu}:{up}@127.0.0.1:{}", upstream.addr.port()),
            username_format: "{username}".into(),
            per_user: Default::default(),
        }),
        ..loopback_config()
    };
    let proxy = Proxy::start(config).await;
    let user = proxy.user("ada@example.com").await;
    let access = proxy.access(user, "work").await;
    let (u, p) = auth(&access);
    let http = http_stub().await;
    let (ok, code, body) = curl(
        proxy.addr,
        Some((&u, &p)),
        &format!("http://localhost:{}/bytes?n=5000", http.port()),
        &[],
    );
    assert!(ok && code == 200 && body.len() == 5000, "{code}");
    let (_, code, _) = curl(
        proxy.addr,
        Some((&u, &p)),
        &format!("http://localhost:{}/hello", http.port()),
        &["--proxytunnel"],
    );
    assert_eq!(code, 200);
    // The upstream saw (and accounted) the traffic as its own user's.
    upstream.egress.flush_usage().await;
    let usage = upstream.store.egress_usage(up_user).await.unwrap();
    assert_eq!(usage.len(), 1);
    assert!(
        usage[0].bytes_down >= 5000 && usage[0].tunnels == 2,
        "{usage:?}"
    );
    proxy.stop().await;
    upstream.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn per_user_limits_hold() {
    let config = EgressConfig {
        max_tunnels_per_user: 2,
        requests_per_sec_per_user: 1000,
        bandwidth_bytes_per_sec_per_user: 1_000_000,
        header_timeout_secs: 1,
        idle_timeout_secs: 2,
        ..loopback_config()
    };
    let proxy = Proxy::start(config).await;
    let (ada, bob) = (
        proxy.user("ada@example.com").await,
        proxy.user("bob@example.com").await,
    );
    let a = proxy.access(ada, "work").await;
    let b = proxy.access(bob, "work").await;
    let (au, ap) = auth(&a);
    let (bu, bp) = auth(&b);
    let echo = echo_server().await;
    let target = echo.to_string();

    // Tunnels: two open, the third refused, another user unaffected.
    let (c1, mut t1) = connect(proxy.addr, Some((&au, &ap)), &target).await;
    let (c2, _t2) = connect(proxy.addr, Some((&au, &ap)), &target).await;
    assert_eq!((c1, c2), (200, 200));
    assert_eq!(connect(proxy.addr, Some((&au, &ap)), &target).await.0, 429);
    assert_eq!(connect(proxy.addr, Some((&bu, &bp)), &target).await.0, 200);

    // Bandwidth: 3 MB echoed (6 MB through the proxy) at 1 MB/s cannot
    // finish in under ~4 s (one second of burst).
    let started = Instant::now();
    let payload = vec![7u8; 3_000_000];
    let (mut r, mut w) = t1.split();
    let send = async { w.write_all(&payload).await.unwrap() };
    let recv = async {
        let mut got = vec![0u8; payload.len()];
        r.read_exact(&mut got).await.unwrap();
        got
    };
    let (_, got) = tokio::join!(send, recv);
    assert_eq!(got.len(), 3_000_000);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(3800),
        "bandwidth not limited: {took:?}"
    );

    // Idle: a silent tunnel is closed after the idle timeout.
    let (code, mut idle) = connect(proxy.addr, Some((&bu, &bp)), &target).await;
    assert_eq!(code, 200);
    let started = Instant::now();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        started.elapsed()
    );

    // Slowloris: a request head never finished is cut off.
    let mut slow = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    slow.write_all(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut rest))
        .await
        .expect("cut off in time");
    assert!(started.elapsed() < Duration::from_secs(5));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn request_rates_are_limited_per_user() {
    let proxy = Proxy::start(EgressConfig {
        requests_per_sec_per_user: 5,
        ..loopback_config()
    })
    .await;
    let user = proxy.user("ada@example.com").await;
    let access = proxy.access(user, "work").await;
    let (u, p) = auth(&access);
    let http = http_stub().await;
    let mut codes = Vec::new();
    for _ in 0..12 {
        codes.push(
            connect(
                proxy.addr,
                Some((&u, &p)),
                &format!("127.0.0.1:{}", http.port()),
            )
            .await
            .0,
        );
    }
    assert!(
        codes.iter().filter(|c| **c == 200).count() <= 6,
        "{codes:?}"
    );
    assert!(codes.contains(&429), "{codes:?}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_is_recorded_per_user_and_sandbox_and_totals_exported() {
    let proxy = Proxy::start(loopback_config()).await;
    let user = proxy.user("ada@example.com").await;
    let access = proxy.access(user, "work").await;
    let (u, p) = auth(&access);
    let http = http_stub().await;
    let echo = echo_server().await;
    let (_, code, body) = curl(
        proxy.addr,
        Some((&u, &p)),
        &format!("http://localhost:{}/bytes?n=20000", http.port()),
        &[],
    );
    assert_eq!((code, body.len()), (200, 20000));
    let (code, mut tunnel) = connect(proxy.addr, Some((&u, &p)), &echo.to_string()).await;
    assert_eq!(code, 200);
    tunnel.write_all(&[1u8; 10_000]).await.unwrap();
    let mut back = vec![0u8; 10_000];
    tunnel.read_exact(&mut back).await.unwrap();
    drop(tunnel);
    // The tunnel counts when it opens; its last bytes once the pump has
    // written them on (the client may read them a moment before).
    let deadline = Instant::now() + Duration::from_secs(10);
    let usage = loop {
        proxy.egress.flush_usage().await;
        let usage = proxy.store.egress_usage(user).await.unwrap();
        if usage
            .first()
            .is_some_and(|u| u.tunnels == 1 && u.bytes_down >= 30_000 && u.bytes_up >= 10_000)
        {
            break usage;
        }
        assert!(
            Instant::now() < deadline,
            "the tunnel and all its bytes were never accounted: {usage:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(usage.len(), 1);
    let u0 = &usage[0];
    assert_eq!(u0.sandbox_id, access.credential.sandbox_id);
    assert_eq!((u0.requests, u0.tunnels), (1, 1));
    assert!(u0.bytes_down >= 30_000 && u0.bytes_down < 32_000, "{u0:?}");
    assert!(u0.bytes_up >= 10_000 && u0.bytes_up < 11_000, "{u0:?}");
    let metrics = proxy.metrics();
    assert!(
        metrics.contains("polydev_egress_tunnels_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("polydev_egress_requests_total 1"));
    assert!(
        !metrics.contains(&user.to_string()) && !metrics.contains(&access.credential.sandbox_id)
    );
    assert!(!metrics.contains(&access.credential.secret));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connect_after_a_forwarded_request_on_one_connection_still_tunnels() {
    use base64::Engine;
    let proxy = Proxy::start(loopback_config()).await;
    let user = proxy.user("ada@example.com").await;
    let access = proxy.access(user, "work").await;
    let (u, p) = auth(&access);
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
    let http = http_stub().await;
    let echo = echo_server().await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    // First an absolute-form GET (served by hyper, connection kept alive)…
    s.write_all(
        format!("GET http://127.0.0.1:{}/hello HTTP/1.1\r\nHost: 127.0.0.1\r\nProxy-Authorization: Basic {token}\r\n\r\n", http.port())
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("hello from stub") {
        let mut b = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n > 0,
            "connection closed early: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&b[..n]);
    }
    // …then CONNECT on the same connection, with bytes pipelined after it.
    s.write_all(
        format!(
            "CONNECT {echo} HTTP/1.1\r\nHost: {echo}\r\nProxy-Authorization: Basic {token}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await.unwrap());
    }
    assert!(
        String::from_utf8_lossy(&head).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s.write_all(b"through hyper's tunnel").await.unwrap();
    let mut back = [0u8; 22];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"through hyper's tunnel");

    // On the fast path, bytes sent right behind the CONNECT head arrive too.
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        format!("CONNECT {echo} HTTP/1.1\r\nProxy-Authorization: Basic {token}\r\n\r\nearly bytes")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await.unwrap());
    }
    let mut back = [0u8; 11];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"early bytes");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_destinations_get_502() {
    let proxy = Proxy::start(loopback_config()).await;
    let user = proxy.user("ada@example.com").await;
    let access = proxy.access(user, "work").await;
    let (u, p) = auth(&access);
    // A loopback port nobody listens on (allowed by the exception, refused by the kernel).
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    assert_eq!(
        connect(proxy.addr, Some((&u, &p)), &closed.to_string())
            .await
            .0,
        502
    );
    let (_, code, body) = curl(
        proxy.addr,
        Some((&u, &p)),
        &format!("http://{closed}/"),
        &[],
    );
    assert_eq!(code, 502, "{body}");
    let (_, code, _) = curl(
        proxy.addr,
        Some((&u, &p)),
        "http://no-such-host.invalid/",
        &[],
    );
    assert_eq!(code, 502);
    proxy.stop().await;
}
