//! The store, the same tests against both backends: SQLite in a temporary file and a real
//! PostgreSQL (Debian's package, started by the test harness). Then what only PostgreSQL does:
//! notifications between replicas, and failing with "unavailable" while the server is down.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use capmesh_api::rest::{Entity, Revocation, TokenInfo};
use capmesh_api::{MeshSettings, Namespace, Policy};
use capmesh_control_plane::store::follow::Followed;
use capmesh_control_plane::store::{
    Backend, Change, InstanceWrite, PgStore, Purpose, SqliteStore, Store, StoreError, StoreKey,
    StoredCa, StoredInstance, StoredKey, StoredToken, WriteOutcome,
};
use capmesh_tests::postgres::Postgres;

/// A store to test, and how to open it again (a restart).
struct Subject {
    store: Backend,
    reopen: Box<dyn Fn() -> Backend>,
    _keep: Option<tempfile::TempDir>,
    _pg: Option<Postgres>,
}

fn sqlite() -> Subject {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("capmesh.db");
    let open = move || Backend::Sqlite(SqliteStore::open(&path).unwrap());
    Subject {
        store: open(),
        reopen: Box::new(open),
        _keep: Some(dir),
        _pg: None,
    }
}

async fn postgres() -> Subject {
    let pg = Postgres::start().unwrap();
    let url = pg.url();
    let store = Backend::Postgres(Box::new(PgStore::open(&url, "r1").await.unwrap()));
    let handle = tokio::runtime::Handle::current();
    let reopen = move || {
        let url = url.clone();
        let store = std::thread::scope(|s| {
            s.spawn(|| handle.block_on(PgStore::open(&url, "r1")))
                .join()
                .unwrap()
        });
        Backend::Postgres(Box::new(store.unwrap()))
    };
    Subject {
        store,
        reopen: Box::new(reopen),
        _keep: None,
        _pg: Some(pg),
    }
}

fn key() -> StoreKey {
    StoreKey::from_bytes(&[42; 32]).unwrap()
}

fn entity(name: &str, created: i64) -> Entity {
    Entity {
        name: name.into(),
        ca_pem: "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n".into(),
        fingerprint_sha256: format!("fp-{name}"),
        created_unix: created,
        revoked_unix: None,
        trust_domain: Some(format!("{name}.example").parse().unwrap()),
    }
}

fn token(id: &str) -> StoredToken {
    StoredToken {
        info: TokenInfo {
            id: id.into(),
            namespace: Namespace::new("default").unwrap(),
            agent_pattern: "weather-*".into(),
            expires_unix: 2_000_000_000,
            revoked: false,
            uses: Some(2),
            used: 0,
            description: Some(format!("token {id}")),
        },
        secret_sha256: format!("sha-{id}"),
    }
}

