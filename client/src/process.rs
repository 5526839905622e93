//! What every capmesh binary does around its work: logging set up, a runtime, and a clean stop
//! on SIGTERM or Ctrl-C. Shared by `capmesh-control-plane`, `capmesh-proxy` and the `capmesh`
//! multi-call binary, so they behave the same.

use std::future::Future;
use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

/// The log filter when `RUST_LOG` is not set: `info`, but the MCP SDK (`rmcp`) only from
/// `warn`, since its INFO lines carry whole debug dumps of every request.
pub const DEFAULT_LOG_FILTER: &str = "info,rmcp=warn";

/// Whether to colour what goes to a stream: only a terminal, and never with `NO_COLOR` set
/// (to anything but the empty string) or `TERM=dumb`.
pub fn colour(stream_is_terminal: bool) -> bool {
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let dumb = std::env::var_os("TERM").is_some_and(|t| t == "dumb");
    stream_is_terminal && !no_color && !dumb
}

/// Logs to stderr, text or JSON (`format` = `json`); the level comes from `RUST_LOG`
/// (default [`DEFAULT_LOG_FILTER`]). Text is coloured only on a terminal ([`colour`]).
pub fn init_tracing(format: &str) {
    use std::io::IsTerminal;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    if format == "json" {
        let _ = tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
    } else {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(colour(std::io::stderr().is_terminal()))
            .with_writer(std::io::stderr)
            .try_init();
    }
}

/// Writes `addresses` (`name` → bound address) to `path` as one JSON object, atomically (a
/// temporary file renamed into place), so a supervisor that passed port 0 reads whole ports.
pub fn write_ports_file(
    path: &std::path::Path,
    addresses: &[(&str, std::net::SocketAddr)],
) -> std::io::Result<()> {
    let map: serde_json::Map<String, serde_json::Value> = addresses
        .iter()
        .map(|(name, addr)| ((*name).to_owned(), addr.to_string().into()))
        .collect();
    let mut text = serde_json::Value::Object(map).to_string();
    text.push('\n');
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// A plain HTTP/1.1 GET to `127.0.0.1:<port><path>` (admin endpoints): (status, body).
/// Bounded to 5 s.
pub async fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read_to_end(&mut buf))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 5 s"))??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The whole life of a capmesh program: parse `args` as `C` (clap prints a bad flag and exits
/// 2), set up logging in the format `log_format` picks, and run `work` until it ends.
pub fn main<C, F, E>(
    name: &str,
    args: impl IntoIterator<Item = std::ffi::OsString>,
    log_format: impl Fn(&C) -> &str,
    work: impl FnOnce(C) -> F,
) -> ExitCode
where
    C: clap::Parser,
    F: Future<Output = Result<(), E>>,
    E: std::fmt::Debug + std::fmt::Display,
{
    let config = match C::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    init_tracing(log_format(&config));
    block_on(name, work(config))
}

/// Runs `work` on a multi-thread runtime; an error is printed as `<name>: <error chain>` and
/// gives a failing exit code.
pub fn block_on<E>(name: &str, work: impl Future<Output = Result<(), E>>) -> ExitCode
where
    E: std::fmt::Debug + std::fmt::Display,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` on anyhow prints the whole chain; other errors print as Display.
            let text = format!("{e:#}");
            eprintln!("{name}: {text}");
            ExitCode::FAILURE
        }
    }
}
