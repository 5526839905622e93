//! Real mutual-TLS handshakes over loopback: the good case and every refusal, each identified
//! by the side that refused, and trust changes applied to a running listener.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use capmesh_api::TrustDomain;
use capmesh_certs::tls::{client_config, connect};
use capmesh_certs::{
    AcceptError, Accepted, Ca, CertError, Credential, CredentialCell, EntityAnchor, MeshAcceptor,
    PeerRole, Refusal, SpiffeId, TlsMode, TrustConfig, TrustStore, Validity, WorkloadKey,
};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

fn td() -> TrustDomain {
    TrustDomain::new("capmesh.local").unwrap()
}

fn id(agent: &str) -> SpiffeId {
    format!("spiffe://capmesh.local/ns/default/agent/{agent}")
        .parse()
        .unwrap()
}

fn issue(ca: &Ca, who: &SpiffeId, validity: Validity) -> Credential {
    let key = WorkloadKey::generate().unwrap();
    let issued = ca.issue(&key.csr_pem(who).unwrap(), who, validity).unwrap();
    Credential::with_key(&issued.chain_pem, &key).unwrap()
}

fn fresh(ca: &Ca, who: &str) -> Arc<CredentialCell> {
    Arc::new(CredentialCell::new(issue(
        ca,
        &id(who),
        Validity::for_ttl(Duration::from_secs(3600)),
    )))
}

fn trust_for(ca: &Ca) -> TrustConfig {
    TrustConfig::mesh_only(td(), ca.root_pem())
}

/// A listener that reports each accept's outcome and echoes one message over good connections.
struct Server {
    addr: std::net::SocketAddr,
    outcomes: mpsc::UnboundedReceiver<Result<Option<String>, AcceptError>>,
}

async fn serve(acceptor: MeshAcceptor) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, outcomes) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match acceptor.accept(tcp).await {
                    Ok(Accepted::Tls { mut stream, peer }) => {
                        let _ = tx.send(Ok(Some(peer.map(|p| p.to_string()).unwrap_or_default())));
                        let mut buf = [0u8; 4];
                        if stream.read_exact(&mut buf).await.is_ok() {
                            let _ = stream.write_all(&buf).await;
                            let _ = stream.flush().await;
                        }
                    }
                    Ok(Accepted::Plain(mut tcp)) => {
                        let _ = tx.send(Ok(None));
                        let mut request = [0u8; 64];
                        let _ = tcp.read(&mut request).await;
                        let _ = tcp.write_all(b"plain").await;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            });
        }
    });
    Server { addr, outcomes }
}

impl Server {
    async fn next(&mut self) -> Result<Option<String>, AcceptError> {
        tokio::time::timeout(Duration::from_secs(10), self.outcomes.recv())
            .await
            .expect("the listener reported no outcome within 10 s")
            .expect("listener task ended")
    }

    /// Connects as `client`, expecting the server to be `expected`; returns the client's
    /// handshake result after an echo round trip.
    async fn call(
        &self,
        client: Option<Arc<CredentialCell>>,
        trust: Arc<TrustStore>,
        expected: SpiffeId,
    ) -> std::io::Result<()> {
        let config = client_config(client, trust, expected, &[]).unwrap();
        let tcp = TcpStream::connect(self.addr).await?;
        let mut tls = connect(config, tcp).await?;
        // In TLS 1.3 the server's verdict on our certificate arrives after our side finishes,
        // so a refusal shows up on the first read.
        tls.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"ping");
        Ok(())
    }
}

