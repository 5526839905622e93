//! Durable state: the CA, entities, bootstrap tokens, revocations and the policy. Live connection state
//! (which proxies are connected, their endpoints) is in memory, in `registry`.
//!
//! Behind the [`Store`] trait so PostgreSQL can join SQLite for several replicas.

use std::path::Path;
use std::sync::Mutex;

use capmesh_api::rest::{Entity, Revocation, TokenInfo};
use capmesh_api::{MeshSettings, Policy, TrustDomain};
use rusqlite::{Connection, OptionalExtension, params};

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
    /// The database failed.
    #[error("store: {0}")]
    Db(#[from] rusqlite::Error),
    /// A bootstrap token has been used as often as it may be.
    #[error("bootstrap token {id:?} has been used {uses} time(s), all it may be")]
    Exhausted {
        /// The token's id.
        id: String,
        /// Its use limit.
        uses: u32,
    },
    /// A stored value no longer parses (written by a newer version?).
    #[error("store: stored {what} is unreadable: {detail}")]
    Corrupt {
        /// What was being read.
        what: &'static str,
        /// The parser's complaint.
        detail: String,
    },
}

/// The CA as stored: the signing certificate and key, and the root when the signer is an
/// intermediate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCa {
    /// Signing certificate, PEM.
    pub cert_pem: String,
    /// Signing key, PEM.
    pub key_pem: String,
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

/// Durable control-plane state. Every method is one transaction: nothing is half-applied.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// The CA, if one was created or loaded before.
    fn ca(&self) -> Result<Option<StoredCa>, StoreError>;
    /// Saves the CA; refuses to replace an existing one.
    fn insert_ca(&self, ca: &StoredCa) -> Result<(), StoreError>;
    /// Every entity, revoked ones included, oldest first.
    fn entities(&self) -> Result<Vec<Entity>, StoreError>;
    /// Registers an entity; refuses a name already used (even by a revoked entity).
    fn insert_entity(&self, entity: &Entity) -> Result<(), StoreError>;
    /// Marks an entity revoked at `when_unix`; returns it as it is now.
    fn revoke_entity(&self, name: &str, when_unix: i64) -> Result<Entity, StoreError>;
    /// Every bootstrap token, newest first.
    fn tokens(&self) -> Result<Vec<StoredToken>, StoreError>;
    /// One token by id.
    fn token(&self, id: &str) -> Result<Option<StoredToken>, StoreError>;
    /// Saves a new token.
    fn insert_token(&self, token: &StoredToken) -> Result<(), StoreError>;
    /// Revokes a token; returns it as it is now.
    fn revoke_token(&self, id: &str) -> Result<TokenInfo, StoreError>;
    /// Counts one use of a token, atomically: refused with [`StoreError::Exhausted`] when it
    /// has no use left. Returns it as it is now.
    fn use_token(&self, id: &str) -> Result<TokenInfo, StoreError>;
    /// Every revocation in force, oldest first.
    fn revocations(&self) -> Result<Vec<Revocation>, StoreError>;
    /// Saves a revocation; refuses one for an identity or serial already revoked.
    fn insert_revocation(&self, revocation: &Revocation) -> Result<(), StoreError>;
    /// Lifts (deletes) a revocation; returns what it was.
    fn remove_revocation(&self, id: &str) -> Result<Revocation, StoreError>;
    /// The authorization policy, if one was ever set.
    fn policy(&self) -> Result<Option<Policy>, StoreError>;
    /// Replaces the authorization policy.
    fn set_policy(&self, policy: &Policy) -> Result<(), StoreError>;
    /// The mesh settings, if they were ever set (the session key is not among them).
    fn settings(&self) -> Result<Option<MeshSettings>, StoreError>;
    /// Replaces the mesh settings (their session key is not stored here).
    fn set_settings(&self, settings: &MeshSettings) -> Result<(), StoreError>;
    /// Every persisted proxy instance: (proxy id, JSON record).
    fn instances(&self) -> Result<Vec<(String, String)>, StoreError>;
    /// Saves (or replaces) a proxy instance's record.
    fn upsert_instance(&self, proxy_id: &str, record_json: &str) -> Result<(), StoreError>;
    /// Forgets a withdrawn proxy instance.
    fn remove_instance(&self, proxy_id: &str) -> Result<(), StoreError>;
    /// The mesh's session-sealing key: the one stored, or `fresh` stored now when there is
    /// none yet (so it is created once and kept across restarts).
    fn session_key_or_insert(&self, fresh: &[u8]) -> Result<Vec<u8>, StoreError>;
}

