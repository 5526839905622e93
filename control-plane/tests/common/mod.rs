//! What the control plane's end-to-end tests share: the registrations test proxies send,
//! connecting a test proxy for an agent, reading a snapshot by capability, and an outside
//! organisation (acme) registered as an entity, with a certificate for its partner agent.

#![allow(dead_code, clippy::unwrap_used)]

use std::time::Duration;

use capmesh_api::rest::{Entity, EntityRequest};
use capmesh_api::{Capability, Endpoint, Registration, Snapshot, ToolSpec};
use capmesh_certs::{Ca, Credential, SpiffeId};
use capmesh_client::ControlPlaneClient;
use capmesh_tests::{ControlPlane, TestProxy, issue_workload};

/// How long a test waits for the control plane to tell a stream something.
pub const WAIT: Duration = Duration::from_secs(10);

/// A provider's registration: one tool (`fn_<capability>`) for `capability`, at `endpoint`.
pub fn provider(endpoint: &str, capability: &str) -> Registration {
    Registration {
        endpoint: endpoint.into(),
        tags: vec!["fast".parse().unwrap()],
        version: Some("1.2.0".parse().unwrap()),
        tools: vec![ToolSpec {
            function: format!("fn_{capability}"),
            capability: Capability::new(capability).unwrap(),
            version: None,
            tags: vec![],
            description: Some(format!("provides {capability}")),
            input_schema: Some(serde_json::json!({"type": "object"})),
        }],
        dependencies: vec![],
    }
}

/// A consumer's registration: no tools, the dependencies `deps` (`"*"` for all).
pub fn consumer(deps: &[&str]) -> Registration {
    Registration {
        endpoint: "127.0.0.1:1".into(),
        tags: vec![],
        version: None,
        tools: vec![],
        dependencies: deps.iter().map(|d| d.parse().unwrap()).collect(),
    }
}

/// The endpoints in `s` that serve `capability`.
pub fn endpoints_of<'a>(s: &'a Snapshot, capability: &str) -> Vec<&'a Endpoint> {
    s.endpoints
        .iter()
        .filter(|e| e.capability.as_str() == capability)
        .collect()
}

/// The instances (proxy ids) in `s` that serve `capability`, sorted.
pub fn instances_of(s: &Snapshot, capability: &str) -> Vec<String> {
    let mut ids: Vec<String> = endpoints_of(s, capability)
        .iter()
        .map(|e| e.instance.clone())
        .collect();
    ids.sort();
    ids
}

/// A stream client for agent `default/<agent>`, with a certificate bootstrapped from `cp`.
pub async fn stream_client(cp: &ControlPlane, agent: &str) -> ControlPlaneClient {
    cp.stream_client(cp.credential("default", agent).await.unwrap())
        .unwrap()
}

/// Test proxy `proxy_id` of agent `default/<agent>` on `client`, once its first snapshot
/// arrived.
pub async fn connect_on(
    client: &ControlPlaneClient,
    agent: &str,
    proxy_id: &str,
    registration: Registration,
) -> TestProxy {
    let mut proxy = TestProxy::connect(client, "default", agent, proxy_id, registration)
        .await
        .unwrap();
    proxy.until(WAIT, "first snapshot", |_| true).await.unwrap();
    proxy
}

/// Test proxy `proxy_id` of agent `default/<agent>` streaming from `cp` with a certificate of
/// its own, once its first snapshot arrived.
pub async fn connect(
    cp: &ControlPlane,
    agent: &str,
    proxy_id: &str,
    registration: Registration,
) -> TestProxy {
    connect_on(
        &stream_client(cp, agent).await,
        agent,
        proxy_id,
        registration,
    )
    .await
}

/// Registers acme, an outside organisation (trust domain `acme.example`, a CA of its own), as
/// entity "acme" through `cp`; returns acme's CA.
pub async fn register_acme(cp: &ControlPlane, admin_token: &str) -> Ca {
    let acme = Ca::generate("acme.example".parse().unwrap(), false).unwrap();
    let entity: Entity = cp
        .rest()
        .unwrap()
        .post(
            "/v1/entities",
            &EntityRequest {
                name: "acme".into(),
                trust_domain: "acme.example".parse().unwrap(),
                ca_pem: acme.root_pem().into(),
            },
            Some(admin_token),
        )
        .await
        .unwrap();
    assert_eq!(entity.name, "acme");
    acme
}

/// A certificate for acme's agent `partner` (`spiffe://acme.example/ns/default/agent/partner`),
/// issued by acme's own CA.
pub fn partner_credential(acme: &Ca) -> Credential {
    let who: SpiffeId = "spiffe://acme.example/ns/default/agent/partner"
        .parse()
        .unwrap();
    let (chain, key) = issue_workload(acme, &who, Duration::from_secs(3600)).unwrap();
    Credential::with_key(&chain, &key).unwrap()
}
