//! The client against a small in-process HTTP/2 TLS server standing in for the control plane:
//! the topology stream full duplex on one request, REST calls and their errors, and the
//! server checks (SPIFFE ID and host name) refusing the wrong server.

#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use capmesh_api::{
    ControlFrame, ErrorBody, ProxyFrame, SnapshotVersion, TrustDomain, encode_frame,
};
use capmesh_certs::inspect::identity_of;
use capmesh_certs::tls::server_config;
use capmesh_certs::{
    Ca, Credential, CredentialCell, Refusal, SpiffeId, TrustConfig, TrustStore, Validity,
    WorkloadKey,
};
use capmesh_client::{
    ClientError, ControlPlaneClient, ControlPlaneUrl, FrameReader, ServerCheck, channel,
};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

const WAIT: Duration = Duration::from_secs(10);

async fn within<F: Future>(what: &str, work: F) -> F::Output {
    tokio::time::timeout(WAIT, work)
        .await
        .unwrap_or_else(|_| panic!("{what}: no outcome within {WAIT:?}"))
}

fn id(namespace: &str, agent: &str) -> SpiffeId {
    format!("spiffe://capmesh.local/ns/{namespace}/agent/{agent}")
        .parse()
        .unwrap()
}

fn control_plane_id() -> SpiffeId {
    id("capmesh", "control-plane")
}

struct Mesh {
    ca: Ca,
    trust: Arc<TrustStore>,
}

impl Mesh {
    fn new() -> Self {
        let ca = Ca::generate(TrustDomain::new("capmesh.local").unwrap(), true).unwrap();
        let trust = Arc::new(
            TrustStore::new(&TrustConfig {
                trust_domain: TrustDomain::new("capmesh.local").unwrap(),
                mesh_ca_pem: ca.root_pem().to_owned(),
                entities: vec![],
                revoked_entities: vec![],
                revoked_serials: vec![],
                revoked_identities: vec![],
            })
            .unwrap(),
        );
        Self { ca, trust }
    }

    /// The control plane's serving credential: its SPIFFE ID plus 127.0.0.1, as the real one
    /// gets, so both kinds of client can verify it.
    fn serving_cell(&self) -> Arc<CredentialCell> {
        let key = WorkloadKey::generate().unwrap();
        let issued = self
            .ca
            .issue_serving(
                &key,
                &control_plane_id(),
                &["localhost".to_owned()],
                &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
                Validity::for_ttl(Duration::from_secs(3600)),
            )
            .unwrap();
        Arc::new(CredentialCell::new(
            Credential::with_key(&issued.chain_pem, &key).unwrap(),
        ))
    }

    fn workload_cell(&self, who: &SpiffeId) -> Arc<CredentialCell> {
        let key = WorkloadKey::generate().unwrap();
        let issued = self
            .ca
            .issue(
                &key.csr_pem(who).unwrap(),
                who,
                Validity::for_ttl(Duration::from_secs(3600)),
            )
            .unwrap();
        Arc::new(CredentialCell::new(
            Credential::with_key(&issued.chain_pem, &key).unwrap(),
        ))
    }

    /// Starts the stand-in control plane offering `alpn`; returns its URL.
    async fn serve(&self, alpn: &[&[u8]]) -> ControlPlaneUrl {
        let config = server_config(self.serving_cell(), self.trust.clone(), false, alpn).unwrap();
        let acceptor = TlsAcceptor::from(config);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let peer = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .and_then(|leaf| identity_of(leaf).ok())
                        .map(|id| id.to_string())
                        .unwrap_or_else(|| "anonymous".to_owned());
                    let service = service_fn(move |req| handle(req, peer.clone()));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        format!("https://127.0.0.1:{}", addr.port())
            .parse()
            .unwrap()
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(value).unwrap())).boxed())
        .unwrap()
}

fn error(status: StatusCode, code: &str, detail: &str) -> Response<Body> {
    json(
        status,
        &ErrorBody {
            error: code.to_owned(),
            detail: detail.to_owned(),
        },
    )
}

fn frame_type(frame: &ProxyFrame) -> String {
    serde_json::to_value(frame).unwrap()["type"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn handle(req: Request<Incoming>, peer: String) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let method = req.method().as_str().to_owned();
    Ok(match (method.as_str(), path.as_str()) {
        ("POST", "/v1/stream") => stream(req, peer).await,
        ("GET", "/v1/forbidden") => error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this call needs the admin token: pass --admin-token",
        ),
        ("GET", "/v1/plain-error") => Response::builder()
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .body(Full::new(Bytes::from_static(b"try later\n")).boxed())
            .unwrap(),
        ("DELETE", "/v1/tokens/t1") => Response::builder()
            .status(StatusCode::NO_CONTENT)
            .body(Full::new(Bytes::new()).boxed())
            .unwrap(),
        (method, "/v1/echo") => {
            let version = format!("{:?}", req.version());
            let authorization = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let body: serde_json::Value = if body.is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::from_slice(&body).unwrap()
            };
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "method": method, "version": version,
                    "authorization": authorization, "body": body, "peer": peer,
                }),
            )
        }
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such path"),
    })
}

