//! The injection settings as flags: `capmesh inject --X` and `capmesh-control-plane
//! --inject-X` (the webhook). Two structs because clap cannot prefix a flattened group; keep
//! them parallel (`cli/tests/inject.rs` checks that every `capmesh inject` setting has its
//! `--inject-` twin).

use capmesh_api::TrustDomain;
use clap::Args;

use super::{InjectConfig, default_proxy_image};

/// `capmesh inject`'s settings flags. The admission webhook has the same ones, prefixed
/// `--inject-` ([`WebhookInjectFlags`]); keep the two lists parallel.
#[derive(Debug, Clone, Args)]
pub struct InjectFlags {
    /// The capmesh-proxy image for the sidecar and the init container.
    #[arg(long, env = "CAPMESH_PROXY_IMAGE", default_value_t = default_proxy_image())]
    pub proxy_image: String,
    /// The images' imagePullPolicy.
    #[arg(long, env = "CAPMESH_PROXY_PULL_POLICY", default_value = "IfNotPresent",
          value_parser = ["Always", "IfNotPresent", "Never"])]
    pub proxy_pull_policy: String,
    /// The control plane's URL as the proxies in the cluster reach it (--control-plane).
    #[arg(
        long,
        env = "CAPMESH_PROXY_CONTROL_PLANE",
        default_value = "https://capmesh-control-plane:8000"
    )]
    pub proxy_control_plane: String,
    /// The proxies' --tls-mode.
    #[arg(long, env = "CAPMESH_PROXY_TLS_MODE", default_value = "strict",
          value_parser = ["strict", "permissive", "off"])]
    pub proxy_tls_mode: String,
    /// The proxies' --log-format.
    #[arg(long, env = "CAPMESH_PROXY_LOG_FORMAT", default_value = "json", value_parser = ["text", "json"])]
    pub proxy_log_format: String,
    /// The proxies' RUST_LOG.
    #[arg(long, env = "CAPMESH_PROXY_LOG_LEVEL", default_value = "info")]
    pub proxy_log_level: String,
    /// The proxies' --propagate-headers (comma-separated).
    #[arg(long, env = "CAPMESH_PROXY_PROPAGATE_HEADERS", value_delimiter = ',')]
    pub proxy_propagate_headers: Vec<String>,
    /// The Secret holding the mesh trust bundle (key `ca.pem`) in each pod's namespace.
    #[arg(long, env = "CAPMESH_CA_SECRET", default_value = "capmesh-ca")]
    pub ca_secret: String,
    /// The Secret holding a bootstrap token (key `token`) in each pod's namespace.
    #[arg(
        long,
        env = "CAPMESH_BOOTSTRAP_TOKEN_SECRET",
        default_value = "capmesh-bootstrap-token"
    )]
    pub bootstrap_token_secret: String,
    /// The mesh's SPIFFE trust domain (--trust-domain).
    #[arg(long, env = "CAPMESH_TRUST_DOMAIN", default_value = "capmesh.local")]
    pub trust_domain: TrustDomain,
    /// Add the transparent-mode init container (`capmesh-proxy init`, iptables; needs
    /// NET_ADMIN and NET_RAW). A pod can opt out with `capmesh.io/transparent: "false"`.
    #[arg(long, env = "CAPMESH_TRANSPARENT", default_value_t = true, action = clap::ArgAction::Set)]
    pub transparent: bool,
}

impl From<InjectFlags> for InjectConfig {
    fn from(f: InjectFlags) -> Self {
        Self {
            proxy_image: f.proxy_image,
            proxy_pull_policy: f.proxy_pull_policy,
            proxy_control_plane: f.proxy_control_plane,
            proxy_tls_mode: f.proxy_tls_mode,
            proxy_log_format: f.proxy_log_format,
            proxy_log_level: f.proxy_log_level,
            proxy_propagate_headers: f.proxy_propagate_headers,
            ca_secret: f.ca_secret,
            bootstrap_token_secret: f.bootstrap_token_secret,
            trust_domain: f.trust_domain,
            transparent: f.transparent,
        }
    }
}

