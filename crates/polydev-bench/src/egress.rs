//! `polydev-bench egress`: the egress proxy (standalone `polydev egress`)
//! and tinyproxy (Debian package), one after the other, driven by the same
//! client against the same loopback targets, both with Basic auth.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::Engine;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::BenchArgs;

/// A proxy process under test; killed on drop.
struct ProxyProcess {
    child: Child,
    addr: SocketAddr,
    auth: String,
    _dir: tempfile::TempDir,
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ProxyProcess {
    fn rss_kib(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS")
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn wait_listening(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            bail!("proxy at {addr} did not come up within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// polydev's proxy, standalone, with one minted credential.
async fn start_polydev() -> anyhow::Result<ProxyProcess> {
    let exe = crate::polydev_exe()?;
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    std::fs::write(
        dir.path().join("polydev.toml"),
        "[egress]\nallow_private = [\"127.0.0.0/8\"]\nper_user_ports = false\nmax_tunnels_per_user = 100000\nrequests_per_sec_per_user = 1000000\n",
    )?;
    // A user and a credential, minted straight into the proxy's store.
    let out = Command::new(&exe)
        .args(["user", "add", "--email", "bench@example.com", "--data-dir"])
        .arg(dir.path())
        .output()?;
    if !out.status.success() {
        bail!("user add failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let user: Value = serde_json::from_slice(&out.stdout)?;
    let user_id = polydev_domain::UserId::parse("id", user["id"].as_str().unwrap_or_default())?;
    let store = polydev_store::Store::connect(
        &polydev_store::Store::sqlite_url(dir.path()),
        &Default::default(),
    )
    .await?;
    let config = polydev_egress::EgressConfig {
        per_user_ports: false,
        ..Default::default()
    };
    let minter = polydev_egress::Egress::new(config, store.clone(), &mut Default::default())?;
    // A template without a built-in allow-list (runtime's names the providers only).
    let access = minter.mint(user_id, "bench", "minimal").await?;
    store.close().await;
    let child = Command::new(&exe)
        .args([
            "egress",
            "--log-level",
            "warn",
            "--egress-listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(dir.path())
        .arg("--config")
        .arg(dir.path().join("polydev.toml"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let proc = ProxyProcess {
        child,
        addr,
        auth: basic(&access.credential.username, &access.credential.secret),
        _dir: dir,
    };
    wait_listening(addr).await?;
    Ok(proc)
}

/// tinyproxy with Basic auth, all CONNECT ports allowed, quiet logs.
async fn start_tinyproxy() -> anyhow::Result<ProxyProcess> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let conf = dir.path().join("tinyproxy.conf");
    std::fs::write(
        &conf,
        format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 600\nMaxClients 4000\nAllow 127.0.0.1\nBasicAuth bench benchsecret\nLogLevel Critical\nLogFile \"{}\"\n",
            dir.path().join("tinyproxy.log").display()
        ),
    )?;
    let child = Command::new("tinyproxy")
        .arg("-d")
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start tinyproxy (Debian package tinyproxy)")?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut proc = ProxyProcess {
        child,
        addr,
        auth: basic("bench", "benchsecret"),
        _dir: dir,
    };
    if let Err(e) = wait_listening(addr).await {
        let mut err = String::new();
        if let Some(stderr) = proc.child.stderr.take() {
            for line in BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
                .take(20)
            {
                err.push_str(&line);
                err.push('\n');
            }
        }
        bail!("{e}: {err}");
    }
    Ok(proc)
}

fn basic(user: &str, secret: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}"))
    )
}

/// A tunnel through `proxy` to `target`, or an error naming the status.
async fn tunnel(proxy: SocketAddr, auth: &str, target: SocketAddr) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(proxy).await?;
    s.set_nodelay(true)?;
    s.write_all(
        format!(
            "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: {auth}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    let mut head = Vec::with_capacity(128);
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await?);
        if head.len() > 4096 {
            bail!("response head too long");
        }
    }
    let line = String::from_utf8_lossy(&head);
    if line.split_whitespace().nth(1) != Some("200") {
        bail!("CONNECT refused: {}", line.lines().next().unwrap_or(""));
    }
    Ok(s)
}

/// Reads a byte count, sends that many bytes, closes.
async fn source() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut left) = s.read_u64().await else {
                    return;
                };
                let chunk = vec![0x5au8; 256 * 1024];
                while left > 0 {
                    let n = left.min(chunk.len() as u64) as usize;
                    if s.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    left -= n as u64;
                }
            });
        }
    });
    Ok(addr)
}

/// A TCP echo server on loopback (TCP_NODELAY), for the benches.
pub(crate) async fn echo() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(addr)
}

/// Downloads `bytes` through one tunnel; MB/s (10^6 bytes).
async fn throughput(p: &ProxyProcess, target: SocketAddr, bytes: u64) -> anyhow::Result<f64> {
    let mut t = tunnel(p.addr, &p.auth, target).await?;
    let started = Instant::now();
    t.write_u64(bytes).await?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    while got < bytes {
        match t.read(&mut buf).await? {
            0 => break,
            n => got += n as u64,
        }
    }
    let secs = started.elapsed().as_secs_f64();
    if got != bytes {
        bail!("received {got} of {bytes} bytes");
    }
    Ok(bytes as f64 / secs / 1e6)
}