/// SQLite in the data dir: embedded, zero set-up, one file.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS ca (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    cert_pem TEXT NOT NULL,
    key_pem TEXT NOT NULL,
    root_pem TEXT
);
CREATE TABLE IF NOT EXISTS entities (
    name TEXT PRIMARY KEY,
    ca_pem TEXT NOT NULL,
    fingerprint_sha256 TEXT NOT NULL,
    created_unix INTEGER NOT NULL,
    revoked_unix INTEGER
);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    info_json TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    created_seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
    proxy_id TEXT PRIMARY KEY,
    record_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS mesh_secret (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    session_key BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS policy (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    policy_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS revocations (
    id TEXT PRIMARY KEY,
    identity TEXT UNIQUE,
    serial TEXT UNIQUE,
    reason TEXT,
    created_unix INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    settings_json TEXT NOT NULL
);
";

/// Columns added after a table was first created: (table, column, declaration). Each is added
/// when missing, so an older data dir opens unchanged otherwise.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[("entities", "trust_domain", "TEXT")];

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")?;
        conn.execute_batch(SCHEMA)?;
        for (table, column, decl) in ADDED_COLUMNS {
            let present: bool = conn
                .prepare(&format!(
                    "SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"
                ))?
                .exists(params![column])?;
            if !present {
                conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
            }
        }
        Ok(Self {
            conn: Mutex::new(conn),
        })
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
}

const ENTITY_COLUMNS: &str =
    "name, ca_pem, fingerprint_sha256, created_unix, revoked_unix, trust_domain";

fn entity_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Entity> {
    let trust_domain: Option<String> = row.get(5)?;
    Ok(Entity {
        name: row.get(0)?,
        ca_pem: row.get(1)?,
        fingerprint_sha256: row.get(2)?,
        created_unix: row.get(3)?,
        revoked_unix: row.get(4)?,
        // An unreadable trust domain trusts nothing, like a missing one (fail closed).
        trust_domain: trust_domain.and_then(|td| TrustDomain::new(td).ok()),
    })
}

const REVOCATION_COLUMNS: &str = "id, identity, serial, reason, created_unix";

fn revocation_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Revocation> {
    Ok(Revocation {
        id: row.get(0)?,
        identity: row.get(1)?,
        serial: row.get(2)?,
        reason: row.get(3)?,
        created_unix: row.get(4)?,
    })
}

fn token_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<(String, String)> {
    Ok((row.get(0)?, row.get(1)?))
}

fn parse_token((info_json, secret_sha256): (String, String)) -> Result<StoredToken, StoreError> {
    let info = serde_json::from_str(&info_json).map_err(|e| StoreError::Corrupt {
        what: "token",
        detail: e.to_string(),
    })?;
    Ok(StoredToken {
        info,
        secret_sha256,
    })
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation
    )
}

