//! `capmesh demo` and `capmesh up`, run as a user runs them.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn capmesh() -> Command {
    Command::new(env!("CARGO_BIN_EXE_capmesh"))
}

#[test]
fn demo_shows_routing_identities_and_a_failover_without_failed_calls() {
    let out = capmesh().arg("demo").stdin(Stdio::null()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "capmesh demo failed:\n{stdout}\n{stderr}"
    );
    // Routing, with the provider's verified identity for each call.
    for who in ["agent/weather-eu", "agent/flights", "agent/llm-claude"] {
        assert!(
            stdout.contains(&format!(
                "served by spiffe://capmesh.local/ns/default/{who}"
            )),
            "{who} missing:\n{stdout}"
        );
    }
    // The failover: no failed call, traffic on the other provider.
    assert!(stdout.contains(" 0 failed"), "{stdout}");
    assert!(stdout.contains("traffic moved to llm-openai"), "{stdout}");
    assert!(stdout.contains("Temporary files removed"), "{stdout}");
}

#[test]
fn demo_refuses_unknown_flags() {
    let out = capmesh().args(["demo", "--bogus"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--bogus"));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn up_runs_the_file_until_ctrl_c_and_stops_everything() {
    let dir = tempfile::tempdir().unwrap();
    let (api, admin, agent, outbound) = (free_port(), free_port(), free_port(), free_port());
    let file = dir.path().join("mesh.yaml");
    std::fs::write(
        &file,
        format!(
            "control_plane:\n  listen: 127.0.0.1:{api}\n  admin_listen: 127.0.0.1:{admin}\n  data_dir: data\n\
             agents:\n\
             \x20 - name: weather\n    command: [capmesh, agent, weather, --port, \"{agent}\", --name, weather]\n    url: http://127.0.0.1:{agent}/mcp\n\
             \x20 - name: planner\n    outbound: 127.0.0.1:{outbound}\n    sidecar: [--dependency, get_weather]\n"
        ),
    )
    .unwrap();
    let mut child = capmesh()
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
    let mut seen = Vec::new();
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| {
                let _ = child.kill();
                panic!("no 'mesh is up' within 60 s:\n{}", seen.join("\n"))
            });
        seen.push(line.clone());
        if line.contains("mesh is up") {
            break;
        }
    }
    // Output is prefixed per process.
    assert!(
        seen.iter().any(|l| l.contains("control-plane │")),
        "{}",
        seen.join("\n")
    );
    assert!(
        seen.iter().any(|l| l.contains("weather-proxy │")),
        "{}",
        seen.join("\n")
    );

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

    // Ctrl-C: everything stops, nothing is left listening.
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "capmesh up did not stop within 30 s of Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    for port in [api, admin, agent, outbound] {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "port {port} still open after stop"
        );
    }
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
