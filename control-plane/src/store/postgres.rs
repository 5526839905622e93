//! The PostgreSQL store, for several replicas of the control plane on one database
//! (tokio-postgres, no TLS to the database; see docs/control-plane.md).
//!
//! Connections: a few for statements (opened when first needed, reopened after a failure; a
//! statement waits at most [`STATEMENT_TIMEOUT`]), and one that only LISTENs. Every change to
//! shared state NOTIFYs channel [`CHANNEL`] inside its own transaction, so the other replicas
//! hear of it exactly when it commits: `<kind> <replica> [<key>]`, with kind `instance`,
//! `policy`, `settings`, `entities` or `revocations`. [`PgStore::follow`] turns those into events ([`super::follow`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use capmesh_api::rest::{Entity, Revocation, TokenInfo};
use capmesh_api::{MeshSettings, Policy};
use serde::de::DeserializeOwned;
use tokio::sync::{Mutex, MutexGuard, mpsc};

use super::follow::Followed;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, GenericClient, NoTls, Row, Statement};

use super::migrations::{self, Migration};
use super::{
    ColumnValue, Columns, ENTITY_COLUMNS, INSTANCE_COLUMNS, InstanceWrite, REVOCATION_COLUMNS,
    Store, StoreError, StoredCa, StoredInstance, StoredKey, StoredToken, WriteOutcome, entity_row,
    from_json, instance_row, or_conflict, revocation_row, revoked_subject, spend, stored_settings,
    to_json,
};

/// The LISTEN/NOTIFY channel every replica of one store shares.
pub const CHANNEL: &str = "capmesh_changes";

/// Longest wait for one statement (or transaction) before the store counts as unreachable.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest wait for a new connection.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Connections for statements.
const POOL: usize = 4;

/// Serializes migrations of replicas starting together (`pg_advisory_xact_lock` key).
const MIGRATION_LOCK: i64 = 0x0063_6170_6d65_7368; // "capmesh"

/// PostgreSQL, shared by the replicas.
#[derive(Debug)]
pub struct PgStore {
    config: Config,
    replica: String,
    slots: Vec<Mutex<Option<Conn>>>,
    next: AtomicUsize,
    describe: String,
}

/// A pooled connection and the statements prepared on it (the hot ones: a change crossing
/// replicas is one round trip on each side, not three).
#[derive(Debug)]
struct Conn {
    client: Client,
    prepared: HashMap<&'static str, Statement>,
}

impl Conn {
    async fn statement(&mut self, sql: &'static str) -> Result<Statement, tokio_postgres::Error> {
        if let Some(s) = self.prepared.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql).await?;
        self.prepared.insert(sql, s.clone());
        Ok(s)
    }
}

/// One pooled connection, held for one call.
struct Slot<'a> {
    guard: MutexGuard<'a, Option<Conn>>,
}

