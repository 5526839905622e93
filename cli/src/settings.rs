//! Where the control plane is and how to prove who we are: the global flags, resolved from (in
//! that order of precedence) the command line, `CAPMESH_*` environment variables, the config
//! file (`~/.config/capmesh/config.toml`) and the defaults that point into `./capmesh-data`,
//! the data dir a local `capmesh-control-plane` writes.

use std::fmt;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use serde::Deserialize;

use crate::output::Output;

/// The control plane's URL when nothing else says.
pub const DEFAULT_CONTROL_PLANE: &str = "https://127.0.0.1:8000";
/// The trust bundle used when nothing else says, if it exists.
pub const DEFAULT_CONTROL_PLANE_CA: &str = "./capmesh-data/ca.pem";
/// The admin token file used when nothing else says, if it exists.
pub const DEFAULT_ADMIN_TOKEN_FILE: &str = "./capmesh-data/admin-token";

/// The flags every subcommand takes (they may come before or after the subcommand).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Global options")]
pub struct GlobalArgs {
    /// The control plane's URL, or its replicas' URLs separated by commas (the next is tried
    /// when one is down) [default: https://127.0.0.1:8000].
    #[arg(long, global = true, env = "CAPMESH_CONTROL_PLANE", value_name = "URL")]
    pub control_plane: Option<String>,

    /// The control plane's trust bundle (`<data-dir>/ca.pem`) [default: ./capmesh-data/ca.pem
    /// if it exists].
    #[arg(
        long,
        global = true,
        env = "CAPMESH_CONTROL_PLANE_CA",
        value_name = "PEM-FILE"
    )]
    pub control_plane_ca: Option<PathBuf>,

    /// The admin token (prefer --admin-token-file: a flag shows in `ps`).
    #[arg(
        long,
        global = true,
        env = "CAPMESH_ADMIN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub admin_token: Option<String>,

    /// File holding the admin token (`<data-dir>/admin-token`) [default:
    /// ./capmesh-data/admin-token if it exists].
    #[arg(
        long,
        global = true,
        env = "CAPMESH_ADMIN_TOKEN_FILE",
        value_name = "FILE"
    )]
    pub admin_token_file: Option<PathBuf>,

    /// Config file with `control_plane`, `control_plane_ca`, `admin_token` and
    /// `admin_token_file` keys [default: ~/.config/capmesh/config.toml if it exists].
    #[arg(long, global = true, env = "CAPMESH_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Output format: tables for people, JSON for scripts.
    #[arg(
        short,
        long,
        global = true,
        env = "CAPMESH_OUTPUT",
        value_enum,
        default_value_t = Output::Table
    )]
    pub output: Output,
}

/// Where each global flag's value came from on the command line or in the environment (from
/// clap's matches; `None` when it was not given).
#[derive(Debug, Clone, Copy, Default)]
pub struct ArgSources {
    /// `--control-plane`.
    pub control_plane: Option<ValueSource>,
    /// `--control-plane-ca`.
    pub control_plane_ca: Option<ValueSource>,
    /// `--admin-token`.
    pub admin_token: Option<ValueSource>,
    /// `--admin-token-file`.
    pub admin_token_file: Option<ValueSource>,
}

impl ArgSources {
    /// Reads the sources of [`GlobalArgs`]' values from parsed matches.
    pub fn from_matches(matches: &clap::ArgMatches) -> Self {
        let source = |id: &str| matches.value_source(id);
        Self {
            control_plane: source("control_plane"),
            control_plane_ca: source("control_plane_ca"),
            admin_token: source("admin_token"),
            admin_token_file: source("admin_token_file"),
        }
    }
}

