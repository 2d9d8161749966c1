//! The agent: serves the protocol on a Unix socket inside the sandbox.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use polydev_vault::SealingKeyPair;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use crate::protocol::{
    read_frame, write_frame, Event, FrameError, Op, Request, Response, PROTOCOL_VERSION,
};

/// The agent's state: its ephemeral sealing key (made at start, never
/// written anywhere) and the processes it started.
pub struct Agent {
    sealing: SealingKeyPair,
    children: Mutex<HashSet<u32>>,
    /// Environment every exec starts from (set at hand-out by `Configure`).
    env: Mutex<Vec<(String, String)>>,
    /// Open stdins of running execs started with `keep_stdin`.
    stdins: tokio::sync::Mutex<HashMap<u32, tokio::process::ChildStdin>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("public_key", self.sealing.public())
            .finish_non_exhaustive()
    }
}

impl Default for Agent {
    fn default() -> Self {
        Self {
            sealing: SealingKeyPair::generate(),
            children: Mutex::new(HashSet::new()),
            env: Mutex::new(Vec::new()),
            stdins: tokio::sync::Mutex::new(HashMap::new()),
        }
    }
}

fn error(code: &str, message: impl Into<String>) -> Event {
    Event::Error {
        code: code.to_owned(),
        message: message.into(),
    }
}

/// Most connections the in-sandbox egress relay carries at once (the
/// controller's end has its own cap; this one keeps a runaway client from
/// spending the sandbox's descriptors on relay halves).
const MAX_RELAYED: usize = 256;

/// Network mode `egress`: relays TCP connections made inside the sandbox to
/// `listen` (loopback) over the Unix socket `to`, whose other end the
/// controller connects to the user's egress proxy. The sandbox has no other
/// way out. Binds before returning; relays in the background.
pub async fn relay_egress(listen: std::net::SocketAddr, to: PathBuf) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_RELAYED));
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                // Out of descriptors: wait for some to close.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                continue; // dropped: closed at once
            };
            let to = to.clone();
            tokio::spawn(async move {
                let _slot = slot;
                if let Ok(mut unix) = UnixStream::connect(&to).await {
                    let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
                }
            });
        }
    });
    Ok(())
}

/// Makes this process non-dumpable: the sandbox's other processes run as
/// the same uid, and without this they could read the agent's memory (its
/// sealing key, a credential being unsealed) through `/proc/<pid>/mem`, or
/// write to its descriptors through `/proc/<pid>/fd`.
pub fn harden_process() -> std::io::Result<()> {
    nix::sys::prctl::set_dumpable(false).map_err(std::io::Error::from)
}

/// Takes the listening socket the launcher passed as descriptor `fd`
/// (bound in a directory only the controller can write, listening as the
/// sandbox's uid), after checking that it is one.
pub fn inherited_listener(fd: i32) -> std::io::Result<std::os::unix::net::UnixListener> {
    let target = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map_err(|e| std::io::Error::new(e.kind(), format!("descriptor {fd}: {e}")))?;
    if !target.to_string_lossy().starts_with("socket:") {
        return Err(std::io::Error::other(format!(
            "descriptor {fd} is {}, not a socket",
            target.display()
        )));
    }
    let listener = adopt_listener(fd);
    // Not inherited by the commands this agent runs.
    nix::fcntl::fcntl(
        &listener,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(std::io::Error::from)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

#[allow(unsafe_code)]
fn adopt_listener(fd: i32) -> std::os::unix::net::UnixListener {
    use std::os::fd::FromRawFd;
    // SAFETY: `fd` is open (its /proc/self/fd entry names a socket) and
    // nothing else in this process owns it: the launcher passed it across
    // exec for exactly this, and it is adopted once, at start.
    unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) }
}