impl Slot<'_> {
    fn conn(&mut self) -> Result<&mut Conn, StoreError> {
        // `acquire` only hands out slots that hold a connection.
        self.guard
            .as_mut()
            .ok_or_else(|| StoreError::Postgres("no connection in the pool slot".into()))
    }

    fn client(&mut self) -> Result<&mut Client, StoreError> {
        Ok(&mut self.conn()?.client)
    }
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://user:password@host:port/db`), as replica
    /// `replica`, and brings the schema up to date. Fails when the database is out of reach,
    /// so a replica does not start without its store.
    pub async fn open(url: &str, replica: &str) -> Result<Self, StoreError> {
        let mut config: Config = url.parse().map_err(|e| {
            StoreError::Config(format!(
                "--store {}: not a PostgreSQL URL ({e}): use postgres://user:password@host:5432/database",
                redact(url)
            ))
        })?;
        if config.get_ssl_mode() == SslMode::Require {
            return Err(StoreError::Config(format!(
                "--store {}: sslmode=require is not supported: this control plane speaks to PostgreSQL without TLS; use sslmode=disable on a trusted network (see docs/control-plane.md)",
                redact(url)
            )));
        }
        config
            .application_name(format!("capmesh-control-plane {replica}"))
            .connect_timeout(CONNECT_TIMEOUT)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10));
        let describe = describe(&config);
        let store = Self {
            config,
            replica: replica.to_owned(),
            slots: (0..POOL).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
            describe,
        };
        store.migrate(migrations::POSTGRES).await?;
        Ok(store)
    }

    /// `PostgreSQL at host:port/database`.
    pub fn describe(&self) -> String {
        self.describe.clone()
    }

    fn unavailable(&self, detail: impl Into<String>) -> StoreError {
        StoreError::Unavailable {
            store: self.describe.clone(),
            detail: detail.into(),
        }
    }

    /// Sorts a driver error: connection trouble is [`StoreError::Unavailable`] (and the
    /// connection is dropped so the next call opens a fresh one), anything else a statement
    /// failure.
    fn classify(&self, e: tokio_postgres::Error) -> (StoreError, bool) {
        match e.as_db_error() {
            None => (self.unavailable(with_causes(&e)), true),
            Some(db) => {
                let code = db.code().code();
                let down = code.starts_with("08")
                    || code.starts_with("57P")
                    || db.code() == &SqlState::TOO_MANY_CONNECTIONS;
                if down {
                    (self.unavailable(db.message().to_owned()), true)
                } else {
                    (
                        StoreError::Postgres(format!("{} (SQLSTATE {code})", db.message())),
                        false,
                    )
                }
            }
        }
    }

    async fn connect(&self) -> Result<Client, StoreError> {
        let connecting = tokio::time::timeout(CONNECT_TIMEOUT, self.config.connect(NoTls));
        let (client, connection) = match connecting.await {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => return Err(self.classify(e).0),
            Err(_) => {
                return Err(self.unavailable(format!("no connection within {CONNECT_TIMEOUT:?}")));
            }
        };
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "PostgreSQL connection ended");
            }
        });
        Ok(client)
    }

    /// A connection for one call: a free one if any, else the next in turn; opened when needed.
    async fn acquire(&self) -> Result<Slot<'_>, StoreError> {
        let mut guard = None;
        for slot in &self.slots {
            if let Ok(g) = slot.try_lock() {
                guard = Some(g);
                break;
            }
        }
        let mut guard = match guard {
            Some(g) => g,
            None => {
                let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
                self.slots[i].lock().await
            }
        };
        if guard.as_ref().is_none_or(|c| c.client.is_closed()) {
            *guard = Some(Conn {
                client: self.connect().await?,
                prepared: HashMap::new(),
            });
        }
        Ok(Slot { guard })
    }

    /// Ends a call: passes its result on, dropping the connection when the database went away
    /// or the call overran [`STATEMENT_TIMEOUT`].
    fn finish<T>(
        &self,
        mut slot: Slot<'_>,
        result: Result<Result<T, tokio_postgres::Error>, tokio::time::error::Elapsed>,
    ) -> Result<T, StoreError> {
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                let (err, drop_conn) = self.classify(e);
                if drop_conn {
                    *slot.guard = None;
                }
                Err(err)
            }
            Err(_) => {
                *slot.guard = None;
                Err(self.unavailable(format!("no answer within {STATEMENT_TIMEOUT:?}")))
            }
        }
    }

    async fn migrate(&self, list: &[Migration]) -> Result<(), StoreError> {
        let mut slot = self.acquire().await?;
        let client = slot.client()?;
        let result = tokio::time::timeout(Duration::from_secs(60), async {
            let tx = client.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await?;
            tx.batch_execute(migrations::VERSIONS_TABLE).await?;
            let applied: Vec<i64> = tx
                .query("SELECT version FROM schema_migrations", &[])
                .await?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?;
            let pending = match migrations::pending(list, &applied) {
                Ok(p) => p,
                Err(e) => return Ok(Err(e)),
            };
            for m in pending {
                if let Err(e) = tx.batch_execute(m.sql).await {
                    return Ok(Err(format!("migration {} ({}) failed: {e}", m.version, m.name)));
                }
                tx.execute(
                    "INSERT INTO schema_migrations (version, name, applied_unix) VALUES ($1, $2, $3)",
                    &[&m.version, &m.name, &crate::ca::unix_now()],
                )
                .await?;
                tracing::info!(version = m.version, name = m.name, "store migrated");
            }
            tx.commit().await?;
            Ok(Ok(()))
        })
        .await;
        match result {
            Ok(Ok(Err(problem))) => Err(StoreError::Schema(problem)),
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Err(e)) => self.finish(slot, Ok(Err::<(), _>(e))),
            Err(elapsed) => self.finish::<()>(slot, Err(elapsed)),
        }
    }

    fn payload(&self, kind: &str, key: Option<&str>) -> String {
        match key {
            Some(key) => format!("{kind} {} {key}", self.replica),
            None => format!("{kind} {}", self.replica),
        }
    }

    /// Starts following the other replicas' changes: a task with its own connection, which
    /// LISTENs, reconnects (backing off from 50 ms to 1 s) when the connection breaks, and ends
    /// when the receiver is dropped.
    pub fn follow(&self) -> mpsc::Receiver<Followed> {
        let (tx, rx) = mpsc::channel(4096);
        let config = self.config.clone();
        let replica = self.replica.clone();
        tokio::spawn(super::follow::run(config, replica, tx));
        rx
    }
}

