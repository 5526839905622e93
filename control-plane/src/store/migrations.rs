//! Versioned schema migrations, one list per backend. Each store applies the versions it lacks,
//! in order, when it opens, and records them in `schema_migrations`; a store whose schema is
//! newer than this binary knows is refused (run the newer binary).
//!
//! Add a migration by appending to both lists with the next version: never edit one that has
//! shipped. SQLite's first version adopts stores made before migrations existed (its statements
//! are `IF NOT EXISTS`); PostgreSQL's starts in the current shape.

/// One schema change.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Its version: 1, 2, … with no gaps.
    pub version: i64,
    /// What it does, recorded beside the version.
    pub name: &'static str,
    /// The statements.
    pub sql: &'static str,
    /// Columns added after the statements, each only when the table lacks it (SQLite cannot say
    /// `ADD COLUMN IF NOT EXISTS`, and stores made before migrations may have some already):
    /// (table, column, declaration).
    pub add_columns: &'static [(&'static str, &'static str, &'static str)],
}

/// The table that records applied versions (same shape on both backends).
pub const VERSIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    version BIGINT PRIMARY KEY,
    name TEXT NOT NULL,
    applied_unix BIGINT NOT NULL
)";

/// SQLite.
pub const SQLITE: &[Migration] = &[
    Migration {
        version: 1,
        name: "ca, entities, tokens, instances, session key, policy, settings, revocations",
        sql: "
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
CREATE TABLE IF NOT EXISTS settings (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    settings_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS revocations (
    id TEXT PRIMARY KEY,
    identity TEXT UNIQUE,
    serial TEXT UNIQUE,
    reason TEXT,
    created_unix INTEGER NOT NULL
);
",
        add_columns: &[("entities", "trust_domain", "TEXT")],
    },
    Migration {
        version: 2,
        name: "instance owners; sealed CA key",
        sql: "",
        add_columns: &[
            ("instances", "owner", "TEXT NOT NULL DEFAULT ''"),
            ("instances", "connected", "INTEGER NOT NULL DEFAULT 0"),
            ("instances", "started_ms", "INTEGER NOT NULL DEFAULT 0"),
            ("ca", "key_sealed", "BLOB"),
        ],
    },
];

/// PostgreSQL. Secrets are `bytea` and sealed; the CA key has no plaintext column at all.
pub const POSTGRES: &[Migration] = &[Migration {
    version: 1,
    name: "ca (sealed key), entities, tokens, revocations, instances with owners, replicas, session key, policy, settings",
    sql: "
CREATE TABLE ca (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    cert_pem TEXT NOT NULL,
    key_sealed BYTEA NOT NULL,
    root_pem TEXT
);
CREATE TABLE entities (
    name TEXT PRIMARY KEY,
    ca_pem TEXT NOT NULL,
    fingerprint_sha256 TEXT NOT NULL,
    created_unix BIGINT NOT NULL,
    revoked_unix BIGINT,
    trust_domain TEXT
);
CREATE TABLE revocations (
    id TEXT PRIMARY KEY,
    identity TEXT UNIQUE,
    serial TEXT UNIQUE,
    reason TEXT,
    created_unix BIGINT NOT NULL
);
CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    info_json TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    created_seq BIGSERIAL NOT NULL
);
CREATE TABLE instances (
    proxy_id TEXT PRIMARY KEY,
    record_json TEXT NOT NULL,
    owner TEXT NOT NULL,
    connected BOOLEAN NOT NULL,
    started_ms BIGINT NOT NULL
);
CREATE TABLE replicas (
    id TEXT PRIMARY KEY,
    renewed_at TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE mesh_secret (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    session_key BYTEA NOT NULL
);
CREATE TABLE policy (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    policy_json TEXT NOT NULL
);
CREATE TABLE settings (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    settings_json TEXT NOT NULL
);
",
    add_columns: &[],
}];

/// The versions in `list` that `applied` lacks, in order; an error when the store is ahead of
/// this binary.
pub fn pending<'a>(list: &'a [Migration], applied: &[i64]) -> Result<Vec<&'a Migration>, String> {
    let known = list.last().map_or(0, |m| m.version);
    if let Some(newest) = applied.iter().copied().max()
        && newest > known
    {
        return Err(format!(
            "the schema is at version {newest}, newer than this capmesh-control-plane knows \
             ({known}): run the version that last migrated it, or a newer one"
        ));
    }
    Ok(list
        .iter()
        .filter(|m| !applied.contains(&m.version))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_count_up_from_one_without_gaps() {
        for list in [SQLITE, POSTGRES] {
            for (i, m) in list.iter().enumerate() {
                assert_eq!(m.version, i as i64 + 1, "{}", m.name);
            }
        }
    }

    #[test]
    fn pending_lists_what_is_missing_and_refuses_a_newer_store() {
        let names: Vec<i64> = pending(SQLITE, &[1])
            .unwrap()
            .iter()
            .map(|m| m.version)
            .collect();
        assert_eq!(names, vec![2]);
        assert!(pending(SQLITE, &[1, 2]).unwrap().is_empty());
        let err = pending(SQLITE, &[1, 2, 99]).unwrap_err();
        assert!(err.contains("version 99") && err.contains("newer"), "{err}");
    }
}
