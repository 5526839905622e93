//! Flags. Every flag is also an environment variable `CAPMESH_<FLAG>`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use capmesh_api::TrustDomain;
use capmesh_api::duration::parse_duration;
use clap::Parser;

/// The capmesh control plane: registry, topology stream, CA, entities and policy.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "capmesh-control-plane",
    version,
    after_help = "Examples:\n  capmesh-control-plane --data-dir /var/lib/capmesh\n  \
                  CAPMESH_LISTEN=127.0.0.1:8000 capmesh-control-plane --grace 5s"
)]
pub struct Config {
    /// Address of the API: the topology stream and REST, over TLS (ALPN h2 and http/1.1).
    #[arg(long, env = "CAPMESH_LISTEN", default_value = "0.0.0.0:8000")]
    pub listen: SocketAddr,

    /// Plain-HTTP address for /live, /ready and /metrics.
    #[arg(long, env = "CAPMESH_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    pub admin_listen: SocketAddr,

    /// Directory for the SQLite store, the CA, `ca.pem` (the trust bundle for clients) and
    /// `admin-token` (when no --admin-token-file is given).
    #[arg(long, env = "CAPMESH_DATA_DIR", default_value = "./capmesh-data")]
    pub data_dir: PathBuf,

    /// Store URL. Default: the SQLite file `capmesh.db` in the data dir; also
    /// `sqlite:///path/to/file.db`. `postgres://user:password@host:5432/db` for several
    /// replicas sharing one database (needs --store-key-file and --admin-token-file).
    #[arg(long, env = "CAPMESH_STORE")]
    pub store: Option<String>,

    /// File with the key that seals the CA key (and the session key) in the store: 32 random
    /// bytes as 64 hex characters or base64 (`openssl rand -hex 32`). Required with PostgreSQL;
    /// optional with SQLite. Every replica needs the same key.
    #[arg(long, env = "CAPMESH_STORE_KEY_FILE")]
    pub store_key_file: Option<PathBuf>,

    /// SPIFFE trust domain of the mesh.
    #[arg(long, env = "CAPMESH_TRUST_DOMAIN", default_value = "capmesh.local")]
    pub trust_domain: TrustDomain,

    /// File holding the admin token (mutating REST calls need it as `Authorization: Bearer`).
    /// Default: generated once into `<data-dir>/admin-token`, mode 0600.
    #[arg(long, env = "CAPMESH_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// How long a disconnected proxy's endpoints stay published before they are withdrawn.
    #[arg(long, env = "CAPMESH_GRACE", default_value = "2s", value_parser = parse_duration)]
    pub grace: Duration,

    /// After a restart, how long the instances the last run knew keep being served before they
    /// are withdrawn, if their proxies have not reconnected (proxies retry at least every
    /// 500 ms).
    #[arg(long, env = "CAPMESH_RESTART_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub restart_grace: Duration,

    /// Longest lifetime a bootstrap token may be given (`POST /v1/tokens` refuses longer).
    #[arg(long, env = "CAPMESH_MAX_TOKEN_TTL", default_value = "168h", value_parser = parse_duration)]
    pub max_token_ttl: Duration,

    /// Open connections each listener (API, admin, webhook) accepts at once; more are closed
    /// at accept and counted in capmesh_cp_connections_refused_total{listener}.
    #[arg(long, env = "CAPMESH_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,

    /// Time a client has to send a request's headers, and a new connection (or TLS
    /// handshake) its first request, on every listener; slower clients are disconnected.
    #[arg(long, env = "CAPMESH_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,

    /// A connection with no request in flight for this long is closed (HTTP/1 keep-alive and
    /// HTTP/2 alike; an open topology stream is a request in flight).
    #[arg(long, env = "CAPMESH_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Lifetime of the workload certificates the CA issues.
    #[arg(long, env = "CAPMESH_CERT_TTL", default_value = "24h", value_parser = parse_duration)]
    pub cert_ttl: Duration,

    /// Bring your own CA: its certificate (PEM). Needs --ca-key. Used only when the store has
    /// no CA yet.
    #[arg(long, env = "CAPMESH_CA_CERT", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,

    /// Bring your own CA: its private key (PEM). Needs --ca-cert.
    #[arg(long, env = "CAPMESH_CA_KEY", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,

    /// Extra DNS names for the control plane's serving certificate (repeatable), such as the
    /// Kubernetes service name. `localhost` and the host name are always included.
    #[arg(
        long = "server-name",
        env = "CAPMESH_SERVER_NAMES",
        value_delimiter = ','
    )]
    pub server_names: Vec<String>,

    /// Serve the admission webhook (`POST /inject`, AdmissionReview v1) over TLS at this
    /// address, e.g. 0.0.0.0:8443. Off unless set. Needs --webhook-tls-cert and --webhook-tls-key.
    #[arg(long, env = "CAPMESH_WEBHOOK_LISTEN", requires_all = ["webhook_tls_cert", "webhook_tls_key"])]
    pub webhook_listen: Option<SocketAddr>,

    /// The webhook's serving certificate (PEM, leaf first), signed by the CA in the
    /// MutatingWebhookConfiguration's caBundle.
    #[arg(long, env = "CAPMESH_WEBHOOK_TLS_CERT")]
    pub webhook_tls_cert: Option<PathBuf>,

    /// The webhook certificate's private key (PEM).
    #[arg(long, env = "CAPMESH_WEBHOOK_TLS_KEY")]
    pub webhook_tls_key: Option<PathBuf>,

    /// What the webhook injects (`capmesh inject` takes the same settings without `inject-`).
    #[command(flatten)]
    pub inject: crate::inject::WebhookInjectFlags,

    /// Once the listeners are bound, write their addresses to this file as JSON
    /// (`{"listen":"127.0.0.1:41000","admin":"127.0.0.1:41001"}`, plus `webhook` when set), so a
    /// supervisor that passed port 0 learns the ports the system chose. Written atomically.
    #[arg(long, env = "CAPMESH_PORTS_FILE", value_name = "FILE")]
    pub ports_file: Option<PathBuf>,

    /// Log format: `text` or `json`. The level comes from RUST_LOG (default `info`).
    #[arg(long, env = "CAPMESH_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

impl Config {
    /// The limits every listener applies.
    pub fn limits(&self) -> capmesh_client::listen::Limits {
        capmesh_client::listen::Limits {
            max_connections: self.max_connections,
            header_read_timeout: self.header_read_timeout,
            idle_timeout: self.idle_timeout,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn flags_are_well_formed() {
        Config::command().debug_assert();
    }

    #[test]
    fn bad_flags_name_the_flag_and_the_fix() {
        let err = Config::try_parse_from(["capmesh-control-plane", "--grace", "2days"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--grace") && err.contains("use ms, s, m or h"),
            "{err}"
        );
        let err = Config::try_parse_from(["capmesh-control-plane", "--trust-domain", "Bad Domain"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--trust-domain") && err.contains("capmesh.local"),
            "{err}"
        );
    }
}
