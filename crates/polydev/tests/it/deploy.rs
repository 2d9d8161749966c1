//! `polydev deploy` against a real OpenSSH server on a loopback port (its
//! own host key and an authorized test key), with a release directory in a
//! temporary dir: bootstrap, a zero-downtime deploy under load, a failing
//! deploy rolled back, rollbacks by id and by sha, a failing migration.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::app::BIN;

struct SshHost {
    dir: tempfile::TempDir,
    sshd: Child,
    port: u16,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn keygen(path: &Path) {
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .status()
        .unwrap()
        .success();
    assert!(ok, "ssh-keygen");
}

impl SshHost {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        keygen(&d.join("host_key"));
        keygen(&d.join("client_key"));
        std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).unwrap();
        let port = free_port();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\nPidFile {d}/sshd.pid\nStrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n",
            d = d.display()
        );
        std::fs::write(d.join("sshd_config"), config).unwrap();
        let host_pub = std::fs::read_to_string(d.join("host_key.pub")).unwrap();
        std::fs::write(
            d.join("known_hosts"),
            format!("[127.0.0.1]:{port} {host_pub}"),
        )
        .unwrap();
        // sshd's privilege-separation directory.
        std::fs::create_dir_all("/run/sshd").unwrap();
        let sshd = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start sshd (Debian openssh-server)");
        polydev_testkit::eventually_blocking(Duration::from_secs(5), "sshd listens", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Self { dir, sshd, port }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("opt")
    }

    fn ssh_args(&self) -> Vec<String> {
        let d = self.dir.path().display();
        vec![
            "--host".into(),
            "root@127.0.0.1".into(),
            "--port".into(),
            self.port.to_string(),
            "--identity".into(),
            format!("{d}/client_key"),
            "--ssh-option".into(),
            format!("UserKnownHostsFile={d}/known_hosts"),
            "--ssh-option".into(),
            "StrictHostKeyChecking=yes".into(),
        ]
    }

    fn polydev(&self, cmd: &str, extra: &[&str]) -> Output {
        let out = Command::new(BIN)
            .arg(cmd)
            .args(self.ssh_args())
            .arg("--root")
            .arg(self.root())
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        out
    }

    fn deployments(&self) -> Value {
        let out = self.polydev("deployments", &["--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for SshHost {
    fn drop(&mut self) {
        // The supervisor (and its controllers) we started through deploy.
        if let Ok(pid) = std::fs::read_to_string(self.root().join("run/supervisor.pid")) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
                for _ in 0..100 {
                    if !self.root().join("run/supervisor.pid").exists() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        let _ = self.sshd.kill();
        let _ = self.sshd.wait();
    }
}

/// The release answering health, once it is `want`: for up to 1 s after a
/// switch the old version still answers (with `Connection: close`) while it
/// drains, so this waits (4 s at most) for `want`.
async fn serving(addr: &str, want: &str) -> String {
    crate::app::eventually(
        Duration::from_secs(4),
        &format!("release {want} answers health"),
        || async {
            let v: Value = reqwest::get(format!("http://{addr}/api/auth/health"))
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let release = v["release"].as_str().unwrap_or_default().to_owned();
            (release == want).then_some(release)
        },
    )
    .await
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn last_record(o: &Output) -> Value {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread")]
async fn deploy_switch_rollback_and_failed_migration() {
    let host = SshHost::start();
    let root = host.root();
    std::fs::create_dir_all(root.join("shared")).unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    std::fs::write(
        root.join("shared/polydev.toml"),
        format!(
            "data_dir = \"{}\"\nlog_format = \"json\"\n[egress]\nlisten = \"127.0.0.1:0\"\n[sandbox]\nenabled = false\n",
            root.join("shared/data").display()
        ),
    )
    .unwrap();

    // Bootstrap on an empty host.
    let out = host.polydev(
        "deploy",
        &["--bootstrap", "--listen", &listen, "--keep", "3"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let v1 = last_record(&out)["id"].as_str().unwrap().to_owned();
    assert_eq!(last_record(&out)["outcome"], "bootstrapped");
    let h: Value = crate::app::eventually(
        Duration::from_secs(10),
        "the bootstrapped release answers health",
        || async {
            reqwest::get(format!("http://{listen}/api/auth/health"))
                .await
                .ok()?
                .json()
                .await
                .ok()
        },
    )
    .await;
    assert_eq!(h["release"], v1.as_str());
    // A second bootstrap is refused.
    let out = host.polydev("deploy", &["--bootstrap"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("first install only"), "{}", text(&out));

    // The host has a golden image; v2 ships a changed agent, so the deploy
    // rebuilds (and boot-validates) that image before the switch.
    let cfg = root.join("shared/polydev.toml");
    let built = Command::new(BIN)
        .args(["image", "build", "minimal", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(built.status.success(), "{}", text(&built));
    let agent = host.dir.path().join("polydev-agent-v2");
    let mut bytes = std::fs::read(Path::new(BIN).with_file_name("polydev-agent")).unwrap();
    bytes.extend_from_slice(b"v2");
    std::fs::write(&agent, bytes).unwrap();
    std::fs::set_permissions(&agent, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    // v2 while a client keeps sending requests: none fails.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = {
        let (stop, ok, failed, listen) = (stop.clone(), ok.clone(), failed.clone(), listen.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            while !stop.load(Ordering::Relaxed) {
                match client
                    .get(format!("http://{listen}/api/auth/health"))
                    .send()
                    .await
                {
                    Ok(r) if r.status().is_success() => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };
    let out = host.polydev(
        "deploy",
        &["--keep", "3", "--agent", agent.to_str().unwrap()],
    );
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let v2 = last_record(&out)["id"].as_str().unwrap().to_owned();
    assert_ne!(v1, v2);
    assert_eq!(serving(&listen, &v2).await, v2);
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during the deploy"
    );
    let rebuilt = last_record(&out)["steps"]
        .as_array()
        .unwrap()
        .iter()
        .any(|st| {
            st["name"] == "rebuild images (agent changed)"
                && st["ok"] == true
                && st["detail"].as_str().unwrap().contains("minimal")
        });
    assert!(rebuilt, "{}", last_record(&out));
    let images = Command::new(BIN)
        .args(["image", "list", "minimal", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&images.stdout).lines().count(),
        2,
        "the previous image is kept"
    );
    assert!(ok.load(Ordering::Relaxed) > 50);

    // v3 fails its health gate: rolled back, v2 still serving, the record says why.
    let broken = host.dir.path().join("broken-polydev");
    std::fs::write(
        &broken,
        "#!/bin/sh\necho 'broken build: refusing to start' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&broken, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = host.polydev(
        "deploy",
        &[
            "--binary",
            broken.to_str().unwrap(),
            "--health-timeout-secs",
            "3",
            "--target",
            "controller",
            "--strategy",
            "blue-green",
        ],
    );
    assert!(!out.status.success());
    let record = last_record(&out);
    assert_eq!(record["outcome"], "rolled_back", "{}", text(&out));
    assert!(
        record["error"].as_str().unwrap().contains("health gate"),
        "{record}"
    );
    assert!(
        record["logTail"].to_string().contains("broken build"),
        "{record}"
    );
    assert_eq!(serving(&listen, &v2).await, v2);
    let list = host.deployments();
    assert_eq!(list["current"], v2.as_str());

    // Roll back by id, then by sha (the newest live release with it).
    let out = host.polydev("rollback", &[&v1]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(serving(&listen, &v1).await, v1);
    let sha = v2.rsplit('-').next().unwrap().to_owned();
    let out = host.polydev("rollback", &[&sha]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(serving(&listen, &v2).await, v2);

    // A migration that fails leaves the schema where it was.
    let mig = host.dir.path().join("migrations");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../polydev-store/migrations");
    assert!(Command::new("cp")
        .arg("-a")
        .arg(&src)
        .arg(&mig)
        .status()
        .unwrap()
        .success());
    for backend in ["sqlite", "postgres"] {
        std::fs::write(
            mig.join(backend).join("0099_broken.sql"),
            "CREATE TABLE half_done (id INTEGER);\nINSERT INTO no_such_table VALUES (1);\n",
        )
        .unwrap();
    }
    let out = host.polydev("deploy", &["--migrations-dir", mig.to_str().unwrap()]);
    assert!(!out.status.success());
    let record = last_record(&out);
    assert_eq!(record["outcome"], "failed", "{}", text(&out));
    assert_eq!(serving(&listen, &v2).await, v2);
    let out = Command::new(BIN)
        .args(["migrate", "--config"])
        .arg(root.join("shared/polydev.toml"))
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    // The version before the broken migration: the newest shipped one.
    let newest = std::fs::read_dir(mig.join("sqlite"))
        .unwrap()
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .split('_')
                .next()?
                .parse::<i64>()
                .ok()
        })
        .filter(|v| *v != 99)
        .max()
        .unwrap();
    assert_eq!(v["version"], newest, "{v}");
    let db = std::fs::read(root.join("shared/data/polydev.db")).unwrap();
    assert!(!String::from_utf8_lossy(&db).contains("half_done"));
    assert_eq!(host.deployments()["current"], v2.as_str());
}