impl Store for SqliteStore {
    fn session_key_or_insert(&self, fresh: &[u8]) -> Result<Vec<u8>, StoreError> {
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

    fn ca(&self) -> Result<Option<StoredCa>, StoreError> {
        self.with(|c| {
            Ok(c.query_row(
                "SELECT cert_pem, key_pem, root_pem FROM ca WHERE id = 1",
                [],
                |r| {
                    Ok(StoredCa {
                        cert_pem: r.get(0)?,
                        key_pem: r.get(1)?,
                        root_pem: r.get(2)?,
                    })
                },
            )
            .optional()?)
        })
    }

    fn insert_ca(&self, ca: &StoredCa) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO ca (id, cert_pem, key_pem, root_pem) VALUES (1, ?1, ?2, ?3)",
                params![ca.cert_pem, ca.key_pem, ca.root_pem],
            )
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::Conflict {
                        what: "CA",
                        name: "mesh CA".into(),
                    }
                } else {
                    e.into()
                }
            })?;
            Ok(())
        })
    }

    fn entities(&self) -> Result<Vec<Entity>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {ENTITY_COLUMNS} FROM entities ORDER BY created_unix, name"
            ))?;
            let rows = stmt
                .query_map([], entity_row)?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn insert_entity(&self, e: &Entity) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                &format!("INSERT INTO entities ({ENTITY_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"),
                params![
                    e.name,
                    e.ca_pem,
                    e.fingerprint_sha256,
                    e.created_unix,
                    e.revoked_unix,
                    e.trust_domain.as_ref().map(|td| td.as_str())
                ],
            )
            .map_err(|err| {
                if is_unique_violation(&err) {
                    StoreError::Conflict {
                        what: "entity",
                        name: e.name.clone(),
                    }
                } else {
                    err.into()
                }
            })?;
            Ok(())
        })
    }

    fn revoke_entity(&self, name: &str, when_unix: i64) -> Result<Entity, StoreError> {
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
                    entity_row,
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

    fn tokens(&self) -> Result<Vec<StoredToken>, StoreError> {
        self.with(|c| {
            let mut stmt =
                c.prepare("SELECT info_json, secret_sha256 FROM tokens ORDER BY created_seq DESC")?;
            let rows = stmt
                .query_map([], token_row)?
                .collect::<Result<Vec<_>, _>>()?;
            rows.into_iter().map(parse_token).collect()
        })
    }

    fn token(&self, id: &str) -> Result<Option<StoredToken>, StoreError> {
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

    fn insert_token(&self, t: &StoredToken) -> Result<(), StoreError> {
        let info_json = serde_json::to_string(&t.info).map_err(|e| StoreError::Corrupt {
            what: "token",
            detail: e.to_string(),
        })?;
        self.with(|c| {
            c.execute(
                "INSERT INTO tokens (id, info_json, secret_sha256, created_seq)
                 VALUES (?1, ?2, ?3, (SELECT COALESCE(MAX(created_seq), 0) + 1 FROM tokens))",
                params![t.info.id, info_json, t.secret_sha256],
            )?;
            Ok(())
        })
    }

    fn revoke_token(&self, id: &str) -> Result<TokenInfo, StoreError> {
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
            let mut token = parse_token(row)?;
            token.info.revoked = true;
            let info_json =
                serde_json::to_string(&token.info).map_err(|e| StoreError::Corrupt {
                    what: "token",
                    detail: e.to_string(),
                })?;
            tx.execute(
                "UPDATE tokens SET info_json = ?2 WHERE id = ?1",
                params![id, info_json],
            )?;
            tx.commit()?;
            Ok(token.info)
        })
    }

    fn use_token(&self, id: &str) -> Result<TokenInfo, StoreError> {
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
            let mut token = parse_token(row)?;
            if let Some(uses) = token.info.uses
                && token.info.used >= uses
            {
                return Err(StoreError::Exhausted {
                    id: id.to_owned(),
                    uses,
                });
            }
            token.info.used = token.info.used.saturating_add(1);
            let info_json =
                serde_json::to_string(&token.info).map_err(|e| StoreError::Corrupt {
                    what: "token",
                    detail: e.to_string(),
                })?;
            tx.execute(
                "UPDATE tokens SET info_json = ?2 WHERE id = ?1",
                params![id, info_json],
            )?;
            tx.commit()?;
            Ok(token.info)
        })
    }

    fn revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {REVOCATION_COLUMNS} FROM revocations ORDER BY created_unix, id"
            ))?;
            let rows = stmt
                .query_map([], revocation_row)?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn insert_revocation(&self, r: &Revocation) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                &format!(
                    "INSERT INTO revocations ({REVOCATION_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5)"
                ),
                params![r.id, r.identity, r.serial, r.reason, r.created_unix],
            )
            .map_err(|err| {
                if is_unique_violation(&err) {
                    StoreError::Conflict {
                        what: "revocation of",
                        name: r.identity.clone().or(r.serial.clone()).unwrap_or_default(),
                    }
                } else {
                    err.into()
                }
            })?;
            Ok(())
        })
    }

    fn remove_revocation(&self, id: &str) -> Result<Revocation, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let found = tx
                .query_row(
                    &format!("SELECT {REVOCATION_COLUMNS} FROM revocations WHERE id = ?1"),
                    params![id],
                    revocation_row,
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

    fn policy(&self) -> Result<Option<Policy>, StoreError> {
        self.with(|c| {
            let json: Option<String> = c
                .query_row("SELECT policy_json FROM policy WHERE id = 1", [], |r| {
                    r.get(0)
                })
                .optional()?;
            json.map(|j| {
                serde_json::from_str(&j).map_err(|e| StoreError::Corrupt {
                    what: "policy",
                    detail: e.to_string(),
                })
            })
            .transpose()
        })
    }

    fn set_policy(&self, policy: &Policy) -> Result<(), StoreError> {
        let json = serde_json::to_string(policy).map_err(|e| StoreError::Corrupt {
            what: "policy",
            detail: e.to_string(),
        })?;
        self.with(|c| {
            c.execute(
                "INSERT INTO policy (id, policy_json) VALUES (1, ?1)
                 ON CONFLICT(id) DO UPDATE SET policy_json = excluded.policy_json",
                params![json],
            )?;
            Ok(())
        })
    }

    fn settings(&self) -> Result<Option<MeshSettings>, StoreError> {
        self.with(|c| {
            let json: Option<String> = c
                .query_row("SELECT settings_json FROM settings WHERE id = 1", [], |r| {
                    r.get(0)
                })
                .optional()?;
            json.map(|j| {
                serde_json::from_str(&j).map_err(|e| StoreError::Corrupt {
                    what: "settings",
                    detail: e.to_string(),
                })
            })
            .transpose()
        })
    }

    fn set_settings(&self, settings: &MeshSettings) -> Result<(), StoreError> {
        let stored = MeshSettings {
            session_key: String::new(),
            ..settings.clone()
        };
        let json = serde_json::to_string(&stored).map_err(|e| StoreError::Corrupt {
            what: "settings",
            detail: e.to_string(),
        })?;
        self.with(|c| {
            c.execute(
                "INSERT INTO settings (id, settings_json) VALUES (1, ?1)
                 ON CONFLICT(id) DO UPDATE SET settings_json = excluded.settings_json",
                params![json],
            )?;
            Ok(())
        })
    }

    fn instances(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.with(|c| {
            let mut stmt =
                c.prepare("SELECT proxy_id, record_json FROM instances ORDER BY proxy_id")?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn upsert_instance(&self, proxy_id: &str, record_json: &str) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO instances (proxy_id, record_json) VALUES (?1, ?2)
                 ON CONFLICT(proxy_id) DO UPDATE SET record_json = excluded.record_json",
                params![proxy_id, record_json],
            )?;
            Ok(())
        })
    }

    fn remove_instance(&self, proxy_id: &str) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "DELETE FROM instances WHERE proxy_id = ?1",
                params![proxy_id],
            )?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_session_key_is_created_once_and_kept_across_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("capmesh.db");
        let first = SqliteStore::open(&path)
            .unwrap()
            .session_key_or_insert(&[1; 32])
            .unwrap();
        assert_eq!(first, vec![1; 32]);
        let again = SqliteStore::open(&path)
            .unwrap()
            .session_key_or_insert(&[2; 32])
            .unwrap();
        assert_eq!(again, vec![1; 32], "a restart must keep the key");
    }

    #[test]
    fn token_uses_are_counted_atomically_and_revocations_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("capmesh.db");
        let store = SqliteStore::open(&path).unwrap();
        store
            .insert_token(&StoredToken {
                info: TokenInfo {
                    id: "t1".into(),
                    namespace: capmesh_api::Namespace::new("default").unwrap(),
                    agent_pattern: "weather".into(),
                    expires_unix: i64::MAX,
                    revoked: false,
                    uses: Some(1),
                    used: 0,
                    description: None,
                },
                secret_sha256: "x".into(),
            })
            .unwrap();
        assert_eq!(store.use_token("t1").unwrap().used, 1);
        let err = store.use_token("t1").unwrap_err();
        assert!(
            matches!(err, StoreError::Exhausted { uses: 1, .. }),
            "{err}"
        );
        let revocation = Revocation {
            id: "r1".into(),
            identity: Some("spiffe://capmesh.local/ns/default/agent/weather".into()),
            serial: None,
            reason: None,
            created_unix: 1,
        };
        store.insert_revocation(&revocation).unwrap();
        let twice = Revocation {
            id: "r2".into(),
            ..revocation.clone()
        };
        assert!(matches!(
            store.insert_revocation(&twice),
            Err(StoreError::Conflict { .. })
        ));
        drop(store);
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.revocations().unwrap(), vec![revocation.clone()]);
        assert_eq!(store.remove_revocation("r1").unwrap(), revocation);
        assert!(store.revocations().unwrap().is_empty());
    }

    #[test]
    fn settings_are_kept_across_reopens_without_the_session_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("capmesh.db");
        assert_eq!(SqliteStore::open(&path).unwrap().settings().unwrap(), None);
        let set = MeshSettings {
            request_timeout_ms: 30_000,
            propagate_headers: vec!["x-tenant-id".into()],
            session_key: "ab".repeat(32),
            ..MeshSettings::default()
        };
        SqliteStore::open(&path)
            .unwrap()
            .set_settings(&set)
            .unwrap();
        let read = SqliteStore::open(&path)
            .unwrap()
            .settings()
            .unwrap()
            .unwrap();
        assert_eq!(read.request_timeout_ms, 30_000);
        assert_eq!(read.propagate_headers, ["x-tenant-id"]);
        assert!(
            read.session_key.is_empty(),
            "the session key lives in its own table"
        );
    }
}
