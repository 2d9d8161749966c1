//! The login viewer's WebSocket (RFC 6455), framed here instead of by a
//! WebSocket library, because the viewer only relays bytes: a client's
//! data frames are unmasked in the buffer they were read into and written
//! on as they arrive (no message is assembled or copied into a library's
//! buffers; a read holding many small frames leaves in one write), and the
//! stream's bytes are read behind room for a frame header and leave in one
//! write.
//!
//! Everything from the client is hostile: each frame is checked as RFC
//! 6455 tells a server to (masked, no reserved bits, no unknown opcodes,
//! control frames whole and at most 125 bytes, continuations only inside a
//! fragmented message) and anything else closes the connection with 1002.
//! A frame's declared length never sizes anything: a connection holds two
//! fixed buffers whatever its frames say.

use std::future::Future;
use std::time::Duration;

use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::http::header::{
    CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_PROTOCOL,
    SEC_WEBSOCKET_VERSION, UPGRADE,
};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use tokio::io::Interest;

use crate::error::ApiError;

/// RFC 6455's key suffix for `Sec-WebSocket-Accept`.
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Idle viewer connections are closed after this long without any frame
/// from the client (pings go out every `PING`).
const IDLE: Duration = Duration::from_secs(90);
const PING: Duration = Duration::from_secs(20);
/// Largest read from either side: the stream's bytes per WebSocket frame,
/// and the client's bytes per parse.
pub(crate) const READ_BUF: usize = 256 * 1024;
/// Room before the stream's bytes for the longest server frame header.
const HEAD_ROOM: usize = 10;
/// The longest whole control frame a client may send: header, extended
/// length (never needed, but allowed), mask key, 125 bytes.
const MAX_CONTROL_FRAME: usize = 2 + 8 + 4 + 125;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// A request that asked for a WebSocket, as the extractor found it.
#[derive(Debug)]
pub struct Upgrade {
    accept: String,
    binary: bool,
    on_upgrade: hyper::upgrade::OnUpgrade,
}

/// Why a request is not a WebSocket upgrade (a 400 with `not_a_websocket`).
#[derive(Debug)]
pub struct NotAWebSocket(pub &'static str);

impl IntoResponse for NotAWebSocket {
    fn into_response(self) -> Response {
        ApiError::bad_request(
            "not_a_websocket",
            format!(
                "this endpoint only accepts a WebSocket upgrade (GET with Upgrade: websocket): {}",
                self.0
            ),
        )
        .into_response()
    }
}

/// Whether a comma-separated header holds `token` (case-insensitively,
/// or exactly where `exact`: a subprotocol must come back as offered).
fn has_token(headers: &HeaderMap, name: axum::http::HeaderName, token: &str, exact: bool) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|t| {
            if exact {
                t == token
            } else {
                t.eq_ignore_ascii_case(token)
            }
        })
}

/// `Sec-WebSocket-Accept` for a client's key.
fn accept_key(key: &[u8]) -> String {
    use sha1::Digest;
    let mut h = sha1::Sha1::new();
    h.update(key);
    h.update(ACCEPT_GUID);
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

impl Upgrade {
    /// Checks the handshake's headers as RFC 6455 §4.2.1 asks (HTTP/1.1
    /// GET, `Connection: upgrade`, `Upgrade: websocket`, version 13, a key
    /// of 16 bytes in base64).
    pub fn from_parts(parts: &mut Parts) -> Result<Self, NotAWebSocket> {
        if parts.method != Method::GET {
            return Err(NotAWebSocket("the method is not GET"));
        }
        if parts.version != Version::HTTP_11 {
            return Err(NotAWebSocket("a WebSocket upgrade needs HTTP/1.1"));
        }
        if !has_token(&parts.headers, CONNECTION, "upgrade", false) {
            return Err(NotAWebSocket("the Connection header does not say upgrade"));
        }
        if !has_token(&parts.headers, UPGRADE, "websocket", false) {
            return Err(NotAWebSocket("the Upgrade header does not say websocket"));
        }
        if parts
            .headers
            .get(SEC_WEBSOCKET_VERSION)
            .is_none_or(|v| v.as_bytes() != b"13")
        {
            return Err(NotAWebSocket("Sec-WebSocket-Version is not 13"));
        }
        let key = parts
            .headers
            .get(SEC_WEBSOCKET_KEY)
            .ok_or(NotAWebSocket("Sec-WebSocket-Key is missing"))?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(key.as_bytes())
            .map_err(|_| NotAWebSocket("Sec-WebSocket-Key is not base64"))?;
        if decoded.len() != 16 {
            return Err(NotAWebSocket("Sec-WebSocket-Key is not 16 bytes"));
        }
        let accept = accept_key(key.as_bytes());
        let binary = has_token(&parts.headers, SEC_WEBSOCKET_PROTOCOL, "binary", true);
        let on_upgrade = parts
            .extensions
            .remove::<hyper::upgrade::OnUpgrade>()
            .ok_or(NotAWebSocket("this connection cannot be upgraded"))?;
        Ok(Self {
            accept,
            binary,
            on_upgrade,
        })
    }

    /// Answers 101 and runs `run` on the upgraded connection as a task of
    /// `tasks` (joined on shutdown); 503 once `tasks` has shut down.
    pub fn on_upgrade<F, Fut>(self, tasks: &polydev_sessions::tasks::Tasks, run: F) -> Response
    where
        F: FnOnce(Socket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Self {
            accept,
            binary,
            on_upgrade,
        } = self;
        let started = tasks.spawn(async move {
            let up = match on_upgrade.await {
                Ok(up) => up,
                Err(e) => return tracing::warn!(error = %e, "viewer WebSocket upgrade failed"),
            };
            // The server's connections are TCP sockets: the pump works on
            // the socket itself (splice needs its descriptor).
            match up.downcast::<hyper_util::rt::TokioIo<tokio::net::TcpStream>>() {
                Ok(parts) => {
                    run(Socket {
                        stream: Stream::Tcp(parts.io.into_inner()),
                        early: parts.read_buf,
                    })
                    .await
                }
                Err(_) => tracing::error!("a viewer WebSocket not on a TCP socket: closed"),
            }
        });
        if !started {
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the controller is shutting down",
            )
            .into_response();
        }
        let mut r = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(CONNECTION, "upgrade")
            .header(UPGRADE, "websocket")
            .header(SEC_WEBSOCKET_ACCEPT, accept);
        if binary {
            r = r.header(SEC_WEBSOCKET_PROTOCOL, "binary");
        }
        r.body(Body::empty())
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = NotAWebSocket;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Self::from_parts(parts)
    }
}

