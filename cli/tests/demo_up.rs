//! `capmesh demo` and `capmesh up`, run as a user runs them.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn capmesh() -> Command {
    Command::new(env!("CARGO_BIN_EXE_capmesh"))
}

/// `capmesh` with no `CAPMESH_*` from the caller and `HOME` in `home` (where a running mesh is
/// recorded).
fn capmesh_home(home: &std::path::Path) -> Command {
    let mut cmd = capmesh();
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(|k| k.starts_with("CAPMESH_")) {
            cmd.env_remove(key);
        }
    }
    cmd.env("HOME", home).env_remove("XDG_STATE_HOME");
    cmd
}

/// Waits for `child` to exit within `limit`, killing it past that.
fn wait_bounded(
    child: &mut std::process::Child,
    limit: Duration,
    what: &str,
) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn demo_shows_routing_identities_and_a_failover_without_failed_calls() {
    // Written to a file, as `capmesh demo > demo.txt` does: plain text, no escape codes.
    let home = tempfile::tempdir().unwrap();
    let out_path = home.path().join("demo.txt");
    let file = std::fs::File::create(&out_path).unwrap();
    let out = capmesh_home(home.path())
        .arg("demo")
        .env_remove("NO_COLOR")
        .env("TERM", "xterm-256color")
        .stdin(Stdio::null())
        .stdout(Stdio::from(file))
        .output()
        .unwrap();
    let stdout = std::fs::read_to_string(&out_path).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "capmesh demo failed:\n{stdout}\n{stderr}"
    );
    assert!(
        !stdout.contains('\x1b') && !stderr.contains('\x1b'),
        "escape codes in redirected output:\n{stdout:?}"
    );
    // Routing, with the provider's verified identity for each call.
    for who in ["agent/weather-eu", "agent/flights", "agent/llm-claude"] {
        assert!(
            stdout.contains(&format!("→ spiffe://capmesh.local/ns/default/{who}")),
            "{who} missing:\n{stdout}"
        );
    }
    // The failover, with calls in flight: no call that had not reached the killed provider
    // failed, and traffic is on the other provider.
    assert!(
        stdout.contains("; 0 failed that never reached llm-claude"),
        "{stdout}"
    );
    assert!(stdout.contains("traffic moved to llm-openai"), "{stdout}");
    // It ends with the trip's trace: each of the planner's three calls is a client span at the
    // planner's sidecar with the provider's server span under it.
    let tree = stdout
        .split("The trip's trace")
        .nth(1)
        .unwrap_or_else(|| panic!("no trace tree:\n{stdout}"));
    assert!(tree.contains(" · 6 spans · "), "{tree}");
    for (tool, provider) in [
        ("get_weather", "weather-eu"),
        ("search_flights", "flights"),
        ("chat", "llm-claude"),
    ] {
        let client = format!("tools/call {tool}");
        let at = tree
            .find(&client)
            .unwrap_or_else(|| panic!("{tool} missing:\n{tree}"));
        let after = &tree[at..];
        assert!(after.contains("client span at planner"), "{tree}");
        assert!(
            after.contains(&format!("└─ {client}"))
                && after.contains(&format!("server span at {provider}")),
            "no server span at {provider} under {tool}:\n{tree}"
        );
    }
    assert!(stdout.contains("Temporary files removed"), "{stdout}");
    assert!(
        !stdout.contains("{\"") && !stdout.contains("Some("),
        "{stdout}"
    );
}

