//! A deliberately small blocking HTTP/1.1 client over a unix socket. The CNI
//! plugin runs once per pod and must answer in milliseconds: no async runtime,
//! no connection pool, one request per connection.

use crate::ApiError;
use serde::{de::DeserializeOwned, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket (agent not running) or it timed out.
    #[error("cannot reach the catena agent at {path}: {source}")]
    Unreachable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The agent answered with an error.
    #[error("agent answered {status}: {}", .body.message)]
    Api { status: u16, body: ApiError },
    #[error("malformed answer from the agent: {0}")]
    Protocol(String),
}

impl ClientError {
    /// Whether the same request may succeed later (agent down, starting, busy).
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Unreachable { .. } => true,
            ClientError::Api { status, body } => body.retryable || *status == 503,
            ClientError::Protocol(_) => false,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

impl Client {
    pub fn new(socket: impl AsRef<Path>) -> Self {
        Client {
            socket: socket.as_ref().to_path_buf(),
            timeout: Duration::from_secs(30),
        }
    }

    /// Bound on a whole request: connect, send and the complete answer.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let body = self.request("GET", path, None)?;
        decode(&body)
    }

    pub fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let payload = serde_json::to_vec(body).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let body = self.request("PUT", path, Some(&payload))?;
        decode(&body)
    }

    pub fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let payload = serde_json::to_vec(body).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let body = self.request("POST", path, Some(&payload))?;
        decode(&body)
    }

    pub fn delete(&self, path: &str) -> Result<(), ClientError> {
        self.request("DELETE", path, None).map(|_| ())
    }

    /// Sends one request and returns the body of a 2xx answer.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Vec<u8>, ClientError> {
        let unreachable = |source| ClientError::Unreachable {
            path: self.socket.clone(),
            source,
        };
        // One deadline for the whole exchange: an agent trickling bytes
        // cannot stretch a request past `timeout` (the plugin's ADD budget).
        let deadline = Instant::now() + self.timeout;
        let remaining = || {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the agent did not answer in time",
                ))
            } else {
                Ok(left)
            }
        };
        let mut stream = UnixStream::connect(&self.socket).map_err(unreachable)?;
        stream
            .set_write_timeout(Some(remaining().map_err(unreachable)?))
            .map_err(unreachable)?;
        let body = body.unwrap_or_default();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: catena\r\nConnection: close\r\nAccept: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
        if !body.is_empty() {
            req.push_str("Content-Type: application/json\r\n");
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).map_err(unreachable)?;
        stream.write_all(body).map_err(unreachable)?;
        let mut raw = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            stream
                .set_read_timeout(Some(remaining().map_err(unreachable)?))
                .map_err(unreachable)?;
            match stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => raw.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(unreachable(e)),
            }
        }
        let (status, body) = parse_response(&raw)?;
        if (200..300).contains(&status) {
            Ok(body)
        } else {
            let body = serde_json::from_slice::<ApiError>(&body).unwrap_or_else(|_| ApiError {
                message: String::from_utf8_lossy(&body).trim().to_string(),
                retryable: status == 503,
            });
            Err(ClientError::Api { status, body })
        }
    }
}

/// What [`LineStream::next_line`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum StreamItem {
    /// One complete line (without the newline).
    Line(String),
    /// Nothing arrived within the wait; the stream is still open.
    Idle,
    /// The agent closed the stream.
    End,
}

/// A streaming answer (`GET /v1/monitor`): newline-delimited JSON read as it
/// arrives, through HTTP/1.1 chunked encoding or a close-delimited body.
pub struct LineStream {
    body: Body,
    pending: Vec<u8>,
}

