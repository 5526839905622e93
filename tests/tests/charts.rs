//! The Helm charts (`charts/`), checked with real tools.
//!
//! `tests/python/charts.py` (its own venv, `target/py-charts-venv`, from
//! `tests/python/charts-requirements.txt`) builds the umbrella chart's dependencies from
//! `Chart.lock`, lints and renders every chart with Helm v4's own engine (PyPI
//! `helm-python-sdk`) for each values case — defaults, the minimal and production examples,
//! more shapes, and bad values — and validates every rendered manifest against the Kubernetes
//! 1.30 schemas in strict mode (PyPI `kubernetes-validate`). It prints a JSON report; this
//! file asserts on it, and runs the real `capmesh-proxy` and `capmesh-control-plane` binaries
//! (built by the workspace test run) over the arguments the charts render.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};
use capmesh_tests::python::repo_root;
use capmesh_tests::workspace_bin;
use serde_json::Value;

const CP: &str = "capmesh-control-plane";
const AGENT: &str = "capmesh-agent";
const PLATFORM: &str = "capmesh-platform";

// ---------------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------------

/// The report of one `charts.py` run (once per test process).
fn report() -> &'static Value {
    static REPORT: OnceLock<std::result::Result<Value, String>> = OnceLock::new();
    match REPORT.get_or_init(|| run_charts_py().map_err(|e| format!("{e:#}"))) {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    }
}

fn run_charts_py() -> Result<Value> {
    let script = repo_root().join("tests").join("python").join("charts.py");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let out = tempfile::NamedTempFile::new().context("cannot create the report file")?;
    let output = Command::new(&python)
        .arg(&script)
        .arg("--report")
        .arg(out.path())
        .stdin(Stdio::null())
        .output()
        .with_context(|| {
            format!(
                "cannot run `{python} {}`: install Python >= 3.10 with its venv module \
                 (Debian/Ubuntu: apt-get install -y python3 python3-venv)",
                script.display()
            )
        })?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    // 0: every expectation met, 1: some were not (the assertions below say which);
    // anything else: the tools could not be set up or run.
    if !matches!(output.status.code(), Some(0 | 1)) {
        bail!(
            "charts.py failed ({}): the chart tools (helm-python-sdk, kubernetes-validate from \
             PyPI) could not be installed or run; see below, or run `python3 \
             tests/python/charts.py` by hand.\n--- stderr ---\n{stderr}",
            output.status
        );
    }
    let text = std::fs::read_to_string(out.path()).context("charts.py wrote no report")?;
    serde_json::from_str(&text)
        .with_context(|| format!("the report is not JSON\n--- stderr ---\n{stderr}"))
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

fn arr(v: &Value) -> &[Value] {
    v.as_array().map_or(&[], Vec::as_slice)
}

fn strings(v: &Value) -> Vec<String> {
    arr(v).iter().map(|x| s(x).to_owned()).collect()
}

fn cases() -> &'static [Value] {
    arr(&report()["cases"])
}

fn case(chart: &str, name: &str) -> &'static Value {
    cases()
        .iter()
        .find(|c| c["chart"] == chart && c["name"] == name)
        .unwrap_or_else(|| panic!("charts.py has no case {chart}/{name}"))
}

fn id(c: &Value) -> String {
    format!("{}/{}", s(&c["chart"]), s(&c["name"]))
}

/// The rendered objects of a case.
fn objects(c: &Value) -> Vec<&Value> {
    arr(&c["objects"]).iter().map(|o| &o["object"]).collect()
}

fn of_kind<'a>(c: &'a Value, kind: &str) -> Vec<&'a Value> {
    arr(&c["objects"])
        .iter()
        .map(|o| &o["object"])
        .filter(|o| o["kind"] == kind)
        .collect()
}

fn find<'a>(c: &'a Value, kind: &str, name: &str) -> &'a Value {
    arr(&c["objects"])
        .iter()
        .map(|o| &o["object"])
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| {
            let have: Vec<String> = arr(&c["objects"])
                .iter()
                .map(|o| format!("{}/{}", s(&o["kind"]), s(&o["name"])))
                .collect();
            panic!("{}: no {kind}/{name} rendered; have {have:?}", id(c))
        })
}

fn pod_spec(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]
}

fn container<'a>(spec: &'a Value, list: &str, name: &str) -> &'a Value {
    arr(&spec[list])
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {list} entry named {name} in {spec}"))
}

/// Every value given to `flag` (`--flag value` or `--flag=value`).
fn flag_values(args: &[String], flag: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut it = args.iter().peekable();
    while let Some(a) = it.next() {
        if a == flag {
            if let Some(v) = it.peek() {
                found.push((*v).clone());
            }
        } else if let Some(v) = a.strip_prefix(&format!("{flag}=")) {
            found.push(v.to_owned());
        }
    }
    found
}

fn flag_value(args: &[String], flag: &str) -> String {
    let values = flag_values(args, flag);
    assert_eq!(values.len(), 1, "{flag} should be given once in {args:?}");
    values[0].clone()
}

