//! Certificates made with the `openssl` command line, as an outside organisation (an entity)
//! would make them: its own root CA and leaf certificates with a SPIFFE URI SAN. Nothing here
//! uses capmesh's own CA code, so the mesh is tested against certificates it did not shape.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Installs `openssl` with apt-get when it is missing (the tests run as root in CI).
pub fn ensure_openssl() -> Result<()> {
    if Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    let status = Command::new("sh")
        .args([
            "-c",
            "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl",
        ])
        .status()
        .context("cannot run apt-get to install openssl")?;
    if !status.success() {
        bail!("openssl is missing and apt-get could not install it: install it (Debian: openssl)");
    }
    Ok(())
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .context("cannot run openssl")?;
    if !out.status.success() {
        bail!(
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A root CA made by openssl (P-256), in its own temporary directory.
#[derive(Debug)]
pub struct OpensslCa {
    dir: tempfile::TempDir,
    serial: std::sync::atomic::AtomicU32,
}

/// A leaf certificate and its key, as files.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// The private key (PEM).
    pub key: PathBuf,
}

impl Leaf {
    /// The certificate's text.
    pub fn cert_pem(&self) -> Result<String> {
        Ok(std::fs::read_to_string(&self.cert)?)
    }

    /// The key's text.
    pub fn key_pem(&self) -> Result<String> {
        Ok(std::fs::read_to_string(&self.key)?)
    }
}

impl OpensslCa {
    /// A new root CA named `name`.
    pub fn new(name: &str) -> Result<Self> {
        ensure_openssl()?;
        let dir = tempfile::tempdir()?;
        openssl(
            dir.path(),
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                "ca.key",
            ],
        )?;
        openssl(
            dir.path(),
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                "ca.key",
                "-sha256",
                "-days",
                "2",
                "-subj",
                &format!("/O={name}/CN={name} root CA"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-out",
                "ca.pem",
            ],
        )?;
        Ok(Self {
            dir,
            serial: std::sync::atomic::AtomicU32::new(1),
        })
    }

    /// The CA certificate's path.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The CA certificate (PEM).
    pub fn ca_pem(&self) -> Result<String> {
        Ok(std::fs::read_to_string(self.ca_path())?)
    }

    /// A leaf for `spiffe_id` (URI SAN; client and server auth), valid for a day.
    pub fn issue(&self, spiffe_id: &str) -> Result<Leaf> {
        let n = self
            .serial
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let d = self.dir.path();
        let (key, csr, cert, ext) = (
            format!("leaf{n}.key"),
            format!("leaf{n}.csr"),
            format!("leaf{n}.pem"),
            format!("leaf{n}.ext"),
        );
        std::fs::write(
            d.join(&ext),
            format!(
                "subjectAltName=URI:{spiffe_id}\nbasicConstraints=critical,CA:FALSE\n\
                 keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n"
            ),
        )?;
        openssl(
            d,
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                &key,
            ],
        )?;
        openssl(
            d,
            &[
                "req",
                "-new",
                "-key",
                &key,
                "-subj",
                "/CN=workload",
                "-out",
                &csr,
            ],
        )?;
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-set_serial",
                &format!("{}", 1000 + n),
                "-days",
                "1",
                "-sha256",
                "-extfile",
                &ext,
                "-out",
                &cert,
            ],
        )?;
        Ok(Leaf {
            cert: d.join(cert),
            key: d.join(key),
        })
    }
}
