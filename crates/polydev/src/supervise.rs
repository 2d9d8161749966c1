//! `polydev supervise --root R --listen ADDR [-- SERVE ARGS]`: owns the
//! controller's listening socket and runs `R/current/bin/polydev serve` on
//! it, so a new release can take over without a refused or dropped request:
//! both processes accept from the same socket while the old one drains.
//!
//! Control, one line per command on the Unix socket `R/run/supervisor.sock`,
//! one JSON line back:
//! - `status`  → `{"listen","active":{pid,release},"candidate":…}`
//! - `reload`  → starts a candidate from what `R/current` points at now
//! - `commit`  → the candidate becomes active; the old one gets SIGTERM and drains
//! - `abort`   → the candidate is killed; answers its log tail
//! - `stop`    → everything ends
//!
//! An active controller that exits on its own is restarted (1 s back-off).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::process::{Child, Command};

const TAIL: usize = 50;

#[derive(Debug)]
struct Proc {
    child: Child,
    pid: u32,
    release: String,
    tail: Arc<Mutex<VecDeque<String>>>,
}

#[derive(Debug, Default)]
struct State {
    active: Option<Proc>,
    candidate: Option<Proc>,
}

pub fn socket_path(root: &Path) -> PathBuf {
    root.join("run/supervisor.sock")
}

/// The release a path under `releases/` names (its directory name).
fn release_of(root: &Path) -> anyhow::Result<(PathBuf, String)> {
    let dir = std::fs::canonicalize(root.join("current"))
        .with_context(|| format!("{}/current does not point at a release", root.display()))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok((dir, name))
}

fn spawn(root: &Path, listener: &std::net::TcpListener, args: &[String]) -> anyhow::Result<Proc> {
    let (dir, release) = release_of(root)?;
    let socket = listener
        .try_clone()
        .context("cannot share the listening socket")?;
    let mut child = Command::new(dir.join("bin/polydev"))
        .arg("serve")
        .arg("--listen-stdin")
        .args(args)
        .env("POLYDEV_RELEASE_ID", &release)
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(socket)))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(false)
        .spawn()
        .with_context(|| format!("cannot start {}", dir.join("bin/polydev").display()))?;
    let pid = child.id().unwrap_or(0);
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    if let Some(stderr) = child.stderr.take() {
        let (tail, release) = (tail.clone(), release.clone());
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[{release} {pid}] {line}");
                if let Ok(mut t) = tail.lock() {
                    if t.len() == TAIL {
                        t.pop_front();
                    }
                    t.push_back(line);
                }
            }
        });
    }
    Ok(Proc {
        child,
        pid,
        release,
        tail,
    })
}

fn describe(p: &Option<Proc>) -> serde_json::Value {
    p.as_ref()
        .map(|p| json!({"pid": p.pid, "release": p.release}))
        .unwrap_or(serde_json::Value::Null)
}

fn terminate(p: &Proc) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(p.pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
}

pub async fn run(
    root: PathBuf,
    listen: std::net::SocketAddr,
    args: Vec<String>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(root.join("run"))?;
    let listener = std::net::TcpListener::bind(listen)
        .with_context(|| format!("cannot listen on {listen}"))?;
    let listen = listener.local_addr()?;
    let sock = socket_path(&root);
    let _ = std::fs::remove_file(&sock);
    let control =
        UnixListener::bind(&sock).with_context(|| format!("cannot bind {}", sock.display()))?;
    std::fs::write(
        root.join("run/supervisor.pid"),
        std::process::id().to_string(),
    )?;
    let state = Arc::new(tokio::sync::Mutex::new(State::default()));
    state.lock().await.active = Some(spawn(&root, &listener, &args)?);
    eprintln!("supervising on {listen}");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            conn = control.accept() => {
                let Ok((stream, _)) = conn else { continue };
                let (read, mut write) = stream.into_split();
                let mut line = String::new();
                let mut reader = BufReader::new(read);
                if reader.read_line(&mut line).await.is_err() {
                    continue;
                }
                let mut st = state.lock().await;
                let (answer, stop) = match line.trim() {
                    "status" => (json!({"listen": listen.to_string(), "active": describe(&st.active), "candidate": describe(&st.candidate)}), false),
                    "reload" => {
                        if let Some(mut old) = st.candidate.take() {
                            let _ = old.child.start_kill();
                        }
                        match spawn(&root, &listener, &args) {
                            Ok(p) => {
                                let d = json!({"pid": p.pid, "release": p.release});
                                st.candidate = Some(p);
                                (json!({"ok": true, "candidate": d}), false)
                            }
                            Err(e) => (json!({"ok": false, "error": format!("{e:#}")}), false),
                        }
                    }
                    "commit" => match st.candidate.take() {
                        Some(new) => {
                            if let Some(mut old) = st.active.replace(new) {
                                terminate(&old);
                                // Reaped once it has drained.
                                tokio::spawn(async move { let _ = old.child.wait().await; });
                            }
                            (json!({"ok": true, "active": describe(&st.active)}), false)
                        }
                        None => (json!({"ok": false, "error": "no candidate to commit"}), false),
                    },
                    "abort" => match st.candidate.take() {
                        Some(mut p) => {
                            let _ = p.child.start_kill();
                            let _ = p.child.wait().await;
                            let tail: Vec<String> = p.tail.lock().map(|t| t.iter().cloned().collect()).unwrap_or_default();
                            (json!({"ok": true, "logTail": tail}), false)
                        }
                        None => (json!({"ok": true, "logTail": []}), false),
                    },
                    "stop" => (json!({"ok": true}), true),
                    other => (json!({"ok": false, "error": format!("unknown command {other:?}")}), false),
                };
                let mut out = answer.to_string();
                out.push('\n');
                let _ = write.write_all(out.as_bytes()).await;
                if stop {
                    drop(st);
                    break;
                }
            }
            _ = tick.tick() => {
                let mut st = state.lock().await;
                // A candidate that died stays for `abort` to report; an
                // active one that died is restarted.
                let exited = st.active.as_mut().map(|p| matches!(p.child.try_wait(), Ok(Some(_)))).unwrap_or(true);
                if exited {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    match spawn(&root, &listener, &args) {
                        Ok(p) => {
                            eprintln!("controller exited; restarted as {} ({})", p.pid, p.release);
                            st.active = Some(p);
                        }
                        Err(e) => eprintln!("controller exited and cannot restart: {e:#}"),
                    }
                }
            }
            _ = term.recv() => break,
        }
    }
    let mut st = state.lock().await;
    for p in [st.active.take(), st.candidate.take()]
        .into_iter()
        .flatten()
    {
        terminate(&p);
        let mut p = p;
        if tokio::time::timeout(Duration::from_secs(15), p.child.wait())
            .await
            .is_err()
        {
            let _ = p.child.start_kill();
            let _ = p.child.wait().await;
        }
    }
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(root.join("run/supervisor.pid"));
    Ok(())
}

/// Sends one control command; the JSON answer.
pub async fn control(
    root: &Path,
    command: &str,
    deadline: Duration,
) -> anyhow::Result<serde_json::Value> {
    let work = async {
        let mut stream = tokio::net::UnixStream::connect(socket_path(root))
            .await
            .context("no supervisor is running (start it, or deploy with --bootstrap)")?;
        stream.write_all(format!("{command}\n").as_bytes()).await?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).await?;
        serde_json::from_str::<serde_json::Value>(&line)
            .context("the supervisor's answer is not JSON")
    };
    tokio::time::timeout(deadline, work).await.map_err(|_| {
        anyhow::anyhow!("the supervisor did not answer `{command}` within {deadline:?}")
    })?
}