impl LineStream {
    /// The next line, waiting at most `wait` for more data.
    pub fn next_line(&mut self, wait: Duration) -> Result<StreamItem, ClientError> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(pos) = self.pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=pos).collect();
                let text = String::from_utf8_lossy(&line[..pos]).trim_end().to_string();
                return Ok(StreamItem::Line(text));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(StreamItem::Idle);
            }
            let stream = self.body.reader.get_ref();
            stream
                .set_read_timeout(Some(left))
                .map_err(|e| ClientError::Protocol(format!("setting a read timeout: {e}")))?;
            let mut chunk = [0u8; 8192];
            match self.body.read(&mut chunk) {
                Ok(0) => {
                    if self.pending.is_empty() {
                        return Ok(StreamItem::End);
                    }
                    // A last line without a newline.
                    let line = std::mem::take(&mut self.pending);
                    return Ok(StreamItem::Line(String::from_utf8_lossy(&line).into()));
                }
                Ok(n) => self.pending.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(StreamItem::Idle)
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ClientError::Protocol(format!("reading the stream: {e}"))),
            }
        }
    }
}

/// A response body read incrementally. Chunk framing is decoded as bytes
/// arrive; the state survives read timeouts (a size line cut by a timeout is
/// kept in `size_line` and completed by the next read).
struct Body {
    reader: BufReader<UnixStream>,
    chunked: bool,
    chunk_left: usize,
    size_line: Vec<u8>,
    done: bool,
}

impl Read for Body {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if !self.chunked {
            return self.reader.read(out);
        }
        loop {
            if self.done {
                return Ok(0);
            }
            if self.chunk_left > 0 {
                let want = out.len().min(self.chunk_left);
                let n = self.reader.read(&mut out[..want])?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                self.chunk_left -= n;
                return Ok(n);
            }
            // Between chunks: the CRLF ending the previous chunk (an empty
            // line) or the next size line.
            if self.reader.read_until(b'\n', &mut self.size_line)? == 0 {
                return Ok(0);
            }
            if self.size_line.last() != Some(&b'\n') {
                continue; // EOF inside a size line: the next read reports it
            }
            let line = String::from_utf8_lossy(&self.size_line).trim().to_string();
            self.size_line.clear();
            if line.is_empty() {
                continue;
            }
            let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("bad chunk size {line:?}"),
                    )
                })?;
            if size == 0 {
                self.done = true;
            }
            self.chunk_left = size;
        }
    }
}

impl Client {
    /// Sends a GET and returns the body as a stream of lines once the agent
    /// answered 2xx (errors are read whole, as for [`Client::request`]).
    /// Only connecting and the response head are bound by the client's
    /// timeout; the stream itself lasts as long as the agent keeps it open.
    pub fn stream(&self, path: &str) -> Result<LineStream, ClientError> {
        let unreachable = |source| ClientError::Unreachable {
            path: self.socket.clone(),
            source,
        };
        let mut stream = UnixStream::connect(&self.socket).map_err(unreachable)?;
        stream
            .set_write_timeout(Some(self.timeout))
            .map_err(unreachable)?;
        stream
            .set_read_timeout(Some(self.timeout))
            .map_err(unreachable)?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: catena\r\nConnection: close\r\nAccept: application/x-ndjson\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).map_err(unreachable)?;
        let mut reader = BufReader::new(stream);
        let mut head = Vec::new();
        // Headers are small; bound them so a broken peer cannot grow this forever.
        while !head.ends_with(b"\r\n\r\n") {
            if head.len() > 64 * 1024 {
                return Err(ClientError::Protocol("response headers too long".into()));
            }
            if reader.read_until(b'\n', &mut head).map_err(unreachable)? == 0 {
                return Err(ClientError::Protocol(
                    "connection closed in the headers".into(),
                ));
            }
        }
        let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| ClientError::Protocol("bad status line".into()))?;
        let chunked = text
            .lines()
            .any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
        let mut body = Body {
            reader,
            chunked,
            chunk_left: 0,
            size_line: Vec::new(),
            done: false,
        };
        if !(200..300).contains(&status) {
            let mut raw = Vec::new();
            body.read_to_end(&mut raw).map_err(unreachable)?;
            let body = serde_json::from_slice::<ApiError>(&raw).unwrap_or_else(|_| ApiError {
                message: String::from_utf8_lossy(&raw).trim().to_string(),
                retryable: status == 503,
            });
            return Err(ClientError::Api { status, body });
        }
        Ok(LineStream {
            body,
            pending: Vec::new(),
        })
    }
}

fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(body).map_err(|e| ClientError::Protocol(format!("{e}")))
}