/// The admission webhook's injection settings: [`InjectFlags`] with `--inject-` in front (the
/// trust domain is the control plane's own `--trust-domain`).
#[derive(Debug, Clone, Args)]
pub struct WebhookInjectFlags {
    /// Webhook: the capmesh-proxy image for the sidecar and the init container.
    #[arg(long, env = "CAPMESH_INJECT_PROXY_IMAGE", default_value_t = default_proxy_image())]
    pub inject_proxy_image: String,
    /// Webhook: the images' imagePullPolicy.
    #[arg(long, env = "CAPMESH_INJECT_PROXY_PULL_POLICY", default_value = "IfNotPresent",
          value_parser = ["Always", "IfNotPresent", "Never"])]
    pub inject_proxy_pull_policy: String,
    /// Webhook: this control plane's URL as the proxies in the cluster reach it.
    #[arg(
        long,
        env = "CAPMESH_INJECT_PROXY_CONTROL_PLANE",
        default_value = "https://capmesh-control-plane:8000"
    )]
    pub inject_proxy_control_plane: String,
    /// Webhook: the proxies' --tls-mode.
    #[arg(long, env = "CAPMESH_INJECT_PROXY_TLS_MODE", default_value = "strict",
          value_parser = ["strict", "permissive", "off"])]
    pub inject_proxy_tls_mode: String,
    /// Webhook: the proxies' --log-format.
    #[arg(long, env = "CAPMESH_INJECT_PROXY_LOG_FORMAT", default_value = "json", value_parser = ["text", "json"])]
    pub inject_proxy_log_format: String,
    /// Webhook: the proxies' RUST_LOG.
    #[arg(long, env = "CAPMESH_INJECT_PROXY_LOG_LEVEL", default_value = "info")]
    pub inject_proxy_log_level: String,
    /// Webhook: the proxies' --propagate-headers (comma-separated).
    #[arg(
        long,
        env = "CAPMESH_INJECT_PROXY_PROPAGATE_HEADERS",
        value_delimiter = ','
    )]
    pub inject_proxy_propagate_headers: Vec<String>,
    /// Webhook: the Secret holding the trust bundle (key `ca.pem`) in each pod's namespace.
    #[arg(long, env = "CAPMESH_INJECT_CA_SECRET", default_value = "capmesh-ca")]
    pub inject_ca_secret: String,
    /// Webhook: the Secret holding a bootstrap token (key `token`) in each pod's namespace.
    #[arg(
        long,
        env = "CAPMESH_INJECT_BOOTSTRAP_TOKEN_SECRET",
        default_value = "capmesh-bootstrap-token"
    )]
    pub inject_bootstrap_token_secret: String,
    /// Webhook: add the transparent-mode init container (`capmesh-proxy init`).
    #[arg(long, env = "CAPMESH_INJECT_TRANSPARENT", default_value_t = true, action = clap::ArgAction::Set)]
    pub inject_transparent: bool,
}

impl WebhookInjectFlags {
    /// The settings, with the control plane's trust domain.
    pub fn config(&self, trust_domain: &TrustDomain) -> InjectConfig {
        InjectConfig {
            proxy_image: self.inject_proxy_image.clone(),
            proxy_pull_policy: self.inject_proxy_pull_policy.clone(),
            proxy_control_plane: self.inject_proxy_control_plane.clone(),
            proxy_tls_mode: self.inject_proxy_tls_mode.clone(),
            proxy_log_format: self.inject_proxy_log_format.clone(),
            proxy_log_level: self.inject_proxy_log_level.clone(),
            proxy_propagate_headers: self.inject_proxy_propagate_headers.clone(),
            ca_secret: self.inject_ca_secret.clone(),
            bootstrap_token_secret: self.inject_bootstrap_token_secret.clone(),
            trust_domain: trust_domain.clone(),
            transparent: self.inject_transparent,
        }
    }
}
