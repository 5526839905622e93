//! Two replicas of the real control plane on one real PostgreSQL, test proxies speaking the
//! topology stream to either: changes made through one reach streams on the other; instances
//! move between replicas without loss or duplicates; a SIGKILLed replica's instances stay while
//! their proxies reconnect elsewhere; with PostgreSQL down, changes are refused with 503 and
//! streams go on, and everything converges when it is back.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use capmesh_api::rest::{AgentInfo, Entity, TokenCreated, TokenRequest};
use capmesh_api::{Namespace, Policy, ProxyFrame};
use capmesh_client::ClientError;
use capmesh_tests::postgres::Postgres;
use capmesh_tests::{ControlPlane, SharedSecrets, TestProxy};
use common::{
    WAIT, connect, connect_on, consumer, instances_of, partner_credential, provider, register_acme,
};

struct Mesh {
    pg: Postgres,
    _secrets: SharedSecrets,
    a: ControlPlane,
    b: ControlPlane,
}

/// PostgreSQL and two replicas on it, started together on the empty database.
async fn mesh() -> Mesh {
    let pg = Postgres::start().unwrap();
    let secrets = SharedSecrets::new().unwrap();
    let mut flags = secrets.flags(&pg.url());
    flags.extend(["--grace".into(), "2s".into()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let bin = env!("CARGO_BIN_EXE_capmesh-control-plane");
    let (a, b) = tokio::join!(
        ControlPlane::start(bin.as_ref(), &flags),
        ControlPlane::start(bin.as_ref(), &flags)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(
        a.ca_pem().unwrap(),
        b.ca_pem().unwrap(),
        "both replicas serve the one CA, whichever created it"
    );
    Mesh {
        pg,
        _secrets: secrets,
        a,
        b,
    }
}

/// The replica's id, from its metrics.
async fn replica_id(cp: &ControlPlane) -> String {
    let metrics = cp.admin_get("/metrics").await.unwrap();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("capmesh_cp_replica_info{"))
        .unwrap_or_else(|| panic!("no replica id in\n{metrics}"));
    line.split('"').nth(1).unwrap().to_owned()
}

/// The weather provider's proxy, `weather-1`, connected to `cp`.
async fn weather_provider(cp: &ControlPlane) -> TestProxy {
    connect(
        cp,
        "weather",
        "weather-1",
        provider("127.0.0.1:7001", "weather"),
    )
    .await
}

/// Every instance each replica lists: (proxy id, replica holding it), sorted.
async fn listed(cp: &ControlPlane) -> Vec<(String, String)> {
    let agents: Vec<AgentInfo> = cp
        .rest()
        .unwrap()
        .get("/v1/agents", Some(&cp.admin_token().unwrap()))
        .await
        .unwrap();
    let mut out: Vec<(String, String)> = agents
        .iter()
        .flat_map(|a| a.instances.iter())
        .map(|i| (i.proxy_id.clone(), i.replica.clone().unwrap_or_default()))
        .collect();
    out.sort();
    out
}

async fn until_listed(cp: &ControlPlane, want: &[(String, String)], what: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let have = listed(cp).await;
        if have == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: have {have:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `cond` every 50 ms until it holds; fails with `failure` once [`WAIT`] has passed.
async fn eventually<F: Future<Output = bool>>(failure: &str, mut cond: impl FnMut() -> F) {
    let deadline = Instant::now() + WAIT;
    while !cond().await {
        assert!(Instant::now() < deadline, "{failure}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_through_either_replica_reaches_streams_on_the_other() {
    let mesh = mesh().await;
    let (a, b) = (&mesh.a, &mesh.b);
    let (id_a, id_b) = (replica_id(a).await, replica_id(b).await);
    assert_ne!(id_a, id_b);

    // A consumer on A, a provider on B: the consumer is served the provider.
    let mut planner = connect(a, "planner", "planner-1", consumer(&["weather"])).await;
    let started = Instant::now();
    let weather = weather_provider(b).await;
    planner
        .until(WAIT, "the provider on the other replica", |s| {
            s.endpoints
                .iter()
                .any(|e| e.instance == "weather-1" && e.healthy)
        })
        .await
        .unwrap();
    println!(
        "provider on replica B seen healthy by a consumer on replica A after {:?}",
        started.elapsed()
    );
    let want = vec![
        ("planner-1".to_owned(), id_a.clone()),
        ("weather-1".to_owned(), id_b.clone()),
    ];
    until_listed(a, &want, "replica A lists both, each with its replica").await;
    until_listed(b, &want, "replica B lists both, each with its replica").await;

    // A policy replaced through B reaches the stream on A.
    let policy: Policy = serde_json::from_value(serde_json::json!({
        "default": "deny",
        "rules": [{"from": ["spiffe://capmesh.local/ns/default/agent/planner"],
                   "capabilities": ["weather"], "action": "allow"}],
        "provide": [{"capabilities": ["quotes"], "from": ["spiffe://acme.example/*"]}]
    }))
    .unwrap();
    let token = b.admin_token().unwrap();
    let _: Policy = b
        .rest()
        .unwrap()
        .put("/v1/policies", &policy, Some(&token))
        .await
        .unwrap();
    planner
        .until(WAIT, "the policy set through the other replica", |s| {
            s.policy == policy
        })
        .await
        .unwrap();
    let on_a: Policy = a
        .rest()
        .unwrap()
        .get("/v1/policies", Some(&token))
        .await
        .unwrap();
    assert_eq!(on_a, policy);

    // Mesh settings replaced through B reach the stream on A, the session key untouched.
    let key_before = planner
        .snapshot
        .as_ref()
        .unwrap()
        .settings
        .session_key
        .clone();
    assert!(!key_before.is_empty());
    let _: serde_json::Value = b
        .rest()
        .unwrap()
        .put(
            "/v1/settings",
            &serde_json::json!({"request_timeout_ms": 42_000}),
            Some(&token),
        )
        .await
        .unwrap();
    planner
        .until(WAIT, "the settings set through the other replica", |s| {
            s.settings.request_timeout_ms == 42_000 && s.settings.session_key == key_before
        })
        .await
        .unwrap();

    // An entity registered through B is trusted by A; its agent connects to A; revoked through
    // B, its stream on A is closed and every proxy is told.
    let acme = register_acme(b, &token).await;
    planner
        .until(WAIT, "acme trusted", |s| {
            s.trust.entities.iter().any(|e| e.name == "acme")
        })
        .await
        .unwrap();
    let partner_client = a.stream_client(partner_credential(&acme)).unwrap();
    let mut partner = connect_on(
        &partner_client,
        "partner",
        "partner-1",
        provider("127.0.0.1:7002", "quotes"),
    )
    .await;
    // B serves the partner's capability (its provide rule allows it) from A's stream.
    let quotes_on_b = || async {
        b.rest()
            .unwrap()
            .get::<Vec<capmesh_api::rest::CapabilityInfo>>("/v1/capabilities", Some(&token))
            .await
            .unwrap()
            .iter()
            .any(|c| c.capability.as_str() == "quotes")
    };
    eventually("B never served the partner's capability", quotes_on_b).await;
    let _: Entity = b
        .rest()
        .unwrap()
        .delete("/v1/entities/acme", Some(&token))
        .await
        .unwrap();
    let errors = partner.until_end(WAIT).await.unwrap();
    assert!(
        errors
            .iter()
            .any(|(code, msg)| (code == "closed" || code == "revoked_entity")
                && msg.contains("acme")),
        "the partner's stream on A was closed and told why: {errors:?}"
    );
    planner
        .until(WAIT, "the revocation", |s| {
            s.trust.revoked_entities == ["acme"] && instances_of(s, "quotes").is_empty()
        })
        .await
        .unwrap();
    eventually(
        "B still serves the revoked partner's capability",
        || async { !quotes_on_b().await },
    )
    .await;

    // The provider's proxy reconnects to A while B still holds its old stream: the newer stream
    // wins, B closes the old one, and the instance is listed once, as A's.
    let mut weather = weather;
    let _moved = weather_provider(a).await;
    let errors = weather.until_end(WAIT).await.unwrap();
    assert!(
        errors
            .iter()
            .any(|(code, msg)| code == "closed" && msg.contains("newer stream")),
        "the old stream was closed and told why: {errors:?}"
    );
    let want = vec![
        ("planner-1".to_owned(), id_a.clone()),
        ("weather-1".to_owned(), id_a.clone()),
    ];
    until_listed(a, &want, "A holds the moved instance").await;
    until_listed(b, &want, "B lists it as A's, once").await;
    assert_eq!(
        instances_of(planner.snapshot.as_ref().unwrap(), "weather"),
        ["weather-1"]
    );

    // The identity is revoked through B: its stream on A is closed, every proxy is told, and
    // its instance is withdrawn everywhere.
    let mut moved = _moved;
    let _: capmesh_api::rest::Revocation = b
        .rest()
        .unwrap()
        .post(
            "/v1/revocations",
            &serde_json::json!({"identity": "default/weather", "reason": "test"}),
            Some(&token),
        )
        .await
        .unwrap();
    assert!(
        moved.until_end(WAIT).await.is_ok(),
        "the revoked stream on A was closed"
    );
    planner
        .until(WAIT, "the workload revocation", |s| {
            s.trust
                .revoked_identities
                .iter()
                .any(|i| i.ends_with("/ns/default/agent/weather"))
                && instances_of(s, "weather").is_empty()
        })
        .await
        .unwrap();
    until_listed(b, &[("planner-1".to_owned(), id_a)], "B withdrew it too").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_instances_stay_until_their_proxies_reconnect_elsewhere() {
    let mut mesh = mesh().await;
    let id_a = replica_id(&mesh.a).await;
    let mut planner = connect(&mesh.a, "planner", "planner-1", consumer(&["*"])).await;
    let mut weather = weather_provider(&mesh.b).await;
    let flights = connect(
        &mesh.b,
        "flights",
        "flights-1",
        provider("127.0.0.1:7003", "flights"),
    )
    .await;
    planner
        .until(WAIT, "both providers", |s| {
            instances_of(s, "weather") == ["weather-1"]
                && instances_of(s, "flights") == ["flights-1"]
        })
        .await
        .unwrap();

    // Replica B dies. Its proxies' streams break; weather's proxy reconnects to A, flights' never
    // comes back.
    mesh.b.kill();
    let killed = Instant::now();
    assert!(weather.until_end(WAIT).await.is_ok());
    let _weather_again = weather_provider(&mesh.a).await;
    drop(flights);

    // weather never leaves the consumer's snapshot; flights leaves once B's lease lapsed and the
    // grace period passed (5 s + 2 s), not before the lease lapsed.
    let mut flights_gone_after = None;
    while killed.elapsed() < Duration::from_secs(15) {
        planner.step(Duration::from_millis(200)).await.unwrap();
        let s = planner.snapshot.as_ref().unwrap();
        assert_eq!(
            instances_of(s, "weather"),
            ["weather-1"],
            "the reconnected provider was never withdrawn"
        );
        if instances_of(s, "flights").is_empty() {
            flights_gone_after = Some(killed.elapsed());
            break;
        }
    }
    let gone = flights_gone_after.expect("the dead replica's orphan was withdrawn within 15 s");
    assert!(
        gone >= Duration::from_secs(4),
        "kept while a proxy could still reconnect (gone after {gone:?})"
    );
    println!("a dead replica's instance that never reconnected was withdrawn after {gone:?}");

    // B comes back (a new replica id): nothing duplicated, nothing lost.
    mesh.b.start_again().await.unwrap();
    let id_b2 = replica_id(&mesh.b).await;
    let want = vec![
        ("planner-1".to_owned(), id_a.clone()),
        ("weather-1".to_owned(), id_a),
    ];
    until_listed(&mesh.a, &want, "A after B restarted").await;
    until_listed(&mesh.b, &want, "the restarted B").await;
    let mut late = connect(&mesh.b, "planner", "planner-2", consumer(&["weather"])).await;
    late.until(WAIT, "a consumer on the restarted replica", |s| {
        instances_of(s, "weather") == ["weather-1"]
    })
    .await
    .unwrap();
    assert!(!id_b2.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_postgres_is_down_changes_are_refused_and_streams_go_on() {
    let mesh = mesh().await;
    let (a, b) = (&mesh.a, &mesh.b);
    let token = a.admin_token().unwrap();
    let mut planner = connect(a, "planner", "planner-1", consumer(&["*"])).await;
    let weather = weather_provider(b).await;
    planner
        .until(WAIT, "the provider", |s| {
            instances_of(s, "weather") == ["weather-1"]
        })
        .await
        .unwrap();
    // A certificate for a provider that will join during the outage (issuing one needs the
    // bootstrap tokens in the store).
    let flights_cred = a.credential("default", "flights").await.unwrap();

    mesh.pg.stop().unwrap();

    // Changes are refused with 503 and say why and what to do.
    let err = a
        .rest()
        .unwrap()
        .put::<_, Policy>("/v1/policies", &Policy::default(), Some(&token))
        .await
        .unwrap_err();
    match &err {
        ClientError::Api {
            status: 503,
            error,
            detail,
        } => {
            assert_eq!(error, "store_unavailable");
            assert!(
                detail.contains("PostgreSQL at 127.0.0.1:") && detail.contains("retry"),
                "{detail}"
            );
        }
        other => panic!("expected a 503, got {other}"),
    }
    let err = b
        .rest()
        .unwrap()
        .post::<_, TokenCreated>(
            "/v1/tokens",
            &TokenRequest {
                namespace: Namespace::new("default").unwrap(),
                agent_pattern: "x".into(),
                ttl_secs: 60,
                uses: None,
                system: false,
                description: None,
            },
            Some(&token),
        )
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(503), "{err}");

    // Streams go on: a provider joins replica A and the consumer there is told at once;
    // the provider on B reports unhealthy (B cannot tell A yet).
    let _flights = connect_on(
        &a.stream_client(flights_cred).unwrap(),
        "flights",
        "flights-1",
        provider("127.0.0.1:7003", "flights"),
    )
    .await;
    planner
        .until(WAIT, "a provider that joined during the outage", |s| {
            instances_of(s, "flights") == ["flights-1"]
        })
        .await
        .unwrap();
    weather
        .tx
        .send(&ProxyFrame::Health {
            healthy: false,
            detail: None,
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        instances_of(planner.snapshot.as_ref().unwrap(), "weather"),
        ["weather-1"],
        "nothing was withdrawn during the outage"
    );

    // PostgreSQL is back: everything converges, and changes are accepted again.
    mesh.pg.start_again().unwrap();
    let back = Instant::now();
    planner
        .until(WAIT, "the health change made on B during the outage", |s| {
            s.endpoints
                .iter()
                .any(|e| e.instance == "weather-1" && !e.healthy)
        })
        .await
        .unwrap();
    let id_a = replica_id(a).await;
    let id_b = replica_id(b).await;
    let want = vec![
        ("flights-1".to_owned(), id_a.clone()),
        ("planner-1".to_owned(), id_a),
        ("weather-1".to_owned(), id_b),
    ];
    until_listed(b, &want, "B learned of the provider that joined A").await;
    println!("converged {:?} after PostgreSQL came back", back.elapsed());
    let deny: Policy =
        serde_json::from_value(serde_json::json!({"default": "deny", "rules": []})).unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        match b
            .rest()
            .unwrap()
            .put::<_, Policy>("/v1/policies", &deny, Some(&token))
            .await
        {
            Ok(_) => break,
            Err(e) if e.status() == Some(503) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the change was not accepted after the outage: {e}"),
        }
    }
    planner
        .until(WAIT, "a change made after the outage", |s| s.policy == deny)
        .await
        .unwrap();
}
