//! What every capmesh binary does around its work: logging set up, a runtime, and a clean stop
//! on SIGTERM or Ctrl-C. Shared by `capmesh-control-plane`, `capmesh-proxy` and the `capmesh`
//! multi-call binary, so they behave the same.

use std::future::Future;
use std::process::ExitCode;

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

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

/// The log filter `RUST_LOG` names, else [`DEFAULT_LOG_FILTER`]: a level (`debug`) or a list
/// of `target=level` directives (`info,capmesh_proxy=debug`). An unreadable value is reported
/// on stderr, naming the variable and the fix, and the default applies.
///
/// A plain target filter, not `tracing_subscriber`'s `EnvFilter`: span and field filters are
/// not needed, and leaving out the regular-expression engine they bring keeps every sidecar's
/// resident code smaller (benches/RESULTS.md, "Idle RSS").
pub fn log_filter(rust_log: Option<&str>) -> Targets {
    let default = || DEFAULT_LOG_FILTER.parse().unwrap_or_default();
    match rust_log.map(str::trim).filter(|v| !v.is_empty()) {
        None => default(),
        Some(v) => v.parse().unwrap_or_else(|e| {
            eprintln!(
                "RUST_LOG={v:?} is not a log filter ({e}): give a level (error, warn, info, debug, trace) or target=level directives separated by commas; using {DEFAULT_LOG_FILTER:?}"
            );
            default()
        }),
    }
}

/// Logs to stderr, text or JSON (`format` = `json`); the level comes from `RUST_LOG`
/// ([`log_filter`]). Text is coloured only on a terminal ([`colour`]).
pub fn init_tracing(format: &str) {
    use std::io::IsTerminal;
    let filter = log_filter(std::env::var("RUST_LOG").ok().as_deref());
    // The formatter passes every level; `filter` alone decides.
    if format == "json" {
        let _ = tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(std::io::stderr)
            .finish()
            .with(filter)
            .try_init();
    } else {
        let _ = tracing_subscriber::fmt()
            .with_ansi(colour(std::io::stderr().is_terminal()))
            .with_max_level(tracing::Level::TRACE)
            .with_writer(std::io::stderr)
            .finish()
            .with(filter)
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

/// Which threads [`main`] runs a program's work on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// A runtime of [`worker_threads`] workers (with one, the single-thread scheduler).
    Workers,
    /// The main thread alone: for a program that starts its own worker threads, each with a
    /// scheduler of its own (the proxy, `capmesh_proxy::workers`), so that the main thread's
    /// scheduler takes no work from them.
    MainOnly,
}

/// The whole life of a capmesh program: parse `args` as `C` (clap prints a bad flag and exits
/// 2), set up logging in the format `log_format` picks, and run `work` on `threads` until it
/// ends.
pub fn main<C, F, E>(
    name: &str,
    args: impl IntoIterator<Item = std::ffi::OsString>,
    log_format: impl Fn(&C) -> &str,
    threads: Threads,
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
    match threads {
        Threads::Workers => block_on(name, work(config)),
        Threads::MainOnly => block_on_threads(name, 1, work(config)),
    }
}

/// [`worker_threads`] of this process's `TOKIO_WORKER_THREADS`.
pub fn worker_threads_from_env() -> usize {
    worker_threads(std::env::var("TOKIO_WORKER_THREADS").ok().as_deref())
}

/// How many worker threads the runtime gets: `TOKIO_WORKER_THREADS` when set, else the CPUs
/// this process may use (its affinity and cgroup quota included). A value that is not a
/// positive number is reported on stderr, naming the variable and the fix, and the default
/// applies.
pub fn worker_threads(env: Option<&str>) -> usize {
    let cpus = || std::thread::available_parallelism().map_or(1, |n| n.get());
    match env.map(str::trim).filter(|v| !v.is_empty()) {
        None => cpus(),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => {
                let n = cpus();
                eprintln!(
                    "TOKIO_WORKER_THREADS={v:?} is not a positive number of threads: give 1 or more, or unset it for one per CPU; using {n}"
                );
                n
            }
        },
    }
}

/// Runs `work` on a runtime of [`worker_threads`] threads, with the heap's free memory handed
/// back to the system every [`capmesh_memory::RELEASE_INTERVAL`]; an error is printed as
/// `<name>: <error chain>` and gives a failing exit code.
///
/// With one worker the runtime is tokio's single-thread scheduler, on the main thread: a
/// multi-thread scheduler with one worker pays for work stealing and cross-thread wake-ups that
/// cannot help (benches/RESULTS.md, "One thread when one worker").
pub fn block_on<E>(name: &str, work: impl Future<Output = Result<(), E>>) -> ExitCode
where
    E: std::fmt::Debug + std::fmt::Display,
{
    block_on_threads(name, worker_threads_from_env(), work)
}

fn block_on_threads<E>(
    name: &str,
    workers: usize,
    work: impl Future<Output = Result<(), E>>,
) -> ExitCode
where
    E: std::fmt::Debug + std::fmt::Display,
{
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Freed memory back to the system, so a burst of connections does not leave the resident
    // set at its high-water mark (benches/RESULTS.md, "Soak").
    runtime.spawn(capmesh_memory::release_every(
        capmesh_memory::RELEASE_INTERVAL,
    ));
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

#[cfg(test)]
mod tests {
    use tracing::Level;

    use super::log_filter;

    #[test]
    fn worker_threads_come_from_the_variable_else_the_cpus() {
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert_eq!(super::worker_threads(Some("1")), 1);
        assert_eq!(super::worker_threads(Some(" 3 ")), 3);
        assert_eq!(super::worker_threads(None), cpus);
        assert_eq!(super::worker_threads(Some("")), cpus);
        assert_eq!(super::worker_threads(Some("0")), cpus);
        assert_eq!(super::worker_threads(Some("many")), cpus);
    }

    #[test]
    fn rust_log_sets_the_level_per_target_and_a_bad_value_falls_back_to_the_default() {
        let default = log_filter(None);
        assert!(default.would_enable("capmesh_proxy", &Level::INFO));
        assert!(!default.would_enable("capmesh_proxy", &Level::DEBUG));
        assert!(!default.would_enable("rmcp::service", &Level::INFO));
        assert!(default.would_enable("rmcp::service", &Level::WARN));

        let debug = log_filter(Some("debug"));
        assert!(debug.would_enable("capmesh_proxy::outbound", &Level::DEBUG));
        assert!(!debug.would_enable("capmesh_proxy::outbound", &Level::TRACE));

        let mixed = log_filter(Some("warn,capmesh_proxy=trace"));
        assert!(mixed.would_enable("capmesh_proxy::forward", &Level::TRACE));
        assert!(!mixed.would_enable("hyper", &Level::INFO));

        for bad in ["capmesh_proxy=loud", "info,rmcp=quiet"] {
            let f = log_filter(Some(bad));
            assert!(f.would_enable("capmesh_proxy", &Level::INFO), "{bad}");
            assert!(!f.would_enable("capmesh_proxy", &Level::DEBUG), "{bad}");
        }
        assert!(log_filter(Some("  ")).would_enable("capmesh_proxy", &Level::INFO));
    }
}
