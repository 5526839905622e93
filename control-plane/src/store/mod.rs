//! Durable state: the CA (its key sealed with `--store-key-file`), entities, bootstrap tokens
//! (with their use counts), revocations, the policy (with its `provide` rules), the mesh
//! settings, the session key, and every proxy instance's registration with
//! the replica that owns it. Live connection state (streams, views) is in memory, in `registry`.
//!
//! One backend-neutral [`Store`] trait with two backends that pass the same tests
//! (`control-plane/tests/store.rs`): SQLite in the data dir, embedded and the default, and
//! PostgreSQL for several replicas. Each backend applies its versioned migrations
//! ([`migrations`]) when it opens. PostgreSQL also tells the other replicas about every change
//! (NOTIFY on one channel, see [`postgres`], heard through [`follow`]); what a replica does
//! with that news is in `replicas`.

pub mod follow;
pub mod migrations;
pub mod postgres;
pub mod seal;
pub mod sqlite;

use std::future::Future;
use std::time::Duration;

use capmesh_api::rest::{Entity, Revocation, TokenInfo};
use capmesh_api::{MeshSettings, Policy, TrustDomain};

pub use postgres::PgStore;
pub use seal::{Purpose, StoreKey};
pub use sqlite::SqliteStore;

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The thing to change does not exist.
    #[error("{what} {name:?} does not exist")]
    NotFound {
        /// What kind of thing.
        what: &'static str,
        /// Its name or id.
        name: String,
    },
    /// The thing to create exists already.
    #[error("{what} {name:?} already exists")]
    Conflict {
        /// What kind of thing.
        what: &'static str,
        /// Its name or id.
        name: String,
    },
    /// The database cannot be reached now (down, restarting, network): nothing was changed.
    #[error("the store ({store}) is unreachable: {detail}")]
    Unavailable {
        /// Which store, without credentials (`PostgreSQL at db:5432/capmesh`).
        store: String,
        /// What the connection said.
        detail: String,
    },
    /// A bootstrap token has been used as often as it may be.
    #[error("bootstrap token {id:?} has been used {uses} time(s), all it may be")]
    Exhausted {
        /// The token's id.
        id: String,
        /// Its use limit.
        uses: u32,
    },
    /// SQLite failed.
    #[error("store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A PostgreSQL statement failed (not the connection).
    #[error("store: {0}")]
    Postgres(String),
    /// A stored value no longer parses (written by a newer version?).
    #[error("store: stored {what} is unreadable: {detail}")]
    Corrupt {
        /// What was being read.
        what: &'static str,
        /// The parser's complaint.
        detail: String,
    },
    /// The schema cannot be brought to this version.
    #[error("store: {0}")]
    Schema(String),
    /// The store refuses a value it must never hold (a plaintext CA key in PostgreSQL).
    #[error("store: {0}")]
    Refused(String),
    /// `--store` cannot be used as given.
    #[error("{0}")]
    Config(String),
}

impl StoreError {
    /// Whether the failure is the database being out of reach (the caller may answer 503 and
    /// retry later), as opposed to a bad request or a bug.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }

    /// There is no CA (to change): [`StoreError::NotFound`] on the mesh CA.
    pub(crate) fn no_ca() -> Self {
        StoreError::NotFound {
            what: "CA",
            name: "mesh CA".into(),
        }
    }

    /// Whether a statement was refused by a constraint that says the row exists already: any
    /// constraint violation in SQLite, a unique violation (SQLSTATE 23505) in PostgreSQL.
    fn is_duplicate(&self) -> bool {
        match self {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(f, _)) => {
                f.code == rusqlite::ErrorCode::ConstraintViolation
            }
            StoreError::Postgres(m) => m.contains("SQLSTATE 23505"),
            _ => false,
        }
    }
}