/// An error and what caused it ("error connecting to server: Connection refused (os error
/// 111)"): the driver's own message alone rarely says what to fix.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

fn describe(config: &Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config
        .get_dbname()
        .or(config.get_user())
        .unwrap_or("postgres");
    format!("PostgreSQL at {host}:{port}/{db}")
}

/// The URL with its password replaced, for messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "(a connection string)".into();
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}{path}")
        }
        None => url.to_owned(),
    }
}

impl Columns for Row {
    type Error = tokio_postgres::Error;

    fn column<T: ColumnValue>(&self, i: usize) -> Result<T, tokio_postgres::Error> {
        self.try_get(i)
    }
}

/// Runs `$body` (an async block using `$client: &mut Client`) on a pooled connection within
/// [`STATEMENT_TIMEOUT`].
macro_rules! with_client {
    ($store:expr, |$client:ident| $body:expr) => {{
        let mut slot = $store.acquire().await?;
        let $client = slot.client()?;
        let result = tokio::time::timeout(STATEMENT_TIMEOUT, $body).await;
        $store.finish(slot, result)
    }};
}

async fn notify(client: &impl GenericClient, payload: &str) -> Result<(), tokio_postgres::Error> {
    client
        .execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload])
        .await
        .map(|_| ())
}

impl PgStore {
    /// Runs one statement that changes shared state, and NOTIFYs `kind` in the same
    /// transaction, so the other replicas hear of it exactly when it commits.
    async fn execute_and_notify(
        &self,
        kind: &str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<(), StoreError> {
        let payload = self.payload(kind, None);
        with_client!(self, |c| async {
            let tx = c.transaction().await?;
            tx.execute(sql, params).await?;
            notify(&tx, &payload).await?;
            tx.commit().await
        })
    }

    /// Runs one statement that changes at most one row of shared state and returns it; NOTIFYs
    /// `kind` in the same transaction when it did change one. The row, if any.
    async fn change_one_and_notify(
        &self,
        kind: &str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, StoreError> {
        let payload = self.payload(kind, None);
        with_client!(self, |c| async {
            let tx = c.transaction().await?;
            let row = tx.query_opt(sql, params).await?;
            if row.is_some() {
                notify(&tx, &payload).await?;
            }
            tx.commit().await?;
            Ok(row)
        })
    }

    /// Every row `sql` selects, each read by `read`; a row that does not read is `what`, corrupt.
    async fn all<T>(
        &self,
        what: &'static str,
        sql: &str,
        read: impl Fn(&Row) -> Result<T, tokio_postgres::Error>,
    ) -> Result<Vec<T>, StoreError> {
        let rows = with_client!(self, |c| c.query(sql, &[]))?;
        read_all(what, &rows, read)
    }

    /// The JSON value in column 0 of the one row `sql` selects (a table of one row, `id = 1`),
    /// parsed as `what`; `None` when there is no row.
    async fn singleton_json<T: DeserializeOwned>(
        &self,
        what: &'static str,
        sql: &str,
    ) -> Result<Option<T>, StoreError> {
        let row = with_client!(self, |c| c.query_opt(sql, &[]))?;
        match row {
            None => Ok(None),
            Some(row) => {
                let json: String = row.try_get(0).map_err(corrupt(what))?;
                from_json(what, &json).map(Some)
            }
        }
    }

    /// Reads token `id` (its row locked meanwhile, so two replicas cannot both change it from
    /// the same state), changes it with `change` and writes it back, in one transaction;
    /// returns it as it is now.
    async fn update_token(
        &self,
        id: &str,
        change: impl FnOnce(StoredToken) -> Result<StoredToken, StoreError> + Send,
    ) -> Result<TokenInfo, StoreError> {
        let done = with_client!(self, |c| async {
            let tx = c.transaction().await?;
            let row = tx
                .query_opt(
                    "SELECT info_json, secret_sha256 FROM tokens WHERE id = $1 FOR UPDATE",
                    &[&id],
                )
                .await?;
            let Some(row) = row else {
                return Ok(Ok(None));
            };
            let token = match token_from_row(&row).and_then(change) {
                Ok(t) => t,
                Err(e) => return Ok(Err(e)),
            };
            let info_json = match to_json("token", &token.info) {
                Ok(j) => j,
                Err(e) => return Ok(Err(e)),
            };
            tx.execute(
                "UPDATE tokens SET info_json = $2 WHERE id = $1",
                &[&id, &info_json],
            )
            .await?;
            tx.commit().await?;
            Ok(Ok(Some(token.info)))
        })??;
        done.ok_or_else(|| StoreError::NotFound {
            what: "token",
            name: id.to_owned(),
        })
    }
}

/// Takes an instance over (unless a newer stream holds it), and announces it when it did.
const CLAIM: &str = "WITH claimed AS (
    INSERT INTO instances (proxy_id, record_json, owner, connected, started_ms)
    VALUES ($1, $2, $3, $4, $5)
    ON CONFLICT (proxy_id) DO UPDATE SET record_json = EXCLUDED.record_json,
        owner = EXCLUDED.owner, connected = EXCLUDED.connected, started_ms = EXCLUDED.started_ms
    WHERE instances.started_ms <= EXCLUDED.started_ms
    RETURNING proxy_id
)
SELECT pg_notify($6, $7) FROM claimed";

/// Deletes an instance if it is still that owner's stream, and announces it when it did.
const REMOVE: &str = "WITH removed AS (
    DELETE FROM instances WHERE proxy_id = $1 AND owner = $2 AND started_ms = $3
    RETURNING proxy_id
)
SELECT pg_notify($4, $5) FROM removed";

