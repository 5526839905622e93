//! The walk-throughs in README.md and docs/proxy.md, run as written.
//!
//! The commands are read from the Markdown itself, so the documents and this test cannot drift:
//! a fenced `sh` block preceded by `<!-- walkthrough NAME: start -->` holds long-running
//! commands (each started in the background, as in a terminal of its own); one preceded by
//! `<!-- walkthrough NAME -->` holds commands that must each exit 0 (each is retried for up to
//! 60 s while the processes started above come up). Blocks of one NAME form one walk-through,
//! run in order, in a fresh working directory (with a copy of `examples/mesh/`), inside new
//! network and PID namespaces: the documented default ports are free there, nothing reaches
//! beyond loopback, and every process dies with the namespace.
//!
//! Needs root, `unshare` and `ip`; when one is missing the test installs it with apt-get, and
//! fails saying what is missing if it cannot (it never skips). The binaries come from this
//! build (`capmesh`, `capmesh-control-plane`, `capmesh-proxy` put first on `PATH`).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use capmesh_tests::python::repo_root;
use capmesh_tests::{scrub_env, workspace_bin};

/// How a block's commands run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// In the background, left running.
    Start,
    /// In the foreground; must exit 0.
    Check,
}

/// One command of a walk-through, with where it was written.
#[derive(Debug, Clone)]
struct Step {
    mode: Mode,
    command: String,
    at: String,
}

/// The walk-throughs of a Markdown document, by name, in document order.
fn walkthroughs(doc: &str, file: &str) -> Result<BTreeMap<String, Vec<Step>>> {
    let mut out: BTreeMap<String, Vec<Step>> = BTreeMap::new();
    let mut pending: Option<(String, Mode, usize)> = None;
    let mut block: Option<(String, Mode, Vec<String>, usize)> = None;
    for (i, raw) in doc.lines().enumerate() {
        let line = raw.trim();
        if let Some((name, mode, mut lines, start)) = block.take() {
            if line == "```" {
                let mut command = String::new();
                for l in lines.drain(..) {
                    let l = l.trim();
                    if command.is_empty() && (l.is_empty() || l.starts_with('#')) {
                        continue;
                    }
                    match l.strip_suffix('\\') {
                        Some(head) => {
                            command.push_str(head);
                            command.push(' ');
                        }
                        None => {
                            command.push_str(l);
                            out.entry(name.clone()).or_default().push(Step {
                                mode,
                                command: std::mem::take(&mut command),
                                at: format!("{file}:{}", start + 1),
                            });
                        }
                    }
                }
                if !command.is_empty() {
                    bail!(
                        "{file}:{}: the block ends inside a continued line",
                        start + 1
                    );
                }
            } else {
                lines.push(raw.to_owned());
                block = Some((name, mode, lines, start));
            }
            continue;
        }
        if let Some(marker) = line
            .strip_prefix("<!-- walkthrough ")
            .and_then(|m| m.strip_suffix("-->"))
        {
            let marker = marker.trim();
            let (name, mode) = match marker.strip_suffix(": start") {
                Some(name) => (name.trim().to_owned(), Mode::Start),
                None => (marker.to_owned(), Mode::Check),
            };
            pending = Some((name, mode, i));
            continue;
        }
        if line.starts_with("```") {
            if let Some((name, mode, _)) = pending.take() {
                if line != "```sh" {
                    bail!("{file}:{}: a walk-through block must be ```sh", i + 1);
                }
                block = Some((name, mode, Vec::new(), i));
            }
            continue;
        }
        if !line.is_empty()
            && let Some((_, _, at)) = &pending
        {
            bail!(
                "{file}:{}: the walk-through marker is not followed by a ```sh block",
                at + 1
            );
        }
    }
    Ok(out)
}

/// Runs a command to completion and returns its output (never fails on the exit code).
fn run(program: &str, args: &[&str]) -> Result<Output> {
    Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program} {args:?}"))
}

