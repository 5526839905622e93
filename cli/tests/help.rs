//! `--help` for every subcommand, usage errors, and the control plane and proxy run from the
//! one `capmesh` binary.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{capmesh_bin, capmesh_in, closed_port, eventually, run_bounded};

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
    // The in-process programs are not advertised, but answer with their own flags.
    let top = capmesh_in(dir.path(), &[], &["--help"]);
    assert!(
        !top.ok()
            .lines()
            .any(|l| l.starts_with("  control-plane ") || l.starts_with("  proxy ")),
        "{top}"
    );
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
    let (port, admin) = (closed_port(), closed_port());
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
