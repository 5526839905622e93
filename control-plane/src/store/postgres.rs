//! The PostgreSQL store, for several replicas of the control plane on one database
//! (tokio-postgres, no TLS to the database; see docs/control-plane.md).
//!
//! Connections: a few for statements (opened when first needed, reopened after a failure; a
//! statement waits at most [`STATEMENT_TIMEOUT`]), and one that only LISTENs. Every change to
//! shared state NOTIFYs channel [`CHANNEL`] inside its own transaction, so the other replicas
//! hear of it exactly when it commits: `<kind> <replica> [<key>]`, with kind `instance`,
//! `policy` or `entities`. [`PgStore::follow`] turns those into [`Followed`] events, skipping the
//! replica's own, and says [`Followed::Resync`] after every (re)connection, because whatever
//! was sent while it was away is lost.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use capmesh_api::Policy;
use capmesh_api::rest::{Entity, TokenInfo};
use tokio::sync::{Mutex, MutexGuard, mpsc};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, Client, Config, GenericClient, NoTls, Row};

use super::migrations::{self, Migration};
use super::{
    Change, InstanceWrite, Store, StoreError, StoredCa, StoredInstance, StoredKey, StoredToken,
    WriteOutcome, from_json, to_json,
};

/// The LISTEN/NOTIFY channel every replica of one store shares.
pub const CHANNEL: &str = "capmesh_changes";

/// Longest wait for one statement (or transaction) before the store counts as unreachable.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest wait for a new connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Connections for statements.
const POOL: usize = 4;

/// Serializes migrations of replicas starting together (`pg_advisory_xact_lock` key).
const MIGRATION_LOCK: i64 = 0x0063_6170_6d65_7368; // "capmesh"

/// What the follower reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Followed {
    /// (Re)connected and listening: anything may have changed meanwhile; reload it all.
    Resync,
    /// Another replica changed something.
    Change(Change),
    /// The listening connection broke; reconnecting.
    Lost(String),
}

/// PostgreSQL, shared by the replicas.
#[derive(Debug)]
pub struct PgStore {
    config: Config,
    replica: String,
    slots: Vec<Mutex<Option<Client>>>,
    next: AtomicUsize,
    describe: String,
}

/// One pooled connection, held for one call.
struct Slot<'a> {
    guard: MutexGuard<'a, Option<Client>>,
}