/// Like the real control plane: reads the hello before answering, refuses a hello that does
/// not match the certificate, then answers each frame on the open response.
async fn stream(req: Request<Incoming>, peer: String) -> Response<Body> {
    if req.headers().get("content-type").map(|v| v.as_bytes()) != Some(b"application/x-ndjson") {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "bad_content_type",
            "ndjson",
        );
    }
    let mut frames: FrameReader<ProxyFrame> = FrameReader::new(req.into_body());
    let hello = match frames.next().await {
        Some(Ok(ProxyFrame::Hello(hello))) => hello,
        _ => return error(StatusCode::BAD_REQUEST, "no_hello", "send hello first"),
    };
    let claimed = id(hello.node.namespace.as_str(), hello.node.agent.as_str()).to_string();
    if claimed != peer {
        return error(
            StatusCode::FORBIDDEN,
            "forbidden",
            &format!("the hello says {claimed}, the certificate says {peer}"),
        );
    }
    let (tx, body) = channel(8);
    tokio::spawn(async move {
        let echo = |code: &str, message: String| {
            Bytes::from(encode_frame(&ControlFrame::Error {
                code: code.to_owned(),
                message,
            }))
        };
        if tx.send(echo("echo", "hello".to_owned())).await.is_err() {
            return;
        }
        while let Some(frame) = frames.next().await {
            let line = match frame {
                Ok(frame) => echo("echo", frame_type(&frame)),
                Err(e) => echo("malformed_frame", e.to_string()),
            };
            if tx.send(line).await.is_err() {
                return;
            }
        }
        // The proxy ended its request: end the response too (tx drops here).
    });
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(body.boxed())
        .unwrap()
}

fn hello(agent: &str) -> ProxyFrame {
    serde_json::from_value(serde_json::json!({
        "type": "hello",
        "node": {"proxy_id": "p-1", "agent": agent, "namespace": "default"},
        "registration": {"endpoint": "127.0.0.1:15006"},
    }))
    .unwrap()
}

fn echoed(frame: Option<Result<ControlFrame, ClientError>>) -> String {
    match frame {
        Some(Ok(ControlFrame::Error { code, message })) if code == "echo" => message,
        other => panic!("expected an echo frame, got {other:?}"),
    }
}

fn proxy_client(mesh: &Mesh, url: ControlPlaneUrl, agent: &str) -> ControlPlaneClient {
    ControlPlaneClient::new(
        url,
        ServerCheck::Spiffe(control_plane_id()),
        Some(mesh.trust.clone()),
        Some(mesh.workload_cell(&id("default", agent))),
    )
    .unwrap()
}

#[tokio::test]
async fn the_stream_is_full_duplex_on_one_open_request() {
    let mesh = Mesh::new();
    let url = mesh.serve(&[b"h2", b"http/1.1"]).await;
    let client = proxy_client(&mesh, url, "weather");

    let (sender, mut receiver) =
        within("opening the stream", client.open_stream(&hello("weather")))
            .await
            .unwrap();
    assert_eq!(
        echoed(within("hello's echo", receiver.next()).await),
        "hello"
    );

    sender
        .send(&ProxyFrame::Health {
            healthy: true,
            detail: None,
        })
        .await
        .unwrap();
    assert_eq!(
        echoed(within("health's echo", receiver.next()).await),
        "health"
    );

    sender
        .send(&ProxyFrame::Ack {
            version: SnapshotVersion(3),
        })
        .await
        .unwrap();
    assert_eq!(echoed(within("ack's echo", receiver.next()).await), "ack");

    // A clone from another task shares the same stream.
    let other = sender.clone();
    within(
        "a send from another task",
        tokio::spawn(async move { other.send(&ProxyFrame::Goodbye).await }),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        echoed(within("goodbye's echo", receiver.next()).await),
        "goodbye"
    );

    // Ending the request ends the control plane's answer, and the receiver sees the end.
    drop(sender);
    assert!(
        within("the end of the stream", receiver.next())
            .await
            .is_none()
    );
}

#[tokio::test]
async fn a_refused_hello_surfaces_the_status_and_the_detail() {
    let mesh = Mesh::new();
    let url = mesh.serve(&[b"h2", b"http/1.1"]).await;
    // The certificate says "weather", the hello claims "billing".
    let client = proxy_client(&mesh, url, "weather");
    let err = within("a refused stream", client.open_stream(&hello("billing")))
        .await
        .unwrap_err();
    match &err {
        ClientError::Api {
            status: 403,
            error,
            detail,
        } => {
            assert_eq!(error, "forbidden");
            assert!(detail.contains("agent/billing"), "{detail}");
            assert!(detail.contains("agent/weather"), "{detail}");
        }
        other => panic!("expected a 403, got {other}"),
    }
}

