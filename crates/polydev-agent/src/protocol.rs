//! The agent protocol, version 1: length-prefixed JSON frames over a Unix
//! stream socket (a vsock later, for microVMs).
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of
//! JSON; frames above `MAX_FRAME` are refused. The client opens with
//! `Hello{version}`; the agent answers `Hello{version, public_key}` or an
//! `Error` when it does not speak that version. Every request carries an
//! `id`, echoed on each event it produces; one connection runs one request
//! at a time (open more connections for concurrent execs). Unknown fields
//! are ignored, so a newer peer may add optional ones within a version.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const PROTOCOL_VERSION: u32 = 1;
/// Largest frame either side accepts.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

/// What the controller asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    Hello {
        version: u32,
    },
    /// Answers `Ready{status: "ready"}` once the agent serves.
    Health,
    /// Runs `argv`, streaming `Started`, `Stdout`/`Stderr` and `Exit`.
    Exec {
        argv: Vec<String>,
        #[serde(default)]
        env: Vec<(String, String)>,
        #[serde(default)]
        cwd: Option<String>,
        /// Base64 bytes written to stdin, which is then closed (unless
        /// `keep_stdin`).
        #[serde(default)]
        stdin: Option<String>,
        /// Keeps stdin open for later `Stdin` requests (e.g. a login code
        /// the user pastes).
        #[serde(default)]
        keep_stdin: bool,
        /// Killed (SIGKILL) when still running after this.
        timeout_ms: u64,
    },
    /// Writes to the stdin of a running exec started with `keep_stdin`.
    Stdin {
        pid: u32,
        data: String,
        #[serde(default)]
        close: bool,
    },
    /// Reads the file at `path` inside the sandbox and seals it to
    /// `recipient` (a user's public key, base64); only the sealed box
    /// goes back, never the plaintext. Answers `Sealed`.
    Seal {
        path: String,
        recipient: String,
        purpose: String,
        aad: String,
    },
    PutFile {
        path: String,
        mode: u32,
        data: String,
    },
    GetFile {
        path: String,
    },
    /// Sends a signal to a process this agent started.
    Signal {
        pid: u32,
        signal: i32,
    },
    /// Sets the environment every later exec starts from (hand-out).
    Configure {
        #[serde(default)]
        env: Vec<(String, String)>,
    },
    /// Connects, inside the sandbox, to the service listening on the Unix
    /// socket `/run/polydev/<service>` (e.g. the login desktop's VNC server,
    /// `vnc.sock`). Answers `Done`; from then on the connection carries the
    /// service's raw bytes both ways and no more frames. The path is resolved
    /// in the sandbox's own mount namespace, so whatever the sandbox put
    /// there can only lead back into the sandbox.
    Connect {
        service: String,
    },
    /// Opens a box sealed to this agent's public key and writes the
    /// plaintext to `path` (mode `mode`); the plaintext never goes back.
    /// With `append` it is added to the end of the file (one chunk of a
    /// sealed stream after another) instead of replacing it.
    Unseal {
        purpose: String,
        aad: String,
        sealed: String,
        path: String,
        mode: u32,
        #[serde(default)]
        append: bool,
    },
}

/// Whether `name` may name a service socket under `/run/polydev` (a plain
/// file name: no path, no dot files, nothing surprising).
pub fn valid_service_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Where services inside a sandbox listen.
pub const SERVICE_DIR: &str = "/run/polydev";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    #[serde(flatten)]
    pub op: Op,
}

/// What the agent answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The ephemeral HPKE public key (65 bytes, base64) to seal credentials to.
    Hello {
        version: u32,
        public_key: String,
    },
    Ready {
        status: String,
    },
    Started {
        pid: u32,
    },
    Stdout {
        data: String,
    },
    Stderr {
        data: String,
    },
    Exit {
        code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
    },
    File {
        data: String,
    },
    /// A sealed box (base64), the answer to `Seal`.
    Sealed {
        data: String,
    },
    /// The request finished (for requests without a richer answer).
    Done {
        bytes: u64,
    },
    Error {
        code: String,
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub id: u64,
    #[serde(flatten)]
    pub event: Event,
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("frame of {0} bytes is larger than allowed")]
    TooLarge(usize),
    #[error("frame is not a valid message: {0}")]
    Invalid(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads one frame and decodes it.
pub async fn read_frame<T: for<'de> Deserialize<'de>>(
    r: &mut (impl AsyncRead + Unpin),
) -> Result<T, FrameError> {
    let len = match r.read_u32().await {
        Ok(n) => n as usize,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    };
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    decode(&buf)
}

/// Decodes a frame body (also the fuzzing entry point: any bytes in, a
/// value or an error out, never a panic).
pub fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(body).map_err(|e| FrameError::Invalid(e.to_string()))
}

pub async fn write_frame<T: Serialize>(
    w: &mut (impl AsyncWrite + Unpin),
    value: &T,
) -> Result<(), FrameError> {
    let body = serde_json::to_vec(value).map_err(|e| FrameError::Invalid(e.to_string()))?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    w.write_u32(body.len() as u32).await?;
    w.write_all(&body).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_oversized_ones_are_refused() {
        let req = Request {
            id: 7,
            op: Op::Exec {
                argv: vec!["true".into()],
                env: vec![],
                cwd: None,
                stdin: None,
                keep_stdin: false,
                timeout_ms: 10,
            },
        };
        let mut buf = Vec::new();
        write_frame(&mut buf, &req).await.unwrap();
        let back: Request = read_frame(&mut buf.as_slice()).await.unwrap();
        assert_eq!(back, req);
        let mut huge = Vec::new();
        huge.extend_from_slice(&((MAX_FRAME as u32) + 1).to_be_bytes());
        assert!(matches!(
            read_frame::<Request>(&mut huge.as_slice()).await,
            Err(FrameError::TooLarge(_))
        ));
        assert!(matches!(
            read_frame::<Request>(&mut [0u8, 0].as_slice()).await,
            Err(FrameError::Closed)
        ));
    }

    /// A deterministic fuzz pass over the decoder (cargo-fuzz needs a
    /// nightly toolchain these machines lack): mutated valid frames and
    /// random bytes must decode or fail, never panic.
    #[test]
    fn the_decoder_survives_arbitrary_bytes() {
        let seed = serde_json::to_vec(&Request {
            id: 1,
            op: Op::Unseal {
                purpose: "p".into(),
                aad: "".into(),
                sealed: "UAEE".into(),
                path: "/x".into(),
                mode: 0o600,
                append: false,
            },
        })
        .unwrap();
        let mut state = 0x9e3779b97f4a7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let mut input = if next() % 2 == 0 {
                seed.clone()
            } else {
                (0..(next() % 64)).map(|_| next() as u8).collect()
            };
            for _ in 0..(next() % 8) {
                if input.is_empty() {
                    break;
                }
                let i = (next() as usize) % input.len();
                input[i] = next() as u8;
            }
            let _ = decode::<Request>(&input);
            let _ = decode::<Response>(&input);
        }
    }
}