/// The upgraded connection: its socket, and any bytes the HTTP server
/// read past the handshake (frames a client sent before the answer).
#[derive(Debug)]
pub struct Socket {
    pub stream: Stream,
    pub early: bytes::Bytes,
}

/// A connected stream socket: the viewer's TCP connection, or the VNC
/// server's Unix socket (TCP in the benchmark and the tests).
#[derive(Debug)]
pub enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

macro_rules! each {
    ($s:expr, $v:ident => $e:expr) => {
        match $s {
            Stream::Tcp($v) => $e,
            Stream::Unix($v) => $e,
        }
    };
}

impl Stream {
    async fn ready(&self, i: Interest) -> std::io::Result<()> {
        each!(self, s => s.ready(i).await.map(|_| ()))
    }

    /// `f` on the socket once it is ready for `i`, until it does not
    /// block (a `WouldBlock` from `f` clears the readiness).
    async fn when_ready<R>(
        &self,
        i: Interest,
        mut f: impl FnMut(BorrowedFd<'_>) -> nix::Result<R>,
    ) -> std::io::Result<R> {
        loop {
            self.ready(i).await?;
            let fd = self.fd();
            match each!(self, s => s.try_io(i, || f(fd).map_err(std::io::Error::from))) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        each!(self, s => s.as_fd())
    }

    async fn read_some(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.when_ready(Interest::READABLE, |fd| nix::unistd::read(fd, buf))
            .await
    }

    /// All of `bytes`, within `IDLE`; `more`: the next write follows at
    /// once (the header before its spliced payload: one segment, not two).
    async fn send_all(&self, mut bytes: &[u8], more: bool) -> std::io::Result<()> {
        use nix::sys::socket::MsgFlags;
        let flags = if more {
            MsgFlags::MSG_NOSIGNAL | MsgFlags::from_bits_retain(nix::libc::MSG_MORE)
        } else {
            MsgFlags::MSG_NOSIGNAL
        };
        let all = async {
            while !bytes.is_empty() {
                let n = self
                    .when_ready(Interest::WRITABLE, |fd| {
                        nix::sys::socket::send(fd.as_raw_fd(), bytes, flags)
                    })
                    .await?;
                bytes = &bytes[n..];
            }
            Ok(())
        };
        within_idle(all).await
    }
}

async fn within_idle(f: impl Future<Output = std::io::Result<()>>) -> std::io::Result<()> {
    tokio::time::timeout(IDLE, f)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// Moves the VNC side's bytes to the client through a pipe (`splice`: the
/// bytes never cross user space), each read behind a frame header.
/// (`splice` into a socket has no MSG_NOSIGNAL: a closed client is an
/// EPIPE because Rust programs ignore SIGPIPE.)
struct Splicer {
    pipe_r: std::os::fd::OwnedFd,
    pipe_w: std::os::fd::OwnedFd,
    /// What the pipe holds: the most one frame carries.
    room: usize,
}

impl Splicer {
    fn new() -> std::io::Result<Self> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let (pipe_r, pipe_w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // A bigger pipe where the host allows it; the default otherwise.
        let want = i32::try_from(READ_BUF).unwrap_or(i32::MAX);
        let _ = fcntl(&pipe_w, FcntlArg::F_SETPIPE_SZ(want));
        let room = fcntl(&pipe_w, FcntlArg::F_GETPIPE_SZ)
            .ok()
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n > 0)
            .unwrap_or(64 * 1024);
        Ok(Self {
            pipe_r,
            pipe_w,
            room,
        })
    }

    /// What `from` has (up to the pipe's room) into the empty pipe; 0 at
    /// its end.
    async fn fill(&self, from: &Stream) -> std::io::Result<usize> {
        use nix::fcntl::{splice, SpliceFFlags};
        let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
        from.when_ready(Interest::READABLE, |fd| {
            splice(fd, None, &self.pipe_w, None, self.room, flags)
        })
        .await
    }

    /// The pipe's `n` bytes to `to`, behind their frame header.
    async fn frame_to(&self, to: &Stream, n: usize) -> std::io::Result<()> {
        use nix::fcntl::{splice, SpliceFFlags};
        let (h, hl) = header(OP_BINARY, n);
        to.send_all(&h[..hl], true).await?;
        let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
        let mut left = n;
        within_idle(async {
            while left > 0 {
                let m = to
                    .when_ready(Interest::WRITABLE, |fd| {
                        splice(&self.pipe_r, None, fd, None, left, flags)
                    })
                    .await?;
                if m == 0 {
                    return Err(std::io::ErrorKind::WriteZero.into());
                }
                left -= m.min(left);
            }
            Ok(())
        })
        .await
    }
}

/// XORs `data` with the mask key, starting `phase` bytes into it.
fn unmask(data: &mut [u8], key: [u8; 4], phase: usize) {
    let m = [0, 1, 2, 3].map(|i| key[(phase + i) % 4]);
    let wide = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut chunks = data.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        c.copy_from_slice(&(u64::from_ne_bytes(w) ^ wide).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= m[i % 4];
    }
}

/// A server frame's header for `len` payload bytes: its bytes and length.
fn header(opcode: u8, len: usize) -> ([u8; HEAD_ROOM], usize) {
    let mut h = [0u8; HEAD_ROOM];
    h[0] = 0x80 | opcode;
    if len < 126 {
        h[1] = len as u8;
        (h, 2)
    } else if let Ok(short) = u16::try_from(len) {
        h[1] = 126;
        h[2..4].copy_from_slice(&short.to_be_bytes());
        (h, 4)
    } else {
        h[1] = 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        (h, 10)
    }
}

/// A frame as a client sends it, masked with `key` (the tests' and the
/// stream bench's client).
pub fn client_frame(fin: bool, opcode: u8, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
    let (mut h, n) = header(opcode, payload.len());
    if !fin {
        h[0] &= 0x7F;
    }
    h[1] |= 0x80;
    let mut f = Vec::with_capacity(n + 4 + payload.len());
    f.extend_from_slice(&h[..n]);
    f.extend_from_slice(&key);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    f
}

/// One whole control frame (payload at most 125 bytes).
async fn write_control(to: &Stream, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
    let payload = &payload[..payload.len().min(125)];
    let (h, n) = header(opcode, payload.len());
    let mut frame = [0u8; 2 + 125];
    frame[..n].copy_from_slice(&h[..n]);
    frame[n..n + payload.len()].copy_from_slice(payload);
    to.send_all(&frame[..n + payload.len()], false).await
}

async fn write_close(to: &Stream, code: u16, reason: &str) -> std::io::Result<()> {
    let mut p = [0u8; 125];
    let r = &reason.as_bytes()[..reason.len().min(123)];
    p[..2].copy_from_slice(&code.to_be_bytes());
    p[2..2 + r.len()].copy_from_slice(r);
    write_control(to, OP_CLOSE, &p[..2 + r.len()]).await
}

/// A client frame that breaks the protocol: the connection closes with
/// `code` (1002, or 1003 for text) and this reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Broken {
    pub(crate) code: u16,
    pub(crate) reason: &'static str,
}

const fn protocol(reason: &'static str) -> Broken {
    Broken { code: 1002, reason }
}

/// A control frame from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Control {
    Ping(Vec<u8>),
    Pong,
    Close,
}

