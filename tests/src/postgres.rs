//! A throwaway PostgreSQL server for tests and benches, from Debian's `postgresql` package:
//! `initdb` and `pg_ctl` in a temporary directory, on a reserved loopback port, password
//! authentication (SCRAM) for TCP. Run as root, the server runs as `nobody` (PostgreSQL refuses
//! to run as root). The package is installed with apt-get when it is missing and we are root.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::{ReservedPort, reserve_port};

/// The database, user and password every test server has.
const DATABASE: &str = "capmesh";
const USER: &str = "capmesh";
const PASSWORD: &str = "capmesh-test-password";

/// A running PostgreSQL. Stopped (immediately) when dropped.
#[derive(Debug)]
pub struct Postgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    /// The TCP port on 127.0.0.1 (held for the server's whole life, restarts included).
    pub port: u16,
    _reserved: ReservedPort,
    run_as: Option<String>,
}

/// Serializes installs within this process; apt-get's own lock covers other processes (we
/// retry when it is held).
static INSTALL: Mutex<()> = Mutex::new(());

fn newest_bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, bin)| bin)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn run(cmd: &mut Command, what: &str) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// The PostgreSQL binaries, installing Debian's package first when they are missing.
pub fn ensure_installed() -> Result<PathBuf> {
    let _guard = INSTALL.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(bin) = newest_bin_dir() {
        return Ok(bin);
    }
    if !is_root() {
        bail!(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): run `apt-get install -y postgresql` as root, or .ci/run"
        );
    }
    let mut last = String::new();
    for attempt in 0..30 {
        if attempt == 1 {
            let _ = Command::new("apt-get")
                .args(["update", "-qq"])
                .stdin(Stdio::null())
                .output();
        }
        let out = Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "postgresql",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
            .context("cannot run apt-get")?;
        if out.status.success()
            && let Some(bin) = newest_bin_dir()
        {
            return Ok(bin);
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        // Another process holds the dpkg lock (installing the same thing): wait for it.
        std::thread::sleep(Duration::from_secs(2));
        if let Some(bin) = newest_bin_dir() {
            return Ok(bin);
        }
    }
    bail!("apt-get install postgresql failed:\n{last}")
}

impl Postgres {
    /// Creates a cluster in a fresh temporary directory and starts it; waits until it accepts
    /// connections.
    pub fn start() -> Result<Self> {
        let bin = ensure_installed()?;
        let dir = tempfile::tempdir()?;
        let run_as = if is_root() {
            Some("nobody".to_owned())
        } else {
            None
        };
        if let Some(user) = &run_as {
            run(
                Command::new("chown")
                    .arg(format!("{user}:"))
                    .arg(dir.path()),
                "chown",
            )?;
        }
        let reserved = reserve_port()?;
        let pg = Self {
            bin,
            dir,
            port: reserved.port(),
            _reserved: reserved,
            run_as,
        };
        let pwfile = pg.dir.path().join("pw");
        std::fs::write(&pwfile, format!("{PASSWORD}\n"))?;
        if let Some(user) = &pg.run_as {
            run(
                Command::new("chown").arg(format!("{user}:")).arg(&pwfile),
                "chown",
            )?;
        }
        let mut initdb = pg.command("initdb");
        initdb
            .arg("-D")
            .arg(pg.data())
            .args(["-U", USER, "-E", "UTF8", "--locale=C", "--no-sync"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"]);
        run(&mut initdb, "initdb")?;
        pg.start_again()?;
        let mut createdb = pg.command("createdb");
        createdb
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &pg.port.to_string(),
                "-U",
                USER,
                DATABASE,
            ])
            .env("PGPASSWORD", PASSWORD);
        run(&mut createdb, "createdb")?;
        Ok(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// A command for one of the server's binaries, as the unprivileged user when we are root.
    fn command(&self, name: &str) -> Command {
        let program = self.bin.join(name);
        match &self.run_as {
            Some(user) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={user}"))
                    .arg(format!("--regid={}", group_of(user)))
                    .arg("--clear-groups")
                    .arg("--")
                    .arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    /// `postgres://capmesh:…@127.0.0.1:<port>/capmesh`.
    pub fn url(&self) -> String {
        format!(
            "postgres://{USER}:{PASSWORD}@127.0.0.1:{}/{DATABASE}",
            self.port
        )
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Stops the server (fast shutdown: open connections are ended) and waits for it.
    pub fn stop(&self) -> Result<()> {
        let mut stop = self.command("pg_ctl");
        stop.arg("-D")
            .arg(self.data())
            .args(["-m", "fast", "-w", "stop"]);
        run(&mut stop, "pg_ctl stop").map(|_| ())
    }

    /// Starts the (stopped) server again on the same port and data.
    pub fn start_again(&self) -> Result<()> {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -c port={} -c unix_socket_directories={} -c fsync=off -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        let mut start = self.command("pg_ctl");
        start
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.log_path())
            .args(["-w", "-t", "60", "-o", &options, "start"]);
        run(&mut start, "pg_ctl start")
            .map(|_| ())
            .with_context(|| format!("PostgreSQL log:\n{}", self.log()))
    }

    /// The directory the cluster lives in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn group_of(user: &str) -> String {
    Command::new("id")
        .args(["-g", user])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|g| !g.is_empty())
        .unwrap_or_else(|| "65534".into())
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let mut stop = self.command("pg_ctl");
        stop.arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = stop.status();
    }
}
