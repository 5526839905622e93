//! The control plane's REST API as the CLI uses it: the client built from the settings, the
//! admin token sent on every call, and failures turned into messages that say what to do.

use std::path::PathBuf;

use capmesh_client::{ClientError, ControlPlaneAddrs, ControlPlaneClient, ServerCheck};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::settings::{DEFAULT_ADMIN_TOKEN_FILE, Origin, Settings, SettingsError, TokenSource};

/// Why a call to the control plane failed, phrased for the person at the keyboard.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The settings are unusable (config file, token file).
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// The URL does not parse.
    #[error("{detail} (from {origin})")]
    BadUrl {
        /// The parser's message (names the value and the expected form).
        detail: String,
        /// Where the URL came from.
        origin: Origin,
    },
    /// No trust bundle was given and the default does not exist.
    #[error(
        "no trust bundle to check the control plane at {url}: pass --control-plane-ca with the ca.pem from the control plane's data dir (./capmesh-data/ca.pem was not found here), or set CAPMESH_CONTROL_PLANE_CA"
    )]
    NoTrustBundle {
        /// The control plane's URL.
        url: String,
    },
    /// The trust bundle cannot be read or used.
    #[error(
        "cannot use the trust bundle {path} ({origin}): {detail}: pass the ca.pem from the control plane's data dir with --control-plane-ca",
        path = .path.display()
    )]
    TrustBundle {
        /// The file.
        path: PathBuf,
        /// Where the path came from.
        origin: Origin,
        /// What is wrong.
        detail: String,
    },
    /// Nothing answers at the URL.
    #[error(
        "cannot reach the control plane at {url}: {detail}\nstart it with `capmesh-control-plane` (or `capmesh up`), or pass its address with --control-plane (CAPMESH_CONTROL_PLANE)"
    )]
    Unreachable {
        /// The control plane's URL.
        url: String,
        /// What the connection said.
        detail: String,
    },
    /// The server is not the control plane the trust bundle vouches for.
    #[error(
        "the server at {url} is not trusted by {ca}: {detail}\npass the ca.pem from that control plane's data dir with --control-plane-ca"
    )]
    Untrusted {
        /// The control plane's URL.
        url: String,
        /// The trust bundle used.
        ca: String,
        /// What the handshake said.
        detail: String,
    },
    /// The call needs the admin token and none was given.
    #[error(
        "the control plane at {url} needs the admin token: {detail}\npass --admin-token-file {DEFAULT_ADMIN_TOKEN_FILE} (the file in the control plane's data dir), or set CAPMESH_ADMIN_TOKEN_FILE"
    )]
    NoToken {
        /// The control plane's URL.
        url: String,
        /// What the control plane said.
        detail: String,
    },
    /// The admin token given was refused.
    #[error(
        "the control plane at {url} refused the admin token from {from} ({status}): pass the admin token of this control plane, such as --admin-token-file {DEFAULT_ADMIN_TOKEN_FILE}"
    )]
    TokenRefused {
        /// The control plane's URL.
        url: String,
        /// Where the token came from.
        from: String,
        /// The HTTP status.
        status: u16,
    },
    /// Any other failure, as the client phrased it.
    #[error(transparent)]
    Client(ClientError),
}

impl ApiError {
    /// The HTTP status, when the control plane answered with an error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Client(e) => e.status(),
            ApiError::TokenRefused { status, .. } => Some(*status),
            ApiError::NoToken { .. } => Some(401),
            _ => None,
        }
    }

    /// The control plane's own explanation (`detail`), when it answered with an error.
    pub fn detail(&self) -> Option<&str> {
        match self {
            ApiError::Client(ClientError::Api { detail, .. }) => Some(detail),
            _ => None,
        }
    }
}

/// A connection to one control plane, with the admin token when one was given.
#[derive(Debug, Clone)]
pub struct Api {
    client: ControlPlaneClient,
    url: String,
    ca: String,
    token: Option<String>,
    token_from: Option<String>,
}