/// The flag names (`--x`) in an argument list.
fn flags_in(args: &[String]) -> BTreeSet<String> {
    args.iter()
        .filter(|a| a.starts_with("--"))
        .map(|a| a.split('=').next().unwrap_or(a).to_owned())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Lint, render, validate
// ---------------------------------------------------------------------------------------------

#[test]
fn charts_lint_clean_render_and_validate_against_kubernetes_1_30() {
    let r = report();
    let tools = &r["tools"];
    assert!(
        s(&tools["helm_sdk"]).starts_with("v4."),
        "rendered by Helm v4: {tools}"
    );
    assert_eq!(tools["kubernetes_version"], "1.30", "{tools}");
    assert_eq!(tools["strict"], true, "{tools}");

    // `helm dependency build` from Chart.lock (it fails when the lock is out of sync).
    let deps = &r["dependencies"];
    assert_eq!(
        deps["ok"], true,
        "helm dependency build charts/capmesh-platform failed: {}",
        deps["error"]
    );
    let mut dep_count: BTreeMap<String, usize> = BTreeMap::new();
    for d in arr(&deps["list"]) {
        assert!(
            matches!(s(&d["status"]), "ok" | "unpacked"),
            "dependency not in place: {d}"
        );
        *dep_count.entry(s(&d["name"]).to_owned()).or_default() += 1;
    }
    assert_eq!(
        dep_count,
        BTreeMap::from([
            (CP.to_owned(), 1),
            (AGENT.to_owned(), 5),
            ("postgresql".to_owned(), 1)
        ]),
        "the platform depends on the control plane once, the agent chart by five aliases and \
         its local postgresql"
    );

    // Every chart: Helm v3 chart API v2, kubeVersion, a draft-07 values schema that refuses
    // unknown top-level keys.
    for name in [CP, AGENT, PLATFORM, "postgresql"] {
        let chart = &r["charts"][name];
        assert!(chart["error"].is_null(), "{name}: {}", chart["error"]);
        let meta = &chart["metadata"];
        assert_eq!(meta["apiVersion"], "v2", "{name}: {meta}");
        assert_eq!(meta["kubeVersion"], ">=1.30.0-0", "{name}: {meta}");
        let schema = &chart["schema"];
        assert!(
            s(&schema["$schema"]).contains("draft-07"),
            "{name}: values.schema.json must be JSON Schema draft-07: {}",
            schema["$schema"]
        );
        assert_eq!(
            schema["additionalProperties"], false,
            "{name}: the schema must refuse unknown top-level keys"
        );
    }

    let mut failures = Vec::new();
    let mut rendered = 0;
    let mut manifests = 0;
    for c in cases() {
        let here = id(c);
        let lint = &c["lint"];
        if c["expect"] == "ok" {
            rendered += 1;
            for e in arr(&lint["errors"]) {
                failures.push(format!("{here}: helm lint error: {}", s(e)));
            }
            for w in arr(&lint["warnings"]) {
                failures.push(format!("{here}: helm lint warning: {}", s(w)));
            }
            if c["render"]["ok"] != true {
                failures.push(format!(
                    "{here}: render failed: {}",
                    s(&c["render"]["error"])
                ));
                continue;
            }
            if arr(&c["objects"]).is_empty() {
                failures.push(format!("{here}: rendered no manifest"));
            }
            for o in arr(&c["objects"]) {
                manifests += 1;
                if o["valid"] != true {
                    failures.push(format!(
                        "{here}: {} {}/{} does not validate against Kubernetes 1.30 (strict): {}",
                        s(&o["template"]),
                        s(&o["kind"]),
                        s(&o["name"]),
                        s(&o["error"])
                    ));
                }
            }
        } else {
            if c["render"]["ok"] == true {
                failures.push(format!("{here}: bad values were rendered, not refused"));
                continue;
            }
            let error = s(&c["render"]["error"]);
            for m in arr(&c["mentions"]) {
                if !error.contains(s(m)) {
                    failures.push(format!(
                        "{here}: the refusal does not name {}: {error}",
                        s(m)
                    ));
                }
            }
            // Schema violations are lint errors too (a template's fail() is not: Helm lints
            // in a mode where fail() only logs).
            if c["lint_refuses"] == true {
                let lint_text = strings(&lint["errors"]).join("\n");
                if lint_text.is_empty() {
                    failures.push(format!("{here}: helm lint accepted bad values"));
                }
                for m in arr(&c["mentions"]) {
                    if !lint_text.contains(s(m)) {
                        failures.push(format!(
                            "{here}: helm lint does not name {}: {lint_text}",
                            s(m)
                        ));
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} problem(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(rendered >= 15, "only {rendered} cases rendered");
    assert!(manifests >= 100, "only {manifests} manifests validated");

    // The examples and the bad values the design calls out are among the cases.
    for (chart, name) in [
        (CP, "defaults"),
        (AGENT, "defaults"),
        (PLATFORM, "defaults"),
        (PLATFORM, "minimal"),
        (PLATFORM, "production"),
    ] {
        assert_eq!(case(chart, name)["expect"], "ok");
    }
    let refused = |chart: &str, name: &str, pointer: &str, value: Value| {
        let c = case(chart, name);
        assert_eq!(c["expect"], "refused", "{}", id(c));
        assert_eq!(c["values"].pointer(pointer), Some(&value), "{}", id(c));
    };
    refused(AGENT, "bad-tls-mode", "/proxy/tlsMode", "loose".into());
    refused(AGENT, "bad-agent-name", "/agent/name", "Bad_Name".into());
    refused(AGENT, "negative-replicas", "/replicaCount", (-1).into());
    refused(CP, "negative-replicas", "/replicaCount", (-1).into());
    refused(
        PLATFORM,
        "bad-tls-mode",
        "/weather/proxy/tlsMode",
        "loose".into(),
    );
    refused(
        PLATFORM,
        "bad-agent-name",
        "/flights/agent/name",
        "Bad_Name".into(),
    );
    refused(
        PLATFORM,
        "negative-replicas",
        "/planner/replicaCount",
        (-1).into(),
    );
    refused(CP, "replicas-without-postgres", "/replicaCount", 2.into());
}

// ---------------------------------------------------------------------------------------------
// The rendered flags are the binaries' flags
// ---------------------------------------------------------------------------------------------

struct Binary {
    name: &'static str,
    path: std::path::PathBuf,
    /// The subcommand the flags belong to (`init`), if any.
    sub: Vec<&'static str>,
    flags: BTreeSet<String>,
    envs: BTreeSet<String>,
}

impl Binary {
    fn load(name: &'static str) -> Result<Self> {
        Self::load_with(name, &[])
    }

    /// A subcommand of `name`: its `--help` gives the flags, and checks run `name sub ...`.
    fn load_sub(name: &'static str, sub: &'static str) -> Result<Self> {
        Self::load_with(name, &[sub])
    }

    fn load_with(name: &'static str, sub: &[&'static str]) -> Result<Self> {
        let path = workspace_bin(name).with_context(|| {
            format!(
                "{name} is not built: the chart tests check the rendered arguments against the \
                 real binary. Run the workspace tests (`cargo nextest run --workspace`, or \
                 `cargo build --workspace` first)"
            )
        })?;
        let out = Command::new(&path)
            .args(sub)
            .arg("--help")
            .env_clear()
            .output()
            .with_context(|| format!("cannot run {}", path.display()))?;
        if !out.status.success() {
            bail!(
                "{name} --help failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let help = String::from_utf8_lossy(&out.stdout).into_owned();
        let word = |t: &str| {
            t.trim_matches(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
                .to_owned()
        };
        let flags = help
            .split_whitespace()
            .filter(|t| t.starts_with("--"))
            .map(word)
            .map(|w| format!("--{}", w.trim_start_matches('-')))
            .filter(|w| w.len() > 2)
            .collect();
        let envs = help
            .split("[env: ")
            .skip(1)
            .map(|rest| rest.split(['=', ']']).next().unwrap_or("").to_owned())
            .collect();
        Ok(Self {
            name,
            path,
            sub: sub.to_vec(),
            flags,
            envs,
        })
    }

    /// Checks one rendered container: its flags exist, its `CAPMESH_*` variables are this
    /// binary's, and the binary's own parser accepts the arguments (value parsers included:
    /// `--help` at the end makes it print help instead of starting, but only after parsing
    /// everything before it).
    fn check(&self, label: &str, args: &[String], env: &[Value], failures: &mut Vec<String>) {
        let program = [self.name]
            .iter()
            .chain(&self.sub)
            .copied()
            .collect::<Vec<_>>()
            .join(" ");
        for flag in flags_in(args) {
            if !self.flags.contains(&flag) {
                failures.push(format!(
                    "{label}: {flag} is not a `{program}` flag (see `{program} --help`)"
                ));
            }
        }
        for e in env {
            let name = s(&e["name"]);
            if name.starts_with("CAPMESH_") && !self.envs.contains(name) {
                failures.push(format!(
                    "{label}: env {name} is not one of {}'s variables",
                    self.name
                ));
            }
        }
        // The kubelet expands $(VAR) from the container's env; stand in for it.
        let literal: BTreeMap<&str, &str> = env
            .iter()
            .filter_map(|e| Some((e["name"].as_str()?, e["value"].as_str()?)))
            .collect();
        let expanded: Vec<String> = args.iter().map(|a| expand_vars(a, &literal)).collect();
        let out = Command::new(&self.path)
            .args(&self.sub)
            .args(&expanded)
            .arg("--help")
            .env_clear()
            .stdout(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => failures.push(format!(
                "{label}: {} refuses the rendered arguments: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
            )),
            Err(e) => failures.push(format!("{label}: cannot run {}: {e}", self.name)),
        }
    }
}

/// `$(NAME)` → the env's literal value, or a stand-in for downward-API values.
fn expand_vars(arg: &str, env: &BTreeMap<&str, &str>) -> String {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(start) = rest.find("$(") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find(')') else {
            out.push_str(&rest[start..]);
            return out;
        };
        let name = &after[..end];
        out.push_str(env.get(name).copied().unwrap_or(match name {
            n if n.ends_with("_IP") => "10.1.2.3",
            _ => "stand-in-value",
        }));
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

#[test]
fn rendered_flags_are_the_real_binaries_flags() {
    let proxy = Binary::load("capmesh-proxy").unwrap_or_else(|e| panic!("{e:#}"));
    let control_plane = Binary::load("capmesh-control-plane").unwrap_or_else(|e| panic!("{e:#}"));
    // The `capmesh` command (the helm test runs `capmesh status`): checked like the others, so
    // it must be built too; a missing one fails the test instead of being guessed.
    let cli = Binary::load("capmesh").unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        cli.flags.contains("--control-plane"),
        "`capmesh --help` does not list --control-plane: {:?}",
        cli.flags
    );

    // `capmesh-proxy init` (transparent mode): the init container's arguments.
    let init = Binary::load_sub("capmesh-proxy", "init").unwrap_or_else(|e| panic!("{e:#}"));

    let mut failures = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for c in cases().iter().filter(|c| c["expect"] == "ok") {
        for k in arr(&c["containers"]) {
            let name = s(&k["name"]);
            let label = format!("{} {} container {name}", id(c), s(&k["source"]));
            let args = strings(&k["args"]);
            let env = arr(&k["env"]);
            *seen.entry(name.to_owned()).or_default() += 1;
            match name {
                "capmesh-proxy" => {
                    proxy.check(&label, &args, env, &mut failures);
                    let flags = flags_in(&args);
                    for required in [
                        "--agent-name",
                        "--namespace",
                        "--trust-domain",
                        "--agent-url",
                        "--control-plane",
                        "--control-plane-ca",
                        "--advertise",
                        "--outbound",
                        "--inbound",
                        "--admin",
                        "--tls-mode",
                        "--log-format",
                    ] {
                        if !flags.contains(required) {
                            failures.push(format!("{label}: no {required} in {args:?}"));
                        }
                    }
                    if !flags.contains("--bootstrap-token-file") && !flags.contains("--tls-cert") {
                        failures.push(format!(
                            "{label}: neither --bootstrap-token-file nor --tls-cert: {args:?}"
                        ));
                    }
                }
                "control-plane" => {
                    control_plane.check(&label, &args, env, &mut failures);
                    let flags = flags_in(&args);
                    for required in [
                        "--listen",
                        "--admin-listen",
                        "--data-dir",
                        "--trust-domain",
                        "--admin-token-file",
                        "--grace",
                        "--cert-ttl",
                        "--server-name",
                        "--log-format",
                    ] {
                        if !flags.contains(required) {
                            failures.push(format!("{label}: no {required} in {args:?}"));
                        }
                    }
                }
                "capmesh-status" => {
                    if args.first().map(String::as_str) != Some("status") {
                        failures.push(format!("{label}: does not run `capmesh status`: {args:?}"));
                    }
                    cli.check(&label, &args, env, &mut failures);
                }
                "capmesh-init" => {
                    if args.first().map(String::as_str) != Some("init") {
                        failures.push(format!("{label}: does not run `capmesh-proxy init`"));
                    }
                    let flags = flags_in(&args);
                    for required in [
                        "--proxy-uid",
                        "--outbound-port",
                        "--inbound-port",
                        "--skip-inbound-ports",
                    ] {
                        if !flags.contains(required) {
                            failures.push(format!("{label}: no {required} in {args:?}"));
                        }
                    }
                    init.check(&label, &args[1..], env, &mut failures);
                }
                "agent" | "postgresql" => {}
                other => failures.push(format!("{label}: unexpected container {other}")),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} problem(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
    // Every chart shape was looked at: the sidecar in every agent case (and the sidecar-only
    // snippets), the control plane in its own chart and the platform.
    assert!(
        seen.get("capmesh-proxy").copied().unwrap_or(0) >= 15,
        "{seen:?}"
    );
    assert!(
        seen.get("control-plane").copied().unwrap_or(0) >= 7,
        "{seen:?}"
    );
    assert!(seen.contains_key("capmesh-status"), "{seen:?}");
    assert!(seen.contains_key("capmesh-init"), "{seen:?}");
}

// ---------------------------------------------------------------------------------------------
// What the charts render
// ---------------------------------------------------------------------------------------------

fn probe_path_port(c: &Value, probe: &str) -> (String, String) {
    let get = &c[probe]["httpGet"];
    let port = match &get["port"] {
        Value::String(p) => p.clone(),
        other => other.to_string(),
    };
    (s(&get["path"]).to_owned(), port)
}

fn named_port(c: &Value, name: &str) -> i64 {
    arr(&c["ports"])
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_i64())
        .unwrap_or_else(|| panic!("no port {name} in {}", c["ports"]))
}

fn args_of(c: &Value) -> Vec<String> {
    strings(&c["args"])
}

#[test]
fn control_plane_chart_shape() {
    let c = case(CP, "defaults");
    let sts = find(c, "StatefulSet", "capmesh-capmesh-control-plane");
    let spec = pod_spec(sts);
    let cp = container(spec, "containers", "control-plane");
    let args = args_of(cp);
    // The data dir lives on the claim; the serving certificate names the Service.
    assert_eq!(
        sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"],
        "data"
    );
    assert!(flag_value(&args, "--data-dir").starts_with("/var/lib/capmesh/"));
    let mounts = arr(&cp["volumeMounts"]);
    assert!(mounts.iter().any(|m| m["name"] == "data"
        && m["mountPath"] == "/var/lib/capmesh"
        && m["readOnly"] != true));
    let names = flag_values(&args, "--server-name");
    for want in [
        "capmesh-capmesh-control-plane",
        "capmesh-capmesh-control-plane.capmesh.svc",
        "capmesh-capmesh-control-plane.capmesh.svc.cluster.local",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    assert_eq!(flag_value(&args, "--listen"), "0.0.0.0:8000");
    assert_eq!(flag_value(&args, "--admin-listen"), "0.0.0.0:9090");
    // Probes on the admin endpoints.
    assert_eq!(named_port(cp, "admin"), 9090);
    assert_eq!(
        probe_path_port(cp, "livenessProbe"),
        ("/live".into(), "admin".into())
    );
    assert_eq!(
        probe_path_port(cp, "readinessProbe"),
        ("/ready".into(), "admin".into())
    );
    // Hardened: non-root, read-only root file system, no privilege escalation.
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
    assert_eq!(cp["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(cp["securityContext"]["allowPrivilegeEscalation"], false);
    assert!(cp["resources"]["requests"].is_object() && cp["resources"]["limits"].is_object());
    let ann = &sts["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(ann["prometheus.io/scrape"], "true");
    assert_eq!(ann["prometheus.io/port"], "9090");
    // The admin token: a generated Secret, mounted as --admin-token-file.
    let secret = find(c, "Secret", "capmesh-capmesh-control-plane-admin-token");
    assert!(!s(&secret["data"]["admin-token"]).is_empty());
    assert!(flag_value(&args, "--admin-token-file").starts_with("/etc/capmesh/admin/"));
    let svc = find(c, "Service", "capmesh-capmesh-control-plane");
    let ports: BTreeSet<i64> = arr(&svc["spec"]["ports"])
        .iter()
        .filter_map(|p| p["port"].as_i64())
        .collect();
    assert_eq!(ports, BTreeSet::from([8000, 8443, 9090]));
    assert_eq!(of_kind(c, "ServiceAccount").len(), 1);

    // The admission webhook: its own TLS port and certificate, and what it injects.
    assert_eq!(flag_value(&args, "--webhook-listen"), "0.0.0.0:8443");
    assert_eq!(named_port(cp, "webhook"), 8443);
    assert_eq!(
        flag_value(&args, "--webhook-tls-cert"),
        "/etc/capmesh/webhook/tls.crt"
    );
    assert!(mounts.iter().any(|m| m["name"] == "webhook-tls"));
    assert_eq!(
        flag_value(&args, "--inject-proxy-control-plane"),
        "https://capmesh-capmesh-control-plane.capmesh.svc:8000",
        "injected proxies may live in any namespace"
    );
    assert_eq!(
        flag_value(&args, "--inject-proxy-image"),
        "ghcr.io/capmesh/capmesh-proxy:0.1.0"
    );
    assert_eq!(flag_value(&args, "--inject-ca-secret"), "capmesh-ca");
    assert_eq!(flag_value(&args, "--inject-transparent"), "true");
    assert_eq!(
        sts["spec"]["template"]["metadata"]["labels"]["capmesh.io/inject"], "disabled",
        "the control plane never injects itself"
    );
    let tls = find(c, "Secret", "capmesh-capmesh-control-plane-webhook-tls");
    assert_eq!(tls["type"], "kubernetes.io/tls");
    let ca_crt = s(&tls["data"]["ca.crt"]);
    assert!(ca_crt.len() > 100 && !s(&tls["data"]["tls.key"]).is_empty());
    let mwc = find(
        c,
        "MutatingWebhookConfiguration",
        "capmesh-capmesh-control-plane-capmesh",
    );
    let hooks = arr(&mwc["webhooks"]);
    assert_eq!(hooks.len(), 2);
    for hook in hooks {
        // The API server trusts the webhook's certificate through this bundle.
        assert_eq!(s(&hook["clientConfig"]["caBundle"]), ca_crt);
        let svc = &hook["clientConfig"]["service"];
        assert_eq!(svc["name"], "capmesh-capmesh-control-plane");
        assert_eq!(svc["namespace"], "capmesh");
        assert_eq!(svc["path"], "/inject");
        assert_eq!(svc["port"], 8443);
        assert_eq!(hook["failurePolicy"], "Ignore");
        assert_eq!(hook["admissionReviewVersions"], serde_json::json!(["v1"]));
        assert_eq!(hook["sideEffects"], "None");
        assert_eq!(hook["rules"][0]["resources"], serde_json::json!(["pods"]));
        assert_eq!(
            hook["rules"][0]["operations"],
            serde_json::json!(["CREATE"])
        );
    }
    // Pods in labelled namespaces, and labelled pods elsewhere.
    assert_eq!(
        hooks[0]["namespaceSelector"]["matchLabels"]["capmesh.io/inject"],
        "enabled"
    );
    assert_eq!(
        hooks[1]["objectSelector"]["matchLabels"]["capmesh.io/inject"],
        "enabled"
    );

    assert!(
        s(&c["notes"]).contains("kubectl label namespace <ns> capmesh.io/inject=enabled"),
        "the NOTES say how to turn injection on: {}",
        c["notes"]
    );

    let c = case(CP, "no-webhook");
    assert!(of_kind(c, "MutatingWebhookConfiguration").is_empty());
    let sts = find(c, "StatefulSet", "capmesh-capmesh-control-plane");
    let args = args_of(container(pod_spec(sts), "containers", "control-plane"));
    assert!(flag_values(&args, "--webhook-listen").is_empty());
    assert!(flags_in(&args).iter().all(|f| !f.starts_with("--inject-")));

    let c = case(CP, "webhook-settings");
    let sts = find(c, "StatefulSet", "capmesh-capmesh-control-plane");
    let args = args_of(container(pod_spec(sts), "containers", "control-plane"));
    assert_eq!(flag_value(&args, "--webhook-listen"), "0.0.0.0:9443");
    assert_eq!(
        flag_value(&args, "--inject-proxy-image"),
        "mirror.example/capmesh/capmesh-proxy:9.9.9"
    );
    assert_eq!(flag_value(&args, "--inject-proxy-pull-policy"), "Always");
    assert_eq!(flag_value(&args, "--inject-proxy-tls-mode"), "permissive");
    assert_eq!(
        flag_value(&args, "--inject-proxy-propagate-headers"),
        "x-tenant-id"
    );
    assert_eq!(flag_value(&args, "--inject-ca-secret"), "mesh-ca");
    assert_eq!(flag_value(&args, "--inject-transparent"), "false");
    let mwc = of_kind(c, "MutatingWebhookConfiguration");
    assert_eq!(mwc[0]["webhooks"][0]["failurePolicy"], "Fail");
    assert_eq!(
        mwc[0]["webhooks"][0]["clientConfig"]["service"]["port"],
        9443
    );

    // Without persistence: a Deployment with an emptyDir.
    let c = case(CP, "no-persistence");
    assert!(of_kind(c, "StatefulSet").is_empty());
    let dep = find(c, "Deployment", "capmesh-capmesh-control-plane");
    let data = arr(&pod_spec(dep)["volumes"])
        .iter()
        .find(|v| v["name"] == "data")
        .expect("a data volume");
    assert!(data["emptyDir"].is_object());

    // Replicas on PostgreSQL: the store URL is built by the kubelet from the password Secret.
    let c = case(CP, "postgres-replicas");
    let dep = find(c, "Deployment", "capmesh-capmesh-control-plane");
    assert_eq!(dep["spec"]["replicas"], 3);
    let cp = container(pod_spec(dep), "containers", "control-plane");
    let env = arr(&cp["env"]);
    let store = env
        .iter()
        .find(|e| e["name"] == "CAPMESH_STORE")
        .expect("CAPMESH_STORE");
    assert!(s(&store["value"]).starts_with("postgres://capmesh:$(PGPASSWORD)@db.example:5432/"));
    assert!(
        env.iter()
            .any(|e| e["name"] == "PGPASSWORD" && e["valueFrom"]["secretKeyRef"]["name"] == "db")
    );
    assert_eq!(of_kind(c, "PodDisruptionBudget").len(), 1);

    // Bring your own CA and token.
    let c = case(CP, "byo-ca-and-token");
    let dep = find(c, "StatefulSet", "capmesh-capmesh-control-plane");
    let cp = container(pod_spec(dep), "containers", "control-plane");
    let args = args_of(cp);
    assert_eq!(flag_value(&args, "--ca-cert"), "/etc/capmesh/ca/ca.crt");
    assert_eq!(flag_value(&args, "--grace"), "500ms");
    assert_eq!(flag_value(&args, "--log-format"), "text");
    assert_eq!(
        cp["image"],
        "mirror.example/capmesh/capmesh-control-plane:9.9.9"
    );
    let secrets: Vec<&str> = of_kind(c, "Secret")
        .iter()
        .map(|o| s(&o["metadata"]["name"]))
        .collect();
    assert_eq!(
        secrets,
        ["capmesh-capmesh-control-plane-webhook-tls"],
        "no generated token with an existing Secret"
    );
    // global.imageRegistry/imageTag reach the injected proxy image too.
    assert_eq!(
        flag_value(&args, "--inject-proxy-image"),
        "mirror.example/capmesh/capmesh-proxy:9.9.9"
    );
    assert_eq!(flag_value(&args, "--inject-proxy-log-format"), "text");
}

fn sidecar(dep: &Value) -> &Value {
    container(pod_spec(dep), "containers", "capmesh-proxy")
}

#[test]
fn agent_chart_shape() {
    let c = case(AGENT, "defaults");
    let dep = find(c, "Deployment", "capmesh-capmesh-agent");
    let spec = pod_spec(dep);
    let names: Vec<&str> = arr(&spec["containers"])
        .iter()
        .map(|k| s(&k["name"]))
        .collect();
    assert_eq!(names, ["agent", "capmesh-proxy"]);
    // Transparent mode is on by default: the init container with the agreed flags.
    let init = container(spec, "initContainers", "capmesh-init");
    assert_eq!(
        strings(&init["args"]),
        [
            "init",
            "--proxy-uid",
            "1337",
            "--outbound-port",
            "15001",
            "--inbound-port",
            "15006",
            "--skip-inbound-ports",
            "15020"
        ]
    );
    assert_eq!(init["securityContext"]["runAsUser"], 0);
    let proxy = sidecar(dep);
    let args = args_of(proxy);
    assert_eq!(
        flag_value(&args, "--agent-url"),
        "http://127.0.0.1:8080/mcp"
    );
    assert_eq!(flag_value(&args, "--advertise"), "$(POD_IP):15006");
    assert_eq!(flag_value(&args, "--outbound"), "127.0.0.1:15001");
    assert_eq!(flag_value(&args, "--inbound"), "0.0.0.0:15006");
    // The kubelet probes the admin port, so it listens on every interface.
    assert_eq!(flag_value(&args, "--admin"), "0.0.0.0:15020");
    assert_eq!(named_port(proxy, "proxy-admin"), 15020);
    assert_eq!(
        probe_path_port(proxy, "livenessProbe"),
        ("/live".into(), "proxy-admin".into())
    );
    assert_eq!(
        probe_path_port(proxy, "readinessProbe"),
        ("/ready".into(), "proxy-admin".into())
    );
    assert!(arr(&proxy["env"]).iter().any(
        |e| e["name"] == "POD_IP" && e["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    ));
    assert_eq!(flag_value(&args, "--tls-mode"), "strict");
    assert_eq!(proxy["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(proxy["securityContext"]["runAsNonRoot"], true);
    let ann = &dep["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(ann["prometheus.io/port"], "15020");
    let svc = find(c, "Service", "capmesh-capmesh-agent");
    assert_eq!(svc["spec"]["ports"][0]["port"], 15006);
    assert!(of_kind(c, "HorizontalPodAutoscaler").is_empty());
    assert!(of_kind(c, "PodDisruptionBudget").is_empty());

    // Every routing flag, HPA and PDB.
    let c = case(AGENT, "full");
    let dep = find(c, "Deployment", "capmesh-capmesh-agent");
    assert!(
        dep["spec"]["replicas"].is_null(),
        "the HPA owns the replica count"
    );
    let args = args_of(sidecar(dep));
    assert_eq!(flag_value(&args, "--agent-name"), "weather");
    assert_eq!(flag_value(&args, "--namespace"), "travel");
    assert_eq!(
        flag_value(&args, "--agent-url"),
        "http://127.0.0.1:9001/mcp/"
    );
    assert_eq!(
        flag_value(&args, "--control-plane"),
        "https://cp.capmesh-system.svc:8000"
    );
    assert_eq!(flag_value(&args, "--tags"), "fast,eu-west");
    assert_eq!(flag_value(&args, "--agent-version"), "1.4.0");
    assert_eq!(flag_value(&args, "--zone"), "eu-west-1a");
    assert_eq!(flag_values(&args, "--capability").len(), 2);
    assert_eq!(
        flag_values(&args, "--dependency"),
        ["geo", "fast_llm=llm:+claude,-beta,>=1.2", "*:+fast"]
    );
    assert_eq!(
        flag_value(&args, "--propagate-headers"),
        "x-tenant-id,x-request-*"
    );
    let hpa = find(c, "HorizontalPodAutoscaler", "capmesh-capmesh-agent");
    assert_eq!(hpa["apiVersion"], "autoscaling/v2");
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"],
        "capmesh-capmesh-agent"
    );
    assert_eq!(hpa["spec"]["minReplicas"], 2);
    assert_eq!(
        find(c, "PodDisruptionBudget", "capmesh-capmesh-agent")["spec"]["maxUnavailable"],
        "25%"
    );
    let ca = arr(&pod_spec(dep)["volumes"])
        .iter()
        .find(|v| v["name"] == "capmesh-ca")
        .expect("the trust bundle volume");
    assert_eq!(ca["secret"]["secretName"], "mesh-ca");

    // A native sidecar: an init container that keeps running, gated by a startup probe.
    let c = case(AGENT, "native-sidecar");
    let spec = pod_spec(find(c, "Deployment", "capmesh-capmesh-agent"));
    let proxy = container(spec, "initContainers", "capmesh-proxy");
    assert_eq!(proxy["restartPolicy"], "Always");
    assert_eq!(probe_path_port(proxy, "startupProbe").0, "/live");
    assert_eq!(arr(&spec["containers"]).len(), 1);

    // Consumer only: --agent-url none, no port, no Service.
    let c = case(AGENT, "consumer-only");
    let dep = find(c, "Deployment", "capmesh-capmesh-agent");
    assert_eq!(flag_value(&args_of(sidecar(dep)), "--agent-url"), "none");
    assert!(of_kind(c, "Service").is_empty());

    // Certificates from files instead of a bootstrap token.
    let c = case(AGENT, "certificate-files");
    let args = args_of(sidecar(find(c, "Deployment", "capmesh-capmesh-agent")));
    assert_eq!(flag_value(&args, "--tls-cert"), "/etc/capmesh/tls/tls.crt");
    assert_eq!(flag_value(&args, "--tls-ca"), "/etc/capmesh/tls/ca.crt");
    assert!(flag_values(&args, "--bootstrap-token-file").is_empty());

    // Transparent mode: the iptables init container, with the capabilities it needs.
    let c = case(AGENT, "transparent");
    let spec = pod_spec(find(c, "Deployment", "capmesh-capmesh-agent"));
    let init = container(spec, "initContainers", "capmesh-init");
    let args = strings(&init["args"]);
    assert_eq!(args[0], "init");
    assert_eq!(flag_value(&args, "--skip-outbound-ports"), "5432,6379");
    assert_eq!(flag_value(&args, "--skip-outbound-cidrs"), "10.96.0.1/32");
    let add = strings(&init["securityContext"]["capabilities"]["add"]);
    assert!(add.contains(&"NET_ADMIN".to_owned()) && add.contains(&"NET_RAW".to_owned()));
    assert!(
        s(&c["notes"]).contains("NET_ADMIN"),
        "the NOTES say what transparent mode needs: {}",
        c["notes"]
    );
    let c = case(AGENT, "no-transparent");
    let spec = pod_spec(find(c, "Deployment", "capmesh-capmesh-agent"));
    assert!(
        spec["initContainers"].is_null(),
        "{}",
        spec["initContainers"]
    );

    // Sidecar only: nothing but the snippet to paste into your own pod.
    for name in ["sidecar-only", "sidecar-only-native"] {
        let c = case(AGENT, name);
        let kinds: Vec<&str> = objects(c).iter().map(|o| s(&o["kind"])).collect();
        assert_eq!(kinds, ["ConfigMap"], "{name}");
        let snippet = find(c, "ConfigMap", "capmesh-capmesh-agent-sidecar");
        assert!(s(&snippet["data"]["volumes.yaml"]).contains("capmesh-ca"));
        let in_snippet: Vec<&Value> = arr(&c["containers"])
            .iter()
            .filter(|k| k["name"] == "capmesh-proxy")
            .collect();
        assert_eq!(in_snippet.len(), 1, "{name}: {}", c["containers"]);
    }
    let c = case(AGENT, "sidecar-only");
    let proxy = arr(&c["containers"])
        .iter()
        .find(|k| k["name"] == "capmesh-proxy")
        .expect("the sidecar");
    let args = strings(&proxy["args"]);
    assert_eq!(flag_value(&args, "--agent-name"), "legacy-agent");
    assert_eq!(
        flag_value(&args, "--agent-url"),
        "http://127.0.0.1:3000/mcp"
    );
    assert!(s(&c["notes"]).contains("sidecar only"), "{}", c["notes"]);
    let c = case(AGENT, "sidecar-only-native");
    let kinds: Vec<&str> = arr(&c["containers"])
        .iter()
        .map(|k| s(&k["name"]))
        .collect();
    assert_eq!(kinds, ["capmesh-init", "capmesh-proxy"]);
}

const AGENTS: [&str; 5] = ["weather", "flights", "llm-claude", "llm-openai", "planner"];

#[test]
fn platform_chart_shape() {
    let meta = &report()["charts"][PLATFORM]["metadata"];
    for d in arr(&meta["dependencies"]) {
        let alias = s(&d["alias"]);
        let name = if alias.is_empty() {
            s(&d["name"])
        } else {
            alias
        };
        assert_eq!(
            s(&d["condition"]),
            format!("{name}.enabled"),
            "every dependency has its condition: {d}"
        );
        let repo = s(&d["repository"]);
        assert!(
            repo.starts_with("file://") || (repo.is_empty() && d["name"] == "postgresql"),
            "local dependencies only (no network to render): {d}"
        );
    }

    let c = case(PLATFORM, "defaults");
    // The control plane under a fixed name, which the agents' URL names.
    let cp_svc = find(c, "Service", "capmesh-control-plane");
    assert_eq!(cp_svc["spec"]["ports"][0]["port"], 8000);
    // Its webhook injects with the platform's global settings.
    let cp_workload = ["StatefulSet", "Deployment"]
        .iter()
        .flat_map(|k| of_kind(c, k))
        .find(|o| o["metadata"]["name"] == "capmesh-control-plane")
        .expect("the control plane's workload");
    let cp_args = args_of(container(
        pod_spec(cp_workload),
        "containers",
        "control-plane",
    ));
    assert_eq!(
        flag_value(&cp_args, "--inject-proxy-control-plane"),
        "https://capmesh-control-plane.capmesh.svc:8000"
    );
    assert_eq!(
        flag_value(&cp_args, "--inject-proxy-propagate-headers"),
        "x-tenant-id,x-request-*"
    );
    assert_eq!(of_kind(c, "MutatingWebhookConfiguration").len(), 1);
    for alias in AGENTS {
        let dep = find(c, "Deployment", &format!("capmesh-{alias}"));
        let args = args_of(sidecar(dep));
        assert_eq!(flag_value(&args, "--agent-name"), alias);
        assert_eq!(
            flag_value(&args, "--control-plane"),
            "https://capmesh-control-plane:8000"
        );
        assert_eq!(flag_value(&args, "--trust-domain"), "capmesh.local");
        assert_eq!(
            flag_value(&args, "--propagate-headers"),
            "x-tenant-id,x-request-*"
        );
        assert_eq!(flag_value(&args, "--namespace"), "capmesh");
    }
    let planner = args_of(sidecar(find(c, "Deployment", "capmesh-planner")));
    assert_eq!(flag_value(&planner, "--agent-url"), "none");
    assert!(flag_values(&planner, "--dependency").contains(&"llm=llm:+claude".to_owned()));

    // NetworkPolicy: default deny, DNS, the namespace, the control plane's ports.
    let deny = find(c, "NetworkPolicy", "capmesh-default-deny");
    assert_eq!(deny["spec"]["podSelector"], serde_json::json!({}));
    assert_eq!(
        deny["spec"]["policyTypes"],
        serde_json::json!(["Ingress", "Egress"])
    );
    assert!(deny["spec"]["ingress"].is_null() && deny["spec"]["egress"].is_null());
    let dns = find(c, "NetworkPolicy", "capmesh-allow-dns");
    let dns_ports: BTreeSet<i64> = arr(&dns["spec"]["egress"][0]["ports"])
        .iter()
        .filter_map(|p| p["port"].as_i64())
        .collect();
    assert_eq!(dns_ports, BTreeSet::from([53]));
    let intra = find(c, "NetworkPolicy", "capmesh-allow-intra-namespace");
    assert_eq!(
        intra["spec"]["ingress"][0]["from"][0]["podSelector"],
        serde_json::json!({})
    );
    let cp_np = find(c, "NetworkPolicy", "capmesh-allow-control-plane");
    let cp_ports: BTreeSet<i64> = arr(&cp_np["spec"]["ingress"][0]["ports"])
        .iter()
        .filter_map(|p| p["port"].as_i64())
        .collect();
    assert_eq!(cp_ports, BTreeSet::from([8000, 9090]));
    assert!(of_kind(c, "ResourceQuota").is_empty(), "off by default");

    // The Grafana dashboard: every metric the design names, and only metrics that exist.
    let cm = find(c, "ConfigMap", "capmesh-dashboard");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let dashboard: Value =
        serde_json::from_str(s(&cm["data"]["capmesh.json"])).expect("the dashboard is JSON");
    let exprs: Vec<String> = arr(&dashboard["panels"])
        .iter()
        .flat_map(|p| arr(&p["targets"]))
        .map(|t| s(&t["expr"]).to_owned())
        .collect();
    let all = exprs.join("\n");
    for metric in [
        "capmesh_proxy_requests_total",
        "capmesh_proxy_responses_total",
        "capmesh_proxy_request_duration_seconds_bucket",
        "capmesh_proxy_retries_total",
        "capmesh_proxy_failovers_total",
        "capmesh_proxy_endpoints",
        "capmesh_proxy_tls_refusals_total",
        "capmesh_cp_streams_connected",
        "capmesh_cp_deltas_sent_total",
        "capmesh_cp_ack_latency_seconds_bucket",
        "capmesh_proxy_spans_total",
        "capmesh_proxy_spans_dropped_total",
        "capmesh_proxy_spans_exported_total",
        "capmesh_cp_spans_held",
    ] {
        assert!(all.contains(metric), "no panel queries {metric}");
    }
    let sources = ["proxy/src/metrics.rs", "control-plane/src/metrics.rs"]
        .map(|p| std::fs::read_to_string(repo_root().join(p)).expect(p))
        .join("\n");
    for metric in metric_names(&all) {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|suffix| metric.strip_suffix(suffix))
            .find(|b| sources.contains(&format!("\"{b}\"")))
            .unwrap_or(&metric);
        assert!(
            sources.contains(&format!("\"{base}\"")),
            "the dashboard queries {metric}, which neither binary exports"
        );
    }

    // helm test: a hook pod that runs `capmesh status` against the control plane's Service.
    let test_pod = find(c, "Pod", "capmesh-test-status");
    assert_eq!(test_pod["metadata"]["annotations"]["helm.sh/hook"], "test");
    let status = container(&test_pod["spec"], "containers", "capmesh-status");
    let args = args_of(status);
    assert_eq!(args[0], "status");
    assert_eq!(
        flag_value(&args, "--control-plane"),
        "https://capmesh-control-plane.capmesh.svc:8000"
    );
    assert!(
        arr(&status["env"])
            .iter()
            .any(|e| e["name"] == "CAPMESH_ADMIN_TOKEN"
                && e["valueFrom"]["secretKeyRef"]["name"] == "capmesh-control-plane-admin-token")
    );
    assert!(
        c["objects"].as_array().is_some_and(|o| o
            .iter()
            .any(|o| s(&o["template"]).contains("/templates/tests/"))),
        "the test pod lives in templates/tests/"
    );

    // NOTES: the enabled agents, the control plane, metrics.
    let notes = s(&c["notes"]);
    for alias in AGENTS {
        assert!(
            notes.contains(&format!("  - {alias}:")),
            "NOTES miss {alias}:\n{notes}"
        );
    }
    for want in [
        "https://capmesh-control-plane:8000",
        "/metrics",
        "port-forward",
        "helm test",
    ] {
        assert!(notes.contains(want), "NOTES miss {want}:\n{notes}");
    }

    // Minimal: the control plane (SQLite, no volume) and one agent.
    let c = case(PLATFORM, "minimal");
    let deployments: BTreeSet<&str> = of_kind(c, "Deployment")
        .iter()
        .map(|d| s(&d["metadata"]["name"]))
        .collect();
    assert_eq!(
        deployments,
        BTreeSet::from(["capmesh-control-plane", "capmesh-weather"])
    );
    assert!(
        of_kind(c, "StatefulSet").is_empty(),
        "no database, no volume"
    );
    assert!(of_kind(c, "NetworkPolicy").is_empty());
    let notes = s(&c["notes"]);
    assert!(
        notes.contains("  - weather:") && !notes.contains("  - flights:"),
        "{notes}"
    );
    let cp = container(
        pod_spec(find(c, "Deployment", "capmesh-control-plane")),
        "containers",
        "control-plane",
    );
    assert!(
        !arr(&cp["env"]).iter().any(|e| e["name"] == "CAPMESH_STORE"),
        "SQLite: no --store"
    );

    // Production: replicas on PostgreSQL, autoscaling, budgets, quota, no blanket allow.
    let c = case(PLATFORM, "production");
    let cp = find(c, "Deployment", "capmesh-control-plane");
    assert_eq!(cp["spec"]["replicas"], 3);
    let env = arr(&container(pod_spec(cp), "containers", "control-plane")["env"]);
    let store = env
        .iter()
        .find(|e| e["name"] == "CAPMESH_STORE")
        .expect("a PostgreSQL store");
    assert!(s(&store["value"]).contains("@capmesh-postgresql:5432/"));
    find(c, "StatefulSet", "capmesh-postgresql");
    find(c, "Service", "capmesh-postgresql");
    find(c, "Secret", "capmesh-postgresql");
    for alias in ["weather", "flights", "llm-claude", "llm-openai"] {
        find(c, "HorizontalPodAutoscaler", &format!("capmesh-{alias}"));
    }
    assert!(of_kind(c, "PodDisruptionBudget").len() >= 6);
    let quota = find(c, "ResourceQuota", "capmesh-quota");
    assert_eq!(quota["spec"]["hard"]["pods"], "120");
    assert!(
        !of_kind(c, "NetworkPolicy")
            .iter()
            .any(|n| n["metadata"]["name"] == "capmesh-allow-intra-namespace")
    );
    // Under a ResourceQuota on CPU and memory every container needs requests and limits.
    for o in objects(c) {
        let spec = if o["kind"] == "Pod" {
            &o["spec"]
        } else {
            pod_spec(o)
        };
        for list in ["initContainers", "containers"] {
            for k in arr(&spec[list]) {
                assert!(
                    !k["resources"]["requests"]["cpu"].is_null()
                        && !k["resources"]["limits"]["memory"].is_null(),
                    "{}/{}: container {} has no requests/limits",
                    s(&o["kind"]),
                    s(&o["metadata"]["name"]),
                    s(&k["name"])
                );
            }
        }
    }
    let planner = find(c, "Deployment", "capmesh-planner");
    assert_eq!(
        container(pod_spec(planner), "initContainers", "capmesh-proxy")["restartPolicy"],
        "Always"
    );
}

/// The `capmesh_*` metric names in PromQL text.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("capmesh_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

#[test]
fn charts_directory_holds_docs_and_the_lock() {
    let charts = repo_root().join("charts");
    let readme = std::fs::read_to_string(charts.join("README.md")).expect("charts/README.md");
    for want in [
        "capmesh-control-plane",
        "capmesh-agent",
        "capmesh-platform",
        "helm dependency build",
        "Sidecar only",
        "ca.pem",
    ] {
        assert!(
            readme.contains(want),
            "charts/README.md does not cover {want:?}"
        );
    }
    // The umbrella's subcharts are packaged from the sibling charts by `helm dependency
    // build` (Chart.lock pins them; .gitignore keeps the archives out of git).
    assert!(charts.join("capmesh-platform").join("Chart.lock").exists());
}
