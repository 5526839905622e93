//! Server-Sent Events (`text/event-stream`): an incremental, bounded decoder for relaying MCP
//! response streams event by event, an encoder, and [`find_response`] for when the proxy itself
//! is the MCP client (registration's `initialize`/`tools/list`).
//!
//! The decoder follows the WHATWG parsing rules (`\n`, `\r\n` or `\r` line ends; one leading
//! space stripped from values; comments ignored; `id` with NUL and non-numeric `retry` ignored;
//! a leading BOM dropped) with one deliberate difference: because the proxy relays rather than
//! consumes, a block with an `id`, `event` or `retry` field but no `data` is still an event, so
//! a resumability priming event or a `retry:` hint reaches the client.

use std::collections::VecDeque;

use bytes::Bytes;
use serde_json::Value;

use super::jsonrpc::{self, Id, RpcError};

/// Largest event accepted by default: 4 MiB of field text.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 4 * 1024 * 1024;

/// One server-sent event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Event {
    /// The `id:` field, if this event carried one.
    pub id: Option<String>,
    /// The `event:` type, if given (absent means `message`).
    pub event: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub data: String,
    /// The `retry:` reconnection time in milliseconds.
    pub retry: Option<u64>,
}

impl Event {
    /// A `message` event carrying `data`.
    pub fn message(data: impl Into<String>) -> Self {
        Self {
            data: data.into(),
            ..Self::default()
        }
    }

    /// The wire form: `id`, `event`, `retry`, one `data:` line per line of data (at least one),
    /// then a blank line. Line breaks inside `id`/`event` (which cannot be sent) are dropped.
    pub fn encode(&self) -> Bytes {
        let mut out = String::with_capacity(self.data.len() + 32);
        let one_line = |s: &str| s.replace(['\r', '\n'], "");
        if let Some(id) = &self.id {
            out.push_str("id: ");
            out.push_str(&one_line(id));
            out.push('\n');
        }
        if let Some(ev) = &self.event {
            out.push_str("event: ");
            out.push_str(&one_line(ev));
            out.push('\n');
        }
        if let Some(r) = self.retry {
            out.push_str(&format!("retry: {r}\n"));
        }
        let data = self.data.replace("\r\n", "\n").replace('\r', "\n");
        for line in data.split('\n') {
            out.push_str("data: ");
            out.push_str(line);
            out.push('\n');
        }
        out.push('\n');
        Bytes::from(out)
    }
}

/// Why a stream could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    /// One event (or one unterminated line) grew past the limit.
    #[error("a server-sent event exceeds {limit} bytes; the stream was abandoned")]
    EventTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
}

/// Incremental SSE decoder: [`push`](Self::push) bytes as they arrive, then drain
/// [`next_event`](Self::next_event). Memory is bounded by the event limit plus the caller's
/// undrained events; after an error the decoder refuses all further input.
#[derive(Debug)]
pub struct SseDecoder {
    /// Partial line carried across pushes.
    line: Vec<u8>,
    ready: VecDeque<Event>,
    current: Event,
    /// Whether the current block has any field that makes it an event.
    has_field: bool,
    /// Bytes of field text in the current block.
    size: usize,
    /// The last chunk ended in `\r`: a `\n` at the start of the next one belongs to it.
    skip_lf: bool,
    first_line: bool,
    limit: usize,
    failed: bool,
}

impl Default for SseDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl SseDecoder {
    /// A decoder with the [`DEFAULT_MAX_EVENT_BYTES`] limit.
    pub fn new() -> Self {
        Self::with_limit(DEFAULT_MAX_EVENT_BYTES)
    }

    /// A decoder refusing events larger than `limit` bytes.
    pub fn with_limit(limit: usize) -> Self {
        Self {
            line: Vec::new(),
            ready: VecDeque::new(),
            current: Event::default(),
            has_field: false,
            size: 0,
            skip_lf: false,
            first_line: true,
            limit,
            failed: false,
        }
    }

    /// Feeds bytes; complete events become available from [`next_event`](Self::next_event).
    pub fn push(&mut self, mut chunk: &[u8]) -> Result<(), SseError> {
        if self.failed {
            return Err(SseError::EventTooLarge { limit: self.limit });
        }
        if self.skip_lf && !chunk.is_empty() {
            self.skip_lf = false;
            if let Some(rest) = chunk.strip_prefix(b"\n") {
                chunk = rest;
            }
        }
        while let Some(end) = chunk.iter().position(|&b| b == b'\n' || b == b'\r') {
            let (head, tail) = chunk.split_at(end);
            if self.line.is_empty() {
                self.complete_line(head)?;
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(head);
                let r = self.complete_line(&line);
                line.clear();
                self.line = line;
                r?;
            }
            let crlf = tail.starts_with(b"\r\n");
            chunk = tail.get(if crlf { 2 } else { 1 }..).unwrap_or_default();
            self.skip_lf = !crlf && tail.starts_with(b"\r") && chunk.is_empty();
        }
        if self.line.len() + chunk.len() + self.size > self.limit {
            return Err(self.fail());
        }
        self.line.extend_from_slice(chunk);
        Ok(())
    }