/// Where a setting's value came from, for messages ("the admin token from CAPMESH_ADMIN_TOKEN
/// was refused").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A command-line flag (`--control-plane`).
    Flag(&'static str),
    /// An environment variable (`CAPMESH_CONTROL_PLANE`).
    Env(&'static str),
    /// A key of the config file.
    File {
        /// The config file.
        path: PathBuf,
        /// The key.
        key: &'static str,
    },
    /// The local mesh a running `capmesh up` or `capmesh demo --keep` recorded (the record's
    /// path).
    LocalMesh(PathBuf),
    /// The built-in default.
    Default,
}

impl Origin {
    fn rank(&self) -> u8 {
        match self {
            Origin::Flag(_) => 3,
            Origin::Env(_) => 2,
            Origin::File { .. } => 1,
            Origin::LocalMesh(_) | Origin::Default => 0,
        }
    }

    fn from_source(source: Option<ValueSource>, flag: &'static str, env: &'static str) -> Self {
        match source {
            Some(ValueSource::EnvVariable) => Origin::Env(env),
            _ => Origin::Flag(flag),
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flag(flag) => f.write_str(flag),
            Origin::Env(var) => f.write_str(var),
            Origin::File { path, key } => write!(f, "{key} in {}", path.display()),
            Origin::LocalMesh(path) => {
                write!(f, "the running local mesh recorded in {}", path.display())
            }
            Origin::Default => f.write_str("the default"),
        }
    }
}

/// How the admin token is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// The token itself.
    Value(String, Origin),
    /// A file holding it.
    File(PathBuf, Origin),
}

impl TokenSource {
    /// Where it came from.
    pub fn origin(&self) -> &Origin {
        match self {
            TokenSource::Value(_, o) | TokenSource::File(_, o) => o,
        }
    }

    /// Says where the token came from, for messages: `--admin-token-file ./x` or `CAPMESH_ADMIN_TOKEN`.
    pub fn describe(&self) -> String {
        match self {
            TokenSource::Value(_, origin) => origin.to_string(),
            TokenSource::File(path, origin) => format!("{} ({origin})", path.display()),
        }
    }
}

/// Why the settings cannot be used. Each message names the setting and the fix.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A config file named with `--config` does not exist or cannot be read.
    #[error(
        "config file {path}: cannot read it: {source}: check the path given with --config (CAPMESH_CONFIG)",
        path = .path.display()
    )]
    ReadConfig {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has unknown keys.
    #[error(
        "config file {path}: {detail}\nfix the file: it takes the string keys control_plane, control_plane_ca, admin_token and admin_token_file",
        path = .path.display()
    )]
    ParseConfig {
        /// The file.
        path: PathBuf,
        /// The TOML parser's complaint (with line and column).
        detail: String,
    },
    /// Both token flags were given on the command line.
    #[error("--admin-token and --admin-token-file were both given: pass one of them")]
    TwoTokens,
    /// The admin token file cannot be read.
    #[error(
        "cannot read the admin token file {path} ({origin}): {source}: pass the admin-token file from the control plane's data dir, such as --admin-token-file ./capmesh-data/admin-token",
        path = .path.display()
    )]
    ReadToken {
        /// The file.
        path: PathBuf,
        /// Where the path came from.
        origin: Origin,
        /// Why.
        source: std::io::Error,
    },
    /// The admin token is empty.
    #[error(
        "the admin token from {0} is empty: pass the admin-token file from the control plane's data dir, such as --admin-token-file ./capmesh-data/admin-token"
    )]
    EmptyToken(String),
}

/// The keys of the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileValues {
    control_plane: Option<String>,
    control_plane_ca: Option<PathBuf>,
    admin_token: Option<String>,
    admin_token_file: Option<PathBuf>,
}

/// A loaded config file.
#[derive(Debug)]
struct ConfigFile {
    path: PathBuf,
    values: FileValues,
}

impl ConfigFile {
    /// Paths in the file are relative to the file's directory; `~/` is the home directory.
    fn path_value(&self, value: &Path) -> PathBuf {
        if let Ok(rest) = value.strip_prefix("~")
            && let Some(home) = home_dir()
        {
            return home.join(rest);
        }
        if value.is_absolute() {
            return value.to_path_buf();
        }
        self.path
            .parent()
            .map_or_else(|| value.to_path_buf(), |dir| dir.join(value))
    }

    fn origin(&self, key: &'static str) -> Origin {
        Origin::File {
            path: self.path.clone(),
            key,
        }
    }
}

fn home_dir() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
}

