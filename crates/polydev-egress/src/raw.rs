//! The front door of every connection. It reads the first request head
//! itself: a CONNECT is served here, with `splice(2)` moving bytes between
//! the two sockets through a kernel pipe (no copies through user space, no
//! per-tunnel buffers); anything else goes to hyper with the bytes already
//! read replayed in front of the stream.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use nix::fcntl::{splice, OFlag, SpliceFFlags};
use polydev_domain::UserId;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpStream;

use crate::accounting::Meter;
use crate::proxy::{self, Refusal};
use crate::Inner;

/// Longest request head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Bytes moved per splice call (a default pipe holds 64 KiB).
const CHUNK: usize = 64 * 1024;

struct Head {
    len: usize,
    method: String,
    target: String,
    proxy_authorization: Option<String>,
}

enum HeadError {
    TooLarge,
    Malformed,
    Io,
}

async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Option<Head>, HeadError> {
    loop {
        if buf.capacity() - buf.len() < 512 {
            buf.reserve(1024);
        }
        let n = stream.read_buf(buf).await.map_err(|_| HeadError::Io)?;
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(HeadError::Malformed)
            };
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(len)) => {
                return Ok(Some(Head {
                    len,
                    method: req.method.unwrap_or_default().to_owned(),
                    target: req.path.unwrap_or_default().to_owned(),
                    proxy_authorization: req
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("proxy-authorization"))
                        .and_then(|h| std::str::from_utf8(h.value).ok())
                        .map(str::to_owned),
                }))
            }
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                return Err(HeadError::TooLarge)
            }
            Ok(httparse::Status::Partial) => continue,
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
            Err(_) => return Err(HeadError::Malformed),
        }
    }
}

/// Serves one accepted connection.
pub(crate) async fn serve(
    inner: Arc<Inner>,
    mut stream: TcpStream,
    peer: SocketAddr,
    owner: Option<UserId>,
) {
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::with_capacity(1024);
    let head = match tokio::time::timeout(
        inner.config.header_timeout(),
        read_head(&mut stream, &mut buf),
    )
    .await
    {
        Ok(Ok(Some(head))) => head,
        Ok(Ok(None)) | Ok(Err(HeadError::Io)) => return,
        Ok(Err(HeadError::TooLarge)) => {
            let _ = stream.write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
            return;
        }
        Ok(Err(HeadError::Malformed)) => {
            let refusal = Refusal::bad_request(&inner, "malformed request");
            let _ = stream.write_all(&refusal.to_bytes()).await;
            return;
        }
        Err(_) => {
            tracing::debug!(peer = %peer, "egress client sent no complete request head in time");
            return;
        }
    };
    if !head.method.eq_ignore_ascii_case("CONNECT") {
        let replay = Replay {
            prefix: buf,
            pos: 0,
            inner: stream,
        };
        proxy::serve_connection(inner, replay, peer, owner).await;
        return;
    }
    let leftover = buf.split_off(head.len);
    connect(inner, stream, head, leftover, owner).await;
}