#[tokio::test]
async fn rest_calls_carry_json_and_the_token_and_surface_api_errors() {
    let mesh = Mesh::new();
    let url = mesh.serve(&[b"h2", b"http/1.1"]).await;
    let client = ControlPlaneClient::new(
        url,
        ServerCheck::Hostname {
            ca_pem: mesh.ca.root_pem().to_owned(),
        },
        None,
        None,
    )
    .unwrap();

    let got: serde_json::Value = within(
        "a POST",
        client.post(
            "/v1/echo",
            &serde_json::json!({"ttl_secs": 60}),
            Some("s3cret"),
        ),
    )
    .await
    .unwrap();
    assert_eq!(got["method"], "POST");
    assert_eq!(got["version"], "HTTP/2.0");
    assert_eq!(got["authorization"], "Bearer s3cret");
    assert_eq!(got["body"]["ttl_secs"], 60);
    assert_eq!(got["peer"], "anonymous");

    let got: serde_json::Value = within("a GET", client.get("/v1/echo", None)).await.unwrap();
    assert_eq!(got["method"], "GET");
    assert!(got["authorization"].is_null());

    let (): () = within(
        "a DELETE answered 204",
        client.delete("/v1/tokens/t1", Some("t")),
    )
    .await
    .unwrap();

    let err = within(
        "a forbidden GET",
        client.get::<serde_json::Value>("/v1/forbidden", None),
    )
    .await
    .unwrap_err();
    assert_eq!(err.status(), Some(403));
    match &err {
        ClientError::Api { error, detail, .. } => {
            assert_eq!(error, "forbidden");
            assert_eq!(
                detail,
                "this call needs the admin token: pass --admin-token"
            );
        }
        other => panic!("expected an API error, got {other}"),
    }

    let err = within(
        "a plain-text error",
        client.get::<()>("/v1/plain-error", None),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, ClientError::Api { status: 503, detail, .. } if detail == "try later"),
        "{err}"
    );

    let err = within(
        "a body of the wrong shape",
        client.get::<Vec<u8>>("/v1/echo", None),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ClientError::Decode { .. }), "{err}");

    let err = within("a bad path", client.get::<()>("/v1/agents/a b", None))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::InvalidPath { .. }), "{err}");
}

#[tokio::test]
async fn rest_falls_back_to_http1_and_the_stream_says_it_needs_http2() {
    let mesh = Mesh::new();
    let url = mesh.serve(&[b"http/1.1"]).await;
    let client = proxy_client(&mesh, url, "weather");

    let got: serde_json::Value = within("a GET over HTTP/1.1", client.get("/v1/echo", Some("t")))
        .await
        .unwrap();
    assert_eq!(got["version"], "HTTP/1.1");
    assert_eq!(got["authorization"], "Bearer t");
    // The proxy's mesh certificate was presented.
    assert_eq!(got["peer"], id("default", "weather").to_string());

    let err = within(
        "a stream without HTTP/2",
        client.open_stream(&hello("weather")),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ClientError::NoHttp2 { .. }), "{err}");
}

#[tokio::test]
async fn a_server_with_another_spiffe_id_is_refused_as_an_identity_mismatch() {
    let mesh = Mesh::new();
    let url = mesh.serve(&[b"h2", b"http/1.1"]).await;
    let client = ControlPlaneClient::new(
        url,
        ServerCheck::Spiffe(id("capmesh", "impostor")),
        Some(mesh.trust.clone()),
        None,
    )
    .unwrap();
    let err = within(
        "a stream to the wrong server",
        client.open_stream(&hello("weather")),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err.refusal(), Some(Refusal::IdentityMismatch { .. })),
        "{err}"
    );
    let message = err.to_string();
    assert!(message.contains("identity mismatch"), "{message}");
    assert!(message.contains("agent/impostor"), "{message}");
    assert!(message.contains("agent/control-plane"), "{message}");
}

#[tokio::test]
async fn host_name_checking_refuses_a_server_from_another_ca() {
    let mesh = Mesh::new();
    let url = mesh.serve(&[b"h2", b"http/1.1"]).await;
    let other = Mesh::new();
    let client = ControlPlaneClient::new(
        url,
        ServerCheck::Hostname {
            ca_pem: other.ca.root_pem().to_owned(),
        },
        None,
        None,
    )
    .unwrap();
    let err = within(
        "a GET to a server of another CA",
        client.get::<()>("/v1/echo", None),
    )
    .await
    .unwrap_err();
    assert_eq!(err.refusal(), Some(&Refusal::UnknownCa), "{err}");
    // Worded from the client's side: the server's certificate against the bundle it was given.
    let text = err.to_string();
    assert!(
        text.contains("does not chain to the trust bundle given")
            && text.contains("--control-plane-ca")
            && !text.contains("mesh CA or a registered entity"),
        "{err}"
    );
}