const SELECT_INSTANCES: &str = "SELECT proxy_id, record_json, owner, connected, started_ms FROM instances WHERE proxy_id = ANY($1)";

/// One instance write (its statement prepared as `statements`: claim, remove).
async fn write_one(
    client: &impl GenericClient,
    (claim, remove): &(Statement, Statement),
    me: &str,
    w: &InstanceWrite,
) -> Result<WriteOutcome, tokio_postgres::Error> {
    let payload = format!("instance {me} {}", w.proxy_id());
    let rows = match w {
        InstanceWrite::Claim(i) => {
            client
                .query(
                    claim,
                    &[
                        &i.proxy_id,
                        &i.record_json,
                        &i.owner,
                        &i.connected,
                        &i.started_ms,
                        &CHANNEL,
                        &payload,
                    ],
                )
                .await?
        }
        InstanceWrite::Remove {
            proxy_id,
            owner,
            started_ms,
        } => {
            client
                .query(remove, &[proxy_id, owner, started_ms, &CHANNEL, &payload])
                .await?
        }
    };
    outcome(client, rows.len() as u64, w.proxy_id()).await
}

/// Applied when a row changed; otherwise whether the row exists (owned by someone else).
async fn outcome(
    client: &impl GenericClient,
    changed: u64,
    proxy_id: &str,
) -> Result<WriteOutcome, tokio_postgres::Error> {
    if changed > 0 {
        return Ok(WriteOutcome::Applied);
    }
    let exists = client
        .query_opt("SELECT 1 FROM instances WHERE proxy_id = $1", &[&proxy_id])
        .await?
        .is_some();
    Ok(if exists {
        WriteOutcome::NotOurs
    } else {
        WriteOutcome::Missing
    })
}

