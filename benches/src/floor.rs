//! The floor path: the two-hop mutual-TLS path built from the crates capmesh's data plane is
//! built on, with nothing of capmesh's in between. The front instance serves HTTP/1.1 with
//! hyper, reads each request whole and sends it over one HTTP/2 connection (h2's client, as
//! capmesh's peer client drives it) with mutual TLS (tokio-rustls, capmesh's certificates and
//! verifiers). The back instance serves that connection with hyper's HTTP/2 server and sends
//! each request to the upstream with hyper-util's HTTP/1 client, as capmesh's agent client
//! does. No classifying, routing, balancing, rewriting, tracing or metrics.
//!
//! What the front instance costs per call is therefore the floor under capmesh's consumer
//! sidecar for as long as it stands on hyper, h2, rustls and tokio (`benches/split.sh`).
//! `capmesh-bench hold --path floor` starts both instances; each is `capmesh-bench floor`, one
//! process on a single-thread runtime, as a sidecar with one worker.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::{Bytes, BytesMut};
use capmesh_api::{AgentName, Namespace, TrustDomain};
use capmesh_certs::{Credential, CredentialCell, SpiffeId, TrustConfig, TrustStore, tls};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

use crate::peers::Certs;

/// Which instance of the floor path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// HTTP/1.1 in, HTTP/2 with mutual TLS out.
    Front,
    /// HTTP/2 with mutual TLS in, HTTP/1.1 out.
    Back,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "front" => Ok(Self::Front),
            "back" => Ok(Self::Back),
            other => Err(format!("{other:?}: use front or back")),
        }
    }
}

type Answer = Response<Full<Bytes>>;

fn identity(name: &str) -> Result<SpiffeId> {
    let td = TrustDomain::new(crate::peers::TRUST_DOMAIN)?;
    Ok(SpiffeId::new(
        td,
        Namespace::new("bench")?,
        AgentName::new(name)?,
    ))
}

fn read(dir: &Path, file: &str) -> Result<String> {
    let path = dir.join(file);
    std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
}

/// The instance's credential and the trust store of the bench CA in `certs`.
fn credentials(certs: &Path, name: &str) -> Result<(Arc<CredentialCell>, Arc<TrustStore>)> {
    let credential = Credential::from_pem(
        &read(certs, &format!("{name}.pem"))?,
        &read(certs, &format!("{name}.key"))?,
    )?;
    let trust = TrustStore::new(&TrustConfig {
        trust_domain: TrustDomain::new(crate::peers::TRUST_DOMAIN)?,
        mesh_ca_pem: read(certs, "ca.pem")?,
        entities: vec![],
        revoked_entities: vec![],
        revoked_serials: vec![],
        revoked_identities: vec![],
    })?;
    Ok((Arc::new(CredentialCell::new(credential)), Arc::new(trust)))
}

/// Serves one instance on `listen`, sending on to 127.0.0.1:`to`; prints the port it listens
/// on as the first line of standard output.
pub async fn serve(role: Role, listen: SocketAddr, to: u16, certs: &Path) -> Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("{}", listener.local_addr()?.port());
    match role {
        Role::Front => front(listener, to, certs).await,
        Role::Back => back(listener, to, certs).await,
    }
}

async fn front(listener: TcpListener, back: u16, certs: &Path) -> Result<()> {
    let (cell, trust) = credentials(certs, "front")?;
    let config = tls::client_config(Some(cell), trust, identity("back")?, &[b"h2"])?;
    let tcp = TcpStream::connect(("127.0.0.1", back)).await?;
    tcp.set_nodelay(true)?;
    let stream = tls::connect(config, tcp).await?;
    // The windows capmesh's peer client asks for.
    let (peer, connection) = h2::client::Builder::new()
        .initial_window_size(1024 * 1024)
        .initial_connection_window_size(4 * 1024 * 1024)
        .handshake::<_, Bytes>(stream)
        .await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("capmesh-bench floor: the connection to the back instance failed: {e}");
        }
    });
    loop {
        let (tcp, _) = listener.accept().await?;
        tcp.set_nodelay(true)?;
        let peer = peer.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| relay(peer.clone(), req));
            // Served as a sidecar's outbound listener is: HTTP/1.1 or HTTP/2 from the client,
            // and HTTP/1's header-read timeout. A client closing its connection is not an
            // error worth a line here.
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10));
            let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
        });
    }
}

