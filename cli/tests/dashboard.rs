//! The control plane's dashboard in a real browser: `capmesh demo --keep` leaves its mesh
//! running, headless Chromium (Debian's package; installed with apt-get when missing, as root)
//! loads the page, and the DOM it rendered shows the demo's agents and capabilities, edges with
//! non-zero rates and a trace tree. A screenshot is left in `target/dashboard.png`
//! (`docs/dashboard.png` is one).

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Chromium, installed from Debian's packages when it is not there yet.
fn chromium() -> PathBuf {
    for name in ["chromium", "chromium-browser"] {
        if let Ok(out) = Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
            && out.status.success()
        {
            return PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        }
    }
    let install = Command::new("sh")
        .args([
            "-c",
            "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium",
        ])
        .status()
        .unwrap();
    assert!(
        install.success(),
        "chromium is missing and apt-get could not install it (run as root, or install Debian's chromium package)"
    );
    PathBuf::from("/usr/bin/chromium")
}

/// Runs headless Chromium on `url` with a fresh profile; `what` is `--dump-dom` or
/// `--screenshot=<file>`. Bounded: killed after 60 s.
fn headless(url: &str, what: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1400,1500",
            // Time for the page's first fetch of the mesh to be drawn.
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(what)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut s).unwrap();
        s
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    reader.join().unwrap()
}

fn get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, body)| body.to_owned())
}

#[test]
fn the_dashboard_shows_the_demo_mesh_live_traffic_and_a_trace_tree() {
    let home = tempfile::tempdir().unwrap();
    let mut demo = Command::new(env!("CARGO_BIN_EXE_capmesh"))
        .args(["demo", "--keep"])
        .env("HOME", home.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = demo.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let stop = |demo: &mut std::process::Child| {
        let _ = Command::new("kill")
            .args(["-INT", &demo.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while demo.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = demo.kill();
    };
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    while !seen
        .iter()
        .any(|l: &String| l.contains("The mesh keeps running"))
    {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => seen.push(line),
            Err(_) => {
                stop(&mut demo);
                panic!("the demo did not reach --keep:\n{}", seen.join("\n"));
            }
        }
    }
    let all = seen.join("\n");
    let port: u16 = all
        .split("dashboard: http://127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no dashboard URL:\n{all}"));

    // The sidecars report traffic every 5 s: wait (bounded) for the failover's calls.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mesh: Value = loop {
        let mesh: Value = get(port, "/dashboard/api/mesh")
            .and_then(|b| serde_json::from_str(&b).ok())
            .unwrap_or(Value::Null);
        let live = mesh["edges"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["rate_per_s"].as_f64() > Some(0.0)));
        if live && mesh["latest"].is_object() {
            break mesh;
        }
        if Instant::now() > deadline {
            stop(&mut demo);
            panic!("no live edge and trace within 20 s: {mesh}");
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let url = format!("http://127.0.0.1:{port}/dashboard");
    let dom = headless(&url, "--dump-dom");
    // The screenshot opens the planner's trip (the trace of the most spans) by its address.
    let trip = mesh["traces"]
        .as_array()
        .and_then(|t| t.iter().max_by_key(|t| t["spans"].as_u64()))
        .and_then(|t| t["trace_id"].as_str())
        .unwrap_or_default()
        .to_owned();
    let shot = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/dashboard.png");
    let _ = headless(
        &format!("{url}#trace={trip}"),
        &format!("--screenshot={}", shot.display()),
    );
    stop(&mut demo);

    // The page drew what the API holds: every agent, each capability, the planner's edges
    // with a rate, and a trace tree with client and server spans.
    for name in [
        "planner",
        "weather-eu",
        "flights",
        "llm-openai",
        "get_weather",
        "search_flights",
        "llm",
    ] {
        assert!(
            dom.contains(&format!(">{name}<")),
            "{name} not drawn:\n{dom}"
        );
    }
    let rates: Vec<f64> = dom
        .split("data-rate=\"")
        .skip(1)
        .filter_map(|r| r.split('"').next()?.parse().ok())
        .collect();
    assert!(
        rates.iter().any(|r| *r > 0.0),
        "no edge with a non-zero rate ({rates:?}); the API had {}",
        mesh["edges"]
    );
    assert!(dom.contains("/s · "), "no rate label:\n{dom}");
    assert!(
        dom.matches("class=\"span-row\"").count() >= 2,
        "no trace tree:\n{dom}"
    );
    assert!(
        dom.contains(">client<") && dom.contains(">server<"),
        "{dom}"
    );
    assert!(!dom.contains("cannot read the control plane"), "{dom}");
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "screenshot: {} bytes",
        png.len()
    );
}