/// The result of an insert, with a refusal because the row exists already
/// ([`StoreError::is_duplicate`]) reported as [`StoreError::Conflict`] on `what` `name`.
pub(crate) fn or_conflict<T>(
    result: Result<T, StoreError>,
    what: &'static str,
    name: impl FnOnce() -> String,
) -> Result<T, StoreError> {
    match result {
        Err(e) if e.is_duplicate() => Err(StoreError::Conflict { what, name: name() }),
        other => other,
    }
}

/// The CA's private key as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredKey {
    /// PEM, as written by a SQLite store started without `--store-key-file`.
    Plain(String),
    /// Sealed with the store key ([`seal`]).
    Sealed(Vec<u8>),
}

/// The CA as stored: the signing certificate and key, and the root when the signer is an
/// intermediate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCa {
    /// Signing certificate, PEM.
    pub cert_pem: String,
    /// Signing key.
    pub key: StoredKey,
    /// Root certificate when `cert_pem` is an intermediate.
    pub root_pem: Option<String>,
}

/// A bootstrap token as stored: its public facts and the SHA-256 of its secret (never the
/// secret itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredToken {
    /// What `GET /v1/tokens` shows.
    pub info: TokenInfo,
    /// Lowercase hex SHA-256 of the secret part.
    pub secret_sha256: String,
}

/// A proxy instance as stored: its registration and which replica's stream holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredInstance {
    /// The proxy id (the key).
    pub proxy_id: String,
    /// The registration record (`registry::InstanceRecord` as JSON).
    pub record_json: String,
    /// The replica whose stream holds (or last held) it.
    pub owner: String,
    /// Whether that stream is open (false during the grace period).
    pub connected: bool,
    /// When that stream opened (Unix milliseconds): of two streams of one proxy on two
    /// replicas, the later one owns the instance.
    pub started_ms: i64,
}

/// One change to the instances table, made by the replica named in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceWrite {
    /// A stream of this replica holds the instance (open, or in its grace period): write it,
    /// taking it over from another replica, unless a newer stream (anywhere) holds it already.
    Claim(StoredInstance),
    /// Delete the instance's row if `owner` still owns it with the stream `started_ms`.
    Remove {
        /// The proxy id.
        proxy_id: String,
        /// The owner it must still have.
        owner: String,
        /// The stream it must still be.
        started_ms: i64,
    },
}

impl InstanceWrite {
    /// The proxy id written.
    pub fn proxy_id(&self) -> &str {
        match self {
            InstanceWrite::Claim(i) => &i.proxy_id,
            InstanceWrite::Remove { proxy_id, .. } => proxy_id,
        }
    }
}

/// What an [`InstanceWrite`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Done.
    Applied,
    /// Not done: another replica (or a newer stream) owns the instance now.
    NotOurs,
    /// Not done: there is no such instance.
    Missing,
}

/// Something another replica changed, as the PostgreSQL store hears of it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Change {
    /// An instance's row changed (or went).
    Instance(String),
    /// The policy was replaced.
    Policy,
    /// The mesh settings were replaced.
    Settings,
    /// An entity was registered or revoked.
    Entities,
    /// A workload revocation was made or lifted.
    Revocations,
}

