//! The connections hyper serves, watched so that the answers hyper writes by itself
//! carry the JSON error shape too.
//!
//! hyper 0.14 refuses some requests before any service sees them (a header value with
//! a control character, a malformed request line: 400; a URI over 64 KiB: 414; too
//! many or too large headers: 431) and writes a bare status line with an empty body,
//! then closes the connection. It has no hook for that answer, so [`Connection`] sits
//! between hyper and the socket and writes ours in its place: the same status, with
//! `{"error": {"code", "message", "request_id"}}` and `X-Request-Id` (the client's own
//! when the refused head holds a plain one, as it does through nginx).
//!
//! Telling hyper's answer from our own bytes: hyper reads a new request head only once
//! the previous response has been written and flushed, and parse errors happen only
//! while reading a head. So the connection counts the requests handed to the service
//! and the responses hyper is done with ([`Exchanges::track`]); after a flush with
//! every response finished, the connection is idle, and a write that comes before the
//! next request is handed over can only be hyper answering a head it refused.
//! HTTP/2 connections are left alone (hyper answers those with stream errors).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use hyper::server::conn::{AddrIncoming, AddrStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use warp::http::StatusCode;

use super::error::{ErrorBody, ErrorDetail};
use super::request_id;

/// How much of a refused head is kept to find its `X-Request-Id` in.
const HEAD_CAPTURE: usize = 16 * 1024;

/// What the service tells the connection: requests handed over, responses finished.
#[derive(Debug, Default)]
pub(crate) struct Exchanges {
    handed: AtomicU64,
    finished: AtomicU64,
}

impl Exchanges {
    /// A request was handed to the service.
    pub fn handed(&self) {
        self.handed.fetch_add(1, Ordering::SeqCst);
    }
}

/// The listener's connections, each wrapped in a [`Connection`].
pub(crate) struct Incoming(pub AddrIncoming);

impl hyper::server::accept::Accept for Incoming {
    type Conn = Connection;
    type Error = io::Error;

    fn poll_accept(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<io::Result<Connection>>> {
        Pin::new(&mut self.0).poll_accept(cx).map(|accepted| accepted.map(|stream| stream.map(Connection::new)))
    }
}

/// One client connection; see the module comment.
pub(crate) struct Connection {
    io: AddrStream,
    exchanges: Arc<Exchanges>,
    /// `Some(n)`: every response is written and flushed, `n` requests having been handed
    /// over (see the module comment).
    idle_at: Option<u64>,
    /// What was read while idle: the head hyper may refuse.
    head: Vec<u8>,
    /// HTTP/2 (or undecided until the first read).
    http2: Option<bool>,
    /// Our answer in place of hyper's, and how much of it is written.
    replacement: Option<(Vec<u8>, usize)>,
}

impl Connection {
    fn new(io: AddrStream) -> Self {
        Self { io, exchanges: Arc::default(), idle_at: Some(0), head: Vec::new(), http2: None, replacement: None }
    }

    pub fn remote_addr(&self) -> std::net::SocketAddr {
        self.io.remote_addr()
    }

    pub fn exchanges(&self) -> Arc<Exchanges> {
        self.exchanges.clone()
    }

    /// Whether the connection is idle; stops being so once a request is handed over.
    fn idle(&mut self) -> bool {
        if self.idle_at.is_some_and(|at| at != self.exchanges.handed.load(Ordering::SeqCst)) {
            self.idle_at = None;
            self.head = Vec::new();
        }
        self.idle_at.is_some() && self.http2 == Some(false)
    }

    /// If `written` is hyper's own answer to a head it refused, starts writing ours
    /// instead; returns whether it did.
    fn replace_if_hypers_answer(&mut self, written: &[u8]) -> bool {
        if self.replacement.is_some() {
            return true;
        }
        if !self.idle() || !written.starts_with(b"HTTP/1.") {
            return false;
        }
        let status = written
            .get(9..12)
            .and_then(|code| std::str::from_utf8(code).ok())
            .and_then(|code| code.parse::<u16>().ok())
            .and_then(|code| StatusCode::from_u16(code).ok());
        let Some(status) = status.filter(|s| [400, 414, 431].contains(&s.as_u16())) else { return false };
        let id = request_id::from_header(header_value(&self.head, b"x-request-id").as_deref());
        let (code, message) = match status.as_u16() {
            414 => ("uri_too_long", "the request URI is too long"),
            431 => ("request_header_too_large", "the request headers are too large"),
            _ => ("bad_request", "the request could not be parsed (its request line or a header is malformed)"),
        };
        tracing::info!(request_id = %id, remote = %self.io.remote_addr(), status = status.as_u16(), code,
            "request refused by the HTTP parser");
        let body = serde_json::to_vec(&ErrorBody {
            error: ErrorDetail { code: code.into(), message: message.into(), request_id: id.clone() },
        })
        .unwrap_or_default();
        let mut answer = format!(
            "{} {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-request-id: {id}\r\n\
             connection: close\r\ndate: {}\r\n\r\n",
            &String::from_utf8_lossy(&written[..8]),
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            body.len(),
            httpdate::fmt_http_date(std::time::SystemTime::now()),
        )
        .into_bytes();
        answer.extend_from_slice(&body);
        self.replacement = Some((answer, 0));
        self.head = Vec::new();
        true
    }

