//! The controller's side: one connection to an agent.

use std::path::Path;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use tokio::net::UnixStream;

use crate::protocol::{
    read_frame, write_frame, Event, FrameError, Op, Request, Response, PROTOCOL_VERSION,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent: {0}")]
    Connect(std::io::Error),
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("agent protocol: {0}")]
    Frame(#[from] FrameError),
    #[error("the agent refused: {code}: {message}")]
    Refused { code: String, message: String },
    #[error("unexpected answer from the agent: {0:?}")]
    Unexpected(Event),
    #[error("the command's output passed {0} bytes; the rest was not read")]
    OutputTooLarge(usize),
}

/// The most output (stdout and stderr together) `exec` collects; beyond
/// it the command is abandoned (the agent kills it when the connection
/// closes). Sandboxes are hostile: nothing they send is kept unbounded.
pub const MAX_EXEC_OUTPUT: usize = 16 << 20;

/// How long a one-answer request (health, files, seal, unseal, …) may take.
pub const DEFAULT_OP_DEADLINE: Duration = Duration::from_secs(30);

/// How long after its own timeout a command's exit may still arrive (the
/// agent kills at the timeout; this covers a stuck or hostile agent).
const EXIT_GRACE: Duration = Duration::from_secs(10);

/// What an exec produced.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub pid: u32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
}

#[derive(Debug)]
pub struct AgentClient {
    stream: UnixStream,
    next_id: u64,
    /// The agent's ephemeral sealing public key (65 bytes).
    pub public_key: Vec<u8>,
    op_deadline: Duration,
}

impl AgentClient {
    /// Connects and says hello, within `deadline`.
    pub async fn connect(socket: &Path, deadline: Duration) -> Result<Self, ClientError> {
        let stream = tokio::time::timeout(deadline, UnixStream::connect(socket))
            .await
            .map_err(|_| ClientError::Timeout(deadline))?
            .map_err(ClientError::Connect)?;
        Self::greet(stream, deadline).await
    }

    /// Says hello on a connected stream, within `deadline`.
    pub async fn greet(stream: UnixStream, deadline: Duration) -> Result<Self, ClientError> {
        let mut stream = stream;
        let work = async {
            write_frame(
                &mut stream,
                &Request {
                    id: 0,
                    op: Op::Hello {
                        version: PROTOCOL_VERSION,
                    },
                },
            )
            .await?;
            match read_frame::<Response>(&mut stream).await?.event {
                Event::Hello { public_key, .. } => {
                    let public_key = B64
                        .decode(public_key)
                        .map_err(|e| FrameError::Invalid(e.to_string()))?;
                    Ok(public_key)
                }
                Event::Error { code, message } => Err(ClientError::Refused { code, message }),
                other => Err(ClientError::Unexpected(other)),
            }
        };
        let public_key = tokio::time::timeout(deadline, work)
            .await
            .map_err(|_| ClientError::Timeout(deadline))??;
        Ok(Self {
            stream,
            next_id: 1,
            public_key,
            op_deadline: DEFAULT_OP_DEADLINE,
        })
    }

    /// Sets how long one-answer requests may take on this connection.
    pub fn with_op_deadline(mut self, deadline: Duration) -> Self {
        self.op_deadline = deadline;
        self
    }

