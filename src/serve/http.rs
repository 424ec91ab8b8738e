//! HTTP/1.1 over a Unix socket, both ends: one request per connection (`Connection: close`),
//! bodies with `Content-Length` only. Heads are parsed by `httparse`; what is ours is reading
//! with bounds (head and body size, a deadline for the whole request) and writing.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Largest request or response head: far beyond what the API's paths and a few headers need.
pub const MAX_HEAD: usize = 16 << 10;
/// Largest request body: a create request is a few hundred bytes.
pub const MAX_REQUEST_BODY: usize = 1 << 20;
/// Largest response body a client reads (the list of 65,536 VMs with their figures fits).
pub const MAX_RESPONSE_BODY: usize = 256 << 20;
/// How long a client may take to send its whole request (a client that opens a connection and
/// sends nothing holds a connection slot for no longer than this).
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// Most headers in a head.
const MAX_HEADERS: usize = 64;

/// One parsed request.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    /// The path without the query.
    pub path: String,
    pub query: Option<String>,
    pub body: Vec<u8>,
}

/// Why no request could be read: an answer for the client (status and message), or nothing to
/// answer (the client went away).
#[derive(Debug)]
pub enum ReadError {
    Gone,
    Answer(u16, String),
}

/// Reads one request from `stream`, within [`REQUEST_DEADLINE`].
pub fn read_request(stream: &mut UnixStream) -> Result<Request, ReadError> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut buf = Vec::with_capacity(1024);
    let (head_len, method, target, content_length) = loop {
        if read_more(stream, &mut buf, deadline, MAX_HEAD + 1)? == 0 {
            return Err(if buf.is_empty() {
                ReadError::Gone
            } else {
                ReadError::Answer(400, "the request ended inside its head".into())
            });
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(n)) => {
                let method = req.method.unwrap_or_default().to_string();
                let target = req.path.unwrap_or_default().to_string();
                let mut length = 0usize;
                for h in req.headers.iter() {
                    if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        return Err(ReadError::Answer(
                            501,
                            "chunked request bodies are not supported: send Content-Length".into(),
                        ));
                    }
                    if h.name.eq_ignore_ascii_case("content-length") {
                        length = std::str::from_utf8(h.value)
                            .ok()
                            .and_then(|v| v.trim().parse().ok())
                            .ok_or_else(|| {
                                ReadError::Answer(400, "Content-Length is not a number".into())
                            })?;
                    }
                }
                break (n, method, target, length);
            }
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                return Err(ReadError::Answer(
                    431,
                    format!("the request head is larger than {} KiB", MAX_HEAD >> 10),
                ));
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => return Err(ReadError::Answer(400, format!("not an HTTP request: {e}"))),
        }
    };
    if content_length > MAX_REQUEST_BODY {
        return Err(ReadError::Answer(
            413,
            format!(
                "the request body is {content_length} bytes; at most {} KiB",
                MAX_REQUEST_BODY >> 10
            ),
        ));
    }
    let mut body = buf.split_off(head_len);
    while body.len() < content_length {
        if read_more(stream, &mut body, deadline, content_length)? == 0 {
            return Err(ReadError::Answer(
                400,
                "the request body is shorter than its Content-Length".into(),
            ));
        }
    }
    body.truncate(content_length);
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (target, None),
    };
    Ok(Request {
        method,
        path,
        query,
        body,
    })
}

/// Reads what is there (at most up to `limit` bytes in `buf`), waiting until `deadline`.
fn read_more(
    stream: &mut UnixStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
    limit: usize,
) -> Result<usize, ReadError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(ReadError::Answer(
            408,
            format!("the request took longer than {REQUEST_DEADLINE:?} to arrive"),
        ));
    }
    stream
        .set_read_timeout(Some(left))
        .map_err(|_| ReadError::Gone)?;
    let mut chunk = [0u8; 4096];
    let want = chunk.len().min(limit.saturating_sub(buf.len()).max(1));
    loop {
        match stream.read(&mut chunk[..want]) {
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return Ok(n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ReadError::Answer(
                    408,
                    format!("the request took longer than {REQUEST_DEADLINE:?} to arrive"),
                ));
            }
            Err(_) => return Err(ReadError::Gone),
        }
    }
}