impl Store for PgStore {
    async fn ca(&self) -> Result<Option<StoredCa>, StoreError> {
        let row = with_client!(self, |c| c.query_opt(
            "SELECT cert_pem, key_sealed, root_pem FROM ca WHERE id = 1",
            &[]
        ))?;
        let Some(row) = row else { return Ok(None) };
        let read = || -> Result<StoredCa, tokio_postgres::Error> {
            Ok(StoredCa {
                cert_pem: row.try_get(0)?,
                key: StoredKey::Sealed(row.try_get(1)?),
                root_pem: row.try_get(2)?,
            })
        };
        read().map(Some).map_err(corrupt("CA"))
    }

    async fn insert_ca(&self, ca: &StoredCa) -> Result<(), StoreError> {
        let StoredKey::Sealed(sealed) = &ca.key else {
            return Err(StoreError::Refused(
                "the CA key must be sealed before it is stored in PostgreSQL (pass --store-key-file)"
                    .into(),
            ));
        };
        let inserted = with_client!(self, |c| c.execute(
            "INSERT INTO ca (id, cert_pem, key_sealed, root_pem) VALUES (1, $1, $2, $3)",
            &[&ca.cert_pem, sealed, &ca.root_pem]
        ));
        or_conflict(inserted, "CA", || "mesh CA".into()).map(|_| ())
    }

    async fn seal_ca_key(&self, sealed: &[u8]) -> Result<(), StoreError> {
        let changed = with_client!(self, |c| c
            .execute("UPDATE ca SET key_sealed = $1 WHERE id = 1", &[&sealed]))?;
        if changed == 0 {
            return Err(StoreError::no_ca());
        }
        Ok(())
    }

    async fn entities(&self) -> Result<Vec<Entity>, StoreError> {
        self.all(
            "entity",
            &format!("SELECT {ENTITY_COLUMNS} FROM entities ORDER BY created_unix, name"),
            entity_row,
        )
        .await
    }

    async fn insert_entity(&self, e: &Entity) -> Result<(), StoreError> {
        let inserted = self
            .execute_and_notify(
                "entities",
                &format!("INSERT INTO entities ({ENTITY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)"),
                &[
                    &e.name,
                    &e.ca_pem,
                    &e.fingerprint_sha256,
                    &e.created_unix,
                    &e.revoked_unix,
                    &e.trust_domain.as_ref().map(|td| td.as_str()),
                ],
            )
            .await;
        or_conflict(inserted, "entity", || e.name.clone())
    }

    async fn revoke_entity(&self, name: &str, when_unix: i64) -> Result<Entity, StoreError> {
        let row = self
            .change_one_and_notify(
                "entities",
                &format!(
                    "UPDATE entities SET revoked_unix = COALESCE(revoked_unix, $2)
                     WHERE name = $1 RETURNING {ENTITY_COLUMNS}"
                ),
                &[&name, &when_unix],
            )
            .await?;
        let row = row.ok_or_else(|| StoreError::NotFound {
            what: "entity",
            name: name.to_owned(),
        })?;
        entity_row(&row).map_err(corrupt("entity"))
    }

    async fn tokens(&self) -> Result<Vec<StoredToken>, StoreError> {
        let rows = with_client!(self, |c| c.query(
            "SELECT info_json, secret_sha256 FROM tokens ORDER BY created_seq DESC",
            &[]
        ))?;
        rows.iter().map(token_from_row).collect()
    }

