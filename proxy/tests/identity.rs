//! The proxy's certificate: from files (reloaded when they change) or from the control plane's
//! CA (renewed before it expires), without interrupting calls.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use capmesh_api::rest::{CertificateRequest, CertificateResponse};
use capmesh_certs::WorkloadKey;
use capmesh_tests::python::PyAgent;
use capmesh_tests::{ControlPlane, ProxyProcess, spiffe, workspace_bin};
use common::{Mesh, call, eventually};

async fn serial(proxy: &ProxyProcess) -> String {
    let (_, body) = proxy.admin_get("/config").await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["certificate"]["serial"].as_str().unwrap().to_owned()
}

async fn issue_files(cp: &ControlPlane, dir: &std::path::Path, agent: &str) {
    let key = WorkloadKey::generate().unwrap();
    let resp: CertificateResponse = cp
        .rest()
        .unwrap()
        .post(
            "/v1/certificates",
            &CertificateRequest {
                csr_pem: key.csr_pem(&spiffe("default", agent).unwrap()).unwrap(),
                token: Some(cp.token("default", agent).await.unwrap()),
            },
            None,
        )
        .await
        .unwrap();
    // Written key first, then the chain, as a file-based issuer would.
    std::fs::write(dir.join("tls.key.new"), key.to_pem()).unwrap();
    std::fs::write(dir.join("tls.crt.new"), resp.certificate_chain_pem).unwrap();
    std::fs::rename(dir.join("tls.key.new"), dir.join("tls.key")).unwrap();
    std::fs::rename(dir.join("tls.crt.new"), dir.join("tls.crt")).unwrap();
}

#[tokio::test]
async fn file_based_certificates_serve_and_are_reloaded_when_they_change() {
    let mesh = Mesh::new().await;
    let dir = tempfile::tempdir().unwrap();
    issue_files(&mesh.cp, dir.path(), "alpha").await;
    let agent = PyAgent::start("alpha", &["weather"], None).await.unwrap();
    let cert = dir.path().join("tls.crt").display().to_string();
    let key = dir.path().join("tls.key").display().to_string();
    let mut provider = ProxyProcess::spawn(
        mesh.proxy_bin(),
        &mesh.cp,
        "unused-when-files-are-given",
        "alpha",
        Some(&agent.url),
        &["--tls-cert", &cert, "--tls-key", &key],
    )
    .await
    .unwrap();
    provider.wait_ready(Duration::from_secs(30)).await.unwrap();
    let consumer = mesh.consumer("planner", &["get_weather"], &[]).await;
    let (code, v) = call(&consumer, "legacy", "get_weather", r#"{"city":"Turku"}"#).await;
    assert_eq!(code, 0, "{v}");

    let before = serial(&provider).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    issue_files(&mesh.cp, dir.path(), "alpha").await;
    eventually(
        Duration::from_secs(10),
        "the new certificate is in use",
        || async { serial(&provider).await != before },
    )
    .await;
    let (code, v) = call(&consumer, "legacy", "get_weather", r#"{"city":"Turku"}"#).await;
    assert_eq!(
        code, 0,
        "calls keep working with the reloaded certificate: {v}"
    );

    // A certificate for someone else is refused at start, naming both identities.
    let other = tempfile::tempdir().unwrap();
    issue_files(&mesh.cp, other.path(), "beta").await;
    let out = std::process::Command::new(mesh.proxy_bin())
        .args([
            "--agent-name",
            "alpha",
            "--agent-url",
            "none",
            "--control-plane-ca",
        ])
        .arg(mesh.cp.data_dir.join("ca.pem"))
        .arg("--tls-cert")
        .arg(other.path().join("tls.crt"))
        .arg("--tls-key")
        .arg(other.path().join("tls.key"))
        .args([
            "--outbound",
            "127.0.0.1:0",
            "--inbound",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("agent/beta") && err.contains("agent/alpha"),
        "{err}"
    );
}

#[tokio::test]
async fn certificates_from_the_control_plane_are_renewed_before_they_expire() {
    // 15 s certificates: renewed at 70 %, about 10.5 s in.
    let cp = ControlPlane::start(
        &workspace_bin("capmesh-control-plane").unwrap(),
        &["--cert-ttl", "15s"],
    )
    .await
    .unwrap();
    let proxy = ProxyProcess::start(
        &workspace_bin("capmesh-proxy").unwrap(),
        &cp,
        "planner",
        None,
        &["--dependency", "*"],
    )
    .await
    .unwrap();
    let first = serial(&proxy).await;
    eventually(
        Duration::from_secs(25),
        "the certificate was renewed",
        || async { serial(&proxy).await != first },
    )
    .await;
    assert!(
        proxy.log().contains("certificate rotated"),
        "{}",
        proxy.log()
    );
    let (status, _) = proxy.admin_get("/ready").await.unwrap();
    assert_eq!(status, 200);
}
