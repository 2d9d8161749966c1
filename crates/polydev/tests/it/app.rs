//! `TestApp`: the real `polydev` binary on port 0 against a fresh database,
//! driven over HTTP.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use polydev_store::testing::TestDatabase;
use polydev_store::Backend;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

pub const BIN: &str = env!("CARGO_BIN_EXE_polydev");

/// A running controller and everything it logged.
pub struct TestApp {
    pub db: TestDatabase,
    pub base: String,
    /// The in-process egress proxy's address, when enabled.
    pub egress: Option<String>,
    pub client: reqwest::Client,
    child: Option<Child>,
    logs: Arc<Mutex<Vec<String>>>,
    extra: Vec<String>,
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Reply {
    /// Asserts the API error shape and returns the code.
    pub fn error_code(&self) -> &str {
        let code = self.body["error"]["code"].as_str();
        assert!(
            code.is_some() && self.body["error"]["message"].is_string(),
            "not an API error body: {} {}",
            self.status,
            self.text
        );
        assert!(self.headers.contains_key("x-request-id"), "no request id");
        code.unwrap_or_default()
    }

    pub fn message(&self) -> &str {
        self.body["error"]["message"].as_str().unwrap_or_default()
    }
}

/// What a client sends at sign-up for `email` and `password` (deriving
/// keys as the browser does), and the enrollment it keeps.
pub fn signup(email: &str, password: &str) -> (Value, polydev_vault::Enrollment) {
    use base64::engine::general_purpose::STANDARD as B64;
    use base64::Engine;
    let user_id = uuid::Uuid::new_v4().to_string();
    let e =
        polydev_vault::Enrollment::new(&secrecy::SecretString::from(password.to_owned()), &user_id)
            .unwrap();
    let body = json!({
        "email": email,
        "userId": user_id,
        "loginCredential": B64.encode(e.login_credential.as_bytes()),
        "vault": {
            "kdf": {"algorithm": "pbkdf2-sha256", "iterations": 600000},
            "salt": B64.encode(e.spec.salt),
            "wrappedVaultKey": B64.encode(&e.wrapped_vault_key),
            "publicKey": B64.encode(&e.public_key),
            "wrappedPrivateKey": B64.encode(&e.wrapped_private_key),
        },
    });
    (body, e)
}

/// A login body with the credential an enrollment derived.
pub fn login_body(email: &str, e: &polydev_vault::Enrollment) -> Value {
    use base64::engine::general_purpose::STANDARD as B64;
    use base64::Engine;
    json!({"email": email, "loginCredential": B64.encode(e.login_credential.as_bytes())})
}

/// A login body with a credential that matches no account.
pub fn wrong_login_body(email: &str) -> Value {
    use base64::engine::general_purpose::STANDARD as B64;
    use base64::Engine;
    json!({"email": email, "loginCredential": B64.encode([0x77u8; 32])})
}

/// Store flags for a database: `--data-dir` for SQLite, `--database-url` for PostgreSQL.
pub fn store_args(db: &TestDatabase) -> Vec<String> {
    match db.backend() {
        Backend::Sqlite => vec!["--data-dir".into(), db.dir().display().to_string()],
        // The data dir still holds per-instance state (sandboxes, images).
        Backend::Postgres => vec![
            "--database-url".into(),
            db.url().to_owned(),
            "--data-dir".into(),
            db.dir().display().to_string(),
        ],
    }
}

type Started = (Child, String, Option<String>, Arc<Mutex<Vec<String>>>);

/// Polls `check` (every 50 ms) until it gives `Some`, for at most `within`;
/// then fails the test naming `what`. The one way tests wait for something
/// to become true: never a fixed sleep.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `tests/support/<script>` with the test virtualenv's Python
/// (`POLYDEV_TEST_PYTHON`, made by scripts/test.sh with the pinned PyPI
/// packages), `input` as JSON on stdin; what it printed, as JSON. Fails the
/// test with the script's stderr when it fails.
pub async fn python_script(script: &str, input: Value) -> Value {
    let path = format!("{}/tests/support/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let python = std::env::var("POLYDEV_TEST_PYTHON").unwrap_or_else(|_| "python3".to_owned());
        let mut child = Command::new(python)
            .arg(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python with the pinned PyPI packages (scripts/test.sh makes it in target/py)");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.to_string().as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Spawns `polydev serve` and waits for its "listening" line.
fn start(db: &TestDatabase, extra: &[String]) -> Started {
    let mut cmd = Command::new(BIN);
    cmd.arg("serve")
        .args([
            "--listen",
            "127.0.0.1:0",
            "--egress-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--log-level",
            "debug",
        ])
        .args(store_args(db))
        .args(extra)
        // Tests sign many users up from one address; a test of the limit
        // passes the flag, which wins over the environment.
        .env("POLYDEV_SIGNUPS_PER_IP_PER_HOUR", "100000")
        // No background image builds (debootstrap, apt, npm) unless a test
        // asks; tests on the real images get them prebuilt.
        .env("POLYDEV_SANDBOX_PREPARE", "none")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start polydev serve");
    let stderr = child.stderr.take().expect("stderr pipe");
    let logs = Arc::new(Mutex::new(Vec::new()));
    let (addr_tx, addr_rx) = mpsc::channel();
    let (egress_tx, egress_rx) = mpsc::channel();
    let sink = logs.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if v["fields"]["message"] == "egress proxy listening" {
                    let _ = egress_tx.send(v["fields"]["addr"].as_str().unwrap_or("").to_owned());
                }
                if v["fields"]["message"] == "listening" {
                    let _ = addr_tx.send(v["fields"]["addr"].as_str().unwrap_or("").to_owned());
                }
            }
            sink.lock().expect("log lock").push(line);
        }
    });
    let addr = match addr_rx.recv_timeout(Duration::from_secs(30)) {
        Ok(addr) => addr,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "polydev did not start within 30 s:\n{}",
                logs.lock().expect("log lock").join("\n")
            );
        }
    };
    // Logged before the API's "listening" line when the proxy is on.
    let egress = egress_rx.try_recv().ok();
    (child, format!("http://{addr}"), egress, logs)
}

