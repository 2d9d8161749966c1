//! `TestApp`: the real `polydev` binary on port 0 against a fresh database,
//! driven over HTTP.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use polydev_store::testing::TestDatabase;
use polydev_store::Backend;
use polydev_testkit::Serve;
use reqwest::{Method, StatusCode};
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_polydev");

/// A running controller and everything it logged.
pub struct TestApp {
    pub db: TestDatabase,
    pub base: String,
    /// The in-process egress proxy's address, when enabled.
    pub egress: Option<String>,
    pub client: reqwest::Client,
    serve: Serve,
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

pub use polydev_testkit::{eventually, login_body, signup, wrong_login_body};

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
fn start(db: &TestDatabase, extra: &[String]) -> Serve {
    let mut cmd = Serve::command(BIN);
    cmd.args(["--log-level", "debug"])
        .args(store_args(db))
        .args(extra)
        // Tests sign many users up from one address; a test of the limit
        // passes the flag, which wins over the environment.
        .env("POLYDEV_SIGNUPS_PER_IP_PER_HOUR", "100000")
        // No background image builds (debootstrap, apt, npm) unless a test
        // asks; tests on the real images get them prebuilt.
        .env("POLYDEV_SANDBOX_PREPARE", "none");
    Serve::start(cmd).unwrap_or_else(|e| panic!("{e:#}"))
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
        let serve = start(&db, &extra);
        Self {
            db,
            egress: serve.egress.clone(),
            base: format!("http://{}", serve.addr),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .expect("http client"),
            serve,
            extra,
        }
    }

    /// Starts the controller again on the same store and data dir (after
    /// it exited or was killed).
    pub async fn restart(&mut self) {
        self.serve.kill();
        self.serve = start(&self.db, &self.extra);
        self.base = format!("http://{}", self.serve.addr);
        self.egress = self.serve.egress.clone();
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn logs(&self) -> String {
        self.serve.logs()
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
        self.serve.pid().expect("running")
    }

    /// Waits for the process to exit (after a signal), with a deadline.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        self.serve
            .wait_exit(within)
            .unwrap_or_else(|e| panic!("{e:#}"))
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

    /// A POST whose answer may take longer than the client's 20 s (a
    /// command the test knows runs long on a slow machine).
    pub async fn post_within(
        &self,
        path: &str,
        token: Option<&str>,
        body: Value,
        within: Duration,
    ) -> Reply {
        let mut req = self.client.post(self.url(path)).timeout(within).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
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
        let (id, token, _) = self.enrolled_user(email).await;
        (id, token)
    }

    /// `user`, with the sealing key pair of the vault made at sign-up
    /// (what the user's unlocked vault opens their boxes with).
    pub async fn enrolled_user(
        &self,
        email: &str,
    ) -> (String, String, polydev_vault::SealingKeyPair) {
        let (body, e) = signup(email, "correct horse");
        let r = self.post("/api/users", None, body).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let id = r.body["id"].as_str().expect("id").to_owned();
        let r = self
            .post("/api/auth/login", None, login_body(email, &e))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let token = r.body["token"].as_str().expect("token").to_owned();
        (id, token, e.sealing)
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
        self.serve.kill();
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
