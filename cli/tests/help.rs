//! `--help` for every subcommand, usage errors, and the control plane and proxy run from the
//! one `capmesh` binary.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{capmesh_bin, capmesh_in, eventually, run_bounded};

#[test]
fn every_subcommand_has_help_with_examples() {
    let dir = tempfile::tempdir().unwrap();
    let subcommands: &[&[&str]] = &[
        &[],
        &["demo"],
        &["up"],
        &["list"],
        &["status"],
        &["call"],
        &["entity"],
        &["entity", "register"],
        &["entity", "list"],
        &["entity", "revoke"],
        &["agent"],
        &["agent", "revoke"],
        &["agent", "lift"],
        &["agent", "revocations"],
        &["token"],
        &["token", "create"],
        &["token", "list"],
        &["token", "revoke"],
        &["policy"],
        &["policy", "get"],
        &["policy", "set"],
        &["settings", "get"],
        &["settings", "set"],
        &["cert"],
        &["cert", "inspect"],
    ];
    for sub in subcommands {
        let mut args = sub.to_vec();
        args.push("--help");
        let run = capmesh_in(dir.path(), &[], &args);
        let help = run.ok();
        assert!(
            help.contains("Examples:\n  capmesh"),
            "`capmesh {}` has no examples:\n{help}",
            args.join(" ")
        );
    }
    // The in-process programs are listed, and answer with their own flags.
    let top = capmesh_in(dir.path(), &[], &["--help"]);
    for program in ["agent", "proxy", "control-plane", "settings"] {
        assert!(
            top.ok()
                .lines()
                .any(|l| l.starts_with(&format!("  {program} "))),
            "`capmesh --help` does not list {program}:\n{top}"
        );
    }
    let agent = capmesh_in(dir.path(), &[], &["agent", "--help"]);
    assert!(agent.ok().contains("--port"), "{agent}");
    let proxy = capmesh_in(dir.path(), &[], &["proxy", "--help"]);
    assert!(
        proxy.ok().contains("--agent-name") && proxy.stdout.contains("--bootstrap-token-file"),
        "{proxy}"
    );
    let cp = capmesh_in(dir.path(), &[], &["control-plane", "--help"]);
    assert!(
        cp.ok().contains("--data-dir") && cp.stdout.contains("--grace"),
        "{cp}"
    );
}

#[test]
fn bad_usage_exits_2_and_names_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    capmesh_in(dir.path(), &[], &["list", "--output", "yaml"])
        .fails(2, &["--output", "yaml", "table", "json"]);
    capmesh_in(dir.path(), &[], &["list", "widgets"]).fails(2, &["widgets", "capabilities"]);
    capmesh_in(dir.path(), &[], &["frobnicate"]).fails(2, &["frobnicate"]);
    capmesh_in(dir.path(), &[], &["call"]).fails(2, &["<CAPABILITY>"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_and_proxy_run_from_the_one_binary() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Ports held for this test, bound by the control plane (see `ReservedPort`).
    let (port, admin) = (
        capmesh_tests::reserve_port().unwrap(),
        capmesh_tests::reserve_port().unwrap(),
    );
    let (port, admin) = (port.port(), admin.port());
    let mut child = Command::new(capmesh_bin())
        .arg("control-plane")
        .arg("--data-dir")
        .arg(&data)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--admin-listen")
        .arg(format!("127.0.0.1:{admin}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("capmesh control-plane exited with {status}");
        }
        if let Ok((_, body)) = capmesh_tests::http_get(admin, "/ready").await
            && body.starts_with("ready")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "capmesh control-plane not ready within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The CLI talks to it with the files it wrote.
    let ca = data.join("ca.pem").display().to_string();
    let token = data.join("admin-token").display().to_string();
    let url = format!("https://127.0.0.1:{port}");
    let status = capmesh_in(
        dir.path(),
        &[
            ("CAPMESH_CONTROL_PLANE", &url),
            ("CAPMESH_CONTROL_PLANE_CA", &ca),
            ("CAPMESH_ADMIN_TOKEN_FILE", &token),
        ],
        &["status"],
    );
    assert!(status.ok().contains("(reachable)"), "{status}");
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let exited = eventually(
        Duration::from_secs(10),
        "control plane exits on SIGTERM",
        || child.try_wait().ok().flatten(),
    )
    .await;
    assert!(exited.success(), "{exited}");

    // Their own flag errors, with their own exit code.
    let mut cmd = Command::new(capmesh_bin());
    cmd.args(["control-plane", "--grace", "2days"]);
    run_bounded(cmd, Duration::from_secs(30)).fails(2, &["--grace", "use ms, s, m or h"]);
    let mut cmd = Command::new(capmesh_bin());
    cmd.args(["proxy", "--agent-name", "Bad Name"]);
    run_bounded(cmd, Duration::from_secs(30)).fails(2, &["--agent-name", "lowercase"]);
}

#[test]
fn a_closed_stdout_ends_every_program_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let ca = capmesh_certs::Ca::generate("capmesh.local".parse().unwrap(), false).unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.root_pem()).unwrap();
    let app = dir.path().join("app.yaml");
    std::fs::write(
        &app,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: weather, labels: {app: weather}}\nspec:\n  containers: [{name: app, image: x, ports: [{containerPort: 9001}]}]\n",
    )
    .unwrap();
    let (ca_path, app_path) = (ca_file.display().to_string(), app.display().to_string());
    for args in [
        &["--help"][..],
        &["cert", "inspect", &ca_path],
        &["inject", "-f", &app_path],
        &["inject", "-f", &app_path, "-o", "json"],
        &["proxy", "--version"],
        &["proxy", "--help"],
        &["control-plane", "--help"],
        &["agent", "--help"],
    ] {
        // `capmesh … | head -0`: the reader is gone before anything is written.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(capmesh_bin())
            .args(args)
            .env_clear()
            .env("HOME", dir.path())
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
            "capmesh {}: {} {stderr}",
            args.join(" "),
            out.status
        );
    }
}
