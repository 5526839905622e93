//! The topology stream's frames (proxy ⇄ control plane) and their newline-delimited JSON encoding.
//!
//! Each frame is one JSON object on one line, tagged by `"type"`. Unknown fields are ignored so
//! either side can add fields without breaking the other. `docs/protocol.md` describes the
//! exchange; a test below checks its examples against these types.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::names::{AgentName, Namespace};
use crate::registration::Registration;
use crate::snapshot::{Delta, Snapshot, SnapshotVersion};

/// The largest frame either side accepts, in bytes (without its newline).
pub const MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;

/// Who is on the other end of a stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// The proxy's id, unique per running proxy (one agent instance).
    pub proxy_id: String,
    /// The agent the proxy stands for; must match its certificate's SPIFFE ID.
    pub agent: AgentName,
    /// The agent's namespace; must match its certificate's SPIFFE ID.
    pub namespace: Namespace,
    /// The zone the proxy runs in, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

/// A proxy's first frame on every stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Who the proxy is.
    pub node: Node,
    /// Its agent's tools and dependencies.
    pub registration: Registration,
    /// The snapshot version it already holds (after a reconnect), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<SnapshotVersion>,
}

/// A frame from a proxy to the control plane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ProxyFrame {
    /// First frame: who the proxy is, what its agent offers and needs.
    Hello(Hello),
    /// The snapshot at `version` was applied.
    Ack {
        /// The version now held.
        version: SnapshotVersion,
    },
    /// The frame for `version` was refused; the proxy keeps the snapshot it had.
    Nack {
        /// The version refused.
        version: SnapshotVersion,
        /// Why.
        error: String,
    },
    /// The agent's health changed (or a periodic report).
    Health {
        /// Whether the agent answers.
        healthy: bool,
        /// What the health check saw, when useful.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
    /// The agent's tools changed: its full registration, replacing the one in `hello`.
    Register(Registration),
    /// Graceful shutdown: withdraw this proxy's endpoints now, without a grace period.
    Goodbye,
    /// Finished spans the proxy sampled (at most [`crate::trace::MAX_SPANS_PER_FRAME`]), for
    /// `capmesh trace` and the dashboard.
    Spans {
        /// The spans, in the order they ended.
        spans: Vec<crate::trace::SpanRecord>,
        /// Spans this proxy dropped since its previous `spans` frame (its queue was full).
        #[serde(default, skip_serializing_if = "is_zero")]
        dropped: u64,
    },
    /// What the proxy sent to each capability since its previous report.
    Traffic(crate::trace::Traffic),
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A frame from the control plane to a proxy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ControlFrame {
    /// A full snapshot; always the first frame on a stream.
    Snapshot(Snapshot),
    /// A change to the snapshot at `base_version`.
    Delta(Delta),
    /// The control plane refuses the stream and is about to close it.
    Error {
        /// A stable, machine-readable code (`forbidden`, `malformed_frame`, ...).
        code: String,
        /// What went wrong and what to do, for people.
        message: String,
    },
}

/// Why a line could not be read as a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The line is longer than the limit.
    #[error("frame of {size} bytes is over the {limit}-byte limit")]
    TooLarge {
        /// The line's length in bytes.
        size: usize,
        /// The limit ([`MAX_FRAME_BYTES`]).
        limit: usize,
    },
    /// The line is not a valid frame; holds the JSON error.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Encodes a frame as one line of JSON ending in `\n`.
///
/// # Panics
///
/// Only if `T`'s `Serialize` fails, which the frames of this crate never do (their maps all
/// have string keys).
pub fn encode_frame<T: Serialize>(frame: &T) -> Vec<u8> {
    #[allow(clippy::expect_used)]
    let mut line = serde_json::to_vec(frame).expect("frames serialize: all map keys are strings");
    line.push(b'\n');
    line
}

/// Decodes one line (a trailing `\n` or `\r\n` is allowed) into a frame.
pub fn decode_frame<T: DeserializeOwned>(line: &[u8]) -> Result<T, FrameError> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge {
            size: line.len(),
            limit: MAX_FRAME_BYTES,
        });
    }
    serde_json::from_slice(line).map_err(|e| FrameError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROTOCOL_DOC: &str = include_str!("../../docs/protocol.md");

    fn json_blocks(doc: &str) -> Vec<String> {
        let mut blocks = Vec::new();
        let mut current: Option<String> = None;
        for line in doc.lines() {
            match (&mut current, line.trim()) {
                (None, "```json") => current = Some(String::new()),
                (Some(block), "```") => {
                    blocks.push(std::mem::take(block));
                    current = None;
                }
                (Some(block), _) => {
                    block.push_str(line);
                    block.push('\n');
                }
                (None, _) => {}
            }
        }
        assert!(
            current.is_none(),
            "unclosed ```json block in docs/protocol.md"
        );
        blocks
    }

    #[test]
    fn every_protocol_doc_example_is_a_valid_frame_and_every_frame_type_is_shown() {
        let mut seen = Vec::new();
        for block in json_blocks(PROTOCOL_DOC) {
            let value: serde_json::Value =
                serde_json::from_str(&block).unwrap_or_else(|e| panic!("not JSON: {e}\n{block}"));
            let kind = value["type"].as_str().unwrap_or_default().to_owned();
            let proxy = serde_json::from_value::<ProxyFrame>(value.clone());
            let control = serde_json::from_value::<ControlFrame>(value);
            assert!(
                proxy.is_ok() || control.is_ok(),
                "docs/protocol.md example of type {kind:?} is no frame: {:?} / {:?}\n{block}",
                proxy.err(),
                control.err()
            );
            seen.push(kind);
        }
        for kind in [
            "hello", "register", "health", "ack", "nack", "goodbye", "snapshot", "delta", "error",
        ] {
            assert!(
                seen.iter().any(|s| s == kind),
                "docs/protocol.md has no {kind} example"
            );
        }
    }

    #[test]
    fn frames_round_trip_as_single_lines() {
        let frames = [
            ProxyFrame::Ack {
                version: SnapshotVersion(7),
            },
            ProxyFrame::Nack {
                version: SnapshotVersion(8),
                error: "bad\nthing".into(),
            },
            ProxyFrame::Health {
                healthy: false,
                detail: None,
            },
            ProxyFrame::Goodbye,
        ];
        for frame in frames {
            let line = encode_frame(&frame);
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
            assert_eq!(decode_frame::<ProxyFrame>(&line).unwrap(), frame);
        }
        assert_eq!(
            encode_frame(&ProxyFrame::Goodbye),
            b"{\"type\":\"goodbye\"}\n".to_vec()
        );
        assert_eq!(
            encode_frame(&ProxyFrame::Ack {
                version: SnapshotVersion(3)
            }),
            b"{\"type\":\"ack\",\"version\":3}\n".to_vec()
        );
    }

    #[test]
    fn oversized_lines_are_refused_before_parsing() {
        let mut line = vec![b' '; MAX_FRAME_BYTES + 1];
        line.push(b'\n');
        assert_eq!(
            decode_frame::<ProxyFrame>(&line),
            Err(FrameError::TooLarge {
                size: MAX_FRAME_BYTES + 1,
                limit: MAX_FRAME_BYTES
            })
        );
        let mut fits = vec![b' '; MAX_FRAME_BYTES - 18];
        fits.extend_from_slice(b"{\"type\":\"goodbye\"}\r\n");
        assert_eq!(decode_frame::<ProxyFrame>(&fits), Ok(ProxyFrame::Goodbye));
    }

    #[test]
    fn malformed_lines_name_the_json_error() {
        let err = decode_frame::<ProxyFrame>(b"{\"type\":\"ack\",").unwrap_err();
        assert!(
            matches!(&err, FrameError::Malformed(m) if m.contains("EOF")),
            "{err}"
        );
        let err = decode_frame::<ProxyFrame>(b"{\"type\":\"teleport\"}").unwrap_err();
        assert!(
            err.to_string().contains("unknown variant `teleport`"),
            "{err}"
        );
        let err = decode_frame::<ProxyFrame>(b"{\"type\":\"ack\",\"version\":-1}").unwrap_err();
        assert!(err.to_string().starts_with("malformed frame: "), "{err}");
        assert!(decode_frame::<ProxyFrame>(b"").is_err());
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let frame: ProxyFrame =
            decode_frame(br#"{"type":"health","healthy":true,"detail":"ok","since":12}"#).unwrap();
        assert_eq!(
            frame,
            ProxyFrame::Health {
                healthy: true,
                detail: Some("ok".into())
            }
        );
        let frame: ControlFrame = decode_frame(
            br#"{"type":"error","code":"forbidden","message":"no","retry_after_ms":5}"#,
        )
        .unwrap();
        assert!(matches!(frame, ControlFrame::Error { code, .. } if code == "forbidden"));
        let hello: ProxyFrame = decode_frame(
            br#"{"type":"hello","future":[1],"node":{"proxy_id":"p","agent":"a","namespace":"default","rack":"r1"},"registration":{"endpoint":"10.0.0.1:15006","x":{}}}"#,
        )
        .unwrap();
        assert!(
            matches!(hello, ProxyFrame::Hello(h) if h.version.is_none() && h.node.agent.as_str() == "a")
        );
    }

    #[test]
    fn invalid_names_inside_frames_are_malformed() {
        let err = decode_frame::<ProxyFrame>(
            br#"{"type":"hello","node":{"proxy_id":"p","agent":"Not Valid","namespace":"default"},"registration":{"endpoint":"x:1"}}"#,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("agent name \"Not Valid\""),
            "{err}"
        );
    }
}
