//! The peers capmesh is compared with: nginx and HAProxy (Debian packages) doing the same
//! two-hop path as the mesh — a plaintext entry on loopback (the "outbound" instance), mutual
//! TLS 1.3 with ECDSA P-256 certificates to a second instance (the "inbound" one), which
//! forwards to the echo upstream. Keep-alive on every hop, one worker (thread) per instance.
//!
//! nginx can only speak HTTP/1.1 to an upstream, so its middle hop is HTTP/1.1 over a pool of
//! kept-alive TLS connections; HAProxy speaks HTTP/2 on the middle hop, as capmesh does.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use capmesh_api::{AgentName, Namespace, TrustDomain};
use capmesh_certs::{Ca, SpiffeId, Validity, WorkloadKey};

/// Which peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// nginx (`worker_processes 1`).
    Nginx,
    /// HAProxy (`nbthread 1`).
    Haproxy,
}

impl Kind {
    /// The program's name.
    pub fn program(self) -> &'static str {
        match self {
            Self::Nginx => "nginx",
            Self::Haproxy => "haproxy",
        }
    }
}

/// Certificates for both instances, from a fresh CA (ECDSA P-256, as the mesh's).
#[derive(Debug)]
pub(crate) struct Certs {
    ca: PathBuf,
    front_cert: PathBuf,
    front_key: PathBuf,
    front_both: PathBuf,
    back_cert: PathBuf,
    back_key: PathBuf,
    back_both: PathBuf,
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// The trust domain of the bench's CA.
pub(crate) const TRUST_DOMAIN: &str = "bench.local";

impl Certs {
    /// Writes a fresh CA and the front and back instances' certificates into `dir`.
    pub(crate) fn write(dir: &Path) -> Result<Self> {
        certs(dir)
    }
}

fn certs(dir: &Path) -> Result<Certs> {
    let td = TrustDomain::new(TRUST_DOMAIN)?;
    let ca = Ca::generate(td.clone(), false)?;
    let c = Certs {
        ca: dir.join("ca.pem"),
        front_cert: dir.join("front.pem"),
        front_key: dir.join("front.key"),
        front_both: dir.join("front-both.pem"),
        back_cert: dir.join("back.pem"),
        back_key: dir.join("back.key"),
        back_both: dir.join("back-both.pem"),
    };
    write(&c.ca, ca.root_pem())?;
    for (name, cert, key, both) in [
        ("front", &c.front_cert, &c.front_key, &c.front_both),
        ("back", &c.back_cert, &c.back_key, &c.back_both),
    ] {
        let k = WorkloadKey::generate()?;
        let id = SpiffeId::new(td.clone(), Namespace::new("bench")?, AgentName::new(name)?);
        let issued = ca.issue_serving(
            &k,
            &id,
            &["localhost".to_owned()],
            &[IpAddr::from([127, 0, 0, 1])],
            Validity::for_ttl(Duration::from_secs(24 * 3600)),
        )?;
        write(cert, &issued.chain_pem)?;
        write(key, &k.to_pem())?;
        write(both, &format!("{}{}", issued.chain_pem, k.to_pem()))?;
    }
    Ok(c)
}

/// A running two-hop peer. Both processes are killed when dropped.
#[derive(Debug)]
pub struct Peer {
    /// Which one.
    pub kind: Kind,
    front: Child,
    back: Child,
    /// Entry port for HTTP/1.1 clients.
    pub entry_h1: u16,
    /// Entry port for HTTP/2 (prior knowledge) clients.
    pub entry_h2: u16,
    dir: tempfile::TempDir,
    /// The ports the configurations name, held for the peer's life (see `ReservedPort`).
    _ports: Vec<capmesh_tests::ReservedPort>,
}

impl Peer {
    /// Starts both instances in front of the echo server on `upstream` (a loopback port).
    pub fn start(kind: Kind, upstream: u16) -> Result<Self> {
        let program = which(kind.program())?;
        let dir = tempfile::tempdir()?;
        let c = certs(dir.path())?;
        // nginx and HAProxy cannot report ports they picked: theirs are reserved instead.
        let ports = [
            capmesh_tests::reserve_port()?,
            capmesh_tests::reserve_port()?,
            capmesh_tests::reserve_port()?,
        ];
        let (h1, h2, tls) = (ports[0].port(), ports[1].port(), ports[2].port());
        let (front_cfg, back_cfg) = match kind {
            Kind::Nginx => (nginx_front(&c, h1, h2, tls), nginx_back(&c, tls, upstream)),
            Kind::Haproxy => (haproxy_front(&c, h1, tls), haproxy_back(&c, tls, upstream)),
        };
        let spawn = |role: &str, cfg: &str| -> Result<Child> {
            let prefix = dir.path().join(role);
            std::fs::create_dir_all(prefix.join("logs"))?;
            let conf = dir.path().join(format!("{role}.conf"));
            write(&conf, cfg)?;
            let log = std::fs::File::create(dir.path().join(format!("{role}.log")))?;
            let mut cmd = Command::new(&program);
            match kind {
                Kind::Nginx => cmd
                    .arg("-p")
                    .arg(&prefix)
                    .arg("-c")
                    .arg(&conf)
                    .args(["-g", "daemon off;"]),
                Kind::Haproxy => cmd.arg("-db").arg("-f").arg(&conf),
            };
            cmd.stdin(Stdio::null())
                .stdout(Stdio::from(log.try_clone()?))
                .stderr(Stdio::from(log))
                .spawn()
                .with_context(|| format!("cannot start {}", program.display()))
        };
        let back = spawn("back", &back_cfg)?;
        let front = spawn("front", &front_cfg)?;
        let peer = Self {
            kind,
            front,
            back,
            entry_h1: h1,
            entry_h2: if kind == Kind::Nginx { h2 } else { h1 },
            dir,
            _ports: ports.into(),
        };
        peer.wait_listening(&[h1, tls])?;
        Ok(peer)
    }