fn prerequisites() -> Result<()> {
    let uid = run("id", &["-u"])?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        bail!("the walk-throughs run in network namespaces this test creates: run it as root");
    }
    let have = |tool: &str| -> Result<bool> {
        Ok(run("sh", &["-c", &format!("command -v {tool}")])?
            .status
            .success())
    };
    let mut missing = Vec::new();
    for (tool, package) in [
        ("unshare", "util-linux"),
        ("ip", "iproute2"),
        ("curl", "curl"),
    ] {
        if !have(tool)? {
            missing.push(package);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("installing {missing:?} with apt-get for the walk-through test");
    let _ = run("apt-get", &["update", "-qq"]);
    let mut args = vec!["install", "-y", "-qq"];
    args.extend(&missing);
    let out = Command::new("apt-get")
        .args(&args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .context("apt-get is not available")?;
    if !out.status.success() {
        bail!(
            "{missing:?} are missing and apt-get could not install them: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The script that runs one walk-through inside the namespaces.
const RUNNER: &str = r#"set -u
ip link set lo up
cd "$WORK"
pids=()
stop() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  sleep 1
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null; done
}
trap stop EXIT
start() { # start N: runs $STEPS/N.sh in the background
  bash "$STEPS/$1.sh" > "$LOGS/$1.log" 2>&1 &
  pids+=($!)
  echo "started $1: $(head -c 200 "$STEPS/$1.sh")"
}
check() { # check N: runs $STEPS/N.sh until it exits 0 (60 s at most)
  local deadline=$((SECONDS + 60))
  until bash "$STEPS/$1.sh" > "$LOGS/$1.out" 2> "$LOGS/$1.err"; do
    if (( SECONDS > deadline )); then
      echo "FAILED $1: $(cat "$STEPS/$1.sh")"
      echo "--- its stdout:"; cat "$LOGS/$1.out"
      echo "--- its stderr:"; cat "$LOGS/$1.err"
      for f in "$LOGS"/*.log; do echo "--- background $(basename "$f"):"; tail -n 30 "$f"; done
      exit 1
    fi
    sleep 0.5
  done
  echo "ok $1: $(head -c 200 "$STEPS/$1.sh")"
}
"#;

fn run_walkthrough(name: &str, steps: &[Step], bin_dir: &Path) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (work, step_dir, logs) = (
        dir.path().join("work"),
        dir.path().join("steps"),
        dir.path().join("logs"),
    );
    for d in [&work, &step_dir, &logs] {
        std::fs::create_dir_all(d)?;
    }
    // The documents name files of the repository relative to its root.
    let mesh_src = repo_root().join("examples").join("mesh");
    let mesh_dst = work.join("examples").join("mesh");
    std::fs::create_dir_all(&mesh_dst)?;
    for entry in std::fs::read_dir(&mesh_src)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), mesh_dst.join(entry.file_name()))?;
        }
    }
    let mut script = String::from(RUNNER);
    for (n, step) in steps.iter().enumerate() {
        // A started command replaces its shell, so stopping it stops the program itself.
        let exec = if step.mode == Mode::Start {
            "exec "
        } else {
            ""
        };
        std::fs::write(
            step_dir.join(format!("{n}.sh")),
            format!("# {}\n{exec}{}\n", step.at, step.command),
        )?;
        script.push_str(match step.mode {
            Mode::Start => "start ",
            Mode::Check => "check ",
        });
        script.push_str(&format!("{n}\n"));
    }
    script.push_str("echo WALKTHROUGH-DONE\n");
    let runner = dir.path().join("run.sh");
    std::fs::write(&runner, script)?;

    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new("unshare");
    scrub_env(&mut cmd)
        .args([
            "--net",
            "--pid",
            "--fork",
            "--mount-proc",
            "--kill-child",
            "bash",
        ])
        .arg(&runner)
        .env("PATH", path)
        .env("HOME", dir.path())
        .env_remove("XDG_STATE_HOME")
        .env_remove("XDG_CONFIG_HOME")
        .env("NO_COLOR", "1")
        .env("WORK", &work)
        .env("STEPS", &step_dir)
        .env("LOGS", &logs)
        .current_dir(&work);
    let child = cmd.output().context("cannot run unshare")?;
    let stdout = String::from_utf8_lossy(&child.stdout);
    let stderr = String::from_utf8_lossy(&child.stderr);
    if !child.status.success() || !stdout.contains("WALKTHROUGH-DONE") {
        bail!(
            "walk-through {name:?} failed ({}):\n{stdout}\n{stderr}",
            child.status
        );
    }
    eprintln!("walk-through {name:?}:\n{stdout}");
    Ok(())
}

fn documents() -> Vec<(&'static str, PathBuf)> {
    let root = repo_root();
    vec![
        ("README.md", root.join("README.md")),
        ("docs/proxy.md", root.join("docs").join("proxy.md")),
    ]
}

#[test]
fn walkthrough_blocks_are_read_from_the_markdown() {
    let doc = "text\n<!-- walkthrough w: start -->\n```sh\n# a comment\nserver --port 1 \\\n  --flag\n```\n\n<!-- walkthrough w -->\n```sh\ncurl -sf x\necho 'a b'\n```\n";
    let w = walkthroughs(doc, "t.md").unwrap();
    let steps = &w["w"];
    assert_eq!(steps.len(), 3);
    assert_eq!(steps[0].mode, Mode::Start);
    assert_eq!(steps[0].command, "server --port 1  --flag");
    assert_eq!(steps[2].command, "echo 'a b'");
    assert!(walkthroughs("<!-- walkthrough w -->\n```bash\nx\n```\n", "t.md").is_err());
    assert!(walkthroughs("<!-- walkthrough w -->\nprose\n", "t.md").is_err());
    // Both documents hold walk-throughs, and every one starts something and checks something.
    for (label, path) in documents() {
        let text = std::fs::read_to_string(&path).unwrap();
        let found = walkthroughs(&text, label).unwrap();
        assert!(!found.is_empty(), "{label} has no walk-through");
        for (name, steps) in &found {
            assert!(
                steps.iter().any(|s| s.mode == Mode::Start)
                    && steps.iter().any(|s| s.mode == Mode::Check),
                "{label}: walk-through {name} must start something and check something"
            );
        }
    }
}

#[test]
fn readme_and_proxy_walkthroughs_run_as_written() {
    prerequisites().unwrap_or_else(|e| panic!("{e:#}"));
    let mut bin_dir = None;
    for name in ["capmesh", "capmesh-control-plane", "capmesh-proxy"] {
        let bin = workspace_bin(name).unwrap_or_else(|e| {
            panic!(
                "{e:#}: the walk-throughs run the built binaries (cargo build --workspace --bins)"
            )
        });
        bin_dir = bin.parent().map(Path::to_path_buf);
    }
    let bin_dir = bin_dir.unwrap();
    let mut failures = Vec::new();
    let mut ran = 0;
    for (label, path) in documents() {
        let text = std::fs::read_to_string(&path).unwrap();
        for (name, steps) in walkthroughs(&text, label).unwrap() {
            ran += 1;
            if let Err(e) = run_walkthrough(&format!("{label} {name}"), &steps, &bin_dir) {
                failures.push(format!("{e:#}"));
            }
            // The namespaces are gone; give the kernel a moment to reap their processes.
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    assert!(ran >= 3, "only {ran} walk-throughs found");
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
