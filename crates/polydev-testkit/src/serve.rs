//! A `polydev serve` process: started, its JSON log collected, its
//! addresses read from the log, stopped on drop.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

/// A running `polydev serve`; killed on drop unless stopped before.
#[derive(Debug)]
pub struct Serve {
    child: Option<Child>,
    /// The API's address (`host:port`).
    pub addr: String,
    /// The in-process egress proxy's address, when it is on.
    pub egress: Option<String>,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Serve {
    /// `exe serve` with what [`Serve::start`] reads: the API and the egress
    /// proxy on port 0 of loopback, the log as JSON. Add the rest.
    pub fn command(exe: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(exe);
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--egress-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ]);
        cmd
    }

    /// Starts `command` (a `polydev serve` with its flags; it must log JSON
    /// to stderr) and waits, at most 30 s, for its "listening" line; every
    /// line it logs is kept for [`Serve::logs`].
    pub fn start(command: Command) -> anyhow::Result<Self> {
        Self::spawn(command, true)
    }

    /// [`Serve::start`], keeping no log lines after start-up (a
    /// benchmark's server logs for as long as it is measured).
    pub fn start_discarding_logs(command: Command) -> anyhow::Result<Self> {
        Self::spawn(command, false)
    }

    fn spawn(mut command: Command, keep: bool) -> anyhow::Result<Self> {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("start polydev serve")?;
        let stderr = child.stderr.take().context("no stderr pipe")?;
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = mpsc::channel();
        let (egress_tx, egress_rx) = mpsc::channel();
        let sink = logs.clone();
        // Drains stderr for the server's whole life, so it never blocks.
        std::thread::spawn(move || {
            let mut listening = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    let addr = v["fields"]["addr"].as_str().unwrap_or_default().to_owned();
                    match v["fields"]["message"].as_str() {
                        Some("egress proxy listening") => {
                            let _ = egress_tx.send(addr);
                        }
                        Some("listening") => {
                            listening = true;
                            let _ = addr_tx.send(addr);
                        }
                        _ => {}
                    }
                }
                // Discarding keeps the start-up lines still: they explain a
                // server that did not start.
                if keep || !listening {
                    if let Ok(mut l) = sink.lock() {
                        l.push(line);
                    }
                }
            }
        });
        let mut serve = Self {
            child: Some(child),
            addr: String::new(),
            egress: None,
            logs,
        };
        match addr_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => serve.addr = addr,
            Err(_) => {
                serve.kill();
                bail!("polydev serve did not start within 30 s:\n{}", serve.logs());
            }
        }
        // Logged before the API's "listening" line when the proxy is on.
        serve.egress = egress_rx.try_recv().ok();
        Ok(serve)
    }

    /// Every line logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits for the process to exit (after a signal it was sent); kills
    /// it and fails after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> anyhow::Result<ExitStatus> {
        let mut child = self.child.take().context("not running")?;
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("polydev did not exit within {within:?}:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops it as an operator would: SIGTERM (the controller destroys
    /// its sandboxes and removes its cgroups on the way out), SIGKILL
    /// after `within`.
    pub fn stop(&mut self, within: Duration) {
        if let Some(pid) = self.pid() {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            if self.wait_exit(within).is_err() {
                self.kill();
            }
        }
    }

    /// Kills it at once (a crash, as far as the controller knows).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `exe user add --email EMAIL [--admin] [--password-stdin] STORE_ARGS`: a
/// user made from the command line, as an operator would (with a vault
/// when `password` is given); what it printed (`id`, `token`, …).
pub fn user_add<S: AsRef<std::ffi::OsStr>>(
    exe: impl AsRef<std::ffi::OsStr>,
    store_args: &[S],
    email: &str,
    admin: bool,
    password: Option<&str>,
) -> anyhow::Result<Value> {
    use std::io::Write;
    let mut cmd = Command::new(exe);
    cmd.args(["user", "add", "--email", email]);
    if admin {
        cmd.arg("--admin");
    }
    if password.is_some() {
        cmd.arg("--password-stdin");
    }
    let mut child = cmd
        .args(store_args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run polydev user add")?;
    let mut stdin = child.stdin.take().context("no stdin pipe")?;
    if let Some(p) = password {
        writeln!(stdin, "{p}")?;
    }
    drop(stdin);
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("user add failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}
