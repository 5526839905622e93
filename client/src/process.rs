//! What every capmesh binary does around its work: logging set up, a runtime, and a clean stop
//! on SIGTERM or Ctrl-C. Shared by `capmesh-control-plane`, `capmesh-proxy` and the `capmesh`
//! multi-call binary, so they behave the same.

use std::future::Future;
use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

/// Logs to stderr, text or JSON (`format` = `json`); the level comes from `RUST_LOG`
/// (default `info`).
pub fn init_tracing(format: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if format == "json" {
        let _ = tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .try_init();
    } else {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
    }
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