/// What parsing the buffered bytes came to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Everything buffered is used; data gathered so far is in `data()`.
    NeedMore,
    /// A control frame (data gathered before it is in `data()`).
    Control(Control),
}

/// The client side's bytes and where parsing stands. The buffer holds, in
/// order: the unmasked payload gathered for the stream (`..out`), spent
/// bytes, and bytes not parsed yet (`pos..end`).
pub(crate) struct Frames {
    buf: Box<[u8]>,
    out: usize,
    pos: usize,
    end: usize,
    /// In a data frame's payload: bytes left, its mask key, bytes of it
    /// unmasked so far, and whether it ends its message.
    payload: Option<(u64, [u8; 4], usize, bool)>,
    /// Between the frames of a fragmented binary message.
    in_message: bool,
}

impl Frames {
    pub(crate) fn new() -> Self {
        Self {
            buf: vec![0u8; READ_BUF + MAX_CONTROL_FRAME].into_boxed_slice(),
            out: 0,
            pos: 0,
            end: 0,
            payload: None,
            in_message: false,
        }
    }

    /// The unmasked data gathered since the last `take_data`.
    pub(crate) fn data(&self) -> &[u8] {
        &self.buf[..self.out]
    }

    /// Marks the gathered data written; parsing goes on where it was.
    pub(crate) fn data_written(&mut self) {
        self.out = 0;
    }

    /// Before a read, once `parse` needs more: moves what is not parsed
    /// yet (at most one incomplete header or control frame) to the front.
    pub(crate) fn compact(&mut self) {
        self.out = 0;
        self.buf.copy_within(self.pos..self.end, 0);
        self.end -= self.pos;
        self.pos = 0;
    }

    /// Room for the next read (after `compact`).
    pub(crate) fn spare(&mut self) -> &mut [u8] {
        let end = self.end;
        &mut self.buf[end..]
    }

