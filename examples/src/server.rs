//! Serving an agent: rmcp's Streamable HTTP service at `/mcp`, on hyper, with a graceful stop.
//!
//! rmcp checks the `Host` header against an allow-list (DNS-rebinding protection). Its default
//! list is the loopback names on any port, which is what a capmesh sidecar sends: it rewrites
//! `Host` to the agent's own address, `127.0.0.1:<port>`.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use tokio::net::TcpListener;

use crate::args::{AgentKind, Flavor};
use crate::tools::Agent;

/// The MCP endpoint's path.
pub const MCP_PATH: &str = "/mcp";
/// How long open connections get to finish once a stop is asked for.
const DRAIN: Duration = Duration::from_secs(5);

/// How to serve an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeOptions {
    /// Address to listen on (default 127.0.0.1).
    pub host: IpAddr,
    /// Port; 0 picks a free one (default).
    pub port: u16,
    /// Name shown in answers and in `initialize`'s server info; `None` uses the kind.
    pub name: Option<String>,
    /// The model the `llm` tools name.
    pub flavor: Flavor,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 0,
            name: None,
            flavor: Flavor::default(),
        }
    }
}

/// An agent bound to its port and not yet serving; `run_until` serves it.
pub struct AgentServer {
    listener: TcpListener,
    addr: SocketAddr,
    kind: AgentKind,
    name: String,
    mcp: StreamableHttpService<Agent, LocalSessionManager>,
}

impl fmt::Debug for AgentServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentServer")
            .field("addr", &self.addr)
            .field("kind", &self.kind)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl AgentServer {
    /// Binds `opts.host:opts.port` for an agent of `kind`. Fails for the planner (it serves
    /// nothing) and when the address cannot be bound.
    pub async fn bind(kind: AgentKind, opts: &ServeOptions) -> anyhow::Result<Self> {
        let name = opts
            .name
            .clone()
            .unwrap_or_else(|| kind.as_str().to_owned());
        let Some(agent) = Agent::new(kind, &name, opts.flavor) else {
            anyhow::bail!(
                "the {kind} agent serves no tools: run it with `agent planner --mesh URL` \
                 to plan a trip, or pick llm, flights, weather or all to serve"
            );
        };
        let wanted = SocketAddr::new(opts.host, opts.port);
        let listener = TcpListener::bind(wanted).await.with_context(|| {
            format!("could not listen on {wanted}: pick a free --port, or 0 for any")
        })?;
        let addr = listener
            .local_addr()
            .with_context(|| format!("could not read the address bound for {wanted}"))?;
        let mut config = StreamableHttpServerConfig::default();
        // A specific non-loopback address is a name clients may legitimately use in `Host`.
        if !opts.host.is_loopback() && !opts.host.is_unspecified() {
            let mut hosts = config.allowed_hosts.clone();
            hosts.push(opts.host.to_string());
            config = config.with_allowed_hosts(hosts);
        }
        let mcp = StreamableHttpService::new(
            move || Ok(agent.clone()),
            Arc::new(LocalSessionManager::default()),
            config,
        );
        Ok(Self {
            listener,
            addr,
            kind,
            name,
            mcp,
        })
    }

    /// The bound address (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The MCP endpoint, e.g. `http://127.0.0.1:8080/mcp`.
    pub fn url(&self) -> String {
        format!("http://{}{MCP_PATH}", self.addr)
    }

    /// Serves until `shutdown` completes, then stops accepting, ends the MCP sessions (and
    /// their SSE streams) and gives open connections a few seconds to finish.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Self {
            listener,
            addr,
            kind,
            name,
            mcp,
        } = self;
        let sessions = mcp.config.cancellation_token.clone();
        let mcp = Arc::new(mcp);
        let builder = auto::Builder::new(TokioExecutor::new());
        let graceful = GracefulShutdown::new();
        tracing::info!(%addr, %kind, %name, "agent listening");
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => {
                    let (stream, _peer) = match accepted {
                        Ok(accepted) => accepted,
                        Err(error) => {
                            // Out of file descriptors and the like: wait rather than spin.
                            tracing::warn!(%error, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let mcp = Arc::clone(&mcp);
                    let service = service_fn(move |req| route(Arc::clone(&mcp), req));
                    let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move {
                        if let Err(error) = conn.await {
                            tracing::debug!(%error, "connection ended with an error");
                        }
                    });
                }
            }
        }
        drop(listener);
        sessions.cancel();
        if tokio::time::timeout(DRAIN, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(
                "connections still open after {}s; stopping anyway",
                DRAIN.as_secs()
            );
        }
        tracing::info!(%addr, %kind, %name, "agent stopped");
        Ok(())
    }
}

type Body = BoxBody<Bytes, Infallible>;

/// `/mcp` goes to rmcp; `/health` answers 200 for probes; anything else is 404.
async fn route(
    mcp: Arc<StreamableHttpService<Agent, LocalSessionManager>>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path();
    if path == MCP_PATH {
        return Ok(mcp.handle(req).await);
    }
    let (status, text) = if path == "/health" && req.method() == Method::GET {
        (StatusCode::OK, "ok\n")
    } else {
        (
            StatusCode::NOT_FOUND,
            "not found: the MCP endpoint is /mcp\n",
        )
    };
    let mut resp = Response::new(Full::new(Bytes::from_static(text.as_bytes())).boxed());
    *resp.status_mut() = status;
    Ok(resp)
}

/// Serves an agent of `kind` until SIGTERM or Ctrl-C. Prints `READY <port>` on stdout (and
/// flushes) once listening, so a supervisor can wait for it and learn the port, then the MCP
/// URL it serves, for a person (and for `--agent-url`). A closed stdout does not stop it.
pub async fn serve(kind: AgentKind, opts: ServeOptions) -> anyhow::Result<()> {
    let server = AgentServer::bind(kind, &opts).await?;
    let addr = server.local_addr();
    let host = if addr.ip().is_unspecified() {
        "127.0.0.1".to_owned()
    } else {
        match addr.ip() {
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        }
    };
    let port = addr.port();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "READY {port}")
        .and_then(|()| writeln!(out, "serving MCP at http://{host}:{port}{MCP_PATH}"))
        .and_then(|()| out.flush());
    drop(out);
    server.run_until(stop_signal()).await
}

/// Completes on SIGTERM or Ctrl-C (SIGINT).
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                return;
            }
            Err(error) => tracing::warn!(%error, "cannot watch SIGTERM; stopping on Ctrl-C only"),
        }
    }
    if let Err(error) = tokio::signal::ctrl_c().await {
        // Without any signal to wait for, serve until killed.
        tracing::warn!(%error, "cannot watch Ctrl-C either");
        std::future::pending::<()>().await;
    }
}
