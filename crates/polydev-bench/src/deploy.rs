//! `polydev-bench deploy`: deploys this build to a throw-away OpenSSH
//! server on loopback (own host key, own client key; Debian
//! `openssh-server`), under a steady request load, and reports the
//! duration of each step, the rollback time and the failed requests.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Map, Value};

use crate::BenchArgs;

fn keygen(path: &Path) -> anyhow::Result<()> {
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .status()
        .context("cannot run ssh-keygen (Debian openssh-client)")?
        .success();
    if !ok {
        bail!("ssh-keygen failed");
    }
    Ok(())
}

fn port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    keygen(&d.join("host_key"))?;
    keygen(&d.join("client_key"))?;
    std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys"))?;
    let ssh_port = port()?;
    std::fs::write(
        d.join("sshd_config"),
        format!(
            "Port {ssh_port}\nListenAddress 127.0.0.1\nHostKey {p}/host_key\nAuthorizedKeysFile {p}/authorized_keys\nPidFile {p}/sshd.pid\nStrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n",
            p = d.display()
        ),
    )?;
    let host_pub = std::fs::read_to_string(d.join("host_key.pub"))?;
    std::fs::write(
        d.join("known_hosts"),
        format!("[127.0.0.1]:{ssh_port} {host_pub}"),
    )?;
    std::fs::create_dir_all("/run/sshd")?;
    let mut sshd = Command::new("/usr/sbin/sshd")
        .args(["-D", "-e", "-f"])
        .arg(d.join("sshd_config"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start sshd (Debian openssh-server)")?;
    let result = bench(args, d, ssh_port).await;
    // The supervisor the bootstrap started, then sshd.
    if let Ok(pid) = std::fs::read_to_string(d.join("opt/run/supervisor.pid")) {
        if let Ok(pid) = pid.trim().parse::<i32>() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
            for _ in 0..200 {
                if !d.join("opt/run/supervisor.pid").exists() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let _ = sshd.kill();
    let _ = sshd.wait();
    result
}

async fn bench(args: &BenchArgs, d: &Path, ssh_port: u16) -> anyhow::Result<()> {
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", ssh_port)).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let root = d.join("opt");
    std::fs::create_dir_all(root.join("shared"))?;
    std::fs::write(
        root.join("shared/polydev.toml"),
        format!(
            "data_dir = \"{}\"\nlog_format = \"json\"\n[egress]\nlisten = \"127.0.0.1:0\"\n[sandbox]\nenabled = false\n",
            root.join("shared/data").display()
        ),
    )?;
    let listen = format!("127.0.0.1:{}", port()?);
    let exe = crate::polydev_exe()?;
    let ssh: Vec<String> = vec![
        "--host".into(),
        "root@127.0.0.1".into(),
        "--port".into(),
        ssh_port.to_string(),
        "--identity".into(),
        d.join("client_key").display().to_string(),
        "--ssh-option".into(),
        format!("UserKnownHostsFile={}", d.join("known_hosts").display()),
        "--root".into(),
        root.display().to_string(),
    ];
    let polydev = |cmd: &str, extra: &[&str]| -> anyhow::Result<(f64, bool)> {
        let t = Instant::now();
        let out = Command::new(&exe)
            .arg(cmd)
            .args(&ssh)
            .args(extra)
            .stdin(Stdio::null())
            .output()?;
        Ok((t.elapsed().as_secs_f64() * 1000.0, out.status.success()))
    };
    let (_, ok) = polydev(
        "deploy",
        &["--bootstrap", "--listen", &listen, "--keep", "5"],
    )?;
    if !ok {
        bail!("bootstrap failed");
    }

    let stop = Arc::new(AtomicBool::new(false));
    let (okn, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, okn, failed, listen) =
            (stop.clone(), okn.clone(), failed.clone(), listen.clone());
        load.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            while !stop.load(Ordering::Relaxed) {
                match client
                    .get(format!("http://{listen}/api/auth/health"))
                    .send()
                    .await
                {
                    Ok(r) if r.status().is_success() => okn.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    let rounds = 3;
    let mut deploy_ms = Vec::new();
    for _ in 0..rounds {
        let (ms, ok) = polydev("deploy", &["--keep", "5"])?;
        if !ok {
            bail!("a deploy failed");
        }
        deploy_ms.push(ms);
    }
    let mut rollback_ms = Vec::new();
    for _ in 0..rounds {
        let (ms, ok) = polydev("rollback", &[])?;
        if !ok {
            bail!("a rollback failed");
        }
        rollback_ms.push(ms);
    }
    stop.store(true, Ordering::Relaxed);
    for l in load {
        let _ = l.await;
    }

    let out = Command::new(&exe)
        .arg("deployments")
        .args(&ssh)
        .arg("--json")
        .output()?;
    let v: Value = serde_json::from_slice(&out.stdout).context("deployments --json")?;
    let mut steps: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    let mut rollback_host = Vec::new();
    for r in v["deployments"].as_array().into_iter().flatten() {
        if r["outcome"] != "success" {
            continue;
        }
        if r["kind"] == "rollback" {
            rollback_host.push(r["totalMs"].as_f64().unwrap_or(0.0));
            continue;
        }
        for s in r["steps"].as_array().into_iter().flatten() {
            let name = s["name"].as_str().unwrap_or("").replace(' ', "_");
            steps
                .entry(name)
                .or_default()
                .push(s["ms"].as_f64().unwrap_or(0.0));
        }
    }
    let mut figures = Map::new();
    figures.insert(
        "deploy_wall_ms".into(),
        json!(crate::kit::percentile(deploy_ms, 0.5)),
    );
    for (k, v) in steps {
        figures.insert(
            format!("step_{k}_ms"),
            json!(crate::kit::percentile(v, 0.5)),
        );
    }
    figures.insert(
        "rollback_wall_ms".into(),
        json!(crate::kit::percentile(rollback_ms, 0.5)),
    );
    figures.insert(
        "rollback_host_ms".into(),
        json!(crate::kit::percentile(rollback_host, 0.5)),
    );
    figures.insert(
        "requests_during".into(),
        json!(okn.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed)),
    );
    figures.insert(
        "failed_requests".into(),
        json!(failed.load(Ordering::Relaxed)),
    );
    crate::kit::report(args.json, figures);
    Ok(())
}