fn instance(id: &str, owner: &str, started_ms: i64) -> StoredInstance {
    StoredInstance {
        proxy_id: id.into(),
        record_json: format!(r#"{{"owner":"{owner}","started":{started_ms}}}"#),
        owner: owner.into(),
        connected: true,
        started_ms,
    }
}

/// Everything the control plane keeps, kept: the same expectations for every backend.
async fn conformance(subject: Subject) {
    let s = &subject.store;

    // The CA: none at first, then the one inserted (key sealed), never replaced.
    assert_eq!(s.ca().await.unwrap(), None);
    let sealed = key().seal(Purpose::CaKey, b"the CA key").unwrap();
    let ca = StoredCa {
        cert_pem: "cert".into(),
        key: StoredKey::Sealed(sealed.clone()),
        root_pem: None,
    };
    s.insert_ca(&ca).await.unwrap();
    assert_eq!(s.ca().await.unwrap(), Some(ca.clone()));
    let again = s
        .insert_ca(&StoredCa {
            cert_pem: "other".into(),
            ..ca.clone()
        })
        .await
        .unwrap_err();
    assert!(matches!(again, StoreError::Conflict { .. }), "{again}");
    let StoredKey::Sealed(stored) = s.ca().await.unwrap().unwrap().key else {
        panic!("the key came back unsealed");
    };
    assert_eq!(key().open(Purpose::CaKey, &stored).unwrap(), b"the CA key");

    // Entities: oldest first, names unique (revoked ones too), revocation keeps its first time.
    s.insert_entity(&entity("b-partner", 20)).await.unwrap();
    s.insert_entity(&entity("a-partner", 10)).await.unwrap();
    let dup = s.insert_entity(&entity("a-partner", 30)).await.unwrap_err();
    assert!(
        matches!(dup, StoreError::Conflict { what: "entity", .. }),
        "{dup}"
    );
    let names: Vec<String> = s
        .entities()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["a-partner", "b-partner"]);
    assert_eq!(
        s.entities().await.unwrap()[0].trust_domain,
        Some("a-partner.example".parse().unwrap()),
        "an entity keeps its trust domain"
    );
    assert_eq!(
        s.revoke_entity("a-partner", 100)
            .await
            .unwrap()
            .revoked_unix,
        Some(100)
    );
    assert_eq!(
        s.revoke_entity("a-partner", 200)
            .await
            .unwrap()
            .revoked_unix,
        Some(100)
    );
    let missing = s.revoke_entity("nobody", 1).await.unwrap_err();
    assert!(matches!(missing, StoreError::NotFound { .. }), "{missing}");
    let dup = s.insert_entity(&entity("a-partner", 40)).await.unwrap_err();
    assert!(
        matches!(dup, StoreError::Conflict { .. }),
        "revoked names stay taken"
    );

    // Bootstrap tokens: newest first, revocable, ids unique.
    s.insert_token(&token("t1")).await.unwrap();
    s.insert_token(&token("t2")).await.unwrap();
    let ids: Vec<String> = s
        .tokens()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.info.id)
        .collect();
    assert_eq!(ids, ["t2", "t1"]);
    assert_eq!(s.token("t1").await.unwrap(), Some(token("t1")));
    assert_eq!(s.token("nope").await.unwrap(), None);
    assert!(s.revoke_token("t1").await.unwrap().revoked);
    assert!(s.token("t1").await.unwrap().unwrap().info.revoked);
    assert!(!s.token("t2").await.unwrap().unwrap().info.revoked);
    assert!(matches!(
        s.revoke_token("nope").await.unwrap_err(),
        StoreError::NotFound { .. }
    ));
    assert!(matches!(
        s.insert_token(&token("t2")).await.unwrap_err(),
        StoreError::Conflict { .. }
    ));
    // Uses are counted one at a time and stop at the limit.
    assert_eq!(s.use_token("t2").await.unwrap().used, 1);
    assert_eq!(s.use_token("t2").await.unwrap().used, 2);
    let spent = s.use_token("t2").await.unwrap_err();
    assert!(
        matches!(spent, StoreError::Exhausted { uses: 2, .. }),
        "{spent}"
    );
    assert_eq!(s.token("t2").await.unwrap().unwrap().info.used, 2);
    assert!(matches!(
        s.use_token("nope").await.unwrap_err(),
        StoreError::NotFound { .. }
    ));

    // Revocations: one per identity or serial, lifted by id.
    let weather = Revocation {
        id: "r1".into(),
        identity: Some("spiffe://capmesh.local/ns/default/agent/weather".into()),
        serial: None,
        reason: Some("leaked key".into()),
        created_unix: 10,
    };
    let serial = Revocation {
        id: "r2".into(),
        identity: None,
        serial: Some("0a1b".into()),
        reason: None,
        created_unix: 20,
    };
    s.insert_revocation(&weather).await.unwrap();
    s.insert_revocation(&serial).await.unwrap();
    let again = s
        .insert_revocation(&Revocation {
            id: "r3".into(),
            ..weather.clone()
        })
        .await
        .unwrap_err();
    assert!(matches!(again, StoreError::Conflict { .. }), "{again}");
    assert_eq!(
        s.revocations().await.unwrap(),
        vec![weather.clone(), serial.clone()]
    );
    assert_eq!(s.remove_revocation("r2").await.unwrap(), serial);
    assert!(matches!(
        s.remove_revocation("r2").await.unwrap_err(),
        StoreError::NotFound { .. }
    ));

    // The policy: none, then replaced whole.
    assert_eq!(s.policy().await.unwrap(), None);
    let mut policy: Policy =
        serde_json::from_value(serde_json::json!({"default": "deny", "rules": []})).unwrap();
    s.set_policy(&policy).await.unwrap();
    assert_eq!(s.policy().await.unwrap(), Some(policy.clone()));
    policy = serde_json::from_value(serde_json::json!({"default": "allow", "rules": []})).unwrap();
    s.set_policy(&policy).await.unwrap();
    assert_eq!(s.policy().await.unwrap(), Some(policy.clone()));

    // The mesh settings: none, then replaced whole, never with the session key.
    assert_eq!(s.settings().await.unwrap(), None);
    let settings = MeshSettings {
        request_timeout_ms: 30_000,
        propagate_headers: vec!["x-tenant-id".into()],
        session_key: "ab".repeat(32),
        ..MeshSettings::default()
    };
    s.set_settings(&settings).await.unwrap();
    let read = s.settings().await.unwrap().unwrap();
    assert_eq!(read.request_timeout_ms, 30_000);
    assert_eq!(read.propagate_headers, ["x-tenant-id"]);
    assert!(read.session_key.is_empty(), "the session key is kept apart");

    // The session key: the first one offered stays.
    assert_eq!(
        s.session_key_or_insert(&[1; 32]).await.unwrap(),
        vec![1; 32]
    );
    assert_eq!(
        s.session_key_or_insert(&[2; 32]).await.unwrap(),
        vec![1; 32]
    );

    // Instances: the newest stream owns the row; only the owner of a stream removes it.
    let outcomes = s
        .write_instances(&[
            InstanceWrite::Claim(instance("p1", "r1", 1_000)),
            InstanceWrite::Claim(instance("p2", "r1", 1_000)),
        ])
        .await
        .unwrap();
    assert_eq!(outcomes, [WriteOutcome::Applied, WriteOutcome::Applied]);
    // p1 reconnects to r2 (a newer stream): r2 owns it; r1's late write for its old stream loses.
    let outcomes = s
        .write_instances(&[
            InstanceWrite::Claim(instance("p1", "r2", 2_000)),
            InstanceWrite::Claim(StoredInstance {
                connected: false,
                ..instance("p1", "r1", 1_000)
            }),
            InstanceWrite::Remove {
                proxy_id: "p1".into(),
                owner: "r1".into(),
                started_ms: 1_000,
            },
            InstanceWrite::Remove {
                proxy_id: "ghost".into(),
                owner: "r1".into(),
                started_ms: 1,
            },
        ])
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        [
            WriteOutcome::Applied,
            WriteOutcome::NotOurs,
            WriteOutcome::NotOurs,
            WriteOutcome::Missing
        ]
    );
    let all = s.instances().await.unwrap();
    assert_eq!(
        all,
        vec![instance("p1", "r2", 2_000), instance("p2", "r1", 1_000)]
    );
    // The same stream writes again (health changed, then disconnected): its row follows.
    let ended = StoredInstance {
        connected: false,
        record_json: "{\"healthy\":false}".into(),
        ..instance("p2", "r1", 1_000)
    };
    assert_eq!(
        s.write_instances(&[InstanceWrite::Claim(ended.clone())])
            .await
            .unwrap(),
        [WriteOutcome::Applied]
    );
    let some = s
        .instances_by_id(&["p2".into(), "nope".into()])
        .await
        .unwrap();
    assert_eq!(some, vec![ended]);
    assert_eq!(
        s.write_instances(&[InstanceWrite::Remove {
            proxy_id: "p2".into(),
            owner: "r1".into(),
            started_ms: 1_000,
        }])
        .await
        .unwrap(),
        [WriteOutcome::Applied]
    );
    assert_eq!(
        s.instances().await.unwrap(),
        vec![instance("p1", "r2", 2_000)]
    );

    // A restart finds everything as it was (and migrations are not applied twice).
    let s = (subject.reopen)();
    assert_eq!(s.ca().await.unwrap(), Some(ca));
    assert_eq!(s.entities().await.unwrap().len(), 2);
    assert_eq!(s.tokens().await.unwrap().len(), 2);
    assert_eq!(s.token("t2").await.unwrap().unwrap().info.used, 2);
    assert_eq!(s.revocations().await.unwrap(), vec![weather]);
    assert_eq!(s.policy().await.unwrap(), Some(policy));
    assert_eq!(
        s.session_key_or_insert(&[3; 32]).await.unwrap(),
        vec![1; 32]
    );
    assert_eq!(
        s.instances().await.unwrap(),
        vec![instance("p1", "r2", 2_000)]
    );
}

