//! Identity-layer throughput: how many workload certificates the CA signs per second (CSR parse,
//! checks and signature), and how many full mutual-TLS handshakes per second a mesh listener
//! completes over loopback (TLS 1.3, ECDSA P-256, both chains verified, SPIFFE IDs checked).
//!
//! Usage: capmesh-bench-certs [SECONDS] [CONCURRENCY]   (defaults: 5, 16)

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use capmesh_api::TrustDomain;
use capmesh_certs::tls::{client_config, connect};
use capmesh_certs::{
    Accepted, Ca, Credential, CredentialCell, MeshAcceptor, SpiffeId, TlsMode, TrustConfig,
    TrustStore, Validity, WorkloadKey,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn id(agent: &str) -> Result<SpiffeId> {
    Ok(format!("spiffe://capmesh.local/ns/default/agent/{agent}").parse()?)
}

fn credential(ca: &Ca, who: &SpiffeId) -> Result<Arc<CredentialCell>> {
    let key = WorkloadKey::generate()?;
    let issued = ca.issue(
        &key.csr_pem(who)?,
        who,
        Validity::for_ttl(Duration::from_secs(3600)),
    )?;
    Ok(Arc::new(CredentialCell::new(Credential::with_key(
        &issued.chain_pem,
        &key,
    )?)))
}

fn issuance(ca: &Ca, seconds: f64) -> Result<f64> {
    let who = id("bench")?;
    let key = WorkloadKey::generate()?;
    let csr = key.csr_pem(&who)?;
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        ca.issue(&csr, &who, Validity::for_ttl(Duration::from_secs(3600)))?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

async fn handshakes(
    ca: &Ca,
    trust: Arc<TrustStore>,
    seconds: f64,
    concurrency: usize,
) -> Result<(f64, u64)> {
    let acceptor = MeshAcceptor::new(
        TlsMode::Strict,
        credential(ca, &id("server")?)?,
        trust.clone(),
        &[],
    )?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(Accepted::Tls { mut stream, .. }) = acceptor.accept(tcp).await {
                    let mut b = [0u8; 1];
                    if stream.read_exact(&mut b).await.is_ok() {
                        let _ = stream.write_all(&b).await;
                    }
                }
            });
        }
    });
    let config = client_config(
        Some(credential(ca, &id("client")?)?),
        trust,
        id("server")?,
        &[],
    )?;
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (config, done, failed) = (config.clone(), done.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let round = async {
                    let tcp = TcpStream::connect(addr).await?;
                    tcp.set_nodelay(true)?;
                    let mut tls = connect(config.clone(), tcp).await?;
                    // One round trip: in TLS 1.3 the server verifies the client after the
                    // client finishes, so only an echo proves both sides completed.
                    tls.write_all(b"x").await?;
                    let mut b = [0u8; 1];
                    tls.read_exact(&mut b).await?;
                    std::io::Result::Ok(())
                };
                match round.await {
                    Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for t in tasks {
        t.await.context("handshake task panicked")?;
    }
    let rate = done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    Ok((rate, failed.load(Ordering::Relaxed)))
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let seconds: f64 = args
        .next()
        .map(|s| s.parse())
        .transpose()
        .context("SECONDS must be a number")?
        .unwrap_or(5.0);
    let concurrency: usize = args
        .next()
        .map(|s| s.parse())
        .transpose()
        .context("CONCURRENCY must be a whole number")?
        .unwrap_or(16);
    let td = TrustDomain::new("capmesh.local")?;
    let ca = Ca::generate(td.clone(), false)?;
    let trust = Arc::new(TrustStore::new(&TrustConfig {
        trust_domain: td,
        mesh_ca_pem: ca.root_pem().to_owned(),
        entities: vec![],
        revoked_entities: vec![],
        revoked_serials: vec![],
        revoked_identities: vec![],
    })?);

    let issued = issuance(&ca, seconds)?;
    println!(
        "leaf issuance (CSR parse + checks + ECDSA P-256 signature), 1 thread: {issued:.0} certificates/s"
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (rate, failed) = runtime.block_on(handshakes(&ca, trust, seconds, concurrency))?;
    println!(
        "full mutual-TLS handshakes (TLS 1.3, P-256, new TCP connection each, {concurrency} concurrent clients, \
         client and server in one process on {} worker threads): {rate:.0} handshakes/s, {failed} failed",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    Ok(())
}