/// `$XDG_CONFIG_HOME/capmesh/config.toml`, else `~/.config/capmesh/config.toml`.
pub fn default_config_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| home_dir().map(|h| h.join(".config")))?;
    Some(base.join("capmesh").join("config.toml"))
}

fn load_config(explicit: Option<&Path>) -> Result<Option<ConfigFile>, SettingsError> {
    let (path, must_exist) = match explicit {
        Some(p) => (p.to_path_buf(), true),
        None => match default_config_path() {
            Some(p) => (p, false),
            None => return Ok(None),
        },
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if !must_exist && e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(SettingsError::ReadConfig { path, source }),
    };
    let values: FileValues = toml::from_str(&text).map_err(|e| SettingsError::ParseConfig {
        path: path.clone(),
        detail: e.to_string().trim_end().to_owned(),
    })?;
    Ok(Some(ConfigFile { path, values }))
}

/// The global settings, resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The control plane's URL as given, and where it came from.
    pub control_plane: (String, Origin),
    /// The trust bundle, if any was given or the default exists.
    pub control_plane_ca: Option<(PathBuf, Origin)>,
    /// The admin token, if any was given or the default file exists.
    pub admin_token: Option<TokenSource>,
    /// The output format.
    pub output: Output,
}

impl Settings {
    /// Resolves the settings: command line, then environment, then the config file, then the
    /// local mesh a running `capmesh up` / `capmesh demo --keep` recorded
    /// ([`crate::local_mesh`]), then the defaults in `./capmesh-data`. The config file is read
    /// here; the token file is read only when [`Settings::read_admin_token`] is called.
    pub fn resolve(args: &GlobalArgs, sources: &ArgSources) -> Result<Self, SettingsError> {
        let local = crate::local_mesh::current();
        Self::resolve_with(args, sources, local)
    }

    /// [`Settings::resolve`] with the local mesh given (tests).
    pub fn resolve_with(
        args: &GlobalArgs,
        sources: &ArgSources,
        local: Option<(PathBuf, crate::local_mesh::LocalMesh)>,
    ) -> Result<Self, SettingsError> {
        let config = load_config(args.config.as_deref())?;
        let file = config.as_ref();
        let local_origin = || local.as_ref().map(|(p, _)| Origin::LocalMesh(p.clone()));

        let control_plane = match (&args.control_plane, file) {
            (Some(url), _) => (
                url.clone(),
                Origin::from_source(
                    sources.control_plane,
                    "--control-plane",
                    "CAPMESH_CONTROL_PLANE",
                ),
            ),
            (None, Some(f)) if f.values.control_plane.is_some() => (
                f.values.control_plane.clone().unwrap_or_default(),
                f.origin("control_plane"),
            ),
            _ => match (&local, local_origin()) {
                (Some((_, mesh)), Some(origin)) => (mesh.control_plane.clone(), origin),
                _ => (DEFAULT_CONTROL_PLANE.to_owned(), Origin::Default),
            },
        };
        // The local mesh's trust bundle and token belong to its control plane only.
        let use_local = matches!(control_plane.1, Origin::LocalMesh(_));

        let control_plane_ca = match (&args.control_plane_ca, file) {
            (Some(path), _) => Some((
                path.clone(),
                Origin::from_source(
                    sources.control_plane_ca,
                    "--control-plane-ca",
                    "CAPMESH_CONTROL_PLANE_CA",
                ),
            )),
            (None, Some(f)) if f.values.control_plane_ca.is_some() => f
                .values
                .control_plane_ca
                .as_deref()
                .map(|p| (f.path_value(p), f.origin("control_plane_ca"))),
            _ => match (&local, local_origin()) {
                (Some((_, mesh)), Some(origin)) if use_local => {
                    Some((mesh.control_plane_ca.clone(), origin))
                }
                _ => Path::new(DEFAULT_CONTROL_PLANE_CA)
                    .exists()
                    .then(|| (PathBuf::from(DEFAULT_CONTROL_PLANE_CA), Origin::Default)),
            },
        };

        // Every way of giving the token, best first within the same level: the token itself
        // before a file.
        let mut candidates: Vec<TokenSource> = Vec::new();
        if let Some(token) = &args.admin_token {
            candidates.push(TokenSource::Value(
                token.clone(),
                Origin::from_source(sources.admin_token, "--admin-token", "CAPMESH_ADMIN_TOKEN"),
            ));
        }
        if let Some(path) = &args.admin_token_file {
            candidates.push(TokenSource::File(
                path.clone(),
                Origin::from_source(
                    sources.admin_token_file,
                    "--admin-token-file",
                    "CAPMESH_ADMIN_TOKEN_FILE",
                ),
            ));
        }
        if let [
            TokenSource::Value(_, Origin::Flag(_)),
            TokenSource::File(_, Origin::Flag(_)),
        ] = candidates.as_slice()
        {
            return Err(SettingsError::TwoTokens);
        }
        if let Some(f) = file {
            if let Some(token) = &f.values.admin_token {
                candidates.push(TokenSource::Value(token.clone(), f.origin("admin_token")));
            }
            if let Some(path) = &f.values.admin_token_file {
                candidates.push(TokenSource::File(
                    f.path_value(path),
                    f.origin("admin_token_file"),
                ));
            }
        }
        match (&local, local_origin()) {
            (Some((_, mesh)), Some(origin)) if use_local => {
                candidates.push(TokenSource::File(mesh.admin_token_file.clone(), origin));
            }
            _ => {
                if Path::new(DEFAULT_ADMIN_TOKEN_FILE).exists() {
                    candidates.push(TokenSource::File(
                        PathBuf::from(DEFAULT_ADMIN_TOKEN_FILE),
                        Origin::Default,
                    ));
                }
            }
        }
        // `max_by_key` keeps the last of equals; reverse so the first listed wins ties.
        let admin_token = candidates
            .into_iter()
            .rev()
            .max_by_key(|c| c.origin().rank());

        Ok(Self {
            control_plane,
            control_plane_ca,
            admin_token,
            output: args.output,
        })
    }