async fn setup_rate(
    p: &ProxyProcess,
    target: SocketAddr,
    total: usize,
    workers: usize,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for w in 0..workers {
        let (addr, auth) = (p.addr, p.auth.clone());
        let n = total / workers + usize::from(w < total % workers);
        set.spawn(async move {
            for _ in 0..n {
                let t = tunnel(addr, &auth, target).await?;
                drop(t);
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// Latency figures over many open tunnels.
struct ManyTunnels {
    /// One 32-byte round trip at a time, round-robin over every open
    /// tunnel, three rounds: the latency the proxy adds.
    p50_ms: f64,
    p99_ms: f64,
    /// Every tunnel at once, five round trips each: mostly queueing.
    burst_p50_ms: f64,
    burst_p99_ms: f64,
    idle_kib: f64,
}

async fn ping(t: &mut TcpStream) -> anyhow::Result<f64> {
    let msg = [7u8; 32];
    let mut back = [0u8; 32];
    let started = Instant::now();
    t.write_all(&msg).await?;
    t.read_exact(&mut back).await?;
    Ok(started.elapsed().as_secs_f64() * 1000.0)
}

/// Opens `n` tunnels, measures RSS growth per tunnel, then latency.
async fn many_tunnels(
    p: &ProxyProcess,
    target: SocketAddr,
    n: usize,
) -> anyhow::Result<ManyTunnels> {
    let before = p.rss_kib()?;
    let mut tunnels = Vec::with_capacity(n);
    for _ in 0..n {
        tunnels.push(tunnel(p.addr, &p.auth, target).await?);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = p.rss_kib()?;
    let idle_kib = (after.saturating_sub(before)) as f64 / n as f64;

    let mut sequential = Vec::with_capacity(3 * n);
    for _ in 0..3 {
        for t in tunnels.iter_mut() {
            sequential.push(ping(t).await?);
        }
    }
    sequential.sort_by(|a, b| a.total_cmp(b));

    let mut set = tokio::task::JoinSet::new();
    for mut t in tunnels {
        set.spawn(async move {
            let mut lat = Vec::with_capacity(5);
            for _ in 0..5 {
                lat.push(ping(&mut t).await?);
            }
            anyhow::Ok(lat)
        });
    }
    let mut burst = Vec::new();
    while let Some(r) = set.join_next().await {
        burst.extend(r??);
    }
    burst.sort_by(|a, b| a.total_cmp(b));
    Ok(ManyTunnels {
        p50_ms: crate::kit::percentile(sequential.clone(), 0.5),
        p99_ms: crate::kit::percentile(sequential.clone(), 0.99),
        burst_p50_ms: crate::kit::percentile(burst.clone(), 0.5),
        burst_p99_ms: crate::kit::percentile(burst.clone(), 0.99),
        idle_kib,
    })
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let sink = source().await?;
    let echo = echo().await?;
    let mut figures = Map::new();
    for (prefix, start) in [("", true), ("tinyproxy_", false)] {
        let proxy = if start {
            start_polydev().await?
        } else {
            start_tinyproxy().await?
        };
        let mut put = |k: &str, v: f64| {
            figures.insert(format!("{prefix}{k}"), json!((v * 1000.0).round() / 1000.0));
        };
        // Warm up, then measure.
        let who = if start { "polydev" } else { "tinyproxy" };
        throughput(&proxy, sink, 64 << 20)
            .await
            .with_context(|| format!("{who}: warm-up transfer"))?;
        put(
            "throughput_mb_s",
            throughput(&proxy, sink, args.transfer_bytes)
                .await
                .with_context(|| format!("{who}: transfer"))?,
        );
        put(
            "tunnels_per_s",
            setup_rate(&proxy, echo, 2000, 16)
                .await
                .with_context(|| format!("{who}: tunnel setups"))?,
        );
        let many = many_tunnels(&proxy, echo, args.tunnels)
            .await
            .with_context(|| format!("{who}: {} tunnels", args.tunnels))?;
        put("latency_p50_ms", many.p50_ms);
        put("latency_p99_ms", many.p99_ms);
        put("burst_latency_p50_ms", many.burst_p50_ms);
        put("burst_latency_p99_ms", many.burst_p99_ms);
        put("idle_tunnel_kib", many.idle_kib);
        drop(proxy);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    if args.json {
        println!("{}", Value::Object(figures));
    } else {
        println!(
            "egress proxy vs tinyproxy on loopback: {} MiB CONNECT download, 2000 tunnel setups (16 workers), {} tunnels held",
            args.transfer_bytes >> 20,
            args.tunnels
        );
        for (k, v) in &figures {
            println!("{k:>32}  {v}");
        }
    }
    Ok(())
}
