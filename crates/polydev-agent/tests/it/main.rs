//! The real `polydev-agent` binary on a temporary socket, driven by the
//! controller's client.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use polydev_agent::protocol::{read_frame, write_frame, Event, Op, Request, Response};
use polydev_agent::{AgentClient, ClientError};
use polydev_vault::SealingPublicKey;

struct Running {
    child: Child,
    socket: PathBuf,
    dir: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn agent() -> Running {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_polydev-agent"))
        .arg("--socket")
        .arg(&socket)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::UnixStream::connect(&socket).await.is_err() {
        assert!(Instant::now() < deadline, "the agent did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Running { child, socket, dir }
}

#[tokio::test]
async fn health_exec_streaming_stdin_and_exit_codes() {
    let a = agent().await;
    let mut c = AgentClient::connect(&a.socket, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(c.public_key.len(), 65);
    assert_eq!(c.health().await.unwrap(), "ready");

    let mut events = Vec::new();
    let out = c
        .exec(
            &["sh", "-c", "echo out; echo err >&2; exit 3"],
            None,
            Duration::from_secs(10),
            |e| events.push(e.clone()),
        )
        .await
        .unwrap();
    assert_eq!(
        (
            out.stdout.as_slice(),
            out.stderr.as_slice(),
            out.code,
            out.timed_out
        ),
        (&b"out\n"[..], &b"err\n"[..], Some(3), false)
    );
    assert!(matches!(events.first(), Some(Event::Started { .. })));
    assert!(matches!(events.last(), Some(Event::Exit { .. })));

    let out = c
        .exec(
            &["cat"],
            Some(b"piped through stdin"),
            Duration::from_secs(10),
            |_| {},
        )
        .await
        .unwrap();
    assert_eq!(
        (out.stdout.as_slice(), out.code),
        (&b"piped through stdin"[..], Some(0))
    );
    let err = c
        .exec(&["/no/such/program"], None, Duration::from_secs(10), |_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Refused { ref code, .. } if code == "spawn"),
        "{err}"
    );
    // The same connection keeps working after a refusal.
    assert_eq!(c.health().await.unwrap(), "ready");
}

#[tokio::test]
async fn a_command_past_its_deadline_is_killed() {
    let a = agent().await;
    let mut c = AgentClient::connect(&a.socket, Duration::from_secs(5))
        .await
        .unwrap();
    let started = Instant::now();
    let out = c
        .exec(&["sleep", "30"], None, Duration::from_millis(300), |_| {})
        .await
        .unwrap();
    assert!(out.timed_out && out.signal == Some(9), "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn files_signals_and_versions() {
    let a = agent().await;
    let mut c = AgentClient::connect(&a.socket, Duration::from_secs(5))
        .await
        .unwrap();
    let path = a.dir.path().join("sub/dir/file.txt");
    c.put_file(path.to_str().unwrap(), 0o640, b"hello file")
        .await
        .unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o640
    );
    assert_eq!(
        c.get_file(path.to_str().unwrap()).await.unwrap(),
        b"hello file"
    );
    assert!(matches!(
        c.get_file("/no/such/file").await,
        Err(ClientError::Refused { .. })
    ));
    // Only processes the agent started can be signalled.
    assert!(
        matches!(c.signal(1, 15).await, Err(ClientError::Refused { ref code, .. }) if code == "not_found")
    );

    // A second connection runs a long command; the first signals it.
    let mut c2 = AgentClient::connect(&a.socket, Duration::from_secs(5))
        .await
        .unwrap();
    let (pid_tx, pid_rx) = tokio::sync::oneshot::channel();
    let mut pid_tx = Some(pid_tx);
    let long = tokio::spawn(async move {
        c2.exec(&["sleep", "30"], None, Duration::from_secs(60), move |e| {
            if let Event::Started { pid } = e {
                if let Some(tx) = pid_tx.take() {
                    let _ = tx.send(*pid);
                }
            }
        })
        .await
    });
    let pid = pid_rx.await.unwrap();
    c.signal(pid, 15).await.unwrap();
    let out = long.await.unwrap().unwrap();
    assert_eq!((out.signal, out.timed_out), (Some(15), false));

    // Another protocol version is refused with a clear error.
    let mut raw = tokio::net::UnixStream::connect(&a.socket).await.unwrap();
    write_frame(
        &mut raw,
        &Request {
            id: 9,
            op: Op::Hello { version: 99 },
        },
    )
    .await
    .unwrap();
    let answer: Response = read_frame(&mut raw).await.unwrap();
    assert!(
        matches!(answer.event, Event::Error { ref code, .. } if code == "version"),
        "{answer:?}"
    );
}

#[tokio::test]
async fn a_credential_sealed_to_the_agent_is_opened_inside_and_never_sent_back() {
    let a = agent().await;
    let mut c = AgentClient::connect(&a.socket, Duration::from_secs(5))
        .await
        .unwrap();
    let key = SealingPublicKey::from_bytes(&c.public_key).unwrap();
    let sealed = key.seal(
        "sandbox-credential",
        b"run-1",
        b"{\"token\":\"canary-abc\"}",
    );
    let target = a.dir.path().join("home/.codex/auth.json");
    let bytes = c
        .unseal(
            "sandbox-credential",
            b"run-1",
            &sealed,
            target.to_str().unwrap(),
            0o600,
        )
        .await
        .unwrap();
    assert_eq!(bytes, 22);
    assert_eq!(
        std::fs::read(&target).unwrap(),
        b"{\"token\":\"canary-abc\"}"
    );
    assert_eq!(
        std::fs::metadata(&target).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // A sealed stream's next chunk goes after the end; a first one
    // (append off) starts the file over.
    let next = key.seal("sandbox-credential", b"run-1/1", b"+more");
    c.unseal_into(
        "sandbox-credential",
        b"run-1/1",
        &next,
        target.to_str().unwrap(),
        0o600,
        true,
    )
    .await
    .unwrap();
    assert_eq!(
        std::fs::read(&target).unwrap(),
        b"{\"token\":\"canary-abc\"}+more"
    );
    c.unseal_into(
        "sandbox-credential",
        b"run-1/1",
        &next,
        target.to_str().unwrap(),
        0o600,
        false,
    )
    .await
    .unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), b"+more");
    let wrong = c
        .unseal(
            "other-purpose",
            b"run-1",
            &sealed,
            target.to_str().unwrap(),
            0o600,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(wrong, ClientError::Refused { ref code, .. } if code == "unseal"),
        "{wrong}"
    );
    // Each agent has its own key: another agent cannot open this box.
    let b = agent().await;
    let mut other = AgentClient::connect(&b.socket, Duration::from_secs(5))
        .await
        .unwrap();
    assert_ne!(other.public_key, c.public_key);
    assert!(other
        .unseal(
            "sandbox-credential",
            b"run-1",
            &sealed,
            b.dir.path().join("x").to_str().unwrap(),
            0o600
        )
        .await
        .is_err());
}

#[tokio::test]
async fn a_file_is_sealed_inside_and_stdin_stays_open_for_a_pasted_code() {
    let a = agent().await;
    let mut c = AgentClient::connect(&a.socket, Duration::from_secs(5))
        .await
        .unwrap();
    // A credential file written inside comes back sealed to the user only.
    let user = polydev_vault::SealingKeyPair::generate();
    let path = a.dir.path().join("creds.json");
    let canary = b"{\"refresh_token\":\"canary-9f2c\"}";
    std::fs::write(&path, canary).unwrap();
    let sealed = c
        .seal_file(
            path.to_str().unwrap(),
            &user.public().to_bytes(),
            "test/v1",
            b"item",
        )
        .await
        .unwrap();
    assert!(!sealed.windows(6).any(|w| w == b"canary"));
    assert_eq!(
        user.open("test/v1", b"item", &sealed).unwrap().as_slice(),
        canary
    );
    assert!(matches!(
        c.seal_file("/nonexistent/file", &user.public().to_bytes(), "p", b"")
            .await,
        Err(ClientError::Refused { code, .. }) if code == "io"
    ));
    assert!(matches!(
        c.seal_file(path.to_str().unwrap(), b"not a key", "p", b"").await,
        Err(ClientError::Refused { code, .. }) if code == "bad_request"
    ));

    // An interactive exec reads what a second connection writes later.
    c.start_exec_interactive(
        vec!["sh".into(), "-c".into(), "read code; echo got:$code".into()],
        vec![],
        Some(b""),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let Event::Started { pid } = c.next_event().await.unwrap() else {
        panic!("no Started")
    };
    let mut other = AgentClient::connect(&a.socket, Duration::from_secs(5))
        .await
        .unwrap();
    other.write_stdin(pid, b"4242-ABCD\n", false).await.unwrap();
    let mut stdout = Vec::new();
    loop {
        match c.next_event().await.unwrap() {
            Event::Stdout { data } => stdout.extend(
                base64::Engine::decode(&base64::engine::general_purpose::STANDARD, data).unwrap(),
            ),
            Event::Exit { code, .. } => {
                assert_eq!(code, Some(0));
                break;
            }
            _ => {}
        }
    }
    assert_eq!(stdout, b"got:4242-ABCD\n");
    // Its stdin is gone with it.
    assert!(matches!(
        other.write_stdin(pid, b"late\n", true).await,
        Err(ClientError::Refused { code, .. }) if code == "not_found"
    ));
}