/// One call through the front instance: the request read whole, sent as HEADERS and DATA on a
/// new stream, the answer read whole.
async fn relay(peer: h2::client::SendRequest<Bytes>, req: Request<Incoming>) -> Result<Answer> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let mut out = Request::builder()
        .method(parts.method)
        .uri(format!("https://back{}", parts.uri.path()))
        .body(())?;
    // What capmesh's sidecars never forward: HTTP/2 has no connection-specific headers and
    // carries the host as `:authority`.
    for (name, value) in &parts.headers {
        if !capmesh_proxy::headers::is_hop_by_hop(name.as_str()) {
            out.headers_mut().append(name, value.clone());
        }
    }
    let mut peer = peer.ready().await?;
    let (answer, mut stream) = peer.send_request(out, body.is_empty())?;
    if !body.is_empty() {
        stream.send_data(body, true)?;
    }
    let (parts, mut recv) = answer.await?.into_parts();
    let mut data = BytesMut::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk?;
        recv.flow_control().release_capacity(chunk.len())?;
        data.extend_from_slice(&chunk);
    }
    Ok(Response::from_parts(parts, Full::new(data.freeze())))
}

async fn back(listener: TcpListener, upstream: u16, certs: &Path) -> Result<()> {
    let (cell, trust) = credentials(certs, "back")?;
    let config = tls::server_config(cell, trust, true, &[b"h2"])?;
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    loop {
        let (tcp, _) = listener.accept().await?;
        tcp.set_nodelay(true)?;
        let acceptor = acceptor.clone();
        let client = client.clone();
        tokio::spawn(async move {
            let Ok(stream) = acceptor.accept(tcp).await else {
                return;
            };
            let service = service_fn(move |req| to_upstream(client.clone(), upstream, req));
            // The stream cap and keep-alive of a sidecar's inbound listener.
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(512)
                .keep_alive_interval(Some(Duration::from_secs(10)))
                .keep_alive_timeout(Duration::from_secs(20))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// One call through the back instance: the request read whole and sent to the upstream over a
/// pooled HTTP/1.1 connection, the answer read whole.
async fn to_upstream(
    client: Client<HttpConnector, Full<Bytes>>,
    upstream: u16,
    req: Request<Incoming>,
) -> Result<Answer> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let mut out = Request::builder()
        .method(parts.method)
        .uri(format!("http://127.0.0.1:{upstream}{}", parts.uri.path()))
        .body(Full::new(body))?;
    *out.headers_mut() = parts.headers;
    let (parts, body) = client.request(out).await?.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Response::from_parts(parts, Full::new(body)))
}

/// The floor path's two running instances; both are killed when dropped.
#[derive(Debug)]
pub struct Floor {
    front: Child,
    back: Child,
    /// The front instance's port (HTTP/1.1).
    pub entry: u16,
    _certs: tempfile::TempDir,
}

impl Floor {
    /// Starts the back instance in front of 127.0.0.1:`upstream`, then the front instance.
    /// They inherit this process's CPU list.
    pub fn start(upstream: u16) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        Certs::write(dir.path())?;
        let (back, back_port) = instance(Role::Back, upstream, dir.path())?;
        let (front, entry) = match instance(Role::Front, back_port, dir.path()) {
            Ok(started) => started,
            Err(e) => {
                stop(back);
                return Err(e);
            }
        };
        Ok(Self {
            front,
            back,
            entry,
            _certs: dir,
        })
    }

    /// Process ids: (front, back).
    pub fn pids(&self) -> (u32, u32) {
        (self.front.id(), self.back.id())
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        for child in [&mut self.front, &mut self.back] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Starts one instance and reads the port it listens on.
fn instance(role: Role, to: u16, certs: &Path) -> Result<(Child, u16)> {
    let name = match role {
        Role::Front => "front",
        Role::Back => "back",
    };
    let mut child = Command::new(std::env::current_exe()?)
        .args(["floor", "--role", name, "--listen", "127.0.0.1:0"])
        .arg("--to")
        .arg(to.to_string())
        .arg("--certs")
        .arg(certs)
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start the floor path's instance")?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        BufReader::new(out).read_line(&mut line)?;
    }
    match line.trim().parse::<u16>() {
        Ok(port) => Ok((child, port)),
        Err(_) => {
            stop(child);
            bail!("the floor path's {name} instance did not start (it printed {line:?})")
        }
    }
}