#[test]
fn demo_piped_into_head_ends_quietly() {
    let home = tempfile::tempdir().unwrap();
    let mut child = capmesh_home(home.path())
        .arg("demo")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // `| head -3`: read three lines, then close the pipe.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for _ in 0..3 {
        lines.next().unwrap().unwrap();
    }
    drop(lines);
    let mut stderr = child.stderr.take().unwrap();
    let status = wait_bounded(
        &mut child,
        Duration::from_secs(90),
        "capmesh demo | head -3",
    );
    let mut err = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut err).unwrap();
    assert!(
        status.success(),
        "capmesh demo | head -3 exited with {status}:\n{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn demo_refuses_unknown_flags() {
    let out = capmesh().args(["demo", "--bogus"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--bogus"));
}

/// The port in `http://127.0.0.1:<port>/…` (or `https://`) found in `line` after `after`.
fn port_after(line: &str, after: &str) -> Option<u16> {
    let rest = &line[line.find(after)? + after.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[test]
fn up_runs_the_file_until_ctrl_c_and_stops_everything() {
    let dir = tempfile::tempdir().unwrap();
    // Every port is 0: each process binds one and reports it.
    let file = dir.path().join("mesh.yaml");
    std::fs::write(
        &file,
        "control_plane:\n  listen: 127.0.0.1:0\n  data_dir: data\n\
         agents:\n\
         \x20 - name: weather\n    command: [capmesh, agent, weather, --port, \"0\", --name, weather]\n    url: http://127.0.0.1:0/mcp\n\
         \x20 - name: planner\n    sidecar: [--dependency, get_weather]\n",
    )
    .unwrap();
    let mut child = capmesh_home(dir.path())
        .args(["up", "-f"])
        .arg(&file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen: Vec<String> = Vec::new();
    // The last line of the start-up summary says how the CLI finds the mesh.
    while !seen
        .iter()
        .any(|l| l.contains("any directory") || l.contains("from anywhere with"))
    {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| {
                let _ = child.kill();
                panic!("no 'mesh is up' within 60 s:\n{}", seen.join("\n"))
            });
        seen.push(line);
    }
    let all = seen.join("\n");
    // Output is prefixed per process.
    assert!(all.contains("control-plane │"), "{all}");
    assert!(all.contains("weather-proxy │"), "{all}");
    assert!(all.contains("mesh is up"), "{all}");
    let find = |start: &str, after: &str| {
        seen.iter()
            .filter(|l| l.trim_start().starts_with(start))
            .find_map(|l| port_after(l, after))
            .unwrap_or_else(|| panic!("no {start:?} line with a port:\n{all}"))
    };
    let outbound = find("planner ", "http://127.0.0.1:");
    let planner_admin = find("planner ", "admin http://127.0.0.1:");
    let weather_admin = find("weather ", "admin http://127.0.0.1:");
    let api = find("control plane: ", "https://127.0.0.1:");
    let agent = seen
        .iter()
        .find_map(|l| port_after(l, "serving MCP at http://127.0.0.1:"))
        .unwrap_or_else(|| panic!("the agent did not print its MCP URL:\n{all}"));
    assert!(all.contains("find this mesh from any directory"), "{all}");

    // A call through the planner's sidecar reaches the weather agent.
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_weather","arguments":{"city":"Oslo"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}"#;
    let out = Command::new("curl")
        .args([
            "-s",
            "-X",
            "POST",
            &format!("http://127.0.0.1:{outbound}/mcp"),
        ])
        .args([
            "-H",
            "content-type: application/json",
            "-H",
            "accept: application/json, text/event-stream",
        ])
        .args([
            "-H",
            "mcp-protocol-version: 2026-07-28",
            "-H",
            "mcp-method: tools/call",
            "-H",
            "mcp-name: get_weather",
        ])
        .args(["-d", body])
        .output()
        .unwrap();
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(
        answer.contains("Oslo") && answer.contains("weather"),
        "{answer}"
    );

    // The CLI finds the running mesh from another directory, with no flags.
    let elsewhere = tempfile::tempdir().unwrap();
    let list = capmesh_home(dir.path())
        .current_dir(elsewhere.path())
        .arg("list")
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.status.success() && listed.contains("weather") && listed.contains("planner"),
        "capmesh list from elsewhere:\n{listed}\n{}",
        String::from_utf8_lossy(&list.stderr)
    );
    assert!(
        dir.path().join("data").join("ca.pem").exists(),
        "data_dir is relative to the file"
    );

    // Ctrl-C: everything stops, nothing is left listening.
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let status = wait_bounded(
        &mut child,
        Duration::from_secs(30),
        "capmesh up after Ctrl-C",
    );
    assert!(status.success(), "{status}");
    for port in [api, planner_admin, weather_admin, agent, outbound] {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "port {port} still open after stop"
        );
    }
    assert!(
        !dir.path()
            .join(".local/state/capmesh/local-mesh.json")
            .exists(),
        "the running mesh's record is removed when it stops"
    );
}

#[test]
fn up_with_a_port_taken_stops_with_the_bind_error_and_the_field_to_change() {
    let dir = tempfile::tempdir().unwrap();
    // Something else listens on the port the file asks for (as on 8000 by default).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let file = dir.path().join("mesh.yaml");
    std::fs::write(
        &file,
        format!(
            "control_plane:\n  listen: 127.0.0.1:{port}\n\
             agents:\n\
             \x20 - name: planner\n    sidecar: [--dependency, get_weather]\n"
        ),
    )
    .unwrap();
    let mut child = capmesh_home(dir.path())
        .args(["up", "-f"])
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let status = wait_bounded(&mut child, Duration::from_secs(60), "capmesh up");
    let (mut err, mut out) = (String::new(), String::new());
    std::io::Read::read_to_string(&mut stderr, &mut err).unwrap();
    std::io::Read::read_to_string(&mut stdout, &mut out).unwrap();
    assert!(!status.success(), "exit {status}:\n{out}\n{err}");
    let last: Vec<&str> = err.lines().rev().take(8).collect();
    let last = last.join("\n");
    assert!(
        last.contains("cannot bind") && last.contains(&port.to_string()),
        "the bind error is not in the last lines:\n{err}"
    );
    assert!(
        last.contains("control_plane.listen") && last.contains("mesh.yaml"),
        "the field to change is not named:\n{err}"
    );
    assert!(
        !err.contains("TLS") && !err.contains("--control-plane-ca"),
        "a consequence instead of the cause:\n{err}"
    );
    drop(taken);
}

#[test]
fn up_names_the_line_of_a_bad_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mesh.yaml");
    std::fs::write(&file, "agents:\n  - name: ok\n  - name: Not_A_Label\n").unwrap();
    let out = capmesh().args(["up", "-f"]).arg(&file).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 3") && err.contains("Not_A_Label"),
        "{err}"
    );
    let out = capmesh()
        .args(["up", "-f", "/nonexistent/mesh.yaml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/mesh.yaml"));
}