    async fn token(&self, id: &str) -> Result<Option<StoredToken>, StoreError> {
        let row = with_client!(self, |c| c.query_opt(
            "SELECT info_json, secret_sha256 FROM tokens WHERE id = $1",
            &[&id]
        ))?;
        row.as_ref().map(token_from_row).transpose()
    }

    async fn insert_token(&self, t: &StoredToken) -> Result<(), StoreError> {
        let info_json = to_json("token", &t.info)?;
        let inserted = with_client!(self, |c| c.execute(
            "INSERT INTO tokens (id, info_json, secret_sha256) VALUES ($1, $2, $3)",
            &[&t.info.id, &info_json, &t.secret_sha256]
        ));
        or_conflict(inserted, "token", || t.info.id.clone()).map(|_| ())
    }

    async fn revoke_token(&self, id: &str) -> Result<TokenInfo, StoreError> {
        self.update_token(id, |mut token| {
            token.info.revoked = true;
            Ok(token)
        })
        .await
    }

    async fn use_token(&self, id: &str) -> Result<TokenInfo, StoreError> {
        // The row is locked while its use is counted: two replicas cannot both spend the last.
        self.update_token(id, |token| spend(token, id)).await
    }

    async fn revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        self.all(
            "revocation",
            &format!("SELECT {REVOCATION_COLUMNS} FROM revocations ORDER BY created_unix, id"),
            revocation_row,
        )
        .await
    }

    async fn insert_revocation(&self, r: &Revocation) -> Result<(), StoreError> {
        let inserted = self
            .execute_and_notify(
                "revocations",
                &format!(
                    "INSERT INTO revocations ({REVOCATION_COLUMNS}) VALUES ($1, $2, $3, $4, $5)"
                ),
                &[&r.id, &r.identity, &r.serial, &r.reason, &r.created_unix],
            )
            .await;
        or_conflict(inserted, "revocation of", || revoked_subject(r))
    }

    async fn remove_revocation(&self, id: &str) -> Result<Revocation, StoreError> {
        let row = self
            .change_one_and_notify(
                "revocations",
                &format!("DELETE FROM revocations WHERE id = $1 RETURNING {REVOCATION_COLUMNS}"),
                &[&id],
            )
            .await?;
        let row = row.ok_or_else(|| StoreError::NotFound {
            what: "revocation",
            name: id.to_owned(),
        })?;
        revocation_row(&row).map_err(corrupt("revocation"))
    }

    async fn policy(&self) -> Result<Option<Policy>, StoreError> {
        self.singleton_json("policy", "SELECT policy_json FROM policy WHERE id = 1")
            .await
    }

    async fn set_policy(&self, policy: &Policy) -> Result<(), StoreError> {
        let json = to_json("policy", policy)?;
        self.execute_and_notify(
            "policy",
            "INSERT INTO policy (id, policy_json) VALUES (1, $1)
             ON CONFLICT (id) DO UPDATE SET policy_json = EXCLUDED.policy_json",
            &[&json],
        )
        .await
    }

    async fn settings(&self) -> Result<Option<MeshSettings>, StoreError> {
        self.singleton_json(
            "settings",
            "SELECT settings_json FROM settings WHERE id = 1",
        )
        .await
    }

    async fn set_settings(&self, settings: &MeshSettings) -> Result<(), StoreError> {
        let json = stored_settings(settings)?;
        self.execute_and_notify(
            "settings",
            "INSERT INTO settings (id, settings_json) VALUES (1, $1)
             ON CONFLICT (id) DO UPDATE SET settings_json = EXCLUDED.settings_json",
            &[&json],
        )
        .await
    }

    async fn session_key_or_insert(&self, fresh: &[u8]) -> Result<Vec<u8>, StoreError> {
        let row = with_client!(self, |c| async {
            c.execute(
                "INSERT INTO mesh_secret (id, session_key) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
                &[&fresh],
            )
            .await?;
            c.query_one("SELECT session_key FROM mesh_secret WHERE id = 1", &[])
                .await
        })?;
        row.try_get(0).map_err(corrupt("session key"))
    }

    async fn instances(&self) -> Result<Vec<StoredInstance>, StoreError> {
        self.all(
            "instance",
            &format!("SELECT {INSTANCE_COLUMNS} FROM instances ORDER BY proxy_id"),
            instance_row,
        )
        .await
    }

    async fn instances_by_id(&self, ids: &[String]) -> Result<Vec<StoredInstance>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut slot = self.acquire().await?;
        let conn = slot.conn()?;
        let result = tokio::time::timeout(STATEMENT_TIMEOUT, async {
            let select = conn.statement(SELECT_INSTANCES).await?;
            conn.client.query(&select, &[&ids]).await
        })
        .await;
        read_all("instance", &self.finish(slot, result)?, instance_row)
    }

    async fn write_instances(
        &self,
        writes: &[InstanceWrite],
    ) -> Result<Vec<WriteOutcome>, StoreError> {
        let me = self.replica.clone();
        let mut slot = self.acquire().await?;
        let conn = slot.conn()?;
        let result = tokio::time::timeout(STATEMENT_TIMEOUT, async {
            let statements = (conn.statement(CLAIM).await?, conn.statement(REMOVE).await?);
            // One write (the usual case: one stream's change) is one statement, one round trip;
            // several share one transaction.
            if let [w] = writes {
                return Ok(vec![write_one(&conn.client, &statements, &me, w).await?]);
            }
            let tx = conn.client.transaction().await?;
            let mut outcomes = Vec::with_capacity(writes.len());
            for w in writes {
                outcomes.push(write_one(&tx, &statements, &me, w).await?);
            }
            tx.commit().await?;
            Ok(outcomes)
        })
        .await;
        self.finish(slot, result)
    }

    async fn heartbeat(&self, replica: &str, lease: Duration) -> Result<Vec<String>, StoreError> {
        let lease = format!("{} milliseconds", lease.as_millis());
        let rows = with_client!(self, |c| async {
            c.execute(
                "INSERT INTO replicas (id, renewed_at, expires_at)
                 VALUES ($1, now(), now() + CAST($2::text AS interval))
                 ON CONFLICT (id) DO UPDATE SET renewed_at = now(), expires_at = EXCLUDED.expires_at",
                &[&replica, &lease],
            )
            .await?;
            c.execute(
                "DELETE FROM replicas WHERE expires_at < now() - interval '1 day'",
                &[],
            )
            .await?;
            c.query(
                "SELECT id FROM replicas WHERE expires_at > now() ORDER BY id",
                &[],
            )
            .await
        })?;
        read_all("replica", &rows, |r| r.try_get(0))
    }
}