async fn connect(
    inner: Arc<Inner>,
    mut client: TcpStream,
    head: Head,
    leftover: Vec<u8>,
    owner: Option<UserId>,
) {
    let identity = match proxy::authorize(&inner, head.proxy_authorization.as_deref(), owner).await
    {
        Ok(i) => i,
        Err(refusal) => {
            let _ = client.write_all(&refusal.to_bytes()).await;
            return;
        }
    };
    let authority: Option<hyper::http::uri::Authority> = head.target.parse().ok();
    let (mut origin, _permit) =
        match proxy::open_tunnel(&inner, &identity, authority.as_ref()).await {
            Ok(pair) => pair,
            Err(refusal) => {
                let _ = client.write_all(&refusal.to_bytes()).await;
                return;
            }
        };
    if client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .is_err()
    {
        return;
    }
    let metrics = inner.accounting.metrics().clone();
    let cell = inner
        .accounting
        .cell(identity.user_id, &identity.sandbox_id);
    cell.tunnel();
    metrics.tunnels.inc();
    let meter = Meter::new(cell, &metrics, inner.limits.bandwidth(identity.user_id));
    if !leftover.is_empty() {
        if origin.write_all(&leftover).await.is_err() {
            return;
        }
        meter.moved(leftover.len(), true).await;
    }
    metrics.tunnels_active.inc();
    let pumps = async {
        tokio::try_join!(
            pump(&client, &origin, true, &meter),
            pump(&origin, &client, false, &meter)
        )
    };
    tokio::select! {
        r = pumps => {
            if let Err(e) = r {
                tracing::debug!(sandbox_id = %identity.sandbox_id, error = %e, "egress tunnel closed with an error");
            }
        }
        _ = proxy::idle(&meter.activity, inner.config.idle_timeout()) => {
            tracing::debug!(sandbox_id = %identity.sandbox_id, "closing idle egress tunnel");
        }
    }
    metrics.tunnels_active.dec();
}

/// Bytes read through user space per call while traffic is small.
const SMALL: usize = 8 * 1024;

/// Moves bytes `from` → `to` until `from` ends, then half-closes `to`.
/// Small messages go through a stack buffer (one read, one write: the
/// fewest syscalls); once a read fills that buffer the pump switches to
/// `splice` through a pipe (created then) until the burst ends.
async fn pump(from: &TcpStream, to: &TcpStream, up: bool, meter: &Meter) -> io::Result<()> {
    let mut pipe: Option<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> = None;
    let mut bulk = false;
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
    loop {
        from.readable().await?;
        if !bulk {
            let mut pending = Vec::new();
            let n = {
                let mut buf = [0u8; SMALL];
                // A short read means the socket is drained: report
                // WouldBlock (keeping the count) so tokio clears the
                // readiness now rather than after one more empty read.
                let mut got = 0;
                let n = match from.try_io(Interest::READABLE, || {
                    let n = nix::unistd::read(from, &mut buf).map_err(io::Error::from)?;
                    if n > 0 && n < SMALL {
                        got = n;
                        return Err(io::ErrorKind::WouldBlock.into());
                    }
                    Ok(n)
                }) {
                    Ok(n) => n,
                    Err(_) if got > 0 => got,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                };
                if n == 0 {
                    let _ = nix::sys::socket::shutdown(
                        to.as_raw_fd(),
                        nix::sys::socket::Shutdown::Write,
                    );
                    return Ok(());
                }
                let written = match to.try_write(&buf[..n]) {
                    Ok(w) => w,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                    Err(e) => return Err(e),
                };
                pending.extend_from_slice(&buf[written..n]);
                bulk = n == SMALL;
                n
            };
            // The peer is slow: finish the write off the stack.
            let mut off = 0;
            while off < pending.len() {
                to.writable().await?;
                match to.try_write(&pending[off..]) {
                    Ok(w) => off += w,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
            meter.moved(n, up).await;
            continue;
        }
        if pipe.is_none() {
            pipe = Some(
                nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)
                    .map_err(io::Error::from)?,
            );
        }
        let Some((pipe_r, pipe_w)) = pipe.as_ref() else {
            continue;
        };
        let mut got = 0;
        let n = match from.try_io(Interest::READABLE, || {
            let n = splice(from, None, pipe_w, None, CHUNK, flags).map_err(io::Error::from)?;
            if n > 0 && n < CHUNK {
                got = n;
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        }) {
            Ok(n) => n,
            Err(_) if got > 0 => got,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            let _ = nix::sys::socket::shutdown(to.as_raw_fd(), nix::sys::socket::Shutdown::Write);
            return Ok(());
        }
        // The burst is over when a splice comes back short.
        bulk = n == CHUNK;
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe_r, None, to, None, left, flags).map_err(io::Error::from)
            }) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        meter.moved(n, up).await;
    }
}

/// A stream with bytes already read put back in front of it.
struct Replay<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