    async fn send(&mut self, op: Op) -> Result<u64, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        write_frame(&mut self.stream, &Request { id, op }).await?;
        Ok(id)
    }

    async fn one(&mut self, op: Op) -> Result<Event, ClientError> {
        let deadline = self.op_deadline;
        let work = async {
            self.send(op).await?;
            match read_frame::<Response>(&mut self.stream).await?.event {
                Event::Error { code, message } => Err(ClientError::Refused { code, message }),
                event => Ok(event),
            }
        };
        tokio::time::timeout(deadline, work)
            .await
            .map_err(|_| ClientError::Timeout(deadline))?
    }

    /// `Ready{status: "ready"}`.
    pub async fn health(&mut self) -> Result<String, ClientError> {
        match self.one(Op::Health).await? {
            Event::Ready { status } => Ok(status),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    /// Runs a command, calling `on_event` for each streamed event, and
    /// returns everything it produced.
    pub async fn exec(
        &mut self,
        argv: &[&str],
        stdin: Option<&[u8]>,
        timeout: Duration,
        on_event: impl FnMut(&Event),
    ) -> Result<ExecOutput, ClientError> {
        let argv = argv.iter().map(|s| (*s).to_owned()).collect();
        self.exec_with(argv, Vec::new(), None, stdin, timeout, on_event)
            .await
    }

    /// `exec` with an environment (on top of the configured one) and a
    /// working directory.
    pub async fn exec_with(
        &mut self,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: Option<String>,
        stdin: Option<&[u8]>,
        timeout: Duration,
        mut on_event: impl FnMut(&Event),
    ) -> Result<ExecOutput, ClientError> {
        self.send(Op::Exec {
            argv,
            env,
            cwd,
            stdin: stdin.map(|b| B64.encode(b)),
            keep_stdin: false,
            timeout_ms: timeout.as_millis() as u64,
        })
        .await?;
        let mut out = ExecOutput::default();
        let until = tokio::time::Instant::now() + timeout + EXIT_GRACE;
        loop {
            let event = tokio::time::timeout_at(until, read_frame::<Response>(&mut self.stream))
                .await
                .map_err(|_| ClientError::Timeout(timeout + EXIT_GRACE))??
                .event;
            on_event(&event);
            let decode = |d: &str| {
                B64.decode(d)
                    .map_err(|e| FrameError::Invalid(e.to_string()))
            };
            match event {
                Event::Started { pid } => out.pid = pid,
                Event::Stdout { data } => out.stdout.extend(decode(&data)?),
                Event::Stderr { data } => out.stderr.extend(decode(&data)?),
                Event::Exit {
                    code,
                    signal,
                    timed_out,
                } => {
                    out.code = code;
                    out.signal = signal;
                    out.timed_out = timed_out;
                    return Ok(out);
                }
                Event::Error { code, message } => {
                    return Err(ClientError::Refused { code, message })
                }
                other => return Err(ClientError::Unexpected(other)),
            }
            if out.stdout.len() + out.stderr.len() > MAX_EXEC_OUTPUT {
                return Err(ClientError::OutputTooLarge(MAX_EXEC_OUTPUT));
            }
        }
    }

    pub async fn put_file(
        &mut self,
        path: &str,
        mode: u32,
        data: &[u8],
    ) -> Result<(), ClientError> {
        match self
            .one(Op::PutFile {
                path: path.to_owned(),
                mode,
                data: B64.encode(data),
            })
            .await?
        {
            Event::Done { .. } => Ok(()),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    pub async fn get_file(&mut self, path: &str) -> Result<Vec<u8>, ClientError> {
        match self
            .one(Op::GetFile {
                path: path.to_owned(),
            })
            .await?
        {
            Event::File { data } => Ok(B64
                .decode(data)
                .map_err(|e| FrameError::Invalid(e.to_string()))?),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    /// Starts a command; read its events with `next_event` until `Exit`
    /// (or `Error`). For callers that forward the stream as it comes.
    pub async fn start_exec(
        &mut self,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<(), ClientError> {
        self.start(argv, env, stdin, false, timeout).await
    }

    /// `start_exec` whose stdin stays open for `write_stdin`.
    pub async fn start_exec_interactive(
        &mut self,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<(), ClientError> {
        self.start(argv, env, stdin, true, timeout).await
    }

    async fn start(
        &mut self,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        stdin: Option<&[u8]>,
        keep_stdin: bool,
        timeout: Duration,
    ) -> Result<(), ClientError> {
        self.send(Op::Exec {
            argv,
            env,
            cwd: None,
            stdin: stdin.map(|b| B64.encode(b)),
            keep_stdin,
            timeout_ms: timeout.as_millis() as u64,
        })
        .await
        .map(|_| ())
    }

    /// Writes to a running interactive exec's stdin (on another connection
    /// than the one streaming its output).
    pub async fn write_stdin(
        &mut self,
        pid: u32,
        data: &[u8],
        close: bool,
    ) -> Result<(), ClientError> {
        match self
            .one(Op::Stdin {
                pid,
                data: B64.encode(data),
                close,
            })
            .await?
        {
            Event::Done { .. } => Ok(()),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    /// Seals the file at `path` inside the sandbox to `recipient`; the
    /// answer is the sealed box only.
    pub async fn seal_file(
        &mut self,
        path: &str,
        recipient: &[u8],
        purpose: &str,
        aad: &[u8],
    ) -> Result<Vec<u8>, ClientError> {
        let op = Op::Seal {
            path: path.to_owned(),
            recipient: B64.encode(recipient),
            purpose: purpose.to_owned(),
            aad: B64.encode(aad),
        };
        match self.one(op).await? {
            Event::Sealed { data } => Ok(B64
                .decode(data)
                .map_err(|e| FrameError::Invalid(e.to_string()))?),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    /// The next event of a started command. Callers bound the wait (a
    /// command's own timeout, a run's deadline).
    pub async fn next_event(&mut self) -> Result<Event, ClientError> {
        Ok(read_frame::<Response>(&mut self.stream).await?.event)
    }

    /// Turns this connection into a byte stream to the service listening
    /// on `/run/polydev/<service>` inside the sandbox (dialled by the agent
    /// there, so no path the sandbox controls is ever resolved on the host).
    pub async fn connect_service(mut self, service: &str) -> Result<UnixStream, ClientError> {
        match self
            .one(Op::Connect {
                service: service.to_owned(),
            })
            .await?
        {
            Event::Done { .. } => Ok(self.stream),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    /// Sets the environment every later exec starts from.
    pub async fn configure(&mut self, env: Vec<(String, String)>) -> Result<(), ClientError> {
        match self.one(Op::Configure { env }).await? {
            Event::Done { .. } => Ok(()),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    pub async fn signal(&mut self, pid: u32, signal: i32) -> Result<(), ClientError> {
        match self.one(Op::Signal { pid, signal }).await? {
            Event::Done { .. } => Ok(()),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    /// Hands over a box sealed to this agent; it writes the plaintext to
    /// `path` inside the sandbox and answers only the byte count.
    pub async fn unseal(
        &mut self,
        purpose: &str,
        aad: &[u8],
        sealed: &[u8],
        path: &str,
        mode: u32,
    ) -> Result<u64, ClientError> {
        self.unseal_into(purpose, aad, sealed, path, mode, false)
            .await
    }

    /// `unseal`, adding the plaintext after the end of `path` when
    /// `append` (the next chunk of a sealed stream).
    pub async fn unseal_into(
        &mut self,
        purpose: &str,
        aad: &[u8],
        sealed: &[u8],
        path: &str,
        mode: u32,
        append: bool,
    ) -> Result<u64, ClientError> {
        let op = Op::Unseal {
            purpose: purpose.to_owned(),
            aad: B64.encode(aad),
            sealed: B64.encode(sealed),
            path: path.to_owned(),
            mode,
            append,
        };
        match self.one(op).await? {
            Event::Done { bytes } => Ok(bytes),
            other => Err(ClientError::Unexpected(other)),
        }
    }
}