/// A row that does not read as `what`: the database holds something this binary cannot use.
fn corrupt(what: &'static str) -> impl Fn(tokio_postgres::Error) -> StoreError + Copy {
    move |e| StoreError::Corrupt {
        what,
        detail: e.to_string(),
    }
}

/// Every row read by `read`; a row that does not read is a corrupt `what`.
fn read_all<T>(
    what: &'static str,
    rows: &[Row],
    read: impl Fn(&Row) -> Result<T, tokio_postgres::Error>,
) -> Result<Vec<T>, StoreError> {
    rows.iter()
        .map(read)
        .collect::<Result<_, _>>()
        .map_err(corrupt(what))
}

fn token_from_row(row: &Row) -> Result<StoredToken, StoreError> {
    let corrupt = corrupt("token");
    let info_json: String = row.try_get(0).map_err(corrupt)?;
    Ok(StoredToken {
        info: from_json("token", &info_json)?,
        secret_sha256: row.try_get(1).map_err(corrupt)?,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn urls_are_shown_without_their_password() {
        assert_eq!(
            redact("postgres://capmesh:s3cret@db:5432/capmesh?sslmode=disable"),
            "postgres://capmesh:***@db:5432/capmesh?sslmode=disable"
        );
        assert_eq!(redact("postgres://db/capmesh"), "postgres://db/capmesh");
        assert_eq!(redact("host=db password=x"), "(a connection string)");
        let config: Config = "postgresql://u:p@db.example:6543/mesh".parse().unwrap();
        assert_eq!(describe(&config), "PostgreSQL at db.example:6543/mesh");
    }
}