impl TestApp {
    pub async fn spawn(backend: Backend) -> Self {
        Self::spawn_with(backend, &[]).await
    }

    pub async fn spawn_with(backend: Backend, extra: &[&str]) -> Self {
        Self::spawn_on(TestDatabase::new(backend).await, extra)
    }

    /// On a database (and data dir) the test made.
    pub fn spawn_on(db: TestDatabase, extra: &[&str]) -> Self {
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        let (child, base, egress, logs) = start(&db, &extra);
        Self {
            db,
            egress,
            base,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .expect("http client"),
            child: Some(child),
            logs,
            extra,
        }
    }

    /// Starts the controller again on the same store and data dir (after
    /// it exited or was killed).
    pub async fn restart(&mut self) {
        if let Some(mut old) = self.child.take() {
            let _ = old.kill();
            let _ = old.wait();
        }
        let (child, base, egress, logs) = start(&self.db, &self.extra);
        self.child = Some(child);
        self.base = base;
        self.egress = egress;
        self.logs = logs;
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn logs(&self) -> String {
        self.logs.lock().expect("log lock").join("\n")
    }

    /// Waits (up to 5 s) until a log line contains `needle`: lines written
    /// after a response was sent arrive a moment later.
    pub async fn wait_for_log(&self, needle: &str) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if self.logs().contains(needle) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Everything logged up to now: sends a request with a fresh request id
    /// and waits for its completion line, which comes after every earlier one.
    pub async fn settled_logs(&self) -> String {
        let marker = format!("sentinel-{}", uuid::Uuid::new_v4().simple());
        let _ = self
            .client
            .get(self.url("/api/auth/health"))
            .header("x-request-id", &marker)
            .send()
            .await;
        assert!(
            self.wait_for_log(&marker).await,
            "the sentinel request never reached the log"
        );
        self.logs()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("running")
    }

    /// Waits for the process to exit (after a signal), with a deadline.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("polydev did not exit within {within:?}:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Reply {
        let mut req = self.client.request(method, self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        read(req.send().await.expect("request reaches the server")).await
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Reply {
        self.send(Method::GET, path, token, None).await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> Reply {
        self.send(Method::POST, path, token, Some(body)).await
    }

    /// Signs up and logs in; returns (user id, session token).
    pub async fn user(&self, email: &str) -> (String, String) {
        let (body, e) = signup(email, "correct horse");
        let r = self.post("/api/users", None, body).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let id = r.body["id"].as_str().expect("id").to_owned();
        let r = self
            .post("/api/auth/login", None, login_body(email, &e))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        (id, r.body["token"].as_str().expect("token").to_owned())
    }

    /// `polydev <args>` against this app's store.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .args(store_args(&self.db))
            .stdin(Stdio::null())
            .output()
            .expect("run polydev")
    }

    /// An admin made with `polydev user add --admin`; returns its token.
    pub fn admin(&self, email: &str) -> String {
        let out = self.cli(&["user", "add", "--email", email, "--admin"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("user add prints JSON");
        assert_eq!(v["role"], "admin");
        v["token"].as_str().expect("token").to_owned()
    }
}

/// Runs a browser-driving script from web/tests (headless Chromium through
/// playwright-core; it may start its own server with `POLYDEV_BIN`) with
/// `input` as JSON on stdin; what it printed, as JSON. It owns no
/// assertions; the calling test does.
pub fn run_browser_script(name: &str, input: &Value) -> Value {
    use std::io::Write;
    let script = format!("{}/../../web/tests/{name}", env!("CARGO_MANIFEST_DIR"));
    let mut child = Command::new("node")
        .arg(script)
        .env("POLYDEV_BIN", BIN)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node and the web packages (scripts/test.sh)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.to_string().as_bytes())
        .expect("write the script's input");
    let out = child.wait_with_output().expect("run node");
    assert!(
        out.status.success(),
        "the browser side failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the script prints JSON")
}

/// `run_browser_script` from async tests.
pub async fn browser_script(name: &str, input: Value) -> Value {
    let name = name.to_owned();
    tokio::task::spawn_blocking(move || run_browser_script(&name, &input))
        .await
        .expect("join")
}

pub async fn read(resp: reqwest::Response) -> Reply {
    let status = resp.status();
    let headers = resp.headers().clone();
    let text = resp.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Reply {
        status,
        headers,
        body,
        text,
    }
}

impl TestApp {
    /// The store's files as text (on SQLite: everything at the data dir's
    /// top level; the images and sandboxes directories hold none of it).
    pub fn at_rest(&self) -> String {
        let mut all = Vec::new();
        for entry in std::fs::read_dir(self.db.dir()).expect("data dir") {
            let path = entry.expect("dir entry").path();
            if path.is_file() {
                all.extend(std::fs::read(path).expect("store file"));
            }
        }
        // On PostgreSQL the store is not in the data dir: everything it
        // holds, as pg_dump writes it.
        if self.db.backend() == Backend::Postgres {
            let dump = std::process::Command::new("pg_dump")
                .args(["--data-only", "--no-owner", "--dbname"])
                .arg(self.db.url())
                .output()
                .expect("pg_dump (PostgreSQL's client tools, installed by scripts/test.sh)");
            assert!(
                dump.status.success(),
                "pg_dump: {}",
                String::from_utf8_lossy(&dump.stderr)
            );
            all.extend(dump.stdout);
        }
        String::from_utf8_lossy(&all).into_owned()
    }

    /// Asserts that no needle reached the logs so far, /metrics or the
    /// store — after checking that each of the three was really read (a
    /// line every log has, a metric always served, the store's migration
    /// table), so an empty source cannot pass for a clean one.
    pub async fn assert_nowhere(&self, needles: &[&str]) {
        let logs = self.settled_logs().await;
        let metrics = self.get("/metrics", None).await.text;
        let at_rest = self.at_rest();
        assert!(logs.contains("listening"), "the logs were not read");
        assert!(
            metrics.contains("polydev_build_info"),
            "/metrics was not read"
        );
        assert!(
            at_rest.contains("_sqlx_migrations"),
            "the store was not read"
        );
        for n in needles {
            assert!(!n.is_empty(), "an empty needle is found everywhere");
            assert!(!logs.contains(n), "a secret reached the logs");
            assert!(!metrics.contains(n), "a secret reached /metrics");
            assert!(!at_rest.contains(n), "a secret reached the store");
        }
    }

    /// This controller's sandbox cgroups (named after its data dir).
    pub fn cgroups(&self) -> Option<polydev_sandbox::cgroup::Cgroups> {
        let cfg = polydev_sandbox::LocalConfig::for_data_dir(self.db.dir());
        polydev_sandbox::cgroup::Cgroups::detect(&cfg.cgroup_root, &cfg.instance).ok()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // A killed controller leaves empty groups (its sandboxes died with it).
        if let Some(cg) = self.cgroups() {
            let _ = cg.remove_all(Duration::from_secs(5));
        }
        // And, for a data dir under a private parent, its state directory
        // under /run (empty once its sandboxes are gone).
        let cfg = polydev_sandbox::LocalConfig::for_data_dir(self.db.dir());
        let _ = std::fs::remove_dir(
            std::path::Path::new(polydev_sandbox::local::RUN_STATE_DIR).join(cfg.instance),
        );
    }
}