impl Slot<'_> {
    fn client(&mut self) -> Result<&mut Client, StoreError> {
        // `acquire` only hands out slots that hold a client.
        self.guard
            .as_mut()
            .ok_or_else(|| StoreError::Postgres("no connection in the pool slot".into()))
    }
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://user:password@host:port/db`), as replica
    /// `replica`, and brings the schema up to date. Fails when the database is out of reach,
    /// so a replica does not start without its store.
    pub async fn open(url: &str, replica: &str) -> Result<Self, StoreError> {
        let mut config: Config = url.parse().map_err(|e| {
            StoreError::Schema(format!(
                "--store {}: not a PostgreSQL URL ({e}): use postgres://user:password@host:5432/database",
                redact(url)
            ))
        })?;
        if config.get_ssl_mode() == SslMode::Require {
            return Err(StoreError::Refused(format!(
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
            None => (self.unavailable(e.to_string()), true),
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
        if guard.as_ref().is_none_or(Client::is_closed) {
            *guard = Some(self.connect().await?);
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
        tokio::spawn(follow(config, replica, tx));
        rx
    }
}

async fn follow(config: Config, replica: String, tx: mpsc::Sender<Followed>) {
    let mut delay = Duration::from_millis(50);
    loop {
        let broke = listen_once(&config, &replica, &tx).await;
        if tx.is_closed() {
            return;
        }
        if tx.send(Followed::Lost(broke)).await.is_err() {
            return;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

/// One listening connection's life; returns why it ended.
async fn listen_once(config: &Config, replica: &str, tx: &mpsc::Sender<Followed>) -> String {
    let (client, mut connection) =
        match tokio::time::timeout(CONNECT_TIMEOUT, config.connect(NoTls)).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => return e.to_string(),
            Err(_) => return format!("no connection within {CONNECT_TIMEOUT:?}"),
        };
    // The connection delivers notifications only while it is polled; it is polled here, and
    // the LISTEN below goes through it.
    let (note_tx, mut notes) = mpsc::unbounded_channel::<Result<String, String>>();
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if note_tx.send(Ok(n.payload().to_owned())).is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    let _ = note_tx.send(Err(e.to_string()));
                    return;
                }
                None => {
                    let _ = note_tx.send(Err("the server closed the connection".into()));
                    return;
                }
            }
        }
    });
    let listening = tokio::time::timeout(
        STATEMENT_TIMEOUT,
        client.batch_execute(&format!("LISTEN {CHANNEL}")),
    )
    .await;
    let why = match listening {
        Ok(Ok(())) => {
            if tx.send(Followed::Resync).await.is_err() {
                driver.abort();
                return "stopped".into();
            }
            loop {
                match notes.recv().await {
                    Some(Ok(payload)) => {
                        if let Some(change) = parse_payload(&payload, replica)
                            && tx.send(Followed::Change(change)).await.is_err()
                        {
                            break "stopped".into();
                        }
                    }
                    Some(Err(e)) => break e,
                    None => break "the connection task ended".into(),
                }
            }
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("LISTEN got no answer within {STATEMENT_TIMEOUT:?}"),
    };
    driver.abort();
    drop(client);
    why
}

/// A notification's change, unless it came from `me` or is not one of ours.
fn parse_payload(payload: &str, me: &str) -> Option<Change> {
    let mut parts = payload.splitn(3, ' ');
    let kind = parts.next()?;
    let origin = parts.next()?;
    if origin == me {
        return None;
    }
    match (kind, parts.next()) {
        ("instance", Some(id)) => Some(Change::Instance(id.to_owned())),
        ("policy", _) => Some(Change::Policy),
        ("entities", _) => Some(Change::Entities),
        _ => {
            tracing::debug!(payload, "ignoring an unknown change notification");
            None
        }
    }
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

fn entity_row(r: &Row) -> Result<Entity, tokio_postgres::Error> {
    Ok(Entity {
        name: r.try_get(0)?,
        ca_pem: r.try_get(1)?,
        fingerprint_sha256: r.try_get(2)?,
        created_unix: r.try_get(3)?,
        revoked_unix: r.try_get(4)?,
    })
}

const ENTITY_COLUMNS: &str = "name, ca_pem, fingerprint_sha256, created_unix, revoked_unix";

fn instance_row(r: &Row) -> Result<StoredInstance, tokio_postgres::Error> {
    Ok(StoredInstance {
        proxy_id: r.try_get(0)?,
        record_json: r.try_get(1)?,
        owner: r.try_get(2)?,
        connected: r.try_get(3)?,
        started_ms: r.try_get(4)?,
    })
}

const INSTANCE_COLUMNS: &str = "proxy_id, record_json, owner, connected, started_ms";

fn is_unique_violation(e: &StoreError) -> bool {
    matches!(e, StoreError::Postgres(m) if m.contains("SQLSTATE 23505"))
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
        read().map(Some).map_err(|e| StoreError::Corrupt {
            what: "CA",
            detail: e.to_string(),
        })
    }

    async fn insert_ca(&self, ca: &StoredCa) -> Result<(), StoreError> {
        let StoredKey::Sealed(sealed) = &ca.key else {
            return Err(StoreError::Refused(
                "the CA key must be sealed before it is stored in PostgreSQL (pass --store-key-file)"
                    .into(),
            ));
        };
        let result = with_client!(self, |c| c.execute(
            "INSERT INTO ca (id, cert_pem, key_sealed, root_pem) VALUES (1, $1, $2, $3)",
            &[&ca.cert_pem, sealed, &ca.root_pem]
        ));
        match result {
            Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict {
                what: "CA",
                name: "mesh CA".into(),
            }),
            other => other.map(|_| ()),
        }
    }

    async fn seal_ca_key(&self, sealed: &[u8]) -> Result<(), StoreError> {
        let changed = with_client!(self, |c| c
            .execute("UPDATE ca SET key_sealed = $1 WHERE id = 1", &[&sealed]))?;
        if changed == 0 {
            return Err(StoreError::NotFound {
                what: "CA",
                name: "mesh CA".into(),
            });
        }
        Ok(())
    }

    async fn entities(&self) -> Result<Vec<Entity>, StoreError> {
        let rows = with_client!(self, |c| c.query(
            &format!("SELECT {ENTITY_COLUMNS} FROM entities ORDER BY created_unix, name"),
            &[]
        ))?;
        rows.iter()
            .map(entity_row)
            .collect::<Result<_, _>>()
            .map_err(|e| StoreError::Corrupt {
                what: "entity",
                detail: e.to_string(),
            })
    }

    async fn insert_entity(&self, e: &Entity) -> Result<(), StoreError> {
        let payload = self.payload("entities", None);
        let result = with_client!(self, |c| async {
            let tx = c.transaction().await?;
            tx.execute(
                &format!("INSERT INTO entities ({ENTITY_COLUMNS}) VALUES ($1, $2, $3, $4, $5)"),
                &[
                    &e.name,
                    &e.ca_pem,
                    &e.fingerprint_sha256,
                    &e.created_unix,
                    &e.revoked_unix,
                ],
            )
            .await?;
            notify(&tx, &payload).await?;
            tx.commit().await
        });
        match result {
            Err(err) if is_unique_violation(&err) => Err(StoreError::Conflict {
                what: "entity",
                name: e.name.clone(),
            }),
            other => other,
        }
    }

    async fn revoke_entity(&self, name: &str, when_unix: i64) -> Result<Entity, StoreError> {
        let payload = self.payload("entities", None);
        let row = with_client!(self, |c| async {
            let tx = c.transaction().await?;
            let row = tx
                .query_opt(
                    &format!(
                        "UPDATE entities SET revoked_unix = COALESCE(revoked_unix, $2)
                         WHERE name = $1 RETURNING {ENTITY_COLUMNS}"
                    ),
                    &[&name, &when_unix],
                )
                .await?;
            if row.is_some() {
                notify(&tx, &payload).await?;
            }
            tx.commit().await?;
            Ok(row)
        })?;
        let row = row.ok_or_else(|| StoreError::NotFound {
            what: "entity",
            name: name.to_owned(),
        })?;
        entity_row(&row).map_err(|e| StoreError::Corrupt {
            what: "entity",
            detail: e.to_string(),
        })
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
        let result = with_client!(self, |c| c.execute(
            "INSERT INTO tokens (id, info_json, secret_sha256) VALUES ($1, $2, $3)",
            &[&t.info.id, &info_json, &t.secret_sha256]
        ));
        match result {
            Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict {
                what: "token",
                name: t.info.id.clone(),
            }),
            other => other.map(|_| ()),
        }
    }

    async fn revoke_token(&self, id: &str) -> Result<TokenInfo, StoreError> {
        // Read, change and write in one transaction, the row locked meanwhile.
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
            let mut token = match token_from_row(&row) {
                Ok(t) => t,
                Err(e) => return Ok(Err(e)),
            };
            token.info.revoked = true;
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

    async fn policy(&self) -> Result<Option<Policy>, StoreError> {
        let row = with_client!(self, |c| c
            .query_opt("SELECT policy_json FROM policy WHERE id = 1", &[]))?;
        match row {
            None => Ok(None),
            Some(row) => {
                let json: String = row.try_get(0).map_err(|e| StoreError::Corrupt {
                    what: "policy",
                    detail: e.to_string(),
                })?;
                from_json("policy", &json).map(Some)
            }
        }
    }

    async fn set_policy(&self, policy: &Policy) -> Result<(), StoreError> {
        let json = to_json("policy", policy)?;
        let payload = self.payload("policy", None);
        with_client!(self, |c| async {
            let tx = c.transaction().await?;
            tx.execute(
                "INSERT INTO policy (id, policy_json) VALUES (1, $1)
                 ON CONFLICT (id) DO UPDATE SET policy_json = EXCLUDED.policy_json",
                &[&json],
            )
            .await?;
            notify(&tx, &payload).await?;
            tx.commit().await
        })
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
        row.try_get(0).map_err(|e| StoreError::Corrupt {
            what: "session key",
            detail: e.to_string(),
        })
    }

    async fn instances(&self) -> Result<Vec<StoredInstance>, StoreError> {
        let rows = with_client!(self, |c| c.query(
            &format!("SELECT {INSTANCE_COLUMNS} FROM instances ORDER BY proxy_id"),
            &[]
        ))?;
        instances_from(&rows)
    }

    async fn instances_by_id(&self, ids: &[String]) -> Result<Vec<StoredInstance>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = with_client!(self, |c| c.query(
            &format!("SELECT {INSTANCE_COLUMNS} FROM instances WHERE proxy_id = ANY($1)"),
            &[&ids]
        ))?;
        instances_from(&rows)
    }

    async fn write_instances(
        &self,
        writes: &[InstanceWrite],
    ) -> Result<Vec<WriteOutcome>, StoreError> {
        let me = self.replica.clone();
        with_client!(self, |c| async {
            let tx = c.transaction().await?;
            let claim = tx
                .prepare(
                    "INSERT INTO instances (proxy_id, record_json, owner, connected, started_ms)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (proxy_id) DO UPDATE SET record_json = EXCLUDED.record_json,
                         owner = EXCLUDED.owner, connected = EXCLUDED.connected,
                         started_ms = EXCLUDED.started_ms
                     WHERE instances.started_ms <= EXCLUDED.started_ms",
                )
                .await?;
            let remove = tx
                .prepare(
                    "DELETE FROM instances WHERE proxy_id = $1 AND owner = $2 AND started_ms = $3",
                )
                .await?;
            let mut outcomes = Vec::with_capacity(writes.len());
            for w in writes {
                let changed = match w {
                    InstanceWrite::Claim(i) => {
                        tx.execute(
                            &claim,
                            &[
                                &i.proxy_id,
                                &i.record_json,
                                &i.owner,
                                &i.connected,
                                &i.started_ms,
                            ],
                        )
                        .await?
                    }
                    InstanceWrite::Remove {
                        proxy_id,
                        owner,
                        started_ms,
                    } => tx.execute(&remove, &[proxy_id, owner, started_ms]).await?,
                };
                let result = outcome(&tx, changed, w.proxy_id()).await?;
                if result == WriteOutcome::Applied {
                    let payload = format!("instance {me} {}", w.proxy_id());
                    notify(&tx, &payload).await?;
                }
                outcomes.push(result);
            }
            tx.commit().await?;
            Ok(outcomes)
        })
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
        rows.iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()
            .map_err(|e| StoreError::Corrupt {
                what: "replica",
                detail: e.to_string(),
            })
    }
}

