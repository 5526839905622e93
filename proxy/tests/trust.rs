//! Issue "Trust that holds", end to end: the real control plane and sidecars, real Python MCP
//! agents, an entity whose CA and certificates are made with the openssl command line, curl as
//! the REST client. What an attacker tried (an entity minting admins and mesh identities,
//! squatting a capability, hijacking a proxy id) is refused with a reason; a revoked workload
//! is cut off everywhere within a second, stays revoked across a restart, and comes back when
//! the revocation is lifted.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use capmesh_api::rest::{AgentInfo, Revocation};
use capmesh_api::{AgentName, Hello, Namespace, Node, Policy, ProxyFrame, Registration};
use capmesh_certs::{Credential, CredentialCell, TrustStore};
use capmesh_tests::openssl::{Leaf, OpensslCa};
use capmesh_tests::{ControlPlane, ProxyProcess, spiffe, workspace_bin};
use common::{Mesh, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PARTNER_TD: &str = "partner.example";

/// curl against the control plane's REST API with `leaf` as the client certificate (or the
/// admin token when `leaf` is `None`): (status, body).
fn curl(
    cp: &ControlPlane,
    leaf: Option<&Leaf>,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-s",
        "-S",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        "--max-time",
        "30",
    ])
    .arg("--cacert")
    .arg(cp.data_dir.join("ca.pem"))
    .args(["-X", method, "-H", "content-type: application/json"]);
    match leaf {
        Some(leaf) => {
            cmd.arg("--cert")
                .arg(&leaf.cert)
                .arg("--key")
                .arg(&leaf.key);
        }
        None => {
            cmd.args([
                "-H",
                &format!("authorization: Bearer {}", cp.admin_token().unwrap()),
            ]);
        }
    }
    if !body.is_empty() {
        cmd.args(["--data", body]);
    }
    let out = cmd
        .arg(format!("https://localhost:{}{path}", cp.port))
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    let body = format!("{body}{}", String::from_utf8_lossy(&out.stderr));
    (code.trim().parse().unwrap_or(0), body)
}

/// The first frame of a proxy's stream, for `agent` in namespace default, as proxy `proxy_id`.
fn hello(proxy_id: &str, agent: &str) -> ProxyFrame {
    ProxyFrame::Hello(Hello {
        node: Node {
            proxy_id: proxy_id.into(),
            agent: AgentName::new(agent).unwrap(),
            namespace: Namespace::new("default").unwrap(),
            zone: None,
        },
        registration: Registration {
            endpoint: "127.0.0.1:9".into(),
            tags: vec![],
            version: None,
            tools: vec![],
            dependencies: vec![],
        },
        version: None,
    })
}

async fn register_partner(mesh: &Mesh, ca: &OpensslCa) {
    common::register_entity(mesh, "partner", PARTNER_TD, ca.ca_pem().unwrap()).await;
}

/// A 2026-07-28 `tools/call` of get_weather through a consumer's outbound port: (status, body).
async fn weather_call(consumer: &ProxyProcess) -> (u16, String) {
    let port = consumer.outbound;
    let body = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_weather","arguments":{"city":"Paris"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}"#;
    let (status, _, body) = tokio::task::spawn_blocking(move || {
        common::post_mcp(
            port,
            &[
                ("content-type", "application/json"),
                ("accept", "application/json, text/event-stream"),
                ("mcp-protocol-version", "2026-07-28"),
                ("mcp-method", "tools/call"),
                ("mcp-name", "get_weather"),
            ],
            body,
        )
    })
    .await
    .unwrap();
    (status, body)
}

fn served(call: &(u16, String)) -> bool {
    call.0 == 200 && call.1.contains("sunny in Paris") && !call.1.contains("\"error\"")
}

