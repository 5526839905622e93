//! The control plane's domain error: what went wrong issuing a certificate or a token, applying
//! trust, registering an entity or a revocation, or in the store, apart from how each listener
//! answers it (the REST API maps each kind to a status in `rest::ApiError`).

use crate::store::StoreError;

/// A refused or failed operation; the message says what went wrong and what to do.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The input is malformed or breaks a rule.
    #[error("{0}")]
    Invalid(String),
    /// The caller did not prove who it is.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller is known and not allowed this.
    #[error("{0}")]
    Denied(String),
    /// What was named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// It exists already, or clashes with what does.
    #[error("{0}")]
    Conflict(String),
    /// The store cannot be reached; nothing was changed.
    #[error("{0}")]
    Unavailable(String),
    /// A failure inside the control plane.
    #[error("{0}")]
    Internal(String),
}

macro_rules! constructor {
    ($name:ident, $variant:ident) => {
        /// This kind of error, saying `detail`.
        pub fn $name(detail: impl Into<String>) -> Self {
            Self::$variant(detail.into())
        }
    };
}

impl Error {
    constructor!(invalid, Invalid);
    constructor!(unauthenticated, Unauthenticated);
    constructor!(denied, Denied);
    constructor!(not_found, NotFound);
    constructor!(conflict, Conflict);
    constructor!(internal, Internal);
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound { .. } => Self::NotFound(e.to_string()),
            StoreError::Conflict { .. } => Self::Conflict(e.to_string()),
            StoreError::Unavailable { .. } => {
                tracing::warn!(error = %e, "request refused: the store is unreachable");
                Self::Unavailable(format!(
                    "{e}: nothing was changed; retry once it is back (proxies keep routing meanwhile)"
                ))
            }
            StoreError::Exhausted { .. } => Self::Denied(e.to_string()),
            other => {
                tracing::error!(error = %other, "store failure");
                Self::Internal(other.to_string())
            }
        }
    }
}