#[tokio::test]
async fn sqlite_store_keeps_everything() {
    conformance(sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_keeps_everything() {
    conformance(postgres().await).await;
}

#[tokio::test]
async fn sqlite_keeps_a_plaintext_ca_key_until_a_store_key_seals_it() {
    let subject = sqlite();
    let s = &subject.store;
    s.insert_ca(&StoredCa {
        cert_pem: "cert".into(),
        key: StoredKey::Plain("PEM".into()),
        root_pem: Some("root".into()),
    })
    .await
    .unwrap();
    assert_eq!(
        s.ca().await.unwrap().unwrap().key,
        StoredKey::Plain("PEM".into())
    );
    let sealed = key().seal(Purpose::CaKey, b"PEM").unwrap();
    s.seal_ca_key(&sealed).await.unwrap();
    assert_eq!(
        s.ca().await.unwrap().unwrap().key,
        StoredKey::Sealed(sealed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_refuses_a_plaintext_ca_key_and_a_newer_schema() {
    let pg = Postgres::start().unwrap();
    let s = PgStore::open(&pg.url(), "r1").await.unwrap();
    let err = s
        .insert_ca(&StoredCa {
            cert_pem: "cert".into(),
            key: StoredKey::Plain("-----BEGIN PRIVATE KEY-----".into()),
            root_pem: None,
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("--store-key-file"), "{err}");
    assert_eq!(s.ca().await.unwrap(), None, "nothing was stored");

    // Replicas starting together migrate once (the migration lock), and agree.
    let url = pg.url();
    let opened = futures_join(
        (0..4)
            .map(|i| {
                let url = url.clone();
                tokio::spawn(async move { PgStore::open(&url, &format!("r{i}")).await })
            })
            .collect(),
    )
    .await;
    assert!(opened.iter().all(Result::is_ok), "{opened:?}");

    // A schema from a newer capmesh is refused with what to do.
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .execute(
            "INSERT INTO schema_migrations (version, name, applied_unix) VALUES (99, 'future', 0)",
            &[],
        )
        .await
        .unwrap();
    let err = PgStore::open(&url, "r9").await.unwrap_err().to_string();
    assert!(err.contains("version 99") && err.contains("newer"), "{err}");
}

async fn futures_join<T>(handles: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

async fn next_change(rx: &mut tokio::sync::mpsc::Receiver<Followed>) -> Followed {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a notification within 10 s")
        .expect("the follower is running")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_tells_the_other_replicas_and_only_them() {
    let pg = Postgres::start().unwrap();
    let r1 = PgStore::open(&pg.url(), "r1").await.unwrap();
    let r2 = PgStore::open(&pg.url(), "r2").await.unwrap();
    let mut heard_by_r1 = r1.follow();
    assert_eq!(next_change(&mut heard_by_r1).await, Followed::Resync);

    // r1's own change is not reported back to r1; r2's changes are, in commit order.
    r1.set_policy(&Policy::default()).await.unwrap();
    r2.set_policy(&Policy::default()).await.unwrap();
    r2.set_settings(&MeshSettings::default()).await.unwrap();
    r2.insert_entity(&entity("partner", 1)).await.unwrap();
    r2.revoke_entity("partner", 2).await.unwrap();
    r2.insert_revocation(&Revocation {
        id: "rv".into(),
        identity: Some("spiffe://capmesh.local/ns/default/agent/x".into()),
        serial: None,
        reason: None,
        created_unix: 1,
    })
    .await
    .unwrap();
    r2.write_instances(&[
        InstanceWrite::Claim(instance("proxy with spaces", "r2", 5)),
        InstanceWrite::Remove {
            proxy_id: "absent".into(),
            owner: "r2".into(),
            started_ms: 1,
        },
    ])
    .await
    .unwrap();
    assert_eq!(
        next_change(&mut heard_by_r1).await,
        Followed::Change(Change::Policy)
    );
    assert_eq!(
        next_change(&mut heard_by_r1).await,
        Followed::Change(Change::Settings)
    );
    assert_eq!(
        next_change(&mut heard_by_r1).await,
        Followed::Change(Change::Entities)
    );
    assert_eq!(
        next_change(&mut heard_by_r1).await,
        Followed::Change(Change::Entities)
    );
    assert_eq!(
        next_change(&mut heard_by_r1).await,
        Followed::Change(Change::Revocations)
    );
    assert_eq!(
        next_change(&mut heard_by_r1).await,
        Followed::Change(Change::Instance("proxy with spaces".into())),
        "a write that changed nothing is not announced"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), heard_by_r1.recv())
            .await
            .is_err(),
        "nothing else was announced"
    );

    // Leases: both replicas live; one that stops renewing lapses.
    let live = r1.heartbeat("r1", Duration::from_secs(30)).await.unwrap();
    assert_eq!(live, ["r1"]);
    let live = r2
        .heartbeat("r2", Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(live, ["r1", "r2"]);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let live = r1.heartbeat("r1", Duration::from_secs(30)).await.unwrap();
    assert_eq!(live, ["r1"], "r2's lease lapsed");

    // The database goes away: calls fail as "unavailable" (not a hang, not a panic), the
    // follower says so; it comes back: calls work again and the follower resyncs.
    pg.stop().unwrap();
    let err = r1.policy().await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    assert!(
        err.to_string().contains("PostgreSQL at 127.0.0.1:"),
        "{err}"
    );
    assert!(!err.to_string().contains("capmesh-test-password"), "{err}");
    assert!(matches!(
        next_change(&mut heard_by_r1).await,
        Followed::Lost(_)
    ));
    pg.start_again().unwrap();
    let mut resynced = false;
    for _ in 0..50 {
        match next_change(&mut heard_by_r1).await {
            Followed::Resync => {
                resynced = true;
                break;
            }
            Followed::Lost(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(resynced, "the follower reconnected");
    assert_eq!(r1.policy().await.unwrap(), Some(Policy::default()));
    r2.set_policy(&Policy::default()).await.unwrap();
    assert_eq!(
        next_change(&mut heard_by_r1).await,
        Followed::Change(Change::Policy)
    );
}
