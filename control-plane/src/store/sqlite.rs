//! The SQLite store: one file in the data dir, embedded, zero set-up, one process.
//!
//! Calls are short local transactions made while holding the connection's lock; they never wait
//! on the network, so they run inline on the async caller.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use capmesh_api::rest::{Entity, Revocation, TokenInfo};
use capmesh_api::{MeshSettings, Policy};
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde::de::DeserializeOwned;

use super::migrations::{self, Migration};
use super::{
    ColumnValue, Columns, ENTITY_COLUMNS, INSTANCE_COLUMNS, InstanceWrite, REVOCATION_COLUMNS,
    Store, StoreError, StoredCa, StoredInstance, StoredKey, StoredToken, WriteOutcome, entity_row,
    from_json, instance_row, or_conflict, revocation_row, revoked_subject, spend, stored_settings,
    to_json,
};

/// SQLite in the data dir.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut conn = Connection::open(path)?;
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")?;
        migrate(&mut conn, migrations::SQLITE)?;
        Ok(Self {
            conn: Mutex::new(conn),
            path: path.to_owned(),
        })
    }

    /// `SQLite at <path>`.
    pub fn describe(&self) -> String {
        format!("SQLite at {}", self.path.display())
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        // A poisoned lock only means another thread panicked mid-call; SQLite's own
        // transactions keep the data consistent, so carry on.
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn)
    }

    /// Runs one statement on its own; returns how many rows it changed.
    fn execute(&self, sql: &str, params: impl rusqlite::Params) -> Result<usize, StoreError> {
        self.with(|c| Ok(c.execute(sql, params)?))
    }

    /// The JSON value in column 0 of the one row `sql` selects (a table of one row, `id = 1`),
    /// parsed as `what`; `None` when there is no row.
    fn singleton_json<T: DeserializeOwned>(
        &self,
        what: &'static str,
        sql: &str,
    ) -> Result<Option<T>, StoreError> {
        self.with(|c| {
            let json: Option<String> = c.query_row(sql, [], |r| r.get(0)).optional()?;
            json.map(|j| from_json(what, &j)).transpose()
        })
    }

    /// Reads token `id`, changes it with `change` and writes it back, in one transaction;
    /// returns it as it is now.
    fn update_token(
        &self,
        id: &str,
        change: impl FnOnce(StoredToken) -> Result<StoredToken, StoreError>,
    ) -> Result<TokenInfo, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let row = tx
                .query_row(
                    "SELECT info_json, secret_sha256 FROM tokens WHERE id = ?1",
                    params![id],
                    token_row,
                )
                .optional()?
                .ok_or_else(|| StoreError::NotFound {
                    what: "token",
                    name: id.to_owned(),
                })?;
            let token = change(parse_token(row)?)?;
            let info_json = to_json("token", &token.info)?;
            tx.execute(
                "UPDATE tokens SET info_json = ?2 WHERE id = ?1",
                params![id, info_json],
            )?;
            tx.commit()?;
            Ok(token.info)
        })
    }
}

impl Columns for rusqlite::Row<'_> {
    type Error = rusqlite::Error;

    fn column<T: ColumnValue>(&self, i: usize) -> rusqlite::Result<T> {
        self.get(i)
    }
}

fn migrate(conn: &mut Connection, list: &[Migration]) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    tx.execute_batch(migrations::VERSIONS_TABLE)?;
    let applied: Vec<i64> = tx
        .prepare("SELECT version FROM schema_migrations")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for m in migrations::pending(list, &applied).map_err(StoreError::Schema)? {
        let failed = |e: rusqlite::Error| {
            StoreError::Schema(format!("migration {} ({}) failed: {e}", m.version, m.name))
        };
        tx.execute_batch(m.sql).map_err(failed)?;
        for (table, column, decl) in m.add_columns {
            let present = tx
                .prepare(&format!(
                    "SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"
                ))
                .and_then(|mut q| q.exists(params![column]))
                .map_err(failed)?;
            if !present {
                tx.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))
                    .map_err(failed)?;
            }
        }
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_unix) VALUES (?1, ?2, ?3)",
            params![m.version, m.name, crate::ca::unix_now()],
        )?;
        tracing::info!(version = m.version, name = m.name, "store migrated");
    }
    tx.commit()?;
    Ok(())
}

fn token_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<(String, String)> {
    Ok((row.get(0)?, row.get(1)?))
}

fn parse_token((info_json, secret_sha256): (String, String)) -> Result<StoredToken, StoreError> {
    Ok(StoredToken {
        info: from_json("token", &info_json)?,
        secret_sha256,
    })
}

/// Applied when a row changed; otherwise whether the row exists (owned by someone else) or not.
fn outcome(tx: &Transaction<'_>, changed: usize, proxy_id: &str) -> rusqlite::Result<WriteOutcome> {
    if changed > 0 {
        return Ok(WriteOutcome::Applied);
    }
    let exists = tx
        .query_row(
            "SELECT 1 FROM instances WHERE proxy_id = ?1",
            params![proxy_id],
            |_| Ok(()),
        )
        .optional()?
        .is_some();
    Ok(if exists {
        WriteOutcome::NotOurs
    } else {
        WriteOutcome::Missing
    })
}