/// The reason phrase of the statuses the API uses.
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        507 => "Insufficient Storage",
        _ => "Unknown",
    }
}

/// Writes a whole response and closes the write side.
pub fn write_response(
    stream: &mut UnixStream,
    status: u16,
    content_type: &str,
    body: &[u8],
) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        reason(status),
        body.len()
    );
    let mut out = Vec::with_capacity(head.len() + body.len());
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(body);
    stream.write_all(&out)?;
    stream.flush()?;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    Ok(())
}

/// What a client got back.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Sends one request to the server at `socket` and reads the whole response. `timeout` bounds
/// the wait for the response (None: wait as long as the server takes, as `wait` calls do).
pub fn call(
    socket: &Path,
    method: &str,
    target: &str,
    body: Option<&[u8]>,
    timeout: Option<Duration>,
) -> io::Result<Response> {
    let mut stream = UnixStream::connect(socket)?;
    let body = body.unwrap_or_default();
    let mut out = format!(
        "{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        out.push_str("Content-Type: application/json\r\n");
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    stream.write_all(&bytes)?;
    stream.set_read_timeout(timeout)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > MAX_HEAD + MAX_RESPONSE_BODY {
                    return Err(io::Error::other("the response is too large"));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the server did not answer in time",
                ));
            }
            Err(e) => return Err(e),
        }
    }
    parse_response(&buf)
}

/// Splits a whole response into status and body.
pub fn parse_response(buf: &[u8]) -> io::Result<Response> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(bad("the server closed the connection early")),
        Err(e) => return Err(bad(&format!("not an HTTP response: {e}"))),
    };
    let status = resp.code.ok_or_else(|| bad("no status code"))?;
    let length = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        });
    let mut body = buf[head_len..].to_vec();
    if let Some(length) = length {
        if body.len() < length {
            return Err(bad("the response body is shorter than its Content-Length"));
        }
        body.truncate(length);
    }
    Ok(Response { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(raw: &[u8]) -> Result<Request, ReadError> {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(raw).unwrap();
        a.shutdown(std::net::Shutdown::Write).unwrap();
        read_request(&mut b)
    }

    #[test]
    fn a_request_with_a_body_and_a_query_is_read_whole() {
        let req = roundtrip(
            b"POST /v1/vms?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 7\r\n\r\n{\"a\":1}",
        )
        .unwrap();
        assert_eq!(req.method, "POST");
        assert_eq!(req.path, "/v1/vms");
        assert_eq!(req.query.as_deref(), Some("x=1"));
        assert_eq!(req.body, b"{\"a\":1}");
    }

    #[test]
    fn bad_requests_get_a_status_that_says_why() {
        let status = |raw: &[u8]| match roundtrip(raw) {
            Err(ReadError::Answer(s, _)) => s,
            other => panic!("{other:?}"),
        };
        assert_eq!(status(b"NOT HTTP\r\n\r\n"), 400);
        assert_eq!(status(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n"), 400);
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            501
        );
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"),
            413
        );
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc"),
            400
        );
        assert_eq!(status(b"GET / HTTP/1.1\r\nHost"), 400);
        let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_HEAD + 10));
        assert_eq!(status(&huge), 431);
        assert!(matches!(roundtrip(b""), Err(ReadError::Gone)));
    }

    #[test]
    fn a_response_reads_back_as_written() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        write_response(&mut a, 404, "application/json", b"{\"error\":\"x\"}").unwrap();
        drop(a);
        let mut raw = Vec::new();
        b.read_to_end(&mut raw).unwrap();
        let resp = parse_response(&raw).unwrap();
        assert_eq!(resp.status, 404);
        assert_eq!(resp.body, b"{\"error\":\"x\"}");
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab").is_err());
    }
}
