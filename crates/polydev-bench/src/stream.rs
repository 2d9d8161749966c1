//! `polydev-bench stream`: the login viewer's WebSocket bridge side by side
//! with websockify (Debian package) in front of the same TCP echo server —
//! throughput each way and small-message round trips (raw TCP as the
//! floor) — and a login session from start to the first framebuffer update
//! at an RFB client, over the real API and bridge (p50 over 10).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

use crate::kit::{percentile, report, Server};
use crate::BenchArgs;

const RTT_SAMPLES: usize = 2000;
const LOGIN_ROUNDS: usize = 10;

/// polydev's bridge in front of `echo`, on an axum server like the
/// controller's (TCP_NODELAY on accepted sockets).
async fn polydev_bridge(echo: std::net::SocketAddr) -> anyhow::Result<std::net::SocketAddr> {
    let tasks = std::sync::Arc::new(polydev_sessions::tasks::Tasks::new());
    let app = axum::Router::new().route(
        "/ws",
        axum::routing::get(move |upgrade: polydev_api::ws::Upgrade| async move {
            upgrade.on_upgrade(&tasks, move |socket| async move {
                if let Ok(tcp) = TcpStream::connect(echo).await {
                    let _ = tcp.set_nodelay(true);
                    let (_keep, ending) = tokio::sync::watch::channel(None);
                    let tcp = polydev_api::ws::Stream::Tcp(tcp);
                    polydev_api::bridge(socket, tcp, ending, || {}, Default::default()).await;
                }
            })
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    // The controller's own server (TCP_NODELAY on accepted sockets).
    tokio::spawn(polydev_api::serve(listener, app, std::future::pending()));
    Ok(addr)
}

/// A bridge in a `polydev-bench stream --bridge-to ECHO` process of its own.
async fn bridge_process(
    echo: std::net::SocketAddr,
) -> anyhow::Result<(Owned, std::net::SocketAddr)> {
    use std::io::BufRead;
    // Its stdin is a pipe from this process: when this process ends, in
    // any way, the pipe closes and the bridge process ends with it.
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(["stream", "--bridge-to"])
        .arg(echo.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut guard = Owned::spawn(cmd)?;
    let out = guard.0.stdout.take().context("no stdout")?;
    let line = tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(out).lines().next().transpose()
    })
    .await??
    .context("the bridge process printed nothing")?;
    Ok((guard, line.trim().parse()?))
}

/// `--bridge-to`: serve the bridge until stdin closes (the benchmark that
/// started this process ended) or it is killed.
pub async fn serve_bridge(echo: std::net::SocketAddr) -> anyhow::Result<()> {
    let addr = polydev_bridge(echo).await?;
    println!("{addr}");
    tokio::task::spawn_blocking(|| {
        let mut sink = [0u8; 64];
        while std::io::Read::read(&mut std::io::stdin(), &mut sink).is_ok_and(|n| n > 0) {}
    })
    .await?;
    Ok(())
}

/// A process this benchmark started (and, in its own process group,
/// whatever that process forks: websockify forks one per connection),
/// killed and reaped on drop, so no run leaves one behind.
struct Owned(std::process::Child);

impl Owned {
    fn spawn(mut cmd: std::process::Command) -> std::io::Result<Self> {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0).spawn().map(Self)
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        if let Ok(pgid) = i32::try_from(self.0.id()) {
            // The group this process leads: it and its forks.
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Owned {
    /// CPU seconds used so far by the process and its children (websockify
    /// forks one per connection): its own and reaped children's time, plus
    /// that of live descendants.
    fn cpu_secs(&self) -> f64 {
        fn fields(pid: u32) -> Option<(u32, [f64; 4])> {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // After the command (which may hold spaces): state is field 3.
            let rest = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let n = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            let ppid = f.get(1)?.parse().ok()?;
            // utime, stime, cutime, cstime: fields 14 to 17.
            Some((ppid, [n(11), n(12), n(13), n(14)]))
        }
        let root = self.0.id();
        let mut parents = std::collections::HashMap::new();
        let mut times = std::collections::HashMap::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            if let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|p| p.parse::<u32>().ok())
            {
                if let Some((ppid, t)) = fields(pid) {
                    parents.insert(pid, ppid);
                    times.insert(pid, t);
                }
            }
        }
        let descends = |mut pid: u32| {
            while let Some(&p) = parents.get(&pid) {
                if p == root {
                    return true;
                }
                if p <= 1 {
                    return false;
                }
                pid = p;
            }
            false
        };
        let mut ticks = times.get(&root).map_or(0.0, |t| t.iter().sum());
        for (pid, t) in &times {
            if *pid != root && descends(*pid) {
                ticks += t[0] + t[1];
            }
        }
        ticks / 100.0
    }
}

async fn websockify(echo: std::net::SocketAddr) -> anyhow::Result<(Owned, std::net::SocketAddr)> {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let mut cmd = std::process::Command::new("websockify");
    cmd.arg(format!("127.0.0.1:{port}"))
        .arg(echo.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let guard =
        Owned::spawn(cmd).context("websockify is not installed (Debian package `websockify`)")?;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    for _ in 0..200 {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok((guard, addr));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("websockify did not listen")
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn connect(url: &str) -> anyhow::Result<Ws> {
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)?;
    // As a browser on the server's own page would: the viewer requires
    // its Origin.
    let origin = match req.uri().authority() {
        Some(a) => format!("http://{a}"),
        None => bail!("no host in {url}"),
    };
    req.headers_mut()
        .insert("sec-websocket-protocol", "binary".parse()?);
    req.headers_mut().insert("origin", origin.parse()?);
    let (ws, _) = tokio_tungstenite::connect_async(req).await?;
    Ok(ws)
}

/// A WebSocket client for the throughput figures that costs as little as
/// a client can, so that the bridges, not the client, set the pace (both
/// bridges get the same one): its frames are masked once, with a fixed key,
/// and sent 64 KiB at a time; the echo is counted where it was read, never
/// copied into messages. (A browser masks each frame with a fresh key;
/// that is the client's work, not the bridge's, which unmasks either way.)
async fn lean_connect(url: &str) -> anyhow::Result<TcpStream> {
    let rest = url.strip_prefix("ws://").context("a ws:// URL")?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut s = TcpStream::connect(authority).await?;
    s.set_nodelay(true)?;
    let path = if path.is_empty() { "/" } else { path };
    s.write_all(
        format!(
            "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: binary\r\nOrigin: http://{authority}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 8192 || s.read(&mut byte).await? == 0 {
            bail!("no WebSocket handshake from {url}");
        }
        head.push(byte[0]);
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        bail!(
            "{url} refused the upgrade: {}",
            String::from_utf8_lossy(&head)
        );
    }
    Ok(s)
}

/// Counts the payload bytes of the server frames in a byte stream that
/// may split a header anywhere.
#[derive(Default)]
struct FrameCounter {
    head: Vec<u8>,
    payload_left: u64,
    data: bool,
}

impl FrameCounter {
    /// The data payload bytes in `chunk`.
    fn count(&mut self, mut chunk: &[u8]) -> anyhow::Result<u64> {
        let mut data = 0;
        while !chunk.is_empty() {
            if self.payload_left > 0 {
                let k = self.payload_left.min(chunk.len() as u64);
                if self.data {
                    data += k;
                }
                self.payload_left -= k;
                chunk = &chunk[k as usize..];
                continue;
            }
            self.head.push(chunk[0]);
            chunk = &chunk[1..];
            let h = &self.head;
            if h.len() < 2 {
                continue;
            }
            let need = match h[1] & 0x7F {
                126 => 4,
                127 => 10,
                _ => 2,
            };
            if h[1] & 0x80 != 0 {
                bail!("the server masked a frame");
            }
            if h.len() < need {
                continue;
            }
            self.payload_left = match need {
                4 => u64::from(u16::from_be_bytes([h[2], h[3]])),
                10 => u64::from_be_bytes(h[2..10].try_into()?),
                _ => u64::from(h[1] & 0x7F),
            };
            self.data = matches!(h[0] & 0x0F, 0 | 2);
            if h[0] & 0x0F == 8 {
                bail!("the bridge closed the connection");
            }
            self.head.clear();
        }
        Ok(data)
    }
}

/// MB/s through the bridge and back: `total` bytes in `chunk`-byte
/// messages, written and read concurrently.
async fn throughput(url: &str, total: usize, chunk: usize) -> anyhow::Result<f64> {
    let s = lean_connect(url).await?;
    let (mut rd, mut wr) = s.into_split();
    // One masked frame, repeated to fill 64 KiB per write.
    let key = [0x3a, 0x91, 0x5c, 0xe7];
    let frame =
        polydev_api::ws::client_frame(true, polydev_api::ws::OP_BINARY, &vec![7u8; chunk], key);
    let per_write = (65536 / chunk).max(1);
    let batch = frame.repeat(per_write);
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        let mut sent = 0;
        while sent < total {
            let frames = per_write.min((total - sent).div_ceil(chunk));
            wr.write_all(&batch[..frames * frame.len()]).await?;
            sent += frames * chunk;
        }
        anyhow::Ok(wr)
    });
    let mut counter = FrameCounter::default();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    while got < total as u64 {
        let n = tokio::time::timeout(Duration::from_secs(30), rd.read(&mut buf)).await??;
        if n == 0 {
            bail!("the bridge ended early after {got} bytes");
        }
        got += counter.count(&buf[..n])?;
    }
    let secs = start.elapsed().as_secs_f64();
    let _ = writer.await?;
    Ok(total as f64 / secs / 1e6)
}

/// Round trips of a 32-byte message, in µs.
async fn ws_rtt(url: &str) -> anyhow::Result<Vec<f64>> {
    let mut ws = connect(url).await?;
    let msg = vec![1u8; 32];
    let mut out = Vec::with_capacity(RTT_SAMPLES);
    for i in 0..RTT_SAMPLES + 100 {
        let t = Instant::now();
        ws.send(Message::Binary(msg.clone().into())).await?;
        let mut got = 0;
        while got < msg.len() {
            match ws.next().await {
                Some(Ok(Message::Binary(b))) => got += b.len(),
                Some(Ok(_)) => {}
                other => bail!("the bridge ended early: {other:?}"),
            }
        }
        if i >= 100 {
            out.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    Ok(out)
}

async fn tcp_rtt(echo: std::net::SocketAddr) -> anyhow::Result<Vec<f64>> {
    let mut s = TcpStream::connect(echo).await?;
    s.set_nodelay(true)?;
    let mut buf = [0u8; 32];
    let mut out = Vec::with_capacity(RTT_SAMPLES);
    for i in 0..RTT_SAMPLES + 100 {
        let t = Instant::now();
        s.write_all(&[1u8; 32]).await?;
        s.read_exact(&mut buf).await?;
        if i >= 100 {
            out.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    Ok(out)
}

/// A login session from `POST /api/auth/start` to the first framebuffer
/// update at an RFB client through the bridge: (to `ready`, to the first
/// frame), ms.
async fn first_frame(base: &str, user: &str, token: &str) -> anyhow::Result<(f64, f64)> {
    let http = reqwest::Client::new();
    let t = Instant::now();
    let r: Value = http
        .post(format!("{base}/api/auth/start"))
        .bearer_auth(token)
        .json(&json!({"userId": user, "provider": "codex"}))
        .send()
        .await?
        .json()
        .await?;
    let id = r["sessionId"]
        .as_str()
        .with_context(|| format!("start refused: {r}"))?
        .to_owned();
    let result = async {
        // Ready once the remote browser's VNC server greets.
        let ready = loop {
            let v: Value = http
                .get(format!("{base}/api/auth/session/{id}"))
                .bearer_auth(token)
                .send()
                .await?
                .json()
                .await?;
            match v["state"].as_str() {
                Some("ready" | "awaiting_login") => break t.elapsed().as_secs_f64() * 1e3,
                Some("booting") => {}
                _ => bail!("login session did not come up: {v}"),
            }
            if t.elapsed() > Duration::from_secs(30) {
                bail!("login session not ready in 30 s");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let ticket: Value = http
            .post(format!("{base}/api/auth/session/{id}/ticket"))
            .bearer_auth(token)
            .send()
            .await?
            .json()
            .await?;
        let path = ticket["path"].as_str().context("no ticket")?;
        let mut ws = connect(&format!("{}{path}", base.replace("http://", "ws://"))).await?;
        // A byte stream over the frames: the RFB handshake up to the
        // first FramebufferUpdate (message type 0).
        let mut buf: Vec<u8> = Vec::new();
        async fn fill(ws: &mut Ws, buf: &mut Vec<u8>, n: usize) -> anyhow::Result<()> {
            while buf.len() < n {
                match tokio::time::timeout(Duration::from_secs(10), ws.next()).await? {
                    Some(Ok(Message::Binary(b))) => buf.extend_from_slice(&b),
                    Some(Ok(_)) => {}
                    other => bail!("the viewer stream ended: {other:?}"),
                }
            }
            Ok(())
        }
        fill(&mut ws, &mut buf, 12).await?;
        buf.drain(..12);
        ws.send(Message::Binary(b"RFB 003.008\n".to_vec().into()))
            .await?;
        fill(&mut ws, &mut buf, 1).await?;
        let n = buf[0] as usize;
        fill(&mut ws, &mut buf, 1 + n).await?;
        buf.drain(..1 + n);
        ws.send(Message::Binary(vec![1u8].into())).await?; // security: None
        fill(&mut ws, &mut buf, 4).await?;
        buf.drain(..4);
        ws.send(Message::Binary(vec![1u8].into())).await?; // shared
        fill(&mut ws, &mut buf, 24).await?;
        let name_len = u32::from_be_bytes([buf[20], buf[21], buf[22], buf[23]]) as usize;
        let (w, h) = (
            u16::from_be_bytes([buf[0], buf[1]]),
            u16::from_be_bytes([buf[2], buf[3]]),
        );
        fill(&mut ws, &mut buf, 24 + name_len).await?;
        buf.drain(..24 + name_len);
        // FramebufferUpdateRequest, full screen, not incremental.
        let mut req = vec![3u8, 0, 0, 0, 0, 0];
        req.extend_from_slice(&w.to_be_bytes());
        req.extend_from_slice(&h.to_be_bytes());
        ws.send(Message::Binary(req.into())).await?;
        fill(&mut ws, &mut buf, 1).await?;
        if buf[0] != 0 {
            bail!("expected a FramebufferUpdate, got message type {}", buf[0]);
        }
        anyhow::Ok((ready, t.elapsed().as_secs_f64() * 1e3))
    }
    .await;
    let _ = http
        .delete(format!("{base}/api/auth/session/{id}"))
        .bearer_auth(token)
        .send()
        .await;
    result
}

/// Until the minimal template's pool holds a member (30 s at most).
pub(crate) async fn wait_for_pool(base: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = reqwest::get(format!("{base}/metrics"))
            .await?
            .text()
            .await?;
        let filled = text
            .lines()
            .find(|l| l.starts_with("polydev_pool_size{template=\"minimal\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse::<f64>().ok())
            .is_some_and(|n| n >= 1.0);
        if filled {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the warm pool did not fill in 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let mut f = Map::new();
    let echo = crate::egress::echo().await?;
    let (_bridge, ours) = bridge_process(echo).await?;
    let (_wsfy, theirs) = websockify(echo).await?;
    let ours_url = format!("ws://{ours}/ws");
    let theirs_url = format!("ws://{theirs}/");
    let total = (args.transfer_bytes as usize).clamp(1 << 20, 1 << 30);
    let round1 = |v: f64| (v * 10.0).round() / 10.0;
    for (name, chunk) in [("64k", 64 * 1024), ("4k", 4 * 1024)] {
        let bytes = if chunk < 65536 { total / 4 } else { total };
        for (who, url, process) in [
            ("bridge", &ours_url, &_bridge),
            ("websockify", &theirs_url, &_wsfy),
        ] {
            let cpu = process.cpu_secs();
            let started = Instant::now();
            let mb_s = throughput(url, bytes, chunk).await?;
            // Cores the bridging process kept busy, and MB it moved per CPU second.
            let cores = (process.cpu_secs() - cpu) / started.elapsed().as_secs_f64();
            f.insert(format!("{who}_{name}_mb_s"), json!(round1(mb_s)));
            f.insert(
                format!("{who}_{name}_cores"),
                json!((cores * 100.0).round() / 100.0),
            );
            if cores > 0.0 {
                f.insert(
                    format!("{who}_{name}_mb_per_cpu_s"),
                    json!(round1(mb_s / cores)),
                );
            }
        }
    }
    let tcp = tcp_rtt(echo).await?;
    let ours_rtt = ws_rtt(&ours_url).await?;
    let theirs_rtt = ws_rtt(&theirs_url).await?;
    for (name, v) in [
        ("tcp", tcp),
        ("bridge", ours_rtt),
        ("websockify", theirs_rtt),
    ] {
        f.insert(
            format!("{name}_rtt_p50_us"),
            json!(percentile(v.clone(), 0.5).round()),
        );
        f.insert(
            format!("{name}_rtt_p99_us"),
            json!(percentile(v, 0.99).round()),
        );
    }
    let added_p99 = f["bridge_rtt_p99_us"].as_f64().unwrap_or(0.0)
        - f["tcp_rtt_p99_us"].as_f64().unwrap_or(0.0);
    f.insert("bridge_added_p99_us".into(), json!(added_p99.round()));

    // Login start → first framebuffer update: cold (a new sandbox and
    // desktop each time), then warm (a pool member whose desktop runs).
    for (name, pool) in [("cold", 0), ("warm", 2)] {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("polydev.toml");
        std::fs::write(
            &config,
            format!("[sandbox]\npools = {{minimal = {pool}}}\n[egress]\nper_user_ports = false\n[egress.policies.minimal]\nallow_hosts = [\"auth.stub.test\"]\n[login]\ntemplate = \"minimal\"\n[login.providers.codex]\nbrowser = \"exec sleep 600\"\ncredential_file = \"/home/sandbox/never\"\n"),
        )?;
        let server = Server::start(&["--config", config.to_str().unwrap_or_default()])?;
        let base = format!("http://{}", server.addr);
        let (user, token) = server.vault_user(&format!("{name}@example.com"))?;
        let mut times = Vec::new();
        let mut readies = Vec::new();
        for _ in 0..LOGIN_ROUNDS {
            if pool > 0 {
                wait_for_pool(&base).await?;
            }
            let (ready, frame) = first_frame(&base, &user, &token).await?;
            readies.push(ready);
            times.push(frame);
        }
        f.insert(
            format!("{name}_ready_p50_ms"),
            json!(percentile(readies, 0.5).round()),
        );
        f.insert(
            format!("{name}_first_frame_p50_ms"),
            json!(percentile(times.clone(), 0.5).round()),
        );
        f.insert(
            format!("{name}_first_frame_max_ms"),
            json!(percentile(times, 1.0).round()),
        );
    }
    report(args.json, f);
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::Owned;

    fn alive(pid: i32) -> bool {
        // A zombie is gone for our purpose: reaped or about to be.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.rsplit_once(')').unwrap().1.trim_start().starts_with('Z'))
            .unwrap_or(false)
    }

    /// Dropping an owned process ends it and everything it forked (as
    /// websockify forks per connection): nothing outlives the benchmark.
    #[test]
    fn an_owned_process_and_its_forks_end_on_drop() {
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", "sleep 300 & echo $!; wait"])
            .stdout(std::process::Stdio::piped());
        let mut owned = Owned::spawn(cmd).unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(owned.0.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let fork: i32 = line.trim().parse().unwrap();
        let shell = i32::try_from(owned.0.id()).unwrap();
        assert!(alive(fork) && alive(shell), "the control: both run");
        drop(owned);
        polydev_testkit::eventually_blocking(
            std::time::Duration::from_secs(5),
            "the fork ends with its owner",
            || (!alive(fork)).then_some(()),
        );
        assert!(!alive(shell));
    }
}
