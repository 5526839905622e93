//! The administrative subcommands against a real control plane: entities, tokens, policy,
//! certificates, and the settings (flags, environment, config file) with their failures.

#![allow(clippy::unwrap_used)]

mod common;

use capmesh_api::TrustDomain;
use capmesh_certs::Ca;
use common::{Mesh, capmesh_in, closed_port};

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_revoke_lift_and_token_uses_and_system() {
    let mesh = Mesh::start(&[]).await;
    let out = mesh.capmesh(&[
        "agent",
        "revoke",
        "default/weather",
        "--reason",
        "key leaked",
    ]);
    assert!(
        out.ok()
            .contains("revoked spiffe://capmesh.local/ns/default/agent/weather"),
        "{out}"
    );
    let listed = mesh.capmesh(&["agent", "revocations"]);
    assert!(
        listed.ok().contains("agent/weather") && listed.stdout.contains("key leaked"),
        "{listed}"
    );
    mesh.capmesh(&["agent", "revoke", "default/weather"])
        .fails(1, &["revoked already"]);
    mesh.capmesh(&["agent", "revoke", "--serial", "zz"])
        .fails(1, &["zz", "hexadecimal"]);
    let out = mesh.capmesh(&["agent", "lift", "default/weather"]);
    assert!(out.ok().contains("lifted the revocation"), "{out}");
    mesh.capmesh(&["agent", "lift", "default/weather"])
        .fails(1, &["not revoked", "capmesh agent revocations"]);

    mesh.capmesh(&[
        "token",
        "create",
        "--agent",
        "admin",
        "--namespace",
        "capmesh-system",
    ])
    .fails(1, &["capmesh-system", "--system"]);
    mesh.capmesh(&[
        "token",
        "create",
        "--agent",
        "admin",
        "--namespace",
        "capmesh-system",
        "--system",
    ])
    .ok();
    mesh.capmesh(&["token", "create", "--agent", "w", "--uses", "3"])
        .ok();
    let listed = mesh.capmesh(&["token", "list"]);
    assert!(
        listed
            .ok()
            .lines()
            .any(|l| l.contains(" w ") && l.contains("0/3")),
        "{listed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entity_register_list_revoke() {
    let mesh = Mesh::start(&[]).await;
    let dir = mesh.home.path();
    let partner = Ca::generate(TrustDomain::new("partner.example").unwrap(), false).unwrap();
    let ca = write(dir, "partner-ca.pem", partner.root_pem());

    let out = mesh.capmesh(&[
        "entity",
        "register",
        "partner-a",
        "--trust-domain",
        "partner.example",
        "--ca",
        &ca,
    ]);
    assert!(out.ok().contains("registered entity partner-a"), "{out}");
    let listed = mesh.capmesh(&["entity", "list"]);
    let line = listed
        .ok()
        .lines()
        .find(|l| l.starts_with("partner-a"))
        .unwrap_or_else(|| panic!("partner-a not listed:\n{listed}"));
    assert!(line.contains("trusted"), "{listed}");
    let json = mesh.capmesh(&["entity", "list", "--output", "json"]).json();
    assert_eq!(json[0]["name"], "partner-a");
    assert!(json[0]["fingerprint_sha256"].as_str().unwrap().len() == 64);

    // Bad input: the same name again, a bad name, a missing file, a file that is no PEM, a
    // certificate that is not a CA, an unknown name to revoke.
    mesh.capmesh(&[
        "entity",
        "register",
        "partner-a",
        "--trust-domain",
        "partner.example",
        "--ca",
        &ca,
    ])
    .fails(
        1,
        &["partner-a", "already registered", "capmesh entity revoke"],
    );
    mesh.capmesh(&[
        "entity",
        "register",
        "Partner A",
        "--trust-domain",
        "partner.example",
        "--ca",
        &ca,
    ])
    .fails(1, &["\"Partner A\"", "DNS label"]);
    let missing = dir.join("nope.pem").display().to_string();
    mesh.capmesh(&[
        "entity",
        "register",
        "partner-b",
        "--trust-domain",
        "b.example",
        "--ca",
        &missing,
    ])
    .fails(1, &["--ca", "nope.pem", "cannot read"]);
    let garbage = write(dir, "garbage.pem", "this is not a certificate\n");
    mesh.capmesh(&[
        "entity",
        "register",
        "partner-b",
        "--trust-domain",
        "b.example",
        "--ca",
        &garbage,
    ])
    .fails(
        1,
        &["garbage.pem", "not a PEM certificate", "BEGIN CERTIFICATE"],
    );
    let leaf = mesh.cp.credential("default", "leafy").await.unwrap();
    let leaf_pem = write(dir, "leaf.pem", leaf.chain_pem());
    mesh.capmesh(&[
        "entity",
        "register",
        "partner-b",
        "--trust-domain",
        "b.example",
        "--ca",
        &leaf_pem,
    ])
    .fails(1, &["leaf.pem", "not a CA certificate"]);
    mesh.capmesh(&["entity", "revoke", "partner-z"])
        .fails(1, &["partner-z", "capmesh entity list"]);

    let out = mesh.capmesh(&["entity", "revoke", "partner-a"]);
    assert!(out.ok().contains("revoked entity partner-a"), "{out}");
    let listed = mesh.capmesh(&["entity", "list"]);
    assert!(
        listed
            .ok()
            .lines()
            .any(|l| l.starts_with("partner-a") && l.contains("revoked")),
        "{listed}"
    );
    let status = mesh.capmesh(&["status"]);
    assert!(status.ok().contains("0 trusted, 1 revoked"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_create_list_revoke() {
    let mesh = Mesh::start(&[]).await;
    let created = mesh.capmesh(&[
        "token",
        "create",
        "--agent",
        "weather-*",
        "--ttl",
        "1h",
        "--description",
        "weather pods",
    ]);
    let secret = created.ok().trim().to_owned();
    assert!(
        secret.starts_with("cmt_"),
        "only the secret on stdout:\n{created}"
    );
    assert!(
        created.stderr.contains("--bootstrap-token-file")
            && created.stderr.contains("CAPMESH_BOOTSTRAP_TOKEN")
            && created.stderr.contains("only this once"),
        "{created}"
    );
    let id = secret
        .strip_prefix("cmt_")
        .and_then(|r| r.split('_').next())
        .unwrap()
        .to_owned();

    // The secret works: a sidecar-style CSR gets a certificate with it.
    let key = capmesh_certs::WorkloadKey::generate().unwrap();
    let csr = key
        .csr_pem(&capmesh_tests::spiffe("default", "weather-1").unwrap())
        .unwrap();
    let issued: capmesh_api::CertificateResponse = mesh
        .cp
        .rest()
        .unwrap()
        .post(
            "/v1/certificates",
            &capmesh_api::CertificateRequest {
                csr_pem: csr,
                token: Some(secret.clone()),
            },
            None,
        )
        .await
        .unwrap();
    assert!(issued.identity.ends_with("/ns/default/agent/weather-1"));

    let listed = mesh.capmesh(&["token", "list"]);
    let line = listed
        .ok()
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("{id} not listed:\n{listed}"));
    assert!(
        line.contains("weather-*") && line.contains("active") && line.contains("weather pods"),
        "{listed}"
    );
    assert!(
        !listed.stdout.contains(&secret),
        "never the secret:\n{listed}"
    );
    let json = mesh
        .capmesh(&[
            "token",
            "create",
            "--agent",
            "db",
            "--namespace",
            "prod",
            "-o",
            "json",
        ])
        .json();
    assert_eq!(json["info"]["namespace"], "prod");
    assert!(json["token"].as_str().unwrap().starts_with("cmt_"));

    // Bad input: a bad duration, a bad pattern, a bad namespace, an unknown id.
    mesh.capmesh(&["token", "create", "--agent", "x", "--ttl", "2days"])
        .fails(2, &["--ttl", "2days", "unit"]);
    mesh.capmesh(&["token", "create", "--agent", "Weather"])
        .fails(2, &["--agent", "Weather", "lowercase"]);
    mesh.capmesh(&["token", "create", "--agent", "x", "--namespace", "Bad NS"])
        .fails(2, &["--namespace", "Bad NS"]);
    mesh.capmesh(&["token", "revoke", "000000000000"])
        .fails(1, &["000000000000", "capmesh token list"]);

    let out = mesh.capmesh(&["token", "revoke", &id]);
    assert!(
        out.ok().contains(&format!("revoked bootstrap token {id}")),
        "{out}"
    );
    let listed = mesh.capmesh(&["token", "list"]);
    assert!(
        listed
            .ok()
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("revoked")),
        "{listed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_get_and_set() {
    let mesh = Mesh::start(&[]).await;
    let dir = mesh.home.path();
    let policy = mesh.capmesh(&["policy", "get"]).json();
    assert_eq!(policy["default"], "allow");

    let file = write(
        dir,
        "policy.json",
        r#"{"default": "deny", "rules": [
            {"from": ["spiffe://capmesh.local/ns/default/agent/planner"], "capabilities": ["weather*"], "action": "allow"}
        ]}"#,
    );
    let out = mesh.capmesh(&["policy", "set", "-f", &file]);
    assert!(
        out.ok()
            .contains("policy replaced: 1 rule(s), default deny"),
        "{out}"
    );
    let policy = mesh.capmesh(&["policy", "get", "--output", "table"]).json();
    assert_eq!(policy["default"], "deny");
    assert_eq!(policy["rules"][0]["capabilities"][0], "weather*");

    // Bad input, refused before anything is sent: broken JSON, an empty list, a misspelt key,
    // a missing file. The stored policy does not change.
    let broken = write(
        dir,
        "broken.json",
        "{\"default\": \"deny\",\n \"rules\": [\n",
    );
    mesh.capmesh(&["policy", "set", "-f", &broken])
        .fails(1, &["broken.json", "not a valid policy", "line"]);
    let empty = write(
        dir,
        "empty.json",
        r#"{"rules": [{"from": [], "capabilities": ["*"], "action": "allow"}]}"#,
    );
    mesh.capmesh(&["policy", "set", "-f", &empty])
        .fails(1, &["empty.json", "rule 0", "from is empty"]);
    let typo = write(dir, "typo.json", r#"{"defualt": "allow"}"#);
    mesh.capmesh(&["policy", "set", "-f", &typo])
        .fails(1, &["typo.json", "unknown key \"defualt\""]);
    mesh.capmesh(&["policy", "set", "-f", "missing.json"])
        .fails(1, &["missing.json", "cannot read"]);
    let policy = mesh.capmesh(&["policy", "get"]).json();
    assert_eq!(policy["default"], "deny", "a bad policy changes nothing");

    // A caller pattern that can never match a SPIFFE ID is set (it is valid) with a warning
    // that shows what was probably meant.
    let bare = write(
        dir,
        "bare.json",
        r#"{"default": "allow", "rules": [{"from": ["planner"], "capabilities": ["*"], "action": "deny"}]}"#,
    );
    let out = mesh.capmesh(&["policy", "set", "-f", &bare]);
    out.ok();
    assert!(
        out.stderr.contains("warning: rule 0")
            && out.stderr.contains("\"planner\" can never match")
            && out
                .stderr
                .contains("did you mean \"spiffe://capmesh.local/ns/default/agent/planner\""),
        "{out}"
    );
    let good = mesh.capmesh(&["policy", "set", "-f", &file]);
    assert!(!good.stderr.contains("warning"), "{good}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_settings_get_set_are_validated_stored_and_survive_a_restart() {
    let mut mesh = Mesh::start(&[]).await;
    let get = mesh.capmesh(&["settings", "get", "-o", "json"]).json();
    assert_eq!(get["request_timeout_ms"], 300_000);
    assert_eq!(get["retry_budget_percent"], 20);
    assert!(
        get.get("session_key").is_none(),
        "the session key is secret: {get}"
    );

    let out = mesh.capmesh(&[
        "settings",
        "set",
        "--request-timeout",
        "30s",
        "--propagate-headers",
        "x-tenant-id,x-request-*",
        "--retry-budget",
        "10",
    ]);
    let table = out.ok();
    for cell in ["30000 ms", "x-tenant-id,x-request-*", "10 % of requests"] {
        assert!(table.contains(cell), "{cell}: {out}");
    }
    // Only what was named changed.
    let after = mesh.capmesh(&["settings", "get", "-o", "json"]).json();
    assert_eq!(after["breaker_failures"], 5, "{after}");

    // Bad values are refused, here and by the control plane, and change nothing.
    mesh.capmesh(&["settings", "set", "--retry-budget", "150"])
        .fails(
            1,
            &[
                "retry_budget_percent = 150",
                "0 to 100",
                "nothing was changed",
            ],
        );
    mesh.capmesh(&["settings", "set", "--propagate-headers", "*"])
        .fails(1, &["--propagate-headers", "leak every header"]);
    mesh.capmesh(&["settings", "set", "--request-timeout", "soon"])
        .fails(2, &["--request-timeout"]);
    let rest = mesh.cp.rest().unwrap();
    let token = mesh.cp.admin_token().unwrap();
    let refused = rest
        .put::<_, serde_json::Value>(
            "/v1/settings",
            &serde_json::json!({"request_timout_ms": 5}),
            Some(&token),
        )
        .await
        .unwrap_err();
    assert_eq!(refused.status(), Some(400), "{refused}");
    assert!(
        refused.to_string().contains("request_timout_ms"),
        "{refused}"
    );
    let refused = rest
        .put::<_, serde_json::Value>(
            "/v1/settings",
            &serde_json::json!({"session_key": "00"}),
            Some(&token),
        )
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("session_key cannot be set"),
        "{refused}"
    );
    // Changing them needs the admin token.
    let unauthenticated = rest
        .put::<_, serde_json::Value>("/v1/settings", &serde_json::json!({}), None)
        .await
        .unwrap_err();
    assert_eq!(unauthenticated.status(), Some(401), "{unauthenticated}");
    assert_eq!(
        mesh.capmesh(&["settings", "get", "-o", "json"]).json(),
        after,
        "refused changes changed nothing"
    );

    // Stored: a restarted control plane sends the same settings.
    mesh.cp.restart().await.unwrap();
    assert_eq!(
        mesh.capmesh(&["settings", "get", "-o", "json"]).json(),
        after
    );
    let reset = mesh
        .capmesh(&["settings", "set", "--reset", "-o", "json"])
        .json();
    assert_eq!(reset["request_timeout_ms"], 300_000, "{reset}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_inspect_works_offline() {
    let mesh = Mesh::start(&[]).await;
    let dir = mesh.home.path();
    let credential = mesh.cp.credential("default", "weather").await.unwrap();
    let pem = write(dir, "weather.pem", credential.chain_pem());
    // Offline: the control plane settings point nowhere.
    let closed = closed_port();
    let nowhere = format!("https://127.0.0.1:{}", closed.port());
    let env = [("CAPMESH_CONTROL_PLANE", nowhere.as_str())];
    let out = mesh.capmesh_with(&env, &["cert", "inspect", &pem]);
    let text = out.ok();
    for expected in [
        "spiffe://capmesh.local/ns/default/agent/weather",
        credential.serial(),
        "(expires in ",
        "digitalSignature",
        "clientAuth",
        "SHA-256:",
    ] {
        assert!(text.contains(expected), "missing {expected:?}:\n{out}");
    }
    // Issued for 24 h (less a few seconds, or plus the CA's backdating).
    assert!(
        text.contains("(expires in 1d)") || text.contains("(expires in 23h"),
        "{out}"
    );
    let json = mesh
        .capmesh_with(&env, &["cert", "inspect", &pem, "--output", "json"])
        .json();
    assert_eq!(
        json[0]["identity"],
        "spiffe://capmesh.local/ns/default/agent/weather"
    );
    assert_eq!(json[0]["serial"], credential.serial());
    assert_eq!(json[0]["is_ca"], false);
    let ca = mesh.ca().display().to_string();
    let out = mesh.capmesh_with(&env, &["cert", "inspect", &ca]);
    assert!(out.ok().contains("CA:                 yes"), "{out}");

    // Bad input: not PEM, a key instead of a certificate, no such file.
    let junk = write(dir, "junk.pem", "hello\n");
    mesh.capmesh_with(&env, &["cert", "inspect", &junk])
        .fails(1, &["junk.pem", "not a PEM certificate"]);
    let key = write(
        dir,
        "key.pem",
        &capmesh_certs::WorkloadKey::generate().unwrap().to_pem(),
    );
    mesh.capmesh_with(&env, &["cert", "inspect", &key])
        .fails(1, &["key.pem", "BEGIN CERTIFICATE"]);
    mesh.capmesh_with(&env, &["cert", "inspect", "absent.pem"])
        .fails(1, &["absent.pem", "cannot read"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_to_reach_or_convince_the_control_plane_say_how_to_fix_them() {
    let mesh = Mesh::start(&[]).await;
    let ca = mesh.ca().display().to_string();
    let token = mesh.token_file().display().to_string();
    let url = mesh.url();

    // Nothing listens there.
    let closed = closed_port();
    let nowhere = format!("https://127.0.0.1:{}", closed.port());
    for sub in [&["status"][..], &["list"], &["token", "list"]] {
        mesh.capmesh_with(
            &[
                ("CAPMESH_CONTROL_PLANE", &nowhere),
                ("CAPMESH_CONTROL_PLANE_CA", &ca),
            ],
            sub,
        )
        .fails(1, &[&nowhere, "capmesh-control-plane", "--control-plane"]);
    }
    // Not a URL.
    mesh.capmesh_with(
        &[("CAPMESH_CONTROL_PLANE_CA", &ca)],
        &["list", "--control-plane", "ftp://x"],
    )
    .fails(1, &["--control-plane", "https://host:port"]);
    // No trust bundle, a missing one, one from another mesh.
    mesh.capmesh_with(&[("CAPMESH_CONTROL_PLANE", &url)], &["list"])
        .fails(1, &["--control-plane-ca", "ca.pem"]);
    mesh.capmesh_with(
        &[
            ("CAPMESH_CONTROL_PLANE", &url),
            ("CAPMESH_CONTROL_PLANE_CA", "/nonexistent/ca.pem"),
        ],
        &["list"],
    )
    .fails(1, &["/nonexistent/ca.pem", "--control-plane-ca"]);
    let other = Ca::generate(TrustDomain::new("capmesh.local").unwrap(), false).unwrap();
    let other_ca = write(mesh.home.path(), "other-ca.pem", other.root_pem());
    mesh.capmesh_with(
        &[
            ("CAPMESH_CONTROL_PLANE", &url),
            ("CAPMESH_CONTROL_PLANE_CA", &other_ca),
        ],
        &["list"],
    )
    .fails(1, &["other-ca.pem", "not trusted", "--control-plane-ca"]);
    // No admin token, a wrong one, an unreadable token file.
    let env = [
        ("CAPMESH_CONTROL_PLANE", url.as_str()),
        ("CAPMESH_CONTROL_PLANE_CA", ca.as_str()),
    ];
    mesh.capmesh_with(&env, &["list"]).fails(
        1,
        &[
            "needs the admin token",
            "--admin-token-file ./capmesh-data/admin-token",
        ],
    );
    mesh.capmesh_with(
        &env,
        &["token", "list", "--admin-token", "wrong-token-0123456789"],
    )
    .fails(
        1,
        &[
            "refused the admin token from --admin-token",
            "--admin-token-file",
        ],
    );
    mesh.capmesh_with(&env, &["list", "--admin-token-file", "/nonexistent/token"])
        .fails(1, &["/nonexistent/token", "--admin-token-file"]);
    mesh.capmesh_with(
        &env,
        &["list", "--admin-token", "x", "--admin-token-file", &token],
    )
    .fails(1, &["--admin-token and --admin-token-file", "one of them"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_come_from_flags_then_environment_then_config_file_then_data_dir() {
    let mesh = Mesh::start(&[]).await;
    let home = tempfile::tempdir().unwrap();
    let config_dir = home.path().join(".config").join("capmesh");
    std::fs::create_dir_all(&config_dir).unwrap();
    let admin = mesh.cp.admin_token().unwrap();
    // The CA path is relative: relative to the config file's directory.
    std::fs::copy(mesh.ca(), config_dir.join("mesh-ca.pem")).unwrap();
    std::fs::write(
        config_dir.join("config.toml"),
        format!(
            "control_plane = \"{}\"\ncontrol_plane_ca = \"mesh-ca.pem\"\nadmin_token = \"{admin}\"\n",
            mesh.url()
        ),
    )
    .unwrap();
    let run = |envs: &[(&str, &str)], args: &[&str]| capmesh_in(home.path(), envs, args);

    // The config file alone is enough.
    let out = run(&[], &["status"]);
    assert!(out.ok().contains(&mesh.url()), "{out}");
    // The environment beats the config file...
    let closed = closed_port();
    let nowhere = format!("https://127.0.0.1:{}", closed.port());
    run(&[("CAPMESH_CONTROL_PLANE", &nowhere)], &["status"]).fails(1, &[&nowhere]);
    // ...and a flag beats the environment.
    let out = run(
        &[("CAPMESH_CONTROL_PLANE", &nowhere)],
        &["status", "--control-plane", &mesh.url()],
    );
    assert!(out.ok().contains("(reachable)"), "{out}");
    // A wrong token in the environment beats the right one in the file; a flag beats both.
    run(
        &[("CAPMESH_ADMIN_TOKEN", "wrong-token-0123456789")],
        &["list"],
    )
    .fails(1, &["refused the admin token from CAPMESH_ADMIN_TOKEN"]);
    let token_file = mesh.token_file().display().to_string();
    let out = run(
        &[("CAPMESH_ADMIN_TOKEN", "wrong-token-0123456789")],
        &["list", "--admin-token-file", &token_file],
    );
    out.ok();
    // XDG_CONFIG_HOME moves the file; --config names one.
    let elsewhere = tempfile::tempdir().unwrap();
    let xdg = elsewhere.path().display().to_string();
    run(&[("XDG_CONFIG_HOME", &xdg)], &["list"])
        .fails(1, &["https://127.0.0.1:8000", "--control-plane-ca"]);
    let explicit = config_dir.join("config.toml").display().to_string();
    run(
        &[("XDG_CONFIG_HOME", &xdg)],
        &["list", "--config", &explicit],
    )
    .ok();

    // With no config file, ./capmesh-data in the working directory is the default.
    let workdir = tempfile::tempdir().unwrap();
    let data = workdir.path().join("capmesh-data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::copy(mesh.ca(), data.join("ca.pem")).unwrap();
    std::fs::copy(mesh.token_file(), data.join("admin-token")).unwrap();
    capmesh_in(
        workdir.path(),
        &[("CAPMESH_CONTROL_PLANE", &mesh.url())],
        &["policy", "get"],
    )
    .json();

    // A broken config file is named, with the line and the keys it takes.
    std::fs::write(
        config_dir.join("config.toml"),
        "control_plane = \"x\"\nadmin = \"typo\"\n",
    )
    .unwrap();
    run(&[], &["list"]).fails(1, &["config.toml", "admin", "control_plane_ca"]);
    std::fs::write(config_dir.join("config.toml"), "control_plane = \n").unwrap();
    run(&[], &["list"]).fails(1, &["config.toml", "line 1"]);
    // ...but not read at all by a subcommand that needs no control plane.
    let pem = config_dir.join("mesh-ca.pem").display().to_string();
    run(&[], &["cert", "inspect", &pem]).ok();
    // A --config file that does not exist is an error, not silently skipped.
    run(&[], &["list", "--config", "/nonexistent/config.toml"])
        .fails(1, &["/nonexistent/config.toml", "--config"]);
}