    pub(crate) fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// Parses what is buffered: data payload is unmasked and gathered at
    /// the front; stops at a control frame or when more bytes are needed.
    pub(crate) fn parse(&mut self) -> Result<Step, Broken> {
        loop {
            if let Some((left, key, done, fin)) = self.payload {
                let avail = (self.end - self.pos) as u64;
                let k = usize::try_from(left.min(avail)).unwrap_or(usize::MAX);
                if k == 0 && left > 0 {
                    return Ok(Step::NeedMore);
                }
                let (from, to) = (self.pos, self.pos + k);
                unmask(&mut self.buf[from..to], key, done);
                if self.out != from {
                    self.buf.copy_within(from..to, self.out);
                }
                self.out += k;
                self.pos = to;
                let left = left - k as u64;
                if left > 0 {
                    self.payload = Some((left, key, (done + k) % 4, fin));
                    return Ok(Step::NeedMore);
                }
                self.payload = None;
                if fin {
                    self.in_message = false;
                }
                continue;
            }
            let b = &self.buf[self.pos..self.end];
            if b.len() < 2 {
                return Ok(Step::NeedMore);
            }
            let (fin, rsv, opcode) = (b[0] & 0x80 != 0, b[0] & 0x70, b[0] & 0x0F);
            let (masked, len7) = (b[1] & 0x80 != 0, b[1] & 0x7F);
            if rsv != 0 {
                return Err(protocol("reserved bits set (no extension was agreed)"));
            }
            if !masked {
                return Err(protocol("client frames must be masked"));
            }
            let ext = match len7 {
                126 => 2,
                127 => 8,
                _ => 0,
            };
            let head = 2 + ext + 4;
            if b.len() < head {
                return Ok(Step::NeedMore);
            }
            let len = match ext {
                2 => u64::from(u16::from_be_bytes([b[2], b[3]])),
                8 => {
                    let mut l = [0u8; 8];
                    l.copy_from_slice(&b[2..10]);
                    u64::from_be_bytes(l)
                }
                _ => u64::from(len7),
            };
            if len >> 63 != 0 {
                return Err(protocol("a frame length's top bit is set"));
            }
            let mut key = [0u8; 4];
            key.copy_from_slice(&b[2 + ext..head]);
            match opcode {
                OP_CONTINUATION | OP_BINARY => {
                    if opcode == OP_CONTINUATION && !self.in_message {
                        return Err(protocol("a continuation frame outside a message"));
                    }
                    if opcode == OP_BINARY && self.in_message {
                        return Err(protocol("a new message inside a fragmented one"));
                    }
                    self.in_message = !fin;
                    self.pos += head;
                    self.payload = Some((len, key, 0, fin));
                }
                OP_TEXT => {
                    return Err(Broken {
                        code: 1003,
                        reason: "binary frames only",
                    })
                }
                OP_CLOSE | OP_PING | OP_PONG => {
                    if !fin {
                        return Err(protocol("a fragmented control frame"));
                    }
                    if len > 125 {
                        return Err(protocol("a control frame over 125 bytes"));
                    }
                    let total = head + len as usize;
                    if b.len() < total {
                        return Ok(Step::NeedMore);
                    }
                    let (from, to) = (self.pos + head, self.pos + total);
                    unmask(&mut self.buf[from..to], key, 0);
                    let payload = &self.buf[from..to];
                    let control = match opcode {
                        OP_PING => Control::Ping(payload.to_vec()),
                        OP_PONG => Control::Pong,
                        _ if payload.len() == 1 => {
                            return Err(protocol("a close frame of one byte"))
                        }
                        _ => Control::Close,
                    };
                    self.pos = to;
                    return Ok(Step::Control(control));
                }
                _ => return Err(protocol("a reserved opcode")),
            }
        }
    }
}

/// The close frame for the session's ending (`None`: its sender went,
/// which only happens as it ends).
fn session_close(code: Option<u16>) -> (u16, &'static str) {
    match code {
        Some(1001) | None => (1001, "the login session ended"),
        Some(_) => (1011, "the login session failed"),
    }
}

/// A task that is aborted when its handle is dropped: the bridge's
/// stream-to-client half ends with the bridge, also when the bridge's own
/// task is aborted (at shutdown).
struct Half<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for Half<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> Future for Half<T> {
    type Output = Result<T, tokio::task::JoinError>;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}