/// Durable control-plane state. Every method is one transaction: nothing is half-applied.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// The CA, if one was created or loaded before.
    fn ca(&self) -> impl Future<Output = Result<Option<StoredCa>, StoreError>> + Send;
    /// Saves the CA; refuses to replace an existing one ([`StoreError::Conflict`]).
    fn insert_ca(&self, ca: &StoredCa) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Replaces a plaintext CA key with its sealed form (once a store key is given).
    fn seal_ca_key(&self, sealed: &[u8]) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Every entity, revoked ones included, oldest first.
    fn entities(&self) -> impl Future<Output = Result<Vec<Entity>, StoreError>> + Send;
    /// Registers an entity; refuses a name already used (even by a revoked entity).
    fn insert_entity(&self, entity: &Entity)
    -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Marks an entity revoked at `when_unix`; returns it as it is now.
    fn revoke_entity(
        &self,
        name: &str,
        when_unix: i64,
    ) -> impl Future<Output = Result<Entity, StoreError>> + Send;
    /// Every bootstrap token, newest first.
    fn tokens(&self) -> impl Future<Output = Result<Vec<StoredToken>, StoreError>> + Send;
    /// One token by id.
    fn token(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<StoredToken>, StoreError>> + Send;
    /// Saves a new token.
    fn insert_token(
        &self,
        token: &StoredToken,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Revokes a token; returns it as it is now.
    fn revoke_token(&self, id: &str) -> impl Future<Output = Result<TokenInfo, StoreError>> + Send;
    /// Counts one use of a token, atomically (two replicas cannot both spend its last use):
    /// refused with [`StoreError::Exhausted`] when it has none left. Returns it as it is now.
    fn use_token(&self, id: &str) -> impl Future<Output = Result<TokenInfo, StoreError>> + Send;
    /// Every revocation in force, oldest first.
    fn revocations(&self) -> impl Future<Output = Result<Vec<Revocation>, StoreError>> + Send;
    /// Saves a revocation; refuses one for an identity or serial already revoked.
    fn insert_revocation(
        &self,
        revocation: &Revocation,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Lifts (deletes) a revocation; returns what it was.
    fn remove_revocation(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Revocation, StoreError>> + Send;
    /// The authorization policy, if one was ever set.
    fn policy(&self) -> impl Future<Output = Result<Option<Policy>, StoreError>> + Send;
    /// Replaces the authorization policy.
    fn set_policy(&self, policy: &Policy) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// The mesh settings, if they were ever set (never with the session key, which has its own
    /// place).
    fn settings(&self) -> impl Future<Output = Result<Option<MeshSettings>, StoreError>> + Send;
    /// Replaces the mesh settings (their session key is not stored).
    fn set_settings(
        &self,
        settings: &MeshSettings,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// The mesh's session-sealing key as stored: the one there, or `fresh` stored now when there
    /// is none yet (so it is created once, by whichever replica comes first, and kept).
    fn session_key_or_insert(
        &self,
        fresh: &[u8],
    ) -> impl Future<Output = Result<Vec<u8>, StoreError>> + Send;
    /// Every stored proxy instance, by proxy id.
    fn instances(&self) -> impl Future<Output = Result<Vec<StoredInstance>, StoreError>> + Send;
    /// The stored instances among `proxy_ids` (missing ones are left out).
    fn instances_by_id(
        &self,
        proxy_ids: &[String],
    ) -> impl Future<Output = Result<Vec<StoredInstance>, StoreError>> + Send;
    /// Applies instance writes in one transaction; one outcome per write, in order.
    fn write_instances(
        &self,
        writes: &[InstanceWrite],
    ) -> impl Future<Output = Result<Vec<WriteOutcome>, StoreError>> + Send;
    /// Renews `replica`'s lease for `lease` and returns the replicas whose leases are current
    /// (`replica` among them), forgetting those that lapsed long ago. A single-process store
    /// answers with `replica` alone.
    fn heartbeat(
        &self,
        replica: &str,
        lease: Duration,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;
}

/// The store this process runs on.
#[derive(Debug)]
pub enum Backend {
    /// SQLite in the data dir (one process).
    Sqlite(SqliteStore),
    /// PostgreSQL (any number of replicas).
    Postgres(Box<PgStore>),
}

impl Backend {
    /// True when other replicas may share this store.
    pub fn is_shared(&self) -> bool {
        matches!(self, Backend::Postgres(_))
    }

    /// Where the store is, without credentials, for logs.
    pub fn describe(&self) -> String {
        match self {
            Backend::Sqlite(s) => s.describe(),
            Backend::Postgres(p) => p.describe(),
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            Backend::Sqlite($s) => $call.await,
            Backend::Postgres($s) => $call.await,
        }
    };
}

impl Store for Backend {
    async fn ca(&self) -> Result<Option<StoredCa>, StoreError> {
        delegate!(self, s => s.ca())
    }
    async fn insert_ca(&self, ca: &StoredCa) -> Result<(), StoreError> {
        delegate!(self, s => s.insert_ca(ca))
    }
    async fn seal_ca_key(&self, sealed: &[u8]) -> Result<(), StoreError> {
        delegate!(self, s => s.seal_ca_key(sealed))
    }
    async fn entities(&self) -> Result<Vec<Entity>, StoreError> {
        delegate!(self, s => s.entities())
    }
    async fn insert_entity(&self, entity: &Entity) -> Result<(), StoreError> {
        delegate!(self, s => s.insert_entity(entity))
    }
    async fn revoke_entity(&self, name: &str, when_unix: i64) -> Result<Entity, StoreError> {
        delegate!(self, s => s.revoke_entity(name, when_unix))
    }
    async fn tokens(&self) -> Result<Vec<StoredToken>, StoreError> {
        delegate!(self, s => s.tokens())
    }
    async fn token(&self, id: &str) -> Result<Option<StoredToken>, StoreError> {
        delegate!(self, s => s.token(id))
    }
    async fn insert_token(&self, token: &StoredToken) -> Result<(), StoreError> {
        delegate!(self, s => s.insert_token(token))
    }
    async fn revoke_token(&self, id: &str) -> Result<TokenInfo, StoreError> {
        delegate!(self, s => s.revoke_token(id))
    }
    async fn use_token(&self, id: &str) -> Result<TokenInfo, StoreError> {
        delegate!(self, s => s.use_token(id))
    }
    async fn revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        delegate!(self, s => s.revocations())
    }
    async fn insert_revocation(&self, revocation: &Revocation) -> Result<(), StoreError> {
        delegate!(self, s => s.insert_revocation(revocation))
    }
    async fn remove_revocation(&self, id: &str) -> Result<Revocation, StoreError> {
        delegate!(self, s => s.remove_revocation(id))
    }
    async fn policy(&self) -> Result<Option<Policy>, StoreError> {
        delegate!(self, s => s.policy())
    }
    async fn set_policy(&self, policy: &Policy) -> Result<(), StoreError> {
        delegate!(self, s => s.set_policy(policy))
    }
    async fn settings(&self) -> Result<Option<MeshSettings>, StoreError> {
        delegate!(self, s => s.settings())
    }
    async fn set_settings(&self, settings: &MeshSettings) -> Result<(), StoreError> {
        delegate!(self, s => s.set_settings(settings))
    }
    async fn session_key_or_insert(&self, fresh: &[u8]) -> Result<Vec<u8>, StoreError> {
        delegate!(self, s => s.session_key_or_insert(fresh))
    }
    async fn instances(&self) -> Result<Vec<StoredInstance>, StoreError> {
        delegate!(self, s => s.instances())
    }
    async fn instances_by_id(&self, ids: &[String]) -> Result<Vec<StoredInstance>, StoreError> {
        delegate!(self, s => s.instances_by_id(ids))
    }
    async fn write_instances(
        &self,
        writes: &[InstanceWrite],
    ) -> Result<Vec<WriteOutcome>, StoreError> {
        delegate!(self, s => s.write_instances(writes))
    }
    async fn heartbeat(&self, replica: &str, lease: Duration) -> Result<Vec<String>, StoreError> {
        delegate!(self, s => s.heartbeat(replica, lease))
    }
}

/// One result row of either backend, read by column index: what lets the tables' rows be
/// read by one function each ([`entity_row`], [`revocation_row`], [`instance_row`]).
pub(crate) trait Columns {
    /// What reading a column fails with.
    type Error;
    /// Column `i` (from 0), converted to `T`.
    fn column<T: ColumnValue>(&self, i: usize) -> Result<T, Self::Error>;
}

/// A column type both backends convert (text, integers, booleans, bytes, and their `Option`s).
pub(crate) trait ColumnValue:
    rusqlite::types::FromSql + for<'a> tokio_postgres::types::FromSql<'a>
{
}

impl<T> ColumnValue for T where
    T: rusqlite::types::FromSql + for<'a> tokio_postgres::types::FromSql<'a>
{
}

/// The `entities` columns, in the order [`entity_row`] reads them.
pub(crate) const ENTITY_COLUMNS: &str =
    "name, ca_pem, fingerprint_sha256, created_unix, revoked_unix, trust_domain";

/// The `revocations` columns, in the order [`revocation_row`] reads them.
pub(crate) const REVOCATION_COLUMNS: &str = "id, identity, serial, reason, created_unix";

/// The `instances` columns, in the order [`instance_row`] reads them.
pub(crate) const INSTANCE_COLUMNS: &str = "proxy_id, record_json, owner, connected, started_ms";

/// An entity from a row of [`ENTITY_COLUMNS`].
pub(crate) fn entity_row<R: Columns>(r: &R) -> Result<Entity, R::Error> {
    let trust_domain: Option<String> = r.column(5)?;
    Ok(Entity {
        name: r.column(0)?,
        ca_pem: r.column(1)?,
        fingerprint_sha256: r.column(2)?,
        created_unix: r.column(3)?,
        revoked_unix: r.column(4)?,
        // An unreadable trust domain trusts nothing, like a missing one (fail closed).
        trust_domain: trust_domain.and_then(|td| TrustDomain::new(td).ok()),
    })
}

/// A revocation from a row of [`REVOCATION_COLUMNS`].
pub(crate) fn revocation_row<R: Columns>(r: &R) -> Result<Revocation, R::Error> {
    Ok(Revocation {
        id: r.column(0)?,
        identity: r.column(1)?,
        serial: r.column(2)?,
        reason: r.column(3)?,
        created_unix: r.column(4)?,
    })
}

/// An instance from a row of [`INSTANCE_COLUMNS`].
pub(crate) fn instance_row<R: Columns>(r: &R) -> Result<StoredInstance, R::Error> {
    Ok(StoredInstance {
        proxy_id: r.column(0)?,
        record_json: r.column(1)?,
        owner: r.column(2)?,
        connected: r.column(3)?,
        started_ms: r.column(4)?,
    })
}

/// Parses a stored JSON value, naming what it was on failure.
pub(crate) fn from_json<T: serde::de::DeserializeOwned>(
    what: &'static str,
    json: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt {
        what,
        detail: e.to_string(),
    })
}

/// Serializes a value to store.
pub(crate) fn to_json<T: serde::Serialize>(
    what: &'static str,
    value: &T,
) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt {
        what,
        detail: e.to_string(),
    })
}

/// The settings as stored: without the session key, which is kept (sealed) on its own.
pub(crate) fn stored_settings(settings: &MeshSettings) -> Result<String, StoreError> {
    to_json(
        "settings",
        &MeshSettings {
            session_key: String::new(),
            ..settings.clone()
        },
    )
}

/// What a revocation is of, for messages: its identity, else its serial.
pub(crate) fn revoked_subject(r: &Revocation) -> String {
    r.identity.clone().or(r.serial.clone()).unwrap_or_default()
}

/// A token with one more use counted, or [`StoreError::Exhausted`].
pub(crate) fn spend(mut token: StoredToken, id: &str) -> Result<StoredToken, StoreError> {
    if let Some(uses) = token.info.uses
        && token.info.used >= uses
    {
        return Err(StoreError::Exhausted {
            id: id.to_owned(),
            uses,
        });
    }
    token.info.used = token.info.used.saturating_add(1);
    Ok(token)
}