    /// The next complete event, if any.
    pub fn next_event(&mut self) -> Option<Event> {
        self.ready.pop_front()
    }

    /// At end of stream: completes a last event that lacked its closing blank line (the WHATWG
    /// rules would drop it; a server that forgot the blank line still meant it) and returns it
    /// after any undrained ones via [`next_event`](Self::next_event).
    pub fn finish(&mut self) -> Result<(), SseError> {
        if self.failed {
            return Err(SseError::EventTooLarge { limit: self.limit });
        }
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.complete_line(&line)?;
        }
        self.dispatch();
        Ok(())
    }

    fn fail(&mut self) -> SseError {
        self.failed = true;
        self.line = Vec::new();
        self.current = Event::default();
        SseError::EventTooLarge { limit: self.limit }
    }

    fn complete_line(&mut self, mut line: &[u8]) -> Result<(), SseError> {
        if self.first_line {
            self.first_line = false;
            line = line.strip_prefix("\u{feff}".as_bytes()).unwrap_or(line);
        }
        if line.is_empty() {
            self.dispatch();
            return Ok(());
        }
        if line.starts_with(b":") {
            return Ok(());
        }
        self.size += line.len();
        if self.size > self.limit {
            return Err(self.fail());
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        let text = || String::from_utf8_lossy(value);
        match field {
            b"data" => {
                self.current.data.push_str(&text());
                self.current.data.push('\n');
            }
            b"event" => self.current.event = Some(text().into_owned()),
            b"id" if !value.contains(&0) => self.current.id = Some(text().into_owned()),
            b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                match text().parse() {
                    Ok(ms) => self.current.retry = Some(ms),
                    Err(_) => return Ok(()),
                }
            }
            _ => return Ok(()),
        }
        self.has_field = true;
        Ok(())
    }

    fn dispatch(&mut self) {
        let mut event = std::mem::take(&mut self.current);
        if std::mem::take(&mut self.has_field) {
            if event.data.ends_with('\n') {
                event.data.pop();
            }
            self.ready.push_back(event);
        }
        self.size = 0;
    }
}

/// Why [`find_response`] could not read a body.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FindError {
    /// Neither `application/json` nor `text/event-stream`.
    #[error(
        "unexpected content type {0:?}: an MCP server answers application/json or text/event-stream"
    )]
    ContentType(String),
    /// An `application/json` body that is not JSON-RPC.
    #[error("the JSON response body is not JSON-RPC: {0}")]
    Json(RpcError),
    /// An event stream that could not be decoded.
    #[error(transparent)]
    Sse(#[from] SseError),
}

/// Finds the JSON-RPC response to request `id` in a whole response body, returning the response
/// object (with its `result` or `error`).
///
/// `application/json`: the object (or, in 2025-03-26, an element of the array) with that id; an
/// error response with a null id in a single-object body also counts, since it can only be about
/// this request. `text/event-stream`: the first `message` event whose data is a response with
/// that id; notifications and server requests before it (progress, logging) are skipped, as are
/// events whose data is not JSON. `Ok(None)` when no such response is present.
pub fn find_response(body: &[u8], content_type: &str, id: &Id) -> Result<Option<Value>, FindError> {
    let media = content_type.split(';').next().unwrap_or_default().trim();
    if media.eq_ignore_ascii_case("application/json") {
        let v: Value = serde_json::from_slice(body).map_err(|e| {
            FindError::Json(RpcError::new(
                jsonrpc::PARSE_ERROR,
                format!("not JSON: {e}"),
            ))
        })?;
        if is_null_id_error(&v) {
            return Ok(Some(v));
        }
        return Ok(pick(v, id));
    }
    if !media.eq_ignore_ascii_case("text/event-stream") {
        return Err(FindError::ContentType(content_type.to_owned()));
    }
    let mut dec = SseDecoder::new();
    dec.push(body)?;
    dec.finish()?;
    while let Some(ev) = dec.next_event() {
        let typed = ev
            .event
            .as_deref()
            .is_some_and(|t| !t.is_empty() && t != "message");
        if typed || ev.data.is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(&ev.data) {
            Ok(v) => {
                if let Some(found) = pick(v, id) {
                    return Ok(Some(found));
                }
            }
            Err(e) => tracing::debug!(error = %e, "skipping an SSE event whose data is not JSON"),
        }
    }
    Ok(None)
}

fn is_response_to(v: &Value, id: &Id) -> bool {
    let is_response = v.get("result").is_some() || v.get("error").is_some();
    is_response && v.get("id").and_then(Id::from_value).as_ref() == Some(id)
}

fn is_null_id_error(v: &Value) -> bool {
    v.get("error").is_some() && v.get("id").is_none_or(Value::is_null)
}

fn pick(v: Value, id: &Id) -> Option<Value> {
    match v {
        Value::Array(items) => items.into_iter().find(|m| is_response_to(m, id)),
        other => is_response_to(&other, id).then_some(other),
    }
}

#[cfg(test)]
#[path = "sse_tests.rs"]
mod tests;
