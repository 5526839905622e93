//! The local mesh a running `capmesh up` or `capmesh demo --keep` started, recorded so that
//! `capmesh list`, `status`, `call`, … find its control plane, trust bundle and admin token from
//! any directory, without flags.
//!
//! The record is `$XDG_STATE_HOME/capmesh/local-mesh.json` (else
//! `~/.local/state/capmesh/local-mesh.json`). It names the process that wrote it and is ignored
//! once that process is gone; the writer removes it when it stops.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where a local mesh's control plane is and how to prove who we are to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalMesh {
    /// The control plane's URL.
    pub control_plane: String,
    /// Its trust bundle (`<data-dir>/ca.pem`).
    pub control_plane_ca: PathBuf,
    /// Its admin token file (`<data-dir>/admin-token`).
    pub admin_token_file: PathBuf,
    /// The data dir.
    pub data_dir: PathBuf,
    /// The `capmesh` process that runs it.
    pub pid: u32,
    /// `capmesh up -f <file>` or `capmesh demo --keep`.
    pub started_by: String,
}

/// The record's path.
pub fn path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|h| !h.is_empty())
                .map(|h| PathBuf::from(h).join(".local").join("state"))
        })?;
    Some(base.join("capmesh").join("local-mesh.json"))
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The recorded local mesh, if its process still runs.
pub fn current() -> Option<(PathBuf, LocalMesh)> {
    let path = path()?;
    let text = std::fs::read_to_string(&path).ok()?;
    let mesh: LocalMesh = serde_json::from_str(&text).ok()?;
    alive(mesh.pid).then_some((path, mesh))
}

/// Removes the record when dropped, if it is still this process's.
#[derive(Debug)]
pub struct Recorded {
    path: PathBuf,
}

impl Drop for Recorded {
    fn drop(&mut self) {
        let ours = std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|t| serde_json::from_str::<LocalMesh>(&t).ok())
            .is_some_and(|m| m.pid == std::process::id());
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Records `mesh` as the running local mesh. Failing to write it is not an error for the mesh
/// (the command prints the flags to use instead), so this returns `None` then.
pub fn record(mesh: &LocalMesh) -> Option<Recorded> {
    let path = path()?;
    std::fs::create_dir_all(path.parent()?).ok()?;
    let text = serde_json::to_string_pretty(mesh).ok()?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).ok()?;
    std::fs::rename(&tmp, &path).ok()?;
    Some(Recorded { path })
}

/// The flags that reach `mesh` from anywhere, for messages: `--control-plane … --control-plane-ca
/// … --admin-token-file …`.
pub fn flags(mesh: &LocalMesh) -> String {
    format!(
        "--control-plane {} --control-plane-ca {} --admin-token-file {}",
        mesh.control_plane,
        mesh.control_plane_ca.display(),
        mesh.admin_token_file.display()
    )
}
