//! The control plane's own guards: bootstrap tokens (use counts, the capmesh-system flag, the
//! maximum lifetime), an admin token that must be long, and the rate limit on register and
//! health frames.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use capmesh_api::rest::{CertificateRequest, CertificateResponse, TokenCreated, TokenRequest};
use capmesh_api::{Namespace, ProxyFrame, Registration};
use capmesh_certs::WorkloadKey;
use capmesh_tests::{ControlPlane, TestProxy, spiffe};

fn bin() -> &'static std::path::Path {
    env!("CARGO_BIN_EXE_capmesh-control-plane").as_ref()
}

async fn create(
    cp: &ControlPlane,
    namespace: &str,
    pattern: &str,
    ttl_secs: u64,
    uses: Option<u32>,
    system: bool,
) -> Result<TokenCreated, capmesh_client::ClientError> {
    cp.rest()
        .unwrap()
        .post(
            "/v1/tokens",
            &TokenRequest {
                namespace: Namespace::new(namespace).unwrap(),
                agent_pattern: pattern.into(),
                ttl_secs,
                uses,
                system,
                description: None,
            },
            Some(&cp.admin_token().unwrap()),
        )
        .await
}

async fn certificate(
    cp: &ControlPlane,
    namespace: &str,
    agent: &str,
    token: &str,
) -> Result<CertificateResponse, capmesh_client::ClientError> {
    let key = WorkloadKey::generate().unwrap();
    cp.rest()
        .unwrap()
        .post(
            "/v1/certificates",
            &CertificateRequest {
                csr_pem: key.csr_pem(&spiffe(namespace, agent).unwrap()).unwrap(),
                token: Some(token.into()),
            },
            None,
        )
        .await
}

#[tokio::test]
async fn bootstrap_tokens_are_counted_system_only_on_request_and_short_lived() {
    let cp = ControlPlane::start(bin(), &["--max-token-ttl", "1h"])
        .await
        .unwrap();

    // One exact agent: single use by default.
    let once = create(&cp, "default", "weather", 600, None, false)
        .await
        .unwrap();
    assert_eq!(once.info.uses, Some(1));
    certificate(&cp, "default", "weather", &once.token)
        .await
        .unwrap();
    let err = certificate(&cp, "default", "weather", &once.token)
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(403), "{err}");
    assert!(err.to_string().contains("used 1 time(s)"), "{err}");

    // --uses 2: two certificates, then no more; a glob is unlimited unless told.
    let twice = create(&cp, "default", "llm", 600, Some(2), false)
        .await
        .unwrap();
    for _ in 0..2 {
        certificate(&cp, "default", "llm", &twice.token)
            .await
            .unwrap();
    }
    assert!(
        certificate(&cp, "default", "llm", &twice.token)
            .await
            .is_err()
    );
    let glob = create(&cp, "default", "w-*", 600, None, false)
        .await
        .unwrap();
    assert_eq!(glob.info.uses, None);
    for n in 0..3 {
        certificate(&cp, "default", &format!("w-{n}"), &glob.token)
            .await
            .unwrap();
    }
    let listed: Vec<capmesh_api::TokenInfo> = cp
        .rest()
        .unwrap()
        .get("/v1/tokens", Some(&cp.admin_token().unwrap()))
        .await
        .unwrap();
    let glob_info = listed.iter().find(|t| t.id == glob.info.id).unwrap();
    assert_eq!(glob_info.used, 3);

    // capmesh-system only with the explicit flag.
    let err = create(&cp, "capmesh-system", "admin", 600, None, false)
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(403), "{err}");
    assert!(err.to_string().contains("\"system\": true"), "{err}");
    let system = create(&cp, "capmesh-system", "cli", 600, None, true)
        .await
        .unwrap();
    certificate(&cp, "capmesh-system", "cli", &system.token)
        .await
        .unwrap();

    // The maximum lifetime.
    let err = create(&cp, "default", "x", 7200, None, false)
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(400), "{err}");
    assert!(err.to_string().contains("--max-token-ttl"), "{err}");
}

#[test]
fn an_empty_or_short_admin_token_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    for (content, what) in [("", "empty"), ("short\n", "short")] {
        let token = dir.path().join(format!("{what}-token"));
        std::fs::write(&token, content).unwrap();
        let out = std::process::Command::new(bin())
            .arg("--data-dir")
            .arg(dir.path().join(what))
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .arg("--admin-token-file")
            .arg(&token)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what} token: started anyway");
        assert!(
            stderr.contains("--admin-token-file") && stderr.contains("shorter than 16"),
            "{what}: {stderr}"
        );
    }
}

#[tokio::test]
async fn register_and_health_floods_are_nacked_and_counted() {
    let cp = ControlPlane::start(bin(), &[]).await.unwrap();
    let client = cp
        .stream_client(cp.credential("default", "flood").await.unwrap())
        .unwrap();
    let registration = Registration {
        endpoint: "127.0.0.1:9".into(),
        tags: vec![],
        version: None,
        tools: vec![],
        dependencies: vec![],
    };
    let mut proxy = TestProxy::connect(&client, "default", "flood", "flood-1", registration)
        .await
        .unwrap();
    proxy
        .until(Duration::from_secs(10), "snapshot", |_| true)
        .await
        .unwrap();
    for n in 0..200 {
        proxy
            .tx
            .send(&ProxyFrame::Health {
                healthy: n % 2 == 0,
                detail: None,
            })
            .await
            .unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while proxy.nacks.len() < 100 && tokio::time::Instant::now() < deadline {
        proxy.step(Duration::from_millis(500)).await.unwrap();
    }
    assert!(proxy.nacks.len() >= 100, "only {} nacks", proxy.nacks.len());
    assert!(
        proxy
            .nacks
            .iter()
            .all(|(of, code, _)| of == "health" && code == "rate_limited"),
        "{:?}",
        &proxy.nacks[..3]
    );
    assert!(!proxy.ended, "the stream stays open");
    let metrics = cp.admin_get("/metrics").await.unwrap();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("capmesh_cp_frames_rate_limited_total{frame=\"health\"}"))
        .unwrap_or_else(|| panic!("{metrics}"));
    let counted: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(counted >= 100.0, "{line}");
}
