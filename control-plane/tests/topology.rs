//! The control plane as a proxy sees it: the real binary over real TLS, test proxies speaking
//! the topology stream.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use capmesh_api::rest::{Entity, EntityRequest, ErrorBody, TokenInfo};
use capmesh_api::{Policy, ProxyFrame, Snapshot};
use capmesh_certs::{Credential, WorkloadKey};
use capmesh_client::ClientError;
use capmesh_tests::{ControlPlane, TestProxy, spiffe};
use common::{
    WAIT, connect, connect_on, consumer, endpoints_of, partner_credential, provider, register_acme,
    stream_client,
};

async fn control_plane() -> ControlPlane {
    ControlPlane::start(
        env!("CARGO_BIN_EXE_capmesh-control-plane").as_ref(),
        &["--grace", "2s"],
    )
    .await
    .unwrap()
}

/// The weather endpoints in `s`.
fn weather(s: &Snapshot) -> Vec<&capmesh_api::Endpoint> {
    endpoints_of(s, "weather")
}

#[tokio::test]
async fn consumer_gets_snapshot_then_deltas_as_the_provider_comes_and_goes() {
    let cp = control_plane().await;
    let mut consumer = connect(&cp, "planner", "planner-1", consumer(&["weather"])).await;
    consumer
        .until(WAIT, "first snapshot", |s| s.endpoints.is_empty())
        .await
        .unwrap();

    // The provider registers: the consumer learns its endpoint, healthy once it reports health.
    let provider_proxy = connect(
        &cp,
        "weather",
        "weather-1",
        provider("127.0.0.1:15006", "weather"),
    )
    .await;
    consumer
        .until(WAIT, "healthy weather endpoint", |s| {
            weather(s).iter().any(|e| e.healthy)
        })
        .await
        .unwrap();
    let snap = consumer.snapshot.clone().unwrap();
    let ep = weather(&snap)[0];
    assert_eq!(
        ep.identity,
        spiffe("default", "weather").unwrap().to_string()
    );
    assert_eq!(ep.function, "fn_weather");
    assert_eq!(ep.address, "127.0.0.1:15006");
    assert_eq!(ep.version.as_ref().unwrap().to_string(), "1.2.0");
    assert!(
        snap.known_capabilities
            .iter()
            .any(|c| c.as_str() == "weather")
    );

    // It turns unhealthy: the consumer sees it, and the capability stays known.
    provider_proxy
        .tx
        .send(&ProxyFrame::Health {
            healthy: false,
            detail: Some("agent down".into()),
        })
        .await
        .unwrap();
    consumer
        .until(WAIT, "unhealthy weather endpoint", |s| {
            weather(s).iter().all(|e| !e.healthy) && !weather(s).is_empty()
        })
        .await
        .unwrap();

    // It re-registers with a second tool; a capability the consumer does not depend on is
    // not sent, but becomes known.
    let mut more = provider("127.0.0.1:15006", "weather");
    more.tools
        .extend(provider("127.0.0.1:15006", "forecast").tools);
    provider_proxy
        .tx
        .send(&ProxyFrame::Register(more))
        .await
        .unwrap();
    consumer
        .until(WAIT, "forecast known", |s| {
            s.known_capabilities
                .iter()
                .any(|c| c.as_str() == "forecast")
        })
        .await
        .unwrap();
    assert!(
        consumer
            .snapshot
            .as_ref()
            .unwrap()
            .endpoints
            .iter()
            .all(|e| e.capability.as_str() == "weather")
    );

    // The REST API agrees.
    let token = cp.admin_token().unwrap();
    let agents: Vec<capmesh_api::rest::AgentInfo> = cp
        .rest()
        .unwrap()
        .get("/v1/agents", Some(&token))
        .await
        .unwrap();
    let names: Vec<&str> = agents.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["planner", "weather"]);
    let caps: Vec<capmesh_api::rest::CapabilityInfo> = cp
        .rest()
        .unwrap()
        .get("/v1/capabilities", Some(&token))
        .await
        .unwrap();
    assert_eq!(caps.len(), 2);

    // The provider's stream drops without goodbye: its endpoint stays through the grace
    // period, then is withdrawn.
    drop(provider_proxy);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = consumer.step(Duration::from_millis(100)).await;
    assert!(
        !weather(consumer.snapshot.as_ref().unwrap()).is_empty(),
        "withdrawn before the grace period ended"
    );
    consumer
        .until(WAIT, "weather withdrawn after the grace period", |s| {
            weather(s).is_empty() && s.known_capabilities.is_empty()
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn goodbye_withdraws_at_once() {
    let cp = ControlPlane::start(
        env!("CARGO_BIN_EXE_capmesh-control-plane").as_ref(),
        &["--grace", "60s"],
    )
    .await
    .unwrap();
    let mut consumer = connect(&cp, "planner", "p-1", consumer(&["*"])).await;
    let provider_proxy = connect(&cp, "weather", "w-1", provider("127.0.0.1:2", "weather")).await;
    consumer
        .until(WAIT, "weather appears", |s| !weather(s).is_empty())
        .await
        .unwrap();
    provider_proxy.tx.send(&ProxyFrame::Goodbye).await.unwrap();
    // With a 60 s grace period, only goodbye can explain a withdrawal within 10 s.
    consumer
        .until(WAIT, "weather withdrawn on goodbye", |s| {
            weather(s).is_empty()
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn hello_claiming_another_agent_is_refused() {
    let cp = control_plane().await;
    let as_planner = stream_client(&cp, "planner").await;
    let err = TestProxy::connect(
        &as_planner,
        "default",
        "weather",
        "x-1",
        provider("127.0.0.1:3", "weather"),
    )
    .await
    .unwrap_err();
    match err.downcast_ref::<ClientError>() {
        Some(ClientError::Api {
            status: 403,
            detail,
            ..
        }) => {
            assert!(
                detail.contains("default/weather") && detail.contains("agent/planner"),
                "{detail}"
            );
        }
        other => panic!("expected a 403, got {other:?} ({err})"),
    }
    let metrics = cp.admin_get("/metrics").await.unwrap();
    assert!(
        metrics.contains("capmesh_cp_refusals_total{reason=\"identity_mismatch\"} 1"),
        "{metrics}"
    );
    assert!(
        cp.log().contains("claims another agent"),
        "the refusal is logged with both identities"
    );
}

#[tokio::test]
async fn revoking_an_entity_closes_its_streams_and_tells_everyone() {
    let cp = control_plane().await;
    let token = cp.admin_token().unwrap();
    let rest = cp.rest().unwrap();

    // An outside organisation's trust domain and CA, registered as an entity, and allowed by
    // a provide rule to offer "quotes".
    let acme = register_acme(&cp, &token).await;
    let policy: Policy = serde_json::from_value(serde_json::json!({
        "provide": [{"capabilities": ["quotes"], "from": ["spiffe://acme.example/*"]}]
    }))
    .unwrap();
    let _: Policy = rest
        .put("/v1/policies", &policy, Some(&token))
        .await
        .unwrap();

    let mut watcher = connect(&cp, "planner", "p-1", consumer(&["*"])).await;
    watcher
        .until(WAIT, "acme in the trust bundle", |s| {
            s.trust.entities.iter().any(|e| e.name == "acme")
        })
        .await
        .unwrap();

    // A partner agent whose certificate comes from acme's CA joins the mesh.
    let partner_client = cp.stream_client(partner_credential(&acme)).unwrap();
    let mut partner = connect_on(
        &partner_client,
        "partner",
        "pa-1",
        provider("127.0.0.1:4", "quotes"),
    )
    .await;
    watcher
        .until(WAIT, "partner's endpoint", |s| {
            s.endpoints
                .iter()
                .any(|e| e.capability.as_str() == "quotes")
        })
        .await
        .unwrap();

    let revoked: Entity = rest
        .delete("/v1/entities/acme", Some(&token))
        .await
        .unwrap();
    assert!(revoked.revoked_unix.is_some());

    let errors = partner.until_end(WAIT).await.unwrap();
    assert!(
        errors.iter().any(
            |(code, msg)| ["closed", "revoked_entity"].contains(&code.as_str())
                && msg.contains("acme")
        ),
        "partner told why: {errors:?}"
    );
    watcher
        .until(WAIT, "revocation and withdrawal in the next delta", |s| {
            s.trust.revoked_entities == ["acme"]
                && !s
                    .endpoints
                    .iter()
                    .any(|e| e.capability.as_str() == "quotes")
        })
        .await
        .unwrap();

    // The partner cannot come back.
    let err = TestProxy::connect(
        &partner_client,
        "default",
        "partner",
        "pa-1",
        provider("127.0.0.1:4", "quotes"),
    )
    .await
    .unwrap_err();
    assert!(err.downcast_ref::<ClientError>().is_some(), "{err:#}");
    let metrics = cp.admin_get("/metrics").await.unwrap();
    assert!(
        metrics.contains("capmesh_cp_refusals_total{reason=\"revoked_entity\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_bad_frame_closes_only_its_own_stream() {
    let cp = control_plane().await;
    let planner = stream_client(&cp, "planner").await;
    let mut good = connect_on(&planner, "planner", "good", consumer(&["*"])).await;
    let mut bad = connect_on(&planner, "planner", "bad", consumer(&["*"])).await;

    bad.tx
        .send_raw(bytes::Bytes::from_static(
            b"{\"type\":\"ack\",\"version\":\"not a number\"}\n",
        ))
        .await
        .unwrap();
    let errors = bad.until_end(WAIT).await.unwrap();
    assert!(
        errors.iter().any(|(code, _)| code == "malformed_frame"),
        "{errors:?}"
    );

    // The other stream is untouched: it still gets deltas.
    let _p = connect(&cp, "weather", "w-1", provider("127.0.0.1:5", "weather")).await;
    good.until(WAIT, "delta after the other stream's failure", |s| {
        !weather(s).is_empty()
    })
    .await
    .unwrap();

    // An oversized frame: an error frame naming the limit, then the stream closes.
    let mut big = connect_on(&planner, "planner", "big", consumer(&["*"])).await;
    let huge = vec![b'x'; capmesh_api::MAX_FRAME_BYTES + 10];
    let _ = big.tx.send_raw(bytes::Bytes::from(huge)).await;
    let errors = big.until_end(WAIT).await.unwrap();
    assert!(
        errors.iter().any(|(code, _)| code == "frame_too_large"),
        "{errors:?}"
    );
}

#[tokio::test]
async fn rest_errors_are_json_with_the_right_status() {
    let cp = control_plane().await;
    let rest = cp.rest().unwrap();
    let token = cp.admin_token().unwrap();
    let status = |e: ClientError| match e {
        ClientError::Api {
            status,
            error,
            detail,
        } => (status, error, detail),
        other => panic!("expected an API error, got {other}"),
    };

    let (code, _, detail) = status(
        rest.get::<Vec<Entity>>("/v1/entities", None)
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 401);
    assert!(detail.contains("admin token"));
    let (code, _, _) = status(
        rest.get::<ErrorBody>("/v1/nothing", Some(&token))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 404);
    let (code, _, detail) = status(
        rest.post::<_, Entity>(
            "/v1/entities",
            &EntityRequest {
                name: "Bad Name".into(),
                trust_domain: "bad.example".parse().unwrap(),
                ca_pem: "x".into(),
            },
            Some(&token),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(code, 400);
    assert!(detail.contains("entity name"), "{detail}");
    let (code, _, _) = status(
        rest.delete::<Entity>("/v1/entities/ghost", Some(&token))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 404);
    let huge =
        serde_json::json!({ "default": "allow", "rules": [], "pad": "x".repeat(2 * 1024 * 1024) });
    let (code, _, _) = status(
        rest.put::<_, Policy>("/v1/policies", &huge, Some(&token))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 413);
    // A bad policy is refused and the old one stays.
    let bad = serde_json::json!({ "default": "maybe", "rules": [] });
    let (code, _, _) = status(
        rest.put::<_, Policy>("/v1/policies", &bad, Some(&token))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 400);
    let policy: Policy = rest.get("/v1/policies", Some(&token)).await.unwrap();
    assert_eq!(policy, Policy::default());
}

#[tokio::test]
async fn restart_keeps_ca_entities_tokens_and_policies() {
    let mut cp = control_plane().await;
    let token = cp.admin_token().unwrap();
    register_acme(&cp, &token).await;
    let bootstrap = cp.token("default", "weather-*").await.unwrap();
    let policy: Policy = serde_json::from_value(serde_json::json!({
        "default": "deny",
        "rules": [{ "from": ["spiffe://capmesh.local/ns/default/agent/planner"], "capabilities": ["weather"], "action": "allow" }]
    }))
    .unwrap();
    let _: Policy = cp
        .rest()
        .unwrap()
        .put("/v1/policies", &policy, Some(&token))
        .await
        .unwrap();
    let ca_before = cp.ca_pem().unwrap();

    cp.restart().await.unwrap();

    assert_eq!(cp.ca_pem().unwrap(), ca_before, "same CA after restart");
    assert_eq!(cp.admin_token().unwrap(), token);
    let rest = cp.rest().unwrap();
    let entities: Vec<Entity> = rest.get("/v1/entities", Some(&token)).await.unwrap();
    assert_eq!(entities.len(), 1);
    let tokens: Vec<TokenInfo> = rest.get("/v1/tokens", Some(&token)).await.unwrap();
    assert!(tokens.iter().any(|t| bootstrap.contains(&t.id)));
    let got: Policy = rest.get("/v1/policies", Some(&token)).await.unwrap();
    assert_eq!(got, policy);

    // A token made before the restart still bootstraps a certificate, and the agent comes
    // back when its proxy reconnects; its snapshot carries the stored policy.
    let key = WorkloadKey::generate().unwrap();
    let resp: capmesh_api::rest::CertificateResponse = rest
        .post(
            "/v1/certificates",
            &capmesh_api::rest::CertificateRequest {
                csr_pem: key
                    .csr_pem(&spiffe("default", "weather-eu").unwrap())
                    .unwrap(),
                token: Some(bootstrap.clone()),
            },
            None,
        )
        .await
        .unwrap();
    let cred = Credential::with_key(&resp.certificate_chain_pem, &key).unwrap();
    let mut proxy = connect_on(
        &cp.stream_client(cred).unwrap(),
        "weather-eu",
        "w-1",
        provider("127.0.0.1:6", "weather"),
    )
    .await;
    proxy
        .until(WAIT, "stored policy in the snapshot", |s| {
            s.policy == policy
        })
        .await
        .unwrap();

    // The token does not cover other agents.
    let key = WorkloadKey::generate().unwrap();
    let err = rest
        .post::<_, capmesh_api::rest::CertificateResponse>(
            "/v1/certificates",
            &capmesh_api::rest::CertificateRequest {
                csr_pem: key.csr_pem(&spiffe("default", "planner").unwrap()).unwrap(),
                token: Some(bootstrap),
            },
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(403), "{err}");
}

#[tokio::test]
async fn a_restarted_control_plane_serves_known_instances_until_they_reconnect() {
    let mut cp = ControlPlane::start(
        env!("CARGO_BIN_EXE_capmesh-control-plane").as_ref(),
        &["--grace", "2s", "--restart-grace", "3s"],
    )
    .await
    .unwrap();
    let planner_cred = cp.credential("default", "planner").await.unwrap();
    let _provider = connect(&cp, "weather", "w-1", provider("127.0.0.1:7", "weather")).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    cp.restart().await.unwrap();
    // The provider has not reconnected; a consumer that connects first still sees it.
    let mut consumer = connect_on(
        &cp.stream_client(planner_cred).unwrap(),
        "planner",
        "p-1",
        consumer(&["weather"]),
    )
    .await;
    let first = consumer.snapshot.clone().unwrap();
    assert_eq!(
        weather(&first).len(),
        1,
        "the restarted control plane forgot the provider: {first:?}"
    );
    assert!(weather(&first)[0].healthy, "restored with its last health");
    // It never comes back: withdrawn after the restart grace.
    consumer
        .until(WAIT, "withdrawn after the restart grace", |s| {
            weather(s).is_empty()
        })
        .await
        .unwrap();
}