impl Api {
    /// Builds the client from the settings: parses the URL, reads the trust bundle and the
    /// admin token. Nothing is sent yet.
    pub fn connect(settings: &Settings) -> Result<Self, ApiError> {
        let (raw_url, url_origin) = &settings.control_plane;
        // One URL, or the replicas' URLs separated by commas.
        let url: ControlPlaneAddrs =
            raw_url
                .parse()
                .map_err(|e: capmesh_client::UrlError| ApiError::BadUrl {
                    detail: e.to_string(),
                    origin: url_origin.clone(),
                })?;
        let shown = url.to_string();
        let Some((ca_path, ca_origin)) = &settings.control_plane_ca else {
            return Err(ApiError::NoTrustBundle { url: shown });
        };
        let ca_pem = std::fs::read_to_string(ca_path).map_err(|e| ApiError::TrustBundle {
            path: ca_path.clone(),
            origin: ca_origin.clone(),
            detail: format!("cannot read it: {e}"),
        })?;
        let client = ControlPlaneClient::new(url, ServerCheck::Hostname { ca_pem }, None, None)
            .map_err(|e| ApiError::TrustBundle {
                path: ca_path.clone(),
                origin: ca_origin.clone(),
                detail: match e {
                    ClientError::CaBundle { detail } => detail,
                    other => other.to_string(),
                },
            })?;
        let token = settings.read_admin_token()?;
        Ok(Self {
            client,
            url: shown,
            ca: format!("{} ({ca_origin})", ca_path.display()),
            token,
            token_from: settings.admin_token.as_ref().map(TokenSource::describe),
        })
    }

    /// The control plane's URL, as `https://host:port`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The admin token, when one was given.
    pub fn admin_token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// Where the admin token came from, when one was given.
    pub fn admin_token_from(&self) -> Option<&str> {
        self.token_from.as_deref()
    }

    /// `GET path`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        let result = self.client.get(path, self.token.as_deref()).await;
        result.map_err(|e| self.explain(e))
    }

    /// `POST path` with a JSON body.
    pub async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ApiError> {
        let result = self.client.post(path, body, self.token.as_deref()).await;
        result.map_err(|e| self.explain(e))
    }

    /// `PUT path` with a JSON body.
    pub async fn put<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ApiError> {
        let result = self.client.put(path, body, self.token.as_deref()).await;
        result.map_err(|e| self.explain(e))
    }

    /// `DELETE path`.
    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        let result = self.client.delete(path, self.token.as_deref()).await;
        result.map_err(|e| self.explain(e))
    }

    /// Turns a client error into one that says what to do here.
    fn explain(&self, err: ClientError) -> ApiError {
        let url = self.url.clone();
        match err {
            ClientError::Connect { source, .. } => ApiError::Unreachable {
                url,
                detail: source.to_string(),
            },
            ClientError::Timeout { stage, after, .. } => ApiError::Unreachable {
                url,
                detail: format!("{stage} it took longer than {after:?}"),
            },
            ClientError::Refused { refusal, .. } => ApiError::Untrusted {
                url,
                ca: self.ca.clone(),
                // Said from this side: the server's certificate against the bundle we hold.
                detail: match refusal {
                    capmesh_certs::Refusal::UnknownCa => {
                        "its certificate does not chain to that CA".to_owned()
                    }
                    other => other.to_string(),
                },
            },
            ClientError::Handshake { source, .. } => ApiError::Unreachable {
                url: url.clone(),
                detail: format!(
                    "the TLS handshake failed ({source}): check that {url} is a capmesh control plane serving https"
                ),
            },
            // The control plane answers 401 for a missing or wrong admin token (403 is for
            // refusals the token cannot fix, such as a bootstrap token that does not cover a CSR).
            ClientError::Api {
                status: 401,
                detail,
                ..
            } => match &self.token_from {
                None => ApiError::NoToken { url, detail },
                Some(from) => ApiError::TokenRefused {
                    url,
                    from: from.clone(),
                    status: 401,
                },
            },
            other => ApiError::Client(other),
        }
    }
}
