//! Shared helpers of the `tramontane serve` tests: starting the server, a minimal HTTP/1.1 client, SSE and
//! `/metrics` parsing.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tramontane")
}

/// A running server, killed on drop.
pub struct Server {
    child: Child,
    pub port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `tramontane serve --model MODEL --port 0 ARGS...` and waits for its banner.
pub fn start(model: &Path, args: &[String]) -> Server {
    let mut cmd = Command::new(bin());
    cmd.args(["serve", "--model"]).arg(model).args(["--port", "0"]).args(args);
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
    let mut child = cmd.spawn().expect("server starts");
    let mut stdout = child.stdout.take().unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stdout.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    let line = String::from_utf8(line).unwrap();
    assert!(line.starts_with("listening on http://127.0.0.1:"), "unexpected banner: {line}");
    let port = line.rsplit(':').next().unwrap().trim().parse().unwrap();
    Server { child, port }
}

/// A response: status, header block and body (chunked encoding undone).
pub struct Reply {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// Opens a connection and sends one request (`Connection: close`).
pub fn send(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    // A server may answer (413) before reading the whole body and close: ignore write errors then.
    let _ = s.write_all(body);
    s
}

/// A minimal HTTP/1.1 client: one request per connection.
pub fn http(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let mut s = send(port, method, path, headers, body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no header end: {text}"));
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    let body = if chunked { dechunk(rest) } else { rest.to_string() };
    Reply { status, head: head.to_string(), body }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

pub fn post(port: u16, path: &str, body: &Value) -> Reply {
    http(port, "POST", path, &[], body.to_string().as_bytes())
}

/// The `data:` payloads of an SSE body.
pub fn sse_events(body: &str) -> Vec<String> {
    body.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
}

/// Concatenated text of a streamed chat or completion, checking the stream ends with `[DONE]`.
pub fn streamed_text(body: &str) -> String {
    let events = sse_events(body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{body}");
    let mut text = String::new();
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        assert!(v.get("error").is_none(), "{e}");
        let choice = &v["choices"][0];
        text.push_str(choice["delta"]["content"].as_str().or(choice["text"].as_str()).unwrap_or(""));
    }
    text
}

/// The samples of `/metrics`: `name{labels}` to value.
pub fn metrics(port: u16) -> BTreeMap<String, f64> {
    let reply = http(port, "GET", "/metrics", &[], b"");
    assert_eq!(reply.status, 200);
    reply
        .body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample line `{l}`"));
            (name.to_string(), value.parse().unwrap_or_else(|_| panic!("bad value in `{l}`")))
        })
        .collect()
}

/// One sample of `/metrics` (0 when absent).
pub fn metric(port: u16, name: &str) -> f64 {
    metrics(port).get(name).copied().unwrap_or(0.0)
}

/// Polls `/metrics` until `ok(metrics)` holds; panics after `limit`.
pub fn wait_for(port: u16, what: &str, limit: Duration, ok: impl Fn(&BTreeMap<String, f64>) -> bool) {
    let start = Instant::now();
    loop {
        let m = metrics(port);
        if ok(&m) {
            return;
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}; metrics: {m:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