    fn wait_listening(&self, ports: &[u16]) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        for port in ports {
            while std::net::TcpStream::connect(("127.0.0.1", *port)).is_err() {
                if Instant::now() > deadline {
                    bail!(
                        "{} is not listening on 127.0.0.1:{port} after 10 s; logs:\n{}",
                        self.kind.program(),
                        self.logs()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Both instances' logs.
    pub fn logs(&self) -> String {
        ["front", "back"]
            .iter()
            .map(|r| {
                let p = self.dir.path().join(format!("{r}.log"));
                format!(
                    "--- {r}:\n{}",
                    std::fs::read_to_string(p).unwrap_or_default()
                )
            })
            .collect()
    }

    /// Process ids: (entry instance, TLS-terminating instance).
    pub fn pids(&self) -> (u32, u32) {
        (self.front.id(), self.back.id())
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        for child in [&mut self.front, &mut self.back] {
            // An nginx worker outlives a SIGKILLed master: ask the master to stop its workers
            // (SIGTERM, fast shutdown), then kill whatever of the tree is left.
            let tree = crate::procstat::tree(child.id());
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(3);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            for pid in tree.iter().skip(1) {
                if Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .status();
                }
            }
        }
    }
}

/// Finds `name` on PATH or in the sbin directories Debian installs servers to.
pub fn which(name: &str) -> Result<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "{name} is not installed: `apt-get install -y {name}` (benches/run.sh does this when run as root)"
            )
        })
}

/// The same TLS 1.3 suite on every path: what rustls (capmesh) and OpenSSL both prefer.
const SUITE: &str = "TLS_AES_256_GCM_SHA384";

fn nginx_common() -> &'static str {
    "user root;\nworker_processes 1;\nworker_rlimit_nofile 65536;\npid logs/nginx.pid;\nerror_log stderr warn;\nevents { worker_connections 4096; multi_accept on; }\n"
}

fn nginx_front(c: &Certs, h1: u16, h2: u16, tls: u16) -> String {
    format!(
        "{common}http {{
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  upstream back {{ server 127.0.0.1:{tls}; keepalive 256; keepalive_requests 1000000; keepalive_timeout 120s; }}
  server {{
    listen 127.0.0.1:{h1};
    listen 127.0.0.1:{h2} http2;
    location / {{
      proxy_pass https://back;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_ssl_certificate {fc};
      proxy_ssl_certificate_key {fk};
      proxy_ssl_trusted_certificate {ca};
      proxy_ssl_verify on;
      proxy_ssl_name localhost;
      proxy_ssl_protocols TLSv1.3;
      proxy_ssl_conf_command Ciphersuites {SUITE};
      proxy_ssl_session_reuse on;
    }}
  }}
}}
",
        common = nginx_common(),
        fc = c.front_cert.display(),
        fk = c.front_key.display(),
        ca = c.ca.display(),
    )
}

fn nginx_back(c: &Certs, tls: u16, upstream: u16) -> String {
    format!(
        "{common}http {{
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  upstream echo {{ server 127.0.0.1:{upstream}; keepalive 256; keepalive_requests 1000000; keepalive_timeout 120s; }}
  server {{
    listen 127.0.0.1:{tls} ssl;
    ssl_certificate {bc};
    ssl_certificate_key {bk};
    ssl_protocols TLSv1.3;
    ssl_conf_command Ciphersuites {SUITE};
    ssl_client_certificate {ca};
    ssl_verify_client on;
    location / {{
      proxy_pass http://echo;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
    }}
  }}
}}
",
        common = nginx_common(),
        bc = c.back_cert.display(),
        bk = c.back_key.display(),
        ca = c.ca.display(),
    )
}

fn haproxy_global() -> String {
    format!(
        "global
  nbthread 1
  maxconn 4000
  ssl-default-bind-ciphersuites {SUITE}
  ssl-default-server-ciphersuites {SUITE}
  ssl-default-bind-options ssl-min-ver TLSv1.3
  ssl-default-server-options ssl-min-ver TLSv1.3
defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 1s
  timeout client 120s
  timeout server 120s
  timeout http-keep-alive 120s
"
    )
}

fn haproxy_front(c: &Certs, h1: u16, tls: u16) -> String {
    // A cleartext HTTP bind takes HTTP/1.1 and HTTP/2 prior knowledge on the same port.
    format!(
        "{global}frontend entry
  bind 127.0.0.1:{h1}
  default_backend mesh
backend mesh
  server back 127.0.0.1:{tls} ssl crt {fb} ca-file {ca} verify required alpn h2
",
        global = haproxy_global(),
        fb = c.front_both.display(),
        ca = c.ca.display(),
    )
}

fn haproxy_back(c: &Certs, tls: u16, upstream: u16) -> String {
    format!(
        "{global}frontend mtls
  bind 127.0.0.1:{tls} ssl crt {bb} ca-file {ca} verify required alpn h2,http/1.1
  default_backend agent
backend agent
  server echo 127.0.0.1:{upstream}
",
        global = haproxy_global(),
        bb = c.back_both.display(),
        ca = c.ca.display(),
    )
}
