//! Talking to the capmesh control plane, for a proxy, the `capmesh` CLI and tests.
//!
//! This crate owns the way there: the control plane's URL, TLS (the control plane checked by
//! SPIFFE ID from a proxy, or by host name from the CLI), HTTP/2 with keepalive, the full-duplex
//! topology stream as typed frames, and JSON REST calls with the API's errors surfaced as they
//! were sent. It also holds the pieces the control plane's server shares for the stream's
//! bodies ([`ChannelBody`], [`LineDecoder`], [`FrameReader`]) and the limits every HTTP
//! listener of the mesh applies ([`listen`]). It does not decide what to do
//! with a frame, when to reconnect, or what to retry: that is the proxy's and the CLI's job.
#![forbid(unsafe_code)]
// Tests may unwrap: a panic there is a failed assertion. The library build is still linted.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod addr;
pub mod body;
pub mod connect;
pub mod frames;
pub mod listen;
pub mod process;
pub mod rest;
pub mod stream;

use std::time::Duration;

pub use addr::{ControlPlaneAddrs, ControlPlaneUrl, Host, UrlError};
pub use body::{ChannelBody, channel};
pub use connect::{ControlPlaneClient, ServerCheck};
pub use frames::{FrameReader, LineDecoder, ReadError};
pub use stream::{StreamConnection, StreamReceiver, StreamSender};

/// Everything that can go wrong talking to the control plane. Each message says what to check.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The TLS client configuration could not be built.
    #[error("cannot set up TLS for the control plane: {0}")]
    Tls(#[from] capmesh_certs::CertError),
    /// The CA bundle for host-name verification is unusable.
    #[error(
        "--control-plane-ca: {detail}: pass the PEM bundle the control plane wrote (ca.pem in its data dir)"
    )]
    CaBundle {
        /// What is wrong with the bundle.
        detail: String,
    },
    /// SPIFFE verification was asked for without the trust store to verify with.
    #[error(
        "checking the control plane's SPIFFE ID needs the mesh trust bundle: pass --control-plane-ca"
    )]
    MissingTrust,
    /// A client certificate was given together with host-name verification.
    #[error(
        "a client certificate cannot be presented when the control plane is checked by host name: \
         authenticate with the admin token instead"
    )]
    ClientCertUnsupported,
    /// The TCP connection failed.
    #[error(
        "cannot connect to the control plane at {url}: {source}: check --control-plane and that the control plane is running"
    )]
    Connect {
        /// The control plane's URL.
        url: String,
        /// The socket error.
        source: std::io::Error,
    },
    /// The TLS handshake broke a verification rule, on either side.
    #[error("{}", refused_text(url, refusal))]
    Refused {
        /// The control plane's URL.
        url: String,
        /// The rule that was broken.
        refusal: capmesh_certs::Refusal,
    },
    /// The TLS handshake failed for another reason.
    #[error(
        "the TLS handshake with the control plane at {url} failed: {source}: check that {url} serves https"
    )]
    Handshake {
        /// The control plane's URL.
        url: String,
        /// The handshake error.
        source: std::io::Error,
    },
    /// A step took too long.
    #[error(
        "{stage} the control plane at {url} took longer than {after:?}: check the address, the network and the control plane's health"
    )]
    Timeout {
        /// The control plane's URL.
        url: String,
        /// What was being done (`connecting to`, ...).
        stage: &'static str,
        /// The limit.
        after: Duration,
    },
    /// The topology stream needs HTTP/2 and the server did not agree to it.
    #[error(
        "the control plane at {url} did not offer HTTP/2 (ALPN h2), which the topology stream needs: \
         check that {url} is the control plane itself and not a proxy in front of it"
    )]
    NoHttp2 {
        /// The control plane's URL.
        url: String,
    },
    /// The HTTP exchange failed (connection reset, protocol error).
    #[error(
        "the HTTP exchange with the control plane at {url} failed: {source}: retry, and check the control plane's logs if it persists"
    )]
    Http {
        /// The control plane's URL.
        url: String,
        /// hyper's error.
        source: hyper::Error,
    },
    /// The request path does not form a valid URI.
    #[error(
        "request path {path:?} is not a valid URI path: {detail}: percent-encode names in paths"
    )]
    InvalidPath {
        /// The path as given.
        path: String,
        /// Why it is invalid.
        detail: String,
    },
    /// The bearer token cannot be sent in an HTTP header.
    #[error(
        "the admin token has characters an HTTP header cannot carry (control characters or a newline): check --admin-token"
    )]
    InvalidToken,
    /// The control plane answered with an error status.
    #[error("the control plane answered {status} ({error}): {detail}")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The stable error code from the body (`forbidden`, `not_found`, ...).
        error: String,
        /// What went wrong and what to do, as the control plane wrote it.
        detail: String,
    },
    /// A response body was over the size limit.
    #[error(
        "the control plane's answer to {path} is larger than {limit} bytes: check that {path} is the right endpoint"
    )]
    TooLarge {
        /// The request path.
        path: String,
        /// The limit in bytes.
        limit: usize,
    },
    /// A response body did not have the expected shape.
    #[error(
        "the control plane's answer to {path} is not what this client expects: {detail}: check that the client and the control plane are the same version"
    )]
    Decode {
        /// The request path.
        path: String,
        /// The JSON error.
        detail: String,
    },
    /// A frame to send is over the stream's size limit.
    #[error(
        "a {kind} frame of {size} bytes is over the topology stream's {limit}-byte limit: register fewer tools or shorter input schemas"
    )]
    FrameTooLarge {
        /// The frame's type.
        kind: &'static str,
        /// Its encoded size in bytes.
        size: usize,
        /// The limit ([`capmesh_api::MAX_FRAME_BYTES`]).
        limit: usize,
    },
    /// The topology stream is closed; frames can no longer be sent on it.
    #[error("the topology stream to the control plane is closed: open a new one")]
    StreamClosed,
    /// A frame could not be read from the topology stream.
    #[error("reading the topology stream from the control plane failed: {0}")]
    Read(#[from] ReadError),
}

/// A refused handshake in words of this side: a server certificate *we* refused is described
/// against the trust bundle we were given, not with the server's wording.
fn refused_text(url: &str, refusal: &capmesh_certs::Refusal) -> String {
    use capmesh_certs::Refusal;
    match refusal {
        Refusal::UnknownCa => format!(
            "the server at {url} presented a certificate that does not chain to the trust bundle given \
             (--control-plane-ca): pass the ca.pem from the data dir of the control plane at {url}, \
             or check that {url} is that control plane"
        ),
        Refusal::Expired | Refusal::NotYetValid => format!(
            "the server at {url} presented a certificate outside its validity window ({refusal}): \
             check this machine's clock and the control plane's"
        ),
        Refusal::IdentityMismatch { .. } | Refusal::NoIdentity(_) => format!(
            "the server at {url} is not the control plane this client expects ({refusal}): \
             check --control-plane and --trust-domain"
        ),
        Refusal::PeerAlert(_) => format!(
            "the control plane at {url} refused this client's certificate ({refusal}): \
             check that the certificate comes from this mesh's CA and is not revoked"
        ),
        other => format!(
            "the TLS handshake with the control plane at {url} was refused: {other}: check \
             --control-plane-ca and that {url} is the control plane"
        ),
    }
}

impl ClientError {
    /// The HTTP status, when the control plane answered with an error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The TLS refusal, when the handshake broke a verification rule.
    pub fn refusal(&self) -> Option<&capmesh_certs::Refusal> {
        match self {
            ClientError::Refused { refusal, .. } => Some(refusal),
            _ => None,
        }
    }
}