fn token_from_row(row: &Row) -> Result<StoredToken, StoreError> {
    let corrupt = |e: tokio_postgres::Error| StoreError::Corrupt {
        what: "token",
        detail: e.to_string(),
    };
    let info_json: String = row.try_get(0).map_err(corrupt)?;
    Ok(StoredToken {
        info: from_json("token", &info_json)?,
        secret_sha256: row.try_get(1).map_err(corrupt)?,
    })
}

fn instances_from(rows: &[Row]) -> Result<Vec<StoredInstance>, StoreError> {
    rows.iter()
        .map(instance_row)
        .collect::<Result<_, _>>()
        .map_err(|e| StoreError::Corrupt {
            what: "instance",
            detail: e.to_string(),
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

    #[test]
    fn notifications_from_this_replica_are_skipped() {
        assert_eq!(parse_payload("policy r1", "r1"), None);
        assert_eq!(parse_payload("policy r2", "r1"), Some(Change::Policy));
        assert_eq!(
            parse_payload("instance r2 proxy with spaces", "r1"),
            Some(Change::Instance("proxy with spaces".into()))
        );
        assert_eq!(parse_payload("entities r2", "r1"), Some(Change::Entities));
        assert_eq!(parse_payload("instance r2", "r1"), None);
        assert_eq!(parse_payload("future r2 x", "r1"), None);
        assert_eq!(parse_payload("", "r1"), None);
    }
}