    /// Writes what is left of our answer.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((answer, written)) =
            self.replacement.as_mut().filter(|(answer, written)| *written < answer.len())
        {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &answer[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        Poll::Ready(Ok(()))
    }
}

/// The value of header `name` (lower case) in a raw request head, if it is there.
fn header_value(head: &[u8], name: &[u8]) -> Option<String> {
    let end = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(head.len());
    head[..end].split(|b| *b == b'\n').skip(1).find_map(|line| {
        let colon = line.iter().position(|b| *b == b':')?;
        line[..colon].eq_ignore_ascii_case(name).then(|| String::from_utf8_lossy(&line[colon + 1..]).trim().to_owned())
    })
}

impl AsyncRead for Connection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.io).poll_read(cx, buf))?;
        let read = &buf.filled()[before..];
        if self.http2.is_none() && !read.is_empty() {
            // The HTTP/2 preface ("PRI * HTTP/2.0"): no method of HTTP/1 starts so.
            self.http2 = Some(read.starts_with(b"PRI"));
        }
        if self.idle() && self.head.len() < HEAD_CAPTURE {
            let take = read.len().min(HEAD_CAPTURE - self.head.len());
            let read = read[..take].to_vec();
            self.head.extend_from_slice(&read);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Connection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.replace_if_hypers_answer(buf) {
            // hyper's bytes are dropped; ours go out (finished in poll_flush at worst).
            if let Poll::Ready(Err(e)) = self.poll_replacement(cx) {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let first = bufs.iter().find(|b| !b.is_empty()).map(|b| &b[..]).unwrap_or(&[]);
        if self.replace_if_hypers_answer(first) {
            if let Poll::Ready(Err(e)) = self.poll_replacement(cx) {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_replacement(cx))?;
        ready!(Pin::new(&mut self.io).poll_flush(cx))?;
        let handed = self.exchanges.handed.load(Ordering::SeqCst);
        if self.idle_at.is_none() && self.exchanges.finished.load(Ordering::SeqCst) == handed {
            self.idle_at = Some(handed);
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_replacement(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl Exchanges {
    /// Hands `response` to hyper, so that the connection hears when hyper is done with
    /// it. A body of known size (JSON, empty) is buffered whole the moment hyper takes
    /// the response, so it is done then; a streamed one when hyper drops it, after its
    /// last bytes are buffered. (Wrapping only streamed bodies keeps hyper's fast path
    /// for whole ones, which it recognises by their type.)
    pub fn track(self: &Arc<Self>, response: hyper::Response<hyper::Body>) -> hyper::Response<hyper::Body> {
        use hyper::body::HttpBody;
        if response.body().size_hint().exact().is_some() {
            self.finished.fetch_add(1, Ordering::SeqCst);
            return response;
        }
        let exchanges = self.clone();
        response.map(|body| hyper::Body::wrap_stream(TrackedBody { body, exchanges }))
    }
}

/// A streamed response body that counts as finished once hyper drops it.
struct TrackedBody {
    body: hyper::Body,
    exchanges: Arc<Exchanges>,
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        self.exchanges.finished.fetch_add(1, Ordering::SeqCst);
    }
}

impl futures::Stream for TrackedBody {
    type Item = Result<Bytes, hyper::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.body).poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_ids_are_found_in_raw_heads() {
        let head = b"GET /x HTTP/1.1\r\nHost: a\r\nX-Request-Id: abc-1 \r\nBad: \x01\r\n\r\n";
        assert_eq!(super::header_value(head, b"x-request-id").as_deref(), Some("abc-1"));
        assert_eq!(super::header_value(b"GET / HTTP/1.1\r\nx-request-id", b"x-request-id"), None);
        assert_eq!(super::header_value(b"GET / HTTP/1.1\r\n\r\nx-request-id: body", b"x-request-id"), None);
    }
}