/// Parses status and body of an HTTP/1.1 answer read to EOF (`Connection: close`).
fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), ClientError> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| ClientError::Protocol("no end of headers".into()))?;
    let head = std::str::from_utf8(&raw[..split])
        .map_err(|_| ClientError::Protocol("headers are not UTF-8".into()))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| ClientError::Protocol(format!("bad status line {status_line:?}")))?;
    let chunked = lines.clone().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = &raw[split + 4..];
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Ok((status, body))
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, ClientError> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| ClientError::Protocol("truncated chunk".into()))?;
        let size_str = std::str::from_utf8(&data[..eol])
            .map_err(|_| ClientError::Protocol("bad chunk size".into()))?;
        let size = usize::from_str_radix(size_str.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| ClientError::Protocol(format!("bad chunk size {size_str:?}")))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err(ClientError::Protocol("truncated chunk".into()));
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_answers() {
        let (s, b) = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((s, b.as_slice()), (200, &b"{}"[..]));
        let (s, b) = parse_response(
            b"HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((s, b.as_slice()), (503, &b"abcde"[..]));
        assert!(parse_response(b"garbage").is_err());
    }

    #[test]
    fn a_trickling_server_cannot_exceed_the_deadline() {
        let dir = std::env::temp_dir().join(format!("catena-api-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("slow.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            // One byte every 100 ms: each read succeeds, the whole never ends in time.
            for b in b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}" {
                if conn.write_all(&[*b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let started = Instant::now();
        let err = Client::new(&path)
            .with_timeout(Duration::from_millis(400))
            .get::<serde_json::Value>("/v1/healthz")
            .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_millis(900),
            "{:?}",
            started.elapsed()
        );
        assert!(err.is_retryable(), "{err}");
        server.join().unwrap();
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn streams_chunked_lines_across_pauses() {
        let dir = std::env::temp_dir().join(format!("catena-api-stream-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("stream.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut req = [0u8; 1024];
            let _ = conn.read(&mut req);
            conn.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                .unwrap();
            // A line split over two chunks, a size line split over two
            // writes with a pause (longer than the reader's wait) between.
            conn.write_all(b"6\r\n{\"a\":1\r\n").unwrap();
            std::thread::sleep(Duration::from_millis(300));
            conn.write_all(b"2\r\n}\n\r\n1").unwrap();
            std::thread::sleep(Duration::from_millis(300));
            // 0x11 bytes: the line and its newline.
            conn.write_all(b"1\r\n{\"b\":2,\"c\":\"xy\"}\n\r\n0\r\n\r\n")
                .unwrap();
        });
        let mut s = Client::new(&path).stream("/v1/monitor").unwrap();
        let mut lines = Vec::new();
        let mut idles = 0;
        for _ in 0..50 {
            match s.next_line(Duration::from_millis(100)).unwrap() {
                StreamItem::Line(l) => lines.push(l),
                StreamItem::Idle => idles += 1,
                StreamItem::End => break,
            }
        }
        assert_eq!(lines, vec![r#"{"a":1}"#, r#"{"b":2,"c":"xy"}"#]);
        assert!(idles >= 2, "the pauses show up as idle polls: {idles}");
        server.join().unwrap();
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn stream_errors_carry_the_agent_message() {
        let dir =
            std::env::temp_dir().join(format!("catena-api-stream-err-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("stream.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut req = [0u8; 1024];
            let _ = conn.read(&mut req);
            let body = br#"{"message":"events not available","retryable":false}"#;
            let head = format!(
                "HTTP/1.1 503 Service Unavailable\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            conn.write_all(head.as_bytes()).unwrap();
            conn.write_all(body).unwrap();
        });
        let err = Client::new(&path).stream("/v1/monitor").err().unwrap();
        assert_eq!(err.status(), Some(503));
        assert!(err.to_string().contains("events not available"), "{err}");
        server.join().unwrap();
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn unreachable_socket_is_retryable() {
        let err = Client::new("/nonexistent/catena.sock")
            .get::<crate::Health>("/v1/healthz")
            .unwrap_err();
        assert!(err.is_retryable(), "{err}");
    }
}