impl Store for SqliteStore {
    async fn session_key_or_insert(&self, fresh: &[u8]) -> Result<Vec<u8>, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT OR IGNORE INTO mesh_secret (id, session_key) VALUES (1, ?1)",
                params![fresh],
            )?;
            let key: Vec<u8> = tx.query_row(
                "SELECT session_key FROM mesh_secret WHERE id = 1",
                [],
                |r| r.get(0),
            )?;
            tx.commit()?;
            Ok(key)
        })
    }

    async fn ca(&self) -> Result<Option<StoredCa>, StoreError> {
        self.with(|c| {
            Ok(c.query_row(
                "SELECT cert_pem, key_pem, key_sealed, root_pem FROM ca WHERE id = 1",
                [],
                |r| {
                    let sealed: Option<Vec<u8>> = r.get(2)?;
                    Ok(StoredCa {
                        cert_pem: r.get(0)?,
                        key: match sealed {
                            Some(s) => StoredKey::Sealed(s),
                            None => StoredKey::Plain(r.get(1)?),
                        },
                        root_pem: r.get(3)?,
                    })
                },
            )
            .optional()?)
        })
    }

    async fn insert_ca(&self, ca: &StoredCa) -> Result<(), StoreError> {
        let (plain, sealed) = match &ca.key {
            StoredKey::Plain(pem) => (pem.as_str(), None),
            StoredKey::Sealed(bytes) => ("", Some(bytes.as_slice())),
        };
        let inserted = self.execute(
            "INSERT INTO ca (id, cert_pem, key_pem, key_sealed, root_pem) VALUES (1, ?1, ?2, ?3, ?4)",
            params![ca.cert_pem, plain, sealed, ca.root_pem],
        );
        or_conflict(inserted, "CA", || "mesh CA".into()).map(|_| ())
    }

    async fn seal_ca_key(&self, sealed: &[u8]) -> Result<(), StoreError> {
        let changed = self.execute(
            "UPDATE ca SET key_pem = '', key_sealed = ?1 WHERE id = 1",
            params![sealed],
        )?;
        if changed == 0 {
            return Err(StoreError::no_ca());
        }
        Ok(())
    }

    async fn entities(&self) -> Result<Vec<Entity>, StoreError> {
        self.with(|c| {
            Ok(all(
                c,
                &format!("SELECT {ENTITY_COLUMNS} FROM entities ORDER BY created_unix, name"),
                |r| entity_row(r),
            )?)
        })
    }

    async fn insert_entity(&self, e: &Entity) -> Result<(), StoreError> {
        let inserted = self.execute(
            &format!("INSERT INTO entities ({ENTITY_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"),
            params![
                e.name,
                e.ca_pem,
                e.fingerprint_sha256,
                e.created_unix,
                e.revoked_unix,
                e.trust_domain.as_ref().map(|td| td.as_str())
            ],
        );
        or_conflict(inserted, "entity", || e.name.clone()).map(|_| ())
    }

    async fn revoke_entity(&self, name: &str, when_unix: i64) -> Result<Entity, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "UPDATE entities SET revoked_unix = COALESCE(revoked_unix, ?2) WHERE name = ?1",
                params![name, when_unix],
            )?;
            let entity = tx
                .query_row(
                    &format!("SELECT {ENTITY_COLUMNS} FROM entities WHERE name = ?1"),
                    params![name],
                    |r| entity_row(r),
                )
                .optional()?
                .ok_or_else(|| StoreError::NotFound {
                    what: "entity",
                    name: name.to_owned(),
                })?;
            tx.commit()?;
            Ok(entity)
        })
    }

    async fn tokens(&self) -> Result<Vec<StoredToken>, StoreError> {
        self.with(|c| {
            let mut stmt =
                c.prepare("SELECT info_json, secret_sha256 FROM tokens ORDER BY created_seq DESC")?;
            let rows = stmt
                .query_map([], token_row)?
                .collect::<Result<Vec<_>, _>>()?;
            rows.into_iter().map(parse_token).collect()
        })
    }

    async fn token(&self, id: &str) -> Result<Option<StoredToken>, StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT info_json, secret_sha256 FROM tokens WHERE id = ?1",
                params![id],
                token_row,
            )
            .optional()?
            .map(parse_token)
            .transpose()
        })
    }

    async fn insert_token(&self, t: &StoredToken) -> Result<(), StoreError> {
        let info_json = to_json("token", &t.info)?;
        let inserted = self.execute(
            "INSERT INTO tokens (id, info_json, secret_sha256, created_seq)
             VALUES (?1, ?2, ?3, (SELECT COALESCE(MAX(created_seq), 0) + 1 FROM tokens))",
            params![t.info.id, info_json, t.secret_sha256],
        );
        or_conflict(inserted, "token", || t.info.id.clone()).map(|_| ())
    }

    async fn revoke_token(&self, id: &str) -> Result<TokenInfo, StoreError> {
        self.update_token(id, |mut token| {
            token.info.revoked = true;
            Ok(token)
        })
    }

    async fn use_token(&self, id: &str) -> Result<TokenInfo, StoreError> {
        self.update_token(id, |token| spend(token, id))
    }

    async fn revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        self.with(|c| {
            Ok(all(
                c,
                &format!("SELECT {REVOCATION_COLUMNS} FROM revocations ORDER BY created_unix, id"),
                |r| revocation_row(r),
            )?)
        })
    }

    async fn insert_revocation(&self, r: &Revocation) -> Result<(), StoreError> {
        let inserted = self.execute(
            &format!("INSERT INTO revocations ({REVOCATION_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5)"),
            params![r.id, r.identity, r.serial, r.reason, r.created_unix],
        );
        or_conflict(inserted, "revocation of", || revoked_subject(r)).map(|_| ())
    }

    async fn remove_revocation(&self, id: &str) -> Result<Revocation, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let found = tx
                .query_row(
                    &format!("SELECT {REVOCATION_COLUMNS} FROM revocations WHERE id = ?1"),
                    params![id],
                    |r| revocation_row(r),
                )
                .optional()?
                .ok_or_else(|| StoreError::NotFound {
                    what: "revocation",
                    name: id.to_owned(),
                })?;
            tx.execute("DELETE FROM revocations WHERE id = ?1", params![id])?;
            tx.commit()?;
            Ok(found)
        })
    }

    async fn policy(&self) -> Result<Option<Policy>, StoreError> {
        self.singleton_json("policy", "SELECT policy_json FROM policy WHERE id = 1")
    }

    async fn set_policy(&self, policy: &Policy) -> Result<(), StoreError> {
        let json = to_json("policy", policy)?;
        self.execute(
            "INSERT INTO policy (id, policy_json) VALUES (1, ?1)
             ON CONFLICT(id) DO UPDATE SET policy_json = excluded.policy_json",
            params![json],
        )
        .map(|_| ())
    }

    async fn settings(&self) -> Result<Option<MeshSettings>, StoreError> {
        self.singleton_json(
            "settings",
            "SELECT settings_json FROM settings WHERE id = 1",
        )
    }

    async fn set_settings(&self, settings: &MeshSettings) -> Result<(), StoreError> {
        let json = stored_settings(settings)?;
        self.execute(
            "INSERT INTO settings (id, settings_json) VALUES (1, ?1)
             ON CONFLICT(id) DO UPDATE SET settings_json = excluded.settings_json",
            params![json],
        )
        .map(|_| ())
    }

    async fn instances(&self) -> Result<Vec<StoredInstance>, StoreError> {
        self.with(|c| {
            Ok(all(
                c,
                &format!("SELECT {INSTANCE_COLUMNS} FROM instances ORDER BY proxy_id"),
                |r| instance_row(r),
            )?)
        })
    }

    async fn instances_by_id(&self, ids: &[String]) -> Result<Vec<StoredInstance>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {INSTANCE_COLUMNS} FROM instances WHERE proxy_id = ?1"
            ))?;
            let mut out = Vec::new();
            for id in ids {
                if let Some(row) = stmt
                    .query_row(params![id], |r| instance_row(r))
                    .optional()?
                {
                    out.push(row);
                }
            }
            Ok(out)
        })
    }

    async fn write_instances(
        &self,
        writes: &[InstanceWrite],
    ) -> Result<Vec<WriteOutcome>, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let mut outcomes = Vec::with_capacity(writes.len());
            for w in writes {
                let changed = match w {
                    InstanceWrite::Claim(i) => tx.execute(
                        "INSERT INTO instances (proxy_id, record_json, owner, connected, started_ms)
                         VALUES (?1, ?2, ?3, ?4, ?5)
                         ON CONFLICT(proxy_id) DO UPDATE SET record_json = excluded.record_json,
                             owner = excluded.owner, connected = excluded.connected,
                             started_ms = excluded.started_ms
                         WHERE instances.started_ms <= excluded.started_ms",
                        params![i.proxy_id, i.record_json, i.owner, i.connected, i.started_ms],
                    )?,
                    InstanceWrite::Remove {
                        proxy_id,
                        owner,
                        started_ms,
                    } => tx.execute(
                        "DELETE FROM instances WHERE proxy_id = ?1 AND owner = ?2 AND started_ms = ?3",
                        params![proxy_id, owner, started_ms],
                    )?,
                };
                outcomes.push(outcome(&tx, changed, w.proxy_id())?);
            }
            tx.commit()?;
            Ok(outcomes)
        })
    }

    async fn heartbeat(&self, replica: &str, _lease: Duration) -> Result<Vec<String>, StoreError> {
        Ok(vec![replica.to_owned()])
    }
}

/// Every row of a query without parameters, each read by `row`.
fn all<T>(
    c: &Connection,
    sql: &str,
    row: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<Vec<T>> {
    c.prepare(sql)?.query_map([], row)?.collect()
}
