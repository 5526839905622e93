//! The subcommands that look at or go through the data plane, on a real mesh: the control
//! plane and sidecars (this binary run as `capmesh-control-plane` and `capmesh-proxy`) in front
//! of real Python MCP agents.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Mesh, closed_port, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_shows_agents_capabilities_and_endpoints() {
    let mesh = Mesh::start(&[]).await;
    let (_agent, proxy) = mesh
        .provider(
            "alpha",
            &["weather", "echo"],
            &["--tags", "fast,eu", "--agent-version", "1.2.0"],
        )
        .await;

    let agents = eventually(Duration::from_secs(10), "alpha listed", || {
        let out = mesh.capmesh(&["list"]);
        out.ok().contains("alpha").then_some(out)
    })
    .await;
    let header = agents.stdout.lines().next().unwrap();
    for column in [
        "NAME",
        "NAMESPACE",
        "INSTANCES",
        "HEALTHY",
        "TAGS",
        "VERSION",
        "TOOLS",
    ] {
        assert!(header.contains(column), "{agents}");
    }
    let row = agents
        .stdout
        .lines()
        .find(|l| l.starts_with("alpha"))
        .unwrap();
    for cell in ["default", "1/1", "fast,eu", "1.2.0", "get_weather", "echo"] {
        assert!(row.contains(cell), "missing {cell:?} in {row:?}");
    }

    let caps = mesh.capmesh(&["list", "capabilities"]);
    let row = caps
        .ok()
        .lines()
        .find(|l| l.starts_with("get_weather"))
        .unwrap_or_else(|| panic!("{caps}"));
    for cell in ["alpha", "fast,eu", "1.2.0"] {
        assert!(row.contains(cell), "missing {cell:?} in {row:?}");
    }

    let endpoints = mesh.capmesh(&["list", "endpoints"]);
    let address = format!("127.0.0.1:{}", proxy.inbound);
    let row = endpoints
        .ok()
        .lines()
        .find(|l| l.starts_with("echo"))
        .unwrap_or_else(|| panic!("{endpoints}"));
    for cell in ["alpha", address.as_str(), "yes", "fast,eu", "1.2.0"] {
        assert!(row.contains(cell), "missing {cell:?} in {row:?}");
    }

    // JSON: what the control plane sent.
    let json = mesh.capmesh(&["list", "agents", "--output", "json"]).json();
    assert_eq!(json[0]["name"], "alpha");
    assert_eq!(json[0]["instances"][0]["address"], address);
    let json = mesh.capmesh(&["list", "capabilities", "-o", "json"]).json();
    assert!(
        json.as_array()
            .unwrap()
            .iter()
            .any(|c| c["capability"] == "get_weather")
    );
    let json = mesh.capmesh(&["-o", "json", "list", "endpoints"]).json();
    let functions: Vec<&str> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["function"].as_str().unwrap())
        .collect();
    assert!(
        functions.contains(&"get_weather") && functions.contains(&"echo"),
        "{json}"
    );

    // Bad input: an unknown kind of thing; an unreachable control plane.
    mesh.capmesh(&["list", "widgets"])
        .fails(2, &["widgets", "agents", "capabilities", "endpoints"]);
    let closed = closed_port();
    let nowhere = format!("https://127.0.0.1:{}", closed.port());
    mesh.capmesh(&["list", "endpoints", "--control-plane", &nowhere])
        .fails(1, &[&nowhere, "capmesh-control-plane"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_each_proxy_stream_snapshot_and_certificate() {
    // A long grace keeps a killed proxy's row, so its disconnection shows.
    let mesh = Mesh::start(&["--grace", "60s"]).await;
    let (_a, _pa) = mesh.provider("alpha", &["weather"], &[]).await;
    let (_b, mut pb) = mesh.provider("beta", &["echo"], &[]).await;

    let out = eventually(
        Duration::from_secs(10),
        "both proxies acked a snapshot",
        || {
            let out = mesh.capmesh(&["status"]);
            let acked = out
                .ok()
                .lines()
                .filter(|l| l.starts_with("alpha") || l.starts_with("beta"))
                .filter(|l| {
                    snapshot_cell(l).is_some_and(|(acked, current)| acked > 0 && acked <= current)
                })
                .count();
            (acked == 2).then_some(out)
        },
    )
    .await;
    let text = &out.stdout;
    assert!(
        text.contains(&format!("{} (reachable)", mesh.url())),
        "{out}"
    );
    assert!(text.contains("Trust domain   capmesh.local"), "{out}");
    assert!(text.contains("2 agents, 2 proxies (2 connected)"), "{out}");
    let header = text.lines().find(|l| l.starts_with("AGENT")).unwrap();
    for column in ["PROXY", "STREAM", "SNAPSHOT", "CERT EXPIRES", "HEALTH"] {
        assert!(header.contains(column), "{out}");
    }
    let alpha = text.lines().find(|l| l.starts_with("alpha")).unwrap();
    for cell in ["alpha-", "connected since", "healthy"] {
        assert!(alpha.contains(cell), "missing {cell:?} in {alpha:?}");
    }
    // Certificates are issued for 24 h.
    assert!(
        alpha.contains("in 1d") || alpha.contains("in 23h"),
        "{alpha:?}"
    );

    let json = mesh.capmesh(&["status", "--output", "json"]).json();
    assert_eq!(json["control_plane"]["reachable"], true);
    assert_eq!(json["control_plane"]["trust_domain"], "capmesh.local");
    let proxies = json["proxies"].as_array().unwrap();
    assert_eq!(proxies.len(), 2, "{json}");
    let current = json["control_plane"]["version"].as_u64().unwrap();
    assert!(
        proxies
            .iter()
            .all(|p| p["snapshot_version"].as_u64().unwrap() <= current)
    );
    assert!(
        proxies
            .iter()
            .all(|p| p["connected"] == true && p["healthy"] == true)
    );
    assert!(proxies[0]["certificate_not_after_unix"].as_i64().unwrap() > 0);

    // A proxy that dies shows as disconnected.
    pb.kill();
    let out = eventually(Duration::from_secs(15), "beta disconnected", || {
        let out = mesh.capmesh(&["status"]);
        out.ok()
            .lines()
            .any(|l| l.starts_with("beta") && l.contains("disconnected since"))
            .then_some(out)
    })
    .await;
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("alpha") && l.contains("connected since")),
        "{out}"
    );

    // Bad input: an unreachable control plane is a failure that says what to do.
    let closed = closed_port();
    let nowhere = format!("https://127.0.0.1:{}", closed.port());
    mesh.capmesh(&["status", "--control-plane", &nowhere])
        .fails(
            1,
            &[
                &nowhere,
                "cannot reach",
                "capmesh-control-plane",
                "--control-plane",
            ],
        );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_goes_through_the_mesh_with_tags_versions_and_failover() {
    // A long grace keeps a killed provider in the topology, so the CLI meets a dead endpoint.
    let mesh = Mesh::start(&["--grace", "60s"]).await;
    let (_a, _pa) = mesh
        .provider(
            "alpha",
            &["weather", "echo", "fail"],
            &["--tags", "fast", "--agent-version", "1.0.0"],
        )
        .await;
    // `--version <semver>`, the deprecated spelling of `--agent-version`, still works.
    let (_b, mut pb) = mesh
        .provider(
            "beta",
            &["weather", "echo"],
            &["--tags", "slow", "--version", "2.1.0"],
        )
        .await;
    eventually(Duration::from_secs(10), "both providers listed", || {
        let out = mesh.capmesh(&["list", "endpoints"]);
        let rows = out
            .ok()
            .lines()
            .filter(|l| l.starts_with("get_weather") && l.contains("yes"))
            .count();
        (rows == 2).then_some(())
    })
    .await;

    let args = r#"{"city":"Paris"}"#;
    // The result alone on stdout; who served it on stderr.
    let out = mesh.capmesh(&["call", "get_weather", "--args", args]);
    let text = out.ok();
    assert!(
        text.ends_with(": sunny in Paris\n") && text.lines().count() == 1,
        "{out}"
    );
    assert!(
        out.stderr
            .starts_with("served by spiffe://capmesh.local/ns/default/agent/")
            && out.stderr.contains(" ms\n"),
        "{out}"
    );

    // Tags and versions choose the provider.
    for (flags, who) in [
        (&["--tags", "+fast"][..], "alpha"),
        (&["--tags", "-fast"][..], "beta"),
        (&["--tags", "slow"][..], "beta"),
        (&["--version", ">=2"][..], "beta"),
        (&["--tags", "+slow", "--version", "<2"][..], "alpha"),
    ] {
        for _ in 0..3 {
            let mut call = vec!["call", "get_weather", "--args", args];
            call.extend_from_slice(flags);
            let out = mesh.capmesh(&call);
            assert!(
                out.ok().contains(&format!("{who}: sunny in Paris")),
                "{flags:?} should reach {who}:\n{out}"
            );
        }
    }

    // JSON: the JSON-RPC response plus who served it.
    let json = mesh
        .capmesh(&[
            "call",
            "echo",
            "--args",
            r#"{"text":"hi"}"#,
            "--tags",
            "+fast",
            "-o",
            "json",
        ])
        .json();
    assert_eq!(json["jsonrpc"], "2.0");
    assert_eq!(json["result"]["content"][0]["text"], "alpha: hi");
    assert_eq!(
        json["served_by"]["identity"],
        "spiffe://capmesh.local/ns/default/agent/alpha"
    );
    assert!(json["served_by"]["elapsed_ms"].is_u64());

    // A tool error is exit code 1, with the tool's message.
    let out = mesh.capmesh(&["call", "fail", "--args", r#"{"message":"boom"}"#]);
    assert_eq!(out.code, 1, "{out}");
    assert!(out.stdout.contains("alpha: boom"), "{out}");
    assert!(out.stderr.contains("the tool reported an error"), "{out}");

    // Bad input: unknown capability, a selector nothing matches, arguments that are not a
    // JSON object, a bad tag rule, a bad version requirement, a bad timeout.
    mesh.capmesh(&["call", "get_wether", "--args", args]).fails(
        1,
        &[
            "unknown capability \"get_wether\"",
            "get_weather",
            "echo",
            "capmesh list capabilities",
        ],
    );
    mesh.capmesh(&["call", "get_weather", "--args", args, "--tags", "gpu"])
        .fails(
            1,
            &[
                "\"get_weather\"",
                "no healthy endpoint",
                "\"gpu\"",
                "alpha [fast]",
            ],
        );
    mesh.capmesh(&["call", "get_weather", "--args", "{city: Paris}"])
        .fails(2, &["--args", "not JSON", "{\"city\":\"Paris\"}"]);
    mesh.capmesh(&["call", "get_weather", "--args", "[\"Paris\"]"])
        .fails(2, &["--args", "JSON array", "object"]);
    mesh.capmesh(&["call", "get_weather", "--tags", "+Fast"])
        .fails(2, &["--tags", "+Fast"]);
    mesh.capmesh(&["call", "get_weather", "--version", ">=1.x.y"])
        .fails(2, &["--version", ">=1.x.y"]);
    mesh.capmesh(&["call", "get_weather", "--timeout", "soon"])
        .fails(2, &["--timeout", "soon"]);
    // Without the admin token the CLI cannot get its identity, and says how to give it.
    let env = mesh.env();
    let no_token: Vec<(&str, &str)> = env
        .iter()
        .filter(|(k, _)| k != "CAPMESH_ADMIN_TOKEN_FILE")
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    mesh.capmesh_with(&no_token, &["call", "get_weather", "--args", args])
        .fails(1, &["admin token", "--admin-token-file"]);

    // A provider that died is still in the topology (grace period): the CLI moves on to the
    // next endpoint, and every call succeeds.
    pb.kill();
    for _ in 0..6 {
        let out = mesh.capmesh(&["call", "get_weather", "--args", args]);
        assert!(out.ok().contains("alpha: sunny in Paris"), "{out}");
    }
    // Only the dead one matches: every endpoint failed, and the message says so.
    mesh.capmesh(&["call", "get_weather", "--args", args, "--tags", "slow"])
        .fails(1, &["every endpoint failed", "1 tried", "capmesh status"]);

    // The authorization policy applies to the CLI's identity like to any caller.
    let policy = mesh.home.path().join("deny-cli.json");
    std::fs::write(
        &policy,
        r#"{"rules": [{"from": ["spiffe://capmesh.local/ns/capmesh-system/agent/cli"], "capabilities": ["echo"], "action": "deny"}]}"#,
    )
    .unwrap();
    mesh.capmesh(&["policy", "set", "-f", &policy.display().to_string()])
        .ok();
    let denied = eventually(Duration::from_secs(10), "the policy reaches alpha", || {
        let out = mesh.capmesh(&["call", "echo", "--args", r#"{"text":"hi"}"#]);
        (out.code != 0).then_some(out)
    })
    .await;
    denied.fails(
        1,
        &[
            "spiffe://capmesh.local/ns/capmesh-system/agent/cli",
            "may not call",
            "\"echo\"",
            "capmesh policy",
        ],
    );
    // Other capabilities still pass.
    let out = mesh.capmesh(&["call", "get_weather", "--args", args]);
    assert!(out.ok().contains("alpha: sunny in Paris"), "{out}");

    // The CLI cleans up after itself: its bootstrap tokens are revoked once used, and left out
    // of `token list` (which would otherwise grow by one row per call) unless --all is given.
    let listed = mesh.capmesh(&["token", "list"]);
    assert!(
        !listed.ok().contains("capmesh-system"),
        "used one-shot tokens of capmesh call are listed:\n{listed}"
    );
    assert!(
        listed
            .stderr
            .contains("used one-shot token(s) of `capmesh call` not shown; --all"),
        "{listed}"
    );
    let tokens = mesh
        .capmesh(&["token", "list", "--all", "-o", "json"])
        .json();
    let cli_tokens: Vec<_> = tokens
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["namespace"] == "capmesh-system")
        .collect();
    assert!(cli_tokens.len() > 10, "{tokens}");
    assert!(cli_tokens.iter().all(|t| t["revoked"] == true), "{tokens}");
    // The tokens of the two sidecars are still listed by default.
    let tokens = mesh.capmesh(&["token", "list", "-o", "json"]).json();
    assert!(
        tokens
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["namespace"] != "capmesh-system")
            && tokens.as_array().unwrap().len() >= 2,
        "{tokens}"
    );
}

/// The SNAPSHOT cell (`acked/current`) of a `capmesh status` row: columns are separated by at
/// least two spaces, and it is the fourth.
fn snapshot_cell(row: &str) -> Option<(u64, u64)> {
    let cells: Vec<&str> = row
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    let (acked, current) = cells.get(3)?.split_once('/')?;
    Some((acked.parse().ok()?, current.parse().ok()?))
}