impl Agent {
    /// Serves connections on `socket` until the listener fails (for tests
    /// and hosts without a launcher; sandboxes get their socket passed in).
    pub async fn serve(self: Arc<Self>, socket: &Path) -> std::io::Result<()> {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket)?;
        self.serve_listener(listener).await
    }

    /// Serves connections on `listener` until it fails.
    pub async fn serve_listener(self: Arc<Self>, listener: UnixListener) -> std::io::Result<()> {
        // The driver waits for this line: it is the ready handshake's
        // first half (the second is `Hello` on the socket).
        {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(b"polydev-agent ready\n");
            let _ = out.flush();
        }
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(a) => a,
                Err(e) if e.raw_os_error() == Some(libc::EMFILE) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let agent = self.clone();
            tokio::spawn(async move { agent.connection(stream).await });
        }
    }

    async fn connection(&self, mut stream: UnixStream) {
        // The first frame must agree on the version.
        match read_frame::<Request>(&mut stream).await {
            Ok(Request {
                id,
                op: Op::Hello { version },
            }) if version == PROTOCOL_VERSION => {
                let hello = Event::Hello {
                    version,
                    public_key: B64.encode(self.sealing.public().to_bytes()),
                };
                if write_frame(&mut stream, &Response { id, event: hello })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Ok(Request { id, .. }) => {
                let event = error(
                    "version",
                    format!(
                        "this agent speaks protocol version {PROTOCOL_VERSION}; say hello first"
                    ),
                );
                let _ = write_frame(&mut stream, &Response { id, event }).await;
                return;
            }
            Err(_) => return,
        }
        loop {
            let request: Request = match read_frame(&mut stream).await {
                Ok(r) => r,
                Err(FrameError::Closed) => return,
                Err(e) => {
                    let _ = write_frame(
                        &mut stream,
                        &Response {
                            id: 0,
                            event: error("bad_frame", e.to_string()),
                        },
                    )
                    .await;
                    return;
                }
            };
            if let Op::Connect { service } = &request.op {
                let service = service.clone();
                self.connect_service(request.id, &service, stream).await;
                return;
            }
            if self.handle(request, &mut stream).await.is_err() {
                return;
            }
        }
    }

    async fn handle(&self, req: Request, out: &mut UnixStream) -> Result<(), FrameError> {
        let id = req.id;
        let reply = |event| Response { id, event };
        let event = match req.op {
            Op::Hello { .. } => error("bad_request", "already said hello"),
            Op::Connect { .. } => error("bad_request", "connect is handled per connection"),
            Op::Health => Event::Ready {
                status: "ready".into(),
            },
            Op::Exec {
                argv,
                env,
                cwd,
                stdin,
                keep_stdin,
                timeout_ms,
            } => {
                return self
                    .exec(id, argv, env, cwd, (stdin, keep_stdin), timeout_ms, out)
                    .await
            }
            Op::Stdin { pid, data, close } => match B64.decode(data) {
                Ok(bytes) => self.write_stdin(pid, &bytes, close).await,
                Err(_) => error("bad_request", "data must be base64"),
            },
            Op::Seal {
                path,
                recipient,
                purpose,
                aad,
            } => seal_file(&path, &recipient, &purpose, &aad).await,
            Op::PutFile { path, mode, data } => match B64.decode(data) {
                Ok(bytes) => match write_file(Path::new(&path), mode, &bytes).await {
                    Ok(()) => Event::Done {
                        bytes: bytes.len() as u64,
                    },
                    Err(e) => error("io", format!("cannot write {path}: {e}")),
                },
                Err(_) => error("bad_request", "data must be base64"),
            },
            Op::GetFile { path } => match tokio::fs::read(&path).await {
                Ok(bytes) if bytes.len() <= crate::protocol::MAX_FRAME / 2 => Event::File {
                    data: B64.encode(bytes),
                },
                Ok(_) => error(
                    "too_large",
                    format!("{path} is too large to fetch in one frame"),
                ),
                Err(e) => error("io", format!("cannot read {path}: {e}")),
            },
            Op::Signal { pid, signal } => self.signal(pid, signal),
            Op::Configure { env } => match self.env.lock() {
                Ok(mut current) => {
                    *current = env;
                    Event::Done { bytes: 0 }
                }
                Err(_) => error("internal", "state is poisoned"),
            },
            Op::Unseal {
                purpose,
                aad,
                sealed,
                path,
                mode,
                append,
            } => {
                let (Ok(aad), Ok(sealed)) = (B64.decode(aad), B64.decode(sealed)) else {
                    return write_frame(
                        out,
                        &reply(error("bad_request", "aad and sealed must be base64")),
                    )
                    .await;
                };
                match self.sealing.open(&purpose, &aad, &sealed) {
                    Ok(plaintext) => {
                        match write_file_as(Path::new(&path), mode, &plaintext, append).await {
                            Ok(()) => Event::Done {
                                bytes: plaintext.len() as u64,
                            },
                            Err(e) => error("io", format!("cannot write {path}: {e}")),
                        }
                    }
                    Err(e) => error("unseal", e.to_string()),
                }
            }
        };
        write_frame(out, &reply(event)).await
    }

    /// `Connect`: dials the service inside the sandbox, answers, then
    /// pipes bytes both ways until either side ends.
    async fn connect_service(&self, id: u64, service: &str, mut stream: UnixStream) {
        let reply = |event| Response { id, event };
        if !crate::protocol::valid_service_name(service) {
            let e = error("bad_request", format!("{service:?} is not a service name"));
            let _ = write_frame(&mut stream, &reply(e)).await;
            return;
        }
        let path = Path::new(crate::protocol::SERVICE_DIR).join(service);
        let dial = tokio::time::timeout(Duration::from_secs(5), UnixStream::connect(&path)).await;
        let mut inner = match dial {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let e = error("unreachable", format!("cannot reach {service}: {e}"));
                let _ = write_frame(&mut stream, &reply(e)).await;
                return;
            }
            Err(_) => {
                let e = error(
                    "unreachable",
                    format!("{service} did not accept within 5 s"),
                );
                let _ = write_frame(&mut stream, &reply(e)).await;
                return;
            }
        };
        if write_frame(&mut stream, &reply(Event::Done { bytes: 0 }))
            .await
            .is_err()
        {
            return;
        }
        let _ = tokio::io::copy_bidirectional(&mut stream, &mut inner).await;
    }

    async fn write_stdin(&self, pid: u32, bytes: &[u8], close: bool) -> Event {
        let mut stdins = self.stdins.lock().await;
        let Some(input) = stdins.get_mut(&pid) else {
            return error(
                "not_found",
                format!("process {pid} has no open stdin (started without keep_stdin, or ended)"),
            );
        };
        let written = async {
            input.write_all(bytes).await?;
            input.flush().await
        }
        .await;
        if close || written.is_err() {
            stdins.remove(&pid);
        }
        match written {
            Ok(()) => Event::Done {
                bytes: bytes.len() as u64,
            },
            Err(e) => error("io", format!("cannot write to process {pid}: {e}")),
        }
    }

    fn signal(&self, pid: u32, signal: i32) -> Event {
        let ours = self
            .children
            .lock()
            .map(|c| c.contains(&pid))
            .unwrap_or(false);
        if !ours {
            return error(
                "not_found",
                format!("process {pid} was not started by this agent"),
            );
        }
        let Ok(sig) = nix::sys::signal::Signal::try_from(signal) else {
            return error("bad_request", format!("{signal} is not a signal"));
        };
        match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig) {
            Ok(()) => Event::Done { bytes: 0 },
            Err(e) => error("io", e.to_string()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn exec(
        &self,
        id: u64,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: Option<String>,
        (stdin, keep_stdin): (Option<String>, bool),
        timeout_ms: u64,
        out: &mut UnixStream,
    ) -> Result<(), FrameError> {
        let reply = |event| Response { id, event };
        let Some((program, args)) = argv.split_first() else {
            return write_frame(out, &reply(error("bad_request", "argv is empty"))).await;
        };
        let stdin_bytes = match stdin.map(|s| B64.decode(s)).transpose() {
            Ok(b) => b,
            Err(_) => {
                return write_frame(out, &reply(error("bad_request", "stdin must be base64"))).await
            }
        };
        let base = self.env.lock().map(|e| e.clone()).unwrap_or_default();
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", "/home/sandbox")
            .envs(base)
            .envs(env)
            .stdin(if stdin_bytes.is_some() || keep_stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so a timeout kills all it started.
            .process_group(0)
            .kill_on_drop(true);
        if let Some(dir) = cwd {
            cmd.current_dir(PathBuf::from(dir));
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                return write_frame(
                    out,
                    &reply(error("spawn", format!("cannot run {program}: {e}"))),
                )
                .await
            }
        };
        let pid = child.id().unwrap_or(0);
        // Should this request end early (the controller went away, or
        // stopped reading), the whole group goes, not only its leader.
        let mut group = GroupGuard(Some(pid));
        if let Ok(mut c) = self.children.lock() {
            c.insert(pid);
        }
        write_frame(out, &reply(Event::Started { pid })).await?;
        if keep_stdin {
            if let Some(mut input) = child.stdin.take() {
                if let Some(bytes) = stdin_bytes {
                    let _ = input.write_all(&bytes).await;
                }
                self.stdins.lock().await.insert(pid, input);
            }
        } else if let (Some(bytes), Some(mut input)) = (stdin_bytes, child.stdin.take()) {
            tokio::spawn(async move {
                let _ = input.write_all(&bytes).await;
            });
        }
        let (mut stdout, mut stderr) = (child.stdout.take(), child.stderr.take());
        let mut obuf = vec![0u8; 32 * 1024];
        let mut ebuf = vec![0u8; 32 * 1024];
        let deadline = tokio::time::sleep(Duration::from_millis(timeout_ms));
        tokio::pin!(deadline);
        let mut timed_out = false;
        let mut status = None;
        // Once the command has exited, its output may still drain for a
        // moment, but no longer: a process that left its group could hold
        // the pipes open for ever.
        let drain = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(drain);
        while status.is_none() || stdout.is_some() || stderr.is_some() {
            tokio::select! {
                n = async { stdout.as_mut().expect("checked").read(&mut obuf).await }, if stdout.is_some() => match n {
                    Ok(0) | Err(_) => stdout = None,
                    Ok(n) => write_frame(out, &reply(Event::Stdout { data: B64.encode(&obuf[..n]) })).await?,
                },
                n = async { stderr.as_mut().expect("checked").read(&mut ebuf).await }, if stderr.is_some() => match n {
                    Ok(0) | Err(_) => stderr = None,
                    Ok(n) => write_frame(out, &reply(Event::Stderr { data: B64.encode(&ebuf[..n]) })).await?,
                },
                s = child.wait(), if status.is_none() => {
                    status = Some(s.ok());
                    drain.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(2));
                }
                _ = &mut deadline, if !timed_out => {
                    timed_out = true;
                    // The command's whole process group, not just its first
                    // process: children keep the pipes open otherwise.
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    let _ = child.start_kill();
                }
                _ = &mut drain, if status.is_some() => break,
            }
        }
        let status = status.flatten();
        // Ended normally: what it left running in the background (e.g. the
        // login desktop) stays.
        group.0 = None;
        if let Ok(mut c) = self.children.lock() {
            c.remove(&pid);
        }
        self.stdins.lock().await.remove(&pid);
        use std::os::unix::process::ExitStatusExt;
        let event = Event::Exit {
            code: status.and_then(|s| s.code()),
            signal: status.and_then(|s| s.signal()),
            timed_out,
        };
        write_frame(out, &reply(event)).await
    }
}