/// What the client side asks the side writing to the client to send.
enum Out {
    Pong(Vec<u8>),
    Close(u16, &'static str),
}

/// Pumps bytes between the viewer's WebSocket and a stream (the VNC
/// server) until either side ends; returns why. Each direction waits for
/// its write before it reads more (one fixed buffer each way: bounded,
/// with backpressure). The VNC side failing closes the WebSocket with
/// 1011; the session ending, with 1001 (1011 if it failed); a client
/// silent for `IDLE` (pings go out every `PING`), with 1001; a client
/// breaking the protocol, with 1002 (1003 for text frames).
pub async fn bridge(
    client: Socket,
    stream: Stream,
    mut ending: tokio::sync::watch::Receiver<Option<u16>>,
    touch: impl Fn() + Send + 'static,
    metrics: polydev_telemetry::metrics::LoginMetrics,
) -> &'static str {
    let Socket {
        stream: client,
        early,
    } = client;
    let (client, vnc) = (std::sync::Arc::new(client), std::sync::Arc::new(stream));
    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<Out>(4);
    let splicer = match Splicer::new() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "no pipe for the viewer");
            let _ = write_close(&client, 1011, "the server is out of resources").await;
            return "no pipe";
        }
    };

    // Stream → client (and pings, pongs and the close frame).
    let to_client = metrics.bridged_counter("to_client");
    let to_vnc = metrics.bridged_counter("to_vnc");
    let session_ending = ending.clone();
    let (down_client, down_vnc) = (client.clone(), vnc.clone());
    let mut down = Half(tokio::spawn(async move {
        let (client, vnc) = (down_client, down_vnc);
        let mut ping = tokio::time::interval(PING);
        ping.tick().await;
        loop {
            tokio::select! {
                n = splicer.fill(&vnc) => {
                    let n = match n {
                        Ok(0) | Err(_) => {
                            let (code, reason) = match *session_ending.borrow() {
                                None => (1011, "the remote browser's VNC server closed"),
                                code => session_close(code),
                            };
                            let _ = write_close(&client, code, reason).await;
                            return reason;
                        }
                        Ok(n) => n,
                    };
                    to_client.inc_by(n as u64);
                    if splicer.frame_to(&client, n).await.is_err() {
                        return "client gone";
                    }
                }
                _ = ping.tick() => {
                    if write_control(&client, OP_PING, &[]).await.is_err() {
                        return "client gone";
                    }
                }
                o = out_rx.recv() => match o {
                    Some(Out::Pong(p)) => {
                        if write_control(&client, OP_PONG, &p).await.is_err() {
                            return "client gone";
                        }
                    }
                    Some(Out::Close(code, reason)) => {
                        let _ = write_close(&client, code, reason).await;
                        return reason;
                    }
                    None => {
                        let _ = write_close(&client, 1000, "closed").await;
                        return "closed";
                    }
                },
            }
        }
    }));

    // Client → stream, until either side ends. One idle timer, moved on
    // when it fires (not re-armed per read); the session is touched at
    // most once a second.
    let mut frames = Frames::new();
    let fits = early.len() <= frames.spare().len();
    if fits {
        frames.spare()[..early.len()].copy_from_slice(&early);
        frames.filled(early.len());
    }
    let mut heard = tokio::time::Instant::now();
    let idle = tokio::time::sleep(IDLE);
    tokio::pin!(idle);
    let mut touched: Option<tokio::time::Instant> = None;
    let mut touch = move || {
        let now = tokio::time::Instant::now();
        if touched.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
            touched = Some(now);
            touch();
        }
    };
    let close = if !fits {
        Some((1009, "too many bytes before the handshake's answer"))
    } else {
        loop {
            let step = match frames.parse() {
                Err(broken) => break Some((broken.code, broken.reason)),
                Ok(step) => step,
            };
            if !frames.data().is_empty() {
                touch();
                let n = frames.data().len();
                let write = vnc.send_all(frames.data(), false);
                tokio::pin!(write);
                let failed = loop {
                    tokio::select! {
                        w = &mut write => break w.is_err().then_some((1011, "the remote browser's VNC server closed")),
                        why = &mut down => return why.unwrap_or("client gone"),
                        changed = ending.changed() => {
                            let code = *ending.borrow();
                            match (changed, code) {
                                (Ok(()), None) => continue,
                                _ => break Some(session_close(code)),
                            }
                        }
                    }
                };
                if let Some(close) = failed {
                    break Some(close);
                }
                to_vnc.inc_by(n as u64);
            }
            frames.data_written();
            match step {
                Step::Control(Control::Close) => break None,
                Step::Control(Control::Ping(p)) => {
                    touch();
                    // A pong answers the latest ping: one may be dropped.
                    let _ = out_tx.try_send(Out::Pong(p));
                    continue;
                }
                // More may be buffered behind a control frame: parse on.
                Step::Control(Control::Pong) => continue,
                Step::NeedMore => frames.compact(),
            }
            let read = tokio::select! {
                why = &mut down => return why.unwrap_or("client gone"),
                r = client.read_some(frames.spare()) => r,
                () = &mut idle => {
                    if heard.elapsed() >= IDLE {
                        break Some((1001, "idle"));
                    }
                    idle.as_mut().reset(heard + IDLE);
                    continue;
                }
                changed = ending.changed() => {
                    let code = *ending.borrow();
                    match (changed, code) {
                        (Ok(()), None) => continue,
                        _ => break Some(session_close(code)),
                    }
                }
            };
            match read {
                Ok(0) | Err(_) => break None,
                Ok(n) => {
                    heard = tokio::time::Instant::now();
                    frames.filled(n);
                }
            }
        }
    };
    match close {
        Some((code, reason)) => {
            // Waits for room behind queued pongs (briefly).
            let queued = out_tx.send(Out::Close(code, reason));
            let _ = tokio::time::timeout(Duration::from_secs(1), queued).await;
        }
        None => drop(out_tx),
    }
    match tokio::time::timeout(Duration::from_secs(2), &mut down).await {
        Ok(Ok(why)) => why,
        // Dropped (so aborted) on the way out.
        _ => "client gone",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A connected TCP pair on loopback: (client end, server end).
    async fn tcp_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    /// The bridge between a client's TCP socket and a Unix "VNC" socket
    /// whose far end the test holds.
    async fn start(
        server: tokio::net::TcpStream,
    ) -> (
        tokio::net::UnixStream,
        tokio::task::JoinHandle<&'static str>,
        tokio::sync::watch::Sender<Option<u16>>,
    ) {
        let (vnc, far) = tokio::net::UnixStream::pair().unwrap();
        let (end_tx, end_rx) = tokio::sync::watch::channel(None);
        let socket = Socket {
            stream: Stream::Tcp(server),
            early: bytes::Bytes::new(),
        };
        let task = tokio::spawn(bridge(
            socket,
            Stream::Unix(vnc),
            end_rx,
            || {},
            Default::default(),
        ));
        (far, task, end_tx)
    }

    /// Feeds `bytes` to a parser `chunk` bytes per read; returns the data
    /// it gathered and the control frames, or where it broke.
    fn feed(bytes: &[u8], chunk: usize) -> Result<(Vec<u8>, Vec<Control>), Broken> {
        let mut f = Frames::new();
        let (mut data, mut controls) = (Vec::new(), Vec::new());
        let mut at = 0;
        loop {
            loop {
                let step = f.parse()?;
                data.extend_from_slice(f.data());
                f.data_written();
                match step {
                    Step::NeedMore => break,
                    Step::Control(c) => controls.push(c),
                }
            }
            f.compact();
            if at == bytes.len() {
                return Ok((data, controls));
            }
            let spare = f.spare();
            let n = chunk.min(spare.len()).min(bytes.len() - at);
            spare[..n].copy_from_slice(&bytes[at..at + n]);
            f.filled(n);
            at += n;
        }
    }

    #[test]
    fn the_accept_key_is_rfc_6455s_example() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn unmasking_at_any_phase_and_length_matches_the_bytewise_rule() {
        let key = [0x12, 0x34, 0x56, 0x78];
        for len in 0..40 {
            for phase in 0..4 {
                let data: Vec<u8> = (0..len as u8).collect();
                let mut fast = data.clone();
                unmask(&mut fast, key, phase);
                let slow: Vec<u8> = data
                    .iter()
                    .enumerate()
                    .map(|(i, b)| b ^ key[(phase + i) % 4])
                    .collect();
                assert_eq!(fast, slow, "len {len} phase {phase}");
            }
        }
    }

    #[test]
    fn server_headers_use_the_shortest_length_form() {
        assert_eq!(&header(OP_BINARY, 5).0[..2], &[0x82, 5]);
        assert_eq!(&header(OP_BINARY, 126).0[..4], &[0x82, 126, 0, 126]);
        assert_eq!(
            &header(OP_BINARY, 65536).0[..10],
            &[0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]
        );
    }

    /// Big and small frames, a fragmented message and pings between them,
    /// split at every read size from one byte up: the same bytes come out
    /// in order and every control frame is seen.
    #[test]
    fn data_comes_out_whole_however_the_reads_split_the_frames() {
        let big: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
        let mut wire = Vec::new();
        let mut want = Vec::new();
        for (i, n) in [0usize, 1, 125, 126, 4096, 65535, 65536, 70_000]
            .iter()
            .enumerate()
        {
            let p = &big[i..i + n];
            wire.extend(client_frame(
                true,
                OP_BINARY,
                p,
                [i as u8, 0xA5, 0x5A, 0xFF],
            ));
            want.extend_from_slice(p);
            wire.extend(client_frame(true, OP_PING, &[i as u8; 3], [9, 8, 7, 6]));
        }
        // One message in three frames, a pong in the middle.
        wire.extend(client_frame(false, OP_BINARY, b"frag", [1, 2, 3, 4]));
        wire.extend(client_frame(true, OP_PONG, b"", [1, 2, 3, 4]));
        wire.extend(client_frame(false, OP_CONTINUATION, b"ment", [5, 6, 7, 8]));
        wire.extend(client_frame(true, OP_CONTINUATION, b"ed", [9, 9, 9, 9]));
        want.extend_from_slice(b"fragmented");
        wire.extend(client_frame(
            true,
            OP_CLOSE,
            &1000u16.to_be_bytes(),
            [3, 3, 3, 3],
        ));
        for chunk in [1, 2, 3, 7, 13, 4096, 65536, 1 << 20] {
            let (data, controls) = feed(&wire, chunk).unwrap();
            assert!(data == want, "read size {chunk}: the data differs");
            let pings = controls
                .iter()
                .filter(|c| matches!(c, Control::Ping(_)))
                .count();
            assert_eq!(pings, 8, "read size {chunk}");
            assert_eq!(controls[0], Control::Ping(vec![0; 3]));
            assert_eq!(controls[controls.len() - 2], Control::Pong);
            assert_eq!(controls.last(), Some(&Control::Close));
        }
    }

    #[test]
    fn frames_a_server_must_refuse_close_with_the_right_code() {
        let ok = client_frame(true, OP_BINARY, b"hi", [1, 2, 3, 4]);
        let cases: Vec<(Vec<u8>, u16, &str)> = vec![
            (
                {
                    let mut f = ok.clone();
                    f[1] &= 0x7F;
                    f
                },
                1002,
                "masked",
            ),
            (
                {
                    let mut f = ok.clone();
                    f[0] |= 0x40;
                    f
                },
                1002,
                "reserved bits",
            ),
            (
                client_frame(true, 0x3, b"x", [1, 2, 3, 4]),
                1002,
                "reserved opcode",
            ),
            (
                client_frame(true, 0xB, b"x", [1, 2, 3, 4]),
                1002,
                "reserved opcode",
            ),
            (
                client_frame(true, OP_TEXT, b"x", [1, 2, 3, 4]),
                1003,
                "binary frames only",
            ),
            (
                client_frame(true, OP_CONTINUATION, b"x", [1, 2, 3, 4]),
                1002,
                "continuation",
            ),
            (
                client_frame(false, OP_PING, b"x", [1, 2, 3, 4]),
                1002,
                "fragmented control",
            ),
            (
                client_frame(true, OP_PING, &[0; 126], [1, 2, 3, 4]),
                1002,
                "over 125",
            ),
            (
                client_frame(true, OP_CLOSE, &[3], [1, 2, 3, 4]),
                1002,
                "one byte",
            ),
            (
                [
                    client_frame(false, OP_BINARY, b"a", [1, 2, 3, 4]),
                    ok.clone(),
                ]
                .concat(),
                1002,
                "new message inside",
            ),
            (
                vec![0x82, 0x80 | 127, 0x80, 0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 4],
                1002,
                "top bit",
            ),
        ];
        for (wire, code, words) in cases {
            let broken = feed(&wire, 1 << 16).unwrap_err();
            assert_eq!(broken.code, code, "{words}");
            assert!(broken.reason.contains(words), "{words}: {}", broken.reason);
        }
        // The control: a good frame passes.
        assert_eq!(feed(&ok, 1).unwrap().0, b"hi");
    }

    /// A frame that declares an exabyte holds no more memory than any
    /// other: its bytes are passed on as they come.
    #[test]
    fn a_huge_declared_length_sizes_nothing() {
        let mut wire = vec![0x82, 0x80 | 127];
        wire.extend_from_slice(&(1u64 << 60).to_be_bytes());
        wire.extend_from_slice(&[0, 0, 0, 0]);
        wire.extend(std::iter::repeat_n(7u8, 300_000));
        let mut f = Frames::new();
        let cap = f.buf.len();
        let (data, _) = feed(&wire, 1 << 20).unwrap();
        assert_eq!(data.len(), 300_000);
        assert_eq!(f.parse(), Ok(Step::NeedMore));
        assert_eq!(f.buf.len(), cap);
    }

    type Client = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

    /// A well-kept client (tungstenite) on one end of the bridge and the
    /// far end of its stream; the bridge's task and its session's ending.
    async fn bridged() -> (
        Client,
        tokio::net::UnixStream,
        tokio::task::JoinHandle<&'static str>,
        tokio::sync::watch::Sender<Option<u16>>,
    ) {
        let (client, server) = tcp_pair().await;
        let (far, task, end_tx) = start(server).await;
        let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            client,
            tokio_tungstenite::tungstenite::protocol::Role::Client,
            None,
        )
        .await;
        (ws, far, task, end_tx)
    }

    async fn close_code(ws: &mut Client) -> u16 {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        loop {
            match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
                Ok(Some(Ok(Message::Close(Some(f))))) => return f.code.into(),
                Ok(Some(Ok(Message::Close(None)))) | Ok(None) => return 0,
                Ok(Some(Ok(_))) => {}
                other => panic!("no close frame: {other:?}"),
            }
        }
    }

    /// Through tungstenite as the client: messages of every size reach the
    /// stream whole and in order, the stream's bytes come back as binary
    /// messages, a ping gets its pong, and a close is answered.
    #[tokio::test]
    async fn a_standard_client_round_trips_through_the_bridge() {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        let (mut ws, far, task, _end) = bridged().await;
        // The far end echoes.
        let (mut far_rd, mut far_wr) = far.into_split();
        tokio::spawn(async move { tokio::io::copy(&mut far_rd, &mut far_wr).await });
        let mut sent = Vec::new();
        for n in [1usize, 125, 126, 4096, 65536, 200_000] {
            let m: Vec<u8> = (0..n).map(|i| (i * 31 + n) as u8).collect();
            sent.extend_from_slice(&m);
            ws.send(Message::Binary(m.into())).await.unwrap();
        }
        ws.send(Message::Ping(b"are you there".to_vec().into()))
            .await
            .unwrap();
        let (mut got, mut pong) = (Vec::new(), None);
        while got.len() < sent.len() || pong.is_none() {
            match tokio::time::timeout(Duration::from_secs(5), ws.next())
                .await
                .unwrap()
            {
                Some(Ok(Message::Binary(b))) => got.extend_from_slice(&b),
                Some(Ok(Message::Pong(p))) => pong = Some(p.to_vec()),
                other => panic!("unexpected: {other:?}"),
            }
        }
        assert!(got == sent, "the echoed bytes differ");
        assert_eq!(pong.as_deref(), Some(&b"are you there"[..]));
        ws.close(None).await.unwrap();
        assert_eq!(close_code(&mut ws).await, 1000);
        assert_eq!(task.await.unwrap(), "closed");
    }

    #[tokio::test]
    async fn the_stream_closing_closes_the_viewer_with_1011() {
        let (mut ws, far, task, _end) = bridged().await;
        drop(far);
        assert_eq!(close_code(&mut ws).await, 1011);
        assert_eq!(
            task.await.unwrap(),
            "the remote browser's VNC server closed"
        );
    }

    /// The bridge's task aborted (as at shutdown) while its other half is
    /// stuck writing to a client that reads nothing: that half goes too,
    /// so the stream is let go rather than held.
    #[tokio::test]
    async fn aborting_the_bridge_ends_a_stuck_half_too() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let (client, server) = tcp_pair().await;
        // Small socket buffers, so the bridge gets stuck soon.
        use nix::sys::socket::{setsockopt, sockopt};
        setsockopt(&client, sockopt::RcvBuf, &4096).unwrap();
        setsockopt(&server, sockopt::SndBuf, &4096).unwrap();
        let (far, task, _end) = start(server).await;
        let written = std::sync::Arc::new(AtomicUsize::new(0));
        let count = written.clone();
        let (_far_rd, mut far_wr) = far.into_split();
        let writer = tokio::spawn(async move {
            let chunk = vec![1u8; 64 * 1024];
            loop {
                far_wr.write_all(&chunk).await?;
                count.fetch_add(chunk.len(), Ordering::Relaxed);
            }
            #[allow(unreachable_code)]
            std::io::Result::Ok(())
        });
        // More than the Unix socket holds (~208 KiB) and the client's
        // small TCP buffers: the bridge has read, and its write to the
        // client, which reads nothing, is stuck.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while written.load(Ordering::Relaxed) < 384 << 10 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the bridge never read"
            );
            tokio::task::yield_now().await;
        }
        task.abort();
        let ended = tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("the stream is let go");
        assert!(
            ended.unwrap().is_err(),
            "the stream's far end sees it closed"
        );
    }

    #[tokio::test]
    async fn the_session_ending_closes_the_viewer_with_1001() {
        let (mut ws, _far, task, end) = bridged().await;
        end.send(Some(1001)).unwrap();
        assert_eq!(close_code(&mut ws).await, 1001);
        assert_eq!(task.await.unwrap(), "the login session ended");
    }

    #[tokio::test]
    async fn a_text_frame_closes_with_1003_and_nothing_reaches_the_stream() {
        use futures_util::SinkExt;
        use tokio_tungstenite::tungstenite::Message;
        let (mut ws, mut far, task, _end) = bridged().await;
        ws.send(Message::Text("hello".into())).await.unwrap();
        assert_eq!(close_code(&mut ws).await, 1003);
        assert_eq!(task.await.unwrap(), "binary frames only");
        let mut b = [0u8; 8];
        let n = tokio::time::timeout(Duration::from_secs(5), far.read(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 0, "the stream got bytes");
    }

    /// A pong (or ping) and data in one read: the data goes on at once, not
    /// when the client next sends something (a viewer's pong often shares
    /// a packet with noVNC's next update request).
    #[tokio::test]
    async fn data_behind_a_control_frame_in_the_same_read_goes_on_at_once() {
        let (client, server) = tcp_pair().await;
        let (mut far, _task, _end) = start(server).await;
        let (mut rd, mut wr) = client.into_split();
        let wire = [
            client_frame(true, OP_PONG, b"", [1, 2, 3, 4]),
            client_frame(true, OP_PING, b"p", [5, 6, 7, 8]),
            client_frame(true, OP_BINARY, b"after", [9, 10, 11, 12]),
        ]
        .concat();
        wr.write_all(&wire).await.unwrap();
        let mut got = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(5), far.read_exact(&mut got))
            .await
            .expect("the data behind the control frames went on")
            .unwrap();
        assert_eq!(&got, b"after");
        let mut pong = [0u8; 3];
        rd.read_exact(&mut pong).await.unwrap();
        assert_eq!(pong, [0x80 | OP_PONG, 1, b'p']);
    }

    /// A client that sends more before the handshake's answer than a
    /// parse buffer holds (hyper hands those bytes over with the socket)
    /// is closed with 1009; none of it reaches the stream.
    #[tokio::test]
    async fn too_many_bytes_before_the_answer_close_with_1009() {
        let (client, server) = tcp_pair().await;
        let (vnc, mut far) = tokio::net::UnixStream::pair().unwrap();
        let (_end, end_rx) = tokio::sync::watch::channel(None);
        let frame = client_frame(true, OP_BINARY, &[1u8; 60_000], [1, 2, 3, 4]);
        let early = bytes::Bytes::from(frame.repeat(5));
        let socket = Socket {
            stream: Stream::Tcp(server),
            early,
        };
        let task = tokio::spawn(bridge(
            socket,
            Stream::Unix(vnc),
            end_rx,
            || {},
            Default::default(),
        ));
        let (mut rd, _wr) = client.into_split();
        let mut got = [0u8; 4];
        rd.read_exact(&mut got).await.unwrap();
        assert_eq!(got[0], 0x88, "a close frame");
        assert_eq!(u16::from_be_bytes([got[2], got[3]]), 1009);
        assert_eq!(
            task.await.unwrap(),
            "too many bytes before the handshake's answer"
        );
        let mut b = [0u8; 8];
        assert_eq!(far.read(&mut b).await.unwrap(), 0, "the stream got bytes");
    }

    /// Raw bytes a hostile client might send: an unmasked frame closes the
    /// connection with 1002 before any of it reaches the stream.
    #[tokio::test]
    async fn an_unmasked_frame_closes_with_1002() {
        let (client, server) = tcp_pair().await;
        let (mut far, task, _end) = start(server).await;
        let (mut rd, mut wr) = client.into_split();
        wr.write_all(&[0x82, 0x02, b'h', b'i']).await.unwrap();
        let mut got = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), rd.read(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got[0], 0x88, "a close frame");
        assert_eq!(u16::from_be_bytes([got[2], got[3]]), 1002);
        assert!(std::str::from_utf8(&got[4..n]).unwrap().contains("masked"));
        assert_eq!(task.await.unwrap(), "client frames must be masked");
        let mut b = [0u8; 8];
        assert_eq!(far.read(&mut b).await.unwrap(), 0);
    }
}