fn refused(outcome: Result<Option<String>, AcceptError>) -> Refusal {
    match outcome {
        Err(AcceptError::Refused(r)) => r,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

struct Mesh {
    ca: Ca,
    trust: Arc<TrustStore>,
}

impl Mesh {
    fn new() -> Self {
        let ca = Ca::generate(td(), true).unwrap();
        let trust = Arc::new(TrustStore::new(&trust_for(&ca)).unwrap());
        Self { ca, trust }
    }

    async fn server(&self, agent: &str, mode: TlsMode) -> Server {
        let acceptor =
            MeshAcceptor::new(mode, fresh(&self.ca, agent), self.trust.clone(), &[]).unwrap();
        serve(acceptor).await
    }
}

#[tokio::test]
async fn good_mutual_handshake_proves_both_identities() {
    let mesh = Mesh::new();
    let mut server = mesh.server("weather", TlsMode::Strict).await;
    server
        .call(
            Some(fresh(&mesh.ca, "planner")),
            mesh.trust.clone(),
            id("weather"),
        )
        .await
        .expect("a good mutual handshake succeeds");
    assert_eq!(
        server.next().await.unwrap(),
        Some(id("planner").to_string())
    );
}

#[tokio::test]
async fn unknown_ca_is_refused_by_either_side() {
    let mesh = Mesh::new();
    let stranger = Ca::generate(td(), false).unwrap();
    let mut server = mesh.server("weather", TlsMode::Strict).await;

    // A client whose certificate comes from a CA the mesh does not trust.
    let err = server
        .call(
            Some(fresh(&stranger, "planner")),
            mesh.trust.clone(),
            id("weather"),
        )
        .await
        .unwrap_err();
    assert_eq!(refused(server.next().await), Refusal::UnknownCa);
    assert_eq!(
        Refusal::from_io_error(&err),
        Some(Refusal::PeerAlert("UnknownCA".into()))
    );

    // A server whose certificate comes from an untrusted CA, seen from the client.
    let rogue = serve(
        MeshAcceptor::new(
            TlsMode::Strict,
            fresh(&stranger, "weather"),
            mesh.trust.clone(),
            &[],
        )
        .unwrap(),
    )
    .await;
    let err = rogue
        .call(
            Some(fresh(&mesh.ca, "planner")),
            mesh.trust.clone(),
            id("weather"),
        )
        .await
        .unwrap_err();
    assert_eq!(Refusal::from_io_error(&err), Some(Refusal::UnknownCa));
}

#[tokio::test]
async fn expired_and_not_yet_valid_certificates_are_refused() {
    let mesh = Mesh::new();
    let mut server = mesh.server("weather", TlsMode::Strict).await;
    let now = OffsetDateTime::now_utc();
    let hour = time::Duration::hours(1);

    let expired = issue(
        &mesh.ca,
        &id("planner"),
        Validity {
            not_before: now - hour * 3,
            not_after: now - hour,
        },
    );
    let _ = server
        .call(
            Some(Arc::new(CredentialCell::new(expired))),
            mesh.trust.clone(),
            id("weather"),
        )
        .await;
    assert_eq!(refused(server.next().await), Refusal::Expired);

    let early = issue(
        &mesh.ca,
        &id("planner"),
        Validity {
            not_before: now + hour,
            not_after: now + hour * 3,
        },
    );
    let _ = server
        .call(
            Some(Arc::new(CredentialCell::new(early))),
            mesh.trust.clone(),
            id("weather"),
        )
        .await;
    assert_eq!(refused(server.next().await), Refusal::NotYetValid);
}

#[tokio::test]
async fn revoked_serial_is_refused_on_the_next_handshake_without_restart() {
    let mesh = Mesh::new();
    let mut server = mesh.server("weather", TlsMode::Strict).await;
    let client = fresh(&mesh.ca, "planner");
    server
        .call(Some(client.clone()), mesh.trust.clone(), id("weather"))
        .await
        .expect("accepted before revocation");
    server.next().await.unwrap();

    let mut cfg = trust_for(&mesh.ca);
    cfg.revoked_serials = vec![client.current().serial().to_owned()];
    mesh.trust.update(&cfg).unwrap();

    let _ = server
        .call(Some(client.clone()), mesh.trust.clone(), id("weather"))
        .await;
    assert_eq!(refused(server.next().await), Refusal::RevokedSerial);

    // Other certificates from the same CA are unaffected.
    server
        .call(
            Some(fresh(&mesh.ca, "planner")),
            mesh.trust.clone(),
            id("weather"),
        )
        .await
        .expect("a fresh certificate is still accepted");
}

#[tokio::test]
async fn entities_are_trusted_and_revoked_live() {
    let mesh = Mesh::new();
    let partner_td = TrustDomain::new("partner.example").unwrap();
    let acme = Ca::generate(partner_td.clone(), false).unwrap();
    let mut server = mesh.server("weather", TlsMode::Strict).await;
    let partner: SpiffeId = "spiffe://partner.example/ns/default/agent/partner"
        .parse()
        .unwrap();
    let acme_client = Arc::new(CredentialCell::new(issue(
        &acme,
        &partner,
        Validity::for_ttl(Duration::from_secs(3600)),
    )));

    let _ = server
        .call(Some(acme_client.clone()), mesh.trust.clone(), id("weather"))
        .await;
    assert_eq!(
        refused(server.next().await),
        Refusal::UnknownCa,
        "not trusted before registration"
    );

    let mut cfg = trust_for(&mesh.ca);
    cfg.entities = vec![EntityAnchor {
        name: "acme".into(),
        trust_domain: Some(partner_td.clone()),
        ca_pem: acme.root_pem().to_owned(),
    }];
    mesh.trust.update(&cfg).unwrap();
    server
        .call(Some(acme_client.clone()), mesh.trust.clone(), id("weather"))
        .await
        .expect("trusted once the entity is registered, same listener");
    assert_eq!(server.next().await.unwrap(), Some(partner.to_string()));

    cfg.revoked_entities = vec!["acme".into()];
    mesh.trust.update(&cfg).unwrap();
    let _ = server
        .call(Some(acme_client), mesh.trust.clone(), id("weather"))
        .await;
    assert_eq!(
        refused(server.next().await),
        Refusal::RevokedEntity("acme".into())
    );

    // A bad bundle is refused whole and the previous trust stays in force.
    let mut bad = cfg.clone();
    bad.entities.push(EntityAnchor {
        name: "broken".into(),
        trust_domain: Some(partner_td),
        ca_pem: "not a pem".into(),
    });
    assert!(mesh.trust.update(&bad).is_err());
    server
        .call(
            Some(fresh(&mesh.ca, "planner")),
            mesh.trust.clone(),
            id("weather"),
        )
        .await
        .expect("mesh certificates still accepted after a rejected update");
}

/// An entity's CA that mints identities outside its trust domain: the mesh's own, capmesh-system
/// (the admin), or another partner's. Each is refused by name, and only the partner's own
/// identities pass.
#[test]
fn an_entity_ca_speaks_only_for_its_own_trust_domain() {
    let mesh = Mesh::new();
    let partner_td = TrustDomain::new("partner.example").unwrap();
    // The partner's CA is registered for partner.example but mints mesh identities: what
    // decides is which anchor the chain leads to, not what the CA's own name says.
    let rogue_mesh = Ca::generate(td(), false).unwrap();
    let mut cfg = trust_for(&mesh.ca);
    cfg.entities = vec![EntityAnchor {
        name: "acme".into(),
        trust_domain: Some(partner_td.clone()),
        ca_pem: rogue_mesh.root_pem().to_owned(),
    }];
    mesh.trust.update(&cfg).unwrap();
    let chain = |ca: &Ca, who: &str| {
        let cred = issue(
            ca,
            &who.parse().unwrap(),
            Validity::for_ttl(Duration::from_secs(600)),
        );
        capmesh_certs::inspect::certs_from_pem(cred.chain_pem()).unwrap()
    };
    for forged in [
        "spiffe://capmesh.local/ns/default/agent/weather",
        "spiffe://capmesh.local/ns/capmesh-system/agent/admin",
    ] {
        let refusal = mesh
            .trust
            .verify_chain(&chain(&rogue_mesh, forged), PeerRole::Client)
            .unwrap_err();
        assert!(
            matches!(&refusal, Refusal::TrustDomainMismatch { identity, issuer, .. }
                if identity == forged && issuer == "entity \"acme\""),
            "{forged}: {refusal:?}"
        );
        assert_eq!(refusal.reason(), "trust_domain_mismatch");
        assert!(refusal.to_string().contains("partner.example"), "{refusal}");
    }
    // The partner's own identities pass; its capmesh-system namespace does not.
    let partner_ca = Ca::generate(partner_td.clone(), false).unwrap();
    cfg.entities[0].ca_pem = partner_ca.root_pem().to_owned();
    mesh.trust.update(&cfg).unwrap();
    let ok = mesh
        .trust
        .verify_chain(
            &chain(
                &partner_ca,
                "spiffe://partner.example/ns/default/agent/deepl",
            ),
            PeerRole::Client,
        )
        .unwrap();
    assert_eq!(ok.entity.as_deref(), Some("acme"));
    let refusal = mesh
        .trust
        .verify_chain(
            &chain(
                &partner_ca,
                "spiffe://partner.example/ns/capmesh-system/agent/admin",
            ),
            PeerRole::Client,
        )
        .unwrap_err();
    assert!(refusal.to_string().contains("capmesh-system"), "{refusal}");
    // The mesh CA speaks for the mesh only, and a revoked identity is refused by name.
    let mesh_chain = chain(&mesh.ca, "spiffe://capmesh.local/ns/default/agent/planner");
    assert!(
        mesh.trust
            .verify_chain(&mesh_chain, PeerRole::Client)
            .is_ok()
    );
    cfg.revoked_identities = vec!["spiffe://capmesh.local/ns/default/agent/planner".into()];
    mesh.trust.update(&cfg).unwrap();
    assert_eq!(
        mesh.trust
            .verify_chain(&mesh_chain, PeerRole::Client)
            .unwrap_err(),
        Refusal::RevokedIdentity("spiffe://capmesh.local/ns/default/agent/planner".into())
    );
}

/// A connection's watcher resolves when its peer is revoked, and when its certificate expires.
#[tokio::test]
async fn until_refused_fires_on_revocation_and_on_expiry() {
    let mesh = Mesh::new();
    let cred = issue(
        &mesh.ca,
        &id("planner"),
        Validity::for_ttl(Duration::from_secs(600)),
    );
    let chain = capmesh_certs::inspect::certs_from_pem(cred.chain_pem()).unwrap();
    let trust = mesh.trust.clone();
    let watcher = tokio::spawn({
        let chain = chain.clone();
        async move { trust.until_refused(&chain, PeerRole::Client).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!watcher.is_finished(), "a trusted peer is left alone");
    let mut cfg = trust_for(&mesh.ca);
    cfg.revoked_serials = vec![cred.serial().to_owned()];
    mesh.trust.update(&cfg).unwrap();
    let refusal = tokio::time::timeout(Duration::from_secs(2), watcher)
        .await
        .expect("the watcher fired")
        .unwrap();
    assert_eq!(refusal, Refusal::RevokedSerial);

    // A certificate that expires in two seconds ends its connection then, with no trust change.
    let now = OffsetDateTime::now_utc();
    let short = issue(
        &mesh.ca,
        &id("brief"),
        Validity {
            not_before: now - Duration::from_secs(60),
            not_after: now + Duration::from_secs(2),
        },
    );
    let chain = capmesh_certs::inspect::certs_from_pem(short.chain_pem()).unwrap();
    let refusal = tokio::time::timeout(
        Duration::from_secs(6),
        mesh.trust.until_refused(&chain, PeerRole::Client),
    )
    .await
    .expect("expiry ends the connection");
    assert_eq!(refusal, Refusal::Expired);
}

#[tokio::test]
async fn client_refuses_a_server_with_the_wrong_identity() {
    let mesh = Mesh::new();
    let server = mesh.server("agent-b", TlsMode::Strict).await;
    let err = server
        .call(
            Some(fresh(&mesh.ca, "planner")),
            mesh.trust.clone(),
            id("agent-a"),
        )
        .await
        .unwrap_err();
    assert_eq!(
        Refusal::from_io_error(&err),
        Some(Refusal::IdentityMismatch {
            expected: id("agent-a").to_string(),
            actual: id("agent-b").to_string()
        })
    );
}

#[tokio::test]
async fn csr_for_another_identity_is_refused() {
    let mesh = Mesh::new();
    let key = WorkloadKey::generate().unwrap();
    let csr = key.csr_pem(&id("planner")).unwrap();
    let err = mesh
        .ca
        .issue(
            &csr,
            &id("weather"),
            Validity::for_ttl(Duration::from_secs(60)),
        )
        .unwrap_err();
    assert!(matches!(err, CertError::NotEntitled { .. }), "{err}");
}

#[tokio::test]
async fn strict_refuses_plaintext_and_missing_certificates_permissive_marks_them() {
    let mesh = Mesh::new();
    let mut strict = mesh.server("weather", TlsMode::Strict).await;
    let mut tcp = TcpStream::connect(strict.addr).await.unwrap();
    tcp.write_all(b"POST /mcp HTTP/1.1\r\n\r\n").await.unwrap();
    assert_eq!(refused(strict.next().await), Refusal::Plaintext);

    let _ = strict.call(None, mesh.trust.clone(), id("weather")).await;
    assert_eq!(refused(strict.next().await), Refusal::NoClientCertificate);

    let mut permissive = mesh.server("weather", TlsMode::Permissive).await;
    let mut tcp = TcpStream::connect(permissive.addr).await.unwrap();
    tcp.write_all(b"POST /mcp HTTP/1.1\r\n\r\n").await.unwrap();
    assert_eq!(
        permissive.next().await.unwrap(),
        None,
        "plaintext accepted as unauthenticated"
    );
    let mut reply = Vec::new();
    tcp.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply, b"plain");

    let stranger = Ca::generate(td(), false).unwrap();
    let _ = permissive
        .call(
            Some(fresh(&stranger, "planner")),
            mesh.trust.clone(),
            id("weather"),
        )
        .await;
    assert_eq!(
        refused(permissive.next().await),
        Refusal::UnknownCa,
        "untrusted certs still refused"
    );
}

#[tokio::test]
async fn a_resumed_session_is_checked_against_current_revocations() {
    let mesh = Mesh::new();
    let mut server = mesh.server("weather", TlsMode::Strict).await;
    let client = fresh(&mesh.ca, "planner");
    // One client config, so the second connection resumes the first one's session.
    let config =
        client_config(Some(client.clone()), mesh.trust.clone(), id("weather"), &[]).unwrap();
    let addr = server.addr;
    let round = || async {
        let mut tls = connect(config.clone(), TcpStream::connect(addr).await?).await?;
        tls.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await?;
        std::io::Result::Ok(())
    };
    round().await.expect("first connection");
    server.next().await.unwrap();

    let mut cfg = trust_for(&mesh.ca);
    cfg.revoked_serials = vec![client.current().serial().to_owned()];
    mesh.trust.update(&cfg).unwrap();
    assert!(
        round().await.is_err(),
        "a resumed session must not bypass revocation"
    );
    assert_eq!(refused(server.next().await), Refusal::RevokedSerial);
}