/// Kills a command's process group when dropped while still armed.
struct GroupGuard(Option<u32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0.filter(|p| *p > 0) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Largest file `Seal` reads (credential files are a few KiB, a run's
/// diff up to this): its box, in base64, fits one frame.
const MAX_SEAL: u64 = 8 << 20;

async fn seal_file(path: &str, recipient: &str, purpose: &str, aad: &str) -> Event {
    let (Ok(recipient), Ok(aad)) = (B64.decode(recipient), B64.decode(aad)) else {
        return error("bad_request", "recipient and aad must be base64");
    };
    let Ok(key) = polydev_vault::SealingPublicKey::from_bytes(&recipient) else {
        return error("bad_request", "recipient is not a valid public key");
    };
    match tokio::fs::metadata(path).await {
        Ok(m) if m.len() > MAX_SEAL => {
            return error(
                "too_large",
                format!("{path} is larger than {MAX_SEAL} bytes"),
            )
        }
        Ok(_) => {}
        Err(e) => return error("io", format!("cannot read {path}: {e}")),
    }
    match tokio::fs::read(path).await {
        Ok(bytes) => {
            let plaintext = zeroize::Zeroizing::new(bytes);
            Event::Sealed {
                data: B64.encode(key.seal(purpose, &aad, &plaintext)),
            }
        }
        Err(e) => error("io", format!("cannot read {path}: {e}")),
    }
}

async fn write_file(path: &Path, mode: u32, bytes: &[u8]) -> std::io::Result<()> {
    write_file_as(path, mode, bytes, false).await
}

/// Writes `bytes` to `path`, replacing it or (`append`) after its end.
async fn write_file_as(path: &Path, mode: u32, bytes: &[u8], append: bool) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    let path = path.to_owned();
    let bytes = zeroize::Zeroizing::new(bytes.to_vec());
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(!append)
            .append(append)
            .create(true)
            .truncate(!append)
            .mode(mode)
            .open(&path)?;
        f.write_all(&bytes)?;
        f.sync_all()
    })
    .await
    .map_err(std::io::Error::other)?
}
