//! Rotation: a short-lived certificate is renewed before it expires, new handshakes see the new
//! certificate on the same listener, and failed renewals keep the old one in force.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use capmesh_api::TrustDomain;
use capmesh_certs::tls::{client_config, connect};
use capmesh_certs::{
    Accepted, Ca, Credential, CredentialCell, MeshAcceptor, Renew, RenewPolicy, SpiffeId, TlsMode,
    TrustConfig, TrustStore, Validity, WorkloadKey, inspect_der, run_rotation,
};
use tokio::net::{TcpListener, TcpStream};

fn id(agent: &str) -> SpiffeId {
    format!("spiffe://capmesh.local/ns/default/agent/{agent}")
        .parse()
        .unwrap()
}

fn issue(ca: &Ca, who: &SpiffeId, ttl: Duration) -> Credential {
    let key = WorkloadKey::generate().unwrap();
    let issued = ca
        .issue(&key.csr_pem(who).unwrap(), who, Validity::for_ttl(ttl))
        .unwrap();
    Credential::with_key(&issued.chain_pem, &key).unwrap()
}

/// Renews from a local CA, failing the first `fail_first` attempts.
struct LocalCa {
    ca: Arc<Ca>,
    fail_first: u32,
    attempts: Arc<AtomicU32>,
}

impl Renew for LocalCa {
    async fn renew(&self, current: Arc<Credential>) -> Result<Credential, String> {
        let n = self.attempts.fetch_add(1, Ordering::SeqCst);
        if n < self.fail_first {
            return Err(format!("control plane unreachable (attempt {n})"));
        }
        Ok(issue(&self.ca, current.identity(), Duration::from_secs(3)))
    }
}

async fn presented_serial(
    addr: std::net::SocketAddr,
    trust: Arc<TrustStore>,
    client: Arc<CredentialCell>,
) -> String {
    let config = client_config(Some(client), trust, id("weather"), &[]).unwrap();
    let tls = connect(config, TcpStream::connect(addr).await.unwrap())
        .await
        .unwrap();
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    inspect_der(&leaf).unwrap().serial
}

#[tokio::test]
async fn renews_before_expiry_and_keeps_serving_through_failures() {
    let ca = Arc::new(Ca::generate(TrustDomain::new("capmesh.local").unwrap(), false).unwrap());
    let trust = Arc::new(
        TrustStore::new(&TrustConfig {
            trust_domain: TrustDomain::new("capmesh.local").unwrap(),
            mesh_ca_pem: ca.root_pem().to_owned(),
            entities: vec![],
            revoked_entities: vec![],
            revoked_serials: vec![],
            revoked_identities: vec![],
        })
        .unwrap(),
    );
    let cell = Arc::new(CredentialCell::new(issue(
        &ca,
        &id("weather"),
        Duration::from_secs(3),
    )));
    let first_serial = cell.current().serial().to_owned();
    let client = Arc::new(CredentialCell::new(issue(
        &ca,
        &id("planner"),
        Duration::from_secs(600),
    )));

    let acceptor = MeshAcceptor::new(TlsMode::Strict, cell.clone(), trust.clone(), &[]).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(Accepted::Tls { stream, .. }) = acceptor.accept(tcp).await {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    drop(stream);
                }
            });
        }
    });
    assert_eq!(
        presented_serial(addr, trust.clone(), client.clone()).await,
        first_serial
    );

    // Renewal is due at 70 % of 3 s; the first two attempts fail and are retried after 100 ms.
    let attempts = Arc::new(AtomicU32::new(0));
    let policy = RenewPolicy {
        min: Duration::from_millis(100),
        retry_initial: Duration::from_millis(100),
        ..RenewPolicy::default()
    };
    let renewer = LocalCa {
        ca: ca.clone(),
        fail_first: 2,
        attempts: attempts.clone(),
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let rotation = tokio::spawn(run_rotation(cell.clone(), renewer, policy, async {
        let _ = stop_rx.await;
    }));

    // Before the first attempt, and while attempts fail, the old certificate is served.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        presented_serial(addr, trust.clone(), client.clone()).await,
        first_serial
    );

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if cell.current().serial() != first_serial {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no rotation within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        attempts.load(Ordering::SeqCst) >= 3,
        "two failures, then success"
    );
    let new_serial = cell.current().serial().to_owned();
    assert_eq!(
        presented_serial(addr, trust.clone(), client.clone()).await,
        new_serial
    );

    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(2), rotation)
        .await
        .unwrap()
        .unwrap();
}

#[test]
fn renewal_is_due_at_seventy_percent_clamped() {
    let ca = Ca::generate(TrustDomain::new("capmesh.local").unwrap(), false).unwrap();
    let policy = RenewPolicy::default();
    let day = issue(&ca, &id("a"), Duration::from_secs(24 * 3600));
    let d = policy.delay(&day, day.received());
    assert!((d.as_secs_f64() - 0.7 * 24.0 * 3600.0).abs() < 5.0, "{d:?}");

    let month = issue(&ca, &id("a"), Duration::from_secs(30 * 24 * 3600));
    assert_eq!(
        policy.delay(&month, month.received()),
        Duration::from_secs(24 * 3600)
    );

    // Shorter than the 10 s floor: renewed before it expires anyway.
    let short = issue(&ca, &id("a"), Duration::from_secs(5));
    let d = policy.delay(&short, short.received());
    assert!(d < Duration::from_secs(5), "{d:?}");
}