#[tokio::test]
async fn an_entity_speaks_only_for_its_own_trust_domain() {
    let mesh = Mesh::new().await;
    let (_agent, alpha) = mesh.provider("alpha", &["weather"], &[]).await;
    let partner_ca = OpensslCa::new("partner").unwrap();
    register_partner(&mesh, &partner_ca).await;

    // Admins minted by the entity's CA, in the mesh's, its own and a third trust domain: every
    // mutating endpoint answers 403 and names the rule.
    let mutations = [
        (
            "POST",
            "/v1/tokens",
            r#"{"namespace":"default","agent_pattern":"*","ttl_secs":60}"#,
        ),
        (
            "POST",
            "/v1/entities",
            r#"{"name":"evil","trust_domain":"evil.example","ca_pem":"x"}"#,
        ),
        ("DELETE", "/v1/entities/partner", ""),
        ("PUT", "/v1/policies", r#"{"default":"deny"}"#),
        ("POST", "/v1/revocations", r#"{"identity":"default/alpha"}"#),
        ("DELETE", "/v1/tokens/abc", ""),
    ];
    for domain in ["capmesh.local", PARTNER_TD, "evil.example"] {
        let admin = partner_ca
            .issue(&format!("spiffe://{domain}/ns/capmesh-system/agent/admin"))
            .unwrap();
        for (method, path, body) in mutations {
            let (code, answer) = curl(&mesh.cp, Some(&admin), method, path, body);
            assert_eq!(code, 403, "{domain} admin, {method} {path}: {answer}");
            assert!(
                answer.contains("no longer trusted") || answer.contains("trust domain"),
                "{domain} admin, {method} {path}: {answer}"
            );
        }
    }
    // The mesh's own admin token still works, so the 403s above are the certificate's.
    let (code, _) = curl(&mesh.cp, None, "GET", "/v1/tokens", "");
    assert_eq!(code, 200);

    // An entity-minted mesh identity: refused by the control plane (renewal, stream) and by
    // proxies, naming the trust domain rule.
    let forged = partner_ca
        .issue("spiffe://capmesh.local/ns/default/agent/planner")
        .unwrap();
    let key = capmesh_certs::WorkloadKey::generate().unwrap();
    let csr = key.csr_pem(&spiffe("default", "planner").unwrap()).unwrap();
    let renewal = serde_json::json!({ "csr_pem": csr }).to_string();
    let (code, answer) = curl(
        &mesh.cp,
        Some(&forged),
        "POST",
        "/v1/certificates",
        &renewal,
    );
    assert_eq!(code, 403, "forged mesh identity renewing: {answer}");
    assert!(answer.contains("trust domain mismatch"), "{answer}");
    let forged_cred =
        || Credential::from_pem(&forged.cert_pem().unwrap(), &forged.key_pem().unwrap()).unwrap();
    let trust = mesh.cp.trust().unwrap();
    let refused = common::tls_initialize(
        alpha.inbound,
        trust.clone(),
        Arc::new(CredentialCell::new(forged_cred())),
        "alpha",
    )
    .await;
    assert!(
        refused.is_err(),
        "alpha answered a forged mesh identity: {refused:?}"
    );
    let Err(err) = mesh
        .cp
        .stream_client(forged_cred())
        .unwrap()
        .open_stream(&hello("forged-1", "planner"))
        .await
    else {
        panic!("the forged identity's stream was accepted");
    };
    assert_eq!(err.status(), Some(403), "{err}");

    // The entity's own identity works where the policy allows, and renewal does not turn it
    // into a mesh certificate.
    let deepl = partner_ca
        .issue(&format!("spiffe://{PARTNER_TD}/ns/default/agent/deepl"))
        .unwrap();
    let deepl_cred = Arc::new(CredentialCell::new(
        Credential::from_pem(&deepl.cert_pem().unwrap(), &deepl.key_pem().unwrap()).unwrap(),
    ));
    eventually(Duration::from_secs(10), "alpha answers the partner", || {
        let (trust, cred) = (trust.clone(), deepl_cred.clone());
        async move {
            common::tls_initialize(alpha.inbound, trust, cred, "alpha")
                .await
                .is_ok_and(|r| r.starts_with("HTTP/1.1 200"))
        }
    })
    .await;
    let mesh_csr = key.csr_pem(&spiffe("default", "deepl").unwrap()).unwrap();
    let body = serde_json::json!({ "csr_pem": mesh_csr }).to_string();
    let (code, answer) = curl(&mesh.cp, Some(&deepl), "POST", "/v1/certificates", &body);
    assert_eq!(code, 403, "{answer}");
    assert!(answer.contains("not the mesh CA"), "{answer}");
    common::set_policy(
        &mesh,
        serde_json::json!({
            "rules": [{"from": [format!("spiffe://{PARTNER_TD}/*")], "capabilities": ["*"], "action": "deny"}]
        }),
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "the policy denies the partner",
        || {
            let (trust, cred) = (trust.clone(), deepl_cred.clone());
            async move {
                common::tls_initialize(alpha.inbound, trust, cred, "alpha")
                    .await
                    .is_ok_and(|r| r.starts_with("HTTP/1.1 403"))
            }
        },
    )
    .await;
    let (_, metrics) = alpha.admin_get("/metrics").await.unwrap();
    assert!(
        metrics.contains("capmesh_proxy_tls_refusals_total{reason=\"trust_domain_mismatch\"}"),
        "{metrics}"
    );
}

/// An HTTP/1.1 keep-alive connection to a provider's inbound, open after one answered request.
async fn open_connection(
    port: u16,
    trust: Arc<TrustStore>,
    cred: Arc<CredentialCell>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut tls = common::tls_to(port, trust, cred, "alpha").await.unwrap();
    tls.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tls.read(&mut buf).await.unwrap();
    assert!(
        n > 0 && buf.starts_with(b"HTTP/1.1"),
        "no answer on the open connection"
    );
    tls
}

#[tokio::test]
async fn a_revoked_workload_is_cut_off_everywhere_until_lifted() {
    let mut mesh = Mesh::new().await;
    let (_agent, alpha) = mesh.provider("alpha", &["weather"], &[]).await;
    let planner = mesh.consumer("planner", &["get_weather"], &[]).await;
    let trust = mesh.cp.trust().unwrap();
    eventually(
        Duration::from_secs(15),
        "the planner's call is served",
        || async { served(&weather_call(&planner).await) },
    )
    .await;
    // Another certificate of the planner, holding a connection open to alpha.
    let held = Arc::new(CredentialCell::new(
        mesh.cp.credential("default", "planner").await.unwrap(),
    ));
    let mut open = open_connection(alpha.inbound, trust.clone(), held.clone()).await;

    let (code, answer) = curl(
        &mesh.cp,
        None,
        "POST",
        "/v1/revocations",
        r#"{"identity":"default/planner","reason":"test"}"#,
    );
    assert_eq!(code, 201, "{answer}");
    let revoked_at = Instant::now();
    let revocation: Revocation = serde_json::from_str(&answer).unwrap();
    assert_eq!(
        revocation.identity.as_deref(),
        Some("spiffe://capmesh.local/ns/default/agent/planner")
    );
    // Its calls are refused, and its open connection is closed, within a second.
    loop {
        let call = weather_call(&planner).await;
        if !served(&call) {
            break;
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(1),
            "still served {:?} after the revocation",
            revoked_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "the revoked planner's calls refused {:?} after the revocation",
        revoked_at.elapsed()
    );
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(1), open.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the revoked identity's open connection stayed open"
    );
    // A new connection is refused too.
    assert!(
        common::tls_initialize(alpha.inbound, trust.clone(), held.clone(), "alpha")
            .await
            .is_err()
    );

    // Renewal with its certificate, and a first certificate with a fresh token: both refused.
    let key = capmesh_certs::WorkloadKey::generate().unwrap();
    let csr = key.csr_pem(&spiffe("default", "planner").unwrap()).unwrap();
    let renewal = capmesh_client::ControlPlaneClient::new(
        mesh.cp.url().unwrap(),
        capmesh_client::ServerCheck::Spiffe(spiffe("capmesh-system", "control-plane").unwrap()),
        Some(trust.clone()),
        Some(held.clone()),
    )
    .unwrap()
    .post::<_, serde_json::Value>(
        "/v1/certificates",
        &capmesh_api::rest::CertificateRequest {
            csr_pem: csr.clone(),
            token: None,
        },
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(renewal.status(), Some(403), "{renewal}");
    assert!(renewal.to_string().contains("revoked"), "{renewal}");
    let token = mesh.cp.token("default", "planner").await.unwrap();
    let body = serde_json::json!({ "csr_pem": csr, "token": token }).to_string();
    let (code, answer) = curl(&mesh.cp, None, "POST", "/v1/certificates", &body);
    assert_eq!(code, 403, "{answer}");
    assert!(answer.contains("is revoked"), "{answer}");

    // Still revoked after the control plane restarts.
    mesh.cp.restart().await.unwrap();
    let (code, answer) = curl(&mesh.cp, None, "GET", "/v1/revocations", "");
    assert_eq!(code, 200);
    assert!(answer.contains("agent/planner"), "{answer}");
    assert!(
        common::tls_initialize(alpha.inbound, trust.clone(), held.clone(), "alpha")
            .await
            .is_err()
    );
    assert!(!served(&weather_call(&planner).await));

    // Lifted: the planner is served again.
    let (code, answer) = curl(
        &mesh.cp,
        None,
        "DELETE",
        &format!("/v1/revocations/{}", revocation.id),
        "",
    );
    assert_eq!(code, 200, "{answer}");
    eventually(
        Duration::from_secs(20),
        "the planner is served after the lift",
        || async { served(&weather_call(&planner).await) },
    )
    .await;
    assert!(
        common::tls_initialize(alpha.inbound, trust, held, "alpha")
            .await
            .is_ok()
    );
    let (_, metrics) = alpha.admin_get("/metrics").await.unwrap();
    assert!(metrics.contains("reason=\"revoked_identity\""), "{metrics}");
}

#[tokio::test]
async fn squatting_and_proxy_id_hijacks_are_refused() {
    let mesh = Mesh::new().await;
    let token = mesh.cp.admin_token().unwrap();
    let rest = mesh.cp.rest().unwrap();
    let policy: Policy = serde_json::from_value(serde_json::json!({
        "provide": [{"capabilities": ["get_weather*"], "from": ["spiffe://capmesh.local/ns/default/agent/alpha"]}]
    }))
    .unwrap();
    let _: Policy = rest
        .put("/v1/policies", &policy, Some(&token))
        .await
        .unwrap();
    let (_alpha_agent, _alpha) = mesh.provider("alpha", &["weather"], &[]).await;
    // The squatter's sidecar comes up (its other tools are published), but get_weather is not.
    let (_mallory_agent, _mallory) = mesh.provider("mallory", &["weather", "echo"], &[]).await;
    let planner = mesh.consumer("planner", &["get_weather"], &[]).await;
    let agents: Vec<AgentInfo> = rest.get("/v1/agents", Some(&token)).await.unwrap();
    let mallory = agents
        .iter()
        .find(|a| a.name.as_str() == "mallory")
        .unwrap();
    let refused = &mallory.instances[0].refused;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].capability.as_str(), "get_weather");
    assert!(
        refused[0].error.contains("provide rules"),
        "{}",
        refused[0].error
    );
    for _ in 0..6 {
        let call = weather_call(&planner).await;
        assert!(served(&call) && call.1.contains("alpha:"), "{call:?}");
    }
    // `capmesh status` shows the refusal.
    let capmesh = workspace_bin("capmesh").unwrap();
    let out = Command::new(capmesh)
        .args([
            "--control-plane",
            &format!("https://localhost:{}", mesh.cp.port),
        ])
        .arg("--control-plane-ca")
        .arg(mesh.cp.data_dir.join("ca.pem"))
        .arg("--admin-token-file")
        .arg(mesh.cp.data_dir.join("admin-token"))
        .arg("status")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("refused") && text.contains("get_weather"),
        "{text}"
    );

    // A stream from mallory claiming alpha's proxy id is refused; alpha keeps serving.
    let alpha_id = agents
        .iter()
        .find(|a| a.name.as_str() == "alpha")
        .unwrap()
        .instances[0]
        .proxy_id
        .clone();
    let cred = mesh.cp.credential("default", "mallory").await.unwrap();
    let Err(err) = mesh
        .cp
        .stream_client(cred)
        .unwrap()
        .open_stream(&hello(&alpha_id, "mallory"))
        .await
    else {
        panic!("the hijack was accepted");
    };
    assert_eq!(err.status(), Some(403), "{err}");
    assert!(
        err.to_string()
            .contains("belongs to spiffe://capmesh.local/ns/default/agent/alpha"),
        "{err}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let call = weather_call(&planner).await;
    assert!(served(&call) && call.1.contains("alpha:"), "{call:?}");
    let agents: Vec<AgentInfo> = rest.get("/v1/agents", Some(&token)).await.unwrap();
    let alpha = agents.iter().find(|a| a.name.as_str() == "alpha").unwrap();
    assert!(
        alpha
            .instances
            .iter()
            .any(|i| i.proxy_id == alpha_id && i.connected)
    );
}