    /// The admin token, read from its file if it was given as one; `None` when none was given.
    pub fn read_admin_token(&self) -> Result<Option<String>, SettingsError> {
        let token = match &self.admin_token {
            None => return Ok(None),
            Some(TokenSource::Value(token, _)) => token.trim().to_owned(),
            Some(TokenSource::File(path, origin)) => std::fs::read_to_string(path)
                .map_err(|source| SettingsError::ReadToken {
                    path: path.clone(),
                    origin: origin.clone(),
                    source,
                })?
                .trim()
                .to_owned(),
        };
        if token.is_empty() {
            let from = self
                .admin_token
                .as_ref()
                .map(TokenSource::describe)
                .unwrap_or_default();
            return Err(SettingsError::EmptyToken(from));
        }
        Ok(Some(token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> GlobalArgs {
        GlobalArgs {
            control_plane: None,
            control_plane_ca: None,
            admin_token: None,
            admin_token_file: None,
            config: None,
            output: Output::Table,
        }
    }

    fn write_config(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("config.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn flags_beat_the_config_file_and_paths_in_it_are_relative_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(
            dir.path(),
            "control_plane = \"https://cp.example:8000\"\ncontrol_plane_ca = \"ca.pem\"\nadmin_token = \"from-file\"\n",
        );
        let mut a = args();
        a.config = Some(path.clone());
        let s = Settings::resolve_with(&a, &ArgSources::default(), None).unwrap();
        assert_eq!(s.control_plane.0, "https://cp.example:8000");
        assert_eq!(
            s.control_plane.1,
            Origin::File {
                path: path.clone(),
                key: "control_plane"
            }
        );
        assert_eq!(
            s.control_plane_ca.clone().unwrap().0,
            dir.path().join("ca.pem")
        );
        assert_eq!(s.read_admin_token().unwrap().as_deref(), Some("from-file"));

        a.control_plane = Some("https://flag:1".into());
        a.admin_token_file = Some(dir.path().join("token"));
        std::fs::write(dir.path().join("token"), "from-flag-file\n").unwrap();
        let sources = ArgSources {
            control_plane: Some(ValueSource::CommandLine),
            admin_token_file: Some(ValueSource::EnvVariable),
            ..Default::default()
        };
        let s = Settings::resolve_with(&a, &sources, None).unwrap();
        assert_eq!(s.control_plane.0, "https://flag:1");
        assert_eq!(s.control_plane.1, Origin::Flag("--control-plane"));
        assert_eq!(
            s.read_admin_token().unwrap().as_deref(),
            Some("from-flag-file")
        );
        assert_eq!(
            s.admin_token.unwrap().origin(),
            &Origin::Env("CAPMESH_ADMIN_TOKEN_FILE")
        );
    }

    #[test]
    fn a_flag_token_file_beats_an_env_token() {
        let mut a = args();
        a.admin_token = Some("env".into());
        a.admin_token_file = Some("/nonexistent/token".into());
        let sources = ArgSources {
            admin_token: Some(ValueSource::EnvVariable),
            admin_token_file: Some(ValueSource::CommandLine),
            ..Default::default()
        };
        let s = Settings::resolve_with(&a, &sources, None).unwrap();
        let err = s.read_admin_token().unwrap_err().to_string();
        assert!(
            err.contains("/nonexistent/token") && err.contains("--admin-token-file"),
            "{err}"
        );
        let both = ArgSources {
            admin_token: Some(ValueSource::CommandLine),
            admin_token_file: Some(ValueSource::CommandLine),
            ..Default::default()
        };
        assert!(matches!(
            Settings::resolve_with(&a, &both, None),
            Err(SettingsError::TwoTokens)
        ));
    }

    #[test]
    fn bad_config_files_are_named_with_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(dir.path(), "control_plane = \"x\"\nadmin = \"typo\"\n");
        let mut a = args();
        a.config = Some(path.clone());
        let err = Settings::resolve_with(&a, &ArgSources::default(), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&path.display().to_string()) && err.contains("admin"),
            "{err}"
        );
        a.config = Some(dir.path().join("missing.toml"));
        let err = Settings::resolve_with(&a, &ArgSources::default(), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("missing.toml") && err.contains("--config"),
            "{err}"
        );
    }

    #[test]
    fn a_running_local_mesh_is_found_unless_something_says_otherwise() {
        let mesh = crate::local_mesh::LocalMesh {
            control_plane: "https://127.0.0.1:41000".into(),
            control_plane_ca: "/tmp/mesh/ca.pem".into(),
            admin_token_file: "/tmp/mesh/admin-token".into(),
            data_dir: "/tmp/mesh".into(),
            pid: 1,
            started_by: "capmesh up -f demo.yaml".into(),
        };
        let record = PathBuf::from("/state/capmesh/local-mesh.json");
        let local = || Some((record.clone(), mesh.clone()));
        let dir = tempfile::tempdir().unwrap();
        // An empty config file, so no user's file takes part.
        let none = GlobalArgs {
            config: Some(write_config(dir.path(), "")),
            ..args()
        };
        let s = Settings::resolve_with(&none, &ArgSources::default(), local()).unwrap();
        assert_eq!(s.control_plane.0, "https://127.0.0.1:41000");
        assert!(matches!(s.control_plane.1, Origin::LocalMesh(_)));
        assert_eq!(
            s.control_plane_ca.as_ref().map(|(p, _)| p.clone()),
            Some(PathBuf::from("/tmp/mesh/ca.pem"))
        );
        assert!(matches!(
            s.admin_token,
            Some(TokenSource::File(ref p, Origin::LocalMesh(_))) if p == Path::new("/tmp/mesh/admin-token")
        ));
        // A control plane named explicitly is not the local mesh's: its files are not used.
        let other = GlobalArgs {
            control_plane: Some("https://cp.example:8000".into()),
            ..none
        };
        let s = Settings::resolve_with(&other, &ArgSources::default(), local()).unwrap();
        assert_eq!(s.control_plane.0, "https://cp.example:8000");
        assert!(!matches!(
            s.control_plane_ca,
            Some((_, Origin::LocalMesh(_)))
        ));
        assert!(!matches!(
            s.admin_token,
            Some(TokenSource::File(_, Origin::LocalMesh(_)))
        ));
    }
}
